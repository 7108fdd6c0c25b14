//! Outbound mode while things change under open connections: the identity
//! files rotated (well and badly), the peer's CA replaced, the peer moved
//! by a reload, and each direction of a connection ending on its own.
//!
//! The peer is a scripted rustls server that tells the test which client
//! certificate each connection presented, so what the peer saw is asserted
//! on the peer's side, not inferred from sheath's state.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::admin::{admin_for, call, sample, value};
use crate::common::backend::read_to_end;
use crate::common::pki::{ClientCert, ClientSpec};
use crate::common::{eventually, within, write_atomically, Proxy, TestPki};
use crate::mtls::{inotify_instances, inotify_instances_settled, peak_during_reloads, rewriting};
use sheath::config::Config;
use sheath::tls::handshake::FailureReason;

/// What the scripted peer does once a connection's handshake is done.
#[derive(Debug, Clone, Copy)]
enum Script {
    /// Greets with its name and a newline, then echoes until the client's
    /// close_notify, then sends its own.
    Echo,
    /// Reads the whole request (up to the client's close_notify), then
    /// answers `answer:` and the request, then close_notify: a protocol
    /// whose server speaks only after reading EOF.
    AnswerAfterEof,
    /// Sends `greeting` and close_notify at once, then reads whatever the
    /// client still sends until its close_notify.
    CloseFirst,
}

/// One connection as the peer saw it.
#[derive(Debug)]
struct Seen {
    /// The leaf certificate the client presented.
    client_cert: Option<CertificateDer<'static>>,
    /// What the client sent, up to a clean end (close_notify), or why its
    /// stream ended otherwise.
    read: std::io::Result<Vec<u8>>,
}

struct ScriptedPeer {
    addr: SocketAddr,
    /// The certificate the peer presents from its next handshake on.
    cert: Arc<PeerCert>,
    /// A connection's handshake, the client certificate it presented.
    accepted: mpsc::UnboundedReceiver<Option<CertificateDer<'static>>>,
    /// A connection's end.
    ended: mpsc::UnboundedReceiver<Seen>,
}

impl ScriptedPeer {
    /// A peer for `peer.test` with a certificate from `server_ca`,
    /// requiring client certificates from `client_ca`.
    async fn start(
        name: &'static str,
        server_ca: &TestPki,
        client_ca: &TestPki,
        script: Script,
    ) -> ScriptedPeer {
        Self::start_with(name, server_ca, client_ca, script, rustls::DEFAULT_VERSIONS).await
    }

    async fn start_with(
        name: &'static str,
        server_ca: &TestPki,
        client_ca: &TestPki,
        script: Script,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> ScriptedPeer {
        sheath::install_crypto_provider();
        let cert = Arc::new(PeerCert(std::sync::Mutex::new(peer_cert(server_ca))));
        let verifier = rustls::server::WebPkiClientVerifier::builder(client_ca.roots())
            .build()
            .unwrap();
        let server = rustls::ServerConfig::builder_with_protocol_versions(versions)
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::clone(&cert) as _);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted_tx, accepted) = mpsc::unbounded_channel();
        let (ended_tx, ended) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, accepted_tx, ended_tx) =
                    (acceptor.clone(), accepted_tx.clone(), ended_tx.clone());
                tokio::spawn(async move {
                    // A refused handshake is the client's to report.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let client_cert = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.clone().into_owned());
                    let _ = accepted_tx.send(client_cert.clone());
                    let read = match script {
                        Script::Echo => echo(&mut tls, name).await,
                        Script::AnswerAfterEof => {
                            let mut read = read_to_end(&mut tls).await;
                            if read.is_ok() {
                                // The close_notify must come with a FIN:
                                // a peer reading the socket sees the end.
                                let mut byte = [0u8; 1];
                                if tls.get_mut().0.read(&mut byte).await.ok() != Some(0) {
                                    read = Err(std::io::Error::other("close_notify without a FIN"));
                                }
                            }
                            if let Ok(request) = &read {
                                let _ = tls.write_all(b"answer:").await;
                                let _ = tls.write_all(request).await;
                                let _ = tls.shutdown().await;
                            }
                            read
                        }
                        Script::CloseFirst => {
                            let _ = tls.write_all(b"greeting").await;
                            let _ = tls.shutdown().await;
                            read_to_end(&mut tls).await
                        }
                    };
                    let _ = ended_tx.send(Seen { client_cert, read });
                });
            }
        });
        ScriptedPeer {
            addr,
            cert,
            accepted,
            ended,
        }
    }

    /// Present a certificate from `ca` from the next handshake on, as a
    /// peer moved to a new root does.
    fn serve_cert_from(&self, ca: &TestPki) {
        *self.cert.0.lock().unwrap() = peer_cert(ca);
    }

    /// The client certificate of the next connection the peer accepts.
    async fn next_client_cert(&mut self) -> CertificateDer<'static> {
        within("the peer accepts a connection", self.accepted.recv())
            .await
            .unwrap()
            .expect("the client presented a certificate")
    }

    async fn next_end(&mut self) -> Seen {
        within("the peer's connection ends", self.ended.recv())
            .await
            .unwrap()
    }
}

