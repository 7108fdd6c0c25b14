//! HTTP mode: HTTP/1.1 and HTTP/2 by ALPN, streaming bodies, WebSocket,
//! forwarding headers, and sheath's own 502/504 answers.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::common::client::{self, body_text, get, get_h2, header, parse_headers};
use crate::common::{backend, pki, within, Proxy, TestPki};

/// An HTTP-mode listener `web` in front of `upstream`, with `extra` TOML
/// lines in its table.
pub async fn http_proxy(pki: &TestPki, upstream: std::net::SocketAddr, extra: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let toml = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"http\"\n{extra}\n{}",
        pki::files_cert_toml(&files)
    );
    Proxy::start_in(&toml, dir).await.unwrap()
}

#[tokio::test]
async fn a_request_sent_with_the_client_finished_is_answered() {
    // sheath waits for a client's first bytes before building the HTTP
    // connection; a request that came in with the handshake's last flight
    // is already in rustls, and must not wait for the socket.
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::http().await, "").await;
    let config = client::client_config(pki.roots(), &[b"http/1.1"]);
    let request = b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let response =
        client::send_with_finished(proxy.addr("web"), config, request.to_vec(), usize::MAX)
            .await
            .unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nok"), "{text}");
}

#[tokio::test]
async fn http1_get_reaches_backend_with_forwarding_headers() {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::http().await, "").await;
    let mut sender = client::h1(proxy.addr("web"), pki.roots()).await;
    let req = Request::get("/headers?a=1")
        .header("host", "app.example:8443")
        // Forged by the client: must never reach the backend.
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "http")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must not pass")
        .body(client::empty())
        .unwrap();
    let resp = within("response", sender.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = body_text(resp).await;
    assert!(text.starts_with("GET /headers?a=1 HTTP/1.1"), "{text}");
    let h = parse_headers(&text);
    assert_eq!(header(&h, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(header(&h, "x-forwarded-proto"), ["https"]);
    assert_eq!(header(&h, "x-forwarded-host"), ["app.example:8443"]);
    assert_eq!(
        header(&h, "forwarded"),
        ["for=127.0.0.1;host=\"app.example:8443\";proto=https"]
    );
    assert_eq!(header(&h, "host"), ["app.example:8443"]);
    assert!(header(&h, "x-hop").is_empty(), "{text}");

    // Keep-alive: a second request on the same client connection.
    let resp = sender.send_request(get("/")).await.unwrap();
    assert_eq!(body_text(resp).await, "ok");
}

#[tokio::test]
async fn request_targets_reach_the_upstream_in_origin_form_or_are_refused() {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::http().await, "").await;
    let send = |request: &'static [u8]| {
        let config = client::client_config(pki.roots(), &[b"http/1.1"]);
        let addr = proxy.addr("web");
        async move {
            let response = client::send_with_finished(addr, config, request.to_vec(), usize::MAX)
                .await
                .unwrap();
            String::from_utf8_lossy(&response).into_owned()
        }
    };
    // Absolute form (RFC 9112 §3.2.2): the upstream gets path and query only.
    let text = send(
        b"GET http://app.example/headers?b=2 HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("GET /headers?b=2 HTTP/1.1"), "{text}");
    // Asterisk form is not passed on.
    let text = send(b"OPTIONS * HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(
        text.ends_with("only origin-form request targets are proxied\n"),
        "{text}"
    );
}

#[tokio::test]
async fn http2_get_is_forwarded_as_http1_with_host() {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::http().await, "").await;
    let mut sender = client::h2(proxy.addr("web"), pki.roots()).await;
    // Several concurrent streams on one connection.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(sender.send_request(get_h2("/headers")));
    }
    for task in tasks {
        let resp = within("h2 response", task).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let text = body_text(resp).await;
        assert!(text.starts_with("GET /headers HTTP/1.1"), "{text}");
        let h = parse_headers(&text);
        assert_eq!(header(&h, "host"), ["localhost"]);
        assert_eq!(header(&h, "x-forwarded-proto"), ["https"]);
    }
}

