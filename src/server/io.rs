//! A client connection's byte stream, wrapped. It counts the bytes that move (the idle
//! watchdog in [`super::conn`] reads the count), it holds the connection's place under
//! the cap for as long as the socket lives (a websocket keeps it through hyper's
//! upgrade), and it gives hyper's own error answers a JSON body ([`super::hyper_errors`]).

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

use super::hyper_errors;
use super::tls::Stream;

/// What the idle watchdog looks at.
#[derive(Debug, Default)]
pub(super) struct Activity {
    /// Bumped by every read or write that moves bytes.
    moved: AtomicU64,
    /// True while the server, not the client, is the one to move: a handler runs with
    /// the request in hand, or a response body is being produced.
    working: AtomicBool,
}

impl Activity {
    pub(super) fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }
    fn bump(&self) {
        self.moved.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn working(&self) -> bool {
        self.working.load(Ordering::Relaxed)
    }
    pub(super) fn set_working(&self, working: bool) {
        self.working.store(working, Ordering::Relaxed);
    }
}

pub(super) struct Io {
    tcp: Stream,
    activity: Arc<Activity>,
    _place: OwnedSemaphorePermit,
    rewrite: Option<Rewrite>,
}

/// Our version of a hyper error answer, while it is being written.
struct Rewrite {
    bytes: Vec<u8>,
    written: usize,
    /// How many bytes hyper asked to write; reported once ours are all out.
    replaces: usize,
}

impl Io {
    pub(super) fn new(tcp: Stream, activity: Arc<Activity>, place: OwnedSemaphorePermit) -> Io {
        Io { tcp, activity, _place: place, rewrite: None }
    }

    fn poll_rewrite(&mut self, cx: &mut Context<'_>, asked: usize) -> Poll<std::io::Result<usize>> {
        let Some(r) = &mut self.rewrite else {
            return Poll::Ready(Ok(0));
        };
        while r.written < r.bytes.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &r.bytes[r.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            r.written += n;
            self.activity.bump();
        }
        let done = r.replaces.min(asked);
        self.rewrite = None;
        Poll::Ready(Ok(done))
    }
}

impl AsyncRead for Io {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let result = ready!(Pin::new(&mut this.tcp).poll_read(cx, buf));
        if buf.filled().len() > before {
            this.activity.bump();
        }
        Poll::Ready(result)
    }
}

impl AsyncWrite for Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_none() {
            if let Some(bytes) = hyper_errors::with_json_body(buf) {
                this.rewrite = Some(Rewrite { bytes, written: 0, replaces: buf.len() });
            }
        }
        if this.rewrite.is_some() {
            return this.poll_rewrite(cx, buf.len());
        }
        let n = ready!(Pin::new(&mut this.tcp).poll_write(cx, buf))?;
        if n > 0 {
            this.activity.bump();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_some() {
            let asked = bufs.iter().map(|b| b.len()).sum();
            return this.poll_rewrite(cx, asked);
        }
        // hyper's error answer is a head alone: one slice.
        let mut slices = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (slices.next(), slices.next()) {
            return Pin::new(this).poll_write(cx, only);
        }
        let n = ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs))?;
        if n > 0 {
            this.activity.bump();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
