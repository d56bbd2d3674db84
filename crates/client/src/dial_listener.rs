//! *Dialling a listener* is opening one mutual-TLS connection to one mesh listener address: the TCP
//! connect, the TLS handshake with the live client config, the listener's verdict on our certificate,
//! and a second, full handshake when a resumed session turns out to carry a listener certificate that
//! has expired since. It counts handshakes in the metrics and notes the listener's certificate; which
//! listener to dial, and what its failures mean for the next dial, is [`crate::connector`]'s business.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use phoenix_mesh_certs::{failure_reason, Authenticated, LiveClientTls, LiveTls, PeerIdentity};
use phoenix_mesh_common::live::LiveConnections;
use phoenix_mesh_common::metrics::{GaugeGuard, HandshakeKind, HandshakeReason, Metrics};
use phoenix_mesh_transport::tls_verdict::{await_verdict, rustls_error, PeerAlert};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::conn_info::ConnInfo;
use crate::mesh_stream::MeshStream;
use crate::upstream_error::UpstreamError;

/// What every connection to a mesh listener is opened with, and what the dials learn on the way.
pub(crate) struct ListenerDial {
    pub server_name: ServerName<'static>,
    pub tls: Arc<LiveClientTls>,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Unix time the last seen listener certificate expires (0 before the first connection).
    pub listener_not_after: AtomicU64,
    /// The fingerprint of the listener certificate last warned about, so each is warned about once.
    warned_for: Mutex<String>,
    /// The established connections, each retired before its certificates end.
    pub live: Arc<LiveConnections>,
}

/// What one connection attempt came to.
enum Dialed {
    Ready(Box<MeshStream>),
    /// A resumed session whose listener certificate has expired since it began: not used.
    ExpiredSession,
    /// A resumed session whose certificates end within the retire margin (its listener may have
    /// renewed since): not used, since it would be retired at once.
    RetiringSession,
}

impl ListenerDial {
    pub(crate) fn new(
        server_name: ServerName<'static>,
        tls: Arc<LiveClientTls>,
        connect_timeout: Duration,
        handshake_timeout: Duration,
        metrics: Arc<Metrics>,
        live: Arc<LiveConnections>,
    ) -> Self {
        ListenerDial {
            server_name,
            tls,
            connect_timeout,
            handshake_timeout,
            metrics,
            listener_not_after: AtomicU64::new(0),
            warned_for: Mutex::new(String::new()),
            live,
        }
    }

    /// One connection to `upstream`, offering HTTP/2 unless `http1_only`.
    pub(crate) async fn dial(
        &self,
        upstream: &str,
        http1_only: bool,
    ) -> Result<MeshStream, UpstreamError> {
        match self.attempt(upstream, http1_only, true).await? {
            Dialed::Ready(stream) => Ok(*stream),
            Dialed::ExpiredSession => {
                // A resumed handshake does not show the listener's certificate again, and a ticket can
                // outlive a step-ca certificate: redo it in full so the certificate is verified now.
                info!(%upstream, "resumed session carries a listener certificate that has expired since; handshaking in full");
                self.full(upstream, http1_only).await
            }
            Dialed::RetiringSession => {
                // A session resumes with the certificates it began with: once they are about to end,
                // only a full handshake shows whether the listener has renewed its own.
                debug!(%upstream, "resumed session's certificates end within the retire margin; handshaking in full");
                self.full(upstream, http1_only).await
            }
        }
    }

    /// One connection to `upstream` with a full handshake.
    async fn full(&self, upstream: &str, http1_only: bool) -> Result<MeshStream, UpstreamError> {
        match self.attempt(upstream, http1_only, false).await? {
            Dialed::Ready(stream) => Ok(*stream),
            Dialed::ExpiredSession | Dialed::RetiringSession => {
                Err(UpstreamError::ListenerCertificateExpired {
                    upstream: upstream.to_owned(),
                })
            }
        }
    }

