//! A real ACME server for tests: Pebble (Debian package `pebble`) plus
//! `pebble-challtestsrv` as its DNS server, so every name resolves to
//! 127.0.0.1. Each instance has its own temp dir, ports and API certificate;
//! the processes are killed and reaped on drop.
//!
//! Pebble 2.4 facts this harness relies on:
//! - Config keys accepted (Go field names, matched case-insensitively):
//!   `listenAddress`, `managementListenAddress`, `httpPort`, `tlsPort`,
//!   `certificate`, `privateKey`, `ocspResponderURL`,
//!   `externalAccountBindingRequired`, `externalAccountMACKeys`,
//!   `domainBlocklist`, `certificateValidityPeriod` (seconds). Unknown keys
//!   such as `retryAfter` or `profiles` (newer Pebble) are silently ignored,
//!   so they are not written.
//! - A new issuing root is generated at every start.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::RootCertStore;
use tempfile::TempDir;

/// How long `start`/`restart` wait for Pebble to answer on `/dir`.
const START_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// Port Pebble's validator connects to for HTTP-01 (sheath's port 80 stand-in).
    pub http_port: u16,
    /// Port Pebble's validator connects to for TLS-ALPN-01.
    pub tls_port: u16,
    /// `certificateValidityPeriod` in seconds (Pebble's default otherwise).
    pub validity_secs: Option<u64>,
    /// External account binding: (kid, base64url HMAC key). When set, EAB is required.
    pub eab: Option<(String, String)>,
    /// `PEBBLE_WFE_NONCEREJECT`: percentage of good nonces rejected as `badNonce`.
    pub nonce_reject_percent: u8,
}

/// Fresh free ports for `http_port`/`tls_port` (never Pebble's fixed
/// 5002/5001, so tests can run in parallel), no EAB, no nonce rejection.
impl Default for PebbleOptions {
    fn default() -> Self {
        PebbleOptions {
            http_port: free_port(),
            tls_port: free_port(),
            validity_secs: None,
            eab: None,
            nonce_reject_percent: 0,
        }
    }
}

#[derive(Debug)]
pub struct Pebble {
    /// ACME directory URL, `https://127.0.0.1:PORT/dir`.
    pub directory: String,
    /// PEM file of the CA that signed Pebble's API (HTTPS) certificate.
    pub api_root_pem_path: PathBuf,
    /// Lowercase hex SHA-256 of that CA certificate's DER.
    pub api_ca_sha256: String,
    /// Management API base URL, `https://127.0.0.1:MGMTPORT`.
    pub mgmt: String,
    /// PEM of the API CA (same content as `api_root_pem_path`).
    pub api_root_pem: String,
    pub api_port: u16,
    pub mgmt_port: u16,
    pub dns_port: u16,
    pub challtestsrv_mgmt_port: u16,
    pub opts: PebbleOptions,
    config_path: PathBuf,
    api_roots: Arc<RootCertStore>,
    pebble: Option<Child>,
    challtestsrv: Option<Child>,
    // Removed only after `Drop` has killed and reaped the children.
    pub dir: TempDir,
}

/// A free TCP port on 127.0.0.1, never one this process was given before.
///
/// Ports come from below Linux's ephemeral range (32768+): a port the
/// kernel handed out for `:0` can be reused at once as the source port of
/// some other test's outgoing connection, and then the bind fails. The
/// port is only probed, not held, so two calls could draw the same free
/// port before either is bound (Pebble's API and challtestsrv's
/// management port once did): the ports handed out are remembered.
pub fn free_port() -> u16 {
    use rand::Rng;
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(20_000..32_000);
        // UDP too: challtestsrv serves DNS on both.
        if !given.contains(&port)
            && TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            given.push(port);
            return port;
        }
    }
    panic!("no free port found in 20000..32000")
}

