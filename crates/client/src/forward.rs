//! One request from nginx to the mesh listener over the pooled mTLS link.

use std::error::Error as StdError;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::{HeaderValue, HOST};
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{capture_connection, CaptureConnection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use phoenix_mesh_common::headers::{
    remove_hop_by_hop, remove_hop_by_hop_request, restore_upgrade, retarget, upgrade_protocol,
};
use phoenix_mesh_common::metrics::MadeBy;
use phoenix_mesh_common::{mesh_error, ProxyBody, MESH_ERROR_HEADER};
use phoenix_mesh_transport::body::ResponseBody;
use phoenix_mesh_transport::tunnel::splice;
use tracing::info;

use crate::connector::MeshConnector;
use crate::link::{H2Link, LinkError, Sent};
use crate::live_conns::ConnInfo;
use crate::upstream_error::{client_cert_alert, UpstreamError};

/// The pool key: every request shares the same pool whatever its Host; the connector picks the
/// listener. Host itself travels untouched as a header.
const POOL_AUTHORITY: &str = "phoenix-mesh";

/// A pooled connection is retired when it is used this long (plus the pool's idle timeout, the
/// longest it can sit unused) before its listener certificate expires.
const RETIRE_MARGIN: Duration = Duration::from_secs(30);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

pub(crate) struct Upstream {
    /// The shared HTTP/2 connection plain requests ride (`upstream_http2`, the default).
    h2: Option<Arc<H2Link>>,
    /// Pooled HTTP/1.1 connections: `upstream_http2 = false`, or a listener that declined HTTP/2.
    client: Client<MeshConnector, ProxyBody>,
    /// HTTP/1.1-only connections for requests that upgrade (WebSocket): an upgrade cannot ride an
    /// HTTP/2 stream, and an upgraded connection never returns to a pool.
    upgrades: Client<MeshConnector, ProxyBody>,
    connector: MeshConnector,
    /// Retire connections whose listener certificate expires within this.
    retire_margin: Duration,
    /// For messages: the configured listeners.
    upstreams: String,
    timeout: Duration,
}

impl Upstream {
    pub(crate) fn new(
        connector: MeshConnector,
        upstreams: &[String],
        pool_idle: Duration,
        timeout: Duration,
        http2: bool,
    ) -> Self {
        let connector_for_expiry = connector.clone();
        let h2 =
            http2.then(|| H2Link::new(connector.clone(), pool_idle, pool_idle + RETIRE_MARGIN));
        let upgrades = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .set_host(false)
            .build(connector.http1_only());
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(pool_idle)
            .timer(TokioTimer::new())
            .set_host(false)
            .build(connector);
        Upstream {
            h2,
            client,
            upgrades,
            connector: connector_for_expiry,
            retire_margin: pool_idle + RETIRE_MARGIN,
            upstreams: upstreams.join(", "),
            timeout,
        }
    }

    /// Forwards `req` and returns the listener's response, or an error response naming the hop, with
    /// who made the status (`backend`, `listener` or `sidecar`).
    pub(crate) async fn forward(
        &self,
        mut req: Request<Incoming>,
    ) -> (Response<ResponseBody>, MadeBy) {
        let upgrade =
            upgrade_protocol(req.headers()).filter(|_| req.version() == http::Version::HTTP_11);
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
                    splice(downstream, hyper::upgrade::on(&mut response));
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
            Ok(Err(error)) => (self.failure(&*error).map(Either::Left), MadeBy::Sidecar),
            Err(_) => {
                info!(upstreams = %self.upstreams, "mesh listener too slow");
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
    ) -> Result<Response<ResponseBody>, LinkError> {
        if upgrade {
            let response = self.upgrades.request(request).await?;
            return Ok(response.map(|body| Either::Left(Either::Left(body))));
        }
        let mut request = match &self.h2 {
            Some(link) => match link.send(request).await? {
                Sent::Response(response) => return Ok(response.map(Either::Right)),
                Sent::NotH2(request) => request,
            },
            None => request,
        };
        let capture = self.retiring().then(|| capture_connection(&mut request));
        let response = self.client.request(request).await?;
        self.retire_if_stale(&response, capture.as_ref());
        Ok(response.map(|body| Either::Left(Either::Left(body))))
    }

    /// Whether requests should capture their connection: only while some open connection is stale
    /// (its listener certificate within the retire margin of expiry, or opened before our own
    /// certificate or trust was reloaded).
    fn retiring(&self) -> bool {
        let live = self.connector.live();
        unix_now() + self.retire_margin.as_secs() >= live.earliest_expiry()
            || live.oldest_generation() < self.connector.generation()
    }

    /// Takes the connection that carried `response` out of the pool if it is stale; requests in
    /// flight on it finish, new ones get a fresh connection.
    fn retire_if_stale<B>(&self, response: &Response<B>, capture: Option<&CaptureConnection>) {
        let (Some(capture), Some(info)) = (capture, response.extensions().get::<ConnInfo>()) else {
            return;
        };
        let Some(retirement) = self.connector.retirement(info, self.retire_margin) else {
            return;
        };
        if let Some(connected) = capture.connection_metadata().as_ref() {
            connected.poison();
            retirement.log();
        }
    }

    fn failure(&self, error: &(dyn StdError + 'static)) -> Response<ProxyBody> {
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
            // so its refusal arrives as an alert on the first read of the request.
            if let Some(alert) = e.downcast_ref::<io::Error>().and_then(client_cert_alert) {
                let refused = UpstreamError::client_cert_refused(&self.upstreams, alert);
                info!(upstreams = %self.upstreams, ?alert, "mesh listener refused our client certificate");
                return mesh_error(
                    StatusCode::BAD_GATEWAY,
                    refused.kind().code(),
                    refused.to_string(),
                );
            }
            root = e.to_string();
            current = e.source();
        }
        info!(upstreams = %self.upstreams, cause = %root, "request to the mesh listener failed");
        mesh_error(
            StatusCode::BAD_GATEWAY,
            "upstream-error",
            format!(
                "phoenix-mesh client: the request to the mesh listener ({}) failed: {root}",
                self.upstreams
            ),
        )
    }
}
