//! Configuration reload without dropping connections.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::client::{self, get, get_h2};
use crate::common::{backend, pki, within, Proxy, TestPki};
use sheath::config::Config;

struct Backends {
    http: SocketAddr,
    ws: SocketAddr,
    tcp: SocketAddr,
}

/// Three listeners on fixed ports (so reloads keep their sockets), with a
/// knob that changes on every reload.
fn config_text(
    dir: &Path,
    ports: [u16; 3],
    b: &Backends,
    idle_secs: u64,
    lifetime: &str,
    extra: &str,
) -> String {
    let pki_files = format!(
        "[listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("server.pem").display(),
        dir.join("server.key").display()
    );
    format!(
        "[global]\nstate_dir = \"{state}\"\ndrain_timeout = \"5s\"\n\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:{p0}\"\nupstream = \"{http}\"\n[listener.timeouts]\nidle = \"{idle_secs}s\"\n[listener.cert]\nsource = \"local_ca\"\nnames = [\"localhost\"]\nlifetime = \"{lifetime}\"\n\n\
         [[listener]]\nname = \"ws\"\nbind = \"127.0.0.1:{p1}\"\nupstream = \"{ws}\"\nmax_connections = {maxc}\n{pki_files}\n\
         [[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:{p2}\"\nupstream = \"{tcp}\"\nmode = \"tcp\"\n[listener.timeouts]\nidle = \"{idle_secs}s\"\n{pki_files}\n{extra}",
        state = dir.join("state").display(),
        p0 = ports[0],
        p1 = ports[1],
        p2 = ports[2],
        http = b.http,
        ws = b.ws,
        tcp = b.tcp,
        maxc = 1000 + idle_secs,
    )
}

fn parse(dir: &Path, text: &str) -> Config {
    Config::from_toml(&dir.join("sheath.toml"), text).unwrap()
}

