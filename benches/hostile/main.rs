//! `cargo bench --bench hostile`: what traffic that never authenticates costs the mesh listener.
//!
//! (a) listener CPU (utime+stime from /proc/PID/stat) per good mTLS handshake (+ one request)
//!     against per refused handshake of a client certificate from a foreign CA whose common name is
//!     1 KB, 15 KB, 30 KB or 60 KB long;
//! (b) a legitimate client's new mTLS connection + request, latency p50/p99 (and failures), while
//!     `--silent` connections that never send a byte are held open (re-opened at up to
//!     `--reopen-rate` a second when the listener drops them) and `--flood-rate` foreign-CA
//!     handshakes a second (60 KB subjects) run.
//!
//! The harness generates its PKI, starts a fixed-answer HTTP backend in-process and the listener
//! binary given by `--bin` (default `target/release/phoenix-mesh`), and stops it at the end. Loopback
//! only; every loop bounded in time. See benches/README.md.

#[allow(dead_code)]
#[path = "../mesh/sys.rs"]
mod sys;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use phoenix_mesh_certs::pki::{Leaf, LeafSpec, Pki, Usage};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// The name the listener's certificate carries.
const LISTENER_NAME: &str = "mesh.bench.internal";

#[derive(Debug, Parser)]
#[command(name = "hostile-bench")]
struct Args {
    /// Passed by `cargo bench`; without it (`cargo test --all-targets`) the harness does nothing.
    #[arg(long, hide = true)]
    bench: bool,
    /// The listener binary.
    #[arg(long, default_value = "target/release/phoenix-mesh")]
    bin: PathBuf,
    /// Repetitions; medians are reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per CPU cell (each kind of handshake).
    #[arg(long, default_value_t = 5)]
    cpu_secs: u64,
    /// Seconds the legitimate client measures while the attack runs.
    #[arg(long, default_value_t = 20)]
    attack_secs: u64,
    /// Silent connections held open during (b).
    #[arg(long, default_value_t = 12_000)]
    silent: usize,
    /// Most silent connections re-opened per second after the listener dropped them.
    #[arg(long, default_value_t = 200)]
    reopen_rate: u32,
    /// Foreign-CA handshakes (60 KB subject) per second during (b).
    #[arg(long, default_value_t = 20)]
    flood_rate: u32,
    /// Milliseconds between the legitimate client's requests during (b).
    #[arg(long, default_value_t = 100)]
    legit_every_ms: u64,
    /// Which steps: cpu, attack.
    #[arg(long, value_delimiter = ',', default_value = "cpu,attack")]
    only: Vec<String>,
    /// Listener port.
    #[arg(long, default_value_t = 18640)]
    port: u16,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.bench {
        return ExitCode::SUCCESS;
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hostile bench failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Certificates and client configurations for one run.
struct Setup {
    dir: tempfile::TempDir,
    good: Arc<ClientConfig>,
    /// (subject size in KB, config presenting a foreign-CA certificate with a CN that long).
    strangers: Vec<(usize, Arc<ClientConfig>)>,
    backend: SocketAddr,
}

fn run(args: &Args) -> anyhow::Result<()> {
    if !args.bin.exists() {
        bail!(
            "{} not found: cargo build --release first",
            args.bin.display()
        );
    }
    raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let setup = setup().await?;
        let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); 1 + setup.strangers.len()];
        let mut attack: Vec<(f64, f64, usize, usize)> = Vec::new();
        for rep in 1..=args.reps {
            if args.only.iter().any(|s| s == "cpu") {
                let listener = Listener::start(args, &setup)?;
                let addr = listener.addr;
                let good = cpu_per_handshake(&listener, args.cpu_secs, || {
                    good_request(addr, setup.good.clone())
                })
                .await;
                println!("rep {rep}: good handshake + request: {good:.0} µs CPU");
                cpu[0].push(good);
                for (i, (kb, config)) in setup.strangers.iter().enumerate() {
                    let refused = cpu_per_handshake(&listener, args.cpu_secs, || {
                        refused_handshake(addr, config.clone())
                    })
                    .await;
                    println!("rep {rep}: refused foreign-CA handshake, {kb} KB subject: {refused:.0} µs CPU");
                    cpu[i + 1].push(refused);
                }
                listener.log_summary();
            }
            if args.only.iter().any(|s| s == "attack") {
                let listener = Listener::start(args, &setup)?;
                let got = under_attack(args, &setup, listener.addr).await;
                println!(
                    "rep {rep}: under attack: p50 {:.1} ms, p99 {:.1} ms, {} ok, {} failed",
                    got.0, got.1, got.2, got.3
                );
                attack.push(got);
                listener.log_summary();
            }
        }
        println!("\nmedians over {} reps:", args.reps);
        if !cpu[0].is_empty() {
            let good = sys::med(&cpu[0]).map_or(f64::NAN, |m| m.0);
            println!("| handshake | listener CPU µs | ratio to good |");
            println!("|---|---|---|");
            println!("| good (mTLS + GET) | {good:.0} | 1.0 |");
            for (i, (kb, _)) in setup.strangers.iter().enumerate() {
                let m = sys::med(&cpu[i + 1]).map_or(f64::NAN, |m| m.0);
                println!(
                    "| refused, foreign CA, {kb} KB subject | {m:.0} | {:.2} |",
                    m / good
                );
            }
        }
        if !attack.is_empty() {
            let p50: Vec<f64> = attack.iter().map(|a| a.0).collect();
            let p99: Vec<f64> = attack.iter().map(|a| a.1).collect();
            let failed: Vec<f64> = attack.iter().map(|a| a.3 as f64).collect();
            println!(
                "legitimate new connection + request under attack: p50 {:.1} ms, p99 {:.1} ms, failed {:.0} (of ~{} a rep)",
                sys::med(&p50).map_or(f64::NAN, |m| m.0),
                sys::med(&p99).map_or(f64::NAN, |m| m.0),
                sys::med(&failed).map_or(f64::NAN, |m| m.0),
                args.attack_secs * 1000 / args.legit_every_ms,
            );
        }
        drop(setup.dir);
        Ok(())
    })
}

