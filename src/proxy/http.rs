//! HTTP mode: HTTP/1.1 or HTTP/2 towards the client (chosen by ALPN),
//! pooled keep-alive HTTP/1.1 or multiplexed HTTP/2 (h2c) towards the
//! upstream, as `upstream_protocol` says.
//!
//! Bodies stream in both directions and are never buffered whole. WebSocket
//! and other `Upgrade` requests become a byte tunnel once the upstream
//! answers 101. Upstream failures are answered by sheath itself: 502 when
//! the upstream refuses or cannot be reached, 504 when it is too slow.

use std::convert::Infallible;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST, TE};
use http::uri::Authority;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::server::TlsStream;

use super::client_body::{BodyStatus, ClientBody, Stall};
use super::forward;
use super::io::{Activity, Side, Tracked};
use super::upstream::{PooledBody, UpstreamError};
use super::ConnInfo;
use crate::config::{ListenerConfig, Upstream};
use crate::tls::ALPN_H2;

/// Response bodies: the upstream's, streamed, or a short one of sheath's own.
pub type ProxyBody = Either<PooledBody<ClientBody>, Full<Bytes>>;

/// Largest request head accepted from a client (HTTP/1 head, chunked
/// trailers, HTTP/2 header list); past it, HTTP/1 gets 431 and a close.
/// Also the largest response head read from an h2c upstream.
pub(super) const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent HTTP/2 streams per client connection (nginx's default).
/// With [`H2_SEND_BUF`] it bounds what one client that asks for many
/// downloads and never reads them can make sheath hold: each stream keeps
/// its send buffer and what was last read from its upstream, ~220 KiB,
/// so ~28 MiB per connection (~295 MiB with 256 streams and hyper's
/// 400 KiB send buffers; release build, 16 MiB downloads).
const MAX_H2_STREAMS: u32 = 128;
/// Response bytes queued per HTTP/2 stream before sheath stops reading
/// the upstream's body for it. Bulk HTTP/2 downloads cost ~6% more CPU
/// than with hyper's 400 KiB (medians of three 2 GB runs; fewer bytes
/// moved per wakeup).
const H2_SEND_BUF: usize = 64 * 1024;
/// HTTP/2 streams the client reset before sheath took them up, after which
/// the connection ends with GOAWAY ENHANCE_YOUR_CALM: a client opening and
/// resetting streams as fast as it can (CVE-2023-44487) costs sheath a
/// stream's setup each time and the client nothing. h2's own default, said
/// here so that a change of default cannot lift it.
const MAX_H2_PENDING_RESETS: usize = 20;
/// HTTP/2 streams sheath itself resets over a connection's life for the
/// client's errors on them (a body longer than its content-length, a
/// malformed header block, a stream past [`MAX_H2_STREAMS`]), after which
/// the connection ends with GOAWAY ENHANCE_YOUR_CALM. Each such reset
/// frees a stream slot while the upstream request it began may go on
/// working, so without a bound one connection keeps any number of upstream
/// requests busy (CVE-2025-8671, "MadeYouReset"); hyper's default of 1,024
/// let one connection have 1,088 upstream requests in flight at once. A
/// client that heeds SETTINGS never comes near 128.
const MAX_H2_LOCAL_RESETS: usize = 128;

/// Serve one TLS connection as HTTP until it closes, goes idle, or drains.
///
/// A plain function around an `async move` block rather than an async fn:
/// an async fn moves its arguments into locals of its state machine, so
/// the 1.2 KiB TLS stream would take room twice in a future that every
/// idle connection keeps.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would store the TLS stream twice"
)]
pub fn serve(
    mut stream: TlsStream<TcpStream>,
    conn: ConnInfo,
    permit: OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
        let config = Arc::clone(&conn.listener.config);
        // HTTP/1 has one bound for the first request head, whether it is
        // spent here or in hyper; an HTTP/2 connection that says nothing is
        // bounded by the idle timeout, as it was before this wait.
        let first_bytes_limit = if h2 {
            config.timeouts.idle
        } else {
            config.timeouts.header_read
        };
        let waiting_since = Instant::now();
        if !first_bytes(&mut stream, &conn, &config, first_bytes_limit).await {
            return;
        }
        let header_read = config
            .timeouts
            .header_read
            .saturating_sub(waiting_since.elapsed())
            .max(std::time::Duration::from_millis(1));
        // Boxed so that the hyper connection's state machine is allocated
        // only now, not as part of every connection task from its start.
        let connection = Box::pin(serve_http(stream, conn, permit, h2, header_read));
        connection.await
    }
}

