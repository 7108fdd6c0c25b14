//! The h2c connections a worker keeps to an upstream: streams counted
//! against each connection's limit, connections dropped when closed or
//! idle, under every way a request can end.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sheath::metrics::UpstreamKind::H2c;

use crate::common::backend::{CountingBackend, Speaks};
use crate::common::client::{self, body_text, get, get_h2};
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