/// The request body must flow to the backend while the client is still
/// sending, and the response back while the backend is still answering:
/// the client waits for the echo of each chunk before sending the next, so
/// a proxy that buffered either body would deadlock here.
async fn streaming_echo(h2: bool) {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::http().await, "").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
    let body = BodyExt::boxed(StreamBody::new(tokio_stream_from(rx)));
    let (uri, host) = if h2 {
        ("https://localhost/echo", None)
    } else {
        ("/echo", Some("localhost"))
    };
    let mut builder = Request::post(uri);
    if let Some(host) = host {
        builder = builder.header("host", host);
    }
    let req = builder.body(body).unwrap();
    let resp = if h2 {
        let mut s = client::h2(proxy.addr("web"), pki.roots()).await;
        within("response head", s.send_request(req)).await.unwrap()
    } else {
        let mut s = client::h1(proxy.addr("web"), pki.roots()).await;
        // hyper's h1 client only sends the head once the body starts.
        tx.send(Ok(Frame::data(Bytes::from_static(b"chunk-0;"))))
            .await
            .unwrap();
        let resp = within("response head", s.send_request(req)).await.unwrap();
        let mut body = resp.into_body();
        let frame = within("first echo", body.frame()).await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), &b"chunk-0;"[..]);
        return finish_echo(tx, body, 1).await;
    };
    assert_eq!(resp.status(), StatusCode::OK);
    finish_echo(tx, resp.into_body(), 0).await
}

async fn finish_echo(
    tx: tokio::sync::mpsc::Sender<Result<Frame<Bytes>, hyper::Error>>,
    mut body: hyper::body::Incoming,
    start: usize,
) {
    for i in start..20 {
        let chunk = format!("chunk-{i};").repeat(100);
        tx.send(Ok(Frame::data(Bytes::from(chunk.clone()))))
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.len() < chunk.len() {
            let frame = within("echo of the chunk just sent", body.frame())
                .await
                .expect("body continues")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
            }
        }
        assert_eq!(got, chunk.as_bytes());
    }
    drop(tx);
    // The end of the stream may come as an empty frame before `None`.
    while let Some(frame) = within("end of body", body.frame()).await {
        let frame = frame.unwrap();
        assert!(
            frame.data_ref().is_none_or(|d| d.is_empty()),
            "data after the last chunk"
        );
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn http1_streaming_post_is_not_buffered() {
    streaming_echo(false).await;
}

#[tokio::test]
async fn http2_streaming_post_is_not_buffered() {
    streaming_echo(true).await;
}

#[tokio::test]
async fn websocket_upgrade_echoes() {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::websocket_echo().await, "").await;
    let (mut ws, resp) = client::websocket(proxy.addr("web"), pki.roots()).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..50 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = within("echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    let big = crate::common::random_bytes(256 * 1024);
    ws.send(Message::binary(big.clone())).await.unwrap();
    let echoed = within("binary echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(&echoed.into_data()[..], &big[..]);
    ws.close(None).await.unwrap();
}

/// An upgraded connection is still a connection: the active gauge counts
/// it, and `max_lifetime` ends it (its client was judged once, at the
/// handshake). Both ended with the HTTP connection that handed it over.
#[tokio::test]
async fn a_websocket_counts_as_active_and_ends_at_max_lifetime() {
    let pki = TestPki::new();
    let proxy = http_proxy(
        &pki,
        backend::websocket_echo().await,
        "[listener.timeouts]\nmax_lifetime = \"1s\"\n",
    )
    .await;
    let stats = proxy.running().listener("web").unwrap().stats.clone();
    let active = move || stats.active.load(std::sync::atomic::Ordering::Relaxed);
    let (mut ws, _) = client::websocket(proxy.addr("web"), pki.roots()).await;
    ws.send(Message::text("hello")).await.unwrap();
    let echoed = within("echo", ws.next()).await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "hello");
    assert_eq!(active(), 1, "an open tunnel is an active connection");

    let ended = within("the tunnel's end at max_lifetime", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    });
    ended.await;
    crate::common::eventually("the gauge back to 0", || active() == 0).await;
}

