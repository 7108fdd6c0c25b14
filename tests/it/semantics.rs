//! HTTP message semantics through sheath (RFC 9110, 9112, 9113), with an
//! upstream written byte by byte: what a response's framing says to each
//! kind of client, and what reaches the upstream.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::backend::{CountingBackend, Speaks};
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

    /// Exactly `n` bytes of body, or `None` if the connection ends first.
    async fn body(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
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

/// What each connection to a [`raw_upstream`] received, in the order
/// they were accepted.
type Connections = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;

/// A plaintext upstream that hands each connection it accepts to
/// `script`; returns its address and, per connection, what it received.
async fn raw_upstream<F, Fut>(script: F) -> (SocketAddr, Connections)
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

impl RawClient {
    /// `n` bytes of body, or what came before the connection ended.
    async fn body(&mut self, n: usize) -> Result<Vec<u8>, Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return Err(std::mem::take(&mut self.buf));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Everything until the connection ends, which it must within 5 s.
    async fn rest(&mut self) -> Vec<u8> {
        let mut chunk = [0u8; 4096];
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match self.tls.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        let rest = std::mem::take(&mut self.buf);
        assert!(
            ended.is_ok(),
            "the connection stayed open after {:?}",
            String::from_utf8_lossy(&rest)
        );
        rest
    }
}

/// What each connection to a [`raw_upstream`] received, as text.
fn received(connections: &Connections) -> Vec<String> {
    connections
        .lock()
        .unwrap()
        .iter()
        .map(|c| String::from_utf8_lossy(&c.lock().unwrap()).into_owned())
        .collect()
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

/// A response to `HEAD` carries the `Content-Length` of the `GET` and no
/// body (RFC 9110 §9.3.2); a byte of body written after it would be read
/// as the start of the next response on an HTTP/1.1 connection.
#[tokio::test]
async fn a_head_response_keeps_the_get_length_and_the_connection_goes_on() {
    let (upstream, _) = raw_upstream(|mut up| async move {
        while let Some(head) = up.head().await {
            let answer: &[u8] = if head.starts_with("HEAD ") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            };
            if !up.send(answer).await {
                return;
            }
        }
    })
    .await;
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, upstream, "").await;
    let mut raw = RawClient::connect(proxy.addr("web"), &pki).await;
    for round in 0..2 {
        raw.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let head = raw.head().await.unwrap();
        assert!(head.starts_with("http/1.1 200 "), "round {round}: {head}");
        assert_eq!(field(&head, "content-length"), Some("5000"), "{head}");
        // The next bytes are the next response's, not a body.
        raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let head = raw.head().await.unwrap();
        assert!(head.starts_with("http/1.1 200 "), "round {round}: {head}");
        assert_eq!(raw.body(2).await.unwrap(), b"ok");
    }
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    for round in 0..2 {
        let head = Request::head("https://localhost/")
            .body(client::empty())
            .unwrap();
        let resp = within("h2 HEAD", h2.send_request(head)).await.unwrap();
        assert_eq!(
            resp.headers().get("content-length").unwrap(),
            "5000",
            "round {round}"
        );
        let body = within("h2 body", resp.into_body().collect()).await.unwrap();
        assert!(body.to_bytes().is_empty(), "round {round}");
        let resp = within("h2 GET", h2.send_request(get_h2("/")))
            .await
            .unwrap();
        assert_eq!(client::body_text(resp).await, "ok", "round {round}");
    }
}

