//! `cargo bench --bench mesh`: phoenix-mesh against nginx and HAProxy, side by side, in one run.
//!
//! (a) full and resumed mTLS handshakes (+ one request) against each TLS server: handshakes/s, server CPU
//!     µs per handshake from /proc/PID/stat, latency p50/p99, N concurrent clients;
//! (b) wrk through each proxy chain, keep-alive and `Connection: close`: req/s, p50/p99/p99.9 and CPU
//!     µs per request of every tier;
//! (c) server RSS per idle mTLS connection with N open, a fresh server process per rep.
//! Servers run pinned to `--server-cpu`, the load generators to `--load-cpu`; loopback only; every loop
//! bounded in time and count; reps interleaved; a foreign-load guard.
//! The harness starts everything it measures itself: the phoenix sidecars, and the reference peers
//! (the backend, nginx and HAProxy, from the configs in benches/peers/) with a PKI it generates.
//! See benches/README.md.

mod peers;
mod pki;
mod procs;
mod sys;
mod tls;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;

/// phoenix-mesh benchmark harness (see benches/README.md).
#[derive(Debug, Parser)]
#[command(name = "mesh-bench")]
struct Args {
    /// Passed by `cargo bench`; without it (e.g. `cargo test --all-targets`) the harness does nothing.
    #[arg(long, hide = true)]
    bench: bool,
    /// The run directory: the generated PKI (RUN/pki), the peers' configs (RUN/conf), pid files
    /// (RUN/*.pid) and logs, and results (RUN/results). Default: $RUN, else /tmp/phoenix-mesh-peers.
    #[arg(long)]
    run: Option<PathBuf>,
    /// Shape of the PKI the harness generates in RUN/pki: root (the root signs the leaves, as
    /// BENCHMARKS.md measured) or step-ca (root + intermediate, as the homelab's step-ca issues).
    #[arg(long, value_enum, default_value = "root")]
    pki: pki::Shape,
    /// Client certificate, key and CA for every target (default: RUN/pki/client.crt, client.key,
    /// phoenix_root_ca.crt). Naming any of these five files keeps an existing RUN/pki.
    #[arg(long)]
    cert: Option<PathBuf>,
    #[arg(long)]
    key: Option<PathBuf>,
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Server certificate and key for the phoenix listener (default: RUN/pki/server.crt, server.key).
    #[arg(long)]
    server_cert: Option<PathBuf>,
    #[arg(long)]
    server_key: Option<PathBuf>,
    /// SNI and the name the server certificates carry.
    #[arg(long, default_value = "traefik.internal.test")]
    server_name: String,
    /// Where JSON lines, tables and logs go (default RUN/results/mesh-EPOCH).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Repetitions, interleaved (rep 1 of every cell, then rep 2, ...); medians are reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per handshake loop and per wrk run.
    #[arg(long, default_value_t = 10)]
    secs: u32,
    /// Concurrent handshake clients.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    hs_clients: Vec<usize>,
    /// The load generator offers TLS_AES_128_GCM_SHA256 first (default: AES-256-GCM-SHA384 first, like
    /// OpenSSL's client and `openssl s_time`).
    #[arg(long)]
    aes128_first: bool,
    /// Handshake modes.
    #[arg(long, value_delimiter = ',', default_value = "full,resumed")]
    hs_modes: Vec<String>,
    /// wrk connection counts.
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    conns: Vec<u32>,
    /// wrk keep-alive modes: ka (keep-alive), close (`Connection: close`).
    #[arg(long, value_delimiter = ',', default_value = "ka,close")]
    wrk_modes: Vec<String>,
    /// Idle connection counts for the memory step.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    idle: Vec<usize>,
    /// Which steps: hs, wrk, idle.
    #[arg(long, value_delimiter = ',', default_value = "hs,wrk,idle")]
    only: Vec<String>,
    /// Only targets / chains whose name contains one of these (default: all).
    #[arg(long, value_delimiter = ',')]
    filter: Vec<String>,
    /// Do not start nginx / HAProxy peers nor measure them (only phoenix and --target/--chain); the
    /// harness still starts the backend when nothing answers on the default --backend.
    #[arg(long)]
    no_peers: bool,
    /// Extra TLS server: 'NAME|HOST:PORT|PIDFILE_OR_PID[|RESTART_COMMAND]' (RESTART_COMMAND gives a fresh
    /// process for the memory step).
    #[arg(long)]
    target: Vec<String>,
    /// Extra chain for wrk: 'NAME|URL|tier=PIDFILE_OR_PID;tier=...'.
    #[arg(long)]
    chain: Vec<String>,
    /// Plain-HTTP backend behind the phoenix listener (the nginx backend the harness starts).
    #[arg(long, default_value = "127.0.0.1:18080")]
    backend: SocketAddr,
    /// First of the ports the harness uses for its own processes (listener, idle listener, clients, nginx front).
    #[arg(long, default_value_t = 18540)]
    base_port: u16,
    #[arg(long, default_value = "0")]
    load_cpu: String,
    #[arg(long, default_value = "1")]
    server_cpu: String,
    /// Scheduling policy of the phoenix processes: batch, as the deploy/ units set it
    /// (CPUSchedulingPolicy=batch), or other (the kernel default). nginx and HAProxy keep theirs.
    #[arg(long, value_enum, default_value = "batch")]
    sched: procs::Sched,
    /// Foreign load (cores) above which a run is retried.
    #[arg(long, default_value_t = 0.08)]
    foreign_max: f64,
    /// Foreign load (cores) below which the box counts as quiet before a run.
    #[arg(long, default_value_t = 0.05)]
    quiet: f64,
    /// Longest wait (s) for a quiet box before each run.
    #[arg(long, default_value_t = 60)]
    quiet_wait: u64,
    /// Attempts per run while the foreign load is too high.
    #[arg(long, default_value_t = 2)]
    attempts: u32,
    /// The phoenix-mesh binary (default: the one cargo built for this bench).
    #[arg(long)]
    bin: Option<PathBuf>,
}

