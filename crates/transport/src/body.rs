//! The bodies that cross a sidecar: what arrives from hyper or is made here ([`ProxyBody`]), and
//! what a sidecar answers with ([`ResponseBody`]), which may also be an HTTP/2 stream it drives itself.

use std::error::Error as _;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::h2::client::H2Body;

/// A body that is either streamed through from the other side or made here.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// What a sidecar answers with: a body from hyper (or one of its own), or a stream of an HTTP/2
/// connection it drives itself.
pub type ResponseBody = Either<ProxyBody, H2Body>;

/// Why the request body being forwarded failed to read from the sender (a malformed chunk, an
/// upload cut off), if `error`, anywhere in its chain, says it did: the sender's fault, not the next
/// hop's. Over HTTP/1.1 hyper reports it as an error of the request's body (a user error) whose
/// source is the incoming body's own error, which says what was wrong; on an HTTP/2 stream the
/// body's pipe resets the stream with `CANCEL` ([`crate::h2::client::is_request_body_reset`]), which
/// does not.
pub fn request_body_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
            if let Some(body) = hyper.source().filter(|_| hyper.is_user()) {
                if body.is::<hyper::Error>() {
                    return Some(root_cause(body));
                }
            }
        }
        if e.downcast_ref::<h2::Error>()
            .is_some_and(crate::h2::client::is_request_body_reset)
        {
            return Some("it was malformed or ended early".to_owned());
        }
        current = e.source();
    }
    None
}

/// The innermost error's message, which is the one that says what actually happened.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
