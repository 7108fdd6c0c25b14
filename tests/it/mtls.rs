//! Client-certificate enforcement: the bad-certificate matrix, allow-lists,
//! identity forwarding that cannot be spoofed, PROXY protocol, trust
//! rotation, and real clients (curl, openssl).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Request;
use rcgen::ExtendedKeyUsagePurpose;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::common::client::{self, body_text, header, parse_headers};
use crate::common::pki::ClientSpec;
use crate::common::{backend, require_tool, within, write_atomically, Proxy, TestPki};

/// An echo backend that counts every connection and byte it receives, to
/// prove a refused client reached nothing.
#[derive(Clone, Default)]
struct Recorder {
    connections: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

async fn recording_echo() -> (SocketAddr, Recorder) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rec = Recorder::default();
    let r = rec.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            r.connections.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            r.bytes.fetch_add(n as u64, Ordering::SeqCst);
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rec)
}

async fn mtls_proxy(
    pki: &TestPki,
    upstream: SocketAddr,
    mode: &str,
    client_auth: &str,
    extra: &str,
) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let ca = pki.write_ca(dir.path());
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"{mode}\"\n{extra}\n{}\n[listener.client_auth]\nca = \"{}\"\n{client_auth}\n",
        crate::common::pki::files_cert_toml(&files),
        ca.display()
    );
    Proxy::start_in(&toml, dir).await.unwrap()
}

