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

/// An `h2` client builder with hyper's HTTP/2 client settings: its windows (2 MiB per stream, 5 MiB
/// per connection), frame and header-list sizes, send buffer, stream and reset limits, push off.
pub fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_max_send_streams(100)
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_header_list_size(16 * 1024)
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
