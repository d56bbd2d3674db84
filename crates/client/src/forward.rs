//! One request from nginx to the mesh listener over the pooled mTLS link.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, HOST};
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Either;
use hyper::body::Incoming;
use phoenix_mesh_common::conformance::{self, Refusal};
use phoenix_mesh_common::headers::{
    join_cookies, remove_hop_by_hop, remove_hop_by_hop_request, remove_identity_headers,
    restore_upgrade, retarget, AllowedUpgrades,
};
use phoenix_mesh_common::log_limit::{Cause, LogLimit, Repeat};
use phoenix_mesh_common::metrics::MadeBy;
use phoenix_mesh_common::{mesh_error, ProxyBody, MESH_ERROR_HEADER};
use phoenix_mesh_transport::body::{request_body_failure, ResponseBody};
use phoenix_mesh_transport::dial::NeverRetire;
use phoenix_mesh_transport::h2::shared::{self, SharedConnection};
use phoenix_mesh_transport::pool::{self, Pool, UpgradedMeta};
use phoenix_mesh_transport::tunnel::splice;
use tracing::info;

use crate::conn_info::ConnInfo;
use crate::connector::MeshConnector;
use crate::mesh_policy::{MeshLink, MeshPolicy};
use crate::upstream_error::{client_cert_alert, UpstreamError};

/// The `:authority` of requests on the mesh link: the listener is the connector's choice, not the
/// request's, and Host itself travels untouched as a header.
const POOL_AUTHORITY: &str = "phoenix-mesh";

/// How the client names itself in the answers it makes.
const HOP: &str = "phoenix-mesh client";

