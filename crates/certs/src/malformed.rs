//! What is wrong with a file that is not well-formed, in an operator's words. A *problem* here is
//! one sentence saying what is wrong with the text or the data ("the file ends inside a CERTIFICATE
//! block", "not a complete X.509 certificate"): [`PemProblem`] for the PEM layer, [`X509Problem`]
//! for the DER inside it. Both are built by matching the parsers' error variants (and, for a DER
//! that is cut short, its own outer length), never their display text, which prints internals
//! (byte arrays, nom error kinds).

use std::fmt;

use rustls::pki_types::pem;
use x509_parser::der_parser::error::BerError;
use x509_parser::error::X509Error;
use x509_parser::nom;

/// Why PEM text could not be read, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PemProblem {
    /// The text ends after a BEGIN line without its END line: a truncated or half-written file.
    EndsInsideBlock {
        /// The block's label (`CERTIFICATE`, `PRIVATE KEY`).
        label: String,
    },
    /// A line starting with `-----BEGIN ` is not a well-formed BEGIN line.
    BadBeginLine {
        /// The label between `-----BEGIN ` and `-----`, when the line has one. Nothing else of
        /// the line is kept: in a key file, text after the label may be key material.
        label: Option<String>,
    },
    /// The text between a BEGIN and an END line is not base64.
    BadBase64,
    /// A block larger than the PEM reader accepts.
    TooLarge,
    /// Anything the PEM reader may report in a later version.
    Other,
}

/// The longest label quoted back; anything longer is not a label.
const LONGEST_LABEL: usize = 64;

impl From<&pem::Error> for PemProblem {
    fn from(error: &pem::Error) -> Self {
        match error {
            pem::Error::MissingSectionEnd { end_marker } => PemProblem::EndsInsideBlock {
                label: String::from_utf8_lossy(end_marker).into_owned(),
            },
            pem::Error::IllegalSectionStart { line } => PemProblem::BadBeginLine {
                label: line
                    .strip_prefix(b"-----BEGIN ")
                    .and_then(|rest| {
                        let end = rest.windows(5).position(|w| w == b"-----")?;
                        Some(&rest[..end])
                    })
                    .filter(|label| label.len() <= LONGEST_LABEL)
                    .map(|label| String::from_utf8_lossy(label).into_owned()),
            },
            pem::Error::Base64Decode(_) => PemProblem::BadBase64,
            pem::Error::SectionTooLarge => PemProblem::TooLarge,
            _ => PemProblem::Other,
        }
    }
}

impl fmt::Display for PemProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PemProblem::EndsInsideBlock { label } => write!(
                f,
                "the file ends inside a {label} block, before its -----END {label}----- line \
                 (cut short, or still being written?)"
            ),
            PemProblem::BadBeginLine { label: Some(label) } => write!(
                f,
                "the BEGIN line of a {label} block is malformed: it must read -----BEGIN {label}----- \
                 on a line of its own"
            ),
            PemProblem::BadBeginLine { label: None } => f.write_str(
                "a line starting with -----BEGIN is not a complete -----BEGIN <LABEL>----- line",
            ),
            PemProblem::BadBase64 => f.write_str(
                "the text inside a PEM block is not valid base64 (damaged or edited by hand?)",
            ),
            PemProblem::TooLarge => f.write_str("a PEM block is larger than 256 MB"),
            PemProblem::Other => f.write_str("the PEM text is malformed"),
        }
    }
}

/// What kind of X.509 object a DER block should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum X509Kind {
    /// A certificate.
    Certificate,
    /// A certificate revocation list.
    Crl,
}

impl fmt::Display for X509Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            X509Kind::Certificate => "certificate",
            X509Kind::Crl => "CRL",
        })
    }
}

/// What is wrong with the DER data that should be an X.509 certificate or CRL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum X509Fault {
    /// No data at all.
    Empty,
    /// The data does not start with the DER SEQUENCE every X.509 object is.
    NotDer,
    /// The data ends before the structure it declares does.
    CutShort,
    /// One part is malformed; names the part.
    Part(&'static str),
    /// One kind of entry appears twice; names it.
    Duplicate(&'static str),
    /// The DER structure is not an X.509 one.
    Structure,
}

/// Why DER data is not a usable X.509 certificate or CRL, in words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct X509Problem {
    /// What the data should have been.
    pub kind: X509Kind,
    /// What is wrong with it.
    pub fault: X509Fault,
}

