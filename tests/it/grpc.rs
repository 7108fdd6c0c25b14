//! HTTP/2 to the upstream (`upstream_protocol = "h2c"` and `"auto"`): what
//! gRPC backends need. A real gRPC server and client (grpcio) through
//! sheath, and hyper backends that speak only HTTP/2 to show what travels
//! on the upstream connection.

use std::process::Stdio;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common::backend::{CountingBackend, Speaks};
use crate::common::client::{self, body_text, get, get_h2, header, parse_headers};
use crate::common::{pki, within, Proxy, TestPki};
use crate::http::http_proxy;

/// Debian's interpreter, where `python3-grpcio` installs; a `python3`
/// earlier on PATH (pyenv, a virtualenv) may not have it.
const PYTHON: &str = "/usr/bin/python3";

/// Is grpcio importable? Same convention as `require_tool`.
fn require_grpcio() -> bool {
    let found = std::process::Command::new(PYTHON)
        .args(["-c", "import grpc"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    crate::common::require(
        found,
        &format!("{PYTHON} cannot import grpc; install python3-grpcio to run this test"),
    )
}

fn peer_script() -> String {
    format!("{}/tests/it/grpc_peer.py", env!("CARGO_MANIFEST_DIR"))
}

/// The grpcio server: its port, and the process (stops when dropped: its
/// stdin closes and it is killed).
async fn grpc_server() -> (u16, tokio::process::Child) {
    let mut child = tokio::process::Command::new(PYTHON)
        .args([peer_script().as_str(), "server"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the gRPC server");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    within(
        "the gRPC server's port",
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .unwrap();
    let port = line.trim().parse().expect("a port number");
    (port, child)
}

/// Run the grpcio client against `target`; its JSON report, or its stderr
/// when it failed.
async fn grpc_client(
    target: std::net::SocketAddr,
    args: &[&str],
) -> Result<serde_json::Value, String> {
    let output = within(
        "the gRPC client",
        tokio::process::Command::new(PYTHON)
            .args([peer_script().as_str(), "client", &target.to_string()])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run the gRPC client");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&output.stdout).expect("JSON from the client"))
}

#[tokio::test]
async fn a_grpc_client_reaches_a_grpc_server_over_h2c_with_its_identity() {
    if !require_grpcio() {
        return;
    }
    let (port, _server) = grpc_server().await;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let ca = pki.write_ca(dir.path());
    let client_cert = pki.client(&pki::ClientSpec::new("billing"));
    let (cert, key) = client_cert.write(dir.path(), "client");
    let listener = |name: &str, extra: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:{port}\"\n{extra}\n{}\n[listener.client_auth]\nmode = \"require\"\nca = \"{}\"\nforward = [\"xfcc\"]\n",
            pki::files_cert_toml(&files),
            ca.display()
        )
    };
    let toml = listener("grpc", "upstream_protocol = \"h2c\"") + &listener("plain", "");
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let ca = ca.to_str().unwrap();
    let identity = [ca, cert.to_str().unwrap(), key.to_str().unwrap()];

    let report = grpc_client(proxy.addr("grpc"), &identity).await.unwrap();
    // Unary: the request and its metadata reached the server, with the
    // identity sheath vouches for instead of the client's forged one.
    assert_eq!(report["echo"]["message"], "hello", "{report}");
    let seen = &report["echo"]["metadata"];
    let xfcc = seen["x-forwarded-client-cert"].as_str().unwrap();
    assert!(xfcc.starts_with("Hash="), "{xfcc}");
    assert!(xfcc.contains("CN=billing"), "{xfcc}");
    assert_eq!(seen["x-forwarded-proto"], "https", "{report}");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1", "{report}");
    // A gRPC error is a status in the trailers: it arrives as sent.
    assert_eq!(report["fail"]["code"], "NOT_FOUND", "{report}");
    assert_eq!(
        report["fail"]["details"], "no such thing: widget",
        "{report}"
    );
    // Server streaming: every message, then the trailing metadata.
    let messages: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    assert_eq!(report["count"]["messages"], serde_json::json!(messages));
    assert_eq!(report["count"]["trailers"]["x-count"], "50", "{report}");
    assert_eq!(report["count"]["code"], "OK", "{report}");

    // The same server behind an HTTP/1.1 upstream cannot work: that is
    // what the setting is for.
    let refused = grpc_client(proxy.addr("plain"), &identity).await;
    assert!(refused.is_err(), "gRPC worked over HTTP/1.1: {refused:?}");
}

#[tokio::test]
async fn h2c_carries_every_request_on_one_connection_with_trailers() {
    let pki = TestPki::new();
    let backend = CountingBackend::speaking(Speaks::H2c).await;
    let proxy = http_proxy(&pki, backend.addr, "upstream_protocol = \"h2c\"").await;

    // An HTTP/2 client: what the upstream saw.
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    let req = Request::get("https://app.example:8443/headers?a=1")
        .header("te", "trailers")
        .header("x-forwarded-client-cert", "forged")
        .body(client::empty())
        .unwrap();
    let resp = within("h2 response", h2.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = body_text(resp).await;
    assert!(
        text.starts_with("GET http://app.example:8443/headers?a=1 HTTP/2.0\n"),
        "{text}"
    );
    let h = parse_headers(&text);
    assert_eq!(header(&h, "te"), ["trailers"], "{text}");
    assert!(header(&h, "host").is_empty(), "{text}");
    assert!(header(&h, "x-forwarded-client-cert").is_empty(), "{text}");
    assert_eq!(header(&h, "x-forwarded-host"), ["app.example:8443"]);

    // Trailers come back to the client.
    let resp = h2.send_request(get_h2("/trailers")).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "all%20good");
    assert_eq!(collected.to_bytes(), "done");

    // Many requests at once share the connection.
    let requests = (0..32).map(|_| {
        let mut h2 = h2.clone();
        async move { h2.send_request(get_h2("/slow?ms=50")).await }
    });
    for resp in within(
        "32 concurrent requests",
        futures_util::future::join_all(requests),
    )
    .await
    {
        assert_eq!(body_text(resp.unwrap()).await, "slow ok");
    }

    // An HTTP/1.1 client's request goes over HTTP/2 too: this backend
    // answers nothing else.
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let resp = within("h1 response", h1.send_request(get("/headers")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(body_text(resp)
        .await
        .starts_with("GET http://localhost/headers HTTP/2.0\n"));
    assert_eq!(backend.accepted(), 1, "every request on one h2c connection");

    // The upstream goes away (a restart): the next request opens a new
    // connection instead of failing.
    backend.close_all().await;
    let resp = within("after the upstream closed", h2.send_request(get_h2("/")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "ok");
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn auto_speaks_to_the_upstream_as_the_client_spoke_to_sheath() {
    let pki = TestPki::new();
    let backend = CountingBackend::speaking(Speaks::Both).await;
    let proxy = http_proxy(&pki, backend.addr, "upstream_protocol = \"auto\"").await;

    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    let resp = within("h2", h2.send_request(get_h2("/headers")))
        .await
        .unwrap();
    assert!(body_text(resp).await.contains(" HTTP/2.0\n"));

    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let req = Request::post("/echo")
        .header("host", "localhost")
        .body(
            http_body_util::Full::new(Bytes::from_static(b"ping"))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let resp = within("h1 echo", h1.send_request(req)).await.unwrap();
    assert_eq!(body_text(resp).await, "ping");
    let resp = within("h1", h1.send_request(get("/headers")))
        .await
        .unwrap();
    let text = body_text(resp).await;
    assert!(text.starts_with("GET /headers HTTP/1.1\n"), "{text}");
    assert_eq!(header(&parse_headers(&text), "host"), ["localhost"]);
    // One HTTP/2 connection and one HTTP/1.1 connection.
    assert_eq!(backend.accepted(), 2);
}

/// The mesh shape: a plaintext gRPC client next to an outbound sheath,
/// which offers `h2` by ALPN to a peer sheath in HTTP mode, which sends
/// the calls to its gRPC server over h2c with the caller's identity.
#[tokio::test]
async fn grpc_crosses_an_outbound_sheath_and_a_peer_sheath() {
    if !require_grpcio() {
        return;
    }
    let (port, _server) = grpc_server().await;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let client_ca = crate::outbound::local_ca_root(dir.path());
    let test_ca = pki.write_ca(dir.path());

    let peer = crate::outbound::peer_of(
        &pki,
        &client_ca,
        ([127, 0, 0, 1], port).into(),
        "upstream_protocol = \"h2c\"",
    )
    .await;

    let out = |name: &str, alpn: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"outbound\"\n{alpn}\n\n[listener.cert]\nsource = \"local_ca\"\nnames = [\"web.test\"]\n\n[listener.outbound]\nca = \"{}\"\nserver_name = \"peer.test\"\n",
            peer.addr("in"),
            test_ca.display()
        )
    };
    let toml = format!(
        "[global]\nstate_dir = \"{}/state\"\n\n{}\n{}",
        dir.path().display(),
        out("h2", "alpn = [\"h2\"]"),
        out("none", "")
    );
    let outbound = Proxy::start_in(&toml, dir).await.unwrap();

    let report = grpc_client(outbound.addr("h2"), &[]).await.unwrap();
    assert_eq!(report["echo"]["message"], "hello", "{report}");
    let xfcc = report["echo"]["metadata"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap();
    assert!(xfcc.contains("DNS=web.test"), "{xfcc}");
    assert_eq!(report["fail"]["code"], "NOT_FOUND", "{report}");
    assert_eq!(report["count"]["trailers"]["x-count"], "50", "{report}");

    // Without ALPN the peer takes the connection for HTTP/1.1.
    let refused = grpc_client(outbound.addr("none"), &[]).await;
    assert!(refused.is_err(), "gRPC worked without ALPN: {refused:?}");
}

/// Every request of a worker shares its one h2c connection, so a client
/// that stops reading its download must hold up only its own stream. The
/// upstream sends what the flow-control windows let it send; what sheath
/// has received and not yet passed on (its client does not read) counts
/// against the connection's window as well as the stream's. With hyper's
/// windows (2 MiB a stream, 5 MiB the connection), three such downloads
/// took the whole connection window and every other request on the
/// worker got its response head and then waited for its body forever.
#[tokio::test]
async fn clients_that_stop_reading_do_not_stall_other_requests_on_the_h2c_connection() {
    let pki = TestPki::new();
    let backend = CountingBackend::speaking(Speaks::H2c).await;
    let proxy = http_proxy(&pki, backend.addr, "upstream_protocol = \"h2c\"").await;

    // 8 MiB each, in one chunk: the backend queues all of it at once and
    // sends as fast as the windows open.
    let mut readers = Vec::new();
    for _ in 0..4 {
        let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
        let resp = within(
            "a download's response head",
            h2.send_request(get_h2("/drip?chunks=1&size=8388608")),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // Held, never read.
        readers.push((h2, resp));
    }

    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    let resp = within("a small request's head", h2.send_request(get_h2("/")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = within(
        "a small request's body beside downloads nobody reads",
        resp.into_body().collect(),
    )
    .await
    .unwrap();
    assert_eq!(body.to_bytes(), "ok");
    assert_eq!(backend.accepted(), 1, "one h2c connection");
    drop(readers);
}

/// A response head the HTTP/1.1 upstream path passes on (hyper reads
/// heads up to ~400 KiB there) must not fail only because the upstream
/// speaks h2c. hyper's HTTP/2 client announces a 16 KiB header list and
/// fails a stream past it, so a 30 KiB head (large cookies, a long CSP or
/// `link` list) was a 502 over h2c; sheath now reads heads up to the
/// 64 KiB it allows a client's request head.
#[tokio::test]
async fn a_large_response_head_passes_from_an_h2c_upstream() {
    let pki = TestPki::new();
    let backend = CountingBackend::speaking(Speaks::H2c).await;
    let proxy = http_proxy(&pki, backend.addr, "upstream_protocol = \"h2c\"").await;
    // An HTTP/1.1 client, which goes over h2c too: hyper's HTTP/2 client
    // would refuse the head itself (16 KiB).
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let resp = within(
        "a 30 KiB response head",
        h1.send_request(get("/big-header?bytes=30000")),
    )
    .await
    .unwrap();
    let status = resp.status();
    let big = resp.headers().get("x-big").map(|v| v.len());
    let text = body_text(resp).await;
    assert_eq!((status, big), (StatusCode::OK, Some(30000)), "{text}");
    assert_eq!(text, "ok");
}

/// An h2c upstream takes only as many streams at once as its
/// `SETTINGS_MAX_CONCURRENT_STREAMS` says (hyper's servers 200, Go's 250,
/// nginx 128). sheath carried every request of a worker on one connection,
/// so past that number requests waited in the connection's queue until a
/// stream ended: behind long-lived gRPC streams (watches, subscriptions),
/// for good. Like Envoy, it opens another connection once the streams in
/// flight on every open one are at the upstream's limit.
#[tokio::test]
async fn requests_past_the_upstreams_stream_limit_go_on_another_h2c_connection() {
    let pki = TestPki::new();
    let backend = CountingBackend::speaking(Speaks::H2cMaxStreams(4)).await;
    let proxy = http_proxy(&pki, backend.addr, "upstream_protocol = \"h2c\"").await;
    let h2 = client::h2(proxy.addr("web"), pki.roots()).await;

    // A first request, so the connection's SETTINGS have arrived.
    let resp = within("a first request", h2.clone().send_request(get_h2("/")))
        .await
        .unwrap();
    assert_eq!(body_text(resp).await, "ok");

    // Four long requests take every stream the upstream allows it.
    let held: Vec<_> = (0..4)
        .map(|_| {
            let mut h2 = h2.clone();
            tokio::spawn(async move { h2.send_request(get_h2("/slow?ms=60000")).await })
        })
        .collect();
    crate::common::eventually("four requests at the upstream", || backend.handling() == 4).await;
    assert_eq!(backend.accepted(), 1);

    // The next ones, HTTP/2 and HTTP/1.1 clients alike, are answered.
    let resp = within(
        "a request past the upstream's stream limit",
        h2.clone().send_request(get_h2("/")),
    )
    .await
    .unwrap();
    assert_eq!(body_text(resp).await, "ok");
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let resp = within("an HTTP/1.1 client's request", h1.send_request(get("/")))
        .await
        .unwrap();
    assert_eq!(body_text(resp).await, "ok");
    assert_eq!(backend.accepted(), 2, "one connection more, reused");

    // Once the long ones end, their connection takes requests again and
    // no third one is opened.
    for request in held {
        request.abort();
    }
    crate::common::eventually("the long requests cancelled", || backend.handling() == 0).await;
    let requests = (0..8).map(|_| {
        let mut h2 = h2.clone();
        async move { h2.send_request(get_h2("/slow?ms=50")).await }
    });
    for resp in within("8 requests", futures_util::future::join_all(requests)).await {
        assert_eq!(body_text(resp.unwrap()).await, "slow ok");
    }
    assert_eq!(backend.accepted(), 2, "8 requests on the two connections");
}

/// A HEAD from an HTTP/2 client gets the response head and no body,
/// whatever the upstream sends after it. hyper's HTTP/2 server, like some
/// other h2c servers, sends the GET's body in answer to a HEAD; h2 took
/// that as a malformed stream, and the client got a reset instead of its
/// answer (an HTTP/1.1 client, whose server side knows HEAD, did not).
#[tokio::test]
async fn a_head_from_an_http2_client_is_answered_whatever_the_h2c_upstream_sends() {
    let pki = TestPki::new();
    let backend = CountingBackend::speaking(Speaks::H2c).await;
    let proxy = http_proxy(&pki, backend.addr, "upstream_protocol = \"h2c\"").await;
    let mut h2 = client::h2(proxy.addr("web"), pki.roots()).await;
    for _ in 0..2 {
        let req = Request::head("https://localhost/")
            .body(client::empty())
            .unwrap();
        let resp = within("a HEAD", h2.send_request(req)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-length"], "2");
        let body = within("its end", resp.into_body().collect()).await.unwrap();
        assert!(body.to_bytes().is_empty());
    }
    // The connection carries on.
    let resp = within("a GET after", h2.send_request(get_h2("/")))
        .await
        .unwrap();
    assert_eq!(body_text(resp).await, "ok");
}
