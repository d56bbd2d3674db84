//! The sidecar skeleton: what the client sidecar and the mesh listener do alike, written once. A
//! *side* is one of the two; it brings its policy (what a request becomes on its hop, which errors it
//! answers with, how it handles a new connection) through [`Side`], and [`Sidecar`] does the rest:
//! loading and watching the TLS material, binding the listener and the admin endpoint, readiness and
//! metrics, SIGHUP reloads of the settings, counting and logging requests, and serving until shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use phoenix_mesh_certs::{CertError, LiveTls, Material, Reloader};
use phoenix_mesh_transport::progress::{Progress, Watched};
use phoenix_mesh_transport::serve::ShutdownWatch;
use tokio::net::TcpListener;
use tracing::{field, info_span, Span};

use crate::access::{AccessStart, Count, Logged};
use crate::admin::{serve_admin, AdminState, NotReady};
use crate::certs_report::{certs_json, ConnectedPeer, ConnectedPeers};
use crate::check::{CheckRequest, Report};
use crate::config::ConfigError;
use crate::metrics::{MadeBy, Metrics};
use crate::own_certificate::{log_certificate, own_certificate_ready, refresh_tls_metrics};
use crate::response::{close_connection, closes_unless_read};
use crate::settings::SideSettings;
use crate::settings_reload::SettingsReload;

/// Why a sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The settings do not hold together.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS files cannot be used.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// A socket could not be bound (a runtime problem, not a config mistake).
    #[error("binding {what} to {addr}")]
    Bind {
        /// Which listener (`the mesh listener`, `the admin endpoint`, ...).
        what: &'static str,
        /// `ip:port` or `unix:/path`.
        addr: String,
        #[source]
        source: io::Error,
    },
}

impl StartError {
    /// A bind failure of `what` on `addr`.
    pub fn bind(
        what: &'static str,
        addr: impl std::fmt::Display,
    ) -> impl FnOnce(io::Error) -> Self {
        let addr = addr.to_string();
        move |source| StartError::Bind { what, addr, source }
    }
}

/// The live TLS configuration of side `S`.
pub type TlsOf<S> = <<S as Side>::Settings as SideSettings>::Tls;

/// Loads a side's TLS files and builds its live TLS configuration from them: what start-up does, and
/// what `--check` runs, so that the two can never disagree (a reload runs the same loading and
/// building, through [`LiveTls::install`]).
pub fn load_tls<T: SideSettings>(settings: &T) -> Result<(Material, T::Tls), CertError> {
    let material = Material::load(&settings.shared().tls, T::Tls::ROLE)?;
    let live = T::Tls::build(&material, &settings.tls_options())?;
    Ok((material, live))
}

/// One side's policy, plugged into the skeleton.
pub trait Side: Sized + Send + Sync + 'static {
    /// How the side names itself in logs and readiness (`client sidecar`, `mesh listener`).
    const NAME: &'static str;
    /// Its listening socket in bind errors (`the client listener`).
    const LISTENER: &'static str;
    /// Its name on the command line and in `--check --config-only` (`client`, `server`).
    const COMMAND: &'static str;
    /// Its validated settings.
    type Settings: SideSettings;
    /// The socket it accepts connections on.
    type Listener: Send + Sync + 'static;

    /// Builds the side's policy from its settings, its live TLS and the metrics it shares.
    fn new(
        settings: &Self::Settings,
        tls: &Arc<TlsOf<Self>>,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, StartError>;

    /// Binds the socket it accepts on.
    fn bind(settings: &Self::Settings) -> impl Future<Output = io::Result<Self::Listener>> + Send;

    /// The address bound (the real port when the config said 0); an error when it has none.
    fn local_addr(listener: &Self::Listener) -> io::Result<SocketAddr>;

    /// `listen` as configured, for messages.
    fn listen(settings: &Self::Settings) -> String;

    /// Where requests go, as the access log names it.
    fn upstream_label(settings: &Self::Settings) -> Arc<str>;

    /// Logs that it now serves on `listen` (operators and tests look for this line).
    fn announce(settings: &Self::Settings, listen: &str);

    /// Accepts on `listener` until shutdown; each connection goes to [`spawn_connection`].
    fn accept(
        state: Arc<State<Self>>,
        listener: Self::Listener,
        shutdown: ShutdownWatch,
    ) -> impl Future<Output = ()> + Send;

    /// What the side adds to readiness: `Ok(Some(clause))` for the `/readyz` text, or why it is not.
    fn ready(
        state: &State<Self>,
    ) -> impl Future<Output = Result<Option<&'static str>, NotReady>> + Send;

    /// The progress timeout of the responses it passes on (see [`crate::stall`]).
    fn progress(&self) -> &Progress;
    /// The peers connected now, for `/certs`: the side's registry of live connections, which the
    /// default (none) stands in for.
    fn peers(&self) -> &dyn ConnectedPeers {
        &NO_PEERS
    }

    /// Brings the side's own gauges up to date before a scrape.
    fn refresh_metrics(state: &State<Self>) {
        let _ = state;
    }

    /// `--check`: walks every hop live and reports what works.
    fn check(
        settings: &Self::Settings,
        request: &CheckRequest,
    ) -> impl Future<Output = Report> + Send;
}

