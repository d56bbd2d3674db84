//! HTTP server connections with the sidecars' limits: the builders, and serving one connection until
//! the peer is done or shutdown asks it to finish.

use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use super::preface_deadline::PrefaceDeadline;
use super::shutdown::{drive, ShutdownWatch};
use crate::serving_task::ServingExecutor;

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

/// An HTTP/1.1 + HTTP/2 server connection builder with the given limits (HTTP/2 by its preface);
/// each HTTP/2 stream is served in a serving task ([`crate::serving_task`]).
pub fn http_builder(options: &HttpOptions) -> auto::Builder<ServingExecutor> {
    let mut builder = auto::Builder::new(ServingExecutor);
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

/// An HTTP/2 server connection builder with the given limits; each stream is served in a serving
/// task ([`crate::serving_task`]).
pub fn http2_builder(options: &HttpOptions) -> http2::Builder<ServingExecutor> {
    let mut builder = http2::Builder::new(ServingExecutor);
    http2_limits!(builder, options);
    builder
}

/// Serves HTTP on `io` until the peer is done or shutdown begins; on shutdown, in-flight requests
/// finish, HTTP/1 connections close after their response and HTTP/2 ones get a GOAWAY. A peer that
/// has not let the version be told within `first_bytes_timeout` is closed (see [`PrefaceDeadline`]).
pub async fn serve_http<I, S, B>(
    builder: &auto::Builder<ServingExecutor>,
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
