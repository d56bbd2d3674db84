//! End to end with a real nginx terminating TLS in front of the client sidecar:
//! HTTPS client -> nginx -> client sidecar -> mTLS -> mesh listener -> backend.
//! Skipped (with a note on stderr) when nginx is not installed; under CI that is a failure.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::support::backend::HELLO;
use crate::support::http::{collect, send_h1, send_h2c, SERVICE_HOST};
use crate::support::mesh::Mesh;
use crate::support::pki::{expected_gateway_xfcc, write_leaf};
use crate::support::{eventually, tls, within};

/// nginx on PATH, or where Debian puts it (not on a non-root PATH).
/// The nginx binary; without one the test is skipped, or fails under CI
/// ([`crate::support::skip_or_fail_without`]).
fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|dir| dir.join("nginx"))
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file());
    if found.is_none() {
        crate::support::skip_or_fail_without("nginx", "apt-get install -y nginx");
    }
    found
}

/// A foreground nginx with everything (pid, logs, temp files) in `dir`; killed when dropped.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// nginx proxying to the client sidecar at `sidecar`: `ip:port` or `unix:/path`, as nginx's
    /// `server` directive takes it (the same `upstream` block as deploy/lxc-101-nginx).
    async fn start(binary: &Path, dir: &Path, sidecar: &str, mesh: &Mesh) -> Nginx {
        write_leaf(dir, "nginx", &mesh.pki.server_cert_for(SERVICE_HOST));
        let addr = crate::support::closed_port_addr();
        let d = dir.display();
        let conf = Nginx::conf(
            dir,
            &format!(
                r#"    upstream phoenix_mesh {{
        server {sidecar};
        keepalive 8;
    }}
    server {{
        listen {addr} ssl;
        server_name {SERVICE_HOST};
        ssl_certificate {d}/nginx.crt;
        ssl_certificate_key {d}/nginx.key;
        location / {{
            proxy_pass http://phoenix_mesh;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Real-IP $remote_addr;
        }}
    }}
"#
            ),
        );
        Nginx::run(binary, dir, addr, &conf).await
    }

    /// A whole config with everything (pid, logs, temp files) under `dir`, `http` inside its `http`
    /// block; creates the temp directories. master_process off: one process, no switching to an
    /// unprivileged user that could not read the temporary directory when the tests run as root.
    fn conf(dir: &Path, http: &str) -> String {
        for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.join("tmp").join(sub)).unwrap();
        }
        let d = dir.display();
        format!(
            r#"master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
{http}}}
"#
        )
    }

    /// nginx in the foreground with `conf`, `dir` its prefix; ready once `addr` accepts.
    async fn run(binary: &Path, dir: &Path, addr: SocketAddr, conf: &str) -> Nginx {
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut nginx = Nginx {
            child,
            addr,
            dir: dir.to_owned(),
        };
        nginx.wait_ready().await;
        nginx
    }

    async fn wait_ready(&mut self) {
        within("nginx starting", async {
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    panic!("nginx exited with {status}:\n{}", self.error_log());
                }
                if TcpStream::connect(self.addr).await.is_ok() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_to_client_to_listener_to_backend() {
    let Some(binary) = find_nginx() else {
        return;
    };
    let mesh = Mesh::start().await;
    let sidecar = mesh.client_addr.to_string();
    through_nginx(&binary, &mesh, &sidecar).await;
}

/// The same hop with nginx reaching the client sidecar through a unix socket.
#[tokio::test(flavor = "multi_thread")]
async fn nginx_to_client_over_a_unix_socket() {
    let Some(binary) = find_nginx() else {
        return;
    };
    let mut socket = PathBuf::new();
    let mesh = Mesh::start_with(|setup| {
        socket = setup.dir.join("client.sock");
        setup
            .client
            .set_str("listen", &format!("unix:{}", socket.display()));
    })
    .await;
    through_nginx(&binary, &mesh, &format!("unix:{}", socket.display())).await;
}

/// A response the mesh cuts off half-way (a backend that sent its head and two bytes, then nothing, cut
/// off by the listener's `backend_timeout`) reaches nginx as a broken response: nginx logs the
/// upstream's premature close and ends the browser's response broken too, never as a complete one.
#[tokio::test(flavor = "multi_thread")]
async fn a_response_cut_off_half_way_is_broken_at_nginx() {
    let Some(binary) = find_nginx() else {
        return;
    };
    let mesh = Mesh::start_with(|s| {
        s.server.set_str("backend_timeout", "1s");
    })
    .await;
    let nginx = Nginx::start(
        &binary,
        mesh.dir.path(),
        &mesh.client_addr.to_string(),
        &mesh,
    )
    .await;
    let config = tls::client_config(mesh.pki.root_pem(), None, &[b"http/1.1"]);
    let stream = within(
        "TLS handshake with nginx",
        tls::connect(nginx.addr, SERVICE_HOST, config),
    )
    .await
    .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/stall")
        .header("host", SERVICE_HOST)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within(
        "a stalled response's head through nginx",
        sender.send_request(req),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200, "{}", nginx.error_log());
    let body = within("the cut-off through nginx", response.into_body().collect()).await;
    assert!(
        body.is_err(),
        "nginx passed the cut-off response on as complete: {:?}\n{}",
        body.map(|b| b.to_bytes()),
        nginx.error_log()
    );
    eventually("nginx logging the upstream's premature close", || async {
        nginx
            .error_log()
            .contains("upstream prematurely closed connection")
            .then_some(())
    })
    .await;
    // The hop serves on.
    through_nginx_again(&nginx, &mesh).await;
}

/// One more ordinary request through a running nginx; the backend's answer must come back.
async fn through_nginx_again(nginx: &Nginx, mesh: &Mesh) {
    let config = tls::client_config(mesh.pki.root_pem(), None, &[b"http/1.1"]);
    let stream = within(
        "TLS handshake with nginx",
        tls::connect(nginx.addr, SERVICE_HOST, config),
    )
    .await
    .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/after")
        .header("host", SERVICE_HOST)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("request through nginx", sender.send_request(req))
        .await
        .unwrap();
    let reply = collect(response).await;
    assert_eq!(reply.status, 200, "{reply:#?}\n{}", nginx.error_log());
    assert_eq!(reply.body, HELLO);
}

/// A request through nginx (TLS from the test) and the mesh; checks what the backend saw.
async fn through_nginx(binary: &Path, mesh: &Mesh, sidecar: &str) {
    let nginx = Nginx::start(binary, mesh.dir.path(), sidecar, mesh).await;

    let config = tls::client_config(mesh.pki.root_pem(), None, &[b"http/1.1"]);
    let stream = within(
        "TLS handshake with nginx",
        tls::connect(nginx.addr, SERVICE_HOST, config),
    )
    .await
    .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/through/nginx?a=1&b=two")
        .header("host", SERVICE_HOST)
        .header("x-forwarded-client-cert", "Hash=00;Subject=\"CN=spoofed\"")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = within("request through nginx", sender.send_request(req))
        .await
        .unwrap();
    let reply = collect(response).await;
    assert_eq!(reply.status, 200, "{reply:#?}\n{}", nginx.error_log());
    assert_eq!(reply.body, HELLO);
    assert_eq!(reply.header("x-backend"), Some("echo"));
    assert_eq!(reply.mesh_error(), None);

    let seen = mesh.backend.only_request();
    assert_eq!(seen.target, "/through/nginx?a=1&b=two");
    assert_eq!(seen.one("host"), SERVICE_HOST);
    assert_eq!(seen.one("x-forwarded-proto"), "https");
    assert_eq!(seen.one("x-real-ip"), "127.0.0.1");
    // nginx adds the browser's address, the listener the client sidecar's.
    assert_eq!(seen.one("x-forwarded-for"), "127.0.0.1, 127.0.0.1");
    assert_eq!(
        seen.all("x-forwarded-client-cert"),
        vec![expected_gateway_xfcc(&mesh.client_leaf)]
    );
}

/// `backend_http2` against nginx as an h2c backend (`listen ... http2` without TLS): another HTTP/2
/// implementation than the tests' own, answering with what it saw.
#[tokio::test(flavor = "multi_thread")]
async fn listener_to_an_nginx_h2c_backend() {
    let Some(binary) = find_nginx() else {
        return;
    };
    let backend_dir = tempfile::tempdir().unwrap();
    let addr = crate::support::closed_port_addr();
    let conf = Nginx::conf(
        backend_dir.path(),
        &format!(
            r#"    server {{
        listen {addr} http2;
        location / {{
            default_type text/plain;
            return 200 "$server_protocol $host $request_uri|$http_x_forwarded_client_cert|$http_x_forwarded_for\n";
        }}
    }}
"#
        ),
    );
    let nginx = Nginx::run(&binary, backend_dir.path(), addr, &conf).await;
    let mesh = Mesh::start_with(|s| {
        s.server
            .set("backend_http2", "true")
            .set_str("backend", &addr.to_string());
    })
    .await;
    let xfcc = expected_gateway_xfcc(&mesh.client_leaf);
    let sends: Vec<_> = (0..8)
        .map(|i| {
            let req = Request::get(format!("/h2c/{i}?x=1"))
                .header("host", SERVICE_HOST)
                .body(Empty::<Bytes>::new())
                .unwrap();
            tokio::spawn(send_h1(mesh.client_addr, req))
        })
        .collect();
    for (i, send) in sends.into_iter().enumerate() {
        let reply = within("request to the nginx h2c backend", send)
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{reply:#?}\n{}", nginx.error_log());
        assert_eq!(
            reply.body,
            format!("HTTP/2.0 {SERVICE_HOST} /h2c/{i}?x=1|{xfcc}|127.0.0.1\n"),
            "{reply:#?}"
        );
    }
}

/// gRPC the way docs/design.md describes it: nginx's `grpc_pass` speaks h2c to the client sidecar, the listener
/// h2c to the backend (`backend_http2`), and the call's status comes back in trailers through nginx.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_through_nginx_grpc_pass_and_an_h2c_backend() {
    let Some(binary) = find_nginx() else {
        return;
    };
    let mesh = Mesh::start_with(|s| {
        s.server.set("backend_http2", "true");
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let addr = crate::support::closed_port_addr();
    let client = mesh.client_addr;
    let conf = Nginx::conf(
        dir.path(),
        &format!(
            r#"    server {{
        listen {addr} http2;
        location / {{
            grpc_pass grpc://{client};
        }}
    }}
"#
        ),
    );
    let nginx = Nginx::run(&binary, dir.path(), addr, &conf).await;
    let req = Request::post("/trailers")
        .header("host", SERVICE_HOST)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        // A gRPC client's request ends with its data; only the response carries trailers.
        .body(http_body_util::Full::new(Bytes::from_static(b"ping")))
        .unwrap();
    let reply = match within("gRPC call through nginx", tokio::spawn(send_h2c(addr, req))).await {
        Ok(reply) => reply,
        Err(error) => panic!("{error}\nnginx error log:\n{}", nginx.error_log()),
    };
    assert_eq!(reply.status, 200, "{reply:#?}\n{}", nginx.error_log());
    assert_eq!(reply.body, "ping", "{reply:#?}");
    assert_eq!(
        reply.trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "the call's status did not come back: {reply:#?}"
    );
    let seen = &mesh.backend.seen()[0];
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert_eq!(
        seen.headers.get("te").map(|v| v.as_bytes()),
        Some(&b"trailers"[..]),
        "nginx's te: trailers was lost on the way: {seen:#?}"
    );
}
