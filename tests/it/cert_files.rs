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
use crate::common::{backend, within, write_atomically, Proxy, TestPki};

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
    // Counted from 1, as the chain warnings count: the CA is the first.
    assert!(err.contains("certificate 2 of the chain"), "{err}");
    assert!(err.contains("leaf"), "{err}");
    assert!(!err.contains("does not match"), "{err}");
}

/// Run openssl in `dir`; a failure fails the test with openssl's words.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rewrite `file` in `dir` with `openssl <args> -in file -out file`
/// (openssl truncates its output before it reads its input).
fn openssl_rewrite(dir: &Path, file: &str, args: &[&str]) {
    let new = format!("{file}.new");
    let mut all = args.to_vec();
    all.extend(["-in", file, "-out", &new]);
    openssl(dir, &all);
    std::fs::rename(dir.join(&new), dir.join(file)).unwrap();
}

/// `<stem>.key` as `genkey` (an openssl command line, given `-out`) writes
/// it, and `<stem>.pem`, a localhost certificate for it issued by the test
/// CA with `openssl x509 -req`. Returns the certificate's serial.
fn openssl_pair(pki: &TestPki, dir: &Path, stem: &str, genkey: &[&str]) -> String {
    if !dir.join("ca.key").exists() {
        std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
        std::fs::write(dir.join("ca.key"), pki.ca_key_pem()).unwrap();
        std::fs::write(
            dir.join("ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
    }
    let key = format!("{stem}.key");
    // Right after the command: genrsa wants its key size last.
    let mut args = genkey.to_vec();
    args.splice(1..1, ["-out", key.as_str()]);
    openssl(dir, &args);
    let csr = format!("{stem}.csr");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            "/CN=localhost",
            "-out",
            &csr,
        ],
    );
    let cert = format!("{stem}.pem");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext",
            "-out",
            &cert,
        ],
    );
    serial_of(&std::fs::read_to_string(dir.join(&cert)).unwrap())
}

const P256: &[&str] = &[
    "genpkey",
    "-algorithm",
    "EC",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
];

