//! A tokio-rustls client for talking to the mesh listener (or nginx) directly, with or without a
//! client certificate: which TLS alert a refusal came with, which certificate the listener presents,
//! and whether a handshake resumed.

use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use phoenix_mesh_certs::pki::Leaf;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, ClientConfig, HandshakeKind, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::http::SERVICE_HOST;
use super::pki::LISTENER_NAME;
use super::{within, STEP_LIMIT};

/// A client configuration trusting `root_pem`, presenting `leaf` if given, offering `alpn`.
pub fn client_config(root_pem: &str, leaf: Option<&Leaf>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    client_config_for(rustls::DEFAULT_VERSIONS, root_pem, leaf, alpn)
}

/// A TLS 1.2-only client presenting `leaf`.
pub fn client_config_tls12(root_pem: &str, leaf: &Leaf, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    client_config_for(&[&rustls::version::TLS12], root_pem, Some(leaf), alpn)
}

fn client_config_for(
    versions: &[&'static rustls::SupportedProtocolVersion],
    root_pem: &str,
    leaf: Option<&Leaf>,
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match leaf {
        Some(leaf) => {
            let chain = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// A TLS acceptor serving `leaf` without asking for a client certificate, offering only `http/1.1`:
/// the server side of the tests' stand-ins for a mesh listener.
pub fn http1_acceptor(leaf: &Leaf) -> tokio_rustls::TlsAcceptor {
    let chain = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A client configuration trusting `root_pem` and presenting `leaf`'s chain without its private key
/// (a key no provider here loads, such as RSA-1024): its CertificateVerify carries a signature of
/// the right size that verifies nothing. For refusals that must come from the certificate itself.
pub fn client_config_without_key(root_pem: &str, leaf: &Leaf) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_slice_iter(leaf.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let presented = Arc::new(rustls::sign::CertifiedKey::new(chain, Arc::new(NoKey)));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Presenting(presented)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Presents one certificate chain, whatever the server asks.
#[derive(Debug)]
struct Presenting(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presenting {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// An RSA "key" that signs with zeros.
#[derive(Debug)]
struct NoKey;

impl rustls::sign::SigningKey for NoKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&rustls::SignatureScheme::RSA_PSS_SHA256)
            .then(|| Box::new(NoKey) as Box<dyn rustls::sign::Signer>)
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::RSA
    }
}

impl rustls::sign::Signer for NoKey {
    fn sign(&self, _message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        Ok(vec![0; 128])
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        rustls::SignatureScheme::RSA_PSS_SHA256
    }
}

/// Connects and completes the handshake with `server_name` as SNI and expected name.
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// Connects to the mesh listener at `addr` (its name as SNI) and completes the handshake, failing the
/// test if it does not.
pub async fn to_listener(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsStream<TcpStream> {
    within(
        "TLS handshake with the listener",
        connect(addr, LISTENER_NAME, config),
    )
    .await
    .unwrap_or_else(|e| panic!("TLS handshake with the listener {addr}: {e}"))
}

/// The TLS alert a peer sent, found anywhere in an error's chain.
pub fn alert_in(error: &(dyn StdError + 'static)) -> Option<AlertDescription> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(rustls::Error::AlertReceived(alert)) = e.downcast_ref::<rustls::Error>() {
            return Some(*alert);
        }
        // io::Error::source skips the wrapped error itself, so look inside explicitly.
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(alert) = alert_in(inner) {
                    return Some(alert);
                }
            }
        }
        current = e.source();
    }
    None
}

/// Connects to the listener at `addr` presenting `leaf` (or nothing), sends one HTTP/1.1 request,
/// and returns the alert the listener refused with. Fails the test if the listener answered instead.
pub async fn refusal_alert(addr: SocketAddr, config: Arc<ClientConfig>) -> AlertDescription {
    let mut tls = match connect(addr, LISTENER_NAME, config).await {
        Ok(tls) => tls,
        Err(error) => {
            return alert_in(&error)
                .unwrap_or_else(|| panic!("handshake failed without an alert: {error:?}"))
        }
    };
    // TLS 1.3: the client finishes its side before the listener has judged its certificate, so the
    // refusal arrives on the first read.
    let request = format!("GET /refused HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n");
    if let Err(error) = tls.write_all(request.as_bytes()).await {
        if let Some(alert) = alert_in(&error) {
            return alert;
        }
    }
    let mut received = Vec::new();
    match tls.read_to_end(&mut received).await {
        Err(error) => alert_in(&error)
            .unwrap_or_else(|| panic!("connection failed without an alert: {error:?}")),
        Ok(_) => panic!(
            "the listener answered instead of refusing: {:?}",
            String::from_utf8_lossy(&received)
        ),
    }
}

/// The listener certificate (DER) a fresh TLS connection to `addr` is shown.
pub async fn presented_leaf(addr: SocketAddr, config: Arc<ClientConfig>) -> Vec<u8> {
    let tls = to_listener(addr, config).await;
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Connects with `config` (resuming if it holds a ticket), sends one HTTP/1.1 GET and reads the
/// answer. Ok((status line, handshake kind)) or the error, as a string.
pub async fn tls_get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<(String, HandshakeKind), String> {
    let attempt = async {
        let mut tls = connect(addr, LISTENER_NAME, config)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let kind = tls.get_ref().1.handshake_kind().unwrap();
        let request =
            format!("GET / HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write ({kind:?}): {e}"))?;
        let mut answer = Vec::new();
        let read = tls.read_to_end(&mut answer).await;
        let text = String::from_utf8_lossy(&answer).into_owned();
        match read {
            // A peer that answered and then closed without close_notify still answered.
            Err(e) if text.is_empty() => Err(format!("read ({kind:?}): {e}")),
            _ if text.is_empty() => Err(format!("closed without an answer ({kind:?})")),
            _ => Ok((text.lines().next().unwrap_or("").to_owned(), kind)),
        }
    };
    match tokio::time::timeout(STEP_LIMIT, attempt).await {
        Ok(r) => r,
        Err(_) => Err("no answer in time".to_owned()),
    }
}

/// Sends a `Connection: close` GET on an established TLS connection and returns the whole raw
/// answer.
pub async fn direct_get(mut tls: TlsStream<TcpStream>) -> String {
    tls.write_all(
        format!(
            "GET /allowed-direct HTTP/1.1\r\nHost: {SERVICE_HOST}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}
