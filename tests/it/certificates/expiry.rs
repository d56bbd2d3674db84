//! Certificates coming to their end while the mesh runs. The client keeps mesh connections warm
//! until shortly before the certificates they were opened with end (`live_connections` shows they
//! never outlive them); neither side serves or resumes a session whose certificate has expired since
//! it began; and a client whose own certificate ran out says so.

use std::sync::Arc;
use std::time::Duration;

use phoenix_mesh_certs::pki::Leaf;
use rustls::AlertDescription;
use tokio::time::Instant;

use crate::support::http::{get, send_h1, Reply};
use crate::support::mesh::Mesh;
use crate::support::relay::{mesh_through_relay, sequential_requests};
use crate::support::tls::direct_get;
use crate::support::{tls, within};

/// Lifetime left on the certificates of the tests that watch one expire: long enough for the requests
/// before its end even on a loaded CI machine.
const CERT_LIFE: std::time::Duration = Duration::from_secs(6);

/// A gateway certificate that expires [`CERT_LIFE`] from now, and when.
fn expiring_client(mesh: &Mesh) -> (Leaf, Instant) {
    let leaf = mesh.pki.client_cert_expiring_in(CERT_LIFE);
    (leaf, Instant::now() + CERT_LIFE)
}

/// `times` requests straight to the listener with `config` are served; then waits until
/// `expired_at` is safely past (rcgen writes whole seconds and webpki accepts the last one).
async fn served_until(
    mesh: &Mesh,
    config: &Arc<rustls::ClientConfig>,
    times: usize,
    expired_at: Instant,
) {
    for _ in 0..times {
        let tls = tls::to_listener(mesh.listener_addr, config.clone()).await;
        let reply = within("direct request", direct_get(tls)).await;
        assert!(
            reply.starts_with("HTTP/1.1 200 OK\r\n"),
            "while valid: {reply:?}"
        );
    }
    tokio::time::sleep_until(expired_at + Duration::from_secs(2)).await;
}

/// The listener remembers chains it has verified (a full handshake from a known peer skips path
/// building), but never past the end of a certificate in them: the same chain, presented again in a
/// full handshake after it has expired, is refused like any expired certificate.
#[tokio::test(flavor = "multi_thread")]
async fn refuses_a_remembered_chain_once_it_expires() {
    let mesh = Mesh::start().await;
    let (leaf, expired_at) = expiring_client(&mesh);
    let mut config =
        (*tls::client_config(mesh.pki.root_pem(), Some(&leaf), &[b"http/1.1"])).clone();
    // Full handshakes only: a resumed one would not present the chain at all.
    config.resumption = rustls::client::Resumption::disabled();
    let config = Arc::new(config);
    served_until(&mesh, &config, 2, expired_at).await;
    let alert = within(
        "refused handshake",
        tls::refusal_alert(mesh.listener_addr, config),
    )
    .await;
    assert_eq!(alert, AlertDescription::CertificateExpired);
}

/// A TLS 1.3 session ticket outlives a step-ca certificate, and a resumed handshake does not verify
/// the certificate again: the listener must still not serve a session whose certificate has expired.
#[tokio::test(flavor = "multi_thread")]
async fn does_not_serve_a_resumed_session_whose_certificate_expired() {
    let mesh = Mesh::start().await;
    let (leaf, expired_at) = expiring_client(&mesh);
    let config = tls::client_config(mesh.pki.root_pem(), Some(&leaf), &[b"http/1.1"]);
    served_until(&mesh, &config, 1, expired_at).await;
    let mut tls2 = tls::to_listener(mesh.listener_addr, config).await;
    assert_eq!(
        tls2.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the test needs a resumed session"
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tls2
        .write_all(b"GET /after-expiry HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = within("closed", tls2.read_to_end(&mut out)).await;
    assert!(
        out.is_empty(),
        "served after expiry: {:?}",
        String::from_utf8_lossy(&out)
    );
    let seen = mesh.backend.seen();
    assert_eq!(seen.len(), 1, "{seen:#?}");
}

/// A listener certificate with 100 s left of a long life (its margins are a minute and two) is
/// still used for what is left, a quarter and a half of it: the link is kept, not dialled afresh for
/// every request. That it is closed before the end is `live_connections`' business.
#[tokio::test(flavor = "multi_thread")]
async fn keeps_a_connection_whose_listener_certificate_ends_within_its_margin() {
    for http2 in [true, false] {
        let (mesh, relay) = mesh_through_relay(Some(Duration::from_secs(100)), http2, None).await;
        sequential_requests(&mesh, 6).await;
        let opened = relay.accepted();
        assert_eq!(
            opened, 1,
            "http2 {http2}: {opened} connections opened for 6 requests"
        );
    }
}

/// Which certificate [`served_then_expired`] lets run out.
enum Expiring {
    Listener,
    Client,
}

/// A mesh in which `which` certificate expires 10 s after it is issued (long enough to start and serve
/// one request even on a loaded machine); the connection that served retires before the end. Serves `/before-expiry`, waits until the certificate has
/// expired and returns the answer to `/after-expiry`, after checking the backend saw only the first.
async fn served_then_expired(which: Expiring) -> (Mesh, Reply) {
    let life = Duration::from_secs(10);
    let mut expired_at = None;
    let mesh = Mesh::start_with(|setup| {
        match which {
            Expiring::Listener => {
                let leaf = setup.pki.listener_cert_expiring_in(life);
                setup.use_listener_cert(leaf);
            }
            Expiring::Client => {
                let leaf = setup.pki.client_cert_expiring_in(life);
                setup.use_client_cert(leaf);
            }
        }
        expired_at = Some(Instant::now() + life);
        setup.client.set_str("pool_idle_timeout", "100ms");
    })
    .await;
    let reply = send_h1(mesh.client_addr, get("/before-expiry")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let expired_at = expired_at.expect("the setup hook ran");
    tokio::time::sleep_until(expired_at + Duration::from_secs(2)).await;
    let reply = send_h1(mesh.client_addr, get("/after-expiry")).await;
    let seen: Vec<String> = mesh.backend.seen().into_iter().map(|r| r.target).collect();
    assert_eq!(seen, ["/before-expiry"]);
    (mesh, reply)
}

/// A TLS 1.3 ticket can outlive a short-lived listener certificate, and a resumed handshake shows no
/// certificate at all: the client must not go on resuming to a listener whose certificate has expired
/// since the session began, but handshake in full and report the expired certificate.
#[tokio::test(flavor = "multi_thread")]
async fn does_not_resume_to_a_listener_whose_certificate_has_expired() {
    let (mesh, reply) = served_then_expired(Expiring::Listener).await;
    reply.assert_mesh_error(
        502,
        "upstream-cert-invalid",
        &[&mesh.listener_addr.to_string(), "xpired"],
    );
}

/// The mirror of the case above: the client's own certificate expires while it runs (a broken renewal
/// hook). The listener would hang up on every (resumed) connection; the client must say why instead
/// of reporting a closed connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_whose_own_certificate_expired_says_so() {
    let (_mesh, reply) = served_then_expired(Expiring::Client).await;
    reply.assert_mesh_error(
        502,
        "client-cert-refused",
        &[
            "our certificate",
            "nginx-gateway-client",
            "expired",
            "renew",
        ],
    );
}
