//! The loopback HTTP listener nginx talks to.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use phoenix_mesh_certs::{CertError, ClientTlsOptions, LiveClientTls, Material, Reloader, Role};
use phoenix_mesh_common::config::ConfigError;
use phoenix_mesh_common::serve::{accept_loop, http_builder, serve_http, ShutdownWatch};
use rustls::pki_types::ServerName;
use tokio::net::TcpListener;
use tracing::{debug, field, info, info_span, warn, Instrument};

use crate::connector::MeshConnector;
use crate::forward::Upstream;
use crate::ClientSettings;

/// Why the client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("binding the client listener to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

struct State {
    reloader: Arc<Reloader<LiveClientTls>>,
    upstream: Upstream,
    http: auto::Builder<TokioExecutor>,
}

/// A bound client sidecar, ready to serve.
pub struct ClientSidecar {
    listener: TcpListener,
    settings: ClientSettings,
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
        let material = Material::load(&settings.tls, Role::Client)?;
        let options = ClientTlsOptions {
            min_version: settings.min_tls_version,
            http2: settings.upstream_http2,
        };
        let live = Arc::new(LiveClientTls::new(&material, &options)?);
        let reloader = Arc::new(Reloader::new(live.clone(), settings.tls.clone(), options));
        log_certificate(&material);
        let server_name = ServerName::try_from(settings.server_name.clone()).map_err(|e| {
            ConfigError::Invalid {
                path: settings.path.clone(),
                key: "server_name",
                message: e.to_string(),
            }
        })?;
        let connector = MeshConnector::new(
            settings.upstreams.clone(),
            server_name,
            live,
            settings.connect_timeout,
            settings.handshake_timeout,
        );
        let upstream = Upstream::new(
            connector,
            &settings.upstreams,
            settings.pool_idle_timeout,
            settings.upstream_timeout,
        );
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| ClientError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let http = http_builder(&settings.http);
        Ok(ClientSidecar {
            listener,
            settings,
            state: Arc::new(State {
                reloader,
                upstream,
                http,
            }),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The handle that reloads the TLS material (SIGHUP, file changes).
    pub fn reloader(&self) -> Arc<Reloader<LiveClientTls>> {
        self.state.reloader.clone()
    }

    /// The SIGHUP handler: re-reads the config file and applies what can change live.
    pub fn settings_reload(&self) -> crate::SettingsReload {
        crate::SettingsReload::new(self.settings.clone(), self.state.reloader.clone())
    }

    /// Serves until shutdown begins; connections already open carry on and hold `shutdown` until done.
    pub async fn serve(self, shutdown: ShutdownWatch) {
        let state = self.state;
        info!(
            listen = %self.listener.local_addr().unwrap_or(self.settings.listen),
            upstreams = ?self.settings.upstreams,
            server_name = %self.settings.server_name,
            "client sidecar accepting plain HTTP"
        );
        let mut stop = shutdown.clone();
        tokio::spawn(
            state
                .reloader
                .clone()
                .watch_files(self.settings.reload_poll_interval, async move {
                    stop.wait().await
                }),
        );
        let conn_shutdown = shutdown.clone();
        accept_loop(self.listener, shutdown, move |stream, addr| {
            let state = state.clone();
            let shutdown = conn_shutdown.clone();
            let span = info_span!("conn", peer.addr = %addr, peer.id = field::Empty);
            tokio::spawn(
                async move {
                    let service = {
                        let state = state.clone();
                        service_fn(move |req| {
                            let state = state.clone();
                            async move { state.upstream.forward(req).await }
                        })
                    };
                    if let Err(error) = serve_http(&state.http, stream, service, shutdown).await {
                        debug!(%error, "connection ended with an error");
                    }
                }
                .instrument(span),
            );
        })
        .await;
    }
}

fn log_certificate(material: &Material) {
    let leaf = &material.leaf;
    let left = leaf.remaining(SystemTime::now());
    info!(
        cert = %material.files.cert.display(),
        subject = %leaf.subject,
        expires_in_s = left.as_secs(),
        "client certificate loaded"
    );
    if left < leaf.lifetime() / 3 {
        warn!(cert = %material.files.cert.display(), expires_in_s = left.as_secs(), "client certificate has less than a third of its lifetime left; is renewal running?");
    }
}
