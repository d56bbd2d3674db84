//! A side's TLS material, loaded from its files and checked the way start-up and reload need.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use crate::identity::fmt_time;
use crate::malformed::KeyProblem;
use crate::{load, provider, CertError, Inventory, PeerIdentity};

/// The files a side's TLS material comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM roots the peer's certificate must chain to.
    pub ca: PathBuf,
    /// CRLs (PEM or DER) checked against the peer's chain.
    pub crls: Vec<PathBuf>,
}

/// Which end of the mTLS link the certificate is for; decides the extended key usage it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The client sidecar: its certificate authenticates a TLS client.
    Client,
    /// The mesh listener: its certificate authenticates a TLS server.
    Server,
}

/// Loaded and checked TLS material.
#[derive(Debug)]
pub struct Material {
    /// Where it was read from.
    pub files: TlsFiles,
    /// Our chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Our private key.
    pub key: PrivateKeyDer<'static>,
    /// Roots for verifying the peer.
    pub roots: Arc<RootCertStore>,
    /// Revocation lists for verifying the peer.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// What our own leaf says.
    pub leaf: PeerIdentity,
    /// SHA-256 over the CA certificates and CRLs: the trust policy, compared across reloads.
    pub trust_fingerprint: String,
    /// What it holds, in words: chain, trust anchors, CRLs.
    pub inventory: Arc<Inventory>,
}

impl Material {
    /// Reads every file and checks it: PEM present, key matching the leaf, leaf in date, chain
    /// verifying against `ca` for `role`. Every error names the file.
    pub fn load(files: &TlsFiles, role: Role) -> Result<Self, CertError> {
        Self::load_at(files, role, SystemTime::now())
    }

    /// [`Material::load`] with an explicit "now".
    fn load_at(files: &TlsFiles, role: Role, now: SystemTime) -> Result<Self, CertError> {
        let chain = load::load_cert_chain(&files.cert)?;
        let key = load::load_private_key(&files.key)?;
        let ca_certs = load::certs_from("CA file", &files.ca)?;
        let roots = Arc::new(load::roots_from(&files.ca, &ca_certs)?);
        let crl_files = files
            .crls
            .iter()
            .map(|path| Ok((path.clone(), load::load_crls(&[path], &roots)?)))
            .collect::<Result<Vec<_>, CertError>>()?;
        let crls: Vec<_> = crl_files
            .iter()
            .flat_map(|(_, list)| list.iter().cloned())
            .collect();

        let leaf = PeerIdentity::from_der(&chain[0]).map_err(|e| CertError::Malformed {
            what: "certificate",
            path: files.cert.clone(),
            block: (chain.len() > 1).then_some(1),
            problem: e.0,
        })?;

        let provider = provider::provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|source| match KeyProblem::of(&key) {
                Some(problem) => CertError::UnusableKey {
                    path: files.key.clone(),
                    problem,
                },
                None => CertError::BadKey {
                    path: files.key.clone(),
                    source,
                },
            })?;
        match CertifiedKey::new(chain.clone(), signing_key).keys_match() {
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(_) => {
                return Err(CertError::KeyMismatch {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                })
            }
        }

        if now < leaf.not_before {
            return Err(CertError::NotYetValid {
                path: files.cert.clone(),
                not_before: fmt_time(leaf.not_before),
                now: fmt_time(now),
            });
        }
        if now > leaf.not_after {
            return Err(CertError::Expired {
                path: files.cert.clone(),
                not_after: fmt_time(leaf.not_after),
                now: fmt_time(now),
            });
        }

