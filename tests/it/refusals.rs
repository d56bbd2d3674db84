//! Every client certificate the listener must refuse gets its own test, once straight at the listener
//! with a tokio-rustls client (asserting the TLS alert) and, where the client sidecar can start with
//! that certificate at all, once through the sidecar (asserting 502 client-cert-refused). The sidecar
//! refuses to start with an expired, not-yet-valid or non-clientAuth certificate of its own: that is
//! covered in `startup`.

use phoenix_mesh_certs::pki::Leaf;
use rustls::AlertDescription;

use crate::support::backend::HELLO;
use crate::support::http::{get, send_h1};
use crate::support::mesh::{toml_str, Mesh};
use crate::support::pki::{expected_gateway_xfcc, GATEWAY_CN, GATEWAY_SPIFFE};
use crate::support::{tls, within};

/// Lifetime left on the certificates of the tests that watch one expire: long enough for the requests
/// before its end even on a loaded CI machine.
const CERT_LIFE: std::time::Duration = std::time::Duration::from_secs(6);

/// Presents `leaf` (or nothing) straight to the default mesh's listener; returns the alert.
async fn direct_refusal(mesh: &Mesh, leaf: Option<&Leaf>) -> AlertDescription {
    let config = tls::client_config(mesh.pki.root_pem(), leaf, &[b"http/1.1"]);
    within(
        "refused handshake",
        tls::refusal_alert(mesh.listener_addr, config),
    )
    .await
}

