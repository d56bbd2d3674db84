//! A *shared connection* is one HTTP/2 connection to a peer that every request to that peer rides,
//! each on a stream of its own: the client sidecar's mesh link to the listener, and the listener's
//! h2c hop to its backend. This module decides when that connection is dialled, reused, replaced and
//! dropped; opening a stream on it is [`super::client`]'s.
//!
//! The rules:
//! - ALWAYS dial one connection at a time: requests that find none wait for the dial under way and
//!   share what it came to, a connection or its error (a peer that does not accept must not make
//!   each queued request wait out a connect timeout of its own in turn).
//! - NEVER give a new request a connection that is closed (its driver task ended), going away
//!   (a request on it was turned down, or it was forgotten), idle past the idle timeout, or retired
//!   by the owner's rule ([`Retire`], asked at every checkout). Requests in flight on a replaced
//!   connection finish on it; h2 closes it when the last of them is done.
//! - ALWAYS send a request the connection turned down before any of it went out (`ready()` failed:
//!   a GOAWAY came, or the connection is gone) once more, on a fresh connection.
//! - NEVER send a request the peer turned away unprocessed (its stream refused, or above the last
//!   stream a GOAWAY let through) again unless the owner's [`Policy::replayable`] allows it, and then
//!   once only.
//! - ALWAYS hand a request back ([`Sent::NotHttp2`]) when the dial came back speaking HTTP/1.1, and
//!   keep handing requests back for as long as the owner's [`Policy::declined_http2`] says, without
//!   dialling.
//! - ALWAYS forget a connection by identity: a request that found its connection going away drops it
//!   only if it is still the current one, never the fresh one another request put in its place.
//!
//! The hot path is one short lock, a clock read, the owner's retirement check and two reference-count
//! increments (the `h2` sender and the connection's state) per request; dialling is boxed, as it is
//! rare and its future large, so that no request's future carries room for it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, Response};
use http_body_util::{Either, Full};
use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::debug;

use super::client::{client_builder, open_stream, H2Body};
use crate::body::ProxyBody;
use crate::dial::{Dial, Protocol, Retire};
use crate::sweep::sweep_idle;

/// The owner's policy for its shared connection.
pub trait Policy<M>: Retire<M> {
    /// Whether `req`, should the peer turn it away unprocessed, may be sent once more. It goes again
    /// as its head alone, so only a request without a body may. Asked before the request is sent; a
    /// request it allows has its head copied for that, so an owner that never replays says no at once.
    fn replayable(&self, req: &Request<ProxyBody>) -> bool;

    /// How long to hand requests back after a dial came back speaking HTTP/1.1 (the owner sends them
    /// another way meanwhile). Asked once per such dial, so the owner may say so in its log.
    fn declined_http2(&self) -> Duration;
}

/// What [`SharedConnection::send`] came to.
pub enum Sent {
    /// The peer's response.
    Response(Response<H2Body>),
    /// The peer does not speak HTTP/2 (the dial came back with HTTP/1.1): the request, unsent.
    NotHttp2(Request<ProxyBody>),
}

/// One connection as the requests on it see it: whether it still takes new ones, and what it was
/// opened with.
pub struct Connection<M> {
    /// Set when its driver task has ended, or when it turned a request down (it is going away).
    closed: AtomicBool,
    meta: M,
}