fn files_toml(cert: &Path, key: &Path) -> String {
    format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\nmode = \"tcp\"\n[listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

/// Keys of every type rustls can sign with, in the encodings openssl
/// writes them, and the shapes certificate files take on their way from a
/// CA or another tool: each is served and verifies at a client.
#[tokio::test]
async fn openssl_keys_and_files_in_every_common_shape_are_served() {
    if !crate::common::require_tool("openssl") {
        return;
    }
    let pki = TestPki::new();
    fn bom(path: &Path) {
        let text = std::fs::read(path).unwrap();
        std::fs::write(path, [b"\xEF\xBB\xBF".as_slice(), &text].concat()).unwrap();
    }
    type Shape = fn(&Path);
    let same: Shape = |_| {};
    let cases: Vec<(&str, &[&str], Shape)> = vec![
        ("ECDSA P-256, PKCS#8", P256, same),
        (
            "ECDSA P-384, PKCS#8",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
            ],
            same,
        ),
        (
            "ECDSA P-521, PKCS#8",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-521",
            ],
            same,
        ),
        // The parameters block ahead of the key, as `ecparam -genkey`
        // writes it without -noout.
        (
            "ECDSA P-256, SEC1 after EC PARAMETERS",
            &["ecparam", "-name", "prime256v1", "-genkey"],
            same,
        ),
        ("Ed25519", &["genpkey", "-algorithm", "ed25519"], same),
        (
            "RSA 2048, PKCS#8",
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            same,
        ),
        (
            "RSA 3072, PKCS#1",
            &["genrsa", "-traditional", "3072"],
            same,
        ),
        (
            "RSA 4096, PKCS#1",
            &["genrsa", "-traditional", "4096"],
            same,
        ),
        ("DER certificate and PKCS#8 key", P256, |dir| {
            openssl_rewrite(dir, "k.pem", &["x509", "-outform", "DER"]);
            openssl_rewrite(dir, "k.key", &["pkey", "-outform", "DER"]);
        }),
        (
            "DER certificate and PKCS#1 key",
            &["genrsa", "-traditional", "2048"],
            |dir| {
                openssl_rewrite(dir, "k.pem", &["x509", "-outform", "DER"]);
                openssl_rewrite(dir, "k.key", &["rsa", "-traditional", "-outform", "DER"]);
            },
        ),
        ("a UTF-8 byte order mark before each file", P256, |dir| {
            bom(&dir.join("k.pem"));
            bom(&dir.join("k.key"));
        }),
        ("CRLF line endings", P256, |dir| {
            for f in ["k.pem", "k.key"] {
                let text = std::fs::read_to_string(dir.join(f)).unwrap();
                std::fs::write(dir.join(f), text.replace('\n', "\r\n")).unwrap();
            }
        }),
        ("`openssl x509 -text` before the block", P256, |dir| {
            openssl_rewrite(dir, "k.pem", &["x509", "-text"]);
        }),
        (
            "certificate and key in one file, given for both",
            P256,
            |dir| {
                let text = std::fs::read_to_string(dir.join("k.pem")).unwrap()
                    + &std::fs::read_to_string(dir.join("k.key")).unwrap();
                std::fs::write(dir.join("k.pem"), &text).unwrap();
                std::fs::write(dir.join("k.key"), &text).unwrap();
            },
        ),
        (
            "key first, then the certificate, in one file",
            P256,
            |dir| {
                let text = std::fs::read_to_string(dir.join("k.key")).unwrap()
                    + &std::fs::read_to_string(dir.join("k.pem")).unwrap();
                std::fs::write(dir.join("k.pem"), &text).unwrap();
                std::fs::write(dir.join("k.key"), &text).unwrap();
            },
        ),
    ];
    let mut failures = Vec::new();
    for (what, genkey, shape) in cases {
        let dir = tempfile::tempdir().unwrap();
        let serial = openssl_pair(&pki, dir.path(), "k", genkey);
        shape(dir.path());
        let toml = files_toml(&dir.path().join("k.pem"), &dir.path().join("k.key"));
        let proxy = match Proxy::start_in(&toml, dir).await {
            Ok(proxy) => proxy,
            Err(e) => {
                failures.push(format!("{what}: refused: {e}"));
                continue;
            }
        };
        match served_cert(proxy.addr("l"), pki.roots()).await {
            Ok(info) if info.serial == serial => {}
            other => failures.push(format!("{what}: served {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Files sheath cannot serve from are refused at the start with words that
/// name the file and say what to do, never a parser's message or "no key
/// found" for a key that is there but encrypted.
#[tokio::test]
async fn unusable_files_are_refused_saying_what_to_do() {
    if !crate::common::require_tool("openssl") {
        return;
    }
    let pki = TestPki::new();
    type Shape = fn(&Path);
    let cases: Vec<(&str, Shape, &str, &str, &[&str])> = vec![
        (
            "encrypted PKCS#8",
            |dir| openssl_rewrite(dir, "k.key", &["pkcs8", "-topk8", "-passout", "pass:x"]),
            "k.pem",
            "k.key",
            &["k.key", "encrypted", "openssl pkey -in"],
        ),
        (
            "encrypted PKCS#8 in DER",
            |dir| {
                openssl_rewrite(
                    dir,
                    "k.key",
                    &["pkcs8", "-topk8", "-outform", "DER", "-passout", "pass:x"],
                )
            },
            "k.pem",
            "k.key",
            &["k.key", "encrypted", "openssl pkey -in"],
        ),
        (
            "legacy encrypted SEC1",
            |dir| openssl_rewrite(dir, "k.key", &["ec", "-aes256", "-passout", "pass:x"]),
            "k.pem",
            "k.key",
            &["k.key", "encrypted", "openssl pkey -in"],
        ),
        (
            "PKCS#12 given as the certificate",
            |dir| {
                openssl(
                    dir,
                    &[
                        "pkcs12", "-export", "-in", "k.pem", "-inkey", "k.key", "-passout",
                        "pass:", "-out", "k.p12",
                    ],
                )
            },
            "k.p12",
            "k.key",
            &["k.p12", "PKCS#12", "openssl pkcs12 -in"],
        ),
        (
            "PKCS#12 given as the key",
            |dir| {
                openssl(
                    dir,
                    &[
                        "pkcs12", "-export", "-in", "k.pem", "-inkey", "k.key", "-passout",
                        "pass:", "-out", "k.p12",
                    ],
                )
            },
            "k.pem",
            "k.p12",
            &["k.p12", "PKCS#12", "openssl pkcs12 -in"],
        ),
        (
            "certificate and key paths swapped",
            |_| {},
            "k.key",
            "k.pem",
            &["k.key", "private key", "swapped"],
        ),
        (
            "the certificate given as the key",
            |_| {},
            "k.pem",
            "k.pem",
            &["k.pem", "no PEM private key", "swapped"],
        ),
        (
            "empty certificate file",
            |dir| std::fs::write(dir.join("k.pem"), "").unwrap(),
            "k.pem",
            "k.key",
            &["k.pem", "empty"],
        ),
        (
            "a directory",
            |dir| std::fs::create_dir(dir.join("d")).unwrap(),
            "d",
            "k.key",
            &["/d", "directory"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, shape, cert, key, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        openssl_pair(&pki, dir.path(), "k", P256);
        shape(dir.path());
        let toml = files_toml(&dir.path().join(cert), &dir.path().join(key));
        match Proxy::start_in(&toml, dir).await {
            Ok(_) => failures.push(format!("{what}: started")),
            Err(e) => {
                let e = e.to_string();
                if let Some(missing) = expected.iter().find(|x| !e.contains(**x)) {
                    failures.push(format!("{what}: {missing:?} not in: {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The same files written over a working pair: the refusals reach the
/// status in the same words and never replace what serves, and a DER pair
/// rotated in is served.
#[tokio::test]
async fn rotated_files_in_other_shapes_are_refused_or_served() {
    if !crate::common::require_tool("openssl") {
        return;
    }
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let original = openssl_pair(&pki, &path, "k", P256);
    let (cert, key) = (path.join("k.pem"), path.join("k.key"));
    let proxy = proxy_on(dir, &cert, &key).await;
    until_serving(&proxy, &pki, &original).await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();

    // A new pair whose key is encrypted.
    let serial = openssl_pair(&pki, &path, "n", P256);
    openssl_rewrite(&path, "n.key", &["pkcs8", "-topk8", "-passout", "pass:x"]);
    let before = status.load().consecutive_failures;
    std::fs::rename(path.join("n.key"), &key).unwrap();
    std::fs::rename(path.join("n.pem"), &cert).unwrap();
    let error = rejected(&proxy, &pki, before, &original).await;
    assert!(error.contains("encrypted"), "{error}");

    // A PKCS#12 bundle where the certificate was.
    let serial2 = openssl_pair(&pki, &path, "p", P256);
    openssl(
        &path,
        &[
            "pkcs12", "-export", "-in", "p.pem", "-inkey", "p.key", "-passout", "pass:", "-out",
            "p.p12",
        ],
    );
    let before = status.load().consecutive_failures;
    std::fs::rename(path.join("p.key"), &key).unwrap();
    std::fs::rename(path.join("p.p12"), &cert).unwrap();
    let error = rejected(&proxy, &pki, before, &original).await;
    assert!(error.contains("PKCS#12"), "{error}");
    assert_ne!(serial, serial2);

    // The same pair in DER is served (its key is in place as k.key now).
    openssl(
        &path,
        &["x509", "-in", "p.pem", "-outform", "DER", "-out", "p.der"],
    );
    openssl(
        &path,
        &[
            "pkey",
            "-in",
            "k.key",
            "-outform",
            "DER",
            "-out",
            "p.key.der",
        ],
    );
    std::fs::rename(path.join("p.key.der"), &key).unwrap();
    std::fs::rename(path.join("p.der"), &cert).unwrap();
    until_serving(&proxy, &pki, &serial2).await;
}

/// Chains whose intermediates do not lead from the leaf to its root, or
/// have expired, fail for the clients that do not already have the right
/// intermediate. sheath serves them as the file has them (refusing them
/// would take away what still works for the others) but says what is
/// wrong, naming the certificates by position and subject, in the status
/// (`/certs`) and a warning. Correct chains, their root included or not,
/// get no warning. A client that trusts the root alone shows which chains
/// fail.
#[tokio::test]
async fn chains_some_clients_refuse_are_served_saying_why() {
    let pki = TestPki::new();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let name = "sheath test intermediate";
    let int = pki.intermediate(name, now - day, now + day);
    let (leaf, key) = int.server_cert(&["localhost"]);
    // Same name, another key: the intermediate its CA replaced, and
    // another CA's. Only the signature tells either from the right one.
    let rotated = pki.intermediate(name, now - 2 * day, now + day);
    let foreign = TestPki::new().intermediate(name, now - day, now + day);
    let unrelated = pki.intermediate("another intermediate", now - day, now + day);
    let lapsed = pki.intermediate("lapsed intermediate", now - 2 * day, now - day);
    let (lapsed_leaf, lapsed_key) = lapsed.server_cert(&["localhost"]);
    let upper = pki.intermediate("upper intermediate", now - day, now + day);
    let lower = upper.intermediate("lower intermediate", now - day, now + day);
    let (deep_leaf, deep_key) = lower.server_cert(&["localhost"]);
    let same_name: &[&str] = &["certificate 2 (CN=sheath test intermediate) did not issue certificate 1 (CN=localhost); it has the name of certificate 1's issuer, but not the key that signed it"];

    // What the case is, the chain file, its key, what the one warning
    // says (none when empty), whether the root-only client connects.
    type Case<'a> = (&'a str, String, &'a str, &'a [&'a str], bool);
    let cases: Vec<Case> = vec![
        ("leaf and intermediate", leaf.clone() + &int.pem, &key, &[], true),
        (
            "the root included",
            leaf.clone() + &int.pem + &pki.ca_pem,
            &key,
            &[],
            true,
        ),
        (
            "two intermediates",
            deep_leaf.clone() + &lower.pem + &upper.pem,
            &deep_key,
            &[],
            true,
        ),
        (
            "the intermediate its CA replaced",
            leaf.clone() + &rotated.pem,
            &key,
            same_name,
            false,
        ),
        (
            "another CA's intermediate of the same name",
            leaf.clone() + &foreign.pem,
            &key,
            same_name,
            false,
        ),
        (
            "an unrelated intermediate",
            leaf.clone() + &unrelated.pem,
            &key,
            &["certificate 2 (CN=another intermediate) did not issue certificate 1 (CN=localhost): clients that do not already have certificate 1's issuer (CN=sheath test intermediate) refuse the chain"],
            false,
        ),
        (
            "an expired intermediate",
            lapsed_leaf + &lapsed.pem,
            &lapsed_key,
            &["certificate 2 (CN=lapsed intermediate) expired at ", "replace it"],
            false,
        ),
        (
            // webpki looks for an issuer all through the chain; clients
            // that read it in order do not.
            "intermediates out of order",
            deep_leaf + &upper.pem + &lower.pem,
            &deep_key,
            &[
                "certificate 2 (CN=upper intermediate) did not issue certificate 1 (CN=localhost); certificate 3 (CN=lower intermediate) did",
                "the right order is 1, 3, 2",
            ],
            true,
        ),
    ];
    let mut failures = Vec::new();
    for (what, chain, key, want, connects) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("c.key"));
        std::fs::write(&cert_path, &chain).unwrap();
        std::fs::write(&key_path, key).unwrap();
        let proxy = match Proxy::start_in(&files_toml(&cert_path, &key_path), dir).await {
            Ok(proxy) => proxy,
            Err(e) => {
                failures.push(format!("{what}: refused: {e}"));
                continue;
            }
        };
        let problems = proxy
            .running()
            .listener("l")
            .unwrap()
            .cert_status()
            .chain_problems
            .clone();
        let as_wanted = if want.is_empty() {
            problems.is_empty()
        } else {
            problems.len() == 1 && want.iter().all(|w| problems[0].contains(w))
        };
        if !as_wanted {
            failures.push(format!(
                "{what}: chain problems {problems:?}, want {want:?}"
            ));
        }
        let config = crate::common::client::client_config(pki.roots(), &[]);
        let connected = crate::common::client::connect(proxy.addr("l"), config).await;
        if connected.is_ok() != connects {
            failures.push(format!(
                "{what}: a client trusting the root alone: {connected:?}, want connected: {connects}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
