//! What both phoenix-mesh sidecars share: reading the TOML config, the HTTP header rules of a proxy
//! hop, the error responses the sidecars make themselves, and the accept-and-serve loop with graceful
//! shutdown. It knows nothing about TLS (that is `phoenix-mesh-certs`) nor about either side's
//! forwarding logic.

pub mod access;
pub mod admin;
pub mod check;
pub mod config;
pub mod headers;
pub mod metrics;
pub mod response;
pub mod serve;
pub mod upgrade;

pub use response::{mesh_error, ProxyBody, MESH_ERROR_HEADER};
