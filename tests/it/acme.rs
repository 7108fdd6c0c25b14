//! ACME end to end against Pebble: issuance over TLS-ALPN-01 and HTTP-01,
//! renewal under load, restart reuse, outages with backoff, bootstrap by
//! fingerprint with external account binding, export and hook.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::admin::{admin_for, call, value};
use crate::common::acme_front::{AcmeFront, Fault};
use crate::common::client::{client_config, connect_as};
use crate::common::pebble::{free_port, Pebble, PebbleOptions};
use crate::common::pki::roots_from_pem;
use crate::common::{backend, within, Proxy};
use sheath::cert::CertStatus;

const NAME: &str = "app.test";

pub(crate) struct Setup {
    pub pebble: Pebble,
    pub port: u16,
}

pub(crate) async fn pebble(
    validity_secs: Option<u64>,
    http: bool,
    eab: Option<(&str, &str)>,
    nonce_reject: u8,
) -> Option<Setup> {
    let port = free_port();
    let other = free_port();
    let opts = PebbleOptions {
        // The validator connects where sheath listens.
        tls_port: if http { other } else { port },
        http_port: if http { port } else { other },
        validity_secs,
        eab: eab.map(|(k, v)| (k.to_string(), v.to_string())),
        nonce_reject_percent: nonce_reject,
    };
    let pebble = Pebble::start(opts).await?;
    Some(Setup { pebble, port })
}

pub(crate) fn listener_toml(
    setup: &Setup,
    upstream: std::net::SocketAddr,
    cert_extra: &str,
) -> String {
    listener_toml_on(setup.port, setup, upstream, cert_extra)
}

fn listener_toml_on(
    port: u16,
    setup: &Setup,
    upstream: std::net::SocketAddr,
    cert_extra: &str,
) -> String {
    format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n[listener.cert]\nsource = \"acme\"\nnames = [\"{NAME}\"]\ndirectory = \"{dir}\"\ncontact = [\"mailto:ops@app.test\"]\nretry_min = \"200ms\"\nretry_max = \"2s\"\n{cert_extra}\n",
        dir = setup.pebble.directory,
    )
}

pub(crate) fn ca_root(setup: &Setup) -> String {
    format!(
        "ca_root = \"{}\"\n",
        setup.pebble.api_root_pem_path.display()
    )
}

pub(crate) async fn wait_installs(status: &arc_swap::ArcSwap<CertStatus>, n: u64, pebble: &Pebble) {
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        while status.load().installs < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if result.is_err() {
        panic!(
            "no certificate #{n}; status {:?}\n{}",
            status.load(),
            pebble.log_tail()
        );
    }
}

/// A handshake as `app.test`, verified against Pebble's issuing root, and
/// an echo round trip through the proxy.
pub(crate) async fn verified_roundtrip(
    addr: std::net::SocketAddr,
    root_pem: &str,
) -> std::io::Result<String> {
    let config = client_config(roots_from_pem(root_pem), &[]);
    let mut tls = connect_as(addr, config, NAME).await?;
    tls.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"ping");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    Ok(sheath::cert::CertInfo::from_der(&leaf).unwrap().serial)
}

#[tokio::test]
async fn tls_alpn_01_issuance_then_renewal_without_failed_handshakes() {
    let Some(setup) = pebble(Some(12), false, None, 0).await else {
        return;
    };
    let upstream = backend::tcp_echo().await;
    let proxy = Proxy::start(&listener_toml(
        &setup,
        upstream,
        &format!("{}renew_ratio = 0.3\n", ca_root(&setup)),
    ))
    .await;
    let handle = proxy.running().listener("l").unwrap();
    let status = handle.certs[0].status.clone();
    assert!(!status.load().valid_now(), "no certificate before issuance");
    wait_installs(&status, 1, &setup.pebble).await;
    let root = setup.pebble.issuing_root_pem().await;
    let addr = proxy.addr("l");
    let first = verified_roundtrip(addr, &root).await.unwrap();

    // Clients keep connecting while the certificate is renewed.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let client = {
        let (stop, failed, ok, root) = (stop.clone(), failed.clone(), ok.clone(), root.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match verified_roundtrip(addr, &root).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    wait_installs(&status, 2, &setup.pebble).await;
    let second = verified_roundtrip(addr, &root).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    assert_ne!(first, second, "renewal must bring a new serial");
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 0);
    let s = status.load();
    let current = s.current.as_ref().unwrap();
    assert!(current.names.iter().any(|n| n == NAME));
    assert!(s.renew_at.unwrap() < current.not_after);
}

