//! The mesh listener on the skeleton: mutual TLS accepted on `:8443`, the client's identity checked
//! and carried in `X-Forwarded-Client-Cert`, each request forwarded to the backend by [`Backend`];
//! a connection that is not TLS, or whose handshake fails, is answered and counted here.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use phoenix_mesh_certs::{failure_reason, LiveServerTls};
use phoenix_mesh_common::admin::NotReady;
use phoenix_mesh_common::check::{CheckRequest, Report};
use phoenix_mesh_common::headers::forwarded_for_value;
use phoenix_mesh_common::log_limit::{Cause, LogLimit, Repeat};
use phoenix_mesh_common::metrics::{GaugeGuard, HandshakeKind, HandshakeReason, Metrics};
use phoenix_mesh_common::sidecar::{conn_span, Side, Sidecar, StartError, State};
use phoenix_mesh_transport::http1_idle::serve_http1_parking;
use phoenix_mesh_transport::serve::{
    accept_loop, drive, http1_builder, http2_builder, PrefaceDeadline, ShutdownWatch, Slot,
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

/// Why the server could not start.
pub type ServerError = StartError;

/// A bound mesh listener, ready to serve.
pub type MeshListener = Sidecar<ListenerSide>;

/// The listener's policy: who may connect, and how requests reach the backend.
pub struct ListenerSide {
    backend: Backend,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    peer_ids: PeerIds,
    /// Failed handshakes, each reason logged once per interval: anyone who can reach the port can
    /// fail one, as often as they like.
    refusals: LogLimit,
    /// The configured listen address, as the refusals' hop.
    listen: Arc<str>,
}

impl ListenerSide {
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
        _metrics: &Arc<Metrics>,
    ) -> Result<Self, StartError> {
        Ok(ListenerSide {
            backend: Backend::new(
                settings.backend,
                settings.backend_connect_timeout,
                settings.backend_timeout,
                settings.backend_http2,
            )
            .allowing_upgrades(settings.shared.allowed_upgrades.clone())
            .limiting_response_heads(settings.shared.http.max_header_bytes),
            http1: http1_builder(&settings.shared.http),
            http2: http2_builder(&settings.shared.http),
            peer_ids: PeerIds::new(settings.identity_headers),
            refusals: LogLimit::new(),
            listen: settings.listen.to_string().into(),
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
    }

    async fn accept(state: Arc<State<Self>>, listener: TcpListener, shutdown: ShutdownWatch) {
        let listen = listener.local_addr().unwrap_or(state.settings.listen);
        let max = state.settings.shared.max_connections;
        let conn_shutdown = shutdown.clone();
        accept_loop(listener, max, shutdown, move |stream, addr, slot| {
            let span = conn_span(&addr);
            tokio::spawn(
                handle(
                    state.clone(),
                    stream,
                    addr,
                    listen,
                    conn_shutdown.clone(),
                    slot,
                )
                .instrument(span),
            );
        })
        .await;
    }

    async fn ready(_state: &State<Self>) -> Result<Option<&'static str>, NotReady> {
        Ok(None)
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
    _slot: Slot,
) {
    let _open = GaugeGuard::new(&state.metrics.open_connections);
    let started = Instant::now();
    let failed = |reason: HandshakeReason| {
        state.metrics.handshake_failed(reason, started.elapsed());
    };
    let Some(mut tls) = accept(&state, stream, listen, &failed).await else {
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
    let peer = Arc::new(Peer {
        forwarded_for: forwarded_for_value(addr.ip()),
        id,
        client_cert_chain: state.side.peer_ids.chain(sent),
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
    // its idle keep-alive connections parked without hyper's buffers.
    let served: Result<(), Box<dyn std::error::Error + Send + Sync>> = if h2 {
        // On shutdown: GOAWAY, open streams finish. A peer that never sends the preface is closed
        // after header_read_timeout.
        let tls = PrefaceDeadline::new(tls, state.settings.shared.http.header_read_timeout);
        let conn = state
            .side
            .http2
            .serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);
        drive(conn, |c| c.graceful_shutdown(), &mut shutdown)
            .await
            .map_err(Into::into)
    } else {
        let idle = state.settings.shared.http.header_read_timeout;
        serve_http1_parking(&state.side.http1, tls, service, idle, shutdown).await
    };
    if let Err(error) = served {
        debug!(%error, "connection ended with an error");
    }
}

/// The TLS handshake, bounded by `handshake_timeout`; a connection that fails it is answered (see
/// [`refused`]) and closed. A function of its own: awaited inside `handle`'s match on the handshake's
/// result, `refused` kept that result (a whole `TlsStream`) in every connection's task for the
/// connection's life, 1.4 KiB each.
async fn accept(
    state: &State<ListenerSide>,
    stream: TcpStream,
    listen: SocketAddr,
    failed: &impl Fn(HandshakeReason),
) -> Option<tokio_rustls::server::TlsStream<MeshSocket>> {
    let handshake_timeout = state.settings.shared.handshake_timeout;
    let acceptor = TlsAcceptor::from(state.reloader.live().current());
    match timeout(
        handshake_timeout,
        acceptor.accept(MeshSocket::new(stream)).into_fallible(),
    )
    .await
    {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err((error, socket))) => {
            refused(&state.side, socket, error, listen, failed).await;
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
