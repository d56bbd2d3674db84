//! The whole hop in-process: backend <- mesh listener <- client sidecar, on free loopback ports, with
//! config files in a temporary directory and a hook to change them. Everything stops when dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use phoenix_mesh_certs::pki::Leaf;
use phoenix_mesh_client::{ClientSettings, ClientSidecar};
use phoenix_mesh_server::{MeshListener, ServerSettings};
use phoenix_mesh_transport::serve::Shutdown;
use tempfile::TempDir;
use tokio::task::JoinHandle;

use super::backend::Backend;
use super::pki::{write_leaf, TestPki, LISTENER_NAME};

/// A flat TOML file as (key, raw TOML value) pairs, so a test can replace any key.
#[derive(Debug, Clone, Default)]
pub struct TomlConfig(Vec<(String, String)>);

impl TomlConfig {
    /// Sets `key` to the raw TOML `value` (quote strings yourself: `"\"300ms\""`).
    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        let value = value.into();
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.0.push((key.to_owned(), value)),
        }
        self
    }

    /// Sets `key` to the TOML string `value`.
    pub fn set_str(&mut self, key: &str, value: &str) -> &mut Self {
        self.set(key, toml_str(value))
    }

    /// Whether `key` is set.
    pub fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    /// The file's text.
    pub fn render(&self) -> String {
        self.0.iter().map(|(k, v)| format!("{k} = {v}\n")).collect()
    }

    /// Writes the file.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.render()).unwrap();
    }
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    format!("{s:?}")
}

/// What a test may change before the mesh starts.
pub struct Setup<'a> {
    pub pki: &'a TestPki,
    /// The directory the config files (and anything a test puts beside them) live in.
    pub dir: &'a Path,
    pub backend_addr: SocketAddr,
    /// The listener's config (`listen`, `backend`, `cert`, `key`, `ca` are preset).
    pub server: TomlConfig,
    /// The client's config (`listen`, `server_name`, `cert`, `key`, `ca` are preset; `upstreams` is
    /// set to the listener unless the hook sets it).
    pub client: TomlConfig,
    /// The certificate the listener presents.
    pub listener_leaf: Leaf,
    /// The certificate the client sidecar presents.
    pub client_leaf: Leaf,
    /// The listener's `ca` file content.
    pub listener_ca_pem: String,
    /// The client's `ca` file content.
    pub client_ca_pem: String,
}

struct Running {
    shutdown: Shutdown,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.begin();
        super::within("stopping the accept loop", self.task)
            .await
            .unwrap();
        super::within("draining open connections", self.shutdown.drained()).await;
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
    /// The gateway certificate the client presents.
    pub client_leaf: Leaf,
    server_toml: PathBuf,
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

impl Mesh {
    /// The default mesh: gateway certificate, listener allowing any certificate from our CA.
    pub async fn start() -> Mesh {
        Mesh::start_with(|_| {}).await
    }

    /// A mesh after `hook` has adjusted the setup.
    pub async fn start_with(hook: impl FnOnce(&mut Setup<'_>)) -> Mesh {
        let pki = TestPki::new();
        let dir = tempfile::Builder::new()
            .prefix("phoenix-mesh-it-")
            .tempdir()
            .unwrap();
        let backend = Backend::start().await;

        let mut server = TomlConfig::default();
        server
            .set_str("listen", "127.0.0.1:0")
            .set_str("backend", &backend.addr.to_string())
            .set_str("cert", "listener.crt")
            .set_str("key", "listener.key")
            .set_str("ca", "listener-ca.crt");
        let mut client = TomlConfig::default();
        client
            .set_str("listen", "127.0.0.1:0")
            .set_str("server_name", LISTENER_NAME)
            .set_str("cert", "client.crt")
            .set_str("key", "client.key")
            .set_str("ca", "client-ca.crt");
        let mut setup = Setup {
            backend_addr: backend.addr,
            server,
            client,
            listener_leaf: pki.listener_cert(),
            client_leaf: pki.client_cert(),
            listener_ca_pem: pki.root_pem().to_owned(),
            client_ca_pem: pki.root_pem().to_owned(),
            pki: &pki,
            dir: dir.path(),
        };
        hook(&mut setup);
        let Setup {
            server,
            mut client,
            listener_leaf,
            client_leaf,
            listener_ca_pem,
            client_ca_pem,
            ..
        } = setup;

        let d = dir.path();
        write_leaf(d, "listener", &listener_leaf);
        write_leaf(d, "client", &client_leaf);
        std::fs::write(d.join("listener-ca.crt"), listener_ca_pem).unwrap();
        std::fs::write(d.join("client-ca.crt"), client_ca_pem).unwrap();

        let server_toml = d.join("server.toml");
        server.write(&server_toml);
        let (listener, listener_addr) = start_listener(&server_toml).await;
        // Later restarts must come back on the same port.
        let mut pinned = server;
        pinned.set_str("listen", &listener_addr.to_string());
        pinned.write(&server_toml);

        if !client.has("upstreams") {
            client.set(
                "upstreams",
                format!("[{}]", toml_str(&listener_addr.to_string())),
            );
        }
        let client_toml = d.join("client.toml");
        client.write(&client_toml);
        let settings = ClientSettings::load(&client_toml).unwrap();
        let sidecar = ClientSidecar::bind(settings).await.unwrap();
        // A client listening on a unix socket has no address: port 0 stands for "none".
        let client_addr = sidecar
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let (shutdown, watch) = Shutdown::new();
        let task = tokio::spawn(sidecar.serve(watch));

        Mesh {
            pki,
            dir,
            backend,
            listener_addr,
            client_addr,
            client_leaf,
            server_toml,
            listener: Some(listener),
            client: Some(Running { shutdown, task }),
        }
    }

    /// An HTTP/1.1 TLS connection straight to the listener, presenting the gateway's certificate.
    pub async fn gateway_tls(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let config =
            super::tls::client_config(self.pki.root_pem(), Some(&self.client_leaf), &[b"http/1.1"]);
        super::tls::to_listener(self.listener_addr, config).await
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
        super::within("stopping the old accept loop", old.task)
            .await
            .unwrap();
        let (listener, addr) = start_listener(&self.server_toml).await;
        assert_eq!(addr, self.listener_addr);
        self.listener = Some(listener);
        let shutdown = old.shutdown;
        async move { super::within("draining the old listener", shutdown.drained()).await }
    }

    /// Starts the mesh listener again, on the same port as before.
    pub async fn restart_listener(&mut self) {
        assert!(self.listener.is_none(), "the listener is still running");
        let (listener, addr) = start_listener(&self.server_toml).await;
        assert_eq!(addr, self.listener_addr);
        self.listener = Some(listener);
    }
}

async fn start_listener(server_toml: &Path) -> (Running, SocketAddr) {
    let settings = ServerSettings::load(server_toml).unwrap();
    let listener = MeshListener::bind(settings).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, watch) = Shutdown::new();
    let task = tokio::spawn(listener.serve(watch));
    (Running { shutdown, task }, addr)
}
