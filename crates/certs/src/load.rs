//! PEM (and, for CRLs, DER) files into rustls types. Files are read whole first so that an I/O error
//! and a parse error are told apart, and both name the file.

use std::fs;
use std::path::Path;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::malformed::{PemProblem, X509Kind, X509Problem};
use crate::CertError;

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn certs_from(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| CertError::Pem {
            what,
            path: path.to_owned(),
            problem: PemProblem::from(&error),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoPem {
            what,
            path: path.to_owned(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// A certificate chain: the leaf first, then the intermediates (as step-ca writes it).
pub(crate) fn load_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    certs_from("certificate", path)
}

/// A private key: PKCS#8, SEC1 EC or PKCS#1 RSA, in PEM.
pub(crate) fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = read("private key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| match source {
        pem::Error::NoItemsFound => CertError::NoPem {
            what: "private key",
            path: path.to_owned(),
            expected: "PRIVATE KEY (PKCS#8), EC PRIVATE KEY or RSA PRIVATE KEY",
        },
        error => CertError::Pem {
            what: "private key",
            path: path.to_owned(),
            problem: PemProblem::from(&error),
        },
    })
}

/// The trust anchors in a CA bundle. Every certificate in the file must be usable as one.
pub(crate) fn roots_from(
    path: &Path,
    certs: &[CertificateDer<'static>],
) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone()).map_err(|source| {
            // A certificate that is not well-formed X.509 is the better explanation of the two.
            malformed_certificate("CA file", path, certs).unwrap_or_else(|| CertError::BadCa {
                path: path.to_owned(),
                source,
            })
        })?;
    }
    Ok(roots)
}

/// The first of `certs` (read from `path`) that is not a well-formed X.509 certificate, as the
/// error that says so. Used to explain a refusal by webpki, whose own reasons are terse.
pub(crate) fn malformed_certificate(
    what: &'static str,
    path: &Path,
    certs: &[CertificateDer<'_>],
) -> Option<CertError> {
    certs.iter().enumerate().find_map(|(i, der)| {
        X509Problem::of_certificate(der).map(|problem| CertError::Malformed {
            what,
            path: path.to_owned(),
            block: block(i, certs.len()),
            problem,
        })
    })
}

/// Block `index` (from 0) of `total`, counted from 1, named only when there is more than one.
fn block(index: usize, total: usize) -> Option<usize> {
    (total > 1).then_some(index + 1)
}

/// Certificate revocation lists, each file PEM (`X509 CRL`) or raw DER.
pub(crate) fn load_crls(
    paths: &[impl AsRef<Path>],
) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    let mut crls = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let bytes = read("CRL", path)?;
        let before = crls.len();
        if bytes.first() == Some(&0x30) {
            crls.push(CertificateRevocationListDer::from(bytes));
        } else {
            for crl in CertificateRevocationListDer::pem_slice_iter(&bytes) {
                crls.push(crl.map_err(|error| CertError::Pem {
                    what: "CRL",
                    path: path.to_owned(),
                    problem: PemProblem::from(&error),
                })?);
            }
        }
        if crls.len() == before {
            return Err(CertError::NoPem {
                what: "CRL",
                path: path.to_owned(),
                expected: "X509 CRL",
            });
        }
        // Parse now so a broken CRL is reported with its file, not at the first handshake.
        let total = crls.len() - before;
        for (i, crl) in crls[before..].iter().enumerate() {
            x509_parser::parse_x509_crl(crl.as_ref()).map_err(|e| CertError::Malformed {
                what: "CRL",
                path: path.to_owned(),
                block: block(i, total),
                problem: X509Problem::explain(X509Kind::Crl, crl.as_ref(), &e),
            })?;
        }
    }
    Ok(crls)
}
