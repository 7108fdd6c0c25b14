//! Connecting to an upstream name with more than one address, through the
//! real binary: the name resolves to `::1` first, then `127.0.0.1`, as
//! `localhost` does on most systems, and the backend listens on 127.0.0.1.
//!
//! `localhost` is the name where it resolves that way. Elsewhere (an
//! /etc/hosts with `127.0.0.1 localhost` alone, as some containers have)
//! sheath runs, as root, in a mount namespace of its own whose /etc/hosts
//! gives a test name both addresses; the host's file is left alone.
//!
//! A black hole, an address that drops SYNs instead of refusing them, is
//! a listener on `::1` with a backlog of 0 whose one queued connection is
//! never accepted: the kernel then drops further SYNs to it, and a
//! connect hangs until the caller gives up, as with a dead node behind DNS.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use socket2::{Domain, Protocol, Socket, Type};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::common::backend::{self, CountingBackend};
use crate::common::{client, pki, require_root, require_tool, within};
use crate::process::{ca_pem_path, isolated, json_field, Process, BIN};

/// What the upstream is called when `localhost` will not do.
const NAME: &str = "dual.sheath.test";
/// The listeners' connect timeout: a request that spends it on the black
/// hole fails (504 in HTTP mode) instead of reaching the backend.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// When the second address family is tried while the first has not
/// answered yet (RFC 8305's Connection Attempt Delay, sheath's value).
const FALLBACK_DELAY: Duration = Duration::from_millis(300);

const V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
const V4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A name that resolves to `::1`, then `127.0.0.1`, for sheath.
struct DualStack {
    host: &'static str,
    /// Where `hosts` is, the /etc/hosts sheath sees instead of the host's,
    /// for [`NAME`]; `None` when `localhost` serves.
    hosts: Option<TempDir>,
}