fn free_ports() -> [u16; 3] {
    [
        crate::common::pebble::free_port(),
        crate::common::pebble::free_port(),
        crate::common::pebble::free_port(),
    ]
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_reloads_under_continuous_load_break_nothing() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write_server(dir.path(), "server");
    let b = Backends {
        http: backend::http().await,
        ws: backend::websocket_echo().await,
        tcp: backend::tcp_echo().await,
    };
    let ports = free_ports();
    let text = config_text(dir.path(), ports, &b, 300, "24h", "");
    let proxy = Proxy::start_in(&text, dir).await.unwrap();
    let local_ca_pem =
        std::fs::read_to_string(proxy.dir.path().join("state/local-ca/ca.pem")).unwrap();
    let web_roots = pki::roots_from_pem(&local_ca_pem);
    let (web, ws, tcp) = (proxy.addr("web"), proxy.addr("ws"), proxy.addr("tcp"));

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    let fail = |failures: &Arc<AtomicU64>, what: &str, e: String| {
        failures.fetch_add(1, Ordering::SeqCst);
        eprintln!("FAILURE {what}: {e}");
    };

    // HTTP/1.1 keep-alive: one connection, sequential requests.
    {
        let (stop, failures, done, roots) = (
            stop.clone(),
            failures.clone(),
            done.clone(),
            web_roots.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut s = client::h1(web, roots).await;
            while !stop.load(Ordering::Relaxed) {
                match s.send_request(get("/")).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    other => fail(&failures, "h1", format!("{:?}", other.map(|r| r.status()))),
                }
            }
        }));
    }
    // HTTP/2: one connection, concurrent streams.
    {
        let (stop, failures, done, roots) = (
            stop.clone(),
            failures.clone(),
            done.clone(),
            web_roots.clone(),
        );
        load.push(tokio::spawn(async move {
            let s = client::h2(web, roots).await;
            while !stop.load(Ordering::Relaxed) {
                let mut batch = Vec::new();
                for _ in 0..4 {
                    let mut s = s.clone();
                    batch.push(tokio::spawn(async move {
                        s.send_request(get_h2("/drip?chunks=3&size=100&ms=1")).await
                    }));
                }
                for t in batch {
                    match t.await.unwrap() {
                        Ok(r) if r.status() == 200 => {
                            match r.into_body().collect().await.map(|b| b.to_bytes().len()) {
                                Ok(300) => {
                                    done.fetch_add(1, Ordering::Relaxed);
                                }
                                other => fail(&failures, "h2 body", format!("{other:?}")),
                            }
                        }
                        other => fail(&failures, "h2", format!("{:?}", other.map(|r| r.status()))),
                    }
                }
            }
        }));
    }
    // A WebSocket that stays open through every reload.
    {
        let (stop, failures, done, roots) =
            (stop.clone(), failures.clone(), done.clone(), pki.roots());
        load.push(tokio::spawn(async move {
            let tls = client::connect(ws, client::client_config(roots, &[b"http/1.1"]))
                .await
                .unwrap();
            let (mut sock, _) = tokio_tungstenite::client_async("wss://localhost/", tls)
                .await
                .unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let text = format!("m{i}");
                if let Err(e) = sock.send(Message::text(text.clone())).await {
                    return fail(&failures, "ws send", e.to_string());
                }
                match sock.next().await {
                    Some(Ok(m)) if m.to_text().map(|t| t == text).unwrap_or(false) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    other => return fail(&failures, "ws echo", format!("{other:?}")),
                }
            }
        }));
    }
    // A long TCP stream, hash-checked at the end.
    let tcp_stream = {
        let (stop, roots) = (stop.clone(), pki.roots());
        tokio::spawn(async move {
            let tls = client::connect(tcp, client::client_config(roots, &[]))
                .await
                .unwrap();
            let (mut r, mut w) = tokio::io::split(tls);
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.map(|_| got)
            });
            let mut sent = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let chunk = crate::common::random_bytes(4096 + (n as usize % 1000));
                n += 1;
                w.write_all(&chunk).await.unwrap();
                sent.extend_from_slice(&chunk);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            w.shutdown().await.unwrap();
            let got = reader.await.unwrap().unwrap();
            (
                crate::common::sha256(&sent),
                crate::common::sha256(&got),
                sent.len(),
            )
        })
    };
    // New connections every few milliseconds.
    {
        let (stop, failures, done, roots) = (
            stop.clone(),
            failures.clone(),
            done.clone(),
            web_roots.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut s = client::h1(web, roots.clone()).await;
                match s.send_request(get("/")).await {
                    Ok(r) if r.status() == 200 => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    other => fail(
                        &failures,
                        "new connection",
                        format!("{:?}", other.map(|r| r.status())),
                    ),
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
    }

    // Let the load settle, then measure and reload 100 times.
    within("load started", async {
        while done.load(Ordering::Relaxed) < 50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let generation0 = proxy.running().reloads.generation.load(Ordering::Relaxed);
    for i in 0..100u64 {
        // Every reload changes something; every tenth replaces the web
        // listener's certificate source settings (a new manager and leaf).
        let lifetime = if (i / 10) % 2 == 0 { "24h" } else { "23h" };
        let text = config_text(proxy.dir.path(), ports, &b, 300 + (i % 2), lifetime, "");
        let generation = proxy
            .running()
            .reload(parse(proxy.dir.path(), &text))
            .await
            .unwrap();
        assert_eq!(generation, generation0 + i + 1);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after_reloads = done.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in load {
        within("load task", t).await.unwrap();
    }
    let (sent_hash, got_hash, len) = within("tcp stream", tcp_stream).await.unwrap();
    assert!(len > 100_000, "tcp stream too short: {len}");
    assert_eq!(sent_hash, got_hash, "TCP stream corrupted across reloads");
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "requests failed during reloads"
    );
    assert!(after_reloads > 200, "too little load: {after_reloads}");

    // Flat afterwards: connection tasks gone, fds and memory back.
    within("connections closed", async {
        while proxy.running().connection_tasks() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let fds_after_first_pass = open_fds();
    let rss_before = rss_kib();
    for i in 0..100u64 {
        let text = config_text(
            proxy.dir.path(),
            ports,
            &b,
            300 + (i % 2),
            if i % 20 < 10 { "24h" } else { "23h" },
            "",
        );
        proxy
            .running()
            .reload(parse(proxy.dir.path(), &text))
            .await
            .unwrap();
    }
    let fds_after = open_fds();
    assert!(
        fds_after <= fds_after_first_pass + 2,
        "fds grew across reloads: {fds_after_first_pass} -> {fds_after}"
    );
    let rss_after = rss_kib();
    assert!(
        rss_after < rss_before + 20 * 1024,
        "RSS grew: {rss_before} KiB -> {rss_after} KiB"
    );
}

#[tokio::test]
async fn a_failing_reload_changes_nothing() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write_server(dir.path(), "server");
    let b = Backends {
        http: backend::http().await,
        ws: backend::websocket_echo().await,
        tcp: backend::tcp_echo().await,
    };
    let ports = free_ports();
    let text = config_text(dir.path(), ports, &b, 300, "24h", "");
    let proxy = Proxy::start_in(&text, dir).await.unwrap();
    let running = proxy.running();
    let generation = running.reloads.generation.load(Ordering::Relaxed);

    // A new listener on a port someone else holds, plus a change to an
    // existing one: the bind fails, so neither applies.
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = blocker.local_addr().unwrap();
    let broken_upstream = backend::closed_port().await;
    let text = config_text(
        proxy.dir.path(),
        ports,
        &b,
        300,
        "24h",
        &format!("\n[[listener]]\nname = \"new\"\nbind = \"{busy}\"\nupstream = \"127.0.0.1:9\"\n"),
    )
    .replacen(&b.http.to_string(), &broken_upstream.to_string(), 1);
    let err = running
        .reload(parse(proxy.dir.path(), &text))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cannot bind"), "{err}");
    // A certificate file that does not exist.
    let text = config_text(proxy.dir.path(), ports, &b, 300, "24h", "")
        .replace("server.key", "missing.key");
    let err = running
        .reload(parse(proxy.dir.path(), &text))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing.key"), "{err}");

    assert_eq!(
        running.reloads.generation.load(Ordering::Relaxed),
        generation
    );
    assert_eq!(running.reloads.failed.load(Ordering::Relaxed), 2);
    assert!(running.listener("new").is_none());
    let local_ca_pem =
        std::fs::read_to_string(proxy.dir.path().join("state/local-ca/ca.pem")).unwrap();
    let mut s = client::h1(proxy.addr("web"), pki::roots_from_pem(&local_ca_pem)).await;
    assert_eq!(
        s.send_request(get("/")).await.unwrap().status(),
        200,
        "old upstream still used"
    );
    client::connect(proxy.addr("ws"), client::client_config(pki.roots(), &[]))
        .await
        .expect("old certificate files still served");
}

#[tokio::test]
async fn removed_listener_finishes_its_transfer_and_refuses_new_connections() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let http = backend::http().await;
    let listener = |name: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nupstream = \"{http}\"\n{}\n",
            pki::files_cert_toml(&files)
        )
    };
    let both = format!(
        "[global]\nstate_dir = \"{}\"\ndrain_timeout = \"20s\"\n\n{}{}",
        dir.path().join("state").display(),
        listener("keep"),
        listener("gone")
    );
    let proxy = Proxy::start_in(&both, dir).await.unwrap();
    let gone = proxy.addr("gone");
    let keep = proxy.addr("keep");
    let mut s = client::h1(gone, pki.roots()).await;
    let resp = s
        .send_request(get("/drip?chunks=30&size=32768&ms=20"))
        .await
        .unwrap();

    let only_keep = format!(
        "[global]\nstate_dir = \"{}\"\ndrain_timeout = \"20s\"\n\n{}",
        proxy.dir.path().join("state").display(),
        listener("keep")
    );
    let config = Config::from_toml(&proxy.dir.path().join("sheath.toml"), &only_keep).unwrap();
    proxy.running().reload(config).await.unwrap();
    assert!(proxy.running().listener("gone").is_none());
    within("removed listener refuses", async {
        loop {
            match TcpStream::connect(gone).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    let body = within("transfer completes", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), 30 * 32768);
    // The kept listener kept its socket and serves.
    assert_eq!(proxy.addr("keep"), keep);
    let mut k = client::h1(keep, pki.roots()).await;
    assert_eq!(k.send_request(get("/")).await.unwrap().status(), 200);

    // And a listener can be added back.
    let config = Config::from_toml(&proxy.dir.path().join("sheath.toml"), &both).unwrap();
    proxy.running().reload(config).await.unwrap();
    let mut g = client::h1(proxy.addr("gone"), pki.roots()).await;
    assert_eq!(g.send_request(get("/")).await.unwrap().status(), 200);
}

/// A reload that fails changes nothing outside either: a listener's new
/// certificate prepared before another listener's error is never exported
/// and its `on_renew` hook never runs, since it is never served.
#[tokio::test]
async fn a_failing_reload_exports_nothing_and_runs_no_hook() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write_server(dir.path(), "server");
    let upstream = backend::tcp_echo().await;
    let [port_a, port_b, _] = free_ports();
    let export = dir.path().join("export");
    let hook_log = dir.path().join("hook.log");
    let text = |lifetime: &str, key: &str| {
        format!(
            "[global]\nstate_dir = \"{state}\"\ndrain_timeout = \"5s\"\n\n\
             [[listener]]\nname = \"a\"\nbind = \"127.0.0.1:{port_a}\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n\
             [listener.cert]\nsource = \"local_ca\"\nnames = [\"localhost\"]\nlifetime = \"{lifetime}\"\n\
             [listener.cert.export]\ndir = \"{export}\"\non_renew = 'echo \"$SHEATH_CERT_SERIAL\" >> {log}'\n\n\
             [[listener]]\nname = \"b\"\nbind = \"127.0.0.1:{port_b}\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n\
             [listener.cert]\nsource = \"files\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            state = dir.path().join("state").display(),
            export = export.display(),
            log = hook_log.display(),
            cert = dir.path().join("server.pem").display(),
            key = dir.path().join(key).display(),
        )
    };
    let first = text("24h", "server.key");
    let broken = text("12h", "missing.key");
    let fixed = text("6h", "server.key");
    let proxy = Proxy::start_in(&first, dir).await.unwrap();
    let running = proxy.running();
    let served = || {
        running
            .listener("a")
            .unwrap()
            .cert_status()
            .current
            .clone()
            .unwrap()
            .serial
    };
    let hooked = || {
        std::fs::read_to_string(&hook_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let initial = served();
    crate::common::eventually("the first hook", || hooked() == [initial.clone()]).await;

    // Listener a's certificate changes, b's key is missing: nothing applies.
    let err = running
        .reload(parse(proxy.dir.path(), &broken))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing.key"), "{err}");
    assert_eq!(served(), initial);

    // A reload that applies exports and runs the hook once; the failed
    // one, had it exported, would show before it.
    running
        .reload(parse(proxy.dir.path(), &fixed))
        .await
        .unwrap();
    let renewed = served();
    assert_ne!(renewed, initial);
    crate::common::eventually("the hook of the applied reload", || {
        hooked().last() == Some(&renewed)
    })
    .await;
    assert_eq!(
        hooked(),
        [initial, renewed],
        "a hook ran for a failed reload"
    );
    let exported = std::fs::read_to_string(export.join("fullchain.pem")).unwrap();
    let der = sheath::cert::parse_chain_pem("export", exported.as_bytes()).unwrap();
    assert_eq!(
        sheath::cert::CertInfo::from_der(&der[0]).unwrap().serial,
        served()
    );
}

/// Reloads in quick succession, each giving the exporting listener a new
/// certificate: the exports of successive certificates overlap, and the
/// export directory must end up holding the certificate served, with its
/// key, and the hook must have run for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_reloads_export_the_certificate_served() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = backend::tcp_echo().await;
    let [port, _, _] = free_ports();
    let export = dir.path().join("export");
    let hook_log = dir.path().join("hook.log");
    let state = dir.path().join("state");
    let text = |lifetime_h: u32| {
        format!(
            "[global]\nstate_dir = \"{state}\"\ndrain_timeout = \"5s\"\n\n\
             [[listener]]\nname = \"a\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n\
             [listener.cert]\nsource = \"local_ca\"\nnames = [\"localhost\"]\nlifetime = \"{lifetime_h}h\"\n\
             [listener.cert.export]\ndir = \"{export}\"\non_renew = 'echo \"$SHEATH_CERT_SERIAL\" >> {log}'\n",
            state = state.display(),
            export = export.display(),
            log = hook_log.display(),
        )
    };
    let first = text(100);
    let proxy = Proxy::start_in(&first, dir).await.unwrap();
    let running = proxy.running();
    for round in 0..20 {
        for lifetime in [1 + 2 * round, 2 + 2 * round] {
            running
                .reload(parse(proxy.dir.path(), &text(lifetime)))
                .await
                .unwrap();
        }
        let served = running
            .listener("a")
            .unwrap()
            .cert_status()
            .current
            .clone()
            .unwrap();
        crate::common::eventually(
            &format!("round {round}: the served certificate's hook"),
            || {
                std::fs::read_to_string(&hook_log)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l == served.serial)
            },
        )
        .await;
        let chain = std::fs::read_to_string(export.join("fullchain.pem")).unwrap();
        let key = std::fs::read_to_string(export.join("key.pem")).unwrap();
        let material = sheath::cert::files::load_material(
            &export.join("fullchain.pem"),
            &export.join("key.pem"),
        )
        .unwrap_or_else(|e| panic!("round {round}: exported pair unusable: {e}\n{chain}{key}"));
        assert_eq!(
            material.info.serial, served.serial,
            "round {round}: another certificate exported"
        );
    }
}

/// The cap `max_connections` sets must hold after a reload lowers it while
/// the listener is full: the permits the open connections hold are given
/// back later, and must not come back as room for new connections.
#[tokio::test]
async fn lowering_max_connections_while_full_takes_effect() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let upstream = backend::tcp_echo().await;
    let [port, _, _] = free_ports();
    let text = |max: usize| {
        format!(
            "[global]\nstate_dir = \"{}\"\ndrain_timeout = \"5s\"\n\n\
             [[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\nmax_connections = {max}\n{}",
            dir.path().join("state").display(),
            pki::files_cert_toml(&files)
        )
    };
    let first = text(4);
    let proxy = Proxy::start_in(&first, tempfile::tempdir().unwrap())
        .await
        .unwrap();
    let addr = proxy.addr("tcp");
    let config = client::client_config(pki.roots(), &[]);
    let mut full = Vec::new();
    for _ in 0..4 {
        let mut c = client::connect(addr, config.clone()).await.unwrap();
        echo(&mut c).await;
        full.push(c);
    }
    proxy
        .running()
        .reload(parse(proxy.dir.path(), &text(1)))
        .await
        .unwrap();
    for mut c in full {
        c.shutdown().await.unwrap();
    }
    crate::common::eventually("the four connections closed", || {
        proxy.running().active_connections() == 0
    })
    .await;

    // One connection fits; a second waits in the accept queue.
    let mut one = client::connect(addr, config.clone()).await.unwrap();
    echo(&mut one).await;
    let second = tokio::spawn(client::connect(addr, config.clone()));
    let served = tokio::time::timeout(Duration::from_millis(700), async {
        while !second.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        served.is_err(),
        "a second connection was served with max_connections = 1 (active: {})",
        proxy.running().active_connections()
    );
    // And it gets in once the first leaves.
    one.shutdown().await.unwrap();
    drop(one);
    let mut second = within("second connection after the first left", second)
        .await
        .unwrap()
        .unwrap();
    echo(&mut second).await;

    // Raising it again gives room at once.
    proxy
        .running()
        .reload(parse(proxy.dir.path(), &text(3)))
        .await
        .unwrap();
    let mut more = Vec::new();
    for _ in 0..2 {
        let mut c = within(
            "room after raising the cap",
            client::connect(addr, config.clone()),
        )
        .await
        .unwrap();
        echo(&mut c).await;
        more.push(c);
    }
    assert_eq!(proxy.running().active_connections(), 3);
}

async fn echo(stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin)) {
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within("echo", stream.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"ping");
}

/// The line of `text` (1-based) holding `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .expect("needle in text")
        + 1
}

