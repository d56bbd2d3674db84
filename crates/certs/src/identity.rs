//! Who a certificate names: subject, common name, DNS and URI SANs, its hash and validity, and the
//! `X-Forwarded-Client-Cert` value Envoy would give it.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::objects::oid_registry;
use x509_parser::oid_registry::OidRegistry;
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};

use crate::malformed::{X509Kind, X509Problem};

/// A certificate that could not be parsed as X.509; says why in words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IdentityError(pub(crate) X509Problem);

/// The identity a certificate carries, read once per handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Subject distinguished name in RFC 4514 order (`CN=a,O=b`).
    pub subject: String,
    /// Issuer distinguished name, written as `subject` is.
    pub issuer: String,
    /// The subject's first common name.
    pub common_name: Option<String>,
    /// DNS subject alternative names.
    pub dns: Vec<String>,
    /// URI subject alternative names (`spiffe://...`).
    pub uris: Vec<String>,
    /// IP address subject alternative names.
    pub ips: Vec<String>,
    /// Lowercase hex SHA-256 of the certificate's DER.
    pub sha256: String,
    /// The serial number, lowercase hex (what a CRL names when it revokes the certificate).
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether the certificate has an extended key usage extension listing clientAuth.
    pub client_auth: bool,
    /// Whether the certificate has an extended key usage extension listing serverAuth.
    pub server_auth: bool,
    /// The size of the certificate's RSA key in bits; `None` for any other kind of key.
    pub rsa_bits: Option<usize>,
}

impl PeerIdentity {
    /// Reads the identity out of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| IdentityError(X509Problem::explain(X509Kind::Certificate, der, &e)))?;
        let registry = oid_registry();
        let mut id = PeerIdentity {
            subject: rfc4514(cert.subject(), registry),
            issuer: rfc4514(cert.issuer(), registry),
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned),
            dns: Vec::new(),
            uris: Vec::new(),
            ips: Vec::new(),
            sha256: crate::provider::sha256_hex(der),
            serial: crate::provider::hex(cert.raw_serial()),
            not_before: to_system_time(cert.validity().not_before.timestamp()),
            not_after: to_system_time(cert.validity().not_after.timestamp()),
            client_auth: false,
            server_auth: false,
            rsa_bits: rsa_bits(cert.public_key()),
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => id.dns.push((*dns).to_owned()),
                    GeneralName::URI(uri) => id.uris.push((*uri).to_owned()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            id.ips.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        if let Ok(Some(eku)) = cert.extended_key_usage() {
            id.client_auth = eku.value.client_auth || eku.value.any;
            id.server_auth = eku.value.server_auth || eku.value.any;
        }
        Ok(id)
    }

    /// True when one entry of `allowed` equals a DNS SAN, a URI SAN or the common name exactly.
    pub fn matches_any(&self, allowed: &[String]) -> bool {
        allowed.iter().any(|entry| {
            self.dns.iter().any(|d| d == entry)
                || self.uris.iter().any(|u| u == entry)
                || self.common_name.as_deref() == Some(entry.as_str())
        })
    }

    /// A short name for logs: the first URI SAN, else the common name, else the first DNS SAN.
    pub fn name(&self) -> &str {
        self.uris
            .first()
            .or(self.common_name.as_ref())
            .or(self.dns.first())
            .map_or("(no name)", String::as_str)
    }

    /// The `X-Forwarded-Client-Cert` element for this certificate, in Envoy's format:
    /// `Hash=<hex>;Subject="CN=...";DNS=...;URI=...` (one `DNS=`/`URI=` per name).
    pub fn xfcc(&self) -> String {
        let mut out = String::with_capacity(96 + self.subject.len());
        out.push_str("Hash=");
        out.push_str(&self.sha256);
        out.push_str(";Subject=\"");
        escape_quoted(&mut out, &self.subject);
        out.push('"');
        for dns in &self.dns {
            out.push_str(";DNS=");
            push_value(&mut out, dns);
        }
        for uri in &self.uris {
            out.push_str(";URI=");
            push_value(&mut out, uri);
        }
        out
    }

    /// Time left until `not_after`, zero once expired.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    /// The full validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Whether the certificate is due for renewal at `now`: less than a third of its lifetime is left.
    /// step-ca's renewal timer renews at two thirds of the lifetime, so a certificate past that point
    /// means renewal is not running; every expiry warning and check in the mesh uses this one rule.
    pub fn renewal_due(&self, now: SystemTime) -> bool {
        self.remaining(now) < self.lifetime() / 3
    }
}

