//! The config keys both sides share (TLS files, admin endpoint, limits, timeouts), the split of a
//! config file into those and a side's own keys, and what the skeleton asks of a side's settings
//! ([`SideSettings`]). Each part denies unknown keys, so a typo is an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use phoenix_mesh_certs::{LiveTls, TlsFiles, TlsVersion};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::config::{resolve, ConfigDuration, ConfigError};
use crate::headers::AllowedUpgrades;
use phoenix_mesh_transport::h2::client::MAX_HEADER_LIST_SIZE;
use phoenix_mesh_transport::serve::HttpOptions;

/// One side's validated settings, as far as the skeleton and reloading need to know them.
pub trait SideSettings: Clone + Send + Sync + 'static {
    /// The live TLS configuration this side runs.
    type Tls: LiveTls;
    /// Reads and validates a config file.
    fn load(path: &Path) -> Result<Self, ConfigError>;
    /// Where the settings came from.
    fn path(&self) -> &Path;
    /// The keys both sides share.
    fn shared(&self) -> &SharedSettings;
    /// What, besides the files, shapes the TLS configuration.
    fn tls_options(&self) -> <Self::Tls as LiveTls>::Options;
    /// This side's keys that change only at restart, with their values.
    fn restart_only(&self) -> Vec<(&'static str, String)>;
    /// Takes over from `new` what applies without a restart (TLS files, trust policy).
    fn apply_live(&mut self, new: &Self);
}

/// The shared keys, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SharedFile {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    #[serde(default)]
    crls: Vec<PathBuf>,
    #[serde(default)]
    admin_listen: Option<String>,
    #[serde(default)]
    min_tls_version: Option<String>,
    #[serde(default)]
    handshake_timeout: Option<ConfigDuration>,
    #[serde(default)]
    header_read_timeout: Option<ConfigDuration>,
    #[serde(default)]
    max_header_bytes: Option<usize>,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    drain_timeout: Option<ConfigDuration>,
    #[serde(default)]
    reload_poll_interval: Option<ConfigDuration>,
    #[serde(default)]
    access_log: bool,
    #[serde(default)]
    worker_threads: Option<usize>,
    #[serde(default)]
    allowed_upgrades: Option<Vec<String>>,
}

const SHARED_KEYS: [&str; 15] = [
    "worker_threads",
    "cert",
    "key",
    "ca",
    "crls",
    "admin_listen",
    "min_tls_version",
    "handshake_timeout",
    "header_read_timeout",
    "max_header_bytes",
    "max_connections",
    "drain_timeout",
    "reload_poll_interval",
    "access_log",
    "allowed_upgrades",
];

/// Validated shared settings.
#[derive(Debug, Clone)]
pub struct SharedSettings {
    /// Certificate, key, CA and CRL files, resolved against the config file.
    pub tls: TlsFiles,
    /// Loopback address of the admin endpoint.
    pub admin_listen: Option<SocketAddr>,
    /// Lowest TLS version.
    pub min_tls_version: TlsVersion,
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// HTTP limits for the requests this side receives.
    pub http: HttpOptions,
    /// Most connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// How long shutdown waits for requests in flight.
    pub drain_timeout: Duration,
    /// How often the certificate, key, CA and CRL files are checked for changes.
    pub reload_poll_interval: Duration,
    /// Write one structured log line per request.
    pub access_log: bool,
    /// Threads of the async runtime: 1 (the default) runs everything on one thread, 0 means one
    /// per CPU.
    pub worker_threads: usize,
    /// The protocols a request may upgrade to (`Upgrade`); others are refused.
    pub allowed_upgrades: AllowedUpgrades,
}

/// Reads `path` and splits it into the shared settings and the side's own keys `T`.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<(SharedSettings, T), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parse_error = |e: toml::de::Error| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().replace('\n', " "),
    };
    let mut side: toml::Table = toml::from_str(&text).map_err(parse_error)?;
    let mut shared = toml::Table::new();
    for key in SHARED_KEYS {
        if let Some(value) = side.remove(key) {
            shared.insert(key.to_owned(), value);
        }
    }
    // Keys neither side's own nor shared: what a refusal below is about, and what gets a suggestion.
    let side_fields = field_names::<T>();
    let unknown: Vec<String> = side
        .keys()
        .filter(|k| !side_fields.contains(&k.as_str()))
        .cloned()
        .collect();
    // The side's own keys first, so a misspelt key is reported as unknown (with every valid key)
    // rather than as the shared key it was meant to be going missing.
    let side: T = side.try_into().map_err(|e: toml::de::Error| {
        let mut message = e.to_string().trim_end().replace('\n', " ");
        // Another mistake before the unknown key (a wrong type) is what serde reports then.
        if !unknown.is_empty() && message.contains("unknown field") {
            message.push_str(", or one of the shared keys `");
            message.push_str(&SHARED_KEYS.join("`, `"));
            message.push('`');
            let valid = || side_fields.iter().chain(&SHARED_KEYS).copied();
            let suggestions: Vec<String> = unknown
                .iter()
                .filter_map(|typed| {
                    let close = closest(typed, valid())?;
                    Some(if unknown.len() == 1 {
                        format!("`{close}`")
                    } else {
                        format!("`{close}` for `{typed}`")
                    })
                })
                .collect();
            if !suggestions.is_empty() {
                message.push_str("; did you mean ");
                message.push_str(&suggestions.join(", "));
                message.push('?');
            }
        }
        ConfigError::Parse {
            path: path.to_owned(),
            message,
        }
    })?;
    let shared: SharedFile = shared.try_into().map_err(parse_error)?;
    Ok((SharedSettings::validate(path, shared)?, side))
}

