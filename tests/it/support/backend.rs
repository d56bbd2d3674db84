//! A small hyper backend standing in for Traefik: HTTP/1.1 and, like Traefik's entrypoints, h2c with
//! prior knowledge (or HTTP/1.1 only, [`Backend::start_http1_only`]). It records what it saw and
//! answers by path:
//!
//! - `/404`: Traefik's own `404 page not found`.
//! - `/slow`: answers only after 30 s (for backend_timeout); counts the times it was given up on.
//! - `/delay/MS`: answers `HELLO` after MS milliseconds.
//! - `/stall`: sends its response head and two bytes (`ab`, chunked), then nothing; counts the times
//!   the proxy in front dropped such a response (`stalls_released`).
//! - `/upload`: reads the body frame by frame without keeping it; answers `<length> <sha256>`, or
//!   `400` when the body fails (recorded in `Seen::upload_error`).
//! - `/download?bytes=N`: streams N pattern bytes, gated on the test's progress (see `stream`).
//! - `/big-head?bytes=N`: `200` with about N bytes of response headers (`x-big-0`, ... of 4000 bytes
//!   each), for heads larger than one HTTP/2 frame.
//! - `/trailers`: answers the request's data followed by trailers, as a gRPC server would:
//!   `grpc-status: 0` and each request trailer echoed as `x-echo-NAME`.
//! - anything else: `200 hello from backend` with `x-backend: echo`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::stream::{gated_body, try_drain_hashing, ChannelBody, TrailerBody};

/// Body of Traefik's own 404.
pub const TRAEFIK_404: &str = "404 page not found\n";
/// Body of the default answer.
pub const HELLO: &str = "hello from backend\n";

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    /// Path and query.
    pub target: String,
    /// The request's authority (HTTP/2 `:authority`), if any.
    pub authority: Option<String>,
    pub version: Version,
    pub headers: HeaderMap,
    /// For `/upload`: (length, sha256, largest frame).
    pub upload: Option<(u64, String, usize)>,
    /// For `/upload`: why the body failed, if it did.
    pub upload_error: Option<String>,
}

impl Seen {
    /// Every value of header `name`, as strings.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    /// The single value of header `name`; fails the test if absent or repeated.
    pub fn one(&self, name: &str) -> String {
        let all = self.all(name);
        assert_eq!(
            all.len(),
            1,
            "backend saw {name} {} times: {:?}",
            all.len(),
            self.headers
        );
        all.into_iter().next().unwrap()
    }
}

struct Shared {
    seen: Mutex<Vec<Seen>>,
    /// Bytes of the current upload the backend has read so far.
    upload_progress: watch::Sender<u64>,
    /// Bytes of the current download the test has read so far (set by the test).
    download_progress: watch::Sender<u64>,
    /// `/slow` requests dropped before they were answered (the connection went away).
    abandoned: AtomicU64,
    /// `/stall` responses the proxy in front dropped (it stopped reading them).
    stalls_released: AtomicU64,
    /// TCP connections accepted.
    connections: AtomicU64,
    /// TCP connections open now.
    open: AtomicU64,
    /// Bumped to close every open connection gracefully (HTTP/2: GOAWAY).
    close: watch::Sender<u64>,
}

/// A running backend; stops accepting when dropped.
pub struct Backend {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Starts on a free loopback port, serving HTTP/1.1 and h2c.
    pub async fn start() -> Backend {
        Backend::start_serving(false).await
    }

    /// Starts on a free loopback port, serving HTTP/1.1 only.
    pub async fn start_http1_only() -> Backend {
        Backend::start_serving(true).await
    }

