//! Accepting connections and serving HTTP on them until shutdown, then draining what is in flight.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

/// Limits for the HTTP side of a listener.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// How long a client may take to send a complete request head.
    pub header_read_timeout: Duration,
    /// Largest request head accepted; a larger one gets 431.
    pub max_header_bytes: usize,
    /// Largest number of concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 256,
        }
    }
}

/// The HTTP/1.1 limits; hyper-util's `Http1Builder` and hyper's `http1::Builder` have the same
/// setters but no common trait.
macro_rules! http1_limits {
    ($builder:expr, $options:expr) => {
        $builder
            .timer(TokioTimer::new())
            .header_read_timeout($options.header_read_timeout)
            .max_buf_size($options.max_header_bytes.max(8192))
            .keep_alive(true)
    };
}

/// The HTTP/2 limits, likewise.
macro_rules! http2_limits {
    ($builder:expr, $options:expr) => {
        $builder
            .timer(TokioTimer::new())
            .max_concurrent_streams($options.max_concurrent_streams)
            .max_header_list_size(u32::try_from($options.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
    };
}

/// An HTTP/1.1 + HTTP/2 server connection builder with the given limits (HTTP/2 by its preface).
pub fn http_builder(options: &HttpOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    http1_limits!(builder.http1(), options);
    http2_limits!(builder.http2(), options);
    builder
}

/// An HTTP/1.1 server connection builder with the given limits.
pub fn http1_builder(options: &HttpOptions) -> http1::Builder {
    let mut builder = http1::Builder::new();
    http1_limits!(builder, options);
    builder
}

/// An HTTP/2 server connection builder with the given limits.
pub fn http2_builder(options: &HttpOptions) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    http2_limits!(builder, options);
    builder
}

/// The sending half of the shutdown signal; owned by whoever decides the process stops.
#[derive(Debug)]
pub struct Shutdown(watch::Sender<bool>);

/// The receiving half, cloned into every accept loop and connection so draining can wait for them.
#[derive(Debug, Clone)]
pub struct ShutdownWatch(watch::Receiver<bool>);

impl Shutdown {
    /// A new signal and its first watcher.
    pub fn new() -> (Shutdown, ShutdownWatch) {
        let (tx, rx) = watch::channel(false);
        (Shutdown(tx), ShutdownWatch(rx))
    }

    /// Tells every accept loop to stop and every connection to finish its requests and close.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once every watcher (accept loops and connections) is gone.
    pub async fn drained(&self) {
        self.0.closed().await;
    }

    /// How many watchers are alive: accept loops plus open connections.
    pub fn watchers(&self) -> usize {
        self.0.receiver_count()
    }
}

impl ShutdownWatch {
    /// Resolves when shutdown has begun.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stopping| *stopping).await;
    }
}

/// A listening socket [`accept_loop`] can serve: TCP, or a unix socket (the client's side towards
/// nginx may be either).
pub trait Accept: Send {
    /// An accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Who connected, for logs.
    type Peer: std::fmt::Display + Send;
    /// The next connection, ready to use (TCP: with `TCP_NODELAY` set).
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    type Peer = SocketAddr;

    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
}

/// A connection slot; the connection holds it until it closes.
pub type Slot = tokio::sync::OwnedSemaphorePermit;

