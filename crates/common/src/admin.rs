//! The admin endpoint on loopback: `/healthz` (alive), `/readyz` (ready to carry traffic),
//! `/metrics` (Prometheus text) and `/certs` (the certificates in service, JSON).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use phoenix_mesh_certs::error_chain;
use tokio::net::TcpListener;
use tracing::{debug, info};

use phoenix_mesh_transport::serve::{accept_loop, ShutdownWatch};

/// Why `/readyz` answers 503; the text follows `not ready: `.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    /// The accept loop is not running (not yet, or no more).
    #[error("the {side} is not accepting connections")]
    NotServing {
        /// The side, as it names itself (`client sidecar`, `mesh listener`).
        side: &'static str,
    },
    /// Our own certificate has run out.
    #[error("our certificate ({subject}) has expired")]
    CertificateExpired {
        /// Its subject.
        subject: String,
    },
    /// The hop the side depends on does not answer (the client: no mesh listener completes mutual
    /// TLS); the text is the whole error chain.
    #[error("{}", error_chain(.0.as_ref()))]
    Peer(Box<dyn std::error::Error + Send + Sync>),
}

/// What the admin endpoint asks of a sidecar.
pub trait AdminState: Send + Sync + 'static {
    /// `Ok(detail)` when ready to carry traffic, else why not.
    fn ready(&self) -> Pin<Box<dyn Future<Output = Result<String, NotReady>> + Send + '_>>;
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
    /// The `/certs` document ([`crate::certs_report`]).
    fn certs(&self) -> String;
}

/// Serves the admin endpoint on `listener` until shutdown. A connection that has not sent a whole
/// request head within `header_read_timeout` (a silent one, an idle keep-alive one) is closed: 64 are
/// served at a time, and a local process holding them would blind `/readyz` and the scrape.
pub async fn serve_admin(
    listener: TcpListener,
    state: Arc<dyn AdminState>,
    header_read_timeout: Duration,
    shutdown: ShutdownWatch,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(admin = %addr, "admin endpoint serving /healthz, /readyz, /metrics, /certs");
    }
    accept_loop(listener, 64, shutdown, move |stream, _, slot| {
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&*state, &req).await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, "admin connection ended with an error");
            }
        });
    })
    .await;
}

async fn route(state: &dyn AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain; charset=utf-8",
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain; charset=utf-8"),
        "/readyz" => match state.ready().await {
            Ok(detail) => text(
                StatusCode::OK,
                format!("ready: {detail}\n"),
                "text/plain; charset=utf-8",
            ),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
                "text/plain; charset=utf-8",
            ),
        },
        "/metrics" => text(
            StatusCode::OK,
            state.metrics(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/certs" => text(StatusCode::OK, state.certs(), "application/json"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics, /certs\n".into(),
            "text/plain; charset=utf-8",
        ),
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
