//! HTTP/2 driven with the `h2` crate directly.

pub mod client;
