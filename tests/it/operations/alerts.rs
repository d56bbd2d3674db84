//! The Prometheus files in deploy/prometheus: the alert rules are valid and fire when they should
//! (`promtool check rules` and `promtool test rules` on tests/prometheus/), the scrape example is a
//! valid config aimed at the admin ports the deploy templates set, and every metric the rules name
//! is one the sidecars really export, read from a live `/metrics` of each side.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::support::admin::admin_get;
use crate::support::http::assert_round_trip;
use crate::support::mesh::Mesh;
use crate::support::skip_or_fail_without;
use crate::support::tls::{client_config, refusal_alert};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

const RULES: &str = "deploy/prometheus/phoenix-mesh-alerts.yml";
const SCRAPE: &str = "deploy/prometheus/scrape.yml";
const RULE_TESTS: &str = "tests/prometheus/phoenix-mesh-alerts.test.yml";

/// `promtool <args>`: its exit status and output, or `None` when promtool is not installed.
async fn promtool(args: &[&str]) -> Option<(bool, String)> {
    let out = match Command::new("promtool").args(args).output().await {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("running promtool: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

#[tokio::test]
async fn alert_rules_and_scrape_example_pass_promtool_and_the_rules_fire_as_meant() {
    let rules = repo(RULES);
    let scrape = repo(SCRAPE);
    let tests = repo(RULE_TESTS);
    for args in [
        ["check", "rules", rules.to_str().unwrap()],
        ["check", "config", scrape.to_str().unwrap()],
        ["test", "rules", tests.to_str().unwrap()],
    ] {
        let Some((ok, out)) = promtool(&args).await else {
            skip_or_fail_without("promtool", "apt-get install prometheus");
            return;
        };
        assert!(ok, "promtool {}:\n{out}", args.join(" "));
    }
}

/// Every `phoenix_mesh_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("phoenix_mesh_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The series names (and `# TYPE` family names) a `/metrics` text exposes.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(typed) => typed.split(' ').next(),
            None if !line.starts_with('#') => line.split(['{', ' ']).next(),
            None => None,
        })
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_name_only_metrics_the_sidecars_export() {
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("admin_listen", "127.0.0.1:0");
        s.client.set_str("admin_listen", "127.0.0.1:0");
    })
    .await;
    // Traffic and a refused stranger, so the counters the rules read have samples.
    assert_round_trip(mesh.client_addr, "through the mesh").await;
    let stranger = mesh.pki.client_cert_signed_by_other_ca();
    refusal_alert(
        mesh.listener_addr,
        client_config(mesh.pki.root_pem(), Some(&stranger), &[]),
    )
    .await;
    let mut live = BTreeSet::new();
    for admin in [mesh.listener_admin, mesh.client_admin] {
        let (status, text) = admin_get(admin.unwrap(), "/metrics").await;
        assert_eq!(status, 200, "{text}");
        live.extend(exported(&text));
    }

    let rules = std::fs::read_to_string(repo(RULES)).unwrap();
    let named = metric_names(&rules);
    let unknown: Vec<&String> = named.difference(&live).collect();
    assert!(
        unknown.is_empty(),
        "{RULES} names metrics no sidecar exports: {unknown:?}\nexported: {live:?}"
    );
    // The four alerts the issue asks for read these.
    for family in [
        "phoenix_mesh_certificate_expiry_timestamp_seconds",
        "phoenix_mesh_reloads_total",
        "phoenix_mesh_tls_handshakes_total",
        "phoenix_mesh_upstream_healthy",
    ] {
        assert!(named.contains(family), "{RULES} does not use {family}");
    }

    // The scrape example aims at the admin ports the deploy templates set.
    let scrape = std::fs::read_to_string(repo(SCRAPE)).unwrap();
    for template in [
        "deploy/lxc-101-nginx/phoenix-mesh-client.toml",
        "deploy/lxc-102-traefik/phoenix-mesh-server.toml",
    ] {
        let toml = std::fs::read_to_string(repo(template)).unwrap();
        let admin = toml
            .lines()
            .find_map(|l| l.strip_prefix("admin_listen = "))
            .unwrap_or_else(|| panic!("{template} sets no admin_listen"))
            .trim_matches('"');
        assert!(
            scrape.contains(&format!("\"{admin}\"")),
            "{SCRAPE} does not scrape {admin} ({template})"
        );
    }
}
