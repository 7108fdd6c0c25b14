//! Keep-alive HTTP/1.1 connections to the upstream, pooled per listener,
//! and multiplexed HTTP/2 (h2c) connections for upstreams that speak it.
//!
//! Built on hyper's connection-level client rather than hyper-util's
//! general-purpose one: sheath talks to a single origin, so the pool is one
//! stack of idle connections, not a map keyed by scheme and authority, and
//! a connection goes back on the stack when its response body ends, from
//! the task that read it. The general client parks every connection in a
//! task of its own, spawned per request, until the connection is free.
//!
//! A pooled connection can be closed by the upstream at any moment (its
//! keep-alive timeout, a restart). When that happens before the request
//! was written, hyper hands the request back and it is sent again on
//! another connection. When the request was written and the connection
//! then ended without a response byte, it is sent again only if it has no
//! body and an idempotent method, as nginx does, and only once: the
//! upstream may have acted on anything else, and may have died of it.
//!
//! An h2c upstream can also say that it did not process a stream: it
//! resets it with `REFUSED_STREAM`, or its GOAWAY leaves the stream out.
//! Such a request is sent again, once, on another connection, whatever
//! its method (RFC 9113 §8.7), if it has no body: a body is passed on as
//! it arrives, so none is kept to send a second time.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::BodyProgress;
use crate::config::{ListenerConfig, Upstream, UpstreamProtocol};
use crate::metrics::{ListenerStats, UpstreamKind};

/// Most idle connections kept; more are closed as their responses end.
const MAX_IDLE: usize = 1024;
/// TCP keep-alive probes on upstream connections, so one whose peer
/// vanished without a FIN is eventually noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Pools of HTTP/1.1 connections to one upstream, for requests with
/// bodies of type `B` (the client's, in sheath). Clones share the pools.
///
/// Each worker (see [`crate::workers`]) has a pool, and h2c connections,
/// of its own: a connection is driven by a task on the worker that opened
/// it, and a request from another worker would cross threads twice.
#[derive(Debug)]
pub struct UpstreamClient<B = Incoming> {
    pools: Arc<[Arc<Pool<B>>]>,
    /// The HTTP/2 connections, for listeners whose `upstream_protocol`
    /// sends some or all requests over h2c.
    h2: Option<Arc<[Arc<H2Conn<B>>]>>,
}

impl<B> Clone for UpstreamClient<B> {
    fn clone(&self) -> Self {
        UpstreamClient {
            pools: Arc::clone(&self.pools),
            h2: self.h2.clone(),
        }
    }
}

/// What a request body must be to be sent on a pooled connection (or the
/// h2c connection, whose driver needs it `Unpin`).
pub trait RequestBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}
impl<B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static> RequestBody for B {}

/// What goes on an upstream connection: the client's body, or nothing when
/// a bodiless request is sent again.
type Outgoing<B> = Either<B, Empty<Bytes>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
struct Pool<B> {
    upstream: Upstream,
    connect_timeout: Duration,
    /// How long an unused connection is kept.
    idle_timeout: Duration,
    /// Idle connections, the most recently used last: reusing the warmest
    /// connection lets the others age out when traffic drops.
    idle: Mutex<Vec<IdleConn<B>>>,
    sweeping: AtomicBool,
    stats: Arc<ListenerStats>,
}

#[derive(Debug)]
struct IdleConn<B> {
    sender: SendRequest<Outgoing<B>>,
    since: Instant,
}

/// Why the upstream gave no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connecting failed (refused, unreachable, name not resolved).
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// The upstream did not accept the connection within this time.
    #[error("connection not accepted within {0:?}")]
    ConnectTimeout(Duration),
    /// The connection failed while sending the request or reading the
    /// response head.
    #[error("{0}")]
    Http(hyper::Error),
}

impl UpstreamError {
    /// The I/O error underneath an HTTP failure, which says more than
    /// hyper's summary of it.
    pub fn io_cause(error: &hyper::Error) -> Option<&io::Error> {
        cause(error)
    }

    /// What an HTTP/2 failure underneath `error` was: a stream the
    /// upstream reset, a GOAWAY, with the reason code. hyper says only
    /// "http2 error" and keeps the rest in the error's source.
    pub fn h2_cause(error: &hyper::Error) -> Option<String> {
        let h2: &h2::Error = cause(error)?;
        let by = if h2.is_remote() {
            "the upstream"
        } else {
            "sheath"
        };
        Some(match h2.reason() {
            Some(reason) if h2.is_reset() => format!(
                "stream reset by {by}: {reason:?} ({})",
                reason.description()
            ),
            Some(reason) if h2.is_go_away() => format!(
                "connection closed by {by} (GOAWAY): {reason:?} ({})",
                reason.description()
            ),
            _ => h2.to_string(),
        })
    }
}

/// The first error of type `T` in `error`'s chain of sources.
fn cause<T: std::error::Error + 'static>(error: &hyper::Error) -> Option<&T> {
    std::iter::successors(std::error::Error::source(error), |e| e.source())
        .find_map(|e| e.downcast_ref::<T>())
}

