//! Start-up through the real binary: every config or certificate mistake exits 78 (EX_CONFIG) before
//! serving anything, with stderr naming the file (or key) and the cause.

use std::path::Path;
use std::process::Stdio;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::support::backend::HELLO;
use crate::support::http::{get, send_h1};
use crate::support::mesh::{toml_str, Mesh, TomlConfig};
use crate::support::pki::{write_leaf, TestPki};
use crate::support::{closed_port_addr, within};

const BIN: &str = env!("CARGO_BIN_EXE_phoenix-mesh");
const EX_CONFIG: i32 = 78;

/// A valid listener setup in a temporary directory: `listener.crt/.key`, `ca.crt`, and its config.
fn server_setup(pki: &TestPki) -> (TempDir, TomlConfig) {
    let dir = tempfile::tempdir().unwrap();
    write_leaf(dir.path(), "listener", &pki.listener_cert());
    std::fs::write(dir.path().join("ca.crt"), pki.root_pem()).unwrap();
    let mut config = TomlConfig::default();
    config
        .set_str("listen", "127.0.0.1:0")
        .set_str("backend", &closed_port_addr().to_string())
        .set_str("cert", "listener.crt")
        .set_str("key", "listener.key")
        .set_str("ca", "ca.crt");
    (dir, config)
}

/// A valid client setup in a temporary directory: `client.crt/.key`, `ca.crt`, and its config.
fn client_setup(pki: &TestPki) -> (TempDir, TomlConfig) {
    let dir = tempfile::tempdir().unwrap();
    write_leaf(dir.path(), "client", &pki.client_cert());
    std::fs::write(dir.path().join("ca.crt"), pki.root_pem()).unwrap();
    let mut config = TomlConfig::default();
    config
        .set_str("listen", "127.0.0.1:0")
        .set(
            "upstreams",
            format!("[{}]", toml_str(&closed_port_addr().to_string())),
        )
        .set_str("server_name", crate::support::pki::LISTENER_NAME)
        .set_str("cert", "client.crt")
        .set_str("key", "client.key")
        .set_str("ca", "ca.crt");
    (dir, config)
}

/// Runs `phoenix-mesh <side> --config <dir>/<side>.toml`, expecting it to exit on its own.
async fn run_to_exit(side: &str, dir: &Path, config: &TomlConfig) -> (Option<i32>, String) {
    let path = dir.join(format!("{side}.toml"));
    config.write(&path);
    let child = Command::new(BIN)
        .arg(side)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let output = within(
        &format!("phoenix-mesh {side} exiting on a bad config"),
        child.wait_with_output(),
    )
    .await
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Fails the test unless the run exited 78 and stderr mentions every needle.
fn assert_config_failure((code, stderr): &(Option<i32>, String), needles: &[&str]) {
    assert_eq!(*code, Some(EX_CONFIG), "stderr:\n{stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr should mention {needle:?}:\n{stderr}"
        );
    }
}

fn path_in(dir: &TempDir, name: &str) -> String {
    dir.path().join(name).display().to_string()
}

/// Starts `phoenix-mesh <side> --config <dir>/<side>.toml` with stderr on a pipe (as under systemd) and
/// returns it running, with what it logged up to its "accepting" line.
async fn start_until_accepting(
    side: &str,
    dir: &Path,
    config: &TomlConfig,
) -> (tokio::process::Child, String) {
    let path = dir.join(format!("{side}.toml"));
    config.write(&path);
    let mut child = Command::new(BIN)
        .arg(side)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    within(&format!("phoenix-mesh {side} starting"), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push_str(&line);
            log.push('\n');
            if line.contains("accepting") {
                return;
            }
        }
        panic!("phoenix-mesh {side} exited before accepting:\n{log}");
    })
    .await;
    (child, log)
}

/// The control for every test below: the same setup, unbroken, starts and serves.
#[tokio::test(flavor = "multi_thread")]
async fn valid_configs_start_serving() {
    let pki = TestPki::new();
    for (side, (dir, config)) in [
        ("server", server_setup(&pki)),
        ("client", client_setup(&pki)),
    ] {
        let (mut child, log) = start_until_accepting(side, dir.path(), &config).await;
        assert!(child.try_wait().unwrap().is_none(), "{side} exited:\n{log}");
        child.kill().await.unwrap();
    }
}