/// Why a request found no answer from the mesh listener.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// On the HTTP/2 mesh link.
    #[error("{0}")]
    Link(#[source] shared::Error<UpstreamError, ConnInfo>),
    /// Through an HTTP/1.1 pool.
    #[error("{0}")]
    Pool(#[source] pool::Error<UpstreamError>),
}

impl SendError {
    /// The kind of failure, for telling repeated ones apart in the log (never the message, which
    /// carries the request's details).
    fn cause_kind(&self) -> Cause {
        Cause::Code(match self {
            SendError::Link(shared::Error::Dial(_)) | SendError::Pool(pool::Error::Dial(_)) => {
                "dial"
            }
            SendError::Link(shared::Error::Handshake(_)) => "h2-handshake",
            SendError::Link(shared::Error::Stream { .. }) => "h2-stream",
            SendError::Link(shared::Error::TurnedAway { .. }) => "turned-away",
            SendError::Pool(pool::Error::Handshake(_)) => "http1-handshake",
            SendError::Pool(pool::Error::Request(_)) => "http1-request",
            // The client's pools have no limit: never met.
            SendError::Pool(pool::Error::Busy { .. }) => "http1-busy",
        })
    }
}

pub(crate) struct Upstream {
    /// The shared HTTP/2 connection plain requests ride (`upstream_http2`, the default).
    h2: Option<Arc<MeshLink>>,
    /// Pooled HTTP/1.1 connections: `upstream_http2 = false`, or a listener that declined HTTP/2.
    pool: Arc<Pool<MeshConnector, MeshPolicy>>,
    /// A connection each for requests that upgrade (WebSocket): an upgrade cannot ride an HTTP/2
    /// stream, and an upgraded connection never returns to a pool.
    upgrades: Pool<MeshConnector, NeverRetire>,
    /// For messages: the configured listeners.
    upstreams: Arc<str>,
    timeout: Duration,
    /// Failed requests, each kind logged once per interval however many requests it fails.
    log: LogLimit,
    /// The protocols a request may upgrade to (`allowed_upgrades`).
    allowed_upgrades: AllowedUpgrades,
}

impl Upstream {
    pub(crate) fn new(
        connector: MeshConnector,
        upstreams: &[String],
        pool_idle: Duration,
        timeout: Duration,
        http2: bool,
    ) -> Self {
        let policy = MeshPolicy::new(connector.clone());
        let h2 = http2.then(|| {
            SharedConnection::new(
                connector.clone(),
                policy.clone(),
                pool_idle,
                "the mesh listener",
            )
        });
        // Both HTTP/1.1 pools offer only `http/1.1` through ALPN: they speak nothing else.
        let http1 = connector.http1_only();
        let upgrades = Pool::unpooled(http1.clone(), NeverRetire, "the mesh listener");
        let pool = Pool::new(http1, policy, pool_idle, "the mesh listener");
        Upstream {
            h2,
            pool,
            upgrades,
            upstreams: upstreams.join(", ").into(),
            timeout,
            log: LogLimit::new(),
            allowed_upgrades: AllowedUpgrades::default(),
        }
    }

    /// Carries upgrades to `allowed` protocols only (`allowed_upgrades`); WebSocket without this.
    pub(crate) fn allowing_upgrades(mut self, allowed: AllowedUpgrades) -> Self {
        self.allowed_upgrades = allowed;
        self
    }

    /// Whether to log this failure now (see [`LogLimit`]); the metrics count every one regardless.
    fn admit(&self, message: &'static str, cause: Cause) -> bool {
        self.log.admit(&Repeat {
            message,
            hop: self.upstreams.clone(),
            cause,
        })
    }

    /// Forwards `req` and returns the listener's response, or an error response naming the hop, with
    /// who made the status (`backend`, `listener` or `sidecar`).
    pub(crate) async fn forward(
        &self,
        mut req: Request<Incoming>,
    ) -> (Response<ResponseBody>, MadeBy) {
        // The first sidecar a request reaches refuses what no hop may forward.
        let upgrade = match conformance::admit(&req, &self.allowed_upgrades) {
            Ok(upgrade) => upgrade,
            Err(refusal) => return (refusal.response(HOP).map(Either::Left), MadeBy::Sidecar),
        };
        let downstream = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // h2c from a client carries the host in :authority only.
        if !parts.headers.contains_key(HOST) {
            if let Some(authority) = parts.uri.authority() {
                if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                    parts.headers.insert(HOST, v);
                }
            }
        }
        remove_hop_by_hop_request(&mut parts.headers);
        join_cookies(&mut parts.headers);
        // The identity the backend reads is the one the listener verified; whatever nginx passed
        // on under those names stops here too, so no listener (an older one included) forwards it.
        remove_identity_headers(&mut parts.headers);
        if let Some(protocol) = upgrade {
            restore_upgrade(&mut parts.headers, protocol);
        }
        parts.uri = match retarget(
            parts.uri,
            Scheme::HTTPS,
            Authority::from_static(POOL_AUTHORITY),
        ) {
            Ok(uri) => uri,
            Err(e) => {
                return (
                    mesh_error(
                        StatusCode::BAD_REQUEST,
                        "bad-request",
                        format!("phoenix-mesh client: invalid request target: {e}"),
                    )
                    .map(Either::Left),
                    MadeBy::Sidecar,
                )
            }
        };
        parts.version = http::Version::HTTP_11;
        let request = Request::from_parts(parts, Either::Left(body));
        match tokio::time::timeout(self.timeout, self.send(request, downstream.is_some())).await {
            Ok(Ok(mut response)) => {
                if let (Some(downstream), StatusCode::SWITCHING_PROTOCOLS) =
                    (downstream, response.status())
                {
                    let cut_off = tunnel_cut_off(&response);
                    splice(downstream, hyper::upgrade::on(&mut response), cut_off);
                    return (response, MadeBy::Backend);
                }
                let made_by = if response.headers().contains_key(MESH_ERROR_HEADER) {
                    MadeBy::Listener
                } else {
                    MadeBy::Backend
                };
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                (Response::from_parts(parts, body), made_by)
            }
            Ok(Err(error)) => (self.failure(&error).map(Either::Left), MadeBy::Sidecar),
            Err(_) => {
                let message = "mesh listener too slow";
                if self.admit(message, Cause::Code("upstream-timeout")) {
                    info!(upstreams = %self.upstreams, "{message}");
                }
                (mesh_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    format!(
                        "phoenix-mesh client: mesh listener ({}) did not answer within {:?} (upstream_timeout)",
                        self.upstreams, self.timeout
                    ),
                ).map(Either::Left), MadeBy::Sidecar)
            }
        }
    }

    /// One request to a mesh listener: on the HTTP/2 link, or through an HTTP/1.1 pool (upgrades always;
    /// every request with `upstream_http2 = false` or while a listener declines HTTP/2).
    async fn send(
        &self,
        request: Request<ProxyBody>,
        upgrade: bool,
    ) -> Result<Response<ResponseBody>, SendError> {
        if upgrade {
            let response = self
                .upgrades
                .send(http1_target(request))
                .await
                .map_err(SendError::Pool)?;
            return Ok(response.map(|body| Either::Left(Either::Left(body))));
        }
        let request = match &self.h2 {
            Some(link) => match link.send(request).await.map_err(SendError::Link)? {
                shared::Sent::Response(response) => return Ok(response.map(Either::Right)),
                shared::Sent::NotHttp2(request) => request,
            },
            _ => request,
        };
        let response = self
            .pool
            .send(http1_target(request))
            .await
            .map_err(SendError::Pool)?;
        Ok(response.map(|body| Either::Left(Either::Left(body))))
    }

    fn failure(&self, error: &SendError) -> Response<ProxyBody> {
        // What broke was the sender's request body (a malformed chunk, an upload cut off), not the
        // link: the sender's error, answered here where it was read.
        if let Some(cause) = request_body_failure(error) {
            return Refusal::unreadable_body(&cause).response(HOP);
        }
        // In TLS 1.3 the listener checks our certificate after our side of the handshake is done, so
        // its refusal arrives as an alert on a later read. On the mesh link h2 keeps only an I/O
        // error's kind and message, so the connection itself keeps the alert it read.
        if let SendError::Link(link) = error {
            if let Some(alert) = link.meta().and_then(ConnInfo::refused_alert) {
                return self.refused(alert);
            }
        }
        let cause = error.cause_kind();
        let error: &(dyn StdError + 'static) = error;
        let mut current: Option<&(dyn StdError + 'static)> = Some(error);
        let mut root = error.to_string();
        while let Some(e) = current {
            if let Some(upstream) = e.downcast_ref::<UpstreamError>() {
                return mesh_error(
                    upstream.kind().status(),
                    upstream.kind().code(),
                    upstream.to_string(),
                );
            }
            // In TLS 1.3 the listener checks our certificate after our side of the handshake is done,
            // so its refusal arrives as an alert on the first read of the request (inside h2's error
            // on the mesh link, inside hyper's over HTTP/1.1).
            let io = e
                .downcast_ref::<h2::Error>()
                .and_then(h2::Error::get_io)
                .or_else(|| e.downcast_ref::<io::Error>());
            if let Some(alert) = io.and_then(client_cert_alert) {
                return self.refused(alert);
            }
            root = e.to_string();
            current = e.source();
        }
        let message = "request to the mesh listener failed";
        if self.admit(message, cause) {
            info!(upstreams = %self.upstreams, cause = %root, "{message}");
        }
        mesh_error(
            StatusCode::BAD_GATEWAY,
            "upstream-error",
            format!(
                "phoenix-mesh client: the request to the mesh listener ({}) failed: {root}",
                self.upstreams
            ),
        )
    }

    /// The answer when the listener refused our client certificate with `alert`.
    fn refused(&self, alert: rustls::AlertDescription) -> Response<ProxyBody> {
        let refused = UpstreamError::client_cert_refused(&self.upstreams, alert);
        let message = "mesh listener refused our client certificate";
        if self.admit(
            message,
            Cause::Code(alert.as_str().unwrap_or("unknown-alert")),
        ) {
            info!(upstreams = %self.upstreams, ?alert, "{message}");
        }
        mesh_error(
            StatusCode::BAD_GATEWAY,
            refused.kind().code(),
            refused.to_string(),
        )
    }
}

/// `request` with the target an HTTP/1.1 request line carries to the listener, as hyper's pooled
/// client sends it: origin form (`/path?query`; CONNECT, which has none, is refused before).
fn http1_target(mut request: Request<ProxyBody>) -> Request<ProxyBody> {
    let target = request.uri().path_and_query().map(|path| {
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(path.clone());
        Uri::from_parts(parts)
    });
    if let Some(Ok(target)) = target {
        *request.uri_mut() = target;
    }
    request
}

/// When a tunnel over the mesh connection `response` switched protocols on must be cut off, with
/// why: when that connection retires ([`phoenix_mesh_common::live::LiveConn::retired`]: its
/// certificates end soon, or a reload of our CA or CRLs refuses the listener). The connection's
/// entry among the live ones stays with its socket, which the tunnel holds, so reloads re-check it.
fn tunnel_cut_off<B>(
    response: &Response<B>,
) -> impl Future<Output = &'static str> + Send + 'static {
    let cut_off = response
        .extensions()
        .get::<UpgradedMeta<ConnInfo>>()
        .map(|meta| meta.0.live.retired());
    async move {
        match cut_off {
            Some(cut_off) => cut_off.await.as_str(),
            // Every upgrade rides a mesh connection from the upgrade pool, which always says.
            None => std::future::pending().await,
        }
    }
}
