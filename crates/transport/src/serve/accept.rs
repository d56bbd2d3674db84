//! The accept loop: new connections handed out with a slot each, at most `max_connections` open,
//! accept errors backed off and never fatal; and its variant for a listener whose connections must
//! authenticate first ([`accept_authenticating`]). A *pending handshake* there is a connection
//! accepted and not yet authenticated: it holds no `max_connections` slot, only a place in a bounded
//! set of its own, and the oldest is dropped when a new one needs the place.
//!
//! - NEVER: the accept loop waits because of connections that have not authenticated.
//! - ALWAYS: at most `max_pending` pending handshakes are open; a new connection past that drops the
//!   one accepted longest ago (a real client finishes in milliseconds, so the oldest is the one
//!   least likely to be one).
//! - ALWAYS: at most `max_connections` authenticated connections are open; at that limit the loop
//!   stops accepting until one closes, as [`accept_loop`] does.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::shutdown::ShutdownWatch;

/// A listening socket [`accept_loop`] can serve: TCP, or a unix socket (the client's side towards
/// nginx may be either).
pub trait Accept: Send {
    /// An accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Who connected, for logs.
    type Peer: std::fmt::Display + Send;
    /// The next connection, ready to use (TCP: with `TCP_NODELAY` set).
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    type Peer = SocketAddr;

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
}

/// A connection slot; the connection holds it until it closes.
pub type Slot = tokio::sync::OwnedSemaphorePermit;

/// Accepts on `listener` until shutdown, handing each connection to `on_conn` with its slot. At
/// `max_connections` open it stops accepting until one closes (new connections wait in the kernel's
/// backlog: back-pressure, not a crash). Accept errors (out of file descriptors, say) are logged and
/// backed off, never spun on and never fatal.
pub async fn accept_loop<L, F>(
    listener: L,
    max_connections: usize,
    shutdown: ShutdownWatch,
    mut on_conn: F,
) where
    L: Accept,
    F: FnMut(L::Stream, L::Peer, Slot),
{
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    run(
        listener,
        &slots,
        max_connections,
        true,
        shutdown,
        |stream, peer, slot| {
            if let Some(slot) = slot {
                on_conn(stream, peer, slot);
            }
        },
    )
    .await;
}

/// Like [`accept_loop`], for connections that must authenticate (a TLS handshake) before they count
/// against `max_connections`: each is handed to `on_conn` as a [`Pending`] handshake, which becomes
/// a [`Slot`] once it has authenticated. At most `max_pending` are pending at a time; past that,
/// the oldest is told to give up ([`Pending::dropped`]). The loop waits only while
/// `max_connections` authenticated connections are open.
pub async fn accept_authenticating<L, F>(
    listener: L,
    max_connections: usize,
    max_pending: usize,
    shutdown: ShutdownWatch,
    mut on_conn: F,
) where
    L: Accept,
    F: FnMut(L::Stream, L::Peer, Pending),
{
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let pending = Arc::new(PendingSet {
        max: max_pending.max(1),
        open: Mutex::new(Open::default()),
    });
    run(
        listener,
        &slots,
        max_connections,
        false,
        shutdown,
        |stream, peer, _| {
            on_conn(stream, peer, pending.register(&slots));
        },
    )
    .await;
}