/// The valid key closest to `typed`, if one is close enough to be what was meant: at most two
/// edits away, and at most one per three characters typed (so `ca` is not offered for `id`).
fn closest<'k>(typed: &str, valid: impl Iterator<Item = &'k str>) -> Option<&'k str> {
    let limit = (typed.chars().count() / 3).clamp(1, 2);
    valid
        .map(|key| (edit_distance(typed, key), key))
        .filter(|&(distance, _)| distance <= limit)
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, key)| key)
}

/// Levenshtein distance: the fewest single-character insertions, deletions and substitutions
/// that turn `a` into `b`. Config keys are short, so the plain two-row table is plenty.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitute.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// The keys of struct `T`, as its `Deserialize` impl hands them to `deserialize_struct`; none
/// for a type that is not a plain struct.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Fields<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(serde::de::Error::custom("only the field names were wanted"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// A `Config::Invalid` for `key` in `path`.
pub fn invalid(path: &Path, key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        key,
        message,
    }
}

/// Parses an `ip:port` address for `key`.
pub fn socket_addr(path: &Path, key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(path, key, format!("{value:?} is not an ip:port address")))
}

/// A configured duration or its default in seconds.
pub fn or_secs(value: Option<ConfigDuration>, default: u64) -> Duration {
    value.map_or(Duration::from_secs(default), |d| d.0)
}

