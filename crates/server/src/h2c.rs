//! One HTTP/2 cleartext (h2c, prior knowledge) connection to the backend, shared by every request
//! (`backend_http2 = true`).
//!
//! Over HTTP/1.1 each request costs the listener a write and a read of its own on a connection of
//! its own; on one HTTP/2 connection the requests that arrive together on the mesh link leave in one
//! write and their responses come back in one read. Traefik's entrypoints accept h2c with prior
//! knowledge. Requests that upgrade (WebSocket) still go over HTTP/1.1 ([`phoenix_mesh_transport::pool`]).
//!
//! Driven with the `h2` crate directly, as the client sidecar drives its mesh link
//! ([`phoenix_mesh_transport::h2::client`]): each request's own task opens its stream and awaits the
//! response, where hyper's HTTP/2 client would pass it through its connection task and spawn a task
//! per request to wait for the answer.
//!
//! The connection is dialled on first use and again after it closes (the backend went away, sent
//! GOAWAY, or failed it), one dial at a time; a request the connection turned down before sending
//! any of it is sent once more on a fresh one. Unused for `idle_timeout`, it is closed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, Response};
use http_body::Body as _;
use http_body_util::{Either, Full};
use phoenix_mesh_common::ProxyBody;
use phoenix_mesh_transport::h2::client::{self as h2body, H2Body};
use phoenix_mesh_transport::sweep::sweep_idle;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use phoenix_mesh_transport::pool::{connect_tcp, BackendError};

/// The shared h2c connection to one backend.
pub(crate) struct H2cBackend {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    conn: Mutex<Option<Shared>>,
    /// Held while dialling, so that a burst of requests finding no connection opens one, not many.
    dialing: tokio::sync::Mutex<()>,
    /// The last dial that could not connect: when, and why (`io::Error` is not `Clone`).
    failed: Mutex<Option<(Instant, std::io::ErrorKind, String)>>,
}

struct Shared {
    sender: SendRequest<Bytes>,
    /// Set when the connection's task has ended (the connection is gone), or when it turned a
    /// request down (it is going away: a GOAWAY came, and streams still open keep it up a while).
    closed: Arc<AtomicBool>,
    /// When a request last went out on it.
    last_used: Instant,
}

impl Shared {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

impl H2cBackend {
    /// A connection slot for `addr`; a task closes the connection once it has been unused for
    /// `idle_timeout`, until the slot is dropped.
    pub(crate) fn new(
        addr: SocketAddr,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        let backend = Arc::new(H2cBackend {
            addr,
            connect_timeout,
            idle_timeout,
            conn: Mutex::new(None),
            dialing: tokio::sync::Mutex::new(()),
            failed: Mutex::new(None),
        });
        sweep_idle(&backend, idle_timeout, H2cBackend::purge);
        backend
    }

    /// Sends `req` (absolute form: the authority is the request's host) on the shared connection,
    /// dialling it first when there is none.
    ///
    /// A request the backend turned away unprocessed (its stream refused, or above the last stream a
    /// GOAWAY let through, as nginx's does after `keepalive_requests` and Traefik's on shutdown) goes
    /// once more, after a GOAWAY on a fresh connection, if it is idempotent and has no body (RFC 9110
    /// section 9.2.2): `h2` reports a stream cut off by the connection closing after a GOAWAY with the
    /// same error, so only a request that may be repeated anyway is.
    pub(crate) async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<H2Body>, BackendError> {
        let method = req.method().clone();
        let again = (method.is_idempotent() && req.body().is_end_stream()).then(|| head(&req));
        let (sender, closed) = self.ready().await?;
        let error = match h2body::open_stream(sender, req, "the backend").await {
            Ok(response) => return Ok(response),
            Err(error) => error,
        };
        if !turned_away(&error) {
            return Err(error.into());
        }
        let Some(again) = again else {
            return Err(BackendError::TurnedAway(method, error));
        };
        debug!(backend = %self.addr, %error, "h2c backend turned the request away unprocessed; sending it again");
        if error.is_go_away() {
            // Going away: no new streams on it.
            closed.store(true, Ordering::Relaxed);
            self.forget_closed();
        }
        let (sender, _) = self.ready().await?;
        let again = again.map(|()| Either::Right(Full::default()));
        match h2body::open_stream(sender, again, "the backend").await {
            Ok(response) => Ok(response),
            Err(error) if turned_away(&error) => Err(BackendError::TurnedAwayAgain(method, error)),
            Err(error) => Err(error.into()),
        }
    }

