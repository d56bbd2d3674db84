//! The *identity headers* the listener gives the backend: who called, from the certificate it
//! verified. `X-Forwarded-Client-Cert` (Envoy's format) and RFC 9440's `Client-Cert` (the leaf) and
//! `Client-Cert-Chain` (the intermediates), each certificate a structured-field byte sequence of its
//! DER (`:<base64>:`). `identity_headers` chooses which are sent; every one of them arriving from
//! the caller is removed whatever the choice ([`phoenix_mesh_common::headers::IDENTITY_HEADERS`]).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::HeaderValue;
use rustls::pki_types::CertificateDer;

/// Which identity headers go to the backend (`identity_headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityHeaders {
    /// `X-Forwarded-Client-Cert`.
    pub xfcc: bool,
    /// RFC 9440 `Client-Cert` and `Client-Cert-Chain`.
    pub client_cert: bool,
}

impl Default for IdentityHeaders {
    /// `["xfcc"]`.
    fn default() -> Self {
        IdentityHeaders {
            xfcc: true,
            client_cert: false,
        }
    }
}

/// The values `identity_headers` takes.
pub const IDENTITY_HEADER_CHOICES: [&str; 2] = ["xfcc", "client-cert"];

impl IdentityHeaders {
    /// From the config's list; an unknown entry is returned as the error.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, &'a str> {
        let mut chosen = IdentityHeaders {
            xfcc: false,
            client_cert: false,
        };
        for name in names {
            match name {
                "xfcc" => chosen.xfcc = true,
                "client-cert" => chosen.client_cert = true,
                unknown => return Err(unknown),
            }
        }
        Ok(chosen)
    }

    /// As the config writes it, for messages.
    pub fn names(self) -> Vec<&'static str> {
        [(self.xfcc, "xfcc"), (self.client_cert, "client-cert")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect()
    }
}

/// `Client-Cert`: the leaf, `:<base64 DER>:`.
pub(crate) fn client_cert(leaf: &[u8]) -> Option<HeaderValue> {
    let mut value = String::with_capacity(leaf.len() * 4 / 3 + 8);
    push_byte_sequence(&mut value, leaf);
    HeaderValue::from_str(&value).ok()
}

/// `Client-Cert-Chain`: the certificates the client sent after its leaf, less any self-issued one
/// (a root sent along is a trust anchor, not part of the chain RFC 9440 asks for), as a list of
/// byte sequences; `None` when that leaves none, and the header is then left out.
pub(crate) fn client_cert_chain(sent: &[CertificateDer<'_>]) -> Option<HeaderValue> {
    let mut value = String::new();
    for der in sent
        .iter()
        .skip(1)
        .filter(|der| !phoenix_mesh_certs::is_self_issued(der))
    {
        if !value.is_empty() {
            value.push_str(", ");
        }
        push_byte_sequence(&mut value, der);
    }
    if value.is_empty() {
        return None;
    }
    HeaderValue::from_str(&value).ok()
}

/// An RFC 8941 byte sequence: standard base64 with padding, between colons.
fn push_byte_sequence(out: &mut String, bytes: &[u8]) {
    out.push(':');
    STANDARD.encode_string(bytes, out);
    out.push(':');
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_reads_as_written_and_refuses_anything_else() {
        assert_eq!(
            IdentityHeaders::from_names(["client-cert"]),
            Ok(IdentityHeaders {
                xfcc: false,
                client_cert: true
            })
        );
        let both = IdentityHeaders::from_names(["xfcc", "client-cert"]).unwrap();
        assert_eq!(both.names(), ["xfcc", "client-cert"]);
        assert_eq!(IdentityHeaders::default().names(), ["xfcc"]);
        assert_eq!(
            IdentityHeaders::from_names([]).unwrap().names(),
            Vec::<&str>::new()
        );
        assert_eq!(
            IdentityHeaders::from_names(["Client-Cert"]),
            Err("Client-Cert")
        );
    }

    #[test]
    fn a_byte_sequence_is_padded_base64_between_colons() {
        assert_eq!(client_cert(b"\x30\x82\x01").unwrap(), ":MIIB:");
        assert_eq!(client_cert(b"\x30\x82").unwrap(), ":MII=:");
    }
}