/// Log lines written to a pipe or file (the journal, under systemd) are plain text: no terminal colour
/// escapes, which journald would store as bytes and journalctl or rsyslog show mangled.
#[tokio::test(flavor = "multi_thread")]
async fn logs_on_a_pipe_are_plain_text() {
    let pki = TestPki::new();
    for (side, (dir, config)) in [
        ("server", server_setup(&pki)),
        ("client", client_setup(&pki)),
    ] {
        let (mut child, log) = start_until_accepting(side, dir.path(), &config).await;
        child.kill().await.unwrap();
        assert!(
            log.contains("certificate loaded"),
            "{side} should log its certificate at start:\n{log}"
        );
        assert!(
            !log.contains('\u{1b}'),
            "{side} wrote terminal escape sequences to a pipe:\n{}",
            log.escape_debug()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_cert_file_exits_78() {
    let pki = TestPki::new();
    let (dir, mut config) = server_setup(&pki);
    config.set_str("cert", "missing.crt");
    let run = run_to_exit("server", dir.path(), &config).await;
    assert_config_failure(
        &run,
        &[&path_in(&dir, "missing.crt"), "No such file or directory"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_pem_exits_78() {
    let pki = TestPki::new();
    let (dir, config) = server_setup(&pki);
    std::fs::write(
        dir.path().join("listener.crt"),
        "this is not a certificate\n",
    )
    .unwrap();
    let run = run_to_exit("server", dir.path(), &config).await;
    assert_config_failure(
        &run,
        &[&path_in(&dir, "listener.crt"), "no PEM CERTIFICATE block"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn key_not_matching_cert_exits_78() {
    let pki = TestPki::new();
    let (dir, config) = server_setup(&pki);
    std::fs::write(dir.path().join("listener.key"), pki.listener_cert().key_pem).unwrap();
    let run = run_to_exit("server", dir.path(), &config).await;
    assert_config_failure(
        &run,
        &[
            &path_in(&dir, "listener.key"),
            &path_in(&dir, "listener.crt"),
            "does not match",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_cert_exits_78() {
    let pki = TestPki::new();
    let (dir, config) = server_setup(&pki);
    write_leaf(dir.path(), "listener", &pki.expired_listener_cert());
    let run = run_to_exit("server", dir.path(), &config).await;
    assert_config_failure(&run, &[&path_in(&dir, "listener.crt"), "expired"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn not_yet_valid_cert_exits_78() {
    let pki = TestPki::new();
    let (dir, config) = server_setup(&pki);
    write_leaf(dir.path(), "listener", &pki.not_yet_valid_listener_cert());
    let run = run_to_exit("server", dir.path(), &config).await;
    assert_config_failure(&run, &[&path_in(&dir, "listener.crt"), "not valid before"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_not_verifying_against_ca_exits_78() {
    let pki = TestPki::new();
    let (dir, config) = server_setup(&pki);
    std::fs::write(dir.path().join("ca.crt"), pki.other_root_pem()).unwrap();
    let run = run_to_exit("server", dir.path(), &config).await;
    assert_config_failure(
        &run,
        &[
            &path_in(&dir, "listener.crt"),
            &path_in(&dir, "ca.crt"),
            "does not verify",
            "UnknownIssuer",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_cert_without_client_auth_exits_78() {
    let pki = TestPki::new();
    let (dir, config) = client_setup(&pki);
    write_leaf(dir.path(), "client", &pki.server_only_client_cert());
    let run = run_to_exit("client", dir.path(), &config).await;
    assert_config_failure(
        &run,
        &[
            &path_in(&dir, "client.crt"),
            "no clientAuth extended key usage",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_client_cert_exits_78() {
    let pki = TestPki::new();
    let (dir, config) = client_setup(&pki);
    write_leaf(dir.path(), "client", &pki.expired_client_cert());
    let run = run_to_exit("client", dir.path(), &config).await;
    assert_config_failure(&run, &[&path_in(&dir, "client.crt"), "expired"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_config_key_exits_78() {
    let pki = TestPki::new();
    let (dir, mut config) = server_setup(&pki);
    config.set_str("backend_timout", "5s");
    let run = run_to_exit("server", dir.path(), &config).await;
    assert_config_failure(
        &run,
        &[
            &path_in(&dir, "server.toml"),
            "unknown field",
            "backend_timout",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_address_exits_78() {
    let pki = TestPki::new();
    let (dir, mut config) = server_setup(&pki);
    config.set_str("listen", "mesh.internal:8443");
    let run = run_to_exit("server", dir.path(), &config).await;
    assert_config_failure(
        &run,
        &[
            &path_in(&dir, "server.toml"),
            "listen",
            "mesh.internal:8443",
            "not an ip:port address",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_refuses_public_listen() {
    let pki = TestPki::new();
    let (dir, mut config) = client_setup(&pki);
    config.set_str("listen", "0.0.0.0:0");
    let run = run_to_exit("client", dir.path(), &config).await;
    assert_config_failure(
        &run,
        &[
            &path_in(&dir, "client.toml"),
            "0.0.0.0:0",
            "loopback",
            "allow_public_listen",
        ],
    );
}

/// With `allow_public_listen = true` the wildcard address is accepted; traffic is still sent to
/// 127.0.0.1 only.
#[tokio::test(flavor = "multi_thread")]
async fn client_accepts_public_listen_when_allowed() {
    let mesh = Mesh::start_with(|s| {
        s.client
            .set_str("listen", "0.0.0.0:0")
            .set("allow_public_listen", "true");
    })
    .await;
    assert!(
        mesh.client_addr.ip().is_unspecified(),
        "{}",
        mesh.client_addr
    );
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], mesh.client_addr.port()));
    let reply = within("request", send_h1(loopback, get("/public"))).await;
    assert_eq!(reply.status, 200, "{reply:#?}");
    assert_eq!(reply.body, HELLO);
    assert_eq!(reply.mesh_error(), None);
}

/// Starts `phoenix-mesh [args] server --config <dir>/server.toml` with stderr on a unix stream socket
/// (what journald gives a unit) and `JOURNAL_STREAM` set to that socket's `device:inode`, as systemd
/// does, or to something else, and returns its stderr lines up to the "accepting" one.
async fn start_on_stream(
    args: &[&str],
    dir: &Path,
    config: &TomlConfig,
    names_the_stream: bool,
) -> Vec<String> {
    use std::io::BufRead;
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    let path = dir.join("server.toml");
    config.write(&path);
    let (reader, writer) = UnixStream::pair().unwrap();
    let socket = std::fs::File::from(writer.as_fd().try_clone_to_owned().unwrap())
        .metadata()
        .unwrap();
    let stream = if names_the_stream {
        format!("{}:{}", socket.dev(), socket.ino())
    } else {
        format!("{}:{}", socket.dev(), socket.ino() + 1)
    };
    let mut child = {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .arg("server")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("JOURNAL_STREAM", stream)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(OwnedFd::from(writer)))
            .kill_on_drop(true);
        command.spawn().unwrap()
    };
    let lines = within(
        "phoenix-mesh server starting on a journal-like stream",
        tokio::task::spawn_blocking(move || {
            let mut lines = Vec::new();
            for line in std::io::BufReader::new(reader).lines() {
                let line = line.unwrap();
                let done = line.contains("accepting");
                lines.push(line);
                if done {
                    break;
                }
            }
            lines
        }),
    )
    .await
    .unwrap();
    child.kill().await.unwrap();
    lines
}

/// Under systemd every line starts with its syslog priority, which journald keeps as the entry's
/// priority (so `journalctl -p warning` shows the warnings), and text lines leave the timestamp to the
/// journal; the same variable naming another stream (a child whose stderr went elsewhere) adds nothing.
#[tokio::test(flavor = "multi_thread")]
async fn on_the_journal_each_line_carries_its_priority() {
    let pki = TestPki::new();
    let (dir, config) = server_setup(&pki);
    // Ten minutes left of seventy: the start-up warns that renewal may not be running.
    write_leaf(
        dir.path(),
        "listener",
        &pki.listener_cert_expiring_in(std::time::Duration::from_secs(600)),
    );
    for args in [&[][..], &["--log-format", "json"][..]] {
        let lines = start_on_stream(args, dir.path(), &config, true).await;
        let log = lines.join("\n");
        let line = |needle: &str| {
            lines
                .iter()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{args:?}: no line with {needle:?}:\n{log}"))
                .clone()
        };
        let info = line("certificate loaded");
        let warning = line("less than a third of its lifetime left");
        assert!(info.starts_with("<6>"), "{args:?}: info line {info:?}");
        assert!(warning.starts_with("<4>"), "{args:?}: warning {warning:?}");
        for l in &lines {
            let rest = l.get(3..).unwrap_or_default();
            assert!(
                l.starts_with('<') && !rest.starts_with(|c: char| c.is_ascii_digit()),
                "{args:?}: a line without its priority, or with a timestamp the journal adds itself: {l:?}"
            );
        }
        if args.is_empty() {
            assert!(info.contains(" INFO "), "{info:?}");
        } else {
            assert!(info.starts_with("<6>{"), "{info:?}");
        }

        let elsewhere = start_on_stream(args, dir.path(), &config, false).await;
        assert!(
            elsewhere.iter().all(|l| !l.starts_with('<')),
            "{args:?}: priority prefixes on a stream that is not the journal:\n{}",
            elsewhere.join("\n")
        );
    }
}
