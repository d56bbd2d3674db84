//! A mesh connection's *info* ([`ConnInfo`]) is what it was opened with (its entry among the live
//! connections, which knows when its certificates end and whether a reload's trust refused it, and
//! our TLS generation), which the pools hand to the retirement rule before every reuse, and what its
//! listener has said of us since (a fatal alert), which a failure that went through h2 reads back.

use std::sync::Arc;

use phoenix_mesh_certs::refuses_our_certificate;
use phoenix_mesh_common::live::LiveConn;
use phoenix_mesh_transport::tls_verdict::PeerAlert;
use rustls::AlertDescription;

/// What a mesh connection was opened with, and what its listener said of us since: carried with the
/// connection so the forwarder can retire it before it outlives its certificates or our own rotated
/// one, and report the listener's refusal of our certificate by its alert.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    /// The connection among the live ones: its certificates' end, and its retirement.
    pub live: Arc<LiveConn>,
    /// Our TLS generation at the time of the dial.
    pub generation: u64,
    /// The fatal alert the listener sent on this connection, once it has.
    pub alert: PeerAlert,
}

impl ConnInfo {
    /// The alert with which the listener refused our certificate on this connection, if it did.
    /// For errors that lost the rustls error on the way (h2 keeps an I/O error's kind and message).
    pub(crate) fn refused_alert(&self) -> Option<AlertDescription> {
        refusal(&self.alert)
    }
}

/// The alert in `alert` if it refuses our certificate.
fn refusal(alert: &PeerAlert) -> Option<AlertDescription> {
    alert.get().filter(|alert| refuses_our_certificate(*alert))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_only_a_certificate_alert() {
        let refused = |description| {
            let alert = PeerAlert::default();
            alert.note(&std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(description),
            ));
            refusal(&alert)
        };
        assert_eq!(refusal(&PeerAlert::default()), None);
        assert_eq!(
            refused(AlertDescription::AccessDenied),
            Some(AlertDescription::AccessDenied)
        );
        assert_eq!(refused(AlertDescription::InternalError), None);
    }
}
