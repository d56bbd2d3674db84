//! rustls configurations for both ends of the mesh link, and the listener's peer policy.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use tracing::info;

use crate::verified_chains::{chain_key, VerifiedChains, Window};
use crate::{provider, CertError, Material, PeerIdentity};

/// ALPN protocols both ends offer: HTTP/2 first so the link multiplexes when it can.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The lowest TLS version a side accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only (the default).
    #[default]
    Tls13,
}

/// A `min_tls_version` that is neither `"1.2"` nor `"1.3"`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not \"1.2\" or \"1.3\"")]
pub struct UnknownTlsVersion(String);

impl std::str::FromStr for TlsVersion {
    type Err = UnknownTlsVersion;

    /// `"1.2"` or `"1.3"`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "1.3" => Ok(TlsVersion::Tls13),
            "1.2" => Ok(TlsVersion::Tls12),
            other => Err(UnknownTlsVersion(other.to_owned())),
        }
    }
}

impl TlsVersion {
    /// Whether a connection that negotiated `version` is at or above this floor.
    pub fn admits(self, version: rustls::ProtocolVersion) -> bool {
        match self {
            TlsVersion::Tls13 => version == rustls::ProtocolVersion::TLSv1_3,
            TlsVersion::Tls12 => matches!(
                version,
                rustls::ProtocolVersion::TLSv1_3 | rustls::ProtocolVersion::TLSv1_2
            ),
        }
    }

    fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        static TLS13_ONLY: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        static TLS12_UP: [&SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        match self {
            TlsVersion::Tls13 => &TLS13_ONLY,
            TlsVersion::Tls12 => &TLS12_UP,
        }
    }
}

/// What the listener's configuration needs besides its material.
#[derive(Debug, Clone, Default)]
pub struct ServerTlsOptions {
    /// Identities allowed in (DNS SAN, URI SAN or CN, exact); empty allows any chained certificate.
    pub allowed_peers: Vec<String>,
    /// Lowest TLS version accepted.
    pub min_version: TlsVersion,
}

/// What the client's configuration needs besides its material.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsOptions {
    /// Lowest TLS version offered.
    pub min_version: TlsVersion,
    /// Offer HTTP/2 through ALPN (else HTTP/1.1 only).
    pub http2: bool,
}

/// The session cache and ticket key of a listener; kept across a reload that leaves the trust policy
/// alone, replaced when it changes.
#[derive(Clone)]
pub(crate) struct ServerResumption {
    storage: Arc<dyn rustls::server::StoresServerSessions>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
}

impl ServerResumption {
    pub(crate) fn new() -> Result<Self, CertError> {
        Ok(ServerResumption {
            storage: ServerSessionMemoryCache::new(4096),
            ticketer: provider::ticketer().map_err(CertError::Tls)?,
        })
    }
}

