//! The tests' PKI: a root and an intermediate as step-ca issues them, a second unrelated one, and
//! every kind of leaf the tests need, each named for what it is. Leaves are issued by the
//! intermediate and carry it in their chain; CRLs are signed by it too.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use phoenix_mesh_certs::pki::{
    Leaf, LeafSpec, Pki, PublicKeyData, SignatureAlgorithm, Usage, PKCS_RSA_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;

/// The name the listener's certificate carries (and the client's `server_name`).
pub const LISTENER_NAME: &str = "mesh.internal.thinkheads.ai";
/// The gateway client certificate's common name.
pub const GATEWAY_CN: &str = "nginx-gateway-client";
/// The gateway client certificate's DNS SAN.
pub const GATEWAY_DNS: &str = "nginx.internal.thinkheads.ai";
/// The gateway client certificate's URI SAN.
pub const GATEWAY_SPIFFE: &str = "spiffe://phoenix.internal/ns/gateway/sa/nginx";

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Our PKI, which both sidecars trust, and another one nobody trusts. The two have different names:
/// two PKIs with the same name would look like one CA with the wrong keys (a bad signature, not an
/// unknown CA).
pub struct TestPki {
    ours: Pki,
    other: Pki,
}

impl TestPki {
    pub fn new() -> Self {
        TestPki {
            ours: Pki::new("Phoenix Test").unwrap(),
            other: Pki::new("Somebody Else").unwrap(),
        }
    }

    /// Our root, PEM: what `ca =` points at on both sides.
    pub fn root_pem(&self) -> &str {
        self.ours.root_pem()
    }

    /// Our intermediate, PEM: the issuer of every leaf and CRL, usable as a trust anchor itself.
    pub fn intermediate_pem(&self) -> &str {
        self.ours.intermediate_pem()
    }

    /// The other PKI's root, PEM.
    pub fn other_root_pem(&self) -> &str {
        self.other.root_pem()
    }

    /// A PEM CRL from our intermediate revoking `serials` (none: a valid, empty CRL).
    pub fn crl(&self, serials: &[u64]) -> String {
        self.ours.crl(serials).unwrap()
    }

    // -- listener certificates -------------------------------------------------------------------

    /// The listener's certificate: serverAuth, DNS mesh.internal.thinkheads.ai and IP 127.0.0.1.
    pub fn listener_cert(&self) -> Leaf {
        self.ours.issue(&listener_spec()).unwrap()
    }

    /// A listener certificate that chains to a root the client does not trust.
    pub fn listener_cert_signed_by_other_ca(&self) -> Leaf {
        self.other.issue(&listener_spec()).unwrap()
    }

    /// A listener certificate that expired an hour ago.
    pub fn expired_listener_cert(&self) -> Leaf {
        self.ours.issue(&expired(listener_spec())).unwrap()
    }

    /// A listener certificate that expires `left` from now (issued an hour ago).
    pub fn listener_cert_expiring_in(&self, left: Duration) -> Leaf {
        self.ours
            .issue(&expiring_in(listener_spec(), left))
            .unwrap()
    }

    /// A listener certificate issued now for `lifetime` only (a few seconds, for the tests of what
    /// happens to connections as their certificates end).
    pub fn listener_cert_valid_for(&self, lifetime: Duration) -> Leaf {
        self.ours
            .issue(&short_lived(listener_spec(), lifetime))
            .unwrap()
    }

    /// A listener certificate valid only from tomorrow.
    pub fn not_yet_valid_listener_cert(&self) -> Leaf {
        self.ours.issue(&not_yet_valid(listener_spec())).unwrap()
    }

    /// A server certificate for `name` (the nginx front end in the e2e test).
    pub fn server_cert_for(&self, name: &str) -> Leaf {
        let mut spec = LeafSpec::new(name, DAY);
        spec.usage = Usage::Server;
        self.ours.issue(&spec).unwrap()
    }

    // -- client certificates ---------------------------------------------------------------------

    /// The gateway's client certificate: clientAuth, CN, DNS and SPIFFE URI SANs.
    pub fn client_cert(&self) -> Leaf {
        self.ours.issue(&gateway_spec()).unwrap()
    }

    /// The gateway identity, but issued by the other PKI's intermediate.
    pub fn client_cert_signed_by_other_ca(&self) -> Leaf {
        self.other.issue(&gateway_spec()).unwrap()
    }

