//! The mesh listener (LXC 102): accepts mutual TLS on `:8443`, requires a client certificate that
//! chains to the Phoenix root and an allowed identity, and forwards each request to Traefik over
//! pooled loopback HTTP/1.1 (or one shared h2c connection) with Host untouched and the verified
//! identity in `X-Forwarded-Client-Cert`. It does not know about the client sidecar's internals.
//!
//! It holds the listener's policy and config only: the skeleton it runs on (TLS material, admin
//! endpoint, reloads, serving) is `phoenix-mesh-common`'s, the connection machinery
//! `phoenix-mesh-transport`'s.
//!
//! Crate map:
//! - `listener.rs`: the listener on the sidecar skeleton ([`MeshListener`]): TLS accept, identity, serving.
//! - `plaintext.rs`: the `400 tls-required` answer to plain HTTP on the TLS port.
//! - `config.rs`: the listener's config keys and their validation ([`ServerSettings`]).
//! - `forward.rs`: what a request becomes on the backend hop (identity headers, `X-Forwarded-*`), and its errors.
//! - `identity_headers.rs`: which identity headers the backend gets (XFCC, RFC 9440's `Client-Cert`) and their values.
//! - `h2c.rs`: the shared HTTP/2 cleartext connection to the backend.
//! - `check.rs`: `phoenix-mesh server --check`: config, certificate, the running listener, the backend.

mod check;
mod config;
mod forward;
mod h2c;
mod identity_headers;
mod listener;
mod plaintext;

pub use check::check;
pub use config::{ServerFile, ServerSettings};
pub use identity_headers::IdentityHeaders;
pub use listener::{ListenerSide, MeshListener, ServerError};
/// SIGHUP: re-reads the config file and applies what can change live.
pub type SettingsReload = phoenix_mesh_common::settings_reload::SettingsReload<ServerSettings>;
