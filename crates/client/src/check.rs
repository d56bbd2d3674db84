//! `phoenix-mesh client --config FILE --check`: validates the config and certificates, then walks
//! every hop to every upstream live (resolve, connect, mutual TLS, one request) and says which one
//! fails and why.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use phoenix_mesh_certs::{error_chain, human, PeerIdentity};
use phoenix_mesh_common::check::{CheckRequest, Report};
use phoenix_mesh_common::sidecar::load_tls;
use phoenix_mesh_common::MESH_ERROR_HEADER;
use phoenix_mesh_transport::tls_verdict::await_verdict;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use crate::upstream_error::{client_cert_alert, UpstreamError, UpstreamErrorKind};
use crate::ClientSettings;

/// Runs every check and returns the report.
pub async fn check(settings: &ClientSettings, request: &CheckRequest) -> Report {
    let mut report = Report::default();
    report.ok(
        format!("config {}", settings.path.display()),
        format!(
            "listen {}, upstreams {:?}, server_name {}",
            settings.listen, settings.upstreams, settings.server_name
        ),
    );
    let (material, live) = match load_tls(settings) {
        Ok(loaded) => loaded,
        Err(error) => {
            report.fail("our certificate", error_chain(&error), error.hint());
            return report;
        }
    };
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
    let config = live.current();
    let Ok(server_name) = ServerName::try_from(settings.server_name.clone()) else {
        report.fail(
            "server_name",
            settings.server_name.clone(),
            "must be a DNS name or an IP address",
        );
        return report;
    };
    for upstream in &settings.upstreams {
        check_upstream(
            &mut report,
            settings,
            upstream,
            TlsConnector::from(config.clone()),
            &server_name,
            request,
        )
        .await;
    }
    report
}

