//! An *inventory* is what a side's loaded TLS material holds, read once when it is loaded: our chain
//! (subject, names, serial, validity of each certificate), the trust anchors of `ca`, and each CRL
//! (issuer, this and next update, number, entries). `/certs` and `--check` show it; it never changes
//! what is trusted.

use std::path::PathBuf;
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use x509_parser::objects::oid_registry;

use crate::identity::{rfc4514, to_system_time};
use crate::malformed::{X509Kind, X509Problem};
use crate::{CertError, PeerIdentity, TlsFiles};

/// One certificate, as an operator compares it with `openssl x509 -noout -text`.
pub type CertSummary = PeerIdentity;

/// One certificate revocation list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlSummary {
    /// The file it was read from (a file may hold several).
    pub file: PathBuf,
    /// Its issuer, in RFC 4514 order.
    pub issuer: String,
    /// When it was issued (`thisUpdate`).
    pub this_update: SystemTime,
    /// When the next one is due (`nextUpdate`), if it says.
    pub next_update: Option<SystemTime>,
    /// Its CRL number extension, in decimal, if it has one.
    pub number: Option<String>,
    /// How many certificates it revokes.
    pub entries: usize,
}

/// What loaded material holds, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    /// The files it was read from.
    pub files: TlsFiles,
    /// Our chain as `cert` holds it: the leaf first, then the intermediates.
    pub chain: Vec<CertSummary>,
    /// The certificates of `ca`.
    pub trust_anchors: Vec<CertSummary>,
    /// Every CRL of `crls`, in file order.
    pub crls: Vec<CrlSummary>,
}

impl Inventory {
    /// Reads `files`' already parsed contents: `chain` from `cert`, `anchors` from `ca`, and the CRLs
    /// of each file of `crls` in order. Fails only on what loading has already checked, naming the
    /// file all the same.
    pub(crate) fn read(
        files: &TlsFiles,
        chain: &[CertificateDer<'_>],
        anchors: &[CertificateDer<'_>],
        crls: &[(PathBuf, Vec<CertificateRevocationListDer<'_>>)],
    ) -> Result<Self, CertError> {
        let summaries = |what: &'static str, path: &PathBuf, certs: &[CertificateDer<'_>]| {
            certs
                .iter()
                .enumerate()
                .map(|(i, der)| {
                    PeerIdentity::from_der(der).map_err(|e| CertError::Malformed {
                        what,
                        path: path.clone(),
                        block: (certs.len() > 1).then_some(i + 1),
                        problem: e.0,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let mut inventory = Inventory {
            files: files.clone(),
            chain: summaries("certificate", &files.cert, chain)?,
            trust_anchors: summaries("CA file", &files.ca, anchors)?,
            crls: Vec::new(),
        };
        for (file, list) in crls {
            for (i, der) in list.iter().enumerate() {
                let (_, crl) = x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| {
                    CertError::Malformed {
                        what: "CRL",
                        path: file.clone(),
                        block: (list.len() > 1).then_some(i + 1),
                        problem: X509Problem::explain(X509Kind::Crl, der.as_ref(), &e),
                    }
                })?;
                inventory.crls.push(CrlSummary {
                    file: file.clone(),
                    issuer: rfc4514(crl.issuer(), oid_registry()),
                    this_update: to_system_time(crl.last_update().timestamp()),
                    next_update: crl.next_update().map(|t| to_system_time(t.timestamp())),
                    number: crl.crl_number().map(ToString::to_string),
                    entries: crl.iter_revoked_certificates().count(),
                });
            }
        }
        Ok(inventory)
    }

    /// Our leaf.
    pub fn leaf(&self) -> Option<&CertSummary> {
        self.chain.first()
    }
}
