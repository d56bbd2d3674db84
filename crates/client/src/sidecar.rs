//! The loopback HTTP listener nginx talks to.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use phoenix_mesh_certs::{error_chain, LiveClientTls, Material, Reloader, Role};
use phoenix_mesh_common::access::{AccessStart, Logged};
use phoenix_mesh_common::admin::AdminState;
use phoenix_mesh_common::config::ConfigError;
use phoenix_mesh_common::listen::{BoundUnix, ListenAddr};
use phoenix_mesh_common::metrics::{GaugeGuard, Metrics};
use phoenix_mesh_common::sidecar::{
    bind_admin, log_certificate, own_certificate_ready, refresh_tls_metrics, spawn_background,
    SideSettings,
};
use phoenix_mesh_transport::body::ResponseBody;
use phoenix_mesh_transport::serve::{accept_loop, http_builder, serve_http, ShutdownWatch, Slot};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tracing::{debug, field, info, info_span, Instrument};

use crate::connector::MeshConnector;
use crate::forward::Upstream;
use crate::ClientSettings;

/// Why the client could not start.
pub type ClientError = phoenix_mesh_common::sidecar::StartError;

struct State {
    settings: ClientSettings,
    reloader: Arc<Reloader<LiveClientTls>>,
    connector: MeshConnector,
    upstream: Upstream,
    http: auto::Builder<TokioExecutor>,
    metrics: Arc<Metrics>,
    serving: AtomicBool,
    upstream_label: Arc<str>,
}

/// The socket nginx connects to.
enum Bound {
    Tcp(TcpListener),
    Unix(BoundUnix),
}

/// A bound client sidecar, ready to serve.
pub struct ClientSidecar {
    listener: Bound,
    admin: Option<TcpListener>,
    state: Arc<State>,
}

impl std::fmt::Debug for ClientSidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSidecar")
            .field("listen", &self.state.settings.listen.to_string())
            .finish_non_exhaustive()
    }
}

impl ClientSidecar {
    /// Loads and checks the TLS material, then binds. Nothing is served until [`ClientSidecar::serve`].
    pub async fn bind(settings: ClientSettings) -> Result<Self, ClientError> {
        let material = Material::load(&settings.shared.tls, Role::Client)?;
        let options = settings.tls_options();
        let live = Arc::new(LiveClientTls::new(&material, &options)?);
        let reloader = Arc::new(Reloader::new(
            live.clone(),
            settings.shared.tls.clone(),
            options,
        ));
        log_certificate(&material, "client sidecar");
        let server_name = ServerName::try_from(settings.server_name.clone()).map_err(|e| {
            ConfigError::Invalid {
                path: settings.path.clone(),
                key: "server_name",
                message: e.to_string(),
            }
        })?;
        let metrics = Arc::new(Metrics::new());
        let connector = MeshConnector::new(
            settings.upstreams.clone(),
            server_name,
            live,
            settings.connect_timeout,
            settings.shared.handshake_timeout,
            metrics.clone(),
        );
        let upstream = Upstream::new(
            connector.clone(),
            &settings.upstreams,
            settings.pool_idle_timeout,
            settings.upstream_timeout,
            settings.upstream_http2,
        );
        let bind_error = ClientError::bind("the client listener", &settings.listen);
        let listener = match &settings.listen {
            ListenAddr::Tcp(addr) => TcpListener::bind(addr).await.map(Bound::Tcp),
            ListenAddr::Unix(socket) => BoundUnix::bind(socket).await.map(Bound::Unix),
        }
        .map_err(bind_error)?;
        let admin = bind_admin(settings.shared.admin_listen).await?;
        let http = http_builder(&settings.shared.http);
        Ok(ClientSidecar {
            listener,
            admin,
            state: Arc::new(State {
                upstream_label: settings.upstreams.join(",").into(),
                settings,
                reloader,
                connector,
                upstream,
                http,
                metrics,
                serving: AtomicBool::new(false),
            }),
        })
    }

