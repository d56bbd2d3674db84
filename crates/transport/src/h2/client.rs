//! HTTP/2 requests driven with the `h2` crate directly, as both sidecars send them (the client on its
//! mesh link, the listener to an h2c backend): the connection settings, opening a request's stream, a
//! response stream as an `http_body::Body`, and a request body piped into its stream under HTTP/2
//! flow control.
//!
//! This is the part of hyper's HTTP/2 client the sidecars keep. hyper routes every request through a
//! channel to its connection task, spawns a task per request to wait for the response and answers
//! through a second channel; here the request's own task opens the stream and awaits the response.
//! What hyper does besides, and this does the same way: received data is handed back to the
//! connection window as it is consumed, a `RST_STREAM(NO_ERROR)` after a complete response ends the
//! body instead of failing it (RFC 9113 §8.1), request data waits for window before it is queued, a
//! request body that fails resets its stream, and a stream whose request and response are both
//! dropped is reset with `CANCEL` (h2 does that when the last handle goes).

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::body::ProxyBody;

/// The largest response head (HTTP/2 header list size) the sidecars' HTTP/2 clients take, and so
/// the largest `max_header_bytes`. A peer that sends a larger one fails that stream, and one far
/// larger (beyond what h2 can skip) fails the whole connection with every request on it; the
/// listener sends no head larger than its `max_header_bytes`, so a head it lets through always fits.
pub const MAX_HEADER_LIST_SIZE: u32 = 1024 * 1024;

/// An `h2` client builder with hyper's HTTP/2 client settings: its windows (2 MiB per stream, 5 MiB
/// per connection), frame size, send buffer, stream and reset limits, push off; the header-list
/// size is [`MAX_HEADER_LIST_SIZE`].
pub fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_max_send_streams(100)
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(1024 * 1024)
        .max_local_error_reset_streams(Some(1024))
        .enable_push(false);
    builder
}

