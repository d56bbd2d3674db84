//! `phoenix-mesh demo`: the whole hop on a throwaway PKI and free loopback ports.
//!
//! backend (stands in for Traefik) <- mesh listener <- client sidecar <- one request from here.
//!
//! The configs it leaves in its temporary directory name the ports it bound, so the `--check`
//! commands it prints probe the running demo. That directory holds private keys: it is removed on
//! every way out (the request failing, `--once` done, Ctrl-C, SIGTERM, SIGHUP).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use phoenix_mesh_certs::pki::{LeafSpec, Pki, Usage};
use phoenix_mesh_client::{ClientSettings, ClientSidecar};
use phoenix_mesh_server::{MeshListener, ServerSettings};
use phoenix_mesh_transport::serve::{Shutdown, ShutdownWatch};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, Signal, SignalKind};

const LISTENER_NAME: &str = "mesh.internal.thinkheads.ai";
const GATEWAY_NAME: &str = "nginx.internal.thinkheads.ai";
const DEMO_HOST: &str = "whoami.internal.thinkheads.ai";

pub async fn run(once: bool) -> anyhow::Result<()> {
    // Before the directory exists: a signal from here on is caught (and the directory removed)
    // rather than killing the process with the keys left behind.
    let mut stop = StopSignals::new()?;
    let dir = tempfile::Builder::new()
        .prefix("phoenix-mesh-demo-")
        .tempdir()
        .context("creating a temporary directory for the demo PKI")?;
    write_pki(dir.path())?;
    let (shutdown, watch) = Shutdown::new();

    let backend = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the demo backend")?;
    let backend_addr = backend.local_addr()?;
    tokio::spawn(echo_backend(backend, watch.clone()));

    // Each side is bound on port 0, then its config is rewritten with the port it got.
    let server_toml = dir.path().join("server.toml");
    let server_config = |listen: &str| {
        format!(
            "listen = \"{listen}\"\nbackend = \"{backend_addr}\"\ncert = \"listener.crt\"\nkey = \"listener.key\"\n\
             ca = \"root_ca.crt\"\nallowed_peers = [\"{GATEWAY_NAME}\"]\n"
        )
    };
    write(&server_toml, &server_config("127.0.0.1:0"))?;
    let listener = MeshListener::bind(ServerSettings::load(&server_toml)?).await?;
    let listener_addr = listener.local_addr()?;
    write(&server_toml, &server_config(&listener_addr.to_string()))?;
    tokio::spawn(listener.serve(watch.clone()));

    let client_toml = dir.path().join("client.toml");
    let client_config = |listen: &str| {
        format!(
            "listen = \"{listen}\"\nupstreams = [\"{listener_addr}\"]\nserver_name = \"{LISTENER_NAME}\"\n\
             cert = \"nginx-client.crt\"\nkey = \"nginx-client.key\"\nca = \"root_ca.crt\"\n"
        )
    };
    write(&client_toml, &client_config("127.0.0.1:0"))?;
    let client = ClientSidecar::bind(ClientSettings::load(&client_toml)?).await?;
    let client_addr = client.local_addr()?;
    write(&client_toml, &client_config(&client_addr.to_string()))?;
    tokio::spawn(client.serve(watch.clone()));
    drop(watch);

    println!(
        "phoenix-mesh demo (throwaway PKI in {})",
        dir.path().display()
    );
    println!("  backend (stands in for Traefik)  http://{backend_addr}");
    println!("  mesh listener (mutual TLS)       {listener_addr}   certificate {LISTENER_NAME}");
    println!("  client sidecar (plain HTTP)      http://{client_addr}   certificate CN nginx-gateway-client, DNS {GATEWAY_NAME}");
    println!();

    let seen = tokio::select! {
        seen = tokio::time::timeout(Duration::from_secs(10), round_trip(client_addr)) => {
            seen.context("the demo request did not finish within 10 s")??
        }
        name = stop.recv() => {
            println!("{name}: stopping before the demo request finished");
            finish(shutdown, dir, true).await?;
            if once {
                bail!("{name} arrived before the demo request finished");
            }
            return Ok(());
        }
    };
    println!("GET http://{DEMO_HOST}/hello?from=demo through client -> listener -> backend:");
    println!("{seen}");
    println!("Try it yourself:");
    println!("  curl -sS -H 'Host: {DEMO_HOST}' 'http://{client_addr}/hello?from=curl'");
    println!(
        "  curl -sS http://{listener_addr}/    # plain HTTP on the TLS port: 400 tls-required"
    );

    if !once {
        // The configs name the bound ports, so these probe the running demo.
        let exe = program();
        println!("  {exe} server --check --config {}", server_toml.display());
        println!("  {exe} client --check --config {}", client_toml.display());
        println!();
        println!(
            "Running until Ctrl-C or SIGTERM (then {} is removed).",
            dir.path().display()
        );
        let name = stop.recv().await;
        println!("{name}: stopping");
    }
    finish(shutdown, dir, !once).await
}

