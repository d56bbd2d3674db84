//! The header rules of one proxy hop (RFC 9110 section 7.6.1), and the header checks a request
//! passes before it is forwarded (Host, upgrades).

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::Version;

/// Headers that describe one connection, not the message, and never cross a hop: RFC 9110's, plus
/// the non-standard `Keep-Alive` and `Proxy-Connection`.
const HOP_BY_HOP: [HeaderName; 9] = [
    // First: `remove_hop_by_hop` reads bit 0 as "Connection is present".
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// `X-Forwarded-For`.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// `X-Forwarded-Client-Cert` (XFCC): the caller's verified identity, in Envoy's format.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// RFC 9440 `Client-Cert`: the caller's verified certificate, DER as a structured-field byte sequence.
pub const CLIENT_CERT: HeaderName = HeaderName::from_static("client-cert");
/// RFC 9440 `Client-Cert-Chain`: the intermediate certificates the caller's chain was verified with.
pub const CLIENT_CERT_CHAIN: HeaderName = HeaderName::from_static("client-cert-chain");

/// Every header that tells the backend who called: only the mesh listener sets them, from the
/// certificate it verified, so a copy from anyone else is removed on the way in, whichever of them
/// the listener is configured to send.
pub const IDENTITY_HEADERS: [HeaderName; 3] = [XFCC, CLIENT_CERT, CLIENT_CERT_CHAIN];

/// Removes every identity header ([`IDENTITY_HEADERS`]), however many lines of each there are, and
/// every lookalike of one (see [`remove_identity_lookalikes`]).
pub fn remove_identity_headers(headers: &mut HeaderMap) {
    for name in &IDENTITY_HEADERS {
        headers.remove(name);
    }
    remove_identity_lookalikes(headers, &IDENTITY_HEADERS);
}

/// Removes hop-by-hop headers, including every header the `Connection` header names, plus the
/// non-standard `Keep-Alive` and `Proxy-Connection`.
///
/// Runs on every request and response: one pass over the names present (a handful) finds which of
/// the nine are there, instead of nine hashed removals of names that are mostly absent.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers, false);
}

/// [`remove_hop_by_hop`] for a request, keeping `TE: trailers` when the request's TE lists
/// `trailers`: the one TE value HTTP/2 allows (RFC 9113 section 8.2.2), which says the client takes
/// trailers, and which gRPC clients send and some gRPC servers require. Go's reverse proxy, and so
/// Traefik, passes it on the same way; any other TE value is dropped.
pub fn remove_hop_by_hop_request(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers, true);
}

/// Bit of `TE` in the presence mask of [`strip_hop_by_hop`] (its index in [`HOP_BY_HOP`]).
const TE_BIT: u16 = 1 << 3;

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    let te_trailers = keep_te_trailers
        && present & TE_BIT != 0
        && headers
            .get_all(header::TE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .any(|coding| {
                // A coding may carry parameters (`trailers` takes none, but `;q=` is allowed).
                let name = coding.split(|b| *b == b';').next().unwrap_or_default();
                name.trim_ascii().eq_ignore_ascii_case(b"trailers")
            });
    if present & 1 != 0 {
        // Connection (HOP_BY_HOP[0]) names more headers to drop.
        // Split the raw bytes: one non-ASCII byte in the value must not let the named headers through.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
            .filter(connection_may_remove)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether a `Connection` header may remove header `name`. Never Host: it names the request's
/// target (RFC 9110 section 7.2), not the connection, and a backend that lost it would get a
/// stand-in (`Connection: keep-alive, Host` must not reroute a request). The hop-by-hop headers go
/// anyway.
fn connection_may_remove(name: &HeaderName) -> bool {
    name != header::HOST && !HOP_BY_HOP.contains(name)
}

/// Why a request's Host cannot be forwarded: RFC 9112 section 3.2 asks for `400 Bad Request`.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// An HTTP/1.1 request without a Host header.
    #[error("an HTTP/1.1 request must carry a Host header")]
    Missing,
    /// More than one Host line.
    #[error("{0} Host header lines; a request carries one")]
    Repeated(usize),
    /// A Host that is not `host[:port]`.
    #[error("Host {0:?} is not a valid host[:port]")]
    Invalid(String),
}

/// Checks a request's Host (RFC 9112 section 3.2): one line at most, a valid `host[:port]` (or
/// empty, for a target without an authority), and present on HTTP/1.1. HTTP/1.0 may lack it; HTTP/2
/// carries the host in `:authority` instead.
pub fn check_host(version: Version, headers: &HeaderMap) -> Result<(), HostError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return if version == Version::HTTP_11 {
            Err(HostError::Missing)
        } else {
            Ok(())
        };
    };
    let more = hosts.count();
    if more > 0 {
        return Err(HostError::Repeated(more + 1));
    }
    let bytes = host.as_bytes();
    // Authority admits userinfo (`user@host`), which Host does not.
    let valid = bytes.is_empty()
        || (!bytes.contains(&b'@')
            && Authority::try_from(bytes).is_ok_and(|a| port_is_digits(a.as_str())));
    if valid {
        Ok(())
    } else {
        let shown: String = String::from_utf8_lossy(bytes).chars().take(100).collect();
        Err(HostError::Invalid(shown))
    }
}

