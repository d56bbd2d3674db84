//! Requests that should make it through, and arrive as they were sent: nginx-side HTTP -> client
//! sidecar -> mTLS -> listener -> backend and back, over HTTP/1.1, h2c and HTTP/2 with ALPN, with
//! methods, targets and forwarding headers intact, hop-by-hop headers removed, and bodies streamed
//! both ways without buffering. Upgrades are in `upgrades`, the backend's h2c hop in `backend_h2c`.

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::support::backend::{HELLO, TRAEFIK_404};
use crate::support::http::{assert_hello, get, send_h1, send_h1_streaming, send_h2c, SERVICE_HOST};
use crate::support::mesh::Mesh;
use crate::support::pki::expected_gateway_xfcc;
use crate::support::raw::{exchange, status_of};
use crate::support::stream::{drain_hashing, gated_body, pattern_sha256};
use crate::support::{eventually, tls, within};

#[tokio::test(flavor = "multi_thread")]
async fn round_trip_reaches_backend_and_back() {
    let mesh = Mesh::start().await;
    let reply = within("round trip", send_h1(mesh.client_addr, get("/hello"))).await;
    assert_hello(&reply);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    let seen = mesh.backend.only_request();
    assert_eq!(seen.method, Method::GET);
    assert_eq!(seen.target, "/hello");
}

