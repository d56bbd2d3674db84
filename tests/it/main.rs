//! Black-box tests of phoenix-mesh over real loopback sockets, with real TLS and a throwaway
//! step-ca-like PKI (root + intermediate). One test binary, a module per area.
//!
//! Run with `cargo test --test it`.

// In tests a panic with a message is the failure report; the workspace's unwrap/expect lints are for
// the sidecars.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
mod support_ops;

mod backend_h2c;
mod expiry;
mod failures;
mod hardening;
mod limits;
mod nginx_e2e;
mod operations;
mod phoenix;
mod refusals;
mod rotation;
mod roundtrip;
mod soak;
mod startup;
mod systemd;
mod unix_listen;
