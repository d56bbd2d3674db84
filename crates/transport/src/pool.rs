//! An *HTTP/1.1 pool* keeps the keep-alive connections to one peer and hands each request one that
//! is free: the listener's hop to Traefik, and the client sidecar's mesh connections when HTTP/2 is
//! off or declined (and, never keeping any, its connections for requests that upgrade).
//!
//! The rules:
//! - NEVER reuse a connection whose previous exchange has not finished (`SendRequest::is_ready`, an
//!   atomic load); a connection goes back into the list as soon as its request is sent, busy, so
//!   there is nothing to wait for and nothing to spawn.
//! - ALWAYS take the most recently used free connection, so the others go idle and are closed.
//! - ALWAYS drop a closed connection when met, and one free and unused for longer than the idle
//!   timeout (a periodic sweep does the same without traffic); NEVER cut a busy one off.
//! - NEVER hand out a connection the owner's rule retires ([`Retire`], asked when the connection
//!   would be handed out, and when it comes back after its request); the requests it carries finish
//!   on it. ALWAYS drop one from the list when its [`Retire::lifetime`] retires it, even with no
//!   request coming to find out, and close it at that lifetime's deadline whatever it carries.
//! - NEVER keep an upgraded connection (`101 Switching Protocols`): it belongs to the tunnel, and
//!   its meta goes with the response ([`UpgradedMeta`]), for the tunnel's owner to read its lifetime.
//! - ALWAYS send a request a pooled connection turned down before sending any of it (the peer closed
//!   it as we picked it) on another one; a request that failed on a fresh connection is an error.
//! - NEVER let a connection read more than its read-ahead (64 KiB unless the owner sets another)
//!   ahead: hyper's default lets the read buffer grow to 400 KiB on large responses, and a connection
//!   keeps it for as long as it lives, in every connection the pool keeps. A response head must fit
//!   in it; a larger one fails the request.
//! - ALWAYS speak HTTP/1.1: the dialer must make HTTP/1.1 connections (the client's offers only
//!   `http/1.1` through ALPN for this pool).
//! - NEVER hold more connections open than the pool's [`Limit`], if it has one, upgraded ones (which
//!   it no longer keeps) included: a connection's slot goes with its socket, whoever holds it. A
//!   request that needs one more waits for a free connection or a slot, at most the limit's wait, and
//!   is then an error ([`Error::Busy`]). While requests wait, each busy connection is watched, and
//!   goes back into the list the moment its exchange ends.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::debug;

use crate::body::ProxyBody;
use crate::dial::{Dial, NeverRetire, Retire};
use crate::sweep::sweep_idle;

/// The most a connection reads ahead of what the request's owner has taken (hyper's `max_buf_size`)
/// unless its owner sets another ([`Pool::set_read_ahead`]), and so about the largest response head
/// it accepts.
const MAX_READ_BUFFER: usize = 64 * 1024;

/// What the connection a `101 Switching Protocols` response came on was opened with, in that
/// response's extensions: the connection now carries the tunnel, and its meta says how long it may.
#[derive(Debug)]
pub struct UpgradedMeta<M>(pub Arc<M>);

impl<M> Clone for UpgradedMeta<M> {
    fn clone(&self) -> Self {
        UpgradedMeta(self.0.clone())
    }
}