impl X509Problem {
    /// Explains why x509-parser refused `der`, which should hold a `kind`.
    pub(crate) fn explain(kind: X509Kind, der: &[u8], error: &nom::Err<X509Error>) -> Self {
        let fault = match structural_fault(der) {
            Some(fault) => fault,
            None => match error {
                nom::Err::Incomplete(_) => X509Fault::CutShort,
                nom::Err::Error(e) | nom::Err::Failure(e) => x509_fault(e),
            },
        };
        X509Problem { kind, fault }
    }

    /// Parses `der` as a certificate the way identities are read, and says why it is not one.
    pub(crate) fn of_certificate(der: &[u8]) -> Option<Self> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        X509Certificate::from_der(der)
            .err()
            .map(|e| X509Problem::explain(X509Kind::Certificate, der, &e))
    }
}

impl fmt::Display for X509Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind;
        match self.fault {
            X509Fault::Empty => write!(f, "not an X.509 {kind}: the PEM block holds no data"),
            X509Fault::NotDer => write!(
                f,
                "not an X.509 {kind}: the data is not DER (is this the right kind of block?)"
            ),
            X509Fault::CutShort => write!(
                f,
                "not a complete X.509 {kind}: its data ends before the {kind} does (cut short?)"
            ),
            X509Fault::Part(part) => {
                write!(f, "not a well-formed X.509 {kind}: its {part} is malformed")
            }
            X509Fault::Duplicate(entry) => {
                write!(
                    f,
                    "not a well-formed X.509 {kind}: it lists the same {entry} twice"
                )
            }
            X509Fault::Structure => write!(
                f,
                "not a well-formed X.509 {kind}: its DER structure is not an X.509 {kind}'s"
            ),
        }
    }
}

/// What the outer DER header alone shows: no data, no SEQUENCE, or a declared length running past
/// the end of the data (the data was cut short, whatever error the parser met first).
fn structural_fault(der: &[u8]) -> Option<X509Fault> {
    let Some((&tag, rest)) = der.split_first() else {
        return Some(X509Fault::Empty);
    };
    if tag != 0x30 {
        return Some(X509Fault::NotDer);
    }
    let Some((&first, rest)) = rest.split_first() else {
        return Some(X509Fault::CutShort);
    };
    let (declared, body) = if first & 0x80 == 0 {
        (usize::from(first), rest)
    } else {
        let octets = usize::from(first & 0x7f);
        // Indefinite (0) and absurd lengths are the parser's to report.
        if octets == 0 || octets > std::mem::size_of::<usize>() {
            return None;
        }
        if rest.len() < octets {
            return Some(X509Fault::CutShort);
        }
        let (len, body) = rest.split_at(octets);
        let declared = len
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (declared, body)
    };
    (body.len() < declared).then_some(X509Fault::CutShort)
}

/// Why our own private key cannot be used, when its kind or its size is the reason: what the
/// crypto provider's refusal ("failed to parse private key as RSA, ECDSA, or EdDSA") does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    /// An RSA key smaller than 2048 bits, which the provider refuses to sign with.
    RsaTooSmall {
        /// Its modulus size.
        bits: usize,
    },
    /// A kind of key the provider cannot sign with.
    Unsupported {
        /// What kind (`a DSA key`, `an Ed448 key`, `an EC key on curve 1.3.132.0.10`).
        kind: String,
    },
}

impl fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyProblem::RsaTooSmall { bits } => write!(
                f,
                "an RSA key of {bits} bits is too small: RSA keys need at least 2048 bits"
            ),
            KeyProblem::Unsupported { kind } => write!(
                f,
                "{kind} is not supported: the key must be ECDSA (P-256, P-384 or P-521), Ed25519 \
                 or RSA (2048 bits or more)"
            ),
        }
    }
}