/// A file a reload (or the start) cannot use is reported like any other
/// configuration error: at the file, line and key that name it, so the
/// operator of a config with many listeners goes straight to it.
#[tokio::test]
async fn unusable_files_on_reload_are_reported_at_their_line_and_key() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    pki.write_server(dir.path(), "server");
    std::fs::write(dir.path().join("garbage.pem"), "not a certificate\n").unwrap();
    let b = Backends {
        http: backend::http().await,
        ws: backend::websocket_echo().await,
        tcp: backend::tcp_echo().await,
    };
    let ports = free_ports();
    let text = config_text(dir.path(), ports, &b, 300, "24h", "");
    let proxy = Proxy::start_in(&text, dir).await.unwrap();
    let running = proxy.running();
    let path = proxy.dir.path().join("sheath.toml");

    // The key file of the third listener ("tcp", listener[2]) is missing.
    let good = config_text(proxy.dir.path(), ports, &b, 300, "24h", "");
    let at = good.rfind("server.key").unwrap();
    let mut broken = good.clone();
    broken.replace_range(at..at + "server.key".len(), "missing.key");
    let err = running
        .reload(Config::from_toml(&path, &broken).unwrap())
        .await
        .unwrap_err()
        .to_string();
    let line = line_of(&broken, "missing.key");
    let want = format!("{}:{line}:", path.display());
    assert!(err.starts_with(&want), "want it at {want}: {err}");
    assert!(err.contains("key `listener[2].cert.key`"), "{err}");
    assert!(err.contains("missing.key"), "{err}");

    // A certificate file that holds no certificate: its `cert` key.
    let at = good.rfind("server.pem").unwrap();
    let mut broken = good.clone();
    broken.replace_range(at..at + "server.pem".len(), "garbage.pem");
    let err = running
        .reload(Config::from_toml(&path, &broken).unwrap())
        .await
        .unwrap_err()
        .to_string();
    let line = line_of(&broken, "garbage.pem");
    assert!(
        err.starts_with(&format!("{}:{line}:", path.display())),
        "want it at line {line}: {err}"
    );
    assert!(err.contains("key `listener[2].cert.cert`"), "{err}");

    // A client CA bundle that is not there.
    let extra = "[listener.client_auth]\nmode = \"require\"\nca = \"no-such-ca.pem\"\n";
    let broken = config_text(proxy.dir.path(), ports, &b, 300, "24h", extra);
    let err = running
        .reload(Config::from_toml(&path, &broken).unwrap())
        .await
        .unwrap_err()
        .to_string();
    let line = line_of(&broken, "no-such-ca.pem");
    assert!(
        err.starts_with(&format!("{}:{line}:", path.display())),
        "want it at line {line}: {err}"
    );
    assert!(err.contains("key `listener[2].client_auth.ca`"), "{err}");
    assert_eq!(running.reloads.failed.load(Ordering::Relaxed), 3);
}

