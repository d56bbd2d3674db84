//! Broken hops: each error a sidecar makes itself has its status, its `phoenix-mesh-error` code and a
//! body naming the hop and the cause.

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;

use crate::support::backend::HELLO;
use crate::support::http::{get, send_h1, SERVICE_HOST};
use crate::support::mesh::{toml_str, Mesh};
use crate::support::{closed_port_addr, within};

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

#[tokio::test(flavor = "multi_thread")]
async fn client_pointed_at_plaintext_port_gets_502_upstream_not_tls() {
    let mesh = Mesh::start_with(|s| {
        let backend = s.backend_addr.to_string();
        s.client
            .set("upstreams", format!("[{}]", toml_str(&backend)));
    })
    .await;
    let reply = within("request", send_h1(mesh.client_addr, get("/"))).await;
    reply.assert_mesh_error(
        502,
        "upstream-not-tls",
        &[&mesh.backend.addr.to_string(), "does not speak TLS"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_server_name_gets_502_upstream_cert_invalid() {
    let mesh = Mesh::start_with(|s| {
        s.client
            .set_str("server_name", "traefik.internal.thinkheads.ai");
    })
    .await;
    let reply = within("request", send_h1(mesh.client_addr, get("/"))).await;
    reply.assert_mesh_error(
        502,
        "upstream-cert-invalid",
        &[
            &mesh.listener_addr.to_string(),
            "traefik.internal.thinkheads.ai",
        ],
    );
    assert!(mesh.backend.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn listener_from_other_ca_gets_502_upstream_cert_invalid() {
    let mesh = Mesh::start_with(|s| {
        s.listener_leaf = s.pki.listener_cert_signed_by_other_ca();
        // The listener itself must still start: it trusts its own chain's root for its own check.
        s.listener_ca_pem = format!("{}{}", s.pki.root_pem(), s.pki.other_root_pem());
    })
    .await;
    let reply = within("request", send_h1(mesh.client_addr, get("/"))).await;
    reply.assert_mesh_error(
        502,
        "upstream-cert-invalid",
        &[&mesh.listener_addr.to_string(), "UnknownIssuer"],
    );
    assert!(mesh.backend.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn listener_down_gets_upstream_unreachable_then_recovers() {
    let mut mesh = Mesh::start().await;
    let reply = within("request before", send_h1(mesh.client_addr, get("/before"))).await;
    assert_eq!(reply.status, 200, "{reply:#?}");

    mesh.stop_listener().await;
    let reply = within(
        "request while down",
        send_h1(mesh.client_addr, get("/down")),
    )
    .await;
    assert!(
        reply.status == 502 || reply.status == 503,
        "status while the listener is down: {reply:#?}"
    );
    reply.assert_mesh_error(
        reply.status.as_u16(),
        "upstream-unreachable",
        &[&mesh.listener_addr.to_string()],
    );

    mesh.restart_listener().await;
    let reply = within("request after", send_h1(mesh.client_addr, get("/after"))).await;
    assert_eq!(reply.status, 200, "{reply:#?}");
    assert_eq!(reply.body, HELLO);
    assert_eq!(reply.mesh_error(), None);
    let targets: Vec<String> = mesh.backend.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/before", "/after"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_down_gets_502_backend_unreachable() {
    let dead = closed_port_addr();
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("backend", &dead.to_string());
    })
    .await;
    let reply = within("request", send_h1(mesh.client_addr, get("/"))).await;
    reply.assert_mesh_error(502, "backend-unreachable", &[&dead.to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_backend_gets_504_backend_timeout() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("backend_timeout", "300ms");
    })
    .await;
    let reply = within("request", send_h1(mesh.client_addr, get("/slow"))).await;
    reply.assert_mesh_error(
        504,
        "backend-timeout",
        &[&mesh.backend.addr.to_string(), "backend_timeout"],
    );
    assert_eq!(mesh.backend.only_request().target, "/slow");
}
