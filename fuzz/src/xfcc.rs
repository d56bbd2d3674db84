//! Shared by the identity targets: what must hold for any identity the listener reads from a
//! certificate. The XFCC value is parsed back with Envoy's grammar, written here independently of the
//! code under test, so an escaping mistake shows up as a field that does not round-trip.

use phoenix_mesh_certs::PeerIdentity;

fn header_safe(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

pub fn check_identity(id: &PeerIdentity) {
    let value = id.xfcc();
    let representable = [&id.subject]
        .into_iter()
        .chain(&id.dns)
        .chain(&id.uris)
        .all(|s| header_safe(s));
    // Every identity must travel, whatever its names hold: control characters are escaped as \XX.
    if let Err(e) = http::HeaderValue::from_bytes(value.as_bytes()) {
        panic!("XFCC is not a valid header value ({e}): {value:?} for {id:?}");
    }
    if !representable {
        // \XX escapes of control characters do not round-trip through Envoy's quoted-string
        // grammar by design; the header's validity above is what matters for such names.
        return;
    }

    let fields = parse_element(&value).unwrap_or_else(|e| panic!("{e}: {value:?} for {id:?}"));
    let mut fields = fields.into_iter();
    assert_eq!(
        fields.next(),
        Some(("Hash".into(), id.sha256.clone())),
        "{value:?}"
    );
    assert_eq!(
        fields.next(),
        Some(("Subject".into(), id.subject.clone())),
        "{value:?}"
    );
    let rest: Vec<(String, String)> = fields.collect();
    let dns: Vec<String> = rest
        .iter()
        .filter(|(k, _)| k == "DNS")
        .map(|(_, v)| v.clone())
        .collect();
    let uris: Vec<String> = rest
        .iter()
        .filter(|(k, _)| k == "URI")
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(
        dns.len() + uris.len(),
        rest.len(),
        "unexpected keys in {value:?}"
    );
    assert_eq!(dns, id.dns, "{value:?}");
    assert_eq!(uris, id.uris, "{value:?}");

    // allowed_peers: every DNS SAN, URI SAN and the CN match; nothing matches an empty list; a name
    // differing only in case or by a trailing dot does not match (exact comparison by contract).
    assert!(!id.matches_any(&[]));
    let names: Vec<&String> = id
        .dns
        .iter()
        .chain(&id.uris)
        .chain(&id.common_name)
        .collect();
    for name in &names {
        assert!(
            id.matches_any(&[(*name).clone()]),
            "{name:?} should match {id:?}"
        );
        for variant in [name.to_uppercase(), format!("{name}."), format!(" {name}")] {
            if !names.iter().any(|n| **n == variant) {
                assert!(
                    !id.matches_any(&[variant.clone()]),
                    "{variant:?} matched {id:?}"
                );
            }
        }
    }
    for ip in &id.ips {
        if !names.iter().any(|n| *n == ip) {
            assert!(!id.matches_any(&[ip.clone()]), "IP SAN {ip} matched {id:?}");
        }
    }
}

/// Parses one XFCC element (`k=v;k="quoted \" value";...`). An unquoted `,` would start a second
/// element (a second certificate), so it is an error here.
fn parse_element(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut key = String::new();
        loop {
            match chars.next() {
                Some('=') => break,
                Some(c @ (';' | ',' | '"')) => return Err(format!("{c:?} inside a key")),
                Some(c) => key.push(c),
                None => return Err("key without value".into()),
            }
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => val.push(chars.next().ok_or("dangling backslash")?),
                    Some('"') => break,
                    Some(c) => val.push(c),
                    None => return Err("unterminated quoted value".into()),
                }
            }
            match chars.next() {
                None => {
                    out.push((key, val));
                    return Ok(out);
                }
                Some(';') => {}
                Some(c) => return Err(format!("{c:?} after a quoted value")),
            }
        } else {
            loop {
                match chars.next() {
                    Some(';') => break,
                    Some(c @ (',' | '"' | '=')) => {
                        return Err(format!("unquoted {c:?} in a value"))
                    }
                    Some(c) => val.push(c),
                    None => {
                        out.push((key, val));
                        return Ok(out);
                    }
                }
            }
        }
        out.push((key, val));
    }
}
