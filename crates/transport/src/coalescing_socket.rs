//! The listener's TCP socket as the TLS layer sees it. It saves up to two system calls per connection
//! without changing a byte on the wire (only how the bytes are cut into writes):
//!
//! - It **sniffs the first read**: the first bytes a peer sends say whether it speaks TLS at all, and
//!   they are looked at as rustls reads them, instead of with a `MSG_PEEK` of their own first. Bytes
//!   that are not a TLS handshake record never reach rustls (no alert is written back to a plain-HTTP
//!   client); they are kept for the `400 tls-required` answer.
//! - It **holds the handshake's last write**: rustls ends a TLS 1.3 handshake by writing the session
//!   ticket, and tokio-rustls flushes it at once, in a write (and a TCP segment) of its own. This
//!   socket lets the listener's flight go straight out; once the peer has answered it, what the TLS
//!   layer writes (the ticket) is kept until the handshake is over. Should the handshake need another
//!   flight all the same (a HelloRetryRequest, say), what is held goes out before a read waits for the
//!   peer, which cannot answer what it has not got. When the handshake is over, the ticket goes out
//!   before the first read that waits unless an answer is certain to follow straight away (the
//!   listener decides, see `stop_holding`): a TLS 1.3 client may be waiting for it, as the sign that
//!   its certificate was accepted (our own client does on its HTTP/1.1 connections), and hyper's first
//!   read for a request that has not come waits at once. When an answer follows, the ticket goes out
//!   in one `writev` with it, or at shutdown if nothing is written first; flushes and reads that wait
//!   do not send it then, since hyper flushes and reads ahead before every response and honouring them
//!   would send the ticket on its own again. Only the ticket is copied, not every flight.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::http1_idle::ReadReady;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// What the first read on a connection said.
#[derive(Debug, PartialEq, Eq)]
pub enum First {
    /// Nothing read yet.
    Unread,
    /// A TLS handshake record; rustls has it.
    Tls,
    /// The peer closed before sending anything.
    Closed,
    /// Not TLS: the bytes of that first read, kept from rustls.
    NotTls(Vec<u8>),
}

/// A [`TcpStream`] that sniffs its first read and can hold writes; see the module docs.
#[derive(Debug)]
pub struct MeshSocket {
    tcp: TcpStream,
    /// Bytes taken from the TLS layer but not yet given to the kernel.
    held: Vec<u8>,
    phase: Phase,
    /// A read that waits sends what is held first.
    wait_sends_held: bool,
    first: First,
}

/// How far the handshake is, as far as the socket can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing written yet: writes go straight out.
    Opening,
    /// Our flight went out: writes still go straight out until the peer answers.
    Sent,
    /// The peer answered our flight: writes are held until the handshake is over (and sent before a
    /// read waits, should the handshake go on).
    Holding,
    /// The handshake is over.
    Done,
}

impl MeshSocket {
    /// Wraps a freshly accepted connection: nothing written or read.
    pub fn new(tcp: TcpStream) -> Self {
        MeshSocket {
            tcp,
            held: Vec::new(),
            phase: Phase::Opening,
            wait_sends_held: false,
            first: First::Unread,
        }
    }

    /// Ends holding (the handshake is over). What is held goes out with the next write, or at
    /// shutdown; without `answer_follows` also before the next read that waits, which hyper does at
    /// once when no request has arrived yet.
    pub fn stop_holding(&mut self, answer_follows: bool) {
        self.phase = Phase::Done;
        self.wait_sends_held = !answer_follows;
    }

    /// What the first read said.
    #[cfg(test)]
    fn first(&self) -> &First {
        &self.first
    }

    /// What the first read said, taken out (for the bytes of a peer that did not speak TLS).
    pub fn take_first(&mut self) -> First {
        std::mem::replace(&mut self.first, First::Unread)
    }

    /// The stream itself, for answering a peer that did not speak TLS (nothing is held then: rustls
    /// never saw its bytes, so it wrote nothing).
    pub fn into_tcp(self) -> TcpStream {
        self.tcp
    }