/// Opens a stream for `req` on a ready sender and waits for the response head. A request body is
/// piped by a task of its own, so it can go on after the response has begun (the peer may answer
/// before reading it all); if the response never comes (timeout, the downstream hung up), dropping
/// this future stops the pipe and h2 resets the stream. `peer` names the other end in the pipe's log.
pub async fn open_stream(
    mut sender: SendRequest<Bytes>,
    req: Request<ProxyBody>,
    peer: &'static str,
) -> Result<Response<H2Body>, h2::Error> {
    let (mut head, body) = req.into_parts();
    // As hyper does: a body of known length says so when the request did not.
    if let Some(len) = body.size_hint().exact() {
        if (len != 0 || has_payload_semantics(&head.method))
            && !head.headers.contains_key(CONTENT_LENGTH)
        {
            head.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    let end = body.is_end_stream();
    let (response, stream) = sender.send_request(Request::from_parts(head, ()), end)?;
    let mut pipe = PipeGuard((!end).then(|| {
        tokio::spawn(async move {
            if let Err(error) = pipe_body(body, stream, peer).await {
                debug!(%error, "request body to {peer} ended early");
            }
        })
    }));
    let response = response.await?;
    pipe.detach();
    let (parts, recv) = response.into_parts();
    let body = H2Body::new(recv, &parts.headers);
    Ok(Response::from_parts(parts, body))
}

/// Whether `error`, as a request's stream ended, is the reset [`open_stream`] sends when the request
/// body failed to read: `CANCEL`, sent by this side's own code (not the peer, not h2 itself). It is
/// the only stream reset this module makes.
pub fn is_request_body_reset(error: &h2::Error) -> bool {
    error.is_reset()
        && !error.is_remote()
        && !error.is_library()
        && error.reason() == Some(h2::Reason::CANCEL)
}

/// Methods whose request carries a payload by definition (hyper's rule for adding `content-length: 0`).
fn has_payload_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

/// Stops a request body's pipe when dropped, unless detached.
struct PipeGuard(Option<JoinHandle<()>>);

impl PipeGuard {
    fn detach(&mut self) {
        self.0 = None;
    }
}

impl Drop for PipeGuard {
    fn drop(&mut self) {
        if let Some(pipe) = self.0.take() {
            pipe.abort();
        }
    }
}

/// A response body arriving on an HTTP/2 stream.
pub struct H2Body {
    recv: RecvStream,
    /// Bytes still to come, when the response said (`content-length`) or had ended already.
    remaining: Option<u64>,
    data_done: bool,
}

impl H2Body {
    fn new(recv: RecvStream, headers: &HeaderMap) -> Self {
        let remaining = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .or_else(|| recv.is_end_stream().then_some(0));
        H2Body {
            recv,
            remaining,
            data_done: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let me = &mut *self;
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Consumed: the peer may send as much again.
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = me.remaining.as_mut() {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(None)
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => me.data_done = true,
            }
        }
        match ready!(me.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) if e.reason() == Some(h2::Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// Why piping a request body stopped early.
#[derive(Debug, thiserror::Error)]
enum PipeError {
    #[error("{0} reset the stream ({1})")]
    Reset(&'static str, h2::Reason),
    #[error("sending on the stream failed: {0}")]
    Send(#[from] h2::Error),
    #[error("the stream closed before the request body was sent")]
    Closed,
    #[error("reading the request body failed: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// Sends `body` on `stream` until it ends: each data frame waits for stream window, trailers end
/// the stream, a body error resets it (`CANCEL`), and a reset from the peer stops the pipe.
async fn pipe_body(
    mut body: ProxyBody,
    mut stream: SendStream<Bytes>,
    peer: &'static str,
) -> Result<(), PipeError> {
    loop {
        let frame = poll_fn(|cx| {
            // Wake for a reset as well as for the next frame: a peer that stopped reading (it
            // answered early, or gave up) must not leave the pipe waiting on the body.
            if let Poll::Ready(reason) = stream.poll_reset(cx) {
                return Poll::Ready(Err(
                    reason.map_or_else(PipeError::Send, |r| PipeError::Reset(peer, r))
                ));
            }
            Pin::new(&mut body).poll_frame(cx).map(Ok)
        })
        .await?;
        let frame = match frame {
            None => return Ok(stream.send_data(Bytes::new(), true)?),
            Some(Err(e)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return Err(PipeError::Body(e));
            }
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                if !data.is_empty() {
                    // Claim a little window and wait for it; h2 queues the whole chunk and sends it
                    // as the window allows (claiming it all up front can starve other streams).
                    stream.reserve_capacity(1);
                    while stream.capacity() == 0 {
                        match poll_fn(|cx| stream.poll_capacity(cx)).await {
                            Some(Ok(_)) => {}
                            Some(Err(e)) => return Err(e.into()),
                            None => return Err(PipeError::Closed),
                        }
                    }
                }
                stream.send_data(data, end)?;
                if end {
                    return Ok(());
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            stream.reserve_capacity(0);
            return Ok(stream.send_trailers(trailers)?);
        }
        debug!("request body frame neither data nor trailers; skipped");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::future::Future;
    use std::time::Duration;

    use h2::server::SendResponse;
    use http::HeaderValue;
    use http_body_util::{BodyExt, Either, Full};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;

    use super::*;

    /// A sender on a fresh loopback connection to an `h2`-crate peer that hands each stream to
    /// `handle`.
    async fn connect<F, Fut>(handle: F) -> SendRequest<Bytes>
    where
        F: Fn(Request<RecvStream>, SendResponse<Bytes>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            while let Some(Ok((req, respond))) = conn.accept().await {
                tokio::spawn(handle(req, respond));
            }
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, driver) = client_builder().handshake::<_, Bytes>(tcp).await.unwrap();
        tokio::spawn(driver);
        sender.ready().await.unwrap()
    }

    fn request(method: Method, body: &'static [u8]) -> Request<ProxyBody> {
        Request::builder()
            .method(method)
            .uri("http://svc/")
            .body(Either::Right(Full::new(Bytes::from_static(body))))
            .unwrap()
    }

    /// Reads a whole request body, handing the window back as it goes.
    async fn read_all(mut body: RecvStream) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            body.flow_control().release_capacity(data.len()).unwrap();
            all.extend_from_slice(&data);
        }
        all
    }

    #[tokio::test]
    async fn a_response_body_and_its_trailers_arrive_as_frames() {
        let sender = connect(|req, mut respond| async move {
            let echoed = read_all(req.into_body()).await;
            let mut stream = respond.send_response(Response::new(()), false).unwrap();
            stream.send_data(Bytes::from(echoed), false).unwrap();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            stream.send_trailers(trailers).unwrap();
        })
        .await;
        let response = open_stream(sender, request(Method::POST, b"echo me"), "the peer")
            .await
            .unwrap();
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(
            collected.trailers().and_then(|t| t.get("grpc-status")),
            Some(&HeaderValue::from_static("0"))
        );
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"echo me"));
    }

    #[tokio::test]
    async fn a_reset_with_no_error_after_a_complete_response_ends_the_body_cleanly() {
        // The peer answers without reading the request body, then tells the client to stop
        // sending it (RFC 9113 section 8.1).
        let sender = connect(|_req, mut respond| async move {
            let mut stream = respond.send_response(Response::new(()), false).unwrap();
            stream
                .send_data(Bytes::from_static(b"early"), true)
                .unwrap();
            // Once the response is out (a reset at once would discard it unsent).
            tokio::time::sleep(Duration::from_millis(50)).await;
            respond.send_reset(h2::Reason::NO_ERROR);
        })
        .await;
        let big: &'static [u8] = Box::leak(vec![7u8; 4 * 1024 * 1024].into_boxed_slice());
        let response = open_stream(sender, request(Method::POST, big), "the peer")
            .await
            .unwrap();
        // The body is read after the reset has arrived.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, Bytes::from_static(b"early"));
    }

    #[tokio::test]
    async fn a_request_body_larger_than_the_window_is_streamed_whole() {
        let sender = connect(|req, mut respond| async move {
            let got = read_all(req.into_body()).await;
            let mut stream = respond.send_response(Response::new(()), false).unwrap();
            let summary = format!("{} {}", got.len(), got.iter().all(|&b| b == 7));
            stream.send_data(Bytes::from(summary), true).unwrap();
        })
        .await;
        // Larger than the peer's stream and connection windows (64 KiB by default) many times over.
        let big: &'static [u8] = Box::leak(vec![7u8; 3 * 1024 * 1024].into_boxed_slice());
        let response = open_stream(sender, request(Method::PUT, big), "the peer")
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, Bytes::from(format!("{} true", 3 * 1024 * 1024)));
    }

    #[tokio::test]
    async fn dropping_the_response_future_cancels_the_stream() {
        let (reset_tx, reset_rx) = oneshot::channel();
        let reset_tx = parking_lot::Mutex::new(Some(reset_tx));
        let (seen_tx, seen_rx) = oneshot::channel();
        let seen_tx = parking_lot::Mutex::new(Some(seen_tx));
        let handlers = std::sync::Arc::new((reset_tx, seen_tx));
        let sender = connect(move |_req, mut respond| {
            let handlers = handlers.clone();
            async move {
                if let Some(seen) = handlers.1.lock().take() {
                    let _ = seen.send(());
                }
                // Never answers; waits for the client to give up.
                let reason = poll_fn(|cx| respond.poll_reset(cx)).await.unwrap();
                if let Some(tx) = handlers.0.lock().take() {
                    let _ = tx.send(reason);
                }
            }
        })
        .await;
        let waiting = tokio::spawn(open_stream(
            sender,
            request(Method::POST, b"partial"),
            "the peer",
        ));
        seen_rx.await.unwrap();
        waiting.abort();
        let reason = tokio::time::timeout(Duration::from_secs(5), reset_rx)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reason, h2::Reason::CANCEL);
    }

    #[tokio::test]
    async fn content_length_is_added_as_hyper_adds_it() {
        let sender = connect(|req, mut respond| async move {
            let length = req
                .headers()
                .get(CONTENT_LENGTH)
                .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
            let mut stream = respond.send_response(Response::new(()), false).unwrap();
            stream.send_data(Bytes::from(length), true).unwrap();
        })
        .await;
        for (method, body, expected) in [
            (Method::POST, &b"hello"[..], "5"),
            (Method::POST, &b""[..], "0"),
            (Method::PUT, &b""[..], "0"),
            (Method::GET, &b""[..], "none"),
            (Method::DELETE, &b""[..], "none"),
            (Method::GET, &b"odd"[..], "3"),
        ] {
            let sender = sender.clone().ready().await.unwrap();
            let response = open_stream(sender, request(method.clone(), body), "the peer")
                .await
                .unwrap();
            let got = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                got,
                Bytes::from(expected),
                "{method} with {} bytes",
                body.len()
            );
        }
    }

    #[tokio::test]
    async fn a_content_length_the_request_carries_is_kept() {
        let sender = connect(|req, mut respond| async move {
            let lengths: Vec<_> = req
                .headers()
                .get_all(CONTENT_LENGTH)
                .iter()
                .cloned()
                .collect();
            let mut stream = respond.send_response(Response::new(()), false).unwrap();
            stream
                .send_data(Bytes::from(format!("{lengths:?}")), true)
                .unwrap();
        })
        .await;
        let mut req = request(Method::POST, b"hello");
        req.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("5"));
        let response = open_stream(sender, req, "the peer").await.unwrap();
        let got = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, Bytes::from_static(b"[\"5\"]"));
    }
}
