//! Outbound mode: a local plaintext client, relayed over mutual TLS to a
//! remote peer with the certificate sheath manages. The peers are real: a
//! second sheath that requires client certificates, and `openssl s_server`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::backend::{read_to_end, CountingBackend};
use crate::common::pebble::free_port;
use crate::common::{require_tool, within, Proxy, TestPki};
use sheath::tls::handshake::FailureReason;

/// The peer: an HTTP listener that requires a client certificate from
/// `client_ca` and forwards the caller's identity as XFCC to a backend
/// that echoes request heads. It serves a certificate for `peer.test`.
pub(crate) async fn peer(pki: &TestPki, client_ca: &Path) -> (Proxy, CountingBackend) {
    let upstream = CountingBackend::start().await;
    (peer_of(pki, client_ca, upstream.addr, "").await, upstream)
}

/// [`peer`] in front of `upstream`, with `extra` lines in its listener.
pub(crate) async fn peer_of(
    pki: &TestPki,
    client_ca: &Path,
    upstream: SocketAddr,
    extra: &str,
) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "peer");
    let (cert, key) = pki.server_cert(&["peer.test"], Duration::from_secs(3600));
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    let toml = format!(
        "[[listener]]\nname = \"in\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{extra}\n{}\n[listener.client_auth]\nmode = \"require\"\nca = \"{}\"\nforward = [\"xfcc\"]\n",
        crate::common::pki::files_cert_toml(&files),
        client_ca.display()
    );
    Proxy::start_in(&toml, dir).await.unwrap()
}

/// An outbound sheath whose identity comes from its local CA (names
/// `web.test`), towards `target`, trusting the test CA for `server_name`.
async fn outbound(
    dir: tempfile::TempDir,
    target: SocketAddr,
    ca: &Path,
    server_name: &str,
) -> Proxy {
    let toml = format!(
        "[global]\nstate_dir = \"{0}/state\"\n\n[[listener]]\nname = \"out\"\nbind = \"127.0.0.1:0\"\nupstream = \"{target}\"\nmode = \"outbound\"\n\n[listener.cert]\nsource = \"local_ca\"\nnames = [\"web.test\"]\n\n[listener.outbound]\nca = \"{1}\"\nserver_name = \"{server_name}\"\n",
        dir.path().display(),
        ca.display(),
    );
    Proxy::start_in(&toml, dir).await.unwrap()
}

/// The local CA the outbound sheath will use, created ahead so the peer
/// can be told to trust it.
pub(crate) fn local_ca_root(dir: &Path) -> std::path::PathBuf {
    let ca = sheath::cert::LocalCa::load_or_create(&dir.join("state")).unwrap();
    ca.cert_path()
}

/// A plaintext HTTP/1.1 request through the outbound port; the whole answer.
pub(crate) async fn plain_get(addr: SocketAddr, path: &str) -> String {
    within(&format!("GET {path} through {addr}"), async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: peer.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        String::from_utf8(read_to_end(&mut tcp).await.unwrap()).unwrap()
    })
    .await
}