/// The HTTP connection proper, once the client has sent something.
async fn serve_http(
    stream: TlsStream<TcpStream>,
    conn: ConnInfo,
    permit: OwnedSemaphorePermit,
    h2: bool,
    header_read: std::time::Duration,
) {
    let config = Arc::clone(&conn.listener.config);
    let activity = Activity::new(Some(Arc::clone(&conn.stats)));
    let io = TokioIo::new(Tracked::new(stream, activity.clone(), Side::Client));
    let first_request = Arc::new(tokio::sync::Notify::new());
    let ctx = Arc::new(RequestCtx {
        conn: conn.clone(),
        activity: activity.clone(),
        // An upgraded connection outlives the HTTP connection future, so the
        // tunnel keeps the slot too.
        permit: Arc::new(permit),
        first_request: Arc::clone(&first_request),
        client_addr: forward::ClientAddr::new(conn.peer),
    });
    let service = service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        ctx.first_request.notify_one();
        // Boxed: hyper moves the future it is given into its dispatcher
        // (HTTP/1) or a new task (HTTP/2); a pointer instead of the ~2 KiB
        // request future.
        Box::pin(async move { Ok::<_, Infallible>(proxy(req, ctx).await) })
    });
    let result = if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_H2_STREAMS)
            .max_pending_accept_reset_streams(MAX_H2_PENDING_RESETS)
            .max_local_error_reset_streams(MAX_H2_LOCAL_RESETS)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_send_buf_size(H2_SEND_BUF);
        drive(
            builder.serve_connection(io, service),
            &conn,
            &activity,
            &config,
            &first_request,
        )
        .await
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read)
            // The head's own size: the read buffer's bound alone lets a
            // whole head through when it arrives in one read, and one
            // plaintext read from TLS can hold far more than 64 KiB.
            .max_header_size(MAX_HEADER_BYTES)
            .max_buf_size(MAX_HEADER_BYTES)
            .writev(false);
        drive(
            builder.serve_connection(io, service).with_upgrades(),
            &conn,
            &activity,
            &config,
            &first_request,
        )
        .await
    };
    if let Err(reason) = result {
        tracing::debug!(listener = %config.name, peer = %conn.peer, reason, "HTTP connection ended");
    }
}

/// Wait until the client has sent something before building the HTTP
/// connection. An idle TLS connection then holds only its TLS state: hyper
/// allocates its read buffer (8 KiB, zeroed by tokio-rustls on the first
/// read) and its connection state as soon as it is polled. With the boxed
/// connection in `serve`, this took the memory per idle connection in
/// `benches/compare.py` (W7, 2000 connections) from 29.5 KiB to 14.2 KiB.
///
/// Returns false when the connection should close instead: nothing came
/// within `limit` or the maximum lifetime, or the connection was told to
/// close (a drain, a reload that moved the upstream) and nothing came
/// within the first-request grace.
async fn first_bytes(
    stream: &mut TlsStream<TcpStream>,
    conn: &ConnInfo,
    config: &ListenerConfig,
    limit: std::time::Duration,
) -> bool {
    if super::io::tls_has_pending(stream) {
        return true;
    }
    let tcp = stream.get_ref().0;
    let lifetime = super::tcp::max_lifetime(conn.since, config.timeouts.max_lifetime);
    tokio::select! {
        _ = tcp.readable() => return true,
        _ = tokio::time::sleep(limit) => return false,
        _ = lifetime => return false,
        _ = conn.drain.abort.cancelled() => return false,
        _ = conn.told_to_close() => {}
    }
    // Told to close: a request may be on its way (the client cannot know
    // it was never read), so give it the same short grace as `drive` does.
    tokio::select! {
        _ = tcp.readable() => true,
        _ = tokio::time::sleep(FIRST_REQUEST_GRACE) => false,
        _ = conn.drain.abort.cancelled() => false,
    }
}