    /// The gateway identity, expired an hour ago.
    pub fn expired_client_cert(&self) -> Leaf {
        self.ours.issue(&expired(gateway_spec())).unwrap()
    }

    /// The gateway identity, expiring `left` from now (issued an hour ago).
    pub fn client_cert_expiring_in(&self, left: Duration) -> Leaf {
        self.ours.issue(&expiring_in(gateway_spec(), left)).unwrap()
    }

    /// The gateway identity, issued now for `lifetime` only.
    pub fn client_cert_valid_for(&self, lifetime: Duration) -> Leaf {
        self.ours
            .issue(&short_lived(gateway_spec(), lifetime))
            .unwrap()
    }

    /// The gateway identity, valid only from tomorrow.
    pub fn not_yet_valid_client_cert(&self) -> Leaf {
        self.ours.issue(&not_yet_valid(gateway_spec())).unwrap()
    }

    /// The gateway identity with serverAuth as its only extended key usage.
    pub fn server_only_client_cert(&self) -> Leaf {
        let mut spec = gateway_spec();
        spec.usage = Usage::Server;
        self.ours.issue(&spec).unwrap()
    }

    /// The gateway identity with no extended key usage extension at all.
    pub fn client_cert_without_eku(&self) -> Leaf {
        let mut spec = gateway_spec();
        spec.usage = Usage::None;
        self.ours.issue(&spec).unwrap()
    }

    /// A client certificate from the other PKI whose common name is `cn`, of any length.
    pub fn client_cert_signed_by_other_ca_named(&self, cn: &str) -> Leaf {
        let mut spec = LeafSpec::new(cn, DAY);
        spec.dns = vec![GATEWAY_DNS.to_owned()];
        spec.usage = Usage::Client;
        self.other.issue(&spec).unwrap()
    }

    /// The gateway identity with an RSA key of 1024 bits, from our intermediate. No TLS provider
    /// here loads such a key, so the leaf comes without one (`key_pem` is empty): present it with
    /// `tls::client_config_without_key`.
    pub fn client_cert_with_rsa_1024_key(&self) -> Leaf {
        self.ours
            .issue_for(&gateway_spec(), &Rsa1024::new())
            .unwrap()
    }

    /// A well-formed version 2 CRL from our intermediate with its extensions (the CRL Number among
    /// them) cut out, as DER. Its signature no longer verifies; nothing gets that far, since the
    /// verifier's parser refuses a CRL without extensions.
    pub fn crl_without_extensions(&self) -> Vec<u8> {
        let pem = self.crl(&[]);
        let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
        let outer = der_elements(der_content(der.as_ref()));
        let tbs: Vec<u8> = der_elements(der_content(outer[0]))
            .into_iter()
            .filter(|element| element[0] != 0xa0)
            .flatten()
            .copied()
            .collect();
        let mut body = der_sequence(&tbs);
        for rest in &outer[1..] {
            body.extend_from_slice(rest);
        }
        der_sequence(&body)
    }

    /// A client certificate for another identity: CN and DNS SAN `name`.
    pub fn client_cert_named(&self, name: &str) -> Leaf {
        self.client_cert_with_subject(name, name)
    }

    /// A client certificate with common name `cn` (any characters) and DNS SAN `dns`.
    pub fn client_cert_with_subject(&self, cn: &str, dns: &str) -> Leaf {
        let mut spec = LeafSpec::new(cn, DAY);
        spec.dns = vec![dns.to_owned()];
        spec.usage = Usage::Client;
        self.ours.issue(&spec).unwrap()
    }
}

fn listener_spec() -> LeafSpec {
    let mut spec = LeafSpec::new(LISTENER_NAME, DAY);
    spec.usage = Usage::Server;
    spec.ips = vec![[127, 0, 0, 1].into()];
    spec
}

fn gateway_spec() -> LeafSpec {
    let mut spec = LeafSpec::new(GATEWAY_CN, DAY);
    spec.dns = vec![GATEWAY_DNS.to_owned()];
    spec.uris = vec![GATEWAY_SPIFFE.to_owned()];
    spec.usage = Usage::Client;
    spec
}

