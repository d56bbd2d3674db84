//! Upgraded connections through both hops: a WebSocket handshake (`101`) crosses the client sidecar
//! and the listener, then bytes stream both ways until either end closes, while ordinary requests
//! keep flowing beside it. The backend here is raw TCP ([`WsBackend`]), since the recording backend
//! does not upgrade. How long a tunnel may live (its certificates, the trust policy) is in
//! `tunnel_lifetime`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::http::{get, send_h1, SERVICE_HOST};
use crate::support::mesh::Mesh;
use crate::support::pki::expected_gateway_xfcc;
use crate::support::raw::{expect_eof, head_value, read_head, read_response};
use crate::support::within;

mod tunnel_lifetime;

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
    ws_handshake(&mut s).await;
    s
}

/// Sends a WebSocket upgrade on `s` and checks the `101` that comes back.
async fn ws_handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (head, rest) = within("the 101 answer", read_head(s)).await;
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
}

/// Sends `msg` on the upgraded stream and expects it back upper-cased.
async fn ws_echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &str) {
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

/// The progress timeouts (`backend_timeout`, `upstream_timeout`) bound responses, not tunnels: a
/// WebSocket that stays silent for many times both still carries the next message, as operators of
/// long-idle WebSockets expect.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_websocket_outlives_the_progress_timeouts() {
    let mut backend = WsBackend::start().await;
    let addr = backend.addr;
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("backend", &addr.to_string());
        s.server.set_str("backend_timeout", "300ms");
        s.client.set_str("upstream_timeout", "300ms");
    })
    .await;
    let mut ws = open_ws(&mesh).await;
    ws_echo(&mut ws, "before the silence\n").await;
    tokio::time::sleep(std::time::Duration::from_millis(2000)).await;
    ws_echo(&mut ws, "after the silence\n").await;
    ws.shutdown().await.unwrap();
    assert_eq!(backend.next_end().await, WsEnd::PeerClosed);
}

/// A WebSocket upgrade through the client sidecar, answered by whichever hop refuses it: (head, body).
async fn refused_ws(mesh: &Mesh) -> (String, String) {
    let mut s = TcpStream::connect(mesh.client_addr).await.unwrap();
    let req = format!(
        "GET /chat HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    within("the refusal", read_response(&mut s)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn each_sidecar_refuses_an_upgrade_its_allowed_upgrades_lacks() {
    for (side, hop) in [
        ("client", "phoenix-mesh client"),
        ("server", "phoenix-mesh listener"),
    ] {
        let backend = WsBackend::start().await;
        let addr = backend.addr;
        let mesh = Mesh::start_with(|s| {
            s.server.set_str("backend", &addr.to_string());
            let config = if side == "client" {
                &mut s.client
            } else {
                &mut s.server
            };
            config.set_list("allowed_upgrades", &["anything/1.0"]);
        })
        .await;
        let (head, body) = refused_ws(&mesh).await;
        assert!(head.starts_with("HTTP/1.1 403 "), "{side}: {head}");
        assert_eq!(
            head_value(&head, "phoenix-mesh-error"),
            Some("upgrade-not-allowed"),
            "{side}: {head}"
        );
        assert!(body.contains(hop), "{side}: {body}");
        assert!(
            backend.upgrade_heads().is_empty(),
            "{side}: the backend saw an upgrade: {:?}",
            backend.upgrade_heads()
        );
        plain_request(&mesh, "/after-refusal").await;
    }
}
