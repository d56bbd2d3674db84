//! Dialling the mesh listener: TCP connect, mutual TLS, and an error that says which hop failed and
//! why, in words an operator can act on. Upstreams are tried round-robin; a refused connection or a
//! failed handshake moves on to the next one (no request bytes have been sent yet).

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use http::{StatusCode, Uri};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use phoenix_mesh_certs::{failure_reason, human, LiveClientTls, LiveTls, PeerIdentity};
use phoenix_mesh_common::metrics::{GaugeGuard, Metrics, UpstreamLabels, UpstreamName};
use rustls::pki_types::ServerName;
use rustls::AlertDescription;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

/// Which hop of the client -> listener link failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// TCP connect failed or timed out.
    Unreachable,
    /// The upstream answered, but not in TLS.
    NotTls,
    /// The listener's certificate failed verification (name, chain, date, revocation).
    CertificateInvalid,
    /// The listener refused our client certificate.
    ClientCertRefused,
    /// Another TLS handshake failure.
    Handshake,
}

impl UpstreamErrorKind {
    /// The `phoenix-mesh-error` code.
    pub fn code(self) -> &'static str {
        match self {
            UpstreamErrorKind::Unreachable => "upstream-unreachable",
            UpstreamErrorKind::NotTls => "upstream-not-tls",
            UpstreamErrorKind::CertificateInvalid => "upstream-cert-invalid",
            UpstreamErrorKind::ClientCertRefused => "client-cert-refused",
            UpstreamErrorKind::Handshake => "upstream-tls-failed",
        }
    }

    /// The status the client answers nginx with.
    pub fn status(self) -> StatusCode {
        match self {
            UpstreamErrorKind::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// Failure to reach a mesh listener, with an operator-facing message naming address and cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct UpstreamError {
    /// Which hop failed.
    pub kind: UpstreamErrorKind,
    /// What to tell the operator.
    pub message: String,
}

impl UpstreamError {
    fn new(kind: UpstreamErrorKind, message: String) -> Self {
        UpstreamError { kind, message }
    }
}

pub(crate) struct Dialer {
    pub upstreams: Vec<String>,
    pub server_name: ServerName<'static>,
    pub tls: Arc<LiveClientTls>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    next: AtomicUsize,
    metrics: Arc<Metrics>,
    /// Unix time the last seen listener certificate expires.
    pub listener_not_after: AtomicU64,
    warned_for: std::sync::Mutex<String>,
    health: Vec<std::sync::Mutex<Health>>,
    live: Arc<LiveConns>,
}

/// Consecutive failed dials that eject an upstream.
const EJECT_AFTER_FAILURES: u32 = 3;
/// First ejection; it doubles while the upstream keeps failing its probes, up to [`EJECT_MAX`].
const EJECT_FIRST: Duration = Duration::from_secs(10);
const EJECT_MAX: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
struct Health {
    failures: u32,
    ejected_until: Option<Instant>,
    next_ban: Duration,
}

impl Health {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// The connector the pooled HTTP client dials through; the flag makes it offer only HTTP/1.1.
#[derive(Clone)]
pub(crate) struct MeshConnector(Arc<Dialer>, bool);

impl MeshConnector {
    pub(crate) fn new(
        upstreams: Vec<String>,
        server_name: ServerName<'static>,
        tls: Arc<LiveClientTls>,
        connect_timeout: Duration,
        handshake_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let health = upstreams
            .iter()
            .map(|_| std::sync::Mutex::default())
            .collect();
        MeshConnector(
            Arc::new(Dialer {
                upstreams,
                server_name,
                tls,
                connect_timeout,
                handshake_timeout,
                next: AtomicUsize::new(0),
                metrics,
                listener_not_after: AtomicU64::new(0),
                warned_for: std::sync::Mutex::new(String::new()),
                health,
                live: Arc::default(),
            }),
            false,
        )
    }
}

impl tower_service::Service<Uri> for MeshConnector {
    type Response = TokioIo<MeshStream>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let dialer = self.0.clone();
        let http1_only = self.1;
        Box::pin(async move { dialer.dial(http1_only).await.map(TokioIo::new) })
    }
}

impl Dialer {
    /// Tries each upstream once, starting from the next in round-robin order.
    async fn dial(&self, http1_only: bool) -> Result<MeshStream, UpstreamError> {
        // The listener refuses an expired certificate, and on a resumed session it can only do so by
        // hanging up after the handshake; say why here instead (and spare the upstreams' health).
        let own = self.tls.leaf();
        if let Ok(ago) = SystemTime::now().duration_since(own.not_after) {
            return Err(UpstreamError::new(
                UpstreamErrorKind::ClientCertRefused,
                format!(
                    "phoenix-mesh client: our certificate ({}) expired {} ago, and the mesh listener \
                     refuses expired certificates: renew it (step ca renew) and reload the client",
                    own.subject,
                    human(ago.as_secs())
                ),
            ));
        }
        let n = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Healthy upstreams first, in round-robin order; ejected ones only as a last resort, so a
        // request is not failed while an ejected listener may already be back.
        let now = Instant::now();
        let (mut order, ejected): (Vec<usize>, Vec<usize>) =
            (0..n).map(|i| (start + i) % n).partition(|&i| {
                !self.health[i]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .is_ejected(now)
            });
        order.extend(ejected);
        let mut failures: Vec<UpstreamError> = Vec::new();
        for i in order {
            let upstream = &self.upstreams[i];
            match self.dial_one(upstream, http1_only).await {
                Ok(stream) => {
                    self.count_dial(upstream, "ok");
                    self.record(i, true);
                    return Ok(stream);
                }
                Err(error) => {
                    self.count_dial(upstream, error.kind.code());
                    info!(upstream = %upstream, code = error.kind.code(), %error, "mesh listener connection failed");
                    self.record(i, false);
                    failures.push(error);
                }
            }
        }
        Err(combine(failures))
    }

    /// Passive health: consecutive failures eject an upstream for a while (doubling while it keeps
    /// failing); the first dial after that is its probe, and a success returns it to rotation.
    fn record(&self, i: usize, ok: bool) {
        let mut health = self.health[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let upstream = &self.upstreams[i];
        let labels = UpstreamName {
            upstream: upstream.clone(),
        };
        if ok {
            if health.ejected_until.is_some() {
                info!(%upstream, "mesh listener answered its probe; back in rotation");
            }
            *health = Health::default();
            self.metrics.upstream_healthy.get_or_create(&labels).set(1);
            return;
        }
        health.failures += 1;
        if health.failures >= EJECT_AFTER_FAILURES {
            let ban = health.next_ban.max(EJECT_FIRST);
            health.ejected_until = Some(Instant::now() + ban);
            health.next_ban = (ban * 2).min(EJECT_MAX);
            health.failures = 0;
            self.metrics.upstream_healthy.get_or_create(&labels).set(0);
            if self.upstreams.len() > 1 {
                warn!(%upstream, ejected_for_s = ban.as_secs(), "mesh listener keeps failing; ejected from rotation");
            }
        }
    }
    async fn dial_one(
        &self,
        upstream: &str,
        http1_only: bool,
    ) -> Result<MeshStream, UpstreamError> {
        match self.dial_attempt(upstream, http1_only, true).await? {
            Dialed::Ready(stream) => Ok(*stream),
            Dialed::ExpiredSession => {
                // A resumed handshake does not show the listener's certificate again, and a ticket can
                // outlive a step-ca certificate: redo it in full so the certificate is verified now.
                info!(%upstream, "resumed session carries a listener certificate that has expired since; handshaking in full");
                match self.dial_attempt(upstream, http1_only, false).await? {
                    Dialed::Ready(stream) => Ok(*stream),
                    Dialed::ExpiredSession => Err(UpstreamError::new(
                        UpstreamErrorKind::Handshake,
                        format!("phoenix-mesh client: mesh listener {upstream}: its certificate has expired"),
                    )),
                }
            }
        }
    }

    /// One connection attempt; `resume` false makes it a full handshake whatever the session cache holds.
    async fn dial_attempt(
        &self,
        upstream: &str,
        http1_only: bool,
        resume: bool,
    ) -> Result<Dialed, UpstreamError> {
        let unreachable = |cause: String| {
            UpstreamError::new(
                UpstreamErrorKind::Unreachable,
                format!("phoenix-mesh client: mesh listener {upstream} unreachable: {cause}"),
            )
        };
        let tcp = match timeout(self.connect_timeout, TcpStream::connect(upstream)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {:?} (connect_timeout)",
                    self.connect_timeout
                )))
            }
        };
        let _ = tcp.set_nodelay(true);
        // Read before the config: a reload in between marks this connection stale, never the reverse.
        let generation = self.tls.generation();
        let mut config = if http1_only {
            self.tls.current_http1()
        } else {
            self.tls.current()
        };
        if !resume {
            let mut full = (*config).clone();
            full.resumption = rustls::client::Resumption::disabled();
            config = Arc::new(full);
        }
        let connector = TlsConnector::from(config);
        let started = Instant::now();
        let handshake = timeout(
            self.handshake_timeout,
            connector.connect(self.server_name.clone(), tcp),
        )
        .await;
        let tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = rustls_error(&e).map_or("io", failure_reason);
                self.metrics
                    .handshake("failed", reason, "unknown", started.elapsed());
                return Err(classify_handshake(&e, upstream, &self.server_name));
            }
            Err(_) => {
                self.metrics
                    .handshake("failed", "timeout", "unknown", started.elapsed());
                return Err(UpstreamError::new(
                    UpstreamErrorKind::Handshake,
                    format!(
                        "phoenix-mesh client: TLS handshake with {upstream} did not finish within {:?} \
                         (handshake_timeout): is {upstream} the mesh listener's TLS port?",
                        self.handshake_timeout
                    ),
                ));
            }
        };
        // TLS 1.3: our side of the handshake is done before the listener has judged our certificate,
        // and its verdict (session tickets, or an alert refusing us) is its first flight. Waiting for
        // it reports a refusal as such instead of as a pooled connection that died before use.
        let mut tls = tls;
        if tls.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
            if let Err(e) = await_verdict(&mut tls, self.handshake_timeout).await {
                let reason = rustls_error(&e).map_or("io", failure_reason);
                self.metrics
                    .handshake("failed", reason, "unknown", started.elapsed());
                return Err(classify_handshake(&e, upstream, &self.server_name));
            }
        }
        let conn = tls.get_ref().1;
        let resumed = matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        self.metrics.handshake(
            "ok",
            "none",
            if resumed { "resumed" } else { "full" },
            started.elapsed(),
        );
        let h2 = conn.alpn_protocol() == Some(b"h2");
        let peer = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| PeerIdentity::from_der(leaf).ok());
        let expires = peer
            .as_ref()
            .map_or(SystemTime::UNIX_EPOCH, |p| p.not_after);
        if resume && resumed && expires < SystemTime::now() {
            return Ok(Dialed::ExpiredSession);
        }
        if let Some(peer) = &peer {
            self.note_listener_certificate(upstream, peer);
        }
        debug!(%upstream, h2, "mesh link established");
        Ok(Dialed::Ready(Box::new(MeshStream {
            _open: GaugeGuard::new(&self.metrics.upstream_connections),
            live: self.live.add(ConnInfo {
                expires,
                generation,
            }),
            tls,
            h2,
        })))
    }
}

