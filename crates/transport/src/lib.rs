//! phoenix-mesh's connection machinery, shared by both sidecars: how connections are accepted,
//! served, dialled, pooled, kept idle and closed. A *hop* here is one HTTP connection the sidecar
//! holds, towards a peer it accepted or a peer it dialled; what a request becomes on a hop, and which
//! errors a sidecar answers with, is the sidecars' own policy, not this crate's. It knows nothing of
//! configuration files or certificates.
//!
//! Crate map:
//! - `body.rs`: the body types that cross a sidecar.
//! - `serve.rs`: the accept loop, shutdown and draining, HTTP server builders and the preface deadline.
//! - `http1_idle.rs`: HTTP/1.1 server connections that hold no HTTP state while idle.
//! - `coalescing_socket.rs`: the accepted TCP socket that sniffs for TLS and sends the session ticket with the first answer.
//! - `dial.rs`: what opens a connection (the `Dial` trait) and the plain TCP dialer.
//! - `balance.rs`: round-robin over several upstreams, ejecting the ones that keep failing.
//! - `tls_verdict.rs`: a TLS server's verdict on our client certificate (its first flight, or a later alert).
//! - `pool.rs`: the HTTP/1.1 client pool.
//! - `h2/client.rs`: opening HTTP/2 streams and reading their bodies.
//! - `sweep.rs`: the periodic idle sweep of a pool.
//! - `tunnel.rs`: joining the two halves of an upgraded connection.

pub mod balance;
pub mod body;
pub mod coalescing_socket;
pub mod dial;
pub mod h2;
pub mod http1_idle;
pub mod pool;
pub mod serve;
pub mod sweep;
pub mod tls_verdict;
pub mod tunnel;