/// Connect with `client`, send a probe and expect the echo. TLS 1.3
/// clients only learn about a refused certificate on their first read, so
/// the whole exchange is the test.
async fn exchange(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let mut tls = client::connect(addr, config)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"probe").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 5];
    match tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"probe" => Ok(()),
        Ok(Ok(_)) => Err("wrong echo".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

fn anonymous(pki: &TestPki) -> Arc<rustls::ClientConfig> {
    client::client_config(pki.roots(), &[])
}

#[tokio::test]
async fn bad_client_certificates_fail_the_handshake_and_forward_nothing() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let (upstream, rec) = recording_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let revoked_spec = ClientSpec::new("revoked");
    let crl = dir.path().join("clients.crl");
    std::fs::write(&crl, pki.crl(&[revoked_spec.serial])).unwrap();
    let proxy = mtls_proxy(
        &pki,
        upstream,
        "tcp",
        &format!("mode = \"require\"\ncrl = \"{}\"\n", crl.display()),
        "",
    )
    .await;
    let addr = proxy.addr("l");
    let now = SystemTime::now();

    let mut expired = ClientSpec::new("expired");
    expired.not_before = now - Duration::from_secs(7200);
    expired.not_after = now - Duration::from_secs(3600);
    let mut future = ClientSpec::new("future");
    future.not_before = now + Duration::from_secs(3600);
    future.not_after = now + Duration::from_secs(7200);
    let mut server_only = ClientSpec::new("server-eku");
    server_only.eku = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let mut ca_as_leaf = ClientSpec::new("a CA");
    ca_as_leaf.is_ca = true;
    let roots = pki.roots();
    let cases: Vec<(&str, Arc<rustls::ClientConfig>)> = vec![
        ("no certificate", anonymous(&pki)),
        (
            "other CA",
            other
                .client(&ClientSpec::new("stranger"))
                .rustls_config(roots.clone(), &[]),
        ),
        (
            "expired",
            pki.client(&expired).rustls_config(roots.clone(), &[]),
        ),
        (
            "not yet valid",
            pki.client(&future).rustls_config(roots.clone(), &[]),
        ),
        (
            "server-auth-only EKU",
            pki.client(&server_only).rustls_config(roots.clone(), &[]),
        ),
        (
            "CA certificate as leaf",
            pki.client(&ca_as_leaf).rustls_config(roots.clone(), &[]),
        ),
        (
            "self-signed",
            pki.client_self_signed(&ClientSpec::new("me"))
                .rustls_config(roots.clone(), &[]),
        ),
        (
            "revoked",
            pki.client(&revoked_spec).rustls_config(roots.clone(), &[]),
        ),
    ];
    for (what, config) in cases {
        let result = exchange(addr, config).await;
        assert!(result.is_err(), "{what}: accepted");
        assert_eq!(
            rec.connections.load(Ordering::SeqCst),
            0,
            "{what}: reached the upstream"
        );
    }
    assert_eq!(rec.bytes.load(Ordering::SeqCst), 0);
    assert!(
        proxy
            .running()
            .listener("l")
            .unwrap()
            .stats
            .handshake_failures
            .load(Ordering::Relaxed)
            >= 8
    );

    // The control: a good client gets through.
    exchange(
        addr,
        pki.client(&ClientSpec::new("good"))
            .rustls_config(roots, &[]),
    )
    .await
    .unwrap();
    assert_eq!(rec.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn optional_mode_lets_anonymous_clients_in_but_still_refuses_bad_certificates() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let (upstream, _) = recording_echo().await;
    let proxy = mtls_proxy(&pki, upstream, "tcp", "mode = \"optional\"\n", "").await;
    let addr = proxy.addr("l");
    exchange(addr, anonymous(&pki)).await.unwrap();
    exchange(
        addr,
        pki.client(&ClientSpec::new("ok"))
            .rustls_config(pki.roots(), &[]),
    )
    .await
    .unwrap();
    assert!(exchange(
        addr,
        other
            .client(&ClientSpec::new("x"))
            .rustls_config(pki.roots(), &[])
    )
    .await
    .is_err());
}

#[tokio::test]
async fn allow_list_near_misses_are_refused_and_exact_matches_pass() {
    let pki = TestPki::new();
    let (upstream, rec) = recording_echo().await;
    let proxy = mtls_proxy(
        &pki,
        upstream,
        "tcp",
        "mode = \"require\"\nallow_dns = [\"api.internal\"]\nallow_uri = [\"spiffe://example.org/ns/*/sa/frontend\"]\nallow_ip = [\"192.0.2.7\"]\nallow_cn = [\"ops-bot\"]\nallow_ou = [\"payments\"]\n",
        "",
    )
    .await;
    let addr = proxy.addr("l");
    let roots = pki.roots();
    let with = |f: &dyn Fn(&mut ClientSpec)| {
        let mut spec = ClientSpec::new("nobody");
        f(&mut spec);
        pki.client(&spec).rustls_config(roots.clone(), &[])
    };
    let passing: Vec<(&str, Arc<rustls::ClientConfig>)> = vec![
        ("dns", with(&|s| s.dns = vec!["api.internal".into()])),
        // DNS names have no case (RFC 4343, RFC 5280 §7.2): a certificate
        // for API.Internal names the same host.
        ("dns case", with(&|s| s.dns = vec!["API.Internal".into()])),
        (
            "uri",
            with(&|s| s.uris = vec!["spiffe://example.org/ns/prod/sa/frontend".into()]),
        ),
        ("ip", with(&|s| s.ips = vec!["192.0.2.7".parse().unwrap()])),
        ("cn", with(&|s| s.cn = "ops-bot".into())),
        ("ou", with(&|s| s.ou = vec!["payments".into()])),
    ];
    for (what, config) in passing {
        exchange(addr, config)
            .await
            .unwrap_or_else(|e| panic!("{what}: refused: {e}"));
    }
    let before = rec.connections.load(Ordering::SeqCst);
    let near_misses: Vec<(&str, Arc<rustls::ClientConfig>)> = vec![
        (
            "dns trailing dot",
            with(&|s| s.dns = vec!["api.internal.".into()]),
        ),
        (
            "dns subdomain",
            with(&|s| s.dns = vec!["x.api.internal".into()]),
        ),
        (
            "uri other trust domain",
            with(&|s| s.uris = vec!["spiffe://example.com/ns/prod/sa/frontend".into()]),
        ),
        (
            "uri wildcard across segments",
            with(&|s| s.uris = vec!["spiffe://example.org/ns/a/b/sa/frontend".into()]),
        ),
        (
            "uri other service",
            with(&|s| s.uris = vec!["spiffe://example.org/ns/prod/sa/backend".into()]),
        ),
        (
            "ip other family",
            with(&|s| s.ips = vec!["::ffff:192.0.2.7".parse().unwrap()]),
        ),
        (
            "ip neighbour",
            with(&|s| s.ips = vec!["192.0.2.8".parse().unwrap()]),
        ),
        ("cn case", with(&|s| s.cn = "Ops-Bot".into())),
        ("ou other", with(&|s| s.ou = vec!["payment".into()])),
        ("nothing matching", with(&|_| {})),
    ];
    for (what, config) in near_misses {
        assert!(exchange(addr, config).await.is_err(), "{what}: accepted");
    }
    assert_eq!(
        rec.connections.load(Ordering::SeqCst),
        before,
        "a refused client reached the upstream"
    );
}

#[tokio::test]
async fn certificate_and_spki_pins() {
    let pki = TestPki::new();
    let (upstream, _) = recording_echo().await;
    let pinned = pki.client(&ClientSpec::new("pinned"));
    let spki_pinned = pki.client(&ClientSpec::new("spki"));
    let id = sheath::tls::client_auth::ClientIdentity::from_chain(&spki_pinned.der, &[]).unwrap();
    let proxy = mtls_proxy(
        &pki,
        upstream,
        "tcp",
        &format!(
            "mode = \"require\"\nallow_cert_sha256 = [\"{}\"]\nallow_spki_sha256 = [\"{}\"]\n",
            crate::common::sha256(&pinned.der),
            id.spki_sha256
        ),
        "",
    )
    .await;
    let addr = proxy.addr("l");
    exchange(addr, pinned.rustls_config(pki.roots(), &[]))
        .await
        .unwrap();
    exchange(addr, spki_pinned.rustls_config(pki.roots(), &[]))
        .await
        .unwrap();
    let unpinned = pki.client(&ClientSpec::new("pinned"));
    assert!(exchange(addr, unpinned.rustls_config(pki.roots(), &[]))
        .await
        .is_err());
}

#[tokio::test]
async fn identity_reaches_the_backend_and_forged_headers_never_do() {
    let pki = TestPki::new();
    let proxy = mtls_proxy(
        &pki,
        backend::http().await,
        "http",
        "mode = \"optional\"\nforward = [\"xfcc\", \"client-cert\", \"header\"]\nidentity_header = \"X-Client-Id\"\n",
        "",
    )
    .await;
    let mut spec = ClientSpec::new("frontend");
    spec.uris = vec!["spiffe://example.org/ns/prod/sa/frontend".into()];
    spec.dns = vec!["frontend.prod".into()];
    let cert = pki.client(&spec);
    let forged = |path: &str| {
        Request::get(path)
            .header("host", "localhost")
            .header(
                "x-forwarded-client-cert",
                "Hash=forged;URI=spiffe://evil/admin",
            )
            .header("client-cert", ":Zm9yZ2Vk:")
            .header("client-cert-chain", ":Zm9yZ2Vk:")
            .header("x-client-id", "spiffe://evil/admin")
            // The default header name, not the configured one: a backend
            // may still trust it.
            .header("x-client-identity", "spiffe://evil/admin")
            .body(client::empty())
            .unwrap()
    };

    // With a certificate: sheath's values, exactly once each.
    let mut sender = client::h1_with(
        proxy.addr("l"),
        cert.rustls_config(pki.roots(), &[b"http/1.1"]),
    )
    .await;
    let text = body_text(sender.send_request(forged("/headers")).await.unwrap()).await;
    let h = parse_headers(&text);
    let sha = crate::common::sha256(&cert.der);
    assert_eq!(
        header(&h, "x-forwarded-client-cert"),
        [format!("Hash={sha};Subject=\"CN=frontend\";URI=spiffe://example.org/ns/prod/sa/frontend;DNS=frontend.prod").as_str()]
    );
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&cert.der);
    assert_eq!(header(&h, "client-cert"), [format!(":{b64}:").as_str()]);
    assert!(header(&h, "client-cert-chain").is_empty(), "{text}");
    assert_eq!(
        header(&h, "x-client-id"),
        ["spiffe://example.org/ns/prod/sa/frontend"]
    );
    assert!(header(&h, "x-client-identity").is_empty(), "{text}");

    // Without a certificate: nothing of the forged headers survives.
    let mut anon = client::h1(proxy.addr("l"), pki.roots()).await;
    let text = body_text(anon.send_request(forged("/headers")).await.unwrap()).await;
    let h = parse_headers(&text);
    for name in [
        "x-forwarded-client-cert",
        "client-cert",
        "client-cert-chain",
        "x-client-id",
        "x-client-identity",
    ] {
        assert!(header(&h, name).is_empty(), "{name} leaked: {text}");
    }
}

