//! One HTTP/2 cleartext (h2c, prior knowledge) connection to the backend, shared by every request
//! (`backend_http2 = true`).
//!
//! Over HTTP/1.1 each request costs the listener a write and a read of its own on a connection of
//! its own; on one HTTP/2 connection the requests that arrive together on the mesh link leave in one
//! write and their responses come back in one read. Traefik's entrypoints accept h2c with prior
//! knowledge. Requests that upgrade (WebSocket) still go over HTTP/1.1 ([`crate::pool`]).
//!
//! The connection is dialled on first use and again after it closes (the backend went away, sent
//! GOAWAY, or failed it), one dial at a time; a request the connection turned down before sending
//! any of it is sent once more on a fresh one. Unused for `idle_timeout`, it is closed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use phoenix_mesh_common::periodic::sweep_idle;
use phoenix_mesh_common::ProxyBody;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::pool::{connect_tcp, BackendError};

/// The shared h2c connection to one backend.
pub(crate) struct H2cBackend {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    builder: http2::Builder<TokioExecutor>,
    conn: Mutex<Option<Shared>>,
    /// Held while dialling, so that a burst of requests finding no connection opens one, not many.
    dialing: tokio::sync::Mutex<()>,
    /// The last dial that could not connect: when, and why (`io::Error` is not `Clone`).
    failed: Mutex<Option<(Instant, std::io::ErrorKind, String)>>,
}

struct Shared {
    sender: http2::SendRequest<ProxyBody>,
    /// When a request last went out on it.
    last_used: Instant,
}

impl H2cBackend {
    /// A connection slot for `addr`; a task closes the connection once it has been unused for
    /// `idle_timeout`, until the slot is dropped.
    pub(crate) fn new(
        addr: SocketAddr,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        let backend = Arc::new(H2cBackend {
            addr,
            connect_timeout,
            idle_timeout,
            builder,
            conn: Mutex::new(None),
            dialing: tokio::sync::Mutex::new(()),
            failed: Mutex::new(None),
        });
        sweep_idle(&backend, idle_timeout, H2cBackend::purge);
        backend
    }

    /// Sends `req` (absolute form: the authority is the request's host) on the shared connection,
    /// dialling it first when there is none.
    pub(crate) async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, BackendError> {
        let mut retried = false;
        loop {
            let mut sender = match self.current() {
                Some(sender) => sender,
                None => Box::pin(self.dial()).await?,
            };
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    // Not sent at all: the connection closed as we picked it.
                    Some(unsent) if !retried => {
                        debug!(backend = %self.addr, error = %error.error(), "h2c connection closed; dialling again");
                        self.forget_closed();
                        retried = true;
                        req = unsent;
                    }
                    _ => return Err(error.into_error().into()),
                },
            }
        }
    }

    /// The open connection, if any, marked as used now.
    fn current(&self) -> Option<http2::SendRequest<ProxyBody>> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        match conn.as_mut() {
            Some(shared) if !shared.sender.is_closed() => {
                shared.last_used = Instant::now();
                Some(shared.sender.clone())
            }
            _ => {
                *conn = None;
                None
            }
        }
    }

    /// Empties the slot if its connection has closed (another request may have replaced it already).
    fn forget_closed(&self) {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if conn.as_ref().is_some_and(|s| s.sender.is_closed()) {
            *conn = None;
        }
    }

    async fn dial(&self) -> Result<http2::SendRequest<ProxyBody>, BackendError> {
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
        let (sender, conn) = self.builder.handshake(TokioIo::new(stream)).await?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                debug!(backend = %addr, %error, "h2c backend connection ended with an error");
            }
        });
        debug!(backend = %addr, "h2c connection to the backend open");
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(Shared {
            sender: sender.clone(),
            last_used: Instant::now(),
        });
        Ok(sender)
    }

    /// Closes the connection when it has been unused for longer than the idle timeout (streams still
    /// open on it finish first: the connection ends once its last handle is dropped and they are done).
    fn purge(&self) {
        let now = Instant::now();
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if conn
            .as_ref()
            .is_some_and(|s| s.sender.is_closed() || now - s.last_used > self.idle_timeout)
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
            .is_some_and(|s| !s.sender.is_closed())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::{Either, Full};
    use hyper::service::service_fn;
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
