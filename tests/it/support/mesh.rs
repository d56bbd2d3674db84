//! The whole hop in-process: backend <- mesh listener <- client sidecar, on free loopback ports, with
//! their files in a [`MeshFiles`] directory and a hook to change them before they start. The mesh
//! keeps the sidecars' reload handles for the certificate tests. Everything stops when dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use phoenix_mesh_certs::pki::Leaf;
use phoenix_mesh_certs::{LiveClientTls, LiveServerTls, Reloader};
use phoenix_mesh_client::{ClientSettings, ClientSidecar};
use phoenix_mesh_server::{MeshListener, ServerSettings};
use phoenix_mesh_transport::serve::Shutdown;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

use super::backend::{Backend, HELLO};
use super::files::{MeshFiles, TomlConfig};
use super::http::{get, send_h1};
use super::pki::{write_leaf, TestPki};
use super::{tls, within};

/// One of the client's `upstreams`, for a hook that needs the listener's address before it is known.
#[derive(Debug, Clone, Copy)]
pub enum Upstream {
    /// The mesh listener, wherever it bound.
    Listener,
    /// Some other address.
    At(SocketAddr),
}

/// What a hook may change before the mesh starts. The certificate files are already written when
/// the hook runs; change them through the methods here (or in place, as a rotation test does).
pub struct Setup<'a> {
    pub pki: &'a TestPki,
    /// The directory the files live in (see [`MeshFiles`]); a hook may put more beside them.
    pub dir: &'a Path,
    pub backend_addr: SocketAddr,
    /// The listener's config.
    pub server: TomlConfig,
    /// The client's config; `upstreams` is rendered from [`Setup::upstreams`] unless set here.
    pub client: TomlConfig,
    /// The client's upstreams, in order: the listener alone unless a hook says otherwise.
    pub upstreams: Vec<Upstream>,
    listener_leaf: Leaf,
    client_leaf: Leaf,
}

impl Setup<'_> {
    /// The certificate the listener will present.
    pub fn listener_leaf(&self) -> &Leaf {
        &self.listener_leaf
    }

    /// The certificate the client sidecar will present.
    pub fn client_leaf(&self) -> &Leaf {
        &self.client_leaf
    }

    /// Makes the listener present `leaf` (writes `listener.crt/.key`).
    pub fn use_listener_cert(&mut self, leaf: Leaf) {
        write_leaf(self.dir, "listener", &leaf);
        self.listener_leaf = leaf;
    }

    /// Makes the client sidecar present `leaf` (writes `client.crt/.key`).
    pub fn use_client_cert(&mut self, leaf: Leaf) {
        write_leaf(self.dir, "client", &leaf);
        self.client_leaf = leaf;
    }

    /// Sets what the listener's `ca` file holds (PEM).
    pub fn listener_trusts(&self, pem: &str) {
        std::fs::write(self.dir.join("listener-ca.crt"), pem).unwrap();
    }

    /// Sets what the client's `ca` file holds (PEM).
    pub fn client_trusts(&self, pem: &str) {
        std::fs::write(self.dir.join("client-ca.crt"), pem).unwrap();
    }
}

/// A sidecar task and the switch that stops it.
struct Running {
    shutdown: Shutdown,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.begin();
        within("stopping the accept loop", self.task).await.unwrap();
        within("draining open connections", self.shutdown.drained()).await;
    }
}

/// A running backend, mesh listener and client sidecar.
pub struct Mesh {
    pub pki: TestPki,
    pub dir: TempDir,
    pub backend: Backend,
    pub listener_addr: SocketAddr,
    /// Where the client sidecar accepts (port 0 when it listens on a unix socket).
    pub client_addr: SocketAddr,
    /// The listener's admin endpoint, when `admin_listen` is set.
    pub listener_admin: Option<SocketAddr>,
    /// The client's admin endpoint, when `admin_listen` is set.
    pub client_admin: Option<SocketAddr>,
    /// The certificate the listener presented at start.
    pub listener_leaf: Leaf,
    /// The gateway certificate the client presented at start.
    pub client_leaf: Leaf,
    /// The listener's config as the hook left it (`listen` as given, not the port it bound).
    pub server: TomlConfig,
    pub listener_reloader: Arc<Reloader<LiveServerTls>>,
    pub client_reloader: Arc<Reloader<LiveClientTls>>,
    /// What SIGHUP does to the listener: reread its config and certificates.
    pub listener_sighup: phoenix_mesh_server::SettingsReload,
    listener: Option<Running>,
    client: Option<Running>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for running in [self.listener.take(), self.client.take()]
            .into_iter()
            .flatten()
        {
            running.shutdown.begin();
            running.task.abort();
        }
    }
}