/// CGI, WSGI and Rack map `-` and `_` in a header name to the same
/// variable, so `X_Forwarded_Client_Cert` reaches such an application as
/// `X-Forwarded-Client-Cert` would: every look-alike of a name sheath
/// sets goes too, in the head and in the trailers, and names that only
/// resemble one pass.
#[tokio::test]
async fn lookalike_names_with_underscores_never_reach_the_backend() {
    use http_body_util::BodyExt;

    let pki = TestPki::new();
    let proxy = mtls_proxy(
        &pki,
        backend::http().await,
        "http",
        "mode = \"optional\"\nforward = [\"xfcc\", \"header\"]\nidentity_header = \"X-Client-Id\"\n",
        "",
    )
    .await;
    let lookalikes = [
        "x_forwarded_client_cert",
        "client_cert",
        "client-cert_chain",
        "x_client_identity",
        "x_client_id",
        "x_forwarded_for",
        "x-forwarded_proto",
        "x_real_ip",
    ];
    // Same letters, another name: not sheath's to remove.
    let kept = ["x_client", "x-forwarded-for_", "client_certs"];
    let forged = |mut req: http::request::Builder| {
        for name in lookalikes.iter().chain(&kept) {
            req = req.header(*name, "spiffe://evil/admin");
        }
        req.body(client::empty()).unwrap()
    };
    let mut h1 = client::h1(proxy.addr("l"), pki.roots()).await;
    let mut h2 = client::h2(proxy.addr("l"), pki.roots()).await;
    for (version, resp) in [
        (
            "HTTP/1.1",
            h1.send_request(forged(Request::get("/headers").header("host", "localhost")))
                .await,
        ),
        (
            "HTTP/2",
            h2.send_request(forged(Request::get("https://localhost/headers")))
                .await,
        ),
    ] {
        let text = body_text(resp.unwrap()).await;
        let h = parse_headers(&text);
        for name in lookalikes {
            assert!(
                header(&h, name).is_empty(),
                "{version}: {name} leaked: {text}"
            );
        }
        for name in kept {
            assert_eq!(
                header(&h, name),
                ["spiffe://evil/admin"],
                "{version}: {text}"
            );
        }
        // sheath's own values are there, once.
        assert_eq!(
            header(&h, "x-forwarded-for"),
            ["127.0.0.1"],
            "{version}: {text}"
        );
    }

    // The same look-alikes as trailers of an upload, echoed back.
    let mut trailers = http::HeaderMap::new();
    for name in lookalikes.iter().chain(&kept) {
        trailers.insert(*name, "spiffe://evil/admin".parse().unwrap());
    }
    let req = client::post_with_trailers("/echo", b"payload", trailers);
    let resp = within("echo", h1.send_request(req)).await.unwrap();
    let body = within("echo body", resp.into_body().collect())
        .await
        .unwrap();
    let trailers = body.trailers().cloned().expect("trailers came back");
    for name in lookalikes {
        assert!(!trailers.contains_key(name), "{name} leaked: {trailers:?}");
    }
    for name in kept {
        assert!(trailers.contains_key(name), "{name} dropped: {trailers:?}");
    }
}

