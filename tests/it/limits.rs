//! Limits and long-lived traffic (issue 6): WebSocket upgrades through both hops, ejection of a
//! failing upstream, `max_connections` back-pressure, the open-file limit and running out of
//! descriptors, the idle keep-alive timeout, and pooled mesh connections following a rotation of the
//! client's own certificate.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use phoenix_mesh_certs::pki::Leaf;
use phoenix_mesh_client::{ClientSettings, ClientSidecar};
use phoenix_mesh_transport::serve::Shutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::backend::HELLO;
use crate::support::http::{get, send_h1, SERVICE_HOST};
use crate::support::mesh::{toml_str, Mesh, TomlConfig};
use crate::support::pki::{expected_gateway_xfcc, LISTENER_NAME};
use crate::support::{closed_port_addr, within, STEP_LIMIT};
use crate::support_ops::{
    admin_get, eventually, install_leaf_by_rename, metric, try_get, InProc, Load, Proc,
};

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 on a TCP stream

/// Reads up to the end of a message head; returns the head and whatever followed it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed before the end of a message head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of header `name` in a raw head (case-insensitive name), if present.
fn head_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Sends a keep-alive GET for `target` and reads the whole (Content-Length) response: (head, body).
async fn raw_get(s: &mut TcpStream, target: &str) -> (String, String) {
    let req = format!("GET {target} HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    read_response(s).await
}

/// Reads one response with a Content-Length body.
async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> (String, String) {
    let (head, mut body) = read_head(s).await;
    let len: usize = head_value(&head, "content-length")
        .unwrap_or_else(|| panic!("no content-length: {head}"))
        .parse()
        .unwrap();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed in the body of: {head}");
        body.extend_from_slice(&chunk[..n]);
    }
    (head, String::from_utf8_lossy(&body).into_owned())
}

/// Reads until the peer closes (EOF or reset); fails if data arrives or it stays open past the bound.
async fn expect_eof<S: AsyncRead + Unpin>(what: &str, s: &mut S) {
    let mut buf = [0u8; 1024];
    match within(what, s.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!(
            "{what}: expected the connection to close, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket through both hops

/// How an upgraded connection ended at the backend.
#[derive(Debug, PartialEq, Eq)]
enum WsEnd {
    /// The backend read EOF: the client side closed.
    PeerClosed,
    /// The backend closed it after being asked to.
    BackendClosed,
}

/// A raw TCP backend: a WebSocket upgrade gets `101` and then an echo that upper-cases every byte
/// (and closes after echoing anything containing `close`); any other request gets `200 plain`.
struct WsBackend {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    ended: mpsc::UnboundedReceiver<WsEnd>,
    task: JoinHandle<()>,
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const PLAIN: &str = "plain\n";
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// RFC 6455's accept value for [`WS_KEY`]; the sidecars pass it through unchecked.
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

impl WsBackend {
    async fn start() -> WsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (tx, ended) = mpsc::unbounded_channel();
        let seen = heads.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(ws_conn(s, seen.clone(), tx.clone()));
            }
        });
        WsBackend {
            addr,
            heads,
            ended,
            task,
        }
    }

    /// The upgrade requests seen so far.
    fn upgrade_heads(&self) -> Vec<String> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .filter(|h| head_value(h, "upgrade").is_some())
            .cloned()
            .collect()
    }

    async fn next_end(&mut self) -> WsEnd {
        within(
            "the backend seeing the upgraded connection end",
            self.ended.recv(),
        )
        .await
        .unwrap()
    }
}

