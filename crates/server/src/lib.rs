//! The mesh listener (LXC 102): accepts mutual TLS on `:8443`, requires a client certificate that
//! chains to the Phoenix root and an allowed identity, and forwards each request to Traefik over
//! pooled loopback HTTP/1.1 with Host untouched and the verified identity in
//! `X-Forwarded-Client-Cert`. It does not know about the client sidecar's internals.

mod check;
mod config;
mod forward;
mod h2c;
mod listener;
mod plaintext;

pub use check::check;
pub use config::{ServerFile, ServerSettings};
pub use listener::{MeshListener, ServerError};
/// SIGHUP: re-reads the config file and applies what can change live.
pub type SettingsReload = phoenix_mesh_common::sidecar::SettingsReload<ServerSettings>;
