//! Each hop's next hop in trouble: the client sidecar's upstreams (mesh listeners) down, slow,
//! plaintext, silent, presenting the wrong certificate, declining HTTP/2 or going away, and the
//! listener's backend down or slow. Each error a sidecar makes itself has its status, its
//! `phoenix-mesh-error` code and a body naming the hop and the cause; a failing upstream is skipped
//! (failover) and, after three failed dials, ejected; pooled mesh connections are reused and closed
//! when idle.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use phoenix_mesh_certs::pki::Leaf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::admin::{admin_get, metric};
use crate::support::backend::{Backend, HELLO};
use crate::support::http::{get, send_h1, SERVICE_HOST};
use crate::support::mesh::{Mesh, Upstream};
use crate::support::raw::{
    expect_eof, head_value, read_response, read_until_closed_or_quiet, status_of,
};
use crate::support::relay::{mesh_through_relay, sequential_requests};
use crate::support::{closed_port_addr, eventually, within};

#[tokio::test(flavor = "multi_thread")]
async fn client_pointed_at_plaintext_port_gets_502_upstream_not_tls() {
    let mesh = Mesh::start_with(|s| {
        s.upstreams = vec![Upstream::At(s.backend_addr)];
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
        let leaf = s.pki.listener_cert_signed_by_other_ca();
        s.use_listener_cert(leaf);
        // The listener itself must still start: it trusts its own chain's root for its own check.
        s.listener_trusts(&format!("{}{}", s.pki.root_pem(), s.pki.other_root_pem()));
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

/// Starts a mesh whose client has `first` as its first upstream and the real listener second, with
/// `extra` client settings.
async fn mesh_with_bad_first_upstream(first: SocketAddr, extra: &[(&str, &str)]) -> Mesh {
    Mesh::start_with(|s| {
        s.upstreams = vec![Upstream::At(first), Upstream::Listener];
        for (k, v) in extra {
            s.client.set_str(k, v);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_first_upstream_fails_over_to_the_next() {
    let mesh = mesh_with_bad_first_upstream(closed_port_addr(), &[]).await;
    mesh.good_requests("refused-first", 6).await;
    assert_eq!(
        mesh.backend
            .targets_with_prefix("/good/refused-first/")
            .len(),
        6
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_first_upstream_fails_over_to_the_next() {
    // A plain-HTTP server where a mesh listener should be: it accepts TCP, then answers the
    // ClientHello with an HTTP 400.
    let plain = Backend::start().await;
    let mesh = mesh_with_bad_first_upstream(plain.addr, &[]).await;
    mesh.good_requests("plaintext-first", 6).await;
    assert_eq!(
        mesh.backend
            .targets_with_prefix("/good/plaintext-first/")
            .len(),
        6
    );
    assert!(plain.seen().is_empty(), "{:#?}", plain.seen());
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_first_upstream_times_out_handshake_and_fails_over() {
    // Accepts TCP and never says a word: only handshake_timeout gets the client past it.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    let acceptor = tokio::spawn(async move {
        while let Ok((s, _)) = silent.accept().await {
            keep.lock().await.push(s);
        }
    });
    let mesh = mesh_with_bad_first_upstream(silent_addr, &[("handshake_timeout", "500ms")]).await;
    mesh.good_requests("silent-first", 4).await;
    assert_eq!(
        mesh.backend
            .targets_with_prefix("/good/silent-first/")
            .len(),
        4
    );
    acceptor.abort();
}

fn dials(metrics: &str, upstream: &str, result: &str) -> f64 {
    metric(
        metrics,
        "phoenix_mesh_upstream_dials_total",
        &[("upstream", upstream), ("result", result)],
    )
    .unwrap_or(0.0)
}

async fn sequential_ok(addr: SocketAddr, tag: &str, n: usize) {
    for i in 0..n {
        // Longer than pool_idle_timeout, so every request dials afresh. Pacing, not an assertion.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reply = within("request", send_h1(addr, get(&format!("/{tag}/{i}")))).await;
        assert_eq!(reply.status, StatusCode::OK, "{tag} {i}: {reply:#?}");
        assert_eq!(reply.body, HELLO, "{tag} {i}: {reply:#?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_failing_three_dials_is_ejected_and_not_dialled_again() {
    let closed = closed_port_addr();
    let mesh = Mesh::start_with(|s| {
        s.upstreams = vec![Upstream::At(closed), Upstream::Listener];
        s.client
            .set_str("admin_listen", "127.0.0.1:0")
            .set_str("pool_idle_timeout", "1ms");
    })
    .await;
    let admin = mesh.client_admin.unwrap();
    let (closed_s, listener_s) = (closed.to_string(), mesh.listener_addr.to_string());

    sequential_ok(mesh.client_addr, "eject", 10).await;
    let (status, text) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let healthy = |upstream: &str| {
        metric(
            &text,
            "phoenix_mesh_upstream_healthy",
            &[("upstream", upstream)],
        )
    };
    assert_eq!(healthy(&closed_s), Some(0.0), "{text}");
    assert_ne!(healthy(&listener_s), Some(0.0), "{text}");
    assert_eq!(
        dials(&text, &closed_s, "upstream-unreachable"),
        3.0,
        "{text}"
    );
    assert_eq!(dials(&text, &closed_s, "ok"), 0.0, "{text}");
    let ok_before = dials(&text, &listener_s, "ok");
    assert!(ok_before >= 6.0, "expected a dial per request: {text}");

    sequential_ok(mesh.client_addr, "ejected", 10).await;
    let (_, text) = admin_get(admin, "/metrics").await;
    assert_eq!(
        dials(&text, &closed_s, "upstream-unreachable"),
        3.0,
        "the ejected upstream was dialled again within its 10 s ejection: {text}"
    );
    assert!(
        dials(&text, &listener_s, "ok") >= ok_before + 5.0,
        "the healthy upstream should have taken every dial: {text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_listener_answer_gets_504_upstream_timeout_and_the_backend_request_is_cancelled() {
    let mesh = Mesh::start_with(|s| {
        s.client.set_str("upstream_timeout", "500ms");
    })
    .await;
    let reply = within("request to /slow", send_h1(mesh.client_addr, get("/slow"))).await;
    reply.assert_mesh_error(504, "upstream-timeout", &["upstream_timeout"]);
    assert_eq!(
        mesh.backend.targets_with_prefix("/slow").len(),
        1,
        "not retried"
    );
    // The listener's own backend_timeout stays at its default (60 s), far beyond this test: only the
    // client resetting the HTTP/2 stream makes the listener let go of the backend request.
    eventually("the backend's request to be dropped", || async {
        (mesh.backend.abandoned() > 0).then_some(())
    })
    .await;
    mesh.good_requests("after-timeout", 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_turned_down_by_a_closing_mesh_connection_goes_out_on_a_fresh_one() {
    let mut mesh = Mesh::start().await;
    // A request in flight keeps the shared connection open through the listener's GOAWAY.
    let in_flight = tokio::spawn(send_h1(mesh.client_addr, get("/delay/1500")));
    eventually("the backend taking the slow request", || async {
        (!mesh.backend.targets_with_prefix("/delay/").is_empty()).then_some(())
    })
    .await;
    let drained = mesh.replace_listener().await;
    // Let the GOAWAY reach the client; the old connection stays open for the request in flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reply = within(
        "a request after the GOAWAY",
        send_h1(mesh.client_addr, get("/after-goaway")),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
    assert_eq!(reply.mesh_error(), None, "{reply:#?}");
    let finished = within("the request in flight", in_flight).await.unwrap();
    assert_eq!(finished.status, StatusCode::OK, "{finished:#?}");
    assert_eq!(finished.body, HELLO);
    drained.await;
}

/// Sends a keep-alive POST whose body is still on its way (its head and the first part only) on
/// `s`, expecting the mesh's own error `code`, and checks what follows: a sidecar that answers
/// without reading the body closes the connection after the answer (hyper drains no more than what
/// has arrived), so either the answer says `Connection: close` and the connection closes, or it does
/// not and the connection takes the next request once the body is done.
async fn error_answer_to_an_unread_post_says_whether_it_closes<S>(s: &mut S, code: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const BODY: usize = 256 * 1024;
    const SENT: usize = 16 * 1024;
    let head =
        format!("POST /upload HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nContent-Length: {BODY}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&[b'x'; SENT]).await.unwrap();
    s.flush().await.unwrap();
    let (head, body) = within("the error answer", read_response(s)).await;
    assert!(
        status_of(head.as_bytes()).is_some_and(|status| status >= 500),
        "{head}{body}"
    );
    assert_eq!(
        head_value(&head, "phoenix-mesh-error"),
        Some(code),
        "{head}{body}"
    );
    if head_value(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
        expect_eof("the connection after an answer saying close", s).await;
        return;
    }
    // Kept open, as the answer implies: the rest of the body, then the next request.
    let _ = s.write_all(&[b'x'; BODY - SENT]).await;
    let next = format!("GET /next HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n");
    let _ = s.write_all(next.as_bytes()).await;
    let _ = s.flush().await;
    let (got, _) = within(
        "the answer to the next request",
        read_until_closed_or_quiet(s, Duration::from_secs(5)),
    )
    .await;
    let got = String::from_utf8_lossy(&got);
    assert!(
        status_of(got.as_bytes()) == status_of(head.as_bytes())
            && head_value(&got, "phoenix-mesh-error") == Some(code),
        "the answer did not say `Connection: close`, yet the next request on the connection got \
         no answer of its own:\n{head}\nthen: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_error_answer_to_a_post_it_did_not_read_says_connection_close() {
    let mesh = Mesh::start_with(|s| {
        s.upstreams = vec![Upstream::At(closed_port_addr())];
    })
    .await;
    let mut s = TcpStream::connect(mesh.client_addr).await.unwrap();
    error_answer_to_an_unread_post_says_whether_it_closes(&mut s, "upstream-unreachable").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listener_error_answer_to_a_post_it_did_not_read_says_connection_close() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("backend", &closed_port_addr().to_string());
    })
    .await;
    // Straight to the listener over HTTP/1.1, as the client's HTTP/1.1 pool reaches it.
    let mut tls = mesh.gateway_tls().await;
    error_answer_to_an_unread_post_says_whether_it_closes(&mut tls, "backend-unreachable").await;
    // Through the client: the listener's answer, passed on, ends the client's reading of the body.
    let mut s = TcpStream::connect(mesh.client_addr).await.unwrap();
    error_answer_to_an_unread_post_says_whether_it_closes(&mut s, "backend-unreachable").await;
}

/// A TLS server on `listener` that speaks only HTTP/1.1 (ALPN `http/1.1`, no `h2`), answering every
/// request with `h1 only`, counting its connections: a mesh listener that declines HTTP/2.
fn serve_http1_only(listener: std::net::TcpListener, leaf: &Leaf) -> Arc<AtomicUsize> {
    let acceptor = crate::support::tls::http1_acceptor(leaf);
    listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"h1 only"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    accepted
}

/// A listener that declines HTTP/2 is still reached: the client falls back to pooled HTTP/1.1 for a
/// while instead of dialing (or failing) per request.
#[tokio::test(flavor = "multi_thread")]
async fn a_listener_that_declines_http2_is_reached_over_http1() {
    let mut http1_only = None;
    let mesh = Mesh::start_with(|s| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        s.upstreams = vec![Upstream::At(listener.local_addr().unwrap())];
        http1_only = Some((listener, s.pki.listener_cert()));
    })
    .await;
    // The client dials only for its first request, so serving from here on is in time.
    let (listener, leaf) = http1_only.unwrap();
    let accepted = serve_http1_only(listener, &leaf);
    for i in 0..3 {
        let reply = within(
            "a request to the HTTP/1.1-only listener",
            send_h1(mesh.client_addr, get(&format!("/h1/{i}"))),
        )
        .await;
        assert_eq!(reply.status, 200, "request {i}: {reply:#?}");
        assert_eq!(reply.body, "h1 only");
    }
    // The HTTP/2 attempt that learnt it, then one pooled HTTP/1.1 connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn reuses_pooled_connections_to_a_long_lived_listener_certificate() {
    for http2 in [true, false] {
        let (mesh, relay) = mesh_through_relay(None, http2, None).await;
        sequential_requests(&mesh, 6).await;
        assert_eq!(
            relay.accepted(),
            1,
            "http2 {http2}: six sequential requests should share one pooled mesh connection"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn closes_mesh_connections_idle_past_pool_idle_timeout() {
    for http2 in [true, false] {
        let (mesh, relay) = mesh_through_relay(None, http2, Some("300ms")).await;
        sequential_requests(&mesh, 1).await;
        // Closed without any further traffic, then a new one for the next request.
        eventually(
            &format!("http2 {http2}: the idle mesh connection closing"),
            || {
                let closed = relay.closed();
                async move { (closed == 1).then_some(()) }
            },
        )
        .await;
        sequential_requests(&mesh, 1).await;
        assert_eq!(relay.accepted(), 2, "http2 {http2}");
    }
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