async fn ws_conn(
    mut s: TcpStream,
    heads: Arc<Mutex<Vec<String>>>,
    ended: mpsc::UnboundedSender<WsEnd>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head, rest) = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            break (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    heads.lock().unwrap().push(head.clone());
    let is_ws = head_value(&head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_ws {
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PLAIN}",
            PLAIN.len()
        );
        let _ = s.write_all(answer.as_bytes()).await;
        let _ = s.shutdown().await;
        return;
    }
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
    );
    if s.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let mut pending = rest;
    loop {
        if !pending.is_empty() {
            let upper = pending.to_ascii_uppercase();
            if s.write_all(&upper).await.is_err() {
                return;
            }
            if upper.windows(5).any(|w| w == b"CLOSE") {
                drop(s);
                let _ = ended.send(WsEnd::BackendClosed);
                return;
            }
            pending.clear();
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                let _ = ended.send(WsEnd::PeerClosed);
                return;
            }
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A mesh (default HTTP/2 link) in front of a [`WsBackend`].
async fn ws_mesh() -> (Mesh, WsBackend) {
    let backend = WsBackend::start().await;
    let addr = backend.addr;
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("backend", &addr.to_string());
    })
    .await;
    (mesh, backend)
}

/// Sends a WebSocket upgrade to the client sidecar and checks the `101` that comes back.
async fn open_ws(mesh: &Mesh) -> TcpStream {
    let mut s = TcpStream::connect(mesh.client_addr).await.unwrap();
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (head, rest) = within("the 101 answer", read_head(&mut s)).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert_eq!(head_value(&head, "upgrade"), Some("websocket"), "{head}");
    assert!(
        head_value(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "{head}"
    );
    assert_eq!(
        head_value(&head, "sec-websocket-accept"),
        Some(WS_ACCEPT),
        "{head}"
    );
    assert!(rest.is_empty(), "bytes before any message: {rest:?}");
    s
}

/// Sends `msg` on the upgraded stream and expects it back upper-cased.
async fn ws_echo(s: &mut TcpStream, msg: &str) {
    s.write_all(msg.as_bytes()).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    within("the echoed message", s.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&back), msg.to_ascii_uppercase());
}

