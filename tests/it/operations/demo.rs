//! `phoenix-mesh demo`, the long-running form, through the real binary: the `--check` commands it
//! prints pass against it while it runs (its configs name the ports it bound), and SIGTERM, like
//! Ctrl-C, ends it with its directory of private keys removed.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

use crate::support::binary::{send_signal, BIN};
use crate::support::within;

/// Reads the demo's stdout up to its "Running until" line: the lines so far.
async fn read_until_running(out: &mut Lines<BufReader<ChildStdout>>) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = within("the demo's next line", out.next_line())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("the demo exited early; it printed:\n{}", lines.join("\n")));
        let done = line.starts_with("Running until");
        lines.push(line);
        if done {
            return lines;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_prints_check_commands_that_pass_and_sigterm_removes_its_directory() {
    let mut child = Command::new(BIN)
        .arg("demo")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let printed = read_until_running(&mut out).await;
    let all = printed.join("\n");
    let dir = printed
        .iter()
        .find_map(|l| l.split_once("throwaway PKI in ")?.1.strip_suffix(')'))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no directory in:\n{all}"));
    assert!(dir.join("listener.key").is_file(), "{all}");

    for side in ["server", "client"] {
        let config = dir.join(format!("{side}.toml"));
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(
            !text.contains(":0\""),
            "{side}.toml still says port 0:\n{text}"
        );
        // The command exactly as printed (the paths are temporary ones, without spaces).
        let wanted = format!("{BIN} {side} --check --config {}", config.display());
        let command = printed
            .iter()
            .map(|l| l.trim())
            .find(|l| *l == wanted)
            .unwrap_or_else(|| panic!("no `{wanted}` in:\n{all}"));
        let words: Vec<&str> = command.split_whitespace().collect();
        let run = within(
            command,
            Command::new(words[0])
                .args(&words[1..])
                .env("RUST_LOG", "warn")
                .output(),
        )
        .await
        .unwrap();
        let report = String::from_utf8_lossy(&run.stdout);
        assert_eq!(run.status.code(), Some(0), "{command}:\n{report}");
        // A warning would be the listener probe not finding the demo on the configured port.
        assert!(!report.contains("[WARN]"), "{command}:\n{report}");
        if side == "server" {
            assert!(report.contains("accepts connections"), "{report}");
        }
    }

    send_signal(child.id().unwrap(), "TERM");
    let status = within("the demo exiting on SIGTERM", child.wait())
        .await
        .unwrap();
    assert!(
        !dir.exists(),
        "{} is still there after SIGTERM",
        dir.display()
    );
    assert!(status.success(), "{status}");
}
