//! The *live connections* are the mesh connections open now, known by what each was opened with
//! ([`ConnInfo`]: the listener certificate's expiry and our TLS generation). The forwarder reads two
//! numbers from them per request, with one atomic load each, to learn whether any open connection
//! may be stale and so whether the request should look at its own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use phoenix_mesh_certs::refuses_our_certificate;
use phoenix_mesh_transport::tls_verdict::PeerAlert;
use rustls::AlertDescription;

/// What a mesh connection was opened with, and what its listener said of us since: carried with the
/// connection so the forwarder can retire it before it outlives the listener's certificate or our
/// own rotated one, and report the listener's refusal of our certificate by its alert.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    /// When the listener's certificate expires.
    pub expires: SystemTime,
    /// Our TLS generation at the time of the dial.
    pub generation: u64,
    /// The fatal alert the listener sent on this connection, once it has.
    pub alert: PeerAlert,
}

impl ConnInfo {
    fn expires_unix(&self) -> u64 {
        self.expires
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    }

    /// The alert with which the listener refused our certificate on this connection, if it did.
    /// For errors that lost the rustls error on the way (h2 keeps an I/O error's kind and message).
    pub(crate) fn refused_alert(&self) -> Option<AlertDescription> {
        self.alert
            .get()
            .filter(|alert| refuses_our_certificate(*alert))
    }
}

/// The open connections, counted by listener-certificate expiry and by TLS generation, and the
/// earliest and oldest of each published for lock-free reads.
#[derive(Debug)]
pub(crate) struct LiveConns {
    open: Mutex<Counts>,
    earliest_expiry: AtomicU64,
    oldest_generation: AtomicU64,
}

/// Open connections by expiry (Unix seconds) and by generation.
#[derive(Debug, Default)]
struct Counts {
    by_expiry: BTreeMap<u64, usize>,
    by_generation: BTreeMap<u64, usize>,
}

impl Default for LiveConns {
    fn default() -> Self {
        LiveConns {
            open: Mutex::default(),
            earliest_expiry: AtomicU64::new(u64::MAX),
            oldest_generation: AtomicU64::new(u64::MAX),
        }
    }
}

impl LiveConns {
    /// Counts a connection opened with `info` until the returned guard is dropped.
    pub(crate) fn add(self: &Arc<Self>, info: &ConnInfo) -> ConnGuard {
        let guard = ConnGuard {
            set: self.clone(),
            expiry: info.expires_unix(),
            generation: info.generation,
        };
        let mut open = self.open.lock();
        *open.by_expiry.entry(guard.expiry).or_default() += 1;
        *open.by_generation.entry(guard.generation).or_default() += 1;
        self.publish(&open);
        guard
    }

    fn publish(&self, open: &Counts) {
        let first = |m: &BTreeMap<u64, usize>| m.keys().next().copied().unwrap_or(u64::MAX);
        self.earliest_expiry
            .store(first(&open.by_expiry), Ordering::Relaxed);
        self.oldest_generation
            .store(first(&open.by_generation), Ordering::Relaxed);
    }

    /// The earliest listener-certificate not-after among open connections (`u64::MAX`: none).
    pub(crate) fn earliest_expiry(&self) -> u64 {
        self.earliest_expiry.load(Ordering::Relaxed)
    }

    /// The oldest TLS generation among open connections (`u64::MAX`: none).
    pub(crate) fn oldest_generation(&self) -> u64 {
        self.oldest_generation.load(Ordering::Relaxed)
    }
}

/// Takes its connection out of [`LiveConns`] when the connection closes.
#[derive(Debug)]
pub(crate) struct ConnGuard {
    set: Arc<LiveConns>,
    expiry: u64,
    generation: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = self.set.open.lock();
        let counts = &mut *open;
        for (map, key) in [
            (&mut counts.by_expiry, self.expiry),
            (&mut counts.by_generation, self.generation),
        ] {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
        self.set.publish(&open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn info(expires_unix: u64, generation: u64) -> ConnInfo {
        ConnInfo {
            expires: SystemTime::UNIX_EPOCH + Duration::from_secs(expires_unix),
            generation,
            alert: PeerAlert::default(),
        }
    }

    #[test]
    fn publishes_the_earliest_expiry_and_oldest_generation_of_the_open_connections() {
        let live = Arc::new(LiveConns::default());
        assert_eq!(live.earliest_expiry(), u64::MAX);
        assert_eq!(live.oldest_generation(), u64::MAX);

        let a = live.add(&info(2_000, 3));
        let b = live.add(&info(1_000, 4));
        let c = live.add(&info(1_000, 5));
        assert_eq!(
            (live.earliest_expiry(), live.oldest_generation()),
            (1_000, 3)
        );

        drop(a);
        assert_eq!(
            (live.earliest_expiry(), live.oldest_generation()),
            (1_000, 4)
        );
        // Two connections share the earliest expiry: it stays until both are gone.
        drop(b);
        assert_eq!(
            (live.earliest_expiry(), live.oldest_generation()),
            (1_000, 5)
        );
        drop(c);
        assert_eq!(live.earliest_expiry(), u64::MAX);
        assert_eq!(live.oldest_generation(), u64::MAX);
    }

    #[test]
    fn a_refusal_is_only_a_certificate_alert() {
        let refused = |alert| {
            let info = info(0, 0);
            info.alert.note(&std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(alert),
            ));
            info.refused_alert()
        };
        assert_eq!(info(0, 0).refused_alert(), None);
        assert_eq!(
            refused(AlertDescription::AccessDenied),
            Some(AlertDescription::AccessDenied)
        );
        assert_eq!(refused(AlertDescription::InternalError), None);
    }
}