    /// Hands `held` to the kernel; ready once it is all gone.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent_held(n);
        }
        Poll::Ready(Ok(()))
    }

    /// `n` bytes of `held` went out. Once it is empty its buffer is freed: an idle connection should
    /// not keep a ticket's worth of memory.
    fn sent_held(&mut self, n: usize) {
        if n >= self.held.len() {
            self.held = Vec::new();
        } else {
            self.held.drain(..n);
        }
    }
}

impl AsyncRead for MeshSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let start = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Pending => {
                // About to wait for the peer, which may be waiting for what we hold: a handshake
                // flight, or the session ticket (see `stop_holding`).
                if !this.wait_sends_held || this.held.is_empty() {
                    return Poll::Pending;
                }
                if let Poll::Ready(Err(error)) = this.poll_send_held(cx) {
                    return Poll::Ready(Err(error));
                }
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - start;
                if this.first == First::Unread {
                    match buf.filled().get(start) {
                        None => this.first = First::Closed,
                        Some(&TLS_HANDSHAKE) => this.first = First::Tls,
                        Some(_) => {
                            this.first = First::NotTls(buf.filled()[start..].to_vec());
                            buf.set_filled(start);
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "the connection does not start with a TLS handshake record",
                            )));
                        }
                    }
                }
                if this.phase == Phase::Sent && got > 0 {
                    this.phase = Phase::Holding;
                    this.wait_sends_held = true;
                }
                Poll::Ready(Ok(()))
            }
            error => error,
        }
    }
}

