//! What can go wrong with a side's TLS files ([`CertError`], with a hint for the operator), and
//! [`error_chain`], which prints any error with its causes on one line.

use std::io;
use std::path::PathBuf;

use crate::malformed::{KeyProblem, PemProblem, X509Kind, X509Problem};

/// Why a certificate, key, CA or CRL file could not be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {}: no PEM {expected} block found (is this the right file?)", path.display())]
    NoPem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{what} {}: {problem}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        problem: PemProblem,
    },
    /// A PEM block (or DER CRL file) whose data is not a well-formed X.509 certificate or CRL.
    #[error("{what} {}: {}{problem}", path.display(), block_of(*block))]
    Malformed {
        what: &'static str,
        path: PathBuf,
        /// Which block of the file, counting from 1, when the file holds more than one.
        block: Option<usize>,
        problem: X509Problem,
    },
    /// A CRL the verifier cannot use, though it is well-formed X.509.
    #[error("CRL {}: {}{problem}", path.display(), block_of(*block))]
    Crl {
        path: PathBuf,
        /// Which block of the file, counting from 1, when the file holds more than one.
        block: Option<usize>,
        /// Why, in words.
        problem: String,
    },
    /// Our own private key is of a kind or size TLS here cannot use.
    #[error("private key {}: {problem}", path.display())]
    UnusableKey { path: PathBuf, problem: KeyProblem },
    #[error("CA file {}: {source}", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("private key {}: cannot be used for TLS: {source}", path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("private key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("certificate {} expired at {not_after} (now {now}); renew it with step-ca", path.display())]
    Expired {
        path: PathBuf,
        not_after: String,
        now: String,
    },
    #[error("certificate {} is not valid before {not_before} (now {now}); check the clock", path.display())]
    NotYetValid {
        path: PathBuf,
        not_before: String,
        now: String,
    },
    #[error("certificate {} does not verify against the CA in {}: {}", cert.display(), ca.display(), refusal(reason))]
    Chain {
        cert: PathBuf,
        ca: PathBuf,
        /// webpki's reason, as rustls reports it.
        reason: rustls::Error,
    },
    #[error("certificate {} has no {usage} extended key usage, which its role needs", path.display())]
    WrongUsage { path: PathBuf, usage: &'static str },
    #[error("building the TLS configuration")]
    Tls(#[source] rustls::Error),
}

impl CertError {
    /// What an operator should try, for `--check` and start-up messages.
    pub fn hint(&self) -> &'static str {
        match self {
            CertError::Read { .. } => "check the path in the config and that this user may read the file",
            CertError::NoPem { .. } | CertError::Pem { .. } => {
                "the file should hold PEM blocks as step-ca writes them (-----BEGIN CERTIFICATE----- ...)"
            }
            CertError::Malformed { problem, .. } => match problem.kind {
                X509Kind::Certificate => "re-issue the certificate with step-ca, or copy the whole file again",
                X509Kind::Crl => "the CRL must be a PEM or DER X.509 CRL from the Phoenix CA: fetch it again",
            },
            CertError::Crl { .. } => {
                "publish a version 2 CRL with a CRL Number extension (step-ca's CRL is one); fetch it again, or fix the tool that made it"
            }
            CertError::UnusableKey { problem: KeyProblem::RsaTooSmall { .. }, .. } => {
                "issue a new certificate with an ECDSA P-256 key (step-ca's default) or an RSA key of at least 2048 bits"
            }
            CertError::UnusableKey { .. } => {
                "use an ECDSA (P-256 or P-384), Ed25519 or RSA (2048 bits or more) key, as step-ca issues by default"
            }
            CertError::BadCa { .. } => "ca must hold the Phoenix root CA certificate (phoenix_root_ca.crt)",
            CertError::BadKey { .. } => "the key must be PKCS#8, SEC1 EC or PKCS#1 RSA PEM",
            CertError::KeyMismatch { .. } => {
                "cert and key come from different issuances: install the matching pair (did a renewal write only one?)"
            }
            CertError::Expired { .. } => "renew it: step ca renew --force <crt> <key>, then systemctl reload",
            CertError::NotYetValid { .. } => "check this machine's clock (timedatectl) and step-ca's",
            CertError::Chain { .. } => {
                "the certificate must be issued by the CA in ca, with the intermediate appended after the leaf"
            }
            CertError::WrongUsage { .. } => "issue it with the right extended key usage (step-ca's default template has both)",
            CertError::Tls(_) => "see the error; this is a TLS configuration problem",
        }
    }
}

