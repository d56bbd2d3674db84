//! The mesh listener on the skeleton: mutual TLS accepted on `:8443`, the client's identity checked
//! and carried in `X-Forwarded-Client-Cert`, each request forwarded to the backend by [`Backend`];
//! a connection that is not TLS, or whose handshake fails, is answered and counted here.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use phoenix_mesh_certs::rustls::pki_types::CertificateDer;
use phoenix_mesh_certs::{failure_reason, Authenticated, ByteCache, LiveServerTls, LiveTls};
use phoenix_mesh_common::admin::NotReady;
use phoenix_mesh_common::certs_report::ConnectedPeers;
use phoenix_mesh_common::check::{CheckRequest, Report};
use phoenix_mesh_common::headers::forwarded_for_value;
use phoenix_mesh_common::live::{End, LiveConnections};
use phoenix_mesh_common::log_limit::{Cause, LogLimit, Repeat};
use phoenix_mesh_common::metrics::{GaugeGuard, HandshakeKind, HandshakeReason, Metrics};
use phoenix_mesh_common::sidecar::{conn_span, Side, Sidecar, StartError, State};
use phoenix_mesh_common::stall::progress_timeout;
use phoenix_mesh_transport::http1_idle::serve_http1_parking;
use phoenix_mesh_transport::progress::Progress;
use phoenix_mesh_transport::serve::{
    accept_authenticating, drive, http1_builder, http2_builder, serve_until, Pending,
    PrefaceDeadline, ShutdownWatch, Slot,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

use crate::forward::{Backend, Peer, PeerIds};
use crate::plaintext::{looks_like_http, refuse_plain_http};
use crate::ServerSettings;
use phoenix_mesh_transport::coalescing_socket::{First, MeshSocket};
use phoenix_mesh_transport::serving_task::{spawn_serving, ServingExecutor};

/// Why the server could not start.
pub type ServerError = StartError;

/// A bound mesh listener, ready to serve.
pub type MeshListener = Sidecar<ListenerSide>;

/// The listener's policy: who may connect, and how requests reach the backend.
pub struct ListenerSide {
    backend: Backend,
    http1: http1::Builder,
    http2: http2::Builder<ServingExecutor>,
    /// Responses from the backend that stop moving for `backend_timeout` are cut off.
    progress: Progress,
    peer_ids: PeerIds,
    /// Failed handshakes, each reason logged once per interval: anyone who can reach the port can
    /// fail one, as often as they like.
    refusals: LogLimit,
    /// The configured listen address, as the refusals' hop.
    listen: Arc<str>,
    /// The established connections, re-checked when a reload changes the policy.
    live: Arc<LiveConnections>,
    /// The client chains recorded for them, by leaf: every connection from one gateway shares one
    /// copy instead of holding its own (a kilobyte or two each, on connections that take 15 KiB idle).
    chains: ByteCache<Arc<[CertificateDer<'static>]>>,
}

impl ListenerSide {
    /// The established client connections, with who is on each (for `/certs`).
    pub fn live(&self) -> &Arc<LiveConnections> {
        &self.live
    }

    /// `presented` as the live connections record it: the copy an earlier connection recorded when
    /// it is the same chain, else a new one.
    fn recorded(&self, presented: &[CertificateDer<'static>]) -> Arc<[CertificateDer<'static>]> {
        let Some(leaf) = presented.first() else {
            return Arc::from(presented);
        };
        if let Some(chain) = self.chains.get(leaf) {
            if *chain == *presented {
                return chain;
            }
        }
        let chain: Arc<[CertificateDer<'static>]> = Arc::from(presented);
        self.chains.insert(leaf.as_ref().into(), chain.clone());
        chain
    }

    /// Whether to log this failed handshake now (see [`LogLimit`]); the metrics count every one.
    fn admit(&self, message: &'static str, reason: HandshakeReason) -> bool {
        self.refusals.admit(&Repeat {
            message,
            hop: self.listen.clone(),
            cause: Cause::Code(reason.as_str()),
        })
    }
}

impl Side for ListenerSide {
    const NAME: &'static str = "mesh listener";
    const LISTENER: &'static str = "the mesh listener";
    const COMMAND: &'static str = "server";
    type Settings = ServerSettings;
    type Listener = TcpListener;

    fn new(
        settings: &ServerSettings,
        _tls: &Arc<LiveServerTls>,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, StartError> {
        Ok(ListenerSide {
            backend: Backend::new(
                settings.backend,
                settings.backend_connect_timeout,
                settings.backend_timeout,
                settings.backend_http2,
                settings.max_backend_connections,
            )
            .allowing_upgrades(settings.shared.allowed_upgrades.clone())
            .limiting_response_heads(settings.shared.http.max_header_bytes),
            http1: http1_builder(&settings.shared.http),
            http2: http2_builder(&settings.shared.http),
            progress: progress_timeout(
                format!("backend {}", settings.backend),
                "backend_timeout",
                settings.backend_timeout,
            ),
            peer_ids: PeerIds::new(settings.identity_headers),
            refusals: LogLimit::new(),
            listen: settings.listen.to_string().into(),
            live: LiveConnections::new(metrics.clone(), End::Accepted),
            chains: ByteCache::default(),
        })
    }

    async fn bind(settings: &ServerSettings) -> io::Result<TcpListener> {
        TcpListener::bind(settings.listen).await
    }

    fn local_addr(listener: &TcpListener) -> io::Result<SocketAddr> {
        listener.local_addr()
    }

    fn listen(settings: &ServerSettings) -> String {
        settings.listen.to_string()
    }

    fn upstream_label(settings: &ServerSettings) -> Arc<str> {
        settings.backend.to_string().into()
    }

    fn announce(settings: &ServerSettings, listen: &str) {
        info!(
            %listen,
            backend = %settings.backend,
            allowed_peers = ?settings.allowed_peers,
            identity_headers = ?settings.identity_headers.names(),
            "mesh listener accepting mutual TLS"
        );
        if let Some(warning) = settings.timeout_order_warning() {
            warn!("{warning}");
        }
    }

    async fn accept(state: Arc<State<Self>>, listener: TcpListener, shutdown: ShutdownWatch) {
        let listen = listener.local_addr().unwrap_or(state.settings.listen);
        let max = state.settings.shared.max_connections;
        let max_pending = state.settings.max_pending_handshakes;
        tokio::spawn(recheck_on_policy_change(state.clone(), shutdown.clone()));
        let conn_shutdown = shutdown.clone();
        accept_authenticating(
            listener,
            max,
            max_pending,
            shutdown,
            move |stream, addr, pending| {
                let span = conn_span(&addr);
                // A serving task: over HTTP/1.1 a response that stalls ends its connection.
                spawn_serving(
                    handle(
                        state.clone(),
                        stream,
                        addr,
                        listen,
                        conn_shutdown.clone(),
                        pending,
                    )
                    .instrument(span),
                );
            },
        )
        .await;
    }

    fn peers(&self) -> &dyn ConnectedPeers {
        &*self.live
    }

    async fn ready(_state: &State<Self>) -> Result<Option<&'static str>, NotReady> {
        Ok(None)
    }

    fn progress(&self) -> &Progress {
        &self.progress
    }

    async fn check(settings: &ServerSettings, request: &CheckRequest) -> Report {
        crate::check::check(settings, request).await
    }
}

async fn handle(
    state: Arc<State<ListenerSide>>,
    stream: TcpStream,
    addr: SocketAddr,
    listen: SocketAddr,
    mut shutdown: ShutdownWatch,
    pending: Pending,
) {
    let _open = GaugeGuard::new(&state.metrics.open_connections);
    let started = Instant::now();
    let failed = |reason: HandshakeReason| {
        state.metrics.handshake_failed(reason, started.elapsed());
    };
    // Read before `accept` takes the configuration: never newer than the chain the handshake presents.
    let own = state.reloader.live().own_chain();
    let Some((mut tls, _slot)) = accept(&state, stream, listen, &failed, pending).await else {
        return;
    };
    // The session ticket rustls wrote last waits for the first answer only when one follows at once:
    // the client sent its request with its Finished, or HTTP/2, whose server preface goes out straight
    // away. Otherwise it goes as soon as hyper waits for a request: the client may be waiting for it
    // as the sign that its certificate was accepted (see `coalescing_socket`).
    let (socket, conn) = tls.get_mut();
    let answer_follows = conn.alpn_protocol() == Some(b"h2")
        || conn
            .process_new_packets()
            .is_ok_and(|state| state.plaintext_bytes_to_read() > 0);
    socket.stop_holding(answer_follows);

    let (_, conn) = tls.get_ref();
    let resumed = matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    let sent = conn.peer_certificates().unwrap_or_default();
    let Some(leaf) = sent.first() else {
        warn!("handshake finished without a client certificate; closing");
        failed(HandshakeReason::NoCertificate);
        return;
    };
    let id = match state.side.peer_ids.get(leaf) {
        Ok(id) => id,
        Err(error) => {
            info!(%error, "client certificate cannot be carried in X-Forwarded-Client-Cert; closing");
            failed(HandshakeReason::BadCertificate);
            return;
        }
    };
    if SystemTime::now() > id.not_after {
        // Only a resumed session gets here (a full handshake verified the dates): tickets outlive
        // step-ca's short certificates, but a session must not outlive its certificate.
        info!(
            peer.id = &*id.name,
            resumed, "client certificate expired since its session began; closing without serving"
        );
        failed(HandshakeReason::Expired);
        let mut tls = tls;
        let _ = timeout(std::time::Duration::from_secs(1), tls.shutdown()).await;
        return;
    }
    let kind = if resumed {
        HandshakeKind::Resumed
    } else {
        HandshakeKind::Full
    };
    state.metrics.handshake_ok(kind, started.elapsed());
    tracing::Span::current().record("peer.id", &*id.name);
    let h2 = conn.alpn_protocol() == Some(b"h2");
    debug!(
        resumed,
        alpn = ?conn.alpn_protocol().map(String::from_utf8_lossy),
        "mutual TLS established"
    );
    let auth = Authenticated {
        chain: state.side.recorded(sent),
        version: conn.protocol_version(),
    };
    // Shared with the requests: a tunnel one of them opens keeps it registered after this task ends.
    let registered = Arc::new(state.side.live.register(id.identity.clone(), auth, &own));
    let retired = registered.conn().retired();
    let deadline = registered.conn().deadline();
    let peer = Arc::new(Peer {
        forwarded_for: forwarded_for_value(addr.ip()),
        id,
        client_cert_chain: state.side.peer_ids.chain(sent),
        conn: registered.clone(),
    });
    let service = {
        let state = state.clone();
        service_fn(move |req| {
            let state = state.clone();
            let peer = peer.clone();
            // Boxed: hyper moves each stream's future several times on its way into a spawned task,
            // and ours is a few KiB.
            Box::pin(async move {
                let response = state
                    .answer(req, &peer.id.name, |req| {
                        state.side.backend.forward(req, &peer)
                    })
                    .await;
                Ok::<_, std::convert::Infallible>(response)
            })
        })
    };
    // HTTP/2 only when ALPN chose it (RFC 9113 has no prior knowledge over TLS); HTTP/1.1 otherwise,
    // its idle keep-alive connections parked without hyper's buffers. Either way the connection is
    // asked to finish (GOAWAY; `Connection: close`, or closed when idle) at shutdown or when it
    // retires, and dropped at the deadline of its certificates.
    let retire = async {
        retired.await;
    };
    let served = serve_until(
        |mut finish| async move {
            if h2 {
                // A peer that never sends the preface is closed after header_read_timeout.
                let tls = PrefaceDeadline::new(tls, state.settings.shared.http.header_read_timeout);
                let conn = state
                    .side
                    .http2
                    .serve_connection(TokioIo::new(tls), service);
                tokio::pin!(conn);
                drive(conn, |c| c.graceful_shutdown(), &mut finish)
                    .await
                    .map_err(Into::into)
            } else {
                let idle = state.settings.shared.http.header_read_timeout;
                serve_http1_parking(&state.side.http1, tls, service, idle, finish).await
            }
        },
        &mut shutdown,
        retire,
        deadline,
    )
    .await;
    let served: Result<(), Box<dyn std::error::Error + Send + Sync>> = match served {
        Some(served) => served,
        None => {
            info!("closed a connection still busy when its certificates ended");
            Ok(())
        }
    };
    drop(registered);
    if let Err(error) = served {
        debug!(%error, "connection ended with an error");
    }
}

/// Re-checks every established connection whenever a reload changes the trust policy (CA, CRLs,
/// `allowed_peers`, `min_tls_version`): those the new policy refuses are asked to finish and close.
async fn recheck_on_policy_change(state: Arc<State<ListenerSide>>, mut shutdown: ShutdownWatch) {
    let tls = state.reloader.live().clone();
    let mut changes = tls.policy_changes();
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        let closed = state.side.live.recheck(|auth| tls.recheck(auth));
        info!(
            closed,
            open = state.side.live.len(),
            "trust policy changed: established connections checked against it"
        );
    }
}

/// The TLS handshake, bounded by `handshake_timeout`, then the `max_connections` slot the
/// authenticated connection holds; a connection that fails the handshake is answered (see
/// [`refused`]) and closed, and so is one dropped as the oldest pending handshake. A function of its
/// own: awaited inside `handle`'s match on the handshake's result, `refused` kept that result (a
/// whole `TlsStream`) in every connection's task for the connection's life, 1.4 KiB each.
async fn accept(
    state: &State<ListenerSide>,
    stream: TcpStream,
    listen: SocketAddr,
    failed: &impl Fn(HandshakeReason),
    mut pending: Pending,
) -> Option<(tokio_rustls::server::TlsStream<MeshSocket>, Slot)> {
    let handshake_timeout = state.settings.shared.handshake_timeout;
    let acceptor = TlsAcceptor::from(state.reloader.live().current());
    let handshake = async {
        let shaken = tokio::select! {
            biased;
            () = pending.dropped() => return Shaken::Dropped,
            shaken = acceptor.accept(MeshSocket::new(stream)).into_fallible() => shaken,
        };
        match shaken {
            Ok(tls) => match pending.authenticated().await {
                Some(slot) => Shaken::Authenticated(tls, slot),
                None => Shaken::Dropped,
            },
            Err((error, socket)) => Shaken::Refused(error, socket),
        }
    };
    match timeout(handshake_timeout, handshake).await {
        Ok(Shaken::Authenticated(tls, slot)) => Some((tls, slot)),
        Ok(Shaken::Refused(error, socket)) => {
            refused(&state.side, socket, error, listen, failed).await;
            None
        }
        Ok(Shaken::Dropped) => {
            let message = "pending handshake dropped: max_pending_handshakes were open, and this \
                           connection was accepted longest ago";
            if state.side.admit(message, HandshakeReason::Dropped) {
                info!(
                    max_pending_handshakes = state.settings.max_pending_handshakes,
                    "{message}"
                );
            }
            failed(HandshakeReason::Dropped);
            None
        }
        Err(_) => {
            let message = "no TLS handshake finished within handshake_timeout; closing";
            if state.side.admit(message, HandshakeReason::Timeout) {
                info!(
                    timeout_ms = handshake_timeout.as_millis() as u64,
                    "{message}"
                );
            }
            failed(HandshakeReason::Timeout);
            None
        }
    }
}

/// How a pending handshake ended, short of its timeout.
// Boxing the stream would cost an allocation per connection; a `Shaken` lives only between the
// handshake's end and the match on it in `accept`.
#[allow(clippy::large_enum_variant)]
enum Shaken {
    /// Mutual TLS established, with its `max_connections` slot.
    Authenticated(tokio_rustls::server::TlsStream<MeshSocket>, Slot),
    /// The handshake failed.
    Refused(io::Error, MeshSocket),
    /// Dropped as the oldest pending handshake.
    Dropped,
}

/// A connection whose handshake failed: answers plain HTTP with `400 tls-required`, closes anything
/// else that is not TLS, and sends a failed TLS handshake's alert before closing.
async fn refused(
    side: &ListenerSide,
    mut socket: MeshSocket,
    error: io::Error,
    listen: SocketAddr,
    failed: &impl Fn(HandshakeReason),
) {
    match socket.take_first() {
        First::Closed => {}
        First::Unread => debug!(%error, "reading the first bytes failed"),
        First::NotTls(bytes) if looks_like_http(&bytes) => {
            let message = "plain HTTP on the mutual-TLS port; answering 400 tls-required";
            if side.admit(message, HandshakeReason::PlaintextHttp) {
                info!("{message}");
            }
            failed(HandshakeReason::PlaintextHttp);
            if let Err(error) = refuse_plain_http(socket.into_tcp(), bytes, listen).await {
                debug!(%error, "writing the tls-required answer failed");
            }
        }
        First::NotTls(bytes) => {
            let message = "connection does not start with a TLS handshake; closing";
            if side.admit(message, HandshakeReason::NotTls) {
                info!(
                    first_byte = bytes.first().copied().unwrap_or_default(),
                    "{message}"
                );
            }
            failed(HandshakeReason::NotTls);
        }
        First::Tls => {
            let reason = error
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .map_or(HandshakeReason::Io, |e| {
                    HandshakeReason::Tls(failure_reason(e))
                });
            let message = "TLS handshake failed";
            if side.admit(message, reason) {
                info!(%error, reason = reason.as_str(), "{message}");
            }
            failed(reason);
            // With rustls' alert, so the peer learns why (a client certificate refused, say).
            let _ = timeout(std::time::Duration::from_secs(1), socket.shutdown()).await;
        }
    }
}