impl KeyProblem {
    /// What is wrong with `key`'s kind or size, if that is what is wrong with it. SEC1 keys, and
    /// anything not parsed here, are left to the provider's own error.
    pub(crate) fn of(key: &rustls::pki_types::PrivateKeyDer<'_>) -> Option<Self> {
        use rustls::pki_types::PrivateKeyDer;
        match key {
            PrivateKeyDer::Pkcs1(rsa) => rsa_problem(rsa.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(pkcs8) => pkcs8_problem(pkcs8.secret_pkcs8_der()),
            _ => None,
        }
    }
}

/// An RSAPrivateKey (PKCS#1) whose modulus is smaller than 2048 bits.
fn rsa_problem(der: &[u8]) -> Option<KeyProblem> {
    let (_, key) = x509_parser::der_parser::parse_der(der).ok()?;
    let modulus = key.as_sequence().ok()?.get(1)?.as_slice().ok()?;
    let bits = crate::identity::modulus_bits(modulus);
    (bits < crate::tls::MIN_RSA_BITS).then_some(KeyProblem::RsaTooSmall { bits })
}

/// A PKCS#8 PrivateKeyInfo whose algorithm the provider cannot sign with, or a small RSA key.
fn pkcs8_problem(der: &[u8]) -> Option<KeyProblem> {
    let (_, info) = x509_parser::der_parser::parse_der(der).ok()?;
    let fields = info.as_sequence().ok()?;
    let algorithm = fields.get(1)?.as_sequence().ok()?;
    let oid = algorithm.first()?.as_oid().ok()?.to_id_string();
    let unsupported = |kind: &str| {
        Some(KeyProblem::Unsupported {
            kind: kind.to_owned(),
        })
    };
    match oid.as_str() {
        "1.2.840.113549.1.1.1" => rsa_problem(fields.get(2)?.as_slice().ok()?),
        "1.2.840.10045.2.1" => {
            let curve = algorithm.get(1)?.as_oid().ok()?.to_id_string();
            match curve.as_str() {
                // P-256, P-384, P-521.
                "1.2.840.10045.3.1.7" | "1.3.132.0.34" | "1.3.132.0.35" => None,
                other => unsupported(&format!("an EC key on curve {other}")),
            }
        }
        // Ed25519, and ML-DSA (2.16.840.1.101.3.4.3.x), which the provider signs with.
        "1.3.101.112" => None,
        ml_dsa if ml_dsa.starts_with("2.16.840.1.101.3.4.3.") => None,
        "1.3.101.113" => unsupported("an Ed448 key"),
        "1.2.840.10040.4.1" => unsupported("a DSA key"),
        "1.2.840.113549.1.1.10" => unsupported("an RSASSA-PSS key (a PSS-only RSA key)"),
        other => unsupported(&format!("a key of algorithm {other}")),
    }
}

fn x509_fault(error: &X509Error) -> X509Fault {
    use X509Fault::{Duplicate, Part};
    match error {
        X509Error::InvalidVersion => Part("version"),
        X509Error::InvalidSerial => Part("serial number"),
        X509Error::InvalidAlgorithmIdentifier => Part("algorithm identifier"),
        X509Error::InvalidX509Name => Part("issuer or subject name"),
        X509Error::InvalidDate => Part("validity period"),
        X509Error::InvalidSPKI => Part("public key"),
        X509Error::InvalidSubjectUID | X509Error::InvalidIssuerUID => Part("unique identifier"),
        X509Error::InvalidExtensions => Part("extensions list"),
        X509Error::InvalidAttributes => Part("attributes list"),
        X509Error::InvalidSignatureValue => Part("signature"),
        X509Error::InvalidTbsCertificate => Part("signed part (TBSCertificate)"),
        X509Error::InvalidUserCertificate => Part("list of revoked certificates"),
        X509Error::DuplicateExtensions => Duplicate("extension"),
        X509Error::DuplicateAttributes => Duplicate("attribute"),
        X509Error::NomError(nom::error::ErrorKind::Eof)
        | X509Error::Der(BerError::Incomplete(_))
        | X509Error::Der(BerError::NomError(nom::error::ErrorKind::Eof)) => X509Fault::CutShort,
        _ => X509Fault::Structure,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use crate::test_pem::{CERT_PEM, ED448_KEY_PEM, P256_KEY_PEM, RSA_1024_KEY_PEM};

    fn pem_problem(text: &str) -> PemProblem {
        let error = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap_err();
        PemProblem::from(&error)
    }

    fn der() -> Vec<u8> {
        CertificateDer::from_pem_slice(CERT_PEM.as_bytes())
            .unwrap()
            .to_vec()
    }

    fn x509_problem(der: &[u8]) -> X509Problem {
        X509Problem::of_certificate(der).expect("should not parse")
    }

    #[test]
    fn the_sample_certificate_is_whole() {
        assert_eq!(X509Problem::of_certificate(&der()), None);
    }

    #[test]
    fn a_pem_cut_short_ends_inside_its_block() {
        let cut = &CERT_PEM[..CERT_PEM.len() / 2];
        let problem = pem_problem(cut);
        assert_eq!(
            problem,
            PemProblem::EndsInsideBlock {
                label: "CERTIFICATE".into()
            }
        );
        let said = problem.to_string();
        assert!(
            said.starts_with("the file ends inside a CERTIFICATE block"),
            "{said}"
        );
        assert!(!said.contains("[67, 69"), "{said}");
    }

    #[test]
    fn a_pem_with_broken_base64_says_so() {
        let broken = CERT_PEM.replacen("MIIBjDCC", "MIIB!DCC", 1);
        let problem = pem_problem(&broken);
        assert_eq!(problem, PemProblem::BadBase64);
        assert!(
            problem.to_string().contains("not valid base64"),
            "{problem}"
        );
    }

    #[test]
    fn a_broken_begin_line_is_named_without_its_contents() {
        let short = CERT_PEM.replacen(
            "-----BEGIN CERTIFICATE-----",
            "-----BEGIN CERTIFICATE---",
            1,
        );
        let problem = pem_problem(&short);
        assert_eq!(problem, PemProblem::BadBeginLine { label: None });
        assert!(
            problem
                .to_string()
                .contains("not a complete -----BEGIN <LABEL>----- line"),
            "{problem}"
        );

        // The data glued to the BEGIN line, as when a file loses its line breaks: the label is
        // named, the data (key material, in a key file) is not repeated.
        let glued = CERT_PEM.replacen("-----\n", "-----", 1);
        let problem = pem_problem(&glued);
        assert_eq!(
            problem,
            PemProblem::BadBeginLine {
                label: Some("CERTIFICATE".into())
            }
        );
        let said = problem.to_string();
        assert!(
            said.contains("the BEGIN line of a CERTIFICATE block is malformed"),
            "{said}"
        );
        assert!(!said.contains("MIIB"), "{said}");
    }

    #[test]
    fn a_cut_short_private_key_names_its_label() {
        let key = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH\n";
        let error = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap_err();
        assert_eq!(
            PemProblem::from(&error),
            PemProblem::EndsInsideBlock {
                label: "PRIVATE KEY".into()
            }
        );
    }

    #[test]
    fn der_cut_short_is_not_a_complete_certificate() {
        let der = der();
        for cut in [1, 2, 3, 10, der.len() / 2, der.len() - 1] {
            let problem = x509_problem(&der[..cut]);
            assert_eq!(problem.fault, X509Fault::CutShort, "cut at {cut}");
            let said = problem.to_string();
            assert!(
                said.starts_with("not a complete X.509 certificate"),
                "{said}"
            );
            assert!(
                !said.contains("NomError") && !said.contains("Eof"),
                "{said}"
            );
        }
    }

    #[test]
    fn der_that_is_no_certificate_says_what_it_is_not() {
        assert_eq!(x509_problem(&[]).fault, X509Fault::Empty);
        assert_eq!(x509_problem(b"hello").fault, X509Fault::NotDer);
        // A complete DER SEQUENCE holding an INTEGER: DER, but not X.509.
        let problem = x509_problem(&[0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(
            matches!(problem.fault, X509Fault::Structure | X509Fault::Part(_)),
            "{problem:?}"
        );
        assert!(problem
            .to_string()
            .starts_with("not a well-formed X.509 certificate"));
    }

    #[test]
    fn a_damaged_inner_length_reads_as_cut_short_or_malformed_never_as_internals() {
        let mut der = der();
        // The outer length stays right; the TBSCertificate's own length claims one byte more.
        der[7] = der[7].wrapping_add(1);
        let said = x509_problem(&der).to_string();
        assert!(said.starts_with("not a"), "{said}");
        assert!(
            !said.contains("NomError") && !said.contains("Parsing Error"),
            "{said}"
        );
    }

    #[test]
    fn a_key_the_provider_refuses_is_named_by_its_kind_or_size() {
        let key = |pem: &str| PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        let small = KeyProblem::of(&key(RSA_1024_KEY_PEM));
        assert_eq!(small, Some(KeyProblem::RsaTooSmall { bits: 1024 }));
        let said = small.unwrap().to_string();
        assert!(said.contains("RSA key of 1024 bits is too small"), "{said}");

        let ed448 = KeyProblem::of(&key(ED448_KEY_PEM)).unwrap();
        assert!(
            ed448
                .to_string()
                .starts_with("an Ed448 key is not supported"),
            "{ed448}"
        );

        assert_eq!(KeyProblem::of(&key(P256_KEY_PEM)), None);
    }
}
