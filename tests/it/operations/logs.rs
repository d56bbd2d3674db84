//! What the binary logs and how: one JSON access-log line per request on both sides, plain text
//! (no terminal colours) on a pipe, on the journal's stream a syslog priority on every line, and
//! failures that repeat (a backend down under load, a listener down, strangers on the TLS port)
//! logged once and then summarised per interval, while the metrics count every one.

use std::net::SocketAddr;
use std::path::Path;

use crate::support::admin::{admin_get, metric};
use crate::support::backend::{Backend, HELLO};
use crate::support::binary::{Binary, Proc};
use crate::support::files::MeshFiles;
use crate::support::http::{try_get, Got, SERVICE_HOST};
use crate::support::pki::{write_leaf, TestPki, GATEWAY_SPIFFE};
use crate::support::raw::{exchange, status_of};
use crate::support::tls::{client_config, refusal_alert};
use crate::support::{closed_port_addr, eventually, within};

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

/// Requests in a flood: without the limit, each would write its own line.
const FLOOD: usize = 400;

/// At most this many lines about one repeated failure while a flood lasts: the first, and one
/// summary per interval (the flood takes seconds). Far below [`FLOOD`].
const BOUNDED: usize = 5;

/// Sends [`FLOOD`] GETs through `addr`, eight at a time, and returns every answer.
async fn flood(addr: SocketAddr) -> Vec<Got> {
    let workers: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for _ in 0..FLOOD / 8 {
                    answers.push(try_get(addr, "/flood").await.unwrap());
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for worker in workers {
        answers.extend(within("a flood worker", worker).await.unwrap());
    }
    assert_eq!(answers.len(), FLOOD);
    answers
}

/// The log lines carrying `message`: the first occurrences as written, and the summaries.
fn lines_about(proc: &Proc, message: &str) -> Vec<String> {
    let needle = format!("\"message\":\"{message}");
    proc.log()
        .into_iter()
        .filter(|l| l.contains(&needle))
        .collect()
}

/// Fails the test unless `proc` wrote at least one line about `message` (waiting for the first to
/// come through its stderr pipe) and at most [`BOUNDED`].
async fn assert_bounded(proc: &Proc, message: &str, what: &str) -> Vec<String> {
    proc.wait_for_line(&[&format!("\"message\":\"{message}")])
        .await;
    let lines = lines_about(proc, message);
    assert!(
        lines.len() <= BOUNDED,
        "{} lines about {what}, first ones:\n{}",
        lines.len(),
        lines[..lines.len().min(10)].join("\n")
    );
    lines
}

/// How many occurrences `lines` account for: one per line written as it happened, and a summary's
/// `suppressed` count.
fn accounted(lines: &[String]) -> u64 {
    lines
        .iter()
        .map(|l| match l.split_once("\"suppressed\":") {
            Some((_, rest)) => rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap(),
            None => 1,
        })
        .sum()
}

/// Waits until the counter `name` with `labels` on the admin endpoint at `admin` reads `want`: the
/// metric counts every occurrence, logged or not. (A process may count a request just after its
/// answer went out, so this polls; it fails if the count settles anywhere else.)
async fn assert_counted(admin: SocketAddr, name: &str, labels: &[(&str, &str)], want: usize) {
    let what = format!("{name} {labels:?} reaching {want}");
    eventually(&what, || {
        let what = what.clone();
        async move {
            let (status, text) = admin_get(admin, "/metrics").await;
            assert_eq!(status, 200);
            let have = metric(&text, name, labels).unwrap_or_default();
            assert!(have <= want as f64, "{what}: {have}");
            (have == want as f64).then_some(())
        }
    })
    .await;
}

/// The backend down while requests keep coming: every request is answered `backend-unreachable`
/// and counted, but the listener writes its first failure, then one summary per interval that
/// accounts for all the others, not one line per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_outage_under_load_is_logged_once_per_interval() {
    let pki = TestPki::new();
    let backend = closed_port_addr();
    let mut files = MeshFiles::new(&pki, backend, &pki.listener_cert(), &pki.client_cert());
    files.server.set_str("admin_listen", "127.0.0.1:0");
    let (listener, listener_addr) = files.start_listener().await;
    let admin = listener
        .addr_from_log("admin endpoint serving", "admin")
        .await;
    let (_client, client_addr) = files.start_client(listener_addr).await;

    for got in flood(client_addr).await {
        assert_eq!(
            (got.status, got.mesh_error.as_deref()),
            (502, Some("backend-unreachable")),
            "{got:?}"
        );
    }
    assert_counted(
        admin,
        "phoenix_mesh_http_requests_total",
        &[("status_class", "5xx"), ("made_by", "sidecar")],
        FLOOD,
    )
    .await;

    let lines = assert_bounded(&listener, "backend unreachable", "one outage").await;
    assert!(
        lines[0].contains("Connection refused") && !lines[0].contains("suppressed"),
        "the first failure is logged as it happened: {}",
        lines[0]
    );
    // The last summary is written when its interval ends; then every failure is accounted for.
    let lines = eventually("the summary accounting for every failure", || {
        let lines = lines_about(&listener, "backend unreachable");
        async move { (accounted(&lines) >= FLOOD as u64).then_some(lines) }
    })
    .await;
    assert_eq!(accounted(&lines), FLOOD as u64, "{lines:#?}");
    let summary = lines.last().unwrap();
    for field in [
        format!("\"hop\":\"{backend}\""),
        "\"cause\":\"connection refused\"".to_owned(),
    ] {
        assert!(summary.contains(&field), "{field} missing: {summary}");
    }
}