/// The same at startup, from a file and from flags.
#[tokio::test]
async fn unusable_files_at_startup_are_reported_at_their_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
                [listener.cert]\nsource = \"files\"\ncert = \"absent.pem\"\nkey = \"absent.key\"\n";
    let err = Proxy::start_in(text, dir).await.unwrap_err().to_string();
    // write_config puts a [global] table and a blank line, four lines,
    // before the text.
    assert!(
        err.contains("sheath.toml:11:8: key `listener[0].cert.cert`"),
        "{err}"
    );
    assert!(err.contains("absent.pem"), "{err}");
}

/// A listener removed by a reload gives its port back by the time the
/// reload returns: a client connecting then is refused (not accepted and
/// reset later), and a reload right after can bind the port again (a
/// listener moved away and back, or removed and restored).
#[tokio::test]
async fn a_removed_listeners_port_is_free_when_the_reload_returns() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let upstream = backend::tcp_echo().await;
    let [keep, gone, _] = free_ports();
    let listener = |name: &str, port: u16| {
        format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n{}\n",
            pki::files_cert_toml(&files)
        )
    };
    let head = format!(
        "[global]\nstate_dir = \"{}\"\ndrain_timeout = \"5s\"\n\n",
        dir.path().join("state").display()
    );
    let both = format!("{head}{}{}", listener("keep", keep), listener("gone", gone));
    let one = format!("{head}{}", listener("keep", keep));
    let proxy = Proxy::start_in(&both, tempfile::tempdir().unwrap())
        .await
        .unwrap();
    let running = proxy.running();
    let config = client::client_config(pki.roots(), &[]);
    for round in 0..20 {
        running.reload(parse(proxy.dir.path(), &one)).await.unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{gone}").parse().unwrap();
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            other => {
                panic!("round {round}: removed listener's port still takes connections: {other:?}")
            }
        }
        running
            .reload(parse(proxy.dir.path(), &both))
            .await
            .unwrap_or_else(|e| panic!("round {round}: the port cannot be bound again: {e}"));
        let mut c = client::connect(addr, config.clone()).await.unwrap();
        echo(&mut c).await;
    }
}

