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
//! - ALWAYS let go of a connection when the owner's [`Retire::lifetime`] retires it, even with no
//!   request coming to find out, and close it at that lifetime's deadline whatever it carries.
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
use http_body::Body as _;
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

/// The replay rule both sidecars' shared connections follow ([`Policy::replayable`]): a request the
/// peer turned away unprocessed goes once more if it is idempotent and has no body. Without a body,
/// as it goes again as its head alone; idempotent (RFC 9110 section 9.2.2), because it may be
/// repeated anyway, so that a request the peer did begin, should h2 report it the same way (a stream
/// cut off by the connection closing after a GOAWAY), is sent twice without harm.
pub fn idempotent_without_body(req: &Request<ProxyBody>) -> bool {
    req.method().is_idempotent() && req.body().is_end_stream()
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
            Error::Stream { source, .. } => {
                f.debug_struct("Stream").field("source", source).finish()
            }
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
    /// Shared with each connection's driver task, which lets go of its connection when it retires.
    state: Arc<Mutex<State<D::Meta, D::Error>>>,
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
            state: Arc::new(Mutex::new(State {
                current: None,
                dials: 0,
                failed: None,
                declined_until: None,
            })),
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
            let usable = !current.conn.is_closed() && now - current.last_used <= self.idle_timeout;
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
        let mut state = self.state.lock();
        forget_in(&mut state, conn);
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
        let lifetime = self.policy.lifetime(&conn.meta);
        let state = Arc::downgrade(&self.state);
        tokio::spawn(async move {
            let driven = match lifetime {
                None => Some(driver.await),
                Some(lifetime) => {
                    let retiring = ended.clone();
                    lifetime
                        .drive(driver, move || {
                            debug!(
                                peer,
                                "HTTP/2 connection retired; it closes once its requests finish"
                            );
                            if let Some(state) = state.upgrade() {
                                forget_in(&mut state.lock(), &retiring);
                            }
                        })
                        .await
                }
            };
            match driven {
                Some(Err(error)) => debug!(peer, %error, "HTTP/2 connection ended with an error"),
                Some(Ok(())) => {}
                None => debug!(peer, "HTTP/2 connection closed at its deadline"),
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

/// Marks `conn` as going away and drops it from `state` if it is still the current one (never the
/// fresh one another request put in its place).
fn forget_in<M, E>(state: &mut State<M, E>, conn: &Arc<Connection<M>>) {
    conn.closed.store(true, Ordering::Relaxed);
    if state
        .current
        .as_ref()
        .is_some_and(|current| Arc::ptr_eq(&current.conn, conn))
    {
        state.current = None;
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
    use std::convert::Infallible;
    use std::io;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use http::{Method, StatusCode};
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::dial::Connected;
    use crate::test_peer::counting_peer;

    /// Dials `addr`, numbering its connections from 1 (the meta); with `fail_after` every dial
    /// waits that long and fails instead.
    struct TestDial {
        addr: SocketAddr,
        dials: Arc<AtomicUsize>,
        protocol: Protocol,
        fail_after: Option<Duration>,
    }

    impl Dial for TestDial {
        type Io = TcpStream;
        type Meta = usize;
        type Error = io::Error;

        async fn dial(&self) -> Result<Connected<TcpStream, usize>, io::Error> {
            let n = self.dials.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(wait) = self.fail_after {
                tokio::time::sleep(wait).await;
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"));
            }
            let io = TcpStream::connect(self.addr).await?;
            Ok(Connected {
                io,
                meta: n,
                protocol: self.protocol,
            })
        }
    }

    /// Retires the connections whose number is in `retired`; replays what `replay` allows.
    #[derive(Default)]
    struct TestPolicy {
        retired: Vec<usize>,
        replay: bool,
        asked_to_retire: AtomicUsize,
    }

    impl Retire<usize> for TestPolicy {
        fn retire(&self, meta: &usize) -> bool {
            self.asked_to_retire.fetch_add(1, Ordering::SeqCst);
            self.retired.contains(meta)
        }
    }

    impl Policy<usize> for TestPolicy {
        fn replayable(&self, req: &Request<ProxyBody>) -> bool {
            self.replay && req.method().is_idempotent()
        }

        fn declined_http2(&self) -> Duration {
            Duration::from_secs(60)
        }
    }

    /// A loopback HTTP/2 (prior knowledge) peer answering each request with its path, counting the
    /// connections it accepts.
    async fn hyper_peer() -> (SocketAddr, Arc<AtomicUsize>) {
        counting_peer(|stream| async move {
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let path = Bytes::copy_from_slice(req.uri().path().as_bytes());
                        Ok::<_, Infallible>(Response::new(Full::new(path)))
                    }),
                )
                .await;
        })
        .await
    }

    /// How an `h2`-crate peer treats the streams of each connection it accepts.
    #[derive(Clone, Copy)]
    enum Peer {
        /// Refuses the first `n` streams of every connection (`REFUSED_STREAM`), answers the rest.
        RefuseFirst(usize),
        /// Sends GOAWAY while answering the first stream, and closes once it is done.
        GoAwayAfterFirst,
    }

    /// A loopback HTTP/2 peer built on the `h2` crate's server; counts connections and streams.
    async fn h2_peer(peer: Peer) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let streams = Arc::new(AtomicUsize::new(0));
        let (conns, seen) = (accepted.clone(), streams.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                conns.fetch_add(1, Ordering::SeqCst);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    let mut n = 0;
                    while let Some(Ok((_req, mut respond))) = conn.accept().await {
                        n += 1;
                        seen.fetch_add(1, Ordering::SeqCst);
                        if let Peer::RefuseFirst(refused) = peer {
                            if n <= refused {
                                respond.send_reset(h2::Reason::REFUSED_STREAM);
                                continue;
                            }
                        }
                        let mut body = respond.send_response(Response::new(()), false).unwrap();
                        if matches!(peer, Peer::GoAwayAfterFirst) {
                            // The GOAWAY goes out before the body ends: a client that has read the
                            // whole response has seen it.
                            conn.graceful_shutdown();
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                body.send_data(Bytes::from_static(b"ok"), true).unwrap();
                            });
                        } else {
                            body.send_data(Bytes::from_static(b"ok"), true).unwrap();
                        }
                    }
                });
            }
        });
        (addr, accepted, streams)
    }

    fn shared(
        addr: SocketAddr,
        policy: TestPolicy,
        idle: Duration,
    ) -> (
        Arc<SharedConnection<TestDial, TestPolicy>>,
        Arc<AtomicUsize>,
    ) {
        let dials = Arc::new(AtomicUsize::new(0));
        let dial = TestDial {
            addr,
            dials: dials.clone(),
            protocol: Protocol::Http2,
            fail_after: None,
        };
        (
            SharedConnection::new(dial, policy, idle, "the test peer"),
            dials,
        )
    }

    fn get(path: &str) -> Request<ProxyBody> {
        Request::get(format!("http://svc{path}"))
            .body(Either::Right(Full::default()))
            .unwrap()
    }

    /// Sends `req` and reads the answer's status and body.
    async fn exchange(
        shared: &SharedConnection<TestDial, TestPolicy>,
        req: Request<ProxyBody>,
    ) -> (StatusCode, String) {
        let Sent::Response(response) = shared.send(req).await.unwrap() else {
            panic!("handed back");
        };
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (addr, accepted) = hyper_peer().await;
        let (shared, dials) = shared(addr, TestPolicy::default(), Duration::from_secs(60));
        for i in 0..5 {
            let path = format!("/seq/{i}");
            assert_eq!(exchange(&shared, get(&path)).await, (StatusCode::OK, path));
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_burst_of_requests_dials_once() {
        let (addr, accepted) = hyper_peer().await;
        let (shared, dials) = shared(addr, TestPolicy::default(), Duration::from_secs(60));
        let burst = (0..16).map(|i| {
            let shared = shared.clone();
            tokio::spawn(async move { exchange(&shared, get(&format!("/burst/{i}"))).await })
        });
        for (i, answer) in burst.enumerate() {
            assert_eq!(
                answer.await.unwrap(),
                (StatusCode::OK, format!("/burst/{i}"))
            );
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_dial_answers_the_requests_that_waited_for_it() {
        let dials = Arc::new(AtomicUsize::new(0));
        let dial = TestDial {
            addr: "127.0.0.1:9".parse().unwrap(),
            dials: dials.clone(),
            protocol: Protocol::Http2,
            fail_after: Some(Duration::from_secs(5)),
        };
        let shared = SharedConnection::new(
            dial,
            TestPolicy::default(),
            Duration::from_secs(60),
            "the test peer",
        );
        let burst: Vec<_> = (0..8)
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(async move { shared.send(get("/")).await })
            })
            .collect();
        for request in burst {
            let error = request.await.unwrap().err().unwrap();
            assert!(matches!(error, Error::Dial(_)), "{error:?}");
            assert_eq!(error.to_string(), "no answer");
        }
        assert_eq!(
            dials.load(Ordering::SeqCst),
            1,
            "each waiting request dialled again"
        );
        // A request that comes later dials afresh.
        assert!(matches!(shared.send(get("/")).await, Err(Error::Dial(_))));
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_connection_is_closed_after_the_idle_timeout() {
        let (addr, accepted) = hyper_peer().await;
        let idle = Duration::from_secs(10);
        let (shared, dials) = shared(addr, TestPolicy::default(), idle);
        assert_eq!(exchange(&shared, get("/")).await.0, StatusCode::OK);
        assert!(shared.is_open());
        // Used within the timeout: kept.
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(shared.is_open(), "a connection in use was closed");
        assert_eq!(exchange(&shared, get("/")).await.0, StatusCode::OK);
        // The sweep runs every half timeout: gone within one and a half.
        tokio::time::sleep(idle * 3 / 2 + Duration::from_millis(1)).await;
        assert!(!shared.is_open(), "an idle connection was kept");
        assert_eq!(exchange(&shared, get("/")).await.0, StatusCode::OK);
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn after_a_goaway_the_next_request_gets_a_fresh_connection() {
        let (addr, accepted, streams) = h2_peer(Peer::GoAwayAfterFirst).await;
        let (shared, dials) = shared(addr, TestPolicy::default(), Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(
                exchange(&shared, get("/")).await,
                (StatusCode::OK, "ok".to_owned())
            );
        }
        assert_eq!(dials.load(Ordering::SeqCst), 3);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(streams.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_retired_connection_takes_no_new_requests() {
        let (addr, accepted) = hyper_peer().await;
        let policy = TestPolicy {
            retired: vec![1],
            ..TestPolicy::default()
        };
        let (shared, dials) = shared(addr, policy, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(exchange(&shared, get("/")).await.0, StatusCode::OK);
        }
        // The first connection is retired at the second request's checkout; the second one stays.
        assert_eq!(dials.load(Ordering::SeqCst), 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(shared.policy().asked_to_retire.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_stream_goes_once_more_where_the_policy_allows() {
        let (addr, _, streams) = h2_peer(Peer::RefuseFirst(1)).await;
        let policy = TestPolicy {
            replay: true,
            ..TestPolicy::default()
        };
        let (shared, _) = shared(addr, policy, Duration::from_secs(60));
        assert_eq!(
            exchange(&shared, get("/")).await,
            (StatusCode::OK, "ok".to_owned())
        );
        assert_eq!(streams.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_stream_is_an_error_where_the_policy_does_not_replay() {
        let (addr, _, streams) = h2_peer(Peer::RefuseFirst(1)).await;
        let (shared, _) = shared(addr, TestPolicy::default(), Duration::from_secs(60));
        let error = shared.send(get("/")).await.err().unwrap();
        assert!(
            matches!(error, Error::TurnedAway { replayed: false, ref source, .. }
                if source.reason() == Some(h2::Reason::REFUSED_STREAM)),
            "{error:?}"
        );
        assert_eq!(error.meta(), Some(&1));
        assert_eq!(streams.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_request_refused_twice_is_not_sent_a_third_time() {
        let (addr, _, streams) = h2_peer(Peer::RefuseFirst(2)).await;
        let policy = TestPolicy {
            replay: true,
            ..TestPolicy::default()
        };
        let (shared, _) = shared(addr, policy, Duration::from_secs(60));
        let put = Request::builder()
            .method(Method::PUT)
            .uri("http://svc/")
            .body(Either::Right(Full::default()))
            .unwrap();
        let error = shared.send(put).await.err().unwrap();
        assert!(
            matches!(error, Error::TurnedAway { replayed: true, .. }),
            "{error:?}"
        );
        assert_eq!(streams.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_declines_http2_gets_the_requests_handed_back_for_a_while() {
        let (addr, _) = hyper_peer().await;
        let dials = Arc::new(AtomicUsize::new(0));
        let dial = TestDial {
            addr,
            dials: dials.clone(),
            protocol: Protocol::Http1,
            fail_after: None,
        };
        let shared = SharedConnection::new(
            dial,
            TestPolicy::default(),
            Duration::from_secs(600),
            "the test peer",
        );
        for path in ["/a", "/b"] {
            match shared.send(get(path)).await.unwrap() {
                Sent::NotHttp2(req) => assert_eq!(req.uri().path(), path),
                Sent::Response(_) => panic!("an HTTP/1.1 connection was used for HTTP/2"),
            }
        }
        assert_eq!(
            dials.load(Ordering::SeqCst),
            1,
            "dialled while handing back"
        );
        // After the policy's 60 s, the peer is asked again.
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert!(matches!(
            shared.send(get("/c")).await.unwrap(),
            Sent::NotHttp2(_)
        ));
        assert_eq!(dials.load(Ordering::SeqCst), 2);
    }
}