/// The listener's configuration, and the client verifier in it, which re-checks established
/// connections (see [`crate::recheck`]).
pub(crate) fn build_server_config(
    material: &Material,
    options: &ServerTlsOptions,
    resumption: &ServerResumption,
) -> Result<(Arc<ServerConfig>, Arc<dyn ClientCertVerifier>), CertError> {
    let provider = provider::provider();
    let inner =
        WebPkiClientVerifier::builder_with_provider(material.roots.clone(), provider.clone())
            .with_crls(material.crls.iter().cloned())
            // step-ca's CRL comes from the intermediate and covers leaves; nobody publishes one for
            // the intermediate itself, so checking the whole chain would refuse every certificate.
            // A leaf whose issuer has no CRL among `crls` is still refused (unknown status).
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| CertError::Tls(rustls::Error::General(format!("client verifier: {e}"))))?;
    let verifier: Arc<dyn ClientCertVerifier> = Arc::new(PeerPolicy {
        inner,
        allowed: options.allowed_peers.clone(),
        verified: VerifiedChains::default(),
        refusals: RefusalLines::default(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(options.min_version.versions())
        .map_err(CertError::Tls)?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .map_err(CertError::Tls)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    config.session_storage = resumption.storage.clone();
    config.ticketer = resumption.ticketer.clone();
    // Our order (AES-128-GCM first, see provider) rather than the client's.
    config.ignore_client_order = true;
    // One ticket per handshake is enough for a client that reconnects one connection at a time
    // and saves an encryption per handshake; a pool of parallel connections gets one each.
    config.send_tls13_tickets = 1;
    Ok((Arc::new(config), verifier))
}

/// The client's configuration: our chain presented, the listener verified against `ca` and CRLs.
/// The name is checked per connection against the configured `server_name`.
pub fn client_config(
    material: &Material,
    options: &ClientTlsOptions,
) -> Result<Arc<ClientConfig>, CertError> {
    build_client_config(material, options, None).map(|(config, _)| config)
}

/// The client's configuration, and the listener verifier in it, which re-checks established
/// connections (see [`crate::recheck`]).
pub(crate) fn build_client_config(
    material: &Material,
    options: &ClientTlsOptions,
    resumption: Option<rustls::client::Resumption>,
) -> Result<(Arc<ClientConfig>, Arc<WebPkiServerVerifier>), CertError> {
    let provider = provider::provider();
    let verifier =
        WebPkiServerVerifier::builder_with_provider(material.roots.clone(), provider.clone())
            .with_crls(material.crls.iter().cloned())
            // step-ca's CRL comes from the intermediate and covers leaves; nobody publishes one for
            // the intermediate itself, so checking the whole chain would refuse every certificate.
            // A leaf whose issuer has no CRL among `crls` is still refused (unknown status).
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| CertError::Tls(rustls::Error::General(format!("server verifier: {e}"))))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(options.min_version.versions())
        .map_err(CertError::Tls)?
        .with_webpki_verifier(verifier.clone())
        .with_client_auth_cert(material.chain.clone(), material.key.clone_key())
        .map_err(CertError::Tls)?;
    let offered = if options.http2 { &ALPN[..] } else { &ALPN[1..] };
    config.alpn_protocols = offered.iter().map(|p| p.to_vec()).collect();
    if let Some(resumption) = resumption {
        config.resumption = resumption;
    }
    Ok((Arc::new(config), verifier))
}

/// rustls' own client verifier first, then our policy: the clientAuth usage must be present (webpki
/// accepts a certificate with no extended key usage at all) and the identity must be allowed. A chain
/// that passed all of it is remembered for as long as its certificates are valid (see `verified_chains`).
#[derive(Debug)]
struct PeerPolicy {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
    verified: VerifiedChains,
    refusals: RefusalLines,
}

/// The smallest RSA key the listener accepts from a client, as aws-lc-rs verifies signatures
/// (`RSA_PSS_2048_8192_*`, `RSA_PKCS1_2048_8192_*`): a smaller key would fail its CertificateVerify as
/// a "bad signature", which names the wrong cause.
pub const MIN_RSA_BITS: usize = 2048;

/// A client certificate whose RSA key is smaller than [`MIN_RSA_BITS`]; refused by name.
#[derive(Debug, thiserror::Error)]
#[error("the client certificate's RSA key has {bits} bits; at least 2048 are required")]
pub struct KeyTooSmall {
    /// The key's modulus size.
    pub bits: usize,
}

/// The longest text out of a certificate (in characters) that reaches a log line; longer is cut.
const LOGGED_CHARS: usize = 256;

/// At most [`LOGGED_CHARS`] of `text`.
pub(crate) fn bounded(text: &str) -> &str {
    match text.char_indices().nth(LOGGED_CHARS) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

/// The first few entries of `names`, each [`bounded`].
fn bounded_list(names: &[String]) -> Vec<&str> {
    names.iter().take(8).map(|n| bounded(n)).collect()
}

/// The verifier's own refusal lines (the identity a policy refused), at most one per reason per
/// [`REFUSAL_LINE_INTERVAL`]: a peer may present a certificate of our CA it does not hold the key of,
/// as often as it likes. The listener's own line for each failed handshake, rate-limited with a
/// count of those it left out, and the metrics, count every one.
#[derive(Debug, Default)]
struct RefusalLines {
    last: parking_lot::Mutex<Vec<(&'static str, std::time::Instant)>>,
}

/// How often the verifier names a refused identity, per reason.
const REFUSAL_LINE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl RefusalLines {
    /// Runs `line` unless a line for `reason` was written within the interval.
    fn log(&self, reason: &'static str, line: impl FnOnce()) {
        let now = std::time::Instant::now();
        {
            let mut last = self.last.lock();
            match last.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, at)) if now.duration_since(*at) < REFUSAL_LINE_INTERVAL => return,
                Some((_, at)) => *at = now,
                None => last.push((reason, now)),
            }
        }
        line();
    }
}

