//! A throwaway PKI shaped like step-ca's: a root, an intermediate that signs every leaf, leaves
//! carrying the chain leaf-then-intermediate. Used by `phoenix-mesh demo`, the tests and the benches;
//! never by a running sidecar.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;

pub use rcgen::{Error, PublicKeyData, SignatureAlgorithm, PKCS_RSA_SHA256};

/// Which extended key usages a leaf carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// clientAuth only.
    Client,
    /// serverAuth only.
    Server,
    /// serverAuth and clientAuth, as step-ca's default template issues.
    Both,
    /// No extended key usage extension at all.
    None,
}

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Subject common name.
    pub common_name: String,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// URI SANs.
    pub uris: Vec<String>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
    /// Extended key usages.
    pub usage: Usage,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl LeafSpec {
    /// A leaf named `name` (CN and DNS SAN), valid from an hour ago for `lifetime`, both usages.
    pub fn new(name: &str, lifetime: Duration) -> Self {
        let now = SystemTime::now();
        LeafSpec {
            common_name: name.to_owned(),
            dns: vec![name.to_owned()],
            uris: Vec::new(),
            ips: Vec::new(),
            usage: Usage::Both,
            not_before: now - Duration::from_secs(3600),
            not_after: now + lifetime,
        }
    }
}

/// An issued leaf.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// PEM chain: the leaf, then the intermediate.
    pub chain_pem: String,
    /// PEM PKCS#8 private key.
    pub key_pem: String,
    /// DER of the leaf alone.
    pub der: Vec<u8>,
    /// Serial number (for CRLs).
    pub serial: u64,
}

/// A root and an intermediate CA.
pub struct Pki {
    root_pem: String,
    intermediate_pem: String,
    intermediate: Issuer<'static, KeyPair>,
    serial: AtomicU64,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

fn odt(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

impl Pki {
    /// A new root (`<name> Root CA`) and intermediate (`<name> Intermediate CA`), valid for ten years.
    pub fn new(name: &str) -> Result<Self, Error> {
        let now = SystemTime::now();
        let ten_years = Duration::from_secs(10 * 365 * 24 * 3600);

        let mut root_params = CertificateParams::new(Vec::<String>::new())?;
        root_params.distinguished_name = dn(&format!("{name} Root CA"), name);
        root_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        root_params.not_before = odt(now - Duration::from_secs(3600));
        root_params.not_after = odt(now + ten_years);
        let root_key = KeyPair::generate()?;
        let root_cert = root_params.self_signed(&root_key)?;
        let root = Issuer::new(root_params, root_key);

        let mut int_params = CertificateParams::new(Vec::<String>::new())?;
        int_params.distinguished_name = dn(&format!("{name} Intermediate CA"), name);
        int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        int_params.not_before = odt(now - Duration::from_secs(3600));
        int_params.not_after = odt(now + ten_years);
        let int_key = KeyPair::generate()?;
        let int_cert = int_params.signed_by(&int_key, &root)?;

        Ok(Pki {
            root_pem: root_cert.pem(),
            intermediate_pem: int_cert.pem(),
            intermediate: Issuer::new(int_params, int_key),
            serial: AtomicU64::new(1000),
        })
    }

    /// The root certificate, PEM: what `ca =` points at.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The intermediate certificate, PEM.
    pub fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    /// Issues a leaf from the intermediate.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Leaf, Error> {
        let key = KeyPair::generate()?;
        let mut leaf = self.issue_for(spec, &key)?;
        leaf.key_pem = key.serialize_pem();
        Ok(leaf)
    }

    /// Issues a leaf from the intermediate for a public key whose private key is not at hand (a
    /// key no TLS provider here would load, such as RSA-1024); its `key_pem` is empty.
    pub fn issue_for(&self, spec: &LeafSpec, key: &impl PublicKeyData) -> Result<Leaf, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name.clone());
        for name in &spec.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.clone().try_into()?));
        }
        for uri in &spec.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.clone().try_into()?));
        }
        for ip in &spec.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match spec.usage {
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Usage::None => Vec::new(),
        };
        params.use_authority_key_identifier_extension = true;
        params.not_before = odt(spec.not_before);
        params.not_after = odt(spec.not_after);
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        params.serial_number = Some(SerialNumber::from(serial));
        let cert = params.signed_by(key, &self.intermediate)?;
        Ok(Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.intermediate_pem),
            key_pem: String::new(),
            der: cert.der().to_vec(),
            serial,
        })
    }

    /// A PEM CRL from the intermediate revoking `serials`, valid for a day.
    pub fn crl(&self, serials: &[u64]) -> Result<String, Error> {
        let now = SystemTime::now();
        let params = CertificateRevocationListParams {
            this_update: odt(now - Duration::from_secs(60)),
            next_update: odt(now + Duration::from_secs(24 * 3600)),
            crl_number: SerialNumber::from(self.serial.fetch_add(1, Ordering::Relaxed)),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: odt(now - Duration::from_secs(30)),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.intermediate)?.pem()
    }
}

fn dn(cn: &str, org: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    dn
}