    /// One connection attempt; `resume` false makes it a full handshake whatever the session cache holds.
    async fn attempt(
        &self,
        upstream: &str,
        http1_only: bool,
        resume: bool,
    ) -> Result<Dialed, UpstreamError> {
        let tcp = match timeout(self.connect_timeout, TcpStream::connect(upstream)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(cause)) => {
                return Err(UpstreamError::Unreachable {
                    upstream: upstream.to_owned(),
                    cause,
                })
            }
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    upstream: upstream.to_owned(),
                    limit: self.connect_timeout,
                })
            }
        };
        let _ = tcp.set_nodelay(true);
        // Read before the config: a reload in between marks this connection stale, never the reverse,
        // and our chain read here is never newer than the one the handshake presents.
        let generation = self.tls.generation();
        let own = self.tls.own_chain();
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
        let mut tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(self.failed(e, upstream, started)),
            Err(_) => {
                self.metrics
                    .handshake_failed(HandshakeReason::Timeout, started.elapsed());
                return Err(UpstreamError::HandshakeTimeout {
                    upstream: upstream.to_owned(),
                    limit: self.handshake_timeout,
                });
            }
        };
        // TLS 1.3: our side of the handshake is done before the listener has judged our certificate,
        // and its verdict (session tickets, or an alert refusing us) is its first flight. Waiting for
        // it reports a refusal as such instead of as a pooled connection that died before use.
        if tls.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
            if let Err(e) = await_verdict(&mut tls, self.handshake_timeout).await {
                return Err(self.failed(e, upstream, started));
            }
        }
        let conn = tls.get_ref().1;
        let resumed = matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        let kind = if resumed {
            HandshakeKind::Resumed
        } else {
            HandshakeKind::Full
        };
        self.metrics.handshake_ok(kind, started.elapsed());
        let h2 = conn.alpn_protocol() == Some(b"h2");
        let chain = conn
            .peer_certificates()
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        // rustls has verified the chain, so its leaf parses; one that x509-parser still cannot
        // read cannot be given a lifetime, and is not used.
        let peer = match chain.first().map(|leaf| PeerIdentity::from_der(leaf)) {
            Some(Ok(peer)) => peer,
            Some(Err(error)) => {
                return Err(UpstreamError::Handshake {
                    upstream: upstream.to_owned(),
                    cause: std::io::Error::new(std::io::ErrorKind::InvalidData, error),
                })
            }
            None => {
                return Err(UpstreamError::Handshake {
                    upstream: upstream.to_owned(),
                    cause: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the listener presented no certificate",
                    ),
                })
            }
        };
        if resume && resumed && peer.not_after < SystemTime::now() {
            return Ok(Dialed::ExpiredSession);
        }
        self.note_listener_certificate(upstream, &peer);
        debug!(%upstream, h2, "mesh link established");
        let auth = Authenticated {
            chain: chain.into(),
            version: conn.protocol_version(),
        };
        let registered = self.live.register(Arc::new(peer), auth, &own);
        if resume && resumed && registered.conn().opened_within_margin() {
            return Ok(Dialed::RetiringSession);
        }
        let info = ConnInfo {
            live: registered.conn().clone(),
            generation,
            alert: PeerAlert::default(),
        };
        let open = GaugeGuard::new(&self.metrics.upstream_connections);
        Ok(Dialed::Ready(Box::new(MeshStream::new(
            tls, info, h2, open, registered,
        ))))
    }

    /// Counts a failed handshake (or verdict) and says what it means.
    fn failed(&self, e: std::io::Error, upstream: &str, started: Instant) -> UpstreamError {
        let reason = rustls_error(&e).map_or(HandshakeReason::Io, |e| {
            HandshakeReason::Tls(failure_reason(e))
        });
        self.metrics.handshake_failed(reason, started.elapsed());
        UpstreamError::handshake(e, upstream, &self.server_name)
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
        if peer.renewal_due(SystemTime::now()) {
            let mut warned = self.warned_for.lock();
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
