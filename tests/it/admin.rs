//! The admin endpoint, scraped over real HTTP: readiness that waits for the
//! first certificate, metrics that move with traffic, handshake failures,
//! rotations and reloads, and /certs agreeing with what clients are served.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::acme::{ca_root, listener_toml, pebble, wait_installs};
use crate::common::client::{self, served_cert};
use crate::common::{backend, eventually, within, Proxy, TestPki};

/// Serve the admin endpoint of an in-process sheath on a fresh port.
pub async fn admin_for(proxy: &Proxy) -> SocketAddr {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(sheath::admin::serve(socket, proxy.running().observe()));
    addr
}

/// One HTTP/1.0 request; the status and body.
pub async fn call(admin: SocketAddr, method: &str, path: &str) -> (u16, String) {
    within(&format!("{method} {path}"), async {
        let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
        tcp.write_all(format!("{method} {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = String::new();
        tcp.read_to_string(&mut raw).await.unwrap();
        let status = raw[9..12].parse().unwrap();
        let body = raw.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    })
    .await
}

/// `GET /metrics` with `accept` as the Accept header, if any: the
/// Content-Type and the body.
pub async fn scrape(admin: SocketAddr, accept: Option<&str>) -> (String, String) {
    within("GET /metrics", async {
        let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
        let accept = accept
            .map(|a| format!("Accept: {a}\r\n"))
            .unwrap_or_default();
        tcp.write_all(format!("GET /metrics HTTP/1.0\r\n{accept}\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = String::new();
        tcp.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.0 200"), "{head}");
        let content_type = head
            .lines()
            .find_map(|l| l.strip_prefix("content-type: "))
            .unwrap_or_else(|| panic!("no content-type in {head}"));
        (content_type.to_string(), body.to_string())
    })
    .await
}

/// The value of the sample `series` (name with labels, exactly as
/// exposed), or `None` when it is not in the scrape.
pub fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.parse().unwrap())
    })
}

pub fn value(scrape: &str, series: &str) -> f64 {
    sample(scrape, series).unwrap_or_else(|| panic!("no `{series}` in\n{scrape}"))
}

