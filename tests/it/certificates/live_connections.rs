//! Identity that holds on live connections: an established connection never outlives the
//! certificates it was authenticated with, on either side, and a reload that changes the policy
//! (CRLs, `allowed_peers`) closes the connections it now refuses. Certificates here live a few
//! seconds (issued now), so each test crosses their end for real; reloads are real (the file poller
//! or the SIGHUP handler).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use phoenix_mesh_certs::pki::Leaf;
use phoenix_mesh_certs::PeerIdentity;
use tokio::sync::watch;

use crate::support::admin::{admin_get, metric};
use crate::support::backend::HELLO;
use crate::support::files::install_leaf_by_rename;
use crate::support::http::try_get;
use crate::support::http::SERVICE_HOST;
use crate::support::load::Load;
use crate::support::mesh::{Mesh, Upstream};
use crate::support::pki::{TestPki, GATEWAY_SPIFFE};
use crate::support::relay::{CountingRelay, Span};
use crate::support::tls::{client_config, to_listener};
use crate::support::{eventually, within};

/// When `leaf` expires, read from its DER.
fn not_after(leaf: &Leaf) -> SystemTime {
    PeerIdentity::from_der(&leaf.der).unwrap().not_after
}

/// Until a wall-clock time.
async fn sleep_until(at: SystemTime) {
    if let Ok(left) = at.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
}

/// Fails the test if a connection that opened before `before` was still open at `end` (the
/// certificate it was authenticated with had ended by then).
fn assert_none_outlived(spans: &[Span], before: SystemTime, end: SystemTime, cert: &str) {
    for (i, span) in spans.iter().enumerate() {
        if span.opened >= before {
            continue;
        }
        let closed = span.closed.unwrap_or_else(SystemTime::now);
        assert!(
            closed <= end,
            "mesh connection {i} (of {}) outlived the {cert} it was opened with by {:?}",
            spans.len(),
            closed.duration_since(end).unwrap_or_default()
        );
    }
}

/// A mesh whose client reaches the listener through a [`CountingRelay`], with the certificates
/// `certs` issues (listener's, client's), files polled every 200 ms, and the link HTTP/2 or HTTP/1.1.
async fn short_lived_mesh(
    certs: impl FnOnce(&TestPki) -> (Leaf, Leaf),
    http2: bool,
) -> (Mesh, CountingRelay) {
    let (relay, target) = CountingRelay::start().await;
    let relay_addr = relay.addr;
    let mesh = Mesh::start_with(|s| {
        let (listener, client) = certs(s.pki);
        s.use_listener_cert(listener);
        s.use_client_cert(client);
        s.upstreams = vec![Upstream::At(relay_addr)];
        s.client
            .set("upstream_http2", http2.to_string())
            .set_str("reload_poll_interval", "200ms");
        s.server.set_str("reload_poll_interval", "200ms");
    })
    .await;
    target.send(mesh.listener_addr).unwrap();
    (mesh, relay)
}

