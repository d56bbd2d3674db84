//! Responses the sidecars make themselves, told apart from backend responses by a header.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
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