impl<B: RequestBody> UpstreamClient<B> {
    /// A client for `config`'s upstream, counting its connections in
    /// `stats`.
    pub fn new(config: &ListenerConfig, stats: &Arc<ListenerStats>) -> UpstreamClient<B> {
        let h2 = (config.upstream_protocol != UpstreamProtocol::Http1).then(|| {
            crate::workers::each(|| {
                Arc::new(H2Conn {
                    upstream: config.upstream.clone(),
                    connect_timeout: config.timeouts.connect,
                    idle_timeout: config.timeouts.upstream_idle,
                    open: Mutex::new(Vec::new()),
                    connecting: tokio::sync::Mutex::new(()),
                    sweeping: AtomicBool::new(false),
                    stats: Arc::clone(stats),
                })
            })
        });
        let pools = crate::workers::each(|| {
            Arc::new(Pool {
                upstream: config.upstream.clone(),
                connect_timeout: config.timeouts.connect,
                idle_timeout: config.timeouts.upstream_idle,
                idle: Mutex::new(Vec::new()),
                sweeping: AtomicBool::new(false),
                stats: Arc::clone(stats),
            })
        });
        UpstreamClient { pools, h2 }
    }

    /// This worker's pool.
    fn pool(&self) -> &Arc<Pool<B>> {
        crate::workers::mine(&self.pools)
    }

    /// `host:port` of the upstream, for requests that name no host.
    pub fn authority(&self) -> &Authority {
        &self.pools[0].upstream.authority
    }

    /// Send a request and return the response head. An HTTP/1.1 request
    /// (origin-form URI, `Host` set) goes on a pooled connection, which
    /// returns to the pool when the body ends; a `101 Switching Protocols`
    /// response keeps it for the upgrade. An HTTP/2 request (absolute URI,
    /// whose authority becomes `:authority`) goes on the h2c connection,
    /// if the listener has one.
    pub fn send(
        &self,
        req: Request<B>,
    ) -> impl std::future::Future<Output = Result<Response<PooledBody<B>>, UpstreamError>> + '_
    {
        match &self.h2 {
            // Boxed, and chosen before either future exists: as one async
            // fn, the h2c path's state (connect, handshake, stream) made
            // every request's future twice the size, HTTP/1.1 ones included
            // (960 -> 2,048 bytes), and with it the copying per request.
            Some(h2) if req.version() == http::Version::HTTP_2 => {
                let h2 = crate::workers::mine(h2);
                tokio_util::either::Either::Left(Box::pin(h2.send(req)))
            }
            _ => tokio_util::either::Either::Right(self.send_http1(req)),
        }
    }

    async fn send_http1(&self, req: Request<B>) -> Result<Response<PooledBody<B>>, UpstreamError> {
        let mut req = req.map(Either::Left);
        let pool = self.pool();
        // Whether the request has been replayed once already: see
        // `send_again`.
        let mut replayed = false;
        loop {
            let (mut sender, reused) = match pool.checkout() {
                Some(sender) => (sender, true),
                None => (pool.connect().await?, false),
            };
            // Kept only where sending again is allowed; a fresh connection
            // that fails is the upstream's answer.
            let resend = (reused && !replayed && replayable(&req)).then(|| Head::of(&req));
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let lease = (resp.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Lease {
                        sender,
                        pool: Arc::clone(pool),
                    });
                    return Ok(resp.map(|body| PooledBody {
                        body,
                        lease,
                        _stream: None,
                        length_kept: false,
                    }));
                }
                Err(e) => {
                    let again = send_again(e, reused, resend, &pool.upstream, |body| body)?;
                    req = again.request;
                    replayed |= again.replayed;
                }
            }
        }
    }
}

/// A request to send again, and whether the upstream may have seen it
/// already.
struct Again<B> {
    request: Request<Outgoing<B>>,
    replayed: bool,
}

/// The request to send again after `error` on a connection, or the error
/// to answer with. A request that was never written goes again if its
/// connection was a reused one (it closed under it), as often as that
/// happens: the upstream has not seen it. One that was written and got no
/// response byte goes again only if it can be replayed (`resend`, kept for
/// reused connections only, and by the callers for one replay per request:
/// an upstream that dies of a request, a query of death, must not be
/// handed it once per pooled connection, which for an upstream of several
/// worker processes is one dead worker each). A fresh connection's failure
/// is the upstream's answer.
fn send_again<B, T>(
    mut error: hyper::client::conn::TrySendError<Request<T>>,
    reused: bool,
    resend: Option<Head>,
    upstream: &Upstream,
    unwrap: impl FnOnce(T) -> Outgoing<B>,
) -> Result<Again<B>, UpstreamError> {
    match (error.take_message(), resend) {
        (Some(unsent), _) if reused => {
            tracing::debug!(upstream = %upstream, "connection closed before the request was sent; sending again");
            Ok(Again {
                request: unsent.map(unwrap),
                replayed: false,
            })
        }
        (None, Some(head)) if closed_without_response(error.error()) => {
            tracing::debug!(upstream = %upstream, error = %error.error(), "connection closed under an idempotent request; sending again");
            Ok(Again {
                request: head.into_request(),
                replayed: true,
            })
        }
        _ => Err(UpstreamError::Http(error.into_error())),
    }
}

/// How long the first address family has before the other is tried
/// alongside it: RFC 8305's Connection Attempt Delay, 300 ms as in Go and
/// hyper-util.
const FALLBACK_DELAY: Duration = Duration::from_millis(300);

