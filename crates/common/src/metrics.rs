//! The Prometheus metrics both sidecars export on `/metrics`, every name prefixed `phoenix_mesh_`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A TLS handshake's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `ok` or `failed`.
    pub result: &'static str,
    /// Why it failed (`unknown-ca`, `expired`, `not-allowed`, ...), `none` when it succeeded.
    pub reason: &'static str,
    /// `full` or `resumed` (`unknown` for failures).
    pub kind: &'static str,
}

/// A finished HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `2xx`, `3xx`, `4xx`, `5xx` or `1xx`.
    pub status_class: &'static str,
    /// Who made the status: `sidecar` (this process), `listener` (the mesh listener, seen from the
    /// client) or `backend`.
    pub made_by: &'static str,
}

/// Which certificate a not-after time is for.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// `own` or `peer` (the mesh listener's, on the client).
    pub cert: &'static str,
}

/// A result label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `failed`.
    pub result: &'static str,
}

/// Outcome of dialling an upstream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The upstream, as configured.
    pub upstream: String,
    /// `ok` or the error code (`upstream-unreachable`, ...).
    pub result: &'static str,
}

/// One upstream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamName {
    /// The upstream, as configured.
    pub upstream: String,
}

/// Every metric of one process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// TLS handshakes by result, failure reason and kind.
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// TLS handshake duration.
    pub handshake_seconds: Histogram,
    /// HTTP requests by status class and who made the status.
    pub requests: Family<RequestLabels, Counter>,
    /// HTTP request duration until the response head.
    pub request_seconds: Histogram,
    /// Open downstream connections (from nginx on the client, from clients on the listener).
    pub open_connections: Gauge,
    /// Open connections to upstreams (mesh listeners on the client, Traefik is pooled by hyper).
    pub upstream_connections: Gauge,
    /// Upstream dials by upstream and result.
    pub upstream_dials: Family<UpstreamLabels, Counter>,
    /// 1 while an upstream is in rotation, 0 while it is ejected for failing.
    pub upstream_healthy: Family<UpstreamName, Gauge>,
    /// Not-after of our certificate and, on the client, the listener's, as Unix seconds.
    pub cert_not_after: Family<CertLabels, Gauge>,
    /// Certificate and config reloads by result.
    pub reloads: Family<ResultLabels, Counter>,
    /// `requests`' counters by [`STATUS_CLASSES`] and [`MADE_BY`] index, each taken from the family
    /// the first time it is used: counting a request is then an atomic add, not a locked hash lookup.
    request_counters: [[OnceLock<Counter>; MADE_BY.len()]; STATUS_CLASSES.len()],
}

/// The `status_class` label values, by status code / 100 - 1.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `made_by` label values the sidecars use.
const MADE_BY: [&str; 3] = ["backend", "listener", "sidecar"];

impl Metrics {
    /// All metrics, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("phoenix_mesh");
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes by result, failure reason and kind",
            handshakes.clone(),
        );
        let handshake_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "tls_handshake_duration_seconds",
            "TLS handshake duration",
            handshake_seconds.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by status class and who made the status",
            requests.clone(),
        );
        let request_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        registry.register(
            "http_request_duration_seconds",
            "HTTP request duration until the response head",
            request_seconds.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Open downstream connections",
            open_connections.clone(),
        );
        let upstream_connections = Gauge::default();
        registry.register(
            "upstream_connections",
            "Open connections to mesh listeners (pooled and in use)",
            upstream_connections.clone(),
        );
        let upstream_dials = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_dials",
            "Connections dialled to upstreams by result",
            upstream_dials.clone(),
        );
        let upstream_healthy = Family::<UpstreamName, Gauge>::default();
        registry.register(
            "upstream_healthy",
            "1 while an upstream is in rotation, 0 while it is ejected after repeated failures",
            upstream_healthy.clone(),
        );
        let cert_not_after = Family::<CertLabels, Gauge>::default();
        registry.register(
            "certificate_not_after_seconds",
            "Certificate expiry as Unix time: our own, and the mesh listener's on the client",
            cert_not_after.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reloads",
            "Certificate and config reloads by result",
            reloads.clone(),
        );
        Metrics {
            registry,
            handshakes,
            handshake_seconds,
            requests,
            request_seconds,
            open_connections,
            upstream_connections,
            upstream_dials,
            upstream_healthy,
            cert_not_after,
            reloads,
            request_counters: Default::default(),
        }
    }

    /// Counts one handshake.
    pub fn handshake(
        &self,
        result: &'static str,
        reason: &'static str,
        kind: &'static str,
        took: Duration,
    ) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                result,
                reason,
                kind,
            })
            .inc();
        self.handshake_seconds.observe(took.as_secs_f64());
    }

    /// Counts one request.
    pub fn request(&self, status: http::StatusCode, made_by: &'static str, took: Duration) {
        let class = match status.as_u16() {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        let labels = |made_by| RequestLabels {
            status_class: STATUS_CLASSES[class],
            made_by,
        };
        match MADE_BY.iter().position(|m| *m == made_by) {
            Some(who) => self.request_counters[class][who]
                .get_or_init(|| self.requests.get_or_create(&labels(MADE_BY[who])).clone())
                .inc(),
            None => self.requests.get_or_create(&labels(made_by)).inc(),
        };
        self.request_seconds.observe(took.as_secs_f64());
    }

    /// Brings a counter kept elsewhere (an atomic) up to `total`.
    pub fn sync_reloads(&self, succeeded: &AtomicU64, failed: &AtomicU64) {
        for (result, total) in [("ok", succeeded), ("failed", failed)] {
            let counter = self.reloads.get_or_create(&ResultLabels { result });
            let total = total.load(Ordering::Relaxed);
            let have = counter.get();
            if total > have {
                counter.inc_by(total - have);
            }
        }
    }

    /// Sets a certificate's not-after time.
    pub fn set_not_after(&self, cert: &'static str, unix_seconds: u64) {
        self.cert_not_after
            .get_or_create(&CertLabels { cert })
            .set(i64::try_from(unix_seconds).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds a gauge up by one while alive.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    /// Increments `gauge` until dropped.
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(metrics: &Metrics, labels: &str) -> Option<u64> {
        let text = metrics.encode();
        let prefix = format!("phoenix_mesh_http_requests_total{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn counts_requests_by_class_and_maker_through_the_cached_counters() {
        let m = Metrics::new();
        let took = Duration::from_millis(1);
        m.request(http::StatusCode::OK, "backend", took);
        m.request(http::StatusCode::NO_CONTENT, "backend", took);
        m.request(http::StatusCode::BAD_GATEWAY, "sidecar", took);
        m.request(http::StatusCode::BAD_GATEWAY, "listener", took);
        m.request(http::StatusCode::NOT_FOUND, "elsewhere", took);
        for (labels, want) in [
            (r#"status_class="2xx",made_by="backend""#, 2),
            (r#"status_class="5xx",made_by="sidecar""#, 1),
            (r#"status_class="5xx",made_by="listener""#, 1),
            (r#"status_class="4xx",made_by="elsewhere""#, 1),
        ] {
            assert_eq!(count(&m, labels), Some(want), "{labels}");
        }
        // Series appear when first used, not before.
        assert_eq!(count(&m, r#"status_class="2xx",made_by="sidecar""#), None);
        assert_eq!(
            m.requests
                .get_or_create(&RequestLabels {
                    status_class: "2xx",
                    made_by: "backend"
                })
                .get(),
            2
        );
    }
}
