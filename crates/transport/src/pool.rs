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
//!   would be handed out); the requests it carries finish on it.
//! - NEVER keep an upgraded connection (`101 Switching Protocols`): it belongs to the tunnel.
//! - ALWAYS send a request a pooled connection turned down before sending any of it (the peer closed
//!   it as we picked it) on another one; a request that failed on a fresh connection is an error.
//! - NEVER let a connection read more than 64 KiB ahead (`MAX_READ_BUFFER`): hyper's default lets
//!   the read buffer grow to 400 KiB on large responses, and a connection keeps it for as long as it
//!   lives, in every connection the pool keeps. A response head must fit in it; a larger one fails
//!   the request.
//! - ALWAYS speak HTTP/1.1: the dialer must make HTTP/1.1 connections (the client's offers only
//!   `http/1.1` through ALPN for this pool).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::debug;

use crate::body::ProxyBody;
use crate::dial::{Dial, NeverRetire, Retire};
use crate::sweep::sweep_idle;

/// The most a connection reads ahead of what the request's owner has taken (hyper's `max_buf_size`),
/// and so about the largest response head it accepts; the sidecars take request heads up to
/// `max_header_bytes`, 64 KiB by default.
const MAX_READ_BUFFER: usize = 64 * 1024;

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
    /// exchange ends); closed ones are dropped when met.
    conns: Mutex<VecDeque<Pooled<D::Meta>>>,
}

struct Pooled<M> {
    sender: http1::SendRequest<ProxyBody>,
    meta: M,
    /// When its last request was sent.
    last_used: Instant,
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
        let pool = Arc::new(Pool {
            dialer,
            retire,
            idle_timeout,
            keep: true,
            peer,
            conns: Mutex::new(VecDeque::new()),
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
            conns: Mutex::new(VecDeque::new()),
        }
    }

    /// Sends `req` (origin form, Host set) on a free connection when there is one, else on a new one.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, Error<D::Error>> {
        while let Some((mut sender, meta)) = self.checkout() {
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.put_back(sender, meta, response.status());
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
        // Boxed: connecting is rare and its future large; every request's future would otherwise
        // carry room for it, copied on each move.
        let (mut sender, meta) = Box::pin(self.connect()).await?;
        match sender.try_send_request(req).await {
            Ok(response) => {
                self.put_back(sender, meta, response.status());
                Ok(response)
            }
            Err(error) => Err(Error::Request(error.into_error())),
        }
    }

    /// The most recently used free connection, dropping closed, long-idle and retired ones met on
    /// the way.
    fn checkout(&self) -> Option<(http1::SendRequest<ProxyBody>, D::Meta)> {
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
                    return Some((conn.sender, conn.meta));
                }
            }
        }
        None
    }

    /// Back into the list right after sending, still busy with this exchange.
    fn put_back(&self, sender: http1::SendRequest<ProxyBody>, meta: D::Meta, status: StatusCode) {
        if !self.keep || status == StatusCode::SWITCHING_PROTOCOLS || sender.is_closed() {
            return;
        }
        self.conns.lock().push_back(Pooled {
            sender,
            meta,
            last_used: Instant::now(),
        });
    }

    async fn connect(&self) -> Result<(http1::SendRequest<ProxyBody>, D::Meta), Error<D::Error>> {
        let connected = self.dialer.dial().await.map_err(Error::Dial)?;
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(MAX_READ_BUFFER)
            .handshake(TokioIo::new(connected.io))
            .await
            .map_err(Error::Handshake)?;
        let peer = self.peer;
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                debug!(peer, %error, "HTTP/1.1 connection ended with an error");
            }
        });
        Ok((sender, connected.meta))
    }

    /// Closes connections that have been idle for longer than the idle timeout.
    fn purge(&self) {
        let now = Instant::now();
        self.conns
            .lock()
            .retain(|c| !c.spent(now, self.idle_timeout));
    }

    /// Connections in the list (busy or free).
    pub fn len(&self) -> usize {
        self.conns.lock().len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.conns.lock().is_empty()
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

    /// A loopback HTTP/1.1 peer answering "ok" (or `101` to a request that asks to upgrade),
    /// counting the connections it accepts; with `keep_alive` false it closes each connection after
    /// one response.
    async fn peer(keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        counting_peer(move |stream| async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(keep_alive)
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(|req: Request<Incoming>| async move {
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
        Request::get("/")
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
        // Asked at the second and third checkouts only: a fresh connection is not judged.
        assert_eq!(pool.retire.0.load(Ordering::SeqCst), 2);
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
        assert_eq!(exchange(&pool).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
