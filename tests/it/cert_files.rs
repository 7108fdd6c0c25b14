//! The files source under the ways real tools replace files: atomic
//! rename, rewrites in several writes, certificate and key seconds apart,
//! Kubernetes' `..data` symlink swap, certbot's `live/` → `archive/` links.
//! Every rotation must be picked up; every broken state must leave the last
//! good certificate serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::common::client::served_cert;
use crate::common::{backend, within, Proxy, TestPki};

/// A proxy on the files at `cert` / `key`, polling slowly so that change
/// notifications are what the tests exercise (and a long poll still
/// catches anything missed).
async fn proxy_on(dir: tempfile::TempDir, cert: &Path, key: &Path) -> Proxy {
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"tcp\"\n[listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\npoll_interval = \"5s\"\n",
        backend::tcp_echo().await,
        cert.display(),
        key.display()
    );
    Proxy::start_in(&toml, dir).await.unwrap()
}

fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Poll handshakes until the served serial is `serial`.
async fn until_serving(proxy: &Proxy, pki: &TestPki, serial: &str) {
    within(&format!("serial {serial} served"), async {
        loop {
            let info = served_cert(proxy.addr("l"), pki.roots()).await.unwrap();
            if info.serial == serial {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

fn serial_of(pem: &str) -> String {
    let der = sheath::cert::parse_chain_pem("test", pem.as_bytes()).unwrap();
    sheath::cert::CertInfo::from_der(&der[0]).unwrap().serial
}

fn new_pair(pki: &TestPki) -> (String, String) {
    pki.server_cert(&["localhost", "127.0.0.1"], Duration::from_secs(3600))
}

/// Wait until the manager has recorded `n` failures (so the broken state
/// was definitely read), then check the old certificate still serves.
async fn rejected(proxy: &Proxy, pki: &TestPki, failures_before: u32, still: &str) -> String {
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    within("the broken files were read and rejected", async {
        while status.load().consecutive_failures <= failures_before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let served = served_cert(proxy.addr("l"), pki.roots()).await.unwrap();
    assert_eq!(
        served.serial, still,
        "a broken certificate replaced a working one"
    );
    status.load().last_error.clone().unwrap()
}

#[tokio::test]
async fn atomic_rename_rotations_under_load_fail_no_handshake() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let (cert, key) = (files.cert.clone(), files.key.clone());
    let proxy = proxy_on(dir, &cert, &key).await;
    let addr = proxy.addr("l");

    // Clients handshake continuously while the certificate rotates.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, roots) = (stop.clone(), ok.clone(), failed.clone(), pki.roots());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match served_cert(addr, roots.clone()).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for _ in 0..5 {
        let (c, k) = new_pair(&pki);
        // Key first, then certificate, each by rename: the pair is only
        // complete once both are in place.
        write_atomically(&key, &k);
        write_atomically(&cert, &c);
        until_serving(&proxy, &pki, &serial_of(&c)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "handshakes failed during rotation"
    );
    assert!(ok.load(Ordering::Relaxed) > 20);
    let status = proxy.running().listener("l").unwrap().cert_status();
    assert_eq!(status.installs, 6);
}

#[tokio::test]
async fn broken_material_never_replaces_the_working_certificate() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let (cert, key) = (files.cert.clone(), files.key.clone());
    let original = serial_of(&files.cert_pem);
    let proxy = proxy_on(dir, &cert, &key).await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();

    let (valid_cert, _) = new_pair(&pki);
    let (_, unrelated_key) = new_pair(&other);
    let now = SystemTime::now();
    let (expired_cert, expired_key) = pki.server_cert_valid(
        &["localhost"],
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    let truncated = files.cert_pem[..files.cert_pem.len() / 2].to_string();
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "empty",
            String::new(),
            files.key_pem.clone(),
            "no PEM certificate",
        ),
        ("truncated", truncated, files.key_pem.clone(), "PEM"),
        (
            "garbage",
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into(),
            files.key_pem.clone(),
            "PEM",
        ),
        ("key mismatch", valid_cert, unrelated_key, "does not match"),
        ("expired", expired_cert, expired_key, "expired"),
    ];
    for (what, c, k, expected) in cases {
        let before = status.load().consecutive_failures;
        write_atomically(&key, &k);
        write_atomically(&cert, &c);
        let error = rejected(&proxy, &pki, before, &original).await;
        assert!(error.contains(expected), "{what}: error was {error}");
    }
    // A good pair is picked up again.
    let (c, k) = new_pair(&pki);
    write_atomically(&key, &k);
    write_atomically(&cert, &c);
    until_serving(&proxy, &pki, &serial_of(&c)).await;
    assert_eq!(status.load().consecutive_failures, 0);
}

#[tokio::test]
async fn certificate_and_key_written_seconds_apart() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let (cert, key) = (files.cert.clone(), files.key.clone());
    let original = serial_of(&files.cert_pem);
    let proxy = proxy_on(dir, &cert, &key).await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();

    let (c, k) = new_pair(&pki);
    // Non-atomic rewrite of the certificate in several writes, as `cp` or
    // an editor would do it.
    let before = status.load().consecutive_failures;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&cert).unwrap();
        for chunk in c.as_bytes().chunks(200) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
        }
    }
    // The new certificate with the old key is rejected as a pair.
    let error = rejected(&proxy, &pki, before, &original).await;
    assert!(error.contains("does not match"), "{error}");
    // The key arrives later; the pair is complete now.
    std::fs::write(&key, &k).unwrap();
    until_serving(&proxy, &pki, &serial_of(&c)).await;
}