impl Pebble {
    /// Start challtestsrv and Pebble. `None` (after printing "SKIPPED: ...")
    /// when they are not installed and `CI` is not `"true"`; panics under CI.
    pub async fn start(opts: PebbleOptions) -> Option<Pebble> {
        if !super::require_tool("pebble") || !super::require_tool("pebble-challtestsrv") {
            return None;
        }
        let dir = tempfile::tempdir().expect("pebble temp dir");

        let (api_ca_pem, api_ca_der, chain_pem, key_pem) = api_certificate();
        let api_root_pem_path = dir.path().join("api-ca.pem");
        let cert_path = dir.path().join("api-cert.pem");
        let key_path = dir.path().join("api-key.pem");
        std::fs::write(&api_root_pem_path, &api_ca_pem).unwrap();
        std::fs::write(&cert_path, chain_pem).unwrap();
        std::fs::write(&key_path, key_pem).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(api_ca_der.clone()).unwrap();

        let config_path = dir.path().join("pebble-config.json");
        let mut pebble = Pebble {
            directory: String::new(),
            api_root_pem_path,
            api_ca_sha256: super::sha256(&api_ca_der),
            mgmt: String::new(),
            api_root_pem: api_ca_pem,
            api_port: 0,
            mgmt_port: 0,
            dns_port: 0,
            challtestsrv_mgmt_port: 0,
            opts,
            config_path,
            api_roots: Arc::new(roots),
            pebble: None,
            challtestsrv: None,
            dir,
        };
        // A port found free can be taken by another test's process before
        // Pebble binds it; then both start again on other ports.
        for attempt in 1.. {
            pebble.choose_ports(&cert_path, &key_path);
            pebble.spawn_challtestsrv();
            pebble.spawn_pebble();
            match pebble.wait_ready().await {
                Ok(()) => break,
                Err(taken) if attempt < 3 => {
                    eprintln!("{taken}; starting again on other ports");
                    pebble.kill();
                }
                Err(taken) => panic!("{taken}\n{}", pebble.log_tail()),
            }
        }
        Some(pebble)
    }

    fn choose_ports(&mut self, cert_path: &Path, key_path: &Path) {
        self.api_port = free_port();
        self.mgmt_port = free_port();
        self.dns_port = free_port();
        self.challtestsrv_mgmt_port = free_port();
        self.directory = format!("https://127.0.0.1:{}/dir", self.api_port);
        self.mgmt = format!("https://127.0.0.1:{}", self.mgmt_port);
        std::fs::write(
            &self.config_path,
            config_json(
                &self.opts,
                self.api_port,
                self.mgmt_port,
                cert_path,
                key_path,
            ),
        )
        .unwrap();
    }

    /// Root store trusting Pebble's API certificate.
    pub fn api_roots(&self) -> Arc<RootCertStore> {
        self.api_roots.clone()
    }