    /// The address actually bound (useful with port 0); an error for a unix socket.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.listener {
            Bound::Tcp(listener) => listener.local_addr(),
            Bound::Unix(socket) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("listening on unix:{}", socket.path().display()),
            )),
        }
    }

    /// The admin endpoint's address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The handle that reloads the TLS material (SIGHUP, file changes).
    pub fn reloader(&self) -> Arc<Reloader<LiveClientTls>> {
        self.state.reloader.clone()
    }

    /// The SIGHUP handler: re-reads the config file and applies what can change live.
    pub fn settings_reload(&self) -> crate::SettingsReload {
        crate::SettingsReload::new(self.state.settings.clone(), self.state.reloader.clone())
    }

    /// Serves until shutdown begins; connections already open carry on and hold `shutdown` until done.
    pub async fn serve(self, shutdown: ShutdownWatch) {
        let state = self.state;
        let listen = match &self.listener {
            Bound::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|_| state.settings.listen.to_string(), |a| a.to_string()),
            Bound::Unix(_) => state.settings.listen.to_string(),
        };
        info!(
            %listen,
            upstreams = ?state.settings.upstreams,
            server_name = %state.settings.server_name,
            "client sidecar accepting plain HTTP"
        );
        let admin = self
            .admin
            .map(|listener| (listener, state.clone() as Arc<dyn AdminState>));
        spawn_background(&state.reloader, &state.settings.shared, admin, &shutdown);
        state.serving.store(true, Ordering::Relaxed);
        let max = state.settings.shared.max_connections;
        let conn_shutdown = shutdown.clone();
        match self.listener {
            Bound::Tcp(listener) => {
                accept_loop(listener, max, shutdown, |stream, addr, slot| {
                    spawn_conn(&state, stream, addr, slot, &conn_shutdown);
                })
                .await;
            }
            Bound::Unix(socket) => {
                // The socket file goes when `socket` is dropped, as the accept loop ends.
                accept_loop(socket, max, shutdown, |stream, peer, slot| {
                    spawn_conn(&state, stream, peer, slot, &conn_shutdown);
                })
                .await;
            }
        }
        state.serving.store(false, Ordering::Relaxed);
    }
}

/// Serves one connection from nginx on its own task.
fn spawn_conn<S>(
    state: &Arc<State>,
    stream: S,
    peer: impl std::fmt::Display,
    slot: Slot,
    shutdown: &ShutdownWatch,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = state.clone();
    let shutdown = shutdown.clone();
    let peer: Arc<str> = peer.to_string().into();
    let span = info_span!("conn", peer.addr = %peer, peer.id = field::Empty);
    tokio::spawn(
        async move {
            let _slot = slot;
            let _open = GaugeGuard::new(&state.metrics.open_connections);
            let service = {
                let state = state.clone();
                service_fn(move |req| {
                    let state = state.clone();
                    let peer = peer.clone();
                    async move { Ok::<_, std::convert::Infallible>(state.request(req, peer).await) }
                })
            };
            let first_bytes = state.settings.shared.http.header_read_timeout;
            if let Err(error) =
                serve_http(&state.http, stream, first_bytes, service, shutdown).await
            {
                debug!(%error, "connection ended with an error");
            }
        }
        .instrument(span),
    );
}

impl State {
    async fn request(
        &self,
        req: Request<Incoming>,
        peer: Arc<str>,
    ) -> Response<Logged<ResponseBody>> {
        let start = Instant::now();
        let access = self
            .settings
            .shared
            .access_log
            .then(|| AccessStart::new(&req, start));
        let (response, made_by) = self.upstream.forward(req).await;
        self.metrics
            .request(response.status(), made_by, start.elapsed());
        let record = access.map(|a| {
            a.finish(
                response.status(),
                made_by,
                peer,
                self.upstream_label.clone(),
            )
        });
        response.map(|body| Logged::new(body, record))
    }
}

impl AdminState for State {
    fn ready(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send + '_>>
    {
        Box::pin(async move {
            if !self.serving.load(Ordering::Relaxed) {
                return Err("the client sidecar is not accepting connections".into());
            }
            let left = own_certificate_ready(&self.reloader)?;
            self.connector.probe().await.map_err(|e| error_chain(&e))?;
            Ok(format!(
                "listening on {}; a mesh listener answered mutual TLS; our certificate is valid for {left} s",
                self.settings.listen
            ))
        })
    }

    fn metrics(&self) -> String {
        refresh_tls_metrics(&self.metrics, &self.reloader);
        let peer = self.connector.listener_not_after();
        if peer > 0 {
            self.metrics.set_not_after("peer", peer);
        }
        self.metrics.encode()
    }
}