/// Open a TCP connection to the upstream, for HTTP mode's pool and for
/// each TCP-mode client.
///
/// An IP literal, the usual sidecar upstream, is one plain connect. A
/// name's addresses are tried as Happy Eyeballs does (RFC 8305), so that
/// a dead address first in the list (a node behind DNS round robin, a
/// gone pod, an IPv6 route that drops packets) costs a share of `timeout`
/// rather than all of it; see `connect_name`.
pub async fn connect(upstream: &Upstream, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let Ok(ip) = upstream.host.parse::<IpAddr>() else {
        return connect_name(upstream, timeout).await;
    };
    let connect = TcpStream::connect(SocketAddr::new(ip, upstream.port));
    let stream = match tokio::time::timeout(timeout, connect).await {
        Err(_) => return Err(UpstreamError::ConnectTimeout(timeout)),
        Ok(result) => result.map_err(UpstreamError::Connect)?,
    };
    // Small writes (request heads, interactive TCP traffic) must leave at
    // once, not wait for an ACK.
    stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "TCP keep-alive not set on upstream connection");
    }
    Ok(stream)
}

/// Connect to an upstream name with hyper-util's `HttpConnector`, which
/// already does what a name with several addresses needs: the addresses
/// of the first one's family in getaddrinfo's order (RFC 6724), the other
/// family's from [`FALLBACK_DELAY`] on, or at once when the first family
/// has failed, and each address an equal share of `timeout` within its
/// family. The addresses come from [`resolve`]'s cache through
/// [`CachedResolver`]. The outer timeout keeps the whole attempt within
/// `timeout`, which the fallback family, started late, could overrun.
async fn connect_name(upstream: &Upstream, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use tower_service::Service;

    let mut connector = HttpConnector::new_with_resolver(CachedResolver);
    connector.set_connect_timeout(Some(timeout));
    connector.set_happy_eyeballs_timeout(Some(FALLBACK_DELAY));
    // Small writes (request heads, interactive TCP traffic) must leave at
    // once, not wait for an ACK.
    connector.set_nodelay(true);
    connector.set_keepalive(Some(TCP_KEEPALIVE));
    // The connector takes a URI; `http://` with the upstream's authority
    // (with its port) names nothing more than `host:port`.
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(upstream.authority.clone());
    parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    let uri = http::Uri::from_parts(parts).expect("scheme, authority and path make a URI");
    match tokio::time::timeout(timeout, connector.call(uri)).await {
        Err(_) => Err(UpstreamError::ConnectTimeout(timeout)),
        Ok(Ok(stream)) => Ok(stream.into_inner()),
        Ok(Err(e)) => Err(connect_failure(&e, timeout)),
    }
}

/// sheath's error for a failure of `HttpConnector`, whose own says only
/// "tcp connect error" or "dns error": the I/O error beneath it, so that a
/// refused connection still reads (and is answered) as one, and a connect
/// that timed out (an address's share of the timeout ran out) as a
/// connect timeout.
fn connect_failure(error: &(dyn std::error::Error + 'static), timeout: Duration) -> UpstreamError {
    let io = std::iter::successors(error.source(), |e| e.source())
        .find_map(|e| e.downcast_ref::<io::Error>());
    match io {
        Some(io) if io.kind() == io::ErrorKind::TimedOut => UpstreamError::ConnectTimeout(timeout),
        // The connector's error keeps the one it wraps: rebuilt, with the
        // same kind and wording.
        Some(io) => UpstreamError::Connect(match io.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(io.kind(), io.to_string()),
        }),
        None => UpstreamError::Connect(io::Error::other(error.to_string())),
    }
}

/// The resolver `HttpConnector` asks for a name's addresses: [`resolve`],
/// with its cache and its fallback to the last addresses that worked.
#[derive(Debug, Clone, Copy)]
struct CachedResolver;

impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for CachedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = io::Result<Self::Response>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        Box::pin(async move {
            let ips = resolve(name.as_str()).await?;
            // Port 0: the connector puts the URI's port in.
            Ok(ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, 0))
                .collect::<Vec<_>>()
                .into_iter())
        })
    }
}

/// How long the addresses of an upstream name are reused. Resolving runs
/// getaddrinfo on tokio's blocking pool; once per TCP-mode connection that
/// cost ~10% of the connection's CPU with `localhost`. Short enough to
/// follow DNS changes (Envoy refreshes every 5 s by default).
const RESOLVE_TTL: Duration = Duration::from_secs(5);

/// Resolved upstream names, process-wide. Keys come from the configuration
/// only, so the map stays as small as the set of upstream names.
type ResolveCache = Mutex<HashMap<String, (Instant, Arc<[IpAddr]>)>>;

/// The addresses of `host`, from the cache while fresh. When a new lookup
/// fails, the last addresses that resolved are used rather than failing
/// every connection while the resolver is down.
async fn resolve(host: &str) -> io::Result<Arc<[IpAddr]>> {
    static CACHE: OnceLock<ResolveCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let stale = match cache.lock().expect("poisoned").get(host) {
        Some((at, ips)) if at.elapsed() < RESOLVE_TTL => return Ok(Arc::clone(ips)),
        Some((_, ips)) => Some(Arc::clone(ips)),
        None => None,
    };
    let looked_up = tokio::net::lookup_host((host, 0)).await.and_then(|found| {
        let ips: Arc<[IpAddr]> = found.map(|a| a.ip()).collect();
        if ips.is_empty() {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no address"),
            ))
        } else {
            Ok(ips)
        }
    });
    let ips = match (looked_up, stale) {
        (Ok(ips), _) => ips,
        (Err(e), Some(ips)) => {
            tracing::warn!(host, error = %e, "resolving the upstream failed; using the addresses it last had");
            ips
        }
        (Err(e), None) => return Err(e),
    };
    // After a failure too: asked again after another TTL, not on every
    // connection.
    cache
        .lock()
        .expect("poisoned")
        .insert(host.to_string(), (Instant::now(), Arc::clone(&ips)));
    Ok(ips)
}

