//! Plain HTTP arriving on the TLS port gets a real answer, not a hang or a silent close: this is the
//! very mistake (HTTP where TLS was expected, or the reverse) behind the original bare 404.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whether a connection's first bytes (not a TLS record) look like an HTTP request: a method starts
/// with an upper-case letter.
pub(crate) fn looks_like_http(first: &[u8]) -> bool {
    first.first().is_some_and(u8::is_ascii_uppercase)
}

/// Answers a plaintext HTTP request with `400` and `phoenix-mesh-error: tls-required`, then closes.
/// `first` is what the peer sent first, already read.
pub(crate) async fn refuse_plain_http(
    mut stream: TcpStream,
    first: Vec<u8>,
    listen: std::net::SocketAddr,
) -> std::io::Result<()> {
    // Read the request head first (bounded in size and time): closing with unread bytes makes the
    // kernel send a reset, and the client could lose the answer.
    let mut head = first;
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let body = format!(
        "phoenix-mesh listener {listen}: this port requires mutual TLS, but the request arrived as plain HTTP.\n\
         Send it through the phoenix-mesh client sidecar (or another TLS client presenting a certificate from the Phoenix CA).\n"
    );
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\nphoenix-mesh-error: tls-required\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