/// Kubernetes mounts secrets as `name -> ..data/name`, `..data ->
/// ..<timestamp>`, and updates by creating a new timestamped directory and
/// renaming a new `..data` symlink over the old one.
#[tokio::test]
async fn kubernetes_data_symlink_swap() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().join("secret");
    std::fs::create_dir(&mount).unwrap();
    let version = |n: u32, c: &str, k: &str| -> PathBuf {
        let v = mount.join(format!("..2026_11_23_{n}"));
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("tls.crt"), c).unwrap();
        std::fs::write(v.join("tls.key"), k).unwrap();
        v
    };
    let (c1, k1) = new_pair(&pki);
    let v1 = version(1, &c1, &k1);
    std::os::unix::fs::symlink(v1.file_name().unwrap(), mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", mount.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", mount.join("tls.key")).unwrap();
    let proxy = proxy_on(dir, &mount.join("tls.crt"), &mount.join("tls.key")).await;
    until_serving(&proxy, &pki, &serial_of(&c1)).await;

    let (c2, k2) = new_pair(&pki);
    let v2 = version(2, &c2, &k2);
    std::os::unix::fs::symlink(v2.file_name().unwrap(), mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    until_serving(&proxy, &pki, &serial_of(&c2)).await;
}

/// certbot keeps `live/NAME/fullchain.pem -> ../../archive/NAME/fullchainN.pem`
/// and moves the links to a new N on renewal.
#[tokio::test]
async fn certbot_live_links_move_to_a_new_archive_version() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live/app.test");
    let archive = dir.path().join("archive/app.test");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::create_dir_all(&archive).unwrap();
    let publish = |n: u32, c: &str, k: &str| {
        std::fs::write(archive.join(format!("fullchain{n}.pem")), c).unwrap();
        std::fs::write(archive.join(format!("privkey{n}.pem")), k).unwrap();
        for (link, target) in [
            (
                "fullchain.pem",
                format!("../../archive/app.test/fullchain{n}.pem"),
            ),
            (
                "privkey.pem",
                format!("../../archive/app.test/privkey{n}.pem"),
            ),
        ] {
            let tmp = live.join(format!("{link}.new"));
            std::os::unix::fs::symlink(&target, &tmp).unwrap();
            std::fs::rename(&tmp, live.join(link)).unwrap();
        }
    };
    let (c1, k1) = new_pair(&pki);
    publish(1, &c1, &k1);
    let proxy = proxy_on(dir, &live.join("fullchain.pem"), &live.join("privkey.pem")).await;
    until_serving(&proxy, &pki, &serial_of(&c1)).await;
    let (c2, k2) = new_pair(&pki);
    publish(2, &c2, &k2);
    until_serving(&proxy, &pki, &serial_of(&c2)).await;
}

