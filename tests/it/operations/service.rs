//! The binary under systemd: `Type=notify` (READY, RELOADING, STOPPING on `$NOTIFY_SOCKET`, a test
//! standing in for systemd with a datagram socket), the watchdog, and SIGTERM: stop accepting, let
//! the request in flight finish, exit 0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream, UnixDatagram};
use tokio::sync::watch;

use crate::support::backend::Backend;
use crate::support::binary::{send_signal, Binary};
use crate::support::files::MeshFiles;
use crate::support::http::try_get;
use crate::support::pki::TestPki;
use crate::support::{eventually, within};

/// The next notification datagram, as text.
async fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = within("an sd_notify datagram", socket.recv(&mut buf))
        .await
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A listener setup (its backend, config files) and the datagram socket standing in for systemd.
struct Notified {
    _backend: Backend,
    files: MeshFiles,
    socket_path: std::path::PathBuf,
    socket: UnixDatagram,
}

impl Notified {
    async fn new() -> Notified {
        let pki = TestPki::new();
        let backend = Backend::start().await;
        let files = MeshFiles::new(&pki, backend.addr, &pki.listener_cert(), &pki.client_cert());
        files.write_server();
        let socket_path = files.path("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        Notified {
            _backend: backend,
            files,
            socket_path,
            socket,
        }
    }

    /// Starts the listener with `NOTIFY_SOCKET` set, no watchdog variables but `vars`.
    fn spawn(&self, vars: &[(&str, String)]) -> tokio::process::Child {
        self.spawn_logging(vars, Stdio::null())
    }

    /// The same, with the listener's stderr going to `stderr`.
    fn spawn_logging(&self, vars: &[(&str, String)], stderr: Stdio) -> tokio::process::Child {
        let mut binary =
            Binary::server(&self.files.path("server.toml")).env("NOTIFY_SOCKET", &self.socket_path);
        for (key, value) in vars {
            binary = binary.env(key, value);
        }
        binary.spawn_with_stderr(stderr)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn listener_notifies_ready_reloading_and_stopping() {
    let notified = Notified::new().await;
    let (files, socket) = (&notified.files, &notified.socket);
    let mut child = notified.spawn(&[]);
    let pid = child.id().unwrap();
    let kill = |signal: &str| send_signal(pid, signal);

    assert_eq!(next_notification(socket).await.trim(), "READY=1");

    kill("HUP");
    let reloading = next_notification(socket).await;
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "systemd's notify-reload wants the time: {reloading:?}"
    );
    assert_eq!(next_notification(socket).await.trim(), "READY=1");

    kill("TERM");
    assert_eq!(next_notification(socket).await.trim(), "STOPPING=1");
    let status = within("the listener exiting", child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");

    // Outside systemd nothing is sent: without NOTIFY_SOCKET the socket stays silent.
    let mut quiet = Binary::server(&files.path("server.toml")).spawn_with_stderr(Stdio::null());
    let mut buf = [0u8; 64];
    let heard = tokio::time::timeout(Duration::from_millis(800), socket.recv(&mut buf)).await;
    assert!(heard.is_err(), "a process outside systemd must not notify");
    quiet.kill().await.unwrap();
}

/// With `WatchdogSec=` (systemd passes `WATCHDOG_USEC`) the listener pings `WATCHDOG=1` until it
/// stops; when `WATCHDOG_PID` names another process (a child started by the unit's main process) it
/// does not.
#[tokio::test(flavor = "multi_thread")]
async fn listener_feeds_the_watchdog_only_when_asked() {
    let notified = Notified::new().await;
    let socket = &notified.socket;

    let mut fed = notified.spawn(&[("WATCHDOG_USEC", "300000".into())]);
    assert_eq!(next_notification(socket).await.trim(), "READY=1");
    for _ in 0..3 {
        assert_eq!(next_notification(socket).await.trim(), "WATCHDOG=1");
    }
    fed.kill().await.unwrap();
    // Drain what the killed process sent before it died.
    let mut buf = [0u8; 64];
    while tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf))
        .await
        .is_ok()
    {}

