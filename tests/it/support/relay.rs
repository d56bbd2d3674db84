//! A TCP relay in front of the mesh listener that counts the connections the client sidecar opens
//! and closes, and notes when each opened and closed: how the pooling tests see reuse, idling out
//! and retirement from outside.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::http::{get, send_h1};
use super::mesh::{Mesh, Upstream};

/// Counts of the connections relayed so far.
pub struct CountingRelay {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    spans: Arc<Mutex<Vec<Span>>>,
}

/// When one relayed connection opened and, once it has, closed (wall clock, as certificates count).
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub opened: SystemTime,
    pub closed: Option<SystemTime>,
}

impl CountingRelay {
    /// A relay that starts forwarding once it is told where to (`target`).
    pub async fn start() -> (CountingRelay, oneshot::Sender<SocketAddr>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (target_tx, target_rx) = oneshot::channel::<SocketAddr>();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let (count, ended, noted) = (accepted.clone(), closed.clone(), spans.clone());
        tokio::spawn(async move {
            let Ok(target) = target_rx.await else { return };
            while let Ok((mut inbound, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let ended = ended.clone();
                let noted = noted.clone();
                let i = {
                    let mut spans = noted.lock().unwrap();
                    spans.push(Span {
                        opened: SystemTime::now(),
                        closed: None,
                    });
                    spans.len() - 1
                };
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    noted.lock().unwrap()[i].closed = Some(SystemTime::now());
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (
            CountingRelay {
                addr,
                accepted,
                closed,
                spans,
            },
            target_tx,
        )
    }

    /// Connections the client has opened.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections the client has closed.
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    /// When each connection opened and closed, in the order they opened.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

/// A mesh whose client reaches the listener through a [`CountingRelay`]; the mesh link is HTTP/2
/// (the client's shared connection) or HTTP/1.1 (its pool). `listener_cert_left` shortens the
/// listener certificate's life; `pool_idle_timeout` sets the client's.
pub async fn mesh_through_relay(
    listener_cert_left: Option<Duration>,
    http2: bool,
    pool_idle_timeout: Option<&str>,
) -> (Mesh, CountingRelay) {
    let (relay, target) = CountingRelay::start().await;
    let relay_addr = relay.addr;
    let mesh = Mesh::start_with(|setup| {
        if let Some(left) = listener_cert_left {
            let leaf = setup.pki.listener_cert_expiring_in(left);
            setup.use_listener_cert(leaf);
        }
        setup.upstreams = vec![Upstream::At(relay_addr)];
        setup.client.set("upstream_http2", http2.to_string());
        if let Some(idle) = pool_idle_timeout {
            setup.client.set_str("pool_idle_timeout", idle);
        }
    })
    .await;
    target.send(mesh.listener_addr).unwrap();
    (mesh, relay)
}

/// Sends `n` requests through the client sidecar one after another; each must be answered 200 by
/// the backend.
pub async fn sequential_requests(mesh: &Mesh, n: usize) {
    for i in 0..n {
        let reply = send_h1(mesh.client_addr, get(&format!("/seq/{i}"))).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.body);
        assert_eq!(reply.mesh_error(), None);
    }
}
