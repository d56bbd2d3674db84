//! Odd and hostile HTTP, on both sidecars: what RFC 9110/9112 say a request may not be (no Host or
//! two, an invalid Host, CONNECT, `GET *`, an upgrade `allowed_upgrades` does not list, a malformed
//! chunked body) is refused by the first sidecar that reads it and never reaches the backend; Host
//! survives `Connection`; HTTP/2 cookie crumbs reach an HTTP/1.1 backend joined; underscore
//! lookalikes of the identity header are dropped; response heads up to the listener's limit cross
//! the mesh link and larger ones fail alone; the text access log quotes what a request chose.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::backend::HELLO;
use crate::support::binary::Binary;
use crate::support::files::MeshFiles;
use crate::support::http::{assert_hello, collect, get, send_h1, SERVICE_HOST};
use crate::support::mesh::Mesh;
use crate::support::pki::{expected_gateway_xfcc, TestPki};
use crate::support::raw::{head_value, read_head, read_response};
use crate::support::{eventually, tls, within};

/// Sends `raw` on `s` and reads the answer's head.
async fn answer_to<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, raw: &[u8]) -> String {
    s.write_all(raw).await.unwrap();
    s.flush().await.unwrap();
    within("the answer's head", read_head(s)).await.0
}

/// Fails the test unless `head` is a sidecar's answer with `status` and `code`.
fn assert_refused(head: &str, status: u16, code: &str, what: &str) {
    assert!(
        head.starts_with(&format!("HTTP/1.1 {status} ")),
        "{what}: {head}"
    );
    assert_eq!(
        head_value(head, "phoenix-mesh-error"),
        Some(code),
        "{what}: {head}"
    );
}