#[derive(Debug, Clone)]
enum PidSpec {
    Pid(u32),
    File(PathBuf),
}

impl PidSpec {
    fn parse(s: &str, run: &Path) -> PidSpec {
        match s.parse() {
            Ok(p) => PidSpec::Pid(p),
            Err(_) if Path::new(s).is_absolute() => PidSpec::File(s.into()),
            Err(_) => PidSpec::File(run.join(s)),
        }
    }
    fn pids(&self) -> Vec<u32> {
        let root = match self {
            PidSpec::Pid(p) => Some(*p),
            PidSpec::File(f) => sys::read_pidfile(f),
        };
        root.map_or_else(Vec::new, |r| sys::tree(&[r]))
    }
}

/// How the memory step gets a fresh server process.
#[derive(Debug, Clone)]
enum Restart {
    /// A shell command (`--target`'s RESTART_COMMAND).
    Command(String),
    /// A peer the harness started.
    Peer(peers::Peer),
}

#[derive(Debug, Clone)]
struct Target {
    name: String,
    addr: SocketAddr,
    pids: PidSpec,
    restart: Option<Restart>,
    phoenix: bool,
}

#[derive(Debug, Clone)]
struct Chain {
    name: String,
    url: String,
    tiers: Vec<(String, PidSpec)>,
}

/// What a guarded run returns: values, command, foreign cores, steal cores, attempts.
type Guarded = (Vec<(String, f64)>, String, f64, f64, u32);

