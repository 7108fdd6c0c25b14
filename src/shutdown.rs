//! Shutdown: signals, and a drain that is always bounded.
//!
//! One [`Drain`] is shared by every connection task. `graceful` asks
//! connections to finish what they are doing (HTTP/1 closes after the
//! current response, HTTP/2 sends GOAWAY, TCP streams run to their end);
//! `abort` cuts whatever is still open when the drain timeout expires.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The cancellation tree and task tracker for connections.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    pub graceful: CancellationToken,
    pub abort: CancellationToken,
    pub tracker: TaskTracker,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished on its own.
    Drained,
    /// The timeout expired with this many connection tasks still running;
    /// they were aborted.
    TimedOut { remaining: usize },
}

impl Drain {
    pub fn new() -> Self {
        Drain::default()
    }

    /// Ask every connection to finish, and wait at most `timeout`.
    pub async fn run(&self, timeout: Duration) -> DrainOutcome {
        self.graceful.cancel();
        self.tracker.close();
        if tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok()
        {
            return DrainOutcome::Drained;
        }
        let remaining = self.tracker.len();
        self.abort.cancel();
        // Aborted tasks only need to drop their sockets; give them a moment
        // so the process exits with its connections closed, not reset.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.tracker.wait()).await;
        DrainOutcome::TimedOut { remaining }
    }
}

/// SIGTERM and SIGINT, registered once so that no signal is lost between
/// the first and the second.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// SIGTERM or SIGINT, by name.
    Stop(&'static str),
    /// SIGHUP.
    Reload,
    /// SIGUSR2: hand the sockets to a new binary.
    Upgrade,
    /// SIGUSR1: the new binary is ready; stop accepting and drain.
    TakeOver,
}

impl SignalEvent {
    /// The signal a container's init that handed over passes on to the
    /// sheath processes serving now; none for SIGUSR1, which only a
    /// process's own successor sends it.
    pub fn passed_on(self) -> Option<rustix::process::Signal> {
        use rustix::process::Signal;
        match self {
            SignalEvent::Stop("SIGINT") => Some(Signal::INT),
            SignalEvent::Stop(_) => Some(Signal::TERM),
            SignalEvent::Reload => Some(Signal::HUP),
            SignalEvent::Upgrade => Some(Signal::USR2),
            SignalEvent::TakeOver => None,
        }
    }
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// The next signal of interest.
    pub async fn next(&mut self) -> SignalEvent {
        tokio::select! {
            _ = self.term.recv() => SignalEvent::Stop("SIGTERM"),
            _ = self.int.recv() => SignalEvent::Stop("SIGINT"),
            _ = self.hup.recv() => SignalEvent::Reload,
            _ = self.usr1.recv() => SignalEvent::TakeOver,
            _ = self.usr2.recv() => SignalEvent::Upgrade,
        }
    }

    /// The next SIGTERM or SIGINT, by name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
