//! Optional export of the served certificate for services that also need
//! the files, and the `on_renew` hook.
//!
//! Files are written atomically (temp file, fsync, rename), the key with
//! mode 0600 and before the chain, so a reader that sees the new chain
//! finds the new key too. The hook runs after both are in place, with a
//! bounded run time.
//!
//! Exports into one directory happen one at a time, in the order their
//! certificates were installed: two at once (a renewal right after a
//! reload, reloads in quick succession) would share the temporary file
//! names, so that one of them failed, and the older one could finish last
//! and leave a certificate no longer served.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::manager::Material;
use super::store::{self, PRIVATE, PUBLIC};
use crate::config::{CertRef, ExportConfig};

const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// An export's place in line: later installs have later turns.
#[derive(Debug, Clone, Copy)]
pub struct Turn(u64);

impl Turn {
    pub fn take() -> Turn {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Turn(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Per export directory, the turn of the last export written there.
static WRITTEN: store::PathLocks<u64> = store::PathLocks::new();

/// Export `listener`'s certificate `cert`, unless a certificate installed
/// after it (a later `turn`) was exported already.
pub async fn export(
    listener: &str,
    cert: CertRef,
    config: &ExportConfig,
    material: &Material,
    turn: Turn,
) {
    let cert = cert.to_string();
    let cert = cert.as_str();
    let slot = WRITTEN.of(&config.dir);
    let mut last = slot.lock().await;
    if *last > turn.0 {
        tracing::info!(listener, cert, serial = %material.info.serial, "certificate export skipped: a newer certificate was exported already");
        return;
    }
    let dir = config.dir.clone();
    let chain = material.chain_pem.clone();
    let key = material.key_pem.clone();
    let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        store::write_atomic(&dir.join("key.pem"), key.as_bytes(), PRIVATE)?;
        store::write_atomic(&dir.join("fullchain.pem"), chain.as_bytes(), PUBLIC)?;
        Ok(())
    })
    .await
    .expect("export task panicked");
    *last = turn.0;
    drop(last);
    if let Err(e) = written {
        tracing::error!(listener, cert, dir = %config.dir.display(), error = %e, "certificate export failed");
        return;
    }
    tracing::info!(listener, cert, dir = %config.dir.display(), serial = %material.info.serial, "certificate exported");
    let Some(command) = &config.on_renew else {
        return;
    };
    let (cert_file, key_file) = (config.dir.join("fullchain.pem"), config.dir.join("key.pem"));
    let env = [
        ("SHEATH_LISTENER", listener.as_ref()),
        ("SHEATH_CERT", cert.as_ref()),
        ("SHEATH_CERT_FILE", cert_file.as_os_str()),
        ("SHEATH_KEY_FILE", key_file.as_os_str()),
        ("SHEATH_CERT_SERIAL", material.info.serial.as_ref()),
    ];
    let HookRun {
        outcome,
        stdout,
        stderr,
    } = run_hook(command, &env, HOOK_TIMEOUT).await;
    match outcome {
        HookOutcome::Succeeded => {
            tracing::info!(
                listener,
                cert,
                command,
                stdout,
                stderr,
                "on_renew hook succeeded"
            )
        }
        HookOutcome::Failed(status) => {
            tracing::error!(listener, cert, command, %status, stdout, stderr, "on_renew hook failed")
        }
        HookOutcome::CouldNotRun(e) => {
            tracing::error!(listener, cert, command, error = %e, "on_renew hook could not run")
        }
        HookOutcome::TimedOut => {
            tracing::error!(listener, cert, command, timeout = ?HOOK_TIMEOUT, stdout, stderr, "on_renew hook timed out and was killed")
        }
    }
}

/// How an `on_renew` hook ended.
#[derive(Debug)]
pub enum HookOutcome {
    Succeeded,
    Failed(std::process::ExitStatus),
    CouldNotRun(std::io::Error),
    TimedOut,
}

/// What a hook run gave: how it ended and the start of what it wrote.
#[derive(Debug)]
pub struct HookRun {
    pub outcome: HookOutcome,
    pub stdout: String,
    pub stderr: String,
}

/// At most this much of each of a hook's output streams is kept for the
/// log; the rest is read and dropped, so a talkative hook never blocks on
/// a full pipe.
pub const HOOK_OUTPUT_LIMIT: usize = 4096;

/// How long the output is still read after the hook has ended: a process
/// it left running in the background may hold the pipes open for good.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Run `command` with `sh -c` and `env`, for `timeout` at most.
///
/// The hook runs in a process group of its own, and an overrun kills the
/// group: killing `sh` alone left the commands it had started (a stuck
/// `curl`, a `systemctl reload` waiting on a lock) running on, reparented,
/// although the hook was reported killed.
///
/// Its output is captured for the log line that reports it, not passed
/// through: in sheath's own output it would be lines of another format
/// (JSON logs) and apart from the failure they explain.
pub async fn run_hook(command: &str, env: &[(&str, &OsStr)], timeout: Duration) -> HookRun {
    let mut child = tokio::process::Command::new("sh");
    match crate::resources::started_with_open_files() {
        // The hook gets the open-file limit sheath was started with, not
        // the one it raised for its connections. A shell sets it, so no
        // code runs between fork and exec; `exec` leaves `sh -c command`
        // to run as it would have.
        Some(limit) => child.args([
            "-c",
            r#"ulimit -S -n "$0" 2>/dev/null; exec sh -c "$1""#,
            &limit.to_string(),
            command,
        ]),
        None => child.arg("-c").arg(command),
    };
    child
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match child.spawn() {
        Ok(child) => child,
        Err(e) => {
            return HookRun {
                outcome: HookOutcome::CouldNotRun(e),
                stdout: String::new(),
                stderr: String::new(),
            }
        }
    };
    let stdout = Captured::start(child.stdout.take());
    let stderr = Captured::start(child.stderr.take());
    let outcome = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => HookOutcome::Succeeded,
        Ok(Ok(status)) => HookOutcome::Failed(status),
        Ok(Err(e)) => HookOutcome::CouldNotRun(e),
        Err(_) => {
            // The group's id is the hook's pid, as long as it is not reaped.
            if let Some(group) = child
                .id()
                .and_then(|pid| i32::try_from(pid).ok())
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = child.wait().await;
            HookOutcome::TimedOut
        }
    };
    HookRun {
        outcome,
        stdout: stdout.finish().await,
        stderr: stderr.finish().await,
    }
}

/// One output stream of a hook, read in a task of its own until it ends.
struct Captured {
    kept: Arc<Mutex<(Vec<u8>, usize)>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Captured {
    fn start(stream: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>) -> Captured {
        let kept = Arc::new(Mutex::new((Vec::new(), 0usize)));
        let sink = Arc::clone(&kept);
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let Some(mut stream) = stream else { return };
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                let (kept, dropped) = &mut *sink.lock().expect("poisoned");
                let room = HOOK_OUTPUT_LIMIT - kept.len();
                kept.extend_from_slice(&buf[..n.min(room)]);
                *dropped += n.saturating_sub(room);
            }
        });
        Captured { kept, reader }
    }

    /// What was read, once the stream ended or the grace ran out.
    async fn finish(mut self) -> String {
        if tokio::time::timeout(OUTPUT_GRACE, &mut self.reader)
            .await
            .is_err()
        {
            self.reader.abort();
        }
        let (kept, dropped) = &*self.kept.lock().expect("poisoned");
        let mut text = String::from_utf8_lossy(kept).trim_end().to_string();
        if *dropped > 0 {
            text.push_str(&format!(" [{dropped} more bytes]"));
        }
        text
    }
}