/// Trailers are a second header section that HTTP/1.1 (chunked) and
/// HTTP/2 let a client send after its body. A backend that merges them
/// into the head, as RFC 9110 forbids and some frameworks do, must find
/// no identity or forwarding name there but sheath's: they are stripped
/// from the trailers over every client and upstream protocol, and the
/// client's other trailers pass.
#[tokio::test]
async fn forged_identity_in_request_trailers_never_reaches_the_backend() {
    use http_body_util::BodyExt;

    let forged_names = [
        "x-forwarded-client-cert",
        "client-cert",
        "client-cert-chain",
        "x-client-id",
        "x-client-identity",
        "x-forwarded-for",
        "forwarded",
    ];
    let upload = |uri: &str| {
        let mut trailers = http::HeaderMap::new();
        for name in forged_names {
            trailers.insert(name, "spiffe://evil/admin".parse().unwrap());
        }
        trailers.insert("x-checksum", "c0ffee".parse().unwrap());
        client::post_with_trailers(uri, b"payload", trailers)
    };
    for (upstream, extra) in [
        (backend::http().await, ""),
        (
            backend::CountingBackend::speaking(backend::Speaks::H2c)
                .await
                .addr,
            "upstream_protocol = \"h2c\"",
        ),
    ] {
        let pki = TestPki::new();
        let proxy = mtls_proxy(
            &pki,
            upstream,
            "http",
            "mode = \"optional\"\nforward = [\"xfcc\", \"client-cert\", \"header\"]\nidentity_header = \"X-Client-Id\"\n",
            extra,
        )
        .await;
        let mut h1 = client::h1(proxy.addr("l"), pki.roots()).await;
        let mut h2 = client::h2(proxy.addr("l"), pki.roots()).await;
        for (client, resp) in [
            ("HTTP/1.1", h1.send_request(upload("/echo")).await),
            (
                "HTTP/2",
                h2.send_request(upload("https://localhost/echo")).await,
            ),
        ] {
            let what = format!("{client} client, upstream {extra:?}");
            let body = within("echo", resp.unwrap().into_body().collect())
                .await
                .unwrap();
            let trailers = body
                .trailers()
                .cloned()
                .unwrap_or_else(|| panic!("{what}: no trailers came back"));
            assert_eq!(trailers["x-checksum"], "c0ffee", "{what}: {trailers:?}");
            for name in forged_names {
                assert!(
                    !trailers.contains_key(name),
                    "{what}: {name} reached the backend in the trailers: {trailers:?}"
                );
            }
            assert_eq!(body.to_bytes(), "payload", "{what}");
        }
    }
}

#[tokio::test]
async fn forged_identity_headers_are_stripped_even_without_client_auth() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\n{}",
        backend::http().await,
        crate::common::pki::files_cert_toml(&files)
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let forged_names = [
        "x-forwarded-client-cert",
        "client-cert",
        "client-cert-chain",
        // sheath's default for forward = ["header"], never configured here.
        "x-client-identity",
    ];
    let forged = |mut req: http::request::Builder| {
        for name in forged_names {
            req = req.header(name, "spiffe://evil/admin");
        }
        req.body(client::empty()).unwrap()
    };
    let mut h2 = client::h2(proxy.addr("l"), pki.roots()).await;
    let mut h1 = client::h1(proxy.addr("l"), pki.roots()).await;
    for (version, text) in [
        (
            "HTTP/2",
            body_text(
                h2.send_request(forged(Request::get("https://localhost/headers")))
                    .await
                    .unwrap(),
            )
            .await,
        ),
        (
            "HTTP/1.1",
            body_text(
                h1.send_request(forged(Request::get("/headers").header("host", "localhost")))
                    .await
                    .unwrap(),
            )
            .await,
        ),
    ] {
        assert!(text.contains("GET /headers"), "{version}: {text}");
        let h = parse_headers(&text);
        for name in forged_names {
            assert!(
                header(&h, name).is_empty(),
                "{version}: {name} leaked: {text}"
            );
        }
    }
}

/// A PROXY protocol v2 parser written from the specification, independent
/// of the crate sheath uses to write headers.
struct ProxyV2 {
    src: SocketAddr,
    dst: SocketAddr,
    tlvs: Vec<(u8, Vec<u8>)>,
}

async fn read_proxy_v2(s: &mut tokio::net::TcpStream) -> ProxyV2 {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..12], b"\r\n\r\n\0\r\nQUIT\n", "v2 signature");
    assert_eq!(head[12], 0x21, "version 2, PROXY command");
    assert_eq!(head[13], 0x11, "TCP over IPv4");
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    let ip = |b: &[u8]| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let src = SocketAddr::from((ip(&body[0..4]), u16::from_be_bytes([body[8], body[9]])));
    let dst = SocketAddr::from((ip(&body[4..8]), u16::from_be_bytes([body[10], body[11]])));
    let mut tlvs = Vec::new();
    let mut rest = &body[12..];
    while !rest.is_empty() {
        let kind = rest[0];
        let l = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        tlvs.push((kind, rest[3..3 + l].to_vec()));
        rest = &rest[3 + l..];
    }
    ProxyV2 { src, dst, tlvs }
}

