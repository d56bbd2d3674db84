//! The tests' PKI: a root and an intermediate as step-ca issues them, a second unrelated one, and
//! every kind of leaf the tests need, each named for what it is. Leaves are issued by the
//! intermediate and carry it in their chain; CRLs are signed by it too.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use phoenix_mesh_certs::pki::{Leaf, LeafSpec, Pki, Usage};

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