/// Raises this process's soft open-file limit to its hard limit (the silent connections need it).
fn raise_nofile() {
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
}

async fn setup() -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    let ours = Pki::new("Bench Mesh")?;
    let other = Pki::new("Somebody Else")?;
    let mut spec = LeafSpec::new(LISTENER_NAME, Duration::from_secs(86400));
    spec.usage = Usage::Server;
    spec.ips = vec![[127, 0, 0, 1].into()];
    let listener = ours.issue(&spec)?;
    std::fs::write(dir.path().join("listener.crt"), &listener.chain_pem)?;
    std::fs::write(dir.path().join("listener.key"), &listener.key_pem)?;
    std::fs::write(dir.path().join("ca.crt"), ours.root_pem())?;
    let mut spec = LeafSpec::new("nginx-gateway-client", Duration::from_secs(86400));
    spec.usage = Usage::Client;
    let client = ours.issue(&spec)?;
    let good = client_config(ours.root_pem(), &client);
    let mut strangers = Vec::new();
    for kb in [1usize, 15, 30, 60] {
        let mut spec = LeafSpec::new(&"s".repeat(kb * 1024), Duration::from_secs(86400));
        spec.dns = vec!["stranger.example".to_owned()];
        spec.usage = Usage::Client;
        strangers.push((kb, client_config(ours.root_pem(), &other.issue(&spec)?)));
    }
    let backend = start_backend().await?;
    Ok(Setup {
        dir,
        good,
        strangers,
        backend,
    })
}

