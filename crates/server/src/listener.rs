//! Accepting mTLS connections on the listener's port.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use phoenix_mesh_certs::{failure_reason, LiveServerTls, Material, Reloader, Role};
use phoenix_mesh_common::access::{AccessStart, Logged};
use phoenix_mesh_common::admin::AdminState;
use phoenix_mesh_common::headers::forwarded_for_value;
use phoenix_mesh_common::metrics::{GaugeGuard, Metrics};
use phoenix_mesh_common::sidecar::{
    bind_admin, log_certificate, own_certificate_ready, refresh_tls_metrics, spawn_background,
    SideSettings,
};
use phoenix_mesh_transport::body::ResponseBody;
use phoenix_mesh_transport::http1_idle::serve_http1_parking;
use phoenix_mesh_transport::serve::{
    accept_loop, drive, http1_builder, http2_builder, PrefaceDeadline, ShutdownWatch, Slot,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, field, info, info_span, warn, Instrument};

use crate::forward::{Backend, Peer, PeerIds};
use crate::plaintext::{looks_like_http, refuse_plain_http};
use crate::ServerSettings;
use phoenix_mesh_transport::coalescing_socket::{First, MeshSocket};

/// Why the server could not start.
pub type ServerError = phoenix_mesh_common::sidecar::StartError;

struct State {
    settings: ServerSettings,
    reloader: Arc<Reloader<LiveServerTls>>,
    backend: Backend,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    metrics: Metrics,
    peer_ids: PeerIds,
    serving: AtomicBool,
    upstream_label: Arc<str>,
}

/// A bound mesh listener, ready to serve.
pub struct MeshListener {
    listener: TcpListener,
    admin: Option<TcpListener>,
    state: Arc<State>,
}

