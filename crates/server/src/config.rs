//! The listener's config file (flat TOML keys) and its validated settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use phoenix_mesh_certs::{LiveServerTls, ServerTlsOptions};
use phoenix_mesh_common::config::{ConfigDuration, ConfigError};
use phoenix_mesh_common::settings::{
    invalid, or_secs, read_config, socket_addr, SharedSettings, SideSettings,
};
use serde::Deserialize;

use crate::identity_headers::{IdentityHeaders, IDENTITY_HEADER_CHOICES};

/// The listener's own keys, as written (the shared ones are in [`SharedSettings`]); every key is
/// documented in docs/configuration.md.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    listen: String,
    backend: String,
    #[serde(default)]
    allowed_peers: Option<Vec<String>>,
    #[serde(default)]
    backend_connect_timeout: Option<ConfigDuration>,
    #[serde(default)]
    backend_timeout: Option<ConfigDuration>,
    #[serde(default)]
    backend_http2: Option<bool>,
    #[serde(default)]
    identity_headers: Option<Vec<String>>,
}

/// Validated listener settings, with paths resolved against the config file.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Where the config came from.
    pub path: PathBuf,
    /// The keys both sides share: TLS files, admin endpoint, limits, timeouts.
    pub shared: SharedSettings,
    /// TLS address to listen on.
    pub listen: SocketAddr,
    /// Traefik's plain-HTTP entrypoint.
    pub backend: SocketAddr,
    /// Allowed client identities; empty means any certificate chaining to `ca`.
    pub allowed_peers: Vec<String>,
    /// Longest a TCP connect to the backend may take.
    pub backend_connect_timeout: Duration,
    /// Longest the backend may take to start its response.
    pub backend_timeout: Duration,
    /// Requests (but upgrades) go to the backend on one shared HTTP/2 cleartext connection.
    pub backend_http2: bool,
    /// Which identity headers the backend gets.
    pub identity_headers: IdentityHeaders,
}

impl ServerSettings {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (shared, f): (SharedSettings, ServerFile) = read_config(path)?;
        let allowed_peers = f.allowed_peers.unwrap_or_default();
        if allowed_peers.iter().any(|p| p.trim().is_empty()) {
            return Err(invalid(path, "allowed_peers", "an entry is empty".into()));
        }
        let identity_headers = match &f.identity_headers {
            None => IdentityHeaders::default(),
            Some(names) => IdentityHeaders::from_names(names.iter().map(String::as_str)).map_err(
                |unknown| {
                    invalid(
                        path,
                        "identity_headers",
                        format!(
                            "{unknown:?} is not an identity header; the choices are {}",
                            IDENTITY_HEADER_CHOICES
                                .map(|c| format!("{c:?}"))
                                .join(" and ")
                        ),
                    )
                },
            )?,
        };
        Ok(ServerSettings {
            path: path.to_owned(),
            identity_headers,
            shared,
            listen: socket_addr(path, "listen", &f.listen)?,
            backend: socket_addr(path, "backend", &f.backend)?,
            allowed_peers,
            backend_connect_timeout: or_secs(f.backend_connect_timeout, 5),
            backend_timeout: or_secs(f.backend_timeout, 60),
            backend_http2: f.backend_http2.unwrap_or(false),
        })
    }
}

impl SideSettings for ServerSettings {
    type Tls = LiveServerTls;

    fn load(path: &Path) -> Result<Self, ConfigError> {
        ServerSettings::load(path)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn shared(&self) -> &SharedSettings {
        &self.shared
    }

    fn tls_options(&self) -> ServerTlsOptions {
        ServerTlsOptions {
            allowed_peers: self.allowed_peers.clone(),
            min_version: self.shared.min_tls_version,
        }
    }

    fn restart_only(&self) -> Vec<(&'static str, String)> {
        vec![
            ("listen", self.listen.to_string()),
            ("backend", self.backend.to_string()),
            ("backend_http2", self.backend_http2.to_string()),
            (
                "identity_headers",
                format!("{:?}", self.identity_headers.names()),
            ),
            (
                "backend_connect_timeout / backend_timeout",
                format!(
                    "{:?} {:?}",
                    self.backend_connect_timeout, self.backend_timeout
                ),
            ),
        ]
    }

    fn apply_live(&mut self, new: &Self) {
        self.shared.tls = new.shared.tls.clone();
        self.shared.min_tls_version = new.shared.min_tls_version;
        self.allowed_peers = new.allowed_peers.clone();
    }
}
