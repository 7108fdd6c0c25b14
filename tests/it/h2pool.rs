//! The h2c connections a worker keeps to an upstream: streams counted
//! against each connection's limit, connections dropped when closed or
//! idle, under every way a request can end.

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sheath::metrics::UpstreamKind::H2c;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::backend::{CountingBackend, Speaks};
use crate::common::client::{self, body_text, get, get_h2};
use crate::common::h2raw::{
    h2_frame, read_frame, settings, ACK, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADERS,
    INTERNAL_ERROR, NO_ERROR, REFUSED_STREAM, RST_STREAM, SETTINGS,
};
use crate::common::{eventually, within, TestPki};
use crate::http::http_proxy;

type ClientBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// A request body that is sent as the test feeds it, and never ends
/// until the sender is dropped.
fn streaming(
    uri: &str,
) -> (
    Request<ClientBody>,
    tokio::sync::mpsc::UnboundedSender<Bytes>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let data = rx.recv().await?;
        Some((Ok::<_, hyper::Error>(hyper::body::Frame::data(data)), rx))
    });
    let body = http_body_util::StreamBody::new(frames).boxed();
    (
        Request::post(uri)
            .header("host", "localhost")
            .body(body)
            .unwrap(),
        tx,
    )
}

/// A limit-1 upstream (`SETTINGS_MAX_CONCURRENT_STREAMS` 1) serves
/// sequential requests on one connection only if every way a request ends
/// gives its stream back: a stream counted after it ended would have each
/// later request open a connection. A response that ends while its request
/// body is still being sent leaves the stream open at the upstream, so it
/// still counts until the upload ends: the next request goes on another
/// connection instead of queueing behind the upload.
#[tokio::test]
async fn every_way_a_request_ends_gives_its_h2c_stream_back() {
    let pki = TestPki::new();
    let backend = CountingBackend::speaking(Speaks::H2cMaxStreams(1)).await;
    let proxy = http_proxy(
        &pki,
        backend.addr,
        "upstream_protocol = \"h2c\"\n[listener.timeouts]\nupstream_idle = \"300ms\"\nupstream_response = \"2s\"\n",
    )
    .await;
    let stats = proxy.running().listener("web").unwrap().stats;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;

    for round in 0..3 {
        let resp = within("GET", h2.send_request(get_h2("/"))).await.unwrap();
        assert_eq!(body_text(resp).await, "ok");
        let resp = within("HTTP/1.1 GET", h1.send_request(get("/")))
            .await
            .unwrap();
        assert_eq!(body_text(resp).await, "ok");
        let resp = within("204", h2.send_request(get_h2("/empty")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        body_text(resp).await;
        let resp = within("HTTP/1.1 204", h1.send_request(get("/empty")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        body_text(resp).await;
        let head = Request::head("/")
            .header("host", "localhost")
            .body(client::empty())
            .unwrap();
        let resp = within("HTTP/1.1 HEAD", h1.send_request(head))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        body_text(resp).await;
        // The client abandons a response halfway (RST_STREAM CANCEL).
        let resp = within("/drip", h2.send_request(get_h2("/drip?chunks=500&ms=10")))
            .await
            .unwrap();
        let mut body = resp.into_body();
        within("a first chunk", body.frame())
            .await
            .unwrap()
            .unwrap();
        drop(body);
        eventually("the abandoned request ended", || backend.handling() == 0).await;
        assert_eq!(backend.accepted(), 1, "round {round}: one connection");
    }

    // A 413 while the upload goes on: the stream is still open.
    let (req, upload) = streaming("https://localhost/early");
    let resp = within("/early", h2.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    body_text(resp).await;
    upload.send(Bytes::from_static(b"more")).unwrap();
    let resp = within("a GET during the upload", h2.send_request(get_h2("/")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "a GET during the upload");
    assert_eq!(body_text(resp).await, "ok");
    assert_eq!(backend.accepted(), 2, "the GET went on a second connection");
    // Once the upload ends, its connection is free again.
    drop(upload);
    for _ in 0..5 {
        let resp = within("GET", h2.send_request(get_h2("/"))).await.unwrap();
        assert_eq!(body_text(resp).await, "ok");
    }
    assert_eq!(backend.accepted(), 2, "no connection more after the upload");

    eventually("every h2c connection idled out", || {
        stats.upstream_connections(H2c).0 == 0
    })
    .await;
    eventually("the backend saw them close", || backend.open() == 0).await;
}

/// What [`RawUpstream`] does with a request's stream.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// `200` with the body `ok`.
    Ok,
    /// RST_STREAM with REFUSED_STREAM, once the request's head has arrived
    /// and, if it has a body, the first DATA frame of it.
    Refuse,
    /// A GOAWAY (NO_ERROR) whose last stream id is below this stream's, as
    /// a server shutting down gracefully sends for streams it will not
    /// process. The connection stays open until sheath closes it.
    GoAwayBelow,
    /// A GOAWAY with INTERNAL_ERROR whose last stream id is this stream's
    /// (it was processed), then the connection closed without an answer.
    GoAwayCovering,
}

/// An h2c upstream written frame by frame, to refuse streams and go away
/// exactly when a test needs it: hyper's server does neither on demand.
/// Requests are numbered in the order their heads arrive, over every
/// connection; `plan` says what each gets.
struct RawUpstream {
    addr: std::net::SocketAddr,
    /// Request heads (HEADERS frames) seen.
    requests: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    /// Connections that sheath closed (or that ended) since.
    closed: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(plan: fn(usize) -> Answer) -> RawUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = RawUpstream {
            addr: listener.local_addr().unwrap(),
            requests: Arc::default(),
            accepted: Arc::default(),
            closed: Arc::default(),
        };
        let (requests, accepted, closed) = (
            Arc::clone(&upstream.requests),
            Arc::clone(&upstream.accepted),
            Arc::clone(&upstream.closed),
        );
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, SeqCst);
                let (requests, closed) = (Arc::clone(&requests), Arc::clone(&closed));
                tokio::spawn(async move {
                    // An I/O error is the test's failure to see, as a
                    // request without its answer.
                    let _ = RawUpstream::serve(tcp, plan, &requests).await;
                    closed.fetch_add(1, SeqCst);
                });
            }
        });
        upstream
    }

    async fn serve(
        mut tcp: tokio::net::TcpStream,
        plan: fn(usize) -> Answer,
        requests: &AtomicUsize,
    ) -> std::io::Result<()> {
        let mut preface = [0u8; 24];
        tcp.read_exact(&mut preface).await?;
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        tcp.write_all(&settings(&[])).await?;
        // Streams to refuse once a DATA frame of theirs arrives.
        let mut refuse_on_data = Vec::new();
        let refuse = |stream: u32| h2_frame(RST_STREAM, 0, stream, &REFUSED_STREAM.to_be_bytes());
        let go_away = |last: u32, code: u32| {
            let mut payload = last.to_be_bytes().to_vec();
            payload.extend_from_slice(&code.to_be_bytes());
            h2_frame(GOAWAY, 0, 0, &payload)
        };
        while let Some(frame) = read_frame(&mut tcp).await {
            match frame.kind {
                SETTINGS if frame.flags & ACK == 0 => {
                    tcp.write_all(&h2_frame(SETTINGS, ACK, 0, &[])).await?;
                }
                HEADERS => match plan(requests.fetch_add(1, SeqCst)) {
                    Answer::Ok => {
                        // `:status: 200`, HPACK's static entry 8.
                        let mut answer = h2_frame(HEADERS, END_HEADERS, frame.stream, &[0x88]);
                        answer.extend(h2_frame(DATA, END_STREAM, frame.stream, b"ok"));
                        tcp.write_all(&answer).await?;
                    }
                    Answer::Refuse if frame.flags & END_STREAM != 0 => {
                        tcp.write_all(&refuse(frame.stream)).await?;
                    }
                    Answer::Refuse => refuse_on_data.push(frame.stream),
                    Answer::GoAwayBelow => {
                        tcp.write_all(&go_away(frame.stream.saturating_sub(2), NO_ERROR))
                            .await?;
                    }
                    Answer::GoAwayCovering => {
                        tcp.write_all(&go_away(frame.stream, INTERNAL_ERROR))
                            .await?;
                        // A FIN, read after the GOAWAY; what sheath still
                        // sends is read below until it closes too.
                        tcp.shutdown().await?;
                    }
                },
                DATA if refuse_on_data.contains(&frame.stream) => {
                    refuse_on_data.retain(|s| *s != frame.stream);
                    tcp.write_all(&refuse(frame.stream)).await?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn requests(&self) -> usize {
        self.requests.load(SeqCst)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(SeqCst)
    }
}

async fn h2c_proxy(pki: &TestPki, upstream: &RawUpstream) -> crate::common::Proxy {
    http_proxy(pki, upstream.addr, "upstream_protocol = \"h2c\"").await
}

/// Send `req` on `h2` within the deadline and read the whole answer.
async fn answer(
    h2: &mut hyper::client::conn::http2::SendRequest<ClientBody>,
    what: &str,
    req: Request<ClientBody>,
) -> (StatusCode, String) {
    let resp = within(what, h2.send_request(req)).await.unwrap();
    (resp.status(), body_text(resp).await)
}

fn post_h2(body: ClientBody) -> Request<ClientBody> {
    Request::post("https://localhost/").body(body).unwrap()
}

/// An h2c upstream resets with REFUSED_STREAM the streams it will not
/// process (past a stream limit it just lowered, or shedding load), and
/// RFC 9113 §8.7 lets a client send such a request again whatever its
/// method. sheath answered them with a 502; as Envoy and HAProxy do, it
/// now sends a bodiless one again, on another connection than the one
/// that refused it.
#[tokio::test]
async fn a_stream_the_h2c_upstream_refused_is_sent_again_on_another_connection() {
    let pki = TestPki::new();
    let upstream = RawUpstream::start(|n| match n {
        0 | 2 => Answer::Refuse,
        _ => Answer::Ok,
    })
    .await;
    let proxy = h2c_proxy(&pki, &upstream).await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;

    let (status, text) = answer(&mut h2, "a refused GET", get_h2("/")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, "ok");
    assert_eq!(upstream.requests(), 2, "the GET was sent twice");
    assert_eq!(
        upstream.accepted(),
        2,
        "the second time on a new connection"
    );

    // Not only idempotent methods: the upstream did not act on it. The
    // refusing connection is the oldest, so it gets the POST; sent again,
    // the POST goes on the other one, already open.
    let (status, text) = answer(&mut h2, "a refused bodiless POST", post_h2(client::empty())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, "ok");
    assert_eq!(upstream.requests(), 4, "the POST was sent twice");
    assert_eq!(upstream.accepted(), 2, "on the connections already open");
}

/// A request is sent again once at most, and only if it has no body: a
/// body is sent as it arrives, so once part of it went to the upstream,
/// there is nothing left to send again.
#[tokio::test]
async fn a_refused_h2c_request_is_sent_again_once_and_never_with_a_body() {
    let pki = TestPki::new();
    let upstream = RawUpstream::start(|_| Answer::Refuse).await;
    let proxy = h2c_proxy(&pki, &upstream).await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;

    let (status, text) = answer(&mut h2, "a GET refused twice", get_h2("/")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(text.contains("REFUSED_STREAM"), "{text}");
    assert_eq!(upstream.requests(), 2, "sent twice, not more");

    // Refused after its first DATA frame.
    let (req, upload) = streaming("https://localhost/");
    upload.send(Bytes::from_static(b"the first part")).unwrap();
    let (status, text) = answer(&mut h2, "a POST refused with its body", req).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(text.contains("REFUSED_STREAM"), "{text}");
    assert_eq!(upstream.requests(), 3, "the POST was sent once");
}

/// A server shutting down gracefully (gRPC's GracefulStop, hyper's
/// graceful shutdown, an nginx reload) sends a GOAWAY whose last stream id
/// says which streams it will still process; the ones above it were not
/// processed and may go again on another connection (RFC 9113 §6.8).
/// sheath answered them with a 502. A stream the GOAWAY covers may have
/// been acted on, so the connection closing under it, whatever the
/// GOAWAY's error code, is no reason to send a POST again.
#[tokio::test]
async fn a_stream_an_h2c_upstream_going_away_did_not_process_is_sent_again() {
    let pki = TestPki::new();
    let upstream = RawUpstream::start(|n| match n {
        0 => Answer::GoAwayBelow,
        3 => Answer::GoAwayCovering,
        _ => Answer::Ok,
    })
    .await;
    let proxy = h2c_proxy(&pki, &upstream).await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;

    let (status, text) = answer(
        &mut h2,
        "a POST the GOAWAY left out",
        post_h2(client::empty()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(text, "ok");
    assert_eq!(upstream.requests(), 2, "the POST was sent twice");
    assert_eq!(
        upstream.accepted(),
        2,
        "the second time on a new connection"
    );
    // sheath takes no stream more on the connection going away, and closes
    // it once it has none.
    eventually("the going-away connection closed", || {
        upstream.closed.load(SeqCst) == 1
    })
    .await;

    // The new connection is the one used now.
    let (_, text) = answer(&mut h2, "a GET", get_h2("/")).await;
    assert_eq!(text, "ok");
    assert_eq!(upstream.accepted(), 2);

    let (status, _) = answer(
        &mut h2,
        "a POST the GOAWAY covers",
        post_h2(client::empty()),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(upstream.requests(), 4, "the covered POST was sent once");
}

/// A GET the upstream may have processed before its connection closed is
/// sent again once, as over HTTP/1.1: with two h2c connections open and
/// each closing under it in turn (an upstream that dies of the request),
/// the second failure is the answer. It went out on every open connection
/// and then on a new one.
#[tokio::test]
async fn a_get_lost_with_its_h2c_connection_is_sent_again_once() {
    let pki = TestPki::new();
    let upstream = RawUpstream::start(|n| match n {
        0 => Answer::Refuse,
        2 | 3 => Answer::GoAwayCovering,
        _ => Answer::Ok,
    })
    .await;
    let proxy = h2c_proxy(&pki, &upstream).await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;

    // A refusal opens a second connection: two are open.
    let (_, text) = answer(&mut h2, "a refused GET", get_h2("/")).await;
    assert_eq!(text, "ok");
    assert_eq!(upstream.accepted(), 2);

    let (status, _) = answer(&mut h2, "a GET both connections close under", get_h2("/")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        upstream.requests(),
        4,
        "the GET was sent twice: once and once again"
    );
    assert_eq!(upstream.accepted(), 2, "no third connection for it");
}
