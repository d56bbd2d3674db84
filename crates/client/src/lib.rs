//! The client sidecar (LXC 101): takes plain HTTP from nginx on loopback and carries it to the mesh
//! listener over mutual TLS, presenting the gateway's certificate, verifying the listener's chain and
//! name, and keeping connections warm (a pool, HTTP/2 when both ends offer it). Errors it makes itself
//! carry `phoenix-mesh-error` and name the hop and the cause.

mod check;
mod config;
mod connector;
mod forward;
mod link;
mod sidecar;

pub use check::{check, CheckRequest};
pub use config::ClientSettings;
pub use connector::{UpstreamError, UpstreamErrorKind};
/// SIGHUP: re-reads the config file and applies what can change live.
pub type SettingsReload = phoenix_mesh_common::sidecar::SettingsReload<ClientSettings>;
pub use sidecar::{ClientError, ClientSidecar};
