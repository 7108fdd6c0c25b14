//! The real `sheath` binary as a child process: exit codes, signals, the
//! CLI and environment surface, and what an operator sees on stdout/stderr.
//! In-process tests cannot cover these because `main.rs` alone decides exit
//! codes and owns the signal handling.
//!
//! Every child is killed on drop, every wait is bounded, and every run gets
//! its own state directory so no test sees another's local CA.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_rustls::client::TlsStream;

use crate::common::{self, backend, client, pki, within, TestPki};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_sheath");

/// A `sheath` command with a clean environment for its own settings.
fn sheath() -> Command {
    isolated(Command::new(BIN))
}

/// Like [`sheath`], for a copy of the binary at `bin`.
fn sheath_at(bin: &Path) -> Command {
    isolated(Command::new(bin))
}

/// `cmd` (sheath itself, or a wrapper that execs it) with a clean
/// environment for sheath's own settings, stdin closed, killed on drop.
pub(crate) fn isolated(mut cmd: Command) -> Command {
    // A SHEATH_* or RUST_LOG in the developer's shell would silently change
    // what the binary does (another state dir, a log filter that hides the
    // "listening" line), so only what a test sets reaches the child.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("SHEATH_")) {
            cmd.env_remove(&key);
        }
    }
    cmd.env_remove("RUST_LOG");
    // Tests run side by side: the default admin port would collide.
    cmd.env("SHEATH_ADMIN", "127.0.0.1:0");
    // Under a service manager the tests would otherwise talk to it.
    cmd.env_remove("NOTIFY_SOCKET");
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// A short-lived command's output, bounded by the test deadline.
async fn output(what: &str, mut cmd: Command) -> std::process::Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    within(what, cmd.output())
        .await
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The value of a string field in one line of sheath's JSON log. Field
/// values we look up (addresses, messages) never contain escaped quotes.
pub(crate) fn json_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let tag = format!("\"{key}\":\"");
    let start = line.find(&tag)? + tag.len();
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

fn is_log(line: &str, message: &str) -> bool {
    json_field(line, "message") == Some(message)
}

/// Lines read from a child's pipe as they arrive. The pipe is drained
/// continuously so a chatty child never blocks on a full pipe.
#[derive(Clone, Default)]
struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    eof: Arc<AtomicBool>,
}

impl Lines {
    fn collect(pipe: impl AsyncRead + Unpin + Send + 'static) -> Lines {
        let lines = Lines::default();
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lines.lock().unwrap().push(line);
            }
            sink.eof.store(true, Ordering::SeqCst);
        });
        lines
    }

    fn find(&self, pred: &dyn Fn(&str) -> bool) -> Option<String> {
        self.lines.lock().unwrap().iter().find(|l| pred(l)).cloned()
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// A running `sheath`, killed when dropped.
pub(crate) struct Process {
    child: Child,
    pid: u32,
    stdout: Lines,
    stderr: Lines,
}

impl Process {
    pub(crate) fn spawn(mut cmd: Command) -> Process {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn sheath");
        let pid = child.id().expect("a running child has a pid");
        let stdout = Lines::collect(child.stdout.take().unwrap());
        let stderr = Lines::collect(child.stderr.take().unwrap());
        Process {
            child,
            pid,
            stdout,
            stderr,
        }
    }

    /// Wait for a line matching `pred` on stdout (`on_stdout`) or stderr.
    /// Fails fast, with the child's stderr, if sheath exits first.
    pub(crate) async fn wait_line(
        &mut self,
        what: &str,
        on_stdout: bool,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + common::DEADLINE;
        loop {
            let lines = if on_stdout {
                &self.stdout
            } else {
                &self.stderr
            };
            if let Some(line) = lines.find(&pred) {
                return line;
            }
            // Only give up on an exited child once both pipes hit EOF: its
            // last lines may still be in flight when the exit is observed.
            let exited = self.child.try_wait().expect("try_wait");
            if let Some(status) = exited {
                if self.stdout.eof.load(Ordering::SeqCst) && self.stderr.eof.load(Ordering::SeqCst)
                {
                    panic!(
                        "sheath exited ({status}) before {what}\nstdout:\n{}\nstderr:\n{}",
                        self.stdout.text(),
                        self.stderr.text()
                    );
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}\nstderr:\n{}",
                    self.stderr.text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many log lines with `message` sheath has written so far.
    pub(crate) fn logged(&self, message: &str) -> usize {
        let lines = self.stderr.lines.lock().unwrap();
        lines.iter().filter(|l| is_log(l, message)).count()
    }

    pub(crate) async fn wait_log(&mut self, message: &str) -> String {
        self.wait_line(&format!("log {message:?}"), false, |l| is_log(l, message))
            .await
    }

    /// The address from the "listening" log line (needs `--log-format json`).
    pub(crate) async fn listening_addr(&mut self) -> SocketAddr {
        let line = self.wait_log("listening").await;
        json_field(&line, "addr")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {line}"))
    }

    pub(crate) fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{sig}"), self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", self.pid);
    }

    /// Wait at most `bound` for the exit, and return its code.
    pub(crate) async fn exit_code(&mut self, bound: Duration) -> i32 {
        let status: ExitStatus = match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(status) => status.expect("wait for sheath"),
            Err(_) => panic!(
                "sheath still running after {bound:?}\nstderr:\n{}",
                self.stderr.text()
            ),
        };
        status.code().unwrap_or_else(|| {
            panic!(
                "sheath ended by a signal, not an exit ({status})\nstderr:\n{}",
                self.stderr.text()
            )
        })
    }
}

pub(crate) fn ca_pem_path(state: &Path) -> std::path::PathBuf {
    state.join("local-ca").join("ca.pem")
}

/// `sheath check --config <file>` with its own state dir.
async fn check(config: &Path, state: &Path) -> std::process::Output {
    let mut cmd = sheath();
    cmd.arg("check")
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state);
    output("sheath check", cmd).await
}

#[tokio::test]
async fn check_valid_config_prints_effective_settings() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // An explicit [global] keeps write_config from adding its own, so the
    // drain timeout below is the file's value and not a fixture default.
    let config = common::write_config(
        dir.path(),
        "[global]\ndrain_timeout = \"7s\"\n\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:8080\"\n",
    );
    let out = check(&config, &state).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    // Values the file never mentions: only there if defaults are filled in.
    for line in [
        "max_connections = 4096",
        "handshake = \"10s\"",
        "idle = \"5m\"",
        "mode = \"http\"",
        "source = \"local_ca\"",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing `{line}` in:\n{stdout}"
        );
    }
    // Values the file or the flags set must win over the defaults.
    assert!(stdout.contains("drain_timeout = \"7s\""), "{stdout}");
    assert!(stdout.contains("name = \"web\""), "{stdout}");
    assert!(
        stdout.contains(&format!("state_dir = \"{}\"", state.display())),
        "--state-dir must override the default:\n{stdout}"
    );

    // The effective settings are meant to be pasted back as a config file:
    // checking them again must give the very same settings.
    let again = dir.path().join("effective.toml");
    std::fs::write(&again, &stdout).unwrap();
    let out2 = check(&again, &state).await;
    assert_eq!(
        out2.status.code(),
        Some(0),
        "stderr: {}",
        text(&out2.stderr)
    );
    assert_eq!(text(&out2.stdout), stdout);
}

#[tokio::test]
async fn check_reports_file_line_and_key() {
    // (config text, offending line's prefix, key, phrase)
    let cases = [
        (
            "[[listener]]\nname = \"a\"\nupstream = \"127.0.0.1:8080\"\nbnd = \"127.0.0.1:0\"\n",
            "bnd =",
            "key `listener[0].bnd`",
            "unknown field `bnd`",
        ),
        (
            "[[listener]]\nname = \"a\"\nbind = \"nonsense\"\nupstream = \"127.0.0.1:8080\"\n",
            "bind =",
            "key `listener[0].bind`",
            "not a valid listen address",
        ),
        (
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\n\n# the app\nupstream = \"192.0.2.10:80\"\n",
            "upstream =",
            "key `listener[0].upstream`",
            "not a loopback address",
        ),
    ];
    for (body, offending, key, phrase) in cases {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!("[global]\ndrain_timeout = \"5s\"\n\n{body}");
        let line = toml
            .lines()
            .position(|l| l.starts_with(offending))
            .expect("case names its offending line")
            + 1;
        let config = common::write_config(dir.path(), &toml);
        let out = check(&config, &dir.path().join("state")).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: stderr: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "{key}: no settings may be printed for an invalid config"
        );
        let location = format!("{}:{line}:", config.display());
        assert!(stderr.starts_with("sheath: error: "), "{key}: {stderr}");
        assert!(
            stderr.contains(&location),
            "{key}: want {location} in: {stderr}"
        );
        assert!(stderr.contains(key), "{key}: {stderr}");
        assert!(
            stderr.contains(phrase),
            "{key}: want {phrase:?} in: {stderr}"
        );
    }
}

/// A value each single-listener flag accepts, so that clap takes it and
/// only the conflict with --config can make `run` refuse it.
fn flag_sample(long: &str) -> &'static str {
    match long {
        "mode" => "tcp",
        "peer-ca" => "ca.pem",
        "peer-name" => "peer.internal",
        "name" => "app.internal",
        "max-connections" => "10",
        "cert-lifetime"
        | "handshake-timeout"
        | "idle-timeout"
        | "connect-timeout"
        | "upstream-timeout"
        | "upstream-idle-timeout"
        | "max-lifetime" => "1h",
        "cert" => "cert.pem",
        "key" => "key.pem",
        "client-auth" => "require",
        "client-ca" | "client-crl" | "acme-ca-root" => "ca.pem",
        "allow-uri" => "spiffe://example.org/ns/prod/sa/web",
        "allow-dns" | "allow-cn" => "web",
        "forward-identity" => "xfcc",
        "proxy-protocol" => "v2",
        "upstream-protocol" => "h2c",
        "alpn" => "h2",
        "tls-min-version" => "1.3",
        "acme-directory" => "https://ca.internal/acme/directory",
        "acme-challenge" => "http-01",
        "acme-http01-bind" => "127.0.0.1:0",
        "acme-ca-fingerprint" => "d6b2c0b2f4a8a0e4e6f25bdd6a6f3f0c9c7e1f4ba9e2d2a1c3f0b5e7d8a9c0b1",
        "acme-contact" => "mailto:ops@example.com",
        "acme-eab-kid" => "kid-1",
        "acme-eab-hmac-key" => "aGVsbG8",
        other => panic!("no sample value for --{other}; add one"),
    }
}

#[tokio::test]
async fn run_refuses_every_single_listener_flag_next_to_config() {
    use clap::Args as _;
    // The flags come from the argument definition itself, so a flag added
    // later is covered without touching this test.
    let single = sheath::cli::SingleListener::augment_args(clap::Command::new("single"));
    let dir = tempfile::tempdir().unwrap();
    // A config that would run: if a flag slipped through, `run` would
    // serve instead of refusing (and the bounded wait below would fail).
    let config = common::write_config(
        dir.path(),
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:8080\"\n",
    );
    let mut checked = 0;
    for arg in single.get_arguments() {
        let long = arg.get_long().expect("every flag has a long name");
        // clap refuses these two itself (conflicts_with_all on --config).
        if long == "listen" || long == "upstream" {
            continue;
        }
        // Flags that clap only accepts in pairs.
        let partner = match long {
            "cert" => Some("key"),
            "key" => Some("cert"),
            "acme-eab-kid" => Some("acme-eab-hmac-key"),
            "acme-eab-hmac-key" => Some("acme-eab-kid"),
            _ => None,
        };
        let mut cmd = sheath();
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.path().join("state"));
        let mut passed = Vec::new();
        for flag in std::iter::once(long).chain(partner) {
            cmd.arg(format!("--{flag}"));
            let takes_value = single
                .get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .is_some_and(|a| a.get_action().takes_values());
            if takes_value {
                cmd.arg(flag_sample(flag));
            }
            passed.push(format!("flag --{flag}: "));
        }
        let out = output(&format!("sheath run --config --{long}"), cmd).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--{long}: stderr: {stderr}");
        assert!(
            passed.iter().any(|p| stderr.contains(p.as_str())),
            "--{long}: the error must name the flag: {stderr}"
        );
        assert!(
            stderr.contains("single-listener flags cannot be combined with --config"),
            "--{long}: {stderr}"
        );
        checked += 1;
    }
    assert!(checked >= 28, "only {checked} flags checked");
}

