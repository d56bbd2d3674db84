//! The shared HTTP/2 connection to a mesh listener that every plain request rides.
//!
//! In place of hyper-util's legacy client for this path: that client checks a connection out of a keyed
//! pool, wraps and boxes several large futures per request and learns about stale connections only
//! from each response. Here a request clones the current connection's `SendRequest` under a short lock.
//! A connection is replaced, for the next request, when it is closed, idle past `pool_idle_timeout`, or
//! stale: its listener certificate expires within the retire margin, or it was opened before our own
//! certificate or trust was reloaded. Requests in flight on a replaced connection finish on it; hyper
//! closes it when the last of them is done. One dial at a time: requests arriving meanwhile wait for
//! it and share the result. A request the connection turned down unsent (it was closing) is sent once
//! more on a fresh connection.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use phoenix_mesh_common::periodic::sweep_idle;
use phoenix_mesh_common::ProxyBody;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::connector::{ConnInfo, MeshConnector, MeshStream};

/// Why a request found no answer on the link.
pub(crate) type LinkError = Box<dyn std::error::Error + Send + Sync>;

/// What [`H2Link::send`] came to.
pub(crate) enum Sent {
    Response(Response<Incoming>),
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
    sender: http2::SendRequest<ProxyBody>,
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
        let current = {
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            if current.h1_until.is_some_and(|until| Instant::now() < until) {
                return Ok(Sent::NotH2(req));
            }
            self.checkout(&mut current)
        };
        let (id, mut sender) = match current {
            Some(conn) => conn,
            // Boxed: dialing (TCP, TLS, the HTTP/2 handshake) is rare and its future is large, and
            // every request's future would otherwise carry room for it, copied on each move.
            None => match Box::pin(self.connect()).await? {
                Some(conn) => conn,
                None => return Ok(Sent::NotH2(req)),
            },
        };
        match sender.try_send_request(req).await {
            Ok(response) => Ok(Sent::Response(response)),
            Err(mut error) => match error.take_message() {
                Some(unsent) => {
                    debug!(error = %error.error(), "mesh connection closing; sending on a fresh one");
                    self.forget(id);
                    match Box::pin(self.connect()).await? {
                        Some((_, mut fresh)) => {
                            Ok(Sent::Response(fresh.send_request(unsent).await?))
                        }
                        None => Ok(Sent::NotH2(unsent)),
                    }
                }
                None => Err(error.into_error().into()),
            },
        }
    }

    /// The current connection's number and a clone of its sender, if it is still worth using.
    fn checkout(&self, current: &mut Current) -> Option<(u64, http2::SendRequest<ProxyBody>)> {
        let now = Instant::now();
        let conn = current.conn.as_mut()?;
        let usable = !conn.sender.is_closed() && now - conn.last_used <= self.idle_timeout;
        match self.connector.retirement(conn.info, self.retire_margin) {
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
    async fn connect(&self) -> Result<Option<(u64, http2::SendRequest<ProxyBody>)>, LinkError> {
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
        let info = stream.info();
        let sender = handshake(stream).await?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        current.dialed += 1;
        let id = current.dialed;
        current.conn = Some(Conn {
            id,
            sender: sender.clone(),
            info,
            last_used: Instant::now(),
        });
        Ok(Some((id, sender)))
    }

    /// Drops the connection if it has been idle past the timeout (hyper then closes it).
    fn purge(&self) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current
            .conn
            .as_ref()
            .is_some_and(|c| c.sender.is_closed() || c.last_used.elapsed() > self.idle_timeout)
        {
            current.conn = None;
        }
    }
}

async fn handshake(stream: MeshStream) -> Result<http2::SendRequest<ProxyBody>, LinkError> {
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            debug!(%error, "mesh connection ended with an error");
        }
    });
    Ok(sender)
}