#[tokio::test(flavor = "multi_thread")]
async fn preserves_method_host_path_and_query() {
    let mesh = Mesh::start().await;
    let target = "/api/v1/items%2Fx/?q=a%20b&empty=&n=1&n=2#";
    let target = target.trim_end_matches('#');
    let req = Request::builder()
        .method(Method::PUT)
        .uri(target)
        .header("host", "grafana.internal.thinkheads.ai:8443")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let reply = within("request", send_h1(mesh.client_addr, req)).await;
    assert_hello(&reply);
    let seen = mesh.backend.only_request();
    assert_eq!(seen.method, Method::PUT);
    assert_eq!(seen.target, target);
    assert_eq!(seen.one("host"), "grafana.internal.thinkheads.ai:8443");
    assert_eq!(seen.version, Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread")]
async fn keeps_forwarding_headers_and_removes_hop_by_hop() {
    let mesh = Mesh::start().await;
    let req = Request::get("/fwd")
        .header("host", SERVICE_HOST)
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-real-ip", "203.0.113.7")
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("proxy-connection", "keep-alive")
        .header("x-end-to-end", "kept")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let reply = within("request", send_h1(mesh.client_addr, req)).await;
    assert_hello(&reply);
    let seen = mesh.backend.only_request();
    assert_eq!(seen.one("x-forwarded-for"), "203.0.113.7, 127.0.0.1");
    assert_eq!(seen.one("x-forwarded-proto"), "https");
    assert_eq!(seen.one("x-real-ip"), "203.0.113.7");
    assert_eq!(seen.one("x-end-to-end"), "kept");
    for gone in [
        "x-drop-me",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} crossed the hop: {:?}",
            seen.headers
        );
    }
    // The listener's own connection header to the backend may say keep-alive; never the client's list.
    for value in seen.all("connection") {
        assert!(!value.contains("x-drop-me"), "connection: {value}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_named_headers_are_stripped_even_with_obs_text_in_connection() {
    let mesh = Mesh::start().await;
    let mut tcp = TcpStream::connect(mesh.client_addr).await.unwrap();
    let mut raw = format!(
        "GET /conn-obs-text HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nX-Secret: 1\r\nConnection: x-secret, "
    )
    .into_bytes();
    raw.extend_from_slice(b"\xd0\r\n\r\n");
    let got = exchange(&mut tcp, &raw).await;
    assert_eq!(
        status_of(&got),
        Some(200),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    let seen = mesh
        .backend
        .seen()
        .into_iter()
        .find(|s| s.target == "/conn-obs-text")
        .expect("backend saw the request");
    assert!(
        !seen.headers.contains_key("x-secret"),
        "a header named by Connection crossed the hop: {:?}",
        seen.headers
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_an_8_mib_upload_intact() {
    const SIZE: u64 = 8 * 1024 * 1024;
    let mesh = Mesh::start().await;
    // The body pauses half-way until the backend has read some of it: a sidecar that buffered the
    // whole upload first would never get there.
    let body = gated_body(SIZE, mesh.backend.upload_progress());
    let req = Request::post("/upload")
        .header("host", SERVICE_HOST)
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    let reply = within("8 MiB upload", send_h1(mesh.client_addr, req)).await;
    let expected = pattern_sha256(SIZE);
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
    assert_eq!(reply.mesh_error(), None);
    assert_eq!(reply.body, format!("{SIZE} {expected}"));
    let seen = mesh.backend.only_request();
    let (len, sha, largest) = seen.upload.unwrap();
    assert_eq!((len, sha.as_str()), (SIZE, expected.as_str()));
    assert!(
        (largest as u64) < SIZE / 4,
        "the backend got a {largest}-byte frame"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_upload_cut_off_midway_reaches_the_backend_failed_not_complete() {
    use tokio::io::AsyncWriteExt as _;
    const CHUNK: usize = 64 * 1024;
    let mesh = Mesh::start().await;
    let mut progress = mesh.backend.upload_progress();
    let mut tcp = tokio::net::TcpStream::connect(mesh.client_addr)
        .await
        .unwrap();
    let mut raw = format!(
        "POST /upload HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nTransfer-Encoding: chunked\r\n\r\n{CHUNK:x}\r\n"
    )
    .into_bytes();
    raw.extend_from_slice(&[b'x'; CHUNK]);
    raw.extend_from_slice(b"\r\n");
    tcp.write_all(&raw).await.unwrap();
    within(
        "the backend reading the first chunk",
        progress.wait_for(|&n| n >= CHUNK as u64),
    )
    .await
    .unwrap();
    // No last chunk: nginx's side hung up mid-upload. Every hop must pass that on as a failure; a
    // hop that ended the body cleanly would hand the backend a truncated upload as complete.
    drop(tcp);
    let seen = eventually("the backend's verdict on the upload", || async {
        mesh.backend
            .seen()
            .into_iter()
            .find(|s| s.target == "/upload")
    })
    .await;
    assert_eq!(
        seen.upload, None,
        "a cut-off upload arrived as complete: {seen:#?}"
    );
    assert!(seen.upload_error.is_some(), "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_a_20_mb_download_intact() {
    const SIZE: u64 = 20_000_000;
    let mesh = Mesh::start().await;
    let response = within(
        "download headers",
        send_h1_streaming(mesh.client_addr, get(&format!("/download?bytes={SIZE}"))),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    assert!(!response
        .headers()
        .contains_key(phoenix_mesh_common::MESH_ERROR_HEADER));
    // The backend pauses after the first part until we report bytes arriving: a sidecar that
    // buffered the whole response would deadlock here.
    let (len, sha, _) = within(
        "20 MB download body",
        drain_hashing(response.into_body(), mesh.backend.download_progress()),
    )
    .await;
    assert_eq!(len, SIZE);
    assert_eq!(sha, pattern_sha256(SIZE));
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_200_concurrent_requests() {
    let mesh = Mesh::start().await;
    let addr = mesh.client_addr;
    let tasks: Vec<_> = (0..200)
        .map(|i| tokio::spawn(async move { (i, send_h1(addr, get(&format!("/c/{i}"))).await) }))
        .collect();
    for task in tasks {
        let (i, reply) = within("concurrent request", task).await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "request {i}: {reply:#?}");
        assert_eq!(reply.body, HELLO, "request {i}");
        assert_eq!(reply.mesh_error(), None, "request {i}");
    }
    let mut targets: Vec<String> = mesh.backend.seen().into_iter().map(|s| s.target).collect();
    targets.sort();
    let mut expected: Vec<String> = (0..200).map(|i| format!("/c/{i}")).collect();
    expected.sort();
    assert_eq!(targets, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn passes_backend_404_through_untouched() {
    let mesh = Mesh::start().await;
    let reply = within("request", send_h1(mesh.client_addr, get("/404"))).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{reply:#?}");
    assert_eq!(reply.body, TRAEFIK_404);
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(reply.mesh_error(), None, "{reply:#?}");
    assert_eq!(mesh.backend.only_request().target, "/404");
}

#[tokio::test(flavor = "multi_thread")]
async fn works_with_upstream_http2_disabled() {
    let mesh = Mesh::start_with(|s| {
        s.client.set("upstream_http2", "false");
    })
    .await;
    for i in 0..3 {
        let reply = within(
            "request",
            send_h1(mesh.client_addr, get(&format!("/h1/{i}"))),
        )
        .await;
        assert_hello(&reply);
    }
    let seen = mesh.backend.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[2].one("x-forwarded-client-cert"),
        expected_gateway_xfcc(&mesh.client_leaf)
    );
    assert_eq!(seen[2].one("host"), SERVICE_HOST);
}

#[tokio::test(flavor = "multi_thread")]
async fn accepts_h2c_with_prior_knowledge() {
    let mesh = Mesh::start().await;
    let req = Request::get(format!("http://{SERVICE_HOST}/h2c?x=1"))
        .version(Version::HTTP_2)
        .header("x-forwarded-proto", "https")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let reply = within("h2c request", send_h2c(mesh.client_addr, req)).await;
    assert_hello(&reply);
    let seen = mesh.backend.only_request();
    assert_eq!(seen.target, "/h2c?x=1");
    assert_eq!(seen.one("host"), SERVICE_HOST);
    assert_eq!(seen.one("x-forwarded-proto"), "https");
    assert_eq!(
        seen.one("x-forwarded-client-cert"),
        expected_gateway_xfcc(&mesh.client_leaf)
    );
}

/// The listener offers HTTP/2 through ALPN and carries :authority to the backend as Host.
#[tokio::test(flavor = "multi_thread")]
async fn listener_speaks_http2_over_alpn() {
    let mesh = Mesh::start().await;
    let config = tls::client_config(
        mesh.pki.root_pem(),
        Some(&mesh.client_leaf),
        &[b"h2", b"http/1.1"],
    );
    let stream = tls::to_listener(mesh.listener_addr, config).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://{SERVICE_HOST}/direct-h2?y=2"))
        .version(Version::HTTP_2)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("h2 request", sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-backend"], "echo");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, HELLO.as_bytes());
    let seen = mesh.backend.only_request();
    assert_eq!(seen.target, "/direct-h2?y=2");
    assert_eq!(seen.one("host"), SERVICE_HOST);
    assert_eq!(seen.one("x-forwarded-for"), "127.0.0.1");
    assert_eq!(
        seen.one("x-forwarded-client-cert"),
        expected_gateway_xfcc(&mesh.client_leaf)
    );
}

/// An HTTP/1.0 request without Host (as `openssl s_time -www` sends) still reaches the backend as a
/// valid HTTP/1.1 request: the listener gives it the backend's address as Host, as nginx does.
#[tokio::test(flavor = "multi_thread")]
async fn http10_request_without_host_gets_the_backend_address_as_host() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = Mesh::start().await;
    let config = tls::client_config(mesh.pki.root_pem(), Some(&mesh.client_leaf), &[]);
    let mut stream = tls::to_listener(mesh.listener_addr, config).await;
    stream
        .write_all(b"GET /ten HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    within("HTTP/1.0 response", stream.read_to_end(&mut raw))
        .await
        .ok();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.0 200"), "{raw}");
    let seen = mesh.backend.only_request();
    assert_eq!(seen.target, "/ten");
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.headers["host"], mesh.backend.addr.to_string().as_str());
}

/// Both sidecars on the IPv6 loopback: `listen = "[::1]:port"` on each side, the client's upstream as
/// `"[::1]:port"`, and the listener's X-Forwarded-For naming the client by its IPv6 address. The
/// listener's certificate is still checked by its DNS name. Skipped, saying so, on a machine without
/// an IPv6 loopback.
#[tokio::test(flavor = "multi_thread")]
async fn whole_hop_over_the_ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback (::1) on this machine");
        return;
    }
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("listen", "[::1]:0");
        s.client.set_str("listen", "[::1]:0");
    })
    .await;
    assert!(mesh.listener_addr.is_ipv6(), "{}", mesh.listener_addr);
    assert!(mesh.client_addr.is_ipv6(), "{}", mesh.client_addr);
    let req = Request::get("/v6")
        .header("host", SERVICE_HOST)
        .header("x-forwarded-for", "2001:db8::7")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let reply = within("request over ::1", send_h1(mesh.client_addr, req)).await;
    assert_hello(&reply);
    let seen = mesh.backend.only_request();
    assert_eq!(seen.one("host"), SERVICE_HOST);
    assert_eq!(seen.one("x-forwarded-for"), "2001:db8::7, ::1");
    assert_eq!(
        seen.one("x-forwarded-client-cert"),
        expected_gateway_xfcc(&mesh.client_leaf)
    );
}
