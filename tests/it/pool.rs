//! HTTP mode's upstream connection pool: connections are reused across
//! requests and clients, returned only once their response has been read
//! in full, and one the upstream closed never fails a request that had not
//! been sent on it yet.

use http::{Request, StatusCode};
use http_body_util::BodyExt;

use crate::common::backend::{CountingBackend, Speaks};
use crate::common::client::{self, body_text, get, get_h2};
use crate::common::{eventually, within, TestPki};
use crate::http::http_proxy;

#[tokio::test]
async fn one_upstream_connection_serves_sequential_requests_from_every_client() {
    let pki = TestPki::new();
    let backend = CountingBackend::start().await;
    let proxy = http_proxy(&pki, backend.addr, "").await;

    for _ in 0..2 {
        let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
        for path in ["/", "/headers", "/empty", "/"] {
            let resp = within(path, h1.send_request(get(path))).await.unwrap();
            assert!(resp.status().is_success(), "{path}: {}", resp.status());
            body_text(resp).await;
        }
        // A HEAD response has no body to read: its connection is returned
        // all the same.
        let head = Request::head("/")
            .header("host", "localhost")
            .body(client::empty())
            .unwrap();
        let resp = within("HEAD", h1.send_request(head)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        body_text(resp).await;
    }
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    for _ in 0..3 {
        let resp = within("h2 GET", h2.send_request(get_h2("/")))
            .await
            .unwrap();
        assert_eq!(body_text(resp).await, "ok");
    }
    assert_eq!(backend.accepted(), 1, "every request reused one connection");
}

#[tokio::test]
async fn an_upstream_that_closes_its_connections_fails_no_request() {
    let pki = TestPki::new();
    let backend = CountingBackend::start().await;
    let proxy = http_proxy(&pki, backend.addr, "").await;
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;

    // Announced: `Connection: close` on the response.
    for i in 1..=3 {
        let resp = within("/close", h1.send_request(get("/close")))
            .await
            .unwrap();
        assert_eq!(body_text(resp).await, "ok");
        assert_eq!(backend.accepted(), i);
    }
    // Unannounced: the upstream closes idle connections (restart,
    // keep-alive timeout) between two requests. Whether sheath sees the
    // close before it picks the connection or only once the request is
    // queued on it, the request goes to a new connection.
    let before = backend.accepted();
    for round in 0..10 {
        backend.close_all().await;
        let resp = within("request after close", h1.send_request(get("/")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "round {round}");
        assert_eq!(body_text(resp).await, "ok");
    }
    assert_eq!(backend.accepted(), before + 10);
}

#[tokio::test]
async fn a_response_the_client_abandons_does_not_return_its_connection() {
    let pki = TestPki::new();
    let backend = CountingBackend::start().await;
    let proxy = http_proxy(&pki, backend.addr, "").await;

    // 100 chunks of 64 KiB, 10 ms apart: most of it is still on the
    // upstream connection when the client goes away.
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let resp = within(
        "drip",
        h1.send_request(get("/drip?chunks=100&size=65536&ms=10")),
    )
    .await
    .unwrap();
    let mut body = resp.into_body();
    let first = within("first chunk", body.frame()).await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    drop(h1);

    // Were that connection pooled, the next request would read the rest of
    // the drip as its response.
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    for _ in 0..3 {
        let resp = within("next request", h1.send_request(get("/")))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_text(resp).await, "ok");
    }
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn an_unused_upstream_connection_is_closed_after_upstream_idle() {
    // The pooled HTTP/1.1 connections and the h2c connection alike.
    for (speaks, protocol) in [(Speaks::Http1, "http1"), (Speaks::H2c, "h2c")] {
        let pki = TestPki::new();
        let backend = CountingBackend::speaking(speaks).await;
        let proxy = http_proxy(
            &pki,
            backend.addr,
            &format!("upstream_protocol = \"{protocol}\"\n[listener.timeouts]\nupstream_idle = \"300ms\"\n"),
        )
        .await;
        let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
        let resp = within("first", h1.send_request(get("/"))).await.unwrap();
        assert_eq!(body_text(resp).await, "ok");
        assert_eq!(backend.open(), 1, "{protocol}");

        // sheath closes it, not the upstream: the backend sees its only
        // connection go while the client connection stays open.
        eventually("sheath closed its idle upstream connection", || {
            backend.open() == 0
        })
        .await;
        let resp = within("after", h1.send_request(get("/"))).await.unwrap();
        assert_eq!(body_text(resp).await, "ok");
        assert_eq!(backend.accepted(), 2, "{protocol}");
    }
}

/// An h2c connection is idle when no stream is in flight on it, not when
/// no request has started on it for a while: one carrying a long download
/// (or a gRPC stream) keeps taking new requests. It was set aside
/// `upstream_idle` after its last request started, and the next request
/// opened a second connection beside it.
#[tokio::test]
async fn an_h2c_connection_with_a_stream_in_flight_is_not_idle() {
    let pki = TestPki::new();
    let backend = CountingBackend::speaking(Speaks::H2c).await;
    let proxy = http_proxy(
        &pki,
        backend.addr,
        "upstream_protocol = \"h2c\"\n[listener.timeouts]\nupstream_idle = \"300ms\"\n",
    )
    .await;
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let resp = within("a download", h1.send_request(get("/drip?chunks=20&ms=50")))
        .await
        .unwrap();
    let mut body = resp.into_body();
    // Ten chunks 50 ms apart: the stream has outlived upstream_idle.
    for _ in 0..10 {
        within("a chunk", body.frame()).await.unwrap().unwrap();
    }
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    let resp = within("a request beside it", h2.send_request(get_h2("/")))
        .await
        .unwrap();
    assert_eq!(body_text(resp).await, "ok");
    assert_eq!(backend.accepted(), 1, "the busy connection took it");
    while within("the rest", body.frame()).await.is_some() {}
}

/// The upstream connections a listener holds, by protocol, as
/// `sheath_upstream_connections_active` and `_opened_total` show them:
/// open while pooled, gone when `upstream_idle` closes them, and the
/// opened count rising only when a connection is made.
#[tokio::test]
async fn upstream_connections_are_counted_by_protocol_until_they_close() {
    use sheath::metrics::UpstreamKind::{H2c, Http1};
    let pki = TestPki::new();
    let backend = CountingBackend::speaking(Speaks::Both).await;
    let proxy = http_proxy(
        &pki,
        backend.addr,
        "upstream_protocol = \"auto\"\n[listener.timeouts]\nupstream_idle = \"300ms\"\n",
    )
    .await;
    let stats = proxy.running().listener("web").unwrap().stats;
    assert_eq!(stats.upstream_connections(Http1), (0, 0));

    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    for _ in 0..3 {
        let resp = within("h1", h1.send_request(get("/"))).await.unwrap();
        assert_eq!(body_text(resp).await, "ok");
        let resp = within("h2", h2.send_request(get_h2("/"))).await.unwrap();
        assert_eq!(body_text(resp).await, "ok");
    }
    assert_eq!(stats.upstream_connections(Http1), (1, 1));
    assert_eq!(stats.upstream_connections(H2c), (1, 1));
    assert_eq!(backend.open(), 2);

    eventually("both closed after upstream_idle", || {
        stats.upstream_connections(Http1).0 == 0 && stats.upstream_connections(H2c).0 == 0
    })
    .await;
    assert_eq!(stats.upstream_connections(Http1), (0, 1));
    assert_eq!(stats.upstream_connections(H2c), (0, 1));
    eventually("the backend saw them close", || backend.open() == 0).await;
}
