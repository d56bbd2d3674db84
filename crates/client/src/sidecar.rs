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
use phoenix_mesh_common::metrics::{GaugeGuard, Metrics};
use phoenix_mesh_common::serve::{accept_loop, http_builder, serve_http, ShutdownWatch};
use phoenix_mesh_common::sidecar::{
    bind_admin, log_certificate, own_certificate_ready, refresh_tls_metrics, spawn_background,
    SideSettings,
};
use phoenix_mesh_common::ProxyBody;
use rustls::pki_types::ServerName;
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

/// A bound client sidecar, ready to serve.
pub struct ClientSidecar {
    listener: TcpListener,
    admin: Option<TcpListener>,
    state: Arc<State>,
}

impl std::fmt::Debug for ClientSidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSidecar")
            .field("listen", &self.listener.local_addr().ok())
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
        );
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(ClientError::bind("the client listener", settings.listen))?;
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

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
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
        info!(
            listen = %self.listener.local_addr().unwrap_or(state.settings.listen),
            upstreams = ?state.settings.upstreams,
            server_name = %state.settings.server_name,
            "client sidecar accepting plain HTTP"
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
                let state = accept_state.clone();
                let shutdown = conn_shutdown.clone();
                let span = info_span!("conn", peer.addr = %addr, peer.id = field::Empty);
                tokio::spawn(
                    async move {
                        let _slot = slot;
                        let _open = GaugeGuard::new(&state.metrics.open_connections);
                        let peer: Arc<str> = addr.to_string().into();
                        let service = {
                            let state = state.clone();
                            service_fn(move |req| {
                                let state = state.clone();
                                let peer = peer.clone();
                                async move {
                                    Ok::<_, std::convert::Infallible>(
                                        state.request(req, peer).await,
                                    )
                                }
                            })
                        };
                        if let Err(error) = serve_http(&state.http, stream, service, shutdown).await
                        {
                            debug!(%error, "connection ended with an error");
                        }
                    }
                    .instrument(span),
                );
            },
        )
        .await;
        state.serving.store(false, Ordering::Relaxed);
    }
}

impl State {
    async fn request(&self, req: Request<Incoming>, peer: Arc<str>) -> Response<Logged<ProxyBody>> {
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
