//! The one place that chooses the crypto provider: aws-lc-rs with rustls' default key-exchange groups
//! (X25519MLKEM768 first, then X25519 and the NIST curves) and its cipher suites, AES-128-GCM first.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The process-wide crypto provider every configuration is built with.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            // AES-128-GCM-SHA256 first: the TLS 1.3 key schedule then runs on SHA-256, which has
            // hardware support here, where SHA-384 (AES-256's suite) is a third of a full
            // handshake's hashing cost; the listener applies this order over the client's.
            provider.cipher_suites.sort_by_key(|suite| {
                suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
            });
            Arc::new(provider)
        })
        .clone()
}

/// A fresh session-ticket encrypter with rotating keys (a new key every 6 hours, the previous one
/// still accepted), as the TLS 1.3 stateless resumption on the listener uses.
pub fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, rustls::Error> {
    rustls::crypto::aws_lc_rs::Ticketer::new()
}

/// SHA-256 of `data`, as lowercase hex (the `Hash=` of `X-Forwarded-Client-Cert`).
pub fn sha256_hex(data: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefers_aes_128_gcm() {
        let first = super::provider().cipher_suites[0].suite();
        assert_eq!(first, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
}
