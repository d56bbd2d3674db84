//! The client sidecar on a unix socket (`listen = "unix:/path"`): nginx reaches it through the
//! file, whose mode and group decide who may use the gateway's identity.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use phoenix_mesh_certs::error_chain;
use phoenix_mesh_client::{ClientSettings, ClientSidecar};

use crate::support::backend::{Backend, HELLO};
use crate::support::binary::Binary;
use crate::support::files::MeshFiles;
use crate::support::http::{get, send_h1_unix};
use crate::support::mesh::Mesh;
use crate::support::pki::{expected_gateway_xfcc, TestPki};
use crate::support::within;

/// A mesh whose client listens on `client.sock` in the mesh's directory, after `hook`.
async fn unix_mesh(hook: impl FnOnce(&Path)) -> (Mesh, PathBuf) {
    let mut socket = PathBuf::new();
    let mesh = Mesh::start_with(|setup| {
        socket = setup.dir.join("client.sock");
        hook(&socket);
        setup
            .client
            .set_str("listen", &format!("unix:{}", socket.display()));
    })
    .await;
    (mesh, socket)
}

async fn assert_served(mesh: &Mesh, socket: &Path) {
    let reply = within(
        "a request over the unix socket",
        send_h1_unix(socket, get("/via/unix")),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:#?}");
    assert_eq!(reply.body, HELLO);
    let seen = mesh.backend.seen().pop().unwrap();
    assert_eq!(seen.target, "/via/unix");
    assert_eq!(
        seen.all("x-forwarded-client-cert"),
        vec![expected_gateway_xfcc(&mesh.client_leaf)]
    );
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn requests_cross_a_unix_socket_made_with_mode_0660() {
    let (mesh, socket) = unix_mesh(|_| {}).await;
    assert_served(&mesh, &socket).await;
    // Whatever the umask (the unit sets 0077), the default lets owner and group in, no one else.
    assert_eq!(mode(&socket), 0o660, "{}", socket.display());
}

#[tokio::test]
async fn listen_mode_and_listen_group_are_applied() {
    // Root may give the file any group; anyone else only one of their own.
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let own = std::fs::metadata("/proc/self").unwrap().gid();
    let group = if root { 4242 } else { own };
    let mut socket = PathBuf::new();
    let mesh = Mesh::start_with(|setup| {
        socket = setup.dir.join("client.sock");
        setup
            .client
            .set_str("listen", &format!("unix:{}", socket.display()))
            .set_str("listen_mode", "0600")
            .set_str("listen_group", &group.to_string());
    })
    .await;
    assert_served(&mesh, &socket).await;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(std::fs::metadata(&socket).unwrap().gid(), group);
}

#[tokio::test]
async fn a_stale_socket_is_replaced_a_live_one_and_other_files_are_not() {
    // Left behind by a process that is gone: the file is there, nothing accepts on it.
    let (mut mesh, socket) = unix_mesh(|path| {
        drop(std::os::unix::net::UnixListener::bind(path).unwrap());
        assert!(path.exists());
    })
    .await;
    assert_served(&mesh, &socket).await;

    // A second client on the same socket (a second copy of the unit, say) must not take it over.
    let config = mesh.dir.path().join("client.toml");
    let error = ClientSidecar::bind(ClientSettings::load(&config).unwrap())
        .await
        .unwrap_err();
    let text = error_chain(&error);
    assert!(
        text.contains(&format!("unix:{}", socket.display()))
            && text.contains("another process is accepting"),
        "{text}"
    );
    assert_served(&mesh, &socket).await;

    // A path that is not a socket is never removed.
    let file = mesh.dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let other = mesh.dir.path().join("other.toml");
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&socket.display().to_string(), &file.display().to_string());
    std::fs::write(&other, toml).unwrap();
    let error = ClientSidecar::bind(ClientSettings::load(&other).unwrap())
        .await
        .unwrap_err();
    let text = error_chain(&error);
    assert!(text.contains("not a socket"), "{text}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    // A clean stop takes the socket file away, so nginx gets "no such file", not a hang.
    mesh.stop_client().await;
    assert!(!socket.exists(), "{} is still there", socket.display());
}

/// The real binary: the access log names the kernel's peer (our uid and pid), and SIGTERM's drain
/// removes the socket file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_unix_peers_and_removes_its_socket_at_sigterm() {
    let pki = TestPki::new();
    let backend = Backend::start().await;
    let mut files = MeshFiles::new(&pki, backend.addr, &pki.listener_cert(), &pki.client_cert());
    let (_listener, listener_addr) = files.start_listener().await;
    let socket = files.path("client.sock");
    files
        .client
        .set_str("listen", &format!("unix:{}", socket.display()))
        .set("access_log", "true")
        .set_addrs("upstreams", &[listener_addr]);
    let mut client = Binary::client(&files.write_client()).json_logs().spawn();
    client
        .wait_for_line(&["client sidecar accepting plain HTTP", "unix:"])
        .await;

    let reply = within(
        "a request over the unix socket",
        send_h1_unix(&socket, get("/unix/binary")),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:#?}");
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let peer = format!("\"peer\":\"unix:uid={uid},pid={}\"", std::process::id());
    client
        .wait_for_line(&["phoenix_mesh::access", "/unix/binary", &peer])
        .await;

    client.signal("TERM");
    assert!(client.exit().await.success());
    assert!(
        !socket.exists(),
        "{} is still there after SIGTERM",
        socket.display()
    );
}

/// A live process so busy that its socket's backlog is full still counts as live, and the client
/// says so at once instead of hanging in its start-up.
#[tokio::test]
async fn a_socket_with_a_full_backlog_is_refused_without_waiting() {
    let (mesh, _) = unix_mesh(|_| {}).await;
    let busy = mesh.dir.path().join("busy.sock");
    let _held = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    let mut queued = Vec::new();
    loop {
        match tokio::net::UnixStream::connect(&busy).await {
            Ok(stream) => queued.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the backlog: {e}"),
        }
        assert!(queued.len() < 100_000, "the backlog never filled");
    }
    let config = mesh.dir.path().join("client.toml");
    let busy_config = mesh.dir.path().join("busy.toml");
    let socket = mesh.dir.path().join("client.sock");
    let toml = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&socket.display().to_string(), &busy.display().to_string());
    std::fs::write(&busy_config, toml).unwrap();
    let error = within(
        "binding next to a busy socket",
        ClientSidecar::bind(ClientSettings::load(&busy_config).unwrap()),
    )
    .await
    .unwrap_err();
    let text = error_chain(&error);
    assert!(
        text.contains("backlog is full") && text.contains(&busy.display().to_string()),
        "{text}"
    );
}
