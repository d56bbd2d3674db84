//! An *upstream error* is the client sidecar's failure to open a connection to a mesh listener: which
//! hop failed (TCP, TLS, whose certificate), in words an operator can act on, with the
//! `phoenix-mesh-error` code and the status nginx gets. The codes and messages are a contract (tests
//! and operators' alerts match them); an error is classified from rustls' types, never from its text.

use std::io;
use std::time::Duration;

use http::StatusCode;
use phoenix_mesh_certs::{human, refuses_our_certificate};
use phoenix_mesh_transport::tls_verdict::{alert_received, rustls_error};
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError};

/// Which hop of the client -> listener link failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// TCP connect failed or timed out.
    Unreachable,
    /// The upstream answered, but not in TLS.
    NotTls,
    /// The listener's certificate failed verification (name, chain, date, revocation).
    CertificateInvalid,
    /// The listener refused our client certificate.
    ClientCertRefused,
    /// Another TLS handshake failure.
    Handshake,
}

impl UpstreamErrorKind {
    /// The `phoenix-mesh-error` code.
    pub fn code(self) -> &'static str {
        match self {
            UpstreamErrorKind::Unreachable => "upstream-unreachable",
            UpstreamErrorKind::NotTls => "upstream-not-tls",
            UpstreamErrorKind::CertificateInvalid => "upstream-cert-invalid",
            UpstreamErrorKind::ClientCertRefused => "client-cert-refused",
            UpstreamErrorKind::Handshake => "upstream-tls-failed",
        }
    }

    /// The status the client answers nginx with.
    pub fn status(self) -> StatusCode {
        match self {
            UpstreamErrorKind::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// How much an error of this kind tells an operator: a certificate problem says more than a
    /// refused port.
    fn weight(self) -> u8 {
        match self {
            UpstreamErrorKind::Unreachable => 0,
            UpstreamErrorKind::Handshake => 1,
            _ => 2,
        }
    }
}

/// Failure to reach a mesh listener; its message names the address and the cause.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Our own certificate has expired: the listener would refuse it, so no dial is tried.
    #[error(
        "phoenix-mesh client: our certificate ({subject}) expired {} ago, and the mesh listener \
         refuses expired certificates: renew it (step ca renew) and reload the client",
        human(.ago.as_secs())
    )]
    OwnCertificateExpired {
        /// Our certificate's subject.
        subject: String,
        /// How long ago it expired.
        ago: Duration,
    },
    /// The TCP connect failed.
    #[error("phoenix-mesh client: mesh listener {upstream} unreachable: {cause}")]
    Unreachable {
        /// The listener, as configured.
        upstream: String,
        /// Why.
        cause: io::Error,
    },
    /// The TCP connect did not finish in time.
    #[error("phoenix-mesh client: mesh listener {upstream} unreachable: no answer within {limit:?} (connect_timeout)")]
    ConnectTimeout {
        /// The listener, as configured.
        upstream: String,
        /// `connect_timeout`.
        limit: Duration,
    },
    /// The upstream answered with something that is not TLS.
    #[error(
        "phoenix-mesh client: upstream {upstream} does not speak TLS (it answered with something that is \
         not a TLS record, probably plain HTTP): is {upstream} the mesh listener's TLS port, not Traefik's?"
    )]
    NotTls {
        /// The listener, as configured.
        upstream: String,
    },
    /// The listener's certificate failed our verification.
    #[error(
        "phoenix-mesh client: the certificate of mesh listener {upstream} was rejected: {cause} \
         (it must chain to the configured ca and carry the name {name:?})"
    )]
    CertificateInvalid {
        /// The listener, as configured.
        upstream: String,
        /// What was wrong with it.
        cause: CertificateError,
        /// The name it must carry (`server_name`).
        name: String,
    },
    /// The listener refused our certificate with a TLS alert.
    #[error(
        "phoenix-mesh client: mesh listener {upstream} refused our client certificate (TLS alert {alert:?}): \
         is it issued by the CA the listener trusts, unexpired, and in the listener's allowed_peers?"
    )]
    ClientCertRefused {
        /// The listener (or the configured listeners), as configured.
        upstream: String,
        /// The alert it sent.
        alert: AlertDescription,
    },
    /// The handshake did not finish in time.
    #[error(
        "phoenix-mesh client: TLS handshake with {upstream} did not finish within {limit:?} \
         (handshake_timeout): is {upstream} the mesh listener's TLS port?"
    )]
    HandshakeTimeout {
        /// The listener, as configured.
        upstream: String,
        /// `handshake_timeout`.
        limit: Duration,
    },
    /// The upstream hung up during the handshake.
    #[error(
        "phoenix-mesh client: {upstream} closed the connection during the TLS handshake: \
         is it the mesh listener's TLS port?"
    )]
    ClosedInHandshake {
        /// The listener, as configured.
        upstream: String,
    },
    /// A resumed session showed a listener certificate that had expired, and so did a full handshake.
    #[error("phoenix-mesh client: mesh listener {upstream}: its certificate has expired")]
    ListenerCertificateExpired {
        /// The listener, as configured.
        upstream: String,
    },
    /// Another TLS failure (rustls' own, or an I/O error during the handshake).
    #[error("phoenix-mesh client: TLS handshake with mesh listener {upstream} failed: {cause}")]
    Handshake {
        /// The listener, as configured.
        upstream: String,
        /// What failed.
        cause: io::Error,
    },
    /// Every configured listener failed; each failure in the order they were tried.
    #[error("every mesh listener failed: {}", joined(.0))]
    AllFailed(Vec<UpstreamError>),
}