/// Accepts on `listener` until shutdown, handing each connection to `on_conn` with its slot. At
/// `max_connections` open it stops accepting until one closes (new connections wait in the kernel's
/// backlog: back-pressure, not a crash). Accept errors (out of file descriptors, say) are logged and
/// backed off, never spun on and never fatal.
pub async fn accept_loop<L, F>(
    listener: L,
    max_connections: usize,
    mut shutdown: ShutdownWatch,
    mut on_conn: F,
) where
    L: Accept,
    F: FnMut(L::Stream, L::Peer, Slot),
{
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut backoff = Duration::from_millis(5);
    let mut warned_full = false;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if !warned_full {
                    warn!(
                        max_connections,
                        "connection limit reached; new connections wait until one closes"
                    );
                    warned_full = true;
                }
                tokio::select! {
                    biased;
                    () = shutdown.wait() => break,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                }
            }
        };
        tokio::select! {
            biased;
            () = shutdown.wait() => break,
            accepted = Accept::accept(&listener) => match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    if slots.available_permits() > 0 {
                        warned_full = false;
                    }
                    on_conn(stream, peer, slot);
                }
                Err(error) if is_per_connection(&error) => {
                    debug!(%error, "accept: connection failed before it was accepted");
                }
                Err(error) => {
                    warn!(%error, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Drives a connection to its end; when shutdown begins first, asks it to finish (`graceful`: hyper's
/// `graceful_shutdown`, which lets in-flight requests complete) and waits for that.
pub async fn drive<C: Future>(
    mut conn: Pin<&mut C>,
    graceful: impl FnOnce(Pin<&mut C>),
    shutdown: &mut ShutdownWatch,
) -> C::Output {
    tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.wait() => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}

/// Serves HTTP on `io` until the peer is done or shutdown begins; on shutdown, in-flight requests
/// finish, HTTP/1 connections close after their response and HTTP/2 ones get a GOAWAY. A peer that
/// has not let the version be told within `first_bytes_timeout` is closed (see [`PrefaceDeadline`]).
pub async fn serve_http<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    first_bytes_timeout: Duration,
    service: S,
    mut shutdown: ShutdownWatch,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = PrefaceDeadline::new(io, first_bytes_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    drive(conn, |c| c.graceful_shutdown(), &mut shutdown).await
}

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bounds the reads of a new connection until it has shown whether it starts with the HTTP/2
/// preface. hyper-util's `auto` server reads up to 24 bytes to tell HTTP/1.1 from h2c before hyper
/// takes over, and hyper's `header_read_timeout` starts only then; hyper's HTTP/2 server waits for the
/// preface with no timer at all (its keep-alive pings start after it). Without a deadline a peer that
/// sent nothing, or stopped inside what could still be the preface, would hold its connection (and a
/// `max_connections` slot) for ever. The deadline ends with the first byte that is not the preface's
/// (HTTP/1.1: hyper's timer covers the rest of the head; HTTP/2: hyper refuses the connection), a
/// whole preface (HTTP/2: the keep-alive pings cover an idle peer from then on), or the end of the
/// stream; then reads pass straight through.
pub struct PrefaceDeadline<I> {
    io: I,
    /// Bytes of the preface matched so far.
    matched: usize,
    /// Until when, while still telling; the timer exists only once a read had to wait.
    deadline: Option<(tokio::time::Instant, Option<Pin<Box<tokio::time::Sleep>>>)>,
}

impl<I> PrefaceDeadline<I> {
    /// `io`, whose first bytes must show within `timeout`.
    pub fn new(io: I, timeout: Duration) -> Self {
        PrefaceDeadline {
            io,
            matched: 0,
            deadline: Some((tokio::time::Instant::now() + timeout, None)),
        }
    }

    /// Follows the bytes just read as hyper-util does; the deadline ends once the version is known.
    fn saw(&mut self, got: &[u8]) {
        if got.is_empty() {
            self.deadline = None;
            return;
        }
        for &byte in got {
            if H2_PREFACE.get(self.matched) != Some(&byte) {
                self.deadline = None;
                return;
            }
            self.matched += 1;
        }
        if self.matched >= H2_PREFACE.len() {
            self.deadline = None;
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefaceDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = &mut *self;
        let start = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some((at, timer)) = &mut this.deadline else {
            return polled;
        };
        match polled {
            std::task::Poll::Ready(Ok(())) => {
                this.saw(&buf.filled()[start..]);
                std::task::Poll::Ready(Ok(()))
            }
            std::task::Poll::Pending => {
                let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*at)));
                if timer.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request started within header_read_timeout",
                    )));
                }
                std::task::Poll::Pending
            }
            error => error,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PrefaceDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the deadline still runs after reads that returned `chunks`.
    fn still_telling(chunks: &[&[u8]]) -> bool {
        let mut sniff = PrefaceDeadline::new((), Duration::from_secs(1));
        for chunk in chunks {
            sniff.saw(chunk);
        }
        sniff.deadline.is_some()
    }

    #[test]
    fn the_deadline_lasts_while_the_bytes_could_still_be_the_h2_preface() {
        assert!(still_telling(&[]));
        assert!(still_telling(&[b"PRI * HTTP/2.0\r\n"]));
        assert!(still_telling(&[b"PRI", b" * HTTP/2.0\r\n\r\nSM\r\n\r"]));
        assert!(!still_telling(&[b"GET / HTTP/1.1\r\n"]));
        assert!(!still_telling(&[b"PRI * HTTP/1.1\r\n"]));
        assert!(!still_telling(&[H2_PREFACE]));
        assert!(!still_telling(&[b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n"]));
        assert!(
            !still_telling(&[b"PRI * ", b""]),
            "the end of the stream ends it"
        );
    }
}