#[tokio::test]
async fn a_local_client_reaches_the_peer_as_the_managed_identity() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let client_ca = local_ca_root(dir.path());
    let (peer, _backend) = peer(&pki, &client_ca).await;
    let test_ca = pki.write_ca(dir.path());
    let out = outbound(dir, peer.addr("in"), &test_ca, "peer.test").await;

    let answer = plain_get(out.addr("out"), "/headers").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The peer verified sheath's local-CA certificate and says so.
    let xfcc = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-forwarded-client-cert: "))
        .unwrap_or_else(|| panic!("no XFCC in {answer}"));
    assert!(xfcc.contains("DNS=web.test"), "{xfcc}");

    // The certificate presented is the one the manager serves now.
    let serving = out.running().listener("out").unwrap().cert_status();
    let serial = serving.current.as_ref().unwrap().sha256.clone();
    assert!(
        xfcc.contains(&format!("Hash={serial}")),
        "{xfcc} vs {serial}"
    );
    let stats = &out.running().listener("out").unwrap().stats;
    assert_eq!(
        stats.handshakes.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_peer_that_fails_verification_gets_nothing() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let client_ca = local_ca_root(dir.path());
    let (peer, backend) = peer(&pki, &client_ca).await;
    let test_ca = pki.write_ca(dir.path());
    // The peer's certificate is for peer.test; this listener expects
    // another name, so the peer must be refused before any byte goes out.
    let out = outbound(dir, peer.addr("in"), &test_ca, "billing.test").await;

    let mut tcp = TcpStream::connect(out.addr("out")).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read = within("the client is closed", tcp.read_to_end(&mut got)).await;
    // Reset without a byte: a peer never verified is never a clean end.
    assert!(
        got.is_empty()
            && read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the client got {read:?} {got:?}"
    );
    let stats = &out.running().listener("out").unwrap().stats;
    assert_eq!(stats.handshake_failures(FailureReason::PeerCertRejected), 1);
    assert_eq!(
        backend.accepted(),
        0,
        "a request reached the peer's backend"
    );
}

