//! Black-box tests of phoenix-mesh over real loopback sockets, with real TLS and a throwaway
//! step-ca-like PKI (root + intermediate). One test binary, a module per feature, all built on the
//! one harness in `support`:
//!
//! - `proxying`: requests through both hops intact: methods, targets, headers, bodies, h2c and h2.
//! - `upgrades`: WebSocket through both hops.
//! - `backend_h2c`: the listener's shared HTTP/2 cleartext connection to the backend.
//! - `identity`: who may connect (refused certificates, `allowed_peers`) and XFCC.
//! - `identity_headers`: `identity_headers`: XFCC and RFC 9440's `Client-Cert`, forged copies stripped.
//! - `certificates`: rotation, revocation and expiry while running.
//! - `upstream_health`: each hop's next hop down, slow or wrong: errors, failover, ejection, pooling.
//! - `timeouts`: silent, slow and idle clients closed; idle connections parked.
//! - `conformance`: odd and hostile HTTP: Host, CONNECT, `*`, upgrades, bad bodies, cookies, identity
//!   lookalikes, large response heads, access-log forgery.
//! - `limits`: header size, malformed and smuggling requests, connection and descriptor limits.
//! - `operations`: start-up, `--check`, admin endpoint and metrics, logs, systemd and signals.
//! - `unix_listen`: the client sidecar on a unix socket.
//! - `nginx_e2e`: a real nginx in front (skipped without nginx; a failure under CI).
//! - `phoenix`: `deploy/phoenix/integrate.sh` against the homelab's real Phoenix scripts, end to end.
//! - `soak`: a minute of mixed traffic with rotation, checked for failures and leaks.
//!
//! Run with `cargo test --test it`.

// In tests a panic with a message is the failure report; the workspace's unwrap/expect lints are for
// the sidecars.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod backend_h2c;
mod certificates;
mod conformance;
mod identity;
mod identity_headers;
mod limits;
mod nginx_e2e;
mod operations;
mod phoenix;
mod proxying;
mod soak;
mod timeouts;
mod unix_listen;
mod upgrades;
mod upstream_health;
