//! The real `phoenix-mesh` binary as a child process. [`Binary`] is the one way every test runs it:
//! `phoenix-mesh [global flags] <side> --config <file> [flags]`, in an environment cleared of what
//! systemd or a terminal would pass down (so a test sets only what it means to), killed when dropped.
//! [`Binary::spawn`] keeps it running and collects its stderr lines ([`Proc`]); [`Binary::output`]
//! runs it to completion.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::files::MeshFiles;
use super::{eventually, within};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_phoenix-mesh");

/// Variables the sidecars act on that the test runner's own environment might carry.
const CLEARED: [&str; 5] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "NO_COLOR",
];

/// How to run the binary once.
pub struct Binary {
    wrapper: Vec<String>,
    global: Vec<OsString>,
    side: String,
    config: OsString,
    flags: Vec<OsString>,
    env: Vec<(String, OsString)>,
}

impl Binary {
    /// `phoenix-mesh <side> --config <config>` with `RUST_LOG=info`.
    pub fn new(side: &str, config: &Path) -> Binary {
        Binary {
            wrapper: Vec::new(),
            global: Vec::new(),
            side: side.to_owned(),
            config: config.into(),
            flags: Vec::new(),
            env: vec![("RUST_LOG".to_owned(), "info".into())],
        }
    }

    /// `phoenix-mesh server --config <config>`.
    pub fn server(config: &Path) -> Binary {
        Binary::new("server", config)
    }

    /// `phoenix-mesh client --config <config>`.
    pub fn client(config: &Path) -> Binary {
        Binary::new("client", config)
    }

    /// Adds `--log-format json` (before the side, where the flag goes).
    pub fn json_logs(self) -> Binary {
        self.global_flags(&["--log-format", "json"])
    }

    /// Adds flags before the side.
    pub fn global_flags(mut self, flags: &[&str]) -> Binary {
        self.global.extend(flags.iter().map(OsString::from));
        self
    }

    /// Adds flags after `--config <config>` (`--check`, `--host x`).
    pub fn flags(mut self, flags: &[&str]) -> Binary {
        self.flags.extend(flags.iter().map(OsString::from));
        self
    }

    /// Sets an environment variable (`RUST_LOG` replaces the default `info`).
    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Binary {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Runs the binary through `wrapper`, a command that execs its arguments (e.g.
    /// `["prlimit", "--nofile=64:64"]`), so the child's pid is still the sidecar's.
    pub fn under(mut self, wrapper: &[&str]) -> Binary {
        self.wrapper = wrapper.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    fn command(&self) -> Command {
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(BIN);
                command
            }
            None => Command::new(BIN),
        };
        command
            .args(&self.global)
            .arg(&self.side)
            .arg("--config")
            .arg(&self.config)
            .args(&self.flags);
        for key in CLEARED {
            command.env_remove(key);
        }
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command.stdin(Stdio::null()).kill_on_drop(true);
        command
    }

    /// Starts it with stderr collected line by line; stdout is discarded.
    pub fn spawn(self) -> Proc {
        let mut child = self
            .command()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(AtomicBool::new(false));
        let mut reader = BufReader::new(child.stderr.take().unwrap()).lines();
        let (sink, end) = (lines.clone(), ended.clone());
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
            end.store(true, Ordering::SeqCst);
        });
        Proc {
            child,
            pid,
            lines,
            ended,
        }
    }

    /// Starts it with stderr going to `stderr` (a file, a socket, a pipe the test reads itself).
    pub fn spawn_with_stderr(self, stderr: impl Into<Stdio>) -> Child {
        self.command()
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap()
    }

    /// Runs it to completion: (exit code, stdout, stderr).
    pub async fn output(self) -> (Option<i32>, String, String) {
        let what = format!("phoenix-mesh {} {:?}", self.side, self.flags);
        let out = within(&what, self.command().output()).await.unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// A running `phoenix-mesh` child with its stderr lines collected; killed when dropped.
pub struct Proc {
    child: Child,
    pub pid: u32,
    lines: Arc<Mutex<Vec<String>>>,
    /// Set when stderr reaches its end (the process exited).
    ended: Arc<AtomicBool>,
}

impl Proc {
    /// Every stderr line so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a stderr line containing every one of `needles` and returns it; fails the test at
    /// once if the process exits without writing one.
    pub async fn wait_for_line(&self, needles: &[&str]) -> String {
        let what = format!("pid {} logging a line with {needles:?}", self.pid);
        let (lines, ended) = (self.lines.clone(), self.ended.clone());
        eventually(&what, || {
            let ended = ended.load(Ordering::SeqCst);
            let lines = lines.lock().unwrap();
            let hit = lines
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned();
            if hit.is_none() && ended {
                panic!("{what}: it exited first; its log:\n{}", lines.join("\n"));
            }
            async move { hit }
        })
        .await
    }

    /// The address in JSON field `key` of the first line containing `message`.
    pub async fn addr_from_log(&self, message: &str, key: &str) -> SocketAddr {
        let line = self.wait_for_line(&[message]).await;
        json_str(&line, key)
            .unwrap_or_else(|| panic!("no {key:?} in {line}"))
            .parse()
            .unwrap()
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid, signal);
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the process to exit on its own.
    pub async fn exit(&mut self) -> ExitStatus {
        within("the process exiting", self.child.wait())
            .await
            .unwrap()
    }

    /// Kills the process and waits for it.
    pub async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }
}

/// Sends `signal` (`HUP`, `TERM`, ...) to process `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// The string value of `"key":"..."` in a JSON log line (no escapes needed for what we read).
pub fn json_str(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_owned())
}

impl MeshFiles {
    /// Writes server.toml and starts the listener binary (JSON logs); returns it and its TLS address.
    pub async fn start_listener(&self) -> (Proc, SocketAddr) {
        let p = Binary::server(&self.write_server()).json_logs().spawn();
        let addr = p
            .addr_from_log("mesh listener accepting mutual TLS", "listen")
            .await;
        (p, addr)
    }

    /// Writes client.toml with `upstreams = [upstream]` and starts the client binary (JSON logs);
    /// returns it and its HTTP address.
    pub async fn start_client(&mut self, upstream: SocketAddr) -> (Proc, SocketAddr) {
        self.client.set_addrs("upstreams", &[upstream]);
        let p = Binary::client(&self.write_client()).json_logs().spawn();
        let addr = p
            .addr_from_log("client sidecar accepting plain HTTP", "listen")
            .await;
        (p, addr)
    }
}