impl MeshConnector {
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
        self.0.tls.generation()
    }

    /// Why a connection opened with `info` must take no new requests, if it must: its listener
    /// certificate ends within `margin`, or our own certificate or trust was reloaded since.
    pub(crate) fn retirement(&self, info: ConnInfo, margin: Duration) -> Option<Retirement> {
        let expiring = info.expires <= SystemTime::now() + margin;
        let rotated = info.generation < self.generation();
        (expiring || rotated).then_some(Retirement { expiring, rotated })
    }

    /// The same dialler offering only HTTP/1.1 through ALPN, for requests that upgrade.
    pub(crate) fn http1_only(&self) -> Self {
        MeshConnector(self.0.clone(), true)
    }

    /// Unix time the last seen listener certificate expires (0 before the first connection).
    pub(crate) fn listener_not_after(&self) -> u64 {
        self.0.listener_not_after.load(Ordering::Relaxed)
    }
}

impl Dialer {
    fn count_dial(&self, upstream: &str, result: &'static str) {
        self.metrics
            .upstream_dials
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
                result,
            })
            .inc();
    }

    /// Records the listener certificate's expiry for the metrics and warns (once per certificate)
    /// when it has less than a third of its lifetime left.
    fn note_listener_certificate(&self, upstream: &str, peer: &PeerIdentity) {
        let unix = peer
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.listener_not_after.store(unix, Ordering::Relaxed);
        if peer.remaining(SystemTime::now()) < peer.lifetime() / 3 {
            let mut warned = self
                .warned_for
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *warned != peer.sha256 {
                warned.clone_from(&peer.sha256);
                warn!(
                    %upstream,
                    subject = %peer.subject,
                    expires_in_s = peer.remaining(SystemTime::now()).as_secs(),
                    "the mesh listener's certificate has less than a third of its lifetime left; is its renewal running?"
                );
            }
        }
    }
}

