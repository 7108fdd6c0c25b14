//! Binding and the accept loop.
//!
//! A connection slot (semaphore permit) is taken *before* `accept`, so when
//! the listener is full new clients wait in the kernel's accept queue
//! instead of being accepted and starved. Every connection runs in its own
//! task, tracked for the drain; the handshake happens there, never in the
//! accept loop.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ConnInfo, ListenerState};
use crate::cert::challenge::{is_acme_tls_alpn, ACME_TLS_ALPN};
use crate::config::Mode;
pub use crate::metrics::ListenerStats;
use crate::shutdown::Drain;
use crate::tls;

/// A bound listener and its swappable state.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub local_addr: SocketAddr,
    pub state: Arc<ArcSwap<ListenerState>>,
    pub stats: Arc<ListenerStats>,
    socket: TcpListener,
    limit: Arc<Semaphore>,
}

/// Bind a listening socket. `SO_REUSEADDR` lets a restarted sheath bind
/// while old connections sit in TIME_WAIT.
///
/// `TCP_NODELAY` is set on the listening socket: Linux copies it to every
/// connection accepted from it, which saves a system call per connection
/// (one of the fourteen a proxied HTTP connection costs).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    // A socket handed over by a previous sheath (or systemd) keeps its
    // accept queue: take it instead of binding anew.
    if let Some(inherited) = crate::upgrade::take_inherited(addr) {
        inherited.set_nonblocking(true)?;
        socket2::SockRef::from(&inherited).set_nodelay(true)?;
        tracing::info!(%addr, "using inherited listening socket");
        return TcpListener::from_std(inherited);
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nodelay(true)?;
    if addr.is_ipv6() {
        // `[::]` means IPv6 only; bind 0.0.0.0 in a second listener for v4.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

impl Listener {
    /// `state` and `limit` are shared with whoever reconfigures the
    /// listener: a new state applies to the next connection, and permits
    /// added to or taken from `limit` change the connection cap in place.
    pub fn new(
        socket: TcpListener,
        state: Arc<ArcSwap<ListenerState>>,
        stats: Arc<ListenerStats>,
        limit: Arc<Semaphore>,
    ) -> io::Result<Listener> {
        let local_addr = socket.local_addr()?;
        let name = state.load().config.name.clone();
        Ok(Listener {
            name,
            local_addr,
            state,
            stats,
            socket,
            limit,
        })
    }

    /// Run the accept loop on every worker (see [`crate::workers`]), each
    /// on its own duplicate of the socket. The port closes when the last
    /// loop has returned.
    pub fn spawn(self, stop: &CancellationToken, drain: &Drain) -> Vec<JoinHandle<()>> {
        let mut loops = Vec::with_capacity(crate::workers::count());
        for worker in crate::workers::others() {
            let socket = match self.socket.as_fd().try_clone_to_owned() {
                Ok(fd) => std::net::TcpListener::from(fd),
                Err(e) => {
                    // Out of descriptors at start or reload: the other
                    // workers still accept, so serve rather than fail.
                    tracing::warn!(listener = %self.name, error = %e, "a worker cannot accept on this listener");
                    continue;
                }
            };
            let name = self.name.clone();
            let (state, stats, limit) = (
                Arc::clone(&self.state),
                Arc::clone(&self.stats),
                Arc::clone(&self.limit),
            );
            let (stop, drain) = (stop.clone(), drain.clone());
            loops.push(worker.spawn(async move {
                // Registered with this worker's reactor, so only here.
                let listener = TcpListener::from_std(socket)
                    .and_then(|socket| Listener::new(socket, state, stats, limit));
                match listener {
                    Ok(listener) => listener.run(stop, drain).await,
                    Err(e) => {
                        tracing::warn!(listener = %name, error = %e, "a worker cannot accept on this listener");
                    }
                }
            }));
        }
        loops.push(tokio::spawn(self.run(stop.clone(), drain.clone())));
        loops
    }

    /// Accept until `stop` fires, then close the socket so that new
    /// connections are refused while existing ones drain.
    pub async fn run(self, stop: CancellationToken, drain: Drain) {
        let mut backoff = Duration::ZERO;
        loop {
            let permit = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                permit = Arc::clone(&self.limit).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                r = self.socket.accept() => r,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    backoff = Duration::ZERO;
                    let peer = super::unmapped(peer);
                    self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let state = self.state.load_full();
                    let stats = Arc::clone(&self.stats);
                    let conn_drain = drain.clone();
                    let local = self.local_addr;
                    start(tcp, peer, local, state, stats, permit, conn_drain);
                }
                Err(e) if is_connection_error(&e) => {
                    // The client gave up before we accepted; nothing to fix.
                    tracing::debug!(listener = %self.name, error = %e, "accept: connection error");
                }
                Err(e) => {
                    // Out of fds or memory: back off instead of spinning, and
                    // keep going, because closing connections frees them.
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tracing::error!(listener = %self.name, error = %e, retry_in = ?backoff, "accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
        tracing::debug!(listener = %self.name, addr = %self.local_addr, "stopped accepting");
    }
}

/// Run a new connection on the worker with the fewest open (see
/// [`crate::workers`]), tracked for the drain.
fn start(
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    state: Arc<ListenerState>,
    stats: Arc<ListenerStats>,
    permit: OwnedSemaphorePermit,
    drain: Drain,
) {
    let tracker = drain.tracker.clone();
    let assigned = crate::workers::Assigned::pick();
    let Some(worker) = assigned.as_ref().and_then(|a| a.elsewhere()) else {
        tracker.spawn(async move {
            let _assigned = assigned;
            handle(tcp, peer, local, state, stats, permit, drain).await;
        });
        return;
    };
    // Moved to the other worker's reactor; a socket that cannot be is
    // dropped like a failed accept.
    let tcp = match tcp.into_std() {
        Ok(tcp) => tcp,
        Err(e) => {
            tracing::debug!(error = %e, "handing a connection to a worker failed");
            return;
        }
    };
    worker.spawn(tracker.track_future(async move {
        let _assigned = assigned;
        match TcpStream::from_std(tcp) {
            Ok(tcp) => handle(tcp, peer, local, state, stats, permit, drain).await,
            Err(e) => tracing::debug!(error = %e, "handing a connection to a worker failed"),
        }
    }));
}

/// ACME validators get the challenge config; everyone else the listener's.
fn pick_config(
    state: &ListenerState,
    hello: &rustls::server::ClientHello<'_>,
) -> Arc<rustls::ServerConfig> {
    match &state.acme_tls {
        Some(acme) if is_acme_tls_alpn(hello) => Arc::clone(acme),
        _ => Arc::clone(&state.tls),
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Counts a connection in the active gauge for as long as it lives,
/// however its task ends.
pub(super) struct ActiveGuard(Arc<ListenerStats>);

impl ActiveGuard {
    pub(super) fn enter(stats: Arc<ListenerStats>) -> ActiveGuard {
        stats.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(stats)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `listening` is the listener's own address; see `handshake` for why.
async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    listening: SocketAddr,
    state: Arc<ListenerState>,
    stats: Arc<ListenerStats>,
    permit: OwnedSemaphorePermit,
    drain: Drain,
) {
    let _active = ActiveGuard::enter(Arc::clone(&stats));
    // Each phase is boxed and awaited in turn. A task's future is as large
    // as its largest state, and locals an async fn has moved out of can
    // keep their room in it: inline, every connection task held the
    // handshake's, HTTP's and TCP's state together for its whole life
    // (7.5 KiB, half the memory of an idle connection). Boxed, a phase's
    // state is freed when the phase ends.
    let handshake = Box::pin(handshake(tcp, peer, listening, state, stats, permit, drain));
    let serving = handshake.await;
    if let Some(serving) = serving {
        serving.await;
    }
}

/// Type of a connection's serving phase.
type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The TLS handshake, then the serving phase it leads to, if any; in
/// outbound mode, where the client speaks plaintext, the relay at once.
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    listening: SocketAddr,
    state: Arc<ListenerState>,
    stats: Arc<ListenerStats>,
    permit: OwnedSemaphorePermit,
    drain: Drain,
) -> Option<Serving> {
    // Elsewhere accepted sockets may not inherit it from the listener.
    #[cfg(not(target_os = "linux"))]
    let _ = tcp.set_nodelay(true);
    if state.config.mode == Mode::Outbound {
        // Plaintext from a local client; TLS is on the upstream side.
        return Some(Box::pin(super::outbound::relay(
            tcp, peer, state, stats, permit, drain,
        )));
    }
    // The address the client connected to. A listener on one address is
    // connected to at that address; only a wildcard bind needs the kernel
    // to say which of the host's addresses it was (a syscall per
    // connection).
    let local = if listening.ip().is_unspecified() {
        tcp.local_addr().map_or(listening, super::unmapped)
    } else {
        listening
    };
    let config = &state.config;
    let handshake = tokio::select! {
        r = tls::accept(tcp, |hello| pick_config(&state, hello), config.timeouts.handshake) => r,
        _ = drain.abort.cancelled() => return None,
    };
    let accepted = match handshake {
        Ok(a) => a,
        Err(e) => {
            let reason = e.reason();
            stats.handshake_failed(reason);
            tracing::info!(
                listener = %config.name,
                peer = %peer,
                sni = e.sni().unwrap_or("-"),
                reason = %reason,
                error = %e,
                "TLS handshake failed"
            );
            return None;
        }
    };
    stats.handshakes.fetch_add(1, Ordering::Relaxed);
    serving(accepted, peer, local, state, stats, permit, drain)
}

/// The serving phase of a connection, or `None` when it ends here.
fn serving(
    accepted: tls::Accepted,
    peer: SocketAddr,
    local: SocketAddr,
    state: Arc<ListenerState>,
    stats: Arc<ListenerStats>,
    permit: OwnedSemaphorePermit,
    drain: Drain,
) -> Option<Serving> {
    let config = &state.config;
    if accepted.stream.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
        // A validator only needs to see the challenge certificate.
        tracing::info!(listener = %config.name, peer = %peer, sni = accepted.sni.as_deref().unwrap_or("-"), "answered ACME TLS-ALPN-01 validation");
        let mut stream = accepted.stream;
        return Some(Box::pin(async move {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        }));
    }
    let session = accepted.stream.get_ref().1;
    // Only a listener with a client verifier asks for certificates; the
    // verifier parsed this chain when it accepted it.
    let identity = match (session.peer_certificates(), &state.client_verifier) {
        (Some([leaf, intermediates @ ..]), Some(verifier)) => {
            match verifier.identity(leaf, intermediates) {
                Ok(id) => Some(id),
                Err(e) => {
                    // Verified by webpki but unparseable here: refuse rather
                    // than forward without an identity.
                    tracing::warn!(listener = %config.name, peer = %peer, error = %e, "client certificate unreadable");
                    return None;
                }
            }
        }
        _ => None,
    };
    let tls_version = session
        .protocol_version()
        .and_then(|v| v.as_str())
        .unwrap_or("-");
    let cipher = session
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("-");
    let conn = ConnInfo {
        listener: Arc::clone(&state),
        stats,
        peer,
        local,
        sni: accepted.sni,
        identity,
        tls_version,
        cipher,
        drain,
        since: tokio::time::Instant::now(),
    };
    Some(match config.mode {
        Mode::Tcp => Box::pin(super::tcp::relay(accepted.stream, conn, permit)),
        Mode::Http => Box::pin(super::http::serve(accepted.stream, conn, permit)),
        Mode::Outbound => unreachable!("outbound connections have no server handshake"),
    })
}

#[cfg(test)]
mod tests {
    /// Connections accepted from a listener `bind` made have Nagle's
    /// algorithm off, though nothing sets it on them: a response's last
    /// small write must not wait for the client's delayed ACK.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        let listener = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