impl AsyncWrite for MeshSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.phase == Phase::Holding {
            let before = this.held.len();
            for buf in bufs {
                this.held.extend_from_slice(buf);
            }
            return Poll::Ready(Ok(this.held.len() - before));
        }
        loop {
            if this.held.is_empty() {
                let written =
                    std::task::ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs))?;
                if this.phase == Phase::Opening && written > 0 {
                    this.phase = Phase::Sent;
                }
                return Poll::Ready(Ok(written));
            }
            // Once per connection at most: what is held, then the caller's bytes, in one writev.
            let mut slices = Vec::with_capacity(bufs.len() + 1);
            slices.push(IoSlice::new(&this.held));
            slices.extend(bufs.iter().map(|b| IoSlice::new(b)));
            let n = std::task::ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let held = this.held.len();
            this.sent_held(n);
            if n > held {
                return Poll::Ready(Ok(n - held));
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Leaves `held` alone: during the handshake a read that waits sends it, afterwards the next
    /// write or shutdown does.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_send_held(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl ReadReady for MeshSocket {
    /// Only used to wait on a parked keep-alive connection: one parked before its first request never
    /// had an answer follow its handshake, so its ticket went out then; others have answered since.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        debug_assert!(self.held.is_empty(), "waiting to read while holding bytes");
        self.tcp.poll_read_ready(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (MeshSocket, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        (MeshSocket::new(ours), peer)
    }

    /// Reads what has arrived within a short while, without waiting for more.
    async fn arrived(peer: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), peer.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// Reads with nothing to read: the read must still be waiting after a while.
    async fn read_waits(ours: &mut MeshSocket) {
        let mut buf = [0u8; 16];
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(100), ours.read(&mut buf)).await;
        assert!(waited.is_err(), "the read should still be waiting");
    }

    /// A connection whose peer has answered our first flight, as in a handshake: what is written
    /// next is held.
    async fn answered() -> (MeshSocket, TcpStream) {
        let (mut ours, mut peer) = pair().await;
        let mut buf = [0u8; 16];
        peer.write_all(&[TLS_HANDSHAKE, 1]).await.unwrap();
        assert_eq!(ours.read(&mut buf).await.unwrap(), 2);
        ours.write_all(b"flight").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(
            arrived(&mut peer).await,
            b"flight",
            "the first flight was held"
        );
        peer.write_all(&[TLS_HANDSHAKE, 2]).await.unwrap();
        assert_eq!(ours.read(&mut buf).await.unwrap(), 2);
        (ours, peer)
    }

    #[tokio::test]
    async fn once_the_peer_answered_writes_wait_for_the_first_write_after_holding_ends() {
        let (mut ours, mut peer) = answered().await;
        ours.write_all(b"ticket;").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(arrived(&mut peer).await, b"", "a held write was sent");
        ours.stop_holding(true);
        ours.write_all(b"response").await.unwrap();
        assert_eq!(arrived(&mut peer).await, b"ticket;response");
    }

    #[tokio::test]
    async fn held_bytes_go_out_before_a_read_that_has_to_wait() {
        let (mut ours, mut peer) = answered().await;
        ours.write_all(b"second flight").await.unwrap();
        ours.flush().await.unwrap();
        // The peer answers only once it has our flight: without sending it, the read never ends.
        let answer = tokio::spawn(async move {
            let mut flight = [0u8; 13];
            peer.read_exact(&mut flight).await.unwrap();
            assert_eq!(&flight, b"second flight");
            peer.write_all(&[TLS_HANDSHAKE, 3]).await.unwrap();
            peer
        });
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), ours.read(&mut buf))
            .await
            .expect("the held flight never went out")
            .unwrap();
        assert_eq!(&buf[..n], &[TLS_HANDSHAKE, 3]);
        assert_eq!(ours.first(), &First::Tls);
        answer.await.unwrap();
    }

    #[tokio::test]
    async fn after_holding_ends_a_read_that_waits_leaves_the_held_bytes_for_the_response() {
        let (mut ours, mut peer) = answered().await;
        ours.write_all(b"ticket;").await.unwrap();
        ours.stop_holding(true);
        read_waits(&mut ours).await;
        assert_eq!(
            arrived(&mut peer).await,
            b"",
            "the ticket went out on its own"
        );
        ours.write_all(b"response").await.unwrap();
        assert_eq!(arrived(&mut peer).await, b"ticket;response");
    }

    #[tokio::test]
    async fn after_holding_ends_a_flush_leaves_the_held_bytes_for_the_response() {
        let (mut ours, mut peer) = answered().await;
        ours.write_all(b"ticket;").await.unwrap();
        ours.stop_holding(true);
        ours.flush().await.unwrap();
        assert_eq!(
            arrived(&mut peer).await,
            b"",
            "the ticket went out on its own"
        );
        ours.write_all(b"response").await.unwrap();
        ours.write_all(b" then more").await.unwrap();
        assert_eq!(arrived(&mut peer).await, b"ticket;response then more");
    }

    #[tokio::test]
    async fn without_an_answer_to_follow_what_is_held_goes_out_before_a_read_waits() {
        let (mut ours, mut peer) = answered().await;
        ours.write_all(b"ticket").await.unwrap();
        ours.flush().await.unwrap();
        assert_eq!(arrived(&mut peer).await, b"", "a held write was sent");
        ours.stop_holding(false);
        read_waits(&mut ours).await;
        assert_eq!(arrived(&mut peer).await, b"ticket");
        assert_eq!(ours.held.capacity(), 0, "the ticket's buffer was kept");
    }

    #[tokio::test]
    async fn shutdown_sends_what_is_held_even_while_holding() {
        let (mut ours, mut peer) = answered().await;
        ours.write_all(b"alert").await.unwrap();
        ours.shutdown().await.unwrap();
        assert_eq!(arrived(&mut peer).await, b"alert");
    }

    #[tokio::test]
    async fn a_first_read_that_is_not_tls_is_kept_from_the_reader() {
        let (mut ours, mut peer) = pair().await;
        peer.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let error = ours.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert_eq!(ours.first(), &First::NotTls(b"GET / HTTP/1.1\r\n".to_vec()));
    }

    #[tokio::test]
    async fn a_peer_that_closes_first_is_told_apart() {
        let (mut ours, peer) = pair().await;
        drop(peer);
        let mut buf = [0u8; 64];
        assert_eq!(ours.read(&mut buf).await.unwrap(), 0);
        assert_eq!(ours.first(), &First::Closed);
    }
}