        let unix_now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        // An intermediate that is not well-formed X.509 is the better explanation of a refusal.
        let chain_err = |reason: rustls::Error| {
            load::malformed_certificate("certificate", &files.cert, &chain).unwrap_or_else(|| {
                CertError::Chain {
                    cert: files.cert.clone(),
                    ca: files.ca.clone(),
                    reason,
                }
            })
        };
        match role {
            Role::Server => {
                let parsed = ParsedCertificate::try_from(&chain[0]).map_err(chain_err)?;
                verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    &roots,
                    &chain[1..],
                    unix_now,
                    provider.signature_verification_algorithms.all,
                )
                .map_err(chain_err)?;
                if !leaf.server_auth && has_eku(&chain[0]) {
                    return Err(CertError::WrongUsage {
                        path: files.cert.clone(),
                        usage: "serverAuth",
                    });
                }
            }
            Role::Client => {
                // webpki would reject a serverAuth-only leaf as a chain error; say what it is.
                if !leaf.client_auth {
                    return Err(CertError::WrongUsage {
                        path: files.cert.clone(),
                        usage: "clientAuth",
                    });
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.clone(),
                    provider.clone(),
                )
                .build()
                .map_err(|e| CertError::BadCa {
                    path: files.ca.clone(),
                    source: rustls::Error::General(e.to_string()),
                })?;
                verifier
                    .verify_client_cert(&chain[0], &chain[1..], unix_now)
                    .map_err(chain_err)?;
                if !leaf.client_auth {
                    return Err(CertError::WrongUsage {
                        path: files.cert.clone(),
                        usage: "clientAuth",
                    });
                }
            }
        }

        let mut trust = Vec::new();
        for der in ca_certs
            .iter()
            .map(|c| c.as_ref())
            .chain(crls.iter().map(|c| c.as_ref()))
        {
            trust.extend_from_slice(&(der.len() as u64).to_be_bytes());
            trust.extend_from_slice(der);
        }
        let inventory = Arc::new(Inventory::read(files, &chain, &ca_certs, &crl_files)?);
        Ok(Material {
            trust_fingerprint: provider::sha256_hex(&trust),
            inventory,
            files: files.clone(),
            chain,
            key,
            roots,
            crls,
            leaf,
        })
    }
}

fn has_eku(der: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, c)| c.extended_key_usage().ok().flatten().map(|_| ()))
        .is_some()
}

impl Material {
    /// What a `--check` says about loaded material: one (what, detail) pair per verified property,
    /// with what `/certs` shows of each certificate and CRL.
    pub fn describe(&self, now: SystemTime) -> Vec<(String, String)> {
        let leaf = &self.leaf;
        let left = leaf.remaining(now);
        let lifetime = leaf.lifetime().as_secs().max(1);
        let inventory = &self.inventory;
        let mut lines = vec![(
            format!("certificate {}", self.files.cert.display()),
            format!(
                "{} (DNS {:?}, URI {:?}, IP {:?}), serial {}, valid from {} until {}, {} left ({}% of its lifetime)",
                leaf.subject,
                leaf.dns,
                leaf.uris,
                leaf.ips,
                leaf.serial,
                fmt_time(leaf.not_before),
                fmt_time(leaf.not_after),
                human(left.as_secs()),
                left.as_secs() * 100 / lifetime
            ),
        )];
        for (i, cert) in inventory.chain.iter().enumerate().skip(1) {
            lines.push((
                format!("intermediate {i} in {}", self.files.cert.display()),
                summary(cert),
            ));
        }
        lines.push((
            format!("private key {}", self.files.key.display()),
            "matches the certificate".into(),
        ));
        lines.push((
            format!("chain to CA {}", self.files.ca.display()),
            format!(
                "verifies ({} intermediate(s) sent, {} root(s) trusted, {} CRL(s))",
                self.chain.len() - 1,
                self.roots.len(),
                self.crls.len()
            ),
        ));
        for anchor in &inventory.trust_anchors {
            lines.push((
                format!("trust anchor in {}", self.files.ca.display()),
                summary(anchor),
            ));
        }
        for crl in &inventory.crls {
            lines.push((
                format!("CRL {}", crl.file.display()),
                format!(
                    "issuer {}, number {}, this update {}, next update {}, {} revoked",
                    crl.issuer,
                    crl.number.as_deref().unwrap_or("(none)"),
                    fmt_time(crl.this_update),
                    crl.next_update.map_or_else(|| "(none)".into(), fmt_time),
                    crl.entries
                ),
            ));
        }
        lines
    }
}

/// A certificate other than our leaf, on one line.
fn summary(cert: &PeerIdentity) -> String {
    format!(
        "{}, issuer {}, serial {}, valid from {} until {}",
        cert.subject,
        cert.issuer,
        cert.serial,
        fmt_time(cert.not_before),
        fmt_time(cert.not_after)
    )
}

/// `3h12m`, `2d4h`, `45s`.
pub fn human(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}
