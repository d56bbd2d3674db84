//! What both phoenix-mesh sidecars share: reading the TOML config, the HTTP header rules of a proxy
//! hop, the error responses the sidecars make themselves, and the accept-and-serve loop with graceful
//! shutdown, the admin endpoint and metrics, `--check` reports, and reloading a side's settings. TLS
//! itself is `phoenix-mesh-certs`; neither side's forwarding logic is here.

pub mod access;
pub mod admin;
pub mod check;
pub mod config;
pub mod headers;
pub mod listen;
pub mod metrics;
pub mod response;
pub mod settings;
pub mod sidecar;

pub use response::{mesh_error, ProxyBody, MESH_ERROR_HEADER};