#[tokio::test]
async fn openssl_s_server_sees_the_client_certificate() {
    if !require_tool("openssl") {
        return;
    }
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let client_ca = local_ca_root(dir.path());
    let (cert, key) = pki.server_cert(&["peer.test"], Duration::from_secs(3600));
    let (cert_path, key_path) = (dir.path().join("s.pem"), dir.path().join("s.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let port = free_port();
    // -Verify: a client certificate is required; -www answers a GET with
    // the session, including the client certificate's subject.
    let mut server = tokio::process::Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-www",
            "-Verify",
            "1",
            "-verify_return_error",
        ])
        .arg("-accept")
        .arg(port.to_string())
        .arg("-cert")
        .arg(&cert_path)
        .arg("-key")
        .arg(&key_path)
        .arg("-CAfile")
        .arg(&client_ca)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let target: SocketAddr = ([127, 0, 0, 1], port).into();
    within("s_server listens", async {
        while TcpStream::connect(target).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let test_ca = pki.write_ca(dir.path());
    let out = outbound(dir, target, &test_ca, "peer.test").await;

    let answer = plain_get(out.addr("out"), "/").await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(
        answer.contains("CN=web.test") || answer.contains("CN = web.test"),
        "{answer}"
    );
    server.kill().await.unwrap();
}

#[tokio::test]
async fn a_renewed_identity_is_presented_from_the_next_connection() {
    use crate::common::pki::ClientSpec;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let test_ca = pki.write_ca(dir.path());
    let (peer, _backend) = peer(&pki, &test_ca).await;
    let identity = |n: u32| {
        let mut spec = ClientSpec::new("web");
        spec.uris = vec![format!("spiffe://mesh.test/web/{n}")];
        pki.client(&spec)
    };
    let (cert, key) = identity(1).write(dir.path(), "id");
    let toml = format!(
        "[[listener]]\nname = \"out\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"outbound\"\n\n[listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\npoll_interval = \"5s\"\n\n[listener.outbound]\nca = \"{}\"\nserver_name = \"peer.test\"\n",
        peer.addr("in"),
        cert.display(),
        key.display(),
        test_ca.display(),
    );
    let out = Proxy::start_in(&toml, dir).await.unwrap();
    let addr = out.addr("out");
    let answer = plain_get(addr, "/headers").await;
    assert!(answer.contains("URI=spiffe://mesh.test/web/1"), "{answer}");

    // Renewal by file replacement: key, then certificate, each renamed in.
    let next = identity(2);
    for (path, pem) in [(&key, &next.key_pem), (&cert, &next.cert_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    let status = out.running().listener("out").unwrap().certs[0]
        .status
        .clone();
    within("the new identity is installed", async {
        while status.load().installs < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let answer = plain_get(addr, "/headers").await;
    assert!(answer.contains("URI=spiffe://mesh.test/web/2"), "{answer}");
}

#[tokio::test]
async fn a_peer_that_refuses_the_identity_closes_the_client_without_an_answer() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    // The peer trusts some other CA for its clients, not sheath's local CA.
    let stranger_dir = tempfile::tempdir().unwrap();
    let other_ca = TestPki::new().write_ca(stranger_dir.path());
    let (peer, backend) = peer(&pki, &other_ca).await;
    let test_ca = pki.write_ca(dir.path());
    let out = outbound(dir, peer.addr("in"), &test_ca, "peer.test").await;

    let mut tcp = TcpStream::connect(out.addr("out")).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: peer.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = within("the client is closed", tcp.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "the client got an answer: {answer:?}");
    // Reset, not closed with a FIN that would read as an empty answer.
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let peer_stats = &peer.running().listener("in").unwrap().stats;
    crate::common::eventually("the peer counted the refusal", || {
        peer_stats.handshake_failures(FailureReason::ClientCertRejected) == 1
    })
    .await;
    // In TLS 1.3 the refusal comes after this side's handshake is done; it
    // is still a failed handshake, counted once, as TLS 1.2 counts it.
    let stats = &out.running().listener("out").unwrap().stats;
    let handshakes = stats.handshakes.load(std::sync::atomic::Ordering::Relaxed);
    let refused = stats.handshake_failures(FailureReason::AlertReceived);
    assert_eq!((handshakes, refused), (0, 1), "(successes, refusals)");
    assert_eq!(
        backend.accepted(),
        0,
        "a request reached the peer's backend"
    );
}

/// How the scripted peer of [`cut_peer`] ends a connection after its
/// greeting.
#[derive(Debug, Clone, Copy)]
enum PeerEnd {
    CloseNotify,
    BareFin,
    Reset,
}

/// A TLS peer for `peer.test` that greets each connection with `greeting`
/// and ends the n-th one as `ends[n]` says.
async fn cut_peer(pki: &TestPki, ends: Vec<PeerEnd>) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = pki.server_cert(&["peer.test"], Duration::from_secs(3600));
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for end in ends {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            tls.write_all(b"greeting").await.unwrap();
            tls.flush().await.unwrap();
            match end {
                PeerEnd::CloseNotify => tls.shutdown().await.unwrap(),
                PeerEnd::BareFin => tls.get_mut().0.shutdown().await.unwrap(),
                PeerEnd::Reset => tls.get_ref().0.set_zero_linger().unwrap(),
            }
            // Held open (a reset is sent as it is dropped) until the
            // local client is done with it.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    addr
}

#[tokio::test]
async fn only_the_peers_close_notify_ends_the_local_stream_cleanly() {
    // The local application reads plaintext: a clean FIN is all it has to
    // tell a whole answer from a cut one. A peer's FIN without
    // close_notify (forgeable on the path) and a peer's reset must not
    // reach it as one.
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let ends = vec![PeerEnd::CloseNotify, PeerEnd::BareFin, PeerEnd::Reset];
    let target = cut_peer(&pki, ends.clone()).await;
    let test_ca = pki.write_ca(dir.path());
    let out = outbound(dir, target, &test_ca, "peer.test").await;

    for end in ends {
        let mut tcp = TcpStream::connect(out.addr("out")).await.unwrap();
        let read = within("the local client's end", read_to_end(&mut tcp)).await;
        match end {
            PeerEnd::CloseNotify => assert_eq!(read.unwrap(), b"greeting"),
            _ => assert_eq!(
                read.map_err(|e| e.kind()),
                Err(std::io::ErrorKind::ConnectionReset),
                "{end:?}"
            ),
        }
    }
}

/// An outbound sheath like [`outbound`], with `timeouts` lines (TOML) for
/// the listener.
async fn outbound_with(
    dir: tempfile::TempDir,
    target: SocketAddr,
    ca: &Path,
    server_name: &str,
    timeouts: &str,
) -> Proxy {
    let toml = format!(
        "[global]\nstate_dir = \"{0}/state\"\ndrain_timeout = \"5s\"\n\n[[listener]]\nname = \"out\"\nbind = \"127.0.0.1:0\"\nupstream = \"{target}\"\nmode = \"outbound\"\n\n[listener.timeouts]\n{timeouts}\n\n[listener.cert]\nsource = \"local_ca\"\nnames = [\"web.test\"]\n\n[listener.outbound]\nca = \"{1}\"\nserver_name = \"{server_name}\"\n",
        dir.path().display(),
        ca.display(),
    );
    Proxy::start_in(&toml, dir).await.unwrap()
}

#[tokio::test]
async fn a_peer_never_reached_resets_a_client_that_sent_nothing() {
    // A local client waiting for the peer to speak first (a greeting) has
    // sent nothing, so its socket holds no unread bytes that would make
    // the close a reset anyway. A bare FIN would read as a peer that
    // accepted and had nothing to say; the peer was never reached.
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let test_ca = pki.write_ca(dir.path());
    // Refuses TCP: a port nothing listens on.
    let closed: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    // Accepts TCP and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // Proves the wrong name.
    let wrong_name = cut_peer(&pki, vec![PeerEnd::CloseNotify]).await;
    let cases = [
        (closed, "peer.test", "a refused connect"),
        (
            silent.local_addr().unwrap(),
            "peer.test",
            "a handshake timeout",
        ),
        (wrong_name, "billing.test", "a peer with the wrong name"),
    ];
    for (target, name, what) in cases {
        let dir = tempfile::tempdir().unwrap();
        let out = outbound_with(dir, target, &test_ca, name, "handshake = \"1s\"").await;
        let mut tcp = TcpStream::connect(out.addr("out")).await.unwrap();
        let read = within(what, read_to_end(&mut tcp)).await;
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset),
            "{what}"
        );
    }
}

/// Descriptors this test process holds (nextest runs each test alone in
/// its process): sheath's and the test peers'.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// How a churning local client's connection fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The peer's port refuses TCP.
    PeerRefuses,
    /// The peer proves another name.
    WrongName,
    /// The peer does not take this sidecar's certificate.
    IdentityRefused,
    /// The peer accepts TCP and never answers: the handshake times out.
    SilentPeer,
    /// The local client resets while the handshake to the peer is under way.
    ClientResets,
}

#[tokio::test]
async fn thousands_of_failed_connections_leave_nothing_behind() {
    use Failure::*;
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let client_ca = local_ca_root(dir.path());
    let test_ca = pki.write_ca(dir.path());
    let (good_peer, _b1) = peer(&pki, &client_ca).await;
    let stranger_dir = tempfile::tempdir().unwrap();
    let other_ca = TestPki::new().write_ca(stranger_dir.path());
    let (strict_peer, _b2) = peer(&pki, &other_ca).await;
    // A peer that takes connections and keeps each, silent, until sheath
    // gives up on it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = silent.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = tcp.read_to_end(&mut Vec::new()).await;
            });
        }
    });
    let closed: SocketAddr = ([127, 0, 0, 1], free_port()).into();

    let mut outs = Vec::new();
    for (failure, target, name) in [
        (PeerRefuses, closed, "peer.test"),
        (WrongName, good_peer.addr("in"), "billing.test"),
        (IdentityRefused, strict_peer.addr("in"), "peer.test"),
        (SilentPeer, silent_addr, "peer.test"),
        (ClientResets, silent_addr, "peer.test"),
    ] {
        let d = tempfile::tempdir().unwrap();
        // Its own state directory, the same local CA: the strict peer
        // refuses it, the others never get as far as checking it.
        std::fs::create_dir_all(d.path().join("state")).unwrap();
        for f in std::fs::read_dir(dir.path().join("state")).unwrap() {
            let f = f.unwrap();
            if f.file_type().unwrap().is_file() {
                std::fs::copy(f.path(), d.path().join("state").join(f.file_name())).unwrap();
            }
        }
        let out = outbound_with(d, target, &test_ca, name, "handshake = \"300ms\"").await;
        outs.push((failure, out));
    }

    let once = |failure: Failure, addr: SocketAddr| async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        if let ClientResets = failure {
            tcp.set_zero_linger().unwrap();
            return;
        }
        let _ = tcp
            .write_all(b"GET / HTTP/1.1\r\nHost: peer.test\r\n\r\n")
            .await;
        let read = within(&format!("{failure:?}"), read_to_end(&mut tcp)).await;
        assert!(
            read.as_ref().map_or(true, |got| got.is_empty()),
            "{failure:?}: {read:?}"
        );
    };
    // Warm up each listener (lazily created state), then measure.
    for (failure, out) in &outs {
        once(*failure, out.addr("out")).await;
    }
    let active = || {
        outs.iter()
            .map(|(_, o)| {
                let stats = &o.running().listener("out").unwrap().stats;
                stats.active.load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum::<u64>()
    };
    crate::common::eventually("the warm-up connections end", || active() == 0).await;
    let baseline = open_fds();

    const ROUNDS: usize = 300;
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..ROUNDS {
        for (failure, out) in &outs {
            tasks.spawn(once(*failure, out.addr("out")));
        }
        // A bounded number in flight: the silent peer holds each for the
        // handshake timeout.
        if round % 20 == 19 {
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    crate::common::eventually("no connection is active", || active() == 0).await;
    crate::common::eventually("the descriptors are back to the baseline", || {
        open_fds() <= baseline
    })
    .await;
    let stats = |f: Failure| &outs.iter().find(|(g, _)| *g == f).unwrap().1;
    let failures = |f: Failure, reason| {
        stats(f)
            .running()
            .listener("out")
            .unwrap()
            .stats
            .handshake_failures(reason)
    };
    // One count per failed connection, with its reason (and the warm-up).
    let n = ROUNDS as u64 + 1;
    assert_eq!(stats(PeerRefuses).upstream_connect_failures("out"), n);
    assert_eq!(failures(WrongName, FailureReason::PeerCertRejected), n);
    assert_eq!(failures(IdentityRefused, FailureReason::AlertReceived), n);
    assert_eq!(failures(SilentPeer, FailureReason::Timeout), n);
    for (failure, out) in &outs {
        let s = &out.running().listener("out").unwrap().stats;
        assert_eq!(
            s.handshakes.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "{failure:?}"
        );
    }
}

/// The local client's connection ends after `idle` without traffic, and
/// after `max_lifetime` however busy it is: the relay's one timer for
/// both (`Activity::idle_or_lifetime`) answers to each.
#[tokio::test]
async fn idle_and_lifetime_limits_end_an_outbound_connection() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let client_ca = local_ca_root(dir.path());
    let (peer, _backend) = peer(&pki, &client_ca).await;
    let test_ca = pki.write_ca(dir.path());
    let out = outbound_with(
        dir,
        peer.addr("in"),
        &test_ca,
        "peer.test",
        "idle = \"300ms\"\nmax_lifetime = \"1500ms\"",
    )
    .await;

    // Silent after the request line: the idle limit ends it.
    let mut quiet = TcpStream::connect(out.addr("out")).await.unwrap();
    quiet.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = within("idle close", quiet.read_to_end(&mut rest)).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250), "closed after {took:?}");
    assert!(took < Duration::from_millis(1400), "closed after {took:?}");
    assert!(rest.is_empty());

    // A header line every 100 ms keeps it from going idle; the lifetime
    // ends it all the same.
    let mut busy = TcpStream::connect(out.addr("out")).await.unwrap();
    busy.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let started = std::time::Instant::now();
    within("lifetime close", async {
        let mut n = 0;
        while busy
            .write_all(format!("x-keep-{n}: busy\r\n").as_bytes())
            .await
            .is_ok()
        {
            n += 1;
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(100), busy.read(&mut byte)).await {
                Err(_) => continue,
                Ok(_) => break,
            }
        }
    })
    .await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1200), "closed after {took:?}");
}
