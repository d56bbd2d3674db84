//! The client sidecar on the skeleton: nginx's plain HTTP accepted on loopback or a unix socket, each
//! request carried to a mesh listener by [`Upstream`], readiness meaning a listener answers mutual TLS.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::server::conn::auto;
use phoenix_mesh_certs::LiveClientTls;
use phoenix_mesh_common::admin::NotReady;
use phoenix_mesh_common::certs_report::ConnectedPeers;
use phoenix_mesh_common::check::{CheckRequest, Report};
use phoenix_mesh_common::config::ConfigError;
use phoenix_mesh_common::live::LiveConnections;
use phoenix_mesh_common::metrics::{CertKind, GaugeGuard, Metrics};
use phoenix_mesh_common::sidecar::{conn_span, Side, Sidecar, StartError, State};
use phoenix_mesh_common::stall::progress_timeout;
use phoenix_mesh_transport::progress::Progress;
use phoenix_mesh_transport::serve::{accept_loop, http_builder, serve_http, ShutdownWatch, Slot};
use phoenix_mesh_transport::serving_task::{spawn_serving, ServingExecutor};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tracing::{debug, info, Instrument};

use crate::connector::MeshConnector;
use crate::forward::Upstream;
use crate::listen::{BoundUnix, ListenAddr};
use crate::ClientSettings;

/// Why the client could not start.
pub type ClientError = StartError;

/// A bound client sidecar, ready to serve.
pub type ClientSidecar = Sidecar<ClientSide>;

/// The client's policy: how it dials the mesh, what a request becomes on the way.
pub struct ClientSide {
    connector: MeshConnector,
    upstream: Upstream,
    http: auto::Builder<ServingExecutor>,
    /// Responses from the mesh listener that stop moving for `upstream_timeout` are cut off.
    progress: Progress,
}

/// The socket nginx connects to.
pub enum ClientListener {
    /// A TCP port (loopback unless `allow_public_listen`).
    Tcp(TcpListener),
    /// A unix socket; its file goes when this is dropped.
    Unix(BoundUnix),
}

impl Side for ClientSide {
    const NAME: &'static str = "client sidecar";
    const LISTENER: &'static str = "the client listener";
    const COMMAND: &'static str = "client";
    type Settings = ClientSettings;
    type Listener = ClientListener;

    fn new(
        settings: &ClientSettings,
        tls: &Arc<LiveClientTls>,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, StartError> {
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
            tls.clone(),
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
        )
        .allowing_upgrades(settings.shared.allowed_upgrades.clone());
        Ok(ClientSide {
            connector,
            upstream,
            http: http_builder(&settings.shared.http),
            progress: progress_timeout(
                format!("mesh listener ({})", settings.upstreams.join(", ")),
                "upstream_timeout",
                settings.upstream_timeout,
            ),
        })
    }

    async fn bind(settings: &ClientSettings) -> io::Result<ClientListener> {
        match &settings.listen {
            ListenAddr::Tcp(addr) => TcpListener::bind(addr).await.map(ClientListener::Tcp),
            ListenAddr::Unix(socket) => BoundUnix::bind(socket).await.map(ClientListener::Unix),
        }
    }

    fn local_addr(listener: &ClientListener) -> io::Result<SocketAddr> {
        match listener {
            ClientListener::Tcp(listener) => listener.local_addr(),
            ClientListener::Unix(socket) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("listening on unix:{}", socket.path().display()),
            )),
        }
    }

    fn listen(settings: &ClientSettings) -> String {
        settings.listen.to_string()
    }

    fn upstream_label(settings: &ClientSettings) -> Arc<str> {
        settings.upstreams.join(",").into()
    }

    fn announce(settings: &ClientSettings, listen: &str) {
        info!(
            %listen,
            upstreams = ?settings.upstreams,
            server_name = %settings.server_name,
            "client sidecar accepting plain HTTP"
        );
    }

    async fn accept(state: Arc<State<Self>>, listener: ClientListener, shutdown: ShutdownWatch) {
        let max = state.settings.shared.max_connections;
        tokio::spawn(recheck_on_trust_change(state.clone(), shutdown.clone()));
        let conn_shutdown = shutdown.clone();
        match listener {
            ClientListener::Tcp(listener) => {
                accept_loop(listener, max, shutdown, |stream, addr, slot| {
                    serve_conn(&state, stream, addr, slot, &conn_shutdown);
                })
                .await;
            }
            ClientListener::Unix(socket) => {
                // The socket file goes when `socket` is dropped, as the accept loop ends.
                accept_loop(socket, max, shutdown, |stream, peer, slot| {
                    serve_conn(&state, stream, peer, slot, &conn_shutdown);
                })
                .await;
            }
        }
    }

    fn peers(&self) -> &dyn ConnectedPeers {
        &**self.connector.live()
    }

    async fn ready(state: &State<Self>) -> Result<Option<&'static str>, NotReady> {
        state
            .side
            .connector
            .probe()
            .await
            .map_err(|e| NotReady::Peer(e.into()))?;
        Ok(Some("a mesh listener answered mutual TLS"))
    }

    fn progress(&self) -> &Progress {
        &self.progress
    }

    fn refresh_metrics(state: &State<Self>) {
        let peer = state.side.connector.listener_not_after();
        if peer > 0 {
            state.metrics.set_not_after(CertKind::Peer, peer);
        }
    }

    async fn check(settings: &ClientSettings, request: &CheckRequest) -> Report {
        crate::check::check(settings, request).await
    }
}

impl ClientSide {
    /// The established connections to the mesh listeners, with who is on each (for `/certs`).
    pub fn live(&self) -> &Arc<LiveConnections> {
        self.connector.live()
    }
}

/// Re-checks every established mesh connection whenever a reload changes the trust (CA, CRLs, TLS
/// versions): those whose listener the new trust refuses retire at once and close once their
/// requests finish, rather than at the next request that finds them stale.
async fn recheck_on_trust_change(state: Arc<State<ClientSide>>, mut shutdown: ShutdownWatch) {
    let mut changes = state.reloader.live().trust_changes();
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        let closed = state.side.connector.recheck();
        info!(
            closed,
            open = state.side.live().len(),
            "trust changed: established mesh connections checked against it"
        );
    }
}

/// Serves one connection from nginx on its own task.
fn serve_conn<S>(
    state: &Arc<State<ClientSide>>,
    stream: S,
    peer: impl std::fmt::Display,
    slot: Slot,
    shutdown: &ShutdownWatch,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = state.clone();
    let shutdown = shutdown.clone();
    let name: Arc<str> = peer.to_string().into();
    let span = conn_span(&name);
    let conn = async move {
        let _slot = slot;
        let _open = GaugeGuard::new(&state.metrics.open_connections);
        let service = {
            let state = state.clone();
            service_fn(move |req| {
                let state = state.clone();
                let peer = name.clone();
                async move {
                    let response = state
                        .answer(req, &peer, |req| state.side.upstream.forward(req))
                        .await;
                    Ok::<_, std::convert::Infallible>(response)
                }
            })
        };
        let first_bytes = state.settings.shared.http.header_read_timeout;
        if let Err(error) =
            serve_http(&state.side.http, stream, first_bytes, service, shutdown).await
        {
            debug!(%error, "connection ended with an error");
        }
    };
    // A serving task: over HTTP/1.1 a response that stalls ends its connection.
    spawn_serving(conn.instrument(span));
}