/// `Expect: 100-continue` over HTTP/1.1: the client gets one `100` (the
/// upstream's own is not passed on as a second), sends its body, and gets
/// the upstream's answer. An upstream that refuses with `417` before
/// reading the body and closes: the client, which had its `100` and sent
/// the body, gets the `417`, and its connection serves the next request,
/// the body not taken for one.
#[tokio::test]
async fn expect_100_continue_gets_one_100_and_an_early_refusal_leaves_the_connection_usable() {
    let (echo, _) = raw_upstream(|mut up| async move {
        while let Some(head) = up.head().await {
            let head = head.to_ascii_lowercase();
            let n = field(&head, "content-length").map_or(0, |v| v.parse().unwrap());
            if n > 0 && !up.send(b"HTTP/1.1 100 Continue\r\n\r\n").await {
                return;
            }
            let Some(body) = up.body(n).await else { return };
            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
            if !up.send(answer.as_bytes()).await || !up.send(&body).await {
                return;
            }
        }
    })
    .await;
    let (refusing, _) = raw_upstream(|mut up| async move {
        while let Some(head) = up.head().await {
            if head.starts_with("POST ") {
                up.send(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope")
                    .await;
                return;
            }
            if !up.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await {
                return;
            }
        }
    })
    .await;
    let pki = TestPki::new();
    const UPLOAD: &[u8] =
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";

    let proxy = http_proxy(&pki, echo, "").await;
    let mut raw = RawClient::connect(proxy.addr("web"), &pki).await;
    for round in 0..2 {
        raw.send(UPLOAD).await;
        let head = raw.head().await.unwrap();
        assert_eq!(head, "http/1.1 100 continue\r\n\r\n", "round {round}");
        raw.send(b"hello").await;
        let head = raw.head().await.unwrap();
        assert!(head.starts_with("http/1.1 200 "), "round {round}: {head}");
        assert_eq!(raw.body(5).await.unwrap(), b"hello", "round {round}");
    }

    let proxy = http_proxy(&pki, refusing, "").await;
    let mut raw = RawClient::connect(proxy.addr("web"), &pki).await;
    for round in 0..2 {
        raw.send(UPLOAD).await;
        let head = raw.head().await.unwrap();
        assert_eq!(head, "http/1.1 100 continue\r\n\r\n", "round {round}");
        raw.send(b"hello").await;
        let head = raw.head().await.unwrap();
        assert!(head.starts_with("http/1.1 417 "), "round {round}: {head}");
        assert_eq!(raw.body(4).await.unwrap(), b"nope", "round {round}");
        raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let head = raw.head().await.unwrap();
        assert!(head.starts_with("http/1.1 200 "), "round {round}: {head}");
        assert_eq!(raw.body(2).await.unwrap(), b"ok", "round {round}");
    }
}

/// `103 Early Hints` (or any 1xx but `100` and `101`) from the upstream,
/// HTTP/1.1 or h2c, is dropped, as nginx does (hyper's servers have no
/// way to send it), and the final response follows it to both kinds of
/// client.
#[tokio::test]
async fn early_hints_are_dropped_and_the_final_response_follows() {
    let upstream = answering(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n\
          HTTP/1.1 102 Processing\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, upstream, "").await;
    let mut raw = RawClient::connect(proxy.addr("web"), &pki).await;
    for round in 0..2 {
        raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let head = raw.head().await.unwrap();
        assert!(head.starts_with("http/1.1 200 "), "round {round}: {head}");
        assert!(!head.contains("link:"), "{head}");
        assert_eq!(raw.body(2).await.unwrap(), b"ok");
    }
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    let resp = within("h2", h2.send_request(get_h2("/"))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(client::body_text(resp).await, "ok");

    // The same from an h2c upstream, which sends its hint as a HEADERS
    // frame of its own ahead of the response's.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h2c = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = connection.accept().await {
                    let hint = http::Response::builder()
                        .status(103)
                        .header("link", "</s.css>; rel=preload")
                        .body(())
                        .unwrap();
                    respond.send_informational(hint).unwrap();
                    let done = http::Response::new(());
                    let mut body = respond.send_response(done, false).unwrap();
                    body.send_data(bytes::Bytes::from_static(b"ok"), true)
                        .unwrap();
                }
            });
        }
    });
    let proxy = http_proxy(&pki, h2c, "upstream_protocol = \"h2c\"").await;
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    for round in 0..2 {
        let resp = within("h1", h1.send_request(client::get("/")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "round {round}");
        assert!(!resp.headers().contains_key("link"), "{resp:?}");
        assert_eq!(client::body_text(resp).await, "ok");
        let resp = within("h2", h2.send_request(get_h2("/"))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "round {round}");
        assert!(!resp.headers().contains_key("link"), "{resp:?}");
        assert_eq!(client::body_text(resp).await, "ok");
    }
}

/// An HTTP/1.0-style response, with neither a length nor chunked coding,
/// ends when the upstream closes; that end is the body's end, and an
/// HTTP/2 client gets the whole body, ended normally (END_STREAM), as an
/// HTTP/1.1 client does (chunked).
#[tokio::test]
async fn a_response_ended_by_the_upstreams_close_arrives_whole() {
    let (upstream, _) = raw_upstream(|mut up| async move {
        if up.head().await.is_some() {
            up.send(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                .await;
            up.send(&[b'a'; 100_000]).await;
        }
    })
    .await;
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, upstream, "").await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    for round in 0..2 {
        let resp = within("h2", h2.send_request(get_h2("/"))).await.unwrap();
        let body = within("h2 body", resp.into_body().collect()).await;
        assert_eq!(body.unwrap().to_bytes().len(), 100_000, "round {round}");
    }
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    for round in 0..2 {
        let resp = within("h1", h1.send_request(client::get("/")))
            .await
            .unwrap();
        let body = within("h1 body", resp.into_body().collect()).await;
        assert_eq!(body.unwrap().to_bytes().len(), 100_000, "round {round}");
    }
}