/// One measured cell of one rep.
#[derive(Debug, Clone)]
struct Rec {
    kind: &'static str,
    target: String,
    cell: String,
    rep: usize,
    vals: Vec<(String, f64)>,
    foreign: f64,
    steal: f64,
    attempts: u32,
    cmd: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.bench {
        println!("mesh bench: run with `cargo bench --bench mesh` (see benches/README.md); nothing to do in test mode");
        return ExitCode::SUCCESS;
    }
    // Pin ourselves to the load CPU and raise the fd limit (5000 idle connections) by re-executing under
    // taskset + `ulimit -n <hard limit>`; the servers we spawn re-pin themselves and inherit the limit.
    if std::env::var_os("PHOENIX_MESH_BENCH_PINNED").is_none() {
        let Ok(me) = std::env::current_exe() else {
            eprintln!("mesh bench: cannot find my own executable");
            return ExitCode::FAILURE;
        };
        let st = Command::new("sh")
            .args([
                "-c",
                "ulimit -n \"$(ulimit -Hn)\" && exec \"$@\"",
                "sh",
                "taskset",
                "-c",
                &args.load_cpu,
            ])
            .arg(me)
            .args(std::env::args_os().skip(1))
            .env("PHOENIX_MESH_BENCH_PINNED", "1")
            .status();
        return match st {
            Ok(s) if s.success() => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("mesh bench: re-exec under taskset failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Ctx {
    args: Args,
    out: PathBuf,
    pki: tls::ClientPki,
    server_cert: PathBuf,
    server_key: PathBuf,
    bin: PathBuf,
    ours_extra: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    jsonl: std::sync::Mutex<fs::File>,
}

impl Ctx {
    fn run(&self) -> &Path {
        self.args
            .run
            .as_deref()
            .unwrap_or(Path::new("/tmp/phoenix-mesh-peers"))
    }

    /// Every process tree whose CPU is "ours" (not foreign): peers' pid files and what we started.
    fn ours(&self) -> Vec<u32> {
        let mut roots: Vec<u32> = fs::read_dir(self.run())
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
                    .filter_map(|e| sys::read_pidfile(&e.path()))
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(x) = self.ours_extra.lock() {
            roots.extend(x.iter());
        }
        sys::tree(&roots)
    }

    /// Runs `f` after waiting for a quiet box; retries while the foreign load during it is too high.
    fn guarded(
        &self,
        what: &str,
        mut f: impl FnMut() -> anyhow::Result<(Vec<(String, f64)>, String)>,
    ) -> anyhow::Result<Guarded> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            sys::wait_quiet(
                &|| self.ours(),
                self.args.quiet,
                Duration::from_secs(self.args.quiet_wait),
            );
            let pids = self.ours();
            let a = sys::Snap::take(&pids);
            let (vals, cmd) = f()?;
            let b = sys::Snap::take(&pids);
            let (foreign, steal) = a.foreign(&b);
            if foreign <= self.args.foreign_max || attempt >= self.args.attempts {
                if foreign > self.args.foreign_max {
                    eprintln!("   !! {what}: foreign load {foreign:.2} cores on every attempt; kept the last");
                }
                return Ok((vals, cmd, foreign, steal, attempt));
            }
            eprintln!(
                "   {what}: foreign load {foreign:.2} cores, retrying ({attempt}/{})",
                self.args.attempts
            );
        }
    }

    fn record(&self, r: &Rec) {
        let mut line = format!(
            "{{\"kind\":\"{}\",\"target\":\"{}\",\"cell\":\"{}\",\"rep\":{},\"phoenix_sched\":\"{}\",\"foreign_cores\":{:.3},\"steal_cores\":{:.3},\"attempts\":{}",
            r.kind, r.target, r.cell, r.rep, self.args.sched.name(), r.foreign, r.steal, r.attempts
        );
        for (k, v) in &r.vals {
            let _ = write!(
                line,
                ",\"{k}\":{}",
                if v.is_finite() {
                    format!("{v:.3}")
                } else {
                    "null".into()
                }
            );
        }
        let _ = write!(
            line,
            ",\"cmd\":\"{}\"}}",
            r.cmd.replace('\\', "/").replace('"', "'")
        );
        if let Ok(mut f) = self.jsonl.lock() {
            let _ = writeln!(f, "{line}");
        }
        let short: Vec<String> = r
            .vals
            .iter()
            .map(|(k, v)| format!("{k}={}", fmt_num(*v)))
            .collect();
        println!(
            "rep {} {:<5} {:<26} {:<14} {}  foreign {:.2}",
            r.rep,
            r.kind,
            r.target,
            r.cell,
            short.join(" "),
            r.foreign
        );
    }
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn parse_target(s: &str, run: &Path) -> anyhow::Result<Target> {
    let p: Vec<&str> = s.split('|').collect();
    if p.len() < 3 {
        bail!("--target {s:?}: expected NAME|HOST:PORT|PIDFILE_OR_PID[|RESTART_COMMAND]");
    }
    let addr: SocketAddr = p[1]
        .parse()
        .with_context(|| format!("--target {s:?}: bad address"))?;
    if !addr.ip().is_loopback() {
        bail!("--target {s:?}: loopback addresses only");
    }
    Ok(Target {
        name: p[0].into(),
        addr,
        pids: PidSpec::parse(p[2], run),
        restart: p.get(3).map(|r| Restart::Command((*r).to_owned())),
        phoenix: false,
    })
}

fn parse_chain(s: &str, run: &Path) -> anyhow::Result<Chain> {
    let p: Vec<&str> = s.split('|').collect();
    if p.len() != 3 || !p[1].starts_with("http://127.") {
        bail!("--chain {s:?}: expected NAME|http://127.x.x.x:PORT/|tier=PIDFILE;tier=PID");
    }
    let tiers = p[2]
        .split(';')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (k, v) = t.split_once('=').unwrap_or(("server", t));
            (k.to_owned(), PidSpec::parse(v, run))
        })
        .collect();
    Ok(Chain {
        name: p[0].into(),
        url: p[1].into(),
        tiers,
    })
}