/// The link under load crosses the end of the listener's certificate and then of the client's,
/// each renewed before it ends as step-ca's timer does: no request fails, no mesh connection is
/// still open once the certificate it was opened with has ended, and the link is still one
/// connection at a time (a connection per request would also never outlive anything).
async fn busy_link_crosses_both_certificate_ends(http2: bool) {
    let (mesh, relay) = short_lived_mesh(
        |pki| {
            (
                pki.listener_cert_valid_for(Duration::from_secs(6)),
                pki.client_cert_valid_for(Duration::from_secs(10)),
            )
        },
        http2,
    )
    .await;
    let (listener_end, client_end) = (not_after(&mesh.listener_leaf), not_after(&mesh.client_leaf));
    let load = Load::start(mesh.client_addr, 4, u64::MAX);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let listener_renewed = SystemTime::now();
    install_leaf_by_rename(mesh.dir.path(), "listener", &mesh.pki.listener_cert());
    sleep_until(listener_end - Duration::from_secs(1)).await;
    let client_renewed = SystemTime::now();
    install_leaf_by_rename(mesh.dir.path(), "client", &mesh.pki.client_cert());
    sleep_until(client_end + Duration::from_millis(500)).await;
    let served = load
        .assert_no_failures("across both certificate ends", 100)
        .await;

    let spans = relay.spans();
    eprintln!("{} mesh connections for {served} requests", spans.len());
    assert_none_outlived(
        &spans,
        listener_renewed,
        listener_end,
        "listener certificate",
    );
    assert_none_outlived(&spans, client_renewed, client_end, "client certificate");
    // The link, kept: HTTP/2 one connection per certificate pair (three), the HTTP/1.1 pool a few
    // per pair for the four load workers; with room either way. A connection per request (what
    // retiring on any certificate that ends within the pool's idle timeout does) is hundreds.
    let kept = if http2 { 8 } else { 40 };
    assert!(
        spans.len() <= kept,
        "{} mesh connections for {served} requests: the link was not kept",
        spans.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_http2_link_crosses_both_certificate_ends_without_a_failed_request() {
    busy_link_crosses_both_certificate_ends(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_http1_link_crosses_both_certificate_ends_without_a_failed_request() {
    busy_link_crosses_both_certificate_ends(false).await;
}

/// An idle link whose listener certificate is renewed on the listener alone (the client has no
/// reason to redial) is closed before the old certificate ends, and the next request goes out on
/// a fresh connection.
async fn idle_link_is_closed_before_its_certificate_ends(http2: bool) {
    let (mesh, relay) = short_lived_mesh(
        |pki| {
            (
                pki.listener_cert_valid_for(Duration::from_secs(5)),
                pki.client_cert(),
            )
        },
        http2,
    )
    .await;
    let listener_end = not_after(&mesh.listener_leaf);
    let first = try_get(mesh.client_addr, "/before").await.unwrap();
    assert_eq!((first.status, first.body.as_str()), (200, HELLO));
    install_leaf_by_rename(mesh.dir.path(), "listener", &mesh.pki.listener_cert());
    sleep_until(listener_end + Duration::from_millis(500)).await;
    let spans = relay.spans();
    assert_none_outlived(&spans, listener_end, listener_end, "listener certificate");
    let after = try_get(mesh.client_addr, "/after").await.unwrap();
    assert_eq!((after.status, after.body.as_str()), (200, HELLO));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_link_is_closed_before_its_listener_certificate_ends() {
    idle_link_is_closed_before_its_certificate_ends(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_link_is_closed_before_its_listener_certificate_ends() {
    idle_link_is_closed_before_its_certificate_ends(false).await;
}

/// A connection straight to the listener over mutual TLS, driven by hyper, that notes when it ends.
struct Direct {
    sender: Sender,
    /// `Some(when)` once the connection has ended.
    ended: watch::Receiver<Option<SystemTime>>,
}

enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Direct {
    /// Connects to `addr` presenting `leaf`, speaking HTTP/2 or HTTP/1.1 (through ALPN).
    async fn open(mesh: &Mesh, addr: SocketAddr, leaf: &Leaf, h2: bool) -> Direct {
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = to_listener(addr, client_config(mesh.pki.root_pem(), Some(leaf), alpn)).await;
        let io = TokioIo::new(tls);
        let (tx, ended) = watch::channel(None);
        let sender = if h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
                tx.send_replace(Some(SystemTime::now()));
            });
            Sender::H2(sender)
        } else {
            let (sender, conn) = http1::handshake(io).await.unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
                tx.send_replace(Some(SystemTime::now()));
            });
            Sender::H1(sender)
        };
        Direct { sender, ended }
    }

    /// One GET on this connection: its status and `Connection` header, or why it could not be sent.
    async fn get(&mut self, path: &str) -> Result<(u16, Option<String>), String> {
        let response = match &mut self.sender {
            Sender::H1(sender) => {
                sender.ready().await.map_err(|e| e.to_string())?;
                let req = Request::get(path)
                    .header("host", SERVICE_HOST)
                    .body(Empty::new())
                    .unwrap();
                sender.send_request(req).await.map_err(|e| e.to_string())?
            }
            Sender::H2(sender) => {
                sender.ready().await.map_err(|e| e.to_string())?;
                let req = Request::get(format!("https://{SERVICE_HOST}{path}"))
                    .body(Empty::new())
                    .unwrap();
                sender.send_request(req).await.map_err(|e| e.to_string())?
            }
        };
        let status = response.status().as_u16();
        let connection = response
            .headers()
            .get("connection")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(body.to_bytes(), HELLO.as_bytes());
        Ok((status, connection))
    }

    /// When the connection ended, once it has.
    fn ended(&self) -> Option<SystemTime> {
        *self.ended.borrow()
    }

    /// Waits for the connection to end; when it did.
    async fn wait_ended(&mut self) -> SystemTime {
        let ended = self.ended.wait_for(Option::is_some).await.unwrap();
        ended.unwrap_or_else(SystemTime::now)
    }
}

/// The listener's `phoenix_mesh_connections_closed_total{reason}`.
async fn closed_total(mesh: &Mesh, reason: &str) -> f64 {
    let admin = mesh.listener_admin.expect("admin_listen set");
    let (_, text) = admin_get(admin, "/metrics").await;
    metric(
        &text,
        "phoenix_mesh_connections_closed_total",
        &[("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// A client that keeps one connection straight to the listener busy, with a certificate of a few
/// seconds, has it closed by the listener before that certificate ends. A request in flight when the
/// listener retires the connection (a second before the end, for a 5-second certificate) is
/// answered, on HTTP/1.1 with `Connection: close`, on HTTP/2 after a GOAWAY; no request fails.
async fn listener_closes_a_busy_direct_connection_before_the_client_certificate_ends(h2: bool) {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let leaf = mesh.pki.client_cert_valid_for(Duration::from_secs(5));
    let end = not_after(&leaf);
    let mut direct = Direct::open(&mesh, mesh.listener_addr, &leaf, h2).await;
    let mut served = 0;
    while SystemTime::now() + Duration::from_millis(1800) < end {
        assert_eq!(direct.get("/busy").await.unwrap().0, 200);
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // In flight across the retirement, 1 s before the end.
    let (status, connection) = direct.get("/delay/1200").await.unwrap();
    assert_eq!(status, 200);
    if !h2 {
        assert_eq!(connection.as_deref(), Some("close"));
    }
    let ended = within("the connection ending", direct.wait_ended()).await;
    assert!(
        ended < end,
        "the connection outlived the client certificate by {:?}",
        ended.duration_since(end).unwrap_or_default()
    );
    assert!(served > 5, "only {served} requests went through");
    assert_eq!(closed_total(&mesh, "certificate_expiry").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_closes_a_busy_http1_connection_before_its_client_certificate_ends() {
    listener_closes_a_busy_direct_connection_before_the_client_certificate_ends(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_closes_a_busy_http2_connection_before_its_client_certificate_ends() {
    listener_closes_a_busy_direct_connection_before_the_client_certificate_ends(true).await;
}

/// The listener's own certificate counts too: a connection it accepted with a certificate it has
/// since renewed (a reload) is closed before the old one ends, even from a client that never
/// retires anything itself, and counted as `own_certificate_expiry`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_closes_connections_opened_with_its_renewed_certificate_before_the_old_one_ends(
) {
    let mesh = Mesh::start_with(|s| {
        let leaf = s.pki.listener_cert_valid_for(Duration::from_secs(5));
        s.use_listener_cert(leaf);
        s.server
            .set_str("admin_listen", "127.0.0.1:0")
            .set_str("reload_poll_interval", "200ms");
    })
    .await;
    let old_end = not_after(&mesh.listener_leaf);
    let mut direct = Direct::open(&mesh, mesh.listener_addr, &mesh.client_leaf, false).await;
    assert_eq!(direct.get("/before").await.unwrap().0, 200);
    install_leaf_by_rename(mesh.dir.path(), "listener", &mesh.pki.listener_cert());
    let ended = within("the connection ending", direct.wait_ended()).await;
    assert!(
        ended < old_end,
        "the connection outlived the listener certificate it was opened with by {:?}",
        ended.duration_since(old_end).unwrap_or_default()
    );
    assert_eq!(closed_total(&mesh, "own_certificate_expiry").await, 1.0);
    // A new connection is authenticated with the renewed certificate and served.
    let mut fresh = Direct::open(&mesh, mesh.listener_addr, &mesh.client_leaf, false).await;
    assert_eq!(fresh.get("/after").await.unwrap().0, 200);
}

/// `/certs` lists the peers connected now from the live connections: on the listener the gateway,
/// once per certificate with its connection count; on the client the listener it is linked to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_lists_the_peers_connected_now_on_both_sides() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("admin_listen", "127.0.0.1:0");
        s.client.set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let peers = |admin: SocketAddr| async move {
        let (status, body) = admin_get(admin, "/certs").await;
        assert_eq!(status, 200, "{body}");
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        doc["peers"].as_array().unwrap().clone()
    };
    let (listener_admin, client_admin) = (mesh.listener_admin.unwrap(), mesh.client_admin.unwrap());
    assert!(peers(listener_admin).await.is_empty());
    assert_eq!(
        try_get(mesh.client_addr, "/linked").await.unwrap().status,
        200
    );
    let mut direct = Direct::open(&mesh, mesh.listener_addr, &mesh.client_leaf, false).await;
    assert_eq!(direct.get("/direct").await.unwrap().0, 200);

    let gateway = PeerIdentity::from_der(&mesh.client_leaf.der).unwrap();
    let listed = peers(listener_admin).await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["identity"], GATEWAY_SPIFFE);
    assert_eq!(listed[0]["serial"], gateway.serial);
    assert_eq!(
        listed[0]["connections"], 2,
        "the client's link and the direct one"
    );
    assert!(listed[0]["since"].is_string() && listed[0]["not_after"].is_string());

    let listener = PeerIdentity::from_der(&mesh.listener_leaf.der).unwrap();
    let listed = peers(client_admin).await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["identity"], listener.name());
    assert_eq!(listed[0]["serial"], listener.serial);
    assert_eq!(listed[0]["connections"], 1);

    drop(direct);
    eventually("the direct connection leaving the list", || async move {
        let listed = peers(listener_admin).await;
        (listed.first().map(|p| p["connections"].clone()) == Some(1.into())).then_some(())
    })
    .await;
}

/// How often the listener's files are polled in the policy tests.
const POLL: Duration = Duration::from_millis(500);

/// A mesh whose listener checks an (empty) CRL, polled every [`POLL`], with an admin endpoint, and
/// allowing the gateway and `other.internal`.
async fn mesh_for_policy() -> Mesh {
    Mesh::start_with(|s| {
        std::fs::write(s.dir.join("revoked.crl"), s.pki.crl(&[])).unwrap();
        s.server
            .set_list("crls", &["revoked.crl"])
            .set_list("allowed_peers", &[GATEWAY_SPIFFE, "other.internal"])
            .set_str("reload_poll_interval", "500ms")
            .set_str("admin_listen", "127.0.0.1:0");
    })
    .await
}

/// The gateway's and another client's established connections, each shown to work.
async fn two_clients(mesh: &Mesh, h2: bool) -> (Direct, Direct) {
    let mut gateway = Direct::open(mesh, mesh.listener_addr, &mesh.client_leaf, h2).await;
    let other_leaf = mesh.pki.client_cert_named("other.internal");
    let mut other = Direct::open(mesh, mesh.listener_addr, &other_leaf, h2).await;
    assert_eq!(gateway.get("/gateway").await.unwrap().0, 200);
    assert_eq!(other.get("/other").await.unwrap().0, 200);
    (gateway, other)
}

/// After a policy change that refuses the gateway: its connection ends within a poll interval of
/// the change (with room for a loaded machine; without the re-check it never ends), the other
/// client's connection keeps working, and the close is counted under `reason`.
async fn only_the_refused_connection_closes(
    mesh: &Mesh,
    mut gateway: Direct,
    mut other: Direct,
    reason: &str,
) {
    // One poll interval to notice the change, and room for a loaded machine.
    let bound = POLL + Duration::from_secs(2);
    let ended = tokio::time::timeout(bound, gateway.wait_ended()).await;
    assert!(
        ended.is_ok(),
        "the refused client's connection was still open {bound:?} after the change"
    );
    assert!(gateway.get("/after").await.is_err());
    for i in 0..3 {
        assert_eq!(
            other.get(&format!("/other-after/{i}")).await.unwrap().0,
            200,
            "the allowed client's connection stopped working"
        );
    }
    assert!(other.ended().is_none());
    assert_eq!(closed_total(mesh, reason).await, 1.0);
}

async fn revoking_a_client_closes_its_established_connection(h2: bool) {
    let mesh = mesh_for_policy().await;
    let (gateway, other) = two_clients(&mesh, h2).await;
    let revoked = mesh.pki.crl(&[mesh.client_leaf.serial]);
    std::fs::write(mesh.path("revoked.crl"), revoked).unwrap();
    only_the_refused_connection_closes(&mesh, gateway, other, "revoked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_client_closes_its_established_http1_connection() {
    revoking_a_client_closes_its_established_connection(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_client_closes_its_established_http2_connection() {
    revoking_a_client_closes_its_established_connection(true).await;
}

async fn removing_a_client_from_allowed_peers_closes_its_established_connection(h2: bool) {
    let mesh = mesh_for_policy().await;
    let (gateway, other) = two_clients(&mesh, h2).await;
    let mut server = mesh.server.clone();
    server
        .set_list("allowed_peers", &["other.internal"])
        .set_str("listen", &mesh.listener_addr.to_string());
    server.write(&mesh.path("server.toml"));
    mesh.listener_sighup.reload().unwrap();
    only_the_refused_connection_closes(&mesh, gateway, other, "not_allowed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_client_from_allowed_peers_closes_its_established_http1_connection() {
    removing_a_client_from_allowed_peers_closes_its_established_connection(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_client_from_allowed_peers_closes_its_established_http2_connection() {
    removing_a_client_from_allowed_peers_closes_its_established_connection(true).await;
}

/// The client side of the same rule: its CRL revoking the listener's certificate closes the mesh
/// link at once (not at the next request), counted on the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_closes_its_link_when_its_crl_revokes_the_listener() {
    let (relay, target) = CountingRelay::start().await;
    let relay_addr = relay.addr;
    let mesh = Mesh::start_with(|s| {
        std::fs::write(s.dir.join("listener-revoked.crl"), s.pki.crl(&[])).unwrap();
        s.upstreams = vec![Upstream::At(relay_addr)];
        s.client
            .set_list("crls", &["listener-revoked.crl"])
            .set_str("reload_poll_interval", "500ms")
            .set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    target.send(mesh.listener_addr).unwrap();
    let first = try_get(mesh.client_addr, "/before").await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(relay.accepted(), 1);
    let revoked = mesh.pki.crl(&[mesh.listener_leaf.serial]);
    std::fs::write(mesh.path("listener-revoked.crl"), revoked).unwrap();
    let bound = POLL + Duration::from_secs(2);
    let closed = tokio::time::timeout(bound, async {
        while relay.closed() < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the link to a revoked listener was still open {bound:?} after the CRL changed"
    );
    let admin = mesh.client_admin.expect("admin_listen set");
    let counted = eventually("the close counted on the client", || async move {
        let (_, text) = admin_get(admin, "/metrics").await;
        metric(
            &text,
            "phoenix_mesh_connections_closed_total",
            &[("reason", "revoked")],
        )
    })
    .await;
    assert_eq!(counted, 1.0);
}
