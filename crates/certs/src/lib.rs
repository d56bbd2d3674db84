//! Certificates and TLS for phoenix-mesh: loading PEM files into rustls types, checking them the way an
//! operator expects at start-up (readable, matching key, in date, chaining to the CA), building the
//! client and server `rustls` configurations and swapping them live on reload, and reading a peer's
//! identity out of its certificate.
//!
//! It does not open sockets or speak HTTP; the sidecars and `phoenix-mesh-transport` own that. The
//! crypto provider is chosen in [`provider`] and nowhere else.
//!
//! Crate map:
//! - `error.rs`: [`CertError`] with a hint per variant, and [`error_chain`] for printing any error.
//! - `load.rs`: PEM (and DER CRL) files into rustls types, every error naming the file.
//! - `malformed.rs`: what is wrong with PEM text or X.509 DER, in words ([`PemProblem`], [`X509Problem`]).
//! - `material.rs`: a side's files loaded and checked together ([`Material`]), and its `--check` lines.
//! - `identity.rs`: who a certificate names ([`PeerIdentity`]), its XFCC value and the renewal-due rule.
//! - `inventory.rs`: what loaded material holds, in words ([`Inventory`]: chain, trust anchors, CRLs),
//!   for `/certs` and `--check`.
//! - `tls.rs`: the rustls client and server configurations, the listener's peer policy, handshake failure reasons.
//! - `recheck.rs`: judging an established connection's recorded chain against the policy now in force.
//! - `verified_chains.rs`: client chains the listener has already verified under its current policy.
//! - `cache.rs`: a small bounded map keyed by exact bytes (certificates, chains).
//! - `reload.rs`: live TLS configurations swapped atomically, and the reloader that rebuilds them
//!   (giving a renewal caught between its two renames a moment to finish).
//! - `provider.rs`: the one crypto provider, and SHA-256 helpers.
//! - `pki.rs` (feature `pki-gen`): a throwaway step-ca-like PKI for the demo, tests and benches.
//! - `test_pem.rs` (unit tests only): real PEM made by openssl, for the tests to cut and damage.

mod cache;
mod error;
mod identity;
mod inventory;
mod load;
mod malformed;
mod material;
pub mod provider;
mod recheck;
mod reload;
#[cfg(test)]
mod test_pem;
mod tls;
mod verified_chains;

#[cfg(feature = "pki-gen")]
pub mod pki;

pub use cache::ByteCache;
pub use error::{error_chain, CertError};
pub use identity::{chain_not_after, fmt_time, is_self_issued, IdentityError, PeerIdentity};
pub use inventory::{CertSummary, CrlSummary, Inventory};
pub use malformed::{KeyProblem, PemProblem, X509Fault, X509Kind, X509Problem};
pub use material::{human, Material, Role, TlsFiles};
pub use recheck::{Authenticated, Refusal};
pub use reload::{
    LastReload, LiveClientTls, LiveServerTls, LiveTls, OwnChain, ReloadStats, ReloadStatus,
    Reloader,
};
pub use tls::{
    client_config, failure_reason, refuses_our_certificate, ClientTlsOptions, KeyTooSmall,
    ServerTlsOptions, TlsVersion, UnknownTlsVersion, MIN_RSA_BITS,
};

pub use rustls;
