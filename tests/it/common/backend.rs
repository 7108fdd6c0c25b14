//! Real plaintext backends on 127.0.0.1:0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, std::io::Error>;

/// TCP echo: echoes every byte, and half-closes its side once the client
/// half-closed, so a relay that does not propagate EOF hangs the test.
pub async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An address where nothing listens.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

/// An HTTP/1.1 backend with a few routes:
/// - `/headers`: the request head, one `name: value` per line
/// - `/length`: reads the whole request body, then answers with its
///   length in bytes, as an upstream that takes an upload before it
///   answers does
/// - `/echo`: streams the request body back as it arrives, trailers too
///   (announced in `Trailer` as the request announced them)
/// - `/trailers`: `done`, then the trailers `grpc-status: 0` and
///   `grpc-message: all%20good` (announced in `Trailer`)
/// - `/slow?ms=N`: answers after N milliseconds
/// - `/drip?chunks=N&size=S&ms=M`: N chunks of S bytes, M ms apart
/// - `/big-header?bytes=N`: `ok` with an `x-big` header of N bytes
/// - `/close`: `ok` with `Connection: close`, then closes
/// - `/empty`: `204 No Content`
/// - `/early`: `413` at once, reading and discarding the request body
///   after answering, as nginx does with a body it refuses
/// - anything else: `ok`, the body left unread
pub async fn http() -> SocketAddr {
    CountingBackend::start().await.addr
}

/// [`http`] that counts the connections it accepts and can close all of
/// them at once, as an upstream does when it restarts or its keep-alive
/// timeout fires.
pub struct CountingBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    handling: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    close: tokio::sync::watch::Sender<u64>,
}

/// What a [`CountingBackend`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    Http1,
    /// HTTP/2 with prior knowledge only, as gRPC servers do: an HTTP/1.1
    /// request gets nothing.
    H2c,
    /// Either, told apart by the HTTP/2 preface.
    Both,
    /// [`Speaks::H2c`], taking at most this many streams at once per
    /// connection (`SETTINGS_MAX_CONCURRENT_STREAMS`; hyper's default is 200).
    H2cMaxStreams(u32),
}

impl CountingBackend {
    pub async fn start() -> CountingBackend {
        CountingBackend::speaking(Speaks::Http1).await
    }