    /// A sender ready to open a stream, and its connection's closed flag.
    async fn ready(&self) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), BackendError> {
        let (sender, closed) = match self.current() {
            Some(current) => current,
            // Boxed: dialling is rare and its future large; every request's would carry room for it.
            None => Box::pin(self.dial()).await?,
        };
        match sender.ready().await {
            Ok(sender) => Ok((sender, closed)),
            // Nothing was sent: the connection had a GOAWAY or is gone.
            Err(error) => {
                debug!(backend = %self.addr, %error, "h2c connection going away; dialling again");
                closed.store(true, Ordering::Relaxed);
                self.forget_closed();
                let (sender, closed) = Box::pin(self.dial()).await?;
                Ok((sender.ready().await?, closed))
            }
        }
    }

    /// The open connection's sender and closed flag, if any, marked as used now.
    fn current(&self) -> Option<(SendRequest<Bytes>, Arc<AtomicBool>)> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        match conn.as_mut() {
            Some(shared) if !shared.is_closed() => {
                shared.last_used = Instant::now();
                Some((shared.sender.clone(), shared.closed.clone()))
            }
            _ => {
                *conn = None;
                None
            }
        }
    }

    /// Empties the slot if its connection is closed or going away (another request may have replaced
    /// it already, and then that one stays).
    fn forget_closed(&self) {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if conn.as_ref().is_some_and(Shared::is_closed) {
            *conn = None;
        }
    }

    async fn dial(&self) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), BackendError> {
        let waiting_since = Instant::now();
        let _dialing = self.dialing.lock().await;
        // Another request may have dialled while this one waited.
        if let Some(sender) = self.current() {
            return Ok(sender);
        }
        // A dial that failed while this request waited answers for it too: requests queued behind a
        // backend that does not accept (a full accept queue drops the SYN, so each connect waits out
        // backend_connect_timeout) must not each wait for a dial of their own in turn.
        if let Some((at, kind, message)) =
            &*self.failed.lock().unwrap_or_else(PoisonError::into_inner)
        {
            if *at >= waiting_since {
                return Err(BackendError::Connect(std::io::Error::new(
                    *kind,
                    message.clone(),
                )));
            }
        }
        let stream: TcpStream = match connect_tcp(self.addr, self.connect_timeout).await {
            Ok(stream) => stream,
            Err(BackendError::Connect(error)) => {
                *self.failed.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((Instant::now(), error.kind(), error.to_string()));
                return Err(BackendError::Connect(error));
            }
            Err(error) => return Err(error),
        };
        let (sender, conn) = h2body::client_builder()
            .handshake::<_, Bytes>(stream)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                debug!(backend = %addr, %error, "h2c backend connection ended with an error");
            }
            ended.store(true, Ordering::Relaxed);
        });
        debug!(backend = %addr, "h2c connection to the backend open");
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(Shared {
            sender: sender.clone(),
            closed: closed.clone(),
            last_used: Instant::now(),
        });
        Ok((sender, closed))
    }

    /// Closes the connection when it has been unused for longer than the idle timeout (streams still
    /// open on it finish first: h2 closes the connection once its last sender is dropped and they
    /// are done).
    fn purge(&self) {
        let now = Instant::now();
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if conn
            .as_ref()
            .is_some_and(|s| s.is_closed() || now - s.last_used > self.idle_timeout)
        {
            *conn = None;
        }
    }

    /// Whether a connection is open, for tests.
    #[cfg(test)]
    pub(crate) fn is_open(&self) -> bool {
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|s| !s.is_closed())
    }
}

/// Whether the backend turned a stream away without processing it: refused, or cut off by its GOAWAY.
fn turned_away(error: &h2::Error) -> bool {
    error.reason() == Some(h2::Reason::REFUSED_STREAM) || (error.is_go_away() && error.is_remote())
}

/// A copy of a request's head (method, target, version, headers), for a request without a body that
/// may have to go again.
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
    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::{Either, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::TcpListener;

    use super::*;

    /// A loopback h2c backend answering "ok".
    async fn backend() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
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
        addr
    }

    #[tokio::test]
    async fn an_unused_connection_is_closed_after_the_idle_timeout() {
        let h2c = H2cBackend::new(
            backend().await,
            Duration::from_secs(5),
            Duration::from_millis(100),
        );
        let req = Request::get("http://svc/")
            .body(Either::Right(Full::new(Bytes::new())))
            .unwrap();
        assert_eq!(h2c.send(req).await.unwrap().status(), StatusCode::OK);
        assert!(h2c.is_open());
        // The sweep runs every second at the least.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert!(!h2c.is_open(), "an idle h2c connection was kept");
    }
}