/// A request that can be sent again if its connection fails under it: no
/// body, and a method RFC 9110 calls idempotent.
fn replayable<B: Body>(req: &Request<B>) -> bool {
    req.body().is_end_stream() && req.method().is_idempotent()
}

/// How an h2c upstream said it did not process a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unprocessed {
    /// `RST_STREAM` with `REFUSED_STREAM`: this stream only; the
    /// connection takes others.
    Refused,
    /// A GOAWAY whose last stream id is below the stream's: the
    /// connection takes no stream more.
    GoingAway,
}

/// Did the upstream say, in a frame of its own, that it did not process
/// the stream `error` ended? Only then may a request that is not
/// idempotent go again. h2 fails a stream with the upstream's GOAWAY only
/// when the GOAWAY's last stream id is below it, or when the stream was
/// opened after the GOAWAY came, whatever the GOAWAY's error code; a stream
/// the GOAWAY covers fails when the connection closes, as a broken pipe,
/// which says nothing about whether it was processed.
fn unprocessed(error: &hyper::Error) -> Option<Unprocessed> {
    let h2: &h2::Error = cause(error)?;
    if !h2.is_remote() {
        None
    } else if h2.is_go_away() {
        Some(Unprocessed::GoingAway)
    } else if h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
        Some(Unprocessed::Refused)
    } else {
        None
    }
}

/// Did the connection end before a response arrived, as an idle connection
/// the upstream just closed does? Not a malformed response or a timeout.
fn closed_without_response(error: &hyper::Error) -> bool {
    error.is_incomplete_message()
        || error.is_canceled()
        || UpstreamError::io_cause(error).is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            )
        })
}

/// The head of a bodiless request, to send it again.
struct Head {
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
}

impl Head {
    fn of<B>(req: &Request<B>) -> Head {
        Head {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        }
    }

    fn into_request<B>(self) -> Request<Outgoing<B>> {
        let mut req = Request::new(Either::Right(Empty::new()));
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = self.headers;
        req
    }
}

impl<B: RequestBody> Pool<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<IdleConn<B>>> {
        // The list stays consistent even if a holder panicked: every
        // critical section is a single push, pop or retain.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently used connection that can take a request now.
    fn checkout(&self) -> Option<SendRequest<Outgoing<B>>> {
        let mut idle = self.lock();
        let now = Instant::now();
        while let Some(conn) = idle.pop() {
            // The sweep runs every third of the idle timeout; checked here
            // too, no connection is used after it, which is what makes a
            // timeout below the upstream's own a guarantee. Every
            // connection below this one has been idle longer.
            if now.duration_since(conn.since) >= self.idle_timeout {
                idle.clear();
                return None;
            }
            // Not ready means closed: only ready connections are pooled.
            if conn.sender.is_ready() {
                return Some(conn.sender);
            }
        }
        None
    }

    async fn connect(&self) -> Result<SendRequest<Outgoing<B>>, UpstreamError> {
        let stream = connect(&self.upstream, self.connect_timeout).await?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Http)?;
        let upstream = self.upstream.clone();
        let open = self.stats.upstream_opened(UpstreamKind::Http1);
        // Ends when the connection closes: the upstream closed it, or every
        // sender was dropped (evicted, pool gone) and it is idle. An
        // upgraded one (a WebSocket) leaves the count as it is handed over.
        tokio::spawn(async move {
            let _open = open;
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(upstream = %upstream, error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Return a connection whose response has been read in full.
    fn put_back(self: Arc<Self>, mut sender: SendRequest<Outgoing<B>>) {
        if sender.is_ready() {
            self.push(sender);
        } else if !sender.is_closed() {
            // Still finishing the exchange (the request body is being sent
            // after an early response, or, on another worker thread, the
            // connection task is just now reading the end of the body).
            let pool = Arc::downgrade(&self);
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    if let Some(pool) = pool.upgrade() {
                        pool.push(sender);
                    }
                }
            });
        }
    }

    fn push(self: Arc<Self>, sender: SendRequest<Outgoing<B>>) {
        {
            let mut idle = self.lock();
            if idle.len() >= MAX_IDLE {
                return;
            }
            idle.push(IdleConn {
                sender,
                since: Instant::now(),
            });
        }
        if !self.sweeping.load(Ordering::Relaxed) && !self.sweeping.swap(true, Ordering::Relaxed) {
            let idle_timeout = self.idle_timeout;
            tokio::spawn(sweep(
                Arc::downgrade(&self),
                idle_timeout,
                move |pool, now| {
                    pool.lock().retain(|c| {
                        c.sender.is_ready() && now.duration_since(c.since) < idle_timeout
                    });
                },
            ));
        }
    }
}

/// Every third of `idle_timeout`, let `retire` close what has been unused
/// for longer, until `owner` is dropped (a reload that changed the
/// upstream, or shutdown).
async fn sweep<T>(owner: Weak<T>, idle_timeout: Duration, retire: impl Fn(&T, Instant)) {
    // At least 1 ms: an interval must not be zero, whatever was configured.
    let mut tick = tokio::time::interval((idle_timeout / 3).max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(owner) = owner.upgrade() else { return };
        retire(&owner, Instant::now());
    }
}