fn expired(mut spec: LeafSpec) -> LeafSpec {
    spec.not_before = SystemTime::now() - 2 * DAY;
    spec.not_after = SystemTime::now() - Duration::from_secs(3600);
    spec
}

fn expiring_in(mut spec: LeafSpec, left: Duration) -> LeafSpec {
    spec.not_after = SystemTime::now() + left;
    spec
}

fn short_lived(mut spec: LeafSpec, lifetime: Duration) -> LeafSpec {
    spec.not_before = SystemTime::now();
    spec.not_after = spec.not_before + lifetime;
    spec
}

fn not_yet_valid(mut spec: LeafSpec) -> LeafSpec {
    spec.not_before = SystemTime::now() + DAY;
    spec.not_after = SystemTime::now() + 2 * DAY;
    spec
}

/// Writes `leaf` as `<stem>.crt` (chain) and `<stem>.key` in `dir`; returns both paths.
pub fn write_leaf(dir: &Path, stem: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let crt = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&crt, &leaf.chain_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    (crt, key)
}

/// The `X-Forwarded-Client-Cert` the listener must set for the gateway certificate `leaf`, in Envoy's
/// format, built here from the DER independently of the code under test.
pub fn expected_gateway_xfcc(leaf: &Leaf) -> String {
    format!(
        "Hash={};Subject=\"CN={GATEWAY_CN}\";DNS={GATEWAY_DNS};URI={GATEWAY_SPIFFE}",
        super::sha256_hex(&leaf.der)
    )
}

/// An RSA public key of 1024 bits: a made-up odd modulus with its top bit set, exponent 65537. No
/// one holds its private key; a certificate for it is only ever refused.
pub struct Rsa1024 {
    /// RSAPublicKey, DER.
    der: Vec<u8>,
}

impl Rsa1024 {
    pub fn new() -> Self {
        let mut modulus = vec![0x00, 0xc5];
        modulus.extend((0..126u8).map(|i| i.wrapping_mul(37).wrapping_add(11)));
        modulus.push(0x9b);
        let mut der = Vec::new();
        der.extend([0x02, 0x81, 0x81]);
        der.extend(&modulus);
        der.extend([0x02, 0x03, 0x01, 0x00, 0x01]);
        Rsa1024 {
            der: der_sequence(&der),
        }
    }

    /// A PKCS#1 `RSA PRIVATE KEY` PEM with this modulus and made-up private values: what an
    /// operator's RSA-1024 key file looks like to the sidecar, which refuses it for its size.
    pub fn private_key_pem(&self) -> String {
        let modulus = der_elements(der_content(&self.der))[0];
        let mut fields = vec![0x02, 0x01, 0x00];
        fields.extend(modulus);
        fields.extend([0x02, 0x03, 0x01, 0x00, 0x01]);
        for _ in 0..6 {
            fields.extend([0x02, 0x02, 0x01, 0x23]);
        }
        let der = der_sequence(&fields);
        let b64 = base64_lines(&der);
        format!("-----BEGIN RSA PRIVATE KEY-----\n{b64}-----END RSA PRIVATE KEY-----\n")
    }
}

impl PublicKeyData for Rsa1024 {
    fn der_bytes(&self) -> &[u8] {
        &self.der
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_RSA_SHA256
    }
}

/// The content of the DER element `der` starts with.
fn der_content(der: &[u8]) -> &[u8] {
    let (header, len) = der_header(der);
    &der[header..header + len]
}

/// The whole DER elements `content` holds, each with its header.
fn der_elements(mut content: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !content.is_empty() {
        let (header, len) = der_header(content);
        let (element, rest) = content.split_at(header + len);
        out.push(element);
        content = rest;
    }
    out
}

/// (header length, content length) of the DER element `der` starts with.
fn der_header(der: &[u8]) -> (usize, usize) {
    let first = der[1];
    if first & 0x80 == 0 {
        return (2, usize::from(first));
    }
    let octets = usize::from(first & 0x7f);
    let len = der[2..2 + octets]
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    (2 + octets, len)
}

/// A DER SEQUENCE holding `content`.
fn der_sequence(content: &[u8]) -> Vec<u8> {
    let mut out = vec![0x30];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// `der` in base64, 64 characters a line, each line ending in a newline.
fn base64_lines(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    let mut out = String::new();
    for line in text.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out
}
