//! The identity headers the backend gets (`identity_headers`): XFCC by default; with `client-cert`,
//! RFC 9440's `Client-Cert` (the client's leaf) and `Client-Cert-Chain` (its intermediates, never
//! the root), each decoding to the exact DER the client presented. Copies of any of the three that
//! a caller sends never reach the backend, whichever are configured, whether they come straight to
//! the listener or through the client sidecar; and the client sidecar removes them from nginx's
//! requests itself, so not even a listener that kept them would see them.

use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use phoenix_mesh_certs::pki::Leaf;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::support::backend::Seen;
use crate::support::files::MeshFiles;
use crate::support::http::{assert_hello, send_h1, SERVICE_HOST};
use crate::support::mesh::Mesh;
use crate::support::pki::{expected_gateway_xfcc, TestPki};
use crate::support::{tls, within};

/// What a caller forges: every identity header, twice, in the case it likes.
const FORGED: [(&str, &str); 6] = [
    ("X-Forwarded-Client-Cert", "Hash=00;Subject=\"CN=admin\""),
    ("x-forwarded-client-cert", "By=spiffe://evil"),
    ("Client-Cert", ":AAAA:"),
    ("client-cert", ":Zm9yZ2Vk:"),
    ("Client-Cert-Chain", ":AAAA:, :AAAA:"),
    ("client-cert-chain", ":Zm9yZ2Vk:"),
];

/// A mesh whose listener sends `identity_headers = names`.
async fn mesh_sending(names: &[&str]) -> Mesh {
    Mesh::start_with(|s| {
        s.server.set_list("identity_headers", names);
    })
    .await
}

