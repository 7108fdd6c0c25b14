//! IPv6 and dual-stack sockets end to end: what the backend, the PROXY
//! header and the logs say about a client, and an outbound peer named by
//! an IPv6 literal. Needs `::1` on the loopback interface.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::common::{backend, client, pki, require, within, Proxy, TestPki};
use crate::process::{ca_pem_path, isolated, json_field, Process, BIN};

/// Can this host bind `::1`? Under `CI=true` it must.
pub(crate) fn ipv6_loopback() -> bool {
    let found = std::net::TcpListener::bind("[::1]:0").is_ok();
    require(
        found,
        "::1 cannot be bound on this host (IPv6 off on the loopback interface)",
    )
}

/// A listening socket on `[::]` that takes IPv4 too, as systemd binds
/// `ListenStream=[::]:443` (or `ListenStream=443`) by default.
fn dual_stack_listener() -> std::net::TcpListener {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_only_v6(false).unwrap();
    socket
        .bind(&"[::]:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(128).unwrap();
    socket.into()
}

/// An upstream that answers each connection with the PROXY v1 line it
/// was sent, then closes.
async fn proxy_line_reflector() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while !line.ends_with(b"\r\n") {
                    if s.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    line.push(byte[0]);
                }
                let _ = s.write_all(&line).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Everything the other side sends, over TLS from `from` to `to`.
async fn tls_exchange(
    from: SocketAddr,
    to: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    send: &[u8],
) -> (SocketAddr, String) {
    within(&format!("exchange with {to} from {from}"), async {
        let socket = match from {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .unwrap();
        socket.bind(from).unwrap();
        let tcp = socket.connect(to).await.unwrap();
        let local = tcp.local_addr().unwrap();
        let mut tls = TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(send).await.unwrap();
        let answer = backend::read_to_end(&mut tls).await.unwrap();
        (local, String::from_utf8(answer).unwrap())
    })
    .await
}

/// On a dual-stack socket (one handed over by systemd, the only kind
/// sheath does not bind itself) an IPv4 client's address is
/// `::ffff:127.0.0.1`. Everywhere sheath names the client it is the IPv4
/// address, as nginx and Envoy give it: the forwarding headers, the PROXY
/// line (TCP4, both addresses of one family) and the request log. An IPv6
/// client on the same socket stays IPv6, bracketed and quoted in
/// `Forwarded` (RFC 7239 §6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_clients_of_a_dual_stack_socket_are_named_by_their_ipv4_address() {
    use command_fds::{CommandFdExt, FdMapping};
    if !ipv6_loopback() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (web, tcp) = (dual_stack_listener(), dual_stack_listener());
    let (web_port, tcp_port) = (
        web.local_addr().unwrap().port(),
        tcp.local_addr().unwrap().port(),
    );
    let config = crate::common::write_config(
        dir.path(),
        &format!(
            "[[listener]]\nname = \"web\"\nbind = \"[::]:{web_port}\"\nupstream = \"{}\"\n\n\
             [[listener]]\nname = \"tcp\"\nbind = \"[::]:{tcp_port}\"\nupstream = \"{}\"\nmode = \"tcp\"\nproxy_protocol = \"v1\"\n",
            backend::http().await,
            proxy_line_reflector().await
        ),
    );
    let mut cmd = isolated(tokio::process::Command::new(BIN));
    cmd.env("LISTEN_FDS", "2")
        .args(["--log-format", "json", "--state-dir"])
        .arg(&state)
        .args(["run", "--config"])
        .arg(&config);
    cmd.as_std_mut()
        .fd_mappings(vec![
            FdMapping {
                parent_fd: web.into(),
                child_fd: 3,
            },
            FdMapping {
                parent_fd: tcp.into(),
                child_fd: 4,
            },
        ])
        .unwrap();
    let mut proc = Process::spawn(cmd);
    for name in ["web", "tcp"] {
        proc.wait_line(&format!("listener {name} listening"), false, |l| {
            json_field(l, "message") == Some("listening") && json_field(l, "listener") == Some(name)
        })
        .await;
    }
    let pem = std::fs::read_to_string(ca_pem_path(&state)).unwrap();
    let config = client::client_config(pki::roots_from_pem(&pem), &[b"http/1.1"]);

    for (from, to, xff, forwarded_for, family) in [
        ("127.0.0.1:0", "127.0.0.1", "127.0.0.1", "127.0.0.1", "TCP4"),
        ("[::1]:0", "[::1]", "::1", "\"[::1]\"", "TCP6"),
    ] {
        let from: SocketAddr = from.parse().unwrap();
        let web: SocketAddr = format!("{to}:{web_port}").parse().unwrap();
        let (client, answer) = tls_exchange(
            from,
            web,
            Arc::clone(&config),
            b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        let headers = client::parse_headers(&answer);
        assert_eq!(
            client::header(&headers, "x-forwarded-for"),
            [xff],
            "{answer}"
        );
        assert_eq!(
            client::header(&headers, "forwarded"),
            [format!(
                "for={forwarded_for};host=\"localhost\";proto=https"
            )],
            "{answer}"
        );
        let logged = proc
            .wait_line(&format!("the request log of {client}"), false, |l| {
                json_field(l, "message") == Some("request")
                    && json_field(l, "peer")
                        .is_some_and(|p| p.ends_with(&format!(":{}", client.port())))
            })
            .await;
        assert_eq!(
            json_field(&logged, "peer"),
            Some(&*client.to_string()),
            "{logged}"
        );

        let tcp: SocketAddr = format!("{to}:{tcp_port}").parse().unwrap();
        let (client, line) = tls_exchange(from, tcp, Arc::clone(&config), b"").await;
        assert_eq!(
            line,
            format!(
                "PROXY {family} {} {} {} {tcp_port}\r\n",
                client.ip(),
                tcp.ip(),
                client.port()
            )
        );
    }
}

/// A TLS peer on `[::1]` with a certificate for `names`, greeting each
/// connection and closing it cleanly; the SNI each handshake carried is
/// sent on the channel.
async fn ipv6_peer(
    pki: &TestPki,
    names: &[&str],
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Option<String>>,
) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = pki.server_cert(names, Duration::from_secs(3600));
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("[::1]:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = tx.send(tls.get_ref().1.server_name().map(str::to_string));
                let _ = tls.write_all(b"greeting").await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, rx)
}

/// An outbound peer named by an IPv6 literal (`upstream = "[::1]:P"`, no
/// `server_name`): sheath sends no SNI, which carries DNS names only
/// (RFC 6066 §3), and verifies the address against the certificate's IP
/// SANs, so a certificate for 127.0.0.1 and localhost does not pass.
#[tokio::test]
async fn an_outbound_peer_named_by_an_ipv6_literal_is_verified_by_its_ip_san() {
    if !ipv6_loopback() {
        return;
    }
    let pki = TestPki::new();
    for (names, verified) in [(&["::1"][..], true), (&["127.0.0.1", "localhost"], false)] {
        let (peer, mut sni) = ipv6_peer(&pki, names).await;
        let dir = tempfile::tempdir().unwrap();
        let ca = pki.write_ca(dir.path());
        let out = Proxy::start_in(
            &format!(
                "[[listener]]\nname = \"out\"\nbind = \"[::1]:0\"\nupstream = \"{peer}\"\nmode = \"outbound\"\n\n[listener.cert]\nsource = \"local_ca\"\nnames = [\"web.test\"]\n\n[listener.outbound]\nca = \"{}\"\n",
                ca.display()
            ),
            dir,
        )
        .await
        .unwrap();
        let mut tcp = TcpStream::connect(out.addr("out")).await.unwrap();
        let mut got = Vec::new();
        let read = within("the peer's answer", tcp.read_to_end(&mut got)).await;
        if verified {
            assert_eq!(
                (read.is_ok(), &*String::from_utf8_lossy(&got)),
                (true, "greeting"),
                "{names:?}: {read:?}"
            );
            assert_eq!(within("the peer's handshake", sni.recv()).await, Some(None));
        } else {
            assert!(
                got.is_empty() && read.is_err(),
                "{names:?}: {read:?} {got:?}"
            );
        }
    }
}

/// A local-CA listener named by an IPv6 address carries it as an IP SAN
/// that a client connecting to `[::1]` verifies (rustls checks an IP
/// name against IP SANs only, never a DNS SAN spelt `::1`).
#[tokio::test]
async fn a_local_ca_certificate_for_an_ipv6_address_verifies_at_that_address() {
    if !ipv6_loopback() {
        return;
    }
    let toml = format!(
        "[[listener]]\nname = \"v6\"\nbind = \"[::1]:0\"\nupstream = \"{}\"\nmode = \"tcp\"\n[listener.cert]\nsource = \"local_ca\"\nnames = [\"::1\"]\n",
        backend::tcp_echo().await
    );
    let proxy = Proxy::start(&toml).await;
    let pem = std::fs::read_to_string(crate::outbound::local_ca_root(proxy.dir.path())).unwrap();
    let config = client::client_config(pki::roots_from_pem(&pem), &[]);
    let addr = proxy.addr("v6");
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = within(
        "TLS to [::1]",
        TlsConnector::from(config).connect(ServerName::IpAddress(addr.ip().into()), tcp),
    )
    .await
    .expect("the certificate verifies for ::1");
    tls.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    within("echo", tls.read_exact(&mut echoed)).await.unwrap();
    assert_eq!(&echoed, b"ping");
}
