//! `phoenix-mesh demo`: the whole hop on a throwaway PKI and free loopback ports.
//!
//! backend (stands in for Traefik) <- mesh listener <- client sidecar <- one request from here.

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

const LISTENER_NAME: &str = "mesh.internal.thinkheads.ai";
const GATEWAY_NAME: &str = "nginx.internal.thinkheads.ai";
const DEMO_HOST: &str = "whoami.internal.thinkheads.ai";

pub async fn run(once: bool) -> anyhow::Result<()> {
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

    let server_toml = dir.path().join("server.toml");
    std::fs::write(
        &server_toml,
        format!(
            "listen = \"127.0.0.1:0\"\nbackend = \"{backend_addr}\"\ncert = \"listener.crt\"\nkey = \"listener.key\"\n\
             ca = \"root_ca.crt\"\nallowed_peers = [\"{GATEWAY_NAME}\"]\n"
        ),
    )?;
    let listener = MeshListener::bind(ServerSettings::load(&server_toml)?).await?;
    let listener_addr = listener.local_addr()?;
    tokio::spawn(listener.serve(watch.clone()));

    let client_toml = dir.path().join("client.toml");
    std::fs::write(
        &client_toml,
        format!(
            "listen = \"127.0.0.1:0\"\nupstreams = [\"{listener_addr}\"]\nserver_name = \"{LISTENER_NAME}\"\n\
             cert = \"nginx-client.crt\"\nkey = \"nginx-client.key\"\nca = \"root_ca.crt\"\n"
        ),
    )?;
    let client = ClientSidecar::bind(ClientSettings::load(&client_toml)?).await?;
    let client_addr = client.local_addr()?;
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

    let seen = tokio::time::timeout(Duration::from_secs(10), round_trip(client_addr))
        .await
        .context("the demo request did not finish within 10 s")??;
    println!("GET http://{DEMO_HOST}/hello?from=demo through client -> listener -> backend:");
    println!("{seen}");
    println!("Try it yourself:");
    println!("  curl -sS -H 'Host: {DEMO_HOST}' 'http://{client_addr}/hello?from=curl'");
    println!(
        "  curl -sS http://{listener_addr}/    # plain HTTP on the TLS port: 400 tls-required"
    );

    if once {
        shutdown.begin();
        return Ok(());
    }
    println!();
    println!("Running until Ctrl-C.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    shutdown.begin();
    let _ = tokio::time::timeout(Duration::from_secs(5), shutdown.drained()).await;
    Ok(())
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
