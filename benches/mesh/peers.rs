//! The reference peers the harness starts and stops itself: the plain backend every chain ends at,
//! nginx and HAProxy as mTLS servers, and nginx as the client-side proxy. Their configs are the
//! templates in `benches/peers/`, filled in with the run directory, the PKI and the ports below;
//! every peer runs pinned to the server CPU under the kernel's default scheduling policy, as
//! Debian's units run them, and writes its pid file to `RUN/<peer>.pid`.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::procs;
use crate::sys;

/// The plain backend's port (also `--backend`'s default).
pub const BACKEND_PORT: u16 = 18080;
/// nginx client proxy -> nginx mTLS -> backend.
pub const CHAIN_NGINX_PORT: u16 = 18081;
/// nginx client proxy -> HAProxy mTLS -> backend.
pub const CHAIN_HAPROXY_PORT: u16 = 18082;
/// nginx mTLS, answering itself.
pub const NGINX_MTLS_FIXED_PORT: u16 = 18443;
/// nginx mTLS -> backend.
pub const NGINX_MTLS_PROXY_PORT: u16 = 18444;
/// HAProxy mTLS -> backend.
pub const HAPROXY_MTLS_PORT: u16 = 18445;
/// HAProxy mTLS, answering itself.
pub const HAPROXY_MTLS_FIXED_PORT: u16 = 18447;

/// One reference peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Backend,
    NginxMtls,
    Haproxy,
    NginxClient,
}

impl Peer {
    /// In start order: each peer's upstreams are up before it.
    pub const ALL: [Peer; 4] = [
        Peer::Backend,
        Peer::NginxMtls,
        Peer::Haproxy,
        Peer::NginxClient,
    ];

