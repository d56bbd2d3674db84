//! Logs to stderr through tracing, filtered by RUST_LOG, as text or JSON lines.
//!
//! Under systemd, when stderr is the journal's stream for the unit, each line starts with its syslog
//! priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace; sd-daemon(3)), which
//! journald takes off and keeps as the entry's priority, so `journalctl -p warning` shows our warnings
//! and errors; text lines then also leave the timestamp to the journal.

use std::fmt;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber; `RUST_LOG` overrides the default `info`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour())
        .with_writer(std::io::stderr);
    let result = match (format, on_journal()) {
        (LogFormat::Text, false) => builder.try_init(),
        (LogFormat::Text, true) => builder
            .event_format(Priority(format::format().without_time()))
            .try_init(),
        (LogFormat::Json, false) => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        (LogFormat::Json, true) => builder
            .json()
            .event_format(Priority(
                format::format()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            ))
            .try_init(),
    };
    if let Err(error) = result {
        eprintln!("phoenix-mesh: logging already initialised: {error}");
    }
}

/// Colours only for a person at a terminal. tracing-subscriber colours whenever `NO_COLOR` is unset, so
/// under systemd every line reached the journal with escape sequences in it: stored as bytes rather
/// than text, shown as `[N blob data]` by some journalctl versions and as `#033[2m` once forwarded to
/// rsyslog, and in the way of `grep` on a log file.
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Whether stderr is the journal stream systemd named in `JOURNAL_STREAM` (`device:inode`, both
/// decimal). The variable alone is not enough: a child started from a unit inherits it with its
/// stderr sent elsewhere, and a terminal or a file must not get priority prefixes.
fn on_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// A line format with the event's syslog priority in front, for journald.
struct Priority<F>(F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}