/// Whether the port of `authority`, if it has one, is a number (`Authority` leaves it unchecked).
fn port_is_digits(authority: &str) -> bool {
    let after_host = authority
        .rfind(']')
        .map_or(authority, |end| &authority[end + 1..]);
    match after_host.rsplit_once(':') {
        None => true,
        Some((_, port)) => port.is_empty() || port.parse::<u16>().is_ok(),
    }
}

/// The upgrade protocols a sidecar carries through (`allowed_upgrades`), lowercase. An entry
/// without a version (`websocket`) allows the protocol at any version (`websocket/13`); one with
/// a version allows that version only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedUpgrades(Arc<[Box<str>]>);

impl AllowedUpgrades {
    /// The protocols `tokens` name, compared without regard to case.
    pub fn new<S: AsRef<str>>(tokens: impl IntoIterator<Item = S>) -> Self {
        AllowedUpgrades(
            tokens
                .into_iter()
                .map(|t| t.as_ref().trim().to_ascii_lowercase().into_boxed_str())
                .collect(),
        )
    }

    /// The entries, lowercase.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|t| &**t)
    }

    /// Whether `protocol` (`name` or `name/version`, as offered in `Upgrade`) may pass.
    pub fn allows(&self, protocol: &str) -> bool {
        let name = protocol.split('/').next().unwrap_or_default();
        self.0
            .iter()
            .any(|t| t.eq_ignore_ascii_case(protocol) || t.eq_ignore_ascii_case(name))
    }
}

impl Default for AllowedUpgrades {
    /// WebSocket only.
    fn default() -> Self {
        AllowedUpgrades::new(["websocket"])
    }
}

/// What an HTTP/1.1 request asks to switch to (`Upgrade` with `upgrade` named in `Connection`):
/// `Ok(None)` when nothing, `Ok(Some(protocols))` with the offered protocols `allowed` lets pass
/// (the others are dropped from the offer), or `Err(offered)` when it lets none pass.
pub fn requested_upgrade(
    version: Version,
    headers: &HeaderMap,
    allowed: &AllowedUpgrades,
) -> Result<Option<HeaderValue>, String> {
    if version != Version::HTTP_11 {
        return Ok(None);
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    if !asks || !headers.contains_key(header::UPGRADE) {
        return Ok(None);
    }
    let offered: Vec<String> = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|p| String::from_utf8_lossy(p.trim_ascii()).into_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let passing: Vec<&str> = offered
        .iter()
        .filter(|p| allowed.allows(p))
        .map(String::as_str)
        .collect();
    if passing.is_empty() {
        return Err(offered.join(", "));
    }
    HeaderValue::from_str(&passing.join(", "))
        .map(Some)
        .map_err(|_| offered.join(", "))
}

/// The HTTP/2 size of a header list (RFC 9113 section 6.5.2: each field's name and value plus 32
/// bytes), the measure `SETTINGS_MAX_HEADER_LIST_SIZE` limits; `:status` included.
pub fn header_list_size(headers: &HeaderMap) -> usize {
    const STATUS: usize = ":status".len() + 3 + 32;
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum::<usize>()
        + STATUS
}

/// Joins several `Cookie` lines into one, separated by `"; "`: HTTP/2 may split cookies into
/// crumbs, one field each, which must be joined before they travel over HTTP/1.1 (RFC 9113 section
/// 8.2.3), where a second `Cookie` line is not allowed (RFC 6265 section 5.4).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined = Vec::with_capacity(256);
    for crumb in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(header::COOKIE, value);
    }
}

/// Removes every header whose name is one of `identity` once `_` is read as `-`
/// (`X_Forwarded_Client_Cert`): CGI-style backends (PHP, Django, Rack) read both spellings as the
/// same variable, so a lookalike sent by the caller could pass for the identity the listener vouches
/// for. The real names are not touched here.
pub fn remove_identity_lookalikes(headers: &mut HeaderMap, identity: &[HeaderName]) {
    let lookalikes: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .filter(|name| identity.iter().any(|id| same_but_underscores(name, id)))
        .cloned()
        .collect();
    for name in lookalikes {
        headers.remove(name);
    }
}

/// Whether `name` reads as `identity` with each `_` taken for `-` (names are lowercase already).
fn same_but_underscores(name: &HeaderName, identity: &HeaderName) -> bool {
    let (a, b) = (name.as_str().as_bytes(), identity.as_str().as_bytes());
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x == y || (*x == b'_' && *y == b'-'))
}

/// Puts an upgrade back after [`remove_hop_by_hop`]: the one hop-by-hop exchange a proxy must pass on.
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// The request target for the next hop: same path and query (`/` when there is none), the given
/// scheme and authority (the pool key of the next hop's client).
pub fn retarget(
    uri: http::Uri,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
) -> Result<http::Uri, http::uri::InvalidUriParts> {
    let mut parts = uri.into_parts();
    parts.scheme = Some(scheme);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    http::Uri::from_parts(parts)
}

