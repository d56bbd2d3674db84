//! The access log: one structured line per request, written when its response body is done (so it
//! carries the bytes sent and the full duration). Off unless `access_log = true`. The request is
//! counted in `phoenix_mesh_http_requests_total` at the same moment, so that a response cut off
//! half-way for making no progress counts as the failure it is (`5xx`, made by this sidecar), not as
//! the status its head carried.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tracing::info;

use phoenix_mesh_transport::progress::Watched;

use crate::metrics::{MadeBy, Metrics};

/// What one access-log line says about a request.
#[derive(Debug)]
pub struct AccessRecord {
    /// When the request head arrived.
    pub start: Instant,
    /// Request method.
    pub method: Method,
    /// Host header (or `-`).
    pub host: String,
    /// Path and query.
    pub path: String,
    /// Response status.
    pub status: StatusCode,
    /// Who made the status.
    pub made_by: MadeBy,
    /// The verified peer identity (listener) or the downstream address (client).
    pub peer: Arc<str>,
    /// Where the request went.
    pub upstream: Arc<str>,
}

/// What the access log needs from a request, taken before the request is forwarded.
#[derive(Debug)]
pub struct AccessStart {
    start: Instant,
    method: Method,
    host: String,
    path: String,
}

impl AccessStart {
    /// Notes the request's method, host and target.
    pub fn new<B>(req: &http::Request<B>, start: Instant) -> Self {
        AccessStart {
            start,
            method: req.method().clone(),
            host: req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .or_else(|| req.uri().authority().map(|a| a.as_str()))
                .unwrap_or("-")
                .to_owned(),
            path: req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
        }
    }

    /// The record, once the response head is known.
    pub fn finish(
        self,
        status: StatusCode,
        made_by: MadeBy,
        peer: Arc<str>,
        upstream: Arc<str>,
    ) -> Box<AccessRecord> {
        Box::new(AccessRecord {
            start: self.start,
            method: self.method,
            host: self.host,
            path: self.path,
            status,
            made_by,
            peer,
            upstream,
        })
    }
}

/// How a finished request is counted: the response's status and who made it, unless it was cut off.
#[derive(Debug)]
pub struct Count {
    /// Where it is counted.
    pub metrics: Arc<Metrics>,
    /// The status its head carried.
    pub status: StatusCode,
    /// Who made that status.
    pub made_by: MadeBy,
}

/// A response body that counts what it sends, and counts the request and writes the access-log line
/// when done.
#[derive(Debug)]
pub struct Logged<B> {
    inner: Watched<B>,
    bytes: u64,
    count: Count,
    record: Option<Box<AccessRecord>>,
}

impl<B> Logged<B> {
    /// `inner`, counted as `count` says and logged when `record` is set.
    pub fn new(inner: Watched<B>, count: Count, record: Option<Box<AccessRecord>>) -> Self {
        Logged {
            inner,
            bytes: 0,
            count,
            record,
        }
    }
}

impl<B> Body for Logged<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        // A response cut off for making no progress failed here, whatever its head said.
        let (status, made_by) = if self.inner.stalled() {
            (StatusCode::GATEWAY_TIMEOUT, MadeBy::Sidecar)
        } else {
            (self.count.status, self.count.made_by)
        };
        self.count.metrics.count_request(status, made_by);
        if let Some(r) = self.record.take() {
            // Host, path, peer and upstream go in as string values, never `%` (Display): the text
            // format then quotes and escapes them, so a Host such as `a path=/admin status=200`
            // cannot forge fields of its own. JSON has them as strings either way.
            info!(
                target: "phoenix_mesh::access",
                method = %r.method,
                host = r.host.as_str(),
                path = r.path.as_str(),
                status = r.status.as_u16(),
                made_by = r.made_by.as_str(),
                duration_ms = r.start.elapsed().as_secs_f64() * 1000.0,
                bytes = self.bytes,
                peer = &*r.peer,
                upstream = &*r.upstream,
                stalled = self.inner.stalled(),
                "request"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;

    use http_body_util::Empty;

    use super::*;

    /// Where the test's subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_lines_quote_every_value_a_request_chooses() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let forged = "a.example path=/admin status=200 peer=spiffe://admin \"x\"\nnext=line";
        tracing::subscriber::with_default(subscriber, || {
            let req = http::Request::get("/p?q=1").body(()).unwrap();
            let mut start = AccessStart::new(&req, Instant::now());
            start.host = forged.to_owned();
            let record = start.finish(
                StatusCode::BAD_REQUEST,
                MadeBy::Sidecar,
                "peer one".into(),
                "up stream".into(),
            );
            let count = Count {
                metrics: Arc::new(Metrics::new()),
                status: StatusCode::BAD_REQUEST,
                made_by: MadeBy::Sidecar,
            };
            let body = Watched::unwatched(Empty::<Bytes>::new());
            drop(Logged::new(body, count, Some(record)));
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let quoted =
            r#"host="a.example path=/admin status=200 peer=spiffe://admin \"x\"\nnext=line""#;
        assert!(text.contains(quoted), "{text}");
        // Outside the quoted Host, only the real fields remain.
        let fields = text.replace(quoted, "");
        assert!(fields.contains(r#"peer="peer one""#), "{text}");
        assert!(fields.contains(r#"upstream="up stream""#), "{text}");
        assert_eq!(fields.matches(" status=").count(), 1, "{text}");
        assert!(fields.contains(" status=400 "), "{text}");
        assert!(!fields.contains("spiffe"), "{text}");
    }
}
