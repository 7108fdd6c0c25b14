//! The data path: accept a connection, terminate TLS, relay to the upstream.
//!
//! `listener` owns accepting and limits; `tcp` and `http` own the two relay
//! modes; `forward` owns the headers that tell the backend about the client;
//! `upstream` owns the pool of HTTP connections to the backend.

pub mod client_body;
pub mod forward;
pub mod http;
pub mod io;
pub mod listener;
pub mod outbound;
pub mod proxy_protocol;
pub mod tcp;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::ServerConfig;

use crate::config::ListenerConfig;
use crate::shutdown::Drain;
use crate::tls::client_auth::ClientIdentity;
use crate::tls::ListenerCerts;

pub use listener::{bind, Listener, ListenerStats};

/// An IPv4 client of a dual-stack socket is `::ffff:a.b.c.d` to the
/// kernel. sheath binds IPv6 sockets IPv6 only, but one handed over by
/// systemd (`ListenStream=[::]:443`) takes both families; wherever sheath
/// names the client (forwarding headers, PROXY header, logs) it is the
/// IPv4 address, as nginx and Envoy give it.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// Where a frame just polled from `body` leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyProgress {
    Going,
    Ended,
    Failed,
}

impl BodyProgress {
    /// A body with a length says it has ended with its last data frame,
    /// and its reader may stop there without polling again; a chunked
    /// HTTP/1 body says so only by ending.
    fn of<T>(
        frame: &std::task::Poll<Option<Result<T, hyper::Error>>>,
        body: &hyper::body::Incoming,
    ) -> BodyProgress {
        use hyper::body::Body as _;
        use std::task::Poll;
        match frame {
            Poll::Ready(None) => BodyProgress::Ended,
            Poll::Ready(Some(Ok(_))) if body.is_end_stream() => BodyProgress::Ended,
            Poll::Ready(Some(Err(_))) => BodyProgress::Failed,
            _ => BodyProgress::Going,
        }
    }
}

/// Everything a connection needs from its listener, as one snapshot.
///
/// A listener holds its current state in an `ArcSwap`; each connection loads
/// it once when accepted and keeps that snapshot for its whole life, so
/// changed settings apply to new connections without disturbing old ones.
/// Except where requests go: see [`ListenerState::moved`].
#[derive(Debug)]
pub struct ListenerState {
    pub config: Arc<ListenerConfig>,
    pub tls: Arc<ServerConfig>,
    /// Server config for ACME TLS-ALPN-01 validation handshakes, on
    /// listeners with a certificate from ACME.
    pub acme_tls: Option<Arc<ServerConfig>>,
    /// Its certificates; the TLS config resolves through them.
    pub certs: Arc<ListenerCerts>,
    /// The client certificate verifier, when client auth is on.
    pub client_verifier: Option<Arc<crate::tls::client_auth::ClientVerifier>>,
    /// Pooled upstream client, in HTTP mode.
    pub http: Option<upstream::UpstreamClient<client_body::ClientBody>>,
    /// TLS client towards the remote peer, in outbound mode.
    pub outbound: Option<Arc<rustls::ClientConfig>>,
    /// Cancelled when a reload sends the listener's requests elsewhere
    /// (another `upstream`, `upstream_protocol` or `mode`); shared by the
    /// states of the reloads in between, which kept the upstream. An HTTP
    /// connection keeps its snapshot for its whole life, so a client that
    /// holds its connection open (a gRPC channel, a browser's HTTP/2
    /// connection, a keep-alive pool) would send every later request to the
    /// upstream the reload replaced, for good: with that one stopped, each
    /// got a `502` while the configured upstream was up. Such a connection
    /// finishes its requests in flight and closes instead (HTTP/2:
    /// GOAWAY), as nginx's old workers do on a reload, and the client
    /// reconnects under the new settings.
    pub moved: tokio_util::sync::CancellationToken,
}

/// One accepted, TLS-terminated client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub listener: Arc<ListenerState>,
    /// The listener's counters.
    pub stats: Arc<ListenerStats>,
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    pub sni: Option<String>,
    /// The verified client certificate, on mTLS listeners.
    pub identity: Option<Arc<ClientIdentity>>,
    /// Negotiated TLS version and cipher suite, e.g. `TLSv1_3`.
    pub tls_version: &'static str,
    pub cipher: &'static str,
    pub drain: Drain,
    /// When the handshake ended, from which `max_lifetime` counts for
    /// what outlives the connection's first phase (an upgraded tunnel).
    pub since: tokio::time::Instant,
}

impl ConnInfo {
    /// Resolves when an HTTP connection is to finish its requests in flight
    /// and close: sheath is draining, or a reload sent the listener's
    /// requests elsewhere ([`ListenerState::moved`]).
    pub async fn told_to_close(&self) {
        tokio::select! {
            _ = self.drain.graceful.cancelled() => {}
            _ = self.listener.moved.cancelled() => {}
        }
    }
}
