//! Clients that hold a connection without finishing what they started are closed by the timeouts:
//! silent TCP, a ClientHello and then silence, garbage, slowloris on either port, a silent h2 peer
//! (`handshake_timeout`, `header_read_timeout`), and idle keep-alive connections, which the listener
//! parks between requests invisibly to the peer. Each bad client runs beside real requests, which
//! must keep succeeding. A response that stops moving half-way is cut off on both hops
//! (`backend_timeout`, `upstream_timeout`).

use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::support::admin::{admin_get, metric};
use crate::support::backend::HELLO;
use crate::support::http::{get, SERVICE_HOST};
use crate::support::mesh::Mesh;
use crate::support::pki::LISTENER_NAME;
use crate::support::raw::{
    expect_closed, expect_eof, head_value, raw_get, read_response, status_of,
};
use crate::support::{eventually, tls, within};

#[tokio::test(flavor = "multi_thread")]
async fn silent_tcp_connection_to_listener_is_closed_after_handshake_timeout() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("handshake_timeout", "500ms");
    })
    .await;
    let mut silent: Vec<TcpStream> = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(mesh.listener_addr).await.unwrap());
    }
    mesh.good_requests("silent", 5).await;
    for s in &mut silent {
        let got = expect_closed("silent TCP connection", s).await;
        assert!(got.is_empty(), "listener sent {got:?} to a silent client");
    }
    mesh.good_requests("after-silent", 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_hello_then_silence_is_closed_after_handshake_timeout() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("handshake_timeout", "500ms");
    })
    .await;
    // A real ClientHello from rustls, then nothing: the listener answers with its flight and waits
    // for our certificate, which never comes.
    let config = tls::client_config(mesh.pki.root_pem(), Some(&mesh.client_leaf), &[]);
    let mut conn =
        rustls::ClientConnection::new(config, ServerName::try_from(LISTENER_NAME).unwrap())
            .unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16, "not a TLS handshake record");
    let mut tcp = TcpStream::connect(mesh.listener_addr).await.unwrap();
    tcp.write_all(&hello).await.unwrap();

    mesh.good_requests("half-handshake", 5).await;
    let got = expect_closed("half-finished handshake", &mut tcp).await;
    assert_eq!(
        got.first(),
        Some(&0x16),
        "the listener should have sent its ServerHello"
    );
    mesh.good_requests("after-half-handshake", 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_instead_of_client_hello_is_closed_cleanly() {
    let mesh = Mesh::start().await;
    // Looks like a TLS handshake record, then nonsense; and pure binary noise.
    let mut fake_record = vec![0x16, 0x03, 0x01, 0x02, 0x00];
    fake_record.extend((0..512u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let noise: Vec<u8> = (0..2048u32)
        .map(|i| (i.wrapping_mul(40_503) >> 7) as u8 | 0x80)
        .collect();
    for garbage in [fake_record, noise] {
        let mut tcp = TcpStream::connect(mesh.listener_addr).await.unwrap();
        tcp.write_all(&garbage).await.unwrap();
        let got = expect_closed("garbage instead of a ClientHello", &mut tcp).await;
        // At most a TLS alert record, never an HTTP answer.
        assert!(
            got.is_empty() || got[0] == 0x15,
            "listener answered garbage with {:?}",
            String::from_utf8_lossy(&got)
        );
        mesh.good_requests("after-garbage", 2).await;
    }
    assert!(mesh.backend.targets_with_prefix("/good/").len() == 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_on_client_port_is_closed_after_header_read_timeout() {
    let mesh = Mesh::start_with(|s| {
        s.client.set_str("header_read_timeout", "500ms");
    })
    .await;
    let tcp = TcpStream::connect(mesh.client_addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    // A byte of header every 100 ms, for at most 30 s: the timer must not restart on each byte.
    let drip = tokio::spawn(async move {
        wr.write_all(format!("GET /slowloris HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n").as_bytes())
            .await?;
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            wr.write_all(b"X").await?;
        }
        Ok::<_, std::io::Error>(())
    });
    mesh.good_requests("slowloris", 5).await;
    let got = expect_closed("slowloris connection", &mut rd).await;
    drip.abort();
    assert_nothing_or_408(&got);
    assert!(mesh.backend.targets_with_prefix("/slowloris").is_empty());
    mesh.good_requests("after-slowloris", 2).await;
}

/// A connection to the client port that sends nothing, or stops inside what could be the HTTP/2
/// preface (before the sidecar can tell HTTP/1.1 from h2c), is closed after `header_read_timeout` like
/// one that stops inside a request head: otherwise any local process could hold every connection slot.
#[tokio::test(flavor = "multi_thread")]
async fn silent_connection_on_client_port_is_closed_after_header_read_timeout() {
    let mesh = Mesh::start_with(|s| {
        s.client.set_str("header_read_timeout", "500ms");
    })
    .await;
    for (what, first) in [
        ("a connection that sends nothing", &b""[..]),
        (
            "a connection that stops inside the h2 preface",
            &b"PRI * HTTP/2.0\r\n"[..],
        ),
    ] {
        let mut tcp = TcpStream::connect(mesh.client_addr).await.unwrap();
        tcp.write_all(first).await.unwrap();
        mesh.good_requests("silent", 2).await;
        let got = expect_closed(what, &mut tcp).await;
        assert!(
            got.is_empty(),
            "{what}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    mesh.good_requests("after-silent", 2).await;
}

/// On the listener, a peer that completes the handshake with ALPN `h2` and never sends the HTTP/2
/// preface is closed after `header_read_timeout`: hyper's HTTP/2 server waits for the preface with no
/// timer of its own, and its keep-alive pings start only after it.
#[tokio::test(flavor = "multi_thread")]
async fn silent_h2_peer_on_listener_is_closed_after_header_read_timeout() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("header_read_timeout", "500ms");
    })
    .await;
    let config = tls::client_config(mesh.pki.root_pem(), Some(&mesh.client_leaf), &[b"h2"]);
    let mut silent = tls::to_listener(mesh.listener_addr, config).await;
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    mesh.good_requests("silent-h2", 2).await;
    let got = expect_closed("an h2 peer that never sends the preface", &mut silent).await;
    // The listener's own SETTINGS (sent at once) and maybe a GOAWAY: no other frame.
    let mut rest = &got[..];
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        assert!(
            matches!(rest[3], 4 | 7),
            "frame type {} in {got:?}",
            rest[3]
        );
        rest = &rest[(9 + len).min(rest.len())..];
    }
    assert!(rest.is_empty(), "{got:?}");
    mesh.good_requests("after-silent-h2", 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_over_tls_on_listener_is_closed_after_header_read_timeout() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("header_read_timeout", "500ms");
    })
    .await;
    let tls = mesh.gateway_tls().await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let drip = tokio::spawn(async move {
        wr.write_all(format!("GET /slowloris HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n").as_bytes())
            .await?;
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            wr.write_all(b"X").await?;
            wr.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    });
    mesh.good_requests("tls-slowloris", 5).await;
    let got = expect_closed("slowloris over TLS", &mut rd).await;
    drip.abort();
    assert_nothing_or_408(&got);
    assert!(mesh.backend.targets_with_prefix("/slowloris").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connection_is_closed_after_header_read_timeout() {
    let mesh = Mesh::start_with(|s| {
        s.client.set_str("header_read_timeout", "500ms");
    })
    .await;
    let mut s = TcpStream::connect(mesh.client_addr).await.unwrap();
    let (head, body) = within("first request", raw_get(&mut s, "/once")).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(body, HELLO);
    assert!(
        !head_value(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")),
        "the sidecar closed after the response instead of keeping it alive: {head}"
    );
    expect_eof("idle keep-alive connection", &mut s).await;
    assert_eq!(mesh.backend.seen().len(), 1);
}

/// Between requests the listener parks an idle HTTP/1.1 connection without hyper's buffers (see
/// `phoenix_mesh_transport::http1_idle`). Parking must be invisible to the peer: a connection that sat idle
/// serves its next request, a request head that arrives in two pieces with a pause between is served
/// whole (not cut off as the end of the stream), a pipelined request that waits for the backend is not
/// taken for idleness, and a parked connection still closes after the idle timeout.
#[tokio::test(flavor = "multi_thread")]
async fn listener_parks_idle_keep_alive_connections_invisibly() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("header_read_timeout", "2s");
    })
    .await;
    let mut tls = mesh.gateway_tls().await;
    let idle = Duration::from_millis(300);
    // Idle before the first request, then between requests.
    for i in 0..3 {
        tokio::time::sleep(idle).await;
        let req = format!("GET /parked/{i} HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n");
        tls.write_all(req.as_bytes()).await.unwrap();
        let (head, body) = within("request after idling", read_response(&mut tls)).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "request {i}: {head}");
        assert_eq!(body, HELLO);
    }
    // A head in two pieces, 300 ms apart.
    tls.write_all(format!("GET /split HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n").as_bytes())
        .await
        .unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(idle).await;
    tls.write_all(b"X-Second-Half: yes\r\n\r\n").await.unwrap();
    let (head, body) = within("split request", read_response(&mut tls)).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "split request: {head}");
    assert_eq!(body, HELLO);
    // Two requests in one write: the second is served from hyper's buffer, with nothing more to read,
    // and must not be taken for idleness while it waits for the backend.
    tls.write_all(
        format!(
            "GET /pipelined/1 HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n\
             GET /delay/500 HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    for i in 1..=2 {
        let (head, body) = within("pipelined request", read_response(&mut tls)).await;
        assert!(
            head.starts_with("HTTP/1.1 200 "),
            "pipelined request {i}: {head}"
        );
        assert_eq!(body, HELLO);
    }
    let seen = mesh.backend.seen();
    let split = seen
        .iter()
        .find(|r| r.target == "/split")
        .unwrap_or_else(|| panic!("the split request never reached the backend: {seen:#?}"));
    assert_eq!(split.one("x-second-half"), "yes");
    assert_eq!(seen.len(), 6, "{seen:#?}");
    // Idle past header_read_timeout (2 s): closed.
    let started = Instant::now();
    expect_eof("idle parked connection", &mut tls).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}, before the idle timeout",
        started.elapsed()
    );
}

