//! Taking access away while the mesh runs: a CRL revoking a client (in PEM or DER, picked up on
//! SIGHUP or by polling, also against a client offering a session ticket from before), a client's CRL
//! revoking the listener's certificate, and a peer removed from `allowed_peers`. The CRL tests run
//! with each trust anchor step-ca deployments use ([`Anchor`]).

use std::sync::atomic::Ordering;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;
use rustls::{AlertDescription, HandshakeKind};

use crate::support::eventually;
use crate::support::http::{assert_round_trip, try_get};
use crate::support::mesh::{Mesh, Setup};
use crate::support::pki::GATEWAY_SPIFFE;
use crate::support::tls::{refusal_alert, tls_get};

/// What both sides' `ca` file holds in a CRL test.
#[derive(Debug, Clone, Copy)]
enum Anchor {
    /// Our root (the step-ca shape): the CRL comes from the intermediate, so the intermediate's own
    /// status is not covered by any CRL.
    Root,
    /// Our intermediate: every certificate checked for revocation is covered by its CRL.
    Intermediate,
}

impl Anchor {
    /// Every anchor, each CRL test runs with.
    const BOTH: [Anchor; 2] = [Anchor::Root, Anchor::Intermediate];

    fn install(self, s: &mut Setup<'_>) {
        if let Anchor::Intermediate = self {
            s.listener_trusts(s.pki.intermediate_pem());
            s.client_trusts(s.pki.intermediate_pem());
        }
    }
}

/// Runs `case` with each [`Anchor`], saying which on stderr (shown if it fails).
async fn with_each_anchor<F, Fut>(case: F)
where
    F: Fn(Anchor) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for anchor in Anchor::BOTH {
        eprintln!("trust anchor: {anchor:?}");
        case(anchor).await;
    }
}

