//! Several certificates on one listener, chosen by the name the client asks
//! for (SNI): exact names before wildcards, the default for everything
//! else, each certificate renewed and reloaded on its own.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::admin::{admin_for, call, value};
use crate::common::client::{client_config, connect_as};
use crate::common::{backend, require_tool, within, Proxy, TestPki};

/// Write a certificate for `names` as `<stem>.pem` / `<stem>.key`; its serial.
fn write_cert(pki: &TestPki, dir: &Path, stem: &str, names: &[&str]) -> String {
    let (cert, key) = pki.server_cert(names, Duration::from_secs(3600));
    replace(&dir.join(format!("{stem}.key")), &key);
    replace(&dir.join(format!("{stem}.pem")), &cert);
    serial_of(&cert)
}

fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn serial_of(pem: &str) -> String {
    let der = sheath::cert::parse_chain_pem("test", pem.as_bytes()).unwrap();
    sheath::cert::CertInfo::from_der(&der[0]).unwrap().serial
}

fn files_table(header: &str, dir: &Path, stem: &str) -> String {
    format!(
        "\n{header}\nsource = \"files\"\ncert = \"{0}/{stem}.pem\"\nkey = \"{0}/{stem}.key\"\npoll_interval = \"5s\"\n",
        dir.display()
    )
}

/// The serial of the certificate served to a client that sends `sni`
/// (none for `None`), whether or not it covers the name: the chain is not
/// checked, only looked at.
async fn served_serial(addr: SocketAddr, sni: Option<&str>) -> String {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(sheath::tls::danger::AcceptAnyChain(provider)))
        .with_no_client_auth();
    // A DNS name in ServerName is sent as SNI; an IP address is not.
    config.enable_sni = true;
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    sheath::cert::CertInfo::from_der(&leaf).unwrap().serial
}

/// The serial served to a client that asks for `sni` and verifies the
/// certificate against the test CA, name included.
async fn verified_serial(addr: SocketAddr, roots: Arc<RootCertStore>, sni: &str) -> String {
    let tls = connect_as(addr, client_config(roots, &[]), sni)
        .await
        .unwrap_or_else(|e| panic!("{sni}: {e}"));
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    sheath::cert::CertInfo::from_der(&leaf).unwrap().serial
}