/// An upstream that closes, cleanly, before the length it announced: the
/// client must not be handed the part as if it were the whole. HTTP/1.1
/// gets the announced length and a connection that ends short of it;
/// HTTP/2 a reset stream.
#[tokio::test]
async fn a_response_short_of_its_length_is_an_error_to_the_client() {
    let (upstream, _) = raw_upstream(|mut up| async move {
        if up.head().await.is_some() {
            up.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await;
        }
    })
    .await;
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, upstream, "").await;
    let mut raw = RawClient::connect(proxy.addr("web"), &pki).await;
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let head = raw.head().await.unwrap();
    assert_eq!(field(&head, "content-length"), Some("100"), "{head}");
    assert_eq!(raw.rest().await, b"0123456789");

    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    let resp = within("h2", h2.send_request(get_h2("/"))).await.unwrap();
    let body = within("h2 body", resp.into_body().collect()).await;
    let error = body.expect_err("a body short of its length arrived complete");
    let reset = std::error::Error::source(&error)
        .and_then(|e| e.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason);
    assert!(reset.is_some(), "not a stream reset: {error:?}");
}

/// An upstream that reads each request's body by its `Content-Length`
/// (none: no body) and answers `ok`: where it finds a request's end is
/// where the next one starts, as on a pooled connection.
async fn framing_upstream() -> (SocketAddr, Connections) {
    raw_upstream(|mut up| async move {
        while let Some(head) = up.head().await {
            let lower = head.to_ascii_lowercase();
            let n = field(&lower, "content-length").map_or(0, |v| v.parse().unwrap());
            if up.body(n).await.is_none()
                || !up
                    .send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
            {
                return;
            }
        }
    })
    .await
}

/// What HTTP/1.1 parsers may read in more than one way reaches the
/// upstream one way: sheath frames each request anew, so a bare LF (which
/// RFC 9112 §2.2 lets a recipient read as a line's end) becomes CRLF, and
/// a length written twice, or with leading zeros (`010`, which a parser
/// that reads C's octal takes for 8), becomes one length in plain decimal.
/// The upstream, a pooled connection, must find the body's end where
/// sheath did, or what follows becomes the start of the next request.
#[tokio::test]
async fn a_request_reaches_the_upstream_framed_one_way() {
    let (upstream, connections) = framing_upstream().await;
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, upstream, "").await;
    for (what, request) in [
        (
            "bare LF",
            &b"POST /a HTTP/1.1\nHost: x\nContent-Length: 10\n\n0123456789"[..],
        ),
        (
            "bare LF and CRLF",
            b"POST /a HTTP/1.1\r\nHost: x\nContent-Length: 10\r\n\r\n0123456789",
        ),
        (
            "one length twice",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nContent-Length: 10\r\n\r\n0123456789",
        ),
        (
            "leading zeros",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 010\r\n\r\n0123456789",
        ),
    ] {
        let mut raw = RawClient::connect(proxy.addr("web"), &pki).await;
        raw.send(request).await;
        let head = raw.head().await.unwrap();
        assert!(head.starts_with("http/1.1 200 "), "{what}: {head}");
        assert_eq!(raw.body(2).await.unwrap(), b"ok", "{what}");
        let seen = received(&connections).concat();
        let (head, body) = seen.rsplit_once("POST /a ").unwrap().1.split_once("\r\n\r\n").unwrap();
        assert!(
            !head.replace("\r\n", "").contains('\n'),
            "{what}: a bare LF reached the upstream: {head:?}"
        );
        let lengths: Vec<String> = head
            .lines()
            .filter_map(|l| {
                let l = l.to_ascii_lowercase();
                Some(l.strip_prefix("content-length:")?.trim().to_string())
            })
            .collect();
        assert_eq!(lengths, ["10"], "{what}: {head:?}");
        assert_eq!(body, "0123456789", "{what}");
    }
}