/// A certificate for `peer.test` from `ca`, with its key.
fn peer_cert(ca: &TestPki) -> Arc<rustls::sign::CertifiedKey> {
    let (cert, key) = ca.server_cert(&["peer.test"], Duration::from_secs(3600));
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).unwrap();
    Arc::new(rustls::sign::CertifiedKey::new(chain, key))
}

/// The scripted peer's certificate, replaceable while it serves.
#[derive(Debug)]
struct PeerCert(std::sync::Mutex<Arc<rustls::sign::CertifiedKey>>);

impl rustls::server::ResolvesServerCert for PeerCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0.lock().unwrap()))
    }
}

async fn echo(
    tls: &mut tokio_rustls::server::TlsStream<TcpStream>,
    name: &str,
) -> std::io::Result<Vec<u8>> {
    tls.write_all(format!("{name}\n").as_bytes()).await?;
    tls.flush().await?;
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            tls.shutdown().await?;
            return Ok(all);
        }
        all.extend_from_slice(&buf[..n]);
        tls.write_all(&buf[..n]).await?;
        tls.flush().await?;
    }
}

/// A local client of an [`Script::Echo`] peer, past its greeting.
struct Echoing {
    tcp: TcpStream,
    /// The name the peer greeted with.
    peer: String,
}

impl Echoing {
    /// A connection through `addr` that reaches the peer, or None if it
    /// ends before the greeting (a peer sheath refused).
    async fn try_open(addr: SocketAddr) -> Option<Echoing> {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        let mut greeting = Vec::new();
        while !greeting.ends_with(b"\n") {
            let mut byte = [0u8; 1];
            match tcp.read(&mut byte).await {
                Ok(1) => greeting.push(byte[0]),
                _ => return None,
            }
        }
        let peer = String::from_utf8(greeting).unwrap().trim_end().to_string();
        Some(Echoing { tcp, peer })
    }