#[tokio::test]
async fn polling_catches_changes_without_notifications() {
    // A directory the watcher never sees changes in: files replaced via a
    // symlinked directory elsewhere. Polling must pick up the change.
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let (c1, k1) = new_pair(&pki);
    std::fs::write(real.join("c.pem"), &c1).unwrap();
    std::fs::write(real.join("k.pem"), &k1).unwrap();
    let view = dir.path().join("view");
    std::fs::create_dir(&view).unwrap();
    std::os::unix::fs::symlink(real.join("c.pem"), view.join("c.pem")).unwrap();
    std::os::unix::fs::symlink(real.join("k.pem"), view.join("k.pem")).unwrap();
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"tcp\"\n[listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\npoll_interval = \"300ms\"\n",
        backend::tcp_echo().await,
        view.join("c.pem").display(),
        view.join("k.pem").display()
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let (c2, k2) = new_pair(&pki);
    write_atomically(&real.join("k.pem"), &k2);
    write_atomically(&real.join("c.pem"), &c2);
    until_serving(&proxy, &pki, &serial_of(&c2)).await;
}

#[tokio::test]
async fn a_broken_file_at_startup_fails_loudly() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    std::fs::write(&files.key, "nope").unwrap();
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n{}",
        crate::common::pki::files_cert_toml(&files)
    );
    let err = Proxy::start_in(&toml, dir).await.unwrap_err().to_string();
    assert!(err.contains("no PEM private key"), "{err}");
    assert!(err.contains("listener `l`"), "{err}");
}

