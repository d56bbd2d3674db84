//! The listener's config file (flat TOML keys) and its validated settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use phoenix_mesh_certs::{TlsFiles, TlsVersion};
use phoenix_mesh_common::config::{read_toml, resolve, ConfigDuration, ConfigError};
use phoenix_mesh_common::serve::HttpOptions;
use serde::Deserialize;

/// The file as written; every key is documented in the README.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    listen: String,
    backend: String,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    #[serde(default)]
    crls: Vec<PathBuf>,
    #[serde(default)]
    allowed_peers: Option<Vec<String>>,
    #[serde(default)]
    admin_listen: Option<String>,
    #[serde(default)]
    min_tls_version: Option<String>,
    #[serde(default)]
    handshake_timeout: Option<ConfigDuration>,
    #[serde(default)]
    header_read_timeout: Option<ConfigDuration>,
    #[serde(default)]
    backend_connect_timeout: Option<ConfigDuration>,
    #[serde(default)]
    backend_timeout: Option<ConfigDuration>,
    #[serde(default)]
    max_header_bytes: Option<usize>,
    #[serde(default)]
    drain_timeout: Option<ConfigDuration>,
    #[serde(default)]
    reload_poll_interval: Option<ConfigDuration>,
    #[serde(default)]
    access_log: bool,
    #[serde(default)]
    max_connections: Option<usize>,
}

/// Validated listener settings, with paths resolved against the config file.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Where the config came from.
    pub path: PathBuf,
    /// TLS address to listen on.
    pub listen: SocketAddr,
    /// Traefik's plain-HTTP entrypoint.
    pub backend: SocketAddr,
    /// Certificate, key, CA and CRL files.
    pub tls: TlsFiles,
    /// Allowed client identities; empty means any certificate chaining to `ca`.
    pub allowed_peers: Vec<String>,
    /// Loopback address of the admin endpoint.
    pub admin_listen: Option<SocketAddr>,
    /// Lowest TLS version.
    pub min_tls_version: TlsVersion,
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// HTTP limits for requests arriving over TLS.
    pub http: HttpOptions,
    /// Longest a TCP connect to the backend may take.
    pub backend_connect_timeout: Duration,
    /// Longest the backend may take to start its response.
    pub backend_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
    /// How often the certificate, key, CA and CRL files are checked for changes.
    pub reload_poll_interval: Duration,
    /// Write one structured log line per request.
    pub access_log: bool,
    /// Most connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
}

impl ServerSettings {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file: ServerFile = read_toml(path)?;
        Self::from_file(path, file)
    }

    fn from_file(path: &Path, f: ServerFile) -> Result<Self, ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let listen: SocketAddr = f.listen.parse().map_err(|_| {
            invalid(
                "listen",
                format!("{:?} is not an ip:port address", f.listen),
            )
        })?;
        let backend: SocketAddr = f.backend.parse().map_err(|_| {
            invalid(
                "backend",
                format!("{:?} is not an ip:port address", f.backend),
            )
        })?;
        let admin_listen = match f.admin_listen {
            None => None,
            Some(a) => {
                let addr: SocketAddr = a.parse().map_err(|_| {
                    invalid("admin_listen", format!("{a:?} is not an ip:port address"))
                })?;
                if !addr.ip().is_loopback() {
                    return Err(invalid(
                        "admin_listen",
                        format!("{addr} is not a loopback address"),
                    ));
                }
                Some(addr)
            }
        };
        let allowed_peers = f.allowed_peers.unwrap_or_default();
        if allowed_peers.iter().any(|p| p.trim().is_empty()) {
            return Err(invalid("allowed_peers", "an entry is empty".into()));
        }
        let min_tls_version = f
            .min_tls_version
            .as_deref()
            .map_or(Ok(TlsVersion::default()), str::parse)
            .map_err(|m| invalid("min_tls_version", m))?;
        let max_header_bytes = f.max_header_bytes.unwrap_or(64 * 1024);
        if max_header_bytes < 8192 {
            return Err(invalid(
                "max_header_bytes",
                format!("{max_header_bytes} is below the 8192-byte minimum"),
            ));
        }
        let d = |v: Option<ConfigDuration>, default: u64| {
            v.map_or(Duration::from_secs(default), |d| d.0)
        };
        Ok(ServerSettings {
            path: path.to_owned(),
            listen,
            backend,
            tls: TlsFiles {
                cert: resolve(path, &f.cert),
                key: resolve(path, &f.key),
                ca: resolve(path, &f.ca),
                crls: f.crls.iter().map(|c| resolve(path, c)).collect(),
            },
            allowed_peers,
            admin_listen,
            min_tls_version,
            handshake_timeout: d(f.handshake_timeout, 10),
            http: HttpOptions {
                header_read_timeout: d(f.header_read_timeout, 30),
                max_header_bytes,
                ..HttpOptions::default()
            },
            backend_connect_timeout: d(f.backend_connect_timeout, 5),
            backend_timeout: d(f.backend_timeout, 60),
            drain_timeout: d(f.drain_timeout, 30),
            reload_poll_interval: d(f.reload_poll_interval, 10),
            access_log: f.access_log,
            max_connections: match f.max_connections {
                Some(0) => return Err(invalid("max_connections", "must be at least 1".into())),
                Some(n) => n,
                None => 10_000,
            },
        })
    }
}
