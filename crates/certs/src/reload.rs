//! TLS material that changes while the process runs: a live configuration swapped atomically, and a
//! reloader that rebuilds it from the files on SIGHUP or when their contents change. A reload that
//! fails leaves the previous material in service; the process never exits because of one. A
//! certificate and key that do not match, as the file watcher reads them between a renewal's two
//! renames, get a short settle time to become a pair before they count as a failure.

use std::fs;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::{ClientConfig, ServerConfig};
use tracing::{debug, info, warn};

use crate::identity::chain_not_after;
use crate::recheck::{Authenticated, ClientPolicy, Refusal, ServerPolicy};
use crate::tls::{build_client_config, build_server_config, ServerResumption};
use crate::{
    error_chain, CertError, ClientTlsOptions, Inventory, Material, PeerIdentity, Role,
    ServerTlsOptions, TlsFiles,
};

/// Our own chain as one configuration presents it: its leaf, and when the first of its
/// certificates (leaf or intermediate) expires.
#[derive(Debug)]
pub struct OwnChain {
    /// The leaf.
    pub leaf: PeerIdentity,
    /// The earliest `notAfter` in the chain.
    pub not_after: SystemTime,
}

impl OwnChain {
    fn of(material: &Material) -> OwnChain {
        OwnChain {
            leaf: material.leaf.clone(),
            not_after: chain_not_after(&material.chain).unwrap_or(material.leaf.not_after),
        }
    }
}

/// Counts the reloads that changed the trust policy; whoever re-checks established connections
/// waits on it ([`LiveServerTls::policy_changes`], [`LiveClientTls::trust_changes`]).
fn policy_counter() -> tokio::sync::watch::Sender<u64> {
    tokio::sync::watch::Sender::new(0)
}

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
    /// Our current chain: read before the configuration a handshake uses, it is never newer than
    /// the chain that handshake presents.
    fn own_chain(&self) -> Arc<OwnChain>;
}

/// The listener's live configuration. The session cache and ticket key survive a reload that keeps
/// the trust policy (CA, CRLs, allowed peers, versions); a change of policy replaces them, so no session
/// or ticket issued under the old policy resumes.
pub struct LiveServerTls {
    config: ArcSwap<ServerConfig>,
    leaf: ArcSwap<PeerIdentity>,
    own: ArcSwap<OwnChain>,
    policy: ArcSwap<ServerPolicy>,
    policy_changes: tokio::sync::watch::Sender<u64>,
    resumption: Mutex<(String, ServerResumption)>,
}

impl LiveServerTls {
    /// The first configuration.
    pub fn new(material: &Material, options: &ServerTlsOptions) -> Result<Self, CertError> {
        let resumption = ServerResumption::new()?;
        let (config, verifier) = build_server_config(material, options, &resumption)?;
        Ok(LiveServerTls {
            config: ArcSwap::new(config),
            leaf: ArcSwap::from_pointee(material.leaf.clone()),
            own: ArcSwap::from_pointee(OwnChain::of(material)),
            policy: ArcSwap::from_pointee(ServerPolicy {
                verifier,
                min_version: options.min_version,
            }),
            policy_changes: policy_counter(),
            resumption: Mutex::new((server_policy(material, options), resumption)),
        })
    }

    /// The configuration new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// Whether the policy now in force refuses a client connection authenticated with `auth`.
    pub fn recheck(&self, auth: &Authenticated) -> Option<Refusal> {
        self.policy.load().recheck(auth)
    }

