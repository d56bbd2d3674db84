//! *Re-checking* an established connection: judging the certificate chain it was authenticated with,
//! as recorded at its handshake, and the TLS version it negotiated, against the policy now in force
//! (CA, CRLs, `allowed_peers`, `min_tls_version`). A handshake is judged once; a reload that changes
//! the policy re-checks every connection still open, so that one the new policy refuses is closed
//! rather than left to carry requests until it happens to end.

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::{CertificateError, ProtocolVersion};

use crate::TlsVersion;

/// Why the policy now in force refuses a connection it once accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer's certificate is revoked, or no CRL among `crls` covers it any more.
    Revoked,
    /// The peer's identity is not in `allowed_peers` (or its certificate is not meant for its role).
    NotAllowed,
    /// The peer's chain no longer verifies against `ca`.
    CaChanged,
    /// The connection's TLS version is below `min_tls_version`.
    TlsVersion,
    /// A certificate in the peer's chain has expired.
    Expired,
}

impl Refusal {
    /// What the verifier's error means for a chain it accepted before.
    fn of(error: &rustls::Error) -> Refusal {
        match error {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::Revoked | CertificateError::UnknownRevocationStatus => {
                    Refusal::Revoked
                }
                CertificateError::ApplicationVerificationFailure
                | CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. }
                | CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Refusal::NotAllowed,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Refusal::Expired
                }
                _ => Refusal::CaChanged,
            },
            _ => Refusal::CaChanged,
        }
    }
}

/// What an established connection was authenticated with, as its handshake recorded it.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The peer's chain, leaf first (a resumed session's is the one from its original handshake);
    /// shared by the connections that presented the same one.
    pub chain: Arc<[CertificateDer<'static>]>,
    /// The TLS version negotiated.
    pub version: Option<ProtocolVersion>,
}

/// The listener's policy as one configuration holds it: its client verifier and version floor.
#[derive(Debug, Clone)]
pub(crate) struct ServerPolicy {
    pub(crate) verifier: Arc<dyn ClientCertVerifier>,
    pub(crate) min_version: TlsVersion,
}

impl ServerPolicy {
    /// Whether this policy refuses a client connection authenticated with `auth`, and why.
    pub(crate) fn recheck(&self, auth: &Authenticated) -> Option<Refusal> {
        if let Some(refusal) = version_refused(self.min_version, auth.version) {
            return Some(refusal);
        }
        let (leaf, intermediates) = auth.chain.split_first()?;
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .err()
            .map(|error| Refusal::of(&error))
    }
}

/// The client's policy as one configuration holds it: its listener verifier and version floor.
#[derive(Debug, Clone)]
pub(crate) struct ClientPolicy {
    pub(crate) verifier: Arc<WebPkiServerVerifier>,
    pub(crate) min_version: TlsVersion,
}

impl ClientPolicy {
    /// Whether this policy refuses a listener connection authenticated with `auth` for `name`,
    /// and why.
    pub(crate) fn recheck(&self, auth: &Authenticated, name: &ServerName<'_>) -> Option<Refusal> {
        if let Some(refusal) = version_refused(self.min_version, auth.version) {
            return Some(refusal);
        }
        let (leaf, intermediates) = auth.chain.split_first()?;
        self.verifier
            .verify_server_cert(leaf, intermediates, name, &[], UnixTime::now())
            .err()
            .map(|error| Refusal::of(&error))
    }
}

fn version_refused(floor: TlsVersion, version: Option<ProtocolVersion>) -> Option<Refusal> {
    version
        .is_some_and(|v| !floor.admits(v))
        .then_some(Refusal::TlsVersion)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_errors_map_to_the_reasons_operators_read() {
        let cert = |e| rustls::Error::InvalidCertificate(e);
        assert_eq!(
            Refusal::of(&cert(CertificateError::Revoked)),
            Refusal::Revoked
        );
        assert_eq!(
            Refusal::of(&cert(CertificateError::ApplicationVerificationFailure)),
            Refusal::NotAllowed
        );
        assert_eq!(
            Refusal::of(&cert(CertificateError::UnknownIssuer)),
            Refusal::CaChanged
        );
        assert_eq!(
            Refusal::of(&cert(CertificateError::BadSignature)),
            Refusal::CaChanged
        );
        assert_eq!(
            Refusal::of(&cert(CertificateError::Expired)),
            Refusal::Expired
        );
    }

    #[test]
    fn a_tls12_connection_is_refused_under_a_tls13_floor() {
        let v12 = Some(ProtocolVersion::TLSv1_2);
        let v13 = Some(ProtocolVersion::TLSv1_3);
        assert_eq!(
            version_refused(TlsVersion::Tls13, v12),
            Some(Refusal::TlsVersion)
        );
        assert_eq!(version_refused(TlsVersion::Tls13, v13), None);
        assert_eq!(version_refused(TlsVersion::Tls12, v12), None);
    }
}
