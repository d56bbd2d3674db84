//! Limits on what a client may send or hold: request heads over `max_header_bytes` (431 on both
//! hops), malformed and smuggling requests (400, and never a request at the backend), `max_connections`
//! back-pressure (counting only authenticated connections on the listener, whose unauthenticated ones
//! have a budget of their own, `max_pending_handshakes`), `max_backend_connections` against a reader
//! that never reads, and the binary's open-file limit: raised to the hard limit at start, and running
//! out of descriptors backs off instead of spinning.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::admin::{admin_get, metric};
use crate::support::backend::HELLO;
use crate::support::binary::{Binary, Proc};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::support::http::{get, send_h1, try_get, SERVICE_HOST};
use crate::support::mesh::Mesh;
use crate::support::raw::{
    exchange, raw_get, read_response, read_until_closed_or_quiet, responses_in, status_of, Ending,
};
use crate::support::{eventually, tls, within};

fn oversized_head(target: &str) -> Vec<u8> {
    let filler = "a".repeat(12 * 1024);
    format!("GET {target} HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nX-Filler: {filler}\r\n\r\n")
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_request_head_gets_431_on_both_hops() {
    let mesh = Mesh::start_with(|s| {
        s.server.set("max_header_bytes", "8192");
        s.client.set("max_header_bytes", "8192");
    })
    .await;
    let mut tcp = TcpStream::connect(mesh.client_addr).await.unwrap();
    let got = exchange(&mut tcp, &oversized_head("/huge-client")).await;
    assert_eq!(
        status_of(&got),
        Some(431),
        "client port: {:?}",
        String::from_utf8_lossy(&got)
    );

    let mut tls = mesh.gateway_tls().await;
    let got = exchange(&mut tls, &oversized_head("/huge-listener")).await;
    assert_eq!(
        status_of(&got),
        Some(431),
        "listener: {:?}",
        String::from_utf8_lossy(&got)
    );

    assert!(mesh.backend.targets_with_prefix("/huge").is_empty());
    // A head just under the limit still passes.
    let mut req = get("/big-but-fine");
    req.headers_mut()
        .insert("x-filler", "b".repeat(6000).parse().unwrap());
    let reply = within("large but allowed head", send_h1(mesh.client_addr, req)).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
}

/// Malformed requests, each with the path the backend must never see.
fn malformed_requests() -> Vec<(&'static str, Vec<u8>)> {
    let h = SERVICE_HOST;
    vec![
        ("bad request line", b"THIS IS NOT HTTP\r\n\r\n".to_vec()),
        (
            "control byte in a header value",
            format!("GET /bad-value HTTP/1.1\r\nHost: {h}\r\nX-Bad: a\x01b\r\n\r\n").into_bytes(),
        ),
        (
            "space in a header name",
            format!("GET /bad-name HTTP/1.1\r\nHost: {h}\r\nBad Header: x\r\n\r\n").into_bytes(),
        ),
        (
            "two different Content-Lengths",
            format!(
                "POST /two-lengths HTTP/1.1\r\nHost: {h}\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc"
            )
            .into_bytes(),
        ),
        (
            "obfuscated Transfer-Encoding",
            format!(
                "POST /te-obfuscated HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
        ),
    ]
}

/// CL.TE and TE.CL smuggling attempts: whatever the hop decides, `/smuggled` must never reach the
/// backend as a request of its own.
fn smuggling_requests() -> Vec<(&'static str, Vec<u8>)> {
    let h = SERVICE_HOST;
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n");
    vec![
        (
            "CL.TE",
            format!(
                "POST /front HTTP/1.1\r\nHost: {h}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
                5 + smuggled.len()
            )
            .into_bytes(),
        ),
        (
            "TE.CL",
            format!(
                "POST /front HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{smuggled}"
            )
            .into_bytes(),
        ),
    ]
}

async fn check_malformed<S, F, Fut>(mesh: &Mesh, hop: &str, connect: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    for (what, raw) in malformed_requests() {
        let mut s = connect().await;
        let got = exchange(&mut s, &raw).await;
        if !got.is_empty() {
            assert_eq!(
                status_of(&got),
                Some(400),
                "{hop}, {what}: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        let (_, ending) = within(
            "after the 400",
            read_until_closed_or_quiet(&mut s, Duration::from_secs(3)),
        )
        .await;
        assert_eq!(
            ending,
            Ending::Closed,
            "{hop}, {what}: connection left open after a 400"
        );
    }
    for (what, raw) in smuggling_requests() {
        let mut s = connect().await;
        let got = exchange(&mut s, &raw).await;
        let status = status_of(&got);
        assert!(
            status.is_some() || got.is_empty(),
            "{hop}, {what}: {:?}",
            String::from_utf8_lossy(&got)
        );
        // Rejected outright, or at most the front request answered and then the connection closed
        // (RFC 9112 section 6.1: a server that processes such a request must close afterwards).
        assert!(
            responses_in(&got) <= 1,
            "{hop}, {what}: several responses: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert!(
        mesh.backend.targets_with_prefix("/smuggled").is_empty(),
        "{hop}: the backend saw a smuggled request: {:#?}",
        mesh.backend.seen()
    );
    for prefix in ["/bad-", "/two-lengths", "/te-obfuscated"] {
        assert!(
            mesh.backend.targets_with_prefix(prefix).is_empty(),
            "{hop}: backend saw {prefix}"
        );
    }
    mesh.good_requests(&hop.replace(' ', "-"), 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_smuggling_requests_on_client_port_get_400_and_never_reach_backend() {
    let mesh = Mesh::start().await;
    let addr = mesh.client_addr;
    check_malformed(&mesh, "client port", || async move {
        TcpStream::connect(addr).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_smuggling_requests_over_tls_get_400_and_never_reach_backend() {
    let mesh = Mesh::start().await;
    let mesh_ref = &mesh;
    check_malformed(&mesh, "listener", || mesh_ref.gateway_tls()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_holds_a_third_connection_until_one_closes() {
    let mesh = Mesh::start_with(|s| {
        s.client.set("max_connections", "2");
    })
    .await;
    let mut held = Vec::new();
    for i in 0..2 {
        let mut s = TcpStream::connect(mesh.client_addr).await.unwrap();
        let (head, body) = within("held request", raw_get(&mut s, &format!("/held/{i}"))).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(body, HELLO);
        held.push(s);
    }

    // The kernel completes the TCP handshake (backlog); the sidecar must not serve it yet.
    let mut third = TcpStream::connect(mesh.client_addr).await.unwrap();
    let req = format!("GET /third HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n");
    third.write_all(req.as_bytes()).await.unwrap();
    let mut peek = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut peek)).await;
    assert!(
        early.is_err(),
        "the third connection was answered (or closed) while two were held: {early:?}"
    );
    assert!(
        !mesh.backend.seen().iter().any(|s| s.target == "/third"),
        "the third request reached the backend while two connections were held"
    );

    drop(held.remove(0));
    let (head, body) = within(
        "the third request after a slot freed",
        read_response(&mut third),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, HELLO);

    drop(third);
    drop(held);
    let reply = within("a fresh request", send_h1(mesh.client_addr, get("/fresh"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
}

/// Connections that never send a ClientHello hold no `max_connections` slot: with 300 of them open
/// against a listener allowing 100 connections and 50 pending handshakes, a client's new mutual-TLS
/// connection and request still get through (without the separate budget it waited for
/// `handshake_timeout`), and the silent connections the budget had no room for were dropped, oldest
/// first, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_keep_an_authenticated_client_out() {
    let mesh = Mesh::start_with(|s| {
        s.server
            .set("max_connections", "100")
            .set("max_pending_handshakes", "50")
            .set_str("handshake_timeout", "60s")
            .set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(TcpStream::connect(mesh.listener_addr).await.unwrap());
    }
    let (status, _) =
        crate::support::tls::tls_get(mesh.listener_addr, mesh.tls_config(&mesh.client_leaf))
            .await
            .unwrap_or_else(|e| panic!("a new connection while 300 sockets sat silent: {e}"));
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    let admin = mesh.listener_admin.unwrap();
    eventually("the silent connections past the budget dropped", || async {
        let (_, text) = admin_get(admin, "/metrics").await;
        let labels = [("result", "failed"), ("reason", "dropped")];
        metric(&text, "phoenix_mesh_tls_handshakes_total", &labels).filter(|&n| n >= 250.0)
    })
    .await;
    // The oldest went first: the first silent socket is closed by the listener.
    let mut first = silent.remove(0);
    let mut buf = [0u8; 1];
    let read = within("the oldest silent socket closing", first.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

/// The real binary under `prlimit --nofile=<soft>:<hard>`, with its JSON log collected.
fn under_prlimit(nofile: &str, side: &str, config: &Path) -> Proc {
    Binary::new(side, config)
        .json_logs()
        .under(&["prlimit", &format!("--nofile={nofile}")])
        .spawn()
}

/// The client's plain-HTTP address once it is accepting.
/// A peer that opens many streams and never opens their windows (SETTINGS_INITIAL_WINDOW_SIZE 0):
/// each response it asks for pins a backend connection until its progress timeout. The listener holds
/// at most `max_backend_connections` of them; requests beyond wait `backend_connect_timeout` for one
/// and get `503 backend-connection-limit`. After `backend_timeout` without progress the pinned
/// responses are cut off (their streams reset), the backend's connections are released, and the
/// listener serves again.
#[tokio::test(flavor = "multi_thread")]
async fn a_reader_that_never_reads_pins_at_most_max_backend_connections() {
    let mesh = Mesh::start_with(|s| {
        s.server.set("max_backend_connections", "3");
        s.server.set_str("backend_connect_timeout", "500ms");
        s.server.set_str("backend_timeout", "2s");
    })
    .await;
    let config = tls::client_config(mesh.pki.root_pem(), Some(&mesh.client_leaf), &[b"h2"]);
    let mut streams = Vec::new();
    for _ in 0..2 {
        let tls = tls::to_listener(mesh.listener_addr, config.clone()).await;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(0)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        for _ in 0..4 {
            let mut sender = sender.clone();
            streams.push(tokio::spawn(async move {
                let req = get("/download?bytes=50000000");
                sender.send_request(req).await.unwrap()
            }));
        }
    }
    let mut pinned = Vec::new();
    let mut refused = 0;
    for stream in streams {
        let response = within("a response head", stream).await.unwrap();
        match response.status().as_u16() {
            200 => pinned.push(response),
            503 => {
                assert_eq!(
                    response
                        .headers()
                        .get(phoenix_mesh_common::MESH_ERROR_HEADER)
                        .and_then(|v| v.to_str().ok()),
                    Some("backend-connection-limit"),
                    "{response:?}"
                );
                refused += 1;
            }
            other => panic!("unexpected status {other}: {response:?}"),
        }
        assert!(
            mesh.backend.open_connections() <= 3,
            "{} backend connections open, max_backend_connections is 3",
            mesh.backend.open_connections()
        );
    }
    assert_eq!((pinned.len(), refused), (3, 5));
    assert_eq!(mesh.backend.connections(), 3);
    // Cut off after backend_timeout without progress: reset, not ended.
    for response in pinned {
        let body = within("the cut-off", response.into_body().collect()).await;
        assert!(body.is_err(), "a pinned response ended cleanly: {body:?}");
    }
    eventually("the backend's connections released", || async {
        (mesh.backend.open_connections() == 0).then_some(())
    })
    .await;
    mesh.good_requests("after-pinning", 2).await;
}

async fn client_addr(proc: &Proc) -> SocketAddr {
    proc.addr_from_log("client sidecar accepting plain HTTP", "listen")
        .await
}

/// Clock ticks of CPU (user + system) process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_raises_its_open_file_soft_limit_to_the_hard_limit() {
    let mesh = Mesh::start().await;
    let mut proc = under_prlimit("1024:4096", "client", &mesh.path("client.toml"));
    let addr = client_addr(&proc).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proc.pid)).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("{limits}"));
    let values: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(values, ["4096", "4096"], "{line}");
    let got = try_get(addr, "/").await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (200, HELLO));
    assert!(proc.running());
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_out_of_descriptors_backs_off_instead_of_spinning_and_recovers() {
    let mesh = Mesh::start().await;
    let mut proc = under_prlimit("64:64", "client", &mesh.path("client.toml"));
    let addr = client_addr(&proc).await;
    let got = try_get(addr, "/warm").await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (200, HELLO));

    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    proc.wait_for_line(&["accept failed; backing off"]).await;

    let hz: u64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100);
    let (ticks0, t0) = (cpu_ticks(proc.pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ticks1, wall) = (cpu_ticks(proc.pid), t0.elapsed());
    let cpu = Duration::from_millis((ticks1 - ticks0) * 1000 / hz);
    // A busy accept loop burns most of a core (about 65% here, logging each failure); backing off
    // (up to 1 s) burns next to nothing (0 ticks here). A quarter of a core is a generous bound.
    assert!(
        cpu < wall / 4,
        "out of descriptors, the process used {cpu:?} of CPU in {wall:?}: accept errors are spun on"
    );
    assert!(proc.running(), "the process died out of descriptors");

    drop(held);
    let got = eventually("a request after the descriptors came back", || async {
        try_get(addr, "/recovered").await.ok()
    })
    .await;
    assert_eq!((got.status, got.body.as_str()), (200, HELLO), "{got:?}");
    assert!(proc.running());
}
