//! Accepting mTLS connections on the listener's port.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use phoenix_mesh_certs::{
    CertError, LiveServerTls, Material, PeerIdentity, Reloader, Role, ServerTlsOptions,
};
use phoenix_mesh_common::config::ConfigError;
use phoenix_mesh_common::serve::{accept_loop, http_builder, serve_http, ShutdownWatch};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, field, info, info_span, warn, Instrument};

use crate::forward::{Backend, Peer};
use crate::plaintext::{refuse_plain_http, sniff, FirstByte};
use crate::ServerSettings;

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("binding the mesh listener to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

struct State {
    settings: ServerSettings,
    reloader: Arc<Reloader<LiveServerTls>>,
    backend: Backend,
    http: auto::Builder<TokioExecutor>,
}

/// A bound mesh listener, ready to serve.
pub struct MeshListener {
    listener: TcpListener,
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
        let material = Material::load(&settings.tls, Role::Server)?;
        let options = ServerTlsOptions {
            allowed_peers: settings.allowed_peers.clone(),
            min_version: settings.min_tls_version,
        };
        let live = Arc::new(LiveServerTls::new(&material, &options)?);
        let reloader = Arc::new(Reloader::new(live, settings.tls.clone(), options));
        log_certificate(&material);
        let listener =
            TcpListener::bind(settings.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: settings.listen,
                    source,
                })?;
        let backend = Backend::new(
            settings.backend,
            settings.backend_connect_timeout,
            settings.backend_timeout,
        );
        let http = http_builder(&settings.http);
        Ok(MeshListener {
            listener,
            state: Arc::new(State {
                settings,
                reloader,
                backend,
                http,
            }),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
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
        let mut stop = shutdown.clone();
        tokio::spawn(
            state
                .reloader
                .clone()
                .watch_files(state.settings.reload_poll_interval, async move {
                    stop.wait().await
                }),
        );
        let conn_shutdown = shutdown.clone();
        accept_loop(self.listener, shutdown, move |stream, addr| {
            let span = info_span!("conn", peer.addr = %addr, peer.id = field::Empty);
            tokio::spawn(
                handle(state.clone(), stream, addr, listen, conn_shutdown.clone()).instrument(span),
            );
        })
        .await;
    }
}

async fn handle(
    state: Arc<State>,
    stream: TcpStream,
    addr: SocketAddr,
    listen: SocketAddr,
    shutdown: ShutdownWatch,
) {
    let handshake_timeout = state.settings.handshake_timeout;
    match timeout(handshake_timeout, sniff(&stream)).await {
        Ok(Ok(FirstByte::Tls)) => {}
        Ok(Ok(FirstByte::PlainHttp)) => {
            info!("plain HTTP on the mutual-TLS port; answering 400 tls-required");
            if let Err(error) = refuse_plain_http(stream, listen).await {
                debug!(%error, "writing the tls-required answer failed");
            }
            return;
        }
        Ok(Ok(FirstByte::Garbage(byte))) => {
            info!(
                first_byte = byte,
                "connection does not start with a TLS handshake; closing"
            );
            return;
        }
        Ok(Ok(FirstByte::Closed)) => return,
        Ok(Err(error)) => {
            debug!(%error, "reading the first byte failed");
            return;
        }
        Err(_) => {
            info!(
                timeout_ms = handshake_timeout.as_millis() as u64,
                "no TLS handshake within handshake_timeout; closing"
            );
            return;
        }
    }

    let acceptor = TlsAcceptor::from(state.reloader.live().current());
    let tls = match timeout(handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            info!(%error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            info!(
                timeout_ms = handshake_timeout.as_millis() as u64,
                "TLS handshake timed out"
            );
            return;
        }
    };

    let (_, conn) = tls.get_ref();
    let Some(leaf) = conn.peer_certificates().and_then(|certs| certs.first()) else {
        warn!("handshake finished without a client certificate; closing");
        return;
    };
    let identity = match PeerIdentity::from_der(leaf) {
        Ok(id) => id,
        Err(error) => {
            info!(%error, "client certificate unparseable after handshake; closing");
            return;
        }
    };
    tracing::Span::current().record("peer.id", identity.name());
    debug!(
        resumed = matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed)),
        alpn = ?conn.alpn_protocol().map(String::from_utf8_lossy),
        "mutual TLS established"
    );
    let xfcc = match HeaderValue::from_str(&identity.xfcc()) {
        Ok(v) => v,
        Err(error) => {
            info!(%error, "client identity cannot be carried in a header; closing");
            return;
        }
    };
    let peer = Arc::new(Peer { addr, xfcc });
    let service = {
        let state = state.clone();
        service_fn(move |req| {
            let state = state.clone();
            let peer = peer.clone();
            async move { state.backend.forward(req, &peer).await }
        })
    };
    if let Err(error) = serve_http(&state.http, tls, service, shutdown).await {
        debug!(%error, "connection ended with an error");
    }
}

fn log_certificate(material: &Material) {
    let leaf = &material.leaf;
    let left = leaf.remaining(SystemTime::now());
    info!(
        cert = %material.files.cert.display(),
        subject = %leaf.subject,
        dns = ?leaf.dns,
        expires_in_s = left.as_secs(),
        "listener certificate loaded"
    );
    if left < leaf.lifetime() / 3 {
        warn!(cert = %material.files.cert.display(), expires_in_s = left.as_secs(), "listener certificate has less than a third of its lifetime left; is renewal running?");
    }
}
