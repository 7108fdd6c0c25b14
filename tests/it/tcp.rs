//! TCP (L4) mode: byte-exact relay and half-close in both directions.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::common::{backend, client, pki, within, Proxy, TestPki};

async fn tcp_proxy(pki: &TestPki, upstream: std::net::SocketAddr, extra: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let toml = format!(
        "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n{extra}\n{}",
        pki::files_cert_toml(&files)
    );
    Proxy::start_in(&toml, dir).await.unwrap()
}

#[tokio::test]
async fn relays_megabytes_byte_exact_and_propagates_client_half_close() {
    let pki = TestPki::new();
    let proxy = tcp_proxy(&pki, backend::tcp_echo().await, "").await;
    let tls = client::connect(proxy.addr("tcp"), client::client_config(pki.roots(), &[]))
        .await
        .unwrap();
    let payload = crate::common::random_bytes(8 * 1024 * 1024 + 17);
    let (mut r, mut w) = tokio::io::split(tls);
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        // close_notify: the echo backend only ends its side after seeing EOF,
        // so reaching EOF below proves the half-close went through.
        w.shutdown().await.unwrap();
        w
    });
    let received = within("echoed payload and EOF", backend::read_to_end(&mut r))
        .await
        .unwrap();
    writer.await.unwrap();
    assert_eq!(received.len(), payload.len());
    assert_eq!(
        crate::common::sha256(&received),
        crate::common::sha256(&payload)
    );
}

#[tokio::test]
async fn upstream_half_close_reaches_client_and_client_can_keep_sending() {
    // A backend that says hello, closes its sending side, then reports
    // whatever it still receives.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        let _ = tx.send(rest);
    });

    let pki = TestPki::new();
    let proxy = tcp_proxy(&pki, upstream, "").await;
    let mut tls = client::connect(proxy.addr("tcp"), client::client_config(pki.roots(), &[]))
        .await
        .unwrap();
    let mut got = Vec::new();
    within("upstream EOF", tls.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"hello");
    // The other direction is still open after the upstream's FIN.
    tls.write_all(b"after your eof").await.unwrap();
    tls.shutdown().await.unwrap();
    let rest = within("backend receives data after its own FIN", rx)
        .await
        .unwrap();
    assert_eq!(rest, b"after your eof");
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let pki = TestPki::new();
    let proxy = tcp_proxy(
        &pki,
        backend::tcp_echo().await,
        "[listener.timeouts]\nidle = \"300ms\"\n",
    )
    .await;
    let mut tls = client::connect(proxy.addr("tcp"), client::client_config(pki.roots(), &[]))
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    // Say nothing: the proxy must close the connection on its own.
    let _ = within("idle close", tls.read_to_end(&mut rest)).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(rest.is_empty());
    crate::common::eventually("active gauge back to zero", || {
        proxy.running().active_connections() == 0
    })
    .await;
}

#[tokio::test]
async fn upstream_down_closes_the_client_connection() {
    let pki = TestPki::new();
    let proxy = tcp_proxy(&pki, backend::closed_port().await, "").await;
    let mut tls = client::connect(proxy.addr("tcp"), client::client_config(pki.roots(), &[]))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = within(
        "close after failed upstream connect",
        tls.read_to_end(&mut rest),
    )
    .await;
    assert!(rest.is_empty());
}

#[tokio::test]
async fn maximum_connection_lifetime_closes_even_busy_connections() {
    let pki = TestPki::new();
    let proxy = tcp_proxy(
        &pki,
        backend::tcp_echo().await,
        "[listener.timeouts]\nmax_lifetime = \"600ms\"\n",
    )
    .await;
    let mut tls = client::connect(proxy.addr("tcp"), client::client_config(pki.roots(), &[]))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // Keep the connection busy: idle timeouts cannot be what closes it.
    let closed = within("closed at max lifetime", async {
        let mut buf = [0u8; 4];
        loop {
            if tls.write_all(b"ping").await.is_err() {
                return;
            }
            match tls.read_exact(&mut buf).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(_) => return,
            }
        }
    });
    closed.await;
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(550) && lived < Duration::from_secs(5),
        "{lived:?}"
    );
}

#[tokio::test]
async fn bytes_sent_with_the_client_finished_are_relayed() {
    // The relay waits for first traffic before allocating its buffers;
    // bytes that came in with the handshake's last flight are already in
    // rustls, and must not wait for the socket to become readable again.
    let pki = TestPki::new();
    let proxy = tcp_proxy(&pki, backend::tcp_echo().await, "").await;
    let config = client::client_config(pki.roots(), &[]);
    let echoed = client::send_with_finished(proxy.addr("tcp"), config, b"ping".to_vec(), 4)
        .await
        .unwrap();
    assert_eq!(echoed, b"ping");
}

