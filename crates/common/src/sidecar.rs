//! What the two sidecars do alike around their own traffic: SIGHUP reloads of the config file,
//! the background tasks (file watching, admin endpoint), certificate logging and the metrics that
//! come from the TLS material.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use phoenix_mesh_certs::{error_chain, LiveTls, Material, Reloader};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::admin::{serve_admin, AdminState};
use crate::config::ConfigError;
use crate::metrics::Metrics;
use crate::settings::SharedSettings;
use phoenix_mesh_transport::serve::ShutdownWatch;

/// Why a sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cert(#[from] phoenix_mesh_certs::CertError),
    #[error("binding {what} to {addr}")]
    Bind {
        /// Which listener (`the mesh listener`, `the admin endpoint`, ...).
        what: &'static str,
        /// `ip:port` or `unix:/path`.
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    /// A bind failure of `what` on `addr`.
    pub fn bind(
        what: &'static str,
        addr: impl std::fmt::Display,
    ) -> impl FnOnce(std::io::Error) -> StartError {
        let addr = addr.to_string();
        move |source| StartError::Bind { what, addr, source }
    }
}

/// One side's validated settings, as far as reloading needs to know them.
pub trait SideSettings: Clone + Send + Sync + 'static {
    /// The live TLS configuration this side runs.
    type Tls: LiveTls;
    /// Reads and validates a config file.
    fn load(path: &Path) -> Result<Self, ConfigError>;
    /// Where the settings came from.
    fn path(&self) -> &Path;
    /// The keys both sides share.
    fn shared(&self) -> &SharedSettings;
    /// What, besides the files, shapes the TLS configuration.
    fn tls_options(&self) -> <Self::Tls as LiveTls>::Options;
    /// This side's keys that change only at restart, with their values.
    fn restart_only(&self) -> Vec<(&'static str, String)>;
    /// Takes over from `new` what applies without a restart (TLS files, trust policy).
    fn apply_live(&mut self, new: &Self);
}

/// SIGHUP: re-reads the config file and applies what can change live; says which other changes
/// wait for a restart. On any error the running configuration stays.
pub struct SettingsReload<S: SideSettings> {
    current: Mutex<S>,
    reloader: Arc<Reloader<S::Tls>>,
}

impl<S: SideSettings> SettingsReload<S> {
    /// For a side started with `settings`.
    pub fn new(settings: S, reloader: Arc<Reloader<S::Tls>>) -> Self {
        SettingsReload {
            current: Mutex::new(settings),
            reloader,
        }
    }

    /// Re-reads the config file and applies it.
    pub fn reload(&self) -> Result<(), String> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let new = match S::load(current.path()) {
            Ok(new) => new,
            Err(error) => {
                self.reloader
                    .stats
                    .failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let error = error_chain(&error);
                warn!(%error, "config reload failed; keeping the running configuration");
                return Err(error);
            }
        };
        let ignored = changed_keys(&*current, &new);
        if !ignored.is_empty() {
            warn!(keys = ?ignored, "these settings change only at restart; ignored until then");
        }
        // Remember what was asked for even if it fails, so the next change of the files is tried.
        current.apply_live(&new);
        self.reloader
            .reload(
                current.shared().tls.clone(),
                current.tls_options(),
                "SIGHUP",
            )
            .map_err(|e| error_chain(&e))
    }
}

fn changed_keys<S: SideSettings>(old: &S, new: &S) -> Vec<&'static str> {
    let before = old
        .restart_only()
        .into_iter()
        .chain(old.shared().restart_only());
    let after = new
        .restart_only()
        .into_iter()
        .chain(new.shared().restart_only());
    before
        .zip(after)
        .filter(|((_, a), (_, b))| a != b)
        .map(|((key, _), _)| key)
        .collect()
}

/// Binds the admin endpoint, if configured.
pub async fn bind_admin(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, StartError> {
    match addr {
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(StartError::bind("the admin endpoint", addr)),
        None => Ok(None),
    }
}

/// Starts what runs beside the traffic until shutdown: watching the TLS files, and the admin
/// endpoint when it is bound.
pub fn spawn_background<T: LiveTls>(
    reloader: &Arc<Reloader<T>>,
    shared: &SharedSettings,
    admin: Option<(TcpListener, Arc<dyn AdminState>)>,
    shutdown: &ShutdownWatch,
) {
    let mut stop = shutdown.clone();
    tokio::spawn(
        reloader.clone().watch_files(
            shared.reload_poll_interval,
            async move { stop.wait().await },
        ),
    );
    if let Some((listener, state)) = admin {
        tokio::spawn(serve_admin(
            listener,
            state,
            shared.http.header_read_timeout,
            shutdown.clone(),
        ));
    }
}

/// Logs our certificate at start, warning when less than a third of its lifetime is left.
pub fn log_certificate(material: &Material, role: &str) {
    let leaf = &material.leaf;
    let left = leaf.remaining(SystemTime::now());
    info!(
        role,
        cert = %material.files.cert.display(),
        subject = %leaf.subject,
        dns = ?leaf.dns,
        expires_in_s = left.as_secs(),
        "certificate loaded"
    );
    if left < leaf.lifetime() / 3 {
        warn!(
            role,
            cert = %material.files.cert.display(),
            expires_in_s = left.as_secs(),
            "certificate has less than a third of its lifetime left; is renewal running?"
        );
    }
}

/// Brings the metrics that come from the TLS material up to date: our certificate's not-after and
/// the reload counters.
pub fn refresh_tls_metrics<T: LiveTls>(metrics: &Metrics, reloader: &Reloader<T>) {
    let not_after = reloader
        .live()
        .leaf()
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    metrics.set_not_after("own", not_after.as_secs());
    metrics.sync_reloads(&reloader.stats.succeeded, &reloader.stats.failed);
}

/// Readiness as far as the TLS material goes: our certificate must not have expired.
pub fn own_certificate_ready<T: LiveTls>(reloader: &Reloader<T>) -> Result<u64, String> {
    let leaf = reloader.live().leaf();
    match leaf.remaining(SystemTime::now()).as_secs() {
        0 => Err(format!("our certificate ({}) has expired", leaf.subject)),
        left => Ok(left),
    }
}