    /// Its name, and the stem of its pid, config and log files.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Backend => "backend",
            Peer::NginxMtls => "nginx-mtls",
            Peer::Haproxy => "haproxy",
            Peer::NginxClient => "nginx-client",
        }
    }

    fn template(self) -> &'static str {
        match self {
            Peer::Backend => include_str!("../peers/nginx-backend.conf.in"),
            Peer::NginxMtls => include_str!("../peers/nginx-mtls.conf.in"),
            Peer::Haproxy => include_str!("../peers/haproxy.cfg.in"),
            Peer::NginxClient => include_str!("../peers/nginx-client.conf.in"),
        }
    }

    fn ports(self) -> &'static [u16] {
        match self {
            Peer::Backend => &[BACKEND_PORT],
            Peer::NginxMtls => &[NGINX_MTLS_FIXED_PORT, NGINX_MTLS_PROXY_PORT],
            Peer::Haproxy => &[HAPROXY_MTLS_PORT, HAPROXY_MTLS_FIXED_PORT],
            Peer::NginxClient => &[CHAIN_NGINX_PORT, CHAIN_HAPROXY_PORT],
        }
    }

    /// `RUN/<peer>.pid`.
    pub fn pidfile(self, run: &Path) -> PathBuf {
        run.join(format!("{}.pid", self.name()))
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The Debian packages the harness needs for `tools`, or an error naming the missing ones.
pub fn check_tools(tools: &[&str]) -> anyhow::Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = |t: &str| std::env::split_paths(&path).any(|d| d.join(t).is_file());
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !found(t)).collect();
    if !missing.is_empty() {
        bail!(
            "{} not found on PATH: the benchmark starts nginx and HAProxy itself and drives them with wrk; \
             install them with `apt-get install -y nginx haproxy wrk` (Debian/Ubuntu package names)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Fills in a template; refuses one that still holds a `@NAME@` placeholder.
fn render(peer: Peer, run: &Path, pki: &Path) -> anyhow::Result<String> {
    let mut text = peer.template().to_owned();
    for (k, v) in [
        ("@RUN@", run.display().to_string()),
        ("@PKI@", pki.display().to_string()),
        ("@HOST@", "127.0.0.1".to_string()),
        ("@BACKEND_PORT@", BACKEND_PORT.to_string()),
        ("@CHAIN_NGINX_PORT@", CHAIN_NGINX_PORT.to_string()),
        ("@CHAIN_HAPROXY_PORT@", CHAIN_HAPROXY_PORT.to_string()),
        ("@NGINX_MTLS_FIXED_PORT@", NGINX_MTLS_FIXED_PORT.to_string()),
        ("@NGINX_MTLS_PROXY_PORT@", NGINX_MTLS_PROXY_PORT.to_string()),
        ("@HAPROXY_MTLS_PORT@", HAPROXY_MTLS_PORT.to_string()),
        (
            "@HAPROXY_MTLS_FIXED_PORT@",
            HAPROXY_MTLS_FIXED_PORT.to_string(),
        ),
    ] {
        text = text.replace(k, &v);
    }
    if let Some(i) = text.find('@') {
        let rest = &text[i + 1..];
        if let Some(j) = rest.find('@') {
            let name = &rest[..j];
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                bail!(
                    "{}: template placeholder @{name}@ left unfilled",
                    peer.name()
                );
            }
        }
    }
    Ok(text)
}

/// The peers this run started; stopped (TERM, then KILL) when dropped.
#[derive(Debug)]
pub struct Peers {
    run: PathBuf,
    pki: PathBuf,
    cpu: String,
    started: Vec<Peer>,
}

impl Peers {
    /// Starts `which` in order, pinned to `cpu`, with configs in `RUN/conf`.
    pub fn start(run: &Path, pki: &Path, cpu: &str, which: &[Peer]) -> anyhow::Result<Peers> {
        fs::create_dir_all(run.join("conf"))?;
        fs::create_dir_all(run.join("tmp"))?;
        let mut peers = Peers {
            run: run.to_owned(),
            pki: pki.to_owned(),
            cpu: cpu.to_owned(),
            started: Vec::new(),
        };
        for &p in which {
            peers.start_one(p)?;
            peers.started.push(p);
        }
        Ok(peers)
    }

    fn start_one(&self, p: Peer) -> anyhow::Result<()> {
        for &port in p.ports() {
            if procs::accepts(addr(port)) {
                bail!(
                    "127.0.0.1:{port} ({}) is already in use: stop whatever listens there (ss -ltnp), \
                     e.g. the peers of an earlier run that was killed with SIGKILL",
                    p.name()
                );
            }
        }
        let run = &self.run;
        let _ = fs::remove_file(p.pidfile(run));
        let text = render(p, run, &self.pki)?;
        let out = match p {
            Peer::Haproxy => {
                let conf = run.join("conf/haproxy.cfg");
                fs::write(&conf, text)?;
                let check = Command::new("haproxy")
                    .arg("-c")
                    .arg("-f")
                    .arg(&conf)
                    .output()
                    .context("running haproxy -c (apt-get install -y haproxy)")?;
                if !check.status.success() {
                    bail!(
                        "haproxy refuses {}: {}{}",
                        conf.display(),
                        String::from_utf8_lossy(&check.stdout),
                        String::from_utf8_lossy(&check.stderr)
                    );
                }
                Command::new("taskset")
                    .args(["-c", &self.cpu, "haproxy", "-f"])
                    .arg(&conf)
                    .output()
                    .context("starting haproxy")?
            }
            _ => {
                let conf = run.join(format!("conf/{}.conf", p.name()));
                fs::write(&conf, text)?;
                let err = run.join(format!("{}.err", p.name()));
                Command::new("taskset")
                    .args(["-c", &self.cpu, "nginx", "-p"])
                    .arg(format!("{}/", run.display()))
                    .arg("-e")
                    .arg(&err)
                    .arg("-c")
                    .arg(&conf)
                    .output()
                    .context("starting nginx (apt-get install -y nginx)")?
            }
        };
        if !out.status.success() {
            bail!(
                "{} failed to start: {}{}(logs in {})",
                p.name(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                run.display()
            );
        }
        for &port in p.ports() {
            procs::wait_listen(addr(port))
                .with_context(|| format!("{}: see {}/{}.err", p.name(), run.display(), p.name()))?;
        }
        let t0 = Instant::now();
        while sys::read_pidfile(&p.pidfile(run)).is_none() {
            if t0.elapsed() > Duration::from_secs(5) {
                bail!("{}: no pid file {}", p.name(), p.pidfile(run).display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// A fresh process for `p` (the memory step measures each server from its start).
    pub fn restart(&self, p: Peer) -> anyhow::Result<()> {
        stop(&self.run, p);
        self.start_one(p)
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        for &p in self.started.iter().rev() {
            stop(&self.run, p);
        }
    }
}

/// Stops the peer whose pid file is `RUN/<peer>.pid`: TERM, then KILL after 5 s.
pub fn stop(run: &Path, p: Peer) {
    let pidfile = p.pidfile(run);
    let Some(pid) = sys::read_pidfile(&pidfile) else {
        return;
    };
    let pid = pid.to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let alive = || {
        Command::new("kill")
            .args(["-0", &pid])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let t0 = Instant::now();
    while alive() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive() {
        eprintln!("   {} ignored TERM for 5 s; killing it", p.name());
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    }
    let _ = fs::remove_file(&pidfile);
}