fn run(mut args: Args) -> anyhow::Result<()> {
    let run_dir = args.run.clone().unwrap_or_else(|| {
        std::env::var_os("RUN")
            .map_or_else(|| PathBuf::from("/tmp/phoenix-mesh-peers"), PathBuf::from)
    });
    args.run = Some(run_dir.clone());
    // Before anything else: every tool this run needs, or the packages to install.
    let mut tools = vec!["nginx"];
    if !args.no_peers {
        tools.push("haproxy");
    }
    if args.only.iter().any(|s| s == "wrk") {
        tools.push("wrk");
    }
    peers::check_tools(&tools)?;
    let pkidir = run_dir.join("pki");
    let files_named = args.cert.is_some()
        || args.key.is_some()
        || args.ca.is_some()
        || args.server_cert.is_some()
        || args.server_key.is_some();
    // The peers always read RUN/pki; the phoenix side and the load generator read the named files.
    if !files_named || (!args.no_peers && !pkidir.join("KIND").exists()) {
        pki::generate(&pkidir, args.pki)
            .with_context(|| format!("generating the PKI in {}", pkidir.display()))?;
    }
    let pki = tls::ClientPki {
        cert: args
            .cert
            .clone()
            .unwrap_or_else(|| pkidir.join("client.crt")),
        key: args
            .key
            .clone()
            .unwrap_or_else(|| pkidir.join("client.key")),
        ca: args
            .ca
            .clone()
            .unwrap_or_else(|| pkidir.join("phoenix_root_ca.crt")),
        server_name: args.server_name.clone(),
    };
    tls::check_files(&pki)?;
    let out = args.out.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        run_dir.join("results").join(format!("mesh-{t}"))
    });
    fs::create_dir_all(&out)?;
    let jsonl = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("mesh.jsonl"))?;
    let ctx = Ctx {
        server_cert: args
            .server_cert
            .clone()
            .unwrap_or_else(|| pkidir.join("server.crt")),
        server_key: args
            .server_key
            .clone()
            .unwrap_or_else(|| pkidir.join("server.key")),
        bin: args
            .bin
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_phoenix-mesh"))),
        pki,
        out: out.clone(),
        ours_extra: std::sync::Arc::new(std::sync::Mutex::new(Vec::new())),
        jsonl: std::sync::Mutex::new(jsonl),
        args,
    };
    // Run a private copy: target/release is shared with other builds, which may replace the binary
    // mid-run (processes started later would then run different code).
    let bin_copy = out.join("phoenix-mesh");
    fs::copy(&ctx.bin, &bin_copy).with_context(|| format!("copying {}", ctx.bin.display()))?;
    let ctx = Ctx {
        bin: bin_copy,
        ..ctx
    };
    let a = &ctx.args;
    println!("mesh bench: results in {}", out.display());
    write_versions(&ctx)?;
    let run = ctx.run();
    let default_backend = SocketAddr::from(([127, 0, 0, 1], peers::BACKEND_PORT));
    let start: &[peers::Peer] = if !a.no_peers {
        &peers::Peer::ALL
    } else if a.backend == default_backend && !procs::accepts(a.backend) {
        &[peers::Peer::Backend]
    } else {
        &[]
    };
    if !start.is_empty() {
        let names: Vec<&str> = start.iter().map(|p| p.name()).collect();
        println!(
            "mesh bench: starting {} (configs in {}/conf)",
            names.join(", "),
            run.display()
        );
    }
    let peers = peers::Peers::start(run, &pkidir_of(&ctx), &a.server_cpu, start)?;
    stop_on_signal(ctx.ours_extra.clone(), run.to_owned(), start.to_vec());
    procs::wait_listen(a.backend).context("the backend (--backend)")?;

    let port = |i: u16| SocketAddr::from(([127, 0, 0, 1], a.base_port + i));
    let (l_addr, idle_addr, c2_addr, c1_addr, front_addr, front_unix_addr) =
        (port(3), port(4), port(41), port(42), port(50), port(51));
    // The same chains with the listener's backend_http2: its own listener, client, front and an h2c
    // backend (nginx serving the peers' backend body over HTTP/2 cleartext).
    let (lh_addr, ch_addr, front_h_addr, backend_h_addr) = (port(5), port(43), port(52), port(60));
    let cpu = a.server_cpu.as_str();
    let at = procs::Placement {
        cpu,
        sched: a.sched,
    };
    let listener = procs::listener(
        &ctx.bin,
        &out,
        at,
        l_addr,
        a.backend,
        &ctx.pki,
        &ctx.server_cert,
        &ctx.server_key,
        false,
    )?;
    let backend_h2c =
        procs::HarnessNginx::start_h2c_backend(&out.join("backend-h2c"), cpu, backend_h_addr)?;
    let backend_h2c_pid = backend_h2c.pid().context("h2c backend pid")?;
    let listener_h2c = procs::listener(
        &ctx.bin,
        &out,
        at,
        lh_addr,
        backend_h_addr,
        &ctx.pki,
        &ctx.server_cert,
        &ctx.server_key,
        true,
    )?;
    let ch = procs::Listen::Tcp(ch_addr);
    let client_h2c = procs::client(&ctx.bin, &out, at, &ch, lh_addr, &ctx.pki, true)?;
    let front_h2c = procs::HarnessNginx::start(&out.join("front-h2c"), cpu, front_h_addr, &ch)?;
    let front_h2c_pid = front_h2c.pid().context("nginx front (h2c) pid")?;
    let (c2, c1) = (procs::Listen::Tcp(c2_addr), procs::Listen::Tcp(c1_addr));
    let client_h2 = procs::client(&ctx.bin, &out, at, &c2, l_addr, &ctx.pki, true)?;
    let client_h1 = procs::client(&ctx.bin, &out, at, &c1, l_addr, &ctx.pki, false)?;
    let front = procs::HarnessNginx::start(&out.join("front"), cpu, front_addr, &c2)?;
    let front_pid = front.pid().context("nginx front pid")?;
    // The deployed path again with nginx reaching the client through a unix socket.
    let cu = procs::Listen::Unix(out.join("client.sock"));
    let client_unix = procs::client(&ctx.bin, &out, at, &cu, l_addr, &ctx.pki, true)?;
    let front_unix =
        procs::HarnessNginx::start(&out.join("front-unix"), cpu, front_unix_addr, &cu)?;
    let front_unix_pid = front_unix.pid().context("nginx front (unix) pid")?;
    if let Ok(mut x) = ctx.ours_extra.lock() {
        x.extend([
            listener.pid(),
            client_h2.pid(),
            client_h1.pid(),
            front_pid,
            client_unix.pid(),
            front_unix_pid,
            backend_h2c_pid,
            listener_h2c.pid(),
            client_h2c.pid(),
            front_h2c_pid,
        ]);
    }

    // Targets and chains.
    let mut targets = vec![Target {
        name: "phoenix listener->backend".into(),
        addr: l_addr,
        pids: PidSpec::Pid(listener.pid()),
        restart: None,
        phoenix: true,
    }];
    let backend = PidSpec::File(peers::Peer::Backend.pidfile(run));
    // wrk -> [nginx front ->] phoenix client -> listener -> backend.
    let phoenix_chain = |name: &str, addr: SocketAddr, front: Option<u32>, client: u32| {
        let h2c = name.contains("h2c backend");
        let mut tiers: Vec<_> = front
            .map(|pid| ("front".to_string(), PidSpec::Pid(pid)))
            .into_iter()
            .collect();
        tiers.extend([
            ("client".into(), PidSpec::Pid(client)),
            (
                "mtls".into(),
                PidSpec::Pid(if h2c {
                    listener_h2c.pid()
                } else {
                    listener.pid()
                }),
            ),
            (
                "backend".into(),
                if h2c {
                    PidSpec::Pid(backend_h2c_pid)
                } else {
                    backend.clone()
                },
            ),
        ]);
        Chain {
            name: name.into(),
            url: format!("http://{addr}/"),
            tiers,
        }
    };
    let mut chains = vec![
        phoenix_chain(
            "phoenix client->listener h2",
            c2_addr,
            None,
            client_h2.pid(),
        ),
        phoenix_chain(
            "phoenix client->listener h1",
            c1_addr,
            None,
            client_h1.pid(),
        ),
        phoenix_chain(
            "nginx->phoenix (deployed)",
            front_addr,
            Some(front_pid),
            client_h2.pid(),
        ),
        phoenix_chain(
            "nginx->phoenix unix (deployed)",
            front_unix_addr,
            Some(front_unix_pid),
            client_unix.pid(),
        ),
        phoenix_chain(
            "phoenix client->listener h2, h2c backend",
            ch_addr,
            None,
            client_h2c.pid(),
        ),
        phoenix_chain(
            "nginx->phoenix (deployed, h2c backend)",
            front_h_addr,
            Some(front_h2c_pid),
            client_h2c.pid(),
        ),
    ];
    if !a.no_peers {
        use peers::Peer;
        let t = |name: &str, port: u16, peer: Peer| Target {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            pids: PidSpec::File(peer.pidfile(run)),
            restart: Some(Restart::Peer(peer)),
            phoenix: false,
        };
        targets.push(t(
            "nginx->backend",
            peers::NGINX_MTLS_PROXY_PORT,
            Peer::NginxMtls,
        ));
        targets.push(t(
            "nginx fixed",
            peers::NGINX_MTLS_FIXED_PORT,
            Peer::NginxMtls,
        ));
        targets.push(t(
            "haproxy->backend",
            peers::HAPROXY_MTLS_PORT,
            Peer::Haproxy,
        ));
        targets.push(t(
            "haproxy fixed",
            peers::HAPROXY_MTLS_FIXED_PORT,
            Peer::Haproxy,
        ));
        let nc = PidSpec::File(Peer::NginxClient.pidfile(run));
        chains.push(Chain {
            name: "nginx->nginx".into(),
            url: format!("http://127.0.0.1:{}/", peers::CHAIN_NGINX_PORT),
            tiers: vec![
                ("client".into(), nc.clone()),
                ("mtls".into(), PidSpec::File(Peer::NginxMtls.pidfile(run))),
                ("backend".into(), backend.clone()),
            ],
        });
        chains.push(Chain {
            name: "nginx->haproxy".into(),
            url: format!("http://127.0.0.1:{}/", peers::CHAIN_HAPROXY_PORT),
            tiers: vec![
                ("client".into(), nc),
                ("mtls".into(), PidSpec::File(Peer::Haproxy.pidfile(run))),
                ("backend".into(), backend.clone()),
            ],
        });
    }
    for t in &a.target {
        targets.push(parse_target(t, run)?);
    }
    for c in &a.chain {
        chains.push(parse_chain(c, run)?);
    }
    let keep =
        |name: &str| a.filter.is_empty() || a.filter.iter().any(|f| name.contains(f.as_str()));
    targets.retain(|t| keep(&t.name));
    chains.retain(|c| keep(&c.name));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut recs: Vec<Rec> = Vec::new();
    let t_start = Instant::now();
    for rep in 1..=a.reps {
        println!(
            "=== rep {rep}/{} ({:.0} s so far)",
            a.reps,
            t_start.elapsed().as_secs_f64()
        );
        if a.only.iter().any(|s| s == "hs") {
            for mode in &a.hs_modes {
                let resume = mode == "resumed";
                let cfg = tls::client_config(&ctx.pki, resume, a.aes128_first)?;
                for &clients in &a.hs_clients {
                    for t in &targets {
                        let r = hs_cell(&ctx, &rt, &cfg, t, mode, clients, rep)?;
                        ctx.record(&r);
                        recs.push(r);
                    }
                }
            }
        }
        if a.only.iter().any(|s| s == "wrk") {
            for &conns in &a.conns {
                for m in &a.wrk_modes {
                    for c in &chains {
                        let r = wrk_cell(&ctx, c, conns, m == "ka", rep)?;
                        ctx.record(&r);
                        recs.push(r);
                    }
                }
            }
        }
        if a.only.iter().any(|s| s == "idle") {
            let cfg = tls::client_config(&ctx.pki, false, a.aes128_first)?;
            for &n in &a.idle {
                for t in &targets {
                    if !t.phoenix && t.restart.is_none() {
                        continue;
                    }
                    if t.name.contains("->backend") && !t.phoenix {
                        continue; // same process as the fixed-answer port; measured once
                    }
                    let r = idle_cell(&ctx, &rt, &cfg, t, n, idle_addr, rep, &peers)?;
                    ctx.record(&r);
                    recs.push(r);
                }
            }
        }
    }
    let total = t_start.elapsed().as_secs_f64();
    let tables = report(&recs, total, a.sched);
    fs::write(out.join("tables.md"), &tables)?;
    println!("\n{tables}");
    println!(
        "mesh bench: {} cells in {total:.0} s; results in {}",
        recs.len(),
        out.display()
    );
    drop((
        front_unix,
        client_unix,
        front,
        client_h1,
        client_h2,
        listener,
    ));
    drop(peers);
    Ok(())
}

