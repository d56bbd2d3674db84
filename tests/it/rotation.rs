//! Certificate lifecycle (issue 3): rotation under load through SIGHUP and through a file change
//! alone, botched renewals that keep the old certificate in service, revocation by CRL (also for a
//! client offering a session ticket from before), and `allowed_peers` changes taking effect at once.

use std::sync::atomic::Ordering;
use std::time::Duration;

use phoenix_mesh_certs::pki::Leaf;
use phoenix_mesh_certs::LiveTls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;
use rustls::{AlertDescription, HandshakeKind};

use crate::support::backend::Backend;
use crate::support::mesh::toml_str;
use crate::support::pki::expected_gateway_xfcc;
use crate::support::tls::refusal_alert;
use crate::support_ops::{
    admin_get, assert_round_trip, eventually, install_leaf_by_rename, install_leaf_in_place,
    install_symlinked_leaf, metric, presented_leaf, rename_replace, swap_symlinked_leaf, tls_get,
    try_get, InProc, Load, OpsPki, ProcFiles,
};

/// How long the load runs on each side of a rotation. Pacing only; nothing asserts on time.
const LOAD_PHASE: Duration = Duration::from_millis(1200);

/// After the load, requests until one goes out on a fresh mesh connection (the pool keeps idle
/// connections for `pool_idle_timeout` = 200 ms) and the backend sees `leaf`'s identity.
async fn backend_sees_client(inbound: std::net::SocketAddr, backend: &Backend, leaf: &Leaf) {
    let want = expected_gateway_xfcc(leaf);
    let mut last = String::new();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_round_trip(inbound, "request after rotation").await;
        last = backend
            .seen()
            .last()
            .unwrap()
            .one("x-forwarded-client-cert");
        if last == want {
            return;
        }
    }
    panic!("the backend never saw the new client certificate: want {want}, last {last}");
}