/// Shutdown closes a parked keep-alive connection at once (TLS close_notify, then FIN) instead of
/// holding the drain until the idle timeout.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_closes_a_parked_connection_at_once() {
    let mut mesh = Mesh::start_with(|s| {
        s.server.set_str("header_read_timeout", "600s");
    })
    .await;
    let mut tls = mesh.gateway_tls().await;
    let req = format!("GET /before-shutdown HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let (head, _) = within("request", read_response(&mut tls)).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The drain waits for every connection; a parked one that ignored shutdown would hold it for the
    // 600 s idle timeout and `within` would fail.
    mesh.stop_listener().await;
    let mut rest = Vec::new();
    let read = within("close after shutdown", tls.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "expected a clean TLS close, got {read:?}");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

/// A backend that sends its response head and two bytes, then nothing, holds the request on both hops
/// until the response is cut off: by the listener after `backend_timeout` without progress, or by the
/// client after `upstream_timeout`, whichever is shorter. nginx must see a broken response, never one
/// that looks complete: over HTTP/1.1 the connection closes before the last chunk, over HTTP/2 (h2c,
/// as `grpc_pass` speaks) the stream is reset. The backend's response is dropped (its connection
/// released), the request is counted as a `5xx` made by the sidecar that cut it off, and both
/// sidecars carry on.
#[tokio::test(flavor = "multi_thread")]
async fn a_response_that_stalls_mid_body_is_cut_off_on_both_hops() {
    for (cut_by, backend_timeout, upstream_timeout, mesh_link_http2) in [
        ("listener", "1s", "60s", true),
        ("listener", "1s", "60s", false),
        ("client", "60s", "1s", true),
    ] {
        let cut_by = format!("{cut_by} (upstream_http2 = {mesh_link_http2})");
        let mesh = Mesh::start_with(|s| {
            s.client.set("upstream_http2", mesh_link_http2.to_string());
            s.server.set_str("backend_timeout", backend_timeout);
            s.server.set_str("admin_listen", "127.0.0.1:0");
            s.client.set_str("upstream_timeout", upstream_timeout);
            s.client.set_str("admin_listen", "127.0.0.1:0");
        })
        .await;
        // HTTP/1.1, as proxy_pass speaks.
        let mut tcp = TcpStream::connect(mesh.client_addr).await.unwrap();
        tcp.write_all(format!("GET /stall HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let got = expect_closed("a stalled response over HTTP/1.1", &mut tcp).await;
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 200 "),
            "cut by the {cut_by}: {text:?}"
        );
        assert!(
            head_value(&text, "transfer-encoding") == Some("chunked"),
            "cut by the {cut_by}: {text:?}"
        );
        assert!(
            text.ends_with("\r\n\r\n2\r\nab\r\n"),
            "cut by the {cut_by}: the response must end before its last chunk: {text:?}"
        );
        eventually("the backend's stalled response released", || async {
            (mesh.backend.stalls_released() == 1).then_some(())
        })
        .await;

        // HTTP/2 cleartext, as grpc_pass speaks: the stream is reset, the connection lives on.
        let stream = TcpStream::connect(mesh.client_addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let response = within(
            "a stalled response's head over h2c",
            sender.send_request(get("/stall")),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 200, "cut by the {cut_by}");
        let mut body = response.into_body();
        let first = within("the first bytes", body.frame()).await;
        let first = first.map(|f| f.map(|f| f.into_data().unwrap_or_default()));
        assert!(
            matches!(&first, Some(Ok(data)) if data == &Bytes::from_static(b"ab")),
            "cut by the {cut_by}: {first:?}"
        );
        let rest = within("the cut-off over h2c", body.collect()).await;
        let reset = rest.as_ref().err().and_then(|e| {
            std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<h2::Error>())
                .and_then(h2::Error::reason)
        });
        assert!(
            reset.is_some(),
            "cut by the {cut_by}: the stream must be reset, not ended: {rest:?}"
        );
        let reply = within(
            "a request on the same h2c connection",
            sender.send_request(get("/after")),
        )
        .await
        .unwrap();
        assert_eq!(reply.status(), 200, "cut by the {cut_by}");
        eventually("the second stalled response released", || async {
            (mesh.backend.stalls_released() == 2).then_some(())
        })
        .await;

        // Counted as failures of the sidecar that cut them off.
        let admin = if backend_timeout == "1s" {
            mesh.listener_admin
        } else {
            mesh.client_admin
        };
        let (_, text) = admin_get(admin.unwrap(), "/metrics").await;
        let sidecar_5xx = metric(
            &text,
            "phoenix_mesh_http_requests_total",
            &[("status_class", "5xx"), ("made_by", "sidecar")],
        );
        assert_eq!(sidecar_5xx, Some(2.0), "cut by the {cut_by}: {text}");
        mesh.good_requests("after-stall", 2).await;
    }
}

/// What a connection closed for a slow request head may carry: nothing, or hyper's `408`.
fn assert_nothing_or_408(got: &[u8]) {
    if !got.is_empty() {
        assert_eq!(
            status_of(got),
            Some(408),
            "{:?}",
            String::from_utf8_lossy(got)
        );
    }
}