impl DualStack {
    /// `None`, after saying why, when this host can give sheath no such
    /// name.
    async fn find() -> Option<DualStack> {
        if !crate::ipv6::ipv6_loopback() {
            return None;
        }
        if resolve("localhost").await == [V6, V4] {
            return Some(DualStack {
                host: "localhost",
                hosts: None,
            });
        }
        if !require_root(&format!(
            "localhost does not resolve to ::1 then 127.0.0.1 here, and naming {NAME} in a mount namespace of sheath's own takes root"
        )) || !require_tool("unshare")
            || !require_tool("getent")
        {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let own = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let hosts = format!("{own}\n::1 {NAME}\n127.0.0.1 {NAME}\n");
        std::fs::write(dir.path().join("hosts"), hosts).unwrap();
        let dual = DualStack {
            host: NAME,
            hosts: Some(dir),
        };
        // getaddrinfo sorts the two by gai.conf (RFC 6724), not by the
        // file's order: without ::1 first the tests would prove nothing.
        let mut order = dual.command("getent");
        order.args(["ahosts", NAME]).kill_on_drop(true);
        let out = within("getent in the mount namespace", order.output())
            .await
            .unwrap();
        let listed = String::from_utf8_lossy(&out.stdout);
        let mut ips: Vec<IpAddr> = listed
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        ips.dedup();
        assert_eq!(
            ips,
            [V6, V4],
            "{NAME} in the mount namespace: {listed}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(dual)
    }

    /// `program`, run where [`DualStack::host`] resolves as it should:
    /// directly, or in a mount namespace whose /etc/hosts is ours.
    fn command(&self, program: &str) -> Command {
        match &self.hosts {
            None => Command::new(program),
            Some(dir) => {
                // `unshare` makes the new namespace's mounts private, so the
                // bind mount is seen by the command alone; `exec` keeps the
                // pid, so signals and kill-on-drop reach the program itself.
                let mut cmd = Command::new("unshare");
                cmd.args(["--mount", "--", "sh", "-c"])
                    .arg(r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#)
                    .arg("sh")
                    .arg(dir.path().join("hosts"))
                    .arg(program);
                cmd
            }
        }
    }

    /// sheath running `config`, its state in `state`.
    fn sheath(&self, state: &Path, config: &Path) -> Process {
        let mut cmd = isolated(self.command(BIN));
        cmd.args(["--log-format", "json", "--state-dir"])
            .arg(state)
            .args(["run", "--config"])
            .arg(config);
        Process::spawn(cmd)
    }
}

async fn resolve(host: &str) -> Vec<IpAddr> {
    match tokio::net::lookup_host((host, 0)).await {
        Ok(found) => found.map(|a| a.ip()).collect(),
        Err(_) => Vec::new(),
    }
}

/// The address of a listener, from its "listening" log line.
async fn listener_addr(proc: &mut Process, name: &str) -> SocketAddr {
    let line = proc
        .wait_line(&format!("listener {name} listening"), false, |l| {
            json_field(l, "message") == Some("listening") && json_field(l, "listener") == Some(name)
        })
        .await;
    json_field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {line}"))
}

/// What holds `[::1]:port` for a test: a black hole, or a socket bound
/// without listening, which the kernel answers with a reset.
#[allow(dead_code, reason = "held for their effect on the port only")]
enum Held {
    BlackHole { listener: Socket, queued: Socket },
    Refusing(Socket),
}

fn v6_socket(port: u16) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::new(V6, port).into())?;
    Ok(socket)
}

fn black_hole(port: u16) -> io::Result<Held> {
    let listener = v6_socket(port)?;
    listener.listen(0)?;
    // The one connection a backlog of 0 admits, completed by the kernel.
    let queued = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    queued.connect(&SocketAddr::new(V6, port).into())?;
    Ok(Held::BlackHole { listener, queued })
}

/// Bind `hold` on `[::1]` at the port of a backend from `start`, which
/// listens on 127.0.0.1; with another backend if that port is taken on
/// `::1`.
async fn on_both<B, F: std::future::Future<Output = B>>(
    start: impl Fn() -> F,
    addr: impl Fn(&B) -> SocketAddr,
    hold: fn(u16) -> io::Result<Held>,
) -> (B, Held) {
    for _ in 0..20 {
        let backend = start().await;
        match hold(addr(&backend).port()) {
            Ok(held) => return (backend, held),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("cannot hold [::1]:{}: {e}", addr(&backend).port()),
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1 in 20 tries");
}

/// Fail, saying why, unless a connect to `[::1]:port` is still pending
/// when sheath would try the next address: the tests mean nothing where
/// the kernel answers a full queue (with a reset, or by completing it).
async fn assert_black_hole(port: u16) {
    let addr = SocketAddr::new(V6, port);
    match tokio::time::timeout(FALLBACK_DELAY, TcpStream::connect(addr)).await {
        Err(_) => {}
        Ok(result) => panic!("{addr} with a full accept queue is no black hole here: {result:?}"),
    }
}

fn config(dir: &Path, listeners: &[(&str, &str, String)]) -> PathBuf {
    let mut text = String::new();
    for (name, mode, upstream) in listeners {
        text.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n\
             allow_remote_upstream = true\nmode = \"{mode}\"\n\
             [listener.timeouts]\nconnect = \"{}s\"\n\n",
            CONNECT_TIMEOUT.as_secs()
        ));
    }
    crate::common::write_config(dir, &text)
}

/// A dead node first among a name's addresses (here `::1` dropping SYNs)
/// costs a connection the fallback delay, not the connect timeout: the
/// next address is tried while the first has not answered, in HTTP mode
/// (the pool) and in TCP mode alike.
#[tokio::test]
async fn a_black_holed_first_address_is_raced_by_the_next() {
    let Some(dual) = DualStack::find().await else {
        return;
    };
    let (web_backend, _web_hole) = on_both(
        CountingBackend::start,
        |b: &CountingBackend| b.addr,
        black_hole,
    )
    .await;
    let (echo, _echo_hole) = on_both(backend::tcp_echo, |a: &SocketAddr| *a, black_hole).await;
    assert_black_hole(web_backend.addr.port()).await;
    assert_black_hole(echo.port()).await;

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let host = dual.host;
    let path = config(
        dir.path(),
        &[
            ("web", "http", format!("{host}:{}", web_backend.addr.port())),
            ("tcp", "tcp", format!("{host}:{}", echo.port())),
        ],
    );
    let mut proc = dual.sheath(&state, &path);
    let (web, tcp) = (
        listener_addr(&mut proc, "web").await,
        listener_addr(&mut proc, "tcp").await,
    );
    let roots = pki::roots_from_pem(&std::fs::read_to_string(ca_pem_path(&state)).unwrap());

    let mut sender = client::h1(web, Arc::clone(&roots)).await;
    let started = Instant::now();
    let resp = within(
        "GET / through sheath",
        sender.send_request(client::get("/")),
    )
    .await
    .unwrap();
    let took = started.elapsed();
    let status = resp.status();
    let body = within("the response body", client::body_text(resp)).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "ok"),
        "after {took:?}"
    );
    assert!(
        took < CONNECT_TIMEOUT,
        "the request took {took:?}, the connect timeout is {CONNECT_TIMEOUT:?}"
    );
    assert_eq!(web_backend.accepted(), 1);

    let tls = client::connect(tcp, client::client_config(roots, &[]));
    let mut tls = within("TLS connect to the TCP listener", tls)
        .await
        .unwrap();
    let started = Instant::now();
    tls.write_all(b"ping").await.unwrap();
    tls.shutdown().await.unwrap();
    let echoed = within("the echo", backend::read_to_end(&mut tls)).await;
    let took = started.elapsed();
    assert_eq!(
        echoed.as_deref().map_err(|e| e.to_string()),
        Ok(&b"ping"[..]),
        "after {took:?}"
    );
    assert!(
        took < CONNECT_TIMEOUT,
        "the echo took {took:?}, the connect timeout is {CONNECT_TIMEOUT:?}"
    );
}

/// A first address that refuses (nothing on `::1` at the port) gives way
/// to the next. (The connector moves on at once rather than after the
/// fallback delay; not asserted as a time, which a loaded machine blurs.)
#[tokio::test]
async fn a_refused_first_address_falls_through_to_the_next() {
    let Some(dual) = DualStack::find().await else {
        return;
    };
    let (backend, _refusing) = on_both(
        CountingBackend::start,
        |b: &CountingBackend| b.addr,
        |port| v6_socket(port).map(Held::Refusing),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = config(
        dir.path(),
        &[(
            "web",
            "http",
            format!("{}:{}", dual.host, backend.addr.port()),
        )],
    );
    let mut proc = dual.sheath(&state, &path);
    let web = listener_addr(&mut proc, "web").await;
    let roots = pki::roots_from_pem(&std::fs::read_to_string(ca_pem_path(&state)).unwrap());
    let mut sender = client::h1(web, roots).await;
    let resp = within(
        "GET / through sheath",
        sender.send_request(client::get("/")),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(backend.accepted(), 1);
}
