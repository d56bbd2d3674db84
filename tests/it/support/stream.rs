//! Streamed bodies with a deterministic content, and a gate that proves a body is streamed: the
//! producer stops after [`GATE_SENT`] bytes until the far end reports [`GATE_SEEN`] bytes arrived. A
//! proxy that held the whole body before passing it on would never let the far end see anything, and
//! the transfer would hang (and fail at the test's upper bound) instead of finishing.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame};
use tokio::sync::{mpsc, watch};

/// Bytes sent before the producer waits for the far end.
pub const GATE_SENT: u64 = 4 * 1024 * 1024;
/// Bytes the far end must have received before the producer carries on.
pub const GATE_SEEN: u64 = 1024 * 1024;
/// Chunk size of the producer.
pub const CHUNK: usize = 64 * 1024;

/// A body fed from a small channel, so the producer never gets far ahead of the consumer.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl ChannelBody {
    /// A body of what arrives on `rx`, ending when every sender is gone.
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        ChannelBody(rx)
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// One data frame, then trailers, as a gRPC message and its status travel.
pub struct TrailerBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl TrailerBody {
    pub fn new(data: impl Into<Bytes>, trailers: HeaderMap) -> Self {
        TrailerBody {
            data: Some(data.into()),
            trailers: Some(trailers),
        }
    }
}

impl Body for TrailerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

/// The byte at offset `pos` of every test stream: not periodic at any power of two.
fn byte_at(pos: u64) -> u8 {
    (pos.wrapping_mul(31).wrapping_add(pos / 4093)) as u8
}

/// `len` bytes of the test stream starting at `offset`.
pub fn pattern(offset: u64, len: usize) -> Bytes {
    (0..len as u64).map(|i| byte_at(offset + i)).collect()
}

/// SHA-256 (hex) of the first `total` bytes of the test stream.
pub fn pattern_sha256(total: u64) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut offset = 0;
    while offset < total {
        let n = CHUNK.min((total - offset) as usize);
        ctx.update(&pattern(offset, n));
        offset += n as u64;
    }
    super::hex(ctx.finish().as_ref())
}

/// A body of `total` pattern bytes, gated on `seen` (the far end's byte count) reaching
/// [`GATE_SEEN`] once [`GATE_SENT`] bytes are out.
pub fn gated_body(total: u64, mut seen: watch::Receiver<u64>) -> ChannelBody {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut offset = 0u64;
        let mut waited = false;
        while offset < total {
            if !waited && offset >= GATE_SENT {
                if seen.wait_for(|n| *n >= GATE_SEEN).await.is_err() {
                    return;
                }
                waited = true;
            }
            let n = CHUNK.min((total - offset) as usize);
            if tx.send(pattern(offset, n)).await.is_err() {
                return;
            }
            offset += n as u64;
        }
    });
    ChannelBody(rx)
}

/// Reads `body` frame by frame without keeping it, reporting progress through `progress`.
/// Returns (length, SHA-256 hex, largest frame).
pub async fn drain_hashing<B>(body: B, progress: &watch::Sender<u64>) -> (u64, String, usize)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    try_drain_hashing(body, progress)
        .await
        .expect("reading a streamed body")
}

/// [`drain_hashing`], with a body error as the result instead of a panic.
pub async fn try_drain_hashing<B>(
    body: B,
    progress: &watch::Sender<u64>,
) -> Result<(u64, String, usize), String>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt as _;
    let mut body = body;
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut len = 0u64;
    let mut largest = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("after {len} bytes: {e:?}"))?;
        if let Ok(data) = frame.into_data() {
            ctx.update(&data);
            len += data.len() as u64;
            largest = largest.max(data.len());
            progress.send_replace(len);
        }
    }
    Ok((len, super::hex(ctx.finish().as_ref()), largest))
}
