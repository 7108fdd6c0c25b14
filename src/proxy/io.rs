//! Byte accounting and idle detection for relayed streams.
//!
//! A [`Tracked`] stream records the time of its last successful read or
//! write and counts the bytes it read into a shared [`Activity`]. The idle
//! watchdog sleeps until the last activity plus the timeout, so an active
//! connection costs one timer re-arm per idle period, not one per read.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::metrics::ListenerStats;

/// Shared activity record of one connection (both of its sides).
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last read or write.
    last_ms: AtomicU64,
    /// Bytes read from the client.
    pub bytes_in: AtomicU64,
    /// Bytes written to the client.
    pub bytes_out: AtomicU64,
    /// Where the totals go when the connection is done with them.
    listener: Option<Arc<ListenerStats>>,
}

impl Drop for Activity {
    /// The last holder (the connection, or an upgraded tunnel that
    /// outlived it) reports the connection's bytes to its listener.
    fn drop(&mut self) {
        if let Some(stats) = &self.listener {
            let (bytes_in, bytes_out) = self.totals();
            stats.add_bytes(bytes_in, bytes_out);
        }
    }
}

impl Activity {
    pub fn new(listener: Option<Arc<ListenerStats>>) -> Arc<Self> {
        Arc::new(Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            listener,
        })
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has moved for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let deadline = self.last() + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// Resolves with the limit reached first: `"idle_timeout"` once
    /// nothing has moved for `idle`, `"max_lifetime"` once the connection
    /// that began at `since` has lived `lifetime`. One timer for both, not
    /// one each: every idle relay (TCP mode, outbound mode, an upgraded
    /// tunnel) keeps this future, and a second timer was 112 bytes more of
    /// it (W7 in benches/compare.py).
    pub async fn idle_or_lifetime(
        &self,
        idle: Duration,
        since: Instant,
        lifetime: Option<Duration>,
    ) -> &'static str {
        let end = lifetime.map(|l| since + l);
        loop {
            let idle_at = self.last() + idle;
            let (deadline, outcome) = match end {
                Some(end) if end <= idle_at => (end, "max_lifetime"),
                _ => (idle_at, "idle_timeout"),
            };
            if Instant::now() >= deadline {
                return outcome;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    pub fn totals(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }
}

/// Does rustls already hold something for this connection that waiting on
/// the socket would miss: bytes that arrived with the end of the
/// handshake, a close, an error, or output it wants sent? Callers that
/// wait for a connection's first bytes before allocating buffers check
/// this first, and leave whatever it is to their read and write path.
pub fn tls_has_pending(
    stream: &mut tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> bool {
    match stream.get_mut().1.process_new_packets() {
        Ok(state) => {
            state.plaintext_bytes_to_read() > 0
                || state.tls_bytes_to_write() > 0
                || state.peer_has_closed()
        }
        Err(_) => true,
    }
}

/// Make the socket's close send a reset instead of a FIN.
///
/// For the plaintext side of a relay whose other side did not end
/// cleanly: TLS authenticates the end of a stream (close_notify), but a
/// plaintext peer has only the FIN to go by, and would take one for the
/// end of a whole stream where the TLS side was cut (a FIN without
/// close_notify, a reset, a fatal alert). Closing a socket with a zero
/// linger never blocks.
pub fn reset_on_close(stream: &tokio::net::TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "cannot arm the reset of a cut connection");
    }
}

/// Which side a [`Tracked`] stream is: only the client side counts bytes
/// (in both directions), so TCP and HTTP mode count the same thing.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Client,
    Upstream,
}

/// A stream wrapper that reports activity.
#[derive(Debug)]
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    side: Side,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, activity: Arc<Activity>, side: Side) -> Self {
        Tracked {
            inner,
            activity,
            side,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn wrote(&self, n: usize) {
        if n > 0 {
            if let Side::Client = self.side {
                self.activity
                    .bytes_out
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            self.activity.touch();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let n = (buf.filled().len() - before) as u64;
            if n > 0 {
                if let Side::Client = self.side {
                    self.activity.bytes_in.fetch_add(n, Ordering::Relaxed);
                }
                self.activity.touch();
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.wrote(n);
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = poll {
            self.wrote(n);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