/// What a running side holds: its settings, live TLS, metrics and policy.
pub struct State<S: Side> {
    /// The settings it started with.
    pub settings: S::Settings,
    /// The handle that reloads the TLS material.
    pub reloader: Arc<Reloader<TlsOf<S>>>,
    /// Every metric of the process.
    pub metrics: Arc<Metrics>,
    /// The side's policy.
    pub side: S,
    serving: AtomicBool,
    upstream_label: Arc<str>,
}

impl<S: Side> State<S> {
    /// Counts, times and (with `access_log`) logs one request around what `forward` makes of it.
    /// `peer` names the downstream in the access log. A response passed on from the other hop is
    /// watched by the side's progress timeout (an upgrade's is not: the tunnel is no response body). An answer the mesh made itself (this side or,
    /// passed on, the listener) to an HTTP/1 request with a body says `Connection: close`: the rest
    /// of the body is not read after it, so hyper closes the connection (see [`crate::response`]).
    pub async fn answer<B, F, Fut>(
        &self,
        req: Request<Incoming>,
        peer: &Arc<str>,
        forward: F,
    ) -> Response<Logged<B>>
    where
        B: hyper::body::Body,
        F: FnOnce(Request<Incoming>) -> Fut,
        Fut: Future<Output = (Response<B>, MadeBy)>,
    {
        let start = Instant::now();
        let access = self
            .settings
            .shared()
            .access_log
            .then(|| AccessStart::new(&req, start));
        let closes = closes_unless_read(&req);
        let (mut response, made_by) = forward(req).await;
        if closes && made_by != MadeBy::Backend {
            close_connection(&mut response);
        }
        self.metrics.observe_response_head(start.elapsed());
        let passed_on = made_by != MadeBy::Sidecar
            && response.status() != http::StatusCode::SWITCHING_PROTOCOLS;
        let count = Count {
            metrics: self.metrics.clone(),
            status: response.status(),
            made_by,
        };
        let record = access.map(|a| {
            a.finish(
                response.status(),
                made_by,
                peer.clone(),
                self.upstream_label.clone(),
            )
        });
        response.map(|body| {
            let body = if passed_on {
                self.side.progress().watch(body)
            } else {
                Watched::unwatched(body)
            };
            Logged::new(body, count, record)
        })
    }
}

/// The span every accepted connection runs in: `conn`, naming the peer's address, with `peer.id`
/// recorded once known.
pub fn conn_span(peer: &impl std::fmt::Display) -> Span {
    info_span!("conn", peer.addr = %peer, peer.id = field::Empty)
}

/// A bound side, ready to serve.
pub struct Sidecar<S: Side> {
    listener: S::Listener,
    admin: Option<TcpListener>,
    state: Arc<State<S>>,
}

