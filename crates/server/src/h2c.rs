//! The listener's policy for its shared HTTP/2 cleartext (h2c, prior knowledge) connection to the
//! backend (`backend_http2 = true`); the connection itself is
//! [`phoenix_mesh_transport::h2::shared`]'s.
//!
//! Over HTTP/1.1 each request costs the listener a write and a read of its own on a connection of
//! its own; on one HTTP/2 connection the requests that arrive together on the mesh link leave in one
//! write and their responses come back in one read. Traefik's entrypoints accept h2c with prior
//! knowledge. Requests that upgrade (WebSocket) still go over HTTP/1.1 ([`phoenix_mesh_transport::pool`]).
//!
//! A request the backend turned away unprocessed (its stream refused, or above the last stream a
//! GOAWAY let through, as nginx's does after `keepalive_requests` and Traefik's on shutdown) goes once
//! more, after a GOAWAY on a fresh connection, if it is idempotent and has no body: the rule the
//! client's mesh link follows too ([`idempotent_without_body`], which says why).

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use phoenix_mesh_transport::body::ProxyBody;
use phoenix_mesh_transport::dial::{Protocol, Retire, TcpDial};
use phoenix_mesh_transport::h2::shared::{idempotent_without_body, Policy, SharedConnection};

/// The shared h2c connection to the backend.
pub(crate) type H2cBackend = SharedConnection<TcpDial, H2cPolicy>;

/// A shared h2c connection through `dial` (whose protocol this sets), closed once unused for
/// `idle_timeout`.
pub(crate) fn h2c_backend(mut dial: TcpDial, idle_timeout: Duration) -> Arc<H2cBackend> {
    dial.protocol = Protocol::Http2;
    SharedConnection::new(dial, H2cPolicy, idle_timeout, "the backend")
}

/// Replays idempotent requests without a body; never retires a connection.
pub(crate) struct H2cPolicy;

impl Retire<()> for H2cPolicy {
    fn retire(&self, _: &()) -> bool {
        false
    }
}

impl Policy<()> for H2cPolicy {
    fn replayable(&self, req: &Request<ProxyBody>) -> bool {
        idempotent_without_body(req)
    }

    /// Never asked: the TCP dialer speaks HTTP/2 with prior knowledge.
    fn declined_http2(&self) -> Duration {
        Duration::ZERO
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;
    use http::Method;
    use http_body_util::{Either, Full};

    use super::*;

    fn request(method: Method, body: &'static [u8]) -> Request<ProxyBody> {
        Request::builder()
            .method(method)
            .uri("http://svc/")
            .body(Either::Right(Full::new(Bytes::from_static(body))))
            .unwrap()
    }

    #[test]
    fn only_idempotent_requests_without_a_body_are_replayed() {
        for (method, body, replayed) in [
            (Method::GET, &b""[..], true),
            (Method::HEAD, &b""[..], true),
            (Method::PUT, &b""[..], true),
            (Method::DELETE, &b""[..], true),
            (Method::GET, &b"body"[..], false),
            (Method::PUT, &b"body"[..], false),
            (Method::POST, &b""[..], false),
            (Method::PATCH, &b""[..], false),
        ] {
            assert_eq!(
                H2cPolicy.replayable(&request(method.clone(), body)),
                replayed,
                "{method} with {} bytes",
                body.len()
            );
        }
    }
}
