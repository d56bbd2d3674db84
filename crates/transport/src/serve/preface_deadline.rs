//! The deadline for a new connection's first bytes, until they show whether it speaks HTTP/2 with
//! prior knowledge (see [`PrefaceDeadline`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bounds the reads of a new connection until it has shown whether it starts with the HTTP/2
/// preface. hyper-util's `auto` server reads up to 24 bytes to tell HTTP/1.1 from h2c before hyper
/// takes over, and hyper's `header_read_timeout` starts only then; hyper's HTTP/2 server waits for the
/// preface with no timer at all (its keep-alive pings start after it). Without a deadline a peer that
/// sent nothing, or stopped inside what could still be the preface, would hold its connection (and a
/// `max_connections` slot) for ever. The deadline ends with the first byte that is not the preface's
/// (HTTP/1.1: hyper's timer covers the rest of the head; HTTP/2: hyper refuses the connection), a
/// whole preface (HTTP/2: the keep-alive pings cover an idle peer from then on), or the end of the
/// stream; then reads pass straight through.
pub struct PrefaceDeadline<I> {
    io: I,
    /// Bytes of the preface matched so far.
    matched: usize,
    /// Until when, while still telling; the timer exists only once a read had to wait.
    deadline: Option<(tokio::time::Instant, Option<Pin<Box<tokio::time::Sleep>>>)>,
}

impl<I> PrefaceDeadline<I> {
    /// `io`, whose first bytes must show within `timeout`.
    pub fn new(io: I, timeout: Duration) -> Self {
        PrefaceDeadline {
            io,
            matched: 0,
            deadline: Some((tokio::time::Instant::now() + timeout, None)),
        }
    }

    /// Follows the bytes just read as hyper-util does; the deadline ends once the version is known.
    fn saw(&mut self, got: &[u8]) {
        if got.is_empty() {
            self.deadline = None;
            return;
        }
        for &byte in got {
            if H2_PREFACE.get(self.matched) != Some(&byte) {
                self.deadline = None;
                return;
            }
            self.matched += 1;
        }
        if self.matched >= H2_PREFACE.len() {
            self.deadline = None;
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefaceDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = &mut *self;
        let start = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some((at, timer)) = &mut this.deadline else {
            return polled;
        };
        match polled {
            std::task::Poll::Ready(Ok(())) => {
                this.saw(&buf.filled()[start..]);
                std::task::Poll::Ready(Ok(()))
            }
            std::task::Poll::Pending => {
                let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(*at)));
                if timer.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request started within header_read_timeout",
                    )));
                }
                std::task::Poll::Pending
            }
            error => error,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PrefaceDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the deadline still runs after reads that returned `chunks`.
    fn still_telling(chunks: &[&[u8]]) -> bool {
        let mut sniff = PrefaceDeadline::new((), Duration::from_secs(1));
        for chunk in chunks {
            sniff.saw(chunk);
        }
        sniff.deadline.is_some()
    }

    #[test]
    fn the_deadline_lasts_while_the_bytes_could_still_be_the_h2_preface() {
        assert!(still_telling(&[]));
        assert!(still_telling(&[b"PRI * HTTP/2.0\r\n"]));
        assert!(still_telling(&[b"PRI", b" * HTTP/2.0\r\n\r\nSM\r\n\r"]));
        assert!(!still_telling(&[b"GET / HTTP/1.1\r\n"]));
        assert!(!still_telling(&[b"PRI * HTTP/1.1\r\n"]));
        assert!(!still_telling(&[H2_PREFACE]));
        assert!(!still_telling(&[b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\n"]));
        assert!(
            !still_telling(&[b"PRI * ", b""]),
            "the end of the stream ends it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_timed_out_and_a_talking_one_is_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (mut peer, ours) = tokio::io::duplex(64);
        let mut silent = PrefaceDeadline::new(ours, Duration::from_secs(5));
        let mut buf = [0u8; 8];
        let started = tokio::time::Instant::now();
        let error = silent.read(&mut buf).await.err().map(|e| e.kind());
        assert_eq!(error, Some(io::ErrorKind::TimedOut));
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        // A request head ends the deadline: a read after it waits as long as it must.
        let (mut peer2, ours) = tokio::io::duplex(64);
        let mut talking = PrefaceDeadline::new(ours, Duration::from_secs(5));
        peer2.write_all(b"GET").await.ok();
        assert_eq!(talking.read(&mut buf).await.ok(), Some(3));
        let late = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            peer2.write_all(b" /").await.ok();
        };
        let (read, ()) = tokio::join!(talking.read(&mut buf), late);
        assert_eq!(read.ok(), Some(2));
        peer.shutdown().await.ok();
    }
}
