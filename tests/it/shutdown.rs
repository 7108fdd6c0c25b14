//! Graceful shutdown: stop accepting, let in-flight work finish, and never
//! wait longer than the drain timeout.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::client::{self, get};
use crate::common::{backend, pki, within, Proxy, TestPki};
use sheath::ShutdownOutcome;

async fn start(pki: &TestPki, upstream: std::net::SocketAddr, mode: &str, drain: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let toml = format!(
        "[global]\nstate_dir = \"{}\"\ndrain_timeout = \"{drain}\"\n\n[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"{mode}\"\n{}",
        dir.path().join("state").display(),
        pki::files_cert_toml(&files)
    );
    Proxy::start_in(&toml, dir).await.unwrap()
}

/// Wait until connecting to `addr` is refused.
async fn refused(addr: std::net::SocketAddr) {
    within("listener closed", async {
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
}

#[tokio::test]
async fn drain_completes_an_in_flight_http_download() {
    let pki = TestPki::new();
    let mut proxy = start(&pki, backend::http().await, "http", "20s").await;
    let addr = proxy.addr("l");
    let mut s = client::h1(addr, pki.roots()).await;
    // 40 chunks of 32 KiB, 25 ms apart: about a second of transfer.
    let resp = within(
        "response head",
        s.send_request(get("/drip?chunks=40&size=32768&ms=25")),
    )
    .await
    .unwrap();
    let running = proxy.running.take().unwrap();
    let shutdown = tokio::spawn(running.shutdown());
    refused(addr).await;
    let body = within("whole body during drain", resp.into_body().collect())
        .await
        .expect("transfer completes")
        .to_bytes();
    assert_eq!(body.len(), 40 * 32768);
    let outcome = within("drain", shutdown).await.unwrap();
    assert_eq!(outcome, ShutdownOutcome::Drained);
}

#[tokio::test]
async fn drain_lets_a_tcp_stream_finish() {
    let pki = TestPki::new();
    let mut proxy = start(&pki, backend::tcp_echo().await, "tcp", "20s").await;
    let addr = proxy.addr("l");
    let mut tls = client::connect(addr, client::client_config(pki.roots(), &[]))
        .await
        .unwrap();
    tls.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    tls.read_exact(&mut buf).await.unwrap();

    let shutdown = tokio::spawn(proxy.running.take().unwrap().shutdown());
    refused(addr).await;
    // The established stream still works during the drain.
    tls.write_all(b"during").await.unwrap();
    within("echo during drain", tls.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"during");
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).await.unwrap();
    assert_eq!(
        within("drain", shutdown).await.unwrap(),
        ShutdownOutcome::Drained
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_up_the_drain() {
    let pki = TestPki::new();
    let mut proxy = start(&pki, backend::http().await, "http", "20s").await;
    let addr = proxy.addr("l");
    let mut h1 = client::h1(addr, pki.roots()).await;
    assert_eq!(h1.send_request(get("/")).await.unwrap().status(), 200);
    let mut h2 = client::h2(addr, pki.roots()).await;
    assert_eq!(
        h2.send_request(client::get_h2("/")).await.unwrap().status(),
        200
    );
    let started = Instant::now();
    let outcome = within("drain", proxy.running.take().unwrap().shutdown()).await;
    assert_eq!(outcome, ShutdownOutcome::Drained);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle connections delayed the drain"
    );
}

#[tokio::test]
async fn drain_timeout_cuts_a_stuck_connection() {
    let pki = TestPki::new();
    let mut proxy = start(&pki, backend::tcp_echo().await, "tcp", "500ms").await;
    let mut tls = client::connect(proxy.addr("l"), client::client_config(pki.roots(), &[]))
        .await
        .unwrap();
    tls.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    tls.read_exact(&mut one).await.unwrap();
    let started = Instant::now();
    let outcome = within("bounded drain", proxy.running.take().unwrap().shutdown()).await;
    assert_eq!(outcome, ShutdownOutcome::DrainTimedOut { remaining: 1 });
    assert!(started.elapsed() < Duration::from_secs(3));
    let mut rest = Vec::new();
    let _ = within("cut connection closes", tls.read_to_end(&mut rest)).await;
}
