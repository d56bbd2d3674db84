//! Client certificate chains the listener has already verified under its current policy.
//!
//! A full TLS 1.3 handshake costs the listener three ECDSA verifications for a step-ca client: the
//! leaf's signature by the intermediate, the intermediate's by the root, and the CertificateVerify
//! that proves the client holds the key. The first two depend only on the chain's bytes, the trust
//! anchors, the CRLs and the time, and the mesh sees the same one or two gateway chains over and over
//! (every reconnect whose ticket has lapsed, every new pooled connection). So a chain that passed is
//! remembered, byte for byte, with the time window in which every certificate in it is valid; inside
//! that window the same chain skips path building. The CertificateVerify signature is still checked on
//! every handshake, so a remembered chain proves nothing without its private key.
//!
//! The cache belongs to one verifier, and a verifier to one server configuration: a reload (new CA,
//! CRLs, `allowed_peers`, or just a renewed certificate) builds a new one, empty. Only successes are
//! remembered; a refused chain is refused (and logged) afresh every time.

use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::cache::ByteCache;

/// When every certificate in a chain is valid, in Unix seconds, both ends inclusive (as webpki checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    not_before: u64,
    not_after: u64,
}

impl Window {
    /// The intersection of the validity periods of every certificate presented (leaf and
    /// intermediates), or `None` when one does not parse or they do not overlap.
    pub(crate) fn of(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Option<Window> {
        let mut window = Window {
            not_before: 0,
            not_after: u64::MAX,
        };
        for der in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
            let (_, cert) = X509Certificate::from_der(der).ok()?;
            let validity = cert.validity();
            let not_before = u64::try_from(validity.not_before.timestamp()).unwrap_or(0);
            let not_after = u64::try_from(validity.not_after.timestamp()).ok()?;
            window.not_before = window.not_before.max(not_before);
            window.not_after = window.not_after.min(not_after);
        }
        (window.not_before <= window.not_after).then_some(window)
    }

    fn contains(self, now: UnixTime) -> bool {
        let now = now.as_secs();
        self.not_before <= now && now <= self.not_after
    }
}

/// The exact bytes of a presented chain: each certificate's length then its DER, leaf first.
pub(crate) fn chain_key(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Box<[u8]> {
    let total = end_entity.len() + intermediates.iter().map(|c| c.len()).sum::<usize>();
    let mut key = Vec::with_capacity(total + 4 * (1 + intermediates.len()));
    for der in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        key.extend_from_slice(&u32::try_from(der.len()).unwrap_or(u32::MAX).to_be_bytes());
        key.extend_from_slice(der);
    }
    key.into()
}

/// Chains that passed verification, with when they stay valid.
#[derive(Debug, Default)]
pub(crate) struct VerifiedChains(ByteCache<Window>);

impl VerifiedChains {
    /// Whether exactly this chain passed before and every certificate in it is still valid at `now`.
    pub(crate) fn contains(&self, key: &[u8], now: UnixTime) -> bool {
        self.0.get(key).is_some_and(|window| window.contains(now))
    }

    /// Remembers a chain that has just passed every check.
    pub(crate) fn insert(&self, key: Box<[u8]>, window: Window) {
        self.0.insert(key, window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
    }

    #[test]
    fn a_remembered_chain_holds_only_inside_its_window() {
        let chains = VerifiedChains::default();
        let key = chain_key(b"leaf", &[CertificateDer::from(&b"intermediate"[..])]);
        chains.insert(
            key.clone(),
            Window {
                not_before: 100,
                not_after: 200,
            },
        );
        assert!(!chains.contains(&key, at(99)), "before the window");
        assert!(chains.contains(&key, at(100)));
        assert!(
            chains.contains(&key, at(200)),
            "webpki accepts the last second"
        );
        assert!(!chains.contains(&key, at(201)), "after the window");
    }

    #[test]
    fn the_key_is_the_whole_chain_and_its_boundaries() {
        let chains = VerifiedChains::default();
        let a = chain_key(b"leaf", &[CertificateDer::from(&b"inter"[..])]);
        chains.insert(
            a.clone(),
            Window {
                not_before: 0,
                not_after: u64::MAX,
            },
        );
        let now = at(1_000);
        assert!(chains.contains(&a, now));
        // The same leaf with other intermediates, or none, is another chain.
        assert!(!chains.contains(&chain_key(b"leaf", &[]), now));
        let other = [CertificateDer::from(&b"other"[..])];
        assert!(!chains.contains(&chain_key(b"leaf", &other), now));
        // Moving bytes between certificates changes the key even when the concatenation is equal.
        let shifted = [CertificateDer::from(&b"nter"[..])];
        assert!(!chains.contains(&chain_key(b"leafi", &shifted), now));
    }

    #[test]
    fn unparseable_certificates_have_no_window() {
        assert_eq!(Window::of(b"not a certificate", &[]), None);
    }
}
