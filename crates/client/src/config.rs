//! The client's config file (flat TOML keys) and its validated settings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use phoenix_mesh_certs::{ClientTlsOptions, LiveClientTls};
use phoenix_mesh_common::config::{ConfigDuration, ConfigError};
use phoenix_mesh_common::settings::{invalid, or_secs, read_config, SharedSettings, SideSettings};
use serde::Deserialize;

use crate::listen::ListenAddr;

/// The client's own keys, as written (the shared ones are in [`SharedSettings`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    listen: String,
    #[serde(default)]
    listen_mode: Option<String>,
    #[serde(default)]
    listen_group: Option<String>,
    upstreams: Vec<String>,
    #[serde(default)]
    server_name: Option<String>,
    #[serde(default)]
    allow_public_listen: bool,
    #[serde(default)]
    connect_timeout: Option<ConfigDuration>,
    #[serde(default)]
    upstream_timeout: Option<ConfigDuration>,
    #[serde(default)]
    pool_idle_timeout: Option<ConfigDuration>,
    #[serde(default)]
    upstream_http2: Option<bool>,
}

/// Validated client settings, with paths resolved against the config file.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Where the config came from.
    pub path: PathBuf,
    /// The keys both sides share: TLS files, admin endpoint, limits, timeouts.
    pub shared: SharedSettings,
    /// Where nginx sends plain HTTP: a loopback address, or a unix socket.
    pub listen: ListenAddr,
    /// Mesh listeners, `host:port`, tried round-robin.
    pub upstreams: Vec<String>,
    /// Name (or IP) the listener's certificate must carry; also the SNI.
    pub server_name: String,
    /// Longest a TCP connect to an upstream may take.
    pub connect_timeout: Duration,
    /// Longest the listener may take to start its response.
    pub upstream_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Whether to offer HTTP/2 on the mesh link.
    pub upstream_http2: bool,
}

impl ClientSettings {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (shared, f): (SharedSettings, ClientFile) = read_config(path)?;
        let listen = ListenAddr::parse(
            path,
            &f.listen,
            f.listen_mode.as_deref(),
            f.listen_group.as_deref(),
        )?;
        let public = matches!(listen, ListenAddr::Tcp(addr) if !addr.ip().is_loopback());
        if public && !f.allow_public_listen {
            return Err(invalid(
                path,
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
                path,
                "upstreams",
                "at least one mesh listener (host:port) is needed".into(),
            ));
        }
        for upstream in &f.upstreams {
            split_host_port(upstream).ok_or_else(|| {
                invalid(
                    path,
                    "upstreams",
                    format!("{upstream:?} is not host:port (e.g. \"10.0.0.12:8443\")"),
                )
            })?;
        }
        let server_name = match f.server_name {
            Some(name) if name.trim().is_empty() => {
                return Err(invalid(path, "server_name", "is empty".into()))
            }
            Some(name) => name,
            None => split_host_port(&f.upstreams[0])
                .map(|(h, _)| h.to_owned())
                .unwrap_or_default(),
        };
        rustls::pki_types::ServerName::try_from(server_name.as_str())
            .map_err(|e| invalid(path, "server_name", format!("{server_name:?}: {e}")))?;
        Ok(ClientSettings {
            path: path.to_owned(),
            shared,
            listen,
            upstreams: f.upstreams,
            server_name,
            connect_timeout: or_secs(f.connect_timeout, 5),
            upstream_timeout: or_secs(f.upstream_timeout, 65),
            pool_idle_timeout: or_secs(f.pool_idle_timeout, 90),
            upstream_http2: f.upstream_http2.unwrap_or(true),
        })
    }
}

impl SideSettings for ClientSettings {
    type Tls = LiveClientTls;

    fn load(path: &Path) -> Result<Self, ConfigError> {
        ClientSettings::load(path)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn shared(&self) -> &SharedSettings {
        &self.shared
    }

    fn tls_options(&self) -> ClientTlsOptions {
        ClientTlsOptions {
            min_version: self.shared.min_tls_version,
            http2: self.upstream_http2,
        }
    }

    fn restart_only(&self) -> Vec<(&'static str, String)> {
        vec![
            // Debug, not Display: a changed listen_mode or listen_group needs a restart too.
            (
                "listen / listen_mode / listen_group",
                format!("{:?}", self.listen),
            ),
            ("upstreams", format!("{:?}", self.upstreams)),
            ("server_name", self.server_name.clone()),
            ("upstream_http2", self.upstream_http2.to_string()),
            (
                "connect_timeout / upstream_timeout / pool_idle_timeout",
                format!(
                    "{:?} {:?} {:?}",
                    self.connect_timeout, self.upstream_timeout, self.pool_idle_timeout
                ),
            ),
        ]
    }

    fn apply_live(&mut self, new: &Self) {
        self.shared.tls = new.shared.tls.clone();
        self.shared.min_tls_version = new.shared.min_tls_version;
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn load(name: &str, extra: &str) -> ClientSettings {
        let dir = std::env::temp_dir().join(format!("pm-client-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!(
                "listen = \"unix:/run/pm/c.sock\"\nupstreams = [\"127.0.0.1:8443\"]\n\
                 cert = \"c.crt\"\nkey = \"c.key\"\nca = \"ca.crt\"\n{extra}"
            ),
        )
        .unwrap();
        ClientSettings::load(&path).unwrap()
    }

    #[test]
    fn a_new_socket_mode_or_group_is_a_restart_only_change() {
        let before = load("a.toml", "");
        for (name, extra) in [
            ("b.toml", "listen_mode = \"0600\"\n"),
            ("c.toml", "listen_group = \"0\"\n"),
        ] {
            let after = load(name, extra);
            assert_ne!(before.restart_only()[0], after.restart_only()[0], "{extra}");
        }
        assert_eq!(
            before.restart_only()[0],
            load("d.toml", "").restart_only()[0]
        );
    }
}
