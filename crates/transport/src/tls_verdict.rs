//! A TLS server's *verdict* on the client's certificate, as the client learns it. In TLS 1.3 the
//! client has finished its side of the handshake before the server has judged the certificate, so
//! the verdict is the server's first flight after the handshake: session tickets when it accepted the
//! certificate, a fatal alert when it refused it. A client that hands the connection over at once
//! would learn of a refusal only as the failure of its first request.
//!
//! [`await_verdict`] reads that flight before the connection is handed over; [`PeerAlert`] keeps a
//! fatal alert that arrives later, on a read, for a layer (h2) that keeps only an I/O error's kind and
//! message. Both work on rustls' types, never on an error's text.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, AlertDescription};

/// Feeds what the server sent right after the handshake to rustls, leaving any plaintext for the
/// HTTP layer, and fails with the server's alert if it refused us. A server that sends nothing
/// within `limit` is left to be judged by the first request.
pub async fn await_verdict(tls: &mut TlsStream<TcpStream>, limit: Duration) -> io::Result<()> {
    struct TryRead<'a>(&'a TcpStream);
    impl io::Read for TryRead<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.try_read(buf)
        }
    }
    let (tcp, conn) = tls.get_mut();
    if timeout(limit, tcp.readable()).await.is_err() {
        return Ok(());
    }
    match conn.read_tls(&mut TryRead(tcp)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
        Err(e) => return Err(e),
    }
    conn.process_new_packets()
        .map(drop)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// The fatal alert the peer sent, if that is what the I/O error from tokio-rustls is.
pub fn alert_received(e: &io::Error) -> Option<AlertDescription> {
    match rustls_error(e) {
        Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
        _ => None,
    }
}

/// The fatal alert a TLS peer sent on one connection, once it has: shared between the stream that
/// reads it and whoever reports the connection's failure. Reading it is one atomic load.
#[derive(Debug, Clone, Default)]
pub struct PeerAlert(Arc<OnceLock<AlertDescription>>);

impl PeerAlert {
    /// Keeps the alert `error` carries, if it carries one; the first alert wins (a peer sends one).
    pub fn note(&self, error: &io::Error) {
        if let Some(alert) = alert_received(error) {
            let _ = self.0.set(alert);
        }
    }

    /// The alert the peer sent, if it has.
    pub fn get(&self) -> Option<AlertDescription> {
        self.0.get().copied()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// A CA and what it signed.
    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        der: CertificateDer<'static>,
    }

    type Leaf = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            let der = params.self_signed(&key).unwrap().der().clone();
            Ca {
                issuer: Issuer::new(params, key),
                der,
            }
        }

        fn leaf(&self, name: &str) -> Leaf {
            let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let key = PrivatePkcs8KeyDer::from(key.serialize_der()).into();
            (vec![cert.der().clone()], key)
        }

        fn roots(&self) -> Arc<RootCertStore> {
            let mut roots = RootCertStore::empty();
            roots.add(self.der.clone()).unwrap();
            Arc::new(roots)
        }
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// A TLS 1.3 server trusting `ca`'s clients that, once a handshake succeeds, writes `greeting`
    /// and waits for the client to close; returns its address.
    async fn server(ca: &Ca, greeting: &'static [u8]) -> std::net::SocketAddr {
        let verifier = WebPkiClientVerifier::builder_with_provider(ca.roots(), provider())
            .build()
            .unwrap();
        let (chain, key) = ca.leaf("listener.test");
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            // A refused handshake fails here, after rustls has sent its alert.
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                if !greeting.is_empty() {
                    tls.write_all(greeting).await.unwrap();
                }
                let _ = tls.read(&mut [0; 16]).await;
            }
        });
        addr
    }

    /// Completes the client's side of a TLS 1.3 handshake with `server_ca`'s server, presenting `leaf`.
    async fn client(
        addr: std::net::SocketAddr,
        server_ca: &Ca,
        leaf: Leaf,
    ) -> TlsStream<TcpStream> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(server_ca.roots())
            .with_client_auth_cert(leaf.0, leaf.1)
            .unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("listener.test").unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("our side of a TLS 1.3 handshake completes whatever the server thinks of us")
    }

    const LIMIT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn an_accepted_client_gets_on_and_keeps_the_plaintext() {
        let ca = Ca::new("mesh root");
        let addr = server(&ca, b"hello").await;
        let mut tls = client(addr, &ca, ca.leaf("gateway.test")).await;
        await_verdict(&mut tls, LIMIT).await.unwrap();
        let mut greeting = [0; 5];
        tls.read_exact(&mut greeting).await.unwrap();
        assert_eq!(
            &greeting, b"hello",
            "the verdict must not eat what follows it"
        );
    }

    #[tokio::test]
    async fn a_refused_client_gets_the_alert() {
        let ca = Ca::new("mesh root");
        let other = Ca::new("other root");
        let addr = server(&ca, b"").await;
        let mut tls = client(addr, &ca, other.leaf("gateway.test")).await;
        let error = await_verdict(&mut tls, LIMIT).await.expect_err("refused");
        assert_eq!(alert_received(&error), Some(AlertDescription::UnknownCA));
    }

    #[tokio::test]
    async fn a_refusal_read_later_is_kept_for_whoever_reports_it() {
        let ca = Ca::new("mesh root");
        let other = Ca::new("other root");
        let addr = server(&ca, b"").await;
        let mut tls = client(addr, &ca, other.leaf("gateway.test")).await;
        let alert = PeerAlert::default();
        let reporter = alert.clone();
        assert_eq!(reporter.get(), None);
        let error = tls.read(&mut [0; 16]).await.expect_err("refused");
        alert.note(&error);
        assert_eq!(reporter.get(), Some(AlertDescription::UnknownCA));
        // Errors without an alert leave it as it is.
        alert.note(&io::Error::new(io::ErrorKind::BrokenPipe, "gone"));
        assert_eq!(reporter.get(), Some(AlertDescription::UnknownCA));
    }

    #[test]
    fn only_a_received_alert_counts() {
        let wrapped = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            alert_received(&wrapped(rustls::Error::AlertReceived(
                AlertDescription::AccessDenied
            ))),
            Some(AlertDescription::AccessDenied)
        );
        assert_eq!(
            alert_received(&wrapped(rustls::Error::NoCertificatesPresented)),
            None
        );
        // The text of an alert is not an alert.
        let text = io::Error::other("received fatal alert: UnknownCA");
        assert_eq!(alert_received(&text), None);
    }
}
