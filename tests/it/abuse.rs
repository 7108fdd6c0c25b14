//! Clients that abuse HTTP on purpose: request heads sent a byte at a time,
//! heads too large or with too many fields, HTTP/2 streams opened and reset
//! as fast as a client can (CVE-2023-44487), and an HTTP/2 header block
//! continued without end (the 2024 CONTINUATION floods), and request
//! framing meant to be read two ways (request smuggling). Each must be cut
//! off without reaching the backend, while other clients are served.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::backend::CountingBackend;
use crate::common::client::{self, body_text, get};
use crate::common::h2raw::{guarded, h2_frame, read_until_closed, serves_http1, serves_http2};
use crate::common::{within, TestPki};
use crate::http::http_proxy;

#[tokio::test]
async fn a_request_head_sent_a_byte_at_a_time_is_cut_at_the_header_read_timeout() {
    // The idle timeout is far beyond the test: only the header deadline
    // can close a connection that keeps sending.
    let (pki, backend, proxy) =
        guarded("[listener.timeouts]\nheader_read = \"600ms\"\nidle = \"1m\"\n").await;
    let addr = proxy.addr("web");
    let config = client::client_config(pki.roots(), &[b"http/1.1"]);
    let mut slow = client::connect(addr, config).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();

    // A field that never ends, one byte every 50 ms, for up to 5 s.
    let drip = async {
        slow.write_all(b"X-Slow: ").await?;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            slow.write_all(b"a").await?;
            slow.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    };
    // While it drips, another client is served. Writing fails once sheath
    // has closed the connection; whether it did or every byte went out,
    // the read below decides.
    let (_dripped, ()) = tokio::join!(drip, serves_http1(addr, &pki));
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(closed, "a dripping request head kept its connection");
    assert!(
        waited >= Duration::from_millis(550) && waited < Duration::from_secs(5),
        "closed after {waited:?}, header_read is 600ms"
    );
    // Only the good client's request reached the backend.
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn oversized_or_overlong_request_heads_get_431_and_never_reach_the_backend() {
    let (pki, backend, proxy) = guarded("").await;
    let addr = proxy.addr("web");
    let config = client::client_config(pki.roots(), &[b"http/1.1"]);

    // One 100 KiB field (the limit is 64 KiB), then 200 small fields (the
    // limit is 100): each is refused with 431 and its connection closed.
    let huge = format!(
        "GET /headers HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let mut many = String::from("GET / HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..200 {
        many.push_str(&format!("X-Field-{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    for (what, head) in [("one huge field", huge), ("200 fields", many)] {
        let mut tls = client::connect(addr, config.clone()).await.unwrap();
        // The server may answer and close before the whole head is
        // written; what it said is read either way.
        let _ = tls.write_all(head.as_bytes()).await;
        let (seen, closed) = read_until_closed(&mut tls, Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&seen);
        assert!(
            text.starts_with("HTTP/1.1 431 "),
            "{what}: answered {:?}",
            &text[..text.len().min(600)]
        );
        assert!(closed, "{what}: the connection stayed open");
    }
    assert_eq!(
        backend.accepted(),
        0,
        "a refused request reached the backend"
    );

    // The listener serves well-formed requests as before.
    serves_http1(addr, &pki).await;
}

#[tokio::test]
async fn http2_rapid_reset_is_answered_with_goaway_and_bounded_backend_work() {
    let (pki, backend, proxy) = guarded("").await;
    let addr = proxy.addr("web");
    let tls = client::connect(addr, client::client_config(pki.roots(), &[b"h2"]))
        .await
        .unwrap();
    let (sender, connection) = h2::client::handshake(tls).await.unwrap();
    let connection = tokio::spawn(connection);

    // One whole exchange first: sheath's SETTINGS have arrived after it.
    // It bounds the streams a client may have open, and says so.
    let mut sender = within("h2 ready", sender.ready()).await.unwrap();
    let (response, _) = sender
        .send_request(Request::get("https://localhost/").body(()).unwrap(), true)
        .unwrap();
    let response = within("first response", response).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(sender.current_max_send_streams(), 128);
    let baseline = backend.accepted();

    // Open streams and reset each at once (dropping every handle sends
    // RST_STREAM), as many as the connection lets us. The backend answers
    // `/slow` after a second, so no stream completes before it is reset.
    const ATTEMPTS: usize = 10_000;
    let mut sent = 0;
    let mut refused = None;
    for _ in 0..ATTEMPTS {
        sender = match within("h2 ready", sender.ready()).await {
            Ok(ready) => ready,
            Err(e) => {
                refused = Some(e);
                break;
            }
        };
        let req = Request::get("https://localhost/slow?ms=1000")
            .body(())
            .unwrap();
        match sender.send_request(req, true) {
            Ok((response, _)) => drop(response),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
        sent += 1;
        // Let the connection task flush now and then, as a real attacker's
        // stream of frames would arrive.
        if sent % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // The client learns it from the GOAWAY (its own connection task may
    // then fail writing to the closed socket), and the connection ends.
    let reason = refused.as_ref().and_then(h2::Error::reason);
    assert_eq!(
        reason,
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "after {sent} reset streams the client saw {refused:?}"
    );
    // Ended either way: the GOAWAY read, or the write after it failing.
    let _ended: Result<(), h2::Error> = within("the connection ends", connection)
        .await
        .expect("connection task");
    // Every stream that reached the backend held a connection there; far
    // fewer than the streams opened did.
    let reached = backend.accepted() - baseline;
    assert!(
        reached < 300,
        "{reached} backend connections for {sent} reset streams"
    );

    // A new connection is served.
    serves_http2(addr, &pki).await;
}

#[tokio::test]
async fn an_http2_continuation_flood_is_cut_off() {
    let (pki, backend, proxy) = guarded("").await;
    let addr = proxy.addr("web");
    let mut tls = client::connect(addr, client::client_config(pki.roots(), &[b"h2"]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // A request whose header block never ends: HEADERS without
    // END_HEADERS, then CONTINUATION frames of ~15 KiB of small literal
    // fields each, up to 16 MiB in all.
    const HEADERS: u8 = 0x1;
    const CONTINUATION: u8 = 0x9;
    const SETTINGS: u8 = 0x4;
    const END_STREAM: u8 = 0x1;
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(h2_frame(SETTINGS, 0, 0, &[]));
    // :method GET, :scheme https, :path / from HPACK's static table.
    start.extend(h2_frame(HEADERS, END_STREAM, 1, &[0x82, 0x87, 0x84]));
    let fields: Vec<u8> = b"\x00\x01x\x01y".repeat(3000);
    let continuation = h2_frame(CONTINUATION, 0, 1, &fields);
    let budget = 16 << 20;

    let flood = async {
        tls.write_all(&start).await?;
        let mut sent = 0;
        while sent < budget {
            tls.write_all(&continuation).await?;
            sent += continuation.len();
        }
        tls.flush().await?;
        Ok::<_, std::io::Error>(sent)
    };
    let flooded = within("the flood to end", flood).await;
    // sheath stops reading and closes long before 16 MiB: writing fails,
    // or, if the last writes still fit in the socket buffers, the read
    // below sees the end.
    if let Ok(sent) = flooded {
        let (_, closed) = read_until_closed(&mut tls, Duration::from_secs(5)).await;
        assert!(
            closed,
            "sheath took all {sent} bytes and kept the connection"
        );
    }
    assert_eq!(
        backend.accepted(),
        0,
        "the endless request reached the backend"
    );

    // Other clients are served.
    serves_http2(addr, &pki).await;
}

/// A request as the backend parsed it.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: String,
    path: String,
    /// The body, or `None` when it broke off or broke its framing.
    body: Option<Vec<u8>>,
}

/// An HTTP/1.1 backend that records every request it parses, with the
/// connection it came on.
#[derive(Clone, Default)]
struct Recorder {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(usize, Seen)>>>,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Recorder {
    async fn start() -> (Recorder, SocketAddr) {
        use http_body_util::BodyExt;
        let recorder = Recorder::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = recorder.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let connection = shared
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = std::sync::Arc::clone(&shared.seen);
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let seen = std::sync::Arc::clone(&seen);
                            async move {
                                let (method, path) =
                                    (req.method().to_string(), req.uri().path().to_string());
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .ok()
                                    .map(|b| b.to_bytes().to_vec());
                                seen.lock()
                                    .unwrap()
                                    .push((connection, Seen { method, path, body }));
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                                ))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (recorder, addr)
    }

    fn requests(&self) -> Vec<(usize, Seen)> {
        self.seen.lock().unwrap().clone()
    }
}

fn seen(method: &str, path: &str, body: Option<&[u8]>) -> Seen {
    Seen {
        method: method.into(),
        path: path.into(),
        body: body.map(<[u8]>::to_vec),
    }
}

/// Raw bytes to an HTTP/1.1 listener on a new connection; everything
/// answered until the connection closes (which it must within 5 s).
async fn raw_exchange(addr: SocketAddr, pki: &TestPki, request: &[u8]) -> String {
    let config = client::client_config(pki.roots(), &[b"http/1.1"]);
    let mut tls = client::connect(addr, config).await.unwrap();
    let _ = tls.write_all(request).await;
    let (answer, closed) = read_until_closed(&mut tls, Duration::from_secs(5)).await;
    assert!(closed, "the connection stayed open after {request:?}");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Request smuggling needs the proxy and the backend to disagree on where
/// a request ends, and a backend connection that carries the next client's
/// request after it. sheath parses each request and frames it anew for the
/// upstream, refuses framing that can be read two ways, and closes a client
/// connection whose framing was suspect: the backend sees exactly the
/// requests sheath answered, and what a client tried to hide after its
/// body never becomes a request or a prefix of one.
#[tokio::test]
async fn ambiguous_request_framing_never_reaches_the_backend_as_another_request() {
    let pki = TestPki::new();
    let (recorder, backend) = Recorder::start().await;
    let proxy = crate::http::http_proxy(&pki, backend, "").await;
    let addr = proxy.addr("web");

    // Framings that parsers read differently: refused outright.
    for (what, request) in [
        (
            "obfuscated transfer-coding",
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: xchunked\r\n\r\n5c\r\nG"[..],
        ),
        (
            "chunked not last",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        ),
        (
            "two different lengths",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nContent-Length: 5\r\n\r\nhello!",
        ),
        (
            "a signed length",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        ),
        (
            "space before the colon",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "chunked in HTTP/1.0",
            b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            // A line folded onto the one before (obs-fold, RFC 9112 §5.2):
            // a length folded out of sight of a parser that reads lines.
            "a folded field",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n 5\r\n\r\nhello",
        ),
        (
            "a bare CR in a field",
            b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
        ),
    ] {
        let answer = raw_exchange(addr, &pki, request).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{what}: {answer:?}");
    }
    assert_eq!(
        recorder.requests(),
        [],
        "a refused request reached the backend"
    );

    // Both a length and chunked: chunked wins (RFC 9112 6.3), the length
    // goes, and the connection closes after the answer, so the pipelined
    // request behind the body is never read.
    let answer = raw_exchange(
        addr,
        &pki,
        b"POST /both HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer:?}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer:?}"
    );

    // A chunked body whose framing breaks after its first chunk: 400, and
    // the upstream connection that got half a body is not used again.
    let answer = raw_exchange(
        addr,
        &pki,
        b"POST /broken HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");

    // The next client's request reaches the backend as itself.
    serves_http1(addr, &pki).await;
    let requests = recorder.requests();
    let parsed: Vec<&Seen> = requests.iter().map(|(_, s)| s).collect();
    assert_eq!(
        parsed,
        [
            &seen("POST", "/both", Some(b"")),
            &seen("POST", "/broken", None),
            &seen("GET", "/", Some(b"")),
        ],
        "{requests:?}"
    );
    let broken_on = requests[1].0;
    assert!(
        requests[2].0 != broken_on,
        "a request went over the connection that carried half a body"
    );
}

/// With an HTTP/2 upstream the request body is sent by the h2c
/// connection's own task, not the request's: a client's body that breaks
/// its framing is still its own fault (400), not the upstream's (502).
#[tokio::test]
async fn a_broken_request_body_is_a_400_over_an_h2c_upstream_too() {
    let pki = TestPki::new();
    let backend = CountingBackend::speaking(crate::common::backend::Speaks::H2c).await;
    let proxy = http_proxy(&pki, backend.addr, "upstream_protocol = \"h2c\"").await;
    let answer = raw_exchange(
        proxy.addr("web"),
        &pki,
        // The backend answers long after the body has broken: the answer
        // is sheath's, not a race with the backend's.
        b"POST /slow?ms=5000 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
}

/// A raw HTTP/1.1 upstream that answers each bodiless request head with
/// the bytes `answer` gives for it (the head, lowercased), whatever they
/// say, and keeps every byte it receives.
async fn scripted_backend(
    answer: fn(&str) -> &'static [u8],
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let seen = received.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = backend.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let n = match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                    head.extend_from_slice(&buf[..n]);
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        let request = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
                        head.drain(..end + 4);
                        if tcp.write_all(answer(&request)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, received)
}

/// An upstream that accepts an upgrade to `h2c` (or back into HTTP by
/// another name) would read whatever the client sends through the tunnel
/// as requests of its own, with no header of them seen by sheath: a
/// forged `X-Forwarded-Client-Cert` would reach it (h2c smuggling). sheath
/// never tunnels such an upgrade: the request goes on as a plain one,
/// without `Upgrade`, and what follows it on the connection is parsed as
/// requests and cleaned like any other.
#[tokio::test]
async fn an_upgrade_back_into_http_is_never_tunnelled() {
    // Switches to anything asked.
    let (backend_addr, received) = scripted_backend(|request| {
        if request.lines().any(|l| l.starts_with("upgrade:")) {
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        }
    })
    .await;
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend_addr, "").await;
    for upgrade in ["h2c", "H2C", "websocket, h2c", "HTTP/2.0", "h2", "TLS/1.2"] {
        received.lock().unwrap().clear();
        let config = client::client_config(pki.roots(), &[b"http/1.1"]);
        let mut tls = client::connect(proxy.addr("web"), config).await.unwrap();
        let request = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n\
             GET /admin HTTP/1.1\r\nHost: x\r\nX-Forwarded-Client-Cert: Hash=forged\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let (answer, closed) = read_until_closed(&mut tls, Duration::from_secs(5)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(closed, "{upgrade}: {answer}");
        assert!(!answer.contains(" 101 "), "{upgrade}: switched: {answer}");
        assert_eq!(
            answer.matches("HTTP/1.1 200 OK").count(),
            2,
            "{upgrade}: {answer}"
        );
        let received = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
        assert!(!received.contains("forged"), "{upgrade}: {received}");
        assert!(
            !received.to_ascii_lowercase().contains("upgrade:"),
            "{upgrade}: {received}"
        );
    }
}

/// A request must name its host once, validly, and the same way in every
/// place it names it, or sheath and the upstream could route or trust it
/// by two different hosts: two `Host` headers, none in HTTP/1.1, an
/// invalid one, or over HTTP/2 a `Host` other than `:authority` get 400.
/// An absolute-form target names the host itself (its `Host` is ignored,
/// RFC 9112 §3.2.2), and HTTP/1.0 may name none.
#[tokio::test]
async fn a_request_names_one_host_or_is_refused() {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, crate::common::backend::http().await, "").await;
    let addr = proxy.addr("web");
    for (what, request) in [
        (
            "two Host headers",
            &b"GET /headers HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n"[..],
        ),
        (
            "no Host in HTTP/1.1",
            b"GET /headers HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
        (
            "an invalid Host",
            b"GET /headers HTTP/1.1\r\nHost: a.example/evil\r\nConnection: close\r\n\r\n",
        ),
        (
            "user information in Host",
            b"GET /headers HTTP/1.1\r\nHost: evil@a.example\r\nConnection: close\r\n\r\n",
        ),
        (
            "a port out of range",
            b"GET /headers HTTP/1.1\r\nHost: a.example:99999\r\nConnection: close\r\n\r\n",
        ),
        (
            "user information in an absolute-form target",
            b"GET http://evil@a.example/headers HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        ),
    ] {
        let answer = raw_exchange(addr, &pki, request).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{what}: {answer:?}");
    }

    let answer = raw_exchange(
        addr,
        &pki,
        b"GET http://a.example/headers HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert!(answer.contains("GET /headers HTTP/1.1\n"), "{answer:?}");
    assert!(answer.contains("\nhost: a.example\n"), "{answer:?}");
    assert!(
        answer.contains("\nx-forwarded-host: a.example\n"),
        "{answer:?}"
    );
    assert!(!answer.contains("b.example"), "{answer:?}");

    // No host to name: HTTP/1.0 without Host, or an empty Host. IPv6.
    for request in [
        &b"GET /headers HTTP/1.0\r\n\r\n"[..],
        b"GET /headers HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        b"GET /headers HTTP/1.1\r\nHost: [::1]:8443\r\nConnection: close\r\n\r\n",
    ] {
        let answer = raw_exchange(addr, &pki, request).await;
        assert!(answer.contains(" 200 OK\r\n"), "{answer:?}");
    }

    // HTTP/2: `:authority` and a Host that disagrees.
    let mut h2 = client::h2(addr, pki.roots()).await;
    let req = Request::get("https://a.example/headers")
        .header("host", "b.example")
        .body(client::empty())
        .unwrap();
    let resp = within("h2", h2.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let req = Request::get("https://a.example/headers")
        .header("host", "A.example")
        .body(client::empty())
        .unwrap();
    let resp = within("h2", h2.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // An invalid `:authority` would be the upstream's Host.
    for authority in ["evil@a.example", "a.example:99999"] {
        let req = Request::get(format!("https://{authority}/headers"))
            .body(client::empty())
            .unwrap();
        let resp = within("h2", h2.send_request(req)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{authority}");
    }
}

/// An upstream response with both a length and chunked coding (response
/// splitting, or a broken upstream) is read by its chunked coding, and the
/// client gets the body as read, without the length that would cut it
/// short (RFC 9112 §6.3); what the chunk held never becomes a response.
#[tokio::test]
async fn an_upstream_response_framed_two_ways_reaches_the_client_as_one_response() {
    let (backend_addr, _) = scripted_backend(|_| {
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
          14\r\nhelloHTTP/1.1 999 XX\r\n0\r\n\r\n"
    })
    .await;
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend_addr, "").await;
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    for round in 0..2 {
        let resp = within("h1", h1.send_request(get("/"))).await.unwrap();
        assert!(!resp.headers().contains_key("content-length"), "{resp:?}");
        assert_eq!(
            body_text(resp).await,
            "helloHTTP/1.1 999 XX",
            "round {round}"
        );
        let resp = within("h2", h2.send_request(client::get_h2("/")))
            .await
            .unwrap();
        assert_eq!(
            body_text(resp).await,
            "helloHTTP/1.1 999 XX",
            "round {round}"
        );
    }
}

/// hyper reads chunked framing and no other transfer coding: from a body
/// sent as `gzip, chunked` it takes the chunks off and leaves the bytes
/// compressed, and with the hop-by-hop `Transfer-Encoding` removed the
/// next hop would take them for the body itself. A request with another
/// coding gets 501 (RFC 9112 §6.1), as from nginx, never reaches the
/// backend, and ends its connection: nothing pipelined behind it is read;
/// an upstream response with one is a 502, not a corrupted body.
#[tokio::test]
async fn transfer_codings_other_than_chunked_are_refused_not_stripped() {
    let pki = TestPki::new();
    let (recorder, backend) = Recorder::start().await;
    let proxy = crate::http::http_proxy(&pki, backend, "").await;
    let addr = proxy.addr("web");
    for (what, request) in [
        (
            "gzip, chunked",
            &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        ),
        (
            "gzip and chunked on two lines",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "chunked twice",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ] {
        let answer = raw_exchange(addr, &pki, request).await;
        assert!(answer.starts_with("HTTP/1.1 501 "), "{what}: {answer:?}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{what}: {answer:?}");
    }
    assert_eq!(
        recorder.requests(),
        [],
        "a refused request reached the backend"
    );
    // Chunked alone, however spelt, goes on.
    let answer = raw_exchange(
        addr,
        &pki,
        b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  Chunked \r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer:?}");
    assert_eq!(
        recorder
            .requests()
            .into_iter()
            .map(|(_, s)| s)
            .collect::<Vec<_>>(),
        [seen("POST", "/chunked", Some(b"hello"))]
    );

    let answers: [fn(&str) -> &'static [u8]; 2] = [
        |_| b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        // Not chunked last: the body runs to the end of the connection.
        |_| b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    ];
    for answer in answers {
        let (backend, _) = scripted_backend(answer).await;
        let proxy = http_proxy(&pki, backend, "").await;
        let what = String::from_utf8_lossy(answer(""));
        let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
        let resp = within("h1", h1.send_request(get("/"))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{what}");
        let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
        let resp = within("h2", h2.send_request(client::get_h2("/")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "{what}");
        // The upstream was reached: no connect failure to count.
        assert_eq!(proxy.upstream_connect_failures("web"), 0);
    }
}

/// An upstream may switch protocols only to one the client asked for
/// (RFC 9110 §15.2.2). A 101 to a request without `Upgrade` left an
/// HTTP/1.1 client on a connection that was neither HTTP nor a tunnel,
/// and reset an HTTP/2 client's stream; it is a 502, and the client's
/// connection goes on serving.
#[tokio::test]
async fn an_upstream_that_switches_protocols_unasked_is_a_502() {
    let (backend, _) = scripted_backend(|_| {
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nraw"
    })
    .await;
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend, "").await;
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    for round in 0..2 {
        let resp = within("h1", h1.send_request(get("/"))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "round {round}");
        let _ = body_text(resp).await;
        let resp = within("h2", h2.send_request(client::get_h2("/")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY, "round {round}");
    }
}
