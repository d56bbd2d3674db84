//! What the binary logs and how: one JSON access-log line per request on both sides, plain text
//! (no terminal colours) on a pipe, and on the journal's stream a syslog priority on every line.

use std::path::Path;

use crate::support::backend::{Backend, HELLO};
use crate::support::binary::{Binary, Proc};
use crate::support::files::MeshFiles;
use crate::support::http::{try_get, SERVICE_HOST};
use crate::support::pki::{write_leaf, TestPki, GATEWAY_SPIFFE};
use crate::support::within;

/// The single access-log line (JSON) whose path is `path`, from the process's stderr.
async fn access_line(proc: &Proc, path: &str) -> String {
    let needle = format!("\"path\":\"{path}\"");
    proc.wait_for_line(&["phoenix_mesh::access", &needle]).await;
    let lines: Vec<String> = proc
        .log()
        .into_iter()
        .filter(|l| l.contains("phoenix_mesh::access") && l.contains(&needle))
        .collect();
    assert_eq!(lines.len(), 1, "one access line per request: {lines:#?}");
    lines.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_one_json_line_per_request_on_both_sides() {
    let pki = TestPki::new();
    let backend = Backend::start().await;
    let mut files = MeshFiles::new(&pki, backend.addr, &pki.listener_cert(), &pki.client_cert());
    files.server.set("access_log", "true");
    files.client.set("access_log", "true");
    let (listener, listener_addr) = files.start_listener().await;
    let (client, client_addr) = files.start_client(listener_addr).await;

    let paths = ["/first?n=1", "/second?n=2", "/404"];
    for path in paths {
        try_get(client_addr, path).await.unwrap();
    }
    for path in paths {
        let status = if path == "/404" { 404 } else { 200 };
        for (side, proc, peer, upstream) in [
            (
                "client",
                &client,
                "127.0.0.1:".to_owned(),
                listener_addr.to_string(),
            ),
            (
                "listener",
                &listener,
                GATEWAY_SPIFFE.to_owned(),
                backend.addr.to_string(),
            ),
        ] {
            let line = access_line(proc, path).await;
            assert!(
                line.starts_with('{') && line.ends_with('}'),
                "{side}: {line}"
            );
            for field in [
                "\"method\":\"GET\"".to_owned(),
                format!("\"host\":\"{SERVICE_HOST}\""),
                format!("\"status\":{status},"),
                "\"duration_ms\":".to_owned(),
                format!("\"peer\":\"{peer}"),
                format!("\"upstream\":\"{upstream}\""),
            ] {
                assert!(
                    line.contains(&field),
                    "{side} access line lacks {field}: {line}"
                );
            }
            if status == 200 {
                assert!(
                    line.contains(&format!("\"bytes\":{},", HELLO.len())),
                    "{side}: {line}"
                );
            }
        }
    }
}

/// Log lines written to a pipe or file (the journal, under systemd) are plain text: no terminal colour
/// escapes, which journald would store as bytes and journalctl or rsyslog show mangled.
#[tokio::test(flavor = "multi_thread")]
async fn logs_on_a_pipe_are_plain_text() {
    let files = MeshFiles::unconnected(&TestPki::new());
    for (side, config) in [
        ("server", files.write_server()),
        ("client", files.write_client()),
    ] {
        let mut proc = Binary::new(side, &config).spawn();
        proc.wait_for_line(&["accepting"]).await;
        proc.kill().await;
        let log = proc.log().join("\n");
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

/// Starts `phoenix-mesh [args] server --config <dir>/server.toml` with stderr on a unix stream socket
/// (what journald gives a unit) and `JOURNAL_STREAM` set to that socket's `device:inode`, as systemd
/// does, or to something else, and returns its stderr lines up to the "accepting" one.
async fn start_on_stream(args: &[&str], config: &Path, names_the_stream: bool) -> Vec<String> {
    use std::io::BufRead;
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    let (reader, writer) = UnixStream::pair().unwrap();
    let socket = std::fs::File::from(writer.as_fd().try_clone_to_owned().unwrap())
        .metadata()
        .unwrap();
    let stream = if names_the_stream {
        format!("{}:{}", socket.dev(), socket.ino())
    } else {
        format!("{}:{}", socket.dev(), socket.ino() + 1)
    };
    let mut child = Binary::server(config)
        .global_flags(args)
        .env("JOURNAL_STREAM", stream)
        .spawn_with_stderr(OwnedFd::from(writer));
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
    let files = MeshFiles::unconnected(&pki);
    let config = files.write_server();
    // Ten minutes left of seventy: the start-up warns that renewal may not be running.
    write_leaf(
        files.dir.path(),
        "listener",
        &pki.listener_cert_expiring_in(std::time::Duration::from_secs(600)),
    );
    for args in [&[][..], &["--log-format", "json"][..]] {
        let lines = start_on_stream(args, &config, true).await;
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

        let elsewhere = start_on_stream(args, &config, false).await;
        assert!(
            elsewhere.iter().all(|l| !l.starts_with('<')),
            "{args:?}: priority prefixes on a stream that is not the journal:\n{}",
            elsewhere.join("\n")
        );
    }
}