/// Clients that came while the first certificate was being ordered found
/// none, and each woke the manager to renew "now". That wake outlived the
/// order: the certificate just installed was ordered again at once.
#[tokio::test]
async fn handshakes_during_the_first_order_do_not_order_a_second_certificate() {
    let Some(setup) = pebble(None, false, None, 0).await else {
        return;
    };
    let root = setup.pebble.issuing_root_pem().await;
    let upstream = backend::tcp_echo().await;
    let proxy = Proxy::start(&listener_toml(&setup, upstream, &ca_root(&setup))).await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    let addr = proxy.addr("l");
    let mut refused = 0;
    within("the first certificate", async {
        while status.load().installs == 0 {
            if verified_roundtrip(addr, &root).await.is_err() {
                refused += 1;
            }
        }
    })
    .await;
    assert!(refused > 0, "no handshake came before the certificate");
    // A second order takes Pebble well under a second here; give it two.
    let watched = std::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(2) {
        verified_roundtrip(addr, &root).await.unwrap();
        let s = status.load();
        assert_eq!(
            s.installs,
            1,
            "a second certificate {:?} after {:?}",
            s.current.as_ref().map(|c| &c.serial),
            watched.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn http_01_issuance_with_nonce_rejections_and_redirects() {
    // 15% of nonces rejected: the client must retry badNonce.
    let Some(setup) = pebble(None, true, None, 15).await else {
        return;
    };
    let upstream = backend::tcp_echo().await;
    let tls_port = free_port();
    let toml = listener_toml_on(
        tls_port,
        &setup,
        upstream,
        &format!(
            "{}challenge = \"http-01\"\nhttp01_bind = \"127.0.0.1:{}\"\n",
            ca_root(&setup),
            setup.port
        ),
    );
    let proxy = Proxy::start(&toml).await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    wait_installs(&status, 1, &setup.pebble).await;
    let root = setup.pebble.issuing_root_pem().await;
    verified_roundtrip(proxy.addr("l"), &root).await.unwrap();

    // Port 80 only answers challenges and redirects the rest to https.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", setup.port))
        .await
        .unwrap();
    plain
        .write_all(b"GET /login?next=%2F HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    within("redirect", plain.read_to_string(&mut response))
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 301"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("location: https://app.test/login?next=%2f"),
        "{response}"
    );
}

#[tokio::test]
async fn restart_reuses_account_and_cached_certificate_without_the_ca() {
    let Some(mut setup) = pebble(None, false, None, 0).await else {
        return;
    };
    let upstream = backend::tcp_echo().await;
    let toml = listener_toml(
        &setup,
        upstream,
        &format!("{}key_type = \"ecdsa-p384\"\n", ca_root(&setup)),
    );
    let mut proxy = Proxy::start(&toml).await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    wait_installs(&status, 1, &setup.pebble).await;
    let serial = status.load().current.as_ref().unwrap().serial.clone();
    let root = setup.pebble.issuing_root_pem().await;
    proxy.shutdown().await;

    let state = proxy.dir.path().join("state/acme");
    let account = find_file(&state, "account.json").expect("account saved");
    let account_before = std::fs::read(&account).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&account).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let key = find_file(&state, "key.pem").expect("certificate key saved");
    let chain = std::fs::read(find_file(&state, "fullchain.pem").unwrap()).unwrap();
    let leaf = sheath::cert::parse_chain_pem("leaf", &chain)
        .unwrap()
        .remove(0);
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(
        parsed.public_key().parsed().unwrap().key_size(),
        384,
        "key_type honoured"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // With the CA gone, a restart still serves the cached certificate at once.
    setup.pebble.stop();
    let proxy = Proxy::start_in(&toml, proxy.dir).await.unwrap();
    let status = proxy.running().listener("l").unwrap().cert_status();
    assert_eq!(status.installs, 1);
    assert_eq!(status.current.as_ref().unwrap().serial, serial);
    assert_eq!(
        verified_roundtrip(proxy.addr("l"), &root).await.unwrap(),
        serial
    );
    assert_eq!(
        std::fs::read(&account).unwrap(),
        account_before,
        "account was replaced"
    );
}

/// sheath with one ACME certificate due for renewal 6 s after it is
/// issued (60 s lifetime, `renew_ratio` 0.1), once that first certificate
/// is installed; `directory` replaces Pebble's own (a front for it).
struct Renewing {
    proxy: Proxy,
    status: Arc<arc_swap::ArcSwap<CertStatus>>,
    /// Pebble's issuing root.
    root: String,
}

async fn renewing(setup: &Setup, directory: Option<&str>) -> Renewing {
    let toml = listener_toml(
        setup,
        backend::tcp_echo().await,
        &format!("{}renew_ratio = 0.1\n", ca_root(setup)),
    );
    let toml = match directory {
        Some(directory) => toml.replace(&setup.pebble.directory, directory),
        None => toml,
    };
    let proxy = Proxy::start(&toml).await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    wait_installs(&status, 1, &setup.pebble).await;
    let root = setup.pebble.issuing_root_pem().await;
    Renewing {
        proxy,
        status,
        root,
    }
}

/// Once the first renewal has failed: how many certificates were installed
/// and the serial being served. On a slow machine a renewal may succeed
/// before the failures are set up; from the first failure on, attempts
/// follow one another and only a success installs, so these must hold
/// until the failures are lifted.
async fn at_first_failure(status: &arc_swap::ArcSwap<CertStatus>) -> (u64, String) {
    failures_reach(status, 1).await;
    let s = status.load();
    (s.installs, s.current.as_ref().unwrap().serial.clone())
}

/// Wait until `n` renewals in a row have failed.
async fn failures_reach(status: &arc_swap::ArcSwap<CertStatus>, n: u32) {
    within(&format!("{n} failed renewals"), async {
        while status.load().consecutive_failures < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn ca_outage_keeps_the_old_certificate_and_backs_off() {
    let Some(mut setup) = pebble(Some(60), false, None, 0).await else {
        return;
    };
    let Renewing {
        proxy,
        status,
        root,
    } = renewing(&setup, None).await;
    setup.pebble.stop();
    let (installs, serial) = at_first_failure(&status).await;

    // Watch the failures pile up with growing gaps.
    let mut gaps = Vec::new();
    let mut seen = 0;
    within("three failed renewals", async {
        while gaps.len() < 3 {
            let s = status.load();
            if s.consecutive_failures > seen {
                seen = s.consecutive_failures;
                let gap = s
                    .next_retry
                    .unwrap()
                    .duration_since(s.last_failure.unwrap())
                    .unwrap();
                gaps.push(gap);
                assert!(s.last_error.as_deref().is_some_and(|e| !e.is_empty()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        gaps[1] > gaps[0] && gaps[2] > gaps[1],
        "backoff does not grow: {gaps:?}"
    );
    assert_eq!(
        verified_roundtrip(proxy.addr("l"), &root).await.unwrap(),
        serial
    );
    assert_eq!(status.load().installs, installs);

    // The CA comes back (with a new root and no memory of the account):
    // sheath registers again and renews.
    setup.pebble.restart().await;
    wait_installs(&status, installs + 1, &setup.pebble).await;
    let new_root = setup.pebble.issuing_root_pem().await;
    assert_ne!(
        verified_roundtrip(proxy.addr("l"), &new_root)
            .await
            .unwrap(),
        serial
    );
    assert_eq!(status.load().consecutive_failures, 0);
}

/// A failed renewal's backoff wait never runs past the served
/// certificate's end. With `retry_max` long next to what is left of the
/// certificate, a CA back within the wait was asked again only when the
/// wait was over, and clients were refused an expired certificate all the
/// while: the next attempt is due when the certificate expires at the
/// latest.
#[tokio::test]
async fn a_retry_wait_ends_when_the_served_certificate_does() {
    let Some(mut setup) = pebble(Some(12), false, None, 0).await else {
        return;
    };
    // Renewal ~4 s after issuance; then steps of 30 and 60 s.
    let toml = listener_toml(
        &setup,
        backend::tcp_echo().await,
        &format!("{}renew_ratio = 0.34\n", ca_root(&setup)),
    )
    .replace("retry_min = \"200ms\"", "retry_min = \"30s\"")
    .replace("retry_max = \"2s\"", "retry_max = \"60s\"");
    let proxy = Proxy::start(&toml).await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    wait_installs(&status, 1, &setup.pebble).await;
    setup.pebble.stop();
    let (installs, _) = at_first_failure(&status).await;
    let s = status.load_full();
    let not_after = s.current.as_ref().unwrap().not_after;
    let retry = s.next_retry.unwrap();
    assert!(
        retry <= not_after,
        "next attempt {:?} after the certificate's end",
        retry.duration_since(not_after).unwrap()
    );

    // The CA is back before the certificate ends: the attempt at its end
    // renews it.
    setup.pebble.restart().await;
    within("the renewal as the certificate ends", async {
        while status.load().installs == installs {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(status.load().consecutive_failures, 0);
    drop(proxy);
}

/// `consecutive_failures` as the metrics endpoint reports it.
async fn failures_metric(admin: std::net::SocketAddr) -> f64 {
    let (_, scrape) = call(admin, "GET", "/metrics").await;
    value(
        &scrape,
        "sheath_certificate_renewal_consecutive_failures{listener=\"l\",cert=\"default\",source=\"acme\"}",
    )
}

/// A CA failing a renewal the ways production CAs do, through a front
/// that answers new orders itself: server errors are retried with growing
/// gaps, a rate limit's `Retry-After` is waited out where the backoff step
/// is shorter, and all the while the old certificate serves and the
/// metrics count the failures.
#[tokio::test]
async fn server_errors_back_off_and_rate_limits_are_waited_out() {
    let Some(setup) = pebble(Some(60), false, None, 0).await else {
        return;
    };
    let front = AcmeFront::start(&setup.pebble).await;
    // retry_min 200ms, retry_max 2s: steps of 200, 400 and 800 ms.
    let Renewing {
        proxy,
        status,
        root,
    } = renewing(&setup, Some(&front.directory)).await;
    let admin = admin_for(&proxy).await;

    // The next renewal (due 3-6 s after issuance) sees three orders fail.
    let server_error = Fault {
        path: "/order-plz",
        status: 500,
        problem: "serverInternal",
        retry_after_secs: None,
    };
    let rate_limited = Fault {
        path: "/order-plz",
        status: 429,
        problem: "rateLimited",
        retry_after_secs: Some(3),
    };
    front.inject([server_error.clone(), server_error, rate_limited]);
    let (installs, serial) = at_first_failure(&status).await;
    failures_reach(&status, 3).await;
    let s = status.load_full();
    let error = s.last_error.as_deref().unwrap_or_default();
    assert!(error.contains("rateLimited"), "{error}");
    let wait = s
        .next_retry
        .unwrap()
        .duration_since(s.last_failure.unwrap())
        .unwrap();
    assert!(
        wait >= Duration::from_millis(2900),
        "the next attempt is {wait:?} after a 429 asking for 3 s"
    );
    assert_eq!(
        verified_roundtrip(proxy.addr("l"), &root).await.unwrap(),
        serial
    );
    assert_eq!(failures_metric(admin).await, 3.0);
    assert_eq!(status.load().installs, installs);

    wait_installs(&status, installs + 1, &setup.pebble).await;
    let orders = front.hits("/order-plz");
    let statuses: Vec<u16> = orders.iter().map(|h| h.status).collect();
    // Every order before the faults succeeded, one per install.
    let faulted = orders.len() - 4;
    assert_eq!(faulted as u64, installs, "{orders:?}");
    assert!(
        statuses[faulted..] == [500, 500, 429, 201]
            && statuses[..faulted].iter().all(|&s| s == 201),
        "{orders:?}"
    );
    let gaps: Vec<Duration> = orders[faulted..]
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect();
    assert!(
        gaps[0] >= Duration::from_millis(200) && gaps[1] >= Duration::from_millis(400),
        "server errors are not retried with growing gaps: {gaps:?}"
    );
    assert!(
        gaps[2] >= Duration::from_millis(2900),
        "the CA was asked again {:?} after its Retry-After of 3 s",
        gaps[2]
    );
    assert_ne!(
        verified_roundtrip(proxy.addr("l"), &root).await.unwrap(),
        serial
    );
    assert_eq!(status.load().consecutive_failures, 0);
    assert_eq!(failures_metric(admin).await, 0.0);
}

/// A challenge the CA cannot validate (its DNS sends the validator to an
/// address where sheath does not listen) fails the renewal without
/// touching the served certificate; once the name resolves again, the
/// next attempt renews.
#[tokio::test]
async fn an_invalid_challenge_keeps_the_old_certificate_until_validation_succeeds() {
    let Some(setup) = pebble(Some(60), false, None, 0).await else {
        return;
    };
    let Renewing {
        proxy,
        status,
        root,
    } = renewing(&setup, None).await;
    let admin = admin_for(&proxy).await;

    setup.pebble.resolve(NAME, "127.0.0.2").await;
    let (installs, serial) = at_first_failure(&status).await;
    failures_reach(&status, 2).await;
    let s = status.load_full();
    let error = s.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("tls-alpn-01") && error.contains("127.0.0.2"),
        "{error}"
    );
    assert_eq!(s.installs, installs);
    assert_eq!(
        verified_roundtrip(proxy.addr("l"), &root).await.unwrap(),
        serial
    );
    assert!(failures_metric(admin).await >= 2.0);

    setup.pebble.clear_resolve(NAME).await;
    wait_installs(&status, installs + 1, &setup.pebble).await;
    assert_ne!(
        verified_roundtrip(proxy.addr("l"), &root).await.unwrap(),
        serial
    );
    assert_eq!(failures_metric(admin).await, 0.0);
}

#[tokio::test]
async fn bootstrap_by_fingerprint_with_external_account_binding_and_export() {
    let kid = "kid-1";
    let hmac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    let Some(setup) = pebble(None, false, Some((kid, hmac)), 0).await else {
        return;
    };
    let upstream = backend::tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("export");
    let hook_log = dir.path().join("hook.log");
    let extra = format!(
        "ca_fingerprint = \"{}\"\neab_kid = \"{kid}\"\neab_hmac_key = \"{hmac}\"\n[listener.cert.export]\ndir = \"{}\"\non_renew = \"echo \\\"$SHEATH_LISTENER $SHEATH_CERT $SHEATH_CERT_SERIAL\\\" >> {}\"\n",
        setup.pebble.api_ca_sha256,
        export.display(),
        hook_log.display()
    );
    let proxy = Proxy::start_in(&listener_toml(&setup, upstream, &extra), dir)
        .await
        .unwrap();
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    wait_installs(&status, 1, &setup.pebble).await;
    let serial = status.load().current.as_ref().unwrap().serial.clone();

    // The pinned root is the API CA whose fingerprint was configured.
    let pinned = find_file(&proxy.dir.path().join("state/acme"), "root.pem").expect("root pinned");
    assert_eq!(
        std::fs::read_to_string(pinned).unwrap().trim(),
        setup.pebble.api_root_pem.trim()
    );

    // Export and hook.
    within("hook ran", async {
        while !std::fs::read_to_string(&hook_log).is_ok_and(|l| l.contains(&serial)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(&hook_log).unwrap().trim(),
        format!("l default {serial}")
    );
    let chain = std::fs::read_to_string(export.join("fullchain.pem")).unwrap();
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(export.join("key.pem"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    let exported =
        sheath::cert::files::load(&export.join("fullchain.pem"), &export.join("key.pem")).unwrap();
    assert_eq!(exported.1.serial, serial);
    assert!(
        chain.matches("BEGIN CERTIFICATE").count() >= 2,
        "full chain exported"
    );
}

#[tokio::test]
async fn bootstrap_command_pins_only_a_matching_root() {
    let Some(setup) = pebble(None, false, None, 0).await else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_sheath");
    let out = tokio::process::Command::new(bin)
        .args([
            "bootstrap",
            "--ca-url",
            &setup.pebble.directory,
            "--fingerprint",
            &setup.pebble.api_ca_sha256,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        setup.pebble.api_root_pem.trim()
    );

    // --out with a bare file name: written (atomically) into the child's
    // working directory, which is all an operator typing `--out root.pem`
    // expects.
    let cwd = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(bin)
        .current_dir(cwd.path())
        .args([
            "bootstrap",
            "--ca-url",
            &setup.pebble.directory,
            "--fingerprint",
            &setup.pebble.api_ca_sha256,
            "--out",
            "root.pem",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = std::fs::read_to_string(cwd.path().join("root.pem")).unwrap();
    assert_eq!(saved.trim(), setup.pebble.api_root_pem.trim());

    let wrong = "00".repeat(32);
    let out = tokio::process::Command::new(bin)
        .args([
            "bootstrap",
            "--ca-url",
            &setup.pebble.directory,
            "--fingerprint",
            &wrong,
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing to trust"), "{stderr}");
    assert!(out.stdout.is_empty());
}

fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

#[tokio::test]
async fn tls_alpn_01_works_on_a_listener_that_requires_client_certificates() {
    let Some(setup) = pebble(None, false, None, 0).await else {
        return;
    };
    let upstream = backend::tcp_echo().await;
    let clients = crate::common::TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let client_ca = clients.write_ca(dir.path());
    let toml = format!(
        "{}[listener.client_auth]\nmode = \"require\"\nca = \"{}\"\n",
        listener_toml(&setup, upstream, &ca_root(&setup)),
        client_ca.display()
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    // The validator presents no client certificate; issuance still works.
    wait_installs(&status, 1, &setup.pebble).await;
    let root = setup.pebble.issuing_root_pem().await;
    let addr = proxy.addr("l");
    // Ordinary clients still need a certificate.
    assert!(verified_roundtrip(addr, &root).await.is_err());
    let cert = clients.client(&crate::common::pki::ClientSpec::new("svc"));
    let mut tls = connect_as(addr, cert.rustls_config(roots_from_pem(&root), &[]), NAME)
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within("echo", tls.read_exact(&mut buf)).await.unwrap();
}

#[tokio::test]
async fn a_name_written_with_its_trailing_dot_is_ordered_and_served() {
    let Some(setup) = pebble(None, false, None, 0).await else {
        return;
    };
    let upstream = backend::tcp_echo().await;
    // Pebble, like Let's Encrypt, refuses an identifier ending in a dot.
    let toml = listener_toml(&setup, upstream, &ca_root(&setup))
        .replace(&format!("names = [\"{NAME}\"]"), "names = [\"App.Test.\"]");
    assert!(toml.contains("App.Test."));
    let proxy = Proxy::start(&toml).await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    wait_installs(&status, 1, &setup.pebble).await;
    let root = setup.pebble.issuing_root_pem().await;
    verified_roundtrip(proxy.addr("l"), &root).await.unwrap();
    assert_eq!(status.load().current.as_ref().unwrap().names, [NAME]);
}

#[tokio::test]
async fn certificates_from_one_server_register_one_account() {
    let Some(setup) = pebble(None, false, None, 0).await else {
        return;
    };
    let upstream = backend::tcp_echo().await;
    let sni = |name: &str| {
        format!(
            "[[listener.sni_cert]]\nsource = \"acme\"\nnames = [\"{name}\"]\ndirectory = \"{}\"\n{}retry_min = \"200ms\"\nretry_max = \"2s\"\n",
            setup.pebble.directory,
            ca_root(&setup)
        )
    };
    let toml = format!(
        "{}{}{}",
        listener_toml(&setup, upstream, &ca_root(&setup)),
        sni("www.app.test"),
        sni("api.app.test")
    );
    let proxy = Proxy::start(&toml).await;
    let handle = proxy.running().listener("l").unwrap();
    for cert in &handle.certs {
        wait_installs(&cert.status, 1, &setup.pebble).await;
    }
    assert_eq!(registrations(&setup), 1);
    let state = proxy.dir.path().join("state/acme");
    let saved = std::fs::read_to_string(find_file(&state, "account.json").unwrap()).unwrap();
    assert!(saved.contains("\"id\""), "{saved}");
}

/// Registrations Pebble has logged (it logs its count of accounts at each).
fn registrations(setup: &Setup) -> usize {
    let log = std::fs::read_to_string(setup.pebble.dir.path().join("pebble.log")).unwrap();
    log.lines()
        .filter(|l| l.contains("accounts in memory"))
        .count()
}

#[tokio::test]
async fn certificates_register_one_new_account_when_the_server_forgets_theirs() {
    let Some(mut setup) = pebble(Some(60), false, None, 0).await else {
        return;
    };
    let upstream = backend::tcp_echo().await;
    // Renewed 6 s after issuance (60 s certificates, renew_ratio 0.1).
    let extra = format!("{}renew_ratio = 0.1\n", ca_root(&setup));
    let sni = |name: &str| {
        format!(
            "[[listener.sni_cert]]\nsource = \"acme\"\nnames = [\"{name}\"]\ndirectory = \"{}\"\n{extra}retry_min = \"200ms\"\nretry_max = \"2s\"\n",
            setup.pebble.directory,
        )
    };
    let toml = format!(
        "{}{}{}",
        listener_toml(&setup, upstream, &extra),
        sni("www.app.test"),
        sni("api.app.test")
    );
    let proxy = Proxy::start(&toml).await;
    let handle = proxy.running().listener("l").unwrap();
    for cert in &handle.certs {
        wait_installs(&cert.status, 1, &setup.pebble).await;
    }
    assert_eq!(registrations(&setup), 1);
    let state = proxy.dir.path().join("state/acme");
    let saved_id = || {
        let text = std::fs::read_to_string(find_file(&state, "account.json").unwrap()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["id"].as_str().unwrap().to_owned()
    };
    let first = saved_id();

    // The server forgets every account; each certificate learns it at its
    // renewal, holding the old account in memory.
    setup.pebble.restart().await;
    for cert in &handle.certs {
        wait_installs(&cert.status, 2, &setup.pebble).await;
    }
    assert_eq!(
        registrations(&setup),
        2,
        "one new account for the three certificates"
    );
    // The one registered since is saved, for the next start to use.
    assert_ne!(saved_id(), first);
}

/// What the HTTP-01 listener answers `GET /a?b=c` with `Host: {host}`:
/// the status line and the Location, if any.
async fn http01_answer(port: u16, host: &str) -> (String, Option<String>) {
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    plain
        .write_all(
            format!("GET /a?b=c HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    within("answer", plain.read_to_string(&mut response))
        .await
        .unwrap();
    let status = response.lines().next().unwrap_or_default().to_string();
    let location = response
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .map(str::to_string);
    (status, location)
}

#[tokio::test]
async fn http_01_redirects_only_to_the_host_asked_for() {
    // No CA is needed: the plain-HTTP listener runs while orders fail.
    let port = free_port();
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:{}\"\nupstream = \"127.0.0.1:9\"\nmode = \"tcp\"\n[listener.cert]\nsource = \"acme\"\nnames = [\"{NAME}\"]\ndirectory = \"https://127.0.0.1:9/dir\"\nchallenge = \"http-01\"\nhttp01_bind = \"127.0.0.1:{port}\"\nretry_min = \"1h\"\n",
        free_port()
    );
    let _proxy = Proxy::start(&toml).await;
    for (host, location) in [
        ("app.test", "https://app.test/a?b=c"),
        ("app.test:80", "https://app.test/a?b=c"),
        ("[::1]:8080", "https://[::1]/a?b=c"),
    ] {
        let (status, got) = http01_answer(port, host).await;
        assert!(status.starts_with("HTTP/1.1 301"), "{host}: {status}");
        assert_eq!(got.as_deref(), Some(location), "{host}");
    }
    // Anything that is not a bare host and port takes the client nowhere.
    for host in ["app.test@evil.example", "evil.example/x", "app.test:x", ""] {
        let (status, got) = http01_answer(port, host).await;
        assert!(
            status.starts_with("HTTP/1.1 400"),
            "{host}: {status} {got:?}"
        );
        assert_eq!(got, None, "{host}");
    }
}