    /// PEM of Pebble's current issuing root (changes at every (re)start).
    pub async fn issuing_root_pem(&self) -> String {
        let url = format!("{}/roots/0", self.mgmt);
        let (status, body) = https_get(&url, &self.api_roots)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}\n{}", self.log_tail()));
        assert_eq!(status, 200, "GET {url}: {body}");
        body
    }

    /// GET an https URL served by Pebble (API or management), trusting the
    /// API CA. Returns status and body.
    pub async fn get(&self, url: &str) -> Result<(u16, String), String> {
        https_get(url, &self.api_roots).await
    }

    /// Kill and reap both processes (also done on drop).
    pub fn kill(&mut self) {
        reap(self.pebble.take());
        reap(self.challtestsrv.take());
    }

    /// Kill only Pebble (challtestsrv keeps running), to simulate an outage.
    pub fn stop(&mut self) {
        reap(self.pebble.take());
    }

    /// Start Pebble again on the same ports and wait until it answers.
    /// Pebble makes a new issuing root (and forgets all accounts) on start.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn_pebble();
        if let Err(taken) = self.wait_ready().await {
            panic!("{taken}\n{}", self.log_tail());
        }
    }

    /// Make Pebble's DNS (challtestsrv) answer `ip` for `host` instead of
    /// 127.0.0.1, so its validator connects elsewhere.
    pub async fn resolve(&self, host: &str, ip: &str) {
        let body = format!(
            r#"{{"host":{},"addresses":[{}]}}"#,
            json_str(host),
            json_str(ip)
        );
        self.challtestsrv("/add-a", &body).await;
    }

    /// Back to the default answer, 127.0.0.1, for `host`.
    pub async fn clear_resolve(&self, host: &str) {
        let body = format!(r#"{{"host":{}}}"#, json_str(host));
        self.challtestsrv("/clear-a", &body).await;
    }

    /// POST to challtestsrv's management API (plain HTTP).
    async fn challtestsrv(&self, path: &str, body: &str) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.challtestsrv_mgmt_port))
            .await
            .unwrap();
        let request = format!(
            "POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.unwrap();
        assert!(
            response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
            "challtestsrv {path} {body}: {response}"
        );
    }

    /// The last lines of both processes' logs, for failure messages.
    pub fn log_tail(&self) -> String {
        format!(
            "--- pebble.log (tail) ---\n{}\n--- challtestsrv.log (tail) ---\n{}",
            tail(&self.dir.path().join("pebble.log"), 4000),
            tail(&self.dir.path().join("challtestsrv.log"), 2000)
        )
    }

    fn log_file(&self, name: &str) -> (Stdio, Stdio) {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))
            .expect("open log file");
        (f.try_clone().unwrap().into(), f.into())
    }

    fn spawn_challtestsrv(&mut self) {
        let (out, err) = self.log_file("challtestsrv.log");
        let child = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{}", self.dns_port)])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args([
                "-management",
                &format!("127.0.0.1:{}", self.challtestsrv_mgmt_port),
            ])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn pebble-challtestsrv");
        self.challtestsrv = Some(child);
    }

    fn spawn_pebble(&mut self) {
        let (out, err) = self.log_file("pebble.log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&self.config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env(
                "PEBBLE_WFE_NONCEREJECT",
                self.opts.nonce_reject_percent.to_string(),
            )
            .env("PEBBLE_AUTHZREUSE", "0")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn pebble");
        self.pebble = Some(child);
    }

    /// Poll `GET /dir` until it answers 200, failing fast if a process died.
    /// `Err` when one died because a port it was given is in use.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let exited = [
                ("pebble", &mut self.pebble),
                ("pebble-challtestsrv", &mut self.challtestsrv),
            ]
            .into_iter()
            .find_map(|(name, child)| {
                let status = child.as_mut()?.try_wait().unwrap()?;
                child.take();
                Some(format!("{name} exited early ({status})"))
            });
            if let Some(exited) = exited {
                if self.log_tail().contains("address already in use") {
                    return Err(format!("{exited}: a port was taken"));
                }
                panic!("{exited}\n{}", self.log_tail());
            }
            let last_err = match https_get(&self.directory, &self.api_roots).await {
                Ok((200, body)) if body.contains("newOrder") => break,
                Ok((status, body)) => format!("status {status}: {body}"),
                Err(e) => e,
            };
            if started.elapsed() > START_DEADLINE {
                panic!(
                    "pebble did not answer on {} within {START_DEADLINE:?}: {last_err}\n{}",
                    self.directory,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while std::net::TcpStream::connect(("127.0.0.1", self.challtestsrv_mgmt_port)).is_err() {
            if started.elapsed() > START_DEADLINE {
                panic!("pebble-challtestsrv did not start\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The DNS server must be up before the first validation, and be this
        // challtestsrv's: one that finds its DNS port taken logs the error
        // and runs on, and Pebble then asks whoever has the port (another
        // test's challtestsrv, which sends the validator elsewhere). A name
        // only this one knows must resolve to the address given for it.
        let probe = format!("probe-{:016x}.test", rand::random::<u64>());
        self.resolve(&probe, "127.0.0.9").await;
        loop {
            match dns_a(self.dns_port, &probe).await {
                Some(answers) if answers == [[127, 0, 0, 9]] => return Ok(()),
                Some(answers) => {
                    return Err(format!(
                    "DNS on port {} is not this challtestsrv's: {probe} resolved to {answers:?}",
                    self.dns_port
                ))
                }
                None if self.log_tail().contains("address already in use") => {
                    return Err(format!("DNS port {} was taken", self.dns_port))
                }
                None if started.elapsed() > START_DEADLINE => {
                    panic!(
                        "pebble-challtestsrv's DNS did not answer\n{}",
                        self.log_tail()
                    )
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The A records a DNS server on 127.0.0.1:`port` gives for `name` (empty
/// for none), or `None` when it sent no reply within 200 ms.
async fn dns_a(port: u16, name: &str) -> Option<Vec<[u8; 4]>> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
    let id = rand::random::<[u8; 2]>();
    // Header: id, recursion desired, one question.
    let mut query = vec![id[0], id[1], 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]); // root, type A, class IN
    socket.send_to(&query, ("127.0.0.1", port)).await.ok()?;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    let reply = &buf[..n];
    if reply.len() < query.len() || reply[..2] != id {
        return None;
    }
    let count = u16::from_be_bytes([reply[6], reply[7]]);
    // The question comes back as asked; the answers follow it.
    let mut at = query.len();
    let mut found = Vec::new();
    for _ in 0..count {
        // The owner name: labels, ended by a zero or a compression pointer.
        loop {
            let len = *reply.get(at)?;
            if len & 0xc0 == 0xc0 {
                at += 2;
                break;
            }
            at += 1 + len as usize;
            if len == 0 {
                break;
            }
        }
        let fixed = reply.get(at..at + 10)?;
        let rdlen = u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
        let data = reply.get(at + 10..at + 10 + rdlen)?;
        if fixed[..2] == [0, 1] && rdlen == 4 {
            found.push([data[0], data[1], data[2], data[3]]);
        }
        at += 10 + rdlen;
    }
    Some(found)
}

fn reap(child: Option<Child>) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return "(no log)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// A v3 CA and a localhost/127.0.0.1 server certificate signed by it.
/// Returns (CA PEM, CA DER, leaf+CA chain PEM, PKCS#8 key PEM).
fn api_certificate() -> (String, CertificateDer<'static>, String, String) {
    let now = SystemTime::now();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sheath test Pebble API CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = (now - Duration::from_secs(3600)).into();
    ca_params.not_after = (now + Duration::from_secs(7 * 86400)).into();
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.subject_alt_names = vec![
        SanType::DnsName("localhost".try_into().unwrap()),
        SanType::IpAddress([127, 0, 0, 1].into()),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(7 * 86400)).into();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let leaf = params.signed_by(&key, &issuer).unwrap();

    let chain = format!("{}{}", leaf.pem(), ca.pem());
    (ca.pem(), ca.der().clone(), chain, key.serialize_pem())
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn config_json(
    opts: &PebbleOptions,
    api_port: u16,
    mgmt_port: u16,
    cert: &Path,
    key: &Path,
) -> String {
    let mac_keys = match &opts.eab {
        Some((kid, hmac)) => format!("{{{}: {}}}", json_str(kid), json_str(hmac)),
        None => "{}".to_string(),
    };
    let validity = match opts.validity_secs {
        Some(secs) => format!(",\n    \"certificateValidityPeriod\": {secs}"),
        None => String::new(),
    };
    format!(
        r#"{{
  "pebble": {{
    "listenAddress": "127.0.0.1:{api_port}",
    "managementListenAddress": "127.0.0.1:{mgmt_port}",
    "certificate": {cert},
    "privateKey": {key},
    "httpPort": {http},
    "tlsPort": {tls},
    "ocspResponderURL": "",
    "externalAccountBindingRequired": {eab},
    "externalAccountMACKeys": {mac_keys},
    "domainBlocklist": []{validity}
  }}
}}
"#,
        cert = json_str(&cert.display().to_string()),
        key = json_str(&key.display().to_string()),
        http = opts.http_port,
        tls = opts.tls_port,
        eab = opts.eab.is_some(),
    )
}

/// One HTTP/1.1 GET over TLS verified against `roots`.
async fn https_get(url: &str, roots: &Arc<RootCertStore>) -> Result<(u16, String), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad url {url}: {e}"))?;
    let host = uri.host().ok_or("url without host")?.to_string();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());

    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots.clone())
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;

    let fut = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let tls = connector
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| format!("GET {url} timed out"))?
}