impl ClientCertVerifier for PeerPolicy {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key = chain_key(end_entity, intermediates);
        if self.verified.contains(&key, now) {
            return Ok(ClientCertVerified::assertion());
        }
        // The chain first, and nothing read out of the certificate before it verifies: anyone who
        // reaches the port can present any certificate, and reading its names costs time in
        // proportion to what the stranger chose to put in them. A refusal here is logged by the
        // listener, once per reason per interval, with the reason alone.
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = match PeerIdentity::from_der(end_entity) {
            Ok(id) => id,
            Err(error) => {
                self.refusals.log("unparseable", || {
                    info!(%error, "client certificate refused: unparseable");
                });
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::BadEncoding,
                ));
            }
        };
        if let Some(bits) = id.rsa_bits.filter(|&bits| bits < MIN_RSA_BITS) {
            self.refusals.log("key-too-small", || {
                info!(
                    peer.id = bounded(id.name()),
                    peer.subject = bounded(&id.subject),
                    bits,
                    reason = "RSA key too small",
                    "client certificate refused"
                );
            });
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(KeyTooSmall { bits })),
            )));
        }
        if !id.client_auth {
            self.refusals.log("wrong-usage", || {
                info!(
                    peer.id = bounded(id.name()),
                    peer.subject = bounded(&id.subject),
                    reason = "no clientAuth extended key usage",
                    "client certificate refused"
                );
            });
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose,
            ));
        }
        if !self.allowed.is_empty() && !id.matches_any(&self.allowed) {
            self.refusals.log("not-allowed", || {
                info!(peer.id = bounded(id.name()), peer.subject = bounded(&id.subject),
                    peer.dns = ?bounded_list(&id.dns), peer.uris = ?bounded_list(&id.uris),
                    reason = "not in allowed_peers", "client certificate refused");
            });
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        if let Some(window) = Window::of(end_entity, intermediates) {
            self.verified.insert(key, window);
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether a TLS alert from the peer refuses the certificate we presented (or our presenting none):
/// the one table of such alerts, which the client's error codes and the metrics' reasons both read.
pub fn refuses_our_certificate(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
    )
}

/// A short, stable reason for a failed handshake, for metrics labels.
pub fn failure_reason(error: &rustls::Error) -> &'static str {
    use rustls::{AlertDescription as A, Error as E};
    match error {
        E::NoCertificatesPresented => "no-certificate",
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown-ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not-yet-valid"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong-usage"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "wrong-name"
            }
            CertificateError::ApplicationVerificationFailure => "not-allowed",
            CertificateError::Other(other) if other.0.downcast_ref::<KeyTooSmall>().is_some() => {
                "key-too-small"
            }
            _ => "bad-certificate",
        },
        E::AlertReceived(A::CertificateRequired) => "peer-wants-certificate",
        E::AlertReceived(alert) if refuses_our_certificate(*alert) => "peer-refused-certificate",
        E::AlertReceived(_) => "alert",
        E::InvalidMessage(_) => "not-tls",
        E::PeerIncompatible(_) | E::NoApplicationProtocol => "incompatible",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::AlertDescription as A;

    /// Every alert rustls knows by name, each with whether it refuses our certificate.
    const ALERTS: &[(A, bool)] = &[
        (A::CloseNotify, false),
        (A::UnexpectedMessage, false),
        (A::BadRecordMac, false),
        (A::DecryptionFailed, false),
        (A::RecordOverflow, false),
        (A::DecompressionFailure, false),
        (A::HandshakeFailure, false),
        (A::NoCertificate, false),
        (A::BadCertificate, true),
        (A::UnsupportedCertificate, true),
        (A::CertificateRevoked, true),
        (A::CertificateExpired, true),
        (A::CertificateUnknown, true),
        (A::IllegalParameter, false),
        (A::UnknownCA, true),
        (A::AccessDenied, true),
        (A::DecodeError, false),
        (A::DecryptError, false),
        (A::ExportRestriction, false),
        (A::ProtocolVersion, false),
        (A::InsufficientSecurity, false),
        (A::InternalError, false),
        (A::InappropriateFallback, false),
        (A::UserCanceled, false),
        (A::NoRenegotiation, false),
        (A::MissingExtension, false),
        (A::UnsupportedExtension, false),
        (A::CertificateUnobtainable, false),
        (A::UnrecognisedName, false),
        (A::BadCertificateStatusResponse, false),
        (A::BadCertificateHashValue, false),
        (A::UnknownPSKIdentity, false),
        (A::CertificateRequired, true),
        (A::NoApplicationProtocol, false),
        (A::EncryptedClientHelloRequired, false),
    ];

    #[test]
    fn text_out_of_a_certificate_is_cut_to_256_characters() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(60 * 1024);
        assert_eq!(bounded(&long).chars().count(), LOGGED_CHARS);
        let names: Vec<String> = (0..100).map(|i| format!("n{i}")).collect();
        assert_eq!(bounded_list(&names).len(), 8);
    }

    #[test]
    fn a_refusal_line_is_written_once_per_reason_per_interval() {
        let lines = RefusalLines::default();
        let mut written = Vec::new();
        for reason in ["not-allowed", "not-allowed", "wrong-usage", "not-allowed"] {
            lines.log(reason, || written.push(reason));
        }
        assert_eq!(written, ["not-allowed", "wrong-usage"]);
    }

    #[test]
    fn alert_table() {
        for &(alert, refuses) in ALERTS {
            assert_eq!(refuses_our_certificate(alert), refuses, "{alert:?}");
            let reason = failure_reason(&rustls::Error::AlertReceived(alert));
            let expected = match alert {
                A::CertificateRequired => "peer-wants-certificate",
                _ if refuses => "peer-refused-certificate",
                _ => "alert",
            };
            assert_eq!(reason, expected, "{alert:?}");
        }
        assert!(!refuses_our_certificate(A::Unknown(0xff)));
    }
}
