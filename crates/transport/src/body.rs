//! The bodies that cross a sidecar: what arrives from hyper or is made here ([`ProxyBody`]), and
//! what a sidecar answers with ([`ResponseBody`]), which may also be an HTTP/2 stream it drives itself.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::h2::client::H2Body;

/// A body that is either streamed through from the other side or made here.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// What a sidecar answers with: a body from hyper (or one of its own), or a stream of an HTTP/2
/// connection it drives itself.
pub type ResponseBody = Either<ProxyBody, H2Body>;
