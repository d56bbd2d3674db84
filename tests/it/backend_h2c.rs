//! `backend_http2 = true`: the listener carries requests to the backend on one shared HTTP/2
//! cleartext connection (prior knowledge), as Traefik's entrypoints accept. Covered here: requests
//! sharing the connection with their Host as `:authority`; what still goes over HTTP/1.1 (upgrades,
//! a Host that is no authority); a failed dial shared by the requests waiting on it; a request given
//! up on cancelled at the backend; bodies and trailers streaming both ways; a backend without h2c;
//! a connection closed or going away; and requests the backend turned away unprocessed (sent once
//! more if idempotent, never twice).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Request, StatusCode, Version};
use http_body_util::Empty;

use crate::support::backend::{Backend, HELLO};
use crate::support::http::{get, send_h1, send_h1_streaming, send_h2c, Reply, SERVICE_HOST};
use crate::support::mesh::Mesh;
use crate::support::pki::expected_gateway_xfcc;
use crate::support::stream::{drain_hashing, gated_body, pattern_sha256, TrailerBody};
use crate::support::{eventually, within};

async fn h2c_mesh() -> Mesh {
    Mesh::start_with(|s| {
        s.server.set("backend_http2", "true");
    })
    .await
}

/// A mesh whose listener sends to the backend at `addr` over h2c.
async fn h2c_mesh_to(addr: &str) -> Mesh {
    Mesh::start_with(|s| {
        s.server
            .set("backend_http2", "true")
            .set_str("backend", addr);
    })
    .await
}

