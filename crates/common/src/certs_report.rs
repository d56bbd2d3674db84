//! `/certs` on the admin endpoint: the certificates a sidecar runs with, as JSON. Our chain as
//! loaded (and whether it is the last good one, kept after a failed reload, and why), the trust
//! anchors, each CRL, the last reload, and the peers connected now. docs/operations.md describes
//! every field.

use std::time::SystemTime;

use phoenix_mesh_certs::{fmt_time, CertSummary, ReloadStatus};
use serde::Serialize;

/// One peer certificate connected now, as `/certs` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectedPeer {
    /// Its short identity: the first URI SAN, else the common name, else the first DNS SAN
    /// ([`phoenix_mesh_certs::PeerIdentity::name`]).
    pub identity: String,
    /// Its certificate's serial number, lowercase hex.
    pub serial: String,
    /// Its certificate's notAfter.
    pub not_after: SystemTime,
    /// Open connections authenticated with this certificate.
    pub connections: u64,
    /// When the oldest of them was established.
    pub since: SystemTime,
}

/// Where `/certs` learns the peers connected now: the registry of live connections implements it
/// (a closure returning the list does too).
pub trait ConnectedPeers: Send + Sync {
    /// The peers connected now, one entry per certificate.
    fn connected_peers(&self) -> Vec<ConnectedPeer>;
}

impl<F: Fn() -> Vec<ConnectedPeer> + Send + Sync> ConnectedPeers for F {
    fn connected_peers(&self) -> Vec<ConnectedPeer> {
        self()
    }
}

/// The `/certs` document of the side named `side`.
pub fn certs_json(side: &str, status: &ReloadStatus, peers: &dyn ConnectedPeers) -> String {
    let inventory = &status.inventory;
    let files = &inventory.files;
    let kept_because = status.kept_because();
    let document = Document {
        side,
        certificate: Own {
            file: files.cert.display().to_string(),
            key_file: files.key.display().to_string(),
            loaded_at: fmt_time(status.loaded_at),
            last_good: kept_because.is_some(),
            kept_because,
            chain: inventory.chain.iter().map(Certificate::of).collect(),
        },
        trust_anchors: Anchors {
            file: files.ca.display().to_string(),
            certificates: inventory
                .trust_anchors
                .iter()
                .map(Certificate::of)
                .collect(),
        },
        crls: inventory
            .crls
            .iter()
            .map(|crl| Crl {
                file: crl.file.display().to_string(),
                issuer: &crl.issuer,
                this_update: fmt_time(crl.this_update),
                next_update: crl.next_update.map(fmt_time),
                number: crl.number.as_deref(),
                entries: crl.entries,
            })
            .collect(),
        last_reload: status.last_reload.as_ref().map(|reload| Reload {
            at: fmt_time(reload.at),
            trigger: &reload.trigger,
            result: if reload.error.is_some() {
                "failed"
            } else {
                "ok"
            },
            error: reload.error.as_deref(),
        }),
        peers: peers
            .connected_peers()
            .into_iter()
            .map(|peer| Peer {
                identity: peer.identity,
                serial: peer.serial,
                not_after: fmt_time(peer.not_after),
                connections: peer.connections,
                since: fmt_time(peer.since),
            })
            .collect(),
    };
    let mut text = serde_json::to_string_pretty(&document).unwrap_or_default();
    text.push('\n');
    text
}

// The document's shape, field by field in the order it is written; docs/operations.md has each.

#[derive(Serialize)]
struct Document<'a> {
    side: &'a str,
    certificate: Own<'a>,
    trust_anchors: Anchors<'a>,
    crls: Vec<Crl<'a>>,
    last_reload: Option<Reload<'a>>,
    peers: Vec<Peer>,
}

#[derive(Serialize)]
struct Own<'a> {
    file: String,
    key_file: String,
    loaded_at: String,
    last_good: bool,
    kept_because: Option<&'a str>,
    chain: Vec<Certificate<'a>>,
}

#[derive(Serialize)]
struct Anchors<'a> {
    file: String,
    certificates: Vec<Certificate<'a>>,
}

#[derive(Serialize)]
struct Certificate<'a> {
    subject: &'a str,
    issuer: &'a str,
    dns: &'a [String],
    uris: &'a [String],
    ips: &'a [String],
    serial: &'a str,
    not_before: String,
    not_after: String,
    sha256: &'a str,
}

impl<'a> Certificate<'a> {
    fn of(cert: &'a CertSummary) -> Self {
        Certificate {
            subject: &cert.subject,
            issuer: &cert.issuer,
            dns: &cert.dns,
            uris: &cert.uris,
            ips: &cert.ips,
            serial: &cert.serial,
            not_before: fmt_time(cert.not_before),
            not_after: fmt_time(cert.not_after),
            sha256: &cert.sha256,
        }
    }
}

#[derive(Serialize)]
struct Crl<'a> {
    file: String,
    issuer: &'a str,
    this_update: String,
    next_update: Option<String>,
    number: Option<&'a str>,
    entries: usize,
}

#[derive(Serialize)]
struct Reload<'a> {
    at: String,
    trigger: &'a str,
    result: &'static str,
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct Peer {
    identity: String,
    serial: String,
    not_after: String,
    connections: u64,
    since: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Duration;

    use phoenix_mesh_certs::{Inventory, LastReload, TlsFiles};

    use serde_json::{json, Value};

    use super::*;

    /// The peers part as the registry fills it: each certificate once, with its count and since.
    #[test]
    fn peers_are_listed_as_the_provider_gives_them() {
        let status = ReloadStatus {
            inventory: Arc::new(Inventory {
                files: TlsFiles {
                    cert: PathBuf::from("/c.crt"),
                    key: PathBuf::from("/c.key"),
                    ca: PathBuf::from("/ca.crt"),
                    crls: Vec::new(),
                },
                chain: Vec::new(),
                trust_anchors: Vec::new(),
                crls: Vec::new(),
            }),
            loaded_at: SystemTime::UNIX_EPOCH,
            last_reload: Some(LastReload {
                at: SystemTime::UNIX_EPOCH + Duration::from_secs(60),
                trigger: "SIGHUP".into(),
                error: Some("reading certificate /c.crt: gone".into()),
            }),
        };
        let peers = || {
            vec![ConnectedPeer {
                identity: "spiffe://mesh/gateway".into(),
                serial: "03e8".into(),
                not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(86_400),
                connections: 3,
                since: SystemTime::UNIX_EPOCH + Duration::from_secs(10),
            }]
        };
        let doc: Value =
            serde_json::from_str(&certs_json("mesh listener", &status, &peers)).unwrap();
        assert_eq!(
            doc["peers"],
            json!([{
                "identity": "spiffe://mesh/gateway",
                "serial": "03e8",
                "not_after": "1970-01-02T00:00:00Z",
                "connections": 3,
                "since": "1970-01-01T00:00:10Z",
            }])
        );
        assert_eq!(doc["certificate"]["last_good"], json!(true));
        assert_eq!(
            doc["certificate"]["kept_because"],
            json!("reading certificate /c.crt: gone")
        );
        assert_eq!(doc["last_reload"]["result"], json!("failed"));
        assert_eq!(doc["last_reload"]["at"], json!("1970-01-01T00:01:00Z"));
    }
}
