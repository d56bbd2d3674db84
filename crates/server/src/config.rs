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
    max_backend_connections: Option<usize>,
    #[serde(default)]
    identity_headers: Option<Vec<String>>,
    max_pending_handshakes: Option<usize>,
}

/// Connections to the backend open at once unless `max_backend_connections` says otherwise: four mesh
/// links' worth of concurrent requests (256 streams each), so a legitimate deployment never queues,
/// while a client that holds responses unread pins no more sockets than this on the backend.
pub const DEFAULT_MAX_BACKEND_CONNECTIONS: usize = 1024;

/// `max_pending_handshakes` when the file does not say: far more handshakes than the mesh's clients
/// ever start at once (each finishes in a millisecond or two), and few enough that a stranger's
/// silent connections cost the listener at most this many sockets.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1000;

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
    /// Most HTTP/1.1 connections to the backend open at once (upgraded ones included).
    pub max_backend_connections: usize,
    /// Which identity headers the backend gets.
    pub identity_headers: IdentityHeaders,
    /// Connections accepted whose TLS handshake has not finished, at most; past it the oldest is
    /// dropped. They do not count against `max_connections`.
    pub max_pending_handshakes: usize,
}

impl ServerSettings {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (shared, f): (SharedSettings, ServerFile) = read_config(path)?;
        let allowed_peers = f.allowed_peers.unwrap_or_default();
        if allowed_peers.iter().any(|p| p.trim().is_empty()) {
            return Err(invalid(path, "allowed_peers", "an entry is empty".into()));
        }
        let max_backend_connections = match f.max_backend_connections {
            Some(0) => {
                return Err(invalid(
                    path,
                    "max_backend_connections",
                    "must be at least 1".into(),
                ))
            }
            Some(n) => n,
            None => DEFAULT_MAX_BACKEND_CONNECTIONS,
        };
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
        let max_pending_handshakes = match f.max_pending_handshakes {
            None => DEFAULT_MAX_PENDING_HANDSHAKES,
            Some(0) => {
                return Err(invalid(
                    path,
                    "max_pending_handshakes",
                    "must be at least 1".into(),
                ))
            }
            Some(n) => n,
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
            max_backend_connections,
            max_pending_handshakes,
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
                "max_backend_connections",
                self.max_backend_connections.to_string(),
            ),
            (
                "identity_headers",
                format!("{:?}", self.identity_headers.names()),
            ),
            (
                "max_pending_handshakes",
                self.max_pending_handshakes.to_string(),
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

impl ServerSettings {
    /// A warning when `backend_connect_timeout` is not below `backend_timeout`: a request queued for
    /// a backend connection (`max_backend_connections`) waits up to the first, the response head
    /// up to the second, so the queue's clear `503 backend-connection-limit` would never come and
    /// the request would end as a `504 backend-timeout` instead.
    pub fn timeout_order_warning(&self) -> Option<String> {
        (self.backend_connect_timeout >= self.backend_timeout).then(|| {
            format!(
                "backend_connect_timeout ({:?}) is not below backend_timeout ({:?}): a request \
                 waiting for one of the max_backend_connections ({}) ends as 504 backend-timeout \
                 before it could get 503 backend-connection-limit",
                self.backend_connect_timeout, self.backend_timeout, self.max_backend_connections
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(tag: &str, extra: &str) -> Result<ServerSettings, ConfigError> {
        let path = std::env::temp_dir().join(format!(
            "phoenix-mesh-server-config-{}-{tag}.toml",
            std::process::id()
        ));
        let text = format!(
            "listen = \"127.0.0.1:8443\"\nbackend = \"127.0.0.1:8081\"\n\
             cert = \"a.crt\"\nkey = \"a.key\"\nca = \"ca.crt\"\n{extra}"
        );
        std::fs::write(&path, text).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let loaded = ServerSettings::load(&path);
        let _ = std::fs::remove_file(&path);
        loaded
    }

    #[test]
    fn max_backend_connections_defaults_to_1024_and_refuses_zero() {
        let default = load("default", "").map(|s| s.max_backend_connections);
        assert!(
            matches!(default, Ok(DEFAULT_MAX_BACKEND_CONNECTIONS)),
            "{default:?}"
        );
        let set = load("set", "max_backend_connections = 3\n").map(|s| s.max_backend_connections);
        assert!(matches!(set, Ok(3)), "{set:?}");
        let zero = load("zero", "max_backend_connections = 0\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(zero.contains("max_backend_connections"), "{zero}");
    }

    #[test]
    fn a_connect_timeout_not_below_the_backend_timeout_is_warned_about() {
        let default = load("order-default", "").map(|s| s.timeout_order_warning());
        assert!(matches!(default, Ok(None)), "{default:?}");
        let equal = load(
            "order-equal",
            "backend_connect_timeout = \"30s\"\nbackend_timeout = \"30s\"\n",
        )
        .ok()
        .and_then(|s| s.timeout_order_warning())
        .unwrap_or_default();
        assert!(
            equal.contains("backend_connect_timeout (30s)")
                && equal.contains("504 backend-timeout"),
            "{equal}"
        );
    }
}
