//! A *parked* connection is an HTTP/1.1 keep-alive connection served here that holds no HTTP state
//! while idle: between requests hyper's connection is ended and only the byte stream is kept, until
//! the peer sends again and a fresh hyper connection takes over.
//!
//! hyper's HTTP/1 server keeps an 8-16 KiB read buffer and an 8 KiB write buffer for every connection
//! for as long as it lives, idle or not, and its connection future is several KiB more. A listener with
//! thousands of idle keep-alive mTLS connections would spend most of its memory on them. nginx frees its
//! buffers when a keep-alive connection goes idle; this does the same with hyper's public API: while no
//! request is in flight and nothing is unread or unwritten, hyper is shown the end of the stream, it
//! finishes cleanly, and the TLS stream is parked (no HTTP state at all) until the peer sends again,
//! when a fresh hyper connection takes over. Parked connections still close after the idle timeout
//! and on shutdown.
//!
//! When a connection is handed back to parking:
//! - no request is in flight (a request counts from hyper calling the service until hyper drops its
//!   response body), and the connection was never upgraded;
//! - everything hyper wrote has been flushed, and hyper has not been given a byte since (a request head
//!   split over several TCP segments is never cut short);
//! - the TLS stream itself has nothing buffered: its read would block;
//! - no response on it said `Connection: close`: hyper is closing it then, and may still be reading
//!   the rest of a request body it did not read (the sidecars answer such a request with
//!   `Connection: close`); parked, the stream would hand that rest to the next hyper connection as a
//!   request.
//!
//! What this gives up: a client that pipelines requests and whose next request head was only partly
//! received when the previous response was flushed has that connection closed before the request is
//! served; RFC 9112 section 9.3.2 has pipelining clients retry unanswered requests on a new connection.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::CONNECTION;
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::serve::{drive, ShutdownWatch};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A byte stream that can wait, without reading, until its socket has something to read.
pub trait ReadReady {
    /// Ready when the underlying socket is readable (or closed).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl<I: ReadReady> ReadReady for tokio_rustls::server::TlsStream<I> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_ref().0.poll_read_ready(cx)
    }
}

/// What the connection's requests tell its stream.
#[derive(Debug, Default)]
struct Activity {
    in_flight: AtomicUsize,
    upgraded: AtomicBool,
    /// A response said `Connection: close`.
    closing: AtomicBool,
}

/// Serves HTTP/1.1 on `io` until the peer closes, the connection sits parked for `idle_timeout`, or
/// shutdown begins (in-flight requests finish; a parked connection closes at once).
pub async fn serve_http1_parking<I, S, B>(
    builder: &http1::Builder,
    io: I,
    service: S,
    idle_timeout: Duration,
    mut shutdown: ShutdownWatch,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + ReadReady + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let activity = Arc::new(Activity::default());
    let returned: Arc<Mutex<Option<I>>> = Arc::new(Mutex::new(None));
    let mut io = Some(io);
    let mut parked = false;
    loop {
        let Some(mut stream) = io.take() else {
            return Ok(());
        };
        if parked {
            tokio::select! {
                biased;
                () = shutdown.wait() => {
                    close(&mut stream).await;
                    return Ok(());
                }
                ready = tokio::time::timeout(idle_timeout, poll_fn(|cx| stream.poll_read_ready(cx))) => match ready {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => return Err(error.into()),
                    Err(_) => {
                        debug!(idle_ms = idle_timeout.as_millis() as u64, "idle keep-alive connection closed");
                        close(&mut stream).await;
                        return Ok(());
                    }
                },
            }
        }
        let park = ParkIo {
            io: Some(stream),
            activity: activity.clone(),
            returned: returned.clone(),
            unflushed: false,
            delivered: false,
            parked: false,
            read_waiting: false,
        };
        let service = Tracked {
            inner: service.clone(),
            activity: activity.clone(),
        };
        // Boxed, so a parked connection's task holds a pointer rather than hyper's whole state.
        let mut conn = Box::pin(
            builder
                .serve_connection(TokioIo::new(park), service)
                .with_upgrades(),
        );
        drive(conn.as_mut(), |c| c.graceful_shutdown(), &mut shutdown).await?;
        drop(conn); // hands the stream back, if hyper finished because we parked it
        io = returned.lock().take();
        parked = true;
    }
}

/// Ends a parked connection: TLS close_notify and FIN, bounded in time.
async fn close<I: AsyncWrite + Unpin>(stream: &mut I) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
}

