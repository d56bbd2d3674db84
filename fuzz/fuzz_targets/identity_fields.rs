//! Peer identity from real certificates whose names are chosen by the fuzzer: subject attributes
//! (any UTF-8, including `"`, `\`, `,`, `;`, `=`, controls), DNS and URI SANs. Random DER rarely
//! parses, so this target signs a genuine certificate per input (one key pair, made once) and checks
//! that the identity reads the names back and that its XFCC value escapes them correctly.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use phoenix_mesh_certs::PeerIdentity;
use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair, SanType};

#[path = "../src/xfcc.rs"]
mod xfcc;

#[derive(Debug, Arbitrary)]
struct Names {
    common_name: Option<String>,
    attrs: Vec<(u8, String)>,
    dns: Vec<String>,
    uris: Vec<String>,
    ips: Vec<[u8; 4]>,
}

fn key() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| KeyPair::generate().expect("key pair"))
}

fuzz_target!(|names: Names| {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(cn) = &names.common_name {
        dn.push(DnType::CommonName, DnValue::Utf8String(cn.clone()));
    }
    for (which, value) in names.attrs.iter().take(6) {
        let ty = match which % 4 {
            0 => DnType::OrganizationName,
            1 => DnType::OrganizationalUnitName,
            2 => DnType::LocalityName,
            _ => DnType::CustomDnType(vec![1, 3, 6, 1, 4, 1, 55555, u64::from(*which)]),
        };
        dn.push(ty, DnValue::Utf8String(value.clone()));
    }
    params.distinguished_name = dn;
    for d in names.dns.iter().take(4) {
        if let Ok(s) = d.clone().try_into() {
            params.subject_alt_names.push(SanType::DnsName(s));
        }
    }
    for u in names.uris.iter().take(4) {
        if let Ok(s) = u.clone().try_into() {
            params.subject_alt_names.push(SanType::URI(s));
        }
    }
    for ip in names.ips.iter().take(2) {
        params
            .subject_alt_names
            .push(SanType::IpAddress((*ip).into()));
    }
    let Ok(cert) = params.self_signed(key()) else {
        return;
    };
    let id = PeerIdentity::from_der(cert.der()).expect("rcgen's certificate must parse");
    // rcgen orders DistinguishedName entries itself, so compare the CN, not the whole subject.
    assert_eq!(id.common_name, names.common_name, "{id:?}");
    xfcc::check_identity(&id);
});