impl SharedSettings {
    fn validate(path: &Path, f: SharedFile) -> Result<Self, ConfigError> {
        let admin_listen = match f.admin_listen {
            None => None,
            Some(a) => {
                let addr = socket_addr(path, "admin_listen", &a)?;
                if !addr.ip().is_loopback() {
                    return Err(invalid(
                        path,
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
            .map_err(|e| invalid(path, "min_tls_version", e.to_string()))?;
        let max_header_bytes = f.max_header_bytes.unwrap_or(64 * 1024);
        if max_header_bytes < 8192 {
            return Err(invalid(
                path,
                "max_header_bytes",
                format!("{max_header_bytes} is below the 8192-byte minimum"),
            ));
        }
        // The mesh link takes header lists up to this size: a head the listener lets through must
        // never be one the client cannot read (which would fail the whole shared connection).
        let most = MAX_HEADER_LIST_SIZE as usize;
        if max_header_bytes > most {
            return Err(invalid(
                path,
                "max_header_bytes",
                format!("{max_header_bytes} is above the {most}-byte maximum"),
            ));
        }
        let allowed_upgrades = match f.allowed_upgrades {
            None => AllowedUpgrades::default(),
            Some(tokens) => {
                if let Some(bad) = tokens.iter().find(|t| !is_upgrade_token(t)) {
                    return Err(invalid(
                        path,
                        "allowed_upgrades",
                        format!("{bad:?} is not a protocol name such as \"websocket\" (a token, optionally /version)"),
                    ));
                }
                AllowedUpgrades::new(tokens)
            }
        };
        let max_connections = match f.max_connections {
            Some(0) => {
                return Err(invalid(
                    path,
                    "max_connections",
                    "must be at least 1".into(),
                ))
            }
            Some(n) => n,
            None => 10_000,
        };
        Ok(SharedSettings {
            tls: TlsFiles {
                cert: resolve(path, &f.cert),
                key: resolve(path, &f.key),
                ca: resolve(path, &f.ca),
                crls: f.crls.iter().map(|c| resolve(path, c)).collect(),
            },
            admin_listen,
            min_tls_version,
            handshake_timeout: or_secs(f.handshake_timeout, 10),
            http: HttpOptions {
                header_read_timeout: or_secs(f.header_read_timeout, 30),
                max_header_bytes,
                ..HttpOptions::default()
            },
            max_connections,
            drain_timeout: or_secs(f.drain_timeout, 30),
            reload_poll_interval: or_secs(f.reload_poll_interval, 10),
            access_log: f.access_log,
            worker_threads: f.worker_threads.unwrap_or(1),
            allowed_upgrades,
        })
    }

    /// The keys that change only at restart, with their values, for comparing across a reload.
    pub fn restart_only(&self) -> Vec<(&'static str, String)> {
        vec![
            ("admin_listen", format!("{:?}", self.admin_listen)),
            ("handshake_timeout", format!("{:?}", self.handshake_timeout)),
            (
                "header_read_timeout / max_header_bytes",
                format!("{:?}", self.http),
            ),
            ("max_connections", self.max_connections.to_string()),
            ("drain_timeout", format!("{:?}", self.drain_timeout)),
            (
                "reload_poll_interval",
                format!("{:?}", self.reload_poll_interval),
            ),
            ("access_log", self.access_log.to_string()),
            ("worker_threads", self.worker_threads.to_string()),
            (
                "allowed_upgrades",
                format!("{:?}", self.allowed_upgrades.tokens().collect::<Vec<_>>()),
            ),
        ]
    }
}

/// Whether `text` is an `Upgrade` protocol: a token, optionally `/` and a version token (RFC 9110
/// section 7.8).
fn is_upgrade_token(text: &str) -> bool {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let mut parts = text.splitn(2, '/');
    parts.next().is_some_and(token) && parts.next().is_none_or(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Side {
        #[allow(dead_code)]
        listen: String,
    }

    fn read(tag: &str, text: &str) -> Result<(SharedSettings, Side), ConfigError> {
        let path = std::env::temp_dir().join(format!(
            "phoenix-mesh-settings-{}-{tag}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let result = read_config(&path);
        let _ = std::fs::remove_file(&path);
        result
    }

    #[test]
    fn a_misspelt_shared_key_is_reported_as_unknown_with_every_valid_key() {
        let error = read(
            "misspelt",
            "listen = \"127.0.0.1:1\"\ncerts = \"a\"\nkey = \"b\"\nca = \"c\"\n",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(error.contains("unknown field `certs`"), "{error}");
        assert!(
            error.contains("`cert`") && error.contains("`listen`"),
            "{error}"
        );
    }

    #[test]
    fn a_misspelt_key_names_the_closest_valid_key() {
        let error = |text: &str| {
            read("suggest", text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let shared = "key = \"b\"\nca = \"c\"\n";
        // A side's own key and a shared one, each one edit away.
        let side_key = error(&format!("lisen = \"x\"\ncert = \"a\"\n{shared}"));
        assert!(side_key.contains("unknown field `lisen`"), "{side_key}");
        assert!(side_key.ends_with("; did you mean `listen`?"), "{side_key}");
        let shared_key = error(&format!("listen = \"x\"\ncerts = \"a\"\n{shared}"));
        assert!(
            shared_key.ends_with("; did you mean `cert`?"),
            "{shared_key}"
        );
        // Nothing close: the list of valid keys only.
        let far = error(&format!(
            "listen = \"x\"\ncert = \"a\"\nbogus = 1\n{shared}"
        ));
        assert!(far.contains("unknown field `bogus`"), "{far}");
        assert!(!far.contains("did you mean"), "{far}");
    }

    #[test]
    fn closeness_allows_one_edit_per_three_characters_and_at_most_two() {
        let keys = ["upstreams", "ca", "connect_timeout", "listen"];
        assert_eq!(closest("upstream", keys.into_iter()), Some("upstreams"));
        assert_eq!(closest("upstraems", keys.into_iter()), Some("upstreams"));
        assert_eq!(
            closest("conect_timout", keys.into_iter()),
            Some("connect_timeout")
        );
        assert_eq!(closest("cb", keys.into_iter()), Some("ca"));
        assert_eq!(closest("id", keys.into_iter()), None);
        assert_eq!(closest("lstn", keys.into_iter()), None);
        assert_eq!(closest("timeout", keys.into_iter()), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
    }

    #[test]
    fn shared_keys_resolve_against_the_config_file() {
        let (shared, _) = read(
            "resolve",
            "listen = \"127.0.0.1:1\"\ncert = \"a.crt\"\nkey = \"/k\"\nca = \"c\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(shared.tls.cert.is_absolute() && shared.tls.cert.ends_with("a.crt"));
        assert_eq!(shared.tls.key, Path::new("/k"));
        assert_eq!(shared.worker_threads, 1);
    }

    #[test]
    fn upgrade_tokens_are_tokens_with_an_optional_version() {
        for good in ["websocket", "WebSocket", "anything/1.0", "h2c"] {
            assert!(super::is_upgrade_token(good), "{good}");
        }
        for bad in ["", "web socket", "a/", "/1.0", "a/b/c", "a,b"] {
            assert!(!super::is_upgrade_token(bad), "{bad:?}");
        }
    }
}
