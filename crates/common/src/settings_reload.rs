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
