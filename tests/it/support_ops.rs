//! Harness for the certificate-lifecycle and operations tests (rotation.rs, operations.rs): a PKI
//! that can also sign CRLs, the real binary as a child process, an in-process mesh that keeps its
//! reload handles, a load generator that counts failures, and small admin/metrics/TLS probes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use phoenix_mesh_certs::pki::{Leaf, LeafSpec, Pki, Usage};
use phoenix_mesh_certs::{LiveClientTls, LiveServerTls, Reloader};
use phoenix_mesh_client::{ClientSettings, ClientSidecar};
use phoenix_mesh_server::{MeshListener, ServerSettings};
use phoenix_mesh_transport::serve::Shutdown;
use rustls::{ClientConfig, HandshakeKind};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::support::backend::{Backend, HELLO};
use crate::support::http::SERVICE_HOST;
use crate::support::mesh::{toml_str, TomlConfig};
use crate::support::pki::{GATEWAY_CN, GATEWAY_DNS, GATEWAY_SPIFFE, LISTENER_NAME};
use crate::support::{within, STEP_LIMIT};

pub const BIN: &str = env!("CARGO_BIN_EXE_phoenix-mesh");
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Polls `check` every 50 ms until it returns `Some`, failing the test with `what` after
/// [`STEP_LIMIT`]. Not a timing assertion: only an upper bound so a regression cannot hang.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + STEP_LIMIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not true within {STEP_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// PKI

/// A root + intermediate that issues every leaf of one test and signs its CRLs.
pub struct OpsPki {
    pub ca: Pki,
}

impl OpsPki {
    pub fn new() -> Self {
        Self::named("Phoenix Ops Test")
    }

    /// A PKI whose root and intermediate are `<name> Root CA` / `<name> Intermediate CA`. Two PKIs
    /// with the same name look like one CA with the wrong keys (bad signature, not unknown CA).
    pub fn named(name: &str) -> Self {
        OpsPki {
            ca: Pki::new(name).unwrap(),
        }
    }

    pub fn root_pem(&self) -> &str {
        self.ca.root_pem()
    }

    /// A fresh listener certificate (serverAuth, DNS mesh name, IP 127.0.0.1).
    pub fn listener(&self) -> Leaf {
        self.ca.issue(&listener_spec()).unwrap()
    }

    /// A listener certificate that expired an hour ago.
    pub fn expired_listener(&self) -> Leaf {
        let mut spec = listener_spec();
        spec.not_before = SystemTime::now() - 2 * DAY;
        spec.not_after = SystemTime::now() - Duration::from_secs(3600);
        self.ca.issue(&spec).unwrap()
    }

    /// A fresh gateway client certificate (clientAuth, CN, DNS and SPIFFE URI).
    pub fn gateway(&self) -> Leaf {
        let mut spec = LeafSpec::new(GATEWAY_CN, DAY);
        spec.dns = vec![GATEWAY_DNS.to_owned()];
        spec.uris = vec![GATEWAY_SPIFFE.to_owned()];
        spec.usage = Usage::Client;
        self.ca.issue(&spec).unwrap()
    }

    /// A client certificate for some other identity (CN and DNS `name`).
    pub fn client_named(&self, name: &str) -> Leaf {
        let mut spec = LeafSpec::new(name, DAY);
        spec.usage = Usage::Client;
        self.ca.issue(&spec).unwrap()
    }

    /// A PEM CRL from the intermediate revoking `serials` (none: a valid, empty CRL).
    pub fn crl(&self, serials: &[u64]) -> String {
        self.ca.crl(serials).unwrap()
    }
}

fn listener_spec() -> LeafSpec {
    let mut spec = LeafSpec::new(LISTENER_NAME, DAY);
    spec.usage = Usage::Server;
    spec.ips = vec![[127, 0, 0, 1].into()];
    spec
}

// ---------------------------------------------------------------------------------------------
// Files, replaced the ways renewal tools do it

/// Writes `data` to a temporary name beside `path` and renames it over `path` (atomic).
pub fn rename_replace(path: &Path, data: &str) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Installs `leaf` as `<stem>.crt` / `<stem>.key` in `dir` by rename (key first, then chain).
pub fn install_leaf_by_rename(dir: &Path, stem: &str, leaf: &Leaf) {
    rename_replace(&dir.join(format!("{stem}.key")), &leaf.key_pem);
    rename_replace(&dir.join(format!("{stem}.crt")), &leaf.chain_pem);
}