#[tokio::test]
async fn local_ca_leaf_is_renewed_before_it_expires() {
    let upstream = backend::tcp_echo().await;
    let proxy = Proxy::start(&format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n[listener.cert]\nsource = \"local_ca\"\nnames = [\"localhost\"]\nlifetime = \"10s\"\n"
    ))
    .await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    let first = status.load().current.clone().unwrap();
    let (installed, renew_at) = {
        let s = status.load();
        (s.last_success.unwrap(), s.renew_at.unwrap())
    };
    // 2/3 of the lifetime left when it was issued (just before it was
    // installed), minus at most 5% jitter.
    let offset = renew_at.duration_since(installed).unwrap();
    let left = first.not_after.duration_since(installed).unwrap();
    let slack = Duration::from_millis(50);
    let due = left.mul_f64(2.0 / 3.0) + slack;
    let earliest = left.mul_f64(2.0 / 3.0) - left.mul_f64(0.05) - slack;
    assert!(
        offset <= due && offset >= earliest,
        "{offset:?} not in {earliest:?}..{due:?}"
    );
    within("renewal", async {
        while status.load().installs < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let second = status.load().current.clone().unwrap();
    assert_ne!(second.serial, first.serial);
    assert!(
        SystemTime::now() < first.not_after,
        "renewed only after expiry"
    );
}

/// A leaf of a few seconds is backdated by a quarter of its lifetime (for
/// clients' clock skew), so with a low `renew_ratio` the renewal time
/// counted from its notBefore had passed when it was issued: every new
/// leaf was renewed at once, in a loop that never gave its thread back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backdated_leaf_with_a_low_renew_ratio_is_not_renewed_in_a_loop() {
    let upstream = backend::tcp_echo().await;
    let proxy = Proxy::start(&format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n[listener.cert]\nsource = \"local_ca\"\nnames = [\"localhost\"]\nlifetime = \"10s\"\nrenew_ratio = 0.1\n"
    ))
    .await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    let mut seen = 0;
    within("three renewals", async {
        while seen < 4 {
            let s = status.load_full();
            if s.installs > seen {
                seen = s.installs;
                let (installed, renew_at) = (s.last_success.unwrap(), s.renew_at.unwrap());
                let not_after = s.current.as_ref().unwrap().not_after;
                assert!(
                    installed < renew_at && renew_at < not_after,
                    "certificate #{seen}, installed at {installed:?}, is due for renewal at {renew_at:?} (expires {not_after:?})"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// How many certificates the proxy presents in its handshake.
async fn served_chain_len(proxy: &Proxy, pki: &TestPki) -> usize {
    let config = crate::common::client::client_config(pki.roots(), &[]);
    let tls = crate::common::client::connect(proxy.addr("l"), config)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap().len()
}

/// A chain fixed in place keeps its leaf: the intermediate that was
/// missing is added to the file. The new chain must be served, or clients
/// that need the intermediate fail until sheath is restarted (a reload
/// with the same configuration does not re-read the files).
#[tokio::test]
async fn a_chain_changed_under_the_same_leaf_is_picked_up() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let (cert, key) = (files.cert.clone(), files.key.clone());
    let proxy = proxy_on(dir, &cert, &key).await;
    assert_eq!(served_chain_len(&proxy, &pki).await, 1);

    // The CA certificate stands in for the intermediate: what matters is
    // that the file's chain grows while its leaf stays.
    write_atomically(&cert, &format!("{}{}", files.cert_pem, pki.ca_pem));
    within("the two-certificate chain served", async {
        while served_chain_len(&proxy, &pki).await != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let status = proxy.running().listener("l").unwrap().cert_status();
    assert_eq!(status.installs, 2);
}

/// A directory that never stays quiet: the certificate lives next to a
/// file written all the time (an application's log or database). The
/// watcher waits for writes to settle, but not forever: a rotation must
/// still be picked up while the neighbour keeps being written.
#[tokio::test]
async fn a_rotation_next_to_a_file_written_all_the_time_is_picked_up() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let (cert, key) = (files.cert.clone(), files.key.clone());
    let noise = dir.path().join("app.log");
    let proxy = proxy_on(dir, &cert, &key).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                std::fs::write(&noise, n.to_string()).unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let (c, k) = new_pair(&pki);
    write_atomically(&key, &k);
    write_atomically(&cert, &c);
    until_serving(&proxy, &pki, &serial_of(&c)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
}

/// Files broken for a while and then put back as they were (a deploy that
/// rewrote them, a restore from backup): nothing new is installed, but the
/// failure is over, and the status must say so. Alerts on
/// `sheath_certificate_renewal_consecutive_failures` fired for good.
#[tokio::test]
async fn files_restored_to_the_served_certificate_end_the_failure() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let (cert, key) = (files.cert.clone(), files.key.clone());
    let original = serial_of(&files.cert_pem);
    let proxy = proxy_on(dir, &cert, &key).await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();

    write_atomically(&cert, "garbage");
    rejected(&proxy, &pki, 0, &original).await;
    write_atomically(&cert, &files.cert_pem);
    within("the failure count back at zero", async {
        while status.load().consecutive_failures != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        status.load().installs,
        1,
        "the same certificate was installed again"
    );
}

/// A chain with the leaf after its issuer (`cat chain.pem cert.pem`) is
/// refused, and the error says what is wrong: the key does match one of
/// the certificates, just not the first.
#[tokio::test]
async fn a_chain_in_the_wrong_order_is_named_as_such() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    std::fs::write(&files.cert, format!("{}{}", pki.ca_pem, files.cert_pem)).unwrap();
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n{}",
        crate::common::pki::files_cert_toml(&files)
    );
    let err = Proxy::start_in(&toml, dir).await.unwrap_err().to_string();
    assert!(err.contains("certificate #1"), "{err}");
    assert!(err.contains("leaf"), "{err}");
    assert!(!err.contains("does not match"), "{err}");
}
