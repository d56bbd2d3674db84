//! What every config file has in common: its errors, relative paths resolved against the file, and
//! durations written the way an operator writes them (`"30s"`, `"500ms"`, `"2m"`, or a bare number of
//! seconds).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("config {}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// `p` as given when absolute, else relative to the directory holding the config file.
pub fn resolve(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        config_path.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// A duration in config: `"250ms"`, `"10s"`, `"5m"`, `"1h"` (anything humantime reads, such as
/// `"1h 30m"`), or a number of seconds, bare (`30`) or quoted (`"30"`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl fmt::Debug for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(ConfigDuration(Duration::from_secs(s))),
            Raw::Text(t) => parse_duration(&t)
                .map(ConfigDuration)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A duration that could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid duration {text:?}: {reason}; expected e.g. \"500ms\", \"10s\", \"5m\"")]
pub struct DurationError {
    text: String,
    reason: humantime::DurationError,
}

/// Parses `"250ms"`, `"10s"`, `"5m"`, `"1h"` (through humantime) or `"30"` (seconds: a number
/// without a unit has always meant seconds in these files).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(secs) = text.parse() {
            return Ok(Duration::from_secs(secs));
        }
    }
    humantime::parse_duration(text).map_err(|reason| DurationError {
        text: text.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration(" 30 "), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10 s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        for bad in ["ten", "", "5x", "-5s", "s"] {
            let error = parse_duration(bad).err().map(|e| e.to_string());
            assert!(
                error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("invalid duration")),
                "{bad:?}: {error:?}"
            );
        }
    }

    #[test]
    fn bare_numbers_are_seconds_and_text_goes_through_humantime() {
        #[derive(Deserialize)]
        struct Keys {
            bare: ConfigDuration,
            text: ConfigDuration,
            quoted: ConfigDuration,
        }
        let keys: Keys = toml::from_str("bare = 30\ntext = \"500ms\"\nquoted = \"45\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keys.bare.0, Duration::from_secs(30));
        assert_eq!(keys.text.0, Duration::from_millis(500));
        assert_eq!(keys.quoted.0, Duration::from_secs(45));
        let error = toml::from_str::<Keys>("bare = 1\ntext = \"soon\"\nquoted = 1\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("invalid duration \"soon\""), "{error}");
    }

    #[test]
    fn resolves_relative_to_the_config_file() {
        let cfg = Path::new("/etc/phoenix-mesh/client.toml");
        assert_eq!(
            resolve(cfg, Path::new("certs/a.crt")),
            PathBuf::from("/etc/phoenix-mesh/certs/a.crt")
        );
        assert_eq!(
            resolve(cfg, Path::new("/abs/a.crt")),
            PathBuf::from("/abs/a.crt")
        );
    }
}