/// The two connection kinds sheath serves, as far as draining goes.
trait GracefulConnection: std::future::Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

impl<I, S, E> GracefulConnection for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, ProxyBody>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self)
    }
}

/// Run a connection future with graceful shutdown, idle and abort handling.
async fn drive<C: GracefulConnection>(
    conn_future: C,
    conn: &ConnInfo,
    activity: &Activity,
    config: &ListenerConfig,
    first_request: &tokio::sync::Notify,
) -> Result<(), String> {
    let mut conn_future = pin!(conn_future);
    let mut draining = false;
    // A connection accepted just before the drain began has a request on
    // its way: closing it now would fail that request (the client cannot
    // know it was never read). Wait for it, briefly, then close.
    let mut served_one = false;
    let mut waiting_first: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let lifetime = super::tcp::max_lifetime(conn.since, config.timeouts.max_lifetime);
    let mut lifetime = pin!(lifetime);
    loop {
        tokio::select! {
            r = conn_future.as_mut() => return r.map_err(|e| e.to_string()),
            _ = lifetime.as_mut(), if !draining => {
                // Old enough: finish what is in flight, then close, so the
                // client reconnects under current trust and certificate.
                draining = true;
                conn_future.as_mut().graceful_shutdown();
            }
            _ = first_request.notified(), if !served_one => {
                served_one = true;
                if waiting_first.take().is_some() {
                    conn_future.as_mut().graceful_shutdown();
                }
            }
            _ = async { waiting_first.as_mut().expect("guarded").await }, if waiting_first.is_some() => {
                waiting_first = None;
                conn_future.as_mut().graceful_shutdown();
            }
            _ = conn.told_to_close(), if !draining => {
                // HTTP/1: close after the response in flight; HTTP/2: GOAWAY,
                // letting open streams finish.
                draining = true;
                if served_one {
                    conn_future.as_mut().graceful_shutdown();
                } else {
                    waiting_first = Some(Box::pin(tokio::time::sleep(FIRST_REQUEST_GRACE)));
                }
            }
            _ = activity.idle(config.timeouts.idle) => return Err("idle timeout".into()),
            _ = conn.drain.abort.cancelled() => return Err("drain timeout".into()),
        }
    }
}

struct RequestCtx {
    conn: ConnInfo,
    activity: Arc<Activity>,
    permit: Arc<OwnedSemaphorePermit>,
    first_request: Arc<tokio::sync::Notify>,
    client_addr: forward::ClientAddr,
}

/// How long a draining connection that has not sent a request yet is
/// given to send one.
const FIRST_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

