//! The client sidecar (LXC 101): takes plain HTTP from nginx on loopback and carries it to the mesh
//! listener over mutual TLS, presenting the gateway's certificate, verifying the listener's chain and
//! name, and keeping connections warm (a pool, HTTP/2 when both ends offer it). Errors it makes itself
//! carry `phoenix-mesh-error` and name the hop and the cause.
//!
//! Crate map (the dialer):
//! - `connector.rs`: the mesh connector: picks a listener (round-robin, ejection), dials it, counts the dial.
//! - `dial_listener.rs`: one mutual-TLS connection to one listener: TCP, handshake, verdict, full-handshake retry.
//! - `upstream_error.rs`: why a dial failed, as a type, with the operator's message, code and status.
//! - `live_conns.rs`: what each open connection was opened with (`ConnInfo`), and the earliest and oldest of them.
//! - `retirement.rs`: the rule that retires a stale connection.
//! - `mesh_stream.rs`: an established connection as the pools hold it; keeps a fatal alert it reads.

mod check;
mod config;
mod connector;
mod dial_listener;
mod forward;
mod link;
mod live_conns;
mod mesh_stream;
mod retirement;
mod sidecar;
mod upstream_error;

pub use check::{check, CheckRequest};
pub use config::ClientSettings;
pub use upstream_error::{UpstreamError, UpstreamErrorKind};
/// SIGHUP: re-reads the config file and applies what can change live.
pub type SettingsReload = phoenix_mesh_common::sidecar::SettingsReload<ClientSettings>;
pub use sidecar::{ClientError, ClientSidecar};
