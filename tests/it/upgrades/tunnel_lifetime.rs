//! A tunnel never outlives the certificates of the mesh connection it rides: a WebSocket is cut off
//! before the first of them ends, on the side that accepted the connection and on the side that
//! dialled it, and as soon as a reload's policy refuses its peer (CRLs, `allowed_peers`), while
//! other tunnels and plain requests carry on. Certificates here live a few seconds (issued now), so
//! each test crosses their end for real; reloads are real (the file poller or the SIGHUP handler).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use phoenix_mesh_certs::pki::Leaf;
use phoenix_mesh_certs::PeerIdentity;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_rustls::client::TlsStream;

use super::{open_ws, plain_request, ws_echo, ws_handshake, WsBackend, WsEnd};
use crate::support::admin::{admin_get, metric};
use crate::support::files::install_leaf_by_rename;
use crate::support::mesh::Mesh;
use crate::support::pki::GATEWAY_SPIFFE;
use crate::support::tls::{client_config, to_listener};
use crate::support::within;

/// How often the sidecars poll their files here.
const POLL: Duration = Duration::from_millis(500);

/// When `leaf` expires, read from its DER.
fn not_after(leaf: &Leaf) -> SystemTime {
    PeerIdentity::from_der(&leaf.der).unwrap().not_after
}