async fn proxy(req: Request<Incoming>, ctx: Arc<RequestCtx>) -> Response<ProxyBody> {
    let started = Instant::now();
    let listener = &ctx.conn.listener;
    let config = &listener.config;
    // Copied for the request log line only when that line will be written.
    let request_line = tracing::enabled!(tracing::Level::INFO)
        .then(|| (req.method().clone(), req.uri().path().to_owned()));
    let version = req.version();
    // Only a request with a body can wait for `100 Continue`: a bodiless
    // one (nearly every GET) looks no further.
    let expects_continue = version == Version::HTTP_11
        && !req.body().is_end_stream()
        && req
            .headers()
            .get(EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));

    let response = match forward_request(req, &ctx).await {
        Ok(resp) => resp,
        Err(failure) => {
            if failure.is_connect_failure() {
                ctx.conn
                    .stats
                    .upstream_connect_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let mut resp = failure.response(&config.upstream);
            if expects_continue {
                // Most of sheath's answers come before the body was asked
                // for, so with no `100` sent: the client cannot tell
                // whether the body is still read, nor where its next
                // request would begin. RFC 9110 §10.1.1 has the server
                // say whether it closes; it does, once it has read what
                // the client sends anyway.
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    };
    ctx.conn
        .stats
        .response(response.status().as_u16(), started.elapsed());
    if let Some((method, path)) = request_line {
        tracing::info!(
            listener = %config.name,
            peer = %ctx.conn.peer,
            client = ctx.conn.identity.as_ref().and_then(|i| i.principal()).unwrap_or("-"),
            method = %method,
            path = %path,
            version = ?version,
            status = response.status().as_u16(),
            duration_ms = started.elapsed().as_millis() as u64,
            "request"
        );
    }
    response
}

/// Why a request got an answer from sheath instead of the upstream.
#[derive(Debug)]
enum Failure {
    Refused,
    Unreachable(String),
    ConnectTimeout,
    /// The connection failed after it was made, or the response cannot be
    /// passed on.
    BadResponse(String),
    ResponseTimeout,
    /// The client sent nothing of its request body for `idle`.
    BodyTimeout,
    BadRequest(&'static str),
    NotImplemented(&'static str),
}

impl Failure {
    /// The upstream could not be reached at all (as opposed to answering
    /// too slowly or the request being refused by sheath).
    fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            Failure::Refused | Failure::Unreachable(_) | Failure::ConnectTimeout
        )
    }

    fn response(&self, upstream: &Upstream) -> Response<ProxyBody> {
        let (status, text) = match self {
            Failure::Refused => (
                StatusCode::BAD_GATEWAY,
                format!("upstream {upstream} refused the connection"),
            ),
            Failure::Unreachable(reason) | Failure::BadResponse(reason) => (
                StatusCode::BAD_GATEWAY,
                format!("upstream {upstream} failed: {reason}"),
            ),
            Failure::ConnectTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("upstream {upstream} did not accept the connection in time"),
            ),
            Failure::ResponseTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("upstream {upstream} did not respond in time"),
            ),
            Failure::BodyTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "the request body stopped coming".to_string(),
            ),
            Failure::BadRequest(reason) => (StatusCode::BAD_REQUEST, (*reason).to_string()),
            Failure::NotImplemented(reason) => (StatusCode::NOT_IMPLEMENTED, (*reason).to_string()),
        };
        tracing::warn!(upstream = %upstream, status = status.as_u16(), reason = %text, "answering for the upstream");
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!(
            "{} {}: {text}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )))));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Failure::NotImplemented(_) = self {
            // The body was framed by its last coding, chunked, but a
            // message with a coding sheath does not read is one that
            // other parsers on the path may have framed otherwise: no
            // request after it is read on this connection, as with both a
            // length and chunked (nginx closes after a 501 too). The body
            // is still read, and discarded, before the close.
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

async fn forward_request(
    mut req: Request<Incoming>,
    ctx: &RequestCtx,
) -> Result<Response<ProxyBody>, Failure> {
    let listener = &ctx.conn.listener;
    let config = &listener.config;
    let Some(client) = &listener.http else {
        return Err(Failure::Unreachable(
            "no HTTP client for this listener".into(),
        ));
    };

    // Only HTTP/1.1 can switch protocols this way; HTTP/2 has no Upgrade.
    // A refused upgrade loses its `Upgrade` with the hop-by-hop headers.
    let upgrading = req.version() == Version::HTTP_11
        && req.headers().contains_key(http::header::UPGRADE)
        && forward::has_token(req.headers(), &CONNECTION, "upgrade")
        && forward::upgrade_allowed(req.headers());
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));

    let host = request_host(&req, &ctx.client_addr)?;

    // Only HTTP/1.1 carries Upgrade, so upgrades never go over h2c.
    let h2c = !upgrading && config.upstream_protocol.h2c_for(req.version());
    // `TE: trailers` says the client reads trailers, and sheath passes
    // them on, so it goes on to the upstream (the one TE an HTTP/2 request
    // may carry; gRPC servers require it).
    let te_trailers = !upgrading && forward::has_token(req.headers(), &TE, "trailers");

    let (mut parts, body) = req.into_parts();
    // The request's own path and query become the upstream request target
    // as they are: no copy, no second parse.
    let path_and_query = std::mem::take(&mut parts.uri)
        .into_parts()
        .path_and_query
        .filter(|pq| pq.as_str().starts_with('/'))
        // CONNECT and asterisk-form requests are not proxied.
        .ok_or(Failure::BadRequest(
            "only origin-form request targets are proxied",
        ))?;

    let body = ClientBody::new(body, &config.client_auth.forward);
    // Only a body without a length has a transfer coding, so only then are
    // the codings read. Refused after the body is wrapped, which reads
    // what the client still sends before the connection closes.
    if body.size_hint().exact().is_none() && !forward::chunked_or_none(&parts.headers) {
        return Err(Failure::NotImplemented(
            "transfer codings other than chunked are not supported",
        ));
    }
    let body_status = body.status();
    let head_over_h2 = parts.version == Version::HTTP_2 && parts.method == http::Method::HEAD;
    let mut upstream_req = Request::new(body);
    *upstream_req.method_mut() = parts.method;
    *upstream_req.headers_mut() = parts.headers;
    forward::strip_hop_by_hop(upstream_req.headers_mut(), upgrading);
    if !upstream_req.body().is_end_stream() {
        // A length that can be read two ways matters only with a body:
        // `0` is 0 however it is written, and a bodiless request (nearly
        // every GET) saves the lookup.
        forward::plain_length(upstream_req.headers_mut());
    }
    if h2c {
        // HTTP/2 names the host in :authority, which hyper takes from an
        // absolute URI; a Host header beside it would only be a second copy.
        let authority = host
            .as_ref()
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| client.authority().clone());
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(authority);
        uri.path_and_query = Some(path_and_query);
        *upstream_req.uri_mut() =
            Uri::from_parts(uri).expect("scheme, authority and path make a URI");
        *upstream_req.version_mut() = Version::HTTP_2;
        upstream_req.headers_mut().remove(HOST);
    } else {
        *upstream_req.uri_mut() = Uri::from(path_and_query);
        *upstream_req.version_mut() = Version::HTTP_11;
        let headers = upstream_req.headers_mut();
        match &host {
            // HTTP/2's `:authority`, or an absolute-form target's host.
            Some(host) if headers.get(HOST) != Some(host) => {
                headers.insert(HOST, host.clone());
            }
            Some(_) => {}
            // An HTTP/1.0 client may name no host; HTTP/1.1 requires one.
            None => {
                if let Ok(authority) = HeaderValue::from_str(client.authority().as_str()) {
                    headers.insert(HOST, authority);
                }
            }
        }
        if parts.version == Version::HTTP_2 {
            forward::join_cookies(headers);
        }
    }
    let headers = upstream_req.headers_mut();
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
        if !h2c {
            // HTTP/1.1 makes TE a hop-by-hop field, which its sender must
            // name in `Connection` (RFC 9110 §10.1.4).
            headers.insert(CONNECTION, HeaderValue::from_static("te"));
        }
    }
    forward::set_forwarded(headers, &ctx.client_addr, host.as_ref());
    forward::set_identity(
        headers,
        &config.client_auth.forward,
        ctx.conn.identity.as_deref(),
    );

    let timeouts = config.timeouts;
    let sent = response_head(&timeouts, client.send(upstream_req), &body_status);
    let mut resp = match sent.await {
        Err(failure) => return Err(failure),
        Ok(Err(e)) => return Err(classify(e, &body_status)),
        Ok(Ok(resp)) => resp,
    };
    if resp.body().size_hint().exact().is_none() && !forward::chunked_or_none(resp.headers()) {
        return Err(Failure::BadResponse(
            "its response has a transfer coding other than chunked".into(),
        ));
    }

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // A switch nobody asked for (RFC 9110 §15.2.2) cannot be passed
        // on: an HTTP/1.1 client that sent no `Upgrade` would be left on a
        // connection that is neither HTTP nor a tunnel, and HTTP/2 has no
        // 101 (the stream was reset). nginx answers it with 502 too.
        let Some(client_upgrade) = client_upgrade else {
            return Err(Failure::BadResponse(
                "it switched protocols though no upgrade was asked for".into(),
            ));
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let conn = ctx.conn.clone();
        let activity = Arc::clone(&ctx.activity);
        let permit = Arc::clone(&ctx.permit);
        // The HTTP connection's task, and with it its count in the active
        // gauge and on its worker, ends once it has handed the socket
        // over; the tunnel is the same connection and counts itself in
        // both while it lasts (for a moment both do), as it keeps its
        // slot. It runs on this worker, as `tracker.spawn` spawns here.
        let active = super::listener::ActiveGuard::enter(Arc::clone(&ctx.conn.stats));
        let worker = crate::workers::Assigned::here();
        ctx.conn.drain.tracker.spawn(async move {
            let _slot = (permit, active, worker);
            tunnel(client_upgrade, upstream_upgrade, conn, activity).await;
        });
        forward::strip_hop_by_hop(resp.headers_mut(), true);
    } else {
        forward::strip_hop_by_hop(resp.headers_mut(), false);
    }
    if resp.status() == StatusCode::NOT_MODIFIED
        && parts.version < Version::HTTP_2
        && resp.headers().contains_key(CONTENT_LENGTH)
    {
        // hyper's HTTP/2 server passes it on as it is.
        resp.body_mut().keep_content_length();
    }
    // Whichever version the upstream spoke, the client's connection
    // writes the response in its own.
    *resp.version_mut() = Version::HTTP_11;
    if head_over_h2 {
        // A HEAD response has no content, whatever its length says; some
        // h2c servers (hyper's among them) send the GET's body anyway, which
        // h2 takes as a malformed stream, and hyper's HTTP/2 server (unlike
        // its HTTP/1.1 one) reads a HEAD response's body like any other: the
        // client got a reset stream. Nothing of the upstream's body is read.
        return Ok(resp.map(|_| Either::Right(Full::new(Bytes::new()))));
    }
    Ok(resp.map(Either::Left))
}