/// The directory of the PKI the peers use.
fn pkidir_of(ctx: &Ctx) -> PathBuf {
    ctx.run().join("pki")
}

/// On Ctrl-C or SIGTERM, stop the processes we started (listener, clients, nginx fronts) and the
/// peers in `started` before exiting, so an interrupted run leaves nothing behind.
fn stop_on_signal(
    pids: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    run: PathBuf,
    started: Vec<peers::Peer>,
) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        let list = pids.lock().map(|p| p.clone()).unwrap_or_default();
        eprintln!("mesh bench: interrupted; stopping {list:?}");
        for pid in list {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        for &p in started.iter().rev() {
            peers::stop(&run, p);
        }
        std::process::exit(130);
    });
}

fn hs_cell(
    ctx: &Ctx,
    rt: &tokio::runtime::Runtime,
    cfg: &std::sync::Arc<rustls::ClientConfig>,
    t: &Target,
    mode: &str,
    clients: usize,
    rep: usize,
) -> anyhow::Result<Rec> {
    let secs = f64::from(ctx.args.secs);
    let what = format!("hs {} {mode} c{clients}", t.name);
    let (vals, cmd, foreign, steal, attempts) = ctx.guarded(&what, || {
        let pids = t.pids.pids();
        if pids.is_empty() {
            bail!("{}: no live process for {:?}", t.name, t.pids);
        }
        let c0 = sys::cpu_ticks(&pids);
        let r = rt.block_on(tls::handshake_loop(
            cfg.clone(),
            t.addr,
            &ctx.pki.server_name,
            clients,
            secs,
            mode == "resumed",
        ))?;
        let c1 = sys::cpu_ticks(&pids);
        let cpu_s = (c1 - c0) as f64 / sys::CLK_TCK;
        let ok = r.ok.max(1) as f64;
        Ok((
            vec![
                ("hs_per_s".into(), r.ok as f64 / r.wall),
                ("server_us_per_hs".into(), cpu_s * 1e6 / ok),
                ("p50_ms".into(), sys::pct(&r.lat_us, 50.0) / 1000.0),
                ("p99_ms".into(), sys::pct(&r.lat_us, 99.0) / 1000.0),
                ("server_busy".into(), cpu_s / r.wall),
                ("resumed_frac".into(), r.resumed as f64 / ok),
                ("errors".into(), r.errors as f64),
            ],
            format!(
                "rustls client, {clients} loops, {secs} s, {mode}+GET / (Connection: close) -> {}",
                t.addr
            ),
        ))
    })?;
    Ok(Rec {
        kind: "hs",
        target: t.name.clone(),
        cell: format!("{mode} c{clients}"),
        rep,
        vals,
        foreign,
        steal,
        attempts,
        cmd,
    })
}

