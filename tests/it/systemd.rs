//! Under systemd `Type=notify` the sidecars say READY, RELOADING and STOPPING on `$NOTIFY_SOCKET`; a
//! test stands in for systemd with a datagram socket.

use std::time::Duration;

use tokio::net::UnixDatagram;

use crate::support::backend::Backend;
use crate::support::within;
use crate::support_ops::{OpsPki, ProcFiles};

const BIN: &str = env!("CARGO_BIN_EXE_phoenix-mesh");

/// The next notification datagram, as text.
async fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = within("an sd_notify datagram", socket.recv(&mut buf))
        .await
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A listener setup (its backend, config files) and the datagram socket standing in for systemd.
struct Notified {
    _backend: Backend,
    files: ProcFiles,
    socket_path: std::path::PathBuf,
    socket: UnixDatagram,
}

impl Notified {
    async fn new() -> Notified {
        let pki = OpsPki::new();
        let backend = Backend::start().await;
        let files = ProcFiles::new(&pki, backend.addr, &pki.listener(), &pki.gateway());
        files.server.write(&files.path("server.toml"));
        let socket_path = files.path("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        Notified {
            _backend: backend,
            files,
            socket_path,
            socket,
        }
    }

    /// Starts the listener with `NOTIFY_SOCKET` set, no watchdog variables but `vars`.
    fn spawn(&self, vars: &[(&str, String)]) -> tokio::process::Child {
        self.spawn_logging(vars, std::process::Stdio::null())
    }

    /// The same, with the listener's stderr going to `stderr`.
    fn spawn_logging(
        &self,
        vars: &[(&str, String)],
        stderr: std::process::Stdio,
    ) -> tokio::process::Child {
        let mut command = tokio::process::Command::new(BIN);
        command
            .args(["server", "--config"])
            .arg(self.files.path("server.toml"))
            .env("NOTIFY_SOCKET", &self.socket_path)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        command.spawn().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn listener_notifies_ready_reloading_and_stopping() {
    let notified = Notified::new().await;
    let (files, socket) = (&notified.files, &notified.socket);
    let mut child = notified.spawn(&[]);
    let pid = child.id().unwrap().to_string();
    let kill = |signal: &str| {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.clone()])
            .status()
            .unwrap();
        assert!(status.success());
    };

    assert_eq!(next_notification(socket).await.trim(), "READY=1");

    kill("HUP");
    let reloading = next_notification(socket).await;
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "systemd's notify-reload wants the time: {reloading:?}"
    );
    assert_eq!(next_notification(socket).await.trim(), "READY=1");

    kill("TERM");
    assert_eq!(next_notification(socket).await.trim(), "STOPPING=1");
    let status = within("the listener exiting", child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");

    // Outside systemd nothing is sent: without NOTIFY_SOCKET the socket stays silent.
    let mut quiet = tokio::process::Command::new(BIN)
        .args(["server", "--config"])
        .arg(files.path("server.toml"))
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let heard = tokio::time::timeout(Duration::from_millis(800), socket.recv(&mut buf)).await;
    assert!(heard.is_err(), "a process outside systemd must not notify");
    quiet.kill().await.unwrap();
}

/// With `WatchdogSec=` (systemd passes `WATCHDOG_USEC`) the listener pings `WATCHDOG=1` until it
/// stops; when `WATCHDOG_PID` names another process (a child started by the unit's main process) it
/// does not.
#[tokio::test(flavor = "multi_thread")]
async fn listener_feeds_the_watchdog_only_when_asked() {
    let notified = Notified::new().await;
    let socket = &notified.socket;

    let mut fed = notified.spawn(&[("WATCHDOG_USEC", "300000".into())]);
    assert_eq!(next_notification(socket).await.trim(), "READY=1");
    for _ in 0..3 {
        assert_eq!(next_notification(socket).await.trim(), "WATCHDOG=1");
    }
    fed.kill().await.unwrap();
    // Drain what the killed process sent before it died.
    let mut buf = [0u8; 64];
    while tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf))
        .await
        .is_ok()
    {}

    let mut other = notified.spawn(&[
        ("WATCHDOG_USEC", "100000".into()),
        ("WATCHDOG_PID", "1".into()),
    ]);
    assert_eq!(next_notification(socket).await.trim(), "READY=1");
    let heard = tokio::time::timeout(Duration::from_millis(800), socket.recv(&mut buf)).await;
    assert!(
        heard.is_err(),
        "pinged a watchdog meant for another process: {:?}",
        heard.map(|n| String::from_utf8_lossy(&buf[..n.unwrap()]).into_owned())
    );
    other.kill().await.unwrap();

    // A zero period (not something systemd sends) is no watchdog, and no panic: tokio would keep the
    // process up after a task panics, so it is stderr that tells.
    let mut zero = notified.spawn_logging(
        &[("WATCHDOG_USEC", "0".into())],
        std::process::Stdio::piped(),
    );
    assert_eq!(next_notification(socket).await.trim(), "READY=1");
    let heard = tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await;
    assert!(heard.is_err(), "a zero watchdog period was pinged");
    zero.start_kill().unwrap();
    let output = within("the listener exiting", zero.wait_with_output())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
