//! The admin endpoint (`admin_listen`) on both sides of the real binary: `/healthz`, `/readyz` (and
//! why it is not ready), `/metrics` with every family and moving counters, and a port that closes
//! silent and stalled connections like the traffic ports.

use std::time::SystemTime;

use phoenix_mesh_certs::PeerIdentity;
use rustls::AlertDescription;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::admin::{admin_get, metric};
use crate::support::backend::Backend;
use crate::support::files::MeshFiles;
use crate::support::http::assert_round_trip;
use crate::support::pki::TestPki;
use crate::support::tls::{client_config, refusal_alert};

fn not_after_unix(der: &[u8]) -> f64 {
    unix(PeerIdentity::from_der(der).unwrap().not_after)
}

fn not_before_unix(der: &[u8]) -> f64 {
    unix(PeerIdentity::from_der(der).unwrap().not_before)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as f64
}

/// Both names of a certificate's expiry carry its notAfter: the one dashboards already read, and
/// the absolute-time one Prometheus' conventions name for alerts.
fn assert_expiry(text: &str, cert: &str, der: &[u8]) {
    for name in [
        "phoenix_mesh_certificate_not_after_seconds",
        "phoenix_mesh_certificate_expiry_timestamp_seconds",
    ] {
        assert_eq!(
            metric(text, name, &[("cert", cert)]),
            Some(not_after_unix(der)),
            "{name}{{cert={cert:?}}}:\n{text}"
        );
    }
}

/// Every metric family the issue names, as `# TYPE` lines must show them.
const FAMILIES: [&str; 11] = [
    "phoenix_mesh_tls_handshakes",
    "phoenix_mesh_tls_handshake_duration_seconds",
    "phoenix_mesh_http_requests",
    "phoenix_mesh_http_request_duration_seconds",
    "phoenix_mesh_open_connections",
    "phoenix_mesh_upstream_connections",
    "phoenix_mesh_upstream_dials",
    "phoenix_mesh_certificate_not_after_seconds",
    "phoenix_mesh_certificate_expiry_timestamp_seconds",
    "phoenix_mesh_certificate_not_before_timestamp_seconds",
    "phoenix_mesh_reloads",
];

fn assert_families(side: &str, text: &str) {
    // The listener dials nothing but Traefik (a hyper pool), so it has no dial samples to show, and
    // an empty family is not exposed.
    let expected = FAMILIES
        .into_iter()
        .filter(|f| side == "client" || *f != "phoenix_mesh_upstream_dials");
    for family in expected {
        assert!(
            text.contains(&format!("# TYPE {family}")),
            "{side} /metrics lacks {family}:\n{text}"
        );
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(
            line.starts_with("phoenix_mesh_"),
            "{side}: unprefixed metric {line:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_readiness_and_moving_metrics_on_both_sides() {
    let pki = TestPki::new();
    let backend = Backend::start().await;
    let (listener_leaf, gateway) = (pki.listener_cert(), pki.client_cert());
    let mut files = MeshFiles::new(&pki, backend.addr, &listener_leaf, &gateway);
    files.server.set_str("admin_listen", "127.0.0.1:0");
    files.client.set_str("admin_listen", "127.0.0.1:0");
    let (mut listener, listener_addr) = files.start_listener().await;
    let listener_admin = listener
        .addr_from_log("admin endpoint serving", "admin")
        .await;
    let (client, client_addr) = files.start_client(listener_addr).await;
    let client_admin = client
        .addr_from_log("admin endpoint serving", "admin")
        .await;

    for (side, admin) in [("listener", listener_admin), ("client", client_admin)] {
        assert_eq!(
            admin_get(admin, "/healthz").await,
            (200, "ok\n".to_owned()),
            "{side}"
        );
        let (status, body) = admin_get(admin, "/readyz").await;
        assert_eq!(status, 200, "{side} /readyz: {body}");
        assert!(body.starts_with("ready: "), "{side} /readyz: {body}");
    }

    assert_round_trip(client_addr, "through the mesh").await;
    // A client from another CA: one failed handshake with reason unknown-ca.
    let stranger = pki.client_cert_signed_by_other_ca();
    let alert = refusal_alert(
        listener_addr,
        client_config(pki.root_pem(), Some(&stranger), &[]),
    )
    .await;
    assert_eq!(alert, AlertDescription::UnknownCA);

    let (status, text) = admin_get(listener_admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_families("listener", &text);
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels).unwrap_or(0.0);
    assert!(
        m(
            "phoenix_mesh_http_requests_total",
            &[("status_class", "2xx"), ("made_by", "backend")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        m(
            "phoenix_mesh_tls_handshakes_total",
            &[("result", "failed"), ("reason", "unknown-ca")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        m(
            "phoenix_mesh_tls_handshakes_total",
            &[("result", "ok"), ("kind", "full")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        m("phoenix_mesh_tls_handshake_duration_seconds_count", &[]) >= 2.0,
        "{text}"
    );
    assert!(
        m("phoenix_mesh_http_request_duration_seconds_count", &[]) >= 1.0,
        "{text}"
    );
    assert_expiry(&text, "own", &listener_leaf.der);
    assert_eq!(
        m(
            "phoenix_mesh_certificate_not_before_timestamp_seconds",
            &[("cert", "own")]
        ),
        not_before_unix(&listener_leaf.der),
        "{text}"
    );

    let (_, text) = admin_get(client_admin, "/metrics").await;
    assert_families("client", &text);
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels).unwrap_or(0.0);
    assert!(
        m(
            "phoenix_mesh_http_requests_total",
            &[("status_class", "2xx"), ("made_by", "backend")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        m("phoenix_mesh_upstream_dials_total", &[("result", "ok")]) >= 1.0,
        "{text}"
    );
    assert_expiry(&text, "own", &gateway.der);
    assert_expiry(&text, "peer", &listener_leaf.der);

    // The upstream goes away: the client is alive but no longer ready, and says why.
    listener.signal("TERM");
    assert!(listener.exit().await.success());
    let (status, body) = admin_get(client_admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: "), "{body}");
    assert!(body.contains(&listener_addr.to_string()), "{body}");
    assert_eq!(admin_get(client_admin, "/healthz").await.0, 200);
}

/// The admin port closes connections that send nothing, or stop inside a request head, after
/// `header_read_timeout` like the traffic ports: it accepts 64 connections at a time, and a local
/// process holding them would blind `/readyz` and the Prometheus scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_closes_silent_and_stalled_connections() {
    let pki = TestPki::new();
    let backend = Backend::start().await;
    let (listener_leaf, gateway) = (pki.listener_cert(), pki.client_cert());
    let mut files = MeshFiles::new(&pki, backend.addr, &listener_leaf, &gateway);
    files.server.set_str("admin_listen", "127.0.0.1:0");
    files.server.set_str("header_read_timeout", "500ms");
    let (listener, _) = files.start_listener().await;
    let admin = listener
        .addr_from_log("admin endpoint serving", "admin")
        .await;
    for (what, first) in [
        ("a silent connection", &b""[..]),
        (
            "a stalled request head",
            &b"GET /metrics HTTP/1.1\r\nHost: a\r\n"[..],
        ),
    ] {
        let mut tcp = TcpStream::connect(admin).await.unwrap();
        tcp.write_all(first).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tcp.read_to_end(&mut got),
        )
        .await;
        assert!(read.is_ok(), "admin port: {what} still open after 10 s");
        let text = String::from_utf8_lossy(&got);
        assert!(
            got.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{what}: {text}"
        );
    }
    assert_eq!(admin_get(admin, "/healthz").await, (200, "ok\n".to_owned()));
}