    /// Open connections through `addr` until one reaches the peer; no
    /// reload is asked for, so only trust sheath took by itself lets one
    /// through.
    async fn until_open(addr: SocketAddr, what: &str) -> Echoing {
        within(what, async {
            loop {
                if let Some(open) = Echoing::try_open(addr).await {
                    return open;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    async fn open(addr: SocketAddr) -> Echoing {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut greeting = Vec::new();
        within("the peer's greeting", async {
            while !greeting.ends_with(b"\n") {
                let mut byte = [0u8; 1];
                let n = tcp.read(&mut byte).await.unwrap();
                assert_ne!(n, 0, "the connection ended before the greeting");
                greeting.push(byte[0]);
            }
        })
        .await;
        let peer = String::from_utf8(greeting).unwrap().trim_end().to_string();
        Echoing { tcp, peer }
    }

    /// Send `what`, expect it back.
    async fn round_trip(&mut self, what: &str) {
        within(&format!("`{what}` echoed"), async {
            self.tcp.write_all(what.as_bytes()).await.unwrap();
            let mut back = vec![0u8; what.len()];
            self.tcp.read_exact(&mut back).await.unwrap();
            assert_eq!(back, what.as_bytes());
        })
        .await
    }
}

/// An outbound listener `out` towards `upstream`, presenting the files
/// `cert`/`key`, trusting `ca` for `peer.test`.
fn outbound_toml(upstream: SocketAddr, cert: &Path, key: &Path, ca: &Path) -> String {
    format!(
        "[[listener]]\nname = \"out\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"outbound\"\n\n[listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\npoll_interval = \"5s\"\n\n[listener.outbound]\nca = \"{}\"\nserver_name = \"peer.test\"\n",
        cert.display(),
        key.display(),
        ca.display(),
    )
}

fn identity(pki: &TestPki, n: u32) -> ClientCert {
    let mut spec = ClientSpec::new("web");
    spec.uris = vec![format!("spiffe://mesh.test/web/{n}")];
    pki.client(&spec)
}

/// An outbound sheath presenting `id` from files under its directory,
/// towards `upstream`, trusting `ca`. The files' paths come back too.
async fn outbound_with_identity(
    id: &ClientCert,
    upstream: SocketAddr,
    ca: &TestPki,
) -> (Proxy, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = id.write(dir.path(), "id");
    let ca = ca.write_ca(dir.path());
    let out = Proxy::start_in(&outbound_toml(upstream, &cert, &key, &ca), dir)
        .await
        .unwrap();
    (out, cert, key)
}

#[tokio::test]
async fn rotated_identity_files_reach_new_connections_and_broken_ones_never_do() {
    let pki = TestPki::new();
    let mut peer = ScriptedPeer::start("peer", &pki, &pki, Script::Echo).await;
    let first = identity(&pki, 1);
    let (out, cert, key) = outbound_with_identity(&first, peer.addr, &pki).await;
    let addr = out.addr("out");
    let status = out.running().listener("out").unwrap().certs[0]
        .status
        .clone();
    let admin = admin_for(&out).await;
    let failures_metric = || async {
        let (_, scrape) = call(admin, "GET", "/metrics").await;
        value(
            &scrape,
            "sheath_certificate_renewal_consecutive_failures{listener=\"out\",cert=\"default\",source=\"files\"}",
        )
    };

    let mut established = Echoing::open(addr).await;
    assert_eq!(peer.next_client_cert().await, first.der);
    established.round_trip("before the rotation").await;

    // Key, then certificate, each renamed in.
    let second = identity(&pki, 2);
    write_atomically(&key, &second.key_pem);
    write_atomically(&cert, &second.cert_pem);
    eventually("the new identity is installed", || {
        status.load().installs == 2
    })
    .await;
    established.round_trip("after the rotation").await;
    let mut rotated = Echoing::open(addr).await;
    assert_eq!(
        peer.next_client_cert().await,
        second.der,
        "a new connection presented the old identity"
    );
    rotated.round_trip("new").await;

    // Broken replacements: each is read, refused and counted, and new
    // connections keep presenting the identity that works.
    let stranger = identity(&TestPki::new(), 3);
    let truncated = second.cert_pem[..second.cert_pem.len() / 2].to_string();
    let cases: [(&str, &str, &str, &str); 2] = [
        (
            "a key that does not match",
            &identity(&pki, 4).cert_pem,
            &stranger.key_pem,
            "does not match",
        ),
        ("a truncated PEM", &truncated, &second.key_pem, "PEM"),
    ];
    for (what, c, k, expected) in cases {
        let before = status.load().consecutive_failures;
        write_atomically(&key, k);
        write_atomically(&cert, c);
        eventually(&format!("{what} is read and refused"), || {
            status.load().consecutive_failures > before
        })
        .await;
        let error = status.load().last_error.clone().unwrap_or_default();
        assert!(error.contains(expected), "{what}: the error was {error}");
        assert!(failures_metric().await >= 1.0, "{what}: not in the metrics");
        let mut after = Echoing::open(addr).await;
        assert_eq!(
            peer.next_client_cert().await,
            second.der,
            "{what} replaced the working identity"
        );
        after.round_trip(what).await;
        established.round_trip(what).await;
    }

    // A certificate written in place in two halves, with its key already
    // there: the first half is refused, the whole one installed.
    let third = identity(&pki, 5);
    let installs = status.load().installs;
    let before = status.load().consecutive_failures;
    let (head, tail) = third.cert_pem.split_at(third.cert_pem.len() / 2);
    write_atomically(&key, &third.key_pem);
    std::fs::write(&cert, head).unwrap();
    eventually("the half-written certificate is read and refused", || {
        status.load().consecutive_failures > before
    })
    .await;
    let error = status.load().last_error.clone().unwrap_or_default();
    assert!(
        error.contains("-----END CERTIFICATE-----") && !error.contains("[67, "),
        "the half-written certificate's error should name the missing line in words: {error}"
    );
    let mut half = Echoing::open(addr).await;
    assert_eq!(
        peer.next_client_cert().await,
        second.der,
        "a half-written certificate replaced the working identity"
    );
    half.round_trip("half").await;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&cert)
        .unwrap();
    std::io::Write::write_all(&mut file, tail.as_bytes()).unwrap();
    drop(file);
    eventually("the completed certificate is installed", || {
        status.load().installs == installs + 1
    })
    .await;
    assert_eq!(failures_metric().await, 0.0);
    let _whole = Echoing::open(addr).await;
    assert_eq!(peer.next_client_cert().await, third.der);
    established.round_trip("at the end").await;
    let stats = &out.running().listener("out").unwrap().stats;
    assert_eq!(
        stats.handshake_failures(FailureReason::PeerCertRejected),
        0,
        "a handshake failed along the way"
    );
}

/// Reload `out` from its configuration file as it now reads.
async fn reload(out: &Proxy) -> Result<u64, String> {
    let config = Config::load(&out.dir.path().join("sheath.toml")).unwrap();
    out.running()
        .reload(config)
        .await
        .map_err(|e| e.to_string())
}

/// Peer trust from `ca` files is watched as client trust is: a bundle
/// replaced on disk applies from the next connection without a reload,
/// and connections verified under the old one stay up.
#[tokio::test]
async fn a_replaced_peer_ca_takes_effect_without_a_reload_and_spares_open_connections() {
    let (old_ca, new_ca) = (TestPki::new(), TestPki::new());
    let clients = TestPki::new();
    let mut old_peer = ScriptedPeer::start("old", &old_ca, &clients, Script::Echo).await;
    let mut new_peer = ScriptedPeer::start("new", &new_ca, &clients, Script::Echo).await;
    let id = identity(&clients, 1);
    let (out, cert, key) = outbound_with_identity(&id, old_peer.addr, &old_ca).await;
    let ca_path = out.dir.path().join("test-ca.pem");
    let addr = out.addr("out");
    let stats = out.running().listener("out").unwrap().stats.clone();

    let mut established = Echoing::open(addr).await;
    old_peer.next_client_cert().await;
    established.round_trip("before").await;

    // The old root leaves the bundle: a peer signed only by it is refused
    // from the next connection on, with no reload.
    write_atomically(&ca_path, &new_ca.ca_pem);
    within("a peer of the old CA is refused without a reload", async {
        while Echoing::try_open(addr).await.is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut refused = TcpStream::connect(addr).await.unwrap();
    let read = within("the refused connection ends", read_to_end(&mut refused)).await;
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "a peer of the old CA after the change"
    );
    eventually("the refusals are counted", || {
        stats.handshake_failures(FailureReason::PeerCertRejected) >= 2
    })
    .await;
    established.round_trip("after the change").await;

    // A reload that moves the listener to a peer of the new CA keeps the
    // trust the files gave it.
    crate::common::write_config(
        out.dir.path(),
        &outbound_toml(new_peer.addr, &cert, &key, &ca_path),
    );
    reload(&out).await.unwrap();
    let mut moved = Echoing::open(addr).await;
    assert_eq!(moved.peer, "new");
    new_peer.next_client_cert().await;
    moved.round_trip("new trust").await;
    established.round_trip("at the end").await;
}

/// The series of the outbound listener `out`'s peer-trust reloads with
/// `outcome`, 0 while it is not in the scrape.
async fn peer_trust_reloads(admin: SocketAddr, outcome: &str) -> f64 {
    let (_, scrape) = call(admin, "GET", "/metrics").await;
    sample(
        &scrape,
        &format!("sheath_peer_trust_reloads_total{{listener=\"out\",outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(0.0)
}

/// A CA root rotation as it happens under Kubernetes: the peer moves to a
/// certificate from a new root, the Secret holding the bundle gains that
/// root, and outbound connections must reach the peer again with nobody
/// reloading sheath, while those opened under the old root stay up.
#[tokio::test]
async fn a_peer_moved_to_a_new_root_is_reached_once_the_bundle_gains_it_without_a_reload() {
    let (first_root, second_root, third_root) = (TestPki::new(), TestPki::new(), TestPki::new());
    let clients = TestPki::new();
    let mut peer = ScriptedPeer::start("peer", &first_root, &clients, Script::Echo).await;
    let (out, _, _) = outbound_with_identity(&identity(&clients, 1), peer.addr, &first_root).await;
    let ca_path = out.dir.path().join("test-ca.pem");
    let addr = out.addr("out");
    let stats = out.running().listener("out").unwrap().stats.clone();
    let admin = admin_for(&out).await;

    let mut established = Echoing::open(addr).await;
    peer.next_client_cert().await;
    established.round_trip("under the first root").await;

    // The peer moves first, as a careless rotation does: refused.
    peer.serve_cert_from(&second_root);
    assert!(
        Echoing::try_open(addr).await.is_none(),
        "a peer of a root not in the bundle was reached"
    );
    eventually("the refusal is counted", || {
        stats.handshake_failures(FailureReason::PeerCertRejected) == 1
    })
    .await;

    // The bundle renamed in whole (Kubernetes' `..data` swap does the
    // same), the new root beside the first.
    write_atomically(
        &ca_path,
        &format!("{}{}", first_root.ca_pem, second_root.ca_pem),
    );
    let mut second =
        Echoing::until_open(addr, "a new connection to reach the peer of the new root").await;
    second.round_trip("under the second root").await;
    established.round_trip("after the rename").await;

    // Rewritten in place: the next root added, the first one dropped.
    peer.serve_cert_from(&third_root);
    std::fs::write(
        &ca_path,
        format!("{}{}", second_root.ca_pem, third_root.ca_pem),
    )
    .unwrap();
    let mut third =
        Echoing::until_open(addr, "a new connection to reach the peer of the next root").await;
    third.round_trip("under the third root").await;
    second.round_trip("after the rewrite").await;
    established
        .round_trip("opened under a root no longer trusted")
        .await;
    assert!(
        peer_trust_reloads(admin, "success").await >= 2.0,
        "the two new bundles are not counted"
    );
}

/// A bundle caught broken (half-written, emptied) is read, refused and
/// counted, and the roots that work stay; the next good one is taken.
#[tokio::test]
async fn a_broken_peer_ca_bundle_keeps_the_last_good_roots_and_is_counted() {
    let (root, next_root, clients) = (TestPki::new(), TestPki::new(), TestPki::new());
    let mut peer = ScriptedPeer::start("peer", &root, &clients, Script::Echo).await;
    let (out, _, _) = outbound_with_identity(&identity(&clients, 1), peer.addr, &root).await;
    let ca_path = out.dir.path().join("test-ca.pem");
    let addr = out.addr("out");
    let admin = admin_for(&out).await;
    let mut established = Echoing::open(addr).await;
    peer.next_client_cert().await;

    let truncated = root.ca_pem[..root.ca_pem.len() / 2].to_string();
    for (what, contents) in [
        ("a truncated bundle", truncated.as_str()),
        ("an empty bundle", ""),
    ] {
        let before = peer_trust_reloads(admin, "failure").await;
        write_atomically(&ca_path, contents);
        within(&format!("{what} is read and refused"), async {
            while peer_trust_reloads(admin, "failure").await <= before {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let mut after = Echoing::open(addr).await;
        after.round_trip(what).await;
        established.round_trip(what).await;
    }
    assert_eq!(peer_trust_reloads(admin, "success").await, 0.0);

    // A good bundle after the broken ones is taken.
    peer.serve_cert_from(&next_root);
    write_atomically(&ca_path, &format!("{}{}", root.ca_pem, next_root.ca_pem));
    let mut rotated =
        Echoing::until_open(addr, "the good bundle after the broken ones is taken").await;
    rotated.round_trip("the next root").await;
    established.round_trip("at the end").await;
    assert_eq!(peer_trust_reloads(admin, "success").await, 1.0);

    // At the start there is no trust to keep: the file is refused, named
    // once, with the missing line in words.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = identity(&clients, 2).write(dir.path(), "id");
    let broken = dir.path().join("broken-ca.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let error = Proxy::start_in(&outbound_toml(peer.addr, &cert, &key, &broken), dir)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        error.matches(&broken.display().to_string()).count(),
        1,
        "the error should name the file once: {error}"
    );
    assert!(
        error.contains("-----END CERTIFICATE-----") && !error.contains("[67, "),
        "the error should name the missing line in words: {error}"
    );
}

/// A reload that changes an outbound listener's peer settings replaces
/// its trust watcher, and a removed listener's goes with it: the old one
/// stops at once, even while its files keep changing (see the client-trust
/// test of the same name in mtls.rs for what piled up when it did not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_peer_trust_watcher_stops_at_once_while_its_files_change() {
    let (pki, clients) = (TestPki::new(), TestPki::new());
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = identity(&clients, 1).write(dir.path(), "id");
    std::fs::create_dir(dir.path().join("trust")).unwrap();
    let bundle = dir.path().join("trust/peers.pem");
    std::fs::write(&bundle, &pki.ca_pem).unwrap();
    let peer = crate::common::backend::closed_port().await;
    // Each name is other outbound settings: a new peer trust and watcher.
    let config = |n: u32| {
        format!(
            "[[listener]]\nname = \"out\"\nbind = \"127.0.0.1:0\"\nupstream = \"{peer}\"\nmode = \"outbound\"\n\n[listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n\n[listener.outbound]\nca = \"{}\"\nserver_name = \"peer{n}.test\"\n",
            cert.display(),
            key.display(),
            bundle.display()
        )
    };
    let proxy = Proxy::start_in(&config(0), dir).await.unwrap();
    let apply = |toml: String| {
        let running = proxy.running();
        let path = proxy.dir.path().join("sheath.toml");
        async move {
            let new = Config::from_toml(&path, &toml).unwrap();
            running.reload(new).await.unwrap();
        }
    };
    // One for the identity's files, one for the peer trust's (started by
    // its task, so maybe not yet).
    let watchers = 2;
    eventually("the peer trust watcher to start", || {
        inotify_instances() == watchers
    })
    .await;

    let writing = rewriting(&bundle, &pki.ca_pem);
    let peak = peak_during_reloads(20, |n| apply(config(n))).await;
    let left = inotify_instances_settled(watchers).await;
    assert!(
        peak <= watchers + 3,
        "{peak} inotify instances at once during twenty reloads: replaced peer trust watchers outlived their replacement"
    );
    assert_eq!(
        left, watchers,
        "inotify instances after the reloads (the identity's and the peer trust's before)"
    );

    // The listener removed (another, without peer trust, in its place)
    // and put back, in turn: a removed listener's watchers go at once too.
    // At the end only the newcomer's certificate watcher is left.
    let other = format!(
        "[[listener]]\nname = \"other\"\nbind = \"127.0.0.1:0\"\nupstream = \"{peer}\"\nmode = \"tcp\"\n\n[listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let peak = peak_during_reloads(21, |n| {
        apply(if n % 2 == 1 { other.clone() } else { config(n) })
    })
    .await;
    let left = inotify_instances_settled(1).await;
    writing.abort();
    assert!(
        peak <= watchers + 3,
        "{peak} inotify instances at once while the listener was removed and put back: removed listeners' watchers outlived them"
    );
    assert_eq!(left, 1, "inotify instances after the listener's removal");
}

#[tokio::test]
async fn a_reload_moves_new_connections_to_the_new_peer_and_leaves_open_ones() {
    let pki = TestPki::new();
    let mut first = ScriptedPeer::start("first", &pki, &pki, Script::Echo).await;
    let mut second = ScriptedPeer::start("second", &pki, &pki, Script::Echo).await;
    let id = identity(&pki, 1);
    let (out, cert, key) = outbound_with_identity(&id, first.addr, &pki).await;
    let ca = out.dir.path().join("test-ca.pem");
    let addr = out.addr("out");

    let mut open = Echoing::open(addr).await;
    assert_eq!(open.peer, "first");
    first.next_client_cert().await;

    crate::common::write_config(
        out.dir.path(),
        &outbound_toml(second.addr, &cert, &key, &ca),
    );
    reload(&out).await.unwrap();
    let mut moved = Echoing::open(addr).await;
    assert_eq!(moved.peer, "second");
    assert_eq!(second.next_client_cert().await, id.der);
    moved.round_trip("to the second").await;
    open.round_trip("still to the first").await;

    // The open connection still ends cleanly, at the first peer.
    open.tcp.shutdown().await.unwrap();
    let rest = within("the open connection's end", read_to_end(&mut open.tcp)).await;
    assert_eq!(rest.unwrap(), b"");
    let seen = first.next_end().await;
    assert_eq!(seen.read.unwrap(), b"still to the first");
}

#[tokio::test]
async fn the_local_clients_fin_reaches_the_peer_as_close_notify_and_the_answer_comes_back() {
    let pki = TestPki::new();
    let mut peer = ScriptedPeer::start("peer", &pki, &pki, Script::AnswerAfterEof).await;
    let (out, _, _) = outbound_with_identity(&identity(&pki, 1), peer.addr, &pki).await;

    let mut tcp = TcpStream::connect(out.addr("out")).await.unwrap();
    tcp.write_all(b"the whole request").await.unwrap();
    tcp.shutdown().await.unwrap();
    let answer = within("the answer after EOF", read_to_end(&mut tcp)).await;
    assert_eq!(answer.unwrap(), b"answer:the whole request");
    let seen = peer.next_end().await;
    // close_notify, not a bare FIN: the peer's read ended cleanly.
    assert_eq!(seen.read.unwrap(), b"the whole request");
    assert!(seen.client_cert.is_some());
}

#[tokio::test]
async fn the_peers_close_notify_reaches_the_local_client_as_fin_and_it_can_still_send() {
    let pki = TestPki::new();
    let mut peer = ScriptedPeer::start("peer", &pki, &pki, Script::CloseFirst).await;
    let (out, _, _) = outbound_with_identity(&identity(&pki, 1), peer.addr, &pki).await;

    let mut tcp = TcpStream::connect(out.addr("out")).await.unwrap();
    let greeting = within("the peer's greeting and FIN", read_to_end(&mut tcp)).await;
    assert_eq!(greeting.unwrap(), b"greeting");
    tcp.write_all(b"sent after the peer's end").await.unwrap();
    tcp.shutdown().await.unwrap();
    let seen = peer.next_end().await;
    assert_eq!(seen.read.unwrap(), b"sent after the peer's end");
}

/// A certificate for servers only (an extended key usage without
/// clientAuth, as public CAs now issue) is a valid pair, but every peer
/// that checks its clients refuses it: it must not replace an identity
/// that works.
#[tokio::test]
async fn a_certificate_not_for_client_authentication_never_replaces_the_identity() {
    let pki = TestPki::new();
    let mut peer = ScriptedPeer::start("peer", &pki, &pki, Script::Echo).await;
    let first = identity(&pki, 1);
    let (out, cert, key) = outbound_with_identity(&first, peer.addr, &pki).await;
    let addr = out.addr("out");
    let status = out.running().listener("out").unwrap().certs[0]
        .status
        .clone();

    let mut spec = ClientSpec::new("web");
    spec.eku = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server_only = pki.client(&spec);
    write_atomically(&key, &server_only.key_pem);
    write_atomically(&cert, &server_only.cert_pem);
    eventually(
        "the certificate not for client authentication is read and refused",
        || status.load().consecutive_failures > 0,
    )
    .await;
    let error = status.load().last_error.clone().unwrap_or_default();
    assert!(error.contains("clientAuth"), "the error was {error}");
    assert_eq!(status.load().installs, 1);
    let mut after = Echoing::open(addr).await;
    assert_eq!(
        peer.next_client_cert().await,
        first.der,
        "the server-only certificate replaced the working identity"
    );
    after.round_trip("still the first identity").await;

    // At the start (or a reload) there is no identity to keep: the files
    // are refused with the reason.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = server_only.write(dir.path(), "id");
    let ca = pki.write_ca(dir.path());
    let error = Proxy::start_in(&outbound_toml(peer.addr, &cert, &key, &ca), dir)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("clientAuth"), "the error was {error}");
}
