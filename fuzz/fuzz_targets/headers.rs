//! The header rules of one proxy hop on an arbitrary header map: after `remove_hop_by_hop` no
//! hop-by-hop header (fixed list, or named by `Connection`) survives and every other header is kept
//! untouched; after `append_forwarded_for` there is exactly one X-Forwarded-For and it ends with the
//! peer's address, after the earlier values in order.
#![no_main]

use std::net::IpAddr;

use arbitrary::Arbitrary;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use phoenix_mesh_common::headers::{append_forwarded_for, forwarded_for_value, remove_hop_by_hop};

/// Names the fuzzer can pick by index, so the interesting ones come up often.
const KNOWN: [&str; 14] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "x-forwarded-for",
    "host",
    "x-secret",
    "content-length",
    "x-forwarded-client-cert",
];
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

#[derive(Debug, Arbitrary)]
enum Name {
    Known(u8),
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    headers: Vec<(Name, Vec<u8>)>,
    peer: IpAddr,
}

fuzz_target!(|input: Input| {
    let mut headers = HeaderMap::new();
    for (name, value) in input.headers.iter().take(32) {
        let name = match name {
            Name::Known(i) => HeaderName::from_static(KNOWN[usize::from(*i) % KNOWN.len()]),
            Name::Raw(raw) => match HeaderName::from_bytes(raw) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        // from_bytes is what hyper's parser admits: visible ASCII, tab, and obs-text (0x80-0xff).
        if let Ok(v) = HeaderValue::from_bytes(value) {
            headers.append(name, v);
        }
    }
    let original = headers.clone();

    // What Connection names, read from the raw bytes as a recipient must (RFC 9110 7.6.1).
    let named: Vec<HeaderName> = original
        .get_all("connection")
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .collect();

    remove_hop_by_hop(&mut headers);
    for h in HOP_BY_HOP {
        assert!(!headers.contains_key(h), "{h} survived: {headers:?}");
    }
    for n in &named {
        assert!(
            !headers.contains_key(n),
            "{n} (named by Connection) survived: {original:?}"
        );
    }
    for name in original.keys() {
        if HOP_BY_HOP.contains(&name.as_str()) || named.contains(name) {
            continue;
        }
        let before: Vec<_> = original.get_all(name).iter().collect();
        let after: Vec<_> = headers.get_all(name).iter().collect();
        assert_eq!(before, after, "end-to-end header {name} changed");
    }
    assert!(
        headers.keys().all(|k| original.contains_key(k)),
        "a header appeared"
    );

    let prior: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    append_forwarded_for(&mut headers, &forwarded_for_value(input.peer));
    let xff: Vec<_> = headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff.len(), 1, "{xff:?}");
    let xff = xff[0].to_str().expect("X-Forwarded-For is visible ASCII");
    let peer = input.peer.to_string();
    assert!(xff.ends_with(&peer), "{xff:?} does not end with {peer}");
    // Compare as lists: empty elements carry no address, so folding may drop them.
    let list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut expected: Vec<String> = prior.iter().flat_map(|p| list(p)).collect();
    expected.push(peer);
    assert_eq!(
        list(xff),
        expected,
        "prior values lost or reordered in {xff:?}"
    );
});
