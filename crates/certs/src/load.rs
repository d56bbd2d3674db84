//! PEM (and, for CRLs, DER) files into rustls types. Files are read whole first so that an I/O error
//! and a parse error are told apart, and both name the file.

use std::fs;
use std::path::Path;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::RootCertStore;

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
        .map_err(|source| CertError::Pem {
            what,
            path: path.to_owned(),
            source,
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
        source => CertError::Pem {
            what: "private key",
            path: path.to_owned(),
            source,
        },
    })
}

/// The trust anchors in a CA bundle. Every certificate in the file must be usable as one.
pub(crate) fn roots_from(
    path: &Path,
    certs: impl IntoIterator<Item = CertificateDer<'static>>,
) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|source| CertError::BadCa {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
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
                crls.push(crl.map_err(|source| CertError::Pem {
                    what: "CRL",
                    path: path.to_owned(),
                    source,
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
        for crl in &crls[before..] {
            x509_parser::parse_x509_crl(crl.as_ref()).map_err(|e| CertError::BadCrl {
                path: path.to_owned(),
                source: rustls::Error::General(format!("not a valid X.509 CRL: {e}")),
            })?;
        }
    }
    Ok(crls)
}