impl<M> Connection<M> {
    /// What the dialer said the connection was opened with.
    pub fn meta(&self) -> &M {
        &self.meta
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// Why a request found no answer on the shared connection.
pub enum Error<E, M> {
    /// No connection could be opened: this request's dial failed, or the one it waited for did.
    Dial(Arc<E>),
    /// The HTTP/2 handshake on a fresh connection failed.
    Handshake(h2::Error),
    /// The connection failed, or the peer reset the request's stream.
    Stream {
        /// What h2 said.
        source: h2::Error,
        /// The connection it happened on.
        conn: Arc<Connection<M>>,
    },
    /// The peer turned the request away unprocessed (its stream refused, or cut off by its GOAWAY),
    /// and the owner's policy did not allow it to go again (`replayed` false), or it went again and
    /// was turned away again (`replayed` true).
    TurnedAway {
        /// What h2 said, the last time.
        source: h2::Error,
        /// Whether the request had gone once more.
        replayed: bool,
        /// The connection it happened on, the last time.
        conn: Arc<Connection<M>>,
    },
}

impl<E, M> Error<E, M> {
    /// What the connection the request failed on was opened with (none when no connection was).
    pub fn meta(&self) -> Option<&M> {
        match self {
            Error::Stream { conn, .. } | Error::TurnedAway { conn, .. } => Some(conn.meta()),
            Error::Dial(_) | Error::Handshake(_) => None,
        }
    }
}

impl<E: fmt::Display, M> fmt::Display for Error<E, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Dial(error) => error.fmt(f),
            Error::Handshake(error) => write!(f, "HTTP/2 handshake failed: {error}"),
            Error::Stream { source, .. } => source.fmt(f),
            Error::TurnedAway {
                source,
                replayed: false,
                ..
            } => write!(f, "the peer turned the request away unprocessed ({source})"),
            Error::TurnedAway {
                source,
                replayed: true,
                ..
            } => write!(
                f,
                "the peer turned the request away unprocessed, twice ({source})"
            ),
        }
    }
}

impl<E: fmt::Debug, M> fmt::Debug for Error<E, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Dial(error) => f.debug_tuple("Dial").field(error).finish(),
            Error::Handshake(error) => f.debug_tuple("Handshake").field(error).finish(),
            Error::Stream { source, .. } => f.debug_struct("Stream").field("source", source).finish(),
            Error::TurnedAway {
                source, replayed, ..
            } => f
                .debug_struct("TurnedAway")
                .field("source", source)
                .field("replayed", replayed)
                .finish(),
        }
    }
}

// Written out rather than derived: the dial error's place in the chain is the dialer's own type, not
// the `Arc` it is shared in, so that an owner walking the chain finds it by downcasting.
impl<E: std::error::Error + 'static, M> std::error::Error for Error<E, M> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Dial(error) => Some(&**error),
            Error::Handshake(source)
            | Error::Stream { source, .. }
            | Error::TurnedAway { source, .. } => Some(source),
        }
    }
}

/// The shared HTTP/2 connection to one peer (see the module doc for its rules).
pub struct SharedConnection<D: Dial, P> {
    dialer: D,
    policy: P,
    idle_timeout: Duration,
    /// Names the peer in logs ("the mesh listener", "the backend").
    peer: &'static str,
    state: Mutex<State<D::Meta, D::Error>>,
    /// Held while dialling.
    dialing: tokio::sync::Mutex<()>,
}

struct State<M, E> {
    current: Option<Current<M>>,
    /// Dials finished so far. A request that found no connection notes the count; once its turn to
    /// dial comes, a dial finished since then answers for it.
    dials: u64,
    /// The last dial that failed (its number and error), for the requests that waited on it.
    failed: Option<(u64, Arc<E>)>,
    /// Until when requests are handed back (the peer declined HTTP/2).
    declined_until: Option<Instant>,
}

struct Current<M> {
    sender: SendRequest<Bytes>,
    conn: Arc<Connection<M>>,
    /// When a request last went out on it.
    last_used: Instant,
}

/// What a checkout found.
enum Checkout<M> {
    Ready(SendRequest<Bytes>, Arc<Connection<M>>),
    /// Requests are handed back for now.
    Declined,
    /// No connection worth using; the number of dials finished so far.
    None(u64),
}

type Ready<M> = Option<(SendRequest<Bytes>, Arc<Connection<M>>)>;