#[tokio::test]
async fn proxy_protocol_v2_carries_address_tls_details_and_client_certificate() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let header = read_proxy_v2(&mut s).await;
        let mut after = [0u8; 5];
        s.read_exact(&mut after).await.unwrap();
        s.write_all(&after).await.unwrap();
        let _ = tx.send(header);
    });
    let pki = TestPki::new();
    let proxy = mtls_proxy(
        &pki,
        upstream,
        "tcp",
        "mode = \"require\"\n",
        "proxy_protocol = \"v2\"\nalpn = [\"postgresql\"]\n",
    )
    .await;
    let cert = pki.client(&ClientSpec::new("db-client"));
    let tcp = tokio::net::TcpStream::connect(proxy.addr("l"))
        .await
        .unwrap();
    let client_addr = tcp.local_addr().unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(
        cert.rustls_config(pki.roots(), &[b"imap", b"postgresql"]),
    )
    .connect(
        rustls::pki_types::ServerName::try_from("localhost").unwrap(),
        tcp,
    )
    .await
    .unwrap();
    tls.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    within("echo after the PROXY header", tls.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"hello");
    let header = within("header", rx).await.unwrap();
    assert_eq!(header.src, client_addr);
    assert_eq!(header.dst, proxy.addr("l"));
    let tlv = |k: u8| {
        header
            .tlvs
            .iter()
            .find(|(kind, _)| *kind == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(tlv(0x01).unwrap(), b"postgresql", "the negotiated ALPN");
    assert_eq!(tlv(0x02).unwrap(), b"localhost", "authority = SNI");
    assert_eq!(tlv(0xE0).unwrap(), cert.der.as_ref(), "client certificate");
    let ssl = tlv(0x20).expect("SSL TLV");
    assert_eq!(
        ssl[0], 0x07,
        "PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS"
    );
    assert_eq!(&ssl[1..5], &[0, 0, 0, 0], "verified");
    let mut subs = Vec::new();
    let mut rest = &ssl[5..];
    while !rest.is_empty() {
        let l = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        subs.push((rest[0], String::from_utf8(rest[3..3 + l].to_vec()).unwrap()));
        rest = &rest[3 + l..];
    }
    assert!(subs.contains(&(0x21, "TLSv1.3".into())), "{subs:?}");
    assert!(subs.contains(&(0x22, "db-client".into())), "{subs:?}");
    assert!(
        subs.iter()
            .any(|(k, v)| *k == 0x23 && v.starts_with("TLS13_")),
        "{subs:?}"
    );
}

#[tokio::test]
async fn proxy_protocol_v1_line() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            s.read_exact(&mut byte).await.unwrap();
            line.push(byte[0]);
        }
        // What follows the line is the client's stream, byte for byte.
        let mut after = [0u8; 5];
        s.read_exact(&mut after).await.unwrap();
        let _ = tx.send((String::from_utf8(line).unwrap(), after));
    });
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\nproxy_protocol = \"v1\"\n{}",
        crate::common::pki::files_cert_toml(&files)
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let tcp = tokio::net::TcpStream::connect(proxy.addr("l"))
        .await
        .unwrap();
    let client_addr = tcp.local_addr().unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client::client_config(pki.roots(), &[]))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.write_all(b"hello").await.unwrap();
    let (line, after) = within("PROXY line", rx).await.unwrap();
    assert_eq!(
        line,
        format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
            client_addr.port(),
            proxy.addr("l").port()
        )
    );
    assert_eq!(
        &after, b"hello",
        "the line is followed by the client's bytes, nothing else"
    );
}