async fn check_upstream(
    report: &mut Report,
    settings: &ClientSettings,
    upstream: &str,
    connector: TlsConnector,
    server_name: &ServerName<'static>,
    request: &CheckRequest,
) {
    let addr = match tokio::net::lookup_host(upstream)
        .await
        .map(|mut a| a.next())
    {
        Ok(Some(addr)) => {
            report.ok(format!("upstream {upstream}: resolve"), addr.to_string());
            addr
        }
        Ok(None) | Err(_) => {
            report.fail(
                format!("upstream {upstream}: resolve"),
                "no address",
                "check the host name in upstreams (or use the listener's IP)",
            );
            return;
        }
    };
    let tcp = match timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => {
            report.ok(
                format!("upstream {upstream}: connect"),
                "TCP connection open",
            );
            tcp
        }
        Ok(Err(error)) => {
            report.fail(
                format!("upstream {upstream}: connect"),
                format!("{addr}: {error}"),
                "is `phoenix-mesh server` running there (systemctl status phoenix-mesh-server), and does the firewall let this host reach that port?",
            );
            return;
        }
        Err(_) => {
            report.fail(
                format!("upstream {upstream}: connect"),
                format!("{addr}: no answer within {:?}", settings.connect_timeout),
                "a firewall is probably dropping the packets: check the rules for this port on both guests",
            );
            return;
        }
    };
    let handshake = async {
        let mut tls = connector.connect(server_name.clone(), tcp).await?;
        // TLS 1.3: the listener judges our certificate after our side is done; wait for its verdict.
        if tls.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
            await_verdict(&mut tls, settings.shared.handshake_timeout).await?;
        }
        Ok::<_, std::io::Error>(tls)
    };
    let tls = match timeout(settings.shared.handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            let classified = UpstreamError::handshake(error, upstream, server_name);
            let hint = match classified.kind() {
                UpstreamErrorKind::NotTls => "point upstreams at the mesh listener's TLS port (8443), not at Traefik's plain-HTTP port",
                UpstreamErrorKind::CertificateInvalid => "the listener's certificate must be issued by the CA in ca and carry server_name as a SAN",
                UpstreamErrorKind::ClientCertRefused => "the listener does not accept our certificate: check its ca and allowed_peers",
                _ => "see the listener's log for the same connection",
            };
            report.fail(
                format!("upstream {upstream}: mutual TLS"),
                classified.to_string(),
                hint,
            );
            return;
        }
        Err(_) => {
            report.fail(
                format!("upstream {upstream}: mutual TLS"),
                format!(
                    "handshake did not finish within {:?}",
                    settings.shared.handshake_timeout
                ),
                "is this the mesh listener's TLS port?",
            );
            return;
        }
    };
    let conn = tls.get_ref().1;
    let h2 = conn.alpn_protocol() == Some(b"h2");
    let version = conn
        .protocol_version()
        .map_or("?".to_owned(), |v| format!("{v:?}"));
    match conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| PeerIdentity::from_der(c))
    {
        Some(Ok(peer)) => {
            let now = SystemTime::now();
            let left = peer.remaining(now);
            report.ok(
                format!("upstream {upstream}: mutual TLS"),
                format!(
                    "{version}, ALPN {}, listener {} (DNS {:?}) verified for {}, expires in {}",
                    if h2 { "h2" } else { "http/1.1" },
                    peer.subject,
                    peer.dns,
                    settings.server_name,
                    human(left.as_secs())
                ),
            );
            if peer.renewal_due(now) {
                report.warn(
                    format!("upstream {upstream}: listener certificate"),
                    "less than a third of its lifetime left",
                    "is the renewal running on the listener's guest?",
                );
            }
        }
        _ => report.warn(
            format!("upstream {upstream}: mutual TLS"),
            "established, but the listener's certificate could not be read",
            "report this",
        ),
    }

    let what = format!(
        "upstream {upstream}: GET {} (Host {})",
        request.path, request.host
    );
    let outcome = timeout(
        Duration::from_secs(15),
        send(TokioIo::new(tls), h2, request),
    )
    .await;
    match outcome {
        Err(_) => report.fail(
            what,
            "no response within 15 s",
            "is the backend behind the listener slow or hanging?",
        ),
        Ok(Err(error)) => {
            let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
            while let Some(e) = current {
                if let Some(alert) = e
                    .downcast_ref::<std::io::Error>()
                    .and_then(client_cert_alert)
                {
                    let refused = UpstreamError::client_cert_refused(upstream, alert);
                    report.fail(what, refused.to_string(), "the listener's ca and allowed_peers must accept our certificate; its log names the reason");
                    return;
                }
                current = e.source();
            }
            report.fail(
                what,
                format!("request failed: {}", error_chain(error.as_ref())),
                "see the listener's log",
            );
        }
        Ok(Ok((status, mesh_error, body))) => match (status, mesh_error) {
            (_, Some(code)) => report.fail(
                what,
                format!(
                    "{status} {code} made by the listener: {}",
                    body.lines().next().unwrap_or("")
                ),
                "the mesh works up to the listener; the hop it names is broken",
            ),
            (StatusCode::NOT_FOUND, None) => report.warn(
                what,
                format!("mesh OK; Traefik has no router for Host {}", request.host),
                "pick a Host that Traefik routes with --host, or add a router for it",
            ),
            (status, None) => report.ok(what, format!("mesh OK; the backend answered {status}")),
        },
    }
}

type CheckResult =
    Result<(StatusCode, Option<String>, String), Box<dyn std::error::Error + Send + Sync>>;

async fn send<I>(io: TokioIo<I>, h2: bool, request: &CheckRequest) -> CheckResult
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let req = Request::get(request.path.as_str())
        .header(http::header::HOST, request.host.as_str())
        .header("user-agent", "phoenix-mesh-check")
        .body(Empty::<Bytes>::new())?;
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = format!("https://phoenix-mesh{}", request.path).parse()?;
        sender.send_request(req).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        sender.send_request(req).await?
    };
    let status = response.status();
    let mesh_error = response
        .headers()
        .get(MESH_ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Limited::new(response.into_body(), 4096)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    Ok((status, mesh_error, body))
}
