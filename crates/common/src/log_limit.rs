//! A *repeated failure* is the same cause failing on the same hop again and again: every request
//! while the backend is down, every connection of a peer that keeps sending plain HTTP to the TLS
//! port. A [`LogLimit`] logs the first occurrence at once, as its caller writes it, counts the
//! following ones, and writes one summary line per interval with how many there were. A backend
//! outage under load, or a stranger flooding the listener's port, then costs a line per interval
//! instead of one per request; the metrics still count every occurrence exactly.
//!
//! A failure is keyed by its [`Repeat`]: the line's message, the hop, and the cause's *kind* (an
//! error code, a reason, an I/O error kind), never the cause's text, which can carry per-request data
//! and would make every occurrence new. Only failures reach a limiter: the success path pays nothing.
//!
//! - ALWAYS: a key's first occurrence, and its first after an interval without any, is logged at once.
//! - ALWAYS: every occurrence not logged is counted in exactly one summary line of its key, written
//!   when its interval ends (or, when no timer could run, with the key's next occurrence).
//! - NEVER: more than one summary line per key per interval.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::info;

/// How often a repeated failure's summary line is written.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Keys a limiter holds before it drops the ones with nothing to report. The keys are few by
/// construction (configured hops times closed sets of causes); this only bounds a mistake.
const PRUNE_AT: usize = 64;

/// The kind of a failure's cause: what makes two failures the same.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Cause {
    /// An error code or reason, as `phoenix-mesh-error` or the metrics name it.
    Code(&'static str),
    /// An I/O error's kind (connection refused, timed out, ...).
    Io(io::ErrorKind),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Code(code) => f.write_str(code),
            Cause::Io(kind) => kind.fmt(f),
        }
    }
}

/// What makes failures the same: one log line's message, on one hop, for one kind of cause.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Repeat {
    /// The line's message, as the caller logs it ("backend unreachable").
    pub message: &'static str,
    /// The hop: the peer's address (or the configured peers'), or the port peers reach us on.
    pub hop: Arc<str>,
    /// The cause's kind.
    pub cause: Cause,
}

/// Writes a key's summary: the occurrences not logged, over the interval.
type Summary = dyn Fn(&Repeat, u64, Duration) + Send + Sync;

/// Repeated failures, each key logged at once the first time and then summarised once per interval.
/// Cloning shares the counts.
#[derive(Clone)]
pub struct LogLimit(Arc<Inner>);

struct Inner {
    interval: Duration,
    windows: Mutex<HashMap<Repeat, Window>>,
    summary: Box<Summary>,
}

/// One key's current interval.
struct Window {
    /// When it ends, and its summary is due.
    end: Instant,
    /// Occurrences not logged since the key's last line.
    suppressed: u64,
}

impl LogLimit {
    /// A limiter writing its summaries to the log every [`INTERVAL`].
    pub fn new() -> Self {
        Self::with_summary(INTERVAL, log_summary)
    }

    fn with_summary(
        interval: Duration,
        summary: impl Fn(&Repeat, u64, Duration) + Send + Sync + 'static,
    ) -> Self {
        LogLimit(Arc::new(Inner {
            interval,
            windows: Mutex::new(HashMap::new()),
            summary: Box::new(summary),
        }))
    }

    /// Whether to log this occurrence of `repeat` now; if not, it is counted for its key's summary.
    pub fn admit(&self, repeat: &Repeat) -> bool {
        let inner = &*self.0;
        let now = Instant::now();
        let mut windows = inner.windows.lock();
        let Some(window) = windows.get_mut(repeat) else {
            if windows.len() >= PRUNE_AT {
                windows.retain(|_, w| w.suppressed > 0 || w.end > now);
            }
            windows.insert(
                repeat.clone(),
                Window {
                    end: now + inner.interval,
                    suppressed: 0,
                },
            );
            return true;
        };
        if now < window.end {
            window.suppressed += 1;
            // The first occurrence held back in an interval sets the timer for its summary.
            if window.suppressed == 1 {
                let end = window.end;
                drop(windows);
                self.summarise_at(repeat.clone(), end);
            }
            return false;
        }
        let overdue = std::mem::take(&mut window.suppressed);
        window.end = now + inner.interval;
        if overdue == 0 {
            return true;
        }
        // The last interval's summary is due and its timer has not run (it is late, or there was no
        // runtime to run it): this occurrence writes it, and is the first counted in the next.
        window.suppressed = 1;
        let end = window.end;
        drop(windows);
        (inner.summary)(repeat, overdue, inner.interval);
        self.summarise_at(repeat.clone(), end);
        false
    }

    /// Writes `repeat`'s summary when its interval ends at `end`, unless an occurrence wrote it first.
    fn summarise_at(&self, repeat: Repeat, end: Instant) {
        // Without a runtime, the key's next occurrence writes the summary (see `admit`).
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.0.clone();
        runtime.spawn(async move {
            tokio::time::sleep_until(end).await;
            let suppressed = {
                let mut windows = inner.windows.lock();
                match windows.get_mut(&repeat) {
                    Some(window) if window.end == end && window.suppressed > 0 => {
                        window.end = end + inner.interval;
                        std::mem::take(&mut window.suppressed)
                    }
                    _ => return,
                }
            };
            (inner.summary)(&repeat, suppressed, inner.interval);
        });
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LogLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogLimit")
            .field("interval", &self.0.interval)
            .field("keys", &self.0.windows.lock().len())
            .finish()
    }
}