/// The host a request names: what the upstream is told (`Host`, or
/// `:authority` over h2c) and `X-Forwarded-Host` repeats. A request that
/// names it ambiguously is refused, so that sheath and the upstream cannot
/// read two hosts into it: more than one `Host` or an invalid one, none in
/// HTTP/1.1 (RFC 9112 §3.2), or over HTTP/2 a `Host` naming another host
/// than `:authority` (RFC 9113 §8.3.1). An HTTP/1 request target in
/// absolute form names the host itself and its `Host` is ignored (RFC 9112
/// §3.2.2); sheath passes the host on, the target in origin form.
fn request_host(
    req: &Request<Incoming>,
    client: &forward::ClientAddr,
) -> Result<Option<HeaderValue>, Failure> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host_line = hosts.next();
    if hosts.next().is_some() {
        return Err(Failure::BadRequest("more than one Host header"));
    }
    // An empty Host says the target has no authority (RFC 9112 §3.2): the
    // upstream's address is used, as for HTTP/1.0 without one.
    let host = host_line.filter(|h| !h.is_empty());
    if host.is_some_and(|h| !client.is_first_host(h) && !valid_host(h)) {
        return Err(Failure::BadRequest("the Host header is not a valid host"));
    }
    match (req.uri().authority(), host) {
        (Some(authority), Some(host))
            if req.version() == Version::HTTP_2
                && !authority
                    .as_str()
                    .as_bytes()
                    .eq_ignore_ascii_case(host.as_bytes()) =>
        {
            Err(Failure::BadRequest(
                "the Host header names another host than :authority",
            ))
        }
        // HTTP/2's `:authority` or an absolute-form target's, parsed
        // already; user information in it is as invalid as in `Host`
        // (RFC 9113 §8.3.1) and would reach the upstream as its `Host`.
        (Some(authority), _) => match client.first_host_named(authority.as_str()) {
            Some(first) => Ok(Some(first)),
            None if !valid_authority(authority) => Err(Failure::BadRequest(
                "the request target's authority is not a valid host",
            )),
            None => Ok(HeaderValue::from_str(authority.as_str()).ok()),
        },
        (None, Some(host)) => Ok(Some(host.clone())),
        (None, None) if host_line.is_none() && req.version() == Version::HTTP_11 => Err(
            Failure::BadRequest("an HTTP/1.1 request must name its host in a Host header"),
        ),
        // HTTP/1.0 may name none; the upstream's address is used.
        (None, None) => Ok(None),
    }
}

