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
        let (sender, conn) = http1::handshake(TokioIo::new(connected.io))
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
}
