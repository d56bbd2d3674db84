//! The accept loop: new connections handed out with a slot each, at most `max_connections` open,
//! accept errors backed off and never fatal.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    mut shutdown: ShutdownWatch,
    mut on_conn: F,
) where
    L: Accept,
    F: FnMut(L::Stream, L::Peer, Slot),
{
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
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
        tokio::select! {
            biased;
            () = shutdown.wait() => break,
            accepted = Accept::accept(&listener) => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    if slots.available_permits() > 0 {
                        warned_full = false;
                    }
                    on_conn(stream, peer, slot);
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
}
