//! SIGHUP: re-read the config file and apply what can change live (the TLS material, CRLs,
//! `allowed_peers`, the TLS version floor); say which other changes wait for a restart.

use std::sync::{Arc, Mutex};

use phoenix_mesh_certs::{error_chain, LiveServerTls, Reloader, ServerTlsOptions};
use tracing::warn;

use crate::ServerSettings;

/// Applies the config file to a running listener.
pub struct SettingsReload {
    current: Mutex<ServerSettings>,
    reloader: Arc<Reloader<LiveServerTls>>,
}

impl SettingsReload {
    /// For a listener started with `settings`.
    pub fn new(settings: ServerSettings, reloader: Arc<Reloader<LiveServerTls>>) -> Self {
        SettingsReload {
            current: Mutex::new(settings),
            reloader,
        }
    }

    /// Re-reads the config file and applies it; on any error the running configuration stays.
    pub fn reload(&self) -> Result<(), String> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let new = match ServerSettings::load(&current.path) {
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
        let ignored = restart_only_changes(&current, &new);
        if !ignored.is_empty() {
            warn!(keys = ?ignored, "these settings change only at restart; ignored until then");
        }
        let options = ServerTlsOptions {
            allowed_peers: new.allowed_peers.clone(),
            min_version: new.min_tls_version,
        };
        let result = self.reloader.reload(new.tls.clone(), options, "SIGHUP");
        // Remember what was asked for, so a later SIGHUP compares against it.
        current.tls = new.tls;
        current.allowed_peers = new.allowed_peers;
        current.min_tls_version = new.min_tls_version;
        result.map_err(|e| error_chain(&e))
    }
}

fn restart_only_changes(old: &ServerSettings, new: &ServerSettings) -> Vec<&'static str> {
    let pairs: [(&'static str, String, String); 8] = [
        ("listen", old.listen.to_string(), new.listen.to_string()),
        ("backend", old.backend.to_string(), new.backend.to_string()),
        (
            "admin_listen",
            format!("{:?}", old.admin_listen),
            format!("{:?}", new.admin_listen),
        ),
        (
            "handshake_timeout",
            format!("{:?}", old.handshake_timeout),
            format!("{:?}", new.handshake_timeout),
        ),
        (
            "header_read_timeout / max_header_bytes",
            format!("{:?}", old.http),
            format!("{:?}", new.http),
        ),
        (
            "backend_connect_timeout / backend_timeout",
            format!("{:?}{:?}", old.backend_connect_timeout, old.backend_timeout),
            format!("{:?}{:?}", new.backend_connect_timeout, new.backend_timeout),
        ),
        (
            "drain_timeout",
            format!("{:?}", old.drain_timeout),
            format!("{:?}", new.drain_timeout),
        ),
        (
            "reload_poll_interval",
            format!("{:?}", old.reload_poll_interval),
            format!("{:?}", new.reload_poll_interval),
        ),
    ];
    pairs
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(k, _, _)| k)
        .collect()
}
