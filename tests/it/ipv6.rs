//! IPv6 and dual-stack sockets end to end: what the backend, the PROXY
//! header and the logs say about a client, and an outbound peer named by
//! an IPv6 literal. Needs `::1` on the loopback interface.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;

use crate::common::{backend, client, pki, require, within};
use crate::process::{ca_pem_path, isolated, json_field, Process, BIN};

/// Can this host bind `::1`? Under `CI=true` it must.
fn ipv6_loopback() -> bool {
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
