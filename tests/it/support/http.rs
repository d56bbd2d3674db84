//! Plain HTTP clients (hyper, one connection per request) as nginx would talk to the client sidecar:
//! ones that fail the test on any error ([`send_h1`] and friends, answering a [`Reply`]), and
//! [`try_get`], which returns a failure for a test that counts them.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::backend::HELLO;
use super::STEP_LIMIT;

/// The Host nginx forwards for the demo service.
pub const SERVICE_HOST: &str = "whoami.internal.thinkheads.ai";

/// A complete response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    /// The trailers that ended the body (empty when none came).
    pub trailers: HeaderMap,
}

impl Reply {
    /// The `phoenix-mesh-error` code, if the sidecar made this response itself.
    pub fn mesh_error(&self) -> Option<&str> {
        self.headers
            .get(phoenix_mesh_common::MESH_ERROR_HEADER)
            .map(|v| v.to_str().unwrap())
    }

    /// Header `name` as a string, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// Fails the test unless this is a sidecar-made error with `status`, `code`, and a body
    /// containing every one of `needles`.
    pub fn assert_mesh_error(&self, status: u16, code: &str, needles: &[&str]) {
        assert_eq!(self.status.as_u16(), status, "{self:#?}");
        assert_eq!(self.mesh_error(), Some(code), "{self:#?}");
        assert_eq!(
            self.header("content-type"),
            Some("text/plain; charset=utf-8"),
            "{self:#?}"
        );
        for needle in needles {
            assert!(
                self.body.contains(needle),
                "body should mention {needle:?}: {self:#?}"
            );
        }
    }
}

/// Fails the test unless `reply` is the recording backend's default answer, untouched by the mesh.
pub fn assert_hello(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::OK, "{reply:#?}");
    assert_eq!(reply.body, HELLO, "{reply:#?}");
    assert_eq!(reply.header("x-backend"), Some("echo"), "{reply:#?}");
    assert_eq!(reply.mesh_error(), None, "{reply:#?}");
}

/// A GET for `target` with the service Host.
pub fn get(target: &str) -> Request<Empty<Bytes>> {
    Request::get(target)
        .header("host", SERVICE_HOST)
        .body(Empty::new())
        .unwrap()
}

/// Sends `req` over a fresh HTTP/1.1 connection to `addr`; the body is left to stream.
pub async fn send_h1_streaming<B>(addr: SocketAddr, req: Request<B>) -> Response<Incoming>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    h1_over(TcpStream::connect(addr).await.unwrap(), req).await
}

/// Sends `req` over a fresh HTTP/1.1 connection to the unix socket at `path` and reads the whole
/// response.
pub async fn send_h1_unix<B>(path: &std::path::Path, req: Request<B>) -> Reply
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::UnixStream::connect(path).await.unwrap();
    collect(h1_over(stream, req).await).await
}

async fn h1_over<S, B>(stream: S, req: Request<B>) -> Response<Incoming>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender.send_request(req).await.unwrap()
}

/// Sends `req` over a fresh HTTP/1.1 connection to `addr` and reads the whole response.
pub async fn send_h1<B>(addr: SocketAddr, req: Request<B>) -> Reply
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    collect(send_h1_streaming(addr, req).await).await
}

/// Sends `req` as h2c with prior knowledge (HTTP/2 over plain TCP) to `addr`.
pub async fn send_h2c<B>(addr: SocketAddr, req: Request<B>) -> Reply
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    collect(sender.send_request(req).await.unwrap()).await
}

/// Reads a whole response.
pub async fn collect(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body = collected.to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        trailers,
    }
}

/// One request's outcome, as the downstream saw it.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub mesh_error: Option<String>,
    pub body: String,
}

/// GET `target` with the service Host over a fresh connection to `addr`; errors as strings.
pub async fn try_get(addr: SocketAddr, target: &str) -> Result<Got, String> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let response = sender
            .send_request(get(target))
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        let mesh_error = response
            .headers()
            .get(phoenix_mesh_common::MESH_ERROR_HEADER)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Got {
            status,
            mesh_error,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    match tokio::time::timeout(STEP_LIMIT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "GET {target} via {addr}: no answer within {STEP_LIMIT:?}"
        )),
    }
}

/// GETs `/` through `addr` and fails the test unless the backend's 200 came back.
pub async fn assert_round_trip(addr: SocketAddr, what: &str) {
    let got = try_get(addr, "/")
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        (got.status, got.body.as_str()),
        (200, HELLO),
        "{what}: {got:?}"
    );
}