/// Why webpki refused our own chain, in words, ending with rustls' name for the reason so that
/// it can be looked up. A reason with no words here keeps rustls' own message.
fn refusal(error: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(reason) = error else {
        return error.to_string();
    };
    #[allow(deprecated)] // rustls still reports the bare UnsupportedSignatureAlgorithm.
    let (words, name) = match reason {
        C::UnknownIssuer => (
            "no certificate in that file issued it, directly or through the intermediate after the leaf",
            "UnknownIssuer",
        ),
        C::BadSignature => ("a signature in the chain does not verify", "BadSignature"),
        C::Expired | C::ExpiredContext { .. } => (
            "a certificate in the chain (the intermediate?) has expired",
            "Expired",
        ),
        C::NotValidYet | C::NotValidYetContext { .. } => (
            "a certificate in the chain (the intermediate?) is not valid yet",
            "NotValidYet",
        ),
        C::Revoked => ("a certificate in the chain is revoked", "Revoked"),
        C::BadEncoding => (
            "a certificate in the chain is not well-formed X.509",
            "BadEncoding",
        ),
        C::UnhandledCriticalExtension => (
            "a certificate in the chain has a critical extension that cannot be checked",
            "UnhandledCriticalExtension",
        ),
        C::UnsupportedSignatureAlgorithm
        | C::UnsupportedSignatureAlgorithmContext { .. }
        | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => (
            "a certificate in the chain is signed with an algorithm this build does not support",
            "UnsupportedSignatureAlgorithm",
        ),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => (
            "its extended key usage does not allow the role it is used in",
            "InvalidPurpose",
        ),
        _ => return error.to_string(),
    };
    format!("{words} ({name})")
}

/// `"PEM block 2: "` for a file with several blocks, nothing for a file with one.
fn block_of(block: Option<usize>) -> String {
    block.map_or(String::new(), |n| format!("PEM block {n}: "))
}

/// An error and its sources, `outer: inner: root`, for one log field or message line. It lives in
/// the lowest crate every sidecar crate depends on, since this crate's reloader logs with it too.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        out.push_str(": ");
        out.push_str(&e.to_string());
        current = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_chain_is_said_in_words_with_rustls_name_for_it() {
        let error = CertError::Chain {
            cert: PathBuf::from("/etc/leaf.crt"),
            ca: PathBuf::from("/etc/ca.crt"),
            reason: rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnsupportedSignatureAlgorithmContext {
                    signature_algorithm_id: vec![6, 8, 42, 134],
                    supported_algorithms: Vec::new(),
                },
            ),
        };
        assert_eq!(
            error_chain(&error),
            "certificate /etc/leaf.crt does not verify against the CA in /etc/ca.crt: a certificate \
             in the chain is signed with an algorithm this build does not support \
             (UnsupportedSignatureAlgorithm)"
        );
        let unknown = CertError::Chain {
            cert: PathBuf::from("/etc/leaf.crt"),
            ca: PathBuf::from("/etc/ca.crt"),
            reason: rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        };
        assert!(
            error_chain(&unknown).ends_with(
                ": no certificate in that file issued it, directly or through the intermediate \
                 after the leaf (UnknownIssuer)"
            ),
            "{unknown}"
        );
    }

    #[test]
    fn the_chain_names_every_cause_in_order() {
        let error = CertError::Read {
            what: "CA file",
            path: PathBuf::from("/etc/ca.crt"),
            source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
        };
        assert_eq!(
            error_chain(&error),
            "reading CA file /etc/ca.crt: no such file"
        );
    }
}
