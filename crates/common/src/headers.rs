//! The header rules of one proxy hop (RFC 9110 section 7.6.1).

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

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

/// Removes every identity header ([`IDENTITY_HEADERS`]), however many lines of each there are.
pub fn remove_identity_headers(headers: &mut HeaderMap) {
    for name in &IDENTITY_HEADERS {
        headers.remove(name);
    }
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
            .filter(|name| !HOP_BY_HOP.contains(name))
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

/// The protocol an HTTP/1.1 request asks to switch to (`Upgrade: websocket` with `upgrade` named in
/// `Connection`), if any.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
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