fn assert_hello(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
    assert_eq!(reply.body, HELLO, "{reply:#?}");
    assert_eq!(reply.mesh_error(), None, "{reply:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_share_one_h2c_connection_with_the_host_as_authority() {
    let mesh = h2c_mesh().await;
    let host = "grafana.internal.thinkheads.ai:8443";
    // Sixteen at once, each on its own connection to the client sidecar.
    let sends = (0..16).map(|i| {
        let req = Request::get(format!("/api/{i}?q=a%20b"))
            .header("host", host)
            .header("x-forwarded-client-cert", "By=spoofed;URI=spiffe://evil")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        send_h1(mesh.client_addr, req)
    });
    let replies = within("16 requests", futures_join_all(sends)).await;
    replies.iter().for_each(assert_hello);

    let seen = mesh.backend.seen();
    assert_eq!(seen.len(), 16, "{seen:#?}");
    let xfcc = expected_gateway_xfcc(&mesh.client_leaf);
    for s in &seen {
        assert_eq!(s.version, Version::HTTP_2, "{s:#?}");
        assert_eq!(s.authority.as_deref(), Some(host), "{s:#?}");
        assert!(s.all("host").is_empty(), "Host beside :authority: {s:#?}");
        assert!(
            s.target.starts_with("/api/") && s.target.ends_with("?q=a%20b"),
            "{s:#?}"
        );
        assert_eq!(
            s.one("x-forwarded-client-cert"),
            xfcc,
            "forged identity kept: {s:#?}"
        );
        assert_eq!(s.one("x-forwarded-for"), "127.0.0.1", "{s:#?}");
    }
    assert_eq!(
        mesh.backend.connections(),
        1,
        "16 requests should share one h2c connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_still_goes_over_http1() {
    let mesh = h2c_mesh().await;
    assert_hello(&within("plain request", send_h1(mesh.client_addr, get("/plain"))).await);
    let req = Request::get("/chat")
        .header("host", SERVICE_HOST)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    // The test backend does not upgrade: it answers 200, which comes back as it is.
    assert_hello(&within("upgrade request", send_h1(mesh.client_addr, req)).await);
    let seen = mesh.backend.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(seen[0].version, Version::HTTP_2, "{:#?}", seen[0]);
    assert_eq!(seen[1].version, Version::HTTP_11, "{:#?}", seen[1]);
    assert_eq!(seen[1].one("upgrade"), "websocket");
    assert_eq!(seen[1].one("host"), SERVICE_HOST);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_host_goes_over_http1_untouched_and_an_invalid_one_is_refused() {
    let mesh = h2c_mesh().await;
    for host in ["not a host", "user@whoami.internal.thinkheads.ai"] {
        let req = Request::get("/odd-host")
            .header("host", host)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let reply = within("request", send_h1(mesh.client_addr, req)).await;
        reply.assert_mesh_error(400, "bad-request", &["Host", "RFC 9112"]);
    }
    // An empty Host is valid (a target without an authority) but no :authority.
    let req = Request::get("/empty-host")
        .header("host", "")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_hello(&within("request", send_h1(mesh.client_addr, req)).await);
    let seen = mesh.backend.only_request();
    assert_eq!(seen.version, Version::HTTP_11, "{seen:#?}");
    assert_eq!(seen.one("host"), "");
}

/// A backend whose accept queue is full drops new connections' SYNs, so each connect waits out
/// `backend_connect_timeout`. Requests that queued behind the one dial share its failure: one second,
/// not one second each in turn (which would take the third past `backend_timeout`, a 504).
#[tokio::test(flavor = "multi_thread")]
async fn requests_waiting_on_a_dial_that_fails_share_its_failure() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(1).unwrap();
    let addr = full.local_addr().unwrap();
    let mut queued = Vec::new();
    loop {
        match tokio::time::timeout(
            std::time::Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => queued.push(stream),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                eprintln!("skipped: this kernel refuses connections to a full accept queue (net.ipv4.tcp_abort_on_overflow = 1)");
                return;
            }
            Ok(Err(e)) => panic!("filling the accept queue: {e}"),
            Err(_) => break,
        }
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    let mesh = Mesh::start_with(|s| {
        s.server
            .set("backend_http2", "true")
            .set_str("backend", &addr.to_string())
            .set_str("backend_connect_timeout", "1s")
            .set_str("backend_timeout", "2500ms");
    })
    .await;
    let sends = (0..4).map(|i| send_h1(mesh.client_addr, get(&format!("/{i}"))));
    for reply in within("4 requests", futures_join_all(sends)).await {
        reply.assert_mesh_error(
            502,
            "backend-unreachable",
            &[
                &addr.to_string(),
                "no TCP connection within 1s (backend_connect_timeout)",
            ],
        );
    }
    drop(full);
}

/// A request the client gives up on (`upstream_timeout`) is cancelled on the h2c stream to the
/// backend too, not left running until `backend_timeout` (60 s, beyond this test).
#[tokio::test(flavor = "multi_thread")]
async fn a_request_given_up_on_is_cancelled_at_the_backend() {
    let mesh = Mesh::start_with(|s| {
        s.server.set("backend_http2", "true");
        s.client.set_str("upstream_timeout", "500ms");
    })
    .await;
    let reply = within("request to /slow", send_h1(mesh.client_addr, get("/slow"))).await;
    reply.assert_mesh_error(504, "upstream-timeout", &["upstream_timeout"]);
    eventually("the backend's request to be dropped", || async {
        (mesh.backend.abandoned() > 0).then_some(())
    })
    .await;
    assert_hello(&within("request after", send_h1(mesh.client_addr, get("/after"))).await);
    assert_eq!(
        mesh.backend.connections(),
        1,
        "the h2c connection survives a cancelled stream"
    );
}

/// Bodies stream both ways over h2c under its flow control: each side pauses half-way until the
/// other has read some, so a hop that buffered a whole body would never finish.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_and_a_download_stream_over_h2c() {
    const UP: u64 = 8 * 1024 * 1024;
    const DOWN: u64 = 20_000_000;
    let mesh = h2c_mesh().await;
    let req = Request::post("/upload")
        .header("host", SERVICE_HOST)
        .body(gated_body(UP, mesh.backend.upload_progress()))
        .unwrap();
    let reply = within("8 MiB upload over h2c", send_h1(mesh.client_addr, req)).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
    assert_eq!(reply.body, format!("{UP} {}", pattern_sha256(UP)));

    let response = within(
        "download headers",
        send_h1_streaming(mesh.client_addr, get(&format!("/download?bytes={DOWN}"))),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (len, sha, _) = within(
        "20 MB download over h2c",
        drain_hashing(response.into_body(), mesh.backend.download_progress()),
    )
    .await;
    assert_eq!((len, sha), (DOWN, pattern_sha256(DOWN)));
    let seen = mesh.backend.seen();
    assert!(
        seen.iter().all(|s| s.version == Version::HTTP_2),
        "{seen:#?}"
    );
    assert_eq!(mesh.backend.connections(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_without_h2c_gets_a_502_that_names_the_protocol() {
    let http1_only = Backend::start_http1_only().await;
    let addr = http1_only.addr.to_string();
    let mesh = h2c_mesh_to(&addr).await;
    let reply = within("request", send_h1(mesh.client_addr, get("/x"))).await;
    reply.assert_mesh_error(
        502,
        "backend-error",
        &[
            "phoenix-mesh listener",
            &addr,
            "over HTTP/2 cleartext (backend_http2 = true; does it accept h2c?)",
        ],
    );
    assert!(http1_only.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_the_backend_closed_is_dialled_again() {
    let mesh = h2c_mesh().await;
    assert_hello(&within("first request", send_h1(mesh.client_addr, get("/1"))).await);
    assert_eq!(mesh.backend.connections(), 1);
    // GOAWAY, then the backend closes: the next requests need a new connection.
    mesh.backend.close_connections();
    eventually("the backend's connection closed", || async {
        (mesh.backend.open_connections() == 0).then_some(())
    })
    .await;
    // Let the listener read the GOAWAY and the close as well: a request crossing them on the wire is
    // the documented race (502), not what this test is about.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    for i in 2..5 {
        let reply = within(
            "request after the close",
            send_h1(mesh.client_addr, get(&format!("/{i}"))),
        )
        .await;
        assert_hello(&reply);
    }
    assert_eq!(mesh.backend.connections(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_going_away_takes_no_new_requests() {
    let mesh = h2c_mesh().await;
    // A request still in progress keeps the connection open after the backend's GOAWAY.
    let client = mesh.client_addr;
    let slow = tokio::spawn(async move { send_h1(client, get("/delay/1500")).await });
    eventually("the slow request at the backend", || async {
        (!mesh.backend.seen().is_empty()).then_some(())
    })
    .await;
    mesh.backend.close_connections();
    // Let the listener read the GOAWAY (a request crossing it on the wire is the documented race).
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        mesh.backend.open_connections(),
        1,
        "the GOAWAY'd connection closed early"
    );
    // The connection is open but going away: this request must go on a new one.
    assert_hello(
        &within(
            "request after the GOAWAY",
            send_h1(mesh.client_addr, get("/2")),
        )
        .await,
    );
    assert_eq!(mesh.backend.connections(), 2);
    assert_hello(&within("the slow request", slow).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn trailers_cross_the_h2c_hop_both_ways() {
    // As gRPC travels: nginx's grpc_pass speaks h2c to the client sidecar, the body ends in trailers,
    // and the status comes back in the response's trailers.
    let mesh = h2c_mesh().await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "c0ffee".parse().unwrap());
    let req = Request::post("/trailers")
        .header("host", SERVICE_HOST)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(TrailerBody::new("ping", trailers))
        .unwrap();
    let reply = within("request with trailers", send_h2c(mesh.client_addr, req)).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
    assert_eq!(reply.body, "ping", "{reply:#?}");
    assert_eq!(
        reply.trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "the response's trailers were lost: {reply:#?}"
    );
    assert_eq!(
        reply
            .trailers
            .get("x-echo-x-checksum")
            .map(|v| v.as_bytes()),
        Some(&b"c0ffee"[..]),
        "the request's trailers did not reach the backend: {reply:#?}"
    );
    let seen = &mesh.backend.seen()[0];
    assert_eq!(seen.version, Version::HTTP_2);
    // gRPC clients say they take trailers, and some gRPC servers insist on hearing it.
    assert_eq!(
        seen.headers.get("te").map(|v| v.as_bytes()),
        Some(&b"trailers"[..])
    );
}

/// How [`turning_away_backend`] turns its first request away.
#[derive(Clone, Copy)]
enum TurnAway {
    /// `GOAWAY(last stream 0, NO_ERROR)`, as a backend does whose GOAWAY (nginx's after
    /// `keepalive_requests`, Traefik's on shutdown) crossed a request on the wire.
    GoAway,
    /// `RST_STREAM(REFUSED_STREAM)`, the connection staying open.
    Refuse,
    /// `RST_STREAM(REFUSED_STREAM)` for every request, as a backend over its stream limit.
    RefuseAll,
}

/// A raw HTTP/2 backend that turns the first request of its first connection away unprocessed (every
/// request with [`TurnAway::RefuseAll`]), and answers every other `200 hello`. Counts connections, and
/// requests answered and turned away.
async fn turning_away_backend(how: TurnAway) -> (std::net::SocketAddr, Arc<AtomicUsize>, Counts) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counts = Counts::default();
    let (conns, counted) = (connections.clone(), counts.clone());
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut first = conns.fetch_add(1, Ordering::SeqCst) == 0;
            let counted = counted.clone();
            tokio::spawn(async move {
                let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
                    let len = payload.len() as u32;
                    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
                    f.extend_from_slice(&stream.to_be_bytes());
                    f.extend_from_slice(payload);
                    f
                };
                let mut preface = [0u8; 24];
                if tcp.read_exact(&mut preface).await.is_err() {
                    return;
                }
                tcp.write_all(&frame(4, 0, 0, &[])).await.unwrap();
                loop {
                    let mut head = [0u8; 9];
                    if tcp.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = (usize::from(head[0]) << 16)
                        | (usize::from(head[1]) << 8)
                        | usize::from(head[2]);
                    let mut payload = vec![0u8; len];
                    if tcp.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    match head[3] {
                        // SETTINGS, not an ACK: acknowledge.
                        4 if head[4] & 1 == 0 => tcp.write_all(&frame(4, 1, 0, &[])).await.unwrap(),
                        // HEADERS: turn it away, or answer `:status 200` (static table index 8).
                        1 if first || matches!(how, TurnAway::RefuseAll) => {
                            let turn_away = match how {
                                TurnAway::GoAway => frame(7, 0, 0, &[0; 8]),
                                TurnAway::Refuse | TurnAway::RefuseAll => {
                                    frame(3, 0, stream, &7u32.to_be_bytes())
                                }
                            };
                            tcp.write_all(&turn_away).await.unwrap();
                            counted.turned_away.fetch_add(1, Ordering::SeqCst);
                            first = false;
                        }
                        1 => {
                            tcp.write_all(&frame(1, 4, stream, &[0x88])).await.unwrap();
                            tcp.write_all(&frame(0, 1, stream, b"hello\n"))
                                .await
                                .unwrap();
                            counted.answered.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    (addr, connections, counts)
}

/// What [`turning_away_backend`] did with the requests it saw.
#[derive(Clone, Default)]
struct Counts {
    answered: Arc<AtomicUsize>,
    turned_away: Arc<AtomicUsize>,
}

/// A GET the backend turns away `how` is answered after one more try, on `connections` connections.
async fn turned_away_get_goes_again(how: TurnAway, connections_used: usize) {
    let (addr, connections, counts) = turning_away_backend(how).await;
    let mesh = h2c_mesh_to(&addr.to_string()).await;
    let reply = within("GET turned away once", send_h1(mesh.client_addr, get("/"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
    assert_eq!(reply.body, "hello\n");
    assert_eq!(connections.load(Ordering::SeqCst), connections_used);
    assert_eq!(counts.answered.load(Ordering::SeqCst), 1);
    assert_eq!(counts.turned_away.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_backend_turned_away_unprocessed_goes_again() {
    // After a GOAWAY, on a fresh connection.
    turned_away_get_goes_again(TurnAway::GoAway, 2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_stream_goes_again_on_the_same_connection() {
    // A refused stream says nothing about the connection: it stays in use.
    turned_away_get_goes_again(TurnAway::Refuse, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_turned_away_is_not_sent_again() {
    // h2 cannot tell a stream refused by the GOAWAY from one cut off later, when the backend may have
    // acted on it: a request that is not idempotent gets 502 rather than a second go.
    let (addr, connections, counts) = turning_away_backend(TurnAway::GoAway).await;
    let mesh = h2c_mesh_to(&addr.to_string()).await;
    let req = Request::post("/orders")
        .header("host", SERVICE_HOST)
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let reply = within("POST turned away", send_h1(mesh.client_addr, req)).await;
    reply.assert_mesh_error(
        502,
        "backend-error",
        &[
            "phoenix-mesh listener",
            "turned the request away without processing it",
            "a POST request is not sent again",
        ],
    );
    assert!(!reply.body.contains("does it accept h2c"), "{reply:#?}");
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    assert_eq!(counts.answered.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_get_turned_away_twice_gets_502_naming_both_tries() {
    // A backend refusing every stream (over its stream limit, or shutting down): the GET goes once
    // more, not over and over, and the 502 says it was turned away twice, not that h2c may be wrong.
    let (addr, connections, counts) = turning_away_backend(TurnAway::RefuseAll).await;
    let mesh = h2c_mesh_to(&addr.to_string()).await;
    let reply = within("GET refused twice", send_h1(mesh.client_addr, get("/"))).await;
    reply.assert_mesh_error(
        502,
        "backend-error",
        &[
            "phoenix-mesh listener",
            "turned the request away without processing it, twice",
            "the GET request went once more",
        ],
    );
    assert!(!reply.body.contains("does it accept h2c"), "{reply:#?}");
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    assert_eq!(counts.turned_away.load(Ordering::SeqCst), 2);
    assert_eq!(counts.answered.load(Ordering::SeqCst), 0);
}

/// Runs every future as a task at once and collects their outputs in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