    pub async fn speaking(speaks: Speaks) -> CountingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let handling = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (close, _) = tokio::sync::watch::channel(0u64);
        let backend = CountingBackend {
            addr,
            accepted: Arc::clone(&accepted),
            open: Arc::clone(&open),
            handling: Arc::clone(&handling),
            requests: Arc::clone(&requests),
            close: close.clone(),
        };
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                let open = Arc::clone(&open);
                let handling = Arc::clone(&handling);
                let requests = Arc::clone(&requests);
                let mut closing = close.subscribe();
                tokio::spawn(async move {
                    let io = TokioIo::new(stream);
                    let route = service_fn(move |req| {
                        counted(Arc::clone(&handling), Arc::clone(&requests), req)
                    });
                    let serve = async move {
                        let _ = match speaks {
                            Speaks::Http1 => hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, route)
                                .await
                                .map_err(|e| e.to_string()),
                            Speaks::H2c => {
                                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                    .serve_connection(io, route)
                                    .await
                                    .map_err(|e| e.to_string())
                            }
                            Speaks::H2cMaxStreams(max) => {
                                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                    .max_concurrent_streams(max)
                                    .serve_connection(io, route)
                                    .await
                                    .map_err(|e| e.to_string())
                            }
                            Speaks::Both => {
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(io, route)
                                    .await
                                    .map_err(|e| e.to_string())
                            }
                        };
                    };
                    tokio::select! {
                        _ = serve => {}
                        _ = closing.changed() => {}
                    }
                    // The socket is closed by now: `serve` was dropped.
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        backend
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Requests whose handler is running now (a `/slow` one until it
    /// answers).
    pub fn handling(&self) -> usize {
        self.handling.load(Ordering::SeqCst)
    }

    /// Requests received so far, on every connection.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Close every open connection, and return once all are closed.
    pub async fn close_all(&self) {
        self.close.send_modify(|generation| *generation += 1);
        let open = Arc::clone(&self.open);
        super::eventually("backend connections closed", move || {
            open.load(Ordering::SeqCst) == 0
        })
        .await;
    }
}

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

fn query(req: &Request<Incoming>, key: &str, default: u64) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

/// [`route`], counted in `handling` while its handler runs (also when the
/// request is cancelled halfway).
async fn counted(
    handling: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    requests.fetch_add(1, Ordering::SeqCst);
    struct Handling(Arc<AtomicUsize>);
    impl Drop for Handling {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    handling.fetch_add(1, Ordering::SeqCst);
    let _handling = Handling(handling);
    route(req).await
}

async fn route(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let body = match req.uri().path() {
        "/headers" => {
            let mut text = format!("{} {} {:?}\n", req.method(), req.uri(), req.version());
            for (name, value) in req.headers() {
                text.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
            }
            full(text)
        }
        "/early" => {
            let mut body = req.into_body();
            tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
            let mut resp = Response::new(full("too large"));
            *resp.status_mut() = http::StatusCode::PAYLOAD_TOO_LARGE;
            return Ok(resp);
        }
        "/length" => {
            let body = req.into_body().collect().await;
            return Ok(match body {
                Ok(body) => Response::new(full(body.to_bytes().len().to_string())),
                Err(e) => {
                    let mut resp = Response::new(full(e.to_string()));
                    *resp.status_mut() = http::StatusCode::BAD_REQUEST;
                    resp
                }
            });
        }
        "/echo" => {
            let announced = req.headers().get(http::header::TRAILER).cloned();
            let mut resp = Response::new(req.into_body().map_err(std::io::Error::other).boxed());
            if let Some(announced) = announced {
                resp.headers_mut().insert(http::header::TRAILER, announced);
            }
            return Ok(resp);
        }
        // A body followed by trailers, as every gRPC response is.
        "/trailers" => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            trailers.insert("grpc-message", "all%20good".parse().unwrap());
            let frames = [
                Frame::data(Bytes::from_static(b"done")),
                Frame::trailers(trailers),
            ];
            let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                frames.map(Ok::<_, std::io::Error>),
            )));
            // An HTTP/1.1 server writes only the trailers it announced.
            let mut resp = Response::new(body);
            resp.headers_mut().insert(
                http::header::TRAILER,
                "grpc-status, grpc-message".parse().unwrap(),
            );
            return Ok(resp);
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms", 1000))).await;
            full("slow ok")
        }
        "/drip" => {
            let chunks = query(&req, "chunks", 10);
            let size = query(&req, "size", 1024) as usize;
            let ms = query(&req, "ms", 10);
            let stream = futures_util::stream::unfold(0u64, move |i| async move {
                if i == chunks {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let frame = Frame::data(Bytes::from(vec![b'x'; size]));
                Some((Ok::<_, std::io::Error>(frame), i + 1))
            });
            BodyExt::boxed(StreamBody::new(stream))
        }
        "/big-header" => {
            let value = "b".repeat(query(&req, "bytes", 1024) as usize);
            let mut resp = Response::new(full("ok"));
            resp.headers_mut()
                .insert("x-big", value.parse().expect("a valid header value"));
            return Ok(resp);
        }
        "/close" => {
            let mut resp = Response::new(full("ok"));
            resp.headers_mut()
                .insert(http::header::CONNECTION, "close".parse().unwrap());
            return Ok(resp);
        }
        "/empty" => {
            let mut resp = Response::new(full(""));
            *resp.status_mut() = http::StatusCode::NO_CONTENT;
            return Ok(resp);
        }
        _ => full("ok"),
    };
    Ok(Response::new(body))
}

/// A WebSocket echo server.
pub async fn websocket_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if msg.is_text() || msg.is_binary() {
                        let _ = ws.send(msg).await;
                    }
                }
            });
        }
    });
    addr
}

/// Read from a stream until EOF.
pub async fn read_to_end<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).await?;
    Ok(buf)
}