fn valid_host(value: &HeaderValue) -> bool {
    host_authority(value).is_some()
}

/// A `Host` value as `uri-host [":" port]` (RFC 9110 §7.2): an authority
/// naming a host, without user information, whose port, if any, is a port
/// number. The HTTP-01 listener's redirect takes its host from it too.
pub(crate) fn host_authority(value: &HeaderValue) -> Option<Authority> {
    Authority::try_from(value.as_bytes())
        .ok()
        .filter(valid_authority)
}

fn valid_authority(authority: &Authority) -> bool {
    let text = authority.as_str();
    !text.contains('@')
        && !authority.host().is_empty()
        && (text.len() == authority.host().len() || authority.port_u16().is_some())
}

/// The upstream's response head, unless it has not come within
/// `upstream_response` of the request's end. Counted from the end, as
/// Envoy's route timeout is, not from the start: an upstream that reads an
/// upload before it answers (a file, a gRPC client stream) cannot answer
/// sooner, and an upload that took longer than the limit was cut with a
/// 504 while the upstream was still reading it.
///
/// Until then a body that stops moving for `idle` ends the request: a 408
/// when the client stopped sending it, a 504 when the upstream stopped
/// reading it. The connection's own idle timeout cannot see either on an
/// HTTP/2 connection whose other streams are busy, and each such request
/// holds an upstream connection (Envoy's `stream_idle_timeout`). Dropping
/// the request's future closes that connection.
async fn response_head<F: std::future::Future>(
    timeouts: &crate::config::Timeouts,
    send: F,
    body: &BodyStatus,
) -> Result<F::Output, Failure> {
    let mut send = pin!(send);
    if !body.is_none() {
        let mut over = pin!(body.over());
        loop {
            tokio::select! {
                biased;
                head = send.as_mut() => return Ok(head),
                () = over.as_mut() => break,
                () = tokio::time::sleep(timeouts.idle) => match body.stalled() {
                    None => {}
                    Some(Stall::Client) => return Err(Failure::BodyTimeout),
                    Some(Stall::Upstream) => return Err(Failure::ResponseTimeout),
                },
            }
        }
    }
    tokio::time::timeout(timeouts.upstream_response, send)
        .await
        .map_err(|_| Failure::ResponseTimeout)
}