/// Why a request through the pool found no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error<E: std::error::Error + 'static> {
    /// No connection could be opened.
    #[error("{0}")]
    Dial(#[source] E),
    /// The HTTP/1.1 handshake on a fresh connection failed.
    #[error("{0}")]
    Handshake(#[source] hyper::Error),
    /// The connection failed while the request was sent or the response read.
    #[error("{0}")]
    Request(#[source] hyper::Error),
    /// Every connection the limit allows was busy for as long as a request may wait.
    #[error("all {max} connections busy for {waited:?}")]
    Busy {
        /// The limit.
        max: usize,
        /// How long the request waited.
        waited: Duration,
    },
}

/// The most connections a pool holds open at once, and how long a request that needs one more waits.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    /// Connections open at once (at least 1).
    pub max: usize,
    /// The longest a request waits for a free connection or slot.
    pub wait: Duration,
}

/// A limit's state: the slots, and the signal that a busy connection became free.
struct Slots {
    limit: Limit,
    slots: Arc<Semaphore>,
    freed: Notify,
}

/// The keep-alive HTTP/1.1 connections to one peer (see the module doc for the rules).
pub struct Pool<D: Dial, R = NeverRetire> {
    dialer: D,
    retire: R,
    idle_timeout: Duration,
    /// False: every connection serves one request (requests that upgrade).
    keep: bool,
    /// Names the peer in logs.
    peer: &'static str,
    /// Least recently used first. Busy connections stay in the list (they become free when their
    /// exchange ends); closed ones are dropped when met. Shared with each connection's task, which
    /// drops its connection from the list when it retires.
    conns: Arc<Mutex<VecDeque<Pooled<D::Meta>>>>,
    /// Numbers the connections, so a retiring one finds itself in the list.
    opened: AtomicU64,
    /// The most a connection reads ahead (hyper's `max_buf_size`), see [`Pool::set_read_ahead`].
    read_ahead: AtomicUsize,
    slots: Option<Slots>,
    /// The pool itself, for the tasks that watch busy connections while requests wait.
    me: Weak<Self>,
}

struct Pooled<M> {
    sender: http1::SendRequest<ProxyBody>,
    meta: M,
    /// Its number.
    id: u64,
    /// When its last request was sent.
    last_used: Instant,
}

/// What a request that waited found.
enum Queued<M> {
    /// A connection that became free.
    Free(http1::SendRequest<ProxyBody>, M, u64),
    /// A slot for a new one.
    Slot(OwnedSemaphorePermit),
}

impl<M> Pooled<M> {
    /// Closed, or free and unused for longer than `idle_timeout` (a busy one is never cut off).
    fn spent(&self, now: Instant, idle_timeout: Duration) -> bool {
        self.sender.is_closed() || (self.sender.is_ready() && now - self.last_used > idle_timeout)
    }
}

impl<D: Dial, R: Retire<D::Meta>> Pool<D, R> {
    /// A pool through `dialer`; a task closes connections idle past `idle_timeout` until the pool is
    /// dropped.
    pub fn new(dialer: D, retire: R, idle_timeout: Duration, peer: &'static str) -> Arc<Self> {
        Self::bounded(dialer, retire, idle_timeout, peer, None)
    }

    /// [`Pool::new`], holding at most `limit`'s connections open when there is a limit.
    pub fn bounded(
        dialer: D,
        retire: R,
        idle_timeout: Duration,
        peer: &'static str,
        limit: Option<Limit>,
    ) -> Arc<Self> {
        let pool = Arc::new_cyclic(|me| Pool {
            dialer,
            retire,
            idle_timeout,
            keep: true,
            peer,
            conns: Arc::new(Mutex::new(VecDeque::new())),
            opened: AtomicU64::new(0),
            read_ahead: AtomicUsize::new(MAX_READ_BUFFER),
            slots: limit.map(|limit| Slots {
                limit,
                slots: Arc::new(Semaphore::new(limit.max.max(1))),
                freed: Notify::new(),
            }),
            me: me.clone(),
        });
        sweep_idle(&pool, idle_timeout, Self::purge);
        pool
    }

    /// A pool that keeps no connection: each request gets a new one, which closes after it.
    pub fn unpooled(dialer: D, retire: R, peer: &'static str) -> Self {
        Pool {
            dialer,
            retire,
            idle_timeout: Duration::ZERO,
            keep: false,
            peer,
            conns: Arc::new(Mutex::new(VecDeque::new())),
            opened: AtomicU64::new(0),
            read_ahead: AtomicUsize::new(MAX_READ_BUFFER),
            slots: None,
            me: Weak::new(),
        }
    }

    /// Sends `req` (origin form, Host set) on a free connection when there is one, else on a new one.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, Error<D::Error>> {
        while let Some((mut sender, meta, id)) = self.checkout() {
            match sender.try_send_request(req).await {
                Ok(mut response) => {
                    self.put_back(sender, meta, id, &mut response);
                    return Ok(response);
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) => {
                        debug!(peer = self.peer, error = %error.error(), "pooled connection closed; trying another");
                        req = unsent;
                    }
                    None => return Err(Error::Request(error.into_error())),
                },
            }
        }
        let slot = match &self.slots {
            None => None,
            Some(slots) => match slots.slots.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                // Boxed, as connecting is below: waiting is rare.
                Err(_) => match Box::pin(self.queue(slots)).await? {
                    Queued::Slot(slot) => Some(slot),
                    Queued::Free(mut sender, meta, id) => {
                        return match sender.try_send_request(req).await {
                            Ok(mut response) => {
                                self.put_back(sender, meta, id, &mut response);
                                Ok(response)
                            }
                            Err(error) => Err(Error::Request(error.into_error())),
                        };
                    }
                },
            },
        };
        // Boxed: connecting is rare and its future large; every request's future would otherwise
        // carry room for it, copied on each move.
        let (mut sender, meta, id) = Box::pin(self.connect(slot)).await?;
        match sender.try_send_request(req).await {
            Ok(mut response) => {
                self.put_back(sender, meta, id, &mut response);
                Ok(response)
            }
            Err(error) => Err(Error::Request(error.into_error())),
        }
    }

    /// The most recently used free connection, dropping closed, long-idle and retired ones met on
    /// the way.
    fn checkout(&self) -> Option<(http1::SendRequest<ProxyBody>, D::Meta, u64)> {
        let mut conns = self.conns.lock();
        let now = Instant::now();
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            let conn = &conns[i];
            if conn.spent(now, self.idle_timeout) {
                conns.remove(i);
            } else if conn.sender.is_ready() {
                let conn = conns.remove(i)?;
                if !self.retire.retire(&conn.meta) {
                    return Some((conn.sender, conn.meta, conn.id));
                }
            }
        }
        None
    }

    /// Back into the list right after sending, still busy with this exchange; a connection retired
    /// meanwhile is let go instead, and closes once this exchange is over. An upgraded one goes to
    /// the tunnel, its meta in `response`'s extensions.
    fn put_back(
        &self,
        sender: http1::SendRequest<ProxyBody>,
        meta: D::Meta,
        id: u64,
        response: &mut Response<Incoming>,
    ) {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            response
                .extensions_mut()
                .insert(UpgradedMeta(Arc::new(meta)));
            return;
        }
        if !self.keep || sender.is_closed() || self.retire.retire(&meta) {
            return;
        }
        self.conns.lock().push_back(Pooled {
            sender,
            meta,
            id,
            last_used: Instant::now(),
        });
        // Requests waiting for a connection watch it from now on (no lock when none waits).
        if let Some(slots) = &self.slots {
            slots.freed.notify_waiters();
        }
    }

    /// Waits, at most the limit's wait, for a free connection or a slot for a new one.
    async fn queue(&self, slots: &Slots) -> Result<Queued<D::Meta>, Error<D::Error>> {
        let start = Instant::now();
        loop {
            let freed = slots.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so a connection freed in between still wakes us.
            freed.as_mut().enable();
            if let Some((sender, meta, id)) = self.checkout() {
                return Ok(Queued::Free(sender, meta, id));
            }
            if let Ok(slot) = slots.slots.clone().try_acquire_owned() {
                return Ok(Queued::Slot(slot));
            }
            self.watch_busy();
            tokio::select! {
                () = freed => {}
                slot = slots.slots.clone().acquire_owned() => {
                    if let Ok(slot) = slot {
                        return Ok(Queued::Slot(slot));
                    }
                }
                () = tokio::time::sleep_until(start + slots.limit.wait) => {
                    return Err(Error::Busy {
                        max: slots.limit.max,
                        waited: slots.limit.wait,
                    });
                }
            }
        }
    }

    /// Takes every busy connection out of the list and puts it back, free, the moment its exchange
    /// ends, telling the requests that wait. Only while requests wait: it costs a task per connection.
    fn watch_busy(&self) {
        let busy: VecDeque<Pooled<D::Meta>> = {
            let mut conns = self.conns.lock();
            let (busy, rest) = std::mem::take(&mut *conns)
                .into_iter()
                .partition(|c| !c.sender.is_ready() && !c.sender.is_closed());
            *conns = rest;
            busy
        };
        for mut conn in busy {
            let pool = self.me.clone();
            tokio::spawn(async move {
                let ready = poll_fn(|cx| conn.sender.poll_ready(cx)).await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                if ready.is_ok() {
                    conn.last_used = Instant::now();
                    pool.conns.lock().push_back(conn);
                }
                if let Some(slots) = &pool.slots {
                    slots.freed.notify_waiters();
                }
            });
        }
    }

    async fn connect(
        &self,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<(http1::SendRequest<ProxyBody>, D::Meta, u64), Error<D::Error>> {
        let connected = self.dialer.dial().await.map_err(Error::Dial)?;
        let io = SlotIo {
            io: connected.io,
            _slot: slot,
        };
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(self.read_ahead.load(Ordering::Relaxed).max(8192))
            .handshake(TokioIo::new(io))
            .await
            .map_err(Error::Handshake)?;
        let peer = self.peer;
        let id = self.opened.fetch_add(1, Ordering::Relaxed);
        let lifetime = self.retire.lifetime(&connected.meta);
        let conns = Arc::downgrade(&self.conns);
        tokio::spawn(async move {
            let conn = conn.with_upgrades();
            let driven = match lifetime {
                None => Some(conn.await),
                Some(lifetime) => {
                    lifetime
                        .drive(conn, move || {
                            debug!(
                                peer,
                                "HTTP/1.1 connection retired; it closes once its exchange is over"
                            );
                            if let Some(conns) = conns.upgrade() {
                                conns.lock().retain(|c| c.id != id);
                            }
                        })
                        .await
                }
            };
            match driven {
                Some(Err(error)) => debug!(peer, %error, "HTTP/1.1 connection ended with an error"),
                Some(Ok(())) => {}
                None => debug!(peer, "HTTP/1.1 connection closed at its deadline"),
            }
        });
        Ok((sender, connected.meta, id))
    }

    /// Lets connections opened from now on read up to `bytes` ahead (64 KiB unless set; at least
    /// 8 KiB): a response head larger than that fails its request.
    pub fn set_read_ahead(&self, bytes: usize) {
        self.read_ahead.store(bytes, Ordering::Relaxed);
    }

    /// Closes connections that have been idle for longer than the idle timeout.
    fn purge(&self) {
        let now = Instant::now();
        self.conns
            .lock()
            .retain(|c| !c.spent(now, self.idle_timeout));
    }

    /// Connections in the list (busy or free), but those watched while requests wait.
    pub fn len(&self) -> usize {
        self.conns.lock().len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.conns.lock().is_empty()
    }
}