/// An ordinary request through the same client sidecar while an upgrade is open.
async fn plain_request(mesh: &Mesh, target: &str) {
    let reply = within("plain request", send_h1(mesh.client_addr, get(target))).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
    assert_eq!(reply.body, PLAIN, "{reply:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_streams_both_ways_through_both_hops_until_the_client_closes() {
    let (mesh, mut backend) = ws_mesh().await;
    plain_request(&mesh, "/before").await;
    let mut ws = open_ws(&mesh).await;
    for i in 0..5 {
        ws_echo(&mut ws, &format!("message {i} from the client\n")).await;
        plain_request(&mesh, &format!("/during/{i}")).await;
    }

    let heads = backend.upgrade_heads();
    assert_eq!(heads.len(), 1, "{heads:#?}");
    let head = &heads[0];
    assert!(head.starts_with("GET /chat HTTP/1.1\r\n"), "{head}");
    assert_eq!(
        head_value(head, "x-forwarded-client-cert"),
        Some(expected_gateway_xfcc(&mesh.client_leaf).as_str()),
        "{head}"
    );
    assert_eq!(
        head_value(head, "sec-websocket-key"),
        Some(WS_KEY),
        "{head}"
    );
    assert!(
        head_value(head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "{head}"
    );

    ws.shutdown().await.unwrap();
    assert_eq!(backend.next_end().await, WsEnd::PeerClosed);
    expect_eof("client side after closing", &mut ws).await;
    plain_request(&mesh, "/after").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_closed_by_the_backend_reaches_the_client_as_eof() {
    let (mesh, mut backend) = ws_mesh().await;
    let mut ws = open_ws(&mesh).await;
    let mut other = open_ws(&mesh).await;
    for i in 0..3 {
        ws_echo(&mut ws, &format!("ping {i}\n")).await;
        ws_echo(&mut other, &format!("other {i}\n")).await;
    }
    ws_echo(&mut ws, "please close now\n").await;
    assert_eq!(backend.next_end().await, WsEnd::BackendClosed);
    expect_eof("client after the backend closed", &mut ws).await;
    // The other upgraded connection and ordinary requests are untouched.
    ws_echo(&mut other, "still here\n").await;
    plain_request(&mesh, "/after-close").await;
    assert_eq!(backend.upgrade_heads().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Upstream ejection

/// A client sidecar of our own (with an admin endpoint) beside `mesh`, using its certificate files.
struct ExtraClient {
    addr: SocketAddr,
    admin: SocketAddr,
    _shutdown: Shutdown,
    task: JoinHandle<()>,
}

impl Drop for ExtraClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn extra_client(
    mesh: &Mesh,
    upstreams: &[SocketAddr],
    extra: &[(&str, &str)],
) -> ExtraClient {
    let list: Vec<String> = upstreams.iter().map(|u| toml_str(&u.to_string())).collect();
    let mut config = TomlConfig::default();
    config
        .set_str("listen", "127.0.0.1:0")
        .set_str("admin_listen", "127.0.0.1:0")
        .set_str("server_name", LISTENER_NAME)
        .set_str("cert", "client.crt")
        .set_str("key", "client.key")
        .set_str("ca", "client-ca.crt")
        .set("upstreams", format!("[{}]", list.join(", ")));
    for (k, v) in extra {
        config.set_str(k, v);
    }
    let path = mesh.dir.path().join("extra-client.toml");
    config.write(&path);
    let sidecar = ClientSidecar::bind(ClientSettings::load(&path).unwrap())
        .await
        .unwrap();
    let addr = sidecar.local_addr().unwrap();
    let admin = sidecar.admin_addr().unwrap();
    let (shutdown, watch) = Shutdown::new();
    let task = tokio::spawn(sidecar.serve(watch));
    ExtraClient {
        addr,
        admin,
        _shutdown: shutdown,
        task,
    }
}

fn dials(metrics: &str, upstream: &str, result: &str) -> f64 {
    metric(
        metrics,
        "phoenix_mesh_upstream_dials_total",
        &[("upstream", upstream), ("result", result)],
    )
    .unwrap_or(0.0)
}

async fn sequential_ok(addr: SocketAddr, tag: &str, n: usize) {
    for i in 0..n {
        // Longer than pool_idle_timeout, so every request dials afresh. Pacing, not an assertion.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reply = within("request", send_h1(addr, get(&format!("/{tag}/{i}")))).await;
        assert_eq!(reply.status, StatusCode::OK, "{tag} {i}: {reply:#?}");
        assert_eq!(reply.body, HELLO, "{tag} {i}: {reply:#?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_failing_three_dials_is_ejected_and_not_dialled_again() {
    let mesh = Mesh::start().await;
    let closed = closed_port_addr();
    let client = extra_client(
        &mesh,
        &[closed, mesh.listener_addr],
        &[("pool_idle_timeout", "1ms")],
    )
    .await;
    let (closed_s, listener_s) = (closed.to_string(), mesh.listener_addr.to_string());

    sequential_ok(client.addr, "eject", 10).await;
    let (status, text) = admin_get(client.admin, "/metrics").await;
    assert_eq!(status, 200);
    let healthy = |upstream: &str| {
        metric(
            &text,
            "phoenix_mesh_upstream_healthy",
            &[("upstream", upstream)],
        )
    };
    assert_eq!(healthy(&closed_s), Some(0.0), "{text}");
    assert_ne!(healthy(&listener_s), Some(0.0), "{text}");
    assert_eq!(
        dials(&text, &closed_s, "upstream-unreachable"),
        3.0,
        "{text}"
    );
    assert_eq!(dials(&text, &closed_s, "ok"), 0.0, "{text}");
    let ok_before = dials(&text, &listener_s, "ok");
    assert!(ok_before >= 6.0, "expected a dial per request: {text}");

    sequential_ok(client.addr, "ejected", 10).await;
    let (_, text) = admin_get(client.admin, "/metrics").await;
    assert_eq!(
        dials(&text, &closed_s, "upstream-unreachable"),
        3.0,
        "the ejected upstream was dialled again within its 10 s ejection: {text}"
    );
    assert!(
        dials(&text, &listener_s, "ok") >= ok_before + 5.0,
        "the healthy upstream should have taken every dial: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// max_connections

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

// ---------------------------------------------------------------------------------------------
// Idle keep-alive

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connection_is_closed_after_header_read_timeout() {
    let mesh = Mesh::start_with(|s| {
        s.client.set_str("header_read_timeout", "500ms");
    })
    .await;
    let mut s = TcpStream::connect(mesh.client_addr).await.unwrap();
    let (head, body) = within("first request", raw_get(&mut s, "/once")).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, HELLO);
    assert!(
        !head_value(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "the sidecar closed after the response instead of keeping it alive: {head}"
    );
    expect_eof("idle keep-alive connection", &mut s).await;
    assert_eq!(mesh.backend.seen().len(), 1);
}

/// Between requests the listener parks an idle HTTP/1.1 connection without hyper's buffers (see
/// `phoenix_mesh_transport::http1_idle`). Parking must be invisible to the peer: a connection that sat idle
/// serves its next request, a request head that arrives in two pieces with a pause between is served
/// whole (not cut off as the end of the stream), a pipelined request that waits for the backend is not
/// taken for idleness, and a parked connection still closes after the idle timeout.
#[tokio::test(flavor = "multi_thread")]
async fn listener_parks_idle_keep_alive_connections_invisibly() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("header_read_timeout", "2s");
    })
    .await;
    let mut tls = mesh.gateway_tls().await;
    let idle = Duration::from_millis(300);
    // Idle before the first request, then between requests.
    for i in 0..3 {
        tokio::time::sleep(idle).await;
        let req = format!("GET /parked/{i} HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n");
        tls.write_all(req.as_bytes()).await.unwrap();
        let (head, body) = within("request after idling", read_response(&mut tls)).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "request {i}: {head}");
        assert_eq!(body, HELLO);
    }
    // A head in two pieces, 300 ms apart.
    tls.write_all(format!("GET /split HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n").as_bytes())
        .await
        .unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(idle).await;
    tls.write_all(b"X-Second-Half: yes\r\n\r\n").await.unwrap();
    let (head, body) = within("split request", read_response(&mut tls)).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "split request: {head}");
    assert_eq!(body, HELLO);
    // Two requests in one write: the second is served from hyper's buffer, with nothing more to read,
    // and must not be taken for idleness while it waits for the backend.
    tls.write_all(
        format!(
            "GET /pipelined/1 HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n\
             GET /delay/500 HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    for i in 1..=2 {
        let (head, body) = within("pipelined request", read_response(&mut tls)).await;
        assert!(
            head.starts_with("HTTP/1.1 200 "),
            "pipelined request {i}: {head}"
        );
        assert_eq!(body, HELLO);
    }
    let seen = mesh.backend.seen();
    let split = seen
        .iter()
        .find(|r| r.target == "/split")
        .unwrap_or_else(|| panic!("the split request never reached the backend: {seen:#?}"));
    assert_eq!(split.one("x-second-half"), "yes");
    assert_eq!(seen.len(), 6, "{seen:#?}");
    // Idle past header_read_timeout (2 s): closed.
    let started = Instant::now();
    expect_eof("idle parked connection", &mut tls).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Open files: the real binary under prlimit

/// The real binary under `prlimit --nofile=<soft>:<hard>`, with its JSON log collected.
fn under_prlimit(nofile: &str, side: &str, config: &Path) -> Proc {
    Proc::spawn_under(&["prlimit", &format!("--nofile={nofile}")], side, config)
}

/// The client's plain-HTTP address once it is accepting.
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

/// A client config in `mesh.dir` forwarding to `mesh`'s listener.
fn binary_client_config(mesh: &Mesh) -> std::path::PathBuf {
    let mut config = TomlConfig::default();
    config
        .set_str("listen", "127.0.0.1:0")
        .set_str("server_name", LISTENER_NAME)
        .set_str("cert", "client.crt")
        .set_str("key", "client.key")
        .set_str("ca", "client-ca.crt")
        .set(
            "upstreams",
            format!("[{}]", toml_str(&mesh.listener_addr.to_string())),
        );
    let path = mesh.dir.path().join("binary-client.toml");
    config.write(&path);
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_raises_its_open_file_soft_limit_to_the_hard_limit() {
    let mesh = Mesh::start().await;
    let mut proc = under_prlimit("1024:4096", "client", &binary_client_config(&mesh));
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
    let mut proc = under_prlimit("64:64", "client", &binary_client_config(&mesh));
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

// ---------------------------------------------------------------------------------------------
// Rotation of the client's own certificate with a busy pooled connection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_pooled_connection_moves_to_the_rotated_client_certificate_without_a_failed_request() {
    let mesh = InProc::start(|s| {
        s.client.set_str("reload_poll_interval", "200ms");
        s.server.set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let old_xfcc = expected_gateway_xfcc(&mesh.client_leaf);
    for i in 0..10 {
        let got = try_get(mesh.client_addr, &format!("/warm/{i}"))
            .await
            .unwrap();
        assert_eq!((got.status, got.body.as_str()), (200, HELLO), "{got:?}");
    }
    let last_xfcc = || {
        mesh.backend
            .seen()
            .last()
            .unwrap()
            .one("x-forwarded-client-cert")
    };
    assert_eq!(last_xfcc(), old_xfcc);
    let admin = mesh.listener_admin.unwrap();
    let (_, text) = admin_get(admin, "/metrics").await;
    let handshakes = |text: &str| {
        metric(
            text,
            "phoenix_mesh_tls_handshakes_total",
            &[("result", "ok")],
        )
    };
    assert_eq!(
        handshakes(&text),
        Some(1.0),
        "the requests should share one pooled mesh connection: {text}"
    );

    let load = Load::start(mesh.client_addr, 2, 100_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_leaf = mesh.pki.gateway();
    let new_xfcc = expected_gateway_xfcc(&new_leaf);
    install_leaf_by_rename(mesh.dir.path(), "client", &new_leaf);
    let deadline = Instant::now() + STEP_LIMIT;
    while last_xfcc() != new_xfcc {
        assert!(
            Instant::now() < deadline,
            "the backend never saw the rotated client certificate; still {}",
            last_xfcc()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Keep the load on the new connection for a moment before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed across the rotation, first: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 10, "the load barely ran: {ok} requests");
    for i in 0..5 {
        let got = try_get(mesh.client_addr, &format!("/after/{i}"))
            .await
            .unwrap();
        assert_eq!((got.status, got.body.as_str()), (200, HELLO), "{got:?}");
        assert_eq!(
            last_xfcc(),
            new_xfcc,
            "a request after the switch used the old certificate"
        );
    }
}

/// Shutdown closes a parked keep-alive connection at once (TLS close_notify, then FIN) instead of
/// holding the drain until the idle timeout.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_closes_a_parked_connection_at_once() {
    let mut mesh = Mesh::start_with(|s| {
        s.server.set_str("header_read_timeout", "600s");
    })
    .await;
    let mut tls = mesh.gateway_tls().await;
    let req = format!("GET /before-shutdown HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let (head, _) = within("request", read_response(&mut tls)).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The drain waits for every connection; a parked one that ignored shutdown would hold it for the
    // 600 s idle timeout and `within` would fail.
    mesh.stop_listener().await;
    let mut rest = Vec::new();
    let read = within("close after shutdown", tls.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "expected a clean TLS close, got {read:?}");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

/// A TLS server on loopback that speaks only HTTP/1.1 (ALPN `http/1.1`, no `h2`), answering every
/// request with `h1 only`, counting its connections: a mesh listener that declines HTTP/2.
async fn http1_only_listener(leaf: &Leaf) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let chain = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"h1 only"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, accepted)
}

/// A listener that declines HTTP/2 is still reached: the client falls back to pooled HTTP/1.1 for a
/// while instead of dialing (or failing) per request.
#[tokio::test(flavor = "multi_thread")]
async fn a_listener_that_declines_http2_is_reached_over_http1() {
    let mesh = Mesh::start().await;
    let (addr, accepted) = http1_only_listener(&mesh.pki.listener_cert()).await;
    let client = extra_client(&mesh, &[addr], &[]).await;
    for i in 0..3 {
        let reply = within(
            "a request to the HTTP/1.1-only listener",
            send_h1(client.addr, get(&format!("/h1/{i}"))),
        )
        .await;
        assert_eq!(reply.status, 200, "request {i}: {reply:#?}");
        assert_eq!(reply.body, "h1 only");
    }
    // The HTTP/2 attempt that learnt it, then one pooled HTTP/1.1 connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
