//! A *mesh stream* is one established mutual-TLS connection to a mesh listener, as the pools hold
//! it: the TLS stream, whether ALPN chose HTTP/2, and what it was opened with ([`ConnInfo`]). While it
//! is open it counts in the open-connections gauge; a fatal alert it reads is kept in its `ConnInfo`, where a failure that went through h2 finds it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use phoenix_mesh_common::live::Registration;
use phoenix_mesh_common::metrics::GaugeGuard;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::conn_info::ConnInfo;

/// An established mTLS link, told to the pool as HTTP/2 when ALPN chose it.
pub struct MeshStream {
    tls: TlsStream<TcpStream>,
    info: ConnInfo,
    h2: bool,
    _open: GaugeGuard,
    /// Its entry among the live connections, removed when it closes.
    _registered: Registration,
}

impl MeshStream {
    /// A stream over `tls`, counted by `open` until dropped.
    pub(crate) fn new(
        tls: TlsStream<TcpStream>,
        info: ConnInfo,
        h2: bool,
        open: GaugeGuard,
        registered: Registration,
    ) -> Self {
        MeshStream {
            tls,
            info,
            h2,
            _open: open,
            _registered: registered,
        }
    }

    /// Whether ALPN chose HTTP/2.
    pub(crate) fn is_h2(&self) -> bool {
        self.h2
    }

    /// What the connection was opened with.
    pub(crate) fn info(&self) -> &ConnInfo {
        &self.info
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.tls).poll_read(cx, buf);
        if let Poll::Ready(Err(error)) = &read {
            this.info.alert.note(error);
        }
        read
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}