fn wrk_cell(ctx: &Ctx, c: &Chain, conns: u32, keepalive: bool, rep: usize) -> anyhow::Result<Rec> {
    let mode = if keepalive { "ka" } else { "close" };
    let what = format!("wrk {} c{conns} {mode}", c.name);
    let (vals, cmd, foreign, steal, attempts) = ctx.guarded(&what, || {
        let tiers: Vec<(String, Vec<u32>)> =
            c.tiers.iter().map(|(n, p)| (n.clone(), p.pids())).collect();
        let before: Vec<u64> = tiers.iter().map(|(_, p)| sys::cpu_ticks(p)).collect();
        let r = procs::wrk(
            &ctx.out,
            &ctx.args.load_cpu,
            &c.url,
            conns,
            ctx.args.secs,
            keepalive,
        )?;
        let after: Vec<u64> = tiers.iter().map(|(_, p)| sys::cpu_ticks(p)).collect();
        let n = r.requests.max(1) as f64;
        let mut vals = vec![
            ("rps".into(), r.rps),
            ("p50_ms".into(), r.p50_us / 1000.0),
            ("p99_ms".into(), r.p99_us / 1000.0),
            ("p999_ms".into(), r.p999_us / 1000.0),
            ("errors".into(), r.errors as f64),
        ];
        let mut proxy = 0.0;
        for (i, (name, _)) in tiers.iter().enumerate() {
            let us = (after[i] - before[i]) as f64 / sys::CLK_TCK * 1e6 / n;
            if name != "backend" {
                proxy += us;
            }
            vals.push((format!("us_{name}"), us));
        }
        vals.push(("us_proxy".into(), proxy));
        Ok((vals, r.cmd))
    })?;
    Ok(Rec {
        kind: "wrk",
        target: c.name.clone(),
        cell: format!("c{conns} {mode}"),
        rep,
        vals,
        foreign,
        steal,
        attempts,
        cmd,
    })
}