    /// Changes with every reload that changes the trust policy (CA, CRLs, `allowed_peers`, TLS
    /// versions), after the new policy is in force.
    pub fn policy_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.policy_changes.subscribe()
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
        let (config, verifier) = build_server_config(material, options, kept)?;
        let changed = policy != resumption.0;
        if changed {
            info!("trust policy changed (CA, CRLs, allowed_peers or TLS versions): earlier sessions and tickets no longer resume");
            *resumption = (policy, kept.clone());
        }
        // Our chain before the configuration: a handshake reads them in the other order.
        self.own.store(Arc::new(OwnChain::of(material)));
        self.config.store(config);
        self.leaf.store(Arc::new(material.leaf.clone()));
        self.policy.store(Arc::new(ServerPolicy {
            verifier,
            min_version: options.min_version,
        }));
        if changed {
            self.policy_changes.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    fn leaf(&self) -> Arc<PeerIdentity> {
        self.leaf.load_full()
    }

    fn own_chain(&self) -> Arc<OwnChain> {
        self.own.load_full()
    }
}

/// The client's live configuration; its session cache survives a reload that keeps the CA, the CRLs
/// and our own certificate.
pub struct LiveClientTls {
    config: ArcSwap<ClientConfig>,
    /// The same offering only HTTP/1.1, for requests that upgrade (WebSocket).
    http1: ArcSwap<ClientConfig>,
    leaf: ArcSwap<PeerIdentity>,
    own: ArcSwap<OwnChain>,
    policy: ArcSwap<ClientPolicy>,
    trust_changes: tokio::sync::watch::Sender<u64>,
    trust: Mutex<String>,
    generation: std::sync::atomic::AtomicU64,
}

impl LiveClientTls {
    /// The first configuration.
    pub fn new(material: &Material, options: &ClientTlsOptions) -> Result<Self, CertError> {
        let (config, verifier) = build_client_config(material, options, None)?;
        Ok(LiveClientTls {
            http1: ArcSwap::new(http1_only(&config)),
            config: ArcSwap::new(config),
            leaf: ArcSwap::from_pointee(material.leaf.clone()),
            own: ArcSwap::from_pointee(OwnChain::of(material)),
            policy: ArcSwap::from_pointee(ClientPolicy {
                verifier,
                min_version: options.min_version,
            }),
            trust_changes: policy_counter(),
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

    /// Whether the trust now in force refuses a listener connection authenticated with `auth` for
    /// `name`.
    pub fn recheck(
        &self,
        auth: &Authenticated,
        name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<Refusal> {
        self.policy.load().recheck(auth, name)
    }

    /// Changes with every reload that changes the trust (CA, CRLs, TLS versions), after the new
    /// trust is in force.
    pub fn trust_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.trust_changes.subscribe()
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
        let changed = policy != *trust;
        // A session resumes with the client certificate it began with: one begun with our previous
        // certificate must not carry it past this reload (the listener would see, and close the
        // connection at the end of, the old one).
        let same_leaf = self.leaf.load().sha256 == material.leaf.sha256;
        let keep = (!changed && same_leaf).then(|| self.config.load().resumption.clone());
        let (config, verifier) = build_client_config(material, options, keep)?;
        *trust = policy;
        // Our chain before the configuration: a dial reads them in the other order.
        self.own.store(Arc::new(OwnChain::of(material)));
        self.http1.store(http1_only(&config));
        self.config.store(config);
        self.leaf.store(Arc::new(material.leaf.clone()));
        self.policy.store(Arc::new(ClientPolicy {
            verifier,
            min_version: options.min_version,
        }));
        self.generation.fetch_add(1, Ordering::Release);
        if changed {
            self.trust_changes.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    fn leaf(&self) -> Arc<PeerIdentity> {
        self.leaf.load_full()
    }

    fn own_chain(&self) -> Arc<OwnChain> {
        self.own.load_full()
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
    /// A mismatched pair the watcher saw and has not yet called a failure.
    settling: Settling,
}

/// How long after the watcher first sees a certificate and key that do not match it keeps
/// retrying before it calls the mismatch a failed reload.
///
/// A renewal replaces `cert` and `key` with two renames (Phoenix's post-renewal command is two
/// `mv`s, run back to back), so a poll can fall between them and read the new certificate with the
/// old key. The gap is the writer's: milliseconds, well under a second even on a loaded host, and
/// unrelated to the poll interval. Two seconds covers it many times over, and since the watcher
/// reads the files once more when the window closes, a renewal that really wrote one file only is
/// still reported about two seconds after it was seen, whatever the poll interval.
const MISMATCH_SETTLE: Duration = Duration::from_secs(2);

/// The settle rule for a certificate and key that do not match, seen by the file watcher: within
/// [`MISMATCH_SETTLE`] of the first sighting the pair is taken to be a renewal half-way through its
/// renames and retried at the next poll; after it, the mismatch is a failure like any other. A good
/// pair ends the wait at once, and so does any other error (it is not what a rename leaves behind).
#[derive(Debug, Default)]
struct Settling {
    since: Option<tokio::time::Instant>,
}

/// What to do with a mismatched pair the watcher has just read.
#[derive(Debug, PartialEq, Eq)]
enum Mismatch {
    /// Within the settle time: say nothing, count nothing, read the files again at the next poll.
    Retry,
    /// Past it: a failed reload.
    Fail,
}

impl Settling {
    /// A mismatched pair read at `now`.
    fn mismatch(&mut self, now: tokio::time::Instant) -> Mismatch {
        let since = *self.since.get_or_insert(now);
        if now.saturating_duration_since(since) < MISMATCH_SETTLE {
            Mismatch::Retry
        } else {
            self.since = None;
            Mismatch::Fail
        }
    }

    /// Anything but a mismatch was read (a good pair, or another error): the wait is over.
    fn clear(&mut self) {
        self.since = None;
    }

    /// Whether a mismatch is waiting to be read again.
    fn waiting(&self) -> bool {
        self.since.is_some()
    }

    /// When the waiting mismatch's window closes: the watcher reads the files then, so the
    /// verdict does not wait for a long poll interval.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.since.map(|since| since + MISMATCH_SETTLE)
    }
}

/// What is in service and how the last reload went, as `/certs` shows it.
#[derive(Debug, Clone)]
pub struct ReloadStatus {
    /// What the material in service holds.
    pub inventory: Arc<Inventory>,
    /// When that material was loaded.
    pub loaded_at: SystemTime,
    /// The last reload tried since start, if any.
    pub last_reload: Option<LastReload>,
}

impl ReloadStatus {
    /// Why the material in service is the last good one, kept after a failed reload; `None` when
    /// the last reload (if any) worked.
    pub fn kept_because(&self) -> Option<&str> {
        self.last_reload.as_ref().and_then(|r| r.error.as_deref())
    }
}

/// One reload tried.
#[derive(Debug, Clone)]
pub struct LastReload {
    /// When it ended.
    pub at: SystemTime,
    /// What started it (`SIGHUP`, `certificate files changed`).
    pub trigger: String,
    /// Why it failed, the whole error chain; `None` when it worked.
    pub error: Option<String>,
}

/// Rebuilds a live configuration from its files, on request or when their contents change.
pub struct Reloader<T: LiveTls> {
    live: Arc<T>,
    watch: Mutex<Watch<T::Options>>,
    status: Mutex<ReloadStatus>,
    /// Counters by result.
    pub stats: ReloadStats,
}

impl<T: LiveTls> Reloader<T> {
    /// Watches the files `material` (already in `live`) was loaded from.
    pub fn new(live: Arc<T>, material: &Material, options: T::Options) -> Self {
        let files = material.files.clone();
        let seen = fingerprint(&files);
        Reloader {
            live,
            status: Mutex::new(ReloadStatus {
                inventory: material.inventory.clone(),
                loaded_at: SystemTime::now(),
                last_reload: None,
            }),
            watch: Mutex::new(Watch {
                files,
                options,
                seen,
                last_expiry_warning: None,
                settling: Settling::default(),
            }),
            stats: ReloadStats::default(),
        }
    }

    /// The live configuration.
    pub fn live(&self) -> &Arc<T> {
        &self.live
    }

    /// What is in service and how the last reload went.
    pub fn status(&self) -> ReloadStatus {
        self.status.lock().clone()
    }

    /// Reloads from `files` with `options` now (SIGHUP). On failure the previous material stays in
    /// service and `files` are watched so that their next change is tried again.
    ///
    /// A signal says the files are ready, so a mismatched pair found here fails at once; it also
    /// ends any wait of the watcher's, whose files this reload has just read.
    pub fn reload(&self, files: TlsFiles, options: T::Options, why: &str) -> Result<(), CertError> {
        let mut watch = self.watch.lock();
        watch.seen = fingerprint(&files);
        watch.files = files;
        watch.options = options;
        watch.settling.clear();
        let result = self.load(&watch);
        self.report(&watch, why, result)
    }

    /// Reloads if any watched file's contents changed since the last attempt (rename, in-place
    /// rewrite and symlink swaps alike, since it reads through links). `None` when nothing changed,
    /// and while a certificate and key that do not match are given two seconds from the first
    /// sighting to become a pair (a renewal between its two renames).
    pub fn poll(&self) -> Option<Result<(), CertError>> {
        let mut watch = self.watch.lock();
        self.warn_if_expiring(&mut watch);
        let now = fingerprint(&watch.files);
        // Unchanged files read as before; only a mismatch still settling needs another look, to
        // be called a failure once its time is up.
        if now == watch.seen && !watch.settling.waiting() {
            return None;
        }
        watch.seen = now;
        let why = "certificate files changed";
        let result = self.load(&watch);
        if let Err(error @ CertError::KeyMismatch { .. }) = &result {
            if watch.settling.mismatch(tokio::time::Instant::now()) == Mismatch::Retry {
                debug!(
                    reason = why,
                    error = %error_chain(error),
                    "certificate and key do not match yet; reading them again at the next poll in case a renewal is between its renames"
                );
                return None;
            }
        } else {
            watch.settling.clear();
        }
        Some(self.report(&watch, why, result))
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
            let settle_deadline = self.watch.lock().settling.deadline();
            let settled = async {
                match settle_deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut stop => return,
                _ = ticker.tick() => {}
                () = settled => {}
            }
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.poll()).await;
        }
    }

    /// Loads and checks the files and, when they are good, installs them.
    fn load(&self, watch: &Watch<T::Options>) -> Result<Material, CertError> {
        Material::load(&watch.files, T::ROLE).and_then(|m| {
            self.live.install(&m, &watch.options)?;
            Ok(m)
        })
    }

    /// Counts and logs the outcome of [`Reloader::load`].
    fn report(
        &self,
        watch: &Watch<T::Options>,
        why: &str,
        result: Result<Material, CertError>,
    ) -> Result<(), CertError> {
        let at = SystemTime::now();
        let mut status = self.status.lock();
        match result {
            Ok(material) => {
                *status = ReloadStatus {
                    inventory: material.inventory.clone(),
                    loaded_at: at,
                    last_reload: Some(LastReload {
                        at,
                        trigger: why.to_owned(),
                        error: None,
                    }),
                };
                drop(status);
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
                status.last_reload = Some(LastReload {
                    at,
                    trigger: why.to_owned(),
                    error: Some(error_chain(&error)),
                });
                drop(status);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::time::{advance, sleep, Instant};

    #[tokio::test(start_paused = true)]
    async fn a_mismatch_is_retried_within_the_settle_time_and_fails_after_it() {
        let mut settling = Settling::default();
        assert!(!settling.waiting());
        assert_eq!(settling.deadline(), None);
        let first = Instant::now();
        assert_eq!(settling.mismatch(first), Mismatch::Retry);
        assert_eq!(settling.deadline(), Some(first + MISMATCH_SETTLE));
        advance(MISMATCH_SETTLE / 2).await;
        assert_eq!(settling.mismatch(Instant::now()), Mismatch::Retry);
        advance(MISMATCH_SETTLE / 4).await;
        assert_eq!(
            settling.mismatch(Instant::now()),
            Mismatch::Retry,
            "the window counts from the first sighting, not the latest"
        );
        assert_eq!(settling.deadline(), Some(first + MISMATCH_SETTLE));
        advance(MISMATCH_SETTLE / 4).await;
        assert_eq!(settling.mismatch(Instant::now()), Mismatch::Fail);
        assert!(!settling.waiting(), "a failure is reported once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_good_pair_or_another_error_ends_the_wait_and_the_next_mismatch_waits_afresh() {
        let mut settling = Settling::default();
        assert_eq!(settling.mismatch(Instant::now()), Mismatch::Retry);
        advance(MISMATCH_SETTLE - Duration::from_millis(1)).await;
        settling.clear();
        assert!(!settling.waiting());
        assert_eq!(settling.deadline(), None);
        advance(Duration::from_millis(1)).await;
        // The next renewal's first rename: a new window, not the end of the old one.
        assert_eq!(settling.mismatch(Instant::now()), Mismatch::Retry);
        advance(MISMATCH_SETTLE - Duration::from_millis(1)).await;
        assert_eq!(settling.mismatch(Instant::now()), Mismatch::Retry);
        advance(Duration::from_millis(1)).await;
        assert_eq!(settling.mismatch(Instant::now()), Mismatch::Fail);
    }

    /// The watcher itself, on a paused clock with an hour between polls: a certificate whose key
    /// never comes is called a failure when its settle window closes, not an hour later at the
    /// next poll; a key that comes within the window makes a plain success.
    #[cfg(feature = "pki-gen")]
    #[tokio::test(start_paused = true)]
    async fn the_watcher_reads_a_mismatch_again_when_its_window_closes() {
        use crate::pki::{LeafSpec, Pki};
        use crate::{LiveServerTls, ServerTlsOptions};
        const POLL: Duration = Duration::from_secs(3600);

        let pki = Pki::new("settle test").unwrap();
        let issue = || {
            pki.issue(&LeafSpec::new("listener.test", Duration::from_secs(86_400)))
                .unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            ca: dir.path().join("ca.pem"),
            crls: Vec::new(),
        };
        let rename_over = |path: &std::path::Path, data: &str| {
            let new = path.with_extension("new");
            fs::write(&new, data).unwrap();
            fs::rename(&new, path).unwrap();
        };
        let first = issue();
        rename_over(&files.cert, &first.chain_pem);
        rename_over(&files.key, &first.key_pem);
        rename_over(&files.ca, pki.root_pem());
        let options = ServerTlsOptions::default();
        let material = Material::load(&files, Role::Server).unwrap();
        let live = Arc::new(LiveServerTls::new(&material, &options).unwrap());
        let reloader = Arc::new(Reloader::new(live, &material, options));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(reloader.clone().watch_files(POLL, async move {
            let _ = stopped.await;
        }));
        let counts = || {
            let stats = &reloader.stats;
            (
                stats.succeeded.load(Ordering::Relaxed),
                stats.failed.load(Ordering::Relaxed),
            )
        };
        let serving = || reloader.live().leaf().sha256.clone();
        let sha256 = |der: &[u8]| crate::provider::sha256_hex(der);

        // Polls fall at POLL, 2 POLL, 3 POLL from here.
        let second = issue();
        rename_over(&files.cert, &second.chain_pem);
        sleep(POLL + MISMATCH_SETTLE / 2).await;
        assert_eq!(
            counts(),
            (0, 0),
            "seen at the first poll, and still settling"
        );
        sleep(MISMATCH_SETTLE).await;
        assert_eq!(counts(), (0, 1), "a failure once the window closed");
        assert_eq!(serving(), sha256(&first.der), "the last good pair stays");

        rename_over(&files.key, &second.key_pem);
        sleep(POLL).await;
        assert_eq!(counts(), (1, 1), "its key, read at the second poll");
        assert_eq!(serving(), sha256(&second.der));

        // Now 2 POLL + 3 s: the next renewal's certificate, read alone at the third poll, then
        // its key inside the window.
        let third = issue();
        rename_over(&files.cert, &third.chain_pem);
        sleep(POLL - Duration::from_secs(2)).await;
        assert_eq!(counts(), (1, 1), "settling");
        rename_over(&files.key, &third.key_pem);
        sleep(MISMATCH_SETTLE).await;
        assert_eq!(
            counts(),
            (2, 1),
            "a renewal between its renames is no failure"
        );
        assert_eq!(serving(), sha256(&third.der));

        stop.send(()).unwrap();
        watcher.await.unwrap();
    }

    /// The status `/certs` shows: what is in service (chain, anchors, CRLs as loaded), and after a
    /// botched renewal the last good material with the reason it is kept, until a good one applies.
    #[cfg(feature = "pki-gen")]
    #[test]
    fn the_status_names_the_material_in_service_and_why_a_last_good_one_is_kept() {
        use crate::pki::{LeafSpec, Pki};
        use crate::{LiveServerTls, ServerTlsOptions};

        // The DER integer's bytes in lowercase hex.
        let serial = |n: u64| {
            let hex = format!("{n:x}");
            if hex.len() % 2 == 1 {
                format!("0{hex}")
            } else {
                hex
            }
        };
        let pki = Pki::new("status test").unwrap();
        let issue = || {
            pki.issue(&LeafSpec::new("listener.test", Duration::from_secs(86_400)))
                .unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            ca: dir.path().join("ca.pem"),
            crls: vec![dir.path().join("crl.pem")],
        };
        let first = issue();
        fs::write(&files.cert, &first.chain_pem).unwrap();
        fs::write(&files.key, &first.key_pem).unwrap();
        fs::write(&files.ca, pki.root_pem()).unwrap();
        fs::write(&files.crls[0], pki.crl(&[7, 9]).unwrap()).unwrap();
        let options = ServerTlsOptions::default();
        let material = Material::load(&files, Role::Server).unwrap();
        let live = Arc::new(LiveServerTls::new(&material, &options).unwrap());
        let reloader = Reloader::new(live, &material, options.clone());

        let status = reloader.status();
        assert!(status.last_reload.is_none() && status.kept_because().is_none());
        let inventory = &status.inventory;
        assert_eq!(inventory.chain.len(), 2, "leaf and intermediate");
        assert_eq!(inventory.chain[0].serial, serial(first.serial));
        assert_eq!(inventory.chain[0].dns, ["listener.test"]);
        assert_eq!(inventory.chain[0].issuer, inventory.chain[1].subject);
        assert_eq!(inventory.trust_anchors.len(), 1);
        assert_eq!(
            inventory.chain[1].issuer,
            inventory.trust_anchors[0].subject
        );
        let crl = &inventory.crls[0];
        assert_eq!(
            (crl.file.as_path(), crl.entries),
            (files.crls[0].as_path(), 2)
        );
        assert_eq!(crl.issuer, inventory.chain[1].subject);
        assert!(crl.number.is_some() && crl.next_update > Some(crl.this_update));
        let loaded_at = status.loaded_at;

        fs::write(&files.cert, "garbage\n").unwrap();
        assert!(reloader
            .reload(files.clone(), options.clone(), "SIGHUP")
            .is_err());
        let status = reloader.status();
        assert_eq!(status.inventory.chain[0].serial, serial(first.serial));
        assert_eq!(status.loaded_at, loaded_at, "the last good material stays");
        let why = status.kept_because().unwrap();
        assert!(why.contains("cert.pem"), "{why}");
        assert_eq!(status.last_reload.as_ref().unwrap().trigger, "SIGHUP");

        let second = issue();
        fs::write(&files.cert, &second.chain_pem).unwrap();
        fs::write(&files.key, &second.key_pem).unwrap();
        assert!(reloader.reload(files, options, "SIGHUP").is_ok());
        let status = reloader.status();
        assert_eq!(status.inventory.chain[0].serial, serial(second.serial));
        assert!(status.kept_because().is_none());
        assert!(status.loaded_at >= loaded_at);
    }
}
