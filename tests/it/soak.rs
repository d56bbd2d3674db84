//! A bounded soak: both sidecars as real processes, thousands of short-lived connections through the
//! client sidecar mixed with hostile clients hitting the listener directly (no certificate, another
//! CA, plaintext, garbage, half handshakes) and a keep-alive HTTP/1.1 client that idles between its
//! requests (so the listener parks and revives its connection), while both certificates rotate on
//! disk. No good request may fail, and after the load the processes' descriptor counts and RSS must
//! be back near their post-warm-up levels.
//!
//! Bounded by counts (rounds x requests), with a wall-clock cap so a regression cannot hang CI.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Child;

use crate::support::backend::{Backend, HELLO};
use crate::support::binary::Binary;
use crate::support::files::{install_leaf_by_rename, MeshFiles};
use crate::support::http::{get, SERVICE_HOST};
use crate::support::pki::{TestPki, LISTENER_NAME};
use crate::support::{closed_port_addr, sha256_hex, tls};

/// Rounds after warm-up; each rotates both certificates once (about half a second each: a soak
/// of roughly a minute).
const ROUNDS: usize = 100;
/// Good requests per round, each on its own connection to the client sidecar.
const GOOD_PER_ROUND: usize = 800;
const GOOD_WORKERS: usize = 8;
/// Hostile connections per round against the listener.
const BAD_PER_ROUND: usize = 100;
/// The whole soak must finish within this (an upper bound against hangs, not a timing assertion).
const WALL_CAP: Duration = Duration::from_secs(240);
/// Descriptors the processes may hold above their warm-up count once the load has stopped.
const FD_SLACK: usize = 8;
/// RSS growth allowed over the warm-up level.
const RSS_SLACK_KIB: u64 = 8 * 1024;

/// A sidecar process, killed when dropped; its stderr goes to a file for the failure message.
struct Sidecar {
    child: Child,
    log: std::path::PathBuf,
}

