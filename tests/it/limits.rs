//! Handshake deadline, connection limit and input that is not TLS.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{backend, client, eventually, pki, within, Proxy, TestPki};

async fn proxy(pki: &TestPki, extra: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let toml = format!(
        "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"tcp\"\n{extra}\n{}",
        backend::tcp_echo().await,
        pki::files_cert_toml(&files)
    );
    Proxy::start_in(&toml, dir).await.unwrap()
}

async fn echo_roundtrip(stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin)) {
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within("echo", stream.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn stalled_handshake_times_out_and_frees_its_slot_while_others_are_served() {
    let pki = TestPki::new();
    let proxy = proxy(
        &pki,
        "max_connections = 2\n[listener.timeouts]\nhandshake = \"500ms\"\n",
    )
    .await;
    let addr = proxy.addr("tcp");

    // A slowloris: connects, sends half a record header, then nothing.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03]).await.unwrap();
    let opened = Instant::now();

    // While it stalls, a real client is served: the accept loop is free.
    let config = client::client_config(pki.roots(), &[]);
    let mut good = client::connect(addr, config.clone()).await.unwrap();
    echo_roundtrip(&mut good).await;
    assert!(opened.elapsed() < Duration::from_millis(500));

    // The stalled socket is closed by the proxy at the deadline.
    let mut rest = Vec::new();
    let _ = within("stalled socket closed", stalled.read_to_end(&mut rest)).await;
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );

    // Its slot is free again: with max_connections = 2 and `good` still
    // open, one more client fits.
    let mut second = within("slot freed", client::connect(addr, config))
        .await
        .unwrap();
    echo_roundtrip(&mut second).await;
    let failures = proxy
        .running()
        .listener("tcp")
        .unwrap()
        .stats
        .handshake_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(failures, 1);
}

#[tokio::test]
async fn connection_limit_holds_and_releases() {
    let pki = TestPki::new();
    let proxy = proxy(&pki, "max_connections = 2\n").await;
    let addr = proxy.addr("tcp");
    let config = client::client_config(pki.roots(), &[]);

    let mut first = client::connect(addr, config.clone()).await.unwrap();
    echo_roundtrip(&mut first).await;
    let mut second = client::connect(addr, config.clone()).await.unwrap();
    echo_roundtrip(&mut second).await;

    // The third client's TCP connect succeeds (kernel queue) but its
    // handshake cannot complete while the listener is full.
    let third = tokio::spawn(client::connect(addr, config.clone()));
    let blocked = tokio::time::timeout(Duration::from_millis(700), async {
        loop {
            if third.is_finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        blocked.is_err(),
        "third connection was served past the limit"
    );
    assert_eq!(proxy.running().active_connections(), 2);

    // Closing one connection lets the third in.
    first.shutdown().await.unwrap();
    drop(first);
    let mut third = within("third handshake after a slot frees", third)
        .await
        .unwrap()
        .unwrap();
    echo_roundtrip(&mut third).await;
    drop(second);
    drop(third);
    eventually("gauge returns to zero", || {
        proxy.running().active_connections() == 0
    })
    .await;
}

#[tokio::test]
async fn garbage_instead_of_client_hello_is_rejected_without_harm() {
    let pki = TestPki::new();
    let proxy = proxy(&pki, "").await;
    let addr = proxy.addr("tcp");
    let mut junk = TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = within("junk connection closed", junk.read_to_end(&mut rest)).await;
    let mut good = client::connect(addr, client::client_config(pki.roots(), &[]))
        .await
        .unwrap();
    echo_roundtrip(&mut good).await;
}

/// A TLS record header: handshake content, legacy version, `len` bytes.
fn record_header(len: u16) -> Vec<u8> {
    let mut header = vec![0x16, 0x03, 0x01];
    header.extend_from_slice(&len.to_be_bytes());
    header
}

#[tokio::test]
async fn malformed_records_and_oversized_client_hellos_are_refused_at_once() {
    let pki = TestPki::new();
    // A handshake deadline far beyond the test's: only refusing the input
    // can close these connections in time.
    let proxy = proxy(&pki, "[listener.timeouts]\nhandshake = \"5m\"\n").await;
    let addr = proxy.addr("tcp");

    // A ClientHello that says it is 16 MiB long (TLS allows 64 KiB less a
    // byte for one), sent as full records for as long as sheath reads; a
    // record longer than TLS allows (2^14 + 256 bytes of ciphertext at
    // most); a record that is not TLS's at all (content type 0x42).
    let mut huge_hello = record_header(0x4000);
    huge_hello.extend_from_slice(&[0x01, 0xff, 0xff, 0xff]);
    huge_hello.resize(5 + 0x4000, 0);
    let mut overlong = record_header(0x4801);
    overlong.resize(5 + 0x4801, 0);
    let mut alien = record_header(16);
    alien[0] = 0x42;
    alien.resize(5 + 16, 0);
    for (what, first) in [
        ("16 MiB ClientHello", huge_hello.clone()),
        ("record past 2^14 + 256", overlong),
        ("unknown content type", alien),
    ] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let write = async {
            stream.write_all(&first).await?;
            // More of the same, as an attacker would keep sending.
            for _ in 0..64 {
                stream.write_all(&huge_hello[5..]).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
        let mut answer = Vec::new();
        let closed = format!("{what}: connection closed");
        within(&closed, async {
            let mut buf = [0u8; 512];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        // If anything came back, it is a TLS alert and nothing else (the
        // alert can be lost to the reset that closing a socket with unread
        // input sends).
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "{what}: answered {:02x?}",
            &answer[..answer.len().min(16)]
        );
    }

    // The listener serves real clients as before.
    let mut good = client::connect(addr, client::client_config(pki.roots(), &[]))
        .await
        .unwrap();
    echo_roundtrip(&mut good).await;
}

/// Descriptors this test process holds (nextest runs each test alone in
/// its process).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// How a churning client ends its connection.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// RST straight after connecting: in the accept queue, or just taken.
    ResetAtConnect,
    /// Half a ClientHello, then RST: mid-handshake.
    ResetInHandshake,
    /// RST on an established session that never sent a byte.
    ResetIdle,
    /// RST with the request sent and the response on its way.
    ResetMidRequest,
    /// The whole exchange, closed with close_notify and FIN.
    Clean,
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

async fn churn_once(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    ending: Ending,
) {
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    match ending {
        Ending::ResetAtConnect => tcp.set_zero_linger().unwrap(),
        Ending::ResetInHandshake => {
            let mut tcp = tcp;
            let mut hello = record_header(512);
            hello.extend_from_slice(&[0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]);
            tcp.write_all(&hello).await.unwrap();
            tcp.set_zero_linger().unwrap();
        }
        Ending::ResetIdle | Ending::ResetMidRequest | Ending::Clean => {
            let mut tls = connector.connect(name, tcp).await.unwrap();
            if matches!(ending, Ending::ResetMidRequest | Ending::Clean) {
                tls.write_all(REQUEST).await.unwrap();
            }
            if let Ending::Clean = ending {
                let response = backend::read_to_end(&mut tls).await.unwrap();
                assert!(response.starts_with(b"HTTP/1.1 200"));
            }
            tls.get_ref().0.set_zero_linger().unwrap();
        }
    }
}

/// Hundreds of connections to a listener of four slots, most of them
/// ending in a reset at some point of their life: afterwards no connection
/// is counted, no task is left, the backend holds no connection, and the
/// listener serves four clients at once again (a leaked slot would block
/// one of them) and no fifth.
async fn churn_leaks_no_slot(mode: &str) {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let upstream = backend::CountingBackend::start().await;
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"{mode}\"\nmax_connections = 4\n{}",
        upstream.addr,
        pki::files_cert_toml(&files)
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let addr = proxy.addr("l");
    let config = client::client_config(pki.roots(), &[]);
    let fds_before = open_fds();

    let endings = [
        Ending::ResetAtConnect,
        Ending::ResetInHandshake,
        Ending::ResetIdle,
        Ending::ResetMidRequest,
        Ending::Clean,
    ];
    within("churn", async {
        for round in 0..15 {
            let mut clients = tokio::task::JoinSet::new();
            for i in 0..20 {
                let ending = endings[(round + i) % endings.len()];
                clients.spawn(churn_once(addr, config.clone(), ending));
            }
            while let Some(done) = clients.join_next().await {
                done.unwrap();
            }
        }
    })
    .await;
    eventually("no connection counted or running", || {
        proxy.running().active_connections() == 0 && proxy.running().connection_tasks() == 0
    })
    .await;
    if mode == "tcp" {
        // (HTTP mode keeps its idle upstream connections pooled.)
        eventually("no upstream connection or descriptor left", || {
            upstream.open() == 0 && open_fds() <= fds_before
        })
        .await;
    }

    let mut full = Vec::new();
    for _ in 0..4 {
        let mut tls = within(
            "a client within the limit",
            client::connect(addr, config.clone()),
        )
        .await
        .unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        within("its response", tls.read_exact(&mut head))
            .await
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        full.push(tls);
    }
    let fifth = tokio::spawn(client::connect(addr, config.clone()));
    let served = tokio::time::timeout(Duration::from_millis(500), async {
        while !fifth.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        served.is_err(),
        "a fifth connection was served past the limit"
    );
    drop(full);
    within("the fifth once a slot frees", fifth)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn churn_and_resets_leak_no_connection_slot_in_tcp_mode() {
    churn_leaks_no_slot("tcp").await;
}

#[tokio::test]
async fn churn_and_resets_leak_no_connection_slot_in_http_mode() {
    churn_leaks_no_slot("http").await;
}

/// One client of [`a_mix_of_failures_leaves_nothing_behind`]: every way
/// it can fail, picked by `kind`.
async fn fail_once(kind: usize, addrs: &MixAddrs, roots: &std::sync::Arc<rustls::RootCertStore>) {
    use h2::client as h2c;
    let h1 = client::client_config(roots.clone(), &[b"http/1.1"]);
    match kind {
        // Not TLS at all.
        0 => {
            let mut tcp = TcpStream::connect(addrs.web).await.unwrap();
            let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            let _ = backend::read_to_end(&mut tcp).await;
        }
        // Half a ClientHello, then a reset.
        1 => {
            let mut tcp = TcpStream::connect(addrs.mtls).await.unwrap();
            let mut hello = record_header(512);
            hello.extend_from_slice(&[0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]);
            let _ = tcp.write_all(&hello).await;
            tcp.set_zero_linger().unwrap();
        }
        // Silent until the handshake deadline cuts it.
        2 => {
            let mut tcp = TcpStream::connect(addrs.tcp_down).await.unwrap();
            let _ = backend::read_to_end(&mut tcp).await;
        }
        // mTLS: no certificate, another CA's, one the allow-list misses.
        3..=5 => {
            let config = match kind {
                3 => client::client_config(roots.clone(), &[b"http/1.1"]),
                4 => addrs.foreign.rustls_config(roots.clone(), &[b"http/1.1"]),
                _ => addrs.unlisted.rustls_config(roots.clone(), &[b"http/1.1"]),
            };
            // TLS 1.3 clients learn of the refusal on their first read.
            if let Ok(mut tls) = client::connect(addrs.mtls, config).await {
                let _ = tls.write_all(REQUEST).await;
                let answer = backend::read_to_end(&mut tls).await.unwrap_or_default();
                assert!(answer.is_empty(), "a refused client got an answer");
            }
        }
        // HTTP/1.1: reset mid-response, and a head that never ends.
        6 => {
            let mut tls = client::connect(addrs.web, h1).await.unwrap();
            tls.write_all(
                b"GET /drip?chunks=100&size=16384&ms=5 HTTP/1.1\r\nHost: localhost\r\n\r\n",
            )
            .await
            .unwrap();
            let mut buf = [0u8; 1024];
            let _ = tls.read(&mut buf).await;
            tls.get_ref().0.set_zero_linger().unwrap();
        }
        7 => {
            let mut tls = client::connect(addrs.web, h1).await.unwrap();
            tls.write_all(b"GET / HTTP/1.1\r\nHost: loc").await.unwrap();
            let _ = backend::read_to_end(&mut tls).await;
        }
        // HTTP/2: streams reset as soon as opened; then the connection
        // reset under streams still waiting for the upstream.
        8 | 9 | 13 | 14 => {
            // Towards an HTTP/1.1 upstream, and an h2c one.
            let addr = if kind < 13 { addrs.web } else { addrs.h2c };
            let tls = client::connect(addr, client::client_config(roots.clone(), &[b"h2"]))
                .await
                .unwrap();
            tls.get_ref().0.set_zero_linger().unwrap();
            let (mut sender, connection) = h2c::handshake(tls).await.unwrap();
            let connection = tokio::spawn(connection);
            let mut waiting = Vec::new();
            for _ in 0..20 {
                let Ok(ready) = sender.ready().await else {
                    break;
                };
                sender = ready;
                let req = http::Request::get("https://localhost/slow?ms=300")
                    .body(())
                    .unwrap();
                match sender.send_request(req, true) {
                    // Dropped at once: RST_STREAM.
                    Ok((response, _)) if kind % 5 == 3 => drop(response),
                    Ok((response, _)) => waiting.push(response),
                    Err(_) => break,
                }
            }
            tokio::task::yield_now().await;
            connection.abort();
            let _ = connection.await;
        }
        // The upstream refuses: HTTP answers 502, TCP closes.
        10 => {
            let mut tls = client::connect(addrs.down, h1).await.unwrap();
            tls.write_all(REQUEST).await.unwrap();
            let answer = backend::read_to_end(&mut tls).await.unwrap_or_default();
            assert!(
                answer.starts_with(b"HTTP/1.1 502"),
                "{:?}",
                String::from_utf8_lossy(&answer)
            );
        }
        11 => {
            let mut tls =
                client::connect(addrs.tcp_down, client::client_config(roots.clone(), &[]))
                    .await
                    .unwrap();
            let _ = backend::read_to_end(&mut tls).await;
        }
        // The upstream answers after upstream_response: 504.
        12 => {
            let mut tls = client::connect(addrs.web, h1).await.unwrap();
            tls.write_all(
                b"GET /slow?ms=1500 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            let answer = backend::read_to_end(&mut tls).await.unwrap_or_default();
            assert!(
                answer.starts_with(b"HTTP/1.1 504"),
                "{:?}",
                String::from_utf8_lossy(&answer)
            );
        }
        _ => unreachable!("no failure of kind {kind}"),
    }
}

struct MixAddrs {
    web: std::net::SocketAddr,
    h2c: std::net::SocketAddr,
    mtls: std::net::SocketAddr,
    down: std::net::SocketAddr,
    tcp_down: std::net::SocketAddr,
    foreign: pki::ClientCert,
    unlisted: pki::ClientCert,
}

/// Clients failing every way there is, at once and over and over: at the
/// handshake (garbage, a reset, silence, each refused client certificate),
/// in HTTP/1.1 and HTTP/2 (resets mid-response and under open streams,
/// rapid stream resets, a head that never ends) and at the upstream
/// (refused, too slow). Afterwards no connection is counted or running,
/// no task of any kind is left (the HTTP/2 streams and upstream
/// connections run in tasks the drain does not track), and the proxy and
/// its backend hold no descriptor more than before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_of_failures_leaves_nothing_behind() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let ca = pki.write_ca(dir.path());
    let upstream = backend::CountingBackend::start().await;
    let h2c_upstream = backend::CountingBackend::speaking(backend::Speaks::H2c).await;
    let down = backend::closed_port().await;
    let timeouts = "[listener.timeouts]\nhandshake = \"500ms\"\nheader_read = \"500ms\"\nupstream_response = \"500ms\"\nupstream_idle = \"200ms\"\n";
    let cert = pki::files_cert_toml(&files);
    let listener = |name: &str, upstream: std::net::SocketAddr, mode: &str| {
        format!("[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"{mode}\"\n{timeouts}{cert}\n")
    };
    let toml = format!(
        "{}{}{}[listener.client_auth]\nmode = \"require\"\nca = \"{}\"\nallow_uri = [\"spiffe://example.org/sa/frontend\"]\n{}{}",
        listener("web", upstream.addr, "http"),
        listener("h2c", h2c_upstream.addr, "http")
            .replace("[listener.timeouts]", "upstream_protocol = \"h2c\"\n[listener.timeouts]"),
        listener("mtls", upstream.addr, "http"),
        ca.display(),
        listener("down", down, "http"),
        listener("tcp_down", down, "tcp"),
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let mut listed = pki::ClientSpec::new("frontend");
    listed.uris = vec!["spiffe://example.org/sa/frontend".into()];
    let mut unlisted = pki::ClientSpec::new("backend");
    unlisted.uris = vec!["spiffe://example.org/sa/backend".into()];
    let addrs = std::sync::Arc::new(MixAddrs {
        web: proxy.addr("web"),
        h2c: proxy.addr("h2c"),
        mtls: proxy.addr("mtls"),
        down: proxy.addr("down"),
        tcp_down: proxy.addr("tcp_down"),
        foreign: other.client(&listed),
        unlisted: pki.client(&unlisted),
    });
    let roots = pki.roots();
    let allowed = pki
        .client(&listed)
        .rustls_config(roots.clone(), &[b"http/1.1"]);
    let served = |addr, config| async move {
        let mut tls = client::connect(addr, config).await.unwrap();
        tls.write_all(REQUEST).await.unwrap();
        let answer = backend::read_to_end(&mut tls).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"));
    };
    // Served once each first: a pool's sweep (the h2c connection's too)
    // runs from its first connection for as long as the listener's state
    // lives.
    served(addrs.web, client::client_config(roots.clone(), &[])).await;
    served(addrs.mtls, allowed.clone()).await;
    let mut h2 = client::h2(addrs.h2c, roots.clone()).await;
    let response = h2.send_request(client::get_h2("/")).await.unwrap();
    assert_eq!(client::body_text(response).await, "ok");
    drop(h2);
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    // Closed by sheath only once the clients' tasks have dropped them.
    eventually("the warm-up's connections to close", || {
        proxy.running().active_connections() + (upstream.open() + h2c_upstream.open()) as u64 == 0
    })
    .await;
    let (fds_before, tasks_before) = (open_fds(), tasks());

    const KINDS: usize = 15;
    within("the failing clients", async {
        for round in 0..6 {
            let mut clients = tokio::task::JoinSet::new();
            for i in 0..3 * KINDS {
                let (addrs, roots) = (addrs.clone(), roots.clone());
                clients.spawn(async move { fail_once((round + i) % KINDS, &addrs, &roots).await });
            }
            while let Some(done) = clients.join_next().await {
                done.unwrap();
            }
        }
    })
    .await;

    // The listeners still serve, and the allowed client gets through.
    served(addrs.mtls, allowed).await;

    let settled = || {
        (
            proxy.running().active_connections(),
            proxy.running().connection_tasks(),
            upstream.open() + h2c_upstream.open(),
            open_fds().saturating_sub(fds_before),
            tasks().saturating_sub(tasks_before),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while settled() != (0, 0, 0, 0, 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        settled(),
        (0, 0, 0, 0, 0),
        "(connections counted, connection tasks, backend connections, \
         descriptors and tasks more than before) after the failures"
    );
}
