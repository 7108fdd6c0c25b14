//! HTTP message semantics through sheath (RFC 9110, 9112, 9113), with an
//! upstream written byte by byte: what a response's framing says to each
//! kind of client, and what reaches the upstream.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::client::{self, get_h2};
use crate::common::{within, TestPki};
use crate::http::http_proxy;

/// One upstream connection, as the script of a [`raw_upstream`] sees it.
struct Upstream {
    tcp: TcpStream,
    /// Read but not yet consumed.
    buf: Vec<u8>,
    /// Every byte the connection received.
    log: Arc<Mutex<Vec<u8>>>,
}

impl Upstream {
    /// The next request head (up to and with its blank line), or `None`
    /// once the connection ends.
    async fn head(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return Some(String::from_utf8_lossy(&head).into_owned());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.log.lock().unwrap().extend_from_slice(&chunk[..n]);
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.tcp.write_all(bytes).await.is_ok()
    }
}

/// A plaintext upstream that hands each connection it accepts to
/// `script`; returns its address and, per connection, what it received.
async fn raw_upstream<F, Fut>(script: F) -> (SocketAddr, Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>)
where
    F: Fn(Upstream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let log = Arc::new(Mutex::new(Vec::new()));
            seen.lock().unwrap().push(Arc::clone(&log));
            tokio::spawn(script(Upstream {
                tcp,
                buf: Vec::new(),
                log,
            }));
        }
    });
    (addr, connections)
}

/// A TLS connection to sheath speaking HTTP/1.1 as raw bytes.
struct RawClient {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: SocketAddr, pki: &TestPki) -> RawClient {
        let config = client::client_config(pki.roots(), &[b"http/1.1"]);
        let tls = within("TLS connect", client::connect(addr, config))
            .await
            .unwrap();
        RawClient {
            tls,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.unwrap();
    }

    /// Read more; false at the end of the connection.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match within("bytes from sheath", self.tls.read(&mut chunk)).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next response head, lowercased, or what was read when the
    /// connection ended before one.
    async fn head(&mut self) -> Result<String, String> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return Ok(String::from_utf8_lossy(&head).to_ascii_lowercase());
            }
            if !self.fill().await {
                return Err(String::from_utf8_lossy(&self.buf).into_owned());
            }
        }
    }
}

/// The value of `name` (lowercase) in a lowercased head.
fn field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// An upstream that answers every request head with `answer`, whatever
/// it asked.
async fn answering(answer: &'static [u8]) -> SocketAddr {
    raw_upstream(move |mut up| async move {
        while up.head().await.is_some() {
            if !up.send(answer).await {
                return;
            }
        }
    })
    .await
    .0
}

/// A `304` may carry the `Content-Length` its `200` would have had (RFC
/// 9110 §8.6), which a cache uses to update what it stored. hyper's
/// HTTP/1 server dropped it from a response with an empty body; it
/// reaches both kinds of client, and the connection goes on with no body
/// bytes in between.
#[tokio::test]
async fn a_304_keeps_the_content_length_of_what_it_stands_for() {
    let upstream =
        answering(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 1234\r\n\r\n")
            .await;
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, upstream, "").await;
    let mut raw = RawClient::connect(proxy.addr("web"), &pki).await;
    for round in 0..2 {
        raw.send(b"GET / HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"v1\"\r\n\r\n")
            .await;
        let head = raw.head().await.unwrap();
        assert!(head.starts_with("http/1.1 304 "), "round {round}: {head}");
        assert_eq!(
            field(&head, "content-length"),
            Some("1234"),
            "round {round}: {head}"
        );
    }
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    for round in 0..2 {
        let resp = within("h2", h2.send_request(get_h2("/"))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(
            resp.headers().get("content-length").unwrap(),
            "1234",
            "round {round}"
        );
        let body = within("h2 body", resp.into_body().collect()).await.unwrap();
        assert!(body.to_bytes().is_empty());
    }
}
