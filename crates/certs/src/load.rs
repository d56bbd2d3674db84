//! PEM (and, for CRLs, DER) files into rustls types. Files are read whole first so that an I/O error
//! and a parse error are told apart, and both name the file.

use std::fs;
use std::path::Path;

use rustls::pki_types::pem::{self, PemObject};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{CertRevocationListError, RootCertStore};

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

/// Certificate revocation lists, each file PEM (`X509 CRL`) or raw DER. Each CRL is parsed twice
/// here, so that a broken one is reported with its file rather than when the TLS configuration is
/// built: by x509-parser, whose errors say what part is malformed, and by the very parser the
/// verifier uses (rustls' verifier builder, one CRL at a time), which is stricter (it refuses a CRL
/// without extensions, for one).
pub(crate) fn load_crls(
    paths: &[impl AsRef<Path>],
    roots: &Arc<RootCertStore>,
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
            let (_, parsed) =
                x509_parser::parse_x509_crl(crl.as_ref()).map_err(|e| CertError::Malformed {
                    what: "CRL",
                    path: path.to_owned(),
                    block: block(i, total),
                    problem: X509Problem::explain(X509Kind::Crl, crl.as_ref(), &e),
                })?;
            let built = WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                crate::provider::provider(),
            )
            .with_crls([crl.clone()])
            .build();
            if let Err(VerifierBuilderError::InvalidCrl(reason)) = built {
                return Err(CertError::Crl {
                    path: path.to_owned(),
                    block: block(i, total),
                    problem: crl_problem(&reason, &parsed),
                });
            }
        }
    }
    Ok(crls)
}