/// A reload that moves the state directory (onto a volume, say) moves the
/// local CA with it: every local-CA listener then serves a certificate of
/// the CA in the new directory, the one `sheath ca export` shows, not only
/// listeners whose certificate settings changed too.
#[tokio::test]
async fn a_new_state_dir_gives_unchanged_local_ca_listeners_the_new_ca() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = backend::tcp_echo().await;
    let [port, _, _] = free_ports();
    let text = |state: &str| {
        format!(
            "[global]\nstate_dir = \"{}\"\ndrain_timeout = \"5s\"\n\n\
             [[listener]]\nname = \"a\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n\
             [listener.cert]\nsource = \"local_ca\"\nnames = [\"localhost\"]\n",
            dir.path().join(state).display()
        )
    };
    let proxy = Proxy::start_in(&text("old"), tempfile::tempdir().unwrap())
        .await
        .unwrap();
    proxy
        .running()
        .reload(parse(proxy.dir.path(), &text("new")))
        .await
        .unwrap();
    let ca = std::fs::read_to_string(dir.path().join("new/local-ca/ca.pem")).unwrap();
    assert_eq!(
        proxy.running().local_ca().unwrap().cert_pem(),
        ca,
        "the running CA is the new directory's"
    );
    let config = client::client_config(pki::roots_from_pem(&ca), &[]);
    let mut c = client::connect(proxy.addr("a"), config)
        .await
        .expect("the served certificate is issued by the new directory's CA");
    echo(&mut c).await;
}

