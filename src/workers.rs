//! One single-threaded runtime per worker, each accepting on every listener.
//!
//! A connection stays on one worker for its whole life: its task, the
//! tasks it spawns (HTTP/2 streams) and, through a pool of the worker's
//! own, the upstream connections its requests use. Nothing is handed
//! between threads on the request path, so no work-stealing queue, no
//! cross-thread wake-up and no contended lock is paid per request, which
//! is what tokio's multi-thread scheduler costs: 20-30% more CPU per
//! keep-alive request with one worker, 12-15% with two (the workloads W1
//! and W8, see the README's levers). This is the model of nginx, HAProxy
//! and Envoy; the price is that one busy connection cannot move to an
//! idle core.
//!
//! Every worker waits on the same listening socket (a duplicate of its
//! descriptor), which keeps one socket per listener for the handover to a
//! new binary and for systemd's socket activation. Whoever accepts a
//! connection hands it to the worker with the fewest connections open, as
//! HAProxy's threads do: the kernel wakes every worker for a connection and
//! the first to call `accept` gets it, so a burst (a client opening its
//! four HTTP/2 connections at once) would otherwise land on one worker and
//! leave the others idle for those connections' whole life. A hand-over
//! costs a task woken on the other thread, once per connection.
//!
//! The main thread's runtime is worker 0 and also runs the control plane
//! (certificates, reloads, the admin endpoint); the others are started by
//! [`start`]. Code running outside any worker, tests included, sees one.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::runtime::Handle;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Every worker's runtime, worker 0 (the main thread's) first, and the
/// number of connections each has open.
static WORKERS: OnceLock<Vec<Worker>> = OnceLock::new();

#[derive(Debug)]
struct Worker {
    handle: Handle,
    open: AtomicUsize,
}

fn all() -> &'static [Worker] {
    WORKERS.get().map_or(&[], Vec::as_slice)
}

/// This thread's worker number: 0 on the main thread and anywhere that is
/// not a worker.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// How many workers serve connections.
pub fn count() -> usize {
    all().len().max(1)
}

/// The runtimes of workers 1.., to start accept loops on.
pub fn others() -> impl Iterator<Item = &'static Handle> {
    all().iter().skip(1).map(|w| &w.handle)
}

/// One `T` per worker, for state each worker keeps to itself.
pub fn each<T>(mut make: impl FnMut() -> T) -> std::sync::Arc<[T]> {
    (0..count()).map(|_| make()).collect()
}

/// This worker's own entry of a slice made by [`each`].
pub fn mine<T>(per_worker: &[T]) -> &T {
    &per_worker[index() % per_worker.len()]
}

/// Start `extra` worker threads besides `main`, the main thread's runtime.
/// They run until the process exits; a connection still open on one at
/// exit is closed by the kernel like every other descriptor. Call once,
/// before any listener is bound.
pub fn start(main: &Handle, extra: usize) -> io::Result<()> {
    let mut workers = vec![Worker {
        handle: main.clone(),
        open: AtomicUsize::new(0),
    }];
    for i in 1..=extra {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("sheath-blocking")
            .build()?;
        workers.push(Worker {
            handle: runtime.handle().clone(),
            open: AtomicUsize::new(0),
        });
        std::thread::Builder::new()
            .name(format!("sheath-worker-{i}"))
            .spawn(move || {
                INDEX.with(|c| c.set(i));
                runtime.block_on(std::future::pending::<()>());
            })?;
    }
    WORKERS
        .set(workers)
        .map_err(|_| io::Error::other("worker runtimes started twice"))
}

/// Connections open on each worker; empty with one worker, where they
/// are not counted apart from the listeners' own gauges.
pub fn open_connections() -> Vec<usize> {
    let workers = all();
    if workers.len() < 2 {
        return Vec::new();
    }
    workers
        .iter()
        .map(|w| w.open.load(Ordering::Relaxed))
        .collect()
}

/// A connection counted against a worker until it is dropped.
#[derive(Debug)]
pub struct Assigned {
    worker: usize,
}

impl Assigned {
    /// The worker to run a new connection on: the one with the fewest
    /// connections, this one if it is among them. `None` without workers.
    pub fn pick() -> Option<Assigned> {
        let workers = all();
        if workers.len() < 2 {
            return None;
        }
        let here = index();
        let mut best = here;
        let mut fewest = workers[here].open.load(Ordering::Relaxed);
        for (i, w) in workers.iter().enumerate() {
            let open = w.open.load(Ordering::Relaxed);
            if open < fewest {
                (best, fewest) = (i, open);
            }
        }
        workers[best].open.fetch_add(1, Ordering::Relaxed);
        Some(Assigned { worker: best })
    }

    /// One more connection on this thread's worker, for a connection that
    /// outlives the task it was assigned with: an upgraded connection's
    /// tunnel, whose HTTP connection (and its assignment) ends once it has
    /// handed the socket over. Without this the worker would be balanced as
    /// if its tunnels were not there. `None` without workers.
    pub fn here() -> Option<Assigned> {
        let workers = all();
        if workers.len() < 2 {
            return None;
        }
        let worker = index();
        workers[worker].open.fetch_add(1, Ordering::Relaxed);
        Some(Assigned { worker })
    }

    /// The runtime to spawn on, if it is not this thread's.
    pub fn elsewhere(&self) -> Option<&'static Handle> {
        (self.worker != index()).then(|| &all()[self.worker].handle)
    }
}

impl Drop for Assigned {
    fn drop(&mut self) {
        all()[self.worker].open.fetch_sub(1, Ordering::Relaxed);
    }
}
