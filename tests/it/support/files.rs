//! The files a sidecar reads: its TOML config ([`TomlConfig`]), and [`MeshFiles`], one temporary
//! directory holding both sidecars' certificates, CA bundles and configs, used alike by the
//! in-process mesh and by the binary. Also the ways renewal tools replace certificate files (by
//! rename, in place, by swapping a Kubernetes-secret symlink), for the rotation tests.
//!
//! The layout of a [`MeshFiles`] directory, which configs name relative to it:
//!
//! ```text
//! listener.crt  listener.key  listener-ca.crt  server.toml
//! client.crt    client.key    client-ca.crt    client.toml
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use phoenix_mesh_certs::pki::Leaf;
use tempfile::TempDir;

use super::closed_port_addr;
use super::pki::{write_leaf, TestPki, LISTENER_NAME};

/// A flat TOML file as (key, raw TOML value) pairs, so a test can replace any key.
#[derive(Debug, Clone, Default)]
pub struct TomlConfig(Vec<(String, String)>);

impl TomlConfig {
    /// Sets `key` to the raw TOML `value` (quote strings yourself, or use [`TomlConfig::set_str`]).
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

    /// Sets `key` to a TOML array of the strings `values`.
    pub fn set_list<S: AsRef<str>>(&mut self, key: &str, values: &[S]) -> &mut Self {
        let items: Vec<String> = values.iter().map(|v| toml_str(v.as_ref())).collect();
        self.set(key, format!("[{}]", items.join(", ")))
    }

    /// Sets `key` to a TOML array of the addresses `addrs`, as strings.
    pub fn set_addrs(&mut self, key: &str, addrs: &[SocketAddr]) -> &mut Self {
        let addrs: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
        self.set_list(key, &addrs)
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

/// Both sidecars' files in one temporary directory (see the module doc for the layout).
pub struct MeshFiles {
    pub dir: TempDir,
    /// The listener's config: `listen` on port 0, `backend`, `cert`, `key` and `ca` set.
    pub server: TomlConfig,
    /// The client's config: `listen` on port 0, `server_name`, `cert`, `key` and `ca` set;
    /// `upstreams` is for the test (or [`MeshFiles::start_client`]) to set.
    pub client: TomlConfig,
}

impl MeshFiles {
    /// The files for a listener presenting `listener` and forwarding to `backend`, and a client
    /// presenting `client`; both sides trust our root.
    pub fn new(pki: &TestPki, backend: SocketAddr, listener: &Leaf, client: &Leaf) -> MeshFiles {
        let dir = tempfile::Builder::new()
            .prefix("phoenix-mesh-it-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        write_leaf(d, "listener", listener);
        write_leaf(d, "client", client);
        std::fs::write(d.join("listener-ca.crt"), pki.root_pem()).unwrap();
        std::fs::write(d.join("client-ca.crt"), pki.root_pem()).unwrap();
        let mut server = TomlConfig::default();
        server
            .set_str("listen", "127.0.0.1:0")
            .set_str("backend", &backend.to_string())
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
        MeshFiles {
            dir,
            server,
            client,
        }
    }

    /// Valid files for both sides whose backend and upstream are ports nothing listens on: enough
    /// to start either side, which dials neither at start-up.
    pub fn unconnected(pki: &TestPki) -> MeshFiles {
        let mut files = MeshFiles::new(
            pki,
            closed_port_addr(),
            &pki.listener_cert(),
            &pki.client_cert(),
        );
        files.client.set_addrs("upstreams", &[closed_port_addr()]);
        files
    }

    /// `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `server.toml` and returns its path.
    pub fn write_server(&self) -> PathBuf {
        let path = self.path("server.toml");
        self.server.write(&path);
        path
    }

    /// Writes `client.toml` and returns its path.
    pub fn write_client(&self) -> PathBuf {
        let path = self.path("client.toml");
        self.client.write(&path);
        path
    }
}

// ---------------------------------------------------------------------------------------------
// Certificate files, replaced the ways renewal tools do it

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

/// Installs `leaf` as `<stem>.crt` / `<stem>.key` in `dir` with two renames, as Phoenix's
/// post-renewal command does (`mv new.crt <stem>.crt; mv new.key <stem>.key`, or key first when
/// `key_first`), waiting `between` between them so that a poll can read one new file beside the
/// other old one.
pub async fn install_leaf_by_two_renames(
    dir: &Path,
    stem: &str,
    leaf: &Leaf,
    key_first: bool,
    between: std::time::Duration,
) {
    let (crt, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    let mut moves = [(crt, &leaf.chain_pem), (key, &leaf.key_pem)];
    if key_first {
        moves.reverse();
    }
    let [first, second] = moves;
    rename_replace(&first.0, first.1);
    tokio::time::sleep(between).await;
    rename_replace(&second.0, second.1);
}

/// Rewrites `<stem>.crt` / `<stem>.key` in place (truncate and write, same inode).
pub fn install_leaf_in_place(dir: &Path, stem: &str, leaf: &Leaf) {
    std::fs::write(dir.join(format!("{stem}.key")), &leaf.key_pem).unwrap();
    std::fs::write(dir.join(format!("{stem}.crt")), &leaf.chain_pem).unwrap();
}

/// Kubernetes-secret layout: `<stem>.crt -> <stem>-data/cert.pem`, `<stem>.key ->
/// <stem>-data/key.pem`, `<stem>-data -> <stem>-v0` (a directory). [`swap_symlinked_leaf`] swaps the
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
