//! HTTP/1.1 as raw bytes on a stream (TCP or TLS), for what a well-behaved client cannot send or
//! would hide: slow, silent, malformed and pipelined requests, upgrades, and how a connection ends.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::http::SERVICE_HOST;
use super::within;

/// How a raw connection ended while we read from it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The peer closed (FIN or reset).
    Closed,
    /// Still open, but nothing arrived for the quiet period.
    Quiet,
}

/// Reads until the peer closes or stays quiet for `quiet`; everything received comes back.
pub async fn read_until_closed_or_quiet<S: AsyncRead + Unpin>(
    s: &mut S,
    quiet: Duration,
) -> (Vec<u8>, Ending) {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, Ending::Closed),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, Ending::Quiet),
        }
    }
}

/// Reads until the peer closes the connection (an upper bound, not a timing assertion); returns
/// what arrived before.
pub async fn expect_closed<S: AsyncRead + Unpin>(what: &str, s: &mut S) -> Vec<u8> {
    let (got, ending) = within(what, read_until_closed_or_quiet(s, Duration::from_secs(15))).await;
    assert_eq!(
        ending,
        Ending::Closed,
        "{what}: still open; received {:?}",
        String::from_utf8_lossy(&got)
    );
    got
}

/// Reads until the peer closes (EOF or reset); fails if data arrives or it stays open past the bound.
pub async fn expect_eof<S: AsyncRead + Unpin>(what: &str, s: &mut S) {
    let mut buf = [0u8; 1024];
    match within(what, s.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!(
            "{what}: expected the connection to close, got {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

/// Sends `raw` and returns what came back before the connection closed or went quiet (3 s).
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, raw: &[u8]) -> Vec<u8> {
    // The server may answer and close before reading everything; a failed write is fine then.
    let _ = s.write_all(raw).await;
    let _ = s.flush().await;
    within(
        "reading the answer",
        read_until_closed_or_quiet(s, Duration::from_secs(3)),
    )
    .await
    .0
}

/// The status line's code of a raw HTTP/1.1 response.
pub fn status_of(raw: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(raw).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// How many HTTP/1.1 responses `raw` holds (status lines at the start of a message).
pub fn responses_in(raw: &[u8]) -> usize {
    String::from_utf8_lossy(raw).matches("HTTP/1.1 ").count()
}

/// Reads up to the end of a message head; returns the head and whatever followed it.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed before the end of a message head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of header `name` in a raw head (case-insensitive name), if present.
pub fn head_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Sends a keep-alive GET for `target` and reads the whole (Content-Length) response: (head, body).
pub async fn raw_get(s: &mut TcpStream, target: &str) -> (String, String) {
    let req = format!("GET {target} HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    read_response(s).await
}

/// Reads one response with a Content-Length body: (head, body).
pub async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> (String, String) {
    let (head, mut body) = read_head(s).await;
    let len: usize = head_value(&head, "content-length")
        .unwrap_or_else(|| panic!("no content-length: {head}"))
        .parse()
        .unwrap();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed in the body of: {head}");
        body.extend_from_slice(&chunk[..n]);
    }
    (head, String::from_utf8_lossy(&body).into_owned())
}