fn classify(error: UpstreamError, body: &BodyStatus) -> Failure {
    match error {
        UpstreamError::ConnectTimeout(_) => Failure::ConnectTimeout,
        UpstreamError::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Failure::Refused
        }
        UpstreamError::Connect(e) => Failure::Unreachable(e.to_string()),
        // The client's fault, not the upstream's: its body broke off or
        // broke its framing part-way through. The upstream connection saw
        // half a body: an HTTP/1.1 one is closed, never pooled, and an
        // HTTP/2 stream is reset.
        UpstreamError::Http(_) if body.failed() => {
            Failure::BadRequest("the request body was malformed or cut short")
        }
        // The cause says more than hyper's summary ("http2 error"):
        // the I/O error, or how the upstream reset the stream.
        UpstreamError::Http(e) => Failure::BadResponse(
            match (UpstreamError::io_cause(&e), UpstreamError::h2_cause(&e)) {
                (Some(io), _) => io.to_string(),
                (None, Some(h2)) => h2,
                (None, None) => e.to_string(),
            },
        ),
    }
}

/// Relay bytes between an upgraded client connection and the upstream.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    conn: ConnInfo,
    activity: Arc<Activity>,
) {
    let config = &conn.listener.config;
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(listener = %config.name, peer = %conn.peer, error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let outcome = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => if r.is_ok() { "closed" } else { "error" },
        // The client was judged at its handshake; a tunnel lasting past
        // max_lifetime would keep a since-revoked client connected.
        limit = activity.idle_or_lifetime(config.timeouts.idle, conn.since, config.timeouts.max_lifetime) => limit,
        _ = conn.drain.abort.cancelled() => "drain_timeout",
    };
    tracing::info!(listener = %config.name, peer = %conn.peer, outcome, "upgraded connection closed");
}