impl std::fmt::Debug for MeshListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshListener")
            .field("listen", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl MeshListener {
    /// Loads and checks the TLS material, then binds. Nothing is served until [`MeshListener::serve`].
    pub async fn bind(settings: ServerSettings) -> Result<Self, ServerError> {
        let material = Material::load(&settings.shared.tls, Role::Server)?;
        let options = settings.tls_options();
        let live = Arc::new(LiveServerTls::new(&material, &options)?);
        let reloader = Arc::new(Reloader::new(live, settings.shared.tls.clone(), options));
        log_certificate(&material, "mesh listener");
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(ServerError::bind("the mesh listener", settings.listen))?;
        let admin = bind_admin(settings.shared.admin_listen).await?;
        let backend = Backend::new(
            settings.backend,
            settings.backend_connect_timeout,
            settings.backend_timeout,
            settings.backend_http2,
        );
        let http1 = http1_builder(&settings.shared.http);
        let http2 = http2_builder(&settings.shared.http);
        Ok(MeshListener {
            listener,
            admin,
            state: Arc::new(State {
                upstream_label: settings.backend.to_string().into(),
                settings,
                reloader,
                backend,
                http1,
                http2,
                metrics: Metrics::new(),
                peer_ids: PeerIds::default(),
                serving: AtomicBool::new(false),
            }),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The admin endpoint's address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The handle that reloads the TLS material (SIGHUP, file changes).
    pub fn reloader(&self) -> Arc<Reloader<LiveServerTls>> {
        self.state.reloader.clone()
    }

    /// The SIGHUP handler: re-reads the config file and applies what can change live.
    pub fn settings_reload(&self) -> crate::SettingsReload {
        crate::SettingsReload::new(self.state.settings.clone(), self.state.reloader.clone())
    }

    /// Serves until shutdown begins; connections already open carry on and hold `shutdown` until done.
    pub async fn serve(self, shutdown: ShutdownWatch) {
        let state = self.state;
        let listen = self.listener.local_addr().unwrap_or(state.settings.listen);
        info!(
            %listen,
            backend = %state.settings.backend,
            allowed_peers = ?state.settings.allowed_peers,
            "mesh listener accepting mutual TLS"
        );
        let admin = self
            .admin
            .map(|listener| (listener, state.clone() as Arc<dyn AdminState>));
        spawn_background(&state.reloader, &state.settings.shared, admin, &shutdown);
        state.serving.store(true, Ordering::Relaxed);
        let conn_shutdown = shutdown.clone();
        let accept_state = state.clone();
        accept_loop(
            self.listener,
            state.settings.shared.max_connections,
            shutdown,
            move |stream, addr, slot| {
                let span = info_span!("conn", peer.addr = %addr, peer.id = field::Empty);
                tokio::spawn(
                    handle(
                        accept_state.clone(),
                        stream,
                        addr,
                        listen,
                        conn_shutdown.clone(),
                        slot,
                    )
                    .instrument(span),
                );
            },
        )
        .await;
        state.serving.store(false, Ordering::Relaxed);
    }
}

impl AdminState for State {
    fn ready(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        Box::pin(async move {
            if !self.serving.load(Ordering::Relaxed) {
                return Err("the mesh listener is not accepting connections".into());
            }
            let left = own_certificate_ready(&self.reloader)?;
            Ok(format!(
                "listening on {}; our certificate is valid for {left} s",
                self.settings.listen
            ))
        })
    }

    fn metrics(&self) -> String {
        refresh_tls_metrics(&self.metrics, &self.reloader);
        self.metrics.encode()
    }
}

async fn handle(
    state: Arc<State>,
    stream: TcpStream,
    addr: SocketAddr,
    listen: SocketAddr,
    mut shutdown: ShutdownWatch,
    _slot: Slot,
) {
    let _open = GaugeGuard::new(&state.metrics.open_connections);
    let started = Instant::now();
    let failed = |reason: &'static str| {
        state
            .metrics
            .handshake("failed", reason, "unknown", started.elapsed());
    };
    let Some(mut tls) = accept(&state, stream, listen, &failed).await else {
        return;
    };
    // The session ticket rustls wrote last waits for the first answer only when one follows at once:
    // the client sent its request with its Finished, or HTTP/2, whose server preface goes out straight
    // away. Otherwise it goes as soon as hyper waits for a request: the client may be waiting for it
    // as the sign that its certificate was accepted (see socket.rs).
    let (socket, conn) = tls.get_mut();
    let answer_follows = conn.alpn_protocol() == Some(b"h2")
        || conn
            .process_new_packets()
            .is_ok_and(|state| state.plaintext_bytes_to_read() > 0);
    socket.stop_holding(answer_follows);

    let (_, conn) = tls.get_ref();
    let resumed = matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    let Some(leaf) = conn.peer_certificates().and_then(|certs| certs.first()) else {
        warn!("handshake finished without a client certificate; closing");
        failed("no-certificate");
        return;
    };
    let id = match state.peer_ids.get(leaf) {
        Ok(id) => id,
        Err(error) => {
            info!(%error, "client certificate cannot be carried in X-Forwarded-Client-Cert; closing");
            failed("bad-certificate");
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
        failed("expired");
        let mut tls = tls;
        let _ = timeout(std::time::Duration::from_secs(1), tls.shutdown()).await;
        return;
    }
    state.metrics.handshake(
        "ok",
        "none",
        if resumed { "resumed" } else { "full" },
        started.elapsed(),
    );
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
    });
    let service = {
        let state = state.clone();
        service_fn(move |req| {
            let state = state.clone();
            let peer = peer.clone();
            // Boxed: hyper moves each stream's future several times on its way into a spawned task,
            // and ours is a few KiB.
            Box::pin(
                async move { Ok::<_, std::convert::Infallible>(state.request(req, &peer).await) },
            )
        })
    };
    // HTTP/2 only when ALPN chose it (RFC 9113 has no prior knowledge over TLS); HTTP/1.1 otherwise,
    // its idle keep-alive connections parked without hyper's buffers.
    let served: Result<(), Box<dyn std::error::Error + Send + Sync>> = if h2 {
        // On shutdown: GOAWAY, open streams finish. A peer that never sends the preface is closed
        // after header_read_timeout.
        let tls = PrefaceDeadline::new(tls, state.settings.shared.http.header_read_timeout);
        let conn = state.http2.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);
        drive(conn, |c| c.graceful_shutdown(), &mut shutdown)
            .await
            .map_err(Into::into)
    } else {
        let idle = state.settings.shared.http.header_read_timeout;
        serve_http1_parking(&state.http1, tls, service, idle, shutdown).await
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
    state: &State,
    stream: TcpStream,
    listen: SocketAddr,
    failed: &impl Fn(&'static str),
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
            refused(socket, error, listen, failed).await;
            None
        }
        Err(_) => {
            info!(
                timeout_ms = handshake_timeout.as_millis() as u64,
                "no TLS handshake finished within handshake_timeout; closing"
            );
            failed("timeout");
            None
        }
    }
}

/// A connection whose handshake failed: answers plain HTTP with `400 tls-required`, closes anything
/// else that is not TLS, and sends a failed TLS handshake's alert before closing.
async fn refused(
    mut socket: MeshSocket,
    error: io::Error,
    listen: SocketAddr,
    failed: &impl Fn(&'static str),
) {
    match socket.take_first() {
        First::Closed => {}
        First::Unread => debug!(%error, "reading the first bytes failed"),
        First::NotTls(bytes) if looks_like_http(&bytes) => {
            info!("plain HTTP on the mutual-TLS port; answering 400 tls-required");
            failed("plaintext-http");
            if let Err(error) = refuse_plain_http(socket.into_tcp(), bytes, listen).await {
                debug!(%error, "writing the tls-required answer failed");
            }
        }
        First::NotTls(bytes) => {
            info!(
                first_byte = bytes.first().copied().unwrap_or_default(),
                "connection does not start with a TLS handshake; closing"
            );
            failed("not-tls");
        }
        First::Tls => {
            let reason = error
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .map_or("io", failure_reason);
            info!(%error, reason, "TLS handshake failed");
            failed(reason);
            // With rustls' alert, so the peer learns why (a client certificate refused, say).
            let _ = timeout(std::time::Duration::from_secs(1), socket.shutdown()).await;
        }
    }
}

impl State {
    async fn request(&self, req: Request<Incoming>, peer: &Peer) -> Response<Logged<ResponseBody>> {
        let start = Instant::now();
        let access = self
            .settings
            .shared
            .access_log
            .then(|| AccessStart::new(&req, start));
        let (response, made_by) = self.backend.forward(req, peer).await;
        self.metrics
            .request(response.status(), made_by, start.elapsed());
        let record = access.map(|a| {
            a.finish(
                response.status(),
                made_by,
                peer.id.name.clone(),
                self.upstream_label.clone(),
            )
        });
        response.map(|body| Logged::new(body, record))
    }
}