#[allow(clippy::too_many_arguments)]
fn idle_cell(
    ctx: &Ctx,
    rt: &tokio::runtime::Runtime,
    cfg: &std::sync::Arc<rustls::ClientConfig>,
    t: &Target,
    n: usize,
    idle_addr: SocketAddr,
    rep: usize,
    peers: &peers::Peers,
) -> anyhow::Result<Rec> {
    // A fresh server process per rep: freed memory is not returned to the OS.
    let fresh;
    let (addr, pids): (SocketAddr, Box<dyn Fn() -> Vec<u32>>) = if t.phoenix {
        let p = procs::listener(
            &ctx.bin,
            &ctx.out,
            procs::Placement {
                cpu: &ctx.args.server_cpu,
                sched: ctx.args.sched,
            },
            idle_addr,
            ctx.args.backend,
            &ctx.pki,
            &ctx.server_cert,
            &ctx.server_key,
            false,
        )?;
        let pid = p.pid();
        fresh = Some(p);
        (idle_addr, Box::new(move || sys::tree(&[pid])))
    } else {
        fresh = None;
        match &t.restart {
            Some(Restart::Command(cmd)) => {
                let st = Command::new("sh").args(["-c", cmd]).output()?;
                if !st.status.success() {
                    bail!("{cmd}: {}", String::from_utf8_lossy(&st.stderr));
                }
            }
            Some(Restart::Peer(p)) => peers.restart(*p)?,
            None => {}
        }
        procs::wait_listen(t.addr)?;
        let spec = t.pids.clone();
        (t.addr, Box::new(move || spec.pids()))
    };
    if let Some(p) = &fresh {
        if let Ok(mut x) = ctx.ours_extra.lock() {
            x.push(p.pid());
        }
    }
    let host = ctx.pki.server_name.clone();
    let (vals, _, foreign, steal, attempts) =
        ctx.guarded(&format!("idle {} {n}", t.name), || {
            // warm-up: 32 connections opened and closed before the baseline
            let (warm, _) = rt.block_on(tls::open_idle(
                cfg.clone(),
                addr,
                &host,
                32,
                32,
                Duration::from_secs(30),
            ));
            drop(warm);
            std::thread::sleep(Duration::from_secs(1));
            let rss0 = sys::rss_kb(&pids());
            let (open, failed) = rt.block_on(tls::open_idle(
                cfg.clone(),
                addr,
                &host,
                n,
                32,
                Duration::from_secs(120),
            ));
            std::thread::sleep(Duration::from_secs(2));
            let rss1 = sys::rss_kb(&pids());
            let opened = open.len() as f64;
            drop(open);
            std::thread::sleep(Duration::from_millis(500));
            Ok((
                vec![
                    ("opened".into(), opened),
                    ("failed".into(), failed as f64),
                    ("rss_before_kb".into(), rss0 as f64),
                    ("rss_open_kb".into(), rss1 as f64),
                    (
                        "kib_per_conn".into(),
                        (rss1 as f64 - rss0 as f64) / opened.max(1.0),
                    ),
                ],
                String::new(),
            ))
        })?;
    if let (Some(p), Ok(mut x)) = (&fresh, ctx.ours_extra.lock()) {
        x.retain(|&q| q != p.pid());
    }
    drop(fresh);
    Ok(Rec {
        kind: "idle",
        target: t.name.clone(),
        cell: format!("n{n}"),
        rep,
        vals,
        foreign,
        steal,
        attempts,
        cmd: format!(
            "{n} idle TLS 1.3 connections, 32 at a time, one keep-alive GET each; VmRSS after 2 s"
        ),
    })
}