fn joined(failures: &[UpstreamError]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl UpstreamError {
    /// Which hop failed; for [`UpstreamError::AllFailed`], the most telling of the failures.
    pub fn kind(&self) -> UpstreamErrorKind {
        use UpstreamErrorKind as K;
        match self {
            UpstreamError::OwnCertificateExpired { .. } => K::ClientCertRefused,
            UpstreamError::Unreachable { .. } | UpstreamError::ConnectTimeout { .. } => {
                K::Unreachable
            }
            UpstreamError::NotTls { .. } => K::NotTls,
            UpstreamError::CertificateInvalid { .. } => K::CertificateInvalid,
            UpstreamError::ClientCertRefused { .. } => K::ClientCertRefused,
            UpstreamError::HandshakeTimeout { .. }
            | UpstreamError::ClosedInHandshake { .. }
            | UpstreamError::ListenerCertificateExpired { .. }
            | UpstreamError::Handshake { .. } => K::Handshake,
            UpstreamError::AllFailed(failures) => failures
                .iter()
                .map(UpstreamError::kind)
                .max_by_key(|kind| kind.weight())
                .unwrap_or(K::Unreachable),
        }
    }

    /// The failure of a dial that tried every listener: the one failure itself when there was one.
    pub(crate) fn all_failed(mut failures: Vec<UpstreamError>) -> Self {
        if failures.len() == 1 {
            return failures.remove(0);
        }
        UpstreamError::AllFailed(failures)
    }

    /// `upstream` (or the listeners, joined) refused our certificate with `alert`.
    pub(crate) fn client_cert_refused(upstream: &str, alert: AlertDescription) -> Self {
        UpstreamError::ClientCertRefused {
            upstream: upstream.to_owned(),
            alert,
        }
    }

    /// What a failed TLS handshake with `upstream` (or the listener's verdict after it) says, from
    /// the rustls error tokio-rustls wraps.
    pub(crate) fn handshake(e: io::Error, upstream: &str, server_name: &ServerName<'_>) -> Self {
        let upstream = upstream.to_owned();
        match rustls_error(&e) {
            Some(rustls::Error::InvalidMessage(_)) => UpstreamError::NotTls { upstream },
            Some(rustls::Error::InvalidCertificate(cause)) => UpstreamError::CertificateInvalid {
                upstream,
                cause: cause.clone(),
                name: server_name.to_str().into_owned(),
            },
            Some(rustls::Error::AlertReceived(alert)) if refuses_our_certificate(*alert) => {
                UpstreamError::ClientCertRefused {
                    upstream,
                    alert: *alert,
                }
            }
            Some(_) => UpstreamError::Handshake { upstream, cause: e },
            None if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) =>
            {
                UpstreamError::ClosedInHandshake { upstream }
            }
            None => UpstreamError::Handshake { upstream, cause: e },
        }
    }
}

