//! What the tests share: the PKI, a recording backend, the in-process mesh, and small HTTP/TLS clients.

pub mod backend;
pub mod http;
pub mod mesh;
pub mod pki;
pub mod stream;
pub mod tls;

use std::future::Future;
use std::time::Duration;

/// Upper bound for any one step of a test, so a regression hangs no longer than this. Not a timing
/// assertion: everything here finishes in well under a second when it works.
pub const STEP_LIMIT: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`STEP_LIMIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP_LIMIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {STEP_LIMIT:?}"),
    }
}

/// Lowercase hex SHA-256, computed here rather than by the code under test.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A loopback port nothing listens on (bound, then released).
pub fn closed_port_addr() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
