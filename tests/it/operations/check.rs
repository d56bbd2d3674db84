//! `phoenix-mesh <side> --check`: on a working chain every step passes; on each broken hop exactly one
//! step fails, naming the address and the cause (with a hint where one helps); `--config-only`
//! validates every config in deploy/ and refuses a typo.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::support::backend::Backend;
use crate::support::binary::Binary;
use crate::support::closed_port_addr;
use crate::support::files::TomlConfig;
use crate::support::http::SERVICE_HOST;
use crate::support::mesh::Mesh;
use crate::support::pki::LISTENER_NAME;

/// A client config for `mesh`'s certificates, aimed at `upstream`.
fn client_toml(upstream: SocketAddr) -> TomlConfig {
    let mut c = TomlConfig::default();
    c.set_str("listen", "127.0.0.1:0")
        .set_addrs("upstreams", &[upstream])
        .set_str("server_name", LISTENER_NAME)
        .set_str("cert", "client.crt")
        .set_str("key", "client.key")
        .set_str("ca", "client-ca.crt")
        .set_str("connect_timeout", "3s")
        .set_str("handshake_timeout", "3s");
    c
}

/// `phoenix-mesh <side> --config <path> --check`, logging warnings only.
fn check_only(side: &str, path: &Path) -> Binary {
    Binary::new(side, path)
        .flags(&["--check"])
        .env("RUST_LOG", "warn")
}

/// Writes `config` as `name` in `mesh`'s directory and runs `<side> --config it --check <extra>`.
async fn check(
    mesh: &Mesh,
    side: &str,
    name: &str,
    config: &TomlConfig,
    extra: &[&str],
) -> (Option<i32>, String) {
    let path = mesh.path(name);
    config.write(&path);
    let (code, stdout, stderr) = check_only(side, &path).flags(extra).output().await;
    (code, format!("{stdout}\n--- stderr:\n{stderr}"))
}

/// The listener's config with `listen` naming the port it actually bound.
fn running_server_toml(mesh: &Mesh) -> TomlConfig {
    let mut config = mesh.server.clone();
    config.set_str("listen", &mesh.listener_addr.to_string());
    config
}

