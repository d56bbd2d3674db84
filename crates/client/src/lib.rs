//! The client sidecar (LXC 101): takes plain HTTP from nginx on loopback (or a unix socket) and
//! carries it to the mesh listener over mutual TLS, presenting the gateway's certificate, verifying
//! the listener's chain and name, and keeping connections warm (a pool, HTTP/2 when both ends offer
//! it). Errors it makes itself carry `phoenix-mesh-error` and name the hop and the cause.
//!
//! It holds the client's policy and config only: the skeleton it runs on (TLS material, admin
//! endpoint, reloads, serving) is `phoenix-mesh-common`'s, the connection machinery
//! `phoenix-mesh-transport`'s.
//!
//! Crate map:
//! - `sidecar.rs`: the client on the sidecar skeleton ([`ClientSidecar`]): binding, accepting, readiness.
//! - `listen.rs`: where nginx reaches it: a TCP address or a unix socket with its mode and group.
//! - `config.rs`: the client's config keys and their validation ([`ClientSettings`]).
//! - `forward.rs`: what a request from nginx becomes on the mesh hop, and the errors it answers with.
//! - `connector.rs`: the mesh connector: picks a listener (round-robin, ejection), dials it, counts the dial.
//! - `dial_listener.rs`: one mutual-TLS connection to one listener: TCP, handshake, verdict, full-handshake retry.
//! - `upstream_error.rs`: why a dial failed, as a type, with the operator's message, code and status.
//! - `conn_info.rs`: what a mesh connection was opened with (`ConnInfo`), and the alert its listener refused us with.
//! - `retirement.rs`: the rule that retires a stale connection.
//! - `mesh_stream.rs`: an established connection as the pools hold it; keeps a fatal alert it reads.
//! - `mesh_policy.rs`: the client's rules for its mesh connections (retirement, replay, HTTP/1.1 fallback) and the mesh link type.
//! - `check.rs`: `phoenix-mesh client --check`: every hop to every upstream, live.

mod check;
mod config;
mod conn_info;
mod connector;
mod dial_listener;
mod forward;
mod listen;
mod mesh_policy;
mod mesh_stream;
mod retirement;
mod sidecar;
mod upstream_error;

pub use check::check;
pub use config::ClientSettings;
pub use phoenix_mesh_common::check::CheckRequest;
pub use sidecar::{ClientError, ClientListener, ClientSide, ClientSidecar};
pub use upstream_error::{UpstreamError, UpstreamErrorKind};
/// SIGHUP: re-reads the config file and applies what can change live.
pub type SettingsReload = phoenix_mesh_common::settings_reload::SettingsReload<ClientSettings>;
