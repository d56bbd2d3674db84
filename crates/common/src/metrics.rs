//! The Prometheus metrics both sidecars export on `/metrics`, every name prefixed `phoenix_mesh_`.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A label's closed set of values, each with the exact text dashboards and tests read. The
/// `EncodeLabelValue` derive renders a variant's Rust name, which cannot be `unknown-ca` or `ok`, so
/// the text is written beside each variant instead.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl $name {
            /// The label value as rendered.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    };
}

label_values! {
    /// Whether something worked: a handshake, a reload.
    Outcome {
        /// It worked.
        Ok => "ok",
        /// It failed.
        Failed => "failed",
    }
}

label_values! {
    /// How a successful handshake went (`unknown` for failures).
    HandshakeKind {
        /// A full handshake, certificates verified.
        Full => "full",
        /// A resumed session.
        Resumed => "resumed",
        /// A failed handshake.
        Unknown => "unknown",
    }
}

label_values! {
    /// Who made a response's status.
    MadeBy {
        /// The backend (Traefik), through the mesh.
        Backend => "backend",
        /// The mesh listener, seen from the client (its response carries `phoenix-mesh-error`).
        Listener => "listener",
        /// This process.
        Sidecar => "sidecar",
    }
}

impl MadeBy {
    /// Every value, in the order of their counters' cache.
    const ALL: [MadeBy; 3] = [MadeBy::Backend, MadeBy::Listener, MadeBy::Sidecar];
}

label_values! {
    /// Which certificate a not-after time is for.
    CertKind {
        /// Ours.
        Own => "own",
        /// The peer's (the mesh listener's, on the client).
        Peer => "peer",
    }
}

label_values! {
    /// Why the mesh closed an established connection itself
    /// (`phoenix_mesh_connections_closed_total{reason}`).
    ClosedReason {
        /// The peer's chain ends soon: closed before its earliest `notAfter`.
        CertificateExpiry => "certificate_expiry",
        /// Our own chain, as this connection presented it, ends soon.
        OwnCertificateExpiry => "own_certificate_expiry",
        /// A CRL reload revoked the peer's certificate.
        Revoked => "revoked",
        /// The peer is no longer in `allowed_peers`.
        NotAllowed => "not_allowed",
        /// The peer's chain no longer verifies against the reloaded `ca`.
        CaChanged => "ca_changed",
        /// The connection's TLS version is below the reloaded `min_tls_version`.
        TlsVersion => "tls_version",
    }
}

label_values! {
    /// A response status's class.
    StatusClass {
        /// 1xx.
        Informational => "1xx",
        /// 2xx.
        Success => "2xx",
        /// 3xx.
        Redirection => "3xx",
        /// 4xx.
        ClientError => "4xx",
        /// 5xx (and anything out of range).
        ServerError => "5xx",
    }
}

impl StatusClass {
    /// Every value, in the order of their counters' cache.
    const ALL: [StatusClass; 5] = [
        StatusClass::Informational,
        StatusClass::Success,
        StatusClass::Redirection,
        StatusClass::ClientError,
        StatusClass::ServerError,
    ];

    /// The class of `status`.
    pub fn of(status: http::StatusCode) -> Self {
        match status.as_u16() {
            100..=199 => StatusClass::Informational,
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirection,
            400..=499 => StatusClass::ClientError,
            _ => StatusClass::ServerError,
        }
    }
}

/// Why a TLS handshake failed, or `none`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum HandshakeReason {
    /// It did not fail.
    None,
    /// It did not finish within `handshake_timeout`.
    Timeout,
    /// The connection failed below TLS.
    Io,
    /// Plain HTTP arrived on the mutual-TLS port.
    PlaintextHttp,
    /// The first bytes were neither TLS nor HTTP.
    NotTls,
    /// The client finished without a certificate.
    NoCertificate,
    /// The client certificate cannot be read as the identity the listener forwards.
    BadCertificate,
    /// The client certificate expired after its session began (a resumed session).
    Expired,
    /// Dropped before it finished, to make room for a newer connection: `max_pending_handshakes`
    /// were pending and this one was the oldest.
    Dropped,
    /// What rustls' error says, as [`phoenix_mesh_certs::failure_reason`] names it.
    Tls(&'static str),
}