fn fail_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("[FAIL]")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_working_chain_for_both_sides() {
    let mesh = Mesh::start().await;
    for (side, name, config) in [
        (
            "client",
            "check-client.toml",
            client_toml(mesh.listener_addr),
        ),
        ("server", "check-server.toml", running_server_toml(&mesh)),
    ] {
        let (code, out) = check(&mesh, side, name, &config, &[]).await;
        assert_eq!(code, Some(0), "{side}:\n{out}");
        let steps: Vec<&str> = out.lines().filter(|l| l.starts_with('[')).collect();
        assert!(steps.len() >= 3, "{side}:\n{out}");
        assert!(
            steps.iter().all(|l| l.starts_with("[ OK ]")),
            "{side}: every step OK:\n{out}"
        );
        assert!(out.contains("check passed"), "{side}:\n{out}");
    }
    // The client's probe really went through the mesh.
    assert!(mesh
        .backend
        .seen()
        .iter()
        .any(|s| s.headers.get("user-agent").map(|v| v.as_bytes()) == Some(b"phoenix-mesh-check")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_address_when_the_listener_is_down() {
    let mesh = Mesh::start().await;
    let down = closed_port_addr();
    let (code, out) = check(&mesh, "client", "c.toml", &client_toml(down), &[]).await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert_eq!(fails.len(), 1, "{out}");
    assert!(
        fails[0].contains(&format!("{down}: "))
            && fails[0].to_lowercase().contains("connection refused"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_a_plaintext_upstream_does_not_speak_tls() {
    let mesh = Mesh::start().await;
    let (code, out) = check(
        &mesh,
        "client",
        "c.toml",
        &client_toml(mesh.backend.addr),
        &[],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1 && fails[0].contains("does not speak TLS"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_rejected_listener_certificate_and_the_wrong_name() {
    let mesh = Mesh::start().await;
    let wrong = "wrong.internal.thinkheads.ai";
    let mut config = client_toml(mesh.listener_addr);
    config.set_str("server_name", wrong);
    let (code, out) = check(&mesh, "client", "c.toml", &config, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1
            && fails[0].contains("mutual TLS")
            && fails[0].contains("rejected")
            && fails[0].contains(wrong),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_our_certificate_refused_by_the_listener() {
    let mesh = Mesh::start_with(|s| {
        s.server
            .set_list("allowed_peers", &["somebody-else.internal.thinkheads.ai"]);
    })
    .await;
    let (code, out) = check(
        &mesh,
        "client",
        "c.toml",
        &client_toml(mesh.listener_addr),
        &[],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1 && fails[0].contains("refused our client certificate"),
        "{out}"
    );
    assert!(mesh.backend.seen().is_empty());
}

/// The same refusal with HTTP/1.1 on the mesh link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_our_certificate_refused_by_the_listener_over_http1() {
    let mesh = Mesh::start_with(|s| {
        s.server
            .set_list("allowed_peers", &["somebody-else.internal.thinkheads.ai"]);
    })
    .await;
    let mut config = client_toml(mesh.listener_addr);
    config.set("upstream_http2", "false");
    let (code, out) = check(&mesh, "client", "c.toml", &config, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1 && fails[0].contains("refused our client certificate"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_check_names_the_backend_and_traefik_when_the_backend_is_down() {
    let mesh = Mesh::start().await;
    let down = closed_port_addr();
    let mut config = mesh.server.clone();
    config.set_str("backend", &down.to_string());
    let (code, out) = check(&mesh, "server", "s.toml", &config, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1
            && fails[0].contains(&down.to_string())
            && fails[0].to_lowercase().contains("connection refused"),
        "{out}"
    );
    let hint = out
        .lines()
        .skip_while(|l| !l.starts_with("[FAIL]"))
        .nth(1)
        .unwrap_or("");
    assert!(hint.contains("hint:") && hint.contains("Traefik"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_check_warns_when_the_queue_wait_outlasts_the_backend_timeout() {
    let mesh = Mesh::start().await;
    let mut config = running_server_toml(&mesh);
    config
        .set_str("backend_connect_timeout", "20s")
        .set_str("backend_timeout", "10s");
    let (code, out) = check(&mesh, "server", "s.toml", &config, &[]).await;
    assert_eq!(code, Some(0), "a warning, not a failure:\n{out}");
    let warn: Vec<&str> = out.lines().filter(|l| l.starts_with("[WARN]")).collect();
    assert!(
        warn.len() == 1
            && warn[0].contains("backend_connect_timeout (20s) is not below backend_timeout (10s)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_backend_404_as_mesh_ok_without_a_router() {
    let mesh = Mesh::start().await;
    let host = "nothing-routes-this.internal.thinkheads.ai";
    let (code, out) = check(
        &mesh,
        "client",
        "c.toml",
        &client_toml(mesh.listener_addr),
        &["--host", host, "--path", "/404"],
    )
    .await;
    assert_eq!(code, Some(0), "a 404 is a warning, not a failure:\n{out}");
    let warn: Vec<&str> = out.lines().filter(|l| l.starts_with("[WARN]")).collect();
    assert!(
        warn.len() == 1
            && warn[0].contains(&format!("mesh OK; Traefik has no router for Host {host}")),
        "{out}"
    );
    assert!(fail_lines(&out).is_empty(), "{out}");
    assert_eq!(mesh.backend.only_request().one("host"), host);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_check_probes_the_backend_over_h2c_when_backend_http2_is_on() {
    let mesh = Mesh::start().await;
    let mut config = running_server_toml(&mesh);
    config.set("backend_http2", "true");
    let (code, out) = check(
        &mesh,
        "server",
        "s.toml",
        &config,
        &["--host", SERVICE_HOST],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("[ OK ]") && l.contains("over h2c")),
        "{out}"
    );
    let seen = mesh.backend.only_request();
    assert_eq!(seen.version, http::Version::HTTP_2, "{seen:#?}");
    assert_eq!(seen.authority.as_deref(), Some(SERVICE_HOST), "{seen:#?}");

    // A backend that speaks HTTP/1.1 only fails the step, and the hint names the key.
    let http1_only = Backend::start_http1_only().await;
    config.set_str("backend", &http1_only.addr.to_string());
    let (code, out) = check(&mesh, "server", "s.toml", &config, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1
            && fails[0].contains(&http1_only.addr.to_string())
            && fails[0].contains("over h2c"),
        "{out}"
    );
    assert!(out.contains("hint: backend_http2 = true"), "{out}");

    // A --host that cannot be an :authority is named as the problem, not the backend.
    config.set_str("backend", &mesh.backend.addr.to_string());
    let (code, out) = check(
        &mesh,
        "server",
        "s.toml",
        &config,
        &["--host", "not a host"],
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.len() == 1 && fails[0].contains(r#"--host "not a host" is no valid host[:port]"#),
        "{out}"
    );
}

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_deploy_config_validates_with_check_config_only() {
    let mut found = Vec::new();
    toml_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy"),
        &mut found,
    );
    found.sort();
    let mut sides = Vec::new();
    for path in &found {
        let text = std::fs::read_to_string(path).unwrap();
        let is_client = text
            .lines()
            .any(|l| l.trim_start().starts_with("upstreams"));
        let side = if is_client { "client" } else { "server" };
        let p = path.to_str().unwrap();
        let (code, stdout, stderr) = check_only(side, path)
            .flags(&["--config-only"])
            .output()
            .await;
        assert_eq!(code, Some(0), "{side} {p}:\n{stdout}\n{stderr}");
        assert!(
            stdout.starts_with("[ OK ] config ")
                && stdout.contains(&format!("valid {side} configuration")),
            "{side} {p}:\n{stdout}"
        );
        sides.push(side);
    }
    assert!(
        sides.contains(&"client") && sides.contains(&"server"),
        "deploy/ should hold a config for each side: {found:?}"
    );
}

/// `--config-only` is not a rubber stamp: a typo in a key fails with exit 78 naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_only_refuses_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/lxc-102-traefik/phoenix-mesh-server.toml");
    let text = std::fs::read_to_string(src).unwrap() + "\nalowed_peers = []\n";
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, text).unwrap();
    let (code, stdout, stderr) = check_only("server", &path)
        .flags(&["--config-only"])
        .output()
        .await;
    assert_eq!(code, Some(78), "{stdout}\n{stderr}");
    assert!(stderr.contains("alowed_peers"), "{stderr}");
}

/// The certificate step prints what `/certs` shows of the files it loaded: the leaf with its
/// serial and validity, each intermediate, each trust anchor and each CRL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_prints_the_chain_trust_anchors_and_crls_it_loaded() {
    let mesh = Mesh::start_with(|s| {
        std::fs::write(s.dir.join("revoked.crl"), s.pki.crl(&[4242])).unwrap();
        s.server.set_list("crls", &["revoked.crl"]);
    })
    .await;
    let (code, out) = check(
        &mesh,
        "server",
        "check-server.toml",
        &running_server_toml(&mesh),
        &[],
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    let line = |prefix: String| {
        out.lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?}:\n{out}"))
            .to_owned()
    };
    let leaf = line(format!(
        "[ OK ] certificate {}: ",
        mesh.path("listener.crt").display()
    ));
    let serial = super::certs::serial_hex(mesh.listener_leaf.serial);
    assert!(
        leaf.contains(&format!("serial {serial},")) && leaf.contains("valid from "),
        "{leaf}"
    );
    let intermediate = line(format!(
        "[ OK ] intermediate 1 in {}: ",
        mesh.path("listener.crt").display()
    ));
    assert!(intermediate.contains("issuer "), "{intermediate}");
    let anchor = line(format!(
        "[ OK ] trust anchor in {}: ",
        mesh.path("listener-ca.crt").display()
    ));
    assert!(anchor.contains("serial "), "{anchor}");
    let crl = line(format!(
        "[ OK ] CRL {}: ",
        mesh.path("revoked.crl").display()
    ));
    assert!(
        crl.contains("1 revoked") && crl.contains("next update 20"),
        "{crl}"
    );
}
