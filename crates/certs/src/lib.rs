//! Certificates and TLS for phoenix-mesh: loading PEM files into rustls types, checking them the way an
//! operator expects at start-up (readable, matching key, in date, chaining to the CA), building the
//! client and server `rustls` configurations, and reading a peer's identity out of its certificate.
//!
//! It does not open sockets or speak HTTP; the sidecars own that. The crypto provider is chosen in
//! [`provider`] and nowhere else.

mod cache;
mod error;
mod identity;
mod load;
mod material;
pub mod provider;
mod reload;
mod tls;
mod verified;

#[cfg(feature = "pki-gen")]
pub mod pki;

pub use cache::ByteCache;
pub use error::CertError;
pub use identity::{IdentityError, PeerIdentity};
pub use load::{load_cert_chain, load_crls, load_private_key, load_roots};
pub use material::{human, Material, Role, TlsFiles};
pub use reload::{
    error_chain, fingerprint, LiveClientTls, LiveServerTls, LiveTls, ReloadStats, Reloader,
};
pub use tls::{
    client_config, failure_reason, refuses_our_certificate, server_config, ClientTlsOptions,
    ServerTlsOptions, TlsVersion,
};

pub use rustls;