    let mut other = notified.spawn(&[
        ("WATCHDOG_USEC", "100000".into()),
        ("WATCHDOG_PID", "1".into()),
    ]);
    assert_eq!(next_notification(socket).await.trim(), "READY=1");
    let heard = tokio::time::timeout(Duration::from_millis(800), socket.recv(&mut buf)).await;
    assert!(
        heard.is_err(),
        "pinged a watchdog meant for another process: {:?}",
        heard.map(|n| String::from_utf8_lossy(&buf[..n.unwrap()]).into_owned())
    );
    other.kill().await.unwrap();

    // A zero period (not something systemd sends) is no watchdog, and no panic: tokio would keep the
    // process up after a task panics, so it is stderr that tells.
    let mut zero = notified.spawn_logging(&[("WATCHDOG_USEC", "0".into())], Stdio::piped());
    assert_eq!(next_notification(socket).await.trim(), "READY=1");
    let heard = tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await;
    assert!(heard.is_err(), "a zero watchdog period was pinged");
    zero.start_kill().unwrap();
    let output = within("the listener exiting", zero.wait_with_output())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A backend whose `/held` answers only when the test opens the gate; reports when it has the request.
async fn gated_backend() -> (SocketAddr, Arc<AtomicBool>, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = Arc::new(AtomicBool::new(false));
    let (gate, _) = watch::channel(false);
    let (arrived2, gate2) = (arrived.clone(), gate.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (arrived, gate) = (arrived2.clone(), gate2.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (arrived, mut open) = (arrived.clone(), gate.subscribe());
                    async move {
                        if req.uri().path() == "/held" {
                            arrived.store(true, Ordering::SeqCst);
                            let _ = open.wait_for(|o| *o).await;
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                            b"held answer\n",
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, arrived, gate)
}

async fn refuses_connections(addr: SocketAddr) -> Option<()> {
    match TcpStream::connect(addr).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_lets_the_request_in_flight_finish_and_exits_0() {
    let pki = TestPki::new();
    let (backend, arrived, gate) = gated_backend().await;
    let mut files = MeshFiles::new(&pki, backend, &pki.listener_cert(), &pki.client_cert());
    files.server.set_str("drain_timeout", "20s");
    files.client.set_str("drain_timeout", "20s");
    let (mut listener, listener_addr) = files.start_listener().await;
    let (mut client, client_addr) = files.start_client(listener_addr).await;

    let in_flight = tokio::spawn(try_get(client_addr, "/held"));
    eventually("the held request reaching the backend", || {
        let a = arrived.load(Ordering::SeqCst);
        async move { a.then_some(()) }
    })
    .await;
    listener.signal("TERM");
    client.signal("TERM");
    listener
        .wait_for_line(&["SIGTERM", "stopping: no new connections"])
        .await;
    client
        .wait_for_line(&["SIGTERM", "stopping: no new connections"])
        .await;
    // The request is still held by the backend, so both processes are draining, not gone.
    eventually("the client refusing new connections", || {
        refuses_connections(client_addr)
    })
    .await;
    eventually("the listener refusing new connections", || {
        refuses_connections(listener_addr)
    })
    .await;
    assert!(!in_flight.is_finished(), "the held request ended early");
    assert!(
        listener.running() && client.running(),
        "exited before draining"
    );

    gate.send_replace(true);
    let got = within("the drained request", in_flight)
        .await
        .unwrap()
        .expect("the request in flight must complete");
    assert_eq!(
        (got.status, got.body.as_str()),
        (200, "held answer\n"),
        "{got:?}"
    );
    let (l, c) = (listener.exit().await, client.exit().await);
    assert_eq!((l.code(), c.code()), (Some(0), Some(0)));
    listener.wait_for_line(&["drained; exiting"]).await;
}
