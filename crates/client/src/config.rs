//! The client's config file (flat TOML keys) and its validated settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use phoenix_mesh_certs::{TlsFiles, TlsVersion};
use phoenix_mesh_common::config::{read_toml, resolve, ConfigDuration, ConfigError};
use phoenix_mesh_common::serve::HttpOptions;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    listen: String,
    upstreams: Vec<String>,
    #[serde(default)]
    server_name: Option<String>,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    #[serde(default)]
    crls: Vec<PathBuf>,
    #[serde(default)]
    admin_listen: Option<String>,
    #[serde(default)]
    allow_public_listen: bool,
    #[serde(default)]
    min_tls_version: Option<String>,
    #[serde(default)]
    connect_timeout: Option<ConfigDuration>,
    #[serde(default)]
    handshake_timeout: Option<ConfigDuration>,
    #[serde(default)]
    header_read_timeout: Option<ConfigDuration>,
    #[serde(default)]
    upstream_timeout: Option<ConfigDuration>,
    #[serde(default)]
    pool_idle_timeout: Option<ConfigDuration>,
    #[serde(default)]
    upstream_http2: Option<bool>,
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

/// Validated client settings, with paths resolved against the config file.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Where the config came from.
    pub path: PathBuf,
    /// Loopback address nginx sends plain HTTP to.
    pub listen: SocketAddr,
    /// Mesh listeners, `host:port`, tried round-robin.
    pub upstreams: Vec<String>,
    /// Name (or IP) the listener's certificate must carry; also the SNI.
    pub server_name: String,
    /// Certificate, key, CA and CRL files.
    pub tls: TlsFiles,
    /// Loopback address of the admin endpoint.
    pub admin_listen: Option<SocketAddr>,
    /// Lowest TLS version.
    pub min_tls_version: TlsVersion,
    /// Longest a TCP connect to an upstream may take.
    pub connect_timeout: Duration,
    /// Longest a TLS handshake with an upstream may take.
    pub handshake_timeout: Duration,
    /// Longest the listener may take to start its response.
    pub upstream_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Whether to offer HTTP/2 on the mesh link.
    pub upstream_http2: bool,
    /// HTTP limits for requests from nginx.
    pub http: HttpOptions,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
    /// How often the certificate, key, CA and CRL files are checked for changes.
    pub reload_poll_interval: Duration,
    /// Write one structured log line per request.
    pub access_log: bool,
    /// Most connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
}

impl ClientSettings {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file: ClientFile = read_toml(path)?;
        Self::from_file(path, file)
    }

    fn from_file(path: &Path, f: ClientFile) -> Result<Self, ConfigError> {
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
        if !listen.ip().is_loopback() && !f.allow_public_listen {
            return Err(invalid(
                "listen",
                format!(
                    "{listen} is not a loopback address: the client's plain-HTTP port would let anyone who can \
                     reach it into the mesh with the gateway's identity. Listen on 127.0.0.1, or set \
                     allow_public_listen = true if that is really wanted"
                ),
            ));
        }
        if f.upstreams.is_empty() {
            return Err(invalid(
                "upstreams",
                "at least one mesh listener (host:port) is needed".into(),
            ));
        }
        for upstream in &f.upstreams {
            split_host_port(upstream).ok_or_else(|| {
                invalid(
                    "upstreams",
                    format!("{upstream:?} is not host:port (e.g. \"10.0.0.12:8443\")"),
                )
            })?;
        }
        let server_name = match f.server_name {
            Some(name) if name.trim().is_empty() => {
                return Err(invalid("server_name", "is empty".into()))
            }
            Some(name) => name,
            None => split_host_port(&f.upstreams[0])
                .map(|(h, _)| h.to_owned())
                .unwrap_or_default(),
        };
        rustls::pki_types::ServerName::try_from(server_name.as_str())
            .map_err(|e| invalid("server_name", format!("{server_name:?}: {e}")))?;
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
        Ok(ClientSettings {
            path: path.to_owned(),
            listen,
            upstreams: f.upstreams,
            server_name,
            tls: TlsFiles {
                cert: resolve(path, &f.cert),
                key: resolve(path, &f.key),
                ca: resolve(path, &f.ca),
                crls: f.crls.iter().map(|c| resolve(path, c)).collect(),
            },
            admin_listen,
            min_tls_version,
            connect_timeout: d(f.connect_timeout, 5),
            handshake_timeout: d(f.handshake_timeout, 10),
            upstream_timeout: d(f.upstream_timeout, 65),
            pool_idle_timeout: d(f.pool_idle_timeout, 90),
            upstream_http2: f.upstream_http2.unwrap_or(true),
            http: HttpOptions {
                header_read_timeout: d(f.header_read_timeout, 30),
                max_header_bytes,
                ..HttpOptions::default()
            },
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

/// `"host:port"` or `"[v6]:port"` into host (without brackets) and port.
pub(crate) fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some((host, port))
}