/// The stream as hyper sees it: the real one, except that at an idle moment (see the module docs) a
/// read that would block ends the stream instead, and the stream goes back to `returned` on drop.
struct ParkIo<I> {
    io: Option<I>,
    activity: Arc<Activity>,
    returned: Arc<Mutex<Option<I>>>,
    /// Written since the last completed flush.
    unflushed: bool,
    /// Bytes handed to hyper since the connection was last idle.
    delivered: bool,
    /// The end of the stream shown to hyper was ours, not the peer's.
    parked: bool,
    /// hyper's last read found nothing to read while the connection was busy.
    read_waiting: bool,
}

impl<I> ParkIo<I> {
    /// The stream; it is only ever taken out on drop, so the error is for form's sake.
    fn io(&mut self) -> io::Result<Pin<&mut I>>
    where
        I: Unpin,
    {
        match self.io.as_mut() {
            Some(io) => Ok(Pin::new(io)),
            None => Err(io::Error::other("connection already handed back")),
        }
    }

    fn idle(&self) -> bool {
        !self.unflushed
            && !self.delivered
            && self.activity.in_flight.load(Ordering::Acquire) == 0
            && !self.activity.upgraded.load(Ordering::Acquire)
            && !self.activity.closing.load(Ordering::Acquire)
    }
}

