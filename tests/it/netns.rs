//! The deployment shape sheath is built for, with real network namespaces:
//! sheath and its backend share one namespace (Docker `network_mode:
//! service:`, a Kubernetes pod) where the backend listens on 127.0.0.1 only,
//! and a client in another namespace reaches them over a veth pair. Only
//! separate namespaces can show that the backend is reachable through sheath
//! and through nothing else, and that it sees the client's real address.
//!
//! Needs root and iproute2 (`ip`). Namespace names carry the test process's
//! pid, and each namespace is deleted when its guard drops, also when the
//! test fails; the veth ends live inside them and go with them.

use std::fs::File;
use std::future::Future;
use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread::JoinHandle;

use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use sheath::cert::CertInfo;
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::sync::oneshot;

use crate::common::{self, backend, client, pki, within};
use crate::process::{self, Process};

/// Both ends of the veth, from the documentation range: nothing outside the
/// namespaces this test makes ever sees them.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The service namespace is private to the test, so a fixed port is free
/// and reads like a real deployment.
const TLS_PORT: u16 = 8443;
const NAME: &str = "app.test";

/// Run `ip` to completion, failing the test with its stderr if it fails.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip: {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace (`ip netns add`), deleted when dropped.
#[derive(Debug)]
struct Netns {
    name: String,
}

impl Netns {
    fn add(name: String) -> Netns {
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        // A new namespace starts with loopback down; the backend listens on
        // it and sheath connects to the backend over it.
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// The bind mount `ip netns add` made, which setns(2) accepts.
    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let status = std::process::Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stdin(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("could not delete network namespace {}", self.name);
        }
    }
}

/// Two namespaces joined by a veth pair: `service` holds sheath and its
/// backend, `client` is the rest of the network.
#[derive(Debug)]
struct Topology {
    service: Netns,
    client: Netns,
}

impl Topology {
    fn build() -> Topology {
        let id = std::process::id();
        let service = Netns::add(format!("sheath-svc-{id}"));
        let client = Netns::add(format!("sheath-cli-{id}"));
        // Interface names hold at most 15 bytes: 3 + a pid of at most 7
        // digits fits.
        let (svc_if, cli_if) = (format!("shs{id}"), format!("shc{id}"));
        // Both ends are created directly inside the namespaces, so no end
        // ever exists in the host's namespace, even if the test dies
        // between two commands.
        ip(&[
            "link",
            "add",
            &svc_if,
            "netns",
            &service.name,
            "type",
            "veth",
            "peer",
            "name",
            &cli_if,
            "netns",
            &client.name,
        ]);
        for (ns, dev, addr) in [
            (&service, &svc_if, SERVICE_IP),
            (&client, &cli_if, CLIENT_IP),
        ] {
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]);
            ip(&["-n", &ns.name, "link", "set", dev, "up"]);
        }
        Topology { service, client }
    }
}

/// Run `task` on a new thread inside `ns`, with its own runtime. setns(2)
/// moves only the calling thread, so the sockets `task` opens live in `ns`
/// while the test's own threads stay where they are.
fn spawn_in<Fut>(ns: &Netns, task: impl FnOnce() -> Fut + Send + 'static) -> JoinHandle<()>
where
    Fut: Future<Output = ()>,
{
    let path = ns.path();
    std::thread::Builder::new()
        .name(format!("in {}", ns.name))
        .spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
                .unwrap_or_else(|e| panic!("setns into {}: {e}", path.display()));
            drop(file);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(task())
        })
        .expect("spawn a thread")
}

/// Await an answer from a thread started by [`spawn_in`] without blocking
/// the test's runtime, which keeps draining sheath's log pipes meanwhile.
/// Every step of such a task runs under its own deadline, so the answer
/// always comes; a deadline here would only race those and hide which step
/// hung. A sender dropped without an answer means the thread panicked: its
/// panic is raised here.
async fn answer<T>(what: &str, rx: oneshot::Receiver<T>, thread: &mut Option<JoinHandle<()>>) -> T {
    match rx.await {
        Ok(value) => value,
        Err(_) => {
            let thread = thread.take().expect("thread not joined yet");
            match thread.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => panic!("{what}: thread ended without an answer"),
            }
        }
    }
}

/// Run `task` to completion inside `ns` and return its output.
async fn run_in<T, Fut>(ns: &Netns, what: &str, task: impl FnOnce() -> Fut + Send + 'static) -> T
where
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let mut thread = Some(spawn_in(ns, move || async move {
        let _ = tx.send(task().await);
    }));
    let value = answer(what, rx, &mut thread).await;
    if let Some(thread) = thread {
        // All that is left for the thread is to drop its runtime; joining
        // makes sure it has left the namespace before that is deleted.
        let _ = thread.join();
    }
    value
}