/// The loop itself: waits for a free slot (taking it when `take_slot`), accepts, hands over.
async fn run<L, F>(
    listener: L,
    slots: &Arc<Semaphore>,
    max_connections: usize,
    take_slot: bool,
    mut shutdown: ShutdownWatch,
    mut hand: F,
) where
    L: Accept,
    F: FnMut(L::Stream, L::Peer, Option<Slot>),
{
    let mut backoff = Duration::from_millis(5);
    let mut warned_full = false;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if !warned_full {
                    warn!(
                        max_connections,
                        "connection limit reached; new connections wait until one closes"
                    );
                    warned_full = true;
                }
                tokio::select! {
                    biased;
                    () = shutdown.wait() => break,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                }
            }
        };
        // A connection that must authenticate first takes its slot only then.
        let slot = take_slot.then_some(slot);
        tokio::select! {
            biased;
            () = shutdown.wait() => break,
            accepted = Accept::accept(&listener) => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    if slots.available_permits() > 0 {
                        warned_full = false;
                    }
                    hand(stream, peer, slot);
                }
                Err(error) if is_per_connection(&error) => {
                    debug!(%error, "accept: connection failed before it was accepted");
                }
                Err(error) => {
                    warn!(%error, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// The pending handshakes of one [`accept_authenticating`] loop, oldest first.
struct PendingSet {
    max: usize,
    open: Mutex<Open>,
}

/// Each pending handshake by the order it was accepted in, with the sender whose drop tells it to
/// give up.
#[derive(Default)]
struct Open {
    next: u64,
    by_age: BTreeMap<u64, oneshot::Sender<()>>,
}

impl PendingSet {
    /// A new pending handshake; drops the oldest first when the set is full.
    fn register(self: &Arc<Self>, slots: &Arc<Semaphore>) -> Pending {
        let (tx, rx) = oneshot::channel();
        let mut open = self.open.lock();
        if open.by_age.len() >= self.max {
            // Dropping its sender wakes the oldest's `dropped`.
            open.by_age.pop_first();
        }
        let id = open.next;
        open.next += 1;
        open.by_age.insert(id, tx);
        Pending {
            id,
            set: self.clone(),
            slots: slots.clone(),
            dropped: Some(rx),
        }
    }

    /// Takes `id` out of the set; false when it was dropped already.
    fn leave(&self, id: u64) -> bool {
        self.open.lock().by_age.remove(&id).is_some()
    }
}

/// A connection accepted by [`accept_authenticating`] that has not authenticated yet. It holds no
/// `max_connections` slot; it leaves the set of pending handshakes when it authenticates
/// ([`Pending::authenticated`]) or is dropped.
pub struct Pending {
    id: u64,
    set: Arc<PendingSet>,
    slots: Arc<Semaphore>,
    /// Resolves (with an error) when the set drops this handshake; `None` once it has.
    dropped: Option<oneshot::Receiver<()>>,
}

impl Pending {
    /// Resolves when this handshake was dropped to make room for a newer connection: the caller
    /// should close the connection.
    pub async fn dropped(&mut self) {
        if let Some(rx) = self.dropped.as_mut() {
            let _ = rx.await;
            self.dropped = None;
        }
    }

    /// The connection has authenticated: it leaves the pending set and takes a `max_connections`
    /// slot, waiting for one while all are taken. `None` when it was dropped before it got here.
    pub async fn authenticated(self) -> Option<Slot> {
        if !self.set.leave(self.id) {
            return None;
        }
        self.slots.clone().acquire_owned().await.ok()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.set.leave(self.id);
    }
}

fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::Shutdown;

    #[tokio::test]
    async fn at_the_limit_a_connection_waits_for_a_slot_and_shutdown_ends_the_loop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.ok();
        let Some(listener) = listener else {
            panic!("binding loopback")
        };
        let addr = listener.local_addr().ok();
        let (shutdown, watch) = Shutdown::new();
        let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        let serving = tokio::spawn(accept_loop(listener, 1, watch, move |stream, _, slot| {
            let _ = tx.send((stream, slot));
        }));
        let addr = addr.unwrap_or_else(|| panic!("no local address"));
        let _a = TcpStream::connect(addr).await;
        let first = accepted.recv().await;
        assert!(first.is_some());
        let _b = TcpStream::connect(addr).await;
        let waited = tokio::time::timeout(Duration::from_millis(200), accepted.recv()).await;
        assert!(
            waited.is_err(),
            "a second connection was handed out past the limit"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), accepted.recv()).await;
        assert!(
            matches!(second, Ok(Some(_))),
            "the freed slot was not reused"
        );
        shutdown.begin();
        let ended = tokio::time::timeout(Duration::from_secs(5), serving).await;
        assert!(ended.is_ok(), "the accept loop outlived shutdown");
    }

    #[tokio::test]
    async fn past_max_pending_the_oldest_handshake_is_dropped_and_accepting_goes_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.ok();
        let Some(listener) = listener else {
            panic!("binding loopback")
        };
        let addr = listener.local_addr().ok();
        let addr = addr.unwrap_or_else(|| panic!("no local address"));
        let (shutdown, watch) = Shutdown::new();
        let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        let serving = tokio::spawn(accept_authenticating(
            listener,
            1,
            2,
            watch,
            move |stream, _, pending| {
                let _ = tx.send((stream, pending));
            },
        ));
        let mut clients = Vec::new();
        let mut pending = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await);
            let next = tokio::time::timeout(Duration::from_secs(5), accepted.recv()).await;
            let Ok(Some((_, handshake))) = next else {
                panic!("a connection was not accepted while handshakes were pending")
            };
            pending.push(handshake);
        }
        let mut third = pending.pop().unwrap_or_else(|| unreachable!());
        let mut second = pending.pop().unwrap_or_else(|| unreachable!());
        let mut first = pending.pop().unwrap_or_else(|| unreachable!());
        let dropped = tokio::time::timeout(Duration::from_secs(5), first.dropped()).await;
        assert!(
            dropped.is_ok(),
            "the oldest pending handshake was not dropped"
        );
        assert!(first.authenticated().await.is_none());
        let still = tokio::time::timeout(Duration::from_millis(100), second.dropped()).await;
        assert!(still.is_err(), "a handshake within the budget was dropped");
        let still = tokio::time::timeout(Duration::from_millis(100), third.dropped()).await;
        assert!(still.is_err(), "the newest handshake was dropped");

        // One authenticated connection fills max_connections = 1: the next waits for it to close.
        let slot = second.authenticated().await;
        assert!(slot.is_some());
        let waiting = tokio::spawn(third.authenticated());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "a second slot was handed out past max_connections"
        );
        drop(slot);
        let got = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(
            matches!(got, Ok(Ok(Some(_)))),
            "the freed slot was not handed on"
        );
        shutdown.begin();
        let ended = tokio::time::timeout(Duration::from_secs(5), serving).await;
        assert!(ended.is_ok(), "the accept loop outlived shutdown");
    }
}