/// Trailers travel end to end over HTTP/1.1 as well: the upstream's to
/// the client, the client's to the upstream. An HTTP/1.1 sender writes
/// only the trailers it announced in `Trailer`, and a server only to a
/// client that said `TE: trailers`, so a proxy that drops either header
/// drops the trailers.
#[tokio::test]
async fn trailers_pass_both_ways_over_an_http1_upstream() {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::http().await, "").await;
    let mut s = client::h1(proxy.addr("web"), pki.roots()).await;

    let mut req = get("/trailers");
    req.headers_mut().insert("te", "trailers".parse().unwrap());
    let resp = within("response", s.send_request(req)).await.unwrap();
    assert_eq!(resp.headers()["trailer"], "grpc-status, grpc-message");
    let body = within("body", resp.into_body().collect()).await.unwrap();
    let trailers = body.trailers().cloned().expect("trailers reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "all%20good");
    assert_eq!(body.to_bytes(), "done");

    // A chunked upload with a trailer, echoed back by the upstream.
    let mut sent = http::HeaderMap::new();
    sent.insert("x-checksum", "c0ffee".parse().unwrap());
    let req = client::post_with_trailers("/echo", b"payload", sent);
    let resp = within("echo", s.send_request(req)).await.unwrap();
    let body = within("echo body", resp.into_body().collect())
        .await
        .unwrap();
    let trailers = body
        .trailers()
        .cloned()
        .expect("the request's trailer came back");
    assert_eq!(trailers["x-checksum"], "c0ffee");
    assert_eq!(body.to_bytes(), "payload");

    // An HTTP/2 client's trailers come from the HTTP/1.1 upstream too.
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    let mut req = get_h2("/trailers");
    req.headers_mut().insert("te", "trailers".parse().unwrap());
    let resp = within("h2 response", h2.send_request(req)).await.unwrap();
    let body = within("h2 body", resp.into_body().collect()).await.unwrap();
    let trailers = body
        .trailers()
        .cloned()
        .expect("trailers reach the h2 client");
    assert_eq!(trailers["grpc-status"], "0");
}

/// A client that reads trailers says so with `TE: trailers`; sheath says it
/// again to the upstream (naming TE in `Connection`, as HTTP/1.1 requires)
/// and drops any other TE, which describes only the client's hop.
#[tokio::test]
async fn te_trailers_is_said_again_to_the_upstream() {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::http().await, "").await;
    let mut s = client::h1(proxy.addr("web"), pki.roots()).await;
    let cases: [(&str, &[&str], &[&str]); 2] = [
        ("gzip, trailers", &["trailers"], &["te"]),
        ("gzip", &[], &[]),
    ];
    for (te, upstream_te, upstream_connection) in cases {
        let mut req = get("/headers");
        req.headers_mut().insert("te", te.parse().unwrap());
        let resp = within("response", s.send_request(req)).await.unwrap();
        let text = body_text(resp).await;
        let h = parse_headers(&text);
        assert_eq!(header(&h, "te"), upstream_te, "{text}");
        assert_eq!(header(&h, "connection"), upstream_connection, "{text}");
    }
}

#[tokio::test]
async fn upstream_refusing_gives_502_with_reason() {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::closed_port().await, "").await;
    for h2 in [false, true] {
        let resp = if h2 {
            let mut s = client::h2(proxy.addr("web"), pki.roots()).await;
            within("502", s.send_request(get_h2("/"))).await.unwrap()
        } else {
            let mut s = client::h1(proxy.addr("web"), pki.roots()).await;
            within("502", s.send_request(get("/"))).await.unwrap()
        };
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
        let text = body_text(resp).await;
        assert!(text.contains("refused the connection"), "{text}");
    }
}