/// Rewrites `<stem>.crt` / `<stem>.key` in place (truncate and write, same inode).
pub fn install_leaf_in_place(dir: &Path, stem: &str, leaf: &Leaf) {
    std::fs::write(dir.join(format!("{stem}.key")), &leaf.key_pem).unwrap();
    std::fs::write(dir.join(format!("{stem}.crt")), &leaf.chain_pem).unwrap();
}

/// Kubernetes-secret layout: `<stem>.crt -> <stem>-data/cert.pem`, `<stem>.key ->
/// <stem>-data/key.pem`, `<stem>-data -> <stem>-v<N>` (a directory). [`swap_symlinked_leaf`] swaps the
/// `<stem>-data` link atomically by renaming a new link over it.
pub fn install_symlinked_leaf(dir: &Path, stem: &str, leaf: &Leaf) {
    let version = dir.join(format!("{stem}-v0"));
    std::fs::create_dir(&version).unwrap();
    std::fs::write(version.join("cert.pem"), &leaf.chain_pem).unwrap();
    std::fs::write(version.join("key.pem"), &leaf.key_pem).unwrap();
    std::os::unix::fs::symlink(format!("{stem}-v0"), dir.join(format!("{stem}-data"))).unwrap();
    for (link, target) in [("crt", "cert.pem"), ("key", "key.pem")] {
        let path = dir.join(format!("{stem}.{link}"));
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(format!("{stem}-data/{target}"), &path).unwrap();
    }
}

/// Swaps the `<stem>-data` link of [`install_symlinked_leaf`] to a new version directory holding
/// `leaf`: both files change in one atomic rename.
pub fn swap_symlinked_leaf(dir: &Path, stem: &str, leaf: &Leaf, n: u32) {
    let version = dir.join(format!("{stem}-v{n}"));
    std::fs::create_dir(&version).unwrap();
    std::fs::write(version.join("cert.pem"), &leaf.chain_pem).unwrap();
    std::fs::write(version.join("key.pem"), &leaf.key_pem).unwrap();
    let new_link = dir.join(format!("{stem}-data.new"));
    std::os::unix::fs::symlink(format!("{stem}-v{n}"), &new_link).unwrap();
    std::fs::rename(&new_link, dir.join(format!("{stem}-data"))).unwrap();
}

// ---------------------------------------------------------------------------------------------
// The real binary

/// A running `phoenix-mesh` child with JSON logs collected from stderr; killed when dropped.
pub struct Proc {
    child: tokio::process::Child,
    pub pid: u32,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `phoenix-mesh --log-format json <side> --config <config>`.
    pub fn spawn(side: &str, config: &Path) -> Proc {
        Proc::spawn_under(&[], side, config)
    }

    /// The same, run through `wrapper` (a command that execs its arguments, e.g.
    /// `["prlimit", "--nofile=64:64"]`), so `pid` is still the sidecar's.
    pub fn spawn_under(wrapper: &[&str], side: &str, config: &Path) -> Proc {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = tokio::process::Command::new(program);
                command.args(args).arg(BIN);
                command
            }
            None => tokio::process::Command::new(BIN),
        };
        let mut child = command
            .args(["--log-format", "json", side, "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut reader = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = lines.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Proc { child, pid, lines }
    }

    /// Every stderr line so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a stderr line containing every one of `needles` and returns it.
    pub async fn wait_for_line(&self, needles: &[&str]) -> String {
        let what = format!("pid {} logging a line with {needles:?}", self.pid);
        let lines = self.lines.clone();
        let found = eventually(&what, || {
            let hit = lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned();
            async move { hit }
        })
        .await;
        found
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
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {} failed", self.pid);
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
}

/// The string value of `"key":"..."` in a JSON log line (no escapes needed for what we read).
pub fn json_str(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_owned())
}

