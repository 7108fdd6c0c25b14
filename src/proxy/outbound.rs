//! Outbound mode: a local plaintext client, relayed byte for byte over
//! mutual TLS to a remote peer, presenting this sidecar's certificate.
//!
//! The mirror image of TCP mode. The application talks to a loopback port
//! as if the peer were local; sheath connects to the peer, verifies its
//! certificate against the configured CAs and the expected name, proves
//! its own identity with the certificate it manages, and then relays. A
//! client never reaches the peer unverified: if the handshake fails, its
//! connection is closed without a byte relayed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::io::Activity;
use super::tcp::copy_both_ways;
use super::{ListenerState, ListenerStats};
use crate::shutdown::Drain;
use crate::tls::handshake::FailureReason;

/// Connect to the peer for one local client and relay until done.
///
/// A plain function around an `async move` block, as in TCP mode, so the
/// streams are stored once in the connection's future.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would store the streams twice"
)]
pub fn relay(
    mut client: TcpStream,
    peer: SocketAddr,
    state: Arc<ListenerState>,
    stats: Arc<ListenerStats>,
    permit: OwnedSemaphorePermit,
    drain: Drain,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let _permit = permit;
        let started = Instant::now();
        let config = &state.config;
        let upstream = &config.upstream;
        let (Some(client_tls), Some(outbound)) = (&state.outbound, &config.outbound) else {
            // Built with every outbound listener's state; never absent.
            tracing::error!(listener = %config.name, "outbound listener without a TLS client");
            return;
        };
        let tcp = tokio::select! {
            r = super::upstream::connect(upstream, config.timeouts.connect) => r,
            _ = drain.abort.cancelled() => return super::io::reset_on_close(&client),
        };
        let tcp = match tcp {
            Ok(s) => s,
            Err(e) => {
                // Until the peer is verified, every way out resets the local
                // client: one that sent nothing yet (waiting for the peer to
                // speak first) would read a FIN as a peer that accepted and
                // had nothing to say.
                super::io::reset_on_close(&client);
                stats
                    .upstream_connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(listener = %config.name, peer = %peer, upstream = %upstream, error = %e, "upstream connect failed");
                return;
            }
        };
        let handshake =
            TlsConnector::from(Arc::clone(client_tls)).connect(outbound.server_name.clone(), tcp);
        let handshake = tokio::select! {
            r = tokio::time::timeout(config.timeouts.handshake, handshake) => r,
            _ = drain.abort.cancelled() => return super::io::reset_on_close(&client),
        };
        let mut tls = match handshake {
            Ok(Ok(tls)) => tls,
            failed => {
                super::io::reset_on_close(&client);
                let (reason, error) = match failed {
                    Ok(Err(e)) => (FailureReason::of_outbound(&e), e.to_string()),
                    _ => (
                        FailureReason::Timeout,
                        format!("no handshake within {:?}", config.timeouts.handshake),
                    ),
                };
                stats.handshake_failed(reason);
                tracing::warn!(
                    listener = %config.name,
                    peer = %peer,
                    upstream = %upstream,
                    server_name = ?outbound.server_name,
                    reason = %reason,
                    error,
                    "TLS handshake with the upstream failed"
                );
                return;
            }
        };
        let session = tls.get_ref().1;
        let tls12 = session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_2);
        let tls_version = session
            .protocol_version()
            .and_then(|v| v.as_str())
            .unwrap_or("-");
        // In TLS 1.2 the peer's Finished comes after it has checked our
        // certificate; in TLS 1.3 only what the peer sends next tells.
        let mut tls = Confirmed {
            inner: &mut tls,
            stats: &stats,
            counted: tls12,
        };
        if tls12 {
            stats.handshakes.fetch_add(1, Ordering::Relaxed);
        }

        let activity = Activity::new(Some(Arc::clone(&stats)));
        // No waiting for first traffic before the buffers exist, as TCP
        // mode does: a peer that speaks first (a greeting) may have sent it
        // with its last handshake flight, already read into rustls.
        let relay = copy_both_ways(&mut client, &mut tls, &activity);
        let outcome = tokio::select! {
            r = relay => match r {
                Ok(_) => "closed",
                Err(e) if peer_refused(&e) => {
                    // In TLS 1.3 the client's side of the handshake is done
                    // before the server has checked the client certificate,
                    // so a peer refusing this sidecar's identity shows only
                    // as an alert on the first read.
                    tracing::warn!(listener = %config.name, peer = %peer, upstream = %upstream, error = %e, "the upstream refused this sidecar's certificate");
                    "refused"
                }
                Err(e) => {
                    tracing::debug!(listener = %config.name, peer = %peer, error = %e, "relay error");
                    "error"
                }
            },
            limit = activity.idle_or_lifetime(config.timeouts.idle, started, config.timeouts.max_lifetime) => limit,
            _ = drain.abort.cancelled() => "drain_timeout",
        };
        if outcome == "refused" && !tls.counted {
            // Counted as TLS 1.2 counts the same alert in the handshake: a
            // failure, not a success.
            stats.handshake_failed(FailureReason::AlertReceived);
        } else {
            // Anything else from the peer, or nothing at all: the peer did
            // not refuse the handshake.
            tls.confirm();
        }
        if outcome != "closed" {
            // The peer's stream was cut (a FIN without close_notify, a
            // reset, a fatal alert), or the local client's, or sheath cut
            // it (a timeout, the maximum lifetime, the drain): the local
            // client must not read a FIN as the end of a whole stream.
            super::io::reset_on_close(&client);
        }
        let (bytes_in, bytes_out) = activity.totals();
        tracing::info!(
            listener = %config.name,
            peer = %peer,
            upstream = %upstream,
            tls = tls_version,
            bytes_in,
            bytes_out,
            duration_ms = started.elapsed().as_millis() as u64,
            outcome,
            "connection"
        );
    }
}

/// A fatal alert from the peer about our certificate.
fn peer_refused(e: &std::io::Error) -> bool {
    use rustls::AlertDescription as A;
    let alert = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    matches!(
        alert,
        Some(rustls::Error::AlertReceived(
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired
        ))
    )
}

/// The peer's side of the relay, counting the handshake as a success at
/// the first thing read from the peer that is not its refusal.
///
/// A TLS 1.3 client has finished its handshake before the server has
/// checked the client's certificate, so counting at the end of the
/// handshake would count a refused connection as a success.
struct Confirmed<'a, S> {
    inner: &'a mut S,
    stats: &'a ListenerStats,
    /// Counted already, either way.
    counted: bool,
}

impl<S> Confirmed<'_, S> {
    fn confirm(&mut self) {
        if !self.counted {
            self.counted = true;
            self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Confirmed<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            self.confirm();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Confirmed<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