/// A connection's socket, holding its slot of the pool's limit for as long as it is open: in the
/// pool, or in the tunnel an upgrade handed it to.
struct SlotIo<I> {
    io: I,
    _slot: Option<OwnedSemaphorePermit>,
}

impl<I: AsyncRead + Unpin> AsyncRead for SlotIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for SlotIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::header::{CONNECTION, UPGRADE};
    use http_body_util::{BodyExt, Either, Full};
    use hyper::service::service_fn;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::dial::{ConnectError, Connected, Protocol, TcpDial};
    use crate::test_peer::counting_peer;

    /// A loopback HTTP/1.1 peer answering "ok" (after MS milliseconds to `/wait/MS`, or `101` to a
    /// request that asks to upgrade), counting the connections it accepts; with `keep_alive` false it
    /// closes each connection after one response.
    async fn peer(keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        counting_peer(move |stream| async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(keep_alive)
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(|req: Request<Incoming>| async move {
                        if let Some(ms) = req.uri().path().strip_prefix("/wait/") {
                            let ms = ms.parse().unwrap_or(0);
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                        if req.headers().contains_key(UPGRADE) {
                            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            let headers = response.headers_mut();
                            headers.insert(CONNECTION, "upgrade".parse().unwrap());
                            headers.insert(UPGRADE, "test".parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }),
                )
                .with_upgrades()
                .await;
        })
        .await
    }

    fn tcp(addr: SocketAddr) -> TcpDial {
        TcpDial {
            addr,
            connect_timeout: Duration::from_secs(5),
            protocol: Protocol::Http1,
        }
    }

    /// A pool to a fresh [`peer`], and the peer's connection count.
    async fn pool_to_peer(
        keep_alive: bool,
        idle: Duration,
    ) -> (Arc<Pool<TcpDial>>, Arc<AtomicUsize>) {
        let (addr, accepted) = peer(keep_alive).await;
        (
            Pool::new(tcp(addr), NeverRetire, idle, "the test peer"),
            accepted,
        )
    }

    fn get() -> Request<ProxyBody> {
        get_target("/")
    }

    fn get_target(target: &str) -> Request<ProxyBody> {
        Request::get(target)
            .header("host", "svc")
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap()
    }

    async fn exchange<D: Dial, R: Retire<D::Meta>>(pool: &Pool<D, R>) -> String {
        let response = pool.send(get()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (pool, accepted) = pool_to_peer(true, Duration::from_secs(60)).await;
        for _ in 0..10 {
            assert_eq!(exchange(&pool).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.len(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_get_their_own_connections_then_reuse_them() {
        let (pool, accepted) = pool_to_peer(true, Duration::from_secs(60)).await;
        for _ in 0..3 {
            let (a, b, c, d) = tokio::join!(
                exchange(&pool),
                exchange(&pool),
                exchange(&pool),
                exchange(&pool)
            );
            assert!([a, b, c, d].iter().all(|r| r == "ok"));
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!(
            (1..=4).contains(&opened),
            "{opened} connections for 3 rounds of 4 concurrent requests"
        );
    }

    #[tokio::test]
    async fn a_connection_the_peer_closed_is_not_used_again() {
        let (pool, accepted) = pool_to_peer(false, Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert_eq!(exchange(&pool).await, "ok");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_idle_past_the_timeout_is_not_reused_and_is_swept() {
        let idle = Duration::from_secs(10);
        let (pool, accepted) = pool_to_peer(true, idle).await;
        assert_eq!(exchange(&pool).await, "ok");
        // Used again within the timeout: the same connection.
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(exchange(&pool).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Without traffic, the sweep (every half timeout) closes it within one and a half.
        tokio::time::sleep(idle * 3 / 2 + Duration::from_millis(1)).await;
        assert_eq!(pool.len(), 0, "an idle connection was kept");
        assert_eq!(exchange(&pool).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_dial_error() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let pool = Pool::new(
            tcp(addr),
            NeverRetire,
            Duration::from_secs(60),
            "the test peer",
        );
        let error = pool.send(get()).await.unwrap_err();
        assert!(
            matches!(error, Error::Dial(ConnectError { .. })),
            "{error:?}"
        );
    }

    /// TCP to a peer, numbering the connections from 1 (the meta).
    struct Numbered(TcpDial, AtomicUsize);

    impl Dial for Numbered {
        type Io = TcpStream;
        type Meta = usize;
        type Error = ConnectError;

        async fn dial(&self) -> Result<Connected<TcpStream, usize>, ConnectError> {
            let connected = self.0.dial().await?;
            Ok(Connected {
                io: connected.io,
                meta: self.1.fetch_add(1, Ordering::SeqCst) + 1,
                protocol: connected.protocol,
            })
        }
    }

    /// Retires connection 1 and counts what it was asked.
    struct RetireFirst(AtomicUsize);

    impl Retire<usize> for RetireFirst {
        fn retire(&self, meta: &usize) -> bool {
            self.0.fetch_add(1, Ordering::SeqCst);
            *meta == 1
        }
    }

    #[tokio::test]
    async fn a_retired_connection_is_not_handed_out_again() {
        let (addr, accepted) = peer(true).await;
        let pool = Pool::new(
            Numbered(tcp(addr), AtomicUsize::new(0)),
            RetireFirst(AtomicUsize::new(0)),
            Duration::from_secs(60),
            "the test peer",
        );
        for _ in 0..3 {
            assert_eq!(exchange(&pool).await, "ok");
            // The exchange is over once hyper has read the end of the response.
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.len(), 1);
        // Asked as each exchange hands its connection back (three times), and at the third checkout:
        // the first connection never came back, and a fresh connection is not judged.
        assert_eq!(pool.retire.0.load(Ordering::SeqCst), 4);
    }

    /// TCP whose reads note the most room they were given, which is the free part of the HTTP/1.1
    /// connection's read buffer.
    struct ReadRoom {
        stream: TcpStream,
        most: Arc<AtomicUsize>,
    }

    impl tokio::io::AsyncRead for ReadRoom {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.most.fetch_max(buf.remaining(), Ordering::SeqCst);
            std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for ReadRoom {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.stream).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
        }
    }

    struct MeasuredDial(TcpDial, Arc<AtomicUsize>);

    impl Dial for MeasuredDial {
        type Io = ReadRoom;
        type Meta = ();
        type Error = ConnectError;

        async fn dial(&self) -> Result<Connected<ReadRoom, ()>, ConnectError> {
            let connected = self.0.dial().await?;
            Ok(Connected {
                io: ReadRoom {
                    stream: connected.io,
                    most: self.1.clone(),
                },
                meta: (),
                protocol: connected.protocol,
            })
        }
    }

    #[tokio::test]
    async fn a_kept_connection_holds_a_bounded_read_buffer_after_large_responses() {
        // 1 MiB answers, written as fast as loopback takes them: every read the connection makes
        // fills the room it offers, which is what makes hyper's buffer grow.
        let body = Bytes::from(vec![b'x'; 1 << 20]);
        let (addr, accepted) = counting_peer(move |stream| {
            let body = body.clone();
            async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(
                        TokioIo::new(stream),
                        service_fn(move |_req: Request<Incoming>| {
                            let body = body.clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(Response::new(Full::new(body)))
                            }
                        }),
                    )
                    .await;
            }
        })
        .await;
        let most = Arc::new(AtomicUsize::new(0));
        let pool = Pool::new(
            MeasuredDial(tcp(addr), most.clone()),
            NeverRetire,
            Duration::from_secs(60),
            "the test peer",
        );
        for _ in 0..8 {
            let response = pool.send(get()).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 1 << 20);
            tokio::task::yield_now().await;
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the connection was not reused"
        );
        assert_eq!(pool.len(), 1);
        // The buffer may hold up to MAX_READ_BUFFER and, as a Vec grows, up to twice that in all;
        // hyper's own default lets it grow to 400 KiB and keeps it for the connection's life.
        let most = most.load(Ordering::SeqCst);
        assert!(
            most <= 2 * MAX_READ_BUFFER,
            "a read was offered {most} bytes of room: the read buffer grew past {MAX_READ_BUFFER} bytes"
        );
    }

    #[tokio::test]
    async fn a_response_head_over_the_read_buffer_is_an_error() {
        let (addr, _) = counting_peer(|stream| async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .max_buf_size(1 << 20)
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(|_req: Request<Incoming>| async move {
                        let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                        let big = "v".repeat(4 * MAX_READ_BUFFER);
                        response.headers_mut().insert("x-big", big.parse().unwrap());
                        Ok::<_, std::convert::Infallible>(response)
                    }),
                )
                .await;
        })
        .await;
        let pool = Pool::new(
            tcp(addr),
            NeverRetire,
            Duration::from_secs(60),
            "the test peer",
        );
        match pool.send(get()).await {
            Err(Error::Request(error)) => assert!(error.is_parse_too_large(), "{error:?}"),
            Err(other) => panic!("{other:?}"),
            Ok(response) => panic!(
                "a {} byte response head was taken ({})",
                4 * MAX_READ_BUFFER,
                response.status()
            ),
        }
    }

    #[tokio::test]
    async fn an_unpooled_pool_keeps_no_connection() {
        let (addr, accepted) = peer(true).await;
        let pool = Pool::unpooled(tcp(addr), NeverRetire, "the test peer");
        for _ in 0..3 {
            assert_eq!(exchange(&pool).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.len(), 0);
    }

    /// ... and its meta goes with the response, for the tunnel's owner.
    #[tokio::test]
    async fn an_upgraded_connection_is_not_kept() {
        let (pool, accepted) = pool_to_peer(true, Duration::from_secs(60)).await;
        let upgrade = Request::get("/")
            .header("host", "svc")
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, "test")
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap();
        let response = pool.send(upgrade).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            pool.len(),
            0,
            "an upgraded connection went back into the pool"
        );
        assert!(response.extensions().get::<UpgradedMeta<()>>().is_some());
        assert_eq!(exchange(&pool).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A pool to a fresh [`peer`] holding at most one connection, waiting at most `wait` for it.
    async fn pool_of_one(wait: Duration) -> (Arc<Pool<TcpDial>>, Arc<AtomicUsize>) {
        let (addr, accepted) = peer(true).await;
        let limit = Limit { max: 1, wait };
        let pool = Pool::bounded(
            tcp(addr),
            NeverRetire,
            Duration::from_secs(60),
            "the test peer",
            Some(limit),
        );
        (pool, accepted)
    }

    #[tokio::test]
    async fn at_the_limit_a_request_waits_for_the_busy_connection() {
        let (pool, accepted) = pool_of_one(Duration::from_secs(10)).await;
        let first = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let response = pool.send(get_target("/wait/300")).await.unwrap();
                response.into_body().collect().await.unwrap().to_bytes()
            })
        };
        // The first has its connection (and the only slot) before the second asks.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(exchange(&pool).await, "ok");
        assert_eq!(first.await.unwrap(), Bytes::from_static(b"ok"));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "a second connection past the limit"
        );
        // The connection the second request waited for is back in the pool, free.
        assert_eq!(exchange(&pool).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn at_the_limit_a_request_that_waited_too_long_is_busy() {
        let (pool, accepted) = pool_of_one(Duration::from_millis(200)).await;
        let held = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.send(get_target("/wait/60000")).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let error = pool.send(get()).await.unwrap_err();
        assert!(matches!(error, Error::Busy { max: 1, .. }), "{error:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // The held exchange ends (its connection with it): the slot is free again.
        held.abort();
        drop(held);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(exchange(&pool).await, "ok");
    }

    #[tokio::test]
    async fn an_upgraded_connection_keeps_its_slot_until_its_socket_closes() {
        let (pool, accepted) = pool_of_one(Duration::from_millis(200)).await;
        let upgrade = Request::get("/")
            .header("host", "svc")
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, "test")
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap();
        let mut response = pool.send(upgrade).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let tunnel = hyper::upgrade::on(&mut response).await.unwrap();
        let error = pool.send(get()).await.unwrap_err();
        assert!(matches!(error, Error::Busy { .. }), "{error:?}");
        drop(tunnel);
        assert_eq!(exchange(&pool).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
