//! The process's open-file limit and its use of descriptors, memory and
//! CPU, for the start-up checks and the `process_*` metrics.
//!
//! Every connection sheath serves takes two descriptors, the client's and
//! its upstream's. Many environments start a process with a soft limit of
//! 1,024 descriptors and a hard limit far above it: systemd's default for
//! services (1024:524288), and the containers of Docker 25 and later and of
//! containerd 2, which no longer raise it for their containers. Go's
//! runtime raises the soft limit to the hard one for every Go program
//! (Caddy, ghostunnel), HAProxy raises it to what its `maxconn` needs; a
//! sidecar that kept 1,024 would refuse clients past ~500 connections
//! while its `max_connections` promises 4,096.

use std::sync::OnceLock;
use std::time::Duration;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

use crate::config::Config;

/// Descriptors sheath needs besides its connections': listening sockets,
/// the event queue, file watchers, the admin endpoint, logs, certificate
/// and state files being read, ACME requests.
const RESERVED: u64 = 64;

/// The soft open-file limit before and after [`raise_open_files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised {
    pub from: u64,
    pub to: u64,
}

/// The soft open-file limit sheath was started with, once
/// [`raise_open_files`] has raised it.
static STARTED_WITH: OnceLock<u64> = OnceLock::new();

/// The soft open-file limit the first process was started with, for its
/// successor after a binary upgrade, which starts with the raised one.
pub const STARTED_WITH_ENV: &str = "SHEATH_UPGRADE_NOFILE";

/// Raise the soft open-file limit to the hard one. `Ok(None)` when there
/// was nothing to raise (already equal, or unlimited).
///
/// Never above the hard limit, which only root may raise: a limit the
/// operator set on purpose (`LimitNOFILE=`, `--ulimit`) stays the bound.
/// Commands sheath runs (the export hook) get the limit sheath was started
/// with back: see [`started_with_open_files`].
pub fn raise_open_files() -> std::io::Result<Option<Raised>> {
    if let Some(first) = std::env::var(STARTED_WITH_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        let _ = STARTED_WITH.set(first);
    }
    let limit = getrlimit(Resource::Nofile);
    match (limit.current, limit.maximum) {
        (Some(from), Some(to)) if from < to => {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(to),
                    maximum: Some(to),
                },
            )?;
            let _ = STARTED_WITH.set(from);
            Ok(Some(Raised { from, to }))
        }
        _ => Ok(None),
    }
}

/// The soft open-file limit to start other programs with, if sheath
/// raised its own: the one it was started with. Programs that close every
/// descriptor up to the limit when they start (daemons, package managers,
/// some `sudo` and Python versions) take seconds over a hard limit of a
/// million or more, and ones built on `select()` fail past 1,024; Go
/// restores the limit for the commands a program runs since 1.21 for
/// these reasons, and systemd asks services to do the same.
pub fn started_with_open_files() -> Option<u64> {
    STARTED_WITH.get().copied()
}

/// The soft open-file limit in force; `None` when unlimited.
fn open_file_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Descriptors `config` may need at once: two for each connection its
/// listeners allow (the client's and the upstream's), and [`RESERVED`].
/// A lower bound: an HTTP/2 client's streams each take an upstream
/// HTTP/1.1 connection, and idle upstream connections are kept.
fn open_files_needed(config: &Config) -> u64 {
    let connections: u64 = config
        .listeners
        .iter()
        .map(|l| l.max_connections as u64)
        .fold(0, u64::saturating_add);
    connections.saturating_mul(2).saturating_add(RESERVED)
}

/// Warn when `config`'s listeners allow more connections than the
/// open-file limit leaves descriptors for. Past the limit, accepting a
/// client or connecting to the upstream fails (EMFILE): clients wait in
/// the listen queue or get a 502, and the cause is far from the symptom.
pub fn check_open_files(config: &Config) {
    let Some(limit) = open_file_limit() else {
        return;
    };
    let needed = open_files_needed(config);
    if limit < needed {
        let connections = limit.saturating_sub(RESERVED) / 2;
        tracing::warn!(
            limit,
            needed,
            connections,
            "the open-file limit is below what max_connections allows (a descriptor for each client and one for its upstream): past about `connections` connections, clients wait or get errors; raise the limit (systemd `LimitNOFILE=`, `docker run --ulimit nofile=N:N`, the pod's container runtime) or lower max_connections"
        );
    }
}

/// What the process uses now, for the standard `process_*` metrics that
/// dashboards and alerts (descriptors used against the limit) expect.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu: Duration,
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

impl Usage {
    pub fn now() -> Usage {
        let cpu = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        Usage {
            cpu: Duration::new(
                u64::try_from(cpu.tv_sec).unwrap_or(0),
                u32::try_from(cpu.tv_nsec).unwrap_or(0),
            ),
            resident_bytes: resident_bytes(),
            // Read from /proc at each scrape, as Prometheus' own process
            // collectors do: a few microseconds per thousand descriptors.
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: open_file_limit(),
        }
    }
}

/// Resident set size: the second field of /proc/self/statm, in pages.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(rustix::param::page_size() as u64))
}
