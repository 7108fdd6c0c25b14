//! Zero-downtime binary upgrade, and socket activation.
//!
//! On SIGUSR2 the running sheath starts its successor (the binary at the
//! same path, same arguments) and hands it every listening socket as an
//! inherited file descriptor, using the systemd `LISTEN_FDS` convention.
//! Both processes then accept from the *same* sockets, so no connection is
//! refused or lost in a closing accept queue. When the successor has bound
//! everything and loaded its certificates it sends SIGTERM to its parent,
//! which stops accepting and drains within its bound. If the successor
//! fails to start, the parent simply keeps serving.
//!
//! The same inheritance path lets systemd socket activation hand sheath its
//! sockets.
//!
//! Under systemd (`Type=notify`, `NotifyAccess=all`) the successor reports
//! itself as the new main process before it tells the parent to leave, and
//! the parent, no longer the main process, leaves without reporting that
//! the service stops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use command_fds::{CommandFdExt, FdMapping};

/// Names the parent in the successor's environment.
const PARENT_ENV: &str = "SHEATH_UPGRADE_PARENT";
/// The first inherited descriptor, as in systemd's protocol.
const FIRST_FD: i32 = 3;

static INHERITED: Mutex<Option<HashMap<SocketAddr, std::net::TcpListener>>> = Mutex::new(None);

/// PID of a successor this process started that is still running; 0 when
/// there is none.
static SUCCESSOR: AtomicU32 = AtomicU32::new(0);

/// Collect sockets passed in by a predecessor or by systemd. Must run
/// before any other thread exists: it reads and clears the environment.
pub fn collect_inherited() {
    let mut fds = listenfd::ListenFd::from_env();
    let mut found = HashMap::new();
    for i in 0..fds.len() {
        match fds.take_tcp_listener(i) {
            Ok(Some(listener)) => match listener.local_addr() {
                Ok(addr) => {
                    found.insert(addr, listener);
                }
                Err(e) => eprintln!("sheath: inherited socket #{i} unusable: {e}"),
            },
            Ok(None) => {}
            Err(e) => eprintln!("sheath: inherited descriptor #{i} is not a TCP listener: {e}"),
        }
    }
    *INHERITED.lock().expect("poisoned") = Some(found);
}

/// An inherited listening socket bound to exactly `addr`, if there is one.
pub fn take_inherited(addr: SocketAddr) -> Option<std::net::TcpListener> {
    INHERITED
        .lock()
        .expect("poisoned")
        .as_mut()
        .and_then(|m| m.remove(&addr))
}

/// The binary to start the successor from: the file now at the path this
/// process was started from, which is where an upgrade puts the new
/// version. Once that file has been replaced (`install`, `mv`, a package
/// manager), Linux names the running, unlinked one `<path> (deleted)`.
fn successor_exe() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    if !exe.exists() {
        if let Some(path) = exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            return Ok(PathBuf::from(path));
        }
    }
    Ok(exe)
}

/// Record the successor this process has started.
pub fn successor_started(pid: u32) {
    SUCCESSOR.store(pid, Ordering::SeqCst);
}

/// Record that the successor with this PID has exited.
pub fn successor_exited(pid: u32) {
    let _ = SUCCESSOR.compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
}

/// Start the successor with `sockets` as its inherited listeners.
pub fn spawn_successor(sockets: Vec<OwnedFd>) -> std::io::Result<tokio::process::Child> {
    let exe = successor_exe()?;
    let count = sockets.len();
    let mappings: Vec<FdMapping> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, fd)| FdMapping {
            parent_fd: fd,
            child_fd: FIRST_FD + i as i32,
        })
        .collect();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env("LISTEN_FDS", count.to_string())
        .env_remove("LISTEN_PID")
        .env(PARENT_ENV, std::process::id().to_string())
        .stdin(std::process::Stdio::null());
    cmd.as_std_mut()
        .fd_mappings(mappings)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    cmd.spawn()
}

/// Called once the process serves: under systemd, report readiness and
/// this process as the main one; if it is a successor, then tell the
/// parent to drain and exit.
pub fn announce_ready() {
    // systemd first. The parent exits once drained, and by then systemd
    // must know this process as the main one, or it would take the
    // parent's exit for the end of the service and stop it.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::MainPid(std::process::id()),
        sd_notify::NotifyState::Ready,
    ]);
    if let Some(parent) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        // Only the process that started us is told to leave.
        if rustix::process::getppid() == Some(parent) {
            match rustix::process::kill_process(parent, rustix::process::Signal::TERM) {
                Ok(()) => tracing::info!(
                    parent = parent.as_raw_nonzero().get(),
                    "upgrade: took over; the previous process drains"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "upgrade: cannot signal the previous process")
                }
            }
        }
    }
}

/// Tell systemd the service is stopping, unless a successor is running:
/// then this process is leaving but the service is not, and with
/// `NotifyAccess=all` a STOPPING=1 from any of its processes would make
/// systemd stop the whole service, the successor included.
pub fn announce_stopping() {
    if SUCCESSOR.load(Ordering::SeqCst) != 0 {
        return;
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}