impl<I> Drop for ParkIo<I> {
    fn drop(&mut self) {
        if self.parked {
            if let Some(io) = self.io.take() {
                *self.returned.lock() = Some(io);
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ParkIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.parked {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = match self.io() {
            Ok(io) => io.poll_read(cx, buf),
            Err(e) => return Poll::Ready(Err(e)),
        };
        match read {
            Poll::Ready(Ok(())) => {
                self.read_waiting = false;
                if buf.filled().len() > before {
                    self.delivered = true;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.idle() => {
                self.parked = true;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                self.read_waiting = true;
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ParkIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.unflushed = true;
        match self.io() {
            Ok(io) => io.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.unflushed = true;
        match self.io() {
            Ok(io) => io.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = match self.io() {
            Ok(io) => io.poll_flush(cx),
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Poll::Ready(Ok(())) = flushed {
            // Only a flush of something written (a response) ends what was delivered: hyper also
            // flushes with nothing to write, and a request head it has only part of is not over.
            let wrote = std::mem::take(&mut self.unflushed);
            if wrote && self.activity.in_flight.load(Ordering::Acquire) == 0 {
                self.delivered = false;
            }
            // hyper read ahead while the request was in flight, found nothing and now waits for the
            // socket, which stays quiet until the peer's next request: nothing would ask for the
            // read that parks the connection. hyper polls reads and writes from one task, so waking
            // it here has it read again, and that read parks.
            if wrote && self.read_waiting && self.idle() {
                self.read_waiting = false;
                cx.waker().wake_by_ref();
            }
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.parked {
            // hyper closing after our end of stream: the connection lives on, parked.
            return Poll::Ready(Ok(()));
        }
        match self.io() {
            Ok(io) => io.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// The service, counting its requests in flight and noting an upgrade.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

/// One request in flight, from the service call until hyper drops the response body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::new(&self.activity);
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                in_flight.0.upgraded.store(true, Ordering::Release);
            }
            if says_close(response.headers()) {
                in_flight.0.closing.store(true, Ordering::Release);
            }
            Ok(response.map(|inner| TrackedBody {
                inner,
                _in_flight: in_flight,
            }))
        })
    }
}

/// Whether `headers` carry the `close` connection option.
fn says_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|option| option.trim().eq_ignore_ascii_case("close"))
}

/// A response body that keeps its request counted as in flight until hyper drops it.
pub struct TrackedBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::convert::Infallible;
    use std::future::{ready, Ready};

    use bytes::Bytes;
    use http_body_util::Full;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::serve::Shutdown;

    /// Answers "ok" to everything; counts its clones, one per hyper connection the stream is served
    /// by (a parked connection that resumes is served by a new one).
    struct Counting(Arc<AtomicUsize>);

    impl Clone for Counting {
        fn clone(&self) -> Self {
            self.0.fetch_add(1, Ordering::SeqCst);
            Counting(self.0.clone())
        }
    }

    impl Service<Request<Incoming>> for Counting {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = Ready<Result<Response<Full<Bytes>>, Infallible>>;

        fn call(&self, _req: Request<Incoming>) -> Self::Future {
            ready(Ok(Response::new(Full::new(Bytes::from_static(b"ok")))))
        }
    }

    /// Answers "ok" saying `Connection: close`, as the sidecars answer a request whose body they do
    /// not read: the request (and its body) is dropped as the answer is made.
    #[derive(Clone)]
    struct Refusing;

    impl Service<Request<Incoming>> for Refusing {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn call(&self, req: Request<Incoming>) -> Self::Future {
            Box::pin(async move {
                tokio::task::yield_now().await;
                drop(req);
                let mut response = Response::new(Full::new(Bytes::from_static(b"ok")));
                response
                    .headers_mut()
                    .insert(CONNECTION, http::HeaderValue::from_static("close"));
                Ok(response)
            })
        }
    }

    /// A connected client, the count of hyper connections that served it, and the shutdown signal
    /// of the one connection it talks to.
    async fn serve_one(idle_timeout: Duration) -> (TcpStream, Arc<AtomicUsize>, Shutdown) {
        let served = Arc::new(AtomicUsize::new(0));
        let (client, shutdown) = serve_with(Counting(served.clone()), idle_timeout).await;
        (client, served, shutdown)
    }

    /// A client connected to `service`, and the shutdown signal of the one connection it talks to.
    async fn serve_with<S>(service: S, idle_timeout: Duration) -> (TcpStream, Shutdown)
    where
        S: Service<Request<Incoming>, Response = Response<Full<Bytes>>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (shutdown, watch) = Shutdown::new();
        tokio::spawn(async move {
            let builder = http1::Builder::new();
            serve_http1_parking(&builder, server, service, idle_timeout, watch)
                .await
                .unwrap();
        });
        (client, shutdown)
    }

    /// Reads one "ok" response off `client`.
    async fn read_response(client: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\nok") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed mid-response: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(got).unwrap()
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n";

    /// Waits until the connection has been handed back to parking (no hyper connection serves it).
    async fn until_parked() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn a_keep_alive_connection_parks_between_requests_and_resumes() {
        let (mut client, served, _shutdown) = serve_one(Duration::from_secs(60)).await;
        for round in 1..=3 {
            client.write_all(GET).await.unwrap();
            let response = read_response(&mut client).await;
            assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
            until_parked().await;
            assert_eq!(
                served.load(Ordering::SeqCst),
                round,
                "parked and resumed once per request"
            );
        }
    }

    #[tokio::test]
    async fn a_connection_whose_answer_says_close_is_closed_not_parked() {
        let (mut client, _shutdown) = serve_with(Refusing, Duration::from_secs(60)).await;
        // The body's first bytes only: the rest would be read as the next request if it were parked.
        client
            .write_all(b"POST / HTTP/1.1\r\nhost: svc\r\ncontent-length: 100000\r\n\r\nfirst")
            .await
            .unwrap();
        let response = read_response(&mut client).await;
        assert!(response.contains("connection: close"), "{response}");
        let mut buf = [0u8; 16];
        // An upper bound, not a timing assertion: the close follows the answer at once.
        let end = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await;
        assert!(
            matches!(end, Ok(Ok(0) | Err(_))),
            "the connection was kept after an answer saying close: {end:?}"
        );
    }

    #[tokio::test]
    async fn a_request_head_split_over_segments_is_not_cut() {
        let (mut client, served, _shutdown) = serve_one(Duration::from_secs(60)).await;
        let (first, rest) = GET.split_at(20);
        client.write_all(first).await.unwrap();
        until_parked().await;
        client.write_all(rest).await.unwrap();
        let response = read_response(&mut client).await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert_eq!(served.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_connection_closes_after_the_idle_timeout() {
        let idle = Duration::from_secs(60);
        let (mut client, _served, _shutdown) = serve_one(idle).await;
        client.write_all(GET).await.unwrap();
        read_response(&mut client).await;
        let parked_at = tokio::time::Instant::now();
        let mut buf = [0u8; 16];
        assert_eq!(
            client.read(&mut buf).await.unwrap(),
            0,
            "expected the close"
        );
        assert!(
            parked_at.elapsed() >= idle,
            "closed after {:?}",
            parked_at.elapsed()
        );
    }

    #[tokio::test]
    async fn shutdown_closes_a_parked_connection_at_once() {
        let (mut client, _served, shutdown) = serve_one(Duration::from_secs(60)).await;
        client.write_all(GET).await.unwrap();
        read_response(&mut client).await;
        until_parked().await;
        shutdown.begin();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await;
        assert_eq!(read.unwrap().unwrap(), 0, "expected the close");
    }
}
