//! One request from a verified peer to Traefik: identity header set, hop-by-hop headers dropped,
//! Host untouched, the response passed back as it came.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, HOST};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use phoenix_mesh_certs::{ByteCache, PeerIdentity};
use phoenix_mesh_common::conformance::{self, Refusal};
use phoenix_mesh_common::headers::{
    append_forwarded_for, header_list_size, join_cookies, remove_hop_by_hop,
    remove_hop_by_hop_request, remove_identity_headers, restore_upgrade, AllowedUpgrades,
    CLIENT_CERT, CLIENT_CERT_CHAIN, XFCC,
};
use phoenix_mesh_common::live::Registration;
use phoenix_mesh_common::log_limit::{Cause, LogLimit, Repeat};
use phoenix_mesh_common::mesh_error;
use phoenix_mesh_common::metrics::MadeBy;
use phoenix_mesh_transport::body::{request_body_failure, ResponseBody};
use phoenix_mesh_transport::tunnel::splice;
use rustls::pki_types::CertificateDer;
use tracing::info;

use phoenix_mesh_transport::dial::{ConnectError, Protocol, TcpDial};
use phoenix_mesh_transport::h2::shared::{self, Sent};
use phoenix_mesh_transport::pool::{self, Limit, Pool};

use crate::h2c::{h2c_backend, H2cBackend};
use crate::identity_headers::{client_cert, client_cert_chain, IdentityHeaders};