impl Sidecar {
    fn spawn(side: &str, config: &Path, dir: &Path) -> Sidecar {
        let log = dir.join(format!("{side}.log"));
        let child = Binary::new(side, config)
            .env("RUST_LOG", "warn")
            .spawn_with_stderr(std::fs::File::create(&log).unwrap());
        Sidecar { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("sidecar exited")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (open descriptors, VmRSS in KiB)
    fn usage(&self) -> (usize, u64) {
        let pid = self.pid();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        (fds, rss)
    }
}

async fn wait_for_port(addr: SocketAddr, side: &Sidecar) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{addr} never opened; log:\n{}",
            side.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One GET on a fresh connection; any failure is returned, not panicked, so it can be counted.
async fn good_request(addr: SocketAddr, target: &str) -> Result<(), String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::get(target)
            .header("host", SERVICE_HOST)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let mesh_error = resp.headers().get("phoenix-mesh-error").cloned();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status != 200 || body != HELLO.as_bytes() || mesh_error.is_some() {
            return Err(format!(
                "{status} {mesh_error:?} {:?}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(20), attempt).await {
        Ok(r) => r.map_err(|e| format!("{target}: {e}")),
        Err(_) => Err(format!("{target}: no answer within 20 s")),
    }
}

/// One hostile connection to the listener, of kind `i % 5`. Each kind's refusal is checked, so a
/// listener that started answering them would fail the soak.
async fn bad_client(listener: SocketAddr, pki: &TestPki, i: usize) -> Result<(), String> {
    let bounded = Duration::from_secs(15);
    let run = async {
        match i % 5 {
            0 => {
                let config = tls::client_config(pki.root_pem(), None, &[b"http/1.1"]);
                tls::refusal_alert(listener, config).await;
            }
            1 => {
                let leaf = pki.client_cert_signed_by_other_ca();
                let config = tls::client_config(pki.root_pem(), Some(&leaf), &[b"http/1.1"]);
                tls::refusal_alert(listener, config).await;
            }
            2 => {
                let mut tcp = TcpStream::connect(listener).await.unwrap();
                tcp.write_all(format!("GET / HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                let mut got = Vec::new();
                let _ = tcp.read_to_end(&mut got).await;
                let text = String::from_utf8_lossy(&got);
                if !text.starts_with("HTTP/1.1 400") || !text.contains("tls-required") {
                    return Err(format!("plaintext got {text:?}"));
                }
            }
            3 => {
                let mut tcp = TcpStream::connect(listener).await.unwrap();
                let _ = tcp
                    .write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
                    .await;
                let _ = tcp.write_all(&[0xffu8; 256]).await;
                let mut got = Vec::new();
                let _ = tcp.read_to_end(&mut got).await;
                if got.first().is_some_and(|b| *b != 0x15) {
                    return Err(format!("garbage got {got:?}"));
                }
            }
            _ => {
                // ClientHello, read the first bytes of the answer, then hang up mid-handshake.
                let config = tls::client_config(pki.root_pem(), None, &[]);
                let mut conn = rustls::ClientConnection::new(
                    config,
                    ServerName::try_from(LISTENER_NAME).unwrap(),
                )
                .unwrap();
                let mut hello = Vec::new();
                conn.write_tls(&mut hello).unwrap();
                let mut tcp = TcpStream::connect(listener).await.unwrap();
                tcp.write_all(&hello).await.unwrap();
                let mut first = [0u8; 64];
                let _ = tcp.read(&mut first).await;
            }
        }
        Ok(())
    };
    tokio::time::timeout(bounded, run)
        .await
        .unwrap_or_else(|_| Err(format!("bad client {i} hung")))
}

/// Requests per round from the keep-alive client straight at the listener, idling between them.
const PARKED_PER_ROUND: usize = 3;

/// One keep-alive HTTP/1.1 connection straight to the listener with a valid gateway certificate,
/// idling before each request so the listener parks the connection and takes it up again.
async fn parked_client(listener: SocketAddr, pki: &TestPki, tag: &str) -> Result<(), String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("parked client {tag}: {what}: {e}");
    let config = tls::client_config(pki.root_pem(), Some(&pki.client_cert()), &[b"http/1.1"]);
    let run = async {
        let stream = tls::connect(listener, LISTENER_NAME, config)
            .await
            .map_err(|e| fail("handshake", &e))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail("HTTP/1.1", &e))?;
        tokio::spawn(conn);
        for i in 0..PARKED_PER_ROUND {
            tokio::time::sleep(Duration::from_millis(60)).await;
            send.ready().await.map_err(|e| fail("ready", &e))?;
            let resp = send
                .send_request(get(&format!("/parked/{tag}/{i}")))
                .await
                .map_err(|e| fail("request", &e))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| fail("body", &e))?
                .to_bytes();
            if status != 200 || body != HELLO.as_bytes() {
                return Err(fail("answer", &format!("{status} {body:?}")));
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .unwrap_or_else(|_| Err(format!("parked client {tag} hung")))
}

/// Runs one round of load: good requests through the client, hostile clients at the listener.
async fn round(
    tag: &str,
    client: SocketAddr,
    listener: SocketAddr,
    pki: &Arc<TestPki>,
    failures: &Arc<std::sync::Mutex<Vec<String>>>,
    good_done: &Arc<AtomicUsize>,
) {
    let mut tasks = Vec::new();
    for w in 0..GOOD_WORKERS {
        let failures = failures.clone();
        let good_done = good_done.clone();
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in (w..GOOD_PER_ROUND).step_by(GOOD_WORKERS) {
                if let Err(e) = good_request(client, &format!("/soak/{tag}/{i}")).await {
                    failures.lock().unwrap().push(e);
                }
                good_done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in 0..2 {
        let failures = failures.clone();
        let pki = pki.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..BAD_PER_ROUND).step_by(2) {
                if let Err(e) = bad_client(listener, &pki, i).await {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("hostile client: {e}"));
                }
            }
        }));
    }
    {
        let failures = failures.clone();
        let pki = pki.clone();
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = parked_client(listener, &pki, &tag).await {
                failures.lock().unwrap().push(e);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn soak_mixed_traffic_with_rotation_keeps_good_requests_and_leaks_nothing() {
    let started = Instant::now();
    let pki = Arc::new(TestPki::new());
    let backend = Backend::start().await;
    let mut files = MeshFiles::new(&pki, backend.addr, &pki.listener_cert(), &pki.client_cert());
    let d = files.dir.path().to_owned();
    let d = d.as_path();

    // Ports chosen here, since the processes log only warnings (nothing to read an address from).
    let listener_addr = closed_port_addr();
    let client_addr = closed_port_addr();
    files
        .server
        .set_str("listen", &listener_addr.to_string())
        .set_str("handshake_timeout", "1s")
        .set_str("reload_poll_interval", "200ms");
    files
        .client
        .set_str("listen", &client_addr.to_string())
        .set_addrs("upstreams", &[listener_addr])
        .set_str("pool_idle_timeout", "2s")
        .set_str("reload_poll_interval", "200ms");

    let server_proc = Sidecar::spawn("server", &files.write_server(), d);
    let client_proc = Sidecar::spawn("client", &files.write_client(), d);
    wait_for_port(listener_addr, &server_proc).await;
    wait_for_port(client_addr, &client_proc).await;

    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let good_done = Arc::new(AtomicUsize::new(0));

    // Warm-up: the same mix, including one rotation, so allocator arenas, pools and caches settle.
    for w in 0..2 {
        install_leaf_by_rename(d, "listener", &pki.listener_cert());
        install_leaf_by_rename(d, "client", &pki.client_cert());
        round(
            &format!("warm{w}"),
            client_addr,
            listener_addr,
            &pki,
            &failures,
            &good_done,
        )
        .await;
    }
    // Let connections from the warm-up that are merely closing (handshake timeouts) go.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let warm_server = server_proc.usage();
    let warm_client = client_proc.usage();

    let mut last_client_leaf = None;
    for r in 0..ROUNDS {
        assert!(
            started.elapsed() < WALL_CAP,
            "soak exceeded {WALL_CAP:?} after {r} rounds"
        );
        install_leaf_by_rename(d, "listener", &pki.listener_cert());
        let client_leaf = pki.client_cert();
        install_leaf_by_rename(d, "client", &client_leaf);
        last_client_leaf = Some(client_leaf);
        round(
            &format!("r{r}"),
            client_addr,
            listener_addr,
            &pki,
            &failures,
            &good_done,
        )
        .await;
    }

    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} good requests or hostile-client checks failed; first: {:#?}\nserver log:\n{}\nclient log:\n{}",
        failures.len(),
        good_done.load(Ordering::Relaxed),
        &failures[..failures.len().min(10)],
        server_proc.log(),
        client_proc.log()
    );
    let expected = (ROUNDS + 2) * GOOD_PER_ROUND;
    assert_eq!(good_done.load(Ordering::Relaxed), expected);
    let soaked = backend
        .seen()
        .iter()
        .filter(|s| s.target.starts_with("/soak/"))
        .count();
    assert_eq!(soaked, expected, "backend did not see every good request");
    let parked = backend
        .seen()
        .iter()
        .filter(|s| s.target.starts_with("/parked/"))
        .count();
    assert_eq!(
        parked,
        (ROUNDS + 2) * PARKED_PER_ROUND,
        "backend did not see every keep-alive request"
    );

    // Descriptors: wait (bounded) for pooled and half-open connections to be let go.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (end_server, end_client) = loop {
        let (s, c) = (server_proc.usage(), client_proc.usage());
        if (s.0 <= warm_server.0 + FD_SLACK && c.0 <= warm_client.0 + FD_SLACK)
            || Instant::now() > deadline
        {
            break (s, c);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "soak: {expected} good requests, {} hostile connections, {:?}; \
         server fds {} -> {}, rss {} -> {} KiB; client fds {} -> {}, rss {} -> {} KiB",
        (ROUNDS + 2) * BAD_PER_ROUND,
        started.elapsed(),
        warm_server.0,
        end_server.0,
        warm_server.1,
        end_server.1,
        warm_client.0,
        end_client.0,
        warm_client.1,
        end_client.1
    );
    for (side, warm, end) in [
        ("server", warm_server, end_server),
        ("client", warm_client, end_client),
    ] {
        assert!(
            end.0 <= warm.0 + FD_SLACK,
            "{side}: {} descriptors open after the soak, {} after warm-up",
            end.0,
            warm.0
        );
        assert!(
            end.1 <= warm.1 + RSS_SLACK_KIB,
            "{side}: RSS {} KiB after the soak, {} KiB after warm-up",
            end.1,
            warm.1
        );
    }
    // Both certificates really rotated: the live ones are the last ones written.
    let live = tls::connect(
        listener_addr,
        LISTENER_NAME,
        tls::client_config(pki.root_pem(), Some(&pki.client_cert()), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    let presented = live.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let on_disk = std::fs::read_to_string(d.join("listener.crt")).unwrap();
    let on_disk_der = rustls::pki_types::CertificateDer::pem_slice_iter(on_disk.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        presented,
        on_disk_der.to_vec(),
        "listener still presents an old certificate"
    );
    // And the client presents its last certificate on new connections. Pooled connections keep
    // the certificate they were made with, so first let them idle out (pool_idle_timeout = 2s).
    let want = format!("Hash={}", sha256_hex(&last_client_leaf.unwrap().der));
    let mut xfcc = String::new();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        good_request(client_addr, "/soak-final").await.unwrap();
        xfcc = backend
            .seen()
            .last()
            .unwrap()
            .one("x-forwarded-client-cert");
        if xfcc.starts_with(&want) {
            return;
        }
    }
    panic!("client still presents an old certificate: {xfcc}, want {want}");
}