/// How much of one response the h2c upstream may send ahead of what
/// sheath has passed on to its client. Bytes received and not yet passed
/// on also count against the connection's window, which every request of
/// the worker shares: with hyper's windows (2 MiB a stream, 5 MiB the
/// connection) three clients that stopped reading their downloads held
/// the whole connection window, and every other response on the worker
/// waited for them. So the stream window bounds what one response can
/// hold, as the read buffer of an HTTP/1.1 upstream connection does
/// (400 KiB), and the connection's window is as large as HTTP/2 allows,
/// so that it never runs out before the streams' own do; grpc-go gives
/// connection window back as data arrives, to the same end.
const H2C_STREAM_WINDOW: u32 = 256 * 1024;
/// See [`H2C_STREAM_WINDOW`]: 2^31 - 1, the largest window (RFC 9113 §6.9.1).
const H2C_CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// Most h2c connections a worker opens to one upstream. Past it, a
/// request waits for a stream on the least busy one, as every request did
/// when there was one connection: an upstream that announces no streams at
/// all must not make each request open a connection.
const MAX_H2C_CONNECTIONS: usize = 64;

/// The HTTP/2 connections to an upstream that speaks h2c. One connection
/// carries every request, as many at once as the upstream's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` allows; once every open connection has
/// that many streams in flight, another is opened (as Envoy does), since a
/// request queued behind long-lived streams (gRPC watches) would wait for
/// good. A connection is dropped when it has closed (GOAWAY, a restart) or
/// has had no stream for the upstream idle timeout.
#[derive(Debug)]
struct H2Conn<B> {
    upstream: Upstream,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Oldest first: requests fill the oldest connection with room, so
    /// the newer ones idle out when the load drops.
    open: Mutex<Vec<H2Sender<B>>>,
    /// Held while connecting, so requests that find no room wait for one
    /// handshake instead of each opening their own.
    connecting: tokio::sync::Mutex<()>,
    sweeping: AtomicBool,
    stats: Arc<ListenerStats>,
}

#[derive(Debug)]
struct H2Sender<B> {
    sender: http2::SendRequest<CountedBody<B>>,
    streams: Arc<Streams>,
}

/// The streams of one h2c connection: how many are in flight, and how many
/// the upstream allows (kept up to date by the task driving the connection,
/// since a `SETTINGS` frame can change it at any time).
#[derive(Debug)]
struct Streams {
    in_flight: AtomicUsize,
    limit: AtomicUsize,
    /// When the last stream ended, or the connection opened.
    idle_since: Mutex<Instant>,
}

impl Streams {
    fn has_room(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) < self.limit.load(Ordering::Relaxed)
    }

    fn idle_for(&self, now: Instant) -> Option<Duration> {
        (self.in_flight.load(Ordering::Relaxed) == 0).then(|| {
            now.saturating_duration_since(
                *self.idle_since.lock().unwrap_or_else(|p| p.into_inner()),
            )
        })
    }

    fn begin(self: &Arc<Self>) -> Stream {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Stream(Arc::new(Counted(Arc::clone(self))))
    }
}

/// One request's stream, counted against its connection until both the
/// response body and the request body are dropped (ended, failed or
/// abandoned): a response can end while the request body is still being
/// sent (a `413` to an upload), and the stream stays open, and counted by
/// the upstream, until the upload ends too.
#[derive(Debug, Clone)]
struct Stream(Arc<Counted>);

impl Stream {
    /// The connection's streams this one counts against.
    fn streams(&self) -> &Arc<Streams> {
        &self.0 .0
    }
}

