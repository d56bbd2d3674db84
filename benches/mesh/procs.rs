//! Processes under test that the harness starts itself (phoenix listener and client, an nginx front
//! for the deployed path), pinned to the server CPU, plus the wrk runner pinned to the load CPU.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::sys;
use crate::tls::ClientPki;

/// A process we started; killed (TERM, then KILL) on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("   {} ignored TERM for 5 s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a process we start listens: a loopback port, or a unix socket (the client sidecar only).
#[derive(Debug, Clone)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    /// As the phoenix config's `listen` and nginx's `server` directive both take it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(addr) => addr.fmt(f),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Listen {
    /// A short name for files: the port, or `unix`.
    fn tag(&self) -> String {
        match self {
            Listen::Tcp(addr) => addr.port().to_string(),
            Listen::Unix(_) => "unix".into(),
        }
    }

    fn accepts(&self) -> bool {
        match self {
            Listen::Tcp(addr) => {
                TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok()
            }
            Listen::Unix(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
        }
    }

    /// Waits up to 10 s for something to accept here.
    fn wait(&self) -> anyhow::Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if self.accepts() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("nothing accepts on {self} after 10 s")
    }
}

/// Whether something accepts connections on `addr` now.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Waits up to 10 s for something to accept on `addr`.
pub fn wait_listen(addr: SocketAddr) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing accepts on {addr} after 10 s")
}

/// The scheduling policy the phoenix processes run under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sched {
    /// `SCHED_BATCH`, as the deploy/ units set it (`CPUSchedulingPolicy=batch`): a woken sidecar does
    /// not preempt the process that woke it.
    Batch,
    /// The kernel's default (`SCHED_OTHER`).
    Other,
}

impl Sched {
    pub fn name(self) -> &'static str {
        match self {
            Sched::Batch => "batch",
            Sched::Other => "other",
        }
    }
}

/// Where and how a phoenix process runs: the CPU it is pinned to and its scheduling policy.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    pub cpu: &'a str,
    pub sched: Sched,
}

/// Starts `phoenix-mesh server` on `at`, forwarding to `backend`.
#[allow(clippy::too_many_arguments)]
pub fn listener(
    bin: &Path,
    dir: &Path,
    at: Placement<'_>,
    listen: SocketAddr,
    backend: SocketAddr,
    pki: &ClientPki,
    server_cert: &Path,
    server_key: &Path,
    backend_http2: bool,
) -> anyhow::Result<Proc> {
    let cfg = dir.join(format!("listener-{}.toml", listen.port()));
    fs::write(
        &cfg,
        format!(
            "listen = \"{listen}\"\nbackend = \"{backend}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n{}",
            server_cert.display(),
            server_key.display(),
            pki.ca.display(),
            // Only when on: a --bin from before the key existed refuses unknown keys.
            if backend_http2 { "backend_http2 = true\n" } else { "" }
        ),
    )?;
    spawn(
        bin,
        dir,
        at,
        "server",
        &cfg,
        &Listen::Tcp(listen),
        &format!("listener-{}", listen.port()),
    )
}

/// Starts `phoenix-mesh client` on `at`: plain HTTP on `listen`, mTLS to `upstream`.
pub fn client(
    bin: &Path,
    dir: &Path,
    at: Placement<'_>,
    listen: &Listen,
    upstream: SocketAddr,
    pki: &ClientPki,
    http2: bool,
) -> anyhow::Result<Proc> {
    let cfg = dir.join(format!("client-{}.toml", listen.tag()));
    fs::write(
        &cfg,
        format!(
            "listen = \"{listen}\"\nupstreams = [\"{upstream}\"]\nserver_name = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nupstream_http2 = {http2}\n",
            pki.server_name,
            pki.cert.display(),
            pki.key.display(),
            pki.ca.display()
        ),
    )?;
    spawn(
        bin,
        dir,
        at,
        "client",
        &cfg,
        listen,
        &format!("client-{}", listen.tag()),
    )
}

fn spawn(
    bin: &Path,
    dir: &Path,
    at: Placement<'_>,
    sub: &str,
    cfg: &Path,
    listen: &Listen,
    name: &str,
) -> anyhow::Result<Proc> {
    // A leftover process on our port would answer instead of the one we start (and we would read the
    // CPU time of the wrong process), so refuse to start over it.
    if listen.accepts() {
        bail!("{listen} is already in use: stop whatever listens there (ss -ltnp) or pass --base-port");
    }
    let log = fs::File::create(dir.join(format!("{name}.log")))?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", at.cpu]);
    if at.sched == Sched::Batch {
        cmd.args(["chrt", "--batch", "0"]);
    }
    let child = cmd
        .arg(bin)
        .args([sub, "--config"])
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} {sub}", bin.display()))?;
    let p = Proc {
        name: name.to_owned(),
        child,
    };
    listen
        .wait()
        .with_context(|| format!("{name}: see {}/{name}.log", dir.display()))?;
    Ok(p)
}