/// The earliest `notAfter` among the certificates of `chain` (leaf and intermediates): when the
/// chain stops being valid. `None` for an empty chain or one whose certificates do not parse.
pub fn chain_not_after(chain: &[CertificateDer<'_>]) -> Option<SystemTime> {
    chain
        .iter()
        .map(|der| {
            X509Certificate::from_der(der)
                .ok()
                .map(|(_, cert)| to_system_time(cert.validity().not_after.timestamp()))
        })
        .try_fold(None, |earliest: Option<SystemTime>, not_after| {
            let not_after = not_after?;
            Some(Some(earliest.map_or(not_after, |e| e.min(not_after))))
        })
        .flatten()
}

/// Values that contain XFCC's separators are quoted, as Envoy does.
fn push_value(out: &mut String, value: &str) {
    if value.contains([',', ';', '=', '"']) || value.chars().any(|c| c.is_ascii_control()) {
        out.push('"');
        escape_quoted(out, value);
        out.push('"');
    } else {
        out.push_str(value);
    }
}

fn escape_quoted(out: &mut String, value: &str) {
    for c in value.chars() {
        if c.is_ascii_control() {
            // Not allowed in a header value: RFC 4514's \XX hex form keeps it readable and lossless.
            let _ = write!(out, "\\{:02X}", c as u32);
            continue;
        }
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
}

/// RFC 4514: the most specific RDN first, attributes by their short names, special characters escaped.
pub(crate) fn rfc4514(name: &X509Name<'_>, registry: &OidRegistry<'_>) -> String {
    let mut out = String::new();
    for (i, rdn) in name
        .iter_rdn()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .enumerate()
    {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let key = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                .map(str::to_owned)
                .unwrap_or_else(|_| attr.attr_type().to_id_string());
            out.push_str(&key);
            out.push('=');
            match attr.as_str() {
                Ok(value) => {
                    let last = value.chars().count().saturating_sub(1);
                    for (k, c) in value.chars().enumerate() {
                        let edge = (k == 0 && (c == ' ' || c == '#')) || (k == last && c == ' ');
                        if c.is_ascii_control() {
                            let _ = write!(out, "\\{:02X}", c as u32);
                            continue;
                        }
                        if edge || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                }
                Err(_) => {
                    out.push('#');
                    for b in attr.as_slice() {
                        let _ = write!(out, "{b:02x}");
                    }
                }
            }
        }
    }
    out
}

/// Whether a DER certificate names itself as its issuer (a root CA's does); false when it does not
/// parse.
pub fn is_self_issued(der: &[u8]) -> bool {
    X509Certificate::from_der(der)
        .is_ok_and(|(_, cert)| cert.subject().as_raw() == cert.issuer().as_raw())
}

/// The size in bits of an RSA public key's modulus; `None` for any other key.
pub(crate) fn rsa_bits(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Option<usize> {
    match spki.parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => Some(modulus_bits(rsa.modulus)),
        _ => None,
    }
}

/// The bit length of a big-endian unsigned integer, leading zero bytes and bits not counted.
pub(crate) fn modulus_bits(modulus: &[u8]) -> usize {
    let digits = match modulus.iter().position(|&b| b != 0) {
        Some(first) => &modulus[first..],
        None => return 0,
    };
    digits.len() * 8 - digits[0].leading_zeros() as usize
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

pub(crate) fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

/// Formats a time as RFC 3339 UTC to the second (`2026-12-06T18:35:00Z`), for messages and reports.
pub fn fmt_time(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    match x509_parser::time::ASN1Time::from_timestamp(secs) {
        Ok(t) => {
            let dt = t.to_datetime();
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                dt.year(),
                u8::from(dt.month()),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second()
            )
        }
        Err(_) => format!("@{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(from: u64, to: u64) -> PeerIdentity {
        PeerIdentity {
            subject: String::new(),
            issuer: String::new(),
            common_name: None,
            dns: Vec::new(),
            uris: Vec::new(),
            ips: Vec::new(),
            sha256: String::new(),
            serial: String::new(),
            not_before: UNIX_EPOCH + Duration::from_secs(from),
            not_after: UNIX_EPOCH + Duration::from_secs(to),
            client_auth: false,
            server_auth: false,
            rsa_bits: None,
        }
    }

    #[test]
    fn an_rsa_modulus_is_measured_without_its_sign_byte() {
        assert_eq!(modulus_bits(&[]), 0);
        assert_eq!(modulus_bits(&[0, 0]), 0);
        let mut der_1024 = vec![0x00, 0xc3];
        der_1024.extend([0x11; 127]);
        assert_eq!(modulus_bits(&der_1024), 1024);
        let mut odd = vec![0x01];
        odd.extend([0xff; 255]);
        assert_eq!(modulus_bits(&odd), 2041);
    }

    #[test]
    fn renewal_is_due_once_less_than_a_third_of_the_lifetime_is_left() {
        let cert = valid(0, 300);
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        assert!(!cert.renewal_due(at(0)));
        assert!(!cert.renewal_due(at(200)), "exactly a third left");
        assert!(cert.renewal_due(at(201)));
        assert!(cert.renewal_due(at(400)), "expired");
    }
}