/// A second mesh listener beside the mesh's own, from the same config on a port of its own, for a
/// client with two listeners. Stops when dropped.
pub struct SpareListener {
    pub addr: SocketAddr,
    toml: PathBuf,
    running: Option<Running>,
}

impl SpareListener {
    /// As [`Mesh::replace_listener`]: begins this listener's graceful shutdown, starts a fresh one on
    /// the same port at once, and returns a future that waits for the old one's connections.
    pub async fn replace(&mut self) -> impl Future<Output = ()> {
        let old = self.running.take().expect("the spare listener is running");
        old.shutdown.begin();
        within("stopping the old accept loop", old.task)
            .await
            .unwrap();
        let listener = start_listener(&self.toml).await;
        assert_eq!(listener.addr, self.addr);
        self.running = Some(listener.running);
        let shutdown = old.shutdown;
        async move { within("draining the old listener", shutdown.drained()).await }
    }
}

impl Drop for SpareListener {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown.begin();
            running.task.abort();
        }
    }
}

/// A started listener and its handles.
struct Listener {
    running: Running,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    reloader: Arc<Reloader<LiveServerTls>>,
    sighup: phoenix_mesh_server::SettingsReload,
}

async fn start_listener(server_toml: &Path) -> Listener {
    let settings = ServerSettings::load(server_toml).unwrap();
    let listener = MeshListener::bind(settings).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin = listener.admin_addr();
    let reloader = listener.reloader();
    let sighup = listener.settings_reload();
    let (shutdown, watch) = Shutdown::new();
    let task = tokio::spawn(listener.serve(watch));
    Listener {
        running: Running { shutdown, task },
        addr,
        admin,
        reloader,
        sighup,
    }
}

impl Mesh {
    /// The default mesh: gateway certificate, listener allowing any certificate from our CA.
    pub async fn start() -> Mesh {
        Mesh::start_with(|_| {}).await
    }