/// An HTTP-01 listener that cannot be bound is reported at the line and
/// key that name it, at the start and on a reload, like every other bind
/// error; it named only the address, so with several ACME certificates
/// the operator had to search for the one that asked for it.
#[tokio::test]
async fn an_http01_bind_error_names_its_line_and_key() {
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = blocker.local_addr().unwrap();
    let acme = |http01: &str| {
        format!(
            "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
             [listener.cert]\nsource = \"acme\"\nnames = [\"app.test\"]\ndirectory = \"https://127.0.0.1:9/dir\"\n\
             challenge = \"http-01\"\nhttp01_bind = \"{http01}\"\nretry_min = \"1h\"\n"
        )
    };
    // At the start. write_config puts four lines before the text.
    let err = Proxy::start_in(&acme(&busy.to_string()), tempfile::tempdir().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sheath.toml:14:15: key `listener[0].cert.http01_bind`"),
        "{err}"
    );
    assert!(err.contains(&format!("cannot bind {busy}")), "{err}");

    // On a reload, for an SNI certificate's.
    let proxy = Proxy::start(&acme("127.0.0.1:0")).await;
    let path = proxy.dir.path().join("sheath.toml");
    let text = format!(
        "{}[[listener.sni_cert]]\nsource = \"acme\"\nnames = [\"api.test\"]\ndirectory = \"https://127.0.0.1:9/dir\"\n\
         challenge = \"http-01\"\nhttp01_bind = \"{busy}\"\n",
        std::fs::read_to_string(&path).unwrap()
    );
    let err = proxy
        .running()
        .reload(Config::from_toml(&path, &text).unwrap())
        .await
        .unwrap_err()
        .to_string();
    let line = line_of(&text, &busy.to_string());
    assert!(
        err.starts_with(&format!(
            "{}:{line}:15: key `listener[0].sni_cert[0].http01_bind`",
            path.display()
        )),
        "{err}"
    );
    assert!(err.contains(&format!("cannot bind {busy}")), "{err}");
}