/// Runs the binary to completion with `args`; returns (exit code, stdout, stderr).
pub async fn run_binary(args: &[&str]) -> (Option<i32>, String, String) {
    let out = within(
        &format!("phoenix-mesh {args:?}"),
        tokio::process::Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Listener and client configs plus their files in one directory, for child processes.
pub struct ProcFiles {
    pub dir: TempDir,
    pub server: TomlConfig,
    pub client: TomlConfig,
}

impl ProcFiles {
    /// `listener.crt/.key`, `client.crt/.key`, `ca.crt`, and configs with `listen` on port 0.
    pub fn new(pki: &OpsPki, backend: SocketAddr, listener: &Leaf, client: &Leaf) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("phoenix-mesh-ops-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        install_leaf_in_place(d, "listener", listener);
        install_leaf_in_place(d, "client", client);
        std::fs::write(d.join("ca.crt"), pki.root_pem()).unwrap();
        let mut server = TomlConfig::default();
        server
            .set_str("listen", "127.0.0.1:0")
            .set_str("backend", &backend.to_string())
            .set_str("cert", "listener.crt")
            .set_str("key", "listener.key")
            .set_str("ca", "ca.crt");
        let mut client = TomlConfig::default();
        client
            .set_str("listen", "127.0.0.1:0")
            .set_str("server_name", LISTENER_NAME)
            .set_str("cert", "client.crt")
            .set_str("key", "client.key")
            .set_str("ca", "ca.crt");
        ProcFiles {
            dir,
            server,
            client,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes server.toml and starts the listener; returns it and its TLS address.
    pub async fn start_listener(&self) -> (Proc, SocketAddr) {
        self.server.write(&self.path("server.toml"));
        let p = Proc::spawn("server", &self.path("server.toml"));
        let addr = p
            .addr_from_log("mesh listener accepting mutual TLS", "listen")
            .await;
        (p, addr)
    }

    /// Writes client.toml with `upstreams = [upstream]` and starts the client; returns it and its
    /// HTTP address.
    pub async fn start_client(&mut self, upstream: SocketAddr) -> (Proc, SocketAddr) {
        self.client.set(
            "upstreams",
            format!("[{}]", toml_str(&upstream.to_string())),
        );
        self.client.write(&self.path("client.toml"));
        let p = Proc::spawn("client", &self.path("client.toml"));
        let addr = p
            .addr_from_log("client sidecar accepting plain HTTP", "listen")
            .await;
        (p, addr)
    }
}

// ---------------------------------------------------------------------------------------------
// The mesh in-process, with its reload handles

/// Backend, mesh listener and client sidecar in this process, keeping the reloaders and the SIGHUP
/// handlers. Everything stops when dropped.
pub struct InProc {
    pub pki: OpsPki,
    pub dir: TempDir,
    pub backend: Backend,
    pub listener_addr: SocketAddr,
    pub client_addr: SocketAddr,
    pub listener_admin: Option<SocketAddr>,
    pub listener_reloader: Arc<Reloader<LiveServerTls>>,
    pub client_reloader: Arc<Reloader<LiveClientTls>>,
    pub listener_sighup: phoenix_mesh_server::SettingsReload,
    pub server: TomlConfig,
    pub listener_leaf: Leaf,
    pub client_leaf: Leaf,
    running: Vec<(Shutdown, JoinHandle<()>)>,
}

impl Drop for InProc {
    fn drop(&mut self) {
        for (shutdown, task) in self.running.drain(..) {
            shutdown.begin();
            task.abort();
        }
    }
}

/// What a test may change before [`InProc`] starts: both configs (paths relative to `dir`) and the
/// files in `dir` (`listener.crt/.key`, `client.crt/.key`, `ca.crt` are written before the hook).
pub struct InProcSetup<'a> {
    pub pki: &'a OpsPki,
    pub dir: &'a Path,
    pub listener_leaf: &'a Leaf,
    pub client_leaf: &'a Leaf,
    pub server: TomlConfig,
    pub client: TomlConfig,
}

impl InProc {
    pub async fn start(hook: impl FnOnce(&mut InProcSetup<'_>)) -> InProc {
        let pki = OpsPki::new();
        let backend = Backend::start().await;
        let listener_leaf = pki.listener();
        let client_leaf = pki.gateway();
        let files = ProcFiles::new(&pki, backend.addr, &listener_leaf, &client_leaf);
        let ProcFiles {
            dir,
            server,
            client,
        } = files;
        let mut setup = InProcSetup {
            pki: &pki,
            dir: dir.path(),
            listener_leaf: &listener_leaf,
            client_leaf: &client_leaf,
            server,
            client,
        };
        hook(&mut setup);
        let InProcSetup {
            server, mut client, ..
        } = setup;
        let d = dir.path();

        server.write(&d.join("server.toml"));
        let listener = MeshListener::bind(ServerSettings::load(&d.join("server.toml")).unwrap())
            .await
            .unwrap();
        let listener_addr = listener.local_addr().unwrap();
        let listener_admin = listener.admin_addr();
        let listener_reloader = listener.reloader();
        let listener_sighup = listener.settings_reload();
        let (s1, w1) = Shutdown::new();
        let t1 = tokio::spawn(listener.serve(w1));

        if !client.has("upstreams") {
            client.set(
                "upstreams",
                format!("[{}]", toml_str(&listener_addr.to_string())),
            );
        }
        client.write(&d.join("client.toml"));
        let sidecar = ClientSidecar::bind(ClientSettings::load(&d.join("client.toml")).unwrap())
            .await
            .unwrap();
        let client_addr = sidecar.local_addr().unwrap();
        let client_reloader = sidecar.reloader();
        let (s2, w2) = Shutdown::new();
        let t2 = tokio::spawn(sidecar.serve(w2));

        InProc {
            pki,
            dir,
            backend,
            listener_addr,
            client_addr,
            listener_admin,
            listener_reloader,
            client_reloader,
            listener_sighup,
            server,
            listener_leaf,
            client_leaf,
            running: vec![(s1, t1), (s2, t2)],
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A tokio-rustls client config trusting our root, presenting `leaf`, offering HTTP/1.1 only.
    pub fn tls_config(&self, leaf: &Leaf) -> Arc<ClientConfig> {
        crate::support::tls::client_config(self.pki.root_pem(), Some(leaf), &[b"http/1.1"])
    }
}

// ---------------------------------------------------------------------------------------------
// Probes

/// One request's outcome, as the downstream saw it.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub mesh_error: Option<String>,
    pub body: String,
}

/// GET `target` with the service Host over a fresh connection to `addr`; errors as strings.
pub async fn try_get(addr: SocketAddr, target: &str) -> Result<Got, String> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let response = sender
            .send_request(crate::support::http::get(target))
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status().as_u16();
        let mesh_error = response
            .headers()
            .get(phoenix_mesh_common::MESH_ERROR_HEADER)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Got {
            status,
            mesh_error,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    match tokio::time::timeout(STEP_LIMIT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "GET {target} via {addr}: no answer within {STEP_LIMIT:?}"
        )),
    }
}

/// GETs `/` through `addr` and fails the test unless the backend's 200 came back.
pub async fn assert_round_trip(addr: SocketAddr, what: &str) {
    let got = try_get(addr, "/")
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        (got.status, got.body.as_str()),
        (200, HELLO),
        "{what}: {got:?}"
    );
}

/// Plain HTTP GET on an admin endpoint: (status, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("admin request", sender.send_request(req))
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The sum of every sample of `name` whose labels include all of `labels`; `None` if none matched.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(pair) => pair,
            None => continue,
        };
        let (metric_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric_name != name {
            continue;
        }
        let mut present = label_text.split(',').map(str::trim);
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let have: Vec<&str> = present.by_ref().collect();
        if wanted.iter().all(|w| have.contains(&w.as_str())) {
            *total.get_or_insert(0.0) += value.parse::<f64>().unwrap();
        }
    }
    total
}

