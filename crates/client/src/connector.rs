//! The *mesh connector* opens the client's connections to the mesh listeners for the pools and the
//! readiness probe. It refuses to dial with our own certificate expired, tries the configured
//! listeners in the [`Balancer`]'s order (round-robin, the ejected ones last) until one answers, and
//! reports the dial results to the balancer and the metrics. A refused connection or a failed
//! handshake moves on to the next listener: no request bytes have been sent yet.
//!
//! One listener's dial is [`crate::dial_listener`]; what a failure says, [`crate::upstream_error`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::time::{Duration, SystemTime};

use phoenix_mesh_certs::{LiveClientTls, LiveTls};
use phoenix_mesh_common::live::{End, LiveConnections};
use phoenix_mesh_common::log_limit::{Cause, LogLimit, Repeat};
use phoenix_mesh_common::metrics::{DialResult, Metrics, UpstreamLabels, UpstreamName};
use phoenix_mesh_transport::balance::Balancer;
use phoenix_mesh_transport::dial::{Connected, Dial, Protocol};
use rustls::pki_types::ServerName;
use tracing::{info, warn};

use crate::conn_info::ConnInfo;
use crate::dial_listener::ListenerDial;
use crate::mesh_stream::MeshStream;
use crate::retirement::Retirement;
use crate::upstream_error::UpstreamError;

/// The connector the pools dial through; the flag makes it offer only HTTP/1.1.
#[derive(Clone)]
pub(crate) struct MeshConnector(Arc<Dialer>, bool);

/// The listeners, their health, and how to dial one.
struct Dialer {
    upstreams: Vec<Arc<str>>,
    balancer: Balancer,
    listener: ListenerDial,
    /// Failed dials, each listener and kind logged once per interval however many requests dial it.
    log: LogLimit,
}

impl MeshConnector {
    pub(crate) fn new(
        upstreams: Vec<String>,
        server_name: ServerName<'static>,
        tls: Arc<LiveClientTls>,
        connect_timeout: Duration,
        handshake_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let live = LiveConnections::new(metrics.clone(), End::Dialled);
        MeshConnector(
            Arc::new(Dialer {
                balancer: Balancer::new(upstreams.len()),
                upstreams: upstreams.into_iter().map(Arc::from).collect(),
                listener: ListenerDial::new(
                    server_name,
                    tls,
                    connect_timeout,
                    handshake_timeout,
                    metrics,
                    live,
                ),
                log: LogLimit::new(),
            }),
            false,
        )
    }

    /// Dials a mesh listener (TCP, mutual TLS), offering HTTP/2 unless this connector is HTTP/1.1-only.
    pub(crate) async fn dial(&self) -> Result<MeshStream, UpstreamError> {
        self.0.dial(self.1).await
    }

    /// Dials a mesh listener (TCP, mutual TLS) and hangs up: the readiness probe.
    pub(crate) async fn probe(&self) -> Result<(), UpstreamError> {
        self.0.dial(false).await.map(drop)
    }

    /// Our current TLS generation; connections from an older one are stale.
    pub(crate) fn generation(&self) -> u64 {
        self.0.listener.tls.generation()
    }

    /// Why a connection opened with `info` must take no new requests, if it must: its
    /// certificates end soon, the trust now in force refuses it, or our own certificate or trust
    /// was reloaded since.
    pub(crate) fn retirement(&self, info: &ConnInfo) -> Option<Retirement> {
        Retirement::of(
            info.live.retirement(SystemTime::now()),
            info.generation,
            self.generation(),
        )
    }

    /// The established connections to the listeners, with who is on each (for `/certs`).
    pub(crate) fn live(&self) -> &Arc<LiveConnections> {
        &self.0.listener.live
    }

    /// Re-checks every established connection against the trust now in force (after a reload
    /// changed the CA or CRLs): those it refuses retire, and close once their requests finish.
    pub(crate) fn recheck(&self) -> usize {
        let listener = &self.0.listener;
        listener
            .live
            .recheck(|auth| listener.tls.recheck(auth, &listener.server_name))
    }

    /// The same dialler offering only HTTP/1.1 through ALPN, for requests that upgrade.
    pub(crate) fn http1_only(&self) -> Self {
        MeshConnector(self.0.clone(), true)
    }

    /// Unix time the last seen listener certificate expires (0 before the first connection).
    pub(crate) fn listener_not_after(&self) -> u64 {
        self.0.listener.listener_not_after.load(Ordering::Relaxed)
    }
}

impl Dialer {
    /// Tries each listener once, in the balancer's order.
    async fn dial(&self, http1_only: bool) -> Result<MeshStream, UpstreamError> {
        // The listener refuses an expired certificate, and on a resumed session it can only do so by
        // hanging up after the handshake; say why here instead (and spare the listeners' health).
        let own = self.listener.tls.leaf();
        if let Ok(ago) = SystemTime::now().duration_since(own.not_after) {
            return Err(UpstreamError::OwnCertificateExpired {
                subject: own.subject.clone(),
                ago,
            });
        }
        let mut failures = Vec::new();
        for i in self.balancer.order() {
            let upstream = &self.upstreams[i];
            match self.listener.dial(upstream, http1_only).await {
                Ok(stream) => {
                    self.count_dial(upstream, DialResult::Ok);
                    self.succeeded(i);
                    return Ok(stream);
                }
                Err(error) => {
                    let code = error.kind().code();
                    self.count_dial(upstream, DialResult::Failed(code));
                    let repeat = Repeat {
                        message: "mesh listener connection failed",
                        hop: upstream.clone(),
                        cause: Cause::Code(code),
                    };
                    if self.log.admit(&repeat) {
                        info!(upstream = %upstream, code, %error, "{}", repeat.message);
                    }
                    self.failed(i);
                    failures.push(error);
                }
            }
        }
        Err(UpstreamError::all_failed(failures))
    }

    fn succeeded(&self, i: usize) {
        let upstream = &self.upstreams[i];
        if self.balancer.succeeded(i) {
            info!(%upstream, "mesh listener answered its probe; back in rotation");
        }
        self.set_healthy(upstream, true);
    }

    fn failed(&self, i: usize) {
        let Some(ban) = self.balancer.failed(i) else {
            return;
        };
        let upstream = &self.upstreams[i];
        self.set_healthy(upstream, false);
        if self.upstreams.len() > 1 {
            warn!(%upstream, ejected_for_s = ban.as_secs(), "mesh listener keeps failing; ejected from rotation");
        }
    }

    fn set_healthy(&self, upstream: &str, healthy: bool) {
        self.listener
            .metrics
            .upstream_healthy
            .get_or_create(&UpstreamName {
                upstream: upstream.to_owned(),
            })
            .set(i64::from(healthy));
    }

    fn count_dial(&self, upstream: &str, result: DialResult) {
        self.listener
            .metrics
            .upstream_dials
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
                result,
            })
            .inc();
    }
}

impl Dial for MeshConnector {
    type Io = MeshStream;
    type Meta = ConnInfo;
    type Error = UpstreamError;

    async fn dial(&self) -> Result<Connected<MeshStream, ConnInfo>, UpstreamError> {
        let stream = MeshConnector::dial(self).await?;
        let protocol = if stream.is_h2() {
            Protocol::Http2
        } else {
            Protocol::Http1
        };
        Ok(Connected {
            meta: stream.info().clone(),
            io: stream,
            protocol,
        })
    }
}