/// A listener moved between an address and the wildcard on one port
/// (127.0.0.1:P to 0.0.0.0:P) cannot be moved in one reload: the new
/// socket is bound while the old one still listens, and the kernel does
/// not let a wildcard and a specific address share a listening port. The
/// error said only "address in use", about a port nothing else held; it
/// says why, and how to do it in two steps.
#[tokio::test]
async fn moving_a_listener_to_the_wildcard_on_its_port_says_how_to_do_it() {
    let [port, other, _] = free_ports();
    let listener = |bind: &str| {
        format!("[[listener]]\nname = \"web\"\nbind = \"{bind}\"\nupstream = \"127.0.0.1:9\"\nmode = \"tcp\"\n")
    };
    let proxy = Proxy::start(&listener(&format!("127.0.0.1:{port}"))).await;
    let running = proxy.running();
    let path = proxy.dir.path().join("sheath.toml");
    let head = format!(
        "[global]\nstate_dir = \"{}\"\ndrain_timeout = \"5s\"\n\n",
        proxy.dir.path().join("state").display()
    );
    let listener = |bind: &str| format!("{head}{}", listener(bind));
    let moved = listener(&format!("0.0.0.0:{port}"));
    let err = running
        .reload(Config::from_toml(&path, &moved).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "{}:{}:8: key `listener[0].bind`",
            path.display(),
            line_of(&moved, "0.0.0.0")
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "127.0.0.1:{port} of the running listener `web` holds the port until the reload is applied"
        )),
        "{err}"
    );
    assert!(
        err.contains("reload twice: first to another port, then to"),
        "{err}"
    );
    // The two steps the message gives work.
    running
        .reload(Config::from_toml(&path, &listener(&format!("0.0.0.0:{other}"))).unwrap())
        .await
        .unwrap();
    running
        .reload(Config::from_toml(&path, &moved).unwrap())
        .await
        .unwrap();
    assert_eq!(proxy.addr("web").port(), port);
}