/// A client trusting `root_pem`, presenting `leaf`, HTTP/1.1, no resumption (every handshake full).
fn client_config(root_pem: &str, leaf: &Leaf) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()).flatten() {
        let _ = roots.add(cert);
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
            .flatten()
            .collect();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map(|b| b.with_root_certificates(roots));
    let mut config = match (builder, key) {
        (Ok(builder), Ok(key)) => match builder.with_client_auth_cert(chain, key) {
            Ok(config) => config,
            Err(error) => panic!("client config: {error}"),
        },
        _ => panic!("client config: unreadable PKI"),
    };
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A backend answering every request head with `200 ok`, keep-alive.
async fn start_backend() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut have = 0;
                loop {
                    match tcp.read(&mut buf[have..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(answer).await.is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                    if have == buf.len() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// The listener binary, running until dropped.
struct Listener {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Listener {
    fn start(args: &Args, setup: &Setup) -> anyhow::Result<Listener> {
        let dir = setup.dir.path();
        let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\nbackend = \"{}\"\ncert = \"listener.crt\"\nkey = \"listener.key\"\nca = \"ca.crt\"\n",
                setup.backend
            ),
        )?;
        let log = dir.join("listener.log");
        let child = Command::new(&args.bin)
            .args(["server", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", args.bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("the listener did not start; see {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Listener { child, addr, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How much the listener logged: lines and bytes, and the longest line.
    fn log_summary(&self) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let longest = text.lines().map(str::len).max().unwrap_or(0);
        println!(
            "   listener log: {} lines, {} bytes, longest line {longest} bytes",
            text.lines().count(),
            text.len()
        );
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `one` back to back for `secs`; the listener's CPU µs per run.
async fn cpu_per_handshake<F, Fut>(listener: &Listener, secs: u64, mut one: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    // Warm-up, outside the measurement.
    for _ in 0..3 {
        one().await;
    }
    let pids = sys::tree(&[listener.pid()]);
    let before = sys::cpu_ticks(&pids);
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < Duration::from_secs(secs) || done < 5 {
        if one().await {
            done += 1;
        }
        if start.elapsed() > Duration::from_secs(secs * 20) {
            break;
        }
    }
    let ticks = sys::cpu_ticks(&pids) - before;
    ticks as f64 / sys::CLK_TCK * 1e6 / done.max(1) as f64
}

/// A new mTLS connection, one GET with `Connection: close`, the whole answer; true if it was 200.
async fn good_request(addr: SocketAddr, config: Arc<ClientConfig>) -> bool {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(LISTENER_NAME).ok()?;
        let mut tls = TlsConnector::from(config).connect(name, tcp).await.ok()?;
        tls.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer).await;
        Some(answer.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// A handshake the listener refuses: true once its verdict (an alert, or the close) arrived.
async fn refused_handshake(addr: SocketAddr, config: Arc<ClientConfig>) -> bool {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(LISTENER_NAME).ok()?;
        // TLS 1.3: the client finishes before the listener has judged its certificate; the
        // refusal arrives on the first read.
        let mut tls = match TlsConnector::from(config).connect(name, tcp).await {
            Ok(tls) => tls,
            Err(_) => return Some(true),
        };
        let mut buf = [0u8; 64];
        let _ = tls.read(&mut buf).await;
        Some(true)
    };
    tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// (b): the legitimate client's latency (p50 ms, p99 ms, ok, failed) while the attack runs.
async fn under_attack(args: &Args, setup: &Setup, addr: SocketAddr) -> (f64, f64, usize, usize) {
    let stop = Arc::new(tokio::sync::Notify::new());
    let open = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let holder = tokio::spawn(hold_silent(
        addr,
        args.silent,
        args.reopen_rate,
        (open.clone(), opened.clone()),
        stop.clone(),
    ));
    // Let the silent connections build up before measuring: `--silent` opened (the listener may
    // have closed some of them since).
    let ramp = Instant::now();
    while opened.load(Ordering::Relaxed) < args.silent && ramp.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "   {} silent connections opened in {:.1} s, {} still open",
        opened.load(Ordering::Relaxed),
        ramp.elapsed().as_secs_f64(),
        open.load(Ordering::Relaxed),
    );
    let stranger = setup.strangers.last().map(|(_, c)| c.clone());
    let flood = stranger.map(|config| {
        let rate = args.flood_rate.max(1);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
            loop {
                tick.tick().await;
                tokio::spawn(refused_handshake(addr, config.clone()));
            }
        })
    });
    let mut micros = Vec::new();
    let mut failed = 0;
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(args.legit_every_ms));
    while start.elapsed() < Duration::from_secs(args.attack_secs) {
        tick.tick().await;
        let t = Instant::now();
        if good_request(addr, setup.good.clone()).await {
            micros.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
        } else {
            failed += 1;
        }
    }
    if let Some(flood) = flood {
        flood.abort();
    }
    stop.notify_waiters();
    holder.abort();
    println!(
        "   {} silent connections opened in all, {} still open at the end",
        opened.load(Ordering::Relaxed),
        open.load(Ordering::Relaxed)
    );
    micros.sort_unstable();
    (
        sys::pct(&micros, 50.0) / 1000.0,
        sys::pct(&micros, 99.0) / 1000.0,
        micros.len(),
        failed,
    )
}

/// Keeps `target` connections open that never send a byte, connecting up to 64 at a time; one the
/// listener closes is re-opened, at most `rate` a second once `target` were opened.
async fn hold_silent(
    addr: SocketAddr,
    target: usize,
    rate: u32,
    (open, opened): (Arc<AtomicUsize>, Arc<AtomicUsize>),
    stop: Arc<tokio::sync::Notify>,
) {
    let connecting = Arc::new(tokio::sync::Semaphore::new(64));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let per_tick = (rate as usize / 100).max(1);
    loop {
        tick.tick().await;
        let budget = if opened.load(Ordering::Relaxed) < target {
            usize::MAX
        } else {
            per_tick
        };
        for _ in 0..budget {
            if open.load(Ordering::Relaxed) + in_flight.load(Ordering::Relaxed) >= target {
                break;
            }
            let Ok(permit) = connecting.clone().try_acquire_owned() else {
                break;
            };
            in_flight.fetch_add(1, Ordering::Relaxed);
            let (open, opened, in_flight, stop) = (
                open.clone(),
                opened.clone(),
                in_flight.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let connect =
                    tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await;
                drop(permit);
                let Ok(Ok(mut tcp)) = connect else {
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    return;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                open.fetch_add(1, Ordering::Relaxed);
                in_flight.fetch_sub(1, Ordering::Relaxed);
                let mut buf = [0u8; 1];
                tokio::select! {
                    _ = tcp.read(&mut buf) => {}
                    () = stop.notified() => {}
                }
                open.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }
}
