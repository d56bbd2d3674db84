//! The one test harness: what every feature module builds on.
//!
//! - [`pki`]: a root + intermediate like step-ca, and every leaf the tests need, named for what it is.
//! - [`files`]: config files and both sidecars' file directory; certificate replacement as renewal
//!   tools do it.
//! - [`mesh`]: the whole hop in-process (backend, mesh listener, client sidecar).
//! - [`binary`]: the real binary as a child process.
//! - [`backend`]: a recording backend standing in for Traefik.
//! - [`http`], [`raw`], [`tls`]: clients at three levels (hyper, raw bytes, TLS), and [`stream`]
//!   for streamed bodies that prove nothing is buffered.
//! - [`admin`]: the admin endpoint and its metrics; [`load`]: background traffic that counts
//!   failures; [`relay`]: a TCP relay that counts the client's mesh connections.

pub mod admin;
pub mod backend;
pub mod binary;
pub mod files;
pub mod http;
pub mod load;
pub mod mesh;
pub mod pki;
pub mod raw;
pub mod relay;
pub mod stream;
pub mod tls;

use std::future::Future;
use std::time::Duration;

/// A test that needs a tool this machine lacks: under CI (`CI=true`, which `.ci/run` sets) that is a
/// failure, since CI installs every tool the tests use; elsewhere the test says so loudly on stderr
/// and returns. `cargo test` hides a passing test's output, so CI must not rely on skipping.
pub fn skip_or_fail_without(what: &str, install: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    assert!(
        !ci,
        "{what} is missing under CI ({install}); .ci/run should have installed it"
    );
    eprintln!("SKIPPED: {what} is missing ({install})");
}

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

/// Polls `check` every 50 ms until it returns `Some`, failing the test with `what` after
/// [`STEP_LIMIT`]. Not a timing assertion: only an upper bound so a regression cannot hang.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + STEP_LIMIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not true within {STEP_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
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