/// The suite's HTTP backend on 127.0.0.1 inside a namespace, served until
/// dropped.
#[derive(Debug)]
struct Backend {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    async fn start(ns: &Netns) -> Backend {
        let (addr_tx, addr_rx) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let mut thread = Some(spawn_in(ns, move || async move {
            let _ = addr_tx.send(within("the backend's bind", backend::http()).await);
            // A dropped sender ends the wait as well, so a failing test
            // never leaves this thread (and its namespace) behind.
            let _ = stopped.await;
        }));
        let addr = answer("the backend in the service namespace", addr_rx, &mut thread).await;
        Backend {
            addr,
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the client in its own namespace saw.
#[derive(Debug)]
struct Seen {
    cert: CertInfo,
    status: StatusCode,
    body: String,
    backend_on_service_ip: io::Result<()>,
    backend_on_own_loopback: io::Result<()>,
}

async fn connect(addr: SocketAddr) -> io::Result<()> {
    within(&format!("TCP connect to {addr}"), TcpStream::connect(addr))
        .await
        .map(drop)
}

/// From the client namespace: one HTTPS request through sheath, with the
/// certificate it was served, then direct connections to the backend port.
async fn client_view(roots: std::sync::Arc<rustls::RootCertStore>, backend_port: u16) -> Seen {
    let sheath = SocketAddr::from((SERVICE_IP, TLS_PORT));
    let config = client::client_config(roots, &[b"http/1.1"]);
    let tls = within(
        "TLS handshake with sheath over the veth",
        client::connect_as(sheath, config, NAME),
    )
    .await
    .expect("TLS connect to sheath");
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("sheath sent a certificate");
    let cert = CertInfo::from_der(leaf).expect("served certificate parses");
    let (mut sender, conn) = within(
        "HTTP/1.1 handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(tls)),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/headers")
        .header("host", NAME)
        .body(client::empty())
        .unwrap();
    let resp = within("GET /headers through sheath", sender.send_request(request))
        .await
        .expect("response through sheath");
    let status = resp.status();
    let body = within("response body", client::body_text(resp)).await;
    Seen {
        cert,
        status,
        body,
        backend_on_service_ip: connect(SocketAddr::from((SERVICE_IP, backend_port))).await,
        backend_on_own_loopback: connect(SocketAddr::from((Ipv4Addr::LOCALHOST, backend_port)))
            .await,
    }
}

fn refused(result: &io::Result<()>) -> bool {
    matches!(result, Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

#[tokio::test]
async fn client_in_another_namespace_reaches_loopback_backend_only_through_sheath() {
    if !common::require_root("it builds network namespaces and a veth pair")
        || !common::require_tool("ip")
    {
        return;
    }
    // Declared first so it drops last, also on a panic: sheath is killed
    // and the backend thread joined before the namespaces are deleted.
    let net = Topology::build();
    let backend = Backend::start(&net.service).await;

    let state = tempfile::tempdir().unwrap();
    // `ip netns exec` execs sheath in place, so the child (and the pid that
    // signals and kill-on-drop reach) is sheath itself.
    let mut cmd = process::isolated(Command::new("ip"));
    cmd.args(["netns", "exec", &net.service.name, process::BIN])
        .args(["--log-format", "json", "--state-dir"])
        .arg(state.path())
        .args(["run", "--listen", &format!("0.0.0.0:{TLS_PORT}")])
        .args(["--upstream", &backend.addr.to_string(), "--mode", "http"])
        .args(["--name", NAME]);
    let mut proxy = Process::spawn(cmd);
    assert_eq!(proxy.listening_addr().await.port(), TLS_PORT);
    let installed = proxy.wait_log("certificate installed").await;
    let serial = process::json_field(&installed, "serial")
        .unwrap_or_else(|| panic!("no serial in {installed}"))
        .to_string();
    let ca_pem = std::fs::read_to_string(process::ca_pem_path(state.path())).unwrap();
    let ca = sheath::cert::parse_chain_pem("local CA root", ca_pem.as_bytes()).unwrap();
    let ca = CertInfo::from_der(&ca[0]).unwrap();

    let roots = pki::roots_from_pem(&ca_pem);
    let port = backend.addr.port();
    let seen = run_in(&net.client, "the client namespace", move || {
        client_view(roots, port)
    })
    .await;

    // Verified against the exported root by the handshake; and it is the
    // very certificate sheath says it installed, for the name asked for.
    assert_eq!(seen.cert.serial, serial, "served: {:?}", seen.cert);
    assert_eq!(seen.cert.names, [NAME]);
    assert_eq!(seen.cert.issuer, ca.subject);
    assert!(!seen.cert.is_ca);

    assert_eq!(seen.status, StatusCode::OK, "{}", seen.body);
    let headers = client::parse_headers(&seen.body);
    assert_eq!(
        client::header(&headers, "x-forwarded-for"),
        [CLIENT_IP.to_string().as_str()],
        "backend saw:\n{}",
        seen.body
    );

    // The backend port answers only on the service namespace's loopback:
    // not on the address the client can reach, and the client's own
    // loopback is another one altogether.
    assert!(
        refused(&seen.backend_on_service_ip),
        "direct connect to {SERVICE_IP}:{port}: {:?}",
        seen.backend_on_service_ip
    );
    assert!(
        refused(&seen.backend_on_own_loopback),
        "connect to 127.0.0.1:{port} in the client namespace: {:?}",
        seen.backend_on_own_loopback
    );

    proxy.signal("TERM");
    assert_eq!(proxy.exit_code(common::DEADLINE).await, 0);
    drop(backend);
    let paths = [net.service.path(), net.client.path()];
    drop(net);
    for path in paths {
        assert!(!path.exists(), "{} still exists", path.display());
    }
}