#[derive(Debug)]
struct Counted(Arc<Streams>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

impl<B> H2Sender<B> {
    fn usable(&self, now: Instant, idle_timeout: Duration) -> bool {
        !self.sender.is_closed()
            && self
                .streams
                .idle_for(now)
                .is_none_or(|idle| idle < idle_timeout)
    }
}

impl<B: RequestBody> H2Conn<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<H2Sender<B>>> {
        // Every critical section is a retain, a push or a scan.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream on the oldest open connection with room for one, after
    /// dropping the connections that closed or idled out. Past
    /// [`MAX_H2C_CONNECTIONS`], the least busy one, room or not. Never on
    /// the connection whose streams are `avoid`: the one that refused the
    /// request being sent again.
    fn checkout(
        &self,
        avoid: Option<&Arc<Streams>>,
    ) -> Option<(http2::SendRequest<CountedBody<B>>, Stream)> {
        let mut open = self.lock();
        let now = Instant::now();
        // Dropping the last sender lets a connection close once its
        // streams in flight are done.
        open.retain(|c| c.usable(now, self.idle_timeout));
        let candidates = open
            .iter()
            .filter(|c| avoid.is_none_or(|a| !Arc::ptr_eq(&c.streams, a)));
        let pick = match candidates.clone().find(|c| c.streams.has_room()) {
            Some(c) => c,
            None if open.len() >= MAX_H2C_CONNECTIONS => {
                candidates.min_by_key(|c| c.streams.in_flight.load(Ordering::Relaxed))?
            }
            None => return None,
        };
        Some((pick.sender.clone(), pick.streams.begin()))
    }

    /// Stop handing out the connection a request just failed on; streams
    /// in flight on it finish there.
    fn forget(&self, streams: &Arc<Streams>) {
        self.lock().retain(|c| !Arc::ptr_eq(&c.streams, streams));
    }

    /// A stream, on an open connection other than `avoid` (see
    /// [`H2Conn::checkout`]) or a new one, and whether the connection was
    /// open already.
    async fn sender(
        self: &Arc<Self>,
        avoid: Option<&Arc<Streams>>,
    ) -> Result<(http2::SendRequest<CountedBody<B>>, Stream, bool), UpstreamError> {
        if let Some((sender, stream)) = self.checkout(avoid) {
            return Ok((sender, stream, true));
        }
        let _connecting = self.connecting.lock().await;
        // Someone else may have connected while this request waited.
        if let Some((sender, stream)) = self.checkout(avoid) {
            return Ok((sender, stream, true));
        }
        let stream = connect(&self.upstream, self.connect_timeout).await?;
        let handshake = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(H2C_STREAM_WINDOW)
            .initial_connection_window_size(H2C_CONNECTION_WINDOW)
            // hyper's 16 KiB failed with a 502 heads that the HTTP/1.1
            // path passes on (large cookies, a long CSP); sheath's own
            // bound for a client's request head instead.
            .max_header_list_size(super::http::MAX_HEADER_BYTES as u32)
            .handshake(TokioIo::new(stream));
        let (sender, connection) = match tokio::time::timeout(self.connect_timeout, handshake).await
        {
            Err(_) => return Err(UpstreamError::ConnectTimeout(self.connect_timeout)),
            Ok(result) => result.map_err(UpstreamError::Http)?,
        };
        // Until the upstream's SETTINGS are seen, hyper's assumption (100,
        // the least RFC 9113 recommends servers allow).
        let streams = Arc::new(Streams {
            in_flight: AtomicUsize::new(0),
            limit: AtomicUsize::new(connection.current_max_send_streams()),
            idle_since: Mutex::new(Instant::now()),
        });
        let upstream = self.upstream.clone();
        let limit = Arc::clone(&streams);
        let open = self.stats.upstream_opened(UpstreamKind::H2c);
        tokio::spawn(async move {
            let _open = open;
            let mut connection = std::pin::pin!(connection);
            let ended = std::future::poll_fn(|cx| {
                let polled = std::future::Future::poll(connection.as_mut(), cx);
                // hyper drives the HTTP/2 connection in a task of its own;
                // this one is woken when a request is handed over or a
                // queued one gets a stream. The limit read then is h2's
                // current view of the upstream's SETTINGS, so a change
                // reaches the checkouts that follow the next request.
                limit
                    .limit
                    .store(connection.current_max_send_streams(), Ordering::Relaxed);
                polled
            });
            if let Err(e) = ended.await {
                tracing::debug!(upstream = %upstream, error = %e, "upstream h2c connection ended");
            }
        });
        let stream = streams.begin();
        self.lock().push(H2Sender {
            sender: sender.clone(),
            streams,
        });
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            // So an idle sidecar holds no upstream connection open forever.
            let idle_timeout = self.idle_timeout;
            tokio::spawn(sweep(
                Arc::downgrade(self),
                idle_timeout,
                move |conn, now| conn.lock().retain(|c| c.usable(now, idle_timeout)),
            ));
        }
        Ok((sender, stream, false))
    }

    async fn send(
        self: &Arc<Self>,
        req: Request<B>,
    ) -> Result<Response<PooledBody<B>>, UpstreamError> {
        let mut req = req.map(Either::Left);
        // The connection that did not process the request, once it has
        // said so: the request is sent again once for that, elsewhere.
        let mut refused_by: Option<Arc<Streams>> = None;
        // Whether a request the upstream may have processed has been sent
        // again once already (see `send_again`).
        let mut replayed = false;
        loop {
            let (mut sender, stream, reused) = self.sender(refused_by.as_ref()).await?;
            let replay = reused && !replayed && replayable(&req);
            // hyper does not hand back a request once h2 has it, so the
            // head to send again is copied beforehand: of every bodiless
            // request while a refusal may still be answered by sending it
            // again (any stream may be refused), and of a replayable one
            // on a reused connection.
            let head = ((refused_by.is_none() && req.body().is_end_stream()) || replay)
                .then(|| Head::of(&req));
            let counted = req.map(|body| CountedBody {
                body,
                _stream: stream.clone(),
            });
            match sender.try_send_request(counted).await {
                Ok(resp) => {
                    return Ok(resp.map(|body| PooledBody {
                        body,
                        lease: None,
                        _stream: Some(stream),
                        length_kept: false,
                    }))
                }
                Err(e) => {
                    let unprocessed = unprocessed(e.error());
                    if unprocessed == Some(Unprocessed::GoingAway) {
                        // h2 opens no stream more on a connection that got a
                        // GOAWAY, and hyper notices only when it next polls
                        // it: until then, other requests must not get it.
                        self.forget(stream.streams());
                    }
                    match (unprocessed, head) {
                        (Some(_), Some(head)) if refused_by.is_none() => {
                            tracing::debug!(
                                upstream = %self.upstream,
                                error = UpstreamError::h2_cause(e.error()).as_deref(),
                                "the upstream did not process the request; sending it again on another connection"
                            );
                            refused_by = Some(Arc::clone(stream.streams()));
                            req = head.into_request();
                        }
                        (_, head) => {
                            let resend = head.filter(|_| replay);
                            let again = send_again(e, reused, resend, &self.upstream, |c| c.body)?;
                            req = again.request;
                            replayed |= again.replayed;
                            // Sent again on a new connection, not on one that
                            // may not know yet that it is closing: one retry
                            // at most.
                            self.forget(stream.streams());
                        }
                    }
                }
            }
        }
    }
}