/// Reads until `s` closes (EOF or an error), ignoring nothing: data arriving is a failure. When it
/// closed.
async fn closed_at<S: AsyncRead + Unpin>(what: &str, s: &mut S) -> SystemTime {
    let mut buf = [0u8; 1024];
    match within(what, s.read(&mut buf)).await {
        Ok(0) | Err(_) => SystemTime::now(),
        Ok(n) => panic!(
            "{what}: expected the tunnel to close, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

/// `phoenix_mesh_connections_closed_total{reason}` on the sidecar whose admin endpoint is `admin`.
async fn closed_total(admin: Option<SocketAddr>, reason: &str) -> f64 {
    let (_, text) = admin_get(admin.expect("admin_listen set"), "/metrics").await;
    metric(
        &text,
        "phoenix_mesh_connections_closed_total",
        &[("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// A WebSocket straight to the listener over mutual TLS, presenting `leaf`.
async fn direct_ws(mesh: &Mesh, leaf: &Leaf) -> TlsStream<tokio::net::TcpStream> {
    let config = client_config(mesh.pki.root_pem(), Some(leaf), &[b"http/1.1"]);
    let mut tls = to_listener(mesh.listener_addr, config).await;
    ws_handshake(&mut tls).await;
    tls
}

/// Through both sidecars: the listener's certificate ends in a few seconds and is renewed on the
/// listener meanwhile. The WebSocket opened over a connection authenticated with the old one is cut
/// off before it ends (without the cut it streams on for as long as its ends want), the backend
/// sees its end, and a plain request afterwards goes through on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_through_both_sidecars_is_cut_off_before_the_listener_certificate_ends() {
    let mut backend = WsBackend::start().await;
    let addr = backend.addr;
    let mesh = Mesh::start_with(|s| {
        s.use_listener_cert(s.pki.listener_cert_valid_for(Duration::from_secs(8)));
        s.server
            .set_str("backend", &addr.to_string())
            .set_str("reload_poll_interval", "200ms");
        s.client
            .set_str("reload_poll_interval", "200ms")
            .set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let end = not_after(&mesh.listener_leaf);
    plain_request(&mesh, "/before").await;
    let mut ws = open_ws(&mesh).await;
    ws_echo(&mut ws, "before the renewal\n").await;
    install_leaf_by_rename(mesh.dir.path(), "listener", &mesh.pki.listener_cert());
    ws_echo(&mut ws, "after the renewal\n").await;

    let closed = closed_at("the tunnel being cut off", &mut ws).await;
    assert!(
        closed < end,
        "the tunnel outlived the listener certificate it was opened with by {:?}",
        closed.duration_since(end).unwrap_or_default()
    );
    assert_eq!(backend.next_end().await, WsEnd::PeerClosed);
    plain_request(&mesh, "/after").await;
    // The link and the tunnel's connection, both opened with the old certificate: the client cut
    // the tunnel off itself (it retires two margins before the end, the listener one).
    let counted = closed_total(mesh.client_admin, "certificate_expiry").await;
    assert!(
        counted >= 2.0,
        "the client counted {counted} connections closed for the listener certificate's end"
    );
}

/// The side that accepted the connection cuts its tunnel off by itself: a WebSocket straight to the
/// listener, from a client whose certificate ends in a few seconds, is closed before it ends, and
/// counted as `certificate_expiry`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_cuts_off_a_websocket_before_its_client_certificate_ends() {
    let mut backend = WsBackend::start().await;
    let addr = backend.addr;
    let mesh = Mesh::start_with(|s| {
        s.server
            .set_str("backend", &addr.to_string())
            .set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let leaf = mesh.pki.client_cert_valid_for(Duration::from_secs(5));
    let end = not_after(&leaf);
    let mut ws = direct_ws(&mesh, &leaf).await;
    ws_echo(&mut ws, "while the certificate lasts\n").await;

    let closed = closed_at("the tunnel being cut off", &mut ws).await;
    assert!(
        closed < end,
        "the tunnel outlived the client certificate by {:?}",
        closed.duration_since(end).unwrap_or_default()
    );
    assert_eq!(backend.next_end().await, WsEnd::PeerClosed);
    assert_eq!(
        closed_total(mesh.listener_admin, "certificate_expiry").await,
        1.0
    );
}

/// A mesh in front of a [`WsBackend`] whose listener checks an (empty) CRL, polled every [`POLL`],
/// allowing the gateway and `other.internal`, with an admin endpoint.
async fn ws_mesh_for_policy() -> (Mesh, WsBackend) {
    let backend = WsBackend::start().await;
    let addr = backend.addr;
    let mesh = Mesh::start_with(|s| {
        std::fs::write(s.dir.join("revoked.crl"), s.pki.crl(&[])).unwrap();
        s.server
            .set_str("backend", &addr.to_string())
            .set_list("crls", &["revoked.crl"])
            .set_list("allowed_peers", &[GATEWAY_SPIFFE, "other.internal"])
            .set_str("reload_poll_interval", "500ms")
            .set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    (mesh, backend)
}

/// The gateway's and another client's WebSockets straight to the listener, each shown to work.
async fn two_websockets(
    mesh: &Mesh,
) -> (
    TlsStream<tokio::net::TcpStream>,
    TlsStream<tokio::net::TcpStream>,
) {
    let mut gateway = direct_ws(mesh, &mesh.client_leaf).await;
    let mut other = direct_ws(mesh, &mesh.pki.client_cert_named("other.internal")).await;
    ws_echo(&mut gateway, "gateway before\n").await;
    ws_echo(&mut other, "other before\n").await;
    (gateway, other)
}

/// After a policy change that refuses the gateway: its WebSocket is cut off within a poll interval
/// of the change (with room for a loaded machine; without the cut it streams on), the other client's
/// keeps working, and the close is counted under `reason`.
async fn only_the_refused_websocket_is_cut_off(
    mesh: &Mesh,
    mut gateway: TlsStream<tokio::net::TcpStream>,
    mut other: TlsStream<tokio::net::TcpStream>,
    reason: &str,
) {
    let bound = POLL + Duration::from_secs(2);
    let cut = tokio::time::timeout(bound, closed_at("the refused tunnel", &mut gateway)).await;
    assert!(
        cut.is_ok(),
        "the refused client's WebSocket was still open {bound:?} after the change"
    );
    for i in 0..3 {
        ws_echo(&mut other, &format!("other after {i}\n")).await;
    }
    assert_eq!(closed_total(mesh.listener_admin, reason).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_client_cuts_off_its_websocket() {
    let (mesh, _backend) = ws_mesh_for_policy().await;
    let (gateway, other) = two_websockets(&mesh).await;
    std::fs::write(
        mesh.path("revoked.crl"),
        mesh.pki.crl(&[mesh.client_leaf.serial]),
    )
    .unwrap();
    only_the_refused_websocket_is_cut_off(&mesh, gateway, other, "revoked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_client_from_allowed_peers_cuts_off_its_websocket() {
    let (mesh, _backend) = ws_mesh_for_policy().await;
    let (gateway, other) = two_websockets(&mesh).await;
    let mut server = mesh.server.clone();
    server
        .set_list("allowed_peers", &["other.internal"])
        .set_str("listen", &mesh.listener_addr.to_string());
    server.write(&mesh.path("server.toml"));
    mesh.listener_sighup.reload().unwrap();
    only_the_refused_websocket_is_cut_off(&mesh, gateway, other, "not_allowed").await;
}

/// The client side of the same rule: its CRL revoking the listener's certificate cuts off a
/// WebSocket through it within a poll interval, counted on the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_cuts_off_a_websocket_when_its_crl_revokes_the_listener() {
    let mut backend = WsBackend::start().await;
    let addr = backend.addr;
    let mesh = Mesh::start_with(|s| {
        std::fs::write(s.dir.join("listener-revoked.crl"), s.pki.crl(&[])).unwrap();
        s.server.set_str("backend", &addr.to_string());
        s.client
            .set_list("crls", &["listener-revoked.crl"])
            .set_str("reload_poll_interval", "500ms")
            .set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let mut ws = open_ws(&mesh).await;
    ws_echo(&mut ws, "before the revocation\n").await;
    std::fs::write(
        mesh.path("listener-revoked.crl"),
        mesh.pki.crl(&[mesh.listener_leaf.serial]),
    )
    .unwrap();
    let bound = POLL + Duration::from_secs(2);
    let cut = tokio::time::timeout(bound, closed_at("the refused tunnel", &mut ws)).await;
    assert!(
        cut.is_ok(),
        "the WebSocket to a revoked listener was still open {bound:?} after the CRL changed"
    );
    assert_eq!(backend.next_end().await, WsEnd::PeerClosed);
    assert!(closed_total(mesh.client_admin, "revoked").await >= 1.0);
}
