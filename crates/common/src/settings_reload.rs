//! SIGHUP: re-reading a side's config file and applying what can change live (TLS files, trust
//! policy); what cannot is named in a warning and waits for a restart. On any error the running
//! configuration stays.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use phoenix_mesh_certs::{error_chain, CertError, Reloader};
use tracing::warn;

use crate::config::ConfigError;
use crate::settings::SideSettings;

/// Why a SIGHUP reload left the running configuration in place.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The config file could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS files it names could not be loaded.
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// SIGHUP: re-reads the config file and applies what can change live; says which other changes
/// wait for a restart.
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
    pub fn reload(&self) -> Result<(), ReloadError> {
        let mut current = self.current.lock();
        let new = match S::load(current.path()) {
            Ok(new) => new,
            Err(error) => {
                self.reloader.stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!(error = %error_chain(&error), "config reload failed; keeping the running configuration");
                return Err(error.into());
            }
        };
        let ignored = changed_keys(&*current, &new);
        if !ignored.is_empty() {
            warn!(keys = ?ignored, "these settings change only at restart; ignored until then");
        }
        // Remember what was asked for even if it fails, so the next change of the files is tried.
        current.apply_live(&new);
        self.reloader.reload(
            current.shared().tls.clone(),
            current.tls_options(),
            "SIGHUP",
        )?;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use phoenix_mesh_certs::{LiveServerTls, ServerTlsOptions, TlsFiles, TlsVersion};
    use phoenix_mesh_transport::serve::HttpOptions;

    use crate::settings::SharedSettings;

    /// A side with one key of its own that changes only at restart.
    #[derive(Clone)]
    struct Side {
        shared: SharedSettings,
        backend: u16,
    }

    impl SideSettings for Side {
        type Tls = LiveServerTls;

        fn load(path: &Path) -> Result<Self, ConfigError> {
            Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "not read in this test".into(),
            })
        }

        fn path(&self) -> &Path {
            Path::new("/etc/side.toml")
        }

        fn shared(&self) -> &SharedSettings {
            &self.shared
        }

        fn tls_options(&self) -> ServerTlsOptions {
            ServerTlsOptions::default()
        }

        fn restart_only(&self) -> Vec<(&'static str, String)> {
            vec![("backend", self.backend.to_string())]
        }

        fn apply_live(&mut self, new: &Self) {
            self.shared.tls = new.shared.tls.clone();
        }
    }

    fn side() -> Side {
        Side {
            shared: SharedSettings {
                tls: TlsFiles {
                    cert: PathBuf::from("/c"),
                    key: PathBuf::from("/k"),
                    ca: PathBuf::from("/ca"),
                    crls: Vec::new(),
                },
                admin_listen: None,
                min_tls_version: TlsVersion::Tls13,
                handshake_timeout: Duration::from_secs(10),
                http: HttpOptions::default(),
                max_connections: 10,
                drain_timeout: Duration::from_secs(30),
                reload_poll_interval: Duration::from_secs(10),
                access_log: false,
                worker_threads: 1,
                allowed_upgrades: crate::headers::AllowedUpgrades::default(),
            },
            backend: 80,
        }
    }

    #[test]
    fn restart_only_changes_are_named_and_live_ones_are_not() {
        let old = side();
        let mut new = side();
        assert!(changed_keys(&old, &new).is_empty());
        new.shared.tls.cert = PathBuf::from("/renewed");
        assert!(changed_keys(&old, &new).is_empty(), "TLS files apply live");
        new.backend = 81;
        new.shared.max_connections = 20;
        new.shared.drain_timeout = Duration::from_secs(5);
        assert_eq!(
            changed_keys(&old, &new),
            ["backend", "max_connections", "drain_timeout"]
        );
    }
}
