//! `sheath bootstrap` against a server presenting a chain: the certificate
//! the fingerprint names is kept only if it can be a root.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::common::{backend, sha256, within, Proxy};

/// A CA valid over `not_before..not_after`, and a leaf for localhost it
/// issued that is valid now: (CA PEM, leaf PEM, leaf key PEM).
fn ca_and_leaf(not_before: SystemTime, not_after: SystemTime) -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "bootstrap test root");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before.into();
    ca.not_after = not_after.into();
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = SystemTime::now();
    leaf.not_before = (now - Duration::from_secs(60)).into();
    leaf.not_after = (now + Duration::from_secs(3600)).into();
    let leaf_cert = leaf
        .signed_by(&key, &Issuer::from_params(&ca, &ca_key))
        .unwrap();
    (ca_cert.pem(), leaf_cert.pem(), key.serialize_pem())
}

fn fingerprint(pem: &str) -> String {
    let der = sheath::cert::parse_chain_pem("test", pem.as_bytes()).unwrap();
    sha256(der[0].as_ref())
}

/// sheath serving `leaf` with `ca` behind it in the chain, as a CA's own
/// HTTPS endpoint does.
async fn serve_chain(dir: &Path, ca: &str, leaf: &str, key: &str) -> Proxy {
    std::fs::write(dir.join("chain.pem"), format!("{leaf}{ca}")).unwrap();
    std::fs::write(dir.join("leaf.key"), key).unwrap();
    let toml = format!(
        "[[listener]]\nname = \"ca\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\n[listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n",
        backend::http().await,
        dir.join("chain.pem").display(),
        dir.join("leaf.key").display(),
    );
    Proxy::start(&toml).await
}

/// Run `sheath bootstrap`: (exit code, stdout, stderr).
async fn bootstrap(url: &str, fingerprint: &str, out: &Path) -> (i32, String, String) {
    let output = within(
        "sheath bootstrap",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sheath"))
            .args(["bootstrap", "--ca-url", url, "--fingerprint", fingerprint])
            .arg("--out")
            .arg(out)
            .output(),
    )
    .await
    .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn bootstrap_keeps_only_a_root_that_can_be_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let (ca, leaf, key) = ca_and_leaf(
        now - Duration::from_secs(3600),
        now + Duration::from_secs(86400),
    );
    let proxy = serve_chain(dir.path(), &ca, &leaf, &key).await;
    let url = format!("https://127.0.0.1:{}", proxy.addr("ca").port());
    let out = dir.path().join("root.pem");

    // The root's fingerprint: saved.
    let (code, _, stderr) = bootstrap(&url, &fingerprint(&ca), &out).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), ca.trim());
    std::fs::remove_file(&out).unwrap();

    // The fingerprint of the server's own certificate, taken by mistake:
    // it names a certificate in the chain, but no CA.
    let (code, _, stderr) = bootstrap(&url, &fingerprint(&leaf), &out).await;
    assert_eq!(
        code, 1,
        "a server certificate was kept as the root: {stderr}"
    );
    assert!(stderr.contains("is not a CA certificate"), "{stderr}");
    assert!(
        !out.exists(),
        "a server certificate was written as the root"
    );

    // A root that has expired: every chain under it fails to verify.
    let expired_dir = tempfile::tempdir().unwrap();
    let (old_ca, leaf, key) = ca_and_leaf(
        now - Duration::from_secs(10 * 86400),
        now - Duration::from_secs(86400),
    );
    let expired = serve_chain(expired_dir.path(), &old_ca, &leaf, &key).await;
    let url = format!("https://127.0.0.1:{}", expired.addr("ca").port());
    let (code, _, stderr) = bootstrap(&url, &fingerprint(&old_ca), &out).await;
    assert_eq!(code, 1, "an expired root was kept: {stderr}");
    assert!(stderr.contains("expired at"), "{stderr}");
    assert!(!out.exists(), "an expired root was written");
}

/// A plain HTTP upstream that answers every request with `body`, as
/// step-ca answers `/roots.pem`.
async fn serving(body: String) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                // The request head; it is bodiless.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/x-pem-file\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn bootstrap_takes_a_root_from_roots_pem_only_if_it_can_be_trusted() {
    // The server presents its leaf alone; the root is only in /roots.pem,
    // next to a server certificate whose fingerprint an operator could
    // have copied by mistake.
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let (ca, leaf, key) = ca_and_leaf(
        now - Duration::from_secs(3600),
        now + Duration::from_secs(86400),
    );
    std::fs::write(dir.path().join("leaf.pem"), &leaf).unwrap();
    std::fs::write(dir.path().join("leaf.key"), &key).unwrap();
    let (_, other_leaf, _) = ca_and_leaf(
        now - Duration::from_secs(3600),
        now + Duration::from_secs(86400),
    );
    let upstream = serving(format!("{ca}{other_leaf}")).await;
    let toml = format!(
        "[[listener]]\nname = \"ca\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n[listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.path().join("leaf.pem").display(),
        dir.path().join("leaf.key").display(),
    );
    let proxy = Proxy::start(&toml).await;
    let url = format!("https://127.0.0.1:{}", proxy.addr("ca").port());
    let out = dir.path().join("root.pem");

    // Colons and upper case, as `openssl x509 -fingerprint` prints it.
    let openssl_style = fingerprint(&ca)
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let (code, _, stderr) = bootstrap(&url, &openssl_style, &out).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), ca.trim());
    std::fs::remove_file(&out).unwrap();

    let (code, _, stderr) = bootstrap(&url, &fingerprint(&other_leaf), &out).await;
    assert_eq!(
        code, 1,
        "a server certificate was kept as the root: {stderr}"
    );
    assert!(stderr.contains("is not a CA certificate"), "{stderr}");
    assert!(!out.exists());
}

#[tokio::test]
async fn bootstrap_input_errors_exit_2_and_unreachable_cas_exit_1() {
    // Scripts retry on 1 (the CA may come up) and stop on 2 (the command
    // line is wrong and stays wrong).
    let out = tempfile::tempdir().unwrap();
    let out = out.path().join("root.pem");
    let fingerprint = "ab".repeat(32);
    for url in ["http://ca.internal:9000", "https://", "ca.internal:9000"] {
        let (code, _, stderr) = bootstrap(url, &fingerprint, &out).await;
        assert_eq!(code, 2, "{url}: {stderr}");
        assert!(stderr.contains("is not an https:// URL"), "{url}: {stderr}");
    }
    let (code, _, stderr) = bootstrap("https://127.0.0.1:9", "not hex", &out).await;
    assert_eq!(code, 2, "{stderr}");
    let closed = backend::closed_port().await;
    let (code, _, stderr) = bootstrap(&format!("https://{closed}"), &fingerprint, &out).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(!out.exists());
}