/// The alert refusing our certificate that an I/O error from a mesh connection carries, if any. An
/// error that went through h2 has lost it; the connection's [`crate::conn_info::ConnInfo`] keeps it.
pub(crate) fn client_cert_alert(e: &io::Error) -> Option<AlertDescription> {
    alert_received(e).filter(|alert| refuses_our_certificate(*alert))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const UPSTREAM: &str = "10.0.0.12:8443";

    fn tls_error(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    fn classify(e: io::Error) -> UpstreamError {
        let name = ServerName::try_from("mesh.internal").unwrap();
        UpstreamError::handshake(e, UPSTREAM, &name)
    }

    #[test]
    fn handshake_failures_by_rustls_error() {
        use UpstreamErrorKind as K;
        type Case = (fn() -> io::Error, UpstreamErrorKind, &'static str);
        let cases: &[Case] = &[
            (
                || tls_error(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )),
                K::NotTls,
                "phoenix-mesh client: upstream 10.0.0.12:8443 does not speak TLS (it answered with something \
                 that is not a TLS record, probably plain HTTP): is 10.0.0.12:8443 the mesh listener's TLS \
                 port, not Traefik's?",
            ),
            (
                || tls_error(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName,
                )),
                K::CertificateInvalid,
                "phoenix-mesh client: the certificate of mesh listener 10.0.0.12:8443 was rejected: \
                 NotValidForName (it must chain to the configured ca and carry the name \
                 \"mesh.internal\")",
            ),
            (
                || tls_error(rustls::Error::AlertReceived(AlertDescription::AccessDenied)),
                K::ClientCertRefused,
                "phoenix-mesh client: mesh listener 10.0.0.12:8443 refused our client certificate (TLS alert \
                 AccessDenied): is it issued by the CA the listener trusts, unexpired, and in the listener's \
                 allowed_peers?",
            ),
            (
                || tls_error(rustls::Error::AlertReceived(
                    AlertDescription::HandshakeFailure,
                )),
                K::Handshake,
                "phoenix-mesh client: TLS handshake with mesh listener 10.0.0.12:8443 failed: received fatal \
                 alert: HandshakeFailure",
            ),
            (
                || io::Error::from(io::ErrorKind::UnexpectedEof),
                K::Handshake,
                "phoenix-mesh client: 10.0.0.12:8443 closed the connection during the TLS handshake: is it \
                 the mesh listener's TLS port?",
            ),
            (
                || io::Error::other("odd"),
                K::Handshake,
                "phoenix-mesh client: TLS handshake with mesh listener 10.0.0.12:8443 failed: odd",
            ),
        ];
        for (error, kind, message) in cases {
            let error = classify(error());
            assert_eq!(error.kind(), *kind, "{message}");
            assert_eq!(error.to_string(), *message);
        }
    }

    #[test]
    fn dial_failure_messages() {
        let cases = [
            (
                UpstreamError::OwnCertificateExpired {
                    subject: "CN=nginx-gateway-client".to_owned(),
                    ago: Duration::from_secs(90),
                },
                "client-cert-refused",
                format!(
                    "phoenix-mesh client: our certificate (CN=nginx-gateway-client) expired {} ago, and the \
                     mesh listener refuses expired certificates: renew it (step ca renew) and reload the client",
                    human(90)
                ),
            ),
            (
                UpstreamError::Unreachable {
                    upstream: UPSTREAM.to_owned(),
                    cause: io::Error::new(io::ErrorKind::ConnectionRefused, "Connection refused"),
                },
                "upstream-unreachable",
                "phoenix-mesh client: mesh listener 10.0.0.12:8443 unreachable: Connection refused".to_owned(),
            ),
            (
                UpstreamError::ConnectTimeout {
                    upstream: UPSTREAM.to_owned(),
                    limit: Duration::from_secs(3),
                },
                "upstream-unreachable",
                "phoenix-mesh client: mesh listener 10.0.0.12:8443 unreachable: no answer within 3s \
                 (connect_timeout)"
                    .to_owned(),
            ),
            (
                UpstreamError::HandshakeTimeout {
                    upstream: UPSTREAM.to_owned(),
                    limit: Duration::from_secs(5),
                },
                "upstream-tls-failed",
                "phoenix-mesh client: TLS handshake with 10.0.0.12:8443 did not finish within 5s \
                 (handshake_timeout): is 10.0.0.12:8443 the mesh listener's TLS port?"
                    .to_owned(),
            ),
            (
                UpstreamError::ListenerCertificateExpired {
                    upstream: UPSTREAM.to_owned(),
                },
                "upstream-tls-failed",
                "phoenix-mesh client: mesh listener 10.0.0.12:8443: its certificate has expired".to_owned(),
            ),
        ];
        for (error, code, message) in cases {
            assert_eq!(error.kind().code(), code, "{message}");
            assert_eq!(error.to_string(), message);
        }
    }

    #[test]
    fn every_listener_failing_names_each_and_the_most_telling_kind() {
        let refused = |upstream: &str| UpstreamError::Unreachable {
            upstream: upstream.to_owned(),
            cause: io::Error::new(io::ErrorKind::ConnectionRefused, "Connection refused"),
        };
        let one = UpstreamError::all_failed(vec![refused("a:1")]);
        assert!(matches!(one, UpstreamError::Unreachable { .. }), "{one:?}");

        let all = UpstreamError::all_failed(vec![
            refused("a:1"),
            UpstreamError::NotTls {
                upstream: "b:2".to_owned(),
            },
            UpstreamError::ClosedInHandshake {
                upstream: "c:3".to_owned(),
            },
        ]);
        assert_eq!(all.kind(), UpstreamErrorKind::NotTls);
        assert_eq!(all.kind().status(), StatusCode::BAD_GATEWAY);
        let message = all.to_string();
        assert!(
            message.starts_with("every mesh listener failed: phoenix-mesh client: mesh listener a:1 unreachable: Connection refused; phoenix-mesh client: upstream b:2 does not speak TLS"),
            "{message}"
        );
        assert_eq!(message.matches("; phoenix-mesh client: ").count(), 2);

        let unreachable = UpstreamError::all_failed(vec![refused("a:1"), refused("b:2")]);
        assert_eq!(unreachable.kind(), UpstreamErrorKind::Unreachable);
        assert_eq!(unreachable.kind().status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn only_a_refusing_alert_is_a_client_cert_alert() {
        let alert = |a| tls_error(rustls::Error::AlertReceived(a));
        assert_eq!(
            client_cert_alert(&alert(AlertDescription::UnknownCA)),
            Some(AlertDescription::UnknownCA)
        );
        assert_eq!(
            client_cert_alert(&alert(AlertDescription::DecodeError)),
            None
        );
        let text = io::Error::other("received fatal alert: UnknownCA");
        assert_eq!(client_cert_alert(&text), None);
    }
}