/// `sheath ca export` with the state dir passed as the command says.
async fn ca_export(cmd: Command) -> String {
    let out = output("sheath ca export", cmd).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    text(&out.stdout)
}

#[tokio::test]
async fn run_from_env_vars_only() {
    let state = tempfile::tempdir().unwrap();
    let upstream = backend::http().await;
    let mut cmd = sheath();
    // No flags at all: the Compose/pod-spec shape.
    cmd.arg("run")
        .env("SHEATH_LISTEN", "127.0.0.1:0")
        .env("SHEATH_UPSTREAM", upstream.to_string())
        .env("SHEATH_MODE", "http")
        .env("SHEATH_STATE_DIR", state.path())
        .env("SHEATH_LOG_FORMAT", "json");
    let mut proxy = Process::spawn(cmd);
    let addr = proxy.listening_addr().await;

    let mut export = sheath();
    export
        .args(["ca", "export"])
        .env("SHEATH_STATE_DIR", state.path());
    let roots = pki::roots_from_pem(&ca_export(export).await);

    let mut sender = within("TLS + HTTP/1.1 handshake", client::h1(addr, roots)).await;
    let resp = within("GET /headers", sender.send_request(client::get("/headers")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = within("response body", client::body_text(resp)).await;
    let headers = client::parse_headers(&body);
    assert_eq!(
        client::header(&headers, "x-forwarded-proto"),
        ["https"],
        "backend saw:\n{body}"
    );
    // An idle keep-alive connection must not hold up the drain.
    drop(sender);

    proxy.signal("TERM");
    assert_eq!(proxy.exit_code(common::DEADLINE).await, 0);
}

#[tokio::test]
async fn demo_prints_a_curl_line_that_works() {
    if !common::require_tool("curl") {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let mut cmd = sheath();
    cmd.args(["demo", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state.path());
    let mut demo = Process::spawn(cmd);
    let line = demo
        .wait_line("the curl line", true, |l| {
            l.trim_start().starts_with("curl --cacert")
        })
        .await;

    // Run exactly what the user is told to paste.
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut curl = Command::new(words[0]);
    curl.args(&words[1..]).args(["-sS", "--max-time", "10"]);
    let out = output("curl from the demo banner", curl).await;
    assert!(
        out.status.success(),
        "`{line}` failed: {}",
        text(&out.stderr)
    );
    let body = text(&out.stdout);
    assert!(body.contains("Hello from the demo backend"), "{body}");

    demo.signal("TERM");
    assert_eq!(demo.exit_code(common::DEADLINE).await, 0);
}

#[tokio::test]
async fn ca_export_is_stable_and_private() {
    use std::os::unix::fs::PermissionsExt;

    let state = tempfile::tempdir().unwrap();
    let export = || {
        let mut cmd = sheath();
        cmd.args(["ca", "export", "--state-dir"]).arg(state.path());
        cmd
    };
    let first = ca_export(export()).await;
    let second = ca_export(export()).await;
    assert!(first.starts_with("-----BEGIN CERTIFICATE-----"), "{first}");
    // A new root on every export would break every client that trusted the
    // first one.
    assert_eq!(first, second, "the CA must be created once and then reused");
    assert_eq!(
        std::fs::read_to_string(ca_pem_path(state.path())).unwrap(),
        first
    );
    // The root must be usable as a trust anchor, not just PEM-shaped.
    assert!(!pki::roots_from_pem(&first).is_empty());

    let key = state.path().join("local-ca").join("ca.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "CA key mode is {mode:o}");
}

/// Certificates as Docker mounts secrets: each file bind-mounted on its
/// own, read-only, into sheath's mount namespace (`unshare --mount`), and
/// rotated by rewriting the files in place on the host's side (a rename
/// would never reach a file bind mount). sheath serves the pair, follows
/// the rotation by polling (no inotify event reaches the mount's view of
/// a file written through another path) and needs no write access there.
#[tokio::test]
async fn read_only_secret_files_are_served_and_their_rotation_followed() {
    if !common::require_root("bind mounts in a mount namespace need root")
        || !common::require_tool("unshare")
    {
        return;
    }
    let pki = TestPki::new();
    let host = tempfile::tempdir().unwrap();
    let files = pki.write_server(host.path(), "tls");
    let secrets = tempfile::tempdir().unwrap();
    let (cert, key) = (
        secrets.path().join("tls.crt"),
        secrets.path().join("tls.key"),
    );
    for mount_point in [&cert, &key] {
        std::fs::write(mount_point, "").unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let config = common::write_config(
        state.path(),
        &format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"tcp\"\n\
             [listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\npoll_interval = \"300ms\"\n",
            backend::tcp_echo().await,
            cert.display(),
            key.display()
        ),
    );
    let mut cmd = isolated(Command::new("unshare"));
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind -o ro "$1" "$3" && mount --bind -o ro "$2" "$4" && shift 4 && exec "$@""#)
        .arg("sh")
        .args([&files.cert, &files.key, &cert, &key])
        .arg(BIN)
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config);
    let mut proc = Process::spawn(cmd);
    let addr = proc.listening_addr().await;
    let serial_of = |pem: &str| {
        let der = sheath::cert::parse_chain_pem("test", pem.as_bytes()).unwrap();
        sheath::cert::CertInfo::from_der(&der[0]).unwrap().serial
    };
    let served = client::served_cert(addr, pki.roots()).await.unwrap();
    assert_eq!(served.serial, serial_of(&files.cert_pem));
    // Outside sheath's namespace the mount points are still the empty files.
    assert_eq!(std::fs::read_to_string(&cert).unwrap(), "");

    let (cert_pem, key_pem) = pki.server_cert(&["localhost"], Duration::from_secs(3600));
    std::fs::write(&files.key, &key_pem).unwrap();
    std::fs::write(&files.cert, &cert_pem).unwrap();
    within("the rotated pair served", async {
        while client::served_cert(addr, pki.roots()).await.unwrap().serial != serial_of(&cert_pem) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        proc.stderr
            .find(&|l| l.contains("\"level\":\"ERROR\""))
            .is_none(),
        "{}",
        proc.stderr.text()
    );
}

/// A chain some clients refuse is served, with a warning that names the
/// file, the certificate by position and subject, and what is wrong: at
/// the start, and again when the files are rotated to another such chain.
/// The chain fixed is installed without one.
#[tokio::test]
async fn a_chain_some_clients_refuse_is_named_in_a_warning_at_start_and_rotation() {
    const WARNING: &str = "the certificate chain has a problem; it is served as it is";
    let warned = |l: &str, about: &str| is_log(l, WARNING) && l.contains(about);
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86_400);
    let int = pki.intermediate("sheath test intermediate", now - day, now + day);
    // The intermediate its CA replaced: same name, another key.
    let replaced = pki.intermediate("sheath test intermediate", now - 2 * day, now + day);
    let (leaf, key) = int.server_cert(&["localhost"]);
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, leaf.clone() + &replaced.pem).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    let config = common::write_config(
        dir.path(),
        &format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\nmode = \"tcp\"\n\
             [listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\npoll_interval = \"300ms\"\n",
            cert_path.display(),
            key_path.display()
        ),
    );
    let mut cmd = sheath();
    cmd.args(["--log-format", "json", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("run")
        .arg("--config")
        .arg(&config);
    let mut proc = Process::spawn(cmd);
    let line = proc.wait_log(WARNING).await;
    assert_eq!(
        json_field(&line, "file"),
        Some(cert_path.to_str().unwrap()),
        "{line}"
    );
    let problem = json_field(&line, "problem").unwrap_or_default();
    assert!(
        problem.starts_with("certificate 2 (CN=sheath test intermediate) did not issue certificate 1 (CN=localhost); it has the name of certificate 1's issuer, but not the key that signed it"),
        "{line}"
    );
    let addr = proc.listening_addr().await;

    // Rotated to a chain whose intermediate has expired.
    let lapsed = pki.intermediate("lapsed intermediate", now - 2 * day, now - day);
    let (lapsed_leaf, lapsed_key) = lapsed.server_cert(&["localhost"]);
    common::write_atomically(&key_path, &lapsed_key);
    common::write_atomically(&cert_path, &(lapsed_leaf + &lapsed.pem));
    proc.wait_line("the expired intermediate named", false, |l| {
        warned(l, "certificate 2 (CN=lapsed intermediate) expired at ")
    })
    .await;

    // Fixed: installed, and nothing to warn of.
    let installed = |p: &Process| p.logged("certificate installed");
    let before = installed(&proc);
    common::write_atomically(&key_path, &key);
    common::write_atomically(&cert_path, &(leaf + &int.pem));
    within("the fixed chain installed", async {
        while installed(&proc) == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let config = client::client_config(pki.roots(), &[]);
    let tls = client::connect(addr, config).await.unwrap();
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap().len(), 2);
    assert_eq!(proc.logged(WARNING), 2, "{}", proc.stderr.text());
}

/// Every temporary (`.NAME.tmp.PID`) under `dir`, at any depth.
fn temporaries(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_name().to_string_lossy().contains(".tmp.") {
            found.push(path.display().to_string());
        } else if path.is_dir() {
            found.extend(temporaries(&path));
        }
    }
    found
}

/// A process killed at any moment while writing its state leaves the old
/// state or the new, never half of it. strace kills `sheath ca export`
/// (SIGKILL) on entering each system call that creates, writes, syncs or
/// renames a file as it creates the local CA, one run per call; each time
/// sheath must start again, with the very CA it had if it got as far as
/// having one, and the temporaries of the killed run are cleared.
#[tokio::test]
async fn killed_at_any_point_of_writing_state_leaves_no_half_file() {
    if !common::require_tool("strace") {
        return;
    }
    let export = |state: &Path| {
        let mut cmd = sheath();
        cmd.args(["ca", "export", "--state-dir"]).arg(state);
        cmd
    };
    let mut kills = Vec::new();
    for syscall in ["mkdir", "openat", "write", "fsync", "rename"] {
        for nth in 1.. {
            let state = tempfile::tempdir().unwrap();
            let mut cmd = isolated(Command::new("strace"));
            cmd.args(["-f", "-qq", "-o", "/dev/null"])
                .arg(format!("--trace={syscall}"))
                .arg(format!("--inject={syscall}:signal=KILL:when={nth}"))
                .arg(BIN)
                .args(["ca", "export", "--state-dir"])
                .arg(state.path());
            let run = output("sheath ca export under strace", cmd).await;
            if run.status.success() {
                // Past the last such call of the run.
                assert!(nth > 1, "strace did not stop sheath at {syscall}");
                break;
            }
            kills.push(format!("{syscall}#{nth}"));
            let had = std::fs::read_to_string(ca_pem_path(state.path())).ok();
            let again = output("sheath ca export after a kill", export(state.path())).await;
            assert!(
                again.status.success(),
                "killed on {syscall} #{nth}, sheath does not start again: {}",
                text(&again.stderr)
            );
            if let Some(had) = had {
                assert_eq!(
                    text(&again.stdout),
                    had,
                    "killed on {syscall} #{nth}: the CA was replaced"
                );
            }
            let left = temporaries(state.path());
            assert!(left.is_empty(), "killed on {syscall} #{nth}: {left:?} left");
        }
    }
    // The calls that matter are among them: two directories, the two
    // files' writes and syncs, three renames.
    for point in ["mkdir#2", "write#2", "fsync#4", "rename#3"] {
        assert!(kills.iter().any(|k| k == point), "{point} not in {kills:?}");
    }
}

/// sheath in TCP mode in front of an echo backend, with one TLS connection
/// through it that is proven live and then left open. `workers` of 1 runs
/// sheath's single-threaded runtime, where signals, accepting and relaying
/// share one thread.
async fn tcp_proxy_with_open_connection(
    state: &Path,
    drain_timeout: &str,
    workers: &str,
) -> (Process, TlsStream<TcpStream>) {
    let upstream = backend::tcp_echo().await;
    let mut cmd = sheath();
    cmd.args(["--workers", workers])
        .args(["--log-format", "json", "run", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &upstream.to_string(), "--mode", "tcp"])
        .args(["--drain-timeout", drain_timeout, "--state-dir"])
        .arg(state);
    let mut proxy = Process::spawn(cmd);
    let addr = proxy.listening_addr().await;
    let pem = std::fs::read_to_string(ca_pem_path(state)).unwrap();
    // TCP listeners offer no ALPN, so the client must not require one.
    let config = client::client_config(pki::roots_from_pem(&pem), &[]);
    let mut tls = within("TLS connect", client::connect(addr, config))
        .await
        .expect("TLS connect");
    echo_round_trip(&mut tls, b"ping").await;
    (proxy, tls)
}

async fn echo_round_trip(tls: &mut TlsStream<TcpStream>, msg: &[u8]) {
    tls.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    within("echo through sheath", tls.read_exact(&mut buf))
        .await
        .expect("echo");
    assert_eq!(buf, msg);
}

/// What one looping client saw while sheath drained.
#[derive(Debug, Default)]
struct LoopOutcome {
    /// Complete responses.
    answered: u64,
    /// Responses whose head arrived but whose body did not complete.
    cut: u64,
}

/// GET / over keep-alive HTTP/1.1 connections until sheath refuses new
/// ones. A request on a kept connection that sheath closes as it drains
/// is sent again on a new one, as HTTP clients retry idempotent requests
/// (RFC 9112, 9.3.1): its loss is not counted; a response cut short is.
async fn keep_requesting(
    addr: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
    go: Arc<AtomicBool>,
) -> LoopOutcome {
    use http_body_util::BodyExt;
    let mut outcome = LoopOutcome::default();
    loop {
        let config = client::client_config(Arc::clone(&roots), &[b"http/1.1"]);
        let Ok(tls) = client::connect(addr, config).await else {
            return outcome;
        };
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        loop {
            go.store(true, Ordering::SeqCst);
            let Ok(resp) = sender.send_request(client::get("/")).await else {
                break;
            };
            match resp.into_body().collect().await.map(|b| b.to_bytes()) {
                Ok(body) if body == "ok" => outcome.answered += 1,
                _ => {
                    outcome.cut += 1;
                    break;
                }
            }
        }
    }
}

/// SIGTERM while clients loop requests and a download is under way: the
/// download completes byte for byte, no response is cut short, new
/// connections are refused, and sheath exits 0 within the drain bound.
#[tokio::test]
async fn sigterm_under_load_finishes_what_is_in_flight_and_exits_0() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let config = common::write_config(
        dir.path(),
        &format!(
            "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"http\"\n{}",
            backend::http().await,
            pki::files_cert_toml(&files)
        ),
    );
    let mut cmd = sheath();
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(&config);
    let mut proxy = Process::spawn(cmd);
    let addr = proxy.listening_addr().await;

    let started = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..8)
        .map(|_| tokio::spawn(keep_requesting(addr, pki.roots(), Arc::clone(&started))))
        .collect();
    let mut download = client::h1(addr, pki.roots()).await;
    // 40 chunks of 32 KiB, 25 ms apart: about a second of transfer.
    let response = within(
        "download head",
        download.send_request(client::get("/drip?chunks=40&size=32768&ms=25")),
    )
    .await
    .unwrap();
    common::eventually("the clients are looping", || started.load(Ordering::SeqCst)).await;

    proxy.signal("TERM");
    let signalled = Instant::now();
    let body = within("the download during the drain", async {
        use http_body_util::BodyExt;
        response.into_body().collect().await
    })
    .await
    .expect("the download completes")
    .to_bytes();
    assert_eq!(body.len(), 40 * 32768);
    assert!(
        body.iter().all(|&b| b == b'x'),
        "the download's bytes changed"
    );

    let mut answered = 0;
    for outcome in loops {
        let outcome = within("a looping client stops at the refusal", outcome)
            .await
            .unwrap();
        assert_eq!(outcome.cut, 0, "responses cut short: {outcome:?}");
        answered += outcome.answered;
    }
    assert!(answered > 0, "no request was answered");
    // The drain bound is write_config's 5 s.
    assert_eq!(proxy.exit_code(Duration::from_secs(8)).await, 0);
    assert!(
        signalled.elapsed() < Duration::from_secs(6),
        "exit {:?} after the signal",
        signalled.elapsed()
    );
    // New connections were refused during the drain: each looping client
    // stopped at one. The port is not tried again after the exit: the
    // kernel may hand it at once to a listener of another test.
}

#[tokio::test]
async fn second_signal_forces_exit() {
    let state = tempfile::tempdir().unwrap();
    let (mut proxy, mut tls) = tcp_proxy_with_open_connection(state.path(), "30s", "1").await;

    proxy.signal("TERM");
    proxy.wait_log("draining connections").await;
    // The drain keeps serving open streams, so only the second signal can
    // explain an early exit.
    echo_round_trip(&mut tls, b"still here").await;

    proxy.signal("TERM");
    let started = Instant::now();
    assert_eq!(proxy.exit_code(Duration::from_secs(10)).await, 130);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "forced exit took {:?}",
        started.elapsed()
    );
    // The process is gone, so its end of the connection is too.
    let mut buf = [0u8; 16];
    let after = within("connection end after exit", tls.read(&mut buf)).await;
    assert!(matches!(after, Ok(0) | Err(_)), "read {after:?}");
}

/// User plus system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses; utime and
    // stime are the 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn out_of_file_descriptors_accept_backs_off_and_recovers() {
    use rustix::process::{getrlimit, prlimit, Pid, Resource, Rlimit};

    let state = tempfile::tempdir().unwrap();
    let (mut proxy, mut open) = tcp_proxy_with_open_connection(state.path(), "5s", "1").await;
    let addr = proxy.listening_addr().await;

    // Leave sheath four descriptors beyond those it holds now.
    let held = std::fs::read_dir(format!("/proc/{}/fd", proxy.pid))
        .unwrap()
        .count() as u64;
    let hard = getrlimit(Resource::Nofile).maximum;
    prlimit(
        Pid::from_raw(proxy.pid as i32),
        Resource::Nofile,
        Rlimit {
            current: Some(held + 4),
            maximum: hard,
        },
    )
    .expect("lower sheath's descriptor limit");

    // Plain TCP connections that never say hello: the first few take the
    // last descriptors, the rest wait in the listen queue, where accept
    // fails with EMFILE for as long as they are there.
    let mut hogs = Vec::new();
    for _ in 0..16 {
        hogs.push(TcpStream::connect(addr).await.unwrap());
    }
    proxy.wait_log("accept failed").await;

    // Out of descriptors, sheath waits instead of retrying at once: over a
    // second it uses a small part of a core, where a retry loop uses all.
    let ticks = rustix::param::clock_ticks_per_second();
    let before = cpu_ticks(proxy.pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(proxy.pid) - before;
    assert!(
        used * 5 < ticks,
        "sheath used {used} of {ticks} ticks in a second without descriptors"
    );
    // An open connection needs no new descriptor and is served throughout.
    echo_round_trip(&mut open, b"still served").await;

    // Once the hogs are gone, new clients are served again.
    drop(hogs);
    let pem = std::fs::read_to_string(ca_pem_path(state.path())).unwrap();
    let config = client::client_config(pki::roots_from_pem(&pem), &[]);
    let mut fresh = within("TLS connect after recovery", async {
        loop {
            if let Ok(tls) = client::connect(addr, config.clone()).await {
                return tls;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    echo_round_trip(&mut fresh, b"served again").await;
}

/// `sheath` started with an open-file limit of `soft:hard`, as a service
/// manager or a container runtime starts it (`prlimit` execs sheath in
/// its own process, so the pid is sheath's).
fn sheath_with_open_files(soft: u64, hard: u64) -> Command {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={soft}:{hard}"))
        .arg("--")
        .arg(BIN);
    isolated(cmd)
}

/// A hard open-file limit to start sheath with: this process's, within
/// what it may hand down without privileges, and 4,096 at most.
fn hard_open_file_limit() -> u64 {
    use rustix::process::{getrlimit, Resource};
    getrlimit(Resource::Nofile)
        .maximum
        .map_or(4096, |h| h.min(4096))
}

/// The soft and hard "Max open files" of process `pid`.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no open-file limit in\n{limits}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_string(), fields[4].to_string())
}

#[tokio::test]
async fn a_low_soft_open_file_limit_is_raised_to_the_hard_one() {
    if !common::require_tool("prlimit") {
        return;
    }
    let hard = hard_open_file_limit();
    let state = tempfile::tempdir().unwrap();
    let upstream = backend::tcp_echo().await;
    // systemd's and recent container runtimes' soft limit is 1,024; a
    // lower one keeps the test small.
    let mut cmd = sheath_with_open_files(128, hard);
    cmd.args(["--log-format", "json", "run", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &upstream.to_string(), "--mode", "tcp"])
        .arg("--state-dir")
        .arg(state.path());
    let mut proxy = Process::spawn(cmd);
    let addr = proxy.listening_addr().await;
    let admin = admin_addr(&mut proxy).await;
    let hard_text = hard.to_string();
    assert_eq!(open_file_limits(proxy.pid), (hard_text.clone(), hard_text));

    // In TCP mode each client holds two of sheath's descriptors (its own
    // and its upstream's): 100 clients take 200, past the 128 sheath was
    // started with, where accepting failed with EMFILE.
    let pem = std::fs::read_to_string(ca_pem_path(state.path())).unwrap();
    let config = client::client_config(pki::roots_from_pem(&pem), &[]);
    let mut clients = Vec::new();
    for n in 0..100 {
        let mut tls = within("TLS connect", client::connect(addr, config.clone()))
            .await
            .unwrap_or_else(|e| panic!("client {n}: {e}"));
        echo_round_trip(&mut tls, b"ping").await;
        clients.push(tls);
    }
    let (_, scrape) = crate::admin::call(admin, "GET", "/metrics").await;
    assert_eq!(crate::admin::value(&scrape, "process_max_fds"), hard as f64);
    let open = crate::admin::value(&scrape, "process_open_fds");
    assert!(open >= 200.0, "{open} descriptors open with 100 clients");
}

/// The export hook runs with the soft open-file limit sheath was started
/// with, not the one sheath raised for its connections: a program that
/// closes every descriptor up to its limit as it starts takes seconds
/// over a million, and one built on `select()` fails past 1,024.
#[tokio::test]
async fn the_hook_gets_the_open_file_limit_sheath_was_started_with() {
    if !common::require_tool("prlimit") {
        return;
    }
    let hard = hard_open_file_limit();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("hook-limit");
    let upstream = backend::tcp_echo().await;
    let config = common::write_config(
        dir.path(),
        &format!(
            "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\nmax_connections = 16\n\n[listener.cert]\nsource = \"local_ca\"\n\n[listener.cert.export]\ndir = \"{{dir}}/export\"\non_renew = 'echo \"$(ulimit -S -n) $(ulimit -H -n)\" > {seen}.tmp && mv {seen}.tmp {seen}'\n",
            seen = seen.display(),
        ),
    );
    let mut cmd = sheath_with_open_files(128, hard);
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(&config);
    let mut proxy = Process::spawn(cmd);
    proxy.listening_addr().await;
    let hard_text = hard.to_string();
    assert_eq!(open_file_limits(proxy.pid), (hard_text.clone(), hard_text));
    common::eventually("the hook to run", || seen.exists()).await;
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap().trim(),
        format!("128 {hard}"),
        "the hook's soft and hard open-file limits"
    );

    // A successor after a binary upgrade starts with the raised limit and
    // exports its first certificate too: its hook gets the first one's.
    std::fs::remove_file(&seen).unwrap();
    let (successor, _guard) = upgrade(&mut proxy).await;
    common::eventually("the successor's hook to run", || seen.exists()).await;
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap().trim(),
        format!("128 {hard}"),
        "the successor's hook's soft and hard open-file limits"
    );
    assert_eq!(
        open_file_limits(successor),
        (hard.to_string(), hard.to_string())
    );
}

#[tokio::test]
async fn an_open_file_limit_below_what_max_connections_needs_is_warned_about() {
    if !common::require_tool("prlimit") {
        return;
    }
    const WARNING: &str = "the open-file limit is below what max_connections allows (a descriptor for each client and one for its upstream): past about `connections` connections, clients wait or get errors; raise the limit (systemd `LimitNOFILE=`, `docker run --ulimit nofile=N:N`, the pod's container runtime) or lower max_connections";
    let dir = tempfile::tempdir().unwrap();
    let upstream = backend::tcp_echo().await;
    let toml = |max: u32| {
        format!(
            "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nmode = \"tcp\"\nmax_connections = {max}\n"
        )
    };
    let config = common::write_config(dir.path(), &toml(500));
    let text = std::fs::read_to_string(&config).unwrap();
    // Soft and hard alike: nothing to raise, as under `LimitNOFILE=200`.
    let mut cmd = sheath_with_open_files(200, 200);
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(&config);
    let mut proxy = Process::spawn(cmd);
    let warning = proxy.wait_log(WARNING).await;
    // 500 connections need 2 × 500 + 64 descriptors; 200 leave room for
    // (200 - 64) / 2.
    for field in ["\"limit\":200", "\"needed\":1064", "\"connections\":68"] {
        assert!(warning.contains(field), "{field} not in {warning}");
    }
    proxy.listening_addr().await;
    let warnings = |p: &Process| p.logged(WARNING);
    let reloads = |p: &Process| p.logged("configuration reloaded");

    // A reload within the limit says nothing; the check runs before the
    // reload is announced.
    common::write_atomically(
        &config,
        &text.replace("max_connections = 500", "max_connections = 50"),
    );
    proxy.signal("HUP");
    common::eventually("the first reload", || reloads(&proxy) >= 1).await;
    assert_eq!(warnings(&proxy), 1, "{}", proxy.stderr.text());

    // One past it warns again (the watched file may reload it twice).
    common::write_atomically(&config, &text);
    proxy.signal("HUP");
    common::eventually("the warning on reload", || warnings(&proxy) >= 2).await;
}

#[tokio::test]
async fn drain_timeout_cuts_stuck_connection_and_exits_nonzero() {
    let state = tempfile::tempdir().unwrap();
    let (mut proxy, _tls) = tcp_proxy_with_open_connection(state.path(), "1s", "2").await;

    let started = Instant::now();
    proxy.signal("TERM");
    assert_eq!(proxy.exit_code(Duration::from_secs(10)).await, 1);
    let took = started.elapsed();
    // At least the drain timeout: the open stream was given its chance
    // rather than cut at once; well under the 1s drain plus the bounded
    // abort and runtime shutdown after it.
    assert!(took >= Duration::from_secs(1), "exited after only {took:?}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    // The log must say why the exit code is 1. The exit can be observed
    // before the last lines have left the pipe, so wait for the line.
    proxy
        .wait_log("drain timeout expired; connections were cut")
        .await;
}

/// `openssl s_client` pinned to one protocol version: (success, output).
async fn s_client(addr: SocketAddr, version: &str, ca: &Path) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-brief", "-connect", &addr.to_string()])
        .args([version, "-servername", "localhost"])
        // OpenSSL 3's default security level refuses TLS 1.1 itself; lower
        // it so any refusal below comes from sheath.
        .args(["-cipher", "DEFAULT:@SECLEVEL=0"])
        .arg("-CAfile")
        .arg(ca)
        .arg("-verify_return_error");
    let out = output(&format!("openssl s_client {version}"), cmd).await;
    // -brief writes the session summary to stderr.
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    (out.status.success(), all)
}

#[tokio::test]
async fn tls_versions_below_1_2_are_refused() {
    if !common::require_tool("openssl") {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let upstream = backend::http().await;
    let mut cmd = sheath();
    cmd.args(["--log-format", "json", "run", "--listen", "127.0.0.1:0"])
        .args(["--upstream", &upstream.to_string(), "--mode", "http"])
        .arg("--state-dir")
        .arg(state.path());
    let mut proxy = Process::spawn(cmd);
    let addr = proxy.listening_addr().await;
    let ca = ca_pem_path(state.path());

    let (ok, out) = s_client(addr, "-tls1_1", &ca).await;
    assert!(!ok, "TLS 1.1 handshake succeeded:\n{out}");
    assert!(!out.contains("Protocol version: TLSv1.1"), "{out}");
    // An alert from the server, as opposed to OpenSSL declining to send a
    // TLS 1.1 hello at all (which would prove nothing about sheath).
    assert!(
        out.contains("alert"),
        "refusal did not come from the server:\n{out}"
    );

    for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, out) = s_client(addr, flag, &ca).await;
        assert!(ok, "{version} handshake failed:\n{out}");
        assert!(
            out.contains(&format!("Protocol version: {version}")),
            "{out}"
        );
        assert!(out.contains("Verification: OK"), "{out}");
    }

    proxy.signal("TERM");
    assert_eq!(proxy.exit_code(common::DEADLINE).await, 0);
}

#[tokio::test]
async fn port_conflict_fails_with_clear_message() {
    let state = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let upstream = backend::closed_port().await;
    let mut cmd = sheath();
    cmd.args(["run", "--listen", &addr.to_string()])
        .args(["--upstream", &upstream.to_string(), "--state-dir"])
        .arg(state.path());
    let out = output("sheath run on a taken port", cmd).await;
    let stderr = text(&out.stderr);
    // 1 (a runtime failure), not 2: the configuration itself is valid.
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("cannot bind {addr}")),
        "want `cannot bind {addr}` in: {stderr}"
    );
    drop(taken);
}

