//! The local CA: created once, persisted privately, reused across restarts,
//! never silently replaced.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{backend, client, pki, Proxy};

fn toml(upstream: std::net::SocketAddr) -> String {
    format!(
        "[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n[listener.cert]\nsource = \"local_ca\"\nnames = [\"localhost\", \"127.0.0.1\"]\nlifetime = \"2h\"\n"
    )
}

async fn handshake_with_exported_root(proxy: &Proxy) {
    let pem = std::fs::read_to_string(proxy.dir.path().join("state/local-ca/ca.pem")).unwrap();
    let config = client::client_config(pki::roots_from_pem(&pem), &[]);
    let mut tls = client::connect(proxy.addr("tcp"), config).await.unwrap();
    tls.write_all(b"hi").await.unwrap();
    let mut buf = [0u8; 2];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hi");
}

#[tokio::test]
async fn local_ca_persists_across_restarts_with_the_same_fingerprint() {
    let upstream = backend::tcp_echo().await;
    let mut first = Proxy::start(&toml(upstream)).await;
    let fingerprint = first.running().local_ca().unwrap().info().sha256.clone();
    let first_serial = first.running().listener("tcp").unwrap().certs[0]
        .resolver
        .current()
        .unwrap()
        .info
        .serial
        .clone();
    handshake_with_exported_root(&first).await;
    first.shutdown().await;

    let second = Proxy::start_in(&toml(upstream), first.dir).await.unwrap();
    assert_eq!(
        second.running().local_ca().unwrap().info().sha256,
        fingerprint
    );
    let served = second.running().listener("tcp").unwrap().certs[0]
        .resolver
        .current()
        .unwrap();
    assert_ne!(served.info.serial, first_serial, "a fresh leaf per start");
    assert_eq!(served.info.names, ["localhost", "127.0.0.1"]);
    let lifetime = served.info.lifetime();
    assert!(lifetime > Duration::from_secs(7000) && lifetime <= Duration::from_secs(7200 + 300));
    handshake_with_exported_root(&second).await;

    let ca_dir = second.dir.path().join("state/local-ca");
    let key_mode = std::fs::metadata(ca_dir.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(&ca_dir).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o077, 0, "CA directory is private");
    // No temporary files are left behind.
    for entry in std::fs::read_dir(second.dir.path().join("state")).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            !name.to_string_lossy().contains(".tmp"),
            "{name:?} left behind"
        );
    }
}

#[tokio::test]
async fn corrupt_ca_stops_startup_and_is_not_regenerated() {
    let upstream = backend::tcp_echo().await;
    let mut proxy = Proxy::start(&toml(upstream)).await;
    proxy.shutdown().await;
    let dir = proxy.dir;
    let ca_pem = dir.path().join("state/local-ca/ca.pem");

    for garbage in [
        &b"not a certificate"[..],
        b"",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n",
    ] {
        std::fs::write(&ca_pem, garbage).unwrap();
        let err = Proxy::start_in(&toml(upstream), tempfile_with(&dir))
            .await
            .expect_err("a corrupt CA must stop startup");
        let message = err.to_string();
        assert!(message.contains("corrupt"), "{message}");
        assert!(message.contains("local-ca"), "{message}");
        assert_eq!(
            std::fs::read(&ca_pem).unwrap(),
            garbage,
            "CA file was replaced"
        );
    }
}

#[tokio::test]
async fn ca_key_not_matching_its_certificate_is_corruption() {
    let upstream = backend::tcp_echo().await;
    let mut a = Proxy::start(&toml(upstream)).await;
    a.shutdown().await;
    let mut b = Proxy::start(&toml(upstream)).await;
    b.shutdown().await;
    // Swap in another CA's key.
    let other_key = std::fs::read(b.dir.path().join("state/local-ca/ca.key")).unwrap();
    std::fs::write(a.dir.path().join("state/local-ca/ca.key"), other_key).unwrap();
    let err = Proxy::start_in(&toml(upstream), tempfile_with(&a.dir))
        .await
        .expect_err("mismatched CA key must stop startup");
    assert!(err.to_string().contains("does not match"), "{err}");
}

/// A fresh scratch directory whose state/ points at an existing one, so a
/// failed start can be retried against the same state.
fn tempfile_with(existing: &tempfile::TempDir) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(existing.path().join("state"), dir.path().join("state")).unwrap();
    dir
}

#[tokio::test]
async fn a_ca_key_open_to_other_users_stops_startup() {
    let upstream = backend::tcp_echo().await;
    let mut proxy = Proxy::start(&toml(upstream)).await;
    let fingerprint = proxy.running().local_ca().unwrap().info().sha256.clone();
    proxy.shutdown().await;
    let dir = proxy.dir;
    let key = dir.path().join("state/local-ca/ca.key");
    let original = std::fs::read(&key).unwrap();

    // Restored with a plain `cp` under umask 022: world-readable.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Proxy::start_in(&toml(upstream), tempfile_with(&dir))
        .await
        .expect_err("a world-readable CA key must stop startup");
    let message = err.to_string();
    assert!(message.contains("open to other users"), "{message}");
    assert!(message.contains("mode 0644"), "{message}");
    assert!(message.contains("chmod 600"), "{message}");
    // Neither replaced nor touched.
    assert_eq!(std::fs::read(&key).unwrap(), original);
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644);

    // Group access is what a Kubernetes fsGroup gives every file of a
    // volume; it does not stop startup.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o660)).unwrap();
    let mut proxy = Proxy::start_in(&toml(upstream), tempfile_with(&dir))
        .await
        .unwrap();
    assert_eq!(
        proxy.running().local_ca().unwrap().info().sha256,
        fingerprint
    );
    proxy.shutdown().await;

    // Back to 0600, the same CA serves again.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let proxy = Proxy::start_in(&toml(upstream), tempfile_with(&dir))
        .await
        .unwrap();
    assert_eq!(
        proxy.running().local_ca().unwrap().info().sha256,
        fingerprint
    );
    handshake_with_exported_root(&proxy).await;
}

#[tokio::test]
async fn an_expired_ca_stops_startup_and_is_not_replaced() {
    // A CA as sheath makes one, but ten years on (or restored from an old
    // backup): every leaf it signed would be refused by every client.
    let upstream = backend::tcp_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("state/local-ca");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&ca_dir)
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sheath local CA expired");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = std::time::SystemTime::now();
    params.not_before = (now - Duration::from_secs(3650 * 86400)).into();
    params.not_after = (now - Duration::from_secs(86400)).into();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(ca_dir.join("ca.pem"), cert.pem()).unwrap();
    std::fs::write(ca_dir.join("ca.key"), key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        ca_dir.join("ca.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    let err = Proxy::start_in(&toml(upstream), tempfile_with(&dir))
        .await
        .expect_err("an expired local CA must stop startup");
    let message = err.to_string();
    assert!(message.contains("expired at"), "{message}");
    assert!(message.contains("local-ca"), "{message}");
    assert_eq!(
        std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
        cert.pem(),
        "the CA was replaced"
    );
}