/// A request body on an h2c stream, which holds its stream's count until
/// hyper drops it (sent in full, or the stream reset).
#[derive(Debug)]
struct CountedBody<B> {
    body: Outgoing<B>,
    _stream: Stream,
}

impl<B: RequestBody> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = <Outgoing<B> as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection a response body came from, to return when it ends.
#[derive(Debug)]
struct Lease<B> {
    sender: SendRequest<Outgoing<B>>,
    pool: Arc<Pool<B>>,
}

/// An upstream response body. Once it has been read to its end, its
/// connection goes back to the pool; dropped earlier, the connection is
/// closed, since the rest of the body would still be on it.
#[derive(Debug)]
pub struct PooledBody<B: RequestBody = Incoming> {
    body: Incoming,
    lease: Option<Lease<B>>,
    /// Over h2c: the stream, counted against its connection's limit until
    /// the body is dropped.
    _stream: Option<Stream>,
    /// See [`PooledBody::keep_content_length`].
    length_kept: bool,
}

impl<B: RequestBody> PooledBody<B> {
    /// Have hyper's HTTP/1 server write this bodiless response's
    /// `Content-Length`, as a `304` may carry it (the length of the `200`
    /// it stands for, RFC 9110 §8.6). For a body that says it has ended,
    /// hyper drops any length but `0` as if it described that body; for
    /// one that may still have data and an unknown size, it writes the
    /// header's own value, having checked it, and then sends no body, a
    /// `304` having none. This body then never ends by itself, so it is
    /// only for responses that cannot have one.
    pub fn keep_content_length(&mut self) {
        self.length_kept = true;
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.pool.put_back(lease.sender);
        }
    }
}

impl<B: RequestBody> Body for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut frame = Pin::new(&mut this.body).poll_frame(cx);
        match BodyProgress::of(&frame, &this.body) {
            BodyProgress::Going => {}
            BodyProgress::Ended => this.release(),
            // A failed body leaves the connection unusable.
            BodyProgress::Failed => this.lease = None,
        }
        if let Poll::Ready(Some(Ok(frame))) = &mut frame {
            // Data frames, all but the last of a body, pass untouched.
            if let Some(trailers) = frame.trailers_mut() {
                super::forward::strip_framing_from_trailers(trailers);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        !self.length_kept && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.length_kept {
            // An exact size would have to be the header's value (hyper
            // asserts so in debug builds) and would not be what this body
            // holds.
            return SizeHint::default();
        }
        self.body.size_hint()
    }
}

impl<B: RequestBody> Drop for PooledBody<B> {
    fn drop(&mut self) {
        // Bodies with nothing to read (HEAD, 204, 304, `Content-Length: 0`)
        // are never polled.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn an_upstream_name_is_resolved_once_per_ttl_and_connected_by_name() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let first = resolve("localhost").await.unwrap();
        assert!(first.iter().any(|ip| ip.is_loopback()));
        // The second lookup within the TTL is the same allocation: the
        // cache answered, not getaddrinfo.
        let second = resolve("localhost").await.unwrap();
        assert!(Arc::ptr_eq(&first, &second));

        // A name whose first address refuses (::1 when only 127.0.0.1
        // listens, wherever localhost has both) still connects.
        let upstream = crate::config::parse_upstream(&format!("localhost:{port}"), false).unwrap();
        let (connected, accepted) = tokio::join!(
            connect(&upstream, Duration::from_secs(5)),
            listener.accept()
        );
        let stream = connected.unwrap();
        assert_eq!(
            stream.peer_addr().unwrap(),
            accepted.unwrap().0.local_addr().unwrap()
        );
    }