fn xfcc_of_last(backend: &Backend) -> String {
    backend
        .seen()
        .last()
        .unwrap()
        .one("x-forwarded-client-cert")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_both_sides_under_load_without_a_failed_request() {
    let pki = OpsPki::new();
    let backend = Backend::start().await;
    let (old_listener, old_client) = (pki.listener(), pki.gateway());
    let mut files = ProcFiles::new(&pki, backend.addr, &old_listener, &old_client);
    // A poll interval of an hour: only the signal can make these reloads happen.
    files.server.set_str("reload_poll_interval", "1h");
    files
        .client
        .set_str("reload_poll_interval", "1h")
        .set_str("pool_idle_timeout", "200ms");
    let (mut listener, listener_addr) = files.start_listener().await;
    let (mut client, client_addr) = files.start_client(listener_addr).await;
    let probe = crate::support::tls::client_config(pki.root_pem(), Some(&old_client), &[]);

    assert_round_trip(client_addr, "before rotation").await;
    assert_eq!(xfcc_of_last(&backend), expected_gateway_xfcc(&old_client));
    assert_eq!(
        presented_leaf(listener_addr, probe.clone()).await,
        old_listener.der
    );

    let load = Load::start(client_addr, 4, 5000);
    tokio::time::sleep(LOAD_PHASE).await;
    let (new_listener, new_client) = (pki.listener(), pki.gateway());
    install_leaf_by_rename(files.dir.path(), "listener", &new_listener);
    install_leaf_by_rename(files.dir.path(), "client", &new_client);
    listener.signal("HUP");
    client.signal("HUP");
    listener
        .wait_for_line(&["TLS material reloaded", "SIGHUP"])
        .await;
    client
        .wait_for_line(&["TLS material reloaded", "SIGHUP"])
        .await;
    tokio::time::sleep(LOAD_PHASE).await;
    let (ok, failures) = load.finish().await;

    assert!(
        failures.is_empty(),
        "{} of {} requests failed during rotation, first: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 20, "the load barely ran: {ok} requests");
    assert_eq!(
        presented_leaf(listener_addr, probe).await,
        new_listener.der,
        "a new connection to the listener must see the renewed certificate"
    );
    backend_sees_client(client_addr, &backend, &new_client).await;
    assert!(listener.running() && client.running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_change_alone_rotates_both_sides_under_load_rename_and_in_place() {
    let mesh = InProc::start(|s| {
        s.server.set_str("reload_poll_interval", "200ms");
        s.client
            .set_str("reload_poll_interval", "200ms")
            .set_str("pool_idle_timeout", "200ms");
    })
    .await;
    let probe = mesh.tls_config(&mesh.client_leaf);
    assert_round_trip(mesh.client_addr, "before rotation").await;

    let load = Load::start(mesh.client_addr, 4, 5000);
    tokio::time::sleep(LOAD_PHASE).await;
    let (new_listener, new_client) = (mesh.pki.listener(), mesh.pki.gateway());
    // The listener's files are replaced by rename, the client's rewritten in place.
    install_leaf_by_rename(mesh.dir.path(), "listener", &new_listener);
    install_leaf_in_place(mesh.dir.path(), "client", &new_client);
    eventually("the listener presenting the renewed certificate", || {
        let probe = probe.clone();
        let want = new_listener.der.clone();
        let addr = mesh.listener_addr;
        async move { (presented_leaf(addr, probe).await == want).then_some(()) }
    })
    .await;
    eventually("the client reloading its renewed certificate", || {
        let now = mesh.client_reloader.live().leaf().xfcc();
        let want = expected_gateway_xfcc(&new_client);
        async move { (now == want).then_some(()) }
    })
    .await;
    tokio::time::sleep(LOAD_PHASE).await;
    let (ok, failures) = load.finish().await;

    assert!(
        failures.is_empty(),
        "{} requests failed during rotation, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 20, "the load barely ran: {ok} requests");
    backend_sees_client(mesh.client_addr, &mesh.backend, &new_client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_change_alone_follows_a_swapped_symlink_on_both_sides() {
    let mesh = InProc::start(|s| {
        // The Kubernetes-secret layout: every path read goes through a link.
        install_symlinked_leaf(s.dir, "listener", s.listener_leaf);
        install_symlinked_leaf(s.dir, "client", s.client_leaf);
        s.server.set_str("reload_poll_interval", "200ms");
        s.client
            .set_str("reload_poll_interval", "200ms")
            .set_str("pool_idle_timeout", "200ms");
    })
    .await;
    assert!(mesh
        .path("listener.crt")
        .symlink_metadata()
        .unwrap()
        .file_type()
        .is_symlink());
    let probe = mesh.tls_config(&mesh.client_leaf);
    assert_round_trip(mesh.client_addr, "before the swap").await;

    let load = Load::start(mesh.client_addr, 4, 5000);
    tokio::time::sleep(LOAD_PHASE).await;
    let (new_listener, new_client) = (mesh.pki.listener(), mesh.pki.gateway());
    swap_symlinked_leaf(mesh.dir.path(), "listener", &new_listener, 1);
    swap_symlinked_leaf(mesh.dir.path(), "client", &new_client, 1);
    eventually(
        "the listener presenting the certificate behind the new link",
        || {
            let probe = probe.clone();
            let want = new_listener.der.clone();
            let addr = mesh.listener_addr;
            async move { (presented_leaf(addr, probe).await == want).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(LOAD_PHASE).await;
    let (ok, failures) = load.finish().await;

    assert!(failures.is_empty(), "failed during the swap: {failures:?}");
    assert!(ok >= 20, "the load barely ran: {ok} requests");
    backend_sees_client(mesh.client_addr, &mesh.backend, &new_client).await;
    // Both files swap in one rename, so neither side ever saw a mismatched pair.
    assert_eq!(
        mesh.listener_reloader.stats.failed.load(Ordering::Relaxed),
        0
    );
    assert_eq!(mesh.client_reloader.stats.failed.load(Ordering::Relaxed), 0);
}

/// A botched renewal the listener must survive: what ends up in `listener.crt` / `listener.key`.
fn botch(kind: &str, pki: &OpsPki, dir: &std::path::Path) {
    let crt = dir.join("listener.crt");
    match kind {
        "garbage PEM" => rename_replace(
            &crt,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        ),
        // A new certificate next to the old key.
        "key not matching the certificate" => rename_replace(&crt, &pki.listener().chain_pem),
        "expired certificate" => install_leaf_by_rename(dir, "listener", &pki.expired_listener()),
        "half-written file" => {
            let leaf = pki.listener();
            rename_replace(&dir.join("listener.key"), &leaf.key_pem);
            // The writer died mid-way through the certificate.
            std::fs::write(&crt, &leaf.chain_pem[..leaf.chain_pem.len() / 3]).unwrap();
        }
        other => unreachable!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn botched_renewals_keep_the_old_certificate_and_the_next_good_one_applies() {
    let mesh = InProc::start(|s| {
        s.server
            .set_str("reload_poll_interval", "200ms")
            .set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let admin = mesh.listener_admin.unwrap();
    let probe = mesh.tls_config(&mesh.client_leaf);
    let stats = &mesh.listener_reloader.stats;
    let mut in_service = mesh.listener_leaf.clone();

    for kind in [
        "garbage PEM",
        "key not matching the certificate",
        "expired certificate",
        "half-written file",
    ] {
        let failed_before = stats.failed.load(Ordering::Relaxed);
        botch(kind, &mesh.pki, mesh.dir.path());
        eventually(&format!("{kind}: a failed reload counted"), || {
            let n = stats.failed.load(Ordering::Relaxed);
            async move { (n > failed_before).then_some(()) }
        })
        .await;
        assert_eq!(
            presented_leaf(mesh.listener_addr, probe.clone()).await,
            in_service.der,
            "{kind}: the last good certificate must stay in service"
        );
        assert_round_trip(mesh.client_addr, kind).await;
        let (_, text) = admin_get(admin, "/metrics").await;
        let failed = metric(&text, "phoenix_mesh_reloads_total", &[("result", "failed")]);
        assert!(
            failed.unwrap_or(0.0) >= (failed_before + 1) as f64,
            "{kind}: reloads_total{{result=\"failed\"}} should count it:\n{text}"
        );

        let good = mesh.pki.listener();
        install_leaf_by_rename(mesh.dir.path(), "listener", &good);
        eventually(
            &format!("after {kind}: the next good renewal applied"),
            || {
                let probe = probe.clone();
                let want = good.der.clone();
                let addr = mesh.listener_addr;
                async move { (presented_leaf(addr, probe).await == want).then_some(()) }
            },
        )
        .await;
        assert_round_trip(
            mesh.client_addr,
            &format!("after {kind} and a good renewal"),
        )
        .await;
        in_service = good;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn botched_client_renewal_keeps_the_client_serving() {
    let mesh = InProc::start(|s| {
        s.client
            .set_str("reload_poll_interval", "200ms")
            .set_str("pool_idle_timeout", "200ms");
    })
    .await;
    let stats = &mesh.client_reloader.stats;
    rename_replace(&mesh.path("client.crt"), "garbage, not PEM\n");
    eventually("the client counting a failed reload", || {
        let n = stats.failed.load(Ordering::Relaxed);
        async move { (n >= 1).then_some(()) }
    })
    .await;
    // A fresh mesh connection still presents the old certificate.
    backend_sees_client(mesh.client_addr, &mesh.backend, &mesh.client_leaf).await;

    let good = mesh.pki.gateway();
    install_leaf_by_rename(mesh.dir.path(), "client", &good);
    backend_sees_client(mesh.client_addr, &mesh.backend, &good).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn botched_renewal_and_sighup_leave_the_binary_running_on_the_old_certificate() {
    let pki = OpsPki::new();
    let backend = Backend::start().await;
    let (old_listener, gateway) = (pki.listener(), pki.gateway());
    let mut files = ProcFiles::new(&pki, backend.addr, &old_listener, &gateway);
    files
        .server
        .set_str("reload_poll_interval", "1h")
        .set_str("admin_listen", "127.0.0.1:0");
    let (mut listener, listener_addr) = files.start_listener().await;
    let admin = listener
        .addr_from_log("admin endpoint serving", "admin")
        .await;
    let (_client, client_addr) = files.start_client(listener_addr).await;
    let probe = crate::support::tls::client_config(pki.root_pem(), Some(&gateway), &[]);

    rename_replace(&files.path("listener.crt"), "garbage\n");
    listener.signal("HUP");
    listener
        .wait_for_line(&["certificate reload failed", "listener.crt"])
        .await;
    let (_, text) = admin_get(admin, "/metrics").await;
    assert_eq!(
        metric(&text, "phoenix_mesh_reloads_total", &[("result", "failed")]),
        Some(1.0),
        "{text}"
    );
    assert!(
        listener.running(),
        "a failed reload must not end the process"
    );
    assert_eq!(
        presented_leaf(listener_addr, probe.clone()).await,
        old_listener.der
    );
    assert_round_trip(client_addr, "after the botched renewal").await;

    // The next change is tried again.
    let good = pki.listener();
    install_leaf_by_rename(files.dir.path(), "listener", &good);
    listener.signal("HUP");
    eventually("the good renewal applied on the next SIGHUP", || {
        let probe = probe.clone();
        let want = good.der.clone();
        async move { (presented_leaf(listener_addr, probe).await == want).then_some(()) }
    })
    .await;
    let (_, text) = admin_get(admin, "/metrics").await;
    assert!(
        metric(&text, "phoenix_mesh_reloads_total", &[("result", "ok")]).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Revocation and allowed_peers

/// What both sides' `ca` file holds in a CRL test.
#[derive(Clone, Copy)]
enum Anchor {
    /// Our root (the step-ca shape): the CRL comes from the intermediate, so the intermediate's own
    /// status is not covered by any CRL.
    Root,
    /// Our intermediate: every certificate checked for revocation is covered by its CRL.
    Intermediate,
}

impl Anchor {
    fn install(self, s: &mut crate::support_ops::InProcSetup<'_>) {
        if let Anchor::Intermediate = self {
            std::fs::write(s.dir.join("ca.crt"), s.pki.ca.intermediate_pem()).unwrap();
        }
    }
}

/// A mesh whose listener checks `crls = ["revoked.crl"]`, at first an empty CRL from our intermediate.
/// Reloads happen only when the test asks (SIGHUP handler), unless `poll` is set.
async fn mesh_with_listener_crl(poll: bool, anchor: Anchor) -> InProc {
    InProc::start(|s| {
        anchor.install(s);
        std::fs::write(s.dir.join("revoked.crl"), s.pki.crl(&[])).unwrap();
        s.server
            .set("crls", format!("[{}]", toml_str("revoked.crl")))
            .set_str("reload_poll_interval", if poll { "200ms" } else { "1h" });
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_refuses_a_revoked_client_on_a_full_handshake() {
    crl_refuses_a_revoked_client_on_a_full_handshake_with(Anchor::Root).await;
}

/// The same with our intermediate as the trust anchor, where an intermediate-issued CRL is all
/// revocation needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_refuses_a_revoked_client_on_a_full_handshake_intermediate_anchor() {
    crl_refuses_a_revoked_client_on_a_full_handshake_with(Anchor::Intermediate).await;
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
    let other = mesh.pki.gateway();
    let (status, _) = tls_get(mesh.listener_addr, mesh.tls_config(&other))
        .await
        .unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_in_der_form_refuses_a_revoked_client() {
    crl_in_der_form_refuses_a_revoked_client_with(Anchor::Root).await;
}

/// The same with our intermediate as the trust anchor, where an intermediate-issued CRL is all
/// revocation needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_in_der_form_refuses_a_revoked_client_intermediate_anchor() {
    crl_in_der_form_refuses_a_revoked_client_with(Anchor::Intermediate).await;
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
    crl_refuses_a_newly_revoked_client_that_offers_an_old_session_ticket_with(Anchor::Root).await;
}

/// The same with our intermediate as the trust anchor, where an intermediate-issued CRL is all
/// revocation needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_refuses_a_newly_revoked_client_that_offers_an_old_session_ticket_intermediate_anchor()
{
    crl_refuses_a_newly_revoked_client_that_offers_an_old_session_ticket_with(Anchor::Intermediate)
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

/// A mesh whose listener allows the gateway and `other-client`; reloads only on request.
async fn mesh_allowing_two_peers() -> InProc {
    InProc::start(|s| {
        s.server
            .set(
                "allowed_peers",
                format!(
                    "[{}, {}]",
                    toml_str(crate::support::pki::GATEWAY_SPIFFE),
                    toml_str("other-client.internal.thinkheads.ai")
                ),
            )
            .set_str("reload_poll_interval", "1h");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_removed_from_allowed_peers_is_refused_after_reload_even_when_resuming() {
    let mut mesh = mesh_allowing_two_peers().await;
    let other = mesh.pki.client_named("other-client.internal.thinkheads.ai");
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

    mesh.server.set(
        "allowed_peers",
        format!("[{}]", toml_str(crate::support::pki::GATEWAY_SPIFFE)),
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_crl_revoking_the_listener_certificate_answers_502_upstream_cert_invalid() {
    client_crl_revoking_the_listener_certificate_answers_502_upstream_cert_invalid_with(
        Anchor::Root,
    )
    .await;
}

/// The same with our intermediate as the trust anchor, where an intermediate-issued CRL is all
/// revocation needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_crl_revoking_the_listener_certificate_answers_502_upstream_cert_invalid_intermediate_anchor(
) {
    client_crl_revoking_the_listener_certificate_answers_502_upstream_cert_invalid_with(
        Anchor::Intermediate,
    )
    .await;
}

async fn client_crl_revoking_the_listener_certificate_answers_502_upstream_cert_invalid_with(
    anchor: Anchor,
) {
    let mesh = InProc::start(|s| {
        anchor.install(s);
        let revoked = s.pki.listener();
        crate::support::pki::write_leaf(s.dir, "listener", &revoked);
        std::fs::write(s.dir.join("listener.crl"), s.pki.crl(&[revoked.serial])).unwrap();
        s.client
            .set("crls", format!("[{}]", toml_str("listener.crl")));
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
    client_crl_not_naming_the_listener_lets_requests_through_with(Anchor::Root).await;
}

/// The same with our intermediate as the trust anchor, where an intermediate-issued CRL is all
/// revocation needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_crl_not_naming_the_listener_lets_requests_through_intermediate_anchor() {
    client_crl_not_naming_the_listener_lets_requests_through_with(Anchor::Intermediate).await;
}

async fn client_crl_not_naming_the_listener_lets_requests_through_with(anchor: Anchor) {
    let mesh = InProc::start(|s| {
        anchor.install(s);
        let unrelated = s.pki.listener();
        std::fs::write(s.dir.join("listener.crl"), s.pki.crl(&[unrelated.serial])).unwrap();
        s.client
            .set("crls", format!("[{}]", toml_str("listener.crl")));
    })
    .await;
    assert_round_trip(
        mesh.client_addr,
        "client with a CRL that does not name the listener",
    )
    .await;
}
