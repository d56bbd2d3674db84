//! TLS material that changes while the process runs: a live configuration swapped atomically, and a
//! reloader that rebuilds it from the files on SIGHUP or when their contents change. A reload that
//! fails leaves the previous material in service; the process never exits because of one.

use std::fs;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::{ClientConfig, ServerConfig};
use tracing::{info, warn};

use crate::tls::{build_client_config, build_server_config, ServerResumption};
use crate::{
    error_chain, CertError, ClientTlsOptions, Material, PeerIdentity, Role, ServerTlsOptions,
    TlsFiles,
};

/// A TLS configuration that can be replaced while connections use the old one.
pub trait LiveTls: Send + Sync + 'static {
    /// What besides the files shapes the configuration.
    type Options: Clone + Send + Sync + std::fmt::Debug + 'static;
    /// Which end of the link this is.
    const ROLE: Role;
    /// The first configuration, from checked material.
    fn build(material: &Material, options: &Self::Options) -> Result<Self, CertError>
    where
        Self: Sized;
    /// Builds a configuration from checked material and installs it for new handshakes.
    fn install(&self, material: &Material, options: &Self::Options) -> Result<(), CertError>;
    /// Our current leaf.
    fn leaf(&self) -> Arc<PeerIdentity>;
}

/// The listener's live configuration. The session cache and ticket key survive a reload that keeps
/// the trust policy (CA, CRLs, allowed peers, versions); a change of policy replaces them, so no session
/// or ticket issued under the old policy resumes.
pub struct LiveServerTls {
    config: ArcSwap<ServerConfig>,
    leaf: ArcSwap<PeerIdentity>,
    resumption: Mutex<(String, ServerResumption)>,
}

impl LiveServerTls {
    /// The first configuration.
    pub fn new(material: &Material, options: &ServerTlsOptions) -> Result<Self, CertError> {
        let resumption = ServerResumption::new()?;
        let config = build_server_config(material, options, &resumption)?;
        Ok(LiveServerTls {
            config: ArcSwap::new(config),
            leaf: ArcSwap::from_pointee(material.leaf.clone()),
            resumption: Mutex::new((server_policy(material, options), resumption)),
        })
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }
}

fn server_policy(material: &Material, options: &ServerTlsOptions) -> String {
    format!(
        "{}|{:?}|{:?}",
        material.trust_fingerprint, options.allowed_peers, options.min_version
    )
}

impl LiveTls for LiveServerTls {
    type Options = ServerTlsOptions;
    const ROLE: Role = Role::Server;

    fn build(material: &Material, options: &ServerTlsOptions) -> Result<Self, CertError> {
        LiveServerTls::new(material, options)
    }

    fn install(&self, material: &Material, options: &ServerTlsOptions) -> Result<(), CertError> {
        let mut resumption = self.resumption.lock();
        let policy = server_policy(material, options);
        let fresh;
        let kept = if policy == resumption.0 {
            &resumption.1
        } else {
            fresh = ServerResumption::new()?;
            &fresh
        };
        let config = build_server_config(material, options, kept)?;
        if policy != resumption.0 {
            info!("trust policy changed (CA, CRLs, allowed_peers or TLS versions): earlier sessions and tickets no longer resume");
            *resumption = (policy, kept.clone());
        }
        self.config.store(config);
        self.leaf.store(Arc::new(material.leaf.clone()));
        Ok(())
    }

    fn leaf(&self) -> Arc<PeerIdentity> {
        self.leaf.load_full()
    }
}

/// The client's live configuration; its session cache survives a reload that keeps the CA and CRLs.
pub struct LiveClientTls {
    config: ArcSwap<ClientConfig>,
    /// The same offering only HTTP/1.1, for requests that upgrade (WebSocket).
    http1: ArcSwap<ClientConfig>,
    leaf: ArcSwap<PeerIdentity>,
    trust: Mutex<String>,
    generation: std::sync::atomic::AtomicU64,
}

