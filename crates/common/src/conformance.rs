//! The request rules both sidecars check before forwarding anything (RFC 9110, RFC 9112): a request
//! that breaks one is the sender's error, answered by the first sidecar that sees it with a 4xx of
//! its own, and never passed on for a later hop or the backend to read differently.
//!
//! - CONNECT asks for a tunnel, which the mesh does not carry: `405 method-not-allowed`.
//! - The asterisk-form target `*` is for OPTIONS only (RFC 9112 section 3.2.4): `400 bad-request`.
//! - Host: present on HTTP/1.1, one line, a valid `host[:port]` (RFC 9112 section 3.2):
//!   `400 bad-request`.
//! - An upgrade to a protocol `allowed_upgrades` does not list: `403 upgrade-not-allowed`.
//! - A request body that cannot be read (a bad chunk size, a cut-off upload): `400 bad-request`.

use http::{Method, Request, Response, StatusCode};

use crate::headers::{check_host, requested_upgrade, AllowedUpgrades};
use crate::response::{mesh_error, ProxyBody};

/// Why a sidecar answers a request itself instead of forwarding it.
#[derive(Debug)]
pub struct Refusal {
    /// The status of the answer.
    pub status: StatusCode,
    /// Its `phoenix-mesh-error` code.
    pub code: &'static str,
    /// What was wrong with the request.
    pub reason: String,
}

impl Refusal {
    /// The answer, its body naming the hop (`phoenix-mesh client`, `phoenix-mesh listener`).
    pub fn response(&self, hop: &str) -> Response<ProxyBody> {
        mesh_error(self.status, self.code, format!("{hop}: {}", self.reason))
    }

    /// The answer to a request whose body from the sender failed to read, for `cause` (from
    /// `phoenix_mesh_transport::body::request_body_failure`).
    pub fn unreadable_body(cause: &str) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            code: "bad-request",
            reason: format!("the request body could not be read: {cause}"),
        }
    }
}

/// Checks `req` against the rules in the module doc; `Ok` with the upgrade it may carry on (the
/// offered protocols `allowed` lets pass), if it asks for one.
pub fn admit<B>(
    req: &Request<B>,
    allowed: &AllowedUpgrades,
) -> Result<Option<http::HeaderValue>, Refusal> {
    let bad_request = |reason: String| Refusal {
        status: StatusCode::BAD_REQUEST,
        code: "bad-request",
        reason,
    };
    if req.method() == Method::CONNECT {
        return Err(Refusal {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "method-not-allowed",
            reason: "CONNECT asks for a tunnel, which the mesh does not carry".into(),
        });
    }
    if req.uri().path() == "*" && req.method() != Method::OPTIONS {
        return Err(bad_request(format!(
            "the target `*` is for OPTIONS only (RFC 9112 section 3.2.4), not {}",
            req.method()
        )));
    }
    if let Err(error) = check_host(req.version(), req.headers()) {
        return Err(bad_request(format!("{error} (RFC 9112 section 3.2)")));
    }
    requested_upgrade(req.version(), req.headers(), allowed).map_err(|offered| Refusal {
        status: StatusCode::FORBIDDEN,
        code: "upgrade-not-allowed",
        reason: format!(
            "upgrade to {offered:?} refused: allowed_upgrades lists {:?}",
            allowed.tokens().collect::<Vec<_>>()
        ),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(target);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn refused(req: &Request<()>) -> Option<(u16, &'static str)> {
        admit(req, &AllowedUpgrades::default())
            .err()
            .map(|r| (r.status.as_u16(), r.code))
    }

    #[test]
    fn refuses_what_the_rfcs_refuse() {
        let host = ("host", "a.example");
        for (what, req, expected) in [
            (
                "CONNECT",
                request("CONNECT", "a.example:443", &[host]),
                Some((405, "method-not-allowed")),
            ),
            (
                "GET *",
                request("GET", "*", &[host]),
                Some((400, "bad-request")),
            ),
            ("OPTIONS *", request("OPTIONS", "*", &[host]), None),
            (
                "no Host",
                request("GET", "/", &[]),
                Some((400, "bad-request")),
            ),
            (
                "two Hosts",
                request("GET", "/", &[host, ("host", "b.example")]),
                Some((400, "bad-request")),
            ),
            (
                "Host with a space",
                request("GET", "/", &[("host", "a.example x")]),
                Some((400, "bad-request")),
            ),
            (
                "Host with userinfo",
                request("GET", "/", &[("host", "user@a.example")]),
                Some((400, "bad-request")),
            ),
            (
                "Host with a bad port",
                request("GET", "/", &[("host", "a.example:http")]),
                Some((400, "bad-request")),
            ),
            (
                "Host with a port",
                request("GET", "/", &[("host", "a.example:8080")]),
                None,
            ),
            (
                "IPv6 Host",
                request("GET", "/", &[("host", "[::1]:8080")]),
                None,
            ),
            ("empty Host", request("GET", "/", &[("host", "")]), None),
            (
                "h2c upgrade",
                request(
                    "GET",
                    "/",
                    &[host, ("connection", "Upgrade"), ("upgrade", "h2c")],
                ),
                Some((403, "upgrade-not-allowed")),
            ),
            (
                "WebSocket upgrade",
                request(
                    "GET",
                    "/",
                    &[host, ("connection", "upgrade"), ("upgrade", "WebSocket")],
                ),
                None,
            ),
            (
                "Upgrade not named in Connection",
                request("GET", "/", &[host, ("upgrade", "h2c")]),
                None,
            ),
        ] {
            assert_eq!(refused(&req), expected, "{what}");
        }
    }

    #[test]
    fn http1_0_and_http2_may_come_without_host() {
        for version in [http::Version::HTTP_10, http::Version::HTTP_2] {
            let mut req = request("GET", "/", &[]);
            *req.version_mut() = version;
            assert_eq!(refused(&req), None, "{version:?}");
        }
    }

    #[test]
    fn an_upgrade_carries_only_the_allowed_protocols_offered() {
        let req = request(
            "GET",
            "/",
            &[
                ("host", "a.example"),
                ("connection", "upgrade"),
                ("upgrade", "h2c, websocket/13, anything/1.0"),
            ],
        );
        let upgrade = admit(&req, &AllowedUpgrades::default()).unwrap();
        assert_eq!(upgrade.unwrap(), "websocket/13");
        let allowed = AllowedUpgrades::new(["WEBSOCKET", "anything/1.0"]);
        let upgrade = admit(&req, &allowed).unwrap();
        assert_eq!(upgrade.unwrap(), "websocket/13, anything/1.0");
        let only_version_2 = AllowedUpgrades::new(["anything/2.0"]);
        let refusal = admit(&req, &only_version_2).unwrap_err();
        assert_eq!(refusal.code, "upgrade-not-allowed");
        assert!(refusal.reason.contains("h2c"), "{}", refusal.reason);
    }
}
