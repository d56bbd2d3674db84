use std::io;
use std::path::PathBuf;

use rustls::pki_types::pem;

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
    #[error("{what} {}: malformed PEM", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{what} {}: not a usable X.509 certificate: {reason}", path.display())]
    BadCertificate {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
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
    #[error("certificate {} does not verify against the CA in {}: {source}", cert.display(), ca.display())]
    Chain {
        cert: PathBuf,
        ca: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("certificate {} has no {usage} extended key usage, which its role needs", path.display())]
    WrongUsage { path: PathBuf, usage: &'static str },
    #[error("CRL {}: {source}", path.display())]
    BadCrl {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("building the TLS configuration")]
    Tls(#[source] rustls::Error),
}
