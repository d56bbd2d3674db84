//! SIGHUP: re-read the config file and apply what can change live (the TLS material, CRLs,
//! the TLS version floor); say which other changes wait for a restart.

use std::sync::{Arc, Mutex};

use phoenix_mesh_certs::{error_chain, ClientTlsOptions, LiveClientTls, Reloader};
use tracing::warn;

use crate::ClientSettings;

/// Applies the config file to a running client sidecar.
pub struct SettingsReload {
    current: Mutex<ClientSettings>,
    reloader: Arc<Reloader<LiveClientTls>>,
}

impl SettingsReload {
    /// For a client started with `settings`.
    pub fn new(settings: ClientSettings, reloader: Arc<Reloader<LiveClientTls>>) -> Self {
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
        let new = match ClientSettings::load(&current.path) {
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
        let options = ClientTlsOptions {
            min_version: new.min_tls_version,
            http2: current.upstream_http2,
        };
        let result = self.reloader.reload(new.tls.clone(), options, "SIGHUP");
        // Remember what was asked for, so a later SIGHUP compares against it.
        current.tls = new.tls;
        current.min_tls_version = new.min_tls_version;
        result.map_err(|e| error_chain(&e))
    }
}

fn restart_only_changes(old: &ClientSettings, new: &ClientSettings) -> Vec<&'static str> {
    let pairs: [(&'static str, String, String); 9] = [
        ("listen", old.listen.to_string(), new.listen.to_string()),
        (
            "upstreams",
            format!("{:?}", old.upstreams),
            format!("{:?}", new.upstreams),
        ),
        (
            "server_name",
            old.server_name.clone(),
            new.server_name.clone(),
        ),
        (
            "admin_listen",
            format!("{:?}", old.admin_listen),
            format!("{:?}", new.admin_listen),
        ),
        (
            "upstream_http2",
            old.upstream_http2.to_string(),
            new.upstream_http2.to_string(),
        ),
        (
            "connect_timeout / handshake_timeout / upstream_timeout / pool_idle_timeout",
            format!(
                "{:?}{:?}{:?}{:?}",
                old.connect_timeout,
                old.handshake_timeout,
                old.upstream_timeout,
                old.pool_idle_timeout
            ),
            format!(
                "{:?}{:?}{:?}{:?}",
                new.connect_timeout,
                new.handshake_timeout,
                new.upstream_timeout,
                new.pool_idle_timeout
            ),
        ),
        (
            "header_read_timeout / max_header_bytes",
            format!("{:?}", old.http),
            format!("{:?}", new.http),
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