    /// `HttpConnector`'s errors, which say only "tcp connect error", still
    /// tell a connect timeout (504) from a refusal (502) once sheath has
    /// taken the I/O error from beneath them.
    #[tokio::test]
    async fn connector_errors_keep_a_timeout_and_a_refusal_apart() {
        use hyper_util::client::legacy::connect::HttpConnector;
        use socket2::{Domain, Socket, Type};
        use tower_service::Service;

        // A black hole: a backlog of 0 takes one connection, never
        // accepted; the kernel drops SYNs to the full queue.
        let hole = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        hole.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        hole.listen(0).unwrap();
        let hole_addr = hole.local_addr().unwrap().as_socket().unwrap();
        let _queued = std::net::TcpStream::connect(hole_addr).unwrap();
        let refusing = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refusing_addr = refusing.local_addr().unwrap();
        drop(refusing);

        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(100)));
        let configured = Duration::from_secs(7);
        let uri = |addr: SocketAddr| format!("http://{addr}/").parse().unwrap();

        let timed_out = connector.call(uri(hole_addr)).await.unwrap_err();
        match connect_failure(&timed_out, configured) {
            UpstreamError::ConnectTimeout(t) => assert_eq!(t, configured),
            other => panic!("{timed_out:?} became {other:?}"),
        }
        let refused = connector.call(uri(refusing_addr)).await.unwrap_err();
        match connect_failure(&refused, configured) {
            UpstreamError::Connect(e) => {
                assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
                // As the system words it, as before the connector.
                let direct = std::net::TcpStream::connect(refusing_addr).unwrap_err();
                assert_eq!(e.to_string(), direct.to_string());
            }
            other => panic!("{refused:?} became {other:?}"),
        }
    }

    fn client_for(upstream: std::net::SocketAddr) -> UpstreamClient<Empty<Bytes>> {
        let text = format!(
            "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"http\"\n"
        );
        let config = Config::from_toml(std::path::Path::new("test.toml"), &text).unwrap();
        UpstreamClient::new(&config.listeners[0], &Arc::default())
    }

    fn request(method: http::Method) -> Request<Empty<Bytes>> {
        Request::builder()
            .method(method)
            .uri("/")
            .header(http::header::HOST, "localhost")
            .body(Empty::new())
            .unwrap()
    }

    /// Accept one connection and answer one request on it with `ok`.
    async fn serve_one(listener: &TcpListener) -> TcpStream {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before a request came");
            head.extend_from_slice(&buf[..n]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        stream
    }

    /// Send one request and serve it on the next accepted connection. The
    /// server side of that connection closes as soon as the response body
    /// has been read.
    async fn exchange(
        client: &UpstreamClient<Empty<Bytes>>,
        listener: &TcpListener,
        method: http::Method,
    ) -> Result<Bytes, UpstreamError> {
        let serve = async {
            let _stream = serve_one(listener).await;
            std::future::pending::<std::convert::Infallible>().await
        };
        tokio::select! {
            result = async {
                let resp = client.send(request(method)).await?;
                assert_eq!(resp.status(), StatusCode::OK);
                Ok(resp.into_body().collect().await.unwrap().to_bytes())
            } => result,
            never = serve => match never {},
        }
    }

    /// The race an upstream's keep-alive timeout causes: the pool offers a
    /// connection the upstream has just closed, and the request is written
    /// on it before its close is read (single-threaded, with no await
    /// between the close and the request, the connection's task cannot see
    /// the close first). The write succeeds; the response never comes.
    async fn request_on_a_just_closed_connection(
        method: http::Method,
    ) -> Result<Bytes, UpstreamError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = client_for(listener.local_addr().unwrap());

        let first = exchange(&client, &listener, http::Method::GET).await;
        assert_eq!(first.unwrap(), "ok");
        {
            let idle = client.pool().lock();
            assert_eq!(idle.len(), 1, "the connection was returned");
            assert!(idle[0].sender.is_ready(), "its close is not seen yet");
        }
        let second = exchange(&client, &listener, method);
        tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("answered in time")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_idempotent_request_lost_with_a_closed_connection_is_sent_again() {
        for method in [http::Method::GET, http::Method::HEAD, http::Method::DELETE] {
            let second = request_on_a_just_closed_connection(method.clone()).await;
            let body = second.unwrap_or_else(|e| panic!("{method} not sent again: {e:?}"));
            if method != http::Method::HEAD {
                assert_eq!(body, "ok");
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_post_lost_with_a_closed_connection_is_not_sent_twice() {
        let second = request_on_a_just_closed_connection(http::Method::POST).await;
        match second {
            Err(UpstreamError::Http(e)) => assert!(e.is_incomplete_message(), "{e:?}"),
            other => panic!("a POST must not be sent twice: {other:?}"),
        }
    }

    /// An upstream that dies of a request (a query of death) closes each
    /// connection it reads it on without answering. With three connections
    /// pooled to it, an idempotent request reaches it twice: once, and
    /// once more on another connection, as for a keep-alive race; not once
    /// per pooled connection and then on a new one.
    #[tokio::test(flavor = "current_thread")]
    async fn a_request_the_upstream_dies_of_is_sent_again_once_not_once_per_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = client_for(listener.local_addr().unwrap());
        let deaths = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&deaths);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let deaths = Arc::clone(&counted);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                            continue;
                        };
                        if head.starts_with(b"GET /die ") {
                            deaths.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        head.drain(..end + 4);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        stream.write_all(ok).await.unwrap();
                    }
                });
            }
        });
        let get = |path: &str| {
            let mut req = request(http::Method::GET);
            *req.uri_mut() = path.parse().unwrap();
            client.send(req)
        };
        // Three requests at once open three connections, which go back
        // to the pool as their bodies end.
        let (a, b, c) = tokio::join!(get("/"), get("/"), get("/"));
        for resp in [a, b, c] {
            let body = resp.unwrap().into_body().collect().await.unwrap();
            assert_eq!(body.to_bytes(), "ok");
        }
        assert_eq!(client.pool().lock().len(), 3, "three connections pooled");

        let died = tokio::time::timeout(Duration::from_secs(10), get("/die"))
            .await
            .expect("answered in time");
        match died {
            Err(UpstreamError::Http(e)) => assert!(e.is_incomplete_message(), "{e:?}"),
            other => panic!("the upstream answered nothing: {other:?}"),
        }
        assert_eq!(
            deaths.load(Ordering::SeqCst),
            2,
            "times the request that kills the upstream reached it"
        );
    }

    /// A connection whose response was not read to its end is not reused.
    #[tokio::test(flavor = "current_thread")]
    async fn a_body_dropped_unread_closes_its_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = client_for(listener.local_addr().unwrap());
        let serve = async {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await.unwrap();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                .await
                .unwrap();
            stream
        };
        let (resp, _stream) = tokio::join!(client.send(request(http::Method::GET)), serve);
        drop(resp.unwrap());
        assert!(client.pool().lock().is_empty());
    }
}
