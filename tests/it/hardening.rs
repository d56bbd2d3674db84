//! Hostile and broken traffic (issue 6): silent and slow clients are closed by the timeouts, oversized
//! and malformed requests get clean errors on both hops, and a failing upstream is skipped without
//! failing the request. Each bad client runs beside real requests, which must keep succeeding.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::backend::HELLO;
use crate::support::http::{get, send_h1, SERVICE_HOST};
use crate::support::mesh::{toml_str, Mesh};
use crate::support::pki::LISTENER_NAME;
use crate::support::{closed_port_addr, tls, within};
use crate::support_ops::eventually;

/// How a raw connection ended while we read from it.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// The peer closed (FIN or reset).
    Closed,
    /// Still open, but nothing arrived for the quiet period.
    Quiet,
}

/// Reads until the peer closes or stays quiet for `quiet`; everything received comes back.
async fn read_until_closed_or_quiet<S: AsyncRead + Unpin>(
    s: &mut S,
    quiet: Duration,
) -> (Vec<u8>, Ending) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Ending::Closed),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, Ending::Quiet),
        }
    }
}

/// Reads until the peer closes the connection (an upper bound, not a timing assertion).
async fn expect_closed<S: AsyncRead + Unpin>(what: &str, s: &mut S) -> Vec<u8> {
    let (got, ending) = within(what, read_until_closed_or_quiet(s, Duration::from_secs(15))).await;
    assert_eq!(
        ending,
        Ending::Closed,
        "{what}: still open; received {:?}",
        String::from_utf8_lossy(&got)
    );
    got
}

/// Sends `n` fresh-connection requests through the client sidecar; each must reach the backend.
async fn good_requests(mesh: &Mesh, tag: &str, n: usize) {
    for i in 0..n {
        let target = format!("/good/{tag}/{i}");
        let reply = within("good request", send_h1(mesh.client_addr, get(&target))).await;
        assert_eq!(reply.status, StatusCode::OK, "{target}: {reply:#?}");
        assert_eq!(reply.body, HELLO, "{target}: {reply:#?}");
        assert_eq!(reply.mesh_error(), None, "{target}: {reply:#?}");
    }
}

/// Requests the backend saw whose path starts with `prefix`.
fn seen_with_prefix(mesh: &Mesh, prefix: &str) -> Vec<String> {
    mesh.backend
        .seen()
        .into_iter()
        .map(|s| s.target)
        .filter(|t| t.starts_with(prefix))
        .collect()
}

