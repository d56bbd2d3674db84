//! Serving what the sidecars accept: the accept loop and its connection slots, the shutdown signal
//! and draining (and a connection's own retirement), HTTP server connections with the sidecars'
//! limits, and the deadline for a new connection's first bytes. One concern per file under `serve/`; the items are re-exported here.

mod accept;
mod http_server;
mod preface_deadline;
mod shutdown;

pub use accept::{accept_authenticating, accept_loop, Accept, Pending, Slot};
pub use http_server::{http1_builder, http2_builder, http_builder, serve_http, HttpOptions};
pub use preface_deadline::PrefaceDeadline;
pub use shutdown::{drive, serve_until, Shutdown, ShutdownWatch};
