//! Who may connect to the listener, and how the backend learns who did. Every client certificate
//! the listener must refuse is presented straight to it with a tokio-rustls client (asserting the TLS
//! alert) and, where the client sidecar can start with that certificate at all, through the sidecar
//! (asserting 502 client-cert-refused); `allowed_peers` matches exactly; an accepted client gets its
//! verdict at once (TLS 1.3 and 1.2); and the backend gets the peer's identity in
//! `X-Forwarded-Client-Cert`, never a forged one. The sidecar refuses to start with an expired,
//! not-yet-valid or non-clientAuth certificate of its own (`operations::startup`); certificates that
//! expire while in use are in `certificates::expiry`.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use phoenix_mesh_certs::pki::Leaf;
use rustls::AlertDescription;

use crate::support::admin::{admin_get, metric};
use crate::support::backend::HELLO;
use crate::support::files::MeshFiles;
use crate::support::http::{assert_hello, get, send_h1, SERVICE_HOST};
use crate::support::mesh::Mesh;
use crate::support::pki::{expected_gateway_xfcc, TestPki, GATEWAY_CN, GATEWAY_SPIFFE};
use crate::support::tls::direct_get;
use crate::support::{eventually, tls, within};

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

/// Issues one kind of certificate from the test PKI.
type Issue = fn(&TestPki) -> Leaf;

/// Every client certificate the listener refuses in the handshake, and the alert it refuses it with.
const BAD_CLIENT_CERTS: [(&str, Issue, AlertDescription); 5] = [
    (
        "from another CA",
        TestPki::client_cert_signed_by_other_ca,
        AlertDescription::UnknownCA,
    ),
    (
        "expired",
        TestPki::expired_client_cert,
        AlertDescription::CertificateExpired,
    ),
    (
        "not yet valid",
        TestPki::not_yet_valid_client_cert,
        AlertDescription::CertificateExpired,
    ),
    (
        "serverAuth only",
        TestPki::server_only_client_cert,
        AlertDescription::UnsupportedCertificate,
    ),
    (
        "no extended key usage",
        TestPki::client_cert_without_eku,
        AlertDescription::UnsupportedCertificate,
    ),
];

#[tokio::test(flavor = "multi_thread")]
async fn refuses_each_bad_client_certificate_with_its_alert() {
    let mesh = Mesh::start().await;
    for (what, issue, alert) in BAD_CLIENT_CERTS {
        let leaf = issue(&mesh.pki);
        assert_eq!(
            direct_refusal(&mesh, Some(&leaf)).await,
            alert,
            "a client certificate {what}"
        );
        assert_backend_untouched(&mesh);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_client_not_in_allowed_peers() {
    let mesh = Mesh::start_with(|s| {
        s.server
            .set_list("allowed_peers", &["billing.internal.thinkheads.ai"]);
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

/// Anyone who reaches the port can present any certificate, as big as a handshake allows. A
/// certificate from another CA with a 60 KB common name is refused (unknown CA) before anything is
/// read out of it: its name reaches no log line, and no line the refusals write is longer than a
/// few hundred bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_certificate_is_refused_without_its_names_being_read_or_logged() {
    let pki = TestPki::new();
    let files = MeshFiles::unconnected(&pki);
    let (listener, listener_addr) = files.start_listener().await;
    let marker = "hostile-subject-";
    let name = format!("{marker}{}", "x".repeat(60 * 1024 - marker.len()));
    let stranger = pki.client_cert_signed_by_other_ca_named(&name);
    assert!(stranger.der.len() > 60 * 1024, "{}", stranger.der.len());
    let config = tls::client_config(pki.root_pem(), Some(&stranger), &[b"http/1.1"]);
    for _ in 0..3 {
        let alert = within(
            "refused handshake",
            tls::refusal_alert(listener_addr, config.clone()),
        )
        .await;
        assert_eq!(alert, AlertDescription::UnknownCA);
    }
    listener
        .wait_for_line(&["TLS handshake failed", "unknown-ca"])
        .await;
    let log = listener.log();
    for line in &log {
        assert!(
            !line.contains(marker),
            "a refused stranger's subject was logged: {}...",
            &line[..line.len().min(300)]
        );
        assert!(line.len() < 2048, "a log line of {} bytes", line.len());
    }
}

/// A client certificate from our CA for an RSA key of 1024 bits is refused as a key too small
/// (alert certificate_unknown, reason `key-too-small`), not as a bad signature of its
/// CertificateVerify, which would name the wrong cause.
#[tokio::test(flavor = "multi_thread")]
async fn refuses_an_rsa_1024_client_key_as_too_small() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let leaf = mesh.pki.client_cert_with_rsa_1024_key();
    let config = tls::client_config_without_key(mesh.pki.root_pem(), &leaf);
    let alert = within(
        "refused handshake",
        tls::refusal_alert(mesh.listener_addr, config),
    )
    .await;
    assert_eq!(alert, AlertDescription::CertificateUnknown);
    let admin = mesh.listener_admin.unwrap();
    eventually("the refusal counted as key-too-small", || async {
        let (_, text) = admin_get(admin, "/metrics").await;
        let labels = [("result", "failed"), ("reason", "key-too-small")];
        metric(&text, "phoenix_mesh_tls_handshakes_total", &labels).filter(|&n| n == 1.0)
    })
    .await;
    assert_backend_untouched(&mesh);
}

/// The sidecar can hold a certificate from another CA when its own `ca` bundle trusts both roots;
/// the listener, trusting only ours, refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn sidecar_reports_client_from_other_ca_refused() {
    let mesh = Mesh::start_with(|s| {
        let leaf = s.pki.client_cert_signed_by_other_ca();
        s.use_client_cert(leaf);
        s.client_trusts(&format!("{}{}", s.pki.root_pem(), s.pki.other_root_pem()));
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

#[tokio::test(flavor = "multi_thread")]
async fn allows_peer_by_spiffe_uri_san() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_list(
            "allowed_peers",
            &["billing.internal.thinkheads.ai", GATEWAY_SPIFFE],
        );
    })
    .await;
    assert_allowed(&mesh).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn allows_peer_by_common_name() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_list("allowed_peers", &[GATEWAY_CN]);
    })
    .await;
    assert_allowed(&mesh).await;
}

