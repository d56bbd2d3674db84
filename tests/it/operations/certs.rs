//! `/certs` on the admin endpoint: what each side has loaded (our chain, the trust anchors, the
//! CRLs) and how its last reload went; after a botched renewal it shows the last good certificate
//! still in service, marked as such with the reason, until the next good one applies.

use std::sync::atomic::Ordering;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::Value;

use crate::support::admin::admin_get;
use crate::support::files::{install_leaf_by_rename, rename_replace};
use crate::support::mesh::Mesh;
use crate::support::pki::{GATEWAY_DNS, LISTENER_NAME};
use crate::support::{eventually, sha256_hex};

/// A serial as `/certs` writes it: the DER integer's bytes (shortest form, a zero byte before a
/// high bit) in lowercase hex, worked out here from the number the test PKI issued.
pub fn serial_hex(serial: u64) -> String {
    let bytes = serial.to_be_bytes();
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(7);
    let mut der = bytes[start..].to_vec();
    if der[0] & 0x80 != 0 {
        der.insert(0, 0);
    }
    crate::support::hex(&der)
}

/// `/certs` from `admin`, parsed.
async fn certs(admin: std::net::SocketAddr) -> Value {
    let (status, body) = admin_get(admin, "/certs").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/certs is not JSON ({e}): {body}"))
}

/// The SHA-256 of the first certificate in `pem`.
fn pem_sha256(pem: &str) -> String {
    sha256_hex(
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_reports_what_is_loaded_and_a_last_good_kept_after_a_botched_renewal() {
    let mesh = Mesh::start_with(|s| {
        std::fs::write(s.dir.join("revoked.crl"), s.pki.crl(&[4242, 4343])).unwrap();
        s.server
            .set_str("admin_listen", "127.0.0.1:0")
            .set_str("reload_poll_interval", "200ms")
            .set_list("crls", &["revoked.crl"]);
        s.client.set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    let admin = mesh.listener_admin.unwrap();
    let doc = certs(admin).await;
    assert_eq!(doc["side"], "mesh listener", "{doc:#}");

    let own = &doc["certificate"];
    assert_eq!(
        own["file"],
        mesh.path("listener.crt").display().to_string(),
        "{doc:#}"
    );
    assert_eq!(own["last_good"], false, "{doc:#}");
    assert_eq!(own["kept_because"], Value::Null, "{doc:#}");
    let chain = own["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "leaf and intermediate: {doc:#}");
    let leaf = &chain[0];
    assert_eq!(
        leaf["sha256"],
        sha256_hex(&mesh.listener_leaf.der),
        "{doc:#}"
    );
    assert_eq!(
        leaf["serial"],
        serial_hex(mesh.listener_leaf.serial),
        "{doc:#}"
    );
    assert_eq!(leaf["dns"], serde_json::json!([LISTENER_NAME]), "{doc:#}");
    assert_eq!(leaf["ips"], serde_json::json!(["127.0.0.1"]), "{doc:#}");
    assert_eq!(
        chain[1]["sha256"],
        pem_sha256(mesh.pki.intermediate_pem()),
        "{doc:#}"
    );
    assert_eq!(leaf["issuer"], chain[1]["subject"], "{doc:#}");
    for field in ["not_before", "not_after"] {
        let time = leaf[field].as_str().unwrap();
        assert!(time.len() == 20 && time.ends_with('Z'), "{field}: {time}");
    }
    assert!(own["loaded_at"].as_str().unwrap().ends_with('Z'), "{doc:#}");

    let anchors = &doc["trust_anchors"];
    assert_eq!(
        anchors["file"],
        mesh.path("listener-ca.crt").display().to_string()
    );
    assert_eq!(
        anchors["certificates"][0]["sha256"],
        pem_sha256(mesh.pki.root_pem()),
        "{doc:#}"
    );
    assert_eq!(chain[1]["issuer"], anchors["certificates"][0]["subject"]);

    let crls = doc["crls"].as_array().unwrap();
    assert_eq!(crls.len(), 1, "{doc:#}");
    assert_eq!(
        crls[0]["file"],
        mesh.path("revoked.crl").display().to_string()
    );
    assert_eq!(crls[0]["issuer"], chain[1]["subject"], "{doc:#}");
    assert_eq!(crls[0]["entries"], 2, "{doc:#}");
    assert!(crls[0]["number"].is_string(), "{doc:#}");
    assert!(crls[0]["next_update"].is_string(), "{doc:#}");
    assert_eq!(doc["last_reload"], Value::Null, "no reload yet: {doc:#}");
    assert!(doc["peers"].is_array(), "{doc:#}");

    // The client's own document names its gateway certificate.
    let client = certs(mesh.client_admin.unwrap()).await;
    assert_eq!(client["side"], "client sidecar");
    assert_eq!(
        client["certificate"]["chain"][0]["sha256"],
        sha256_hex(&mesh.client_leaf.der)
    );
    assert!(client["certificate"]["chain"][0]["dns"]
        .as_array()
        .unwrap()
        .contains(&GATEWAY_DNS.into()));

    // A renewal writes garbage: the last good certificate stays, and /certs says so and why.
    let stats = &mesh.listener_reloader.stats;
    rename_replace(
        &mesh.path("listener.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    );
    eventually("a failed reload counted", || {
        let n = stats.failed.load(Ordering::Relaxed);
        async move { (n >= 1).then_some(()) }
    })
    .await;
    let doc = certs(admin).await;
    let own = &doc["certificate"];
    assert_eq!(own["last_good"], true, "{doc:#}");
    let why = own["kept_because"].as_str().unwrap();
    assert!(
        why.contains("listener.crt") && why.contains("base64"),
        "the reason names the file and the fault: {why}"
    );
    assert_eq!(
        own["chain"][0]["sha256"],
        sha256_hex(&mesh.listener_leaf.der),
        "still the certificate in service: {doc:#}"
    );
    let reload = &doc["last_reload"];
    assert_eq!(reload["result"], "failed", "{doc:#}");
    assert_eq!(reload["trigger"], "certificate files changed", "{doc:#}");
    assert_eq!(reload["error"].as_str(), Some(why), "{doc:#}");

    // The next good renewal applies and clears the mark.
    let good = mesh.pki.listener_cert();
    install_leaf_by_rename(mesh.dir.path(), "listener", &good);
    let doc = eventually("the good renewal in /certs", || async {
        let doc = certs(admin).await;
        (doc["certificate"]["chain"][0]["sha256"] == sha256_hex(&good.der)).then_some(doc)
    })
    .await;
    assert_eq!(doc["certificate"]["last_good"], false, "{doc:#}");
    assert_eq!(doc["certificate"]["kept_because"], Value::Null, "{doc:#}");
    assert_eq!(
        doc["certificate"]["chain"][0]["serial"],
        serial_hex(good.serial)
    );
    assert_eq!(doc["last_reload"]["result"], "ok", "{doc:#}");
    assert_eq!(doc["last_reload"]["error"], Value::Null, "{doc:#}");
}
