//! The benchmark's throwaway PKI: ECDSA P-256 keys and ecdsa-with-SHA256 signatures, one server
//! certificate for `traefik.internal.test` (and 127.0.0.1) and one client certificate, written as the
//! files nginx, HAProxy and phoenix-mesh read.
//!
//! Two shapes (`--pki`): `root` (the default) signs both leaves with the root, as the reference
//! measurements in BENCHMARKS.md were made, so handshake costs stay comparable with them; `step-ca`
//! adds an intermediate that signs the leaves and travels in each leaf's chain file, as the Phoenix
//! homelab's step-ca issues them (one more certificate to send and verify in each direction).

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Which certificate authorities sign the leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// The root signs the leaves directly.
    Root,
    /// A root and an intermediate, the intermediate signs the leaves (step-ca's shape).
    StepCa,
}

/// The files [`generate`] writes into its directory.
pub const ROOT: &str = "phoenix_root_ca.crt";

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Phoenix Bench");
    dn.push(DnType::CommonName, cn);
    dn
}

fn validity(p: &mut CertificateParams) {
    // Fixed, wide validity: the PKI is regenerated every run, and the dates cost nothing in a handshake.
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2040, 1, 1);
}

fn write(dir: &Path, name: &str, text: &str, private: bool) -> anyhow::Result<()> {
    let path = dir.join(name);
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    if private {
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Writes a fresh PKI into `dir`: `phoenix_root_ca.crt`, `server.crt`/`.key`/`.pem` (certificate
/// chain then key, HAProxy's `crt` format), `client.crt`/`.key`/`.pem`, and `KIND`.
pub fn generate(dir: &Path, shape: Shape) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut root = CertificateParams::new(Vec::<String>::new())?;
    root.distinguished_name = dn("Phoenix Root CA");
    root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut root);
    let root_key = KeyPair::generate()?;
    let root_cert = root.self_signed(&root_key)?;
    let root = Issuer::new(root, root_key);

    // The issuer of the leaves and the certificates that follow a leaf in its chain file.
    let (issuer, chain_tail) = match shape {
        Shape::Root => (root, String::new()),
        Shape::StepCa => {
            let mut int = CertificateParams::new(Vec::<String>::new())?;
            int.distinguished_name = dn("Phoenix Intermediate CA");
            int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            int.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            validity(&mut int);
            let int_key = KeyPair::generate()?;
            let int_cert = int.signed_by(&int_key, &root)?;
            (Issuer::new(int, int_key), int_cert.pem())
        }
    };

    let leaf = |name: &str, cn: &str, san: SanType, usage: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name = dn(cn);
        p.subject_alt_names = vec![san];
        if usage == ExtendedKeyUsagePurpose::ServerAuth {
            p.subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        }
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        let chain = format!("{}{chain_tail}", cert.pem());
        let key = key.serialize_pem();
        write(dir, &format!("{name}.crt"), &chain, false)?;
        write(dir, &format!("{name}.key"), &key, true)?;
        write(dir, &format!("{name}.pem"), &format!("{chain}{key}"), true)?;
        anyhow::Ok(())
    };
    leaf(
        "server",
        "traefik.internal.test",
        SanType::DnsName("traefik.internal.test".try_into()?),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    leaf(
        "client",
        "nginx-gateway-client",
        SanType::DnsName("nginx.internal.test".try_into()?),
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    write(dir, ROOT, &root_cert.pem(), false)?;
    let kind = match shape {
        Shape::Root => "ecdsa-p256 root\n",
        Shape::StepCa => "ecdsa-p256 root+intermediate\n",
    };
    write(dir, "KIND", kind, false)?;
    Ok(())
}