/// Why the verifier's parser refused a CRL that x509-parser read (`crl`), in words, ending with
/// rustls' name for the reason.
fn crl_problem(
    reason: &CertRevocationListError,
    crl: &x509_parser::revocation_list::CertificateRevocationList<'_>,
) -> String {
    use CertRevocationListError as E;
    let words = match reason {
        E::UnsupportedCrlVersion => {
            "it is not a version 2 CRL; only version 2 CRLs (with the CRL Number extension, as \
             RFC 5280 requires) are supported"
        }
        E::ParseError if crl.extensions().is_empty() => {
            "it has no extensions, so no CRL Number extension; RFC 5280 requires one in every \
             CRL, and the verifier refuses a CRL without it"
        }
        E::ParseError => "the verifier cannot parse it (an extension or date it does not accept)",
        E::InvalidCrlNumber => "its CRL Number is not a positive integer of at most 20 bytes",
        E::UnsupportedDeltaCrl => "it is a delta CRL; only complete CRLs are supported",
        E::UnsupportedIndirectCrl => {
            "it is an indirect CRL; only CRLs from the issuing CA are supported"
        }
        E::UnsupportedCriticalExtension => "it has a critical extension the verifier does not know",
        E::UnsupportedRevocationReason => "it lists a revocation reason the verifier does not know",
        E::InvalidRevokedCertSerialNumber => "it lists a revoked serial number that is not valid",
        _ => return format!("the verifier refuses it ({reason:?})"),
    };
    format!("{words} ({reason:?})")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::error_chain;
    use crate::test_pem::{CERT_PEM, CRL_PEM, CRL_V1_PEM};

    /// Trust anchors for the CRL checks: the sample CA.
    fn roots() -> Arc<RootCertStore> {
        let (_dir, path) = file("ca.pem", CERT_PEM);
        let certs = certs_from("CA file", &path).unwrap();
        Arc::new(roots_from(&path, &certs).unwrap())
    }

    /// `data` written as `name` in a fresh directory, which lives as long as the returned guard.
    fn file(name: &str, data: impl AsRef<[u8]>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        fs::write(&path, data).unwrap();
        (dir, path)
    }

    /// The first PEM block of `pem` with only its first `lines` lines of base64: well-formed PEM
    /// (64 characters of base64 are 48 whole bytes) around data that is cut short.
    fn cut_block(pem: &str, lines: usize) -> String {
        let mut text = pem.lines();
        let begin = text.next().unwrap();
        let body: Vec<&str> = text.take(lines).collect();
        let end = begin.replace("BEGIN", "END");
        format!("{begin}\n{}\n{end}\n", body.join("\n"))
    }

    /// The line an operator reads for `error` names `path`, says `says`, and shows no internals.
    fn assert_in_words(error: &CertError, path: &Path, says: &str) {
        let line = error_chain(error);
        let path = path.display().to_string();
        assert!(
            line.contains(&path) && line.contains(says),
            "should name the file and say {says:?}: {line}"
        );
        // The temporary directory's random name is no internal, whatever letters it has.
        let words = line.replace(&path, "");
        for internal in [
            "[67, 69",
            "NomError",
            "Parsing Error",
            "Eof",
            "InvalidCharacter",
            "missing section end",
            "base64 decode error",
        ] {
            assert!(!words.contains(internal), "{internal:?} in {line}");
        }
    }

    #[test]
    fn a_certificate_file_cut_short_ends_inside_its_block() {
        let (_dir, path) = file("cert.pem", &CERT_PEM[..CERT_PEM.len() / 2]);
        let error = load_cert_chain(&path).unwrap_err();
        assert_in_words(&error, &path, ": the file ends inside a CERTIFICATE block");
    }

    #[test]
    fn a_certificate_file_with_broken_base64_says_so() {
        let (_dir, path) = file("cert.pem", CERT_PEM.replacen("MIIB", "MI!B", 1));
        let error = load_cert_chain(&path).unwrap_err();
        assert_in_words(
            &error,
            &path,
            ": the text inside a PEM block is not valid base64",
        );
    }

    #[test]
    fn a_private_key_cut_short_ends_inside_its_block() {
        let key = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH\n";
        let (_dir, path) = file("key.pem", key);
        let error = load_private_key(&path).unwrap_err();
        assert_in_words(&error, &path, ": the file ends inside a PRIVATE KEY block");
    }

    #[test]
    fn a_ca_file_holding_half_a_certificate_says_it_is_not_complete() {
        let (_dir, path) = file("ca.pem", cut_block(CERT_PEM, 3));
        let certs = certs_from("CA file", &path).unwrap();
        let error = roots_from(&path, &certs).unwrap_err();
        assert!(matches!(error, CertError::Malformed { .. }), "{error:?}");
        assert_in_words(
            &error,
            &path,
            ": not a complete X.509 certificate: its data ends before the certificate does",
        );
        assert!(error_chain(&error).starts_with("CA file "), "{error}");

        let (_dir, whole) = file("ca.pem", CERT_PEM);
        let certs = certs_from("CA file", &whole).unwrap();
        assert_eq!(roots_from(&whole, &certs).unwrap().len(), 1);
    }

    #[test]
    fn the_block_is_named_when_the_file_holds_several() {
        let (_dir, path) = file("ca.pem", format!("{CERT_PEM}{}", cut_block(CERT_PEM, 3)));
        let certs = certs_from("CA file", &path).unwrap();
        let error = roots_from(&path, &certs).unwrap_err();
        assert_in_words(
            &error,
            &path,
            ": PEM block 2: not a complete X.509 certificate",
        );
    }

    #[test]
    fn a_crl_cut_short_says_it_is_not_complete() {
        let der = CertificateRevocationListDer::from_pem_slice(CRL_PEM.as_bytes()).unwrap();
        let (_dir, path) = file("crl.der", &der[..der.len() - 10]);
        let error = load_crls(&[&path], &roots()).unwrap_err();
        assert_in_words(&error, &path, "CRL");
        assert_in_words(&error, &path, ": not a complete X.509 CRL");

        let (_dir, path) = file("crl.pem", cut_block(CRL_PEM, 2));
        let error = load_crls(&[&path], &roots()).unwrap_err();
        assert_in_words(&error, &path, ": not a complete X.509 CRL");

        let (_dir, whole) = file("crl.pem", CRL_PEM);
        assert_eq!(load_crls(&[&whole], &roots()).unwrap().len(), 1);
    }

    #[test]
    fn a_crl_without_extensions_is_refused_with_its_file_and_why() {
        // x509-parser reads it; the verifier's parser refuses it, and did so only when the TLS
        // configuration was built, naming no file.
        let (_dir, path) = file("old.crl", CRL_V1_PEM);
        let error = load_crls(&[&path], &roots()).unwrap_err();
        assert!(matches!(error, CertError::Crl { .. }), "{error:?}");
        assert_in_words(
            &error,
            &path,
            ": it has no extensions, so no CRL Number extension",
        );
        assert!(error_chain(&error).starts_with("CRL "), "{error}");
        assert!(error.hint().contains("CRL Number"), "{}", error.hint());

        // The second file of two is the one named.
        let (_dir, good) = file("good.crl", CRL_PEM);
        let error = load_crls(&[&good, &path], &roots()).unwrap_err();
        assert_in_words(&error, &path, "(ParseError)");
    }
}