/// HAProxy with `accept-proxy`, a real receiver of both versions, behind
/// sheath: its TCP frontend passes on to an echo backend what follows the
/// header, and its HTTP frontend answers with the addresses and authority
/// it read from the header.
#[tokio::test]
async fn haproxy_reads_the_header_and_then_exactly_the_client_bytes() {
    if !require_tool("haproxy") {
        return;
    }
    use crate::common::pebble::free_port;
    let (tcp_port, http_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "defaults\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend tcp\n  mode tcp\n  bind 127.0.0.1:{tcp_port} accept-proxy\n  default_backend echo\n\
             backend echo\n  mode tcp\n  server echo {}\n\
             frontend http\n  mode http\n  bind 127.0.0.1:{http_port} accept-proxy\n  \
             http-request return status 200 content-type text/plain lf-string \"src=%ci:%cp dst=%fi:%fp authority=%[fc_pp_authority].\"\n",
            backend::tcp_echo().await
        ),
    )
    .unwrap();
    let mut haproxy = tokio::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    within("haproxy listens", async {
        for port in [tcp_port, http_port] {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await;

    let pki = TestPki::new();
    let files = pki.write_server(dir.path(), "server");
    let cert = crate::common::pki::files_cert_toml(&files);
    let mut toml = String::new();
    for version in ["v1", "v2"] {
        for (name, port) in [("tcp", tcp_port), ("http", http_port)] {
            toml.push_str(&format!(
                "[[listener]]\nname = \"{name}-{version}\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:{port}\"\nmode = \"tcp\"\nproxy_protocol = \"{version}\"\n{cert}\n"
            ));
        }
    }
    let proxy = Proxy::start_in(&toml, tempfile::tempdir().unwrap())
        .await
        .unwrap();
    let connect = |listener: String| {
        let addr = proxy.addr(&listener);
        let config = client::client_config(pki.roots(), &[]);
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let local = tcp.local_addr().unwrap();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(
                    rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                    tcp,
                )
                .await
                .unwrap();
            (tls, local, addr)
        }
    };
    for version in ["v1", "v2"] {
        let (mut tls, _, _) = connect(format!("tcp-{version}")).await;
        tls.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        within("echo through haproxy", tls.read_exact(&mut echoed))
            .await
            .unwrap();
        assert_eq!(&echoed, b"ping", "{version}: what haproxy passed on");

        let (mut tls, client, listener) = connect(format!("http-{version}")).await;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = within("haproxy's answer", backend::read_to_end(&mut tls))
            .await
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        let authority = if version == "v2" { "localhost" } else { "" };
        assert!(
            answer.ends_with(&format!(
                "src={client} dst={listener} authority={authority}."
            )),
            "{version}: {answer}"
        );
    }
    haproxy.kill().await.unwrap();
}

#[tokio::test]
async fn rotated_ca_bundle_and_crl_apply_to_new_handshakes() {
    let old_ca = TestPki::new();
    let new_ca = TestPki::new();
    let (upstream, _) = recording_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let files = old_ca.write_server(dir.path(), "server");
    let bundle = dir.path().join("clients.pem");
    let crl = dir.path().join("clients.crl");
    std::fs::write(&bundle, &old_ca.ca_pem).unwrap();
    std::fs::write(&crl, old_ca.crl(&[])).unwrap();
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n{}\n[listener.client_auth]\nmode = \"require\"\nca = \"{}\"\ncrl = [\"{}\"]\npoll_interval = \"5s\"\n",
        crate::common::pki::files_cert_toml(&files),
        bundle.display(),
        crl.display()
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let addr = proxy.addr("l");
    let server_roots = old_ca.roots();
    let old_client = old_ca.client(&ClientSpec::new("old"));
    let new_client = new_ca.client(&ClientSpec::new("new"));
    exchange(addr, old_client.rustls_config(server_roots.clone(), &[]))
        .await
        .unwrap();
    assert!(
        exchange(addr, new_client.rustls_config(server_roots.clone(), &[]))
            .await
            .is_err()
    );

    // An established connection keeps its session across the rotation.
    let mut established =
        client::connect(addr, old_client.rustls_config(server_roots.clone(), &[]))
            .await
            .unwrap();
    established.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    established.read_exact(&mut one).await.unwrap();

    // A broken bundle keeps the last good trust.
    let verifier = proxy
        .running()
        .listener("l")
        .unwrap()
        .client_verifier
        .clone()
        .unwrap();
    write_atomically(&bundle, "garbage");
    within("broken bundle seen", async {
        while verifier.failed_reloads.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    exchange(addr, old_client.rustls_config(server_roots.clone(), &[]))
        .await
        .unwrap();

    write_atomically(&bundle, &new_ca.ca_pem);
    within("new trust applies", async {
        loop {
            let old = exchange(addr, old_client.rustls_config(server_roots.clone(), &[])).await;
            let new = exchange(addr, new_client.rustls_config(server_roots.clone(), &[])).await;
            if old.is_err() && new.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    established.write_all(b"y").await.unwrap();
    established.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"y");

    // Revoking the new client by CRL.
    std::fs::write(&bundle, &new_ca.ca_pem).unwrap();
    write_atomically(
        Path::new(&proxy.dir.path().join("clients.crl")),
        &new_ca.crl(&[new_client.serial]),
    );
    within("revocation applies", async {
        while exchange(addr, new_client.rustls_config(server_roots.clone(), &[]))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn mtls_listeners_do_not_resume_sessions() {
    let pki = TestPki::new();
    let (upstream, _) = recording_echo().await;
    let proxy = mtls_proxy(&pki, upstream, "tcp", "mode = \"require\"\n", "").await;
    // One client config: rustls caches tickets per config and would resume.
    let config = pki
        .client(&ClientSpec::new("c"))
        .rustls_config(pki.roots(), &[]);
    for _ in 0..3 {
        let mut tls = client::connect(proxy.addr("l"), config.clone())
            .await
            .unwrap();
        tls.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        tls.read_exact(&mut one).await.unwrap();
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
    }
}

#[tokio::test]
async fn curl_and_openssl_present_client_certificates() {
    if !require_tool("curl") || !require_tool("openssl") {
        return;
    }
    let pki = TestPki::new();
    let proxy = mtls_proxy(
        &pki,
        backend::http().await,
        "http",
        "mode = \"require\"\nallow_uri = [\"spiffe://example.org/ns/*/sa/cli\"]\nforward = [\"xfcc\"]\n",
        "",
    )
    .await;
    let dir = proxy.dir.path();
    let ca = pki.write_ca(dir);
    let mut spec = ClientSpec::new("cli");
    spec.uris = vec!["spiffe://example.org/ns/dev/sa/cli".into()];
    let (cert, key) = pki.client(&spec).write(dir, "cli");
    let port = proxy.addr("l").port();
    let url = format!("https://localhost:{port}/headers");

    let ok = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg(&url)
        .output()
        .await
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let body = String::from_utf8_lossy(&ok.stdout);
    assert!(body.contains("x-forwarded-client-cert: Hash="), "{body}");
    assert!(
        body.contains("URI=spiffe://example.org/ns/dev/sa/cli"),
        "{body}"
    );

    let refused = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .arg(&url)
        .output()
        .await
        .unwrap();
    assert!(
        !refused.status.success(),
        "curl without a certificate got through"
    );

    let s_client = |with_cert: bool| {
        let mut cmd = tokio::process::Command::new("openssl");
        cmd.args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "localhost",
            "-CAfile",
        ])
        .arg(&ca)
        .args(["-verify_return_error"]);
        if with_cert {
            cmd.arg("-cert").arg(&cert).arg("-key").arg(&key);
        }
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    for with_cert in [true, false] {
        let mut child = s_client(with_cert).spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let out = within("openssl s_client", child.wait_with_output())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        drop(stdin);
        if with_cert {
            assert!(text.contains("HTTP/1.1 200"), "{text}");
            assert!(text.contains("x-forwarded-client-cert"), "{text}");
        } else {
            assert!(
                !text.contains("HTTP/1.1 200"),
                "served without a certificate: {text}"
            );
        }
    }
}

/// What the backend is told of a client presenting a certificate made
/// from `spec` to a listener that requires one and forwards its identity
/// as XFCC and the identity header: the request head it sees, and the
/// certificate's SHA-256.
async fn identity_seen(spec: &ClientSpec) -> (Vec<(String, String)>, String) {
    let pki = TestPki::new();
    let proxy = mtls_proxy(
        &pki,
        backend::http().await,
        "http",
        "mode = \"require\"\nforward = [\"xfcc\", \"header\"]\n",
        "",
    )
    .await;
    let cert = pki.client(spec);
    let mut sender = client::h1_with(
        proxy.addr("l"),
        cert.rustls_config(pki.roots(), &[b"http/1.1"]),
    )
    .await;
    let req = Request::get("/headers")
        .header("host", "localhost")
        .body(client::empty())
        .unwrap();
    let text = body_text(sender.send_request(req).await.unwrap()).await;
    (parse_headers(&text), crate::common::sha256(&cert.der))
}

/// The subject a client certificate carries reaches the backend in XFCC
/// as an RFC 4514 string, each value escaped, so a backend that splits it
/// reads the attributes the certificate has: a CN or OU with a comma and
/// `O=Admins` in it is not an O. Non-ASCII bytes are written as `\XX`, as
/// OpenSSL (and so Envoy) writes them.
#[tokio::test]
async fn a_subject_reaches_the_backend_as_the_attributes_it_has() {
    let mut spec = ClientSpec::new("Jörg, \"x\"; By=spiffe://evil\\");
    spec.ou = vec!["alice, O=Admins".into()];
    let (h, sha) = identity_seen(&spec).await;
    // The RFC 4514 string is `OU=alice\, O=Admins,CN=J\C3\B6rg\, \"x\"\;
    // By=spiffe://evil\\`, then quoted for XFCC (`\` and `"` escaped).
    assert_eq!(
        header(&h, "x-forwarded-client-cert"),
        [format!(
            r#"Hash={sha};Subject="OU=alice\\, O=Admins,CN=J\\C3\\B6rg\\, \\\"x\\\"\\; By=spiffe://evil\\\\""#
        )
        .as_str()]
    );
}

/// A URI or DNS name in a client certificate is ASCII but may hold
/// control characters, which no header value can: the client was then
/// described by an empty XFCC and an empty identity header. They are
/// written as `%XX`, as a URI writes them.
#[tokio::test]
async fn control_characters_in_a_client_identity_are_written_escaped() {
    let mut spec = ClientSpec::new("ok");
    spec.dns = vec!["a\u{1}b.example".into()];
    spec.uris = vec!["spiffe://x/a\u{7}b".into()];
    let (h, sha) = identity_seen(&spec).await;
    assert_eq!(
        header(&h, "x-forwarded-client-cert"),
        [format!("Hash={sha};Subject=\"CN=ok\";URI=spiffe://x/a%07b;DNS=a%01b.example").as_str()]
    );
    assert_eq!(header(&h, "x-client-identity"), ["spiffe://x/a%07b"]);
}

/// Change watchers (inotify instances) this process holds.
pub fn inotify_instances() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.as_os_str() == "anon_inode:inotify")
        .count()
}

/// [`inotify_instances`] once it is `expected`, or ten seconds on. A
/// watcher closes on notify's own thread after its task drops it, so a
/// busy machine may show the count late; [`peak_during_reloads`] is what
/// tells a watcher that stops at once from one that lingers.
pub async fn inotify_instances_settled(expected: usize) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while inotify_instances() != expected && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    inotify_instances()
}

/// Reload `times` times, 100 ms apart, each reload replacing a trust
/// watcher inside its wait for rewritten files to settle, and return the
/// most [`inotify_instances`] seen after a reload. A replaced watcher that
/// finished that wait before looking at its stop lived on for up to two
/// seconds: twenty reloads held some twenty at once. One that stops at
/// once leaves the count where it was, give or take the one still closing
/// as its successor starts.
pub async fn peak_during_reloads<F: std::future::Future<Output = ()>>(
    times: u32,
    mut reload: impl FnMut(u32) -> F,
) -> usize {
    let mut peak = inotify_instances();
    for n in 1..=times {
        tokio::time::sleep(Duration::from_millis(100)).await;
        reload(n).await;
        peak = peak.max(inotify_instances());
    }
    peak
}

/// Rewrite `path` with `contents` every 50 ms, as a rotation tool looping
/// on it would, until the task is aborted: a watcher that sees it waits
/// for a quiet moment that never comes.
pub fn rewriting(path: &Path, contents: &str) -> tokio::task::JoinHandle<()> {
    let (path, contents) = (path.to_path_buf(), contents.to_string());
    tokio::spawn(async move {
        loop {
            write_atomically(&path, &contents);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// A reload that changes client auth replaces the listener's trust
/// watcher, and the old one stops at once, even while its files keep
/// changing. It waited for them to settle first (two seconds at most
/// while written to), so a reload storm during a rotation piled up a
/// watcher, its thread and three descriptors per reload: 300 descriptors
/// more than before at 25 reloads a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_trust_watcher_stops_at_once_while_its_files_change() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    std::fs::create_dir(dir.path().join("trust")).unwrap();
    let bundle = dir.path().join("trust/clients.pem");
    std::fs::write(&bundle, &pki.ca_pem).unwrap();
    let upstream = backend::tcp_echo().await;
    // Each poll interval is other client-auth settings: a new verifier
    // and a new trust watcher.
    let config = |poll: u32| {
        format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n{}\n[listener.client_auth]\nmode = \"require\"\nca = \"{}\"\npoll_interval = \"{poll}s\"\n",
            crate::common::pki::files_cert_toml(&files),
            bundle.display()
        )
    };
    let proxy = Proxy::start_in(&config(10), dir).await.unwrap();
    // One for the certificate's files, one for the trust's (started by
    // its task, so maybe not yet).
    let watchers = 2;
    crate::common::eventually("the trust watcher to start", || {
        inotify_instances() == watchers
    })
    .await;

    let writing = rewriting(&bundle, &pki.ca_pem);
    let running = proxy.running();
    let path = proxy.dir.path().join("sheath.toml");
    let peak = peak_during_reloads(20, |n| {
        let new = sheath::config::Config::from_toml(&path, &config(10 + n)).unwrap();
        async move {
            running.reload(new).await.unwrap();
        }
    })
    .await;
    let left = inotify_instances_settled(watchers).await;
    writing.abort();
    assert!(
        peak <= watchers + 3,
        "{peak} inotify instances at once during twenty reloads: replaced trust watchers outlived their replacement"
    );
    assert_eq!(
        left, watchers,
        "inotify instances after the reloads (the certificate's and the trust's before)"
    );
}

/// Client trust in the shapes CA bundles and CRLs arrive in: a byte order
/// mark from a Windows editor, CRLF, comments between the certificates as
/// distribution bundles have them, DER. Each loads whole: the client's CA
/// is trusted and a revoked client refused. A CRL past its nextUpdate
/// still revokes (sheath does not enforce a CRL's own expiry: refusing
/// every client of the CA for a late CRL would be an outage, not safety).
#[tokio::test]
async fn ca_bundles_and_crls_in_the_shapes_tools_write_them() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let (upstream, _) = recording_echo().await;
    let client = pki.client(&ClientSpec::new("ok"));
    let revoked = pki.client(&ClientSpec::new("revoked"));
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let (crl_pem, crl_der) = pki.crl_valid(&[revoked.serial], now - hour, now + hour);
    let (stale_pem, _) = pki.crl_valid(&[revoked.serial], now - 2 * hour, now - hour);
    let bom = |s: &str| [b"\xEF\xBB\xBF".as_slice(), s.as_bytes()].concat();
    let ca = pki.ca_pem.as_bytes().to_vec();
    // What the case is, the CA bundle's bytes, the CRL's if any.
    type Case = (&'static str, Vec<u8>, Option<Vec<u8>>);
    let cases: Vec<Case> = vec![
        (
            "a byte order mark before the bundle, the client's CA first",
            bom(&format!("{}{}", pki.ca_pem, other.ca_pem)),
            None,
        ),
        ("CRLF", pki.ca_pem.replace('\n', "\r\n").into_bytes(), None),
        (
            "comments between the certificates",
            format!(
                "# sheath test CA, other\n{}\n# Issuer: CN=sheath test CA\n# Label: \"sheath\"\n{}",
                other.ca_pem, pki.ca_pem
            )
            .into_bytes(),
            None,
        ),
        ("a DER certificate", pki.ca_der.to_vec(), None),
        (
            "a PEM CRL after a byte order mark",
            ca.clone(),
            Some(bom(&crl_pem)),
        ),
        ("a DER CRL", ca.clone(), Some(crl_der)),
        (
            "a CRL past its nextUpdate",
            ca.clone(),
            Some(stale_pem.into_bytes()),
        ),
    ];
    let mut failures = Vec::new();
    for (what, bundle, crl) in cases {
        let dir = tempfile::tempdir().unwrap();
        let files = pki.write_server(dir.path(), "server");
        std::fs::write(dir.path().join("clients.ca"), &bundle).unwrap();
        let crl_line = match &crl {
            Some(crl) => {
                std::fs::write(dir.path().join("clients.crl"), crl).unwrap();
                format!("crl = \"{}\"\n", dir.path().join("clients.crl").display())
            }
            None => String::new(),
        };
        let toml = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\n{}\n[listener.client_auth]\nmode = \"require\"\nca = \"{}\"\n{crl_line}",
            crate::common::pki::files_cert_toml(&files),
            dir.path().join("clients.ca").display()
        );
        let proxy = match Proxy::start_in(&toml, dir).await {
            Ok(proxy) => proxy,
            Err(e) => {
                failures.push(format!("{what}: refused: {e}"));
                continue;
            }
        };
        let addr = proxy.addr("l");
        if let Err(e) = exchange(addr, client.rustls_config(pki.roots(), &[])).await {
            failures.push(format!("{what}: the client was refused: {e}"));
        }
        if crl.is_some()
            && exchange(addr, revoked.rustls_config(pki.roots(), &[]))
                .await
                .is_ok()
        {
            failures.push(format!("{what}: the revoked client got in"));
        }
        // The CRL's nextUpdate, for `sheath_client_crl_next_update_seconds`
        // to alert on (to the second, as the CRL carries it).
        let due = crl.is_some().then(|| {
            let due = if what.contains("past its nextUpdate") {
                now - hour
            } else {
                now + hour
            };
            due.duration_since(UNIX_EPOCH).unwrap().as_secs()
        });
        let seen = proxy
            .running()
            .listener("l")
            .unwrap()
            .client_verifier
            .unwrap()
            .crls_next_update();
        let seen = seen.map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs());
        if seen != due {
            failures.push(format!("{what}: CRL next update {seen:?}, want {due:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
