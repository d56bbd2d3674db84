//! The shared HTTP/2 connection to a mesh listener that every plain request rides.
//!
//! In place of hyper's client for this path: hyper-util's legacy client checks a connection out of a
//! keyed pool, wraps and boxes several large futures per request and learns about stale connections
//! only from each response, and hyper's own HTTP/2 client hands each request to its connection task
//! through a channel, spawns a task to await the response and answers through a second channel. Here
//! a request clones the current connection's `h2` sender under a short lock, opens its stream itself
//! and awaits the response in its own task ([`phoenix_mesh_transport::h2::client`]).
//! A connection is replaced, for the next request, when it is closed or going away, idle past
//! `pool_idle_timeout`, or stale: its listener certificate expires within the retire margin, or it was
//! opened before our own certificate or trust was reloaded. Requests in flight on a replaced connection
//! finish on it; h2 closes it when the last of them is done. One dial at a time: requests arriving
//! meanwhile wait for it and share the result. A request the connection turned down unsent (it had a
//! GOAWAY or was gone) is sent once more on a fresh connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, Response};
use phoenix_mesh_common::ProxyBody;
use phoenix_mesh_transport::h2::client::{self as h2body, H2Body};
use phoenix_mesh_transport::sweep::sweep_idle;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::connector::MeshConnector;
use crate::live_conns::ConnInfo;
use crate::mesh_stream::MeshStream;

/// Why a request found no answer on the link.
pub(crate) type LinkError = Box<dyn std::error::Error + Send + Sync>;

/// What [`H2Link::send`] came to.
pub(crate) enum Sent {
    Response(Response<H2Body>),
    /// The listener did not choose HTTP/2 (not a phoenix listener, or HTTP/2 turned off there): the
    /// request comes back for the HTTP/1.1 pool, which the link leaves it to for a while.
    NotH2(Request<ProxyBody>),
}

/// How long the link leaves requests to the HTTP/1.1 pool after a listener declined HTTP/2.
const H1_FALLBACK: Duration = Duration::from_secs(60);

pub(crate) struct H2Link {
    connector: MeshConnector,
    idle_timeout: Duration,
    retire_margin: Duration,
    current: Mutex<Current>,
    dialing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Current {
    conn: Option<Conn>,
    /// Numbers the connections, so a request can tell whether the current one is still its own.
    dialed: u64,
    /// Until when requests go to the HTTP/1.1 pool (a listener declined HTTP/2).
    h1_until: Option<Instant>,
}

struct Conn {
    id: u64,
    sender: SendRequest<Bytes>,
    /// Set when the connection's task has ended (the connection is gone).
    closed: Arc<AtomicBool>,
    info: ConnInfo,
    last_used: Instant,
}

impl H2Link {
    /// A link through `connector`; a task drops an idle connection after `idle_timeout` until the link
    /// is dropped.
    pub(crate) fn new(
        connector: MeshConnector,
        idle_timeout: Duration,
        retire_margin: Duration,
    ) -> Arc<Self> {
        let link = Arc::new(H2Link {
            connector,
            idle_timeout,
            retire_margin,
            current: Mutex::default(),
            dialing: tokio::sync::Mutex::new(()),
        });
        sweep_idle(&link, idle_timeout, H2Link::purge);
        link
    }

    /// Sends `req` on the current connection, dialing one when there is none worth using.
    pub(crate) async fn send(&self, req: Request<ProxyBody>) -> Result<Sent, LinkError> {
        // CONNECT asks for a tunnel, which an HTTP/2 stream to the listener does not give.
        if req.method() == Method::CONNECT {
            return Ok(Sent::NotH2(req));
        }
        let current = {
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            if current.h1_until.is_some_and(|until| Instant::now() < until) {
                return Ok(Sent::NotH2(req));
            }
            self.checkout(&mut current)
        };
        let (id, sender) = match current {
            Some(conn) => conn,
            // Boxed: dialing (TCP, TLS, the HTTP/2 handshake) is rare and its future is large, and
            // every request's future would otherwise carry room for it, copied on each move.
            None => match Box::pin(self.connect()).await? {
                Some(conn) => conn,
                None => return Ok(Sent::NotH2(req)),
            },
        };
        let (id, sender) = match sender.ready().await {
            Ok(sender) => (id, sender),
            // Nothing was sent: the connection had a GOAWAY or is gone.
            Err(error) => {
                debug!(%error, "mesh connection closing; sending on a fresh one");
                self.forget(id);
                match Box::pin(self.connect()).await? {
                    Some((fresh_id, fresh)) => (
                        fresh_id,
                        fresh
                            .ready()
                            .await
                            .map_err(|error| self.stream_error(fresh_id, error))?,
                    ),
                    None => return Ok(Sent::NotH2(req)),
                }
            }
        };
        h2body::open_stream(sender, req, "the mesh listener")
            .await
            .map(Sent::Response)
            .map_err(|error| self.stream_error(id, error))
    }