#[tokio::test]
async fn config_file_changes_and_sighup_reload_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let upstream = backend::http().await;
    let (pa, pb) = (common::pebble::free_port(), common::pebble::free_port());
    let listener = |name: &str, port: u16| {
        format!("[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\n")
    };
    let path = dir.path().join("sheath.toml");
    let write = |text: &str| {
        let tmp = dir.path().join("sheath.toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    write(&listener("a", pa));
    let mut cmd = sheath();
    // Two workers, so that every worker's accept loop has to come up for
    // a new listener and let go of a removed one.
    cmd.args(["--workers", "2", "--log-format", "json", "--state-dir"])
        .arg(&state);
    cmd.arg("run").arg("--config").arg(&path);
    let mut proc = Process::spawn(cmd);
    proc.listening_addr().await;
    let roots = pki::roots_from_pem(&std::fs::read_to_string(ca_pem_path(&state)).unwrap());
    let a: SocketAddr = format!("127.0.0.1:{pa}").parse().unwrap();
    let mut sa = client::h1(a, roots.clone()).await;
    assert_eq!(
        sa.send_request(client::get("/")).await.unwrap().status(),
        200
    );

    // A broken edit is reported and changes nothing.
    write(&format!(
        "{}\n[[listener]]\nname = \"b\"\nbind = \"nonsense\"\nupstream = \"{upstream}\"\n",
        listener("a", pa)
    ));
    let line = proc
        .wait_log("reload failed; the running configuration stays in force")
        .await;
    assert!(line.contains("listener[1].bind"), "{line}");
    assert_eq!(
        sa.send_request(client::get("/")).await.unwrap().status(),
        200
    );

    // Fixed: the new listener comes up; `a` keeps its socket and its
    // keep-alive connection.
    write(&format!("{}\n{}", listener("a", pa), listener("b", pb)));
    proc.wait_line("listener b", false, |l| {
        is_log(l, "listening") && json_field(l, "addr") == Some(&format!("127.0.0.1:{pb}"))
    })
    .await;
    let b: SocketAddr = format!("127.0.0.1:{pb}").parse().unwrap();
    let mut sb = client::h1(b, roots.clone()).await;
    assert_eq!(
        sb.send_request(client::get("/")).await.unwrap().status(),
        200
    );
    assert_eq!(
        sa.send_request(client::get("/")).await.unwrap().status(),
        200
    );

    // SIGHUP reloads too.
    let reloads = |p: &Process| p.logged("configuration reloaded");
    let before = reloads(&proc);
    proc.signal("HUP");
    within("SIGHUP reload", async {
        while reloads(&proc) == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        sa.send_request(client::get("/")).await.unwrap().status(),
        200
    );

    // Removed: `b`'s port closes once no worker accepts on it any more.
    write(&listener("a", pa));
    within("listener b's port to close", async {
        while TcpStream::connect(b).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        sa.send_request(client::get("/")).await.unwrap().status(),
        200
    );

    proc.signal("TERM");
    assert_eq!(proc.exit_code(Duration::from_secs(10)).await, 0);
}

/// sheath with two workers and one listener, on its local CA, in front of
/// `upstream`.
struct TwoWorkers {
    _state: tempfile::TempDir,
    proc: Process,
    admin: SocketAddr,
    addr: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
}

impl TwoWorkers {
    async fn start(upstream: SocketAddr) -> TwoWorkers {
        let state = tempfile::tempdir().unwrap();
        let mut cmd = sheath();
        cmd.args(["--workers", "2", "--log-format", "json", "--state-dir"])
            .arg(state.path());
        cmd.args(["run", "--listen", "127.0.0.1:0", "--upstream"])
            .arg(upstream.to_string());
        let mut proc = Process::spawn(cmd);
        let admin = admin_addr(&mut proc).await;
        let addr = proc.listening_addr().await;
        let ca = std::fs::read_to_string(ca_pem_path(state.path())).unwrap();
        TwoWorkers {
            _state: state,
            proc,
            admin,
            addr,
            roots: pki::roots_from_pem(&ca),
        }
    }
}

/// With several workers, connections go to the one with the fewest open,
/// whichever worker accepted them, and each serves its own.
#[tokio::test]
async fn workers_share_the_connections_between_them() {
    let TwoWorkers {
        _state,
        mut proc,
        admin,
        addr,
        roots,
    } = TwoWorkers::start(backend::http().await).await;

    // Opened at once, as a client opens its pool: the first worker to
    // wake accepts most of them and must pass every other one on.
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(client::h1(addr, roots.clone()));
    }
    let mut conns = futures_util::future::join_all(conns).await;
    for conn in &mut conns {
        assert_eq!(
            conn.send_request(client::get("/")).await.unwrap().status(),
            200
        );
    }
    let open = |scrape: &str, worker: usize| {
        crate::admin::value(
            scrape,
            &format!("sheath_worker_connections_active{{worker=\"{worker}\"}}"),
        )
    };
    let (_, scrape) = crate::admin::call(admin, "GET", "/metrics").await;
    assert_eq!((open(&scrape, 0), open(&scrape, 1)), (2.0, 2.0), "{scrape}");
    // Keep-alive on both workers, each with its own upstream pool.
    for conn in &mut conns {
        assert_eq!(
            conn.send_request(client::get("/")).await.unwrap().status(),
            200
        );
    }

    drop(conns);
    within("both workers' connections to close", async {
        loop {
            let (_, scrape) = crate::admin::call(admin, "GET", "/metrics").await;
            if (open(&scrape, 0), open(&scrape, 1)) == (0.0, 0.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    proc.signal("TERM");
    assert_eq!(proc.exit_code(Duration::from_secs(10)).await, 0);
}

/// A client making a new TLS connection for every request, all the time,
/// counting what succeeded and what failed.
struct RequestLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<std::sync::atomic::AtomicU64>,
    failed: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RequestLoop {
    fn start(addr: SocketAddr, roots: Arc<rustls::RootCertStore>) -> RequestLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match one_request(addr, &roots).await {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("request failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        };
        RequestLoop {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// Wait until `n` more requests succeeded.
    async fn wait_served(&self, n: u64, what: &str) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        within(what, async {
            while self.ok.load(Ordering::Relaxed) < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    /// Stop and return how many requests failed.
    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.failed.load(Ordering::Relaxed)
    }
}

async fn one_request(addr: SocketAddr, roots: &Arc<rustls::RootCertStore>) -> Result<(), String> {
    let config = client::client_config(roots.clone(), &[b"http/1.1"]);
    let tls = client::connect(addr, config)
        .await
        .map_err(|e| e.to_string())?;
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let r = s
        .send_request(client::get("/"))
        .await
        .map_err(|e| e.to_string())?;
    if r.status() == 200 {
        Ok(())
    } else {
        Err(format!("status {}", r.status()))
    }
}

/// SIGUSR2 to `old`: wait for the successor to take over and `old` to
/// drain and exit 0. The successor's pid, and a guard that kills it.
/// The successor's pid in the line that says it was started.
fn successor_pid(line: &str) -> u32 {
    line.split("\"pid\":")
        .nth(1)
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}

/// sheath running the config file at `path`, logging JSON, with its state
/// in `state` and a drain bound an upgrade's old process never reaches.
fn run_config(state: &Path, path: &Path) -> Process {
    let mut cmd = sheath();
    cmd.arg("--log-format")
        .arg("json")
        .arg("--state-dir")
        .arg(state)
        .arg("run")
        .arg("--config")
        .arg(path)
        .arg("--drain-timeout")
        .arg("10s");
    Process::spawn(cmd)
}

async fn upgrade(old: &mut Process) -> (u32, KillOnDrop) {
    old.signal("USR2");
    let line = old
        .wait_log("upgrade: started successor on the inherited sockets")
        .await;
    let successor = successor_pid(&line);
    let guard = KillOnDrop(Some(successor));
    old.wait_log("upgrade: took over; the previous process drains")
        .await;
    assert_eq!(
        old.exit_code(Duration::from_secs(15)).await,
        0,
        "old process drains and exits 0"
    );
    assert!(alive(successor), "successor keeps running");
    (successor, guard)
}

/// Kills a process by pid when dropped, for processes the test did not
/// spawn itself (an upgrade's successor).
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_hands_over_sockets_without_refusing_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let upstream = backend::http().await;
    let port = common::pebble::free_port();
    let path = dir.path().join("sheath.toml");
    std::fs::write(
        &path,
        format!("[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\n"),
    )
    .unwrap();
    let mut old = run_config(&state, &path);
    old.listening_addr().await;
    let roots = pki::roots_from_pem(&std::fs::read_to_string(ca_pem_path(&state)).unwrap());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let traffic = RequestLoop::start(addr, roots);
    traffic.wait_served(20, "traffic before the upgrade").await;

    let (successor, _guard) = upgrade(&mut old).await;

    // The successor alone serves now.
    traffic.wait_served(20, "traffic after the upgrade").await;
    assert_eq!(
        traffic.finish().await,
        0,
        "a client request failed during the upgrade"
    );

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &successor.to_string()])
        .status();
    within("successor exits", async {
        while alive(successor) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A reload asked for while the successor starts (a listener added, then
/// SIGHUP) is not applied by the old process, whose listener would vanish
/// with it when the successor, which read the file already, took over
/// without it; the successor gets it once it has taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_an_upgrade_reaches_the_successor() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let upstream = backend::http().await;
    let (port, added) = (common::pebble::free_port(), common::pebble::free_port());
    let listener = |name: &str, port: u16| {
        format!("[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\n")
    };
    let path = dir.path().join("sheath.toml");
    std::fs::write(&path, listener("web", port)).unwrap();
    let mut old = run_config(&state, &path);
    old.listening_addr().await;
    let roots = pki::roots_from_pem(&std::fs::read_to_string(ca_pem_path(&state)).unwrap());

    old.signal("USR2");
    let line = old
        .wait_log("upgrade: started successor on the inherited sockets")
        .await;
    let successor = successor_pid(&line);
    let _guard = KillOnDrop(Some(successor));
    std::fs::write(
        &path,
        format!("{}{}", listener("web", port), listener("added", added)),
    )
    .unwrap();
    old.signal("HUP");
    old.wait_log("upgrade: took over; the previous process drains")
        .await;
    assert_eq!(old.exit_code(Duration::from_secs(15)).await, 0);

    let addr: SocketAddr = format!("127.0.0.1:{added}").parse().unwrap();
    within("the added listener served by the successor", async {
        while one_request(addr, &roots).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(alive(successor));
}

/// `sheath healthcheck` against a running sheath's admin endpoint.
async fn healthcheck(admin: SocketAddr) -> (i32, String) {
    let out = within(
        "healthcheck",
        sheath()
            .arg("healthcheck")
            .arg("--admin")
            .arg(admin.to_string())
            .output(),
    )
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

async fn admin_addr(proc: &mut Process) -> SocketAddr {
    let line = proc.wait_log("admin endpoint listening").await;
    json_field(&line, "addr")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no addr in {line}"))
}

#[tokio::test]
async fn healthcheck_exit_codes_follow_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = backend::http().await;

    // Ready: a local-CA certificate from the first moment.
    let mut cmd = sheath();
    cmd.args(["--log-format", "json", "--state-dir"])
        .arg(dir.path().join("a"));
    cmd.args(["run", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(upstream.to_string());
    let mut ready = Process::spawn(cmd);
    let ready_admin = admin_addr(&mut ready).await;
    ready.listening_addr().await;
    assert_eq!(healthcheck(ready_admin).await, (0, "ready\n".to_string()));

    // Not ready: an ACME listener whose CA cannot be reached.
    let mut cmd = sheath();
    cmd.args(["--log-format", "json", "--state-dir"])
        .arg(dir.path().join("b"));
    cmd.args(["run", "--listen", "127.0.0.1:0", "--name", "app.test"]);
    cmd.args([
        "--acme-directory",
        "https://127.0.0.1:1/directory",
        "--upstream",
    ])
    .arg(upstream.to_string());
    let mut waiting = Process::spawn(cmd);
    let waiting_admin = admin_addr(&mut waiting).await;
    let (code, out) = healthcheck(waiting_admin).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("listener `default`: no certificate yet from acme"),
        "{out}"
    );

    // Nobody there.
    ready.signal("TERM");
    assert_eq!(ready.exit_code(Duration::from_secs(10)).await, 0);
    let (code, out) = healthcheck(ready_admin).await;
    assert_eq!(code, 1);
    assert!(out.contains("cannot reach the admin endpoint"), "{out}");
    waiting.signal("TERM");
    waiting.exit_code(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn admin_reload_applies_the_config_file_and_reports_failures() {
    if !crate::common::require_tool("curl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let upstream = backend::http().await;
    let path = dir.path().join("sheath.toml");
    let good = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n"
    );
    std::fs::write(&path, &good).unwrap();
    let mut cmd = sheath();
    cmd.args(["--log-format", "json", "--state-dir"])
        .arg(dir.path().join("state"));
    cmd.arg("run").arg("--config").arg(&path);
    let mut proc = Process::spawn(cmd);
    let admin = admin_addr(&mut proc).await;
    proc.listening_addr().await;

    let post = |addr: SocketAddr| async move {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-X",
                "POST",
                &format!("http://{addr}/reload"),
                "-w",
                "\n%{http_code}",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let reply = within("POST /reload", post(admin)).await;
    assert!(
        reply.starts_with("reloaded: configuration generation 2"),
        "{reply}"
    );
    assert!(reply.ends_with("200"), "{reply}");
    let metrics = std::process::Command::new("curl")
        .args(["-s", &format!("http://{admin}/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("\nsheath_config_generation 2\n"),
        "{metrics}"
    );

    // A broken file: the reply names file, line and key; nothing changes.
    std::fs::write(&path, good.replace("upstream =", "upstrem =")).unwrap();
    let reply = within("POST /reload", post(admin)).await;
    assert!(reply.ends_with("422"), "{reply}");
    assert!(reply.contains("sheath.toml:"), "{reply}");
    assert!(reply.contains("upstrem"), "{reply}");
    let metrics = std::process::Command::new("curl")
        .args(["-s", &format!("http://{admin}/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("\nsheath_config_generation 2\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("sheath_config_reloads_total{outcome=\"failure\"} 0\n"),
        "{metrics}"
    );
    proc.signal("TERM");
    assert_eq!(proc.exit_code(Duration::from_secs(10)).await, 0);
}

/// The host pid of `pid`'s only child (unshare's forked child).
fn only_child(pid: u32) -> u32 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    text.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no child of {pid}"))
}

/// sheath as PID 1 of a PID namespace of its own (a container's init),
/// logging JSON, with its state in `state`; the subcommand comes next.
fn as_pid_1(state: &Path) -> Command {
    let mut cmd = isolated(Command::new("unshare"));
    cmd.args(["--pid", "--fork", "--mount-proc", BIN]);
    cmd.args(["--log-format", "json", "--state-dir"]).arg(state);
    cmd
}

/// In a container sheath is PID 1: if it exited after handing over, the
/// kernel would kill the successor with it. It stays as init instead,
/// forwards signals, and exits with the successor's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_as_pid_1_keeps_the_successor_alive() {
    if !common::require_root("a PID namespace for sheath as PID 1")
        || !common::require_tool("unshare")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let upstream = backend::http().await;
    let port = common::pebble::free_port();
    let mut cmd = as_pid_1(&state);
    cmd.args([
        "run",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--upstream",
    ])
    .arg(upstream.to_string())
    .args(["--drain-timeout", "10s"]);
    let mut init = Process::spawn(cmd);
    init.listening_addr().await;
    let pid1 = only_child(init.pid);
    let _guard = KillOnDrop(Some(pid1));
    let roots = pki::roots_from_pem(&std::fs::read_to_string(ca_pem_path(&state)).unwrap());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    let traffic = RequestLoop::start(addr, roots.clone());
    traffic.wait_served(20, "traffic before the upgrade").await;
    let kill = |sig: &str, pid: u32| {
        std::process::Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .unwrap();
    };
    kill("USR2", pid1);
    init.wait_log("upgrade: took over; the previous process drains")
        .await;
    init.wait_log("upgrade: staying as init for the successor")
        .await;
    traffic.wait_served(20, "traffic after the upgrade").await;
    assert!(alive(pid1), "PID 1 stays");
    assert_eq!(
        traffic.finish().await,
        0,
        "a request failed during the upgrade"
    );

    // A stop request reaches the successor through PID 1; everything
    // drains and exits cleanly.
    kill("TERM", pid1);
    assert_eq!(init.exit_code(Duration::from_secs(15)).await, 0);
    assert!(
        one_request(addr, &roots).await.is_err(),
        "nothing serves any more"
    );
}

/// Messages sent to a stand-in for systemd's notify socket, in order.
struct NotifySocket {
    path: std::path::PathBuf,
    socket: std::os::unix::net::UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: std::path::PathBuf) -> NotifySocket {
        let socket = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        socket.set_nonblocking(true).unwrap();
        NotifySocket {
            path,
            socket,
            seen: Vec::new(),
        }
    }

    /// Everything received so far.
    fn drain(&mut self) -> &[String] {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            self.seen
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        &self.seen
    }

    async fn wait_for(&mut self, message: &str) {
        within(&format!("notify message {message:?}"), async {
            while !self.drain().iter().any(|m| m == message) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

/// The upgrade as it happens under systemd: the binary is replaced the way
/// `install` and package managers do it (a new file renamed over the old
/// one), then SIGUSR2. The successor must start from the new file, not
/// from the unlinked one the running process was started from, and the
/// notify socket must see it become the main process with no STOPPING=1
/// from the process it replaces, which would make systemd stop the
/// service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_after_replacing_the_binary_runs_the_new_file_and_keeps_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("sheath");
    std::fs::copy(BIN, &bin).unwrap();
    let mut notify = NotifySocket::bind(dir.path().join("notify.sock"));
    let state = dir.path().join("state");
    let upstream = backend::http().await;
    let port = common::pebble::free_port();
    let path = dir.path().join("sheath.toml");
    std::fs::write(
        &path,
        format!("[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\n"),
    )
    .unwrap();
    let mut cmd = sheath_at(&bin);
    cmd.env("NOTIFY_SOCKET", &notify.path)
        .arg("--log-format")
        .arg("json")
        .arg("--state-dir")
        .arg(&state)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .arg("--drain-timeout")
        .arg("10s");
    let mut old = Process::spawn(cmd);
    old.listening_addr().await;
    notify
        .wait_for(&format!("MAINPID={}\nREADY=1\n", old.pid))
        .await;

    let staged = dir.path().join("sheath.new");
    std::fs::copy(BIN, &staged).unwrap();
    std::fs::rename(&staged, &bin).unwrap();
    let (successor, _guard) = upgrade(&mut old).await;
    assert_eq!(
        std::fs::read_link(format!("/proc/{successor}/exe")).unwrap(),
        bin.canonicalize().unwrap(),
        "the successor runs the replaced file"
    );
    let roots = pki::roots_from_pem(&std::fs::read_to_string(ca_pem_path(&state)).unwrap());
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    within("a request to the successor", one_request(addr, &roots))
        .await
        .unwrap();

    // The old process's exit has been observed, so anything it sent is
    // queued: systemd would have learned the new main PID and nothing else.
    assert_eq!(
        notify.drain(),
        [
            format!("MAINPID={}\nREADY=1\n", old.pid),
            format!("MAINPID={successor}\nREADY=1\n"),
        ],
        "notify messages during the upgrade"
    );

    // Stopping the successor is a real stop of the service.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &successor.to_string()])
        .status();
    notify.wait_for("STOPPING=1\n").await;
}

#[tokio::test]
async fn outbound_mode_from_flags_alone() {
    let pki = pki::TestPki::new();
    let state = tempfile::tempdir().unwrap();
    let client_ca = crate::outbound::local_ca_root(state.path());
    let (peer, _backend) = crate::outbound::peer(&pki, &client_ca).await;
    let test_ca = pki.write_ca(state.path());
    let mut cmd = sheath();
    cmd.args(["--log-format", "json", "run", "--mode", "outbound"])
        .args(["--listen", "127.0.0.1:0", "--name", "web.test"])
        .arg("--upstream")
        .arg(peer.addr("in").to_string())
        .arg("--peer-ca")
        .arg(&test_ca)
        .args(["--peer-name", "peer.test", "--state-dir"])
        .arg(state.path().join("state"));
    let mut proxy = Process::spawn(cmd);
    let addr = proxy.listening_addr().await;
    let answer = crate::outbound::plain_get(addr, "/headers").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("DNS=web.test"), "{answer}");
    proxy.signal("TERM");
    assert_eq!(proxy.exit_code(common::DEADLINE).await, 0);
}

#[tokio::test]
async fn the_upstream_protocol_flag_sets_the_listener_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &'static [&'static str]| {
        let mut cmd = sheath();
        cmd.args([
            "check",
            "--listen",
            "127.0.0.1:8443",
            "--upstream",
            "127.0.0.1:8080",
        ])
        .args(extra)
        .arg("--state-dir")
        .arg(dir.path().join("state"));
        output("sheath check", cmd)
    };
    let out = run(&["--upstream-protocol", "h2c"]).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .lines()
            .any(|l| l == "upstream_protocol = \"h2c\""),
        "{}",
        text(&out.stdout)
    );
    let out = run(&["--mode", "tcp", "--upstream-protocol", "h2c"]).await;
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("--upstream-protocol: needs --mode http"),
        "{}",
        text(&out.stderr)
    );
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// One HTTP/2 frame: its 9-byte header, then `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An HTTP/2 client that asks for many large downloads on one connection,
/// opening every window as wide as HTTP/2 allows, and never reads a byte:
/// whatever sheath keeps buffered for it stays in memory. Each stream can
/// hold only so much (its send buffer, what was read from the upstream),
/// and a connection only so many streams, so two such clients asking for
/// 256 downloads of 16 MiB each leave sheath's memory within a bound
/// (~53 MiB held; it grew past 157 MiB and on with hyper's 400 KiB send
/// buffer and 256 streams per connection).
#[tokio::test]
async fn http2_clients_that_never_read_pin_bounded_memory() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let files = pki.write_server(dir.path(), "server");
    let backend = backend::CountingBackend::start().await;
    let config = common::write_config(
        dir.path(),
        &format!(
            "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{}\"\nmode = \"http\"\n{}",
            backend.addr,
            pki::files_cert_toml(&files)
        ),
    );
    let mut cmd = sheath();
    cmd.args(["--workers", "1", "--log-format", "json", "run", "--config"])
        .arg(&config);
    let mut proxy = Process::spawn(cmd);
    let addr = proxy.listening_addr().await;
    // Served once, so what is measured is what the clients add.
    let mut warm = client::h2(addr, pki.roots()).await;
    let resp = warm.send_request(client::get_h2("/")).await.unwrap();
    assert_eq!(client::body_text(resp).await, "ok");
    let before = rss_kib(proxy.pid);

    let mut clients = Vec::new();
    for _ in 0..2 {
        let config = client::client_config(pki.roots(), &[b"h2"]);
        let mut tls = client::connect(addr, config).await.unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS: INITIAL_WINDOW_SIZE = 2^31 - 1; then the same for the
        // connection's window, and an ACK of the server's settings.
        out.extend(h2_frame(0x4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
        out.extend(h2_frame(
            0x8,
            0,
            0,
            &(0x7fff_ffff - 65_535u32).to_be_bytes(),
        ));
        out.extend(h2_frame(0x4, 0x1, 0, &[]));
        let path = b"/drip?chunks=256&size=65536&ms=0";
        for i in 0..256u32 {
            // HPACK: :method GET, :scheme https (static table), :path and
            // :authority as literals with indexed names.
            let mut block = vec![0x82, 0x87, 0x04, path.len() as u8];
            block.extend_from_slice(path);
            block.extend([0x01, 9]);
            block.extend_from_slice(b"localhost");
            // END_STREAM | END_HEADERS
            out.extend(h2_frame(0x1, 0x5, 1 + 2 * i, &block));
        }
        tls.write_all(&out).await.unwrap();
        tls.flush().await.unwrap();
        clients.push(tls);
    }

    // Every stream sheath took up reached the backend; then sheath's
    // memory grows until the buffers are full. Measured when it has not
    // grown for a second.
    const BOUND_MIB: u64 = 96;
    common::eventually("streams reach the backend", || {
        backend.accepted() >= 2 * 100
    })
    .await;
    let deadline = Instant::now() + common::DEADLINE;
    let mut last = (rss_kib(proxy.pid), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rss = rss_kib(proxy.pid);
        let grown = (rss.saturating_sub(before)) / 1024;
        assert!(
            grown <= BOUND_MIB,
            "{grown} MiB held for two clients that never read (bound {BOUND_MIB} MiB)"
        );
        if rss > last.0 + 1024 {
            last = (rss, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(1) {
            eprintln!("held for two clients that never read: {grown} MiB");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "memory still growing: {grown} MiB"
        );
    }
    drop(clients);
}

/// An ACME listener answering HTTP-01 has a second socket, the plain-HTTP
/// challenge port, which the successor must inherit like the TLS one: the
/// old process keeps it bound until it exits, so a successor binding it
/// anew fails with EADDRINUSE and the upgrade never happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_upgrade_hands_over_the_http01_challenge_socket() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let upstream = backend::http().await;
    let port = common::pebble::free_port();
    let http01 = common::pebble::free_port();
    let mut cmd = sheath();
    cmd.args(["--log-format", "json", "--state-dir"])
        .arg(&state);
    cmd.args([
        "run",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--upstream",
        &upstream.to_string(),
        "--name",
        "app.example.test",
        // Nothing listens there: the listener waits for its first
        // certificate, which is no startup error, and the challenge port
        // is bound all the same.
        "--acme-directory",
        "https://127.0.0.1:1/directory",
        "--acme-challenge",
        "http-01",
        "--acme-http01-bind",
        &format!("127.0.0.1:{http01}"),
        "--drain-timeout",
        "10s",
    ]);
    let mut old = Process::spawn(cmd);
    old.listening_addr().await;

    let (successor, _guard) = upgrade(&mut old).await;

    // The successor answers on the challenge port (404: no challenge is
    // pending), so the CA can still validate an order it places.
    let mut conn = TcpStream::connect(("127.0.0.1", http01))
        .await
        .expect("the challenge port is still open");
    conn.write_all(b"GET /.well-known/acme-challenge/none HTTP/1.1\r\nHost: app.example.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    within(
        "the challenge port's answer",
        conn.read_to_string(&mut answer),
    )
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "answer: {answer}");
    assert!(alive(successor));
}

/// As a container's init, the process that handed over stays to forward
/// signals to the sheath now serving, and this holds while it still drains
/// its own connections too: `docker kill -s HUP` (reload) or `-s USR2`
/// (the next upgrade) sent then must reach the successor, not be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_1_forwards_reload_and_upgrade_while_it_drains() {
    if !common::require_root("a PID namespace for sheath as PID 1")
        || !common::require_tool("unshare")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let upstream = backend::tcp_echo().await;
    // A fixed port: the successor takes over the socket bound to it.
    let port = common::pebble::free_port();
    let mut cmd = as_pid_1(&state);
    cmd.args([
        "run",
        "--mode",
        "tcp",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])
    .args(["--upstream", &upstream.to_string()])
    .args(["--drain-timeout", "60s"]);
    let mut init = Process::spawn(cmd);
    let addr = init.listening_addr().await;
    let pid1 = only_child(init.pid);
    let _guard = KillOnDrop(Some(pid1));
    let pem = std::fs::read_to_string(ca_pem_path(&state)).unwrap();
    let config = client::client_config(pki::roots_from_pem(&pem), &[]);
    // Keeps PID 1 draining for as long as the test needs.
    let mut tls = within("TLS connect", client::connect(addr, config.clone()))
        .await
        .expect("TLS connect");
    echo_round_trip(&mut tls, b"ping").await;

    let kill = |sig: &str| {
        std::process::Command::new("kill")
            .args([format!("-{sig}"), pid1.to_string()])
            .status()
            .unwrap();
    };
    kill("USR2");
    let first = init
        .wait_log("upgrade: started successor on the inherited sockets")
        .await;
    let took_over = init
        .wait_log("upgrade: took over; the previous process drains")
        .await;
    init.wait_log("upgrade: successor is ready; draining").await;
    // Keeps the first successor draining once the second has taken over.
    let mut kept = within("TLS connect", client::connect(addr, config))
        .await
        .expect("TLS connect");
    echo_round_trip(&mut kept, b"ping").await;

    kill("HUP");
    init.wait_log("SIGHUP: reloading configuration").await;
    kill("USR2");
    init.wait_line("a second upgrade, started by the successor", false, |l| {
        is_log(l, "upgrade: started successor on the inherited sockets") && l != first
    })
    .await;
    init.wait_line("the second successor taking over", false, |l| {
        is_log(l, "upgrade: took over; the previous process drains") && l != took_over
    })
    .await;

    // PID 1 still drains its own connection meanwhile.
    echo_round_trip(&mut tls, b"still here").await;
    drop(tls);
    // The stop request reaches the process serving, a grandchild of PID 1
    // while the first successor drains, and not only PID 1's children.
    kill("TERM");
    init.wait_log("shutting down").await;
    echo_round_trip(&mut kept, b"still draining").await;
    drop(kept);
    assert_eq!(init.exit_code(Duration::from_secs(20)).await, 0);
}

/// A log filter that does not parse is refused like any other malformed
/// value (exit 2, naming the flag), whether given as --log-level or as
/// SHEATH_LOG_LEVEL: silently logging at `info` instead would drop the
/// debug lines the operator asked for, or flood them with lines they
/// filtered out, with nothing saying why.
#[tokio::test]
async fn a_malformed_log_level_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let single = ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:8080"];
    for bad in ["sheath=loud", "sheath=[", "info,=debug="] {
        let mut by_flag = sheath();
        by_flag
            .args(["--log-level", bad, "--state-dir"])
            .arg(&state)
            .arg("check")
            .args(single);
        let mut by_env = sheath();
        by_env
            .env("SHEATH_LOG_LEVEL", bad)
            .arg("--state-dir")
            .arg(&state)
            .arg("check")
            .args(single);
        for (how, cmd) in [("--log-level", by_flag), ("SHEATH_LOG_LEVEL", by_env)] {
            let out = output("sheath check", cmd).await;
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{how}={bad:?}: {stderr}");
            assert!(
                stderr.contains("--log-level"),
                "{how}={bad:?}: the error names the flag: {stderr}"
            );
        }
    }
    // A good filter still passes.
    let mut cmd = sheath();
    cmd.args(["--log-level", "warn,sheath::cert=debug", "--state-dir"])
        .arg(&state)
        .arg("check")
        .args(single);
    let out = output("sheath check", cmd).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// `RUST_LOG` wins over `--log-level`, and a `RUST_LOG` that does not parse
/// is refused the same way (exit 2, saying it was RUST_LOG), not dropped for
/// `--log-level` in silence.
#[tokio::test]
async fn a_malformed_rust_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let single = ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:8080"];
    for bad in ["sheath=loud", "sheath=[", "info,=debug="] {
        let mut cmd = sheath();
        cmd.env("RUST_LOG", bad)
            .arg("--state-dir")
            .arg(&state)
            .arg("check")
            .args(single);
        let out = output("sheath check", cmd).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "RUST_LOG={bad:?}: {stderr}");
        assert!(
            stderr.contains(&format!("RUST_LOG `{bad}`")),
            "RUST_LOG={bad:?}: the error names RUST_LOG: {stderr}"
        );
    }
    // A good one, or an empty one, still passes.
    for good in ["warn,sheath::cert=debug", ""] {
        let mut cmd = sheath();
        cmd.env("RUST_LOG", good)
            .arg("--state-dir")
            .arg(&state)
            .arg("check")
            .args(single);
        let out = output("sheath check", cmd).await;
        assert!(
            out.status.success(),
            "RUST_LOG={good:?}: {}",
            text(&out.stderr)
        );
    }
}

/// Flags that the rest of the command line makes meaningless are refused
/// rather than dropped: `--cert-lifetime` sets the local CA's leaves, and
/// `--client-crl` revokes client certificates, which `--client-auth none`
/// never asks for. Running anyway would serve other certificates, or let
/// in clients, other than the operator believes.
#[tokio::test]
async fn flags_that_would_be_ignored_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let single = ["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:8080"];
    let cases: [(&str, &[&str]); 6] = [
        (
            "--cert-lifetime",
            &["--cert", "c.pem", "--key", "k.pem", "--cert-lifetime", "1h"],
        ),
        (
            "--cert-lifetime",
            &[
                "--name",
                "app.example.test",
                "--acme-directory",
                "https://ca.example.test/directory",
                "--cert-lifetime",
                "1h",
            ],
        ),
        ("--client-crl", &["--client-crl", "crl.pem"]),
        (
            "--acme-contact",
            &["--acme-contact", "mailto:ops@example.test"],
        ),
        (
            "--acme-challenge",
            &[
                "--cert",
                "c.pem",
                "--key",
                "k.pem",
                "--acme-challenge",
                "http-01",
            ],
        ),
        ("--acme-ca-root", &["--acme-ca-root", "root.pem"]),
    ];
    for (flag, args) in cases {
        let mut cmd = sheath();
        cmd.arg("--state-dir")
            .arg(&state)
            .arg("check")
            .args(single)
            .args(args);
        let out = output("sheath check", cmd).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: names {flag}: {stderr}");
    }
    // Values the flags' syntax takes that sheath cannot use: they
    // panicked at startup or on the first connection.
    for (flag, value) in [
        ("--max-connections", "9223372036854775807"),
        ("--idle-timeout", "500000000000y"),
        ("--max-lifetime", "500000000000y"),
        ("--cert-lifetime", "20000y"),
        ("--drain-timeout", "500000000000y"),
    ] {
        let mut cmd = sheath();
        cmd.arg("--state-dir")
            .arg(&state)
            .arg("check")
            .args(single)
            .args([flag, value]);
        let out = output("sheath check", cmd).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        assert!(stderr.contains("at most"), "{flag} {value}: {stderr}");
    }
    // Where they apply, they are accepted.
    let mut cmd = sheath();
    cmd.arg("--state-dir")
        .arg(&state)
        .arg("check")
        .args(single)
        .args(["--cert-lifetime", "1h"]);
    let out = output("sheath check", cmd).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A certificate file given by flag that cannot be read is reported with
/// the flag that named it.
#[tokio::test]
async fn an_unreadable_file_given_by_flag_names_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("absent.key");
    let mut cmd = sheath();
    cmd.arg("--state-dir")
        .arg(dir.path().join("state"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
        ])
        .arg("--cert")
        .arg(dir.path().join("absent.pem"))
        .arg("--key")
        .arg(&key);
    let out = output("sheath run", cmd).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("sheath: error: flag --cert: listener `default`"),
        "{stderr}"
    );
}

/// Sockets passed in (systemd socket activation, or a predecessor's on
/// upgrade) that no listener takes are closed, with a warning naming them:
/// held open, their port completes every client's TCP handshake and then
/// never answers, where a closed one refuses at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inherited_sockets_no_listener_takes_are_closed() {
    use command_fds::{CommandFdExt, FdMapping};

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let upstream = backend::http().await;
    // As systemd would pass them: bound and listening, from fd 3 on.
    let used = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stray = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let used_addr = used.local_addr().unwrap();
    let stray_addr = stray.local_addr().unwrap();
    let mut cmd = sheath();
    cmd.env("LISTEN_FDS", "2")
        .args(["--log-format", "json", "--state-dir"])
        .arg(&state)
        .args(["run", "--listen", &used_addr.to_string()])
        .args(["--upstream", &upstream.to_string()]);
    cmd.as_std_mut()
        .fd_mappings(vec![
            FdMapping {
                parent_fd: used.into(),
                child_fd: 3,
            },
            FdMapping {
                parent_fd: stray.into(),
                child_fd: 4,
            },
        ])
        .unwrap();
    // The command owns the descriptors and is dropped once spawned:
    // sheath then holds the only copies.
    let mut proc = Process::spawn(cmd);
    proc.wait_log("using inherited listening socket").await;
    assert_eq!(proc.listening_addr().await, used_addr);
    let warning = proc
        .wait_log("inherited socket matches no listener; closed")
        .await;
    assert_eq!(json_field(&warning, "addr"), Some(&*stray_addr.to_string()));
    // Asked of the kernel for sheath's own sockets: a connection attempt
    // could reach a listener another test opened on the freed port.
    if !common::require_tool("ss") {
        return;
    }
    assert!(holds_listener(proc.pid, used_addr.port()));
    assert!(
        !holds_listener(proc.pid, stray_addr.port()),
        "sheath still listens on {stray_addr}, which nobody serves"
    );
}

/// Does process `pid` hold a listening TCP socket on `port`? Asked of `ss`,
/// which names each socket's holders.
fn holds_listener(pid: u32, port: u16) -> bool {
    let out = std::process::Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .output()
        .expect("run ss (iproute2)");
    assert!(out.status.success(), "ss failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).contains(&format!("pid={pid},"))
}

/// After a handover the old process drains by itself; a SIGTERM it gets
/// then is the first stop request it sees, not a second one, and must not
/// cut the connections it is finishing. `systemctl stop` right after an
/// upgrade sends SIGTERM to every process of the unit (KillMode's default),
/// and Ctrl-C reaches the whole process group. A second signal still
/// forces the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_request_after_the_handover_lets_the_old_process_finish_its_drain() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let upstream = backend::tcp_echo().await;
    let port = common::pebble::free_port();
    let mut cmd = sheath();
    cmd.args(["--log-format", "json", "--state-dir"])
        .arg(&state)
        .args([
            "run",
            "--mode",
            "tcp",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--upstream", &upstream.to_string()])
        .args(["--drain-timeout", "30s"]);
    let mut old = Process::spawn(cmd);
    let addr = old.listening_addr().await;
    let pem = std::fs::read_to_string(ca_pem_path(&state)).unwrap();
    let config = client::client_config(pki::roots_from_pem(&pem), &[]);
    let mut tls = within("TLS connect", client::connect(addr, config))
        .await
        .expect("TLS connect");
    echo_round_trip(&mut tls, b"before").await;

    old.signal("USR2");
    let line = old
        .wait_log("upgrade: started successor on the inherited sockets")
        .await;
    let successor: u32 = json_number(&line, "pid").expect("successor pid");
    let _guard = KillOnDrop(Some(successor));
    old.wait_log("upgrade: successor is ready; draining").await;

    old.signal("TERM");
    old.wait_log("already draining after the handover; a second signal exits at once")
        .await;
    // The relay through the old process still works, and the old process
    // is still there to carry it.
    echo_round_trip(&mut tls, b"after the stop request").await;
    assert!(alive(old.pid), "the old process went at the first SIGTERM");

    old.signal("TERM");
    assert_eq!(old.exit_code(Duration::from_secs(10)).await, 130);
}

/// The value of a number field in one line of sheath's JSON log.
fn json_number(line: &str, key: &str) -> Option<u32> {
    let tag = format!("\"{key}\":");
    let rest = &line[line.find(&tag)? + tag.len()..];
    rest.split([',', '}']).next()?.trim().parse().ok()
}

/// The admin endpoint is bound once, at start. A reload whose file moves
/// or disables it was applied without a word, so the operator believed it
/// moved; it is named in a warning. Under `--admin` the flag decides, at
/// a reload as at the start, and the file's `[admin]` is no change.
#[tokio::test]
async fn a_reload_that_changes_the_admin_endpoint_warns_that_it_waits_for_a_restart() {
    const WARNING: &str =
        "the admin endpoint changes only at restart; the reloaded [admin] setting is not applied";
    let dir = tempfile::tempdir().unwrap();
    let upstream = backend::http().await;
    let listener = format!(
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n"
    );
    let reloaded = |p: &Process| p.logged("configuration reloaded");

    // From the file: turning it off is a change the running process
    // does not make.
    let path = dir.path().join("a.toml");
    std::fs::write(
        &path,
        format!("[admin]\nbind = \"127.0.0.1:0\"\n\n{listener}"),
    )
    .unwrap();
    let mut cmd = sheath();
    cmd.env_remove("SHEATH_ADMIN");
    cmd.args(["--log-format", "json", "--state-dir"])
        .arg(dir.path().join("a"));
    cmd.arg("run").arg("--config").arg(&path);
    let mut proc = Process::spawn(cmd);
    let admin = admin_addr(&mut proc).await;
    proc.listening_addr().await;
    std::fs::write(&path, format!("[admin]\nenabled = false\n\n{listener}")).unwrap();
    proc.signal("HUP");
    let line = proc.wait_log(WARNING).await;
    assert_eq!(json_field(&line, "running"), Some("127.0.0.1:0"), "{line}");
    assert_eq!(json_field(&line, "configured"), Some("disabled"), "{line}");
    // Still there, as the warning says.
    TcpStream::connect(admin).await.unwrap();
    proc.signal("TERM");
    assert_eq!(proc.exit_code(Duration::from_secs(10)).await, 0);

    // Under `--admin` (SHEATH_ADMIN here) the file's setting is
    // overridden at every reload as at the start: no change, no warning.
    let path = dir.path().join("b.toml");
    std::fs::write(
        &path,
        format!("[admin]\nbind = \"127.0.0.1:0\"\n\n{listener}"),
    )
    .unwrap();
    let mut cmd = sheath();
    cmd.args(["--log-format", "json", "--state-dir"])
        .arg(dir.path().join("b"));
    cmd.arg("run").arg("--config").arg(&path);
    let mut proc = Process::spawn(cmd);
    admin_addr(&mut proc).await;
    proc.listening_addr().await;
    std::fs::write(&path, format!("[admin]\nenabled = false\n\n{listener}")).unwrap();
    let before = reloaded(&proc);
    proc.signal("HUP");
    within("SIGHUP reload", async {
        while reloaded(&proc) == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        proc.stderr.find(&|l| is_log(l, WARNING)).is_none(),
        "{}",
        proc.stderr.text()
    );
    proc.signal("TERM");
    assert_eq!(proc.exit_code(Duration::from_secs(10)).await, 0);
}

/// The sum of every sample of `metric` (all its label sets) in a scrape.
fn metric_sum(scrape: &str, metric: &str) -> f64 {
    scrape
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?.strip_prefix('{')?;
            rest.rsplit_once(' ')?.1.parse::<f64>().ok()
        })
        .sum()
}

/// A WebSocket tunnel is still a connection on its worker: the worker
/// counts it for the tunnel's whole life, as the listener does, so new
/// connections are balanced against the tunnels open. Its HTTP connection
/// ends when it hands the socket over, and the worker's count must not
/// end with it.
#[tokio::test]
async fn workers_count_websocket_tunnels_as_open_connections() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let TwoWorkers {
        _state,
        mut proc,
        admin,
        addr,
        roots,
    } = TwoWorkers::start(backend::websocket_echo().await).await;

    let mut tunnels = Vec::new();
    for _ in 0..2 {
        let (mut ws, _) = client::websocket(addr, roots.clone()).await;
        ws.send(Message::text("hello")).await.unwrap();
        let echoed = within("echo", ws.next()).await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), "hello");
        tunnels.push(ws);
    }
    // Once the listener counts each tunnel once, the HTTP connections
    // that handed them over have ended; the workers must count as many.
    let counts = |scrape: &str| {
        (
            metric_sum(scrape, "sheath_connections_active"),
            metric_sum(scrape, "sheath_worker_connections_active"),
        )
    };
    let mut last = String::new();
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (_, scrape) = crate::admin::call(admin, "GET", "/metrics").await;
            if counts(&scrape) == (2.0, 2.0) {
                return;
            }
            last = scrape;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "(listener, workers) open connections: {:?}, want (2, 2), in\n{last}",
        counts(&last)
    );
    // Each on its own worker: the second was balanced against the first.
    let (_, scrape) = crate::admin::call(admin, "GET", "/metrics").await;
    for worker in 0..2 {
        let series = format!("sheath_worker_connections_active{{worker=\"{worker}\"}}");
        assert_eq!(crate::admin::value(&scrape, &series), 1.0, "{scrape}");
    }

    for mut ws in tunnels {
        ws.close(None).await.unwrap();
    }
    within("every count back to 0", async {
        loop {
            let (_, scrape) = crate::admin::call(admin, "GET", "/metrics").await;
            if counts(&scrape) == (0.0, 0.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    proc.signal("TERM");
    assert_eq!(proc.exit_code(Duration::from_secs(10)).await, 0);
}

/// A plaintext backend answering every request, HTTP/1.1 or h2c, with
/// `name`, so that a response tells which upstream it came from.
async fn named_backend(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(name.as_bytes())),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    addr
}

/// A reload that changes the upstream moves every worker's new
/// connections to it, over HTTP/1.1 pools and h2c connections alike:
/// each worker has its own, warm towards the old upstream, and none of
/// them may answer a connection made after the reload. Connections made
/// before are closed once idle, so their clients reconnect to the new one.
#[tokio::test]
async fn a_reload_moves_every_workers_new_connections_to_the_new_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (old, new) = (named_backend("old").await, named_backend("new").await);
    let port = common::pebble::free_port();
    let path = dir.path().join("sheath.toml");
    let write = |upstream: SocketAddr| {
        let tmp = dir.path().join("sheath.toml.new");
        std::fs::write(
            &tmp,
            format!(
                "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:{port}\"\n\
                 upstream = \"{upstream}\"\nupstream_protocol = \"auto\"\n"
            ),
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    write(old);
    let mut cmd = sheath();
    cmd.args(["--workers", "3", "--log-format", "json", "--state-dir"])
        .arg(&state);
    cmd.arg("run").arg("--config").arg(&path);
    let mut proc = Process::spawn(cmd);
    let admin = admin_addr(&mut proc).await;
    let addr = proc.listening_addr().await;
    let roots = pki::roots_from_pem(&std::fs::read_to_string(ca_pem_path(&state)).unwrap());

    // Twelve HTTP/1.1 and six HTTP/2 connections, spread over the three
    // workers, each asked twice: a warm pool and h2c connection per worker.
    type Body = http_body_util::combinators::BoxBody<bytes::Bytes, hyper::Error>;
    async fn open(
        addr: SocketAddr,
        roots: &Arc<rustls::RootCertStore>,
    ) -> (
        Vec<hyper::client::conn::http1::SendRequest<Body>>,
        Vec<hyper::client::conn::http2::SendRequest<Body>>,
    ) {
        let h1 = (0..12).map(|_| client::h1(addr, Arc::clone(roots)));
        let h2 = (0..6).map(|_| client::h2(addr, Arc::clone(roots)));
        (
            futures_util::future::join_all(h1).await,
            futures_util::future::join_all(h2).await,
        )
    }
    async fn answers(
        h1: &mut [hyper::client::conn::http1::SendRequest<Body>],
        h2: &mut [hyper::client::conn::http2::SendRequest<Body>],
    ) -> Vec<String> {
        let mut seen = Vec::new();
        for _ in 0..2 {
            for c in h1.iter_mut() {
                let resp = c.send_request(client::get("/")).await.unwrap();
                seen.push(client::body_text(resp).await);
            }
            for c in h2.iter_mut() {
                let resp = c.send_request(client::get_h2("/")).await.unwrap();
                seen.push(client::body_text(resp).await);
            }
        }
        seen
    }
    let (mut before_h1, mut before_h2) = open(addr, &roots).await;
    let seen = answers(&mut before_h1, &mut before_h2).await;
    assert!(seen.iter().all(|s| s == "old"), "{seen:?}");
    let (_, scrape) = crate::admin::call(admin, "GET", "/metrics").await;
    for worker in 0..3 {
        let series = format!("sheath_worker_connections_active{{worker=\"{worker}\"}}");
        assert!(crate::admin::value(&scrape, &series) > 0.0, "{scrape}");
    }

    write(new);
    let (status, body) = crate::admin::call(admin, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");

    let (mut after_h1, mut after_h2) = open(addr, &roots).await;
    let seen = answers(&mut after_h1, &mut after_h2).await;
    assert!(
        seen.iter().all(|s| s == "new"),
        "a connection made after the reload reached the old upstream: {seen:?}"
    );
    common::eventually("the connections made before the reload close", || {
        before_h1.iter().all(|c| c.is_closed()) && before_h2.iter().all(|c| c.is_closed())
    })
    .await;

    drop((before_h1, before_h2, after_h1, after_h2));
    proc.signal("TERM");
    assert_eq!(proc.exit_code(Duration::from_secs(10)).await, 0);
}

/// SIGTERM with several workers: the requests in flight on every worker,
/// HTTP/1.1 and HTTP/2 alike, are answered in full, and sheath exits as
/// soon as they are, well within the drain bound.
#[tokio::test]
async fn sigterm_drains_the_requests_in_flight_on_every_worker() {
    let state = tempfile::tempdir().unwrap();
    let upstream = backend::CountingBackend::start().await;
    let mut cmd = sheath();
    cmd.args(["--workers", "3", "--log-format", "json", "--state-dir"])
        .arg(state.path());
    cmd.args(["run", "--listen", "127.0.0.1:0", "--drain-timeout", "20s"])
        .args(["--upstream", &upstream.addr.to_string()]);
    let mut proc = Process::spawn(cmd);
    let admin = admin_addr(&mut proc).await;
    let addr = proc.listening_addr().await;
    let roots = pki::roots_from_pem(&std::fs::read_to_string(ca_pem_path(state.path())).unwrap());

    let h1 = (0..6).map(|_| client::h1(addr, roots.clone()));
    let h2 = (0..3).map(|_| client::h2(addr, roots.clone()));
    let (h1, h2) = (
        futures_util::future::join_all(h1).await,
        futures_util::future::join_all(h2).await,
    );
    let (_, scrape) = crate::admin::call(admin, "GET", "/metrics").await;
    for worker in 0..3 {
        let series = format!("sheath_worker_connections_active{{worker=\"{worker}\"}}");
        assert!(crate::admin::value(&scrape, &series) > 0.0, "{scrape}");
    }
    let mut requests = tokio::task::JoinSet::new();
    for mut c in h1 {
        requests.spawn(async move {
            let resp = c.send_request(client::get("/slow?ms=1500")).await?;
            Ok::<_, hyper::Error>(client::body_text(resp).await)
        });
    }
    for mut c in h2 {
        requests.spawn(async move {
            let resp = c.send_request(client::get_h2("/slow?ms=1500")).await?;
            Ok::<_, hyper::Error>(client::body_text(resp).await)
        });
    }
    // Every request has reached the upstream (one connection each).
    common::eventually("nine requests at the upstream", || upstream.open() == 9).await;

    let signalled = Instant::now();
    proc.signal("TERM");
    let mut answered = Vec::new();
    while let Some(r) = requests.join_next().await {
        answered.push(r.unwrap().expect("a request in flight at SIGTERM failed"));
    }
    assert!(answered.iter().all(|b| b == "slow ok"), "{answered:?}");
    assert_eq!(answered.len(), 9);
    assert_eq!(proc.exit_code(Duration::from_secs(10)).await, 0);
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "sheath waited for the drain timeout: {:?}",
        signalled.elapsed()
    );
}