/// Stops the demo's servers, waits up to 5 s for requests in flight (not after `--once`'s own
/// request, which has its answer), and removes the directory.
async fn finish(shutdown: Shutdown, dir: tempfile::TempDir, drain: bool) -> anyhow::Result<()> {
    shutdown.begin();
    if drain {
        let _ = tokio::time::timeout(Duration::from_secs(5), shutdown.drained()).await;
    }
    let path = dir.path().to_owned();
    dir.close()
        .with_context(|| format!("removing the demo directory {}", path.display()))
}

/// The signals that end the demo: Ctrl-C (SIGINT), `kill` (SIGTERM) and a closed terminal (SIGHUP).
struct StopSignals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl StopSignals {
    fn new() -> anyhow::Result<Self> {
        let on = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(StopSignals {
            int: on(SignalKind::interrupt(), "SIGINT")?,
            term: on(SignalKind::terminate(), "SIGTERM")?,
            hup: on(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Waits for the first of them and returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// How this binary was started, for the commands the demo prints (`cargo run` puts it in target/).
fn program() -> String {
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "phoenix-mesh".to_owned())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn write_pki(dir: &Path) -> anyhow::Result<()> {
    let pki = Pki::new("Phoenix Demo").context("generating the demo CA")?;
    let day = Duration::from_secs(24 * 3600);
    let mut listener = LeafSpec::new(LISTENER_NAME, day);
    listener.usage = Usage::Server;
    listener.ips = vec![[127, 0, 0, 1].into()];
    let mut gateway = LeafSpec::new("nginx-gateway-client", day);
    gateway.dns = vec![GATEWAY_NAME.to_owned()];
    gateway.usage = Usage::Client;
    let listener = pki
        .issue(&listener)
        .context("issuing the listener certificate")?;
    let gateway = pki
        .issue(&gateway)
        .context("issuing the gateway certificate")?;
    std::fs::write(dir.join("root_ca.crt"), pki.root_pem())?;
    std::fs::write(dir.join("listener.crt"), &listener.chain_pem)?;
    std::fs::write(dir.join("listener.key"), &listener.key_pem)?;
    std::fs::write(dir.join("nginx-client.crt"), &gateway.chain_pem)?;
    std::fs::write(dir.join("nginx-client.key"), &gateway.key_pem)?;
    Ok(())
}

/// Sends one request through the client sidecar and returns the backend's account of it.
async fn round_trip(client_addr: SocketAddr) -> anyhow::Result<String> {
    let stream = TcpStream::connect(client_addr)
        .await
        .context("connecting to the client sidecar")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = Request::get("/hello?from=demo")
        .header("host", DEMO_HOST)
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .body(Empty::<Bytes>::new())?;
    let response = sender
        .send_request(request)
        .await
        .context("sending the demo request")?;
    let status = response.status();
    let mesh_error = response.headers().get("phoenix-mesh-error").cloned();
    let body = response.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("the demo request got {status} (phoenix-mesh-error: {mesh_error:?}): {body}");
    }
    Ok(body)
}

/// Stands in for Traefik: answers every request with what it saw.
async fn echo_backend(listener: TcpListener, mut shutdown: ShutdownWatch) {
    loop {
        let stream = tokio::select! {
            () = shutdown.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        tokio::spawn(async move {
            let service = service_fn(|req: Request<Incoming>| async move {
                let h = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned()
                };
                let text = format!(
                    "  backend saw: {} {}\n  Host: {}\n  X-Forwarded-Client-Cert: {}\n  X-Forwarded-For: {}\n  X-Forwarded-Proto: {}\n",
                    req.method(),
                    req.uri(),
                    h("host"),
                    h("x-forwarded-client-cert"),
                    h("x-forwarded-for"),
                    h("x-forwarded-proto"),
                );
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