/// Trailers are end to end, but an upstream may write fields in them that
/// describe its hop or the message's framing (`Connection`, `Keep-Alive`,
/// `Transfer-Encoding`, `Content-Length`), which mean nothing there (RFC
/// 9110 §6.5.1). They are dropped on the way: HTTP/2 refuses to send a
/// connection-specific field at all (RFC 9113 §8.2.2), and an HTTP/2
/// client got its whole body then a reset stream instead of the response.
#[tokio::test]
async fn hop_by_hop_and_framing_fields_are_dropped_from_trailers() {
    let upstream = answering(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\
          Trailer: x-ok, connection, keep-alive, transfer-encoding, content-length\r\n\r\n\
          4\r\ndone\r\n0\r\nX-Ok: 1\r\nConnection: close\r\nKeep-Alive: timeout=5\r\n\
          Transfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n",
    )
    .await;
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, upstream, "").await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    for round in 0..2 {
        let mut req = get_h2("/");
        req.headers_mut().insert("te", "trailers".parse().unwrap());
        let resp = within("h2", h2.send_request(req)).await.unwrap();
        let body = within("h2 body", resp.into_body().collect()).await;
        let body = body.unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        let trailers = body.trailers().cloned().expect("trailers");
        let names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-ok"], "round {round}");
        assert_eq!(body.to_bytes(), "done");
    }
    let mut raw = RawClient::connect(proxy.addr("web"), &pki).await;
    for round in 0..2 {
        raw.send(b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
            .await;
        let head = raw.head().await.unwrap();
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        let chunk = raw.body(b"4\r\ndone\r\n".len()).await.unwrap();
        assert_eq!(chunk, b"4\r\ndone\r\n");
        // The last chunk and the trailer section.
        let trailer = raw.head().await.unwrap();
        assert_eq!(trailer, "0\r\nx-ok: 1\r\n\r\n", "round {round}");
    }

    // A client's trailers, on to an h2c upstream that echoes them.
    let backend = CountingBackend::speaking(Speaks::H2c).await;
    let proxy = http_proxy(&pki, backend.addr, "upstream_protocol = \"h2c\"").await;
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let mut sent = http::HeaderMap::new();
    sent.insert("x-checksum", "c0ffee".parse().unwrap());
    sent.insert("keep-alive", "timeout=5".parse().unwrap());
    let req = client::post_with_trailers("/echo", b"payload", sent);
    let resp = within("echo", h1.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = within("echo body", resp.into_body().collect()).await;
    let trailers = body.unwrap().trailers().cloned().expect("trailers");
    let names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["x-checksum"]);
}

/// An HTTP/2 request whose DATA say another length than its
/// `content-length` (RFC 9113 §8.1.1) goes to an HTTP/1.1 upstream with
/// that length as its framing: passed on, a body longer than its length
/// would end early and leave the rest, a request of the client's making,
/// on a pooled connection ("H2.CL" smuggling); a shorter one would take
/// the start of the next request as its own. The stream is reset, and
/// the upstream sees nothing of it on a connection that carries another
/// request.
#[tokio::test]
async fn an_http2_body_unlike_its_content_length_never_frames_an_upstream_request() {
    let (upstream, connections) = framing_upstream().await;
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, upstream, "").await;
    for (what, length, data) in [
        (
            "longer",
            "0",
            &b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        ),
        (
            "longer still",
            "5",
            b"01234GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        ("shorter", "100", b"01234"),
    ] {
        let config = client::client_config(pki.roots(), &[b"h2"]);
        let tls = within("TLS connect", client::connect(proxy.addr("web"), config))
            .await
            .unwrap();
        let (mut sender, connection) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(connection);
        let req = Request::post("https://localhost/")
            .header("content-length", length)
            .body(())
            .unwrap();
        let (resp, mut body) = sender.send_request(req, false).unwrap();
        body.send_data(bytes::Bytes::from_static(data), true)
            .unwrap();
        match within("the answer", resp).await {
            Err(e) => assert_eq!(e.reason(), Some(h2::Reason::PROTOCOL_ERROR), "{what}: {e}"),
            Ok(resp) => assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{what}"),
        }
        // The next request, on a connection of its own, reaches the
        // upstream as itself and alone.
        let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
        let resp = within("h2", h2.send_request(get_h2("/after")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{what}");
        for seen in received(&connections) {
            assert!(!seen.contains("smuggled"), "{what}: {seen:?}");
            if let Some(post) = seen.find("POST ") {
                assert!(
                    !seen[post..].contains("GET /after"),
                    "{what}: another request followed a broken body: {seen:?}"
                );
            }
        }
    }
}

/// A client that sent `Expect: 100-continue` and got sheath's own answer
/// (the upstream is down) before any `100` cannot tell whether sheath
/// still reads the body, so it cannot tell where its next request would
/// begin: it was left to send the body anyway or wait out sheath's
/// lingering read (5 s) on a connection that then closed unannounced. The
/// answer says `Connection: close` (RFC 9110 §10.1.1: a server answering
/// before it read the content says whether it will close), and a body
/// sent anyway is read before the connection ends.
#[tokio::test]
async fn an_answer_before_100_continue_says_the_connection_closes() {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, crate::common::backend::closed_port().await, "").await;
    for send_the_body in [false, true] {
        let mut raw = RawClient::connect(proxy.addr("web"), &pki).await;
        raw.send(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .await;
        let head = raw.head().await.unwrap();
        assert!(head.starts_with("http/1.1 502 "), "{head}");
        assert_eq!(field(&head, "connection"), Some("close"), "{head}");
        let length: usize = field(&head, "content-length").unwrap().parse().unwrap();
        raw.body(length).await.unwrap();
        if send_the_body {
            raw.send(b"hello").await;
            assert_eq!(raw.rest().await, b"");
        }
    }
}