    async fn start_serving(http1_only: bool) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            seen: Mutex::new(Vec::new()),
            upload_progress: watch::channel(0).0,
            download_progress: watch::channel(0).0,
            abandoned: AtomicU64::new(0),
            stalls_released: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open: AtomicU64::new(0),
            close: watch::channel(0).0,
        });
        let task = tokio::spawn(accept(listener, shared.clone(), http1_only));
        Backend { addr, shared, task }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// TCP connections open now (accepted and not yet ended on the backend's side).
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Closes every open connection gracefully: requests in progress finish, HTTP/2 connections get
    /// GOAWAY. New connections are still accepted.
    pub fn close_connections(&self) {
        self.shared.close.send_modify(|n| *n += 1);
    }

    /// Every request seen so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// The only request seen so far; fails the test if there were none or several.
    pub fn only_request(&self) -> Seen {
        let seen = self.seen();
        assert_eq!(
            seen.len(),
            1,
            "backend saw {} requests: {seen:#?}",
            seen.len()
        );
        seen.into_iter().next().unwrap()
    }

    /// The targets (path and query) of the requests seen so far that start with `prefix`.
    pub fn targets_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.seen()
            .into_iter()
            .map(|s| s.target)
            .filter(|t| t.starts_with(prefix))
            .collect()
    }

    /// The `X-Forwarded-Client-Cert` of the last request seen; fails the test if there was none.
    pub fn last_xfcc(&self) -> String {
        self.seen()
            .last()
            .expect("the backend has seen a request")
            .one("x-forwarded-client-cert")
    }

    /// Where a test uploading through the mesh can watch the backend's progress.
    pub fn upload_progress(&self) -> watch::Receiver<u64> {
        self.shared.upload_progress.subscribe()
    }

    /// How many `/slow` requests were dropped unanswered: the proxy in front gave up on them.
    pub fn abandoned(&self) -> u64 {
        self.shared.abandoned.load(Ordering::SeqCst)
    }

    /// How many `/stall` responses the proxy in front dropped half-way.
    pub fn stalls_released(&self) -> u64 {
        self.shared.stalls_released.load(Ordering::SeqCst)
    }

    /// Where a test downloading through the mesh reports its progress to the backend.
    pub fn download_progress(&self) -> &watch::Sender<u64> {
        &self.shared.download_progress
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>, http1_only: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        shared.open.fetch_add(1, Ordering::SeqCst);
        let mut close = shared.close.subscribe();
        let shared = shared.clone();
        tokio::spawn(async move {
            let handler = shared.clone();
            let service = service_fn(move |req| handle(handler.clone(), req));
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if http1_only {
                builder = builder.http1_only();
            }
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = close.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            shared.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

type BackendBody = Either<Full<Bytes>, Either<ChannelBody, TrailerBody>>;

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<BackendBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let mut seen = Seen {
        method: parts.method.clone(),
        target: target.clone(),
        authority: parts.uri.authority().map(|a| a.as_str().to_owned()),
        version: parts.version,
        headers: parts.headers.clone(),
        upload: None,
        upload_error: None,
    };
    let path = parts.uri.path();
    let response = match path {
        "/upload" => match try_drain_hashing(body, &shared.upload_progress).await {
            Ok((len, sha, largest)) => {
                seen.upload = Some((len, sha.clone(), largest));
                text(StatusCode::OK, format!("{len} {sha}"))
            }
            Err(error) => {
                seen.upload_error = Some(error);
                text(StatusCode::BAD_REQUEST, "upload failed\n".to_owned())
            }
        },
        "/download" => {
            let total: u64 = parts
                .uri
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let body = gated_body(total, shared.download_progress.subscribe());
            let mut r = Response::new(Either::Right(Either::Left(body)));
            r.headers_mut()
                .insert("content-type", "application/octet-stream".parse().unwrap());
            r
        }
        "/trailers" => match body.collect().await {
            Ok(collected) => {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                for (name, value) in collected.trailers().into_iter().flatten() {
                    let echo = HeaderName::from_bytes(format!("x-echo-{name}").as_bytes()).unwrap();
                    trailers.append(echo, value.clone());
                }
                let body = TrailerBody::new(collected.to_bytes(), trailers);
                let mut r = Response::new(Either::Right(Either::Right(body)));
                r.headers_mut()
                    .insert("content-type", "application/grpc".parse().unwrap());
                r
            }
            Err(error) => {
                seen.upload_error = Some(error.to_string());
                text(StatusCode::BAD_REQUEST, "upload failed\n".to_owned())
            }
        },
        "/stall" => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let _ = tx.try_send(Bytes::from_static(b"ab"));
            let released = shared.clone();
            tokio::spawn(async move {
                tx.closed().await;
                released.stalls_released.fetch_add(1, Ordering::SeqCst);
            });
            Response::new(Either::Right(Either::Left(ChannelBody::new(rx))))
        }
        "/big-head" => {
            let total: usize = parts
                .uri
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let mut r = text(StatusCode::OK, HELLO.to_owned());
            let value = HeaderValue::from_str(&"h".repeat(4000)).unwrap();
            for i in 0..total.div_ceil(4000) {
                let name = HeaderName::from_bytes(format!("x-big-{i}").as_bytes()).unwrap();
                r.headers_mut().insert(name, value.clone());
            }
            r
        }
        "/404" => {
            let mut r = text(StatusCode::NOT_FOUND, TRAEFIK_404.to_owned());
            r.headers_mut()
                .insert("x-content-type-options", "nosniff".parse().unwrap());
            r
        }
        delayed if delayed.starts_with("/delay/") => {
            let ms: u64 = delayed["/delay/".len()..].parse().unwrap_or(0);
            shared.seen.lock().unwrap().push(seen);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            return Ok(text(StatusCode::OK, HELLO.to_owned()));
        }
        "/slow" => {
            shared.seen.lock().unwrap().push(seen);
            let mut given_up = Abandoned(Some(shared.clone()));
            tokio::time::sleep(Duration::from_secs(30)).await;
            given_up.0 = None;
            return Ok(text(StatusCode::OK, "finally\n".to_owned()));
        }
        _ => {
            let mut r = text(StatusCode::OK, HELLO.to_owned());
            r.headers_mut().insert("x-backend", "echo".parse().unwrap());
            r
        }
    };
    shared.seen.lock().unwrap().push(seen);
    Ok(response)
}

/// Counts a `/slow` request dropped before its answer (hyper drops the handler when the connection
/// closes mid-request).
struct Abandoned(Option<Arc<Shared>>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<BackendBody> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "text/plain; charset=utf-8".parse().unwrap());
    r
}
