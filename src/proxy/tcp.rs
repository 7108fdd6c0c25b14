//! TCP (L4) mode: a byte-exact relay between the decrypted client stream
//! and the upstream.
//!
//! End of stream travels both ways independently: a client's close_notify
//! becomes a FIN towards the upstream, an upstream FIN becomes close_notify
//! plus FIN towards the client, and the other direction keeps flowing until
//! it ends too (half-close). A client stream that ends any other way (a FIN
//! without close_notify, a reset), and one sheath cuts (timeouts, the
//! drain), is passed on as a reset.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::server::TlsStream;

use super::io::{Activity, Side, Tracked};
use super::ConnInfo;

/// Client to upstream: TLS records carry at most 16 KiB, so one read from
/// the TLS stream rarely fills more.
const UP_BUF: usize = 16 * 1024;

/// Upstream to client: four full TLS records per read and per write.
/// With 16 KiB, as for the other direction, a bulk download cost twice the
/// CPU per megabyte (W6 in benches/compare.py: 3,150 -> 1,730 and 3,185 ->
/// 1,380 us/MB; 32 KiB gave 1,700-1,925). The buffer exists only while the
/// connection carries traffic.
const DOWN_BUF: usize = 64 * 1024;

/// Relay one TLS connection to the upstream until both directions end, it
/// goes idle, or the drain cuts it.
///
/// A plain function around an `async move` block rather than an async fn:
/// an async fn moves its arguments into locals of its state machine, so
/// the 1.2 KiB TLS stream would take room twice in a future that every
/// idle connection keeps.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would store the TLS stream twice"
)]
pub fn relay(
    mut client: TlsStream<TcpStream>,
    conn: ConnInfo,
    permit: OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let _permit = permit;
        let config = &conn.listener.config;
        let upstream = &config.upstream;
        let mut upstream_stream = match super::upstream::connect(upstream, config.timeouts.connect)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                conn.stats
                    .upstream_connect_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(listener = %config.name, peer = %conn.peer, upstream = %upstream, error = %e, "upstream connect failed");
                return;
            }
        };
        if let Some(version) = config.proxy_protocol {
            let alpn = client.get_ref().1.alpn_protocol();
            let header = match super::proxy_protocol::header(version, &conn, conn.local, alpn) {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(listener = %config.name, peer = %conn.peer, error = %e, "cannot build PROXY header");
                    return;
                }
            };
            if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut upstream_stream, &header).await
            {
                tracing::warn!(listener = %config.name, peer = %conn.peer, error = %e, "upstream closed before the PROXY header");
                return;
            }
        }

        let activity = Activity::new(Some(Arc::clone(&conn.stats)));
        let relay = async {
            // The relay's two buffers are allocated once either side
            // has something to say, not while a connection sits idle after
            // its handshake (W7 in benches/compare.py).
            first_traffic(&mut client, &upstream_stream).await;
            // Boxed: allocated once traffic begins, so the copying state
            // is no part of what an idle connection's future holds.
            Box::pin(copy_both_ways(&mut client, &mut upstream_stream, &activity)).await
        };
        // The select stays here rather than in a function shared with
        // outbound mode: an async fn taking the relay would hold it (and
        // its own arguments) in a future of its own, +0.1 to +0.5 KiB per
        // idle connection in W7.
        let outcome = tokio::select! {
            r = relay => match r {
                Ok(_) => "closed",
                Err(e) => {
                    tracing::debug!(listener = %config.name, peer = %conn.peer, error = %e, "relay error");
                    "error"
                }
            },
            limit = activity.idle_or_lifetime(config.timeouts.idle, conn.since, config.timeouts.max_lifetime) => limit,
            _ = conn.drain.abort.cancelled() => "drain_timeout",
        };
        if outcome != "closed" {
            // The client's stream was cut (a FIN without close_notify, a
            // reset, a TLS error), or the upstream's, or sheath cut it (a
            // timeout, the maximum lifetime, the drain): the upstream must
            // not read a FIN as the end of a whole stream.
            super::io::reset_on_close(&upstream_stream);
        }
        let (bytes_in, bytes_out) = activity.totals();
        tracing::info!(
            listener = %config.name,
            peer = %conn.peer,
            sni = conn.sni.as_deref().unwrap_or("-"),
            client = conn.identity.as_ref().and_then(|i| i.principal()).unwrap_or("-"),
            upstream = %upstream,
            bytes_in,
            bytes_out,
            duration_ms = conn.since.elapsed().as_millis() as u64,
            outcome,
            "connection"
        );
    }
}

/// Copy between the client's side and the upstream's until both have
/// ended, counting traffic in `activity`.
pub(super) async fn copy_both_ways<C, U>(
    client: &mut C,
    upstream: &mut U,
    activity: &Arc<Activity>,
) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Tracked::new(client, Arc::clone(activity), Side::Client);
    let mut upstream = Tracked::new(upstream, Arc::clone(activity), Side::Upstream);
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, UP_BUF, DOWN_BUF).await
}

/// Wait until the client or the upstream has sent something (or closed).
async fn first_traffic(client: &mut TlsStream<TcpStream>, upstream: &TcpStream) {
    if super::io::tls_has_pending(client) {
        return;
    }
    // Readiness errors surface again in the relay, which reports them.
    // Polled rather than two `readable()` futures, which an idle
    // connection's future would hold (W7).
    std::future::poll_fn(|cx| {
        let client = client.get_ref().0.poll_read_ready(cx).is_ready();
        let upstream = upstream.poll_read_ready(cx).is_ready();
        if client || upstream {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// Resolves once a connection that began at `since` has lived its
/// maximum lifetime, if one is set. Every phase (waiting for the first
/// request, serving, an upgraded tunnel) counts from the same start, so
/// none of them restarts the clock.
pub async fn max_lifetime(since: tokio::time::Instant, limit: Option<std::time::Duration>) {
    match limit {
        Some(limit) => tokio::time::sleep_until(since + limit).await,
        None => std::future::pending().await,
    }
}