#[tokio::test]
async fn slow_upstream_gives_504_and_the_next_request_works() {
    let pki = TestPki::new();
    let proxy = http_proxy(
        &pki,
        backend::http().await,
        "[listener.timeouts]\nupstream_response = \"300ms\"\n",
    )
    .await;
    let mut s = client::h1(proxy.addr("web"), pki.roots()).await;
    let resp = within("504", s.send_request(get("/slow?ms=3000")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(body_text(resp).await.contains("did not respond in time"));
    let resp = within("fast request", s.send_request(get("/")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// The upstream timeout bounds the wait for an answer, which an upstream
/// that reads an upload before it answers can only give once the upload
/// is over: it counts from the request's end, as Envoy's route timeout
/// does, not from its start. Counted from the start, an upload that took
/// longer than `upstream_response` (60 s by default; a large file, a slow
/// link, a gRPC client stream) got a 504 while the upstream was still
/// reading it.
#[tokio::test]
async fn an_upload_longer_than_the_upstream_timeout_gets_its_answer() {
    let pki = TestPki::new();
    let proxy = http_proxy(
        &pki,
        backend::http().await,
        "[listener.timeouts]\nupstream_response = \"400ms\"\n",
    )
    .await;
    for h2 in [false, true] {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
        let body = BodyExt::boxed(StreamBody::new(tokio_stream_from(rx)));
        // Ten chunks, 150 ms apart: the upload takes more than three
        // times the upstream timeout. The pace is the test's subject, not
        // a wait for something to happen.
        let upload = async move {
            let mut pace = tokio::time::interval(std::time::Duration::from_millis(150));
            for _ in 0..10 {
                pace.tick().await;
                let chunk = Frame::data(Bytes::from_static(&[b'u'; 1000]));
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        };
        let resp = if h2 {
            let mut s = client::h2(proxy.addr("web"), pki.roots()).await;
            let req = Request::post("https://localhost/length")
                .body(body)
                .unwrap();
            let (resp, ()) = within("h2 upload", async {
                tokio::join!(s.send_request(req), upload)
            })
            .await;
            resp.unwrap()
        } else {
            let mut s = client::h1(proxy.addr("web"), pki.roots()).await;
            let req = Request::post("/length")
                .header("host", "localhost")
                .body(body)
                .unwrap();
            let (resp, ()) = within("h1 upload", async {
                tokio::join!(s.send_request(req), upload)
            })
            .await;
            resp.unwrap()
        };
        let status = resp.status();
        let text = body_text(resp).await;
        assert_eq!(
            (status, text.as_str()),
            (StatusCode::OK, "10000"),
            "h2: {h2}"
        );
    }

    // An upstream that has the whole request and does not answer still
    // gets the timeout.
    let mut s = client::h1(proxy.addr("web"), pki.roots()).await;
    let resp = within("504", s.send_request(get("/slow?ms=3000")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
}

/// A request body that stops coming on an HTTP/2 connection kept busy
/// by other requests: the connection's idle timeout never fires, and the
/// upstream timeout waits for the body's end, so only a bound of the
/// request's own ends it, with a 408, before it holds its upstream
/// connection for good.
#[tokio::test]
async fn a_stalled_upload_on_a_busy_http2_connection_gets_a_408() {
    let pki = TestPki::new();
    let proxy = http_proxy(
        &pki,
        backend::http().await,
        "[listener.timeouts]\nidle = \"1s\"\n",
    )
    .await;
    let mut s = client::h2(proxy.addr("web"), pki.roots()).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
    tx.send(Ok(Frame::data(Bytes::from_static(b"the start"))))
        .await
        .unwrap();
    let req = Request::post("https://localhost/length")
        .body(BodyExt::boxed(StreamBody::new(tokio_stream_from(rx))))
        .unwrap();
    let stalled = s.send_request(req);
    let mut other = s.clone();
    // A request every 200 ms keeps the connection busy: the pace is the
    // test's subject, not a wait for something to happen.
    let busy = async move {
        loop {
            let resp = other.send_request(get_h2("/hello")).await.unwrap();
            assert_eq!(body_text(resp).await, "ok");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    let resp = within("the stalled upload's answer", async {
        tokio::select! {
            resp = stalled => resp.unwrap(),
            () = busy => unreachable!(),
        }
    })
    .await;
    assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(
        body_text(resp).await,
        "408 Request Timeout: the request body stopped coming\n"
    );
    drop(tx);
    // The connection serves on.
    let resp = s.send_request(get_h2("/hello")).await.unwrap();
    assert_eq!(body_text(resp).await, "ok");
}

#[tokio::test]
async fn large_download_streams_completely() {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::http().await, "").await;
    let mut s = client::h2(proxy.addr("web"), pki.roots()).await;
    let resp = within(
        "download",
        s.send_request(get_h2("/drip?chunks=256&size=65536&ms=0")),
    )
    .await
    .unwrap();
    let body = within("body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), 256 * 65536);
}

#[tokio::test]
async fn tls_min_version_1_3_refuses_tls_1_2_clients() {
    let pki = TestPki::new();
    let upstream = backend::http().await;
    let strict = http_proxy(&pki, upstream, "tls_min_version = \"1.3\"").await;
    let default = http_proxy(&pki, upstream, "").await;
    let tls12_only = {
        sheath::install_crypto_provider();
        let mut config =
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
                .with_root_certificates(pki.roots())
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        std::sync::Arc::new(config)
    };
    let refused = client::connect(strict.addr("web"), tls12_only.clone()).await;
    let error = refused.expect_err("a TLS 1.2 handshake with a 1.3-only listener");
    assert!(error.to_string().contains("ProtocolVersion"), "{error}");
    // TLS 1.3 clients are served, and the default still takes TLS 1.2.
    let tls13 = client::connect(
        strict.addr("web"),
        client::client_config(pki.roots(), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(
        tls13.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let tls12 = client::connect(default.addr("web"), tls12_only)
        .await
        .unwrap();
    assert_eq!(
        tls12.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );

    // A real peer: OpenSSL limited to TLS 1.2 gets no session.
    if crate::common::require_tool("openssl") {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki.write_ca(dir.path());
        let s_client = |version: &'static str| {
            let addr = strict.addr("web").to_string();
            let ca = ca.clone();
            async move {
                tokio::process::Command::new("openssl")
                    .args(["s_client", "-connect", &addr, "-servername", "localhost"])
                    .arg(version)
                    .arg("-CAfile")
                    .arg(&ca)
                    .arg("-verify_return_error")
                    .stdin(std::process::Stdio::null())
                    .output()
                    .await
                    .unwrap()
            }
        };
        let out = within("openssl -tls1_2", s_client("-tls1_2")).await;
        assert!(!out.status.success(), "TLS 1.2 accepted");
        let out = within("openssl -tls1_3", s_client("-tls1_3")).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("New, TLSv1.3, Cipher is"), "{text}");
    }
}

/// What the flapping backend does with each request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Flap {
    /// `200 ok`, keep-alive.
    Serve,
    /// Reads the request, then resets the connection.
    ResetBeforeAnswering,
    /// Sends the head and a first 1 KiB chunk of the body, then resets.
    ResetMidBody,
}

/// A backend on a fixed port that can go down (nothing listening, its
/// connections closed), come back, and misbehave.
struct Flapping {
    addr: std::net::SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Flapping {
    fn new() -> Flapping {
        let port = crate::common::pebble::free_port();
        Flapping {
            addr: ([127, 0, 0, 1], port).into(),
            task: None,
        }
    }

    fn down(&mut self) {
        if let Some(task) = self.task.take() {
            // Dropping the accept loop drops its connections' JoinSet.
            task.abort();
        }
    }

    async fn up(&mut self, flap: Flap) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.down();
        let listener = within("rebind", async {
            loop {
                match tokio::net::TcpListener::bind(self.addr).await {
                    Ok(listener) => return listener,
                    // The aborted loop's socket closes as its task is dropped.
                    Err(_) => tokio::task::yield_now().await,
                }
            }
        })
        .await;
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                connections.spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.clear();
                        match flap {
                            Flap::Serve => {
                                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                                if tcp.write_all(ok).await.is_err() {
                                    return;
                                }
                            }
                            Flap::ResetBeforeAnswering => {
                                tcp.set_zero_linger().unwrap();
                                return;
                            }
                            Flap::ResetMidBody => {
                                // Chunked: only the missing last chunk says
                                // the body is incomplete.
                                let mut partial =
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n"
                                        .to_vec();
                                partial.extend_from_slice(&[b'x'; 1024]);
                                partial.extend_from_slice(b"\r\n");
                                let _ = tcp.write_all(&partial).await;
                                tcp.set_zero_linger().unwrap();
                                return;
                            }
                        }
                    }
                });
            }
        }));
    }
}

/// One request on a fresh HTTP/1.1 connection through `proxy`: the status
/// and the body, or the error reading them, and how long it took.
async fn timed_get(
    proxy: std::net::SocketAddr,
    pki: &TestPki,
) -> (StatusCode, Result<Bytes, hyper::Error>, std::time::Duration) {
    let started = std::time::Instant::now();
    let mut s = client::h1(proxy, pki.roots()).await;
    let resp = within("response", s.send_request(get("/"))).await.unwrap();
    let status = resp.status();
    let body = within("body", resp.into_body().collect())
        .await
        .map(|b| b.to_bytes());
    (status, body, started.elapsed())
}

/// A backend that goes down, comes back, resets connections before and
/// while answering: each failure is a prompt 502 (or, once the response
/// has begun, a response the client can tell is cut short), and each
/// recovery is used by the very next request, with no penalty carried
/// over from the failures.
#[tokio::test]
async fn a_flapping_and_resetting_backend_gets_prompt_502s_and_immediate_recovery() {
    let pki = TestPki::new();
    let mut backend = Flapping::new();
    let proxy = http_proxy(&pki, backend.addr, "").await;
    let web = proxy.addr("web");
    let prompt = std::time::Duration::from_secs(2);
    // One client connection across every phase as well.
    let mut kept = client::h1(web, pki.roots()).await;
    let mut kept_get = async || {
        let resp = within("response", kept.send_request(get("/")))
            .await
            .unwrap();
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        status
    };

    for round in 0..3 {
        backend.down();
        let (status, _, took) = timed_get(web, &pki).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "round {round}, down");
        assert!(took < prompt, "a 502 for a refused connect took {took:?}");
        assert_eq!(kept_get().await, StatusCode::BAD_GATEWAY);

        backend.up(Flap::Serve).await;
        let (status, body, _) = timed_get(web, &pki).await;
        assert_eq!(status, StatusCode::OK, "round {round}, back up");
        assert_eq!(body.unwrap(), "ok");
        assert_eq!(kept_get().await, StatusCode::OK, "round {round}, back up");

        backend.up(Flap::ResetBeforeAnswering).await;
        let (status, _, took) = timed_get(web, &pki).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "round {round}, reset");
        assert!(took < prompt, "a 502 for a reset took {took:?}");
        assert_eq!(kept_get().await, StatusCode::BAD_GATEWAY);

        backend.up(Flap::ResetMidBody).await;
        let (status, body, took) = timed_get(web, &pki).await;
        assert_eq!(status, StatusCode::OK, "round {round}, the head was sent");
        assert!(
            body.is_err(),
            "a body cut short by the backend reached the client as complete: {} bytes",
            body.unwrap().len()
        );
        assert!(took < prompt, "the cut took {took:?} to reach the client");
        let mut h2 = client::h2(web, pki.roots()).await;
        let resp = within("h2 response", h2.send_request(get_h2("/")))
            .await
            .unwrap();
        let body = within("h2 body", resp.into_body().collect()).await;
        assert!(body.is_err(), "HTTP/2: a body cut short arrived complete");
    }
    backend.up(Flap::Serve).await;
    let (status, body, _) = timed_get(web, &pki).await;
    assert_eq!((status, body.unwrap()), (StatusCode::OK, Bytes::from("ok")));
    // Two requests a round found the backend down; the resets came on
    // connections it had accepted, and are not connect failures.
    assert_eq!(proxy.upstream_connect_failures("web"), 6);
}

/// A large upload the upstream answers without reading it all, or cannot
/// take at all: the client gets the answer, not a reset. A server that
/// closes a connection with unread bytes in its receive buffer sends RST,
/// and a client still sending may lose the response it had not read yet;
/// an HTTP/2 stream reset after the answer is an error to curl 7.88. So
/// sheath reads and discards the rest of the body (bounded in time), as
/// nginx does. And curl's `Expect: 100-continue` before a large
/// HTTP/1.1 upload is answered as soon as the upstream starts reading the
/// body: with curl told to wait a minute for it, the upload goes through at
/// once, byte for byte.
#[tokio::test]
async fn large_uploads_get_their_answer_even_when_the_upstream_does_not_read_them() {
    if !crate::common::require_tool("curl") {
        return;
    }
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::http().await, "").await;
    let down = http_proxy(&pki, backend::closed_port().await, "").await;
    // An upstream that takes 256 KiB of a body, then resets: sheath's
    // answer (502) comes while the client is sending as fast as it can.
    let resetting = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let resetting_addr = resetting.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut tcp, _)) = resetting.accept().await {
            tokio::spawn(async move {
                let mut taken = 0;
                let mut buf = vec![0u8; 64 * 1024];
                while taken < 256 * 1024 {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => taken += n,
                    }
                }
                tcp.set_zero_linger().unwrap();
            });
        }
    });
    let reset = http_proxy(&pki, resetting_addr, "").await;
    let dir = proxy.dir.path();
    let ca = pki.write_ca(dir);
    let upload = crate::common::random_bytes(3 << 20);
    let upload_path = dir.join("upload");
    std::fs::write(&upload_path, &upload).unwrap();
    let out = dir.join("answer");
    let curl = |port: u16, args: &'static [&'static str], path: &'static str| {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "30"])
            .args(args)
            .arg("--data-binary")
            .arg(format!("@{}", upload_path.display()))
            .arg("--cacert")
            .arg(&ca)
            .args(["-w", "%{http_code}", "-o"])
            .arg(&out)
            .arg(format!("https://localhost:{port}{path}"));
        let out = out.clone();
        async move {
            let done = within("curl", cmd.output()).await.unwrap();
            assert!(
                done.status.success(),
                "{args:?} {path}: {}",
                String::from_utf8_lossy(&done.stderr)
            );
            let status = String::from_utf8_lossy(&done.stdout).into_owned();
            (status, std::fs::read(out).unwrap())
        }
    };
    let port = proxy.addr("web").port();
    // curl waits a minute for `100 Continue` here: the deadline fails the
    // test long before, if sheath does not send it.
    const EXPECT: &[&str] = &[
        "--http1.1",
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "60",
    ];
    let (status, echoed) = curl(port, EXPECT, "/echo").await;
    assert_eq!(status, "200");
    assert!(echoed == upload, "the upload came back altered");
    // Several times each: whether a reset overtakes the answer is a race.
    for args in [EXPECT, &["--http1.1", "-H", "Expect:"], &["--http2"]] {
        for round in 0..5 {
            // Answered before the body is read; the upstream then reads
            // and discards it.
            let (status, answer) = curl(port, args, "/early").await;
            assert_eq!(status, "413", "{args:?} round {round}");
            assert_eq!(answer, b"too large", "{args:?} round {round}");
            // Nothing to take the body: sheath answers before reading it.
            let (status, _) = curl(down.addr("web").port(), args, "/").await;
            assert_eq!(status, "502", "{args:?} round {round}");
            // The upstream fails part-way through the body.
            let (status, _) = curl(reset.addr("web").port(), args, "/").await;
            assert_eq!(status, "502", "{args:?} round {round}");
        }
    }
}