impl LiveClientTls {
    /// The first configuration.
    pub fn new(material: &Material, options: &ClientTlsOptions) -> Result<Self, CertError> {
        let config = build_client_config(material, options, None)?;
        Ok(LiveClientTls {
            http1: ArcSwap::new(http1_only(&config)),
            config: ArcSwap::new(config),
            leaf: ArcSwap::from_pointee(material.leaf.clone()),
            trust: Mutex::new(format!("{}|{:?}", material.trust_fingerprint, options)),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The configuration new connections use.
    pub fn current(&self) -> Arc<ClientConfig> {
        self.config.load_full()
    }

    /// Goes up by one with every installed configuration: connections made under an older one carry
    /// the previous client certificate (or trust) and are retired from the pool.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The configuration for connections that must speak HTTP/1.1 (protocol upgrades).
    pub fn current_http1(&self) -> Arc<ClientConfig> {
        self.http1.load_full()
    }
}

fn http1_only(config: &Arc<ClientConfig>) -> Arc<ClientConfig> {
    let mut http1 = ClientConfig::clone(config);
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(http1)
}

impl LiveTls for LiveClientTls {
    type Options = ClientTlsOptions;
    const ROLE: Role = Role::Client;

    fn build(material: &Material, options: &ClientTlsOptions) -> Result<Self, CertError> {
        LiveClientTls::new(material, options)
    }

    fn install(&self, material: &Material, options: &ClientTlsOptions) -> Result<(), CertError> {
        let mut trust = self.trust.lock();
        let policy = format!("{}|{:?}", material.trust_fingerprint, options);
        let keep = (policy == *trust).then(|| self.config.load().resumption.clone());
        let config = build_client_config(material, options, keep)?;
        *trust = policy;
        self.http1.store(http1_only(&config));
        self.config.store(config);
        self.leaf.store(Arc::new(material.leaf.clone()));
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn leaf(&self) -> Arc<PeerIdentity> {
        self.leaf.load_full()
    }
}

/// Reload counters, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Reloads that installed new material.
    pub succeeded: AtomicU64,
    /// Reloads that failed and kept the previous material.
    pub failed: AtomicU64,
}

struct Watch<O> {
    files: TlsFiles,
    options: O,
    seen: String,
    last_expiry_warning: Option<Instant>,
}

/// Rebuilds a live configuration from its files, on request or when their contents change.
pub struct Reloader<T: LiveTls> {
    live: Arc<T>,
    watch: Mutex<Watch<T::Options>>,
    /// Counters by result.
    pub stats: ReloadStats,
}

impl<T: LiveTls> Reloader<T> {
    /// Watches `files` (already loaded into `live`).
    pub fn new(live: Arc<T>, files: TlsFiles, options: T::Options) -> Self {
        let seen = fingerprint(&files);
        Reloader {
            live,
            watch: Mutex::new(Watch {
                files,
                options,
                seen,
                last_expiry_warning: None,
            }),
            stats: ReloadStats::default(),
        }
    }

    /// The live configuration.
    pub fn live(&self) -> &Arc<T> {
        &self.live
    }

    /// Reloads from `files` with `options` now (SIGHUP). On failure the previous material stays in
    /// service and `files` are watched so that their next change is tried again.
    pub fn reload(&self, files: TlsFiles, options: T::Options, why: &str) -> Result<(), CertError> {
        let mut watch = self.watch.lock();
        watch.seen = fingerprint(&files);
        watch.files = files;
        watch.options = options;
        self.apply(&watch, why)
    }

    /// Reloads if any watched file's contents changed since the last attempt (rename, in-place
    /// rewrite and symlink swaps alike, since it reads through links). `None` when nothing changed.
    pub fn poll(&self) -> Option<Result<(), CertError>> {
        let mut watch = self.watch.lock();
        self.warn_if_expiring(&mut watch);
        let now = fingerprint(&watch.files);
        if now == watch.seen {
            return None;
        }
        watch.seen = now;
        Some(self.apply(&watch, "certificate files changed"))
    }

    /// Polls the files every `interval` until `stop` resolves (file reads run off the async workers).
    pub async fn watch_files(
        self: Arc<Self>,
        interval: Duration,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticker.tick() => {
                    let this = self.clone();
                    let _ = tokio::task::spawn_blocking(move || this.poll()).await;
                }
            }
        }
    }

    fn apply(&self, watch: &Watch<T::Options>, why: &str) -> Result<(), CertError> {
        let result = Material::load(&watch.files, T::ROLE).and_then(|m| {
            self.live.install(&m, &watch.options)?;
            Ok(m)
        });
        match result {
            Ok(material) => {
                self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
                let left = material.leaf.remaining(SystemTime::now());
                info!(
                    reason = why,
                    cert = %watch.files.cert.display(),
                    subject = %material.leaf.subject,
                    expires_in_s = left.as_secs(),
                    "TLS material reloaded; new handshakes use it"
                );
                Ok(())
            }
            Err(error) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!(reason = why, error = %error_chain(&error), "certificate reload failed; keeping the previous material");
                Err(error)
            }
        }
    }

    fn warn_if_expiring(&self, watch: &mut Watch<T::Options>) {
        let leaf = self.live.leaf();
        let now = SystemTime::now();
        if !leaf.renewal_due(now) {
            return;
        }
        let left = leaf.remaining(now);
        if watch
            .last_expiry_warning
            .is_some_and(|t| t.elapsed() < Duration::from_secs(3600))
        {
            return;
        }
        watch.last_expiry_warning = Some(Instant::now());
        warn!(
            cert = %watch.files.cert.display(),
            expires_in_s = left.as_secs(),
            "our certificate has less than a third of its lifetime left; is renewal running?"
        );
    }
}

/// SHA-256 over every watched file's path and contents, read through symlinks. An unreadable file
/// contributes its error, so a file that comes back counts as a change.
fn fingerprint(files: &TlsFiles) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for path in [&files.cert, &files.key, &files.ca]
        .into_iter()
        .chain(files.crls.iter())
    {
        ctx.update(path.as_os_str().as_encoded_bytes());
        match fs::read(path) {
            Ok(bytes) => {
                ctx.update(&(bytes.len() as u64).to_be_bytes());
                ctx.update(&bytes);
            }
            Err(e) => ctx.update(format!("error:{:?}", e.kind()).as_bytes()),
        }
    }
    crate::provider::hex(ctx.finish().as_ref())
}