/// A GET carrying every forged identity header, through the client sidecar.
async fn forged_through_the_client(mesh: &Mesh) {
    let mut req = http::Request::get("/forged").header("host", SERVICE_HOST);
    for (name, value) in FORGED {
        req = req.header(name, value);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let reply = within("request", send_h1(mesh.client_addr, req)).await;
    assert_hello(&reply);
}

/// The same, straight to the listener over mutual TLS with `leaf`'s chain as `chain_pem` says.
async fn forged_straight_to_the_listener(mesh: &Mesh, leaf: &Leaf) {
    let mut tls = tls::to_listener(mesh.listener_addr, mesh.tls_config(leaf)).await;
    let mut head = format!("GET /forged-direct HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n");
    for (name, value) in FORGED {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    within("direct answer", tls.read_to_end(&mut out))
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// The DER in one RFC 8941 byte sequence (`:<base64>:`).
fn byte_sequence(item: &str) -> Vec<u8> {
    let b64 = item
        .trim()
        .strip_prefix(':')
        .and_then(|s| s.strip_suffix(':'))
        .unwrap_or_else(|| panic!("not a byte sequence: {item:?}"));
    STANDARD.decode(b64).unwrap()
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// The backend got the leaf in `Client-Cert` and the intermediate alone in `Client-Cert-Chain`,
/// one line each.
fn assert_rfc9440(seen: &Seen, leaf: &Leaf, intermediate: &[u8]) {
    let cert = seen.one("client-cert");
    assert_eq!(byte_sequence(&cert), leaf.der, "Client-Cert: {cert}");
    let chain = seen.one("client-cert-chain");
    let items: Vec<Vec<u8>> = chain.split(',').map(byte_sequence).collect();
    assert_eq!(items, [intermediate.to_vec()], "Client-Cert-Chain: {chain}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_cert_headers_decode_to_the_clients_der_and_forged_ones_never_reach_the_backend() {
    let mesh = mesh_sending(&["client-cert"]).await;
    let intermediate = der_of(mesh.pki.intermediate_pem());

    forged_through_the_client(&mesh).await;
    let seen = mesh.backend.only_request();
    assert_rfc9440(&seen, &mesh.client_leaf, &intermediate);
    assert!(
        seen.all("x-forwarded-client-cert").is_empty(),
        "XFCC is not configured, and a forged one must not pass: {:?}",
        seen.headers
    );

    // Straight to the listener, with no client sidecar to clean up first.
    let leaf = mesh.client_leaf.clone();
    forged_straight_to_the_listener(&mesh, &leaf).await;
    let seen = mesh.backend.seen().pop().unwrap();
    assert_eq!(seen.target, "/forged-direct");
    assert_rfc9440(&seen, &leaf, &intermediate);
    assert!(seen.all("x-forwarded-client-cert").is_empty(), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_sent_along_is_left_out_of_the_chain_header() {
    let mesh = mesh_sending(&["xfcc", "client-cert"]).await;
    let mut with_root = mesh.client_leaf.clone();
    with_root.chain_pem.push_str(mesh.pki.root_pem());
    forged_straight_to_the_listener(&mesh, &with_root).await;
    let seen = mesh.backend.only_request();
    assert_rfc9440(&seen, &with_root, &der_of(mesh.pki.intermediate_pem()));
    assert_eq!(
        seen.all("x-forwarded-client-cert"),
        [expected_gateway_xfcc(&mesh.client_leaf)]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn by_default_only_xfcc_is_sent_and_forged_rfc9440_headers_are_stripped() {
    let mesh = Mesh::start().await;
    let leaf = mesh.client_leaf.clone();
    forged_straight_to_the_listener(&mesh, &leaf).await;
    forged_through_the_client(&mesh).await;
    let seen = mesh.backend.seen();
    assert_eq!(seen.len(), 2);
    for seen in seen {
        assert_eq!(
            seen.all("x-forwarded-client-cert"),
            [expected_gateway_xfcc(&leaf)],
            "{}",
            seen.target
        );
        for name in ["client-cert", "client-cert-chain"] {
            assert!(
                seen.all(name).is_empty(),
                "{}: a forged {name} reached the backend: {:?}",
                seen.target,
                seen.headers
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_identity_header_is_refused_naming_the_key() {
    let pki = TestPki::new();
    let mut files = MeshFiles::unconnected(&pki);
    files
        .server
        .set_list("identity_headers", &["xfcc", "client_cert"]);
    let error = phoenix_mesh_server::ServerSettings::load(&files.write_server()).unwrap_err();
    let text = phoenix_mesh_certs::error_chain(&error);
    assert!(
        text.contains("identity_headers")
            && text.contains("\"client_cert\"")
            && text.contains("\"client-cert\""),
        "{text}"
    );
}

/// A stand-in for a listener that strips nothing (an older one, say): it serves TLS with the
/// listener's certificate, HTTP/1.1 only, answers every request `200 ok` and sends each request
/// head it read down `heads`.
async fn recording_listener(leaf: &Leaf) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let acceptor = crate::support::tls::http1_acceptor(leaf);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (heads, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, heads) = (acceptor.clone(), heads.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                loop {
                    if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                    if head.ends_with(b"\r\n\r\n") {
                        let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
                        head.clear();
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
                        if tls.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_sidecar_strips_identity_headers_from_nginx_itself() {
    let pki = TestPki::new();
    let (upstream, mut heads) = recording_listener(&pki.listener_cert()).await;
    let mut files = MeshFiles::unconnected(&pki);
    files
        .client
        .set_addrs("upstreams", &[upstream])
        .set("upstream_http2", "false");
    let settings = phoenix_mesh_client::ClientSettings::load(&files.write_client()).unwrap();
    let sidecar = phoenix_mesh_client::ClientSidecar::bind(settings)
        .await
        .unwrap();
    let client_addr = sidecar.local_addr().unwrap();
    let (shutdown, watch) = phoenix_mesh_transport::serve::Shutdown::new();
    tokio::spawn(sidecar.serve(watch));

    let mut req = http::Request::get("/forged").header("host", SERVICE_HOST);
    for (name, value) in FORGED {
        req = req.header(name, value);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let reply = within("request", send_h1(client_addr, req)).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (http::StatusCode::OK, "ok\n"),
        "{reply:?}"
    );
    let head = loop {
        let head = within("the request at the listener", heads.recv())
            .await
            .unwrap();
        // The readiness probe's requests, if any, are not the one sent.
        if head.starts_with("GET /forged ") {
            break head;
        }
    };
    let lower = head.to_ascii_lowercase();
    for name in [
        "x-forwarded-client-cert:",
        "client-cert:",
        "client-cert-chain:",
    ] {
        assert!(
            !lower.contains(&format!("\r\n{name}")),
            "the client sidecar passed on {name}\n{head}"
        );
    }
    shutdown.begin();
}
