//! Keep-alive HTTP/1.1 connections to the backend (Traefik), reused for request after request.
//!
//! In place of hyper-util's legacy client, which per request checks a connection out of a keyed pool,
//! moves several large futures around and spawns a task that waits for the connection to become
//! reusable before putting it back. Here a connection goes back into the list as soon as its request
//! is sent; a checkout takes the most recently used one whose previous exchange has finished
//! (`SendRequest::is_ready`, an atomic load), so there is nothing to wait for and nothing to spawn.
//! Connections idle for longer than `idle_timeout` are closed, and a request that a pooled connection
//! turned down before sending any of it (the backend closed it meanwhile) is sent on another one.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::body::ProxyBody;
use crate::sweep::sweep_idle;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

/// Why the backend did not answer.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No connection could be opened (refused, unreachable, timed out).
    #[error("{0}")]
    Connect(std::io::Error),
    /// The connection failed while the request was sent or the response read.
    #[error("{0}")]
    Request(#[from] hyper::Error),
    /// The h2c connection failed, or the backend reset the request's stream.
    #[error("{0}")]
    H2(#[from] h2::Error),
    /// The backend turned the request away unprocessed (h2c), and it is not one to send twice.
    #[error("the backend turned the request away without processing it ({1}: its GOAWAY crossed the request, or it refused the stream); a {0} request is not sent again, only idempotent ones without a body are")]
    TurnedAway(http::Method, h2::Error),
    /// The backend turned an idempotent request away unprocessed, and again when it went once more.
    #[error("the backend turned the request away without processing it, twice ({1}); the {0} request went once more and was turned away again: is the backend shutting down, or over its limit of concurrent streams?")]
    TurnedAwayAgain(http::Method, h2::Error),
}

/// A TCP connection to the backend within `connect_timeout`, with Nagle off.
pub async fn connect_tcp(
    addr: SocketAddr,
    connect_timeout: Duration,
) -> Result<TcpStream, BackendError> {
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(BackendError::Connect(error)),
        Err(_) => {
            return Err(BackendError::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no TCP connection within {connect_timeout:?} (backend_connect_timeout)"),
            )))
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// One backend's connections.
pub struct BackendPool {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Least recently used first. Busy connections stay in the list (they become ready when their
    /// exchange ends); closed ones are dropped when met.
    conns: Mutex<VecDeque<Pooled>>,
}

struct Pooled {
    sender: http1::SendRequest<ProxyBody>,
    /// When its last request was sent.
    last_used: Instant,
}

impl Pooled {
    /// Closed, or free and unused for longer than `idle_timeout` (a busy one is never cut off).
    fn spent(&self, now: Instant, idle_timeout: Duration) -> bool {
        self.sender.is_closed() || (self.sender.is_ready() && now - self.last_used > idle_timeout)
    }
}

impl BackendPool {
    /// A pool for `addr`; a task closes connections idle past `idle_timeout` until the pool is dropped.
    pub fn new(addr: SocketAddr, connect_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        let pool = Arc::new(BackendPool {
            addr,
            connect_timeout,
            idle_timeout,
            conns: Mutex::new(VecDeque::new()),
        });
        sweep_idle(&pool, idle_timeout, BackendPool::purge);
        pool
    }

    /// Sends `req` on a reused connection when one is free, else on a new one.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, BackendError> {
        while let Some(mut sender) = self.checkout() {
            match sender.try_send_request(req).await {
                Ok(response) => {
                    self.put_back(sender, response.status());
                    return Ok(response);
                }
                Err(mut error) => match error.take_message() {
                    // Not sent at all: the backend closed this connection as we picked it.
                    Some(unsent) => {
                        debug!(backend = %self.addr, error = %error.error(), "pooled connection closed; trying another");
                        req = unsent;
                    }
                    None => return Err(error.into_error().into()),
                },
            }
        }
        // Boxed: connecting is rare and its future large; every request's future would otherwise
        // carry room for it, copied on each move.
        let mut sender = Box::pin(self.connect()).await?;
        match sender.try_send_request(req).await {
            Ok(response) => {
                self.put_back(sender, response.status());
                Ok(response)
            }
            Err(error) => Err(error.into_error().into()),
        }
    }

    /// The most recently used connection that is free, dropping closed and long-idle ones met on the way.
    fn checkout(&self) -> Option<http1::SendRequest<ProxyBody>> {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            let conn = &conns[i];
            if conn.spent(now, self.idle_timeout) {
                conns.remove(i);
            } else if conn.sender.is_ready() {
                return conns.remove(i).map(|c| c.sender);
            }
        }
        None
    }

    /// Back into the list right after sending, still busy with this exchange; an upgraded connection
    /// belongs to the tunnel now.
    fn put_back(&self, sender: http1::SendRequest<ProxyBody>, status: StatusCode) {
        if status == StatusCode::SWITCHING_PROTOCOLS || sender.is_closed() {
            return;
        }
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.push_back(Pooled {
            sender,
            last_used: Instant::now(),
        });
    }

    async fn connect(&self) -> Result<http1::SendRequest<ProxyBody>, BackendError> {
        let stream = connect_tcp(self.addr, self.connect_timeout).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = conn.with_upgrades().await {
                debug!(backend = %addr, %error, "backend connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Closes connections that have been idle for longer than the idle timeout.
    fn purge(&self) {
        let now = Instant::now();
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        conns.retain(|c| !c.spent(now, self.idle_timeout));
    }

    /// Connections in the list (busy or free), for tests.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Either, Full};
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;

    /// A loopback HTTP/1.1 backend answering "ok", counting the connections it accepts; with
    /// `keep_alive` false it closes each connection after one response.
    async fn backend(keep_alive: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(
                            TokioIo::new(stream),
                            service_fn(|_req| async {
                                Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                    Bytes::from_static(b"ok"),
                                )))
                            }),
                        ),
                );
            }
        });
        (addr, accepted)
    }

    /// A pool (connect timeout 5 s) to a fresh [`backend`], and the backend's connection count.
    async fn pool_to_backend(
        keep_alive: bool,
        idle: Duration,
    ) -> (Arc<BackendPool>, Arc<AtomicUsize>) {
        let (addr, accepted) = backend(keep_alive).await;
        (
            BackendPool::new(addr, Duration::from_secs(5), idle),
            accepted,
        )
    }

    async fn get(pool: &BackendPool) -> String {
        let req = Request::get("/")
            .header("host", "svc")
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap();
        let response = pool.send(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        String::from_utf8(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (pool, accepted) = pool_to_backend(true, Duration::from_secs(60)).await;
        for _ in 0..10 {
            assert_eq!(get(&pool).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.len(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_get_their_own_connections_then_reuse_them() {
        let (pool, accepted) = pool_to_backend(true, Duration::from_secs(60)).await;
        for _ in 0..3 {
            let replies = four_at_once(&pool).await;
            assert!(replies.iter().all(|r| r == "ok"), "{replies:?}");
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!(
            (1..=4).contains(&opened),
            "{opened} connections for 3 rounds of 4 concurrent requests"
        );
    }

    async fn four_at_once(pool: &BackendPool) -> [String; 4] {
        let (a, b, c, d) = tokio::join!(get(pool), get(pool), get(pool), get(pool));
        [a, b, c, d]
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_not_used_again() {
        let (pool, accepted) = pool_to_backend(false, Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert_eq!(get(&pool).await, "ok");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed() {
        let (pool, accepted) = pool_to_backend(true, Duration::from_millis(100)).await;
        assert_eq!(get(&pool).await, "ok");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(get(&pool).await, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "an idle connection was reused past the timeout"
        );
        // And without traffic, the reaper closes them.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(pool.len(), 0);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let pool = BackendPool::new(addr, Duration::from_secs(5), Duration::from_secs(60));
        let req = Request::get("/")
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap();
        let error = pool.send(req).await.unwrap_err();
        assert!(matches!(error, BackendError::Connect(_)), "{error:?}");
    }
}