/// Feeds what the listener sent right after the handshake to rustls, leaving any plaintext for the
/// HTTP layer, and fails with the alert if the listener refused us. A listener that sends nothing
/// within `limit` is left to be judged by the first request.
pub(crate) async fn await_verdict(
    tls: &mut TlsStream<TcpStream>,
    limit: Duration,
) -> io::Result<()> {
    struct TryRead<'a>(&'a TcpStream);
    impl io::Read for TryRead<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.try_read(buf)
        }
    }
    let (tcp, conn) = tls.get_mut();
    if timeout(limit, tcp.readable()).await.is_err() {
        return Ok(());
    }
    match conn.read_tls(&mut TryRead(tcp)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
        Err(e) => return Err(e),
    }
    conn.process_new_packets()
        .map(drop)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn combine(mut failures: Vec<UpstreamError>) -> UpstreamError {
    if failures.len() == 1 {
        return failures.remove(0);
    }
    // Name the most telling kind: a certificate problem says more than a refused port.
    let kind = failures
        .iter()
        .map(|f| f.kind)
        .max_by_key(|k| match k {
            UpstreamErrorKind::Unreachable => 0,
            UpstreamErrorKind::Handshake => 1,
            _ => 2,
        })
        .unwrap_or(UpstreamErrorKind::Unreachable);
    let message = failures
        .iter()
        .map(|f| f.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    UpstreamError::new(kind, format!("every mesh listener failed: {message}"))
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub(crate) fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// Alerts a TLS server sends when it rejects the client's certificate.
pub(crate) fn is_client_cert_alert(alert: &AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired
    )
}

/// The client-certificate alert an I/O error from the mesh link carries, if any. HTTP/2 keeps only
/// the kind and message of an I/O error, so when the rustls error itself is gone the alert is read
/// back from rustls' message (`received fatal alert: UnknownCA`).
pub(crate) fn client_cert_alert(e: &io::Error) -> Option<AlertDescription> {
    if let Some(rustls::Error::AlertReceived(alert)) = rustls_error(e) {
        return is_client_cert_alert(alert).then_some(*alert);
    }
    let message = e.get_ref()?.to_string();
    let name = message.strip_prefix("received fatal alert: ")?;
    [
        AlertDescription::BadCertificate,
        AlertDescription::UnsupportedCertificate,
        AlertDescription::CertificateRevoked,
        AlertDescription::CertificateExpired,
        AlertDescription::CertificateUnknown,
        AlertDescription::UnknownCA,
        AlertDescription::AccessDenied,
        AlertDescription::CertificateRequired,
    ]
    .into_iter()
    .find(|alert| format!("{alert:?}") == name)
}

pub(crate) fn client_cert_refused(upstream: &str, alert: &AlertDescription) -> UpstreamError {
    UpstreamError::new(
        UpstreamErrorKind::ClientCertRefused,
        format!(
            "phoenix-mesh client: mesh listener {upstream} refused our client certificate (TLS alert {alert:?}): \
             is it issued by the CA the listener trusts, unexpired, and in the listener's allowed_peers?"
        ),
    )
}

pub(crate) fn classify_handshake(
    e: &io::Error,
    upstream: &str,
    server_name: &ServerName<'_>,
) -> UpstreamError {
    let name = server_name.to_str();
    match rustls_error(e) {
        Some(rustls::Error::InvalidMessage(_)) => UpstreamError::new(
            UpstreamErrorKind::NotTls,
            format!(
                "phoenix-mesh client: upstream {upstream} does not speak TLS (it answered with something that is \
                 not a TLS record, probably plain HTTP): is {upstream} the mesh listener's TLS port, not Traefik's?"
            ),
        ),
        Some(rustls::Error::InvalidCertificate(cert_error)) => UpstreamError::new(
            UpstreamErrorKind::CertificateInvalid,
            format!(
                "phoenix-mesh client: the certificate of mesh listener {upstream} was rejected: {cert_error} \
                 (it must chain to the configured ca and carry the name {name:?})"
            ),
        ),
        Some(rustls::Error::AlertReceived(alert)) if is_client_cert_alert(alert) => client_cert_refused(upstream, alert),
        Some(other) => UpstreamError::new(
            UpstreamErrorKind::Handshake,
            format!("phoenix-mesh client: TLS handshake with mesh listener {upstream} failed: {other}"),
        ),
        None if e.kind() == io::ErrorKind::UnexpectedEof || e.kind() == io::ErrorKind::ConnectionReset => {
            UpstreamError::new(
                UpstreamErrorKind::Handshake,
                format!(
                    "phoenix-mesh client: {upstream} closed the connection during the TLS handshake: \
                     is it the mesh listener's TLS port?"
                ),
            )
        }
        None => UpstreamError::new(
            UpstreamErrorKind::Handshake,
            format!("phoenix-mesh client: TLS handshake with mesh listener {upstream} failed: {e}"),
        ),
    }
}

/// What the pool must know about the open mesh connections to retire the stale ones with one atomic
/// load per request: the earliest listener-certificate expiry (Unix seconds) and the oldest TLS
/// generation (our certificate and trust at the time of the dial) among them.
#[derive(Debug)]
pub(crate) struct LiveConns {
    open: std::sync::Mutex<(BTreeMap<u64, usize>, BTreeMap<u64, usize>)>,
    earliest_expiry: AtomicU64,
    oldest_generation: AtomicU64,
}

impl Default for LiveConns {
    fn default() -> Self {
        LiveConns {
            open: std::sync::Mutex::default(),
            earliest_expiry: AtomicU64::new(u64::MAX),
            oldest_generation: AtomicU64::new(u64::MAX),
        }
    }
}

impl LiveConns {
    fn add(self: &Arc<Self>, info: ConnInfo) -> ConnGuard {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *open.0.entry(info.expires_unix()).or_default() += 1;
        *open.1.entry(info.generation).or_default() += 1;
        self.publish(&open);
        ConnGuard {
            set: self.clone(),
            info,
        }
    }

    fn publish(&self, open: &(BTreeMap<u64, usize>, BTreeMap<u64, usize>)) {
        let first = |m: &BTreeMap<u64, usize>| m.keys().next().copied().unwrap_or(u64::MAX);
        self.earliest_expiry
            .store(first(&open.0), Ordering::Relaxed);
        self.oldest_generation
            .store(first(&open.1), Ordering::Relaxed);
    }
}

/// Takes its connection out of [`LiveConns`] when the connection closes.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    set: Arc<LiveConns>,
    info: ConnInfo,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut guard = self
            .set
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = &mut *guard;
        for (map, key) in [
            (&mut open.0, self.info.expires_unix()),
            (&mut open.1, self.info.generation),
        ] {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
        self.set.publish(&guard);
    }
}