/// The listener certificate (DER) a fresh TLS connection to `addr` is shown.
pub async fn presented_leaf(addr: SocketAddr, config: Arc<ClientConfig>) -> Vec<u8> {
    let tls = crate::support::tls::to_listener(addr, config).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Connects with `config` (resuming if it holds a ticket), sends one HTTP/1.1 GET and reads the
/// answer. Ok((status line, handshake kind)) or the error, as a string.
pub async fn tls_get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<(String, HandshakeKind), String> {
    let attempt = async {
        let mut tls = crate::support::tls::connect(addr, LISTENER_NAME, config)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let kind = tls.get_ref().1.handshake_kind().unwrap();
        let request =
            format!("GET / HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write ({kind:?}): {e}"))?;
        let mut answer = Vec::new();
        let read = tls.read_to_end(&mut answer).await;
        let text = String::from_utf8_lossy(&answer).into_owned();
        match read {
            // A peer that answered and then closed without close_notify still answered.
            Err(e) if text.is_empty() => Err(format!("read ({kind:?}): {e}")),
            _ if text.is_empty() => Err(format!("closed without an answer ({kind:?})")),
            _ => Ok((text.lines().next().unwrap_or("").to_owned(), kind)),
        }
    };
    match tokio::time::timeout(STEP_LIMIT, attempt).await {
        Ok(r) => r,
        Err(_) => Err("no answer in time".to_owned()),
    }
}

// ---------------------------------------------------------------------------------------------
// Load

/// A few workers sending GETs through `addr` back to back until stopped (or a bounded count),
/// counting every answer that is not the backend's 200.
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    pub fn start(addr: SocketAddr, workers: usize, max_per_worker: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let (mut ok, mut failures) = (0u64, Vec::new());
                    for _ in 0..max_per_worker {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match try_get(addr, "/load").await {
                            Ok(got) if got.status == 200 && got.body == HELLO => ok += 1,
                            Ok(got) => failures.push(format!("{got:?}")),
                            Err(e) => failures.push(e),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Load { stop, workers }
    }

    /// Stops the workers; returns (successes, failures).
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failures) = (0, Vec::new());
        for w in self.workers {
            let (o, f) = within("load worker stopping", w).await.unwrap();
            ok += o;
            failures.extend(f);
        }
        (ok, failures)
    }
}