#[tokio::test]
async fn the_certificate_is_chosen_by_the_name_the_client_asks_for() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let default = write_cert(&pki, &d, "default", &["localhost", "127.0.0.1"]);
    let api = write_cert(&pki, &d, "api", &["api.test"]);
    let wildcard = write_cert(&pki, &d, "wild", &["*.apps.test"]);
    let exact = write_cert(&pki, &d, "exact", &["exact.apps.test"]);
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\n{}{}{}{}",
        backend::http().await,
        files_table("[listener.cert]", &d, "default"),
        files_table("[[listener.sni_cert]]", &d, "api"),
        files_table("[[listener.sni_cert]]", &d, "wild"),
        files_table("[[listener.sni_cert]]", &d, "exact"),
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let addr = proxy.addr("l");

    // Each name gets the certificate that carries it, and a verifying
    // client accepts it.
    for (sni, want) in [
        ("localhost", &default),
        ("api.test", &api),
        ("x.apps.test", &wildcard),
        // An exact name wins over a wildcard listed before it.
        ("exact.apps.test", &exact),
    ] {
        assert_eq!(
            &verified_serial(addr, pki.roots(), sni).await,
            want,
            "SNI {sni}"
        );
    }
    // Names matching nothing fall back to the default: a wildcard covers
    // one label only, and a client without SNI gets the default too.
    for sni in [
        Some("a.b.apps.test"),
        Some("apps.test"),
        Some("other.test"),
        None,
    ] {
        assert_eq!(
            served_serial(addr, sni).await,
            default,
            "SNI {sni:?} must get the default certificate"
        );
    }

    // A real client: curl verifies the name it asked for.
    if require_tool("curl") {
        let ca = pki.write_ca(proxy.dir.path());
        for host in ["api.test", "x.apps.test"] {
            let out = tokio::process::Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(&ca)
                .arg("--resolve")
                .arg(format!("{host}:{}:127.0.0.1", addr.port()))
                .arg(format!("https://{host}:{}/", addr.port()))
                .output()
                .await
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "200",
                "curl to {host}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[tokio::test]
async fn an_sni_certificate_rotates_on_its_own_and_a_broken_one_keeps_serving() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let default = write_cert(&pki, &d, "default", &["localhost"]);
    let first = write_cert(&pki, &d, "api", &["api.test"]);
    // The SNI certificate is exported on its own, with its own hook.
    let export = d.join("export");
    let hook_log = d.join("hook.log");
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"tcp\"\n{}{}[listener.sni_cert.export]\ndir = \"{}\"\non_renew = 'echo \"$SHEATH_LISTENER $SHEATH_CERT $SHEATH_CERT_SERIAL\" >> {}'\n",
        backend::tcp_echo().await,
        files_table("[listener.cert]", &d, "default"),
        files_table("[[listener.sni_cert]]", &d, "api"),
        export.display(),
        hook_log.display(),
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let addr = proxy.addr("l");
    let handle = proxy.running().listener("l").unwrap();
    assert_eq!(handle.certs.len(), 2);
    let sni_status = handle.certs[1].status.clone();
    assert_eq!(sni_status.load().cert, sheath::config::CertRef::Sni(0));
    assert_eq!(verified_serial(addr, pki.roots(), "api.test").await, first);

    // Rotation of the SNI certificate reaches only its own name.
    let second = write_cert(&pki, &d, "api", &["api.test"]);
    within("the rotated SNI certificate is served", async {
        while verified_serial(addr, pki.roots(), "api.test").await != second {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        verified_serial(addr, pki.roots(), "localhost").await,
        default
    );
    assert_eq!(sni_status.load().installs, 2);
    assert_eq!(handle.certs[0].status.load().installs, 1);
    // Each install runs the hook once (in whatever order two hooks finish).
    let mut hooked = vec![
        format!("l sni_cert[0] {first}"),
        format!("l sni_cert[0] {second}"),
    ];
    hooked.sort();
    within("the SNI certificate's hook ran for both installs", async {
        loop {
            let log = std::fs::read_to_string(&hook_log).unwrap_or_default();
            let mut lines: Vec<String> = log.lines().map(str::to_string).collect();
            lines.sort();
            if lines == hooked {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let exported = std::fs::read_to_string(export.join("fullchain.pem")).unwrap();
    assert_eq!(serial_of(&exported), second);

    // A broken file is refused and the working certificate stays.
    let failures = sni_status.load().consecutive_failures;
    replace(
        &d.join("api.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    within("the broken SNI certificate was read and refused", async {
        while sni_status.load().consecutive_failures <= failures {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(verified_serial(addr, pki.roots(), "api.test").await, second);

    // The admin view and the metrics tell the two certificates apart.
    let admin = admin_for(&proxy).await;
    let (_, scrape) = call(admin, "GET", "/metrics").await;
    for (cert, installs) in [("default", 1.0), ("sni_cert[0]", 2.0)] {
        let labels = format!("listener=\"l\",cert=\"{cert}\",source=\"files\"");
        assert_eq!(
            value(
                &scrape,
                &format!("sheath_certificate_installs_total{{{labels}}}")
            ),
            installs
        );
        assert_eq!(
            value(&scrape, &format!("sheath_certificate_valid{{{labels}}}")),
            1.0
        );
    }
    let observed = proxy.running().observe();
    let certs = sheath::admin::certs(&observed);
    let listener = &certs["listeners"][0];
    assert_eq!(listener["certificate"]["serial"], default.as_str());
    assert_eq!(listener["sni_certs"][0]["cert"], "sni_cert[0]");
    assert_eq!(
        listener["sni_certs"][0]["certificate"]["serial"],
        second.as_str()
    );
    assert_eq!(listener["sni_certs"][0]["valid"], true);
    assert!(listener["sni_certs"][0]["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("api.pem")));
    assert!(sheath::admin::readiness(&observed).is_empty());
}

#[tokio::test]
async fn a_reload_adds_an_sni_certificate_and_open_connections_stay() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let default = write_cert(&pki, &d, "default", &["localhost"]);
    let api = write_cert(&pki, &d, "api", &["api.test"]);
    let head = format!(
        "[global]\nstate_dir = \"{}\"\n\n[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"tcp\"\n{}",
        d.join("state").display(),
        backend::tcp_echo().await,
        files_table("[listener.cert]", &d, "default"),
    );
    let proxy = Proxy::start_in(&head, dir).await.unwrap();
    let addr = proxy.addr("l");
    assert_eq!(served_serial(addr, Some("api.test")).await, default);

    // A connection open across the reload keeps working.
    let mut open = connect_as(addr, client_config(pki.roots(), &[]), "localhost")
        .await
        .unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();

    let with_sni = format!("{head}{}", files_table("[[listener.sni_cert]]", &d, "api"));
    let config = sheath::config::Config::from_toml(&d.join("sheath.toml"), &with_sni).unwrap();
    proxy.running().reload(config).await.unwrap();
    assert_eq!(proxy.addr("l"), addr, "the listener kept its socket");
    assert_eq!(verified_serial(addr, pki.roots(), "api.test").await, api);
    assert_eq!(
        verified_serial(addr, pki.roots(), "localhost").await,
        default
    );

    open.write_all(b"after!").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
}

#[tokio::test]
async fn an_sni_certificate_not_yet_issued_holds_readiness_but_not_the_default() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let default = write_cert(&pki, &d, "default", &["localhost"]);
    let ca = pki.write_ca(&d);
    // An ACME server that is not there: the SNI certificate cannot be had.
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"tcp\"\n{}\n[[listener.sni_cert]]\nsource = \"acme\"\ndirectory = \"https://127.0.0.1:{}/dir\"\nca_root = \"{}\"\nnames = [\"api.test\"]\n",
        backend::tcp_echo().await,
        files_table("[listener.cert]", &d, "default"),
        crate::common::backend::closed_port().await.port(),
        ca.display(),
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let addr = proxy.addr("l");
    let observed = proxy.running().observe();
    let reasons = sheath::admin::readiness(&observed);
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].starts_with("listener `l` sni_cert[0]: no certificate yet from acme"),
        "{reasons:?}"
    );
    // Meanwhile every client is served the default certificate.
    assert_eq!(served_serial(addr, Some("api.test")).await, default);
    assert_eq!(
        verified_serial(addr, pki.roots(), "localhost").await,
        default
    );
}

#[tokio::test]
async fn an_acme_sni_certificate_is_issued_over_the_listeners_own_port() {
    use crate::acme::{ca_root, pebble, verified_roundtrip, wait_installs};
    // Pebble validates TLS-ALPN-01 on this listener's port, asking for
    // app.test: the validation handshake must reach the challenge
    // certificate although the listener serves several by SNI.
    let Some(setup) = pebble(None, false, None, 0).await else {
        return;
    };
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let default = write_cert(&pki, &d, "default", &["localhost"]);
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:{}\"\nupstream = \"{}\"\nmode = \"tcp\"\n{}\n[[listener.sni_cert]]\nsource = \"acme\"\nnames = [\"app.test\"]\ndirectory = \"{}\"\nretry_min = \"200ms\"\nretry_max = \"2s\"\n{}",
        setup.port,
        backend::tcp_echo().await,
        files_table("[listener.cert]", &d, "default"),
        setup.pebble.directory,
        ca_root(&setup),
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let addr = proxy.addr("l");
    let status = proxy.running().listener("l").unwrap().certs[1]
        .status
        .clone();
    wait_installs(&status, 1, &setup.pebble).await;

    let root = setup.pebble.issuing_root_pem().await;
    let served = verified_roundtrip(addr, &root).await.unwrap();
    assert_eq!(served, status.load().current.as_ref().unwrap().serial);
    assert_eq!(
        verified_serial(addr, pki.roots(), "localhost").await,
        default
    );
    assert!(sheath::admin::readiness(&proxy.running().observe()).is_empty());
}

/// `openssl s_client` asking for `sni` with `args` (signature algorithms,
/// suites) and verifying the chain and the name against `ca`: the serial
/// of the certificate it accepted, or its output when the handshake or the
/// verification failed.
async fn s_client_serial(
    addr: SocketAddr,
    ca: &Path,
    sni: &str,
    args: &[&str],
) -> Result<String, String> {
    let out = within(
        "openssl s_client",
        tokio::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr.to_string(),
                "-servername",
                sni,
            ])
            .args(["-verify_hostname", sni, "-verify_return_error", "-CAfile"])
            .arg(ca)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = all.find("-----BEGIN CERTIFICATE-----").and_then(|start| {
        let end = all[start..].find("-----END CERTIFICATE-----")?;
        Some(&all[start..start + end + "-----END CERTIFICATE-----".len()])
    });
    match pem {
        Some(pem) if out.status.success() && all.contains("Verify return code: 0 (ok)") => {
            Ok(serial_of(pem))
        }
        _ => Err(all),
    }
}

#[tokio::test]
async fn of_two_certificates_for_one_name_the_client_gets_one_it_can_verify() {
    // nginx, Envoy and Go serve an RSA and an ECDSA certificate for one
    // name side by side, so that clients without ECDSA still connect.
    if !require_tool("openssl") {
        return;
    }
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    write_cert(&pki, &d, "default", &["localhost"]);
    let write_keyed = |stem: &str, names: &[&str], alg| {
        let (cert, key) = pki.server_cert_keyed(names, alg);
        replace(&d.join(format!("{stem}.key")), &key);
        replace(&d.join(format!("{stem}.pem")), &cert);
        serial_of(&cert)
    };
    let ecdsa = write_keyed("ecdsa", &["dual.test"], &rcgen::PKCS_ECDSA_P256_SHA256);
    let rsa = write_keyed("rsa", &["dual.test"], &rcgen::PKCS_RSA_SHA256);
    // An exact name with a key the client cannot use loses to a wildcard
    // it can, which carries the name just as well.
    let ed = write_keyed("ed", &["x.wild.test"], &rcgen::PKCS_ED25519);
    let wild_rsa = write_keyed("wild", &["*.wild.test"], &rcgen::PKCS_RSA_SHA256);
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"tcp\"\n{}{}{}{}{}",
        backend::tcp_echo().await,
        files_table("[listener.cert]", &d, "default"),
        files_table("[[listener.sni_cert]]", &d, "ecdsa"),
        files_table("[[listener.sni_cert]]", &d, "rsa"),
        files_table("[[listener.sni_cert]]", &d, "ed"),
        files_table("[[listener.sni_cert]]", &d, "wild"),
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let addr = proxy.addr("l");
    let ca = pki.write_ca(proxy.dir.path());

    let rsa_only = ["-sigalgs", "rsa_pss_rsae_sha256:rsa_pkcs1_sha256"];
    for (what, sni, args, want) in [
        // A client that takes either gets the first in file order.
        ("any key", "dual.test", &[][..], &ecdsa),
        (
            "TLS 1.3, RSA signatures only",
            "dual.test",
            &rsa_only[..],
            &rsa,
        ),
        (
            "TLS 1.2, ECDSA signatures only",
            "dual.test",
            &["-tls1_2", "-sigalgs", "ecdsa_secp256r1_sha256"][..],
            &ecdsa,
        ),
        // TLS 1.2 ties the key to the suite: ECDHE-RSA suites need an RSA
        // certificate, whatever signatures the client lists.
        (
            "TLS 1.2, ECDHE-RSA suites only",
            "dual.test",
            &["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"][..],
            &rsa,
        ),
        ("any key", "x.wild.test", &[][..], &ed),
        (
            "RSA signatures only",
            "x.wild.test",
            &rsa_only[..],
            &wild_rsa,
        ),
    ] {
        match s_client_serial(addr, &ca, sni, args).await {
            Ok(serial) => assert_eq!(&serial, want, "{sni}, {what}"),
            Err(out) => panic!("{sni}, {what}: handshake or verification failed:\n{out}"),
        }
    }
}

#[tokio::test]
async fn a_request_for_another_name_than_the_sni_reaches_the_upstream_as_asked() {
    // What the README promises on HTTP listeners with several names: no
    // 421 for a Host other than the SNI (browsers coalesce HTTP/2
    // connections over every name a certificate covers), and a client
    // whose ALPN offers neither h2 nor http/1.1 is refused, not served.
    if !require_tool("curl") || !require_tool("openssl") {
        return;
    }
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    write_cert(&pki, &d, "default", &["localhost"]);
    let api = write_cert(&pki, &d, "api", &["api.test"]);
    write_cert(&pki, &d, "www", &["www.test"]);
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\n{}{}{}",
        backend::http().await,
        files_table("[listener.cert]", &d, "default"),
        files_table("[[listener.sni_cert]]", &d, "api"),
        files_table("[[listener.sni_cert]]", &d, "www"),
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let addr = proxy.addr("l");
    let ca = pki.write_ca(proxy.dir.path());
    assert_eq!(verified_serial(addr, pki.roots(), "api.test").await, api);

    for version in ["--http1.1", "--http2"] {
        let out = within(
            "curl",
            tokio::process::Command::new("curl")
                .args(["-sS", "--fail", version, "--cacert"])
                .arg(&ca)
                .arg("--resolve")
                .arg(format!("api.test:{}:127.0.0.1", addr.port()))
                .args(["-H", "Host: www.test"])
                .arg(format!("https://api.test:{}/headers", addr.port()))
                .output(),
        )
        .await
        .unwrap();
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(head.contains("host: www.test"), "{version}: {head}");
        assert!(
            head.contains("x-forwarded-host: www.test"),
            "{version}: {head}"
        );
    }

    let out = within(
        "openssl s_client -alpn",
        tokio::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr.to_string()])
            .args(["-servername", "api.test", "-alpn", "spdy/3,http/1.0"])
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "served without ALPN agreement:\n{text}"
    );
    assert!(text.contains("no application protocol"), "{text}");
}