fn assert_backend_untouched(mesh: &Mesh) {
    let seen = mesh.backend.seen();
    assert!(
        seen.is_empty(),
        "a refused peer reached the backend: {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_client_without_certificate() {
    let mesh = Mesh::start().await;
    let alert = direct_refusal(&mesh, None).await;
    assert_eq!(alert, AlertDescription::CertificateRequired);
    assert_backend_untouched(&mesh);
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_client_from_other_ca() {
    let mesh = Mesh::start().await;
    let leaf = mesh.pki.client_cert_signed_by_other_ca();
    let alert = direct_refusal(&mesh, Some(&leaf)).await;
    assert_eq!(alert, AlertDescription::UnknownCA);
    assert_backend_untouched(&mesh);
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_expired_client() {
    let mesh = Mesh::start().await;
    let leaf = mesh.pki.expired_client_cert();
    let alert = direct_refusal(&mesh, Some(&leaf)).await;
    assert_eq!(alert, AlertDescription::CertificateExpired);
    assert_backend_untouched(&mesh);
}

/// A gateway certificate that expires [`CERT_LIFE`] from now, and when.
fn expiring_client(mesh: &Mesh) -> (Leaf, tokio::time::Instant) {
    let leaf = mesh.pki.client_cert_expiring_in(CERT_LIFE);
    (leaf, tokio::time::Instant::now() + CERT_LIFE)
}

/// `times` requests straight to the listener with `config` are served; then waits until
/// `expired_at` is safely past (rcgen writes whole seconds and webpki accepts the last one).
async fn served_until(
    mesh: &Mesh,
    config: &std::sync::Arc<rustls::ClientConfig>,
    times: usize,
    expired_at: tokio::time::Instant,
) {
    for _ in 0..times {
        let tls = tls::to_listener(mesh.listener_addr, config.clone()).await;
        let reply = within("direct request", direct_get(tls)).await;
        assert!(
            reply.starts_with("HTTP/1.1 200 OK\r\n"),
            "while valid: {reply:?}"
        );
    }
    tokio::time::sleep_until(expired_at + std::time::Duration::from_secs(2)).await;
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
    let config = std::sync::Arc::new(config);
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

#[tokio::test(flavor = "multi_thread")]
async fn refuses_not_yet_valid_client() {
    let mesh = Mesh::start().await;
    let leaf = mesh.pki.not_yet_valid_client_cert();
    let alert = direct_refusal(&mesh, Some(&leaf)).await;
    assert_eq!(alert, AlertDescription::CertificateExpired);
    assert_backend_untouched(&mesh);
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_client_with_server_auth_only() {
    let mesh = Mesh::start().await;
    let leaf = mesh.pki.server_only_client_cert();
    let alert = direct_refusal(&mesh, Some(&leaf)).await;
    assert_eq!(alert, AlertDescription::UnsupportedCertificate);
    assert_backend_untouched(&mesh);
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_client_without_extended_key_usage() {
    let mesh = Mesh::start().await;
    let leaf = mesh.pki.client_cert_without_eku();
    let alert = direct_refusal(&mesh, Some(&leaf)).await;
    assert_eq!(alert, AlertDescription::UnsupportedCertificate);
    assert_backend_untouched(&mesh);
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_client_not_in_allowed_peers() {
    let mesh = Mesh::start_with(|s| {
        s.server.set(
            "allowed_peers",
            format!("[{}]", toml_str("billing.internal.thinkheads.ai")),
        );
    })
    .await;
    // Direct, with the gateway certificate the sidecar also uses.
    let alert = direct_refusal(&mesh, Some(&mesh.client_leaf)).await;
    assert_eq!(alert, AlertDescription::AccessDenied);
    // Through the sidecar.
    let reply = within("request", send_h1(mesh.client_addr, get("/denied"))).await;
    reply.assert_mesh_error(
        502,
        "client-cert-refused",
        &[
            &mesh.listener_addr.to_string(),
            "refused our client certificate",
        ],
    );
    assert_backend_untouched(&mesh);
}

/// The sidecar can hold a certificate from another CA when its own `ca` bundle trusts both roots;
/// the listener, trusting only ours, refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn sidecar_reports_client_from_other_ca_refused() {
    let mesh = Mesh::start_with(|s| {
        s.client_leaf = s.pki.client_cert_signed_by_other_ca();
        s.client_ca_pem = format!("{}{}", s.pki.root_pem(), s.pki.other_root_pem());
    })
    .await;
    let reply = within("request", send_h1(mesh.client_addr, get("/other-ca"))).await;
    reply.assert_mesh_error(
        502,
        "client-cert-refused",
        &[
            &mesh.listener_addr.to_string(),
            "refused our client certificate",
        ],
    );
    assert_backend_untouched(&mesh);
}

async fn assert_allowed(mesh: &Mesh) {
    let reply = within("request", send_h1(mesh.client_addr, get("/allowed"))).await;
    assert_eq!(reply.status, 200, "{reply:#?}");
    assert_eq!(reply.body, HELLO);
    assert_eq!(reply.mesh_error(), None);
    assert_eq!(
        mesh.backend.only_request().one("x-forwarded-client-cert"),
        expected_gateway_xfcc(&mesh.client_leaf)
    );
    // And straight at the listener with the same certificate.
    let config = tls::client_config(mesh.pki.root_pem(), Some(&mesh.client_leaf), &[]);
    let tls = tls::to_listener(mesh.listener_addr, config).await;
    let reply = within("direct request", direct_get(tls)).await;
    assert!(
        reply.starts_with("HTTP/1.1 200 OK\r\n"),
        "direct request: {reply:?}"
    );
    assert!(reply.ends_with(HELLO), "direct request: {reply:?}");
}

async fn direct_get(mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(
        b"GET /allowed-direct HTTP/1.1\r\nHost: whoami.internal.thinkheads.ai\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn allows_peer_by_spiffe_uri_san() {
    let mesh = Mesh::start_with(|s| {
        s.server.set(
            "allowed_peers",
            format!(
                "[{}, {}]",
                toml_str("billing.internal.thinkheads.ai"),
                toml_str(GATEWAY_SPIFFE)
            ),
        );
    })
    .await;
    assert_allowed(&mesh).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn allows_peer_by_common_name() {
    let mesh = Mesh::start_with(|s| {
        s.server
            .set("allowed_peers", format!("[{}]", toml_str(GATEWAY_CN)));
    })
    .await;
    assert_allowed(&mesh).await;
}

/// An entry must match exactly: a prefix of the SPIFFE ID or a differently-cased CN is no match.
#[tokio::test(flavor = "multi_thread")]
async fn refuses_near_miss_allowed_peers() {
    let mesh = Mesh::start_with(|s| {
        s.server.set(
            "allowed_peers",
            format!(
                "[{}, {}]",
                toml_str("spiffe://phoenix.internal/ns/gateway"),
                toml_str(&GATEWAY_CN.to_uppercase())
            ),
        );
    })
    .await;
    let alert = direct_refusal(&mesh, Some(&mesh.client_leaf)).await;
    assert_eq!(alert, AlertDescription::AccessDenied);
    assert_backend_untouched(&mesh);
}

/// TLS 1.3: a client finishes its side of the handshake before the listener has judged its
/// certificate, so the listener's verdict for an accepted client, its session ticket, must come at
/// once and not with the first response: a client that waits for it before sending anything (ours
/// does) would otherwise stall. Over HTTP/2 it comes with the listener's SETTINGS.
#[tokio::test(flavor = "multi_thread")]
async fn accepted_client_gets_the_verdict_before_it_sends_anything() {
    let mesh = Mesh::start_with(|s| {
        // A ticket held back would only leave when this closes the idle connection.
        s.server.set_str("header_read_timeout", "60s");
    })
    .await;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let config = tls::client_config(mesh.pki.root_pem(), Some(&mesh.client_leaf), &[alpn]);
        let mut tls = tls::to_listener(mesh.listener_addr, config).await;
        let (tcp, conn) = tls.get_mut();
        let verdict = within("the listener's verdict after the handshake", async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                tcp.readable().await.unwrap();
                match tcp.try_read(&mut buf) {
                    Ok(n) => break buf[..n].to_vec(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => panic!("reading the verdict: {e}"),
                }
            }
        })
        .await;
        assert!(!verdict.is_empty(), "the listener closed instead");
        conn.read_tls(&mut verdict.as_slice()).unwrap();
        let state = conn
            .process_new_packets()
            .expect("the listener refused an allowed client");
        assert!(!state.peer_has_closed(), "the listener closed instead");
        if alpn == b"h2" {
            continue;
        }
        assert_eq!(state.plaintext_bytes_to_read(), 0, "not a session ticket");
        let reply = within("request after the verdict", direct_get(tls)).await;
        assert!(
            reply.starts_with("HTTP/1.1 200 OK\r\n"),
            "request after the verdict: {reply:?}"
        );
    }
}

/// TLS 1.2 (allowed with `min_tls_version = "1.2"`): the listener's last flight (its Finished) comes
/// after the client's and must go out although no request can come before it, over HTTP/1.1 and h2.
#[tokio::test(flavor = "multi_thread")]
async fn tls12_client_completes_its_handshake_and_is_served() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("min_tls_version", "1.2");
        s.server.set_str("header_read_timeout", "60s");
    })
    .await;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let config = tls::client_config_tls12(mesh.pki.root_pem(), &mesh.client_leaf, &[alpn]);
        let tls = tls::to_listener(mesh.listener_addr, config).await;
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        if alpn == b"h2" {
            continue;
        }
        let reply = within("request over TLS 1.2", direct_get(tls)).await;
        assert!(
            reply.starts_with("HTTP/1.1 200 OK\r\n"),
            "request over TLS 1.2: {reply:?}"
        );
    }
}
