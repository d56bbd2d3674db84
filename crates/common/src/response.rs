//! Responses the sidecars make themselves, told apart from backend responses by a header, and what
//! such a response says about the connection it goes out on.
//!
//! hyper keeps an HTTP/1 connection after a response only if the request's body was read to its end:
//! a body dropped unread is drained of what has already arrived, and if that was not all of it the
//! connection closes after the response. hyper says so in the response only if it saw the body
//! dropped before writing the head, and an error answer is made in the same moment the request that
//! failed (and its body) is dropped; the listener's answer passed on by the client likewise ends the
//! client's reading of the body, as the listener resets the stream. Without a word, nginx sends its
//! next request on a connection about to close. So an answer the mesh made itself to a request whose
//! body may be left unread says `Connection: close` ([`closes_unless_read`], [`close_connection`]).

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{Either, Full};

/// Set on every response a sidecar makes itself, with a short machine-readable code.
pub const MESH_ERROR_HEADER: HeaderName = HeaderName::from_static("phoenix-mesh-error");

pub use phoenix_mesh_transport::body::ProxyBody;

/// A plain-text error response naming the hop and the cause, tagged `phoenix-mesh-error: <code>`.
pub fn mesh_error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> Response<ProxyBody> {
    let mut body = message.into();
    body.push('\n');
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(MESH_ERROR_HEADER, HeaderValue::from_static(code));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Whether answering `req` without reading its body closes the connection it came on: an HTTP/1
/// request with a body still to come (HTTP/2 streams end on their own, and take no `Connection`).
pub fn closes_unless_read<B: Body>(req: &Request<B>) -> bool {
    req.version() < Version::HTTP_2 && !req.body().is_end_stream()
}

/// Makes `response` say that its connection closes after it (`Connection: close`), which hyper then
/// does.
pub fn close_connection<B>(response: &mut Response<B>) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use http::Version;
    use http_body_util::Empty;

    use super::*;

    fn request<B>(version: Version, body: B) -> Request<B> {
        Request::builder()
            .method("POST")
            .uri("/upload")
            .version(version)
            .body(body)
            .unwrap()
    }

    #[test]
    fn only_an_http1_request_with_a_body_closes_its_connection_unread() {
        let upload = || Full::new(Bytes::from_static(b"upload"));
        assert!(closes_unless_read(&request(Version::HTTP_11, upload())));
        assert!(closes_unless_read(&request(Version::HTTP_10, upload())));
        assert!(!closes_unless_read(&request(
            Version::HTTP_11,
            Empty::<Bytes>::new()
        )));
        assert!(!closes_unless_read(&request(Version::HTTP_2, upload())));
    }

    #[test]
    fn a_closing_answer_says_connection_close_once() {
        let mut response = mesh_error(StatusCode::BAD_GATEWAY, "upstream-error", "failed");
        close_connection(&mut response);
        close_connection(&mut response);
        let values: Vec<_> = response
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .collect();
        assert_eq!(values, ["close"]);
    }
}
