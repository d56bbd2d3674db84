//! A mesh connection is *retired* when it must take no new requests (those in flight on it finish):
//! its listener certificate ends within the retire margin, so that the connection never outlives it,
//! or it was opened before our own certificate or trust was reloaded, so that the listener sees the
//! new ones soon. New requests get a fresh connection, which a fresh handshake verifies.

use std::time::{Duration, SystemTime};

use tracing::info;

use crate::conn_info::ConnInfo;

/// Why a connection is retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retirement {
    expiring: bool,
    rotated: bool,
}

impl Retirement {
    /// Whether the connection opened with `info` is retired at `now`, with our TLS at `generation`,
    /// and why.
    pub(crate) fn of(
        info: &ConnInfo,
        margin: Duration,
        generation: u64,
        now: SystemTime,
    ) -> Option<Self> {
        let expiring = info.expires <= now + margin;
        let rotated = info.generation < generation;
        (expiring || rotated).then_some(Retirement { expiring, rotated })
    }

    /// Says so in the log, once per retired connection.
    pub(crate) fn log(self) {
        info!(
            listener_cert_expiring = self.expiring,
            our_tls_reloaded = self.rotated,
            "retired a mesh connection; new requests get a fresh one"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phoenix_mesh_transport::tls_verdict::PeerAlert;

    #[test]
    fn retires_on_an_expiring_listener_certificate_or_our_reload() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let margin = Duration::from_secs(90);
        let info = |expires_in: u64, generation| ConnInfo {
            expires: now + Duration::from_secs(expires_in),
            generation,
            alert: PeerAlert::default(),
        };
        let retired = |expiring, rotated| Some(Retirement { expiring, rotated });
        assert_eq!(Retirement::of(&info(91, 2), margin, 2, now), None);
        assert_eq!(
            Retirement::of(&info(90, 2), margin, 2, now),
            retired(true, false)
        );
        assert_eq!(
            Retirement::of(&info(91, 1), margin, 2, now),
            retired(false, true)
        );
        assert_eq!(
            Retirement::of(&info(0, 1), margin, 2, now),
            retired(true, true)
        );
    }
}
