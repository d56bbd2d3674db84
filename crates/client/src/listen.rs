//! Where the client sidecar's plain-HTTP side listens: a TCP address, or a unix socket (`unix:/path`).
//!
//! A unix socket is for the client sidecar beside nginx (`proxy_pass http://unix:...`): only
//! processes the file's mode and group let in can reach the gateway's identity, which a loopback
//! port cannot promise (every local user can connect to it), and nginx's hop to the sidecar skips
//! the TCP stack.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

use phoenix_mesh_common::config::ConfigError;
use phoenix_mesh_common::settings::{invalid, socket_addr};
use phoenix_mesh_transport::serve::Accept;

/// A configured `listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `ip:port`.
    Tcp(SocketAddr),
    /// `unix:/absolute/path`.
    Unix(UnixSocket),
}

/// A unix socket to listen on, with the access it grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    /// Absolute path of the socket file.
    pub path: PathBuf,
    /// Permission bits of the socket file (`listen_mode`); connecting needs write permission.
    pub mode: u32,
    /// Group the socket file is given (`listen_group`), when set.
    pub group: Option<u32>,
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => addr.fmt(f),
            ListenAddr::Unix(socket) => write!(f, "unix:{}", socket.path.display()),
        }
    }
}

impl ListenAddr {
    /// Parses `listen` (with `listen_mode` and `listen_group`, which only a unix socket takes).
    pub fn parse(
        path: &Path,
        listen: &str,
        mode: Option<&str>,
        group: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let Some(socket_path) = listen.strip_prefix("unix:") else {
            if mode.is_some() || group.is_some() {
                let key = if mode.is_some() {
                    "listen_mode"
                } else {
                    "listen_group"
                };
                return Err(invalid(
                    path,
                    key,
                    format!("only applies to a unix socket (`listen = \"unix:/run/...\"`), not to {listen}"),
                ));
            }
            return socket_addr(path, "listen", listen).map(ListenAddr::Tcp);
        };
        let socket_path = PathBuf::from(socket_path);
        if !socket_path.is_absolute() || socket_path.file_name().is_none() {
            return Err(invalid(
                path,
                "listen",
                format!("{listen:?}: a unix socket needs an absolute file path, e.g. \"unix:/run/phoenix-mesh/client.sock\""),
            ));
        }
        let mode = match mode {
            None => 0o660,
            Some(text) => u32::from_str_radix(text.trim_start_matches("0o"), 8)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| {
                    invalid(
                        path,
                        "listen_mode",
                        format!("{text:?} is not an octal file mode such as \"0660\""),
                    )
                })?,
        };
        let group = group.map(|name| resolve_group(path, name)).transpose()?;
        Ok(ListenAddr::Unix(UnixSocket {
            path: socket_path,
            mode,
            group,
        }))
    }
}

/// A group name or number into its id; the name must exist now, so a typo fails at start.
fn resolve_group(path: &Path, name: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(invalid(
            path,
            "listen_group",
            format!("no group named {name:?}"),
        )),
        Err(error) => Err(invalid(
            path,
            "listen_group",
            format!("looking up group {name:?}: {error}"),
        )),
    }
}

/// A bound unix socket. The socket file is removed when this is dropped, if it is still ours.
#[derive(Debug)]
pub struct BoundUnix {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
}

impl BoundUnix {
    /// Binds `socket`. A socket file left behind by a process that is gone (nothing accepts on
    /// it) is replaced; one that still answers, or a path that is not a socket, is an error.
    pub async fn bind(socket: &UnixSocket) -> io::Result<Self> {
        let path = &socket.path;
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                // Non-blocking: a live process whose backlog is full answers EAGAIN instead of
                // holding our start-up until it accepts.
                match UnixStream::connect(path).await {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another process holds this socket (its backlog is full)",
                        ))
                    }
                    Ok(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another process is accepting connections on this socket",
                        ))
                    }
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        std::fs::remove_file(path).or_else(ignore_not_found)?;
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!(
                                "an existing socket is in the way and could not be tested: {e}"
                            ),
                        ))
                    }
                }
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the path exists and is not a socket; not removing it",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        let bound = BoundUnix {
            listener,
            path: path.clone(),
            inode: inode(path)?,
        };
        if let Some(gid) = socket.group {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "giving the socket to group {gid} (listen_group): {e}; the sidecar must be \
                         root or a member of that group (systemd: SupplementaryGroups=)"
                    ),
                )
            })?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket.mode)).map_err(
            |e| {
                io::Error::new(
                    e.kind(),
                    format!("setting the socket's mode to {:o}: {e}", socket.mode),
                )
            },
        )?;
        Ok(bound)
    }

    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn inode(path: &Path) -> io::Result<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

fn ignore_not_found(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

impl Drop for BoundUnix {
    fn drop(&mut self) {
        // Only our own file: a newer process may already have replaced it.
        if inode(&self.path).ok() == Some(self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Who is on the other end of a unix socket: the kernel's word for its user and process.
#[derive(Debug, Clone, Copy)]
pub struct UnixPeer {
    uid: Option<u32>,
    pid: Option<i32>,
}

impl fmt::Display for UnixPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unix")?;
        if let Some(uid) = self.uid {
            write!(f, ":uid={uid}")?;
        }
        if let Some(pid) = self.pid {
            write!(f, ",pid={pid}")?;
        }
        Ok(())
    }
}

impl Accept for BoundUnix {
    type Stream = UnixStream;
    type Peer = UnixPeer;

    async fn accept(&self) -> io::Result<(UnixStream, UnixPeer)> {
        let (stream, _) = self.listener.accept().await?;
        let cred = stream.peer_cred().ok();
        let peer = UnixPeer {
            uid: cred.map(|c| c.uid()),
            pid: cred.and_then(|c| c.pid()),
        };
        Ok((stream, peer))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(listen: &str, mode: Option<&str>, group: Option<&str>) -> Result<ListenAddr, String> {
        ListenAddr::parse(Path::new("/etc/c.toml"), listen, mode, group).map_err(|e| e.to_string())
    }

    #[test]
    fn tcp_and_unix_forms() {
        assert_eq!(
            parse("127.0.0.1:8080", None, None).unwrap(),
            ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        let unix = parse("unix:/run/pm/c.sock", Some("0600"), Some("0")).unwrap();
        assert_eq!(
            unix,
            ListenAddr::Unix(UnixSocket {
                path: "/run/pm/c.sock".into(),
                mode: 0o600,
                group: Some(0)
            })
        );
        assert_eq!(unix.to_string(), "unix:/run/pm/c.sock");
        let ListenAddr::Unix(default) = parse("unix:/run/pm/c.sock", None, None).unwrap() else {
            panic!("not unix")
        };
        assert_eq!((default.mode, default.group), (0o660, None));
    }

    #[test]
    fn bad_forms_name_the_key() {
        for (listen, mode, group, key) in [
            ("unix:relative.sock", None, None, "listen: "),
            ("unix:/", None, None, "listen: "),
            ("unix:/run/c.sock", Some("0999"), None, "listen_mode: "),
            ("unix:/run/c.sock", Some("rw"), None, "listen_mode: "),
            (
                "unix:/run/c.sock",
                None,
                Some("no-such-group-phoenix"),
                "listen_group: ",
            ),
            ("127.0.0.1:8080", Some("0660"), None, "listen_mode: "),
            ("127.0.0.1:8080", None, Some("www-data"), "listen_group: "),
            ("localhost:8080", None, None, "listen: "),
        ] {
            let error = parse(listen, mode, group).unwrap_err();
            assert!(error.contains(key), "{listen} {mode:?} {group:?}: {error}");
        }
    }
}