impl<D: Dial, P: Policy<D::Meta>> SharedConnection<D, P> {
    /// A shared connection through `dialer`, dialled on first use. A task drops it once unused for
    /// `idle_timeout`, until this is dropped.
    pub fn new(dialer: D, policy: P, idle_timeout: Duration, peer: &'static str) -> Arc<Self> {
        let shared = Arc::new(SharedConnection {
            dialer,
            policy,
            idle_timeout,
            peer,
            state: Mutex::new(State {
                current: None,
                dials: 0,
                failed: None,
                declined_until: None,
            }),
            dialing: tokio::sync::Mutex::new(()),
        });
        sweep_idle(&shared, idle_timeout, Self::purge);
        shared
    }

    /// The owner's policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// Sends `req` (absolute form: scheme and authority become the pseudo-headers) on the current
    /// connection, dialling one when there is none worth using.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Sent, Error<D::Error, D::Meta>> {
        let again = self.policy.replayable(&req).then(|| head(&req));
        let Some((sender, conn)) = self.ready().await? else {
            return Ok(Sent::NotHttp2(req));
        };
        let error = match open_stream(sender, req, self.peer).await {
            Ok(response) => return Ok(Sent::Response(response)),
            Err(error) => error,
        };
        if !turned_away(&error) {
            return Err(Error::Stream {
                source: error,
                conn,
            });
        }
        let Some(again) = again else {
            return Err(Error::TurnedAway {
                source: error,
                replayed: false,
                conn,
            });
        };
        debug!(peer = self.peer, %error, "request turned away unprocessed; sending it again");
        if error.is_go_away() {
            // Going away: no new streams on it.
            self.forget(&conn);
        }
        let again = again.map(|()| Either::Right(Full::default()));
        let Some((sender, conn)) = self.ready().await? else {
            return Ok(Sent::NotHttp2(again));
        };
        match open_stream(sender, again, self.peer).await {
            Ok(response) => Ok(Sent::Response(response)),
            Err(error) if turned_away(&error) => Err(Error::TurnedAway {
                source: error,
                replayed: true,
                conn,
            }),
            Err(error) => Err(Error::Stream {
                source: error,
                conn,
            }),
        }
    }

    /// A sender ready to open a stream and its connection; `None` when requests are handed back.
    async fn ready(&self) -> Result<Ready<D::Meta>, Error<D::Error, D::Meta>> {
        let checkout = self.checkout(&mut self.state.lock());
        let (sender, conn) = match checkout {
            Checkout::Ready(sender, conn) => (sender, conn),
            Checkout::Declined => return Ok(None),
            Checkout::None(seen) => match Box::pin(self.connect(seen)).await? {
                Some(ready) => ready,
                None => return Ok(None),
            },
        };
        match sender.ready().await {
            Ok(sender) => Ok(Some((sender, conn))),
            // Nothing was sent: the connection had a GOAWAY or is gone.
            Err(error) => {
                debug!(peer = self.peer, %error, "HTTP/2 connection going away; sending on a fresh one");
                let seen = self.forget(&conn);
                match Box::pin(self.connect(seen)).await? {
                    Some((sender, conn)) => match sender.ready().await {
                        Ok(sender) => Ok(Some((sender, conn))),
                        Err(source) => Err(Error::Stream { source, conn }),
                    },
                    None => Ok(None),
                }
            }
        }
    }

    /// The current connection's sender, marked as used now, if it may take a new request.
    fn checkout(&self, state: &mut State<D::Meta, D::Error>) -> Checkout<D::Meta> {
        let now = Instant::now();
        if state.declined_until.is_some_and(|until| now < until) {
            return Checkout::Declined;
        }
        if let Some(current) = state.current.as_mut() {
            let usable =
                !current.conn.is_closed() && now - current.last_used <= self.idle_timeout;
            if usable && !self.policy.retire(&current.conn.meta) {
                current.last_used = now;
                return Checkout::Ready(current.sender.clone(), current.conn.clone());
            }
            state.current = None;
        }
        Checkout::None(state.dials)
    }

    /// Marks `conn` as going away and drops it if it is still the current one; the number of dials
    /// finished so far.
    fn forget(&self, conn: &Arc<Connection<D::Meta>>) -> u64 {
        conn.closed.store(true, Ordering::Relaxed);
        let mut state = self.state.lock();
        if state
            .current
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(&current.conn, conn))
        {
            state.current = None;
        }
        state.dials
    }

    /// A usable connection, once it is this request's turn to dial: one another request dialled
    /// meanwhile, the error of a dial that failed meanwhile, or a new one. `seen`: the dials finished
    /// when this request found no connection. `None` when requests are handed back.
    async fn connect(&self, seen: u64) -> Result<Ready<D::Meta>, Error<D::Error, D::Meta>> {
        let _turn = self.dialing.lock().await;
        {
            let mut state = self.state.lock();
            match self.checkout(&mut state) {
                Checkout::Ready(sender, conn) => return Ok(Some((sender, conn))),
                Checkout::Declined => return Ok(None),
                Checkout::None(_) => {}
            }
            if let Some((at, error)) = &state.failed {
                if *at > seen {
                    return Err(Error::Dial(error.clone()));
                }
            }
        }
        let connected = match self.dialer.dial().await {
            Ok(connected) => connected,
            Err(error) => {
                let error = Arc::new(error);
                let mut state = self.state.lock();
                state.dials += 1;
                state.failed = Some((state.dials, error.clone()));
                return Err(Error::Dial(error));
            }
        };
        if connected.protocol != Protocol::Http2 {
            let hand_back = self.policy.declined_http2();
            let mut state = self.state.lock();
            state.dials += 1;
            state.failed = None;
            state.declined_until = Some(Instant::now() + hand_back);
            return Ok(None);
        }
        let (sender, driver) = client_builder()
            .handshake::<_, Bytes>(connected.io)
            .await
            .map_err(Error::Handshake)?;
        let conn = Arc::new(Connection {
            closed: AtomicBool::new(false),
            meta: connected.meta,
        });
        let ended = conn.clone();
        let peer = self.peer;
        tokio::spawn(async move {
            if let Err(error) = driver.await {
                debug!(peer, %error, "HTTP/2 connection ended with an error");
            }
            ended.closed.store(true, Ordering::Relaxed);
        });
        debug!(peer, "HTTP/2 connection open");
        let mut state = self.state.lock();
        state.dials += 1;
        state.failed = None;
        state.current = Some(Current {
            sender: sender.clone(),
            conn: conn.clone(),
            last_used: Instant::now(),
        });
        Ok(Some((sender, conn)))
    }

    /// Drops the connection if it is closed or has been unused for longer than the idle timeout
    /// (streams still open on it finish first: h2 closes it once its last sender is gone and they
    /// are done).
    fn purge(&self) {
        let now = Instant::now();
        let mut state = self.state.lock();
        if state.current.as_ref().is_some_and(|current| {
            current.conn.is_closed() || now - current.last_used > self.idle_timeout
        }) {
            state.current = None;
        }
    }

    /// Whether a connection is open and taking requests.
    pub fn is_open(&self) -> bool {
        self.state
            .lock()
            .current
            .as_ref()
            .is_some_and(|current| !current.conn.is_closed())
    }
}

/// Whether the peer turned a stream away without processing it: refused, or cut off by its GOAWAY.
fn turned_away(error: &h2::Error) -> bool {
    error.reason() == Some(h2::Reason::REFUSED_STREAM) || (error.is_go_away() && error.is_remote())
}

/// A copy of a request's head (method, target, version, headers), for a request that may go again.
fn head(req: &Request<ProxyBody>) -> Request<()> {
    let mut head = Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.version_mut() = req.version();
    *head.headers_mut() = req.headers().clone();
    head
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
}
