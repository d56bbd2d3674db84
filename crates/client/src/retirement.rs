//! A mesh connection is *retired* when it must take no new requests (those in flight on it finish):
//! the first of its certificates (ours or the listener's, leaf or intermediate) ends within the
//! dialler's margin (see [`phoenix_mesh_common::live`]), so that its replacement is open before the
//! listener asks it to go and it never outlives them; a reload's trust refuses the listener's chain;
//! or it was opened before our own certificate or trust was reloaded, so that the listener sees the
//! new ones soon. New requests get a fresh connection, which a fresh handshake verifies.

use phoenix_mesh_common::metrics::ClosedReason;
use tracing::info;

/// Why a connection is retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retirement {
    /// Its certificates end soon, or the trust now in force refuses it.
    ending: Option<ClosedReason>,
    rotated: bool,
}

impl Retirement {
    /// Whether a connection is retired, and why: `ending` as its live entry says at this moment,
    /// `opened` our TLS generation when it was dialled, `generation` ours now.
    pub(crate) fn of(ending: Option<ClosedReason>, opened: u64, generation: u64) -> Option<Self> {
        let rotated = opened < generation;
        (ending.is_some() || rotated).then_some(Retirement { ending, rotated })
    }

    /// Says so in the log, once per retired connection.
    pub(crate) fn log(self) {
        info!(
            reason = self.ending.map(ClosedReason::as_str),
            our_tls_reloaded = self.rotated,
            "retired a mesh connection; new requests get a fresh one"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retires_on_certificates_ending_a_refusal_or_our_reload() {
        let retired = |ending, rotated| Some(Retirement { ending, rotated });
        assert_eq!(Retirement::of(None, 2, 2), None);
        let expiry = Some(ClosedReason::CertificateExpiry);
        assert_eq!(Retirement::of(expiry, 2, 2), retired(expiry, false));
        let revoked = Some(ClosedReason::Revoked);
        assert_eq!(Retirement::of(revoked, 2, 2), retired(revoked, false));
        assert_eq!(Retirement::of(None, 1, 2), retired(None, true));
        assert_eq!(Retirement::of(expiry, 1, 2), retired(expiry, true));
    }
}