/// An entry must match exactly: a prefix of the SPIFFE ID or a differently-cased CN is no match.
#[tokio::test(flavor = "multi_thread")]
async fn refuses_near_miss_allowed_peers() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_list(
            "allowed_peers",
            &[
                "spiffe://phoenix.internal/ns/gateway".to_owned(),
                GATEWAY_CN.to_uppercase(),
            ],
        );
    })
    .await;
    let alert = direct_refusal(&mesh, Some(&mesh.client_leaf)).await;
    assert_eq!(alert, AlertDescription::AccessDenied);
    assert_backend_untouched(&mesh);
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_on_tls_port_gets_400_tls_required() {
    let mesh = Mesh::start().await;
    let req = Request::get("/")
        .header("host", SERVICE_HOST)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let reply = within(
        "plain HTTP to the TLS port",
        send_h1(mesh.listener_addr, req),
    )
    .await;
    reply.assert_mesh_error(400, "tls-required", &["requires mutual TLS"]);
    assert!(mesh.backend.seen().is_empty());
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

#[tokio::test(flavor = "multi_thread")]
async fn sets_client_identity_header() {
    let mesh = Mesh::start().await;
    let reply = within("request", send_h1(mesh.client_addr, get("/whoami"))).await;
    assert_hello(&reply);
    let seen = mesh.backend.only_request();
    assert_eq!(
        seen.one("x-forwarded-client-cert"),
        expected_gateway_xfcc(&mesh.client_leaf)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn strips_spoofed_client_cert_header() {
    let mesh = Mesh::start().await;
    let req = Request::get("/admin")
        .header("host", SERVICE_HOST)
        .header(
            "x-forwarded-client-cert",
            "Hash=deadbeef;Subject=\"CN=admin\";URI=spiffe://phoenix.internal/ns/admin/sa/root",
        )
        .header("x-forwarded-client-cert", "By=spiffe://evil")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let reply = within("request", send_h1(mesh.client_addr, req)).await;
    assert_hello(&reply);
    let seen = mesh.backend.only_request();
    assert_eq!(
        seen.all("x-forwarded-client-cert"),
        vec![expected_gateway_xfcc(&mesh.client_leaf)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_cert_with_non_ascii_subject_is_forwarded_in_xfcc() {
    let mesh = Mesh::start_with(|s| {
        let leaf = s
            .pki
            .client_cert_with_subject("m\u{fc}ller-gateway", "muller.internal.thinkheads.ai");
        s.use_client_cert(leaf);
    })
    .await;
    let reply = within("request", send_h1(mesh.client_addr, get("/umlaut"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
    // Non-ASCII travels as UTF-8 (obs-text), so read the raw bytes rather than `to_str`.
    let seen = mesh.backend.only_request();
    let xfcc = seen
        .headers
        .get("x-forwarded-client-cert")
        .unwrap()
        .as_bytes();
    let xfcc = String::from_utf8(xfcc.to_vec()).unwrap();
    assert!(
        xfcc.contains("Subject=\"CN=m\u{fc}ller-gateway\""),
        "{xfcc}"
    );
    assert!(
        xfcc.ends_with(";DNS=muller.internal.thinkheads.ai"),
        "{xfcc}"
    );
}

/// A control character in a certificate name cannot go into a header as it is: it is escaped the
/// RFC 4514 way (`\1A`) instead of the connection being dropped after a good handshake.
#[tokio::test(flavor = "multi_thread")]
async fn client_cert_with_control_character_in_subject_is_escaped_in_xfcc() {
    let mesh = Mesh::start_with(|s| {
        let leaf = s
            .pki
            .client_cert_with_subject("gate\u{1a}way", "gateway.internal.thinkheads.ai");
        s.use_client_cert(leaf);
    })
    .await;
    let reply = within("request", send_h1(mesh.client_addr, get("/control"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
    let seen = mesh.backend.only_request();
    let xfcc = seen.headers["x-forwarded-client-cert"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(xfcc.contains(r#"Subject="CN=gate\\1Away""#), "{xfcc}");
}