impl HandshakeReason {
    /// The label value as rendered.
    pub const fn as_str(self) -> &'static str {
        match self {
            HandshakeReason::None => "none",
            HandshakeReason::Timeout => "timeout",
            HandshakeReason::Io => "io",
            HandshakeReason::PlaintextHttp => "plaintext-http",
            HandshakeReason::NotTls => "not-tls",
            HandshakeReason::NoCertificate => "no-certificate",
            HandshakeReason::BadCertificate => "bad-certificate",
            HandshakeReason::Expired => "expired",
            HandshakeReason::Dropped => "dropped",
            HandshakeReason::Tls(reason) => reason,
        }
    }
}

impl EncodeLabelValue for HandshakeReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(self.as_str())
    }
}

/// How dialling an upstream ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DialResult {
    /// Connected, TLS established.
    Ok,
    /// Failed; the `phoenix-mesh-error` code the failure answers with (`upstream-unreachable`, ...).
    Failed(&'static str),
}

impl EncodeLabelValue for DialResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(match self {
            DialResult::Ok => "ok",
            DialResult::Failed(code) => code,
        })
    }
}

/// A TLS handshake's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `ok` or `failed`.
    pub result: Outcome,
    /// Why it failed (`unknown-ca`, `expired`, `not-allowed`, ...), `none` when it succeeded.
    pub reason: HandshakeReason,
    /// `full` or `resumed` (`unknown` for failures).
    pub kind: HandshakeKind,
}

/// A finished HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `2xx`, `3xx`, `4xx`, `5xx` or `1xx`.
    pub status_class: StatusClass,
    /// Who made the status.
    pub made_by: MadeBy,
}

/// Which certificate a not-after time is for.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// `own` or `peer` (the mesh listener's, on the client).
    pub cert: CertKind,
}

/// Why a connection was closed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    /// `certificate_expiry`, `revoked`, ...
    pub reason: ClosedReason,
}

/// A result label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `failed`.
    pub result: Outcome,
}