fn report(recs: &[Rec], total_s: f64, sched: procs::Sched) -> String {
    // (kind, cell, target) in first-seen order -> reps
    let mut order: Vec<(&str, String, String)> = Vec::new();
    let mut groups: BTreeMap<(String, String, String), Vec<&Rec>> = BTreeMap::new();
    for r in recs {
        let k = (r.kind.to_owned(), r.cell.clone(), r.target.clone());
        if !groups.contains_key(&k) {
            order.push((r.kind, r.cell.clone(), r.target.clone()));
        }
        groups.entry(k).or_default().push(r);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Medians over reps, (min–max) in brackets. Total run time {total_s:.0} s. phoenix scheduling \
         policy: {} (--sched).\n",
        sched.name()
    );
    for (kind, title) in [
        ("hs", "Handshakes (+ one request, Connection: close)"),
        ("wrk", "wrk through chains"),
        ("idle", "Idle mTLS connections"),
    ] {
        let rows: Vec<_> = order.iter().filter(|o| o.0 == kind).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "### {title}\n");
        // union of the value names over all rows (chains have different tiers), first-seen order
        let mut keys: Vec<String> = Vec::new();
        for (_, cell, target) in &rows {
            for (k, _) in &groups[&(kind.to_owned(), cell.clone(), target.clone())][0].vals {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        let _ = writeln!(
            out,
            "| target | cell | reps | {} | max foreign |",
            keys.join(" | ")
        );
        let _ = writeln!(out, "|---|---|---:|{}---:|", "---:|".repeat(keys.len()));
        for (_, cell, target) in rows {
            let rs = &groups[&(kind.to_owned(), cell.clone(), target.clone())];
            let mut cols = Vec::new();
            for k in &keys {
                let xs: Vec<f64> = rs
                    .iter()
                    .filter_map(|r| r.vals.iter().find(|(kk, _)| kk == k).map(|(_, v)| *v))
                    .collect();
                cols.push(match sys::med(&xs) {
                    Some((m, lo, hi)) if rs.len() > 1 && (hi - lo).abs() > 1e-9 => {
                        format!("**{}** ({}–{})", fmt_num(m), fmt_num(lo), fmt_num(hi))
                    }
                    Some((m, _, _)) => format!("**{}**", fmt_num(m)),
                    None => "-".into(),
                });
            }
            let maxf = rs.iter().map(|r| r.foreign).fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "| {target} | {cell} | {} | {} | {maxf:.2} |",
                rs.len(),
                cols.join(" | ")
            );
        }
        out.push('\n');
    }
    out
}

fn write_versions(ctx: &Ctx) -> anyhow::Result<()> {
    let mut v = String::new();
    for (label, cmd) in [
        ("rustc", "rustc -vV"),
        ("nginx", "nginx -V 2>&1"),
        ("haproxy", "haproxy -v 2>&1 | head -2"),
        ("wrk", "wrk -v 2>&1 | head -1"),
        ("kernel", "uname -a"),
        ("cpu", "grep -m1 'model name' /proc/cpuinfo; nproc"),
        ("phoenix-mesh", &format!("{} --version", ctx.bin.display())),
        (
            "phoenix-mesh scheduling policy (--sched)",
            &format!("echo {}", ctx.args.sched.name()),
        ),
    ] {
        let o = Command::new("sh").args(["-c", cmd]).output()?;
        let _ = writeln!(
            v,
            "## {label}\n{}",
            String::from_utf8_lossy(&o.stdout).trim_end()
        );
    }
    fs::write(ctx.out.join("versions.txt"), v)?;
    Ok(())
}