/// Browsers split their cookies over several `cookie` fields in HTTP/2;
/// an HTTP/1.1 upstream gets them as the one `Cookie` line HTTP/1.1
/// allows (RFC 9113 §8.2.3), in their order, since many servers read only
/// the first line.
#[tokio::test]
async fn cookies_split_by_an_http2_client_reach_an_http1_upstream_as_one_line() {
    let pki = TestPki::new();
    let proxy = http_proxy(&pki, backend::http().await, "").await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    let req = Request::get("https://localhost/headers")
        .header("cookie", "session=abc")
        .header("cookie", "theme=dark")
        .header("cookie", "lang=en")
        .body(client::empty())
        .unwrap();
    let text = body_text(within("h2", h2.send_request(req)).await.unwrap()).await;
    let h = parse_headers(&text);
    assert_eq!(
        header(&h, "cookie"),
        ["session=abc; theme=dark; lang=en"],
        "{text}"
    );
}

/// An h2c upstream that answers every stream with RST_STREAM `reason`.
async fn resetting_h2c_upstream(reason: h2::Reason) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                // Polling for the next stream also drives the connection,
                // which sends the reset.
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    respond.send_reset(reason);
                }
            });
        }
    });
    addr
}

/// A stream the h2c upstream reset is a 502 that says how it was reset.
/// It said only "http2 error": hyper's summary, with the reason (the one
/// thing that tells a refused stream from a crashed handler) left in the
/// error's source.
#[tokio::test]
async fn an_h2c_stream_reset_gives_502_with_its_reason() {
    let pki = TestPki::new();
    let upstream = resetting_h2c_upstream(h2::Reason::INTERNAL_ERROR).await;
    let proxy = http_proxy(&pki, upstream, "upstream_protocol = \"h2c\"").await;
    for h2 in [false, true] {
        let resp = if h2 {
            let mut s = client::h2(proxy.addr("web"), pki.roots()).await;
            within("502", s.send_request(get_h2("/"))).await.unwrap()
        } else {
            let mut s = client::h1(proxy.addr("web"), pki.roots()).await;
            within("502", s.send_request(get("/"))).await.unwrap()
        };
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        let text = body_text(resp).await;
        assert!(
            text.contains(&format!("upstream {upstream} failed: "))
                && text.contains("stream reset by the upstream")
                && text.contains("INTERNAL_ERROR"),
            "{text}"
        );
    }
}