/// The summary line: the failure's own message, its hop and cause kind, and how many went unlogged.
fn log_summary(repeat: &Repeat, suppressed: u64, interval: Duration) {
    info!(
        hop = %repeat.hop,
        cause = %repeat.cause,
        suppressed,
        interval_s = interval.as_secs(),
        "{} (repeated; one line per interval)",
        repeat.message
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    type Lines = Arc<parking_lot::Mutex<Vec<(&'static str, Cause, u64)>>>;

    /// A limiter whose summaries land in the returned list.
    fn recorded() -> (LogLimit, Lines) {
        let lines: Lines = Arc::default();
        let sink = lines.clone();
        let limit = LogLimit::with_summary(INTERVAL, move |repeat, suppressed, _| {
            sink.lock().push((repeat.message, repeat.cause, suppressed));
        });
        (limit, lines)
    }

    fn repeat(message: &'static str, hop: &str, cause: Cause) -> Repeat {
        Repeat {
            message,
            hop: hop.into(),
            cause,
        }
    }

    const REFUSED: Cause = Cause::Io(io::ErrorKind::ConnectionRefused);

    /// Lets the summary timers that are due run.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn first_is_logged_the_rest_counted_in_one_summary_per_interval() {
        let (limit, lines) = recorded();
        let down = repeat("backend unreachable", "127.0.0.1:8080", REFUSED);
        assert!(limit.admit(&down));
        for _ in 0..999 {
            assert!(!limit.admit(&down));
        }
        settle().await;
        assert!(
            lines.lock().is_empty(),
            "no summary before the interval ends"
        );

        tokio::time::advance(INTERVAL).await;
        settle().await;
        assert_eq!(*lines.lock(), [("backend unreachable", REFUSED, 999)]);

        // Still failing: the next interval is summarised too, never logged line by line.
        for _ in 0..500 {
            assert!(!limit.admit(&down));
        }
        tokio::time::advance(INTERVAL).await;
        settle().await;
        assert_eq!(lines.lock().len(), 2);
        assert_eq!(lines.lock()[1].2, 500);

        // A whole interval without one: the next is logged at once again, and nothing is summarised.
        tokio::time::advance(INTERVAL * 3).await;
        settle().await;
        assert!(limit.admit(&down));
        tokio::time::advance(INTERVAL).await;
        settle().await;
        assert_eq!(lines.lock().len(), 2, "{:?}", lines.lock());
    }

    #[tokio::test(start_paused = true)]
    async fn keys_differ_by_hop_cause_and_message_not_by_free_text() {
        let (limit, lines) = recorded();
        let timeout = Cause::Io(io::ErrorKind::TimedOut);
        for key in [
            repeat("backend unreachable", "127.0.0.1:8080", REFUSED),
            repeat("backend unreachable", "127.0.0.1:8080", timeout),
            repeat("backend unreachable", "127.0.0.1:9090", REFUSED),
            repeat(
                "backend too slow",
                "127.0.0.1:8080",
                Cause::Code("backend-timeout"),
            ),
        ] {
            assert!(limit.admit(&key), "{key:?} is new");
            assert!(!limit.admit(&key), "{key:?} repeats");
        }
        tokio::time::advance(INTERVAL).await;
        settle().await;
        let lines = lines.lock();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines.iter().all(|(_, _, n)| *n == 1), "{lines:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_occurrence_leaves_no_summary() {
        let (limit, lines) = recorded();
        let down = repeat("backend unreachable", "127.0.0.1:8080", REFUSED);
        assert!(limit.admit(&down));
        tokio::time::advance(INTERVAL * 5).await;
        settle().await;
        assert!(lines.lock().is_empty());
        assert!(limit.admit(&down), "an interval later it is new again");
    }

    /// Outside a runtime no timer can write the summary: the key's next occurrence after the
    /// interval writes it, and nothing counted is lost.
    #[test]
    fn without_a_runtime_the_next_occurrence_writes_the_overdue_summary() {
        let lines: Lines = Arc::default();
        let sink = lines.clone();
        let limit = LogLimit::with_summary(Duration::from_millis(1), move |r, n, _| {
            sink.lock().push((r.message, r.cause, n));
        });
        let down = repeat("backend unreachable", "127.0.0.1:8080", REFUSED);
        assert!(limit.admit(&down));
        assert!(!limit.admit(&down));
        assert!(!limit.admit(&down));
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            !limit.admit(&down),
            "it writes the summary, and is counted in the next"
        );
        assert_eq!(*lines.lock(), [("backend unreachable", REFUSED, 2)]);
        std::thread::sleep(Duration::from_millis(5));
        assert!(!limit.admit(&down));
        assert_eq!(lines.lock().len(), 2);
        assert_eq!(lines.lock()[1].2, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_with_nothing_to_report_are_dropped_past_the_bound() {
        let (limit, _lines) = recorded();
        for i in 0..PRUNE_AT * 3 {
            let key = repeat("TLS handshake failed", &i.to_string(), REFUSED);
            assert!(limit.admit(&key));
            tokio::time::advance(INTERVAL).await;
        }
        assert!(limit.0.windows.lock().len() <= PRUNE_AT);
    }
}
