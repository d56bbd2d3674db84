//! phoenix-mesh's connection machinery, shared by both sidecars: how connections are accepted,
//! served, dialled, pooled, kept idle and closed. A *hop* here is one HTTP connection the sidecar
//! holds, towards a peer it accepted or a peer it dialled; what a request becomes on a hop, and which
//! errors a sidecar answers with, is the sidecars' own policy, not this crate's. It knows nothing of
//! configuration files or certificates.
//!
//! Crate map:
//! - `body.rs`: the body types that cross a sidecar.
//! - `serve.rs`: serving accepted connections, re-exporting its parts:
//!   - `serve/accept.rs`: the accept loop and its connection slots (`max_connections`), and the
//!     bounded set of pending handshakes (`max_pending_handshakes`) of a loop whose connections authenticate.
//!   - `serve/shutdown.rs`: the shutdown signal, draining, and driving a connection to a graceful end
//!     (at shutdown, or when it retires before its certificates end).
//!   - `serve/http_server.rs`: HTTP/1.1 and HTTP/2 server builders with the sidecars' limits, and `serve_http`.
//!   - `serve/preface_deadline.rs`: the deadline for a new connection to show its HTTP version.
//! - `http1_idle.rs`: parked connections: HTTP/1.1 server connections that hold no HTTP state while idle.
//! - `coalescing_socket.rs`: the accepted TCP socket that sniffs for TLS and sends the session ticket with the first answer.
//! - `dial.rs`: what opens a connection (the `Dial` trait), the owner's retirement rule (`Retire`), the plain TCP dialer.
//! - `pool.rs`: the HTTP/1.1 client pool and its reuse rules.
//! - `h2.rs`: HTTP/2 driven with the `h2` crate, protocol apart from policy:
//!   - `h2/client.rs`: opening a request's stream, its response body, piping its request body.
//!   - `h2/shared.rs`: the one shared HTTP/2 connection to a peer and its dial, reuse and replay rules.
//! - `balance.rs`: round-robin over several upstreams, ejecting the ones that keep failing.
//! - `tls_verdict.rs`: a TLS server's verdict on our client certificate (its first flight, or a later alert).
//! - `sweep.rs`: the periodic idle sweep of a pool.
//! - `serving_task.rs`: the task that serves a request downstream, and ending it from outside.
//! - `progress.rs`: the progress timeout: cutting off a streaming response whose sender or reader stopped.
//! - `tunnel.rs`: joining the two halves of an upgraded connection, until either closes or the
//!   connection under it must end.
//! - `test_peer.rs` (unit tests only): a loopback peer that counts the connections it accepts.

pub mod balance;
pub mod body;
pub mod coalescing_socket;
pub mod dial;
pub mod h2;
pub mod http1_idle;
pub mod pool;
pub mod progress;
pub mod serve;
pub mod serving_task;
pub mod sweep;
#[cfg(test)]
mod test_peer;
pub mod tls_verdict;
pub mod tunnel;