/// Requests no sidecar may forward, with the status and code that refuse them. Every target starts
/// with `/refused` (CONNECT and `*` have none: the backend must see neither method nor `*`).
fn refused_requests() -> Vec<(&'static str, String, u16, &'static str)> {
    let h = SERVICE_HOST;
    vec![
        (
            "no Host",
            "GET /refused/no-host HTTP/1.1\r\n\r\n".to_owned(),
            400,
            "bad-request",
        ),
        (
            "two Host lines",
            format!("GET /refused/two-hosts HTTP/1.1\r\nHost: {h}\r\nHost: other.example\r\n\r\n"),
            400,
            "bad-request",
        ),
        (
            "a Host with spaces",
            format!("GET /refused/bad-host HTTP/1.1\r\nHost: {h} path=/admin\r\n\r\n"),
            400,
            "bad-request",
        ),
        (
            "CONNECT",
            "CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n".to_owned(),
            405,
            "method-not-allowed",
        ),
        (
            "GET *",
            format!("GET * HTTP/1.1\r\nHost: {h}\r\n\r\n"),
            400,
            "bad-request",
        ),
        (
            "an h2c upgrade",
            format!(
                "GET /refused/h2c HTTP/1.1\r\nHost: {h}\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                 Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            ),
            403,
            "upgrade-not-allowed",
        ),
        (
            "an upgrade to anything/1.0",
            format!(
                "GET /refused/anything HTTP/1.1\r\nHost: {h}\r\nConnection: upgrade\r\n\
                 Upgrade: anything/1.0\r\n\r\n"
            ),
            403,
            "upgrade-not-allowed",
        ),
    ]
}

/// Checks every refused request on fresh connections from `connect`, then that the backend saw none.
async fn check_refused<S, F, Fut>(mesh: &Mesh, hop: &str, connect: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    for (what, raw, status, code) in refused_requests() {
        let mut s = connect().await;
        let head = answer_to(&mut s, raw.as_bytes()).await;
        assert_refused(&head, status, code, &format!("{hop}, {what}"));
    }
    let seen = mesh.backend.seen();
    assert!(
        seen.iter().all(|s| !s.target.starts_with("/refused")
            && s.method != http::Method::CONNECT
            && s.target != "*"),
        "{hop}: the backend saw a request that should have been refused: {seen:#?}"
    );
    mesh.good_requests(hop, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_refuses_what_no_hop_may_forward() {
    let mesh = Mesh::start().await;
    let addr = mesh.client_addr;
    check_refused(&mesh, "client", || async move {
        TcpStream::connect(addr).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_listener_refuses_what_no_hop_may_forward() {
    let mesh = Mesh::start().await;
    let mesh_ref = &mesh;
    check_refused(&mesh, "listener", || mesh_ref.gateway_tls()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn options_asterisk_still_reaches_the_backend() {
    let mesh = Mesh::start().await;
    let mut tcp = TcpStream::connect(mesh.client_addr).await.unwrap();
    let raw = format!("OPTIONS * HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n");
    let head = answer_to(&mut tcp, raw.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(head_value(&head, "phoenix-mesh-error"), None, "{head}");
}

/// A chunked upload whose first chunk size is not hexadecimal.
fn bad_chunk(target: &str) -> String {
    format!(
        "POST {target} HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nTransfer-Encoding: chunked\r\n\r\n\
         zz\r\nabc\r\n0\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_chunked_body_gets_400_from_the_sidecar_that_read_it() {
    let mesh = Mesh::start().await;
    let mut tcp = TcpStream::connect(mesh.client_addr).await.unwrap();
    tcp.write_all(bad_chunk("/upload").as_bytes())
        .await
        .unwrap();
    let (head, body) = within("the client's answer", read_response(&mut tcp)).await;
    assert_refused(&head, 400, "bad-request", "client port");
    assert!(
        body.starts_with("phoenix-mesh client: the request body"),
        "{body}"
    );

    let mut tls = mesh.gateway_tls().await;
    tls.write_all(bad_chunk("/upload").as_bytes())
        .await
        .unwrap();
    let (head, body) = within("the listener's answer", read_response(&mut tls)).await;
    assert_refused(&head, 400, "bad-request", "listener");
    assert!(
        body.starts_with("phoenix-mesh listener: the request body"),
        "{body}"
    );
    assert!(body.contains("chunk size"), "{body}");

    // The mesh link the first one rode is unharmed.
    mesh.good_requests("after-bad-chunks", 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_never_removes_host() {
    let mesh = Mesh::start().await;
    let mut req = get("/named-host");
    req.headers_mut()
        .insert("connection", "keep-alive, Host".parse().unwrap());
    assert_hello(&within("through the client", send_h1(mesh.client_addr, req)).await);
    assert_eq!(mesh.backend.only_request().one("host"), SERVICE_HOST);

    let mut tls = mesh.gateway_tls().await;
    let raw = format!(
        "GET /named-host-listener HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nConnection: keep-alive, Host\r\n\r\n"
    );
    let head = answer_to(&mut tls, raw.as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let seen = mesh.backend.seen();
    assert_eq!(seen.last().unwrap().target, "/named-host-listener");
    assert_eq!(seen.last().unwrap().one("host"), SERVICE_HOST);
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_cookie_crumbs_reach_an_http1_backend_joined() {
    let mesh = Mesh::start().await;
    let config = tls::client_config(mesh.pki.root_pem(), Some(&mesh.client_leaf), &[b"h2"]);
    let stream = tls::to_listener(mesh.listener_addr, config).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://{SERVICE_HOST}/crumbs"))
        .header("cookie", "session=abc")
        .header("cookie", "theme=dark")
        .header("cookie", "lang=en")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let reply = collect(
        within("h2 request", sender.send_request(req))
            .await
            .unwrap(),
    )
    .await;
    assert_hello(&reply);
    let seen = mesh.backend.only_request();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.one("cookie"), "session=abc; theme=dark; lang=en");
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_header_lookalikes_with_underscores_are_dropped() {
    let mesh = Mesh::start().await;
    let mut req = get("/lookalike");
    for name in [
        "x_forwarded_client_cert",
        "X-Forwarded_Client-Cert",
        "client_cert",
        "Client_Cert-Chain",
    ] {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            "Hash=forged;URI=spiffe://admin".parse().unwrap(),
        );
    }
    // Other headers with underscores are the backend's business.
    req.headers_mut()
        .insert("x_request_id", "kept".parse().unwrap());
    assert_hello(&within("through the client", send_h1(mesh.client_addr, req)).await);
    let seen = mesh.backend.only_request();
    let names: Vec<&str> = seen.headers.keys().map(|n| n.as_str()).collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("client_cert") || n.contains("forwarded_client")),
        "a lookalike reached the backend: {names:?}"
    );
    assert_eq!(seen.one("x_request_id"), "kept");
    assert_eq!(
        seen.one("x-forwarded-client-cert"),
        expected_gateway_xfcc(&mesh.client_leaf)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn response_heads_up_to_the_limit_cross_the_mesh_link_and_larger_fail_alone() {
    let mesh = Mesh::start().await;
    // In flight on the shared mesh link the whole time.
    let client = mesh.client_addr;
    let slow = tokio::spawn(async move { send_h1(client, get("/delay/1500")).await });
    eventually("the slow request at the backend", || async {
        (!mesh.backend.targets_with_prefix("/delay").is_empty()).then_some(())
    })
    .await;

    let big = within(
        "a 30 KB response head",
        send_h1(mesh.client_addr, get("/big-head?bytes=30000")),
    )
    .await;
    assert_eq!(big.status, StatusCode::OK, "{big:#?}");
    assert_eq!(big.body, HELLO);
    assert_eq!(big.headers.get("x-big-7").map(|v| v.len()), Some(4000));

    let huge = within(
        "a 100 KB response head",
        send_h1(mesh.client_addr, get("/big-head?bytes=100000")),
    )
    .await;
    huge.assert_mesh_error(
        502,
        "backend-head-too-large",
        &["phoenix-mesh listener", "max_header_bytes (65536)"],
    );

    let slow = within("the slow request", slow).await.unwrap();
    assert_eq!(
        (slow.status, slow.body.as_str()),
        (StatusCode::OK, HELLO),
        "{slow:#?}"
    );
    mesh.good_requests("after-big-heads", 2).await;
}

/// The `listen=` address in a text log line.
fn text_field_addr(line: &str, key: &str) -> SocketAddr {
    let start = line.find(&format!("{key}=")).unwrap() + key.len() + 1;
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_text_access_log_quotes_a_forged_host() {
    let mut files = MeshFiles::unconnected(&TestPki::new());
    files.client.set("access_log", "true");
    let proc = Binary::client(&files.write_client()).spawn();
    let line = proc
        .wait_for_line(&["client sidecar accepting plain HTTP"])
        .await;
    let addr = text_field_addr(&line, "listen");

    let forged = r#"a.example path=/admin status=200 peer=spiffe://admin "x""#;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let raw = format!("GET /forged HTTP/1.1\r\nHost: {forged}\r\n\r\n");
    let head = answer_to(&mut tcp, raw.as_bytes()).await;
    assert_refused(&head, 400, "bad-request", "forged Host");

    let line = proc
        .wait_for_line(&["phoenix_mesh::access", "/forged"])
        .await;
    let quoted = r#"host="a.example path=/admin status=200 peer=spiffe://admin \"x\"""#;
    assert!(line.contains(quoted), "{line}");
    let fields = line.replace(quoted, "");
    assert_eq!(fields.matches(" status=").count(), 1, "{line}");
    assert!(fields.contains(" status=400 "), "{line}");
    assert!(!fields.contains("spiffe"), "{line}");
    assert!(fields.contains(r#"path="/forged""#), "{line}");
}
