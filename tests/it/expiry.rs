//! The client keeps mesh connections warm, but never past the listener certificate they were opened
//! with: a connection whose listener certificate is near its end is retired from the pool.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::support::http::{get, send_h1, Reply};
use crate::support::mesh::{toml_str, Mesh};
use crate::support_ops::eventually;

/// A TCP relay in front of the listener that counts the connections the client opens.
struct CountingRelay {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Connections the client has closed.
    closed: Arc<AtomicUsize>,
}

impl CountingRelay {
    async fn start() -> (CountingRelay, tokio::sync::oneshot::Sender<SocketAddr>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (target_tx, target_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
        let closed = Arc::new(AtomicUsize::new(0));
        let (count, ended) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            let Ok(target) = target_rx.await else { return };
            while let Ok((mut inbound, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let ended = ended.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (
            CountingRelay {
                addr,
                accepted,
                closed,
            },
            target_tx,
        )
    }
}

/// A mesh whose client reaches the listener through a relay counting connections; the mesh link is
/// HTTP/2 (the client's shared connection) or HTTP/1.1 (hyper-util's pool).
async fn mesh_through_relay(
    listener_cert_left: Option<Duration>,
    http2: bool,
    pool_idle_timeout: Option<&str>,
) -> (Mesh, CountingRelay) {
    let (relay, target) = CountingRelay::start().await;
    let relay_addr = relay.addr;
    let mesh = Mesh::start_with(|setup| {
        if let Some(left) = listener_cert_left {
            setup.listener_leaf = setup.pki.listener_cert_expiring_in(left);
        }
        setup
            .client
            .set(
                "upstreams",
                format!("[{}]", toml_str(&relay_addr.to_string())),
            )
            .set("upstream_http2", http2.to_string());
        if let Some(idle) = pool_idle_timeout {
            setup.client.set_str("pool_idle_timeout", idle);
        }
    })
    .await;
    target.send(mesh.listener_addr).unwrap();
    (mesh, relay)
}

async fn sequential_requests(mesh: &Mesh, n: usize) {
    for i in 0..n {
        let reply = send_h1(mesh.client_addr, get(&format!("/seq/{i}"))).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.body);
        assert_eq!(reply.mesh_error(), None);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reuses_pooled_connections_to_a_long_lived_listener_certificate() {
    for http2 in [true, false] {
        let (mesh, relay) = mesh_through_relay(None, http2, None).await;
        sequential_requests(&mesh, 6).await;
        assert_eq!(
            relay.accepted.load(Ordering::SeqCst),
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
                let closed = relay.closed.load(Ordering::SeqCst);
                async move { (closed == 1).then_some(()) }
            },
        )
        .await;
        sequential_requests(&mesh, 1).await;
        assert_eq!(relay.accepted.load(Ordering::SeqCst), 2, "http2 {http2}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn retires_connections_whose_listener_certificate_is_about_to_expire() {
    // Valid for 100 s more: inside pool_idle_timeout (90 s) + 30 s of its end, so no connection may
    // stay pooled; each request after the first finds its connection retired and dials afresh.
    for http2 in [true, false] {
        let (mesh, relay) = mesh_through_relay(Some(Duration::from_secs(100)), http2, None).await;
        sequential_requests(&mesh, 6).await;
        let opened = relay.accepted.load(Ordering::SeqCst);
        assert!(
            opened >= 5,
            "http2 {http2}: connections near the listener certificate's expiry must not be reused; \
             {opened} opened for 6 requests"
        );
    }
}

/// Which certificate [`served_then_expired`] lets run out.
enum Expiring {
    Listener,
    Client,
}

/// A mesh in which `which` certificate expires 10 s after it is issued (long enough to start and serve
/// one request even on a loaded machine), every request dialling afresh (the pool retires connections
/// this close to a certificate's end). Serves `/before-expiry`, waits until the certificate has
/// expired and returns the answer to `/after-expiry`, after checking the backend saw only the first.
async fn served_then_expired(which: Expiring) -> (Mesh, Reply) {
    let life = Duration::from_secs(10);
    let mut expired_at = None;
    let mesh = Mesh::start_with(|setup| {
        match which {
            Expiring::Listener => setup.listener_leaf = setup.pki.listener_cert_expiring_in(life),
            Expiring::Client => setup.client_leaf = setup.pki.client_cert_expiring_in(life),
        }
        expired_at = Some(tokio::time::Instant::now() + life);
        setup.client.set_str("pool_idle_timeout", "100ms");
    })
    .await;
    let reply = send_h1(mesh.client_addr, get("/before-expiry")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let expired_at = expired_at.expect("the setup hook ran");
    tokio::time::sleep_until(expired_at + Duration::from_secs(2)).await;
    let reply = send_h1(mesh.client_addr, get("/after-expiry")).await;
    let seen: Vec<String> = mesh.backend.seen().into_iter().map(|r| r.target).collect();
    assert_eq!(seen, ["/before-expiry"]);
    (mesh, reply)
}

/// A TLS 1.3 ticket can outlive a short-lived listener certificate, and a resumed handshake shows no
/// certificate at all: the client must not go on resuming to a listener whose certificate has expired
/// since the session began, but handshake in full and report the expired certificate.
#[tokio::test(flavor = "multi_thread")]
async fn does_not_resume_to_a_listener_whose_certificate_has_expired() {
    let (mesh, reply) = served_then_expired(Expiring::Listener).await;
    reply.assert_mesh_error(
        502,
        "upstream-cert-invalid",
        &[&mesh.listener_addr.to_string(), "xpired"],
    );
}

/// The mirror of the case above: the client's own certificate expires while it runs (a broken renewal
/// hook). The listener would hang up on every (resumed) connection; the client must say why instead
/// of reporting a closed connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_whose_own_certificate_expired_says_so() {
    let (_mesh, reply) = served_then_expired(Expiring::Client).await;
    reply.assert_mesh_error(
        502,
        "client-cert-refused",
        &[
            "our certificate",
            "nginx-gateway-client",
            "expired",
            "renew",
        ],
    );
}