#[tokio::test]
async fn metrics_follow_traffic_handshake_failures_rotation_and_reloads() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let down = backend::closed_port().await;
    let toml = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\n{}\n\
         [[listener]]\nname = \"down\"\nbind = \"127.0.0.1:0\"\nupstream = \"{down}\"\n{}\n",
        backend::http().await,
        crate::common::pki::files_cert_toml(&files),
        crate::common::pki::files_cert_toml(&files),
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let admin = admin_for(&proxy).await;
    let web = proxy.addr("web");

    let (status, before) = call(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        value(
            &before,
            "sheath_connections_accepted_total{listener=\"web\"}"
        ),
        0.0
    );
    assert_eq!(value(&before, "sheath_config_generation"), 1.0);

    // Three requests on one connection.
    let mut h1 = client::h1(web, pki.roots()).await;
    for _ in 0..3 {
        let resp = h1.send_request(client::get("/")).await.unwrap();
        assert_eq!(resp.status(), 200);
        client::body_text(resp).await;
    }
    drop(h1);
    // A client that does not trust sheath's certificate aborts the handshake.
    let stranger = TestPki::new();
    assert!(served_cert(web, stranger.roots()).await.is_err());
    // The upstream of `down` refuses: 502, counted as a connect failure.
    let mut h1 = client::h1(proxy.addr("down"), pki.roots()).await;
    let resp = h1.send_request(client::get("/")).await.unwrap();
    assert_eq!(resp.status(), 502);
    drop(h1);

    let web_l = "listener=\"web\"";
    // Bytes are added when a connection closes, which the server side
    // notices a moment after the client drops it.
    within("bytes of the closed connection counted", async {
        loop {
            let (_, s) = call(admin, "GET", "/metrics").await;
            if sample(&s, &format!("sheath_received_bytes_total{{{web_l}}}")).unwrap_or(0.0) > 0.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (_, scrape) = call(admin, "GET", "/metrics").await;
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_connections_accepted_total{{{web_l}}}")
        ),
        2.0
    );
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_tls_handshakes_total{{{web_l},outcome=\"success\",reason=\"\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(&scrape, &format!("sheath_tls_handshakes_total{{{web_l},outcome=\"failure\",reason=\"alert_received\"}}")),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_http_responses_total{{{web_l},class=\"2xx\"}}")
        ),
        3.0
    );
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_http_request_duration_seconds_count{{{web_l}}}")
        ),
        3.0
    );
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_http_request_duration_seconds_bucket{{le=\"+Inf\",{web_l}}}")
        ),
        3.0
    );
    assert!(value(&scrape, &format!("sheath_sent_bytes_total{{{web_l}}}")) > 0.0);
    // Three requests one after another: one pooled connection.
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_upstream_connections_opened_total{{{web_l},protocol=\"http1\"}}")
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_upstream_connections_active{{{web_l},protocol=\"h2c\"}}")
        ),
        0.0
    );
    assert_eq!(
        value(
            &scrape,
            "sheath_http_responses_total{listener=\"down\",class=\"5xx\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            "sheath_upstream_connect_failures_total{listener=\"down\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_upstream_connect_failures_total{{{web_l}}}")
        ),
        0.0
    );
    let served = served_cert(web, pki.roots()).await.unwrap();
    let not_after = served
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let cert_l = format!("{web_l},cert=\"default\",source=\"files\"");
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_certificate_not_after_seconds{{{cert_l}}}")
        ),
        not_after
    );
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_certificate_installs_total{{{cert_l}}}")
        ),
        1.0
    );
    assert_eq!(
        value(&scrape, &format!("sheath_certificate_valid{{{cert_l}}}")),
        1.0
    );

    // Rotation: new files, a new not_after, one more install.
    let (cert_pem, key_pem) =
        pki.server_cert(&["localhost", "127.0.0.1"], Duration::from_secs(7200));
    for (path, pem) in [(&files.key, &key_pem), (&files.cert, &cert_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    let status = proxy.running().listener("web").unwrap().certs[0]
        .status
        .clone();
    eventually("rotation", || status.load().installs == 2).await;
    let rotated = served_cert(web, pki.roots()).await.unwrap();
    assert_ne!(rotated.serial, served.serial);
    let (_, scrape) = call(admin, "GET", "/metrics").await;
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_certificate_installs_total{{{cert_l}}}")
        ),
        2.0
    );
    assert_eq!(
        value(
            &scrape,
            &format!("sheath_certificate_not_after_seconds{{{cert_l}}}")
        ),
        rotated
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    );

    // A reload that cannot bind fails as a whole and is counted; a good
    // one moves the generation.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad = format!(
        "{toml}\n[[listener]]\nname = \"extra\"\nbind = \"{}\"\nupstream = \"{down}\"\n{}\n",
        taken.local_addr().unwrap(),
        crate::common::pki::files_cert_toml(&files),
    );
    let bad =
        sheath::config::Config::load(&crate::common::write_config(proxy.dir.path(), &bad)).unwrap();
    assert!(proxy.running().reload(bad).await.is_err());
    let (_, scrape) = call(admin, "GET", "/metrics").await;
    assert_eq!(
        value(&scrape, "sheath_config_reloads_total{outcome=\"failure\"}"),
        1.0
    );
    assert_eq!(
        value(&scrape, "sheath_config_reloads_total{outcome=\"success\"}"),
        0.0
    );
    assert_eq!(value(&scrape, "sheath_config_generation"), 1.0);
    let good = sheath::config::Config::load(&crate::common::write_config(proxy.dir.path(), &toml))
        .unwrap();
    proxy.running().reload(good).await.unwrap();
    let (_, scrape) = call(admin, "GET", "/metrics").await;
    assert_eq!(
        value(&scrape, "sheath_config_reloads_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(value(&scrape, "sheath_config_generation"), 2.0);
    assert!(sample(&scrape, "sheath_config_last_reload_success_seconds").is_some());
    let (_, scrape) = self::scrape(admin, Some("application/openmetrics-text")).await;
    assert!(
        scrape.ends_with("# EOF\n"),
        "complete OpenMetrics exposition"
    );
}

/// promtool, Prometheus' own checker, reads the exposition as a scraper
/// that did not ask for OpenMetrics gets it; one that asks gets
/// OpenMetrics, as Prometheus does by default.
/// A sheath whose scrape has a sample in every family (a worker's
/// excepted: one worker): an HTTP listener with a request served for the
/// histogram, an mTLS TCP listener for the client trust reloads. The
/// proxy, to keep running, and its admin address.
async fn with_every_family(pki: &TestPki) -> (Proxy, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let ca = pki.write_ca(dir.path());
    let cert = crate::common::pki::files_cert_toml(&files);
    let toml = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\n{cert}\n\
         [[listener]]\nname = \"db\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"tcp\"\n{cert}\n\
         [listener.client_auth]\nmode = \"require\"\nca = \"{}\"\n\
         [[listener]]\nname = \"out\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"outbound\"\n\
         [listener.cert]\nsource = \"local_ca\"\nnames = [\"web.test\"]\n\
         [listener.outbound]\nca = \"{}\"\nserver_name = \"peer.test\"\n",
        backend::http().await,
        backend::tcp_echo().await,
        ca.display(),
        backend::closed_port().await,
        ca.display()
    );
    let proxy = Proxy::start_in(&toml, dir).await.unwrap();
    let admin = admin_for(&proxy).await;
    let mut h1 = client::h1(proxy.addr("web"), pki.roots()).await;
    let resp = h1.send_request(client::get("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    client::body_text(resp).await;
    (proxy, admin)
}

/// Every metric sheath exposes is in the README's table, under the name a
/// query uses.
#[tokio::test]
async fn the_readme_lists_every_metric() {
    let pki = TestPki::new();
    let (_proxy, admin) = with_every_family(&pki).await;
    let (_, text) = scrape(admin, None).await;
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let mut checked = 0;
    for line in text.lines() {
        let Some(family) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        // The text format names counters with their `_total`.
        let (name, kind) = family.split_once(' ').unwrap();
        // A label list or the closing backtick may follow the name.
        assert!(
            readme.contains(&format!("`{name}`")) || readme.contains(&format!("`{name}{{")),
            "{name} ({kind}) is not in README.md"
        );
        checked += 1;
    }
    assert!(checked > 20, "only {checked} families in\n{text}");
}

#[tokio::test]
async fn metrics_pass_promtool_and_openmetrics_is_served_to_who_asks_for_it() {
    if !crate::common::require_tool("promtool") {
        return;
    }
    let pki = TestPki::new();
    let (_proxy, admin) = with_every_family(&pki).await;

    // Without an Accept header (curl, promtool's usual input) and with a
    // text-format one: the Prometheus text format.
    for accept in [None, Some("text/plain;version=0.0.4;q=0.5,*/*;q=0.1")] {
        let (content_type, text) = scrape(admin, accept).await;
        let mut promtool = tokio::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdin = promtool.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).await.unwrap();
        drop(stdin);
        let out = within("promtool", promtool.wait_with_output())
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            content_type, "text/plain; version=0.0.4; charset=utf-8",
            "{accept:?}"
        );
        assert_eq!(
            value(
                &text,
                "sheath_tls_handshakes_total{listener=\"web\",outcome=\"success\",reason=\"\"}"
            ),
            1.0
        );
    }

    // What Prometheus asks for: OpenMetrics, the same samples.
    let (content_type, om) = scrape(
        admin,
        Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    )
    .await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(
        om.contains("# TYPE sheath_connections_accepted counter\n"),
        "{om}"
    );
    assert_eq!(
        value(
            &om,
            "sheath_tls_handshakes_total{listener=\"web\",outcome=\"success\",reason=\"\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn certs_endpoint_matches_the_certificate_clients_are_served() {
    let proxy = Proxy::start(&format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        backend::http().await
    ))
    .await;
    let admin = admin_for(&proxy).await;
    let ca = proxy.running().local_ca().unwrap();
    let roots = crate::common::pki::roots_from_pem(ca.cert_pem());
    let served = served_cert(proxy.addr("web"), roots).await.unwrap();

    let (status, body) = call(admin, "GET", "/certs").await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let l = &json["listeners"][0];
    assert_eq!(l["listener"], "web");
    assert_eq!(l["source"], "local_ca");
    assert_eq!(l["valid"], true);
    assert_eq!(l["certificate"]["sha256"], served.sha256.as_str());
    assert_eq!(l["certificate"]["serial"], served.serial.as_str());
    assert_eq!(l["certificate"]["sans"], serde_json::json!(served.names));
    assert!(l["next_renewal"].is_string());
    assert!(l["last_error"].is_null());

    // Liveness, method and path errors.
    assert_eq!(call(admin, "GET", "/livez").await, (200, "ok\n".into()));
    assert_eq!(call(admin, "POST", "/certs").await.0, 405);
    assert_eq!(call(admin, "GET", "/reload").await.0, 405);
    assert_eq!(call(admin, "GET", "/nope").await.0, 404);
}

#[tokio::test]
async fn readiness_waits_for_the_first_acme_certificate() {
    let Some(mut setup) = pebble(None, false, None, 0).await else {
        return;
    };
    // The CA is down when sheath starts: no certificate, not ready, and
    // the reason says so.
    setup.pebble.stop();
    let proxy = Proxy::start(&listener_toml(
        &setup,
        backend::tcp_echo().await,
        &ca_root(&setup),
    ))
    .await;
    let admin = admin_for(&proxy).await;
    let status = proxy.running().listener("l").unwrap().certs[0]
        .status
        .clone();
    eventually("a failed first attempt", || {
        status.load().consecutive_failures > 0
    })
    .await;
    let (code, body) = call(admin, "GET", "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("listener `l`: no certificate yet from acme (last error:"),
        "{body}"
    );

    setup.pebble.restart().await;
    wait_installs(&status, 1, &setup.pebble).await;
    let (code, body) = call(admin, "GET", "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
}