/// What a pooled connection was opened with; carried on every response so the forwarder can retire
/// the connection before it outlives the listener's certificate or our own rotated one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnInfo {
    /// When the listener's certificate expires.
    pub expires: SystemTime,
    /// Our TLS generation at the time of the dial.
    pub generation: u64,
}

impl ConnInfo {
    fn expires_unix(&self) -> u64 {
        self.expires
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    }
}

/// Why a connection is retired (see [`MeshConnector::retirement`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retirement {
    expiring: bool,
    rotated: bool,
}

impl Retirement {
    /// Says so in the log, once per retired connection.
    pub(crate) fn log(self) {
        info!(
            listener_cert_expiring = self.expiring,
            our_tls_reloaded = self.rotated,
            "retired a mesh connection; new requests get a fresh one"
        );
    }
}

/// What one connection attempt came to.
enum Dialed {
    Ready(Box<MeshStream>),
    /// A resumed session whose listener certificate has expired since it began: not used.
    ExpiredSession,
}

/// An established mTLS link, told to the pool as HTTP/2 when ALPN chose it.
pub struct MeshStream {
    _open: GaugeGuard,
    live: ConnGuard,
    tls: TlsStream<TcpStream>,
    h2: bool,
}

impl MeshStream {
    /// Whether ALPN chose HTTP/2.
    pub(crate) fn is_h2(&self) -> bool {
        self.h2
    }

    /// What the connection was opened with.
    pub(crate) fn info(&self) -> ConnInfo {
        self.live.info
    }
}

impl Connection for MeshStream {
    fn connected(&self) -> Connected {
        let connected = Connected::new().extra(self.live.info);
        if self.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

impl phoenix_mesh_transport::dial::Dial for MeshConnector {
    type Io = MeshStream;
    type Meta = ConnInfo;
    type Error = UpstreamError;

    async fn dial(
        &self,
    ) -> Result<phoenix_mesh_transport::dial::Connected<MeshStream, ConnInfo>, UpstreamError> {
        let stream = MeshConnector::dial(self).await?;
        let protocol = if stream.is_h2() {
            phoenix_mesh_transport::dial::Protocol::Http2
        } else {
            phoenix_mesh_transport::dial::Protocol::Http1
        };
        Ok(phoenix_mesh_transport::dial::Connected {
            meta: stream.info(),
            io: stream,
            protocol,
        })
    }
}