/// A peer address as an `X-Forwarded-For` element, made once per connection.
pub fn forwarded_for_value(peer: IpAddr) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(peer.to_string()))
        .unwrap_or(HeaderValue::from_static("unknown"))
}

/// Appends `peer` (from [`forwarded_for_value`]) to `X-Forwarded-For`, folding earlier values into one
/// comma-separated header.
pub fn append_forwarded_for(headers: &mut HeaderMap, peer: &HeaderValue) {
    let mut prior = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter(|v| v.to_str().is_ok())
        .peekable();
    if prior.peek().is_none() {
        headers.insert(X_FORWARDED_FOR, peer.clone());
        return;
    }
    let mut value = Vec::with_capacity(64);
    for v in prior {
        value.extend_from_slice(v.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(peer.as_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(h.contains_key(header::HOST));
        assert!(h.contains_key("x-forwarded-proto"));
    }

    #[test]
    fn a_request_keeps_te_trailers_and_nothing_else_of_te() {
        for (te, kept) in [
            ("trailers", true),
            ("gzip, Trailers", true),
            ("trailers;q=1", true),
            ("gzip", false),
            ("trailersx", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::TE, HeaderValue::from_static(te));
            // An HTTP/1.1 client names TE in Connection, as RFC 9110 asks.
            h.insert(header::CONNECTION, HeaderValue::from_static("te"));
            remove_hop_by_hop_request(&mut h);
            let expected = kept.then(|| HeaderValue::from_static("trailers"));
            assert_eq!(h.get(header::TE), expected.as_ref(), "TE: {te}");
            assert_eq!(h.len(), usize::from(kept), "TE: {te}: {h:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        remove_hop_by_hop(&mut h);
        assert!(h.is_empty(), "a response kept TE: {h:?}");
    }

    #[test]
    fn strips_connection_named_headers_despite_non_ascii_bytes() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret, \xd0")
                .unwrap_or(HeaderValue::from_static("x-secret")),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-secret"), "{h:?}");
    }

    #[test]
    fn connection_never_removes_host() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Host, x-secret"),
        );
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        remove_hop_by_hop_request(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[header::HOST], "a.example");
    }

    #[test]
    fn joins_cookie_crumbs_into_one_line() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut h);
        let cookies: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);

        let mut one = HeaderMap::new();
        one.insert(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        let before = one.clone();
        join_cookies(&mut one);
        assert_eq!(one, before);
    }

    #[test]
    fn drops_underscore_lookalikes_of_identity_headers_only() {
        let xfcc = HeaderName::from_static("x-forwarded-client-cert");
        let mut h = HeaderMap::new();
        for name in [
            "x_forwarded_client_cert",
            "x-forwarded_client-cert",
            "x-forwarded-client-cert",
            "x_forwarded_for",
            "x_forwarded_client_certs",
        ] {
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap_or(header::WARNING),
                HeaderValue::from_static("v"),
            );
        }
        remove_identity_lookalikes(&mut h, std::slice::from_ref(&xfcc));
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "x-forwarded-client-cert",
                "x_forwarded_client_certs",
                "x_forwarded_for"
            ]
        );
    }

    #[test]
    fn header_list_size_counts_as_http2_does() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("12345"));
        // ":status" + "200" + 32, then "x-a" + "12345" + 32.
        assert_eq!(header_list_size(&h), 42 + 40);
    }

    #[test]
    fn removes_every_line_of_every_identity_header_and_nothing_else() {
        let mut h = HeaderMap::new();
        for name in &IDENTITY_HEADERS {
            h.append(name, HeaderValue::from_static("forged"));
            h.append(name, HeaderValue::from_static("forged again"));
        }
        h.append("Client-Cert-Chain", HeaderValue::from_static(":AAAA:"));
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        remove_identity_headers(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::HOST));
    }

    #[test]
    fn appends_to_forwarded_for() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        append_forwarded_for(&mut h, &forwarded_for_value(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 198.51.100.1, 127.0.0.1");
    }

    #[test]
    fn strips_each_hop_by_hop_header_on_its_own() {
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("a.example"));
            h.insert(name, HeaderValue::from_static("x"));
            h.insert("x-after", HeaderValue::from_static("1"));
            remove_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name} kept: {h:?}");
            assert_eq!(h.len(), 2, "{name}: {h:?}");
        }
    }

    #[test]
    fn leaves_end_to_end_headers_alone() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.append("x-many", HeaderValue::from_static("1"));
        h.append("x-many", HeaderValue::from_static("2"));
        let before = h.clone();
        remove_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn forwarded_for_starts_with_the_peer_and_skips_unreadable_values() {
        let peer = forwarded_for_value(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 1]));
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h["x-forwarded-for"], "fd00::1");

        let mut h = HeaderMap::new();
        if let Ok(opaque) = HeaderValue::from_bytes(b"\xd0\x90") {
            h.append("x-forwarded-for", opaque);
        }
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, fd00::1");
    }
}