#[tokio::test]
async fn alpn_offers_the_configured_protocols_and_refuses_clients_with_none_of_them() {
    let pki = TestPki::new();
    let proxy = tcp_proxy(
        &pki,
        backend::tcp_echo().await,
        "alpn = [\"postgresql\", \"h2\"]",
    )
    .await;
    let addr = proxy.addr("tcp");

    // A client asking for one of them gets it, then the relay as usual.
    let config = client::client_config(pki.roots(), &[b"h2"]);
    let mut tls = client::connect(addr, config).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    within("echo", tls.read_exact(&mut echoed)).await.unwrap();
    assert_eq!(&echoed, b"ping");

    // The server's order decides between two the client offers.
    let config = client::client_config(pki.roots(), &[b"h2", b"postgresql"]);
    let tls = client::connect(addr, config).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));

    // A client that offers ALPN but none of these is refused (RFC 7301
    // no_application_protocol) instead of relayed to a backend that would
    // not understand it.
    let config = client::client_config(pki.roots(), &[b"http/1.1"]);
    let refused = client::connect(addr, config).await;
    let error = refused.expect_err("handshake without a common protocol");
    assert!(
        error.to_string().contains("NoApplicationProtocol"),
        "{error}"
    );

    // A client that offers no ALPN at all is served, as before.
    let config = client::client_config(pki.roots(), &[]);
    let tls = client::connect(addr, config).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);

    // And a real peer: openssl s_client asking for `postgresql`.
    if crate::common::require_tool("openssl") {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki.write_ca(dir.path());
        let out = within(
            "openssl s_client",
            tokio::process::Command::new("openssl")
                .args(["s_client", "-connect", &addr.to_string()])
                .args(["-servername", "localhost", "-alpn", "postgresql"])
                .arg("-CAfile")
                .arg(&ca)
                .arg("-verify_return_error")
                .stdin(std::process::Stdio::null())
                .output(),
        )
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ALPN protocol: postgresql"), "{text}");
    }
}

/// A backend that answers a connection's first bytes with `ack`, reads on
/// to the end and reports how the connection ended: the bytes after a FIN,
/// the kind of error after a reset.
async fn ending_reporter() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<Vec<u8>, std::io::ErrorKind>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut first = vec![0u8; 1024];
                let n = s.read(&mut first).await.unwrap();
                first.truncate(n);
                s.write_all(b"ack").await.unwrap();
                let ended = backend::read_to_end(&mut s)
                    .await
                    .map(|rest| [first, rest].concat());
                let _ = tx.send(ended.map_err(|e| e.kind()));
            });
        }
    });
    (addr, rx)
}

/// Wait for the backend's `ack`: the relay to it is up.
async fn acked<S: tokio::io::AsyncRead + Unpin>(s: &mut S) {
    let mut ack = [0u8; 3];
    within("the backend's ack", s.read_exact(&mut ack))
        .await
        .unwrap();
    assert_eq!(&ack, b"ack");
}

#[tokio::test]
async fn only_close_notify_ends_the_upstream_stream_cleanly() {
    // TLS authenticates the end of a stream with close_notify; a FIN or a
    // reset below it can be forged or come from a client that stopped
    // half-way. An upstream that took either for a FIN would act on a cut
    // stream as if it were whole (a truncated upload, a statement stream).
    let (upstream, mut ended) = ending_reporter().await;
    let pki = TestPki::new();
    let proxy = tcp_proxy(&pki, upstream, "").await;
    let addr = proxy.addr("tcp");
    let config = client::client_config(pki.roots(), &[]);

    // close_notify: the upstream reads the bytes and a FIN.
    let mut tls = client::connect(addr, config.clone()).await.unwrap();
    tls.write_all(b"complete").await.unwrap();
    acked(&mut tls).await;
    tls.shutdown().await.unwrap();
    let clean = within("end after close_notify", ended.recv()).await;
    assert_eq!(clean, Some(Ok(b"complete".to_vec())));

    // A FIN without close_notify.
    let mut tls = client::connect(addr, config.clone()).await.unwrap();
    tls.write_all(b"partial").await.unwrap();
    acked(&mut tls).await;
    tls.get_mut().0.shutdown().await.unwrap();
    let bare_fin = within("end after a bare FIN", ended.recv()).await;
    assert_eq!(
        bare_fin,
        Some(Err(std::io::ErrorKind::ConnectionReset)),
        "a FIN without close_notify"
    );

    // A reset.
    let mut tls = client::connect(addr, config).await.unwrap();
    tls.write_all(b"partial").await.unwrap();
    acked(&mut tls).await;
    tls.get_ref().0.set_zero_linger().unwrap();
    drop(tls);
    let reset = within("end after a reset", ended.recv()).await;
    assert_eq!(
        reset,
        Some(Err(std::io::ErrorKind::ConnectionReset)),
        "a client reset"
    );
}

#[tokio::test]
async fn a_connection_sheath_cuts_reaches_the_upstream_as_a_reset() {
    // The client never ended its stream: whatever cut it (here the idle
    // timeout; the maximum lifetime and the drain take the same path), a
    // FIN would tell the upstream the stream was whole.
    let (upstream, mut ended) = ending_reporter().await;
    let pki = TestPki::new();
    let proxy = tcp_proxy(&pki, upstream, "[listener.timeouts]\nidle = \"300ms\"\n").await;
    let mut tls = client::connect(proxy.addr("tcp"), client::client_config(pki.roots(), &[]))
        .await
        .unwrap();
    tls.write_all(b"partial").await.unwrap();
    acked(&mut tls).await;
    let cut = within("end after the idle timeout", ended.recv()).await;
    assert_eq!(cut, Some(Err(std::io::ErrorKind::ConnectionReset)));
}