    /// An error of a request on connection `id`, with the listener's refusal of our certificate
    /// restored as the rustls error it was when the connection read it (h2 keeps only an I/O error's
    /// kind and message).
    fn stream_error(&self, id: u64, error: h2::Error) -> LinkError {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let refused = current
            .conn
            .as_ref()
            .filter(|conn| conn.id == id)
            .and_then(|conn| conn.info.refused_alert());
        match refused {
            Some(alert) => std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(alert),
            )
            .into(),
            None => link_error(error),
        }
    }

    /// The current connection's number and a clone of its sender, if it is still worth using.
    fn checkout(&self, current: &mut Current) -> Option<(u64, SendRequest<Bytes>)> {
        let now = Instant::now();
        let conn = current.conn.as_mut()?;
        let usable =
            !conn.closed.load(Ordering::Relaxed) && now - conn.last_used <= self.idle_timeout;
        match self.connector.retirement(&conn.info, self.retire_margin) {
            None if usable => {
                conn.last_used = now;
                return Some((conn.id, conn.sender.clone()));
            }
            Some(retirement) if usable => retirement.log(),
            _ => {}
        }
        current.conn = None;
        None
    }

    /// Drops the current connection if it is still connection `id`.
    fn forget(&self, id: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.conn.as_ref().is_some_and(|c| c.id == id) {
            current.conn = None;
        }
    }

    /// A sender on a usable connection: the one another request dialed while this one waited, or a
    /// new one. `None` when the listener declined HTTP/2.
    async fn connect(&self) -> Result<Option<(u64, SendRequest<Bytes>)>, LinkError> {
        let _turn = self.dialing.lock().await;
        let reused =
            self.checkout(&mut self.current.lock().unwrap_or_else(PoisonError::into_inner));
        if reused.is_some() {
            return Ok(reused);
        }
        let stream = self.connector.dial().await?;
        if !stream.is_h2() {
            info!(
                for_s = H1_FALLBACK.as_secs(),
                "the mesh listener did not choose HTTP/2; using HTTP/1.1 connections for now"
            );
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            current.h1_until = Some(Instant::now() + H1_FALLBACK);
            return Ok(None);
        }
        let info = stream.info().clone();
        let (sender, closed) = handshake(stream).await?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.dialed += 1;
        let id = current.dialed;
        current.conn = Some(Conn {
            id,
            sender: sender.clone(),
            closed,
            info,
            last_used: Instant::now(),
        });
        Ok(Some((id, sender)))
    }

    /// Drops the connection if it has been idle past the timeout (h2 then closes it).
    fn purge(&self) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.conn.as_ref().is_some_and(|c| {
            c.closed.load(Ordering::Relaxed) || c.last_used.elapsed() > self.idle_timeout
        }) {
            current.conn = None;
        }
    }
}

/// The HTTP/2 handshake on a fresh mesh connection, with hyper's client settings, and the task that
/// drives it.
async fn handshake(stream: MeshStream) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), LinkError> {
    let (sender, conn) = h2body::client_builder()
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(link_error)?;
    let closed = Arc::new(AtomicBool::new(false));
    let ended = closed.clone();
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            debug!(%error, "mesh connection ended with an error");
        }
        ended.store(true, Ordering::Relaxed);
    });
    Ok((sender, closed))
}

/// An h2 error as the link reports it: I/O errors as `std::io::Error` (where the sidecar looks for
/// the listener's TLS alerts), everything else as itself.
fn link_error(error: h2::Error) -> LinkError {
    if error.is_io() {
        if let Some(io) = error.into_io() {
            return io.into();
        }
        return "I/O error on the mesh connection".into();
    }
    error.into()
}