/// The status line's code of a raw HTTP/1.1 response.
fn status_of(raw: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(raw).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// How many HTTP/1.1 responses `raw` holds (status lines at the start of a message).
fn responses_in(raw: &[u8]) -> usize {
    String::from_utf8_lossy(raw).matches("HTTP/1.1 ").count()
}

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
    good_requests(&mesh, "silent", 5).await;
    for s in &mut silent {
        let got = expect_closed("silent TCP connection", s).await;
        assert!(got.is_empty(), "listener sent {got:?} to a silent client");
    }
    good_requests(&mesh, "after-silent", 2).await;
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

    good_requests(&mesh, "half-handshake", 5).await;
    let got = expect_closed("half-finished handshake", &mut tcp).await;
    assert_eq!(
        got.first(),
        Some(&0x16),
        "the listener should have sent its ServerHello"
    );
    good_requests(&mesh, "after-half-handshake", 2).await;
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
        good_requests(&mesh, "after-garbage", 2).await;
    }
    assert!(seen_with_prefix(&mesh, "/good/").len() == 4);
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
    good_requests(&mesh, "slowloris", 5).await;
    let got = expect_closed("slowloris connection", &mut rd).await;
    drip.abort();
    if !got.is_empty() {
        assert_eq!(
            status_of(&got),
            Some(408),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert!(seen_with_prefix(&mesh, "/slowloris").is_empty());
    good_requests(&mesh, "after-slowloris", 2).await;
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
        good_requests(&mesh, "silent", 2).await;
        let got = expect_closed(what, &mut tcp).await;
        assert!(
            got.is_empty(),
            "{what}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    good_requests(&mesh, "after-silent", 2).await;
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
    good_requests(&mesh, "silent-h2", 2).await;
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
    good_requests(&mesh, "after-silent-h2", 2).await;
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
    good_requests(&mesh, "tls-slowloris", 5).await;
    let got = expect_closed("slowloris over TLS", &mut rd).await;
    drip.abort();
    if !got.is_empty() {
        assert_eq!(
            status_of(&got),
            Some(408),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert!(seen_with_prefix(&mesh, "/slowloris").is_empty());
}

fn oversized_head(target: &str) -> Vec<u8> {
    let filler = "a".repeat(12 * 1024);
    format!("GET {target} HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nX-Filler: {filler}\r\n\r\n")
        .into_bytes()
}

/// Sends `raw` and returns what came back before the connection closed or went quiet.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, raw: &[u8]) -> Vec<u8> {
    // The server may answer and close before reading everything; a failed write is fine then.
    let _ = s.write_all(raw).await;
    let _ = s.flush().await;
    within(
        "reading the answer",
        read_until_closed_or_quiet(s, Duration::from_secs(3)),
    )
    .await
    .0
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_request_head_gets_431_on_both_hops() {
    let mesh = Mesh::start_with(|s| {
        s.server.set("max_header_bytes", "8192");
        s.client.set("max_header_bytes", "8192");
    })
    .await;
    let mut tcp = TcpStream::connect(mesh.client_addr).await.unwrap();
    let got = exchange(&mut tcp, &oversized_head("/huge-client")).await;
    assert_eq!(
        status_of(&got),
        Some(431),
        "client port: {:?}",
        String::from_utf8_lossy(&got)
    );

    let mut tls = mesh.gateway_tls().await;
    let got = exchange(&mut tls, &oversized_head("/huge-listener")).await;
    assert_eq!(
        status_of(&got),
        Some(431),
        "listener: {:?}",
        String::from_utf8_lossy(&got)
    );

    assert!(seen_with_prefix(&mesh, "/huge").is_empty());
    // A head just under the limit still passes.
    let mut req = get("/big-but-fine");
    req.headers_mut()
        .insert("x-filler", "b".repeat(6000).parse().unwrap());
    let reply = within("large but allowed head", send_h1(mesh.client_addr, req)).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
}

/// Malformed requests, each with the path the backend must never see.
fn malformed_requests() -> Vec<(&'static str, Vec<u8>)> {
    let h = SERVICE_HOST;
    vec![
        ("bad request line", b"THIS IS NOT HTTP\r\n\r\n".to_vec()),
        (
            "control byte in a header value",
            format!("GET /bad-value HTTP/1.1\r\nHost: {h}\r\nX-Bad: a\x01b\r\n\r\n").into_bytes(),
        ),
        (
            "space in a header name",
            format!("GET /bad-name HTTP/1.1\r\nHost: {h}\r\nBad Header: x\r\n\r\n").into_bytes(),
        ),
        (
            "two different Content-Lengths",
            format!(
                "POST /two-lengths HTTP/1.1\r\nHost: {h}\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc"
            )
            .into_bytes(),
        ),
        (
            "obfuscated Transfer-Encoding",
            format!(
                "POST /te-obfuscated HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
        ),
    ]
}

/// CL.TE and TE.CL smuggling attempts: whatever the hop decides, `/smuggled` must never reach the
/// backend as a request of its own.
fn smuggling_requests() -> Vec<(&'static str, Vec<u8>)> {
    let h = SERVICE_HOST;
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {h}\r\n\r\n");
    vec![
        (
            "CL.TE",
            format!(
                "POST /front HTTP/1.1\r\nHost: {h}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
                5 + smuggled.len()
            )
            .into_bytes(),
        ),
        (
            "TE.CL",
            format!(
                "POST /front HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{smuggled}"
            )
            .into_bytes(),
        ),
    ]
}

async fn check_malformed<S, F, Fut>(mesh: &Mesh, hop: &str, connect: F)
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    for (what, raw) in malformed_requests() {
        let mut s = connect().await;
        let got = exchange(&mut s, &raw).await;
        if !got.is_empty() {
            assert_eq!(
                status_of(&got),
                Some(400),
                "{hop}, {what}: {:?}",
                String::from_utf8_lossy(&got)
            );
        }
        let (_, ending) = within(
            "after the 400",
            read_until_closed_or_quiet(&mut s, Duration::from_secs(3)),
        )
        .await;
        assert_eq!(
            ending,
            Ending::Closed,
            "{hop}, {what}: connection left open after a 400"
        );
    }
    for (what, raw) in smuggling_requests() {
        let mut s = connect().await;
        let got = exchange(&mut s, &raw).await;
        let status = status_of(&got);
        assert!(
            status.is_some() || got.is_empty(),
            "{hop}, {what}: {:?}",
            String::from_utf8_lossy(&got)
        );
        // Rejected outright, or at most the front request answered and then the connection closed
        // (RFC 9112 section 6.1: a server that processes such a request must close afterwards).
        assert!(
            responses_in(&got) <= 1,
            "{hop}, {what}: several responses: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    assert!(
        seen_with_prefix(mesh, "/smuggled").is_empty(),
        "{hop}: the backend saw a smuggled request: {:#?}",
        mesh.backend.seen()
    );
    for prefix in ["/bad-", "/two-lengths", "/te-obfuscated"] {
        assert!(
            seen_with_prefix(mesh, prefix).is_empty(),
            "{hop}: backend saw {prefix}"
        );
    }
    good_requests(mesh, &hop.replace(' ', "-"), 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_smuggling_requests_on_client_port_get_400_and_never_reach_backend() {
    let mesh = Mesh::start().await;
    let addr = mesh.client_addr;
    check_malformed(&mesh, "client port", || async move {
        TcpStream::connect(addr).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_smuggling_requests_over_tls_get_400_and_never_reach_backend() {
    let mesh = Mesh::start().await;
    let mesh_ref = &mesh;
    check_malformed(&mesh, "listener", || mesh_ref.gateway_tls()).await;
}

/// Starts a mesh whose client has `first` as its first upstream and the real listener second.
async fn mesh_with_bad_first_upstream(first: SocketAddr, extra: &[(&str, &str)]) -> Mesh {
    // The listener's port is chosen at start; so reserve it here and pin it in the server config.
    let listener_port = closed_port_addr();
    let upstreams = format!(
        "[{}, {}]",
        toml_str(&first.to_string()),
        toml_str(&listener_port.to_string())
    );
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mesh = Mesh::start_with(move |s| {
        s.server.set_str("listen", &listener_port.to_string());
        s.client.set("upstreams", upstreams);
        for (k, v) in &extra {
            s.client.set_str(k, v);
        }
    })
    .await;
    assert_eq!(mesh.listener_addr, listener_port);
    mesh
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_first_upstream_fails_over_to_the_next() {
    let mesh = mesh_with_bad_first_upstream(closed_port_addr(), &[]).await;
    good_requests(&mesh, "refused-first", 6).await;
    assert_eq!(seen_with_prefix(&mesh, "/good/refused-first/").len(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_first_upstream_fails_over_to_the_next() {
    // A plain-HTTP server where a mesh listener should be: it accepts TCP, then answers the
    // ClientHello with an HTTP 400.
    let plain = crate::support::backend::Backend::start().await;
    let mesh = mesh_with_bad_first_upstream(plain.addr, &[]).await;
    good_requests(&mesh, "plaintext-first", 6).await;
    assert_eq!(seen_with_prefix(&mesh, "/good/plaintext-first/").len(), 6);
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
    good_requests(&mesh, "silent-first", 4).await;
    assert_eq!(seen_with_prefix(&mesh, "/good/silent-first/").len(), 4);
    acceptor.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_listener_answer_gets_504_upstream_timeout_and_the_backend_request_is_cancelled() {
    let mesh = Mesh::start_with(|s| {
        s.client.set_str("upstream_timeout", "500ms");
    })
    .await;
    let reply = within("request to /slow", send_h1(mesh.client_addr, get("/slow"))).await;
    reply.assert_mesh_error(504, "upstream-timeout", &["upstream_timeout"]);
    assert_eq!(seen_with_prefix(&mesh, "/slow").len(), 1, "not retried");
    // The listener's own backend_timeout stays at its default (60 s), far beyond this test: only the
    // client resetting the HTTP/2 stream makes the listener let go of the backend request.
    eventually("the backend's request to be dropped", || async {
        (mesh.backend.abandoned() > 0).then_some(())
    })
    .await;
    good_requests(&mesh, "after-timeout", 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_turned_down_by_a_closing_mesh_connection_goes_out_on_a_fresh_one() {
    let mut mesh = Mesh::start().await;
    // A request in flight keeps the shared connection open through the listener's GOAWAY.
    let in_flight = tokio::spawn(send_h1(mesh.client_addr, get("/delay/1500")));
    eventually("the backend taking the slow request", || async {
        (!seen_with_prefix(&mesh, "/delay/").is_empty()).then_some(())
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
async fn client_cert_with_non_ascii_subject_is_forwarded_in_xfcc() {
    use phoenix_mesh_certs::pki::{LeafSpec, Pki, Usage};
    let pki = Pki::new("Umlaut Test").unwrap();
    let mut spec = LeafSpec::new("m\u{fc}ller-gateway", Duration::from_secs(86_400));
    spec.dns = vec!["muller.internal.thinkheads.ai".into()];
    spec.usage = Usage::Client;
    let leaf = pki.issue(&spec).unwrap();
    let root = pki.root_pem().to_owned();
    let mesh = Mesh::start_with(move |s| {
        s.client_leaf = leaf;
        // Both sides check the gateway chain against their `ca` at start-up.
        s.listener_ca_pem = format!("{}{root}", s.pki.root_pem());
        s.client_ca_pem = format!("{}{root}", s.pki.root_pem());
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
    use phoenix_mesh_certs::pki::{LeafSpec, Pki, Usage};
    let pki = Pki::new("Control Test").unwrap();
    let mut spec = LeafSpec::new("gate\u{1a}way", Duration::from_secs(86_400));
    spec.dns = vec!["gateway.internal.thinkheads.ai".into()];
    spec.usage = Usage::Client;
    let leaf = pki.issue(&spec).unwrap();
    let root = pki.root_pem().to_owned();
    let mesh = Mesh::start_with(move |s| {
        s.client_leaf = leaf;
        s.listener_ca_pem = format!("{}{root}", s.pki.root_pem());
        s.client_ca_pem = format!("{}{root}", s.pki.root_pem());
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