/// A reload that points a listener at another upstream must reach the
/// clients that keep their connection open, as gRPC channels, browsers
/// and keep-alive pools do. Each connection kept the settings it was
/// accepted with for its whole life, so their later requests still went
/// to the old upstream, for good: found with a grpcio client whose calls
/// all failed with `502` once the old server stopped, while the upstream
/// the reload named was up. Now a connection opened before such a reload
/// finishes its requests in flight on the old upstream and closes
/// (HTTP/2: GOAWAY), and the client's next connection reaches the new one.
#[tokio::test]
async fn a_reload_that_moves_the_upstream_closes_connections_opened_before() {
    use crate::common::backend::{CountingBackend, Speaks};
    use crate::common::eventually;

    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let old = CountingBackend::speaking(Speaks::Both).await;
    let new = CountingBackend::speaking(Speaks::Both).await;
    let state = dir.path().join("state");
    let config = |upstream: SocketAddr| {
        format!(
            "[global]\nstate_dir = \"{}\"\ndrain_timeout = \"5s\"\n\n[[listener]]\nname = \"api\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nupstream_protocol = \"auto\"\n{}\n",
            state.display(),
            pki::files_cert_toml(&files)
        )
    };
    let text = config(old.addr);
    let path = dir.path().join("sheath.toml");
    let proxy = Proxy::start_in(&text, dir).await.unwrap();
    let addr = proxy.addr("api");

    let mut h2 = client::h2(addr, pki.roots()).await;
    let mut h1 = client::h1(addr, pki.roots()).await;
    for status in [
        h2.send_request(get_h2("/")).await.unwrap().status(),
        h1.send_request(get("/")).await.unwrap().status(),
    ] {
        assert_eq!(status, 200);
    }
    assert_eq!(old.requests(), 2);
    // A response still arriving when the reload comes (a download, a
    // gRPC server stream).
    let dripping = h2
        .send_request(get_h2("/drip?chunks=20&size=1024&ms=50"))
        .await
        .unwrap();

    let moved = Config::from_toml(&path, &config(new.addr)).unwrap();
    proxy.running().reload(moved).await.unwrap();

    let body = within("the response in flight", dripping.into_body().collect())
        .await
        .expect("the response in flight ends whole")
        .to_bytes();
    assert_eq!(body.len(), 20 * 1024);
    eventually("the connections opened before the reload close", || {
        h2.is_closed() && h1.is_closed()
    })
    .await;
    assert_eq!(old.requests(), 3, "nothing more went to the old upstream");

    // Their clients' next connections reach the new upstream.
    let mut h2 = client::h2(addr, pki.roots()).await;
    let mut h1 = client::h1(addr, pki.roots()).await;
    assert_eq!(h2.send_request(get_h2("/")).await.unwrap().status(), 200);
    assert_eq!(h1.send_request(get("/")).await.unwrap().status(), 200);
    assert_eq!(new.requests(), 2);
    assert_eq!(old.requests(), 3);

    // A reload that keeps the upstream leaves the connections open.
    let same = Config::from_toml(
        &path,
        &config(new.addr).replace("drain_timeout = \"5s\"", "drain_timeout = \"6s\""),
    )
    .unwrap();
    proxy.running().reload(same).await.unwrap();
    assert_eq!(h2.send_request(get_h2("/")).await.unwrap().status(), 200);
    assert_eq!(h1.send_request(get("/")).await.unwrap().status(), 200);
    assert!(!h2.is_closed() && !h1.is_closed());
}