/// A mesh whose listener checks `crls = ["revoked.crl"]`, at first an empty CRL from our intermediate.
/// Reloads happen only when the test asks (SIGHUP handler), unless `poll` is set.
async fn mesh_with_listener_crl(poll: bool, anchor: Anchor) -> Mesh {
    Mesh::start_with(|s| {
        anchor.install(s);
        std::fs::write(s.dir.join("revoked.crl"), s.pki.crl(&[])).unwrap();
        s.server
            .set_list("crls", &["revoked.crl"])
            .set_str("reload_poll_interval", if poll { "200ms" } else { "1h" });
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_refuses_a_revoked_client_on_a_full_handshake() {
    with_each_anchor(crl_refuses_a_revoked_client_on_a_full_handshake_with).await;
}

async fn crl_refuses_a_revoked_client_on_a_full_handshake_with(anchor: Anchor) {
    let mesh = mesh_with_listener_crl(false, anchor).await;
    let gateway = mesh.client_leaf.clone();
    let (status, kind) = tls_get(mesh.listener_addr, mesh.tls_config(&gateway))
        .await
        .expect("not revoked yet: the gateway must get in");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(kind, HandshakeKind::Full);

    std::fs::write(mesh.path("revoked.crl"), mesh.pki.crl(&[gateway.serial])).unwrap();
    mesh.listener_sighup.reload().unwrap();

    let alert = refusal_alert(mesh.listener_addr, mesh.tls_config(&gateway)).await;
    assert_eq!(alert, AlertDescription::CertificateRevoked);
    // Another certificate from the same CA still gets in.
    let other = mesh.pki.client_cert();
    let (status, _) = tls_get(mesh.listener_addr, mesh.tls_config(&other))
        .await
        .unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

/// A CRL the verifier's parser refuses (no extensions, so no CRL Number) fails the reload with its
/// file and the cause named, and the listener goes on with the CRL it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crl_the_verifier_refuses_fails_the_reload_naming_its_file() {
    let mesh = mesh_with_listener_crl(false, Anchor::Root).await;
    std::fs::write(mesh.path("revoked.crl"), mesh.pki.crl_without_extensions()).unwrap();
    let error = mesh.listener_sighup.reload().unwrap_err();
    let said = phoenix_mesh_certs::error_chain(&error);
    let sentence = format!(
        "CRL {}: it has no extensions, so no CRL Number extension",
        mesh.path("revoked.crl").display()
    );
    assert!(said.contains(&sentence), "should say {sentence:?}: {said}");
    assert_round_trip(mesh.client_addr, "the gateway after the refused reload").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_in_der_form_refuses_a_revoked_client() {
    with_each_anchor(crl_in_der_form_refuses_a_revoked_client_with).await;
}

async fn crl_in_der_form_refuses_a_revoked_client_with(anchor: Anchor) {
    let mesh = mesh_with_listener_crl(false, anchor).await;
    let gateway = mesh.client_leaf.clone();
    let pem = mesh.pki.crl(&[gateway.serial]);
    let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
    std::fs::write(mesh.path("revoked.crl"), der.as_ref()).unwrap();
    mesh.listener_sighup.reload().unwrap();
    let alert = refusal_alert(mesh.listener_addr, mesh.tls_config(&gateway)).await;
    assert_eq!(alert, AlertDescription::CertificateRevoked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_refuses_a_newly_revoked_client_that_offers_an_old_session_ticket() {
    with_each_anchor(crl_refuses_a_newly_revoked_client_that_offers_an_old_session_ticket_with)
        .await;
}

async fn crl_refuses_a_newly_revoked_client_that_offers_an_old_session_ticket_with(anchor: Anchor) {
    // The CRL is picked up by polling, like a certificate.
    let mesh = mesh_with_listener_crl(true, anchor).await;
    let gateway = mesh.client_leaf.clone();
    // One config throughout, so its session store offers the ticket from the first connection.
    let resuming = mesh.tls_config(&gateway);
    let (status, kind) = tls_get(mesh.listener_addr, resuming.clone()).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(kind, HandshakeKind::Full);
    let (status, kind) = tls_get(mesh.listener_addr, resuming.clone()).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(
        kind,
        HandshakeKind::Resumed,
        "the test needs a resumable session"
    );
    // Take one more ticket, the one the next connection will offer.
    tls_get(mesh.listener_addr, resuming.clone()).await.unwrap();

    let before = mesh
        .listener_reloader
        .stats
        .succeeded
        .load(Ordering::Relaxed);
    std::fs::write(mesh.path("revoked.crl"), mesh.pki.crl(&[gateway.serial])).unwrap();
    eventually("the listener reloading the new CRL", || {
        let n = mesh
            .listener_reloader
            .stats
            .succeeded
            .load(Ordering::Relaxed);
        async move { (n > before).then_some(()) }
    })
    .await;

    let outcome = tls_get(mesh.listener_addr, resuming).await;
    assert!(
        outcome.is_err(),
        "a revoked client offering an old ticket was let in: {outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_crl_revoking_the_listener_certificate_answers_502_upstream_cert_invalid() {
    with_each_anchor(
        client_crl_revoking_the_listener_certificate_answers_502_upstream_cert_invalid_with,
    )
    .await;
}

async fn client_crl_revoking_the_listener_certificate_answers_502_upstream_cert_invalid_with(
    anchor: Anchor,
) {
    let mesh = Mesh::start_with(|s| {
        anchor.install(s);
        let revoked = s.pki.listener_cert();
        std::fs::write(s.dir.join("listener.crl"), s.pki.crl(&[revoked.serial])).unwrap();
        s.use_listener_cert(revoked);
        s.client.set_list("crls", &["listener.crl"]);
    })
    .await;
    let got = try_get(mesh.client_addr, "/").await.unwrap();
    assert_eq!(got.status, 502, "{got:?}");
    assert_eq!(
        got.mesh_error.as_deref(),
        Some("upstream-cert-invalid"),
        "{got:?}"
    );
    assert!(got.body.to_lowercase().contains("revoked"), "{got:?}");
    assert!(mesh.backend.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_crl_not_naming_the_listener_lets_requests_through() {
    with_each_anchor(client_crl_not_naming_the_listener_lets_requests_through_with).await;
}

async fn client_crl_not_naming_the_listener_lets_requests_through_with(anchor: Anchor) {
    let mesh = Mesh::start_with(|s| {
        anchor.install(s);
        let unrelated = s.pki.listener_cert();
        std::fs::write(s.dir.join("listener.crl"), s.pki.crl(&[unrelated.serial])).unwrap();
        s.client.set_list("crls", &["listener.crl"]);
    })
    .await;
    assert_round_trip(
        mesh.client_addr,
        "client with a CRL that does not name the listener",
    )
    .await;
}

/// A mesh whose listener allows the gateway and `other-client`; reloads only on request.
async fn mesh_allowing_two_peers() -> Mesh {
    Mesh::start_with(|s| {
        s.server
            .set_list(
                "allowed_peers",
                &[GATEWAY_SPIFFE, "other-client.internal.thinkheads.ai"],
            )
            .set_str("reload_poll_interval", "1h");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_removed_from_allowed_peers_is_refused_after_reload_even_when_resuming() {
    let mut mesh = mesh_allowing_two_peers().await;
    let other = mesh
        .pki
        .client_cert_named("other-client.internal.thinkheads.ai");
    let resuming = mesh.tls_config(&other);
    let (status, _) = tls_get(mesh.listener_addr, resuming.clone()).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let (_, kind) = tls_get(mesh.listener_addr, resuming.clone()).await.unwrap();
    assert_eq!(
        kind,
        HandshakeKind::Resumed,
        "the test needs a resumable session"
    );
    tls_get(mesh.listener_addr, resuming.clone()).await.unwrap();

    mesh.server.set_list("allowed_peers", &[GATEWAY_SPIFFE]);
    mesh.server.write(&mesh.path("server.toml"));
    mesh.listener_sighup.reload().unwrap();

    let outcome = tls_get(mesh.listener_addr, resuming).await;
    assert!(
        outcome.is_err(),
        "a peer removed from allowed_peers got in with an old ticket: {outcome:?}"
    );
    let alert = refusal_alert(mesh.listener_addr, mesh.tls_config(&other)).await;
    assert_ne!(alert, AlertDescription::CertificateRevoked);
    // The peer that is still allowed carries on, through the client sidecar too.
    assert_round_trip(mesh.client_addr, "the gateway after the reload").await;
}
