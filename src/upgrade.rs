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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Mutex;

use command_fds::{CommandFdExt, FdMapping};

/// Names the parent in the successor's environment.
const PARENT_ENV: &str = "SHEATH_UPGRADE_PARENT";
/// The first inherited descriptor, as in systemd's protocol.
const FIRST_FD: i32 = 3;

static INHERITED: Mutex<Option<HashMap<SocketAddr, std::net::TcpListener>>> = Mutex::new(None);

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

/// Close the inherited sockets that no listener took, once every listener
/// is bound. Kept open, such a port (a listener removed from the config
/// before an upgrade, a `ListenStream=` matching no `bind`) would complete
/// every client's TCP handshake and never answer; closed, it refuses.
pub fn close_unclaimed() {
    let left = INHERITED
        .lock()
        .expect("poisoned")
        .as_mut()
        .map(std::mem::take)
        .unwrap_or_default();
    for addr in left.keys() {
        tracing::warn!(%addr, "inherited socket matches no listener; closed");
    }
}

/// The binary to start: the one at the path this process was started
/// from. After a package manager replaced it, the kernel reports the old
/// inode as "PATH (deleted)"; the new binary is at PATH.
fn successor_binary() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let text = exe.as_os_str().to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => exe,
    })
}

/// Start the successor with `sockets` as its inherited listeners.
pub fn spawn_successor(sockets: Vec<OwnedFd>) -> std::io::Result<tokio::process::Child> {
    let exe = successor_binary()?;
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
    // The successor inherits the raised open-file limit; the commands it
    // runs get the one the first process was started with.
    match crate::resources::started_with_open_files() {
        Some(limit) => cmd.env(crate::resources::STARTED_WITH_ENV, limit.to_string()),
        None => cmd.env_remove(crate::resources::STARTED_WITH_ENV),
    };
    cmd.as_std_mut()
        .fd_mappings(mappings)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    cmd.spawn()
}

/// Called once the process serves: if it is a successor, tell the parent
/// to drain and exit; under systemd, report readiness and the new main PID.
pub fn announce_ready() {
    // systemd first: with NotifyAccess=all, the parent's exit must find
    // systemd already following the new main PID, or it stops the unit.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::MainPid(std::process::id()),
        sd_notify::NotifyState::Ready,
    ]);
    if let Some(parent) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw)
    {
        // Only the process that started us is told to leave. SIGUSR1, not
        // SIGTERM: the parent must tell a takeover from a stop request.
        if rustix::process::getppid() == Some(parent) {
            match rustix::process::kill_process(parent, rustix::process::Signal::USR1) {
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

/// Tell systemd the service is stopping.
pub fn announce_stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Is this process its PID namespace's init (a container's PID 1)? When
/// PID 1 exits, the kernel kills everything else in the namespace, so after
/// an upgrade PID 1 must stay, as a minimal init, for the successor to live.
pub fn is_init() -> bool {
    rustix::process::getpid().is_init()
}

/// Send `signal` to `pid`, logging a failure.
pub fn forward(pid: u32, signal: rustix::process::Signal) {
    let Some(target) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    if let Err(e) = rustix::process::kill_process(target, signal) {
        tracing::warn!(pid, error = %e, "cannot signal process");
    }
}

/// Send `signal` to every sheath process descended from this one. As
/// PID 1 these are the processes upgrades started: orphans of earlier
/// upgrades, which the kernel re-parents to PID 1, and the successor of a
/// successor still draining, which is not PID 1's child until that one
/// exits. Sent to the children alone, a stop request reached only the
/// draining one, which goes on draining, and the process serving never
/// heard of it. Other processes (an `on_renew` hook and what it started)
/// are left alone: a forwarded SIGHUP would kill them.
pub fn forward_to_descendants(signal: rustix::process::Signal) {
    for pid in sheath_descendants() {
        forward(pid, signal);
    }
}

/// The descendants of this process that run what it runs (the same
/// command name: a successor runs the binary at this one's path), found
/// through those only.
fn sheath_descendants() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let Some((name, _)) = name_and_parent(me) else {
        return Vec::new();
    };
    let processes: Vec<(u32, u32)> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (their_name, parent) = name_and_parent(pid)?;
            (their_name == name).then_some((pid, parent))
        })
        .collect();
    let mut found = vec![me];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        found.extend(
            processes
                .iter()
                .filter(|&&(_, p)| p == parent)
                .map(|&(pid, _)| pid),
        );
        next += 1;
    }
    found.split_off(1)
}

/// A process's command name and parent, from `/proc/PID/stat`.
fn name_and_parent(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name may contain spaces and parentheses: it runs from the first
    // '(' to the last ')', and the fields after that are unambiguous.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let parent = stat[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
    Some((stat[open + 1..close].to_string(), parent))
}

/// After handing over as PID 1: forward stop, reload and upgrade signals
/// to the sheath processes now serving, reap them (and any orphan), and
/// return the exit status of the last one to exit.
pub async fn supervise(signals: &mut crate::shutdown::Signals) -> u8 {
    use rustix::process::WaitOptions;
    use tokio::signal::unix::{signal, SignalKind};

    tracing::info!("upgrade: staying as init for the successor");
    // A child that exits before this exists is found by the first wait.
    let Ok(mut chld) = signal(SignalKind::child()) else {
        tracing::error!("cannot listen for signals; exiting");
        return 1;
    };
    let mut last = 0u8;
    loop {
        // Reap everything that has exited; stop once nobody is left.
        loop {
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    last = match (status.exit_status(), status.terminating_signal()) {
                        (Some(code), _) => code as u8,
                        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
                        _ => last,
                    };
                    tracing::info!(
                        pid = pid.as_raw_nonzero().get(),
                        code = last,
                        "child exited"
                    );
                }
                Ok(None) => break,
                // ECHILD: no children left.
                Err(_) => return last,
            }
        }
        tokio::select! {
            _ = chld.recv() => {}
            event = signals.next() => {
                if let Some(signal) = event.passed_on() {
                    forward_to_descendants(signal);
                }
            }
        }
    }
}
