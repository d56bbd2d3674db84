//! `phoenix-mesh server --config FILE --check`: validates the config, our certificate and the CA
//! file, looks for the running listener, and sends one plain HTTP request to the backend.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::{Either, Empty, Full};
use hyper_util::rt::TokioIo;
use phoenix_mesh_certs::error_chain;
use phoenix_mesh_common::check::{CheckRequest, Report};
use phoenix_mesh_common::sidecar::load_tls;
use phoenix_mesh_transport::h2::client as h2body;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::ServerSettings;

/// Runs every check; `request` is what is sent to the backend.
pub async fn check(settings: &ServerSettings, request: &CheckRequest) -> Report {
    let (host, path) = (request.host.as_str(), request.path.as_str());
    let mut report = Report::default();
    report.ok(
        format!("config {}", settings.path.display()),
        format!(
            "listen {}, backend {}{}, allowed_peers {}",
            settings.listen,
            settings.backend,
            if settings.backend_http2 { " (h2c)" } else { "" },
            if settings.allowed_peers.is_empty() {
                "any certificate from the CA".to_owned()
            } else {
                format!("{:?}", settings.allowed_peers)
            }
        ),
    );
    if let Some(warning) = settings.timeout_order_warning() {
        report.warn(
            format!("config {}", settings.path.display()),
            warning,
            "set backend_connect_timeout well below backend_timeout (defaults: 5s and 60s)",
        );
    }
    match load_tls(settings) {
        Ok((material, _)) => {
            for (what, detail) in material.describe(SystemTime::now()) {
                report.ok(what, detail);
            }
            if material.leaf.renewal_due(SystemTime::now()) {
                report.warn(
                    "our certificate",
                    "less than a third of its lifetime left",
                    "is the step-ca renewal timer running?",
                );
            }
        }
        Err(error) => report.fail("our certificate", error_chain(&error), error.hint()),
    }

    let local = if settings.listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], settings.listen.port()))
    } else {
        settings.listen
    };
    match timeout(Duration::from_secs(3), TcpStream::connect(local)).await {
        Ok(Ok(_)) => report.ok(format!("listener {}", settings.listen), format!("{local} accepts connections")),
        Ok(Err(error)) => report.warn(
            format!("listener {}", settings.listen),
            format!("{local}: {error}"),
            "not running: systemctl start phoenix-mesh-server (fine if you are checking before the first start)",
        ),
        Err(_) => report.warn(format!("listener {}", settings.listen), format!("{local}: no answer within 3 s"), "is a firewall dropping loopback traffic?"),
    }

    let (proto, protocol_hint) = if settings.backend_http2 {
        (
            "h2c",
            "backend_http2 = true: the backend must accept HTTP/2 cleartext with prior knowledge (Traefik's entrypoints do); set backend_http2 = false for one that speaks HTTP/1.1 only",
        )
    } else {
        (
            "plain HTTP",
            "backend must be Traefik's plain-HTTP entrypoint, not a TLS port",
        )
    };
    let what = format!(
        "backend {}: GET {path} (Host {host}) over {proto}",
        settings.backend
    );
    let backend = settings.backend;
    if settings.backend_http2
        && (host.contains('@') || http::uri::Authority::try_from(host).is_err())
    {
        report.fail(
            what,
            format!("--host {host:?} is no valid host[:port], so it cannot go as :authority"),
            "the listener sends a request with such a Host over HTTP/1.1; pass a host name to check h2c",
        );
        return report;
    }
    let connect = timeout(
        settings.backend_connect_timeout,
        TcpStream::connect(backend),
    )
    .await;
    let tcp = match connect {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(error)) => {
            report.fail(
                what,
                format!("{backend}: {error}"),
                "is Traefik running with its web entrypoint bound to this address? (backend = Traefik's plain-HTTP entrypoint)",
            );
            return report;
        }
        Err(_) => {
            report.fail(
                what,
                format!(
                    "{backend}: no answer within {:?}",
                    settings.backend_connect_timeout
                ),
                "is a firewall dropping the connection?",
            );
            return report;
        }
    };
    match timeout(
        Duration::from_secs(10),
        get(tcp, host, path, settings.backend_http2),
    )
    .await
    {
        Ok(Ok(status)) => report.ok(what, format!("the backend answered {status} over {proto}")),
        Ok(Err(error)) => report.fail(
            what,
            format!(
                "{backend} did not answer over {proto}: {}",
                error_chain(error.as_ref())
            ),
            protocol_hint,
        ),
        Err(_) => report.fail(
            what,
            format!("{backend}: no HTTP response within 10 s"),
            "is this an HTTP port? a TLS port waits silently for a ClientHello",
        ),
    }
    report
}

/// One GET over HTTP/1.1, or over h2c (the host as `:authority`) when `http2`, as the listener sends.
async fn get(
    tcp: TcpStream,
    host: &str,
    path: &str,
    http2: bool,
) -> Result<http::StatusCode, Box<dyn std::error::Error + Send + Sync>> {
    if http2 {
        // The listener's own h2c client (its settings and stream handling), not another one.
        let (sender, conn) = h2body::client_builder().handshake::<_, Bytes>(tcp).await?;
        tokio::spawn(conn);
        let req = Request::get(format!("http://{host}{path}"))
            .header("user-agent", "phoenix-mesh-check")
            .body(Either::Right(Full::default()))?;
        let sender = sender.ready().await?;
        return Ok(h2body::open_stream(sender, req, "the backend")
            .await?
            .status());
    }
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, host)
        .header("user-agent", "phoenix-mesh-check")
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(req).await?.status())
}