/// Why the backend did not answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BackendError {
    /// No connection could be opened (refused, unreachable, timed out).
    #[error("{0}")]
    Connect(#[source] Arc<ConnectError>),
    /// The connection failed while the request was sent or the response read.
    #[error("{0}")]
    Request(#[source] hyper::Error),
    /// The h2c connection failed, or the backend reset the request's stream.
    #[error("{0}")]
    H2(#[source] h2::Error),
    /// The backend turned the request away unprocessed (h2c), and it is not one to send twice.
    #[error("the backend turned the request away without processing it ({1}: its GOAWAY crossed the request, or it refused the stream); a {0} request is not sent again, only idempotent ones without a body are")]
    TurnedAway(http::Method, h2::Error),
    /// Every connection `max_backend_connections` allows was busy for as long as a request may wait.
    #[error("all {0} connections to the backend (max_backend_connections) stayed busy for {1:?} (backend_connect_timeout)")]
    ConnectionLimit(usize, Duration),
    /// The backend turned an idempotent request away unprocessed, and again when it went once more.
    #[error("the backend turned the request away without processing it, twice ({1}); the {0} request went once more and was turned away again: is the backend shutting down, or over its limit of concurrent streams?")]
    TurnedAwayAgain(http::Method, h2::Error),
}

impl BackendError {
    /// What the HTTP/1.1 pool's error means for the request.
    fn from_pool(error: pool::Error<ConnectError>) -> Self {
        match error {
            pool::Error::Dial(error) => BackendError::Connect(Arc::new(error)),
            pool::Error::Handshake(error) | pool::Error::Request(error) => {
                BackendError::Request(error)
            }
            pool::Error::Busy { max, waited } => BackendError::ConnectionLimit(max, waited),
        }
    }

    /// What the h2c connection's error means for a `method` request.
    fn from_h2c(error: shared::Error<ConnectError, ()>, method: http::Method) -> Self {
        match error {
            shared::Error::Dial(error) => BackendError::Connect(error),
            shared::Error::Handshake(error) | shared::Error::Stream { source: error, .. } => {
                BackendError::H2(error)
            }
            shared::Error::TurnedAway {
                source,
                replayed: false,
                ..
            } => BackendError::TurnedAway(method, source),
            shared::Error::TurnedAway {
                source,
                replayed: true,
                ..
            } => BackendError::TurnedAwayAgain(method, source),
        }
    }

    /// The kind of failure, for telling repeated ones apart in the log (never the message, which
    /// carries the request's details).
    fn cause_kind(&self) -> Cause {
        match self {
            BackendError::Connect(error) => Cause::Io(error.source.kind()),
            BackendError::Request(_) => Cause::Code("http1"),
            BackendError::ConnectionLimit(..) => Cause::Code("backend-connection-limit"),
            BackendError::H2(_) => Cause::Code("h2c"),
            BackendError::TurnedAway(..) => Cause::Code("turned-away"),
            BackendError::TurnedAwayAgain(..) => Cause::Code("turned-away-again"),
        }
    }
}

/// The `:authority` the client sidecar puts on HTTP/2 requests (its pool key, not a host).
const MESH_POOL_AUTHORITY: &str = "phoenix-mesh";

/// How the listener names itself in the answers it makes.
const HOP: &str = "phoenix-mesh listener";

/// Who is on the other end of one mTLS connection, computed once after its handshake.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// The peer's IP as an `X-Forwarded-For` element.
    pub forwarded_for: HeaderValue,
    pub id: Arc<PeerId>,
    /// The `Client-Cert-Chain` value, when `identity_headers` has `client-cert` and the client
    /// sent intermediates: it belongs to the chain this connection presented, not to the leaf.
    pub client_cert_chain: Option<HeaderValue>,
    /// The connection among the live ones; a tunnel over it holds it, and ends when it must.
    pub conn: Arc<Registration>,
}

/// What the listener derives from a verified client certificate.
#[derive(Debug)]
pub(crate) struct PeerId {
    /// The `X-Forwarded-Client-Cert` value, when `identity_headers` has `xfcc`.
    pub xfcc: Option<HeaderValue>,
    /// The `Client-Cert` value, when `identity_headers` has `client-cert`.
    pub client_cert: Option<HeaderValue>,
    /// Short identity for logs.
    pub name: Arc<str>,
    /// The certificate it was read from, for the live connections' registry.
    pub identity: Arc<PeerIdentity>,
    /// End of the certificate's validity: a resumed session carries the certificate but is not
    /// verified again, so the listener checks this itself.
    pub not_after: std::time::SystemTime,
}

/// Verified client certificates seen recently, so a connection (above all a resumed one, which does
/// no certificate work at all) does not parse the same certificate and hash it again.
#[derive(Debug)]
pub(crate) struct PeerIds {
    cache: ByteCache<Arc<PeerId>>,
    headers: IdentityHeaders,
}

impl PeerIds {
    /// For a listener sending `headers`.
    pub(crate) fn new(headers: IdentityHeaders) -> Self {
        PeerIds {
            cache: ByteCache::default(),
            headers,
        }
    }

    pub(crate) fn get(&self, der: &[u8]) -> Result<Arc<PeerId>, String> {
        if let Some(id) = self.cache.get(der) {
            return Ok(id);
        }
        let identity = PeerIdentity::from_der(der).map_err(|e| e.to_string())?;
        // Made even when not sent: a certificate XFCC cannot carry is refused either way.
        let xfcc = HeaderValue::from_str(&identity.xfcc()).map_err(|e| e.to_string())?;
        let id = Arc::new(PeerId {
            xfcc: self.headers.xfcc.then_some(xfcc),
            client_cert: if self.headers.client_cert {
                Some(client_cert(der).ok_or("its DER does not fit in a header")?)
            } else {
                None
            },
            name: identity.name().into(),
            not_after: identity.not_after,
            identity: Arc::new(identity),
        });
        self.cache.insert(der.into(), id.clone());
        Ok(id)
    }

    /// The `Client-Cert-Chain` value for a connection that presented `chain`, when it is sent.
    pub(crate) fn chain(&self, chain: &[CertificateDer<'_>]) -> Option<HeaderValue> {
        if self.headers.client_cert {
            client_cert_chain(chain)
        } else {
            None
        }
    }
}

/// How long an unused keep-alive connection to the backend is kept.
const BACKEND_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The client to Traefik: pooled HTTP/1.1 connections, and with `backend_http2` one shared h2c
/// connection that every request but upgrades takes.
pub(crate) struct Backend {
    pool: Arc<Pool<TcpDial>>,
    h2c: Option<Arc<H2cBackend>>,
    addr: SocketAddr,
    /// The backend's address as a Host value, for requests that arrive without one.
    host: HeaderValue,
    response_timeout: Duration,
    /// The backend's failures, each kind logged once per interval however many requests it fails.
    log: LogLimit,
    /// The backend's address, as the log limit's hop.
    hop: Arc<str>,
    /// The protocols a request may upgrade to (`allowed_upgrades`).
    allowed_upgrades: AllowedUpgrades,
    /// The largest response head passed on (`max_header_bytes`, as an HTTP/2 header list size).
    max_head_bytes: usize,
}

impl Backend {
    pub(crate) fn new(
        addr: SocketAddr,
        connect_timeout: Duration,
        response_timeout: Duration,
        http2: bool,
        max_connections: usize,
    ) -> Self {
        let dial = TcpDial {
            addr,
            connect_timeout,
            protocol: Protocol::Http1,
        };
        let h2c = http2.then(|| h2c_backend(dial.clone(), BACKEND_IDLE_TIMEOUT));
        // Waiting for a connection is part of getting one, so it gets the connect timeout (as
        // HAProxy's `timeout queue` defaults to `timeout connect`).
        let limit = Limit {
            max: max_connections,
            wait: connect_timeout,
        };
        let pool = Pool::bounded(
            dial,
            phoenix_mesh_transport::dial::NeverRetire,
            BACKEND_IDLE_TIMEOUT,
            "the backend",
            Some(limit),
        );
        pool.set_read_ahead(read_ahead(64 * 1024));
        let authority = Authority::try_from(addr.to_string())
            .unwrap_or_else(|_| Authority::from_static("127.0.0.1"));
        Backend {
            pool,
            h2c,
            host: HeaderValue::from_str(authority.as_str())
                .unwrap_or(HeaderValue::from_static("localhost")),
            addr,
            response_timeout,
            log: LogLimit::new(),
            hop: addr.to_string().into(),
            allowed_upgrades: AllowedUpgrades::default(),
            max_head_bytes: 64 * 1024,
        }
    }

    /// Carries upgrades to `allowed` protocols only (`allowed_upgrades`); WebSocket without this.
    pub(crate) fn allowing_upgrades(mut self, allowed: AllowedUpgrades) -> Self {
        self.allowed_upgrades = allowed;
        self
    }

    /// Passes on response heads up to `max_header_bytes` (64 KiB without this), as the listener
    /// takes request heads; a larger one fails its request with `502 backend-head-too-large`.
    pub(crate) fn limiting_response_heads(mut self, max_header_bytes: usize) -> Self {
        self.max_head_bytes = max_header_bytes;
        self.pool.set_read_ahead(read_ahead(max_header_bytes));
        self
    }

    /// Whether to log this failure now (see [`LogLimit`]); the metrics count every one regardless.
    fn admit(&self, message: &'static str, cause: Cause) -> bool {
        self.log.admit(&Repeat {
            message,
            hop: self.hop.clone(),
            cause,
        })
    }

    /// Forwards `req` and returns the backend's response, or an error response naming this hop, with
    /// who made the status (`backend` or `sidecar`).
    pub(crate) async fn forward(
        &self,
        mut req: Request<Incoming>,
        peer: &Peer,
    ) -> (Response<ResponseBody>, MadeBy) {
        // A request straight from a mesh client (not through the client sidecar) meets these here.
        let upgrade = match conformance::admit(&req, &self.allowed_upgrades) {
            Ok(upgrade) => upgrade,
            Err(refusal) => return (refusal.response(HOP).map(Either::Left), MadeBy::Sidecar),
        };
        let downstream = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();

        // Traefik routes on Host, and HTTP/1.1 requires it. HTTP/2 carries it in :authority (unless
        // that is only the client sidecar's pool key); an HTTP/1.0 request may carry none at all, and
        // then gets the backend's address, as nginx's proxy_pass does.
        if !parts.headers.contains_key(HOST) {
            let host = match parts.uri.authority() {
                Some(a) if a.as_str() != MESH_POOL_AUTHORITY => {
                    HeaderValue::from_str(a.as_str()).ok()
                }
                _ => None,
            };
            parts
                .headers
                .insert(HOST, host.unwrap_or_else(|| self.host.clone()));
        }
        remove_hop_by_hop_request(&mut parts.headers);
        join_cookies(&mut parts.headers);
        if let Some(protocol) = upgrade {
            restore_upgrade(&mut parts.headers, protocol);
        }
        // Every identity header the client sent goes, whichever are configured, and every lookalike
        // with underscores: a forged identity never reaches Traefik.
        remove_identity_headers(&mut parts.headers);
        if let Some(xfcc) = &peer.id.xfcc {
            parts.headers.insert(XFCC, xfcc.clone());
        }
        if let Some(leaf) = &peer.id.client_cert {
            parts.headers.insert(CLIENT_CERT, leaf.clone());
        }
        if let Some(chain) = &peer.client_cert_chain {
            parts.headers.insert(CLIENT_CERT_CHAIN, chain.clone());
        }
        append_forwarded_for(&mut parts.headers, &peer.forwarded_for);

        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // Over h2c the host travels as :authority (RFC 9113 section 8.3.1), which Traefik routes on
        // as it does on Host; a Host that is no valid authority (only an empty one gets this far:
        // `admit` refuses the others) goes over HTTP/1.1 untouched.
        let h2c = match (&self.h2c, &downstream) {
            (Some(h2c), None) => parts
                .headers
                .get(HOST)
                .filter(|h| !h.as_bytes().contains(&b'@'))
                .and_then(|h| Authority::try_from(h.as_bytes()).ok())
                .map(|authority| (h2c, authority)),
            _ => None,
        };
        let method = parts.method.clone();
        let (over_h2c, sent) = match h2c {
            Some((h2c, authority)) => {
                parts.headers.remove(HOST);
                let mut uri = http::uri::Parts::default();
                uri.scheme = Some(http::uri::Scheme::HTTP);
                uri.authority = Some(authority);
                uri.path_and_query = Some(path);
                parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
                parts.version = Version::HTTP_2;
                let request = Request::from_parts(parts, Either::Left(body));
                let sent = tokio::time::timeout(self.response_timeout, h2c.send(request)).await;
                let sent = sent.map(|sent| match sent {
                    Ok(Sent::Response(response)) => Ok(response.map(Either::Right)),
                    // The TCP dialer speaks h2c with prior knowledge: never handed back.
                    Ok(Sent::NotHttp2(_)) => {
                        Err(BackendError::H2(h2::Reason::HTTP_1_1_REQUIRED.into()))
                    }
                    Err(error) => Err(BackendError::from_h2c(error, method.clone())),
                });
                (true, sent)
            }
            None => {
                // Origin form, as HTTP/1.1 sends it to an origin server (RFC 9112 section 3.2.1).
                parts.uri = path.into();
                parts.version = Version::HTTP_11;
                let request = Request::from_parts(parts, Either::Left(body));
                let sent =
                    tokio::time::timeout(self.response_timeout, self.pool.send(request)).await;
                (
                    false,
                    sent.map(|r| {
                        r.map(|r| r.map(|b| Either::Left(Either::Left(b))))
                            .map_err(BackendError::from_pool)
                    }),
                )
            }
        };
        // The sender's request body broke (a malformed chunk, an upload cut off), not the backend:
        // the sender's error, answered here where it was read.
        if let Ok(Err(error)) = &sent {
            if let Some(cause) = request_body_failure(error) {
                let refused = Refusal::unreadable_body(&cause).response(HOP);
                return (refused.map(Either::Left), MadeBy::Sidecar);
            }
        }
        let failed = match sent {
            Ok(Ok(mut response)) => {
                if let (Some(downstream), StatusCode::SWITCHING_PROTOCOLS) =
                    (downstream, response.status())
                {
                    let cut_off = peer.conn.clone().retired();
                    splice(downstream, hyper::upgrade::on(&mut response), async move {
                        cut_off.await.as_str()
                    });
                    return (response, MadeBy::Backend);
                }
                if let Some(refused) = self.head_too_large(response.headers()) {
                    return (refused.map(Either::Left), MadeBy::Sidecar);
                }
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                return (Response::from_parts(parts, body), MadeBy::Backend);
            }
            Ok(Err(error @ BackendError::ConnectionLimit(..))) => self.connection_limit(&error),
            Ok(Err(error)) => {
                let cause = root_cause(&error);
                if matches!(error, BackendError::Connect(_)) {
                    let message = "backend unreachable";
                    if self.admit(message, error.cause_kind()) {
                        info!(backend = %self.addr, %cause, "{message}");
                    }
                    mesh_error(
                        StatusCode::BAD_GATEWAY,
                        "backend-unreachable",
                        format!("phoenix-mesh listener: backend {} unreachable: {cause} (is Traefik listening there?)", self.addr),
                    )
                } else {
                    let message = "backend request failed";
                    if self.admit(message, error.cause_kind()) {
                        info!(backend = %self.addr, %method, %cause, over_h2c, "{message}");
                    }
                    // A backend that does not speak h2c answers the preface with an HTTP/1.1 error or
                    // closes, which reads as a framing error: say which protocol was tried.
                    let turned_away = matches!(
                        error,
                        BackendError::TurnedAway(..) | BackendError::TurnedAwayAgain(..)
                    );
                    let over = if over_h2c && !turned_away {
                        " over HTTP/2 cleartext (backend_http2 = true; does it accept h2c?)"
                    } else {
                        ""
                    };
                    mesh_error(
                        StatusCode::BAD_GATEWAY,
                        "backend-error",
                        format!(
                            "phoenix-mesh listener: backend {} failed the request{over}: {cause}",
                            self.addr
                        ),
                    )
                }
            }
            Err(_) => {
                let message = "backend too slow";
                if self.admit(message, Cause::Code("backend-timeout")) {
                    info!(backend = %self.addr, %method, timeout_ms = self.response_timeout.as_millis() as u64, "{message}");
                }
                mesh_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "backend-timeout",
                    format!(
                        "phoenix-mesh listener: backend {} did not answer within {:?} (backend_timeout)",
                        self.addr, self.response_timeout
                    ),
                )
            }
        };
        (failed.map(Either::Left), MadeBy::Sidecar)
    }
}

impl Backend {
    /// The answer when every connection `max_backend_connections` allows stayed busy.
    fn connection_limit(&self, error: &BackendError) -> Response<phoenix_mesh_common::ProxyBody> {
        let message = "backend connection limit reached";
        if self.admit(message, error.cause_kind()) {
            info!(backend = %self.addr, %error, "{message}");
        }
        mesh_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "backend-connection-limit",
            format!("phoenix-mesh listener: backend {}: {error}; raise max_backend_connections if the backend is merely busy", self.addr),
        )
    }

    /// The answer instead of a response whose head is larger than the listener passes on: over the
    /// mesh link a head is one HTTP/2 header list, and one the client could not take would fail
    /// every request on the shared connection, not just this one.
    fn head_too_large(
        &self,
        headers: &http::HeaderMap,
    ) -> Option<Response<phoenix_mesh_common::ProxyBody>> {
        let size = header_list_size(headers);
        if size <= self.max_head_bytes {
            return None;
        }
        let message = "backend response head too large";
        if self.admit(message, Cause::Code("backend-head-too-large")) {
            info!(backend = %self.addr, size, max_header_bytes = self.max_head_bytes, "{message}");
        }
        Some(mesh_error(
            StatusCode::BAD_GATEWAY,
            "backend-head-too-large",
            format!(
                "{HOP}: backend {} answered with a response head of {size} bytes (as HTTP/2 counts \
                 it: each header's name and value plus 32), more than max_header_bytes ({})",
                self.addr, self.max_head_bytes
            ),
        ))
    }
}

/// How far a backend connection reads ahead for a response head limit of `max_head_bytes`: twice
/// it, so a head somewhat over the limit is still read whole and refused by name
/// (`backend-head-too-large`) rather than failing as unreadable, while an idle connection keeps a
/// read buffer of that size at most instead of hyper's 400 KiB.
fn read_ahead(max_head_bytes: usize) -> usize {
    max_head_bytes.saturating_mul(2)
}

/// The innermost error's message, which is the one that says what actually happened.
fn root_cause(error: &(dyn StdError + 'static)) -> String {
    let mut current: &(dyn StdError + 'static) = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
