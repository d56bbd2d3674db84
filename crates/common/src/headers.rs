//! The header rules of one proxy hop (RFC 9110 section 7.6.1).

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, not the message, and never cross a hop.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including every header the `Connection` header names, plus the
/// non-standard `Keep-Alive` and `Proxy-Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        // Split the raw bytes: one non-ASCII byte in the value must not let the named headers through.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
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

/// Appends `peer` to `X-Forwarded-For`, folding earlier values into one comma-separated header.
pub fn append_forwarded_for(headers: &mut HeaderMap, peer: IpAddr) {
    const XFF: &str = "x-forwarded-for";
    let mut value = String::new();
    for prior in headers.get_all(XFF) {
        if let Ok(s) = prior.to_str() {
            if !value.is_empty() {
                value.push_str(", ");
            }
            value.push_str(s);
        }
    }
    if !value.is_empty() {
        value.push_str(", ");
    }
    value.push_str(&peer.to_string());
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(XFF, v);
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
    fn appends_to_forwarded_for() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        append_forwarded_for(
            &mut h,
            "127.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 198.51.100.1, 127.0.0.1");
    }
}