    /// A mesh after `hook` has adjusted the setup.
    pub async fn start_with(hook: impl FnOnce(&mut Setup<'_>)) -> Mesh {
        let pki = TestPki::new();
        let backend = Backend::start().await;
        let (listener_leaf, client_leaf) = (pki.listener_cert(), pki.client_cert());
        let files = MeshFiles::new(&pki, backend.addr, &listener_leaf, &client_leaf);
        let MeshFiles {
            dir,
            server,
            client,
        } = files;
        let mut setup = Setup {
            pki: &pki,
            dir: dir.path(),
            backend_addr: backend.addr,
            server,
            client,
            upstreams: vec![Upstream::Listener],
            listener_leaf,
            client_leaf,
        };
        hook(&mut setup);
        let Setup {
            server,
            mut client,
            upstreams,
            listener_leaf,
            client_leaf,
            ..
        } = setup;

        let server_toml = dir.path().join("server.toml");
        server.write(&server_toml);
        let listener = start_listener(&server_toml).await;
        // Later restarts must come back on the same port.
        let mut pinned = server.clone();
        pinned.set_str("listen", &listener.addr.to_string());
        pinned.write(&server_toml);

        if !client.has("upstreams") {
            let addrs: Vec<SocketAddr> = upstreams
                .iter()
                .map(|u| match u {
                    Upstream::Listener => listener.addr,
                    Upstream::At(addr) => *addr,
                })
                .collect();
            client.set_addrs("upstreams", &addrs);
        }
        let client_toml = dir.path().join("client.toml");
        client.write(&client_toml);
        let sidecar = ClientSidecar::bind(ClientSettings::load(&client_toml).unwrap())
            .await
            .unwrap();
        // A client listening on a unix socket has no address: port 0 stands for "none".
        let client_addr = sidecar
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let client_admin = sidecar.admin_addr();
        let client_reloader = sidecar.reloader();
        let (shutdown, watch) = Shutdown::new();
        let task = tokio::spawn(sidecar.serve(watch));

        Mesh {
            pki,
            dir,
            backend,
            listener_addr: listener.addr,
            client_addr,
            listener_admin: listener.admin,
            client_admin,
            listener_leaf,
            client_leaf,
            server,
            listener_reloader: listener.reloader,
            client_reloader,
            listener_sighup: listener.sighup,
            listener: Some(listener.running),
            client: Some(Running { shutdown, task }),
        }
    }

    /// `name` in the mesh's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A TLS client config trusting our root, presenting `leaf`, offering HTTP/1.1 only.
    pub fn tls_config(&self, leaf: &Leaf) -> Arc<rustls::ClientConfig> {
        tls::client_config(self.pki.root_pem(), Some(leaf), &[b"http/1.1"])
    }

    /// An HTTP/1.1 TLS connection straight to the listener, presenting the gateway's certificate.
    pub async fn gateway_tls(&self) -> TlsStream<TcpStream> {
        tls::to_listener(self.listener_addr, self.tls_config(&self.client_leaf)).await
    }

    /// Sends `n` requests through the client sidecar, each on a fresh connection, to
    /// `/good/<tag>/<i>`; each must come back as the backend's 200.
    pub async fn good_requests(&self, tag: &str, n: usize) {
        for i in 0..n {
            let target = format!("/good/{tag}/{i}");
            let reply = within("good request", send_h1(self.client_addr, get(&target))).await;
            assert_eq!(reply.status, 200, "{target}: {reply:#?}");
            assert_eq!(reply.body, HELLO, "{target}: {reply:#?}");
            assert_eq!(reply.mesh_error(), None, "{target}: {reply:#?}");
        }
    }

    /// Stops the client sidecar: it stops accepting and its connections drain.
    pub async fn stop_client(&mut self) {
        if let Some(client) = self.client.take() {
            client.stop().await;
        }
    }

    /// Stops the mesh listener: its port closes and its connections drain.
    pub async fn stop_listener(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.stop().await;
        }
    }

    /// Begins the listener's graceful shutdown (GOAWAY on its HTTP/2 connections, its port closed)
    /// and starts a fresh listener on the same port at once. The old one's connections finish what
    /// they carry; the returned future waits for that.
    pub async fn replace_listener(&mut self) -> impl Future<Output = ()> {
        let old = self.listener.take().expect("the listener is running");
        old.shutdown.begin();
        within("stopping the old accept loop", old.task)
            .await
            .unwrap();
        self.restart_listener().await;
        let shutdown = old.shutdown;
        async move { within("draining the old listener", shutdown.drained()).await }
    }

    /// Starts a second mesh listener from the listener's config, on `addr`: a free port the client's
    /// `upstreams` already name (see [`Upstream::At`]).
    pub async fn start_spare_listener(&self, addr: SocketAddr) -> SpareListener {
        let toml = self.path("spare-server.toml");
        let mut config = self.server.clone();
        config.set_str("listen", &addr.to_string());
        config.write(&toml);
        let listener = start_listener(&toml).await;
        assert_eq!(listener.addr, addr);
        SpareListener {
            addr,
            toml,
            running: Some(listener.running),
        }
    }

    /// Starts the mesh listener again, on the same port as before.
    pub async fn restart_listener(&mut self) {
        assert!(self.listener.is_none(), "the listener is still running");
        let listener = start_listener(&self.path("server.toml")).await;
        assert_eq!(listener.addr, self.listener_addr);
        self.listener_admin = listener.admin;
        self.listener_reloader = listener.reloader;
        self.listener_sighup = listener.sighup;
        self.listener = Some(listener.running);
    }
}
