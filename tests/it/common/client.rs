//! TLS and HTTP clients that talk to the proxy the way real clients do.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub fn client_config(roots: Arc<RootCertStore>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    sheath::install_crypto_provider();
    let mut config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// TLS-connect to `addr` as `localhost`.
pub async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// TLS-connect to `addr` sending `name` as SNI (and verifying it).
/// A WebSocket to `wss://localhost/ws` over HTTP/1.1 through the TLS
/// listener at `addr`, with the response to its handshake.
pub async fn websocket(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
) -> (
    tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    let tls = super::within(
        "TLS connect",
        connect(addr, client_config(roots, &[b"http/1.1"])),
    )
    .await
    .unwrap();
    super::within(
        "websocket handshake",
        tokio_tungstenite::client_async("wss://localhost/ws", tls),
    )
    .await
    .unwrap()
}

pub async fn connect_as(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
}

/// An HTTP/1.1 sender over a fresh TLS connection.
pub async fn h1(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
) -> hyper::client::conn::http1::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, hyper::Error>,
> {
    h1_with(addr, client_config(roots, &[b"http/1.1"])).await
}

/// As [`h1`], with a client configuration of the caller's (a client
/// certificate, say).
pub async fn h1_with(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> hyper::client::conn::http1::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, hyper::Error>,
> {
    let tls = connect(addr, config).await.expect("TLS connect");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

/// An HTTP/2 sender over a fresh TLS connection (ALPN h2 is asserted).
pub async fn h2(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
) -> hyper::client::conn::http2::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, hyper::Error>,
> {
    let tls = connect(addr, client_config(roots, &[b"h2"]))
        .await
        .expect("TLS connect");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

pub fn empty() -> http_body_util::combinators::BoxBody<Bytes, hyper::Error> {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// A POST of `payload` to `uri`, then `trailers`: announced in `Trailer`
/// (an HTTP/1.1 sender writes only the trailers it announced), with
/// `TE: trailers` so that an echo of them comes back.
pub fn post_with_trailers(
    uri: &str,
    payload: &'static [u8],
    trailers: http::HeaderMap,
) -> Request<http_body_util::combinators::BoxBody<Bytes, hyper::Error>> {
    let announced: Vec<&str> = trailers.keys().map(http::HeaderName::as_str).collect();
    let announced = announced.join(", ");
    let frames = [
        hyper::body::Frame::data(Bytes::from_static(payload)),
        hyper::body::Frame::trailers(trailers),
    ];
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(
        frames.map(Ok::<_, hyper::Error>),
    ))
    .boxed();
    Request::post(uri)
        .header("host", "localhost")
        .header("trailer", announced)
        .header("te", "trailers")
        .body(body)
        .unwrap()
}

/// A GET request for `path` with Host `localhost`.
pub fn get(path: &str) -> Request<http_body_util::combinators::BoxBody<Bytes, hyper::Error>> {
    Request::get(path)
        .header("host", "localhost")
        .body(empty())
        .unwrap()
}

/// Same as [`get`] in the absolute form HTTP/2 uses for :authority.
pub fn get_h2(path: &str) -> Request<http_body_util::combinators::BoxBody<Bytes, hyper::Error>> {
    Request::get(format!("https://localhost{path}"))
        .body(empty())
        .unwrap()
}

pub async fn body_text(resp: Response<Incoming>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Parse the `/headers` backend answer into (name, value) pairs.
pub fn parse_headers(text: &str) -> Vec<(String, String)> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Handshake with `addr` and describe the certificate it served.
pub async fn served_cert(
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
) -> std::io::Result<sheath::cert::CertInfo> {
    let tls = connect(addr, client_config(roots, &[])).await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server sent a certificate")
        .clone();
    Ok(sheath::cert::CertInfo::from_der(&leaf).expect("served certificate parses"))
}

/// TLS-connect to `addr` as `localhost` and send `data` in the same write
/// as the client's Finished message, then read until the server closes or
/// `want` bytes arrived. The proxy then finds `data` already decrypted
/// inside rustls when the handshake completes, with nothing left on the
/// socket: a proxy that waits for the socket before reading would hang.
pub async fn send_with_finished(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    data: Vec<u8>,
    want: usize,
) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    tokio::task::spawn_blocking(move || {
        let mut sock = std::net::TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(super::DEADLINE))?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut conn =
            rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
        // Drive the handshake up to, not including, the client's Finished.
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(&mut sock)?;
            }
            if conn.read_tls(&mut sock)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            conn.process_new_packets().map_err(std::io::Error::other)?;
        }
        conn.writer().write_all(&data)?;
        // Finished and the data leave in one vectored write.
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        let mut stream = rustls::StreamOwned::new(conn, sock);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < want {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    })
    .await
    .expect("client thread")
}