impl<S: Side> std::fmt::Debug for Sidecar<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("side", &S::NAME)
            .field("listen", &S::listen(&self.state.settings))
            .finish_non_exhaustive()
    }
}

impl<S: Side> Sidecar<S> {
    /// Loads and checks the TLS material, builds the side, then binds. Nothing is served until
    /// [`Sidecar::serve`].
    pub async fn bind(settings: S::Settings) -> Result<Self, StartError> {
        let shared = settings.shared();
        let (material, live) = load_tls(&settings)?;
        let live = Arc::new(live);
        let reloader = Arc::new(Reloader::new(
            live.clone(),
            &material,
            settings.tls_options(),
        ));
        log_certificate(&material, S::NAME);
        let metrics = Arc::new(Metrics::new());
        let side = S::new(&settings, &live, &metrics)?;
        let listener = S::bind(&settings)
            .await
            .map_err(StartError::bind(S::LISTENER, S::listen(&settings)))?;
        let admin = match shared.admin_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(StartError::bind("the admin endpoint", addr))?,
            ),
            None => None,
        };
        Ok(Sidecar {
            listener,
            admin,
            state: Arc::new(State {
                upstream_label: S::upstream_label(&settings),
                settings,
                reloader,
                metrics,
                side,
                serving: AtomicBool::new(false),
            }),
        })
    }

    /// The address actually bound (useful with port 0); an error when there is none (a unix socket).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        S::local_addr(&self.listener)
    }

    /// The admin endpoint's address, when configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The handle that reloads the TLS material (SIGHUP, file changes).
    pub fn reloader(&self) -> Arc<Reloader<TlsOf<S>>> {
        self.state.reloader.clone()
    }

    /// The SIGHUP handler: re-reads the config file and applies what can change live.
    pub fn settings_reload(&self) -> SettingsReload<S::Settings> {
        SettingsReload::new(self.state.settings.clone(), self.state.reloader.clone())
    }

    /// Serves until shutdown begins, with the file watcher and the admin endpoint beside it;
    /// connections already open carry on and hold `shutdown` until done.
    pub async fn serve(self, shutdown: ShutdownWatch) {
        let state = self.state;
        let listen = S::local_addr(&self.listener)
            .map_or_else(|_| S::listen(&state.settings), |addr| addr.to_string());
        S::announce(&state.settings, &listen);
        let shared = state.settings.shared();
        let mut stop = shutdown.clone();
        tokio::spawn(
            state
                .reloader
                .clone()
                .watch_files(
                    shared.reload_poll_interval,
                    async move { stop.wait().await },
                ),
        );
        if let Some(listener) = self.admin {
            tokio::spawn(serve_admin(
                listener,
                state.clone(),
                shared.http.header_read_timeout,
                shutdown.clone(),
            ));
        }
        state.serving.store(true, Ordering::Relaxed);
        S::accept(state.clone(), self.listener, shutdown).await;
        state.serving.store(false, Ordering::Relaxed);
    }
}

impl<S: Side> AdminState for State<S> {
    fn ready(&self) -> Pin<Box<dyn Future<Output = Result<String, NotReady>> + Send + '_>> {
        Box::pin(async move {
            if !self.serving.load(Ordering::Relaxed) {
                return Err(NotReady::NotServing { side: S::NAME });
            }
            let left = own_certificate_ready(&self.reloader)?;
            let clause = S::ready(self).await?;
            Ok(format!(
                "listening on {}; {}our certificate is valid for {left} s",
                S::listen(&self.settings),
                clause.map_or(String::new(), |c| format!("{c}; ")),
            ))
        })
    }

    fn metrics(&self) -> String {
        refresh_tls_metrics(&self.metrics, &self.reloader);
        S::refresh_metrics(self);
        self.metrics.encode()
    }

    fn certs(&self) -> String {
        certs_json(S::NAME, &self.reloader.status(), self.side.peers())
    }
}

/// A side that keeps no registry of its connections lists no peers.
static NO_PEERS: fn() -> Vec<ConnectedPeer> = Vec::new;
