//! A *dialer* opens one new connection to a peer, ready for HTTP: TCP, and TLS where the hop has it.
//! The pools ([`crate::pool`], [`crate::h2`]) decide when to dial and when a connection may be used
//! again; a dialer only knows how to reach its peer, and says what the connection was opened with
//! (its *meta*, which a pool hands to its owner's retirement rule before every reuse).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// The HTTP version a new connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (chosen through ALPN, or cleartext with prior knowledge).
    Http2,
}

/// A connection a dialer opened.
#[derive(Debug)]
pub struct Connected<I, M> {
    /// The byte stream.
    pub io: I,
    /// What it was opened with, for the owner's retirement rule.
    pub meta: M,
    /// What it speaks.
    pub protocol: Protocol,
}

/// Opens connections to one peer (or one of several: which is the dialer's business).
pub trait Dial: Send + Sync + 'static {
    /// The connected byte stream.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// What a connection was opened with.
    type Meta: Send + Sync + 'static;
    /// Why no connection could be opened.
    type Error: std::error::Error + Send + Sync + 'static;

    /// One new connection.
    fn dial(
        &self,
    ) -> impl Future<Output = Result<Connected<Self::Io, Self::Meta>, Self::Error>> + Send;
}

/// The owner's rule for when a connection must take no new requests, judged from what it was opened
/// with. A pool asks it each time it would hand a connection to a request (it is on the hot path: keep
/// it to a clock read and an atomic load); a connection it retires finishes the requests it carries.
/// It may log its verdict: it is asked once per connection it retires.
pub trait Retire<M>: Send + Sync + 'static {
    /// Whether a connection opened with `meta` must take no new requests.
    fn retire(&self, meta: &M) -> bool;

    /// When a connection opened with `meta` retires however idle it is, and when it must be closed
    /// whatever it carries; asked once, when it opens. `None`: it retires only when a checkout asks.
    fn lifetime(&self, meta: &M) -> Option<Lifetime> {
        let _ = meta;
        None
    }
}

/// A connection's retirement, as the pool holding it acts on it without waiting for a checkout.
pub struct Lifetime {
    /// Resolves when the connection must take no new requests: the pool lets go of it, and it
    /// closes once the requests in flight on it finish.
    pub retired: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// When it is closed whatever it still carries.
    pub deadline: tokio::time::Instant,
}

impl Lifetime {
    /// Drives `conn` (a connection's driver task) to its end: on retirement `let_go` runs (the pool
    /// drops its handle), and at the deadline `conn` is dropped, closing it. `None` when the deadline
    /// cut it off.
    pub async fn drive<F: Future>(self, conn: F, let_go: impl FnOnce()) -> Option<F::Output> {
        tokio::pin!(conn);
        tokio::select! {
            out = &mut conn => return Some(out),
            () = self.retired => let_go(),
        }
        tokio::time::timeout_at(self.deadline, conn).await.ok()
    }
}

/// Connections are never retired for what they were opened with (only idle or closed ones go).
#[derive(Debug, Clone, Copy, Default)]
pub struct NeverRetire;

impl<M> Retire<M> for NeverRetire {
    fn retire(&self, _meta: &M) -> bool {
        false
    }
}

/// Plain TCP to one address within a connect timeout, Nagle off: the listener's hop to its backend.
#[derive(Debug, Clone)]
pub struct TcpDial {
    /// Where to connect.
    pub addr: SocketAddr,
    /// How long a connect may take.
    pub connect_timeout: Duration,
    /// What the connections speak: HTTP/1.1, or HTTP/2 with prior knowledge (h2c).
    pub protocol: Protocol,
}

/// A TCP connect that failed or timed out.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct ConnectError {
    /// Why; a timeout is `TimedOut` with the limit named.
    #[from]
    pub source: io::Error,
}

impl Dial for TcpDial {
    type Io = TcpStream;
    type Meta = ();
    type Error = ConnectError;

    async fn dial(&self) -> Result<Connected<TcpStream, ()>, ConnectError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return Err(error.into()),
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no TCP connection within {:?} (backend_connect_timeout)",
                            self.connect_timeout
                        ),
                    )
                    .into())
                }
            };
        let _ = stream.set_nodelay(true);
        Ok(Connected {
            io: stream,
            meta: (),
            protocol: self.protocol,
        })
    }
}