/// The mesh listener down while requests keep coming: the client answers every one
/// `upstream-unreachable` and counts it, and logs the failed dials a bounded number of times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_listener_outage_under_load_is_logged_once_per_interval() {
    let mut files = MeshFiles::unconnected(&TestPki::new());
    files.client.set_str("admin_listen", "127.0.0.1:0");
    let (client, client_addr) = files.start_client(closed_port_addr()).await;
    let admin = client
        .addr_from_log("admin endpoint serving", "admin")
        .await;

    for got in flood(client_addr).await {
        assert_eq!(
            (got.status, got.mesh_error.as_deref()),
            (503, Some("upstream-unreachable")),
            "{got:?}"
        );
    }
    assert_counted(
        admin,
        "phoenix_mesh_http_requests_total",
        &[("status_class", "5xx"), ("made_by", "sidecar")],
        FLOOD,
    )
    .await;
    assert_bounded(&client, "mesh listener connection failed", "one outage").await;
}

/// Anyone who reaches the listener's port can fail a handshake as often as they like: plain HTTP,
/// or TLS without a client certificate. Each is refused and counted, and each reason is logged a
/// bounded number of times however many connections try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_from_strangers_are_logged_once_per_interval() {
    let pki = TestPki::new();
    let mut files = MeshFiles::unconnected(&pki);
    files.server.set_str("admin_listen", "127.0.0.1:0");
    let (listener, listener_addr) = files.start_listener().await;
    let admin = listener
        .addr_from_log("admin endpoint serving", "admin")
        .await;

    let plain = format!("GET / HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n");
    let anonymous = client_config(pki.root_pem(), None, &[]);
    let strangers: Vec<_> = (0..8)
        .map(|_| {
            let (plain, anonymous) = (plain.clone(), anonymous.clone());
            tokio::spawn(async move {
                for _ in 0..FLOOD / 8 / 2 {
                    let mut tcp = tokio::net::TcpStream::connect(listener_addr).await.unwrap();
                    let answer = exchange(&mut tcp, plain.as_bytes()).await;
                    assert_eq!(status_of(&answer), Some(400));
                    refusal_alert(listener_addr, anonymous.clone()).await;
                }
            })
        })
        .collect();
    for stranger in strangers {
        within("a stranger", stranger).await.unwrap();
    }

    for (reason, message) in [
        ("plaintext-http", "plain HTTP on the mutual-TLS port"),
        ("no-certificate", "TLS handshake failed"),
    ] {
        assert_counted(
            admin,
            "phoenix_mesh_tls_handshakes_total",
            &[("result", "failed"), ("reason", reason)],
            FLOOD / 2,
        )
        .await;
        assert_bounded(&listener, message, reason).await;
    }
}

/// Responses cut off for making no progress, many at once (a backend that stalls after two bytes):
/// each reaches the downstream broken and counts as a `5xx` made by the listener, which logs the
/// first as it happens, naming the backend and which end stalled, and summarises the rest per
/// interval instead of writing one line per response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_responses_are_counted_and_logged_once_per_interval() {
    const STALLS: usize = 12;
    let pki = TestPki::new();
    let backend = Backend::start().await;
    let mut files = MeshFiles::new(&pki, backend.addr, &pki.listener_cert(), &pki.client_cert());
    files.server.set_str("admin_listen", "127.0.0.1:0");
    files.server.set_str("backend_timeout", "500ms");
    let (listener, listener_addr) = files.start_listener().await;
    let admin = listener
        .addr_from_log("admin endpoint serving", "admin")
        .await;
    let (_client, client_addr) = files.start_client(listener_addr).await;

    let stalls: Vec<_> = (0..STALLS)
        .map(|_| tokio::spawn(try_get(client_addr, "/stall")))
        .collect();
    for stall in stalls {
        let got = within("a stalled request", stall).await.unwrap();
        assert!(
            got.as_ref().is_err_and(|e| e.starts_with("body:")),
            "a stalled response must end broken: {got:?}"
        );
    }
    assert_counted(
        admin,
        "phoenix_mesh_http_requests_total",
        &[("status_class", "5xx"), ("made_by", "sidecar")],
        STALLS,
    )
    .await;
    let message = "response made no progress; cut off";
    let lines = assert_bounded(&listener, message, "stalled responses").await;
    assert!(
        lines.len() < STALLS
            && lines[0].contains("sender-stalled")
            && lines[0].contains(&format!("backend {}", backend.addr)),
        "{lines:#?}"
    );
}