/// An nginx the harness starts itself (one worker, pinned like the servers; stopped when dropped): the
/// gateway nginx of the deployed path ([`HarnessNginx::start`], configured like the peers' client-side
/// nginx) or the h2c backend ([`HarnessNginx::start_h2c_backend`]).
#[derive(Debug)]
pub struct HarnessNginx {
    pidfile: PathBuf,
}

impl HarnessNginx {
    /// nginx proxying plain HTTP on `listen` to `upstream` over keep-alive HTTP/1.1 connections, as
    /// the deployed gateway does.
    pub fn start(
        dir: &Path,
        cpu: &str,
        listen: SocketAddr,
        upstream: &Listen,
    ) -> anyhow::Result<Self> {
        HarnessNginx::start_with(
            dir,
            cpu,
            listen,
            &format!(
                "  proxy_http_version 1.1;\n  proxy_set_header Connection \"\";\n\
                 upstream mesh_client {{ server {upstream}; keepalive 128; keepalive_requests 1000000; keepalive_timeout 300s; }}\n\
                 server {{ listen {listen} backlog=4096; location / {{ proxy_pass http://mesh_client; }} }}\n"
            ),
        )
    }

    /// The peers' backend (a fixed `hello from backend` body) served over h2c with prior knowledge on
    /// `listen`, for the listener's `backend_http2`.
    pub fn start_h2c_backend(dir: &Path, cpu: &str, listen: SocketAddr) -> anyhow::Result<Self> {
        HarnessNginx::start_with(
            dir,
            cpu,
            listen,
            &format!(
                "  server {{ listen {listen} http2 backlog=4096;\n    \
                 location / {{ default_type text/plain; return 200 \"hello from backend\\n\"; }} }}\n"
            ),
        )
    }

    fn start_with(dir: &Path, cpu: &str, listen: SocketAddr, http: &str) -> anyhow::Result<Self> {
        if TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
            bail!("{listen} is already in use: stop whatever listens there (ss -ltnp) or pass --base-port");
        }
        let d = dir.display();
        fs::create_dir_all(dir.join("tmp"))?;
        let pidfile = dir.join("nginx.pid");
        let conf = dir.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon on;\nmaster_process on;\nuser root;\npid {d}/nginx.pid;\n\
                 error_log {d}/nginx.err warn;\nworker_rlimit_nofile 16384;\nevents {{ worker_connections 8192; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/tmp/b;\n  proxy_temp_path {d}/tmp/p;\n\
                 fastcgi_temp_path {d}/tmp/f;\n  uwsgi_temp_path {d}/tmp/u;\n  scgi_temp_path {d}/tmp/s;\n\
                 keepalive_timeout 300s;\n  keepalive_requests 1000000;\n{http}}}\n"
            ),
        )?;
        let st = Command::new("taskset")
            .args(["-c", cpu, "nginx", "-p"])
            .arg(format!("{d}/"))
            .arg("-e")
            .arg(dir.join("nginx.err"))
            .arg("-c")
            .arg(&conf)
            .status()
            .context("starting nginx (apt-get install -y nginx)")?;
        if !st.success() {
            bail!("nginx failed to start; see {d}/nginx.err");
        }
        wait_listen(listen)?;
        Ok(HarnessNginx { pidfile })
    }

    pub fn pid(&self) -> Option<u32> {
        sys::read_pidfile(&self.pidfile)
    }
}

impl Drop for HarnessNginx {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
}

/// One wrk run's numbers.
#[derive(Debug, Default, Clone)]
pub struct WrkResult {
    pub rps: f64,
    pub requests: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub errors: u64,
    pub cmd: String,
}

const WRK_LUA: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("MESHBENCH %d %d %d %d %d\n", latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), summary.requests, e.connect + e.read + e.write + e.status + e.timeout))
end
"#;

/// `taskset -c CPU wrk -t1 -cN -dS --timeout 5s [-H 'Connection: close'] URL`, p99.9 via a done() hook.
pub fn wrk(
    dir: &Path,
    cpu: &str,
    url: &str,
    conns: u32,
    secs: u32,
    keepalive: bool,
) -> anyhow::Result<WrkResult> {
    let script = dir.join("p999.lua");
    if !script.exists() {
        fs::write(&script, WRK_LUA)?;
    }
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpu, "wrk", "-t1"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .args(["--timeout", "5s", "-s"])
        .arg(&script);
    if !keepalive {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(url);
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .output()
        .context("running wrk (apt-get install -y wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut r = WrkResult {
        cmd: shown,
        ..WrkResult::default()
    };
    for line in text.lines() {
        if let Some(v) = line.trim().strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        }
        if let Some(v) = line.strip_prefix("MESHBENCH ") {
            let f: Vec<f64> = v
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(f64::NAN))
                .collect();
            if f.len() == 5 {
                (r.p50_us, r.p99_us, r.p999_us) = (f[0], f[1], f[2]);
                r.requests = f[3] as u64;
                r.errors = f[4] as u64;
            }
        }
    }
    if r.rps == 0.0 {
        bail!(
            "wrk gave no result for {url}: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(r)
}