/// Outcome of dialling an upstream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The upstream, as configured.
    pub upstream: String,
    /// `ok` or the error code (`upstream-unreachable`, ...).
    pub result: DialResult,
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
    /// The same times under the name Prometheus' conventions give an absolute time, for alerts.
    pub cert_expiry: Family<CertLabels, Gauge>,
    /// Not-before of our certificate, as Unix seconds: with the expiry, its lifetime.
    pub cert_not_before: Family<CertLabels, Gauge>,
    /// Certificate and config reloads by result.
    pub reloads: Family<ResultLabels, Counter>,
    /// Established connections the mesh closed itself, by reason.
    pub connections_closed: Family<ClosedLabels, Counter>,
    /// `requests`' counters by [`StatusClass`] and [`MadeBy`], each taken from the family the first
    /// time it is used: counting a request is then an atomic add, not a locked hash lookup.
    request_counters: [[OnceLock<Counter>; MadeBy::ALL.len()]; StatusClass::ALL.len()],
}

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
        let cert_expiry = Family::<CertLabels, Gauge>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "Certificate expiry (notAfter) as Unix time: our own, and the mesh listener's on the client",
            cert_expiry.clone(),
        );
        let cert_not_before = Family::<CertLabels, Gauge>::default();
        registry.register(
            "certificate_not_before_timestamp_seconds",
            "Start of our certificate's validity (notBefore) as Unix time",
            cert_not_before.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reloads",
            "Certificate and config reloads by result",
            reloads.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "connections_closed",
            "Established connections closed because their certificates end or a reload's policy refuses them, by reason",
            connections_closed.clone(),
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
            cert_expiry,
            cert_not_before,
            reloads,
            connections_closed,
            request_counters: Default::default(),
        }
    }

    /// Counts one successful handshake.
    pub fn handshake_ok(&self, kind: HandshakeKind, took: Duration) {
        self.handshake(Outcome::Ok, HandshakeReason::None, kind, took);
    }

    /// Counts one failed handshake.
    pub fn handshake_failed(&self, reason: HandshakeReason, took: Duration) {
        self.handshake(Outcome::Failed, reason, HandshakeKind::Unknown, took);
    }

    fn handshake(
        &self,
        result: Outcome,
        reason: HandshakeReason,
        kind: HandshakeKind,
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

    /// Counts one request and the time to its response head.
    pub fn request(&self, status: http::StatusCode, made_by: MadeBy, took: Duration) {
        self.count_request(status, made_by);
        self.observe_response_head(took);
    }

    /// Records the time a request took until its response head.
    pub fn observe_response_head(&self, took: Duration) {
        self.request_seconds.observe(took.as_secs_f64());
    }

    /// Counts one finished request.
    pub fn count_request(&self, status: http::StatusCode, made_by: MadeBy) {
        let status_class = StatusClass::of(status);
        self.request_counters[status_class as usize][made_by as usize]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        status_class,
                        made_by,
                    })
                    .clone()
            })
            .inc();
    }

    /// Brings a counter kept elsewhere (an atomic) up to `total`.
    pub fn sync_reloads(&self, succeeded: &AtomicU64, failed: &AtomicU64) {
        for (result, total) in [(Outcome::Ok, succeeded), (Outcome::Failed, failed)] {
            let counter = self.reloads.get_or_create(&ResultLabels { result });
            let total = total.load(Ordering::Relaxed);
            let have = counter.get();
            if total > have {
                counter.inc_by(total - have);
            }
        }
    }

    /// Counts one connection closed for `reason`.
    pub fn connection_closed(&self, reason: ClosedReason) {
        self.connections_closed
            .get_or_create(&ClosedLabels { reason })
            .inc();
    }

    /// Sets a certificate's not-after time (both names of it).
    pub fn set_not_after(&self, cert: CertKind, unix_seconds: u64) {
        let value = i64::try_from(unix_seconds).unwrap_or(i64::MAX);
        let labels = CertLabels { cert };
        self.cert_not_after.get_or_create(&labels).set(value);
        self.cert_expiry.get_or_create(&labels).set(value);
    }

    /// Sets a certificate's not-before time.
    pub fn set_not_before(&self, cert: CertKind, unix_seconds: u64) {
        self.cert_not_before
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
        m.request(http::StatusCode::OK, MadeBy::Backend, took);
        m.request(http::StatusCode::NO_CONTENT, MadeBy::Backend, took);
        m.request(http::StatusCode::BAD_GATEWAY, MadeBy::Sidecar, took);
        m.request(http::StatusCode::BAD_GATEWAY, MadeBy::Listener, took);
        m.request(http::StatusCode::CONTINUE, MadeBy::Listener, took);
        for (labels, want) in [
            (r#"status_class="2xx",made_by="backend""#, 2),
            (r#"status_class="5xx",made_by="sidecar""#, 1),
            (r#"status_class="5xx",made_by="listener""#, 1),
            (r#"status_class="1xx",made_by="listener""#, 1),
        ] {
            assert_eq!(count(&m, labels), Some(want), "{labels}");
        }
        // Series appear when first used, not before.
        assert_eq!(count(&m, r#"status_class="2xx",made_by="sidecar""#), None);
        assert_eq!(
            m.requests
                .get_or_create(&RequestLabels {
                    status_class: StatusClass::Success,
                    made_by: MadeBy::Backend
                })
                .get(),
            2
        );
    }

    #[test]
    fn the_cache_order_matches_the_discriminants() {
        for (i, made_by) in MadeBy::ALL.into_iter().enumerate() {
            assert_eq!(made_by as usize, i);
        }
        for (i, class) in StatusClass::ALL.into_iter().enumerate() {
            assert_eq!(class as usize, i);
        }
    }

    #[test]
    fn label_values_render_as_dashboards_read_them() {
        let m = Metrics::new();
        m.handshake_ok(HandshakeKind::Resumed, Duration::ZERO);
        m.handshake_failed(HandshakeReason::Tls("unknown-ca"), Duration::ZERO);
        m.handshake_failed(HandshakeReason::PlaintextHttp, Duration::ZERO);
        m.set_not_after(CertKind::Peer, 7);
        m.upstream_dials
            .get_or_create(&UpstreamLabels {
                upstream: "10.0.0.12:8443".into(),
                result: DialResult::Failed("upstream-unreachable"),
            })
            .inc();
        let ok = AtomicU64::new(2);
        m.sync_reloads(&ok, &AtomicU64::new(0));
        m.connection_closed(ClosedReason::NotAllowed);
        let text = m.encode();
        for line in [
            r#"phoenix_mesh_tls_handshakes_total{result="ok",reason="none",kind="resumed"} 1"#,
            r#"phoenix_mesh_tls_handshakes_total{result="failed",reason="unknown-ca",kind="unknown"} 1"#,
            r#"phoenix_mesh_tls_handshakes_total{result="failed",reason="plaintext-http",kind="unknown"} 1"#,
            r#"phoenix_mesh_certificate_not_after_seconds{cert="peer"} 7"#,
            r#"phoenix_mesh_certificate_expiry_timestamp_seconds{cert="peer"} 7"#,
            r#"phoenix_mesh_upstream_dials_total{upstream="10.0.0.12:8443",result="upstream-unreachable"} 1"#,
            r#"phoenix_mesh_reloads_total{result="ok"} 2"#,
            r#"phoenix_mesh_connections_closed_total{reason="not_allowed"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
