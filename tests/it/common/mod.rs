//! Shared test fixtures: a per-test PKI, real backends, TLS clients, and a
//! helper that starts sheath in-process from TOML.
#![allow(dead_code)]

pub mod acme_front;
pub mod backend;
pub mod client;
pub mod h2raw;
pub mod pebble;
pub mod pki;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sheath::config::Config;
use sheath::Running;
use tempfile::TempDir;

pub use pki::TestPki;

/// Generous bound for anything a test waits on; failures show up as a
/// panic naming what was awaited, never as a hung test.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A sheath started in-process, with its scratch directory.
#[derive(Debug)]
pub struct Proxy {
    pub running: Option<Running>,
    pub dir: TempDir,
}

impl Proxy {
    /// Start sheath from TOML text. `{dir}` in the text is replaced by the
    /// scratch directory (which is also the state directory by default).
    pub async fn start(toml: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(toml, dir).await.expect("sheath starts")
    }

    pub async fn start_in(toml: &str, dir: TempDir) -> Result<Proxy, sheath::app::StartError> {
        sheath::install_crypto_provider();
        let path = write_config(dir.path(), toml);
        let config = Config::load(&path).expect("test config is valid");
        let running = sheath::app::start(config).await?;
        Ok(Proxy {
            running: Some(running),
            dir,
        })
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("proxy still running")
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.running().addr(listener).expect("listener exists")
    }

    /// `sheath_upstream_connect_failures_total` of a listener.
    pub fn upstream_connect_failures(&self, listener: &str) -> u64 {
        self.running()
            .listener(listener)
            .expect("listener exists")
            .stats
            .upstream_connect_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn shutdown(&mut self) -> sheath::ShutdownOutcome {
        self.running.take().expect("running").shutdown().await
    }
}

/// Replace `path`'s contents at once (write beside it, rename over it), as
/// rotation tools and Kubernetes do.
pub fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Write `toml` (with `{dir}` substituted) to `<dir>/sheath.toml`.
pub fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("sheath.toml");
    let text = toml.replace("{dir}", &dir.display().to_string());
    let text = if text.contains("[global]") {
        text
    } else {
        format!(
            "[global]\nstate_dir = \"{}\"\ndrain_timeout = \"5s\"\n\n{text}",
            dir.join("state").display()
        )
    };
    std::fs::write(&path, text).unwrap();
    path
}

/// Await `fut`, failing the test if it takes longer than [`DEADLINE`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Poll `cond` until it is true, failing after [`DEADLINE`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Is an external peer program available? Under `CI=true` a missing peer
/// fails the test; elsewhere the test says clearly that it is skipped.
pub fn require_tool(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    require(
        found,
        &format!("{tool} not found on PATH; install it to run this test"),
    )
}

/// `found`, after failing the test under `CI=true` when it is false, or
/// saying clearly that the test is skipped and `why` elsewhere.
pub fn require(found: bool, why: &str) -> bool {
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("required under CI=true: {why}");
        }
        eprintln!("SKIPPED: {why}");
    }
    found
}

/// Does this test run as root? Same convention as [`require_tool`]: under
/// `CI=true` (where tests run as root) not being root fails the test;
/// elsewhere the test says clearly that it is skipped and why.
pub fn require_root(why: &str) -> bool {
    require(
        rustix::process::geteuid().is_root(),
        &format!("not running as root; {why}"),
    )
}

/// SHA-256 of a byte string, hex.
pub fn sha256(data: &[u8]) -> String {
    sheath::cert::inspect::sha256_hex(data)
}

/// Random bytes for payloads.
pub fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}
