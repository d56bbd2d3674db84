//! The rustls load generator: bounded handshake loops (full / resumed, each followed by one request)
//! and the idle-connection opener for the memory step. Same client for every target.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, RootCertStore};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Client identity and trust for every target.
#[derive(Debug, Clone)]
pub struct ClientPki {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
    pub server_name: String,
}

/// TLS 1.3 only, X25519 only (what OpenSSL 3.0 peers and `openssl s_time` negotiate), ALPN http/1.1.
/// `aes128_first` puts TLS_AES_128_GCM_SHA256 ahead of TLS_AES_256_GCM_SHA384 (servers that honour the
/// client's order then run the key schedule on SHA-256 instead of SHA-384).
pub fn client_config(
    pki: &ClientPki,
    resume: bool,
    aes128_first: bool,
) -> anyhow::Result<Arc<ClientConfig>> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    if aes128_first {
        provider
            .cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&pki.ca)
        .with_context(|| format!("reading {}", pki.ca.display()))?
    {
        roots.add(c?)?;
    }
    let chain = CertificateDer::pem_file_iter(&pki.cert)
        .with_context(|| format!("reading {}", pki.cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&pki.key)
        .with_context(|| format!("reading {}", pki.key.display()))?;
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = if resume {
        Resumption::store(Arc::new(ClientSessionMemoryCache::new(256)))
    } else {
        Resumption::disabled()
    };
    Ok(Arc::new(cfg))
}

fn request(host: &str, close: bool) -> Vec<u8> {
    let conn = if close { "close" } else { "keep-alive" };
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: phoenix-mesh-bench\r\nConnection: {conn}\r\n\r\n").into_bytes()
}

async fn connect(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &ServerName<'static>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(connector.connect(name.clone(), tcp).await?)
}

/// Reads one HTTP/1.1 response (Content-Length or to EOF when `to_eof`); returns whether it was a 200.
async fn read_response(tls: &mut TlsStream<TcpStream>, to_eof: bool) -> anyhow::Result<bool> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match tls.read(&mut chunk).await {
            Ok(n) => n,
            // peers that close without close_notify after `Connection: close`
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => 0,
            Err(e) => return Err(e.into()),
        };
        buf.extend_from_slice(&chunk[..n]);
        if n == 0 {
            break;
        }
        if !to_eof {
            if let Some(h) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= h + 4 + len {
                    break;
                }
            }
        }
        if buf.len() > 1 << 20 {
            bail!("response larger than 1 MiB");
        }
    }
    Ok(buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200"))
}

/// Result of one handshake loop.
#[derive(Debug, Default)]
pub struct HsResult {
    pub ok: u64,
    pub errors: u64,
    pub resumed: u64,
    pub lat_us: Vec<u32>,
    pub wall: f64,
}

/// `clients` concurrent loops, each: connect, handshake, `GET /` with `Connection: close`, read to EOF.
/// Bounded by `secs` and by `max_per_client` handshakes per loop.
pub async fn handshake_loop(
    cfg: Arc<ClientConfig>,
    addr: SocketAddr,
    host: &str,
    clients: usize,
    secs: f64,
    resume: bool,
) -> anyhow::Result<HsResult> {
    let connector = TlsConnector::from(cfg);
    let name = ServerName::try_from(host.to_owned())?;
    if resume {
        // one full handshake per loop first, so every measured handshake can resume
        for _ in 0..clients.max(2) {
            let mut s = connect(&connector, addr, &name).await?;
            s.write_all(&request(host, true)).await?;
            read_response(&mut s, true).await?;
        }
    }
    const MAX_PER_CLIENT: u64 = 200_000;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(secs);
    let req = Arc::new(request(host, true));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let connector = connector.clone();
        let name = name.clone();
        let req = req.clone();
        set.spawn(async move {
            let mut r = HsResult::default();
            let mut n = 0;
            while Instant::now() < deadline && n < MAX_PER_CLIENT {
                n += 1;
                let s0 = Instant::now();
                let one = async {
                    let mut s = connect(&connector, addr, &name).await?;
                    let resumed = s.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
                    s.write_all(&req).await?;
                    let ok = read_response(&mut s, true).await?;
                    anyhow::Ok((ok, resumed))
                };
                match tokio::time::timeout(Duration::from_secs(5), one).await {
                    Ok(Ok((true, resumed))) => {
                        r.ok += 1;
                        r.resumed += u64::from(resumed);
                        r.lat_us
                            .push(s0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    _ => r.errors += 1,
                }
            }
            r
        });
    }
    let mut total = HsResult::default();
    while let Some(r) = set.join_next().await {
        let r = r?;
        total.ok += r.ok;
        total.errors += r.errors;
        total.resumed += r.resumed;
        total.lat_us.extend(r.lat_us);
    }
    total.wall = t0.elapsed().as_secs_f64();
    total.lat_us.sort_unstable();
    Ok(total)
}

/// Opens `n` mTLS connections (`concurrency` at a time), each doing one keep-alive `GET /`, and
/// returns them open. Bounded by `deadline`.
pub async fn open_idle(
    cfg: Arc<ClientConfig>,
    addr: SocketAddr,
    host: &str,
    n: usize,
    concurrency: usize,
    deadline: Duration,
) -> (Vec<TlsStream<TcpStream>>, u64) {
    let connector = TlsConnector::from(cfg);
    let Ok(name) = ServerName::try_from(host.to_owned()) else {
        return (Vec::new(), n as u64);
    };
    let req = Arc::new(request(host, false));
    let end = Instant::now() + deadline;
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        if Instant::now() > end {
            break;
        }
        let (connector, name, req) = (connector.clone(), name.clone(), req.clone());
        set.spawn(async move {
            let _permit = permit;
            let one = async {
                let mut s = connect(&connector, addr, &name).await?;
                s.write_all(&req).await?;
                if !read_response(&mut s, false).await? {
                    bail!("non-200");
                }
                anyhow::Ok(s)
            };
            tokio::time::timeout(Duration::from_secs(10), one)
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    let mut open = Vec::with_capacity(n);
    let mut failed = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Some(s)) => open.push(s),
            _ => failed += 1,
        }
    }
    (open, failed)
}

/// Checks that the PKI files exist before any process is started.
pub fn check_files(pki: &ClientPki) -> anyhow::Result<()> {
    for p in [&pki.cert, &pki.key, &pki.ca] {
        if !Path::new(p).exists() {
            bail!(
                "{} does not exist: without --cert, --key, --ca, --server-cert or --server-key the harness \
                 writes its own PKI to RUN/pki; with them, name every file the run needs",
                p.display()
            );
        }
    }
    Ok(())
}
