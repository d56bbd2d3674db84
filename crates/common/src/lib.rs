//! What both phoenix-mesh sidecars share: the sidecar skeleton both run on (TLS material, binding,
//! admin endpoint, readiness, metrics, SIGHUP reloads, serving until shutdown), reading the TOML
//! config, the HTTP header rules of a proxy hop, the error responses the sidecars make themselves,
//! the access log and `--check` reports.
//!
//! It does not hold either side's policy (what a request becomes on its hop, which errors it answers
//! with): that is `phoenix-mesh-client` and `phoenix-mesh-server`. Connection machinery (accepting,
//! pooling, dialling) is `phoenix-mesh-transport`; TLS itself is `phoenix-mesh-certs`.
//!
//! Crate map:
//! - `sidecar.rs`: the skeleton: the [`sidecar::Side`] trait a side implements and the generic [`sidecar::Sidecar`].
//! - `settings.rs`: the config keys both sides share, and what the skeleton asks of a side's settings.
//! - `settings_reload.rs`: SIGHUP: re-reading the config file and applying what can change live.
//! - `config.rs`: reading a TOML file, resolving paths against it, durations as operators write them.
//! - `own_certificate.rs`: our certificate in the start-up log, readiness and metrics.
//! - `admin.rs`: the admin endpoint (`/healthz`, `/readyz`, `/metrics`, `/certs`) and why a side is not ready.
//! - `certs_report.rs`: the `/certs` document, and where it learns the peers connected now.
//! - `live.rs`: the established mutual-TLS connections, what each was authenticated with, and their retirement.
//! - `metrics.rs`: every Prometheus metric, with label values as enums.
//! - `access.rs`: the access log, one line per request once its body is done.
//! - `log_limit.rs`: repeated failures (same cause, same hop) logged once, then summarised per interval.
//! - `stall.rs`: the progress timeout of a side's responses, and the log line of a response it cuts off.
//! - `headers.rs`: the header rules of one proxy hop (hop-by-hop, `X-Forwarded-*`, Host, upgrades, cookies).
//! - `conformance.rs`: what a request must be to be forwarded at all (CONNECT, `*`, Host, upgrades).
//! - `response.rs`: the error responses a sidecar makes itself, tagged `phoenix-mesh-error`.
//! - `check.rs`: the `--check` report.

pub mod access;
pub mod admin;
pub mod certs_report;
pub mod check;
pub mod config;
pub mod conformance;
pub mod headers;
pub mod live;
pub mod log_limit;
pub mod metrics;
pub mod own_certificate;
pub mod response;
pub mod settings;
pub mod settings_reload;
pub mod sidecar;
pub mod stall;

pub use response::{mesh_error, ProxyBody, MESH_ERROR_HEADER};
