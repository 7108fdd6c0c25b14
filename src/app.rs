//! Wiring: build every listener's TLS state, bind, spawn the accept loops
//! and the certificate tasks; reconfigure them in place on reload; tear it
//! all down within the drain bound.
//!
//! A reload is planned and prepared completely (config validated, new
//! sockets bound, certificates and trust loaded) before anything running is
//! touched, so it either applies as a whole or not at all. Listeners are
//! matched by their bound address: an unchanged or changed listener keeps
//! its socket, and a changed one only swaps the state new connections load.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cert::acme::AcmeIssuer;
use crate::cert::manager::Source;
use crate::cert::{self, CertError, CertManager, CertStatus, Challenges, LocalCa};
use crate::config::{
    AcmeChallenge, CertPolicy, CertRef, CertSource, ClientAuthMode, Config, ConfigError,
    ListenerConfig, Mode, Origin, Origins,
};
use crate::proxy::{self, upstream::UpstreamClient, Listener, ListenerState, ListenerStats};
use crate::shutdown::{Drain, DrainOutcome, SignalEvent};
use crate::tls::client_auth::ClientVerifier;
use crate::tls::outbound::PeerVerifier;
use crate::tls::{self, CertResolver, ListenerCerts, ALPN_H2, ALPN_HTTP11};

/// Why sheath could not start, or a reload could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("listener `{listener}`: cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A reload's new socket overlaps a running listener's, which is
    /// only closed once the reload is applied.
    #[error(
        "listener `{listener}`: cannot bind {addr}: {source}; {running} of the running listener `{running_listener}` holds the port until the reload is applied, and a wildcard and a specific address cannot listen on one port together: reload twice: first to another port, then to {addr}"
    )]
    Rebind {
        listener: String,
        addr: SocketAddr,
        running: SocketAddr,
        running_listener: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listener `{listener}`: {}: {source}", cert_what(*.cert))]
    Cert {
        listener: String,
        cert: CertRef,
        #[source]
        source: CertError,
    },
    #[error("listener `{listener}`: client trust: {source}")]
    ClientTrust {
        listener: String,
        #[source]
        source: tls::client_auth::TrustError,
    },
    #[error("listener `{listener}`: outbound TLS: {source}")]
    Outbound {
        listener: String,
        #[source]
        source: tls::outbound::OutboundError,
    },
    #[error("local CA: {0}")]
    LocalCa(#[source] CertError),
    #[error("listener `{listener}`: TLS configuration: {source}")]
    Tls {
        listener: String,
        #[source]
        source: rustls::Error,
    },
    /// Any of the above, with where the setting it is about was written:
    /// the file, line and key, or the flag.
    #[error("{}{source}", located_at(.origin, .key))]
    At {
        origin: Origin,
        key: String,
        #[source]
        source: Box<StartError>,
    },
}

/// `path:line:column: key `k`: `, or `flag --f: `, as configuration
/// errors begin.
fn located_at(origin: &Origin, key: &str) -> String {
    match origin {
        Origin::File { .. } => format!("{origin}: key `{key}`: "),
        Origin::Flag(_) => format!("{origin}: "),
    }
}

impl StartError {
    /// This error, located at `key` if the configuration knows where that
    /// was written.
    fn at(self, origins: &Origins, key: &str) -> StartError {
        match origins.get(key) {
            Some(origin) => StartError::At {
                origin: origin.clone(),
                key: key.to_string(),
                source: Box::new(self),
            },
            None => self,
        }
    }
}

/// The key a listener's start error is about, `listener[index]...`.
fn error_key(index: usize, l: &ListenerConfig, e: &StartError) -> String {
    let listener = format!("listener[{index}]");
    match e {
        StartError::Bind { .. } | StartError::Rebind { .. } => format!("{listener}.bind"),
        StartError::Cert { cert, source, .. } => {
            let table = cert.table_key(index);
            let files = l.certs().find_map(|(c, s, _)| match s {
                CertSource::Files { key, .. } if c == *cert => Some(key),
                _ => None,
            });
            let Some(key_path) = files else { return table };
            // Which of the two files the error is about.
            let on_key = match source {
                CertError::Read { path, .. }
                | CertError::NoKey { path, .. }
                | CertError::EncryptedKey { path }
                | CertError::Format { path, .. } => path == key_path,
                CertError::Pem { what, .. } => *what == key_path.display().to_string(),
                _ => false,
            };
            format!("{table}.{}", if on_key { "key" } else { "cert" })
        }
        StartError::ClientTrust { source, .. } => {
            use tls::client_auth::TrustError;
            let on_crl = match source {
                TrustError::Read { path, .. }
                | TrustError::NoCa { path }
                | TrustError::Invalid { path, .. } => l
                    .client_auth
                    .crl
                    .iter()
                    .any(|crl| crl.display().to_string() == *path),
                _ => false,
            };
            format!(
                "{listener}.client_auth.{}",
                if on_crl { "crl" } else { "ca" }
            )
        }
        StartError::Outbound { .. } => format!("{listener}.outbound.ca"),
        _ => listener,
    }
}

/// "certificate", naming which one when the listener has several.
fn cert_what(cert: CertRef) -> String {
    match cert {
        CertRef::Default => "certificate".into(),
        sni => format!("certificate {sni}"),
    }
}

/// Why a reload was not applied. The running configuration is unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Apply(#[from] StartError),
    #[error("shutting down; reload ignored")]
    ShuttingDown,
    #[error("no configuration file to reload (running from flags)")]
    NoFile,
}

/// How the process ended, for `main` to turn into an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Every connection finished within the drain timeout.
    Drained,
    /// The drain timeout cut connections that were still open.
    DrainTimedOut { remaining: usize },
}

/// A listener as seen from outside: for tests, logs and the admin side.
#[derive(Debug, Clone)]
pub struct ListenerHandle {
    pub name: String,
    pub local_addr: SocketAddr,
    pub stats: Arc<ListenerStats>,
    /// Every certificate the listener serves, the default first.
    pub certs: Vec<CertHandle>,
    /// The client verifier, on mTLS listeners.
    pub client_verifier: Option<Arc<ClientVerifier>>,
    /// The peer verifier, on outbound listeners with `ca` files.
    pub peer_verifier: Option<Arc<PeerVerifier>>,
}

/// One of a listener's certificates.
#[derive(Debug, Clone)]
pub struct CertHandle {
    pub resolver: Arc<CertResolver>,
    pub status: Arc<ArcSwap<CertStatus>>,
}

impl ListenerHandle {
    /// A snapshot of the status of the listener's default certificate.
    pub fn cert_status(&self) -> Arc<CertStatus> {
        self.certs[0].status.load_full()
    }

    /// Snapshots of the status of every certificate, the default first.
    pub fn cert_statuses(&self) -> Vec<Arc<CertStatus>> {
        self.certs.iter().map(|c| c.status.load_full()).collect()
    }
}

/// A reload asked for from outside (the admin endpoint), with where to
/// send the outcome: the new generation, or why nothing changed.
pub type ReloadRequest = oneshot::Sender<Result<u64, String>>;

/// Reload bookkeeping, for logs, metrics and tests.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Configuration generation: 1 at start, +1 per applied reload.
    pub generation: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub last_success: Mutex<Option<SystemTime>>,
}

/// Shared views of a running sheath, for the admin endpoint.
#[derive(Debug, Clone)]
pub struct Observed {
    pub listeners: Arc<ArcSwap<Vec<ListenerHandle>>>,
    pub reloads: Arc<ReloadStats>,
    /// Cancelled once the process drains.
    pub draining: CancellationToken,
    pub reload: mpsc::Sender<ReloadRequest>,
    pub started: SystemTime,
}

/// One running listener and everything that belongs to it alone.
#[derive(Debug)]
struct Live {
    config: ListenerConfig,
    handle: ListenerHandle,
    state: Arc<ArcSwap<ListenerState>>,
    limit: Arc<Semaphore>,
    stop_accepting: CancellationToken,
    /// Stops the certificate manager (replaced when the cert config changes).
    cert_task: CancellationToken,
    /// Stops the trust reloader (replaced when client auth changes).
    trust_task: CancellationToken,
    /// Stops the peer trust reloader (replaced when the outbound settings
    /// change).
    peer_trust_task: CancellationToken,
    drain: Drain,
    /// The accept loops, one per worker.
    accept: Vec<JoinHandle<()>>,
    /// A duplicate of the listening socket, to hand to a successor. It
    /// lives exactly as long as the listener, so a removed listener's port
    /// really closes.
    handover: Option<std::os::fd::OwnedFd>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    listeners: Vec<Live>,
    local_ca: Option<Arc<LocalCa>>,
    http01: Vec<SocketAddr>,
}

/// A started sheath.
#[derive(Debug)]
pub struct Running {
    inner: tokio::sync::Mutex<Inner>,
    handles: Arc<ArcSwap<Vec<ListenerHandle>>>,
    challenges: Arc<Challenges>,
    local_ca: ArcSwap<Option<Arc<LocalCa>>>,
    stop_background: CancellationToken,
    drain: Drain,
    /// Cancelled when the process starts draining.
    draining: CancellationToken,
    pub reloads: Arc<ReloadStats>,
    /// Reload requests from the admin endpoint, served by
    /// `run_until_signal` like SIGHUP.
    reload_tx: mpsc::Sender<ReloadRequest>,
    reload_rx: std::sync::Mutex<Option<mpsc::Receiver<ReloadRequest>>>,
    /// Sockets besides the listeners' (the admin endpoint) that a
    /// successor inherits on upgrade.
    extra_handover: std::sync::Mutex<Vec<std::os::fd::OwnedFd>>,
    /// The successor started by the last upgrade, until it takes over or dies.
    successor: Arc<std::sync::Mutex<Option<u32>>>,
    /// A reload was asked for while a successor was starting: it goes to
    /// the successor once it has taken over, or is applied here if it dies.
    reload_after_upgrade: Arc<AtomicBool>,
    /// The successor this process handed over to, once it took over.
    handed_over: Arc<std::sync::Mutex<Option<u32>>>,
    started: SystemTime,
}

impl Running {
    /// The listeners running now.
    pub fn listeners(&self) -> Arc<Vec<ListenerHandle>> {
        self.handles.load_full()
    }

    /// The bound address of a listener (useful with port 0).
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listener(name).map(|l| l.local_addr)
    }

    pub fn listener(&self, name: &str) -> Option<ListenerHandle> {
        self.handles.load().iter().find(|l| l.name == name).cloned()
    }

    /// Connections open right now, across listeners.
    pub fn active_connections(&self) -> u64 {
        self.handles
            .load()
            .iter()
            .map(|l| l.stats.active.load(Ordering::Relaxed))
            .sum()
    }

    /// Connection tasks alive, across all listeners, including those of
    /// listeners removed by a reload and still draining.
    pub fn connection_tasks(&self) -> usize {
        self.drain.tracker.len()
    }

    /// What the admin endpoint and the metrics read.
    pub fn observe(&self) -> Observed {
        Observed {
            listeners: Arc::clone(&self.handles),
            reloads: Arc::clone(&self.reloads),
            draining: self.draining.clone(),
            reload: self.reload_tx.clone(),
            started: self.started,
        }
    }

    /// Set once a successor took over from this process: its pid.
    pub fn handed_over(&self) -> Arc<std::sync::Mutex<Option<u32>>> {
        Arc::clone(&self.handed_over)
    }

    /// Hand this socket to a successor on upgrade too.
    pub fn hand_over_too(&self, fd: std::os::fd::OwnedFd) {
        self.extra_handover.lock().expect("poisoned").push(fd);
    }

    /// Answer HTTP-01 challenges on `socket`. The socket stays bound until
    /// this process exits, so a successor could not bind the port again:
    /// it inherits this one, as it does the listeners'.
    fn serve_http01(&self, socket: tokio::net::TcpListener) {
        if let Ok(fd) = std::os::fd::AsFd::as_fd(&socket).try_clone_to_owned() {
            self.hand_over_too(fd);
        }
        tokio::spawn(cert::http01::serve(
            socket,
            Arc::clone(&self.challenges),
            self.stop_background.clone(),
        ));
    }

    /// The local CA, when any listener uses it.
    pub fn local_ca(&self) -> Option<Arc<LocalCa>> {
        self.local_ca.load().as_ref().clone()
    }

    /// Apply a new configuration without dropping connections. On error
    /// the running configuration is untouched.
    pub async fn reload(&self, new: Config) -> Result<u64, ReloadError> {
        let result = self.reload_inner(new).await;
        match &result {
            Ok(generation) => {
                self.reloads.succeeded.fetch_add(1, Ordering::Relaxed);
                *self.reloads.last_success.lock().expect("poisoned") = Some(SystemTime::now());
                *self.reloads.last_error.lock().expect("poisoned") = None;
                tracing::info!(generation, "configuration reloaded");
            }
            Err(ReloadError::ShuttingDown) => {}
            Err(e) => {
                self.reloads.failed.fetch_add(1, Ordering::Relaxed);
                *self.reloads.last_error.lock().expect("poisoned") = Some(e.to_string());
                tracing::error!(error = %e, "reload failed; the running configuration stays in force");
            }
        }
        result
    }

    async fn reload_inner(&self, new: Config) -> Result<u64, ReloadError> {
        let mut inner = self.inner.lock().await;
        if self.draining.is_cancelled() {
            return Err(ReloadError::ShuttingDown);
        }
        // Plan: which running listener (if any) each new one continues.
        let mut continues: Vec<Option<usize>> = Vec::with_capacity(new.listeners.len());
        for l in &new.listeners {
            let same = inner
                .listeners
                .iter()
                .position(|old| same_socket(&old.config, l));
            continues.push(same);
        }

        // Prepare everything fallible before touching what runs.
        let local_ca = ensure_local_ca(&new, inner.local_ca.clone()).await?;
        let state_dir_kept = new.state_dir == inner.config.state_dir;
        let running: Vec<ListenerHandle> =
            inner.listeners.iter().map(|l| l.handle.clone()).collect();
        let mut prepared = Vec::with_capacity(new.listeners.len());
        for (index, (l, old)) in new.listeners.iter().zip(&continues).enumerate() {
            let old = old.map(|i| &inner.listeners[i]);
            prepared.push(prepare(
                index,
                l,
                old.map(|o| (o, state_dir_kept)),
                &running,
                &new,
                local_ca.as_ref(),
                &self.challenges,
            )?);
        }
        let new_http01: Vec<(SocketAddr, String)> = http01_binds(&new)
            .into_iter()
            .filter(|(b, _)| !inner.http01.contains(b))
            .collect();
        let http01_sockets = bind_http01(&new, &new_http01)?;

        // The admin endpoint is bound once, at the start (`main`), and a
        // reload does not move it: said here, or the operator believes it
        // moved. The running configuration keeps the address in force, so
        // every reload that still differs says so again.
        let mut new = new;
        let admin_in_force = inner.config.admin;
        if new.admin != admin_in_force {
            let describe =
                |a: Option<SocketAddr>| a.map_or("disabled".to_string(), |a| a.to_string());
            tracing::warn!(
                running = %describe(admin_in_force),
                configured = %describe(new.admin),
                "the admin endpoint changes only at restart; the reloaded [admin] setting is not applied"
            );
            new.admin = admin_in_force;
        }

        // Commit.
        let mut old_listeners: Vec<Option<Live>> = std::mem::take(&mut inner.listeners)
            .into_iter()
            .map(Some)
            .collect();
        let mut live = Vec::with_capacity(prepared.len());
        for (p, old) in prepared.into_iter().zip(continues) {
            let old = old.and_then(|i| old_listeners[i].take());
            live.push(self.commit(p, old));
        }
        for removed in old_listeners.into_iter().flatten() {
            tracing::info!(listener = %removed.config.name, addr = %removed.handle.local_addr, "listener removed; draining its connections");
            retire(removed, new.drain_timeout).await;
        }
        for socket in http01_sockets {
            self.serve_http01(socket);
        }
        inner.http01.extend(new_http01.into_iter().map(|(b, _)| b));
        inner.listeners = live;
        inner.local_ca = local_ca.clone();
        // Said again on every reload that still asks for more than the
        // limit, like the [admin] warning above.
        crate::resources::check_open_files(&new);
        inner.config = new;
        self.local_ca.store(Arc::new(local_ca));
        self.handles.store(Arc::new(
            inner.listeners.iter().map(|l| l.handle.clone()).collect(),
        ));
        Ok(self.reloads.generation.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Put a prepared listener into service, continuing `old` if given.
    fn commit(&self, p: Prepared, old: Option<Live>) -> Live {
        let Prepared {
            config,
            socket,
            state,
            managers,
            verifier,
            peer_verifier,
            stats,
        } = p;
        let name = config.name.clone();
        match old {
            Some(mut old) => {
                let changed = old.config != config;
                let previous = old.state.swap(Arc::clone(&state));
                if requests_move(&previous.config, &config) {
                    // Only HTTP connections look at it; TCP-mode streams
                    // and tunnels run on where they were connected.
                    if previous.config.mode == Mode::Http {
                        tracing::info!(
                            listener = %name,
                            from = %previous.config.upstream,
                            to = %config.upstream,
                            "upstream changed; HTTP connections opened before finish their requests in flight and close"
                        );
                    }
                    previous.moved.cancel();
                }
                if !managers.is_empty() {
                    old.cert_task.cancel();
                    old.cert_task = self.stop_background.child_token();
                    old.handle.certs = cert_handles(&state.certs, &managers);
                    for manager in managers {
                        tokio::spawn(manager.run(old.cert_task.clone()));
                    }
                }
                if let Some(verifier) = verifier.clone() {
                    old.trust_task.cancel();
                    old.trust_task = self.stop_background.child_token();
                    old.handle.client_verifier = Some(Arc::clone(&verifier));
                    tokio::spawn(tls::client_auth::reload_trust(
                        name.clone(),
                        config.client_auth.clone(),
                        verifier,
                        old.trust_task.clone(),
                    ));
                } else if config.client_auth.mode == ClientAuthMode::None {
                    old.trust_task.cancel();
                    old.handle.client_verifier = None;
                }
                if let Some(verifier) = peer_verifier {
                    old.peer_trust_task.cancel();
                    old.peer_trust_task = self.stop_background.child_token();
                    old.handle.peer_verifier = Some(Arc::clone(&verifier));
                    spawn_peer_trust(&name, &config, verifier, &old.peer_trust_task);
                } else if !watches_peer_ca(&config) {
                    old.peer_trust_task.cancel();
                    old.handle.peer_verifier = None;
                }
                let (was, now) = (old.config.max_connections, config.max_connections);
                if now > was {
                    old.limit.add_permits(now - was);
                } else if now < was {
                    lower_limit(&old.limit, was - now);
                }
                old.handle.name = name.clone();
                if changed {
                    tracing::info!(listener = %name, "listener reconfigured; new connections use the new settings");
                }
                old.config = config;
                old
            }
            None => {
                let socket = socket.expect("a new listener has a bound socket");
                let limit = Arc::new(Semaphore::new(config.max_connections));
                let state_swap = Arc::new(ArcSwap::new(Arc::clone(&state)));
                assert!(
                    !managers.is_empty(),
                    "a new listener has certificate managers"
                );
                let cert_task = self.stop_background.child_token();
                let trust_task = self.stop_background.child_token();
                let peer_trust_task = self.stop_background.child_token();
                let handover = std::os::fd::AsFd::as_fd(&socket).try_clone_to_owned().ok();
                let listener = Listener::new(
                    socket,
                    Arc::clone(&state_swap),
                    Arc::clone(&stats),
                    Arc::clone(&limit),
                )
                .expect("a bound socket has a local address");
                let handle = ListenerHandle {
                    name: name.clone(),
                    local_addr: listener.local_addr,
                    stats,
                    certs: cert_handles(&state.certs, &managers),
                    client_verifier: verifier.clone(),
                    peer_verifier: peer_verifier.clone(),
                };
                tracing::info!(
                    listener = %name,
                    addr = %listener.local_addr,
                    upstream = %config.upstream,
                    mode = %config.mode,
                    "listening"
                );
                for manager in managers {
                    tokio::spawn(manager.run(cert_task.clone()));
                }
                if let Some(verifier) = verifier {
                    tokio::spawn(tls::client_auth::reload_trust(
                        name.clone(),
                        config.client_auth.clone(),
                        verifier,
                        trust_task.clone(),
                    ));
                }
                if let Some(verifier) = peer_verifier {
                    spawn_peer_trust(&name, &config, verifier, &peer_trust_task);
                }
                let stop_accepting = CancellationToken::new();
                let drain = Drain {
                    graceful: self.drain.graceful.child_token(),
                    abort: self.drain.abort.child_token(),
                    tracker: self.drain.tracker.clone(),
                };
                let accept = listener.spawn(&stop_accepting, &drain);
                Live {
                    config,
                    handle,
                    state: state_swap,
                    limit,
                    stop_accepting,
                    cert_task,
                    trust_task,
                    peer_trust_task,
                    drain,
                    accept,
                    handover,
                }
            }
        }
    }

    /// Start a new sheath binary on the same sockets (see `upgrade`). This
    /// process keeps serving until the successor, once ready, asks it to
    /// drain; if the successor fails, nothing changes here.
    pub async fn upgrade(&self) -> std::io::Result<u32> {
        let inner = self.inner.lock().await;
        if self.draining.is_cancelled() {
            return Err(std::io::Error::other("shutting down; upgrade ignored"));
        }
        if let Some(pid) = *self.successor.lock().expect("poisoned") {
            return Err(std::io::Error::other(format!(
                "successor {pid} is still starting; upgrade ignored"
            )));
        }
        let mut fds = Vec::new();
        for l in &inner.listeners {
            if let Some(fd) = &l.handover {
                fds.push(fd.try_clone()?);
            }
        }
        for fd in self.extra_handover.lock().expect("poisoned").iter() {
            fds.push(fd.try_clone()?);
        }
        let mut child = crate::upgrade::spawn_successor(fds)?;
        let pid = child.id().unwrap_or_default();
        tracing::info!(pid, "upgrade: started successor on the inherited sockets");
        *self.successor.lock().expect("poisoned") = Some(pid);
        let successor = Arc::clone(&self.successor);
        let reload_after = Arc::clone(&self.reload_after_upgrade);
        let reload = self.reload_tx.clone();
        tokio::spawn(async move {
            // The successor runs on after this process exits; this only
            // reports a successor that died before taking over.
            if let Ok(status) = child.wait().await {
                {
                    let mut current = successor.lock().expect("poisoned");
                    if *current != Some(pid) {
                        return;
                    }
                    *current = None;
                }
                tracing::error!(pid, %status, "upgrade: successor exited; this process keeps serving");
                if reload_after.swap(false, Ordering::Relaxed) {
                    tracing::info!("applying the reload asked for during the upgrade");
                    let (reply, _) = oneshot::channel();
                    let _ = reload.send(reply).await;
                }
            }
        });
        Ok(pid)
    }

    /// Stop accepting (new connections are refused), then drain in-flight
    /// connections for at most the drain timeout.
    pub async fn shutdown(self) -> ShutdownOutcome {
        self.draining.cancel();
        let inner = self.inner.into_inner();
        for l in &inner.listeners {
            l.stop_accepting.cancel();
        }
        // The accept loops drop their sockets when they return; waiting for
        // them makes "refused from now on" true before draining starts.
        for l in inner.listeners {
            for accept in l.accept {
                let _ = accept.await;
            }
        }
        self.stop_background.cancel();
        let timeout = inner.config.drain_timeout;
        tracing::info!(timeout = ?timeout, "draining connections");
        match self.drain.run(timeout).await {
            DrainOutcome::Drained => ShutdownOutcome::Drained,
            DrainOutcome::TimedOut { remaining } => {
                tracing::warn!(remaining, "drain timeout expired; connections were cut");
                ShutdownOutcome::DrainTimedOut { remaining }
            }
        }
    }

    /// Mark the process as draining: reloads are refused from now on.
    fn begin_drain(&self) {
        self.draining.cancel();
    }
}

/// Does `config` have peer trust from files, which a task keeps current?
fn watches_peer_ca(config: &ListenerConfig) -> bool {
    config.outbound.as_ref().is_some_and(|o| !o.ca.is_empty())
}

/// Start keeping `verifier` current from the `ca` files of `config`'s
/// outbound settings, until `stop`.
fn spawn_peer_trust(
    name: &str,
    config: &ListenerConfig,
    verifier: Arc<PeerVerifier>,
    stop: &CancellationToken,
) {
    let outbound = config
        .outbound
        .clone()
        .expect("a peer verifier comes from outbound settings");
    tokio::spawn(tls::outbound::reload_peer_trust(
        name.to_string(),
        outbound,
        verifier,
        stop.clone(),
    ));
}

/// Take `by` permits out of a listener's connection limit for good.
///
/// The semaphore only forgets permits that are available: those held by
/// open connections would come back as they close, and the lower cap
/// would never hold. What cannot be forgotten now is acquired as it comes
/// back and forgotten then. The semaphore is fair, so this waits ahead of
/// the accept loops (only a slot they were already waiting for goes to
/// them first): no further connection is accepted until the listener is
/// below its new cap, and permits added by a later reload pay this off
/// first.
fn lower_limit(limit: &Arc<Semaphore>, by: usize) {
    let forgotten = limit.forget_permits(by);
    // max_connections is validated to fit a u32 many times over.
    let owed = u32::try_from(by - forgotten).unwrap_or(u32::MAX);
    if owed == 0 {
        return;
    }
    let limit = Arc::clone(limit);
    tokio::spawn(async move {
        // Err only if the semaphore was closed, which nothing does.
        if let Ok(permits) = limit.acquire_many_owned(owed).await {
            permits.forget();
        }
    });
}

/// Stop a removed listener: refuse new connections at once, let its
/// connections finish, cut them at the drain timeout.
///
/// Returns once the port is closed. The accept loops hold the socket and
/// drop it only when they see the cancellation; until then the kernel
/// went on completing TCP handshakes that were reset moments later, and a
/// reload right after, putting a listener back on the port, could find it
/// still taken.
async fn retire(old: Live, drain_timeout: Duration) {
    old.stop_accepting.cancel();
    old.cert_task.cancel();
    old.trust_task.cancel();
    old.peer_trust_task.cancel();
    old.drain.graceful.cancel();
    let abort = old.drain.abort.clone();
    tokio::spawn(async move {
        tokio::time::sleep(drain_timeout).await;
        abort.cancel();
    });
    drop(old.handover);
    for accept in old.accept {
        let _ = accept.await;
    }
}

/// Does a new listener continue an old one's socket?
fn same_socket(old: &ListenerConfig, new: &ListenerConfig) -> bool {
    if new.bind.port() == 0 {
        // Every `:0` is a different socket; only the name can tell.
        old.bind == new.bind && old.name == new.name
    } else {
        old.bind == new.bind
    }
}

/// What a listener needs before it can be put into service.
struct Prepared {
    config: ListenerConfig,
    /// A freshly bound socket, for a new listener.
    socket: Option<TcpListener>,
    state: Arc<ListenerState>,
    /// New certificate managers, one per certificate, when the listener's
    /// certificates are new or changed; empty when they carry on.
    managers: Vec<CertManager>,
    /// A new client verifier, when client auth is new or changed.
    verifier: Option<Arc<ClientVerifier>>,
    /// A new peer verifier, when an outbound listener's settings with `ca`
    /// files are new or changed.
    peer_verifier: Option<Arc<PeerVerifier>>,
    /// The running listener's counters, or new ones: made here so that the
    /// upstream client counts its connections in them from the start.
    stats: Arc<ListenerStats>,
}

/// `l` is `config.listeners[index]`; errors name where the setting they
/// are about was written. `old` is the running listener it continues, and
/// whether the state directory (the local CA's, the ACME state's) is the
/// one that listener's certificates came from.
fn prepare(
    index: usize,
    l: &ListenerConfig,
    old: Option<(&Live, bool)>,
    running: &[ListenerHandle],
    config: &Config,
    local_ca: Option<&Arc<LocalCa>>,
    challenges: &Arc<Challenges>,
) -> Result<Prepared, StartError> {
    prepare_listener(l, old, running, config, local_ca, challenges).map_err(|e| {
        let key = error_key(index, l, &e);
        e.at(&config.origins, &key)
    })
}

fn prepare_listener(
    l: &ListenerConfig,
    old: Option<(&Live, bool)>,
    running: &[ListenerHandle],
    config: &Config,
    local_ca: Option<&Arc<LocalCa>>,
    challenges: &Arc<Challenges>,
) -> Result<Prepared, StartError> {
    let (old, state_dir_kept) = match old {
        Some((o, kept)) => (Some(o), kept),
        None => (None, false),
    };
    let old_state = old.map(|o| o.state.load_full());
    // The certificates change as a set: a changed one restarts every
    // manager of the listener. Restarting costs little (a local-CA issuance,
    // a file read, a cached ACME certificate) and keeps one task token per
    // listener. A new state directory is a new local CA and new ACME
    // state: unchanged settings kept issuing from the old CA.
    let certs_unchanged = old.is_some_and(|o| {
        state_dir_kept
            && o.config.cert == l.cert
            && o.config.cert_policy == l.cert_policy
            && o.config.sni_certs == l.sni_certs
    });
    let (certs, managers, acme_tls) = match (&old_state, certs_unchanged) {
        (Some(state), true) => (Arc::clone(&state.certs), Vec::new(), state.acme_tls.clone()),
        _ => {
            let mut resolvers = Vec::new();
            let mut managers = Vec::new();
            let mut acme_tls = None;
            for (cert, source, policy) in l.certs() {
                let resolver = Arc::new(CertResolver::empty());
                let (manager, tls) = new_manager(
                    l, cert, source, policy, config, local_ca, challenges, &resolver,
                )?;
                acme_tls = acme_tls.or(tls);
                resolvers.push(resolver);
                managers.push(manager);
            }
            (Arc::new(ListenerCerts::new(resolvers)), managers, acme_tls)
        }
    };
    let trust_unchanged = old.is_some_and(|o| o.config.client_auth == l.client_auth);
    let (verifier, new_verifier) = match (old, trust_unchanged, l.client_auth.mode) {
        (_, _, ClientAuthMode::None) => (None, None),
        (Some(o), true, _) => (o.handle.client_verifier.clone(), None),
        _ => {
            let v =
                ClientVerifier::new(&l.client_auth).map_err(|source| StartError::ClientTrust {
                    listener: l.name.clone(),
                    source,
                })?;
            (Some(Arc::clone(&v)), Some(v))
        }
    };
    // Unchanged outbound settings keep the verifier and its watcher, which
    // already follow the files; a reload does not read them again.
    let peer_unchanged = old.is_some_and(|o| o.config.outbound == l.outbound);
    let (peer_verifier, new_peer_verifier) = match (&l.outbound, old) {
        (None, _) => (None, None),
        (Some(o), _) if o.ca.is_empty() => (None, None),
        (Some(_), Some(o)) if peer_unchanged => (o.handle.peer_verifier.clone(), None),
        (Some(o), _) => {
            let v = PeerVerifier::new(o).map_err(|source| StartError::Outbound {
                listener: l.name.clone(),
                source,
            })?;
            (Some(Arc::clone(&v)), Some(v))
        }
    };
    let stats = old.map_or_else(Arc::default, |o| Arc::clone(&o.handle.stats));
    // Keep the upstream pool warm when nothing about the upstream changed.
    let http = match (&old_state, old) {
        (Some(state), Some(o))
            if o.config.upstream == l.upstream
                && o.config.timeouts.connect == l.timeouts.connect
                && o.config.timeouts.upstream_idle == l.timeouts.upstream_idle
                && o.config.mode == l.mode
                && o.config.upstream_protocol == l.upstream_protocol =>
        {
            state.http.clone()
        }
        _ => (l.mode == Mode::Http).then(|| UpstreamClient::new(l, &stats)),
    };
    // Connections of every state since the upstream last changed are told
    // together when it changes (see `ListenerState::moved`).
    let moved = match &old_state {
        Some(state) if !requests_move(&state.config, l) => state.moved.clone(),
        _ => CancellationToken::new(),
    };
    let state = build_state(l, certs, acme_tls, verifier, peer_verifier, http, moved)?;
    let socket = match old {
        Some(_) => None,
        None => Some(proxy::bind(l.bind).map_err(|source| bind_error(l, running, source))?),
    };
    Ok(Prepared {
        config: l.clone(),
        socket,
        state,
        managers,
        verifier: new_verifier,
        peer_verifier: new_peer_verifier,
        stats,
    })
}

/// Why `l` could not be bound. A reload binds its new sockets before the
/// old ones close, so one that moves a listener between an address and
/// the wildcard on the same port (127.0.0.1:P to 0.0.0.0:P) always fails:
/// Linux lets no wildcard and specific address listen on one port
/// together, even with SO_REUSEADDR. "Address in use", about a port
/// nothing else held, did not say so; the error names the running socket
/// and the way round, in two reloads.
fn bind_error(
    l: &ListenerConfig,
    running: &[ListenerHandle],
    source: std::io::Error,
) -> StartError {
    let overlaps = |r: &&ListenerHandle| {
        let (a, b) = (r.local_addr, l.bind);
        a.port() == b.port()
            && a.is_ipv4() == b.is_ipv4()
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    match running.iter().find(overlaps) {
        Some(r) if source.kind() == std::io::ErrorKind::AddrInUse => StartError::Rebind {
            listener: l.name.clone(),
            addr: l.bind,
            running: r.local_addr,
            running_listener: r.name.clone(),
            source,
        },
        _ => StartError::Bind {
            listener: l.name.clone(),
            addr: l.bind,
            source,
        },
    }
}

/// What the outside sees of a listener's certificates: each resolver with
/// the status its manager keeps.
fn cert_handles(certs: &ListenerCerts, managers: &[CertManager]) -> Vec<CertHandle> {
    certs
        .all()
        .iter()
        .zip(managers)
        .map(|(resolver, manager)| CertHandle {
            resolver: Arc::clone(resolver),
            status: manager.status(),
        })
        .collect()
}

/// A manager for one of a listener's certificates, with its first
/// certificate already installed when one can be had without the network.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site, each argument distinct"
)]
fn new_manager(
    l: &ListenerConfig,
    cert: CertRef,
    source: &CertSource,
    policy: &CertPolicy,
    config: &Config,
    local_ca: Option<&Arc<LocalCa>>,
    challenges: &Arc<Challenges>,
    resolver: &Arc<CertResolver>,
) -> Result<(CertManager, Option<Arc<rustls::ServerConfig>>), StartError> {
    let (source, acme_tls) = match source {
        CertSource::LocalCa { names, lifetime } => (
            Source::LocalCa {
                ca: Arc::clone(local_ca.expect("local CA loaded when needed")),
                names: names.clone(),
                lifetime: *lifetime,
            },
            None,
        ),
        CertSource::Files { cert, key } => (
            Source::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            None,
        ),
        CertSource::Acme(acme) => (
            Source::Acme(Arc::new(AcmeIssuer::new(
                &l.name,
                acme,
                &config.state_dir,
                Arc::clone(challenges),
            ))),
            (acme.challenge == AcmeChallenge::TlsAlpn01).then(|| challenges.server_config()),
        ),
    };
    let mut manager = CertManager::new(
        l.name.clone(),
        cert,
        source,
        policy.clone(),
        Arc::clone(resolver),
    );
    if l.mode == Mode::Outbound {
        manager.presented_as_client();
    }
    // Whatever can be had without the network is served from the first
    // connection; an ACME listener without a cached certificate starts
    // empty and is not ready until its first issuance.
    match manager.initial() {
        Ok(Some(material)) => manager.install_first(material),
        Ok(None) if manager.cert == CertRef::Default => tracing::info!(
            listener = %l.name,
            "no certificate yet; handshakes fail until the first issuance"
        ),
        Ok(None) => tracing::info!(
            listener = %l.name,
            cert = %manager.cert,
            "no certificate yet; its names get the default certificate until the first issuance"
        ),
        Err(source) => {
            return Err(StartError::Cert {
                listener: l.name.clone(),
                cert: manager.cert,
                source,
            })
        }
    }
    Ok((manager, acme_tls))
}

async fn ensure_local_ca(
    config: &Config,
    current: Option<Arc<LocalCa>>,
) -> Result<Option<Arc<LocalCa>>, StartError> {
    let needed = config
        .listeners
        .iter()
        .flat_map(ListenerConfig::certs)
        .any(|(_, source, _)| matches!(source, CertSource::LocalCa { .. }));
    if !needed {
        return Ok(current);
    }
    if let Some(ca) = current {
        if LocalCa::dir_in(&config.state_dir)
            == ca.cert_path().parent().unwrap_or(std::path::Path::new(""))
        {
            return Ok(Some(ca));
        }
    }
    let dir = config.state_dir.clone();
    let ca = tokio::task::spawn_blocking(move || LocalCa::load_or_create(&dir))
        .await
        .expect("local CA task panicked")
        .map_err(|e| StartError::LocalCa(e).at(&config.origins, "global.state_dir"))?;
    tracing::info!(
        cert = %ca.cert_path().display(),
        sha256 = %ca.info().sha256,
        "local CA ready"
    );
    Ok(Some(Arc::new(ca)))
}

/// The HTTP-01 listeners, each with the key of the first certificate that
/// asks for it (`listener[0].cert.http01_bind`).
fn http01_binds(config: &Config) -> Vec<(SocketAddr, String)> {
    let mut binds: Vec<(SocketAddr, String)> = Vec::new();
    for (index, l) in config.listeners.iter().enumerate() {
        for (bind, key) in l.http01_binds(index) {
            if !binds.iter().any(|(b, _)| *b == bind) {
                binds.push((bind, key));
            }
        }
    }
    binds
}

/// Bind the HTTP-01 listeners `binds`, from [`http01_binds`]. An error is
/// located at the key that asked for the address, as a listener's bind
/// error is: with several ACME certificates, the address alone did not
/// say which.
fn bind_http01(
    config: &Config,
    binds: &[(SocketAddr, String)],
) -> Result<Vec<TcpListener>, StartError> {
    binds
        .iter()
        .map(|(bind, key)| {
            proxy::bind(*bind).map_err(|source| {
                StartError::Bind {
                    listener: "http-01".into(),
                    addr: *bind,
                    source,
                }
                .at(&config.origins, key)
            })
        })
        .collect()
}

/// Build TLS state, bind every listener and start serving.
///
/// Everything that can fail (certificates, trust, binds) is done before the
/// first connection is accepted, so a bad start fails as a whole.
pub async fn start(config: Config) -> Result<Running, StartError> {
    // Before the listeners say they are listening: the warning belongs
    // with the start, not after it.
    crate::resources::check_open_files(&config);
    let challenges = Challenges::new();
    let local_ca = ensure_local_ca(&config, None).await?;
    let mut prepared = Vec::with_capacity(config.listeners.len());
    for (index, l) in config.listeners.iter().enumerate() {
        prepared.push(prepare(
            index,
            l,
            None,
            &[],
            &config,
            local_ca.as_ref(),
            &challenges,
        )?);
    }
    let http01 = http01_binds(&config);
    let http01_sockets = bind_http01(&config, &http01)?;
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let running = Running {
        inner: tokio::sync::Mutex::new(Inner {
            config: config.clone(),
            listeners: Vec::new(),
            local_ca: local_ca.clone(),
            http01: http01.into_iter().map(|(b, _)| b).collect(),
        }),
        handles: Arc::new(ArcSwap::from_pointee(Vec::new())),
        challenges,
        local_ca: ArcSwap::from_pointee(local_ca),
        stop_background: CancellationToken::new(),
        drain: Drain::new(),
        draining: CancellationToken::new(),
        reloads: Arc::default(),
        reload_tx,
        reload_rx: std::sync::Mutex::new(Some(reload_rx)),
        extra_handover: Default::default(),
        successor: Default::default(),
        reload_after_upgrade: Default::default(),
        handed_over: Default::default(),
        started: SystemTime::now(),
    };
    for socket in http01_sockets {
        tracing::info!(addr = ?socket.local_addr().ok(), "HTTP-01 challenge listener");
        running.serve_http01(socket);
    }
    {
        let mut inner = running.inner.lock().await;
        for p in prepared {
            let live = running.commit(p, None);
            inner.listeners.push(live);
        }
        running.handles.store(Arc::new(
            inner.listeners.iter().map(|l| l.handle.clone()).collect(),
        ));
    }
    running.reloads.generation.store(1, Ordering::Relaxed);
    Ok(running)
}

/// Where a reload reads its configuration from.
pub type ConfigLoader = Box<dyn Fn() -> Result<Config, ReloadError> + Send + Sync>;

/// Run until SIGTERM or SIGINT, then drain. SIGHUP reloads the
/// configuration (ignored once draining). A second SIGTERM/SIGINT during
/// the drain returns at once with `None`: the operator asked twice.
///
/// With `watch`, a change of that file (the config file) reloads too; a
/// rewrite that leaves the content as it was does nothing.
///
/// `signals` are registered before the process announces itself ready:
/// a predecessor may forward a SIGHUP the moment it hears from us, and
/// SIGHUP's default action is to exit.
pub async fn run_until_signal(
    running: Running,
    loader: ConfigLoader,
    watch: Option<std::path::PathBuf>,
    signals: &mut crate::shutdown::Signals,
) -> Option<ShutdownOutcome> {
    let mut watcher = watch
        .as_ref()
        .map(|p| cert::files::Watcher::new(&[p.as_path()]));
    let content = |p: &Option<std::path::PathBuf>| p.as_ref().and_then(|p| std::fs::read(p).ok());
    let mut last_seen = content(&watch);
    let mut requests = running.reload_rx.lock().expect("poisoned").take();
    loop {
        tokio::select! {
            Some(reply) = async {
                match requests.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::info!("reload requested");
                last_seen = content(&watch);
                let _ = reply.send(reload_unless_upgrading(&running, &loader).await);
            }
            sig = signals.next() => match sig {
                SignalEvent::Stop(name) => {
                    tracing::info!(signal = name, "shutting down");
                    // A successor still starting would outlive us and serve
                    // on its own: it goes too.
                    if let Some(pid) = running.successor.lock().expect("poisoned").take() {
                        crate::upgrade::forward(pid, rustix::process::Signal::TERM);
                    }
                    break;
                }
                SignalEvent::Reload => {
                    tracing::info!("SIGHUP: reloading configuration");
                    last_seen = content(&watch);
                    let _ = reload_unless_upgrading(&running, &loader).await;
                }
                SignalEvent::Upgrade => {
                    if let Err(e) = running.upgrade().await {
                        tracing::error!(error = %e, "upgrade failed; this process keeps serving");
                    }
                }
                SignalEvent::TakeOver => {
                    let pid = *running.successor.lock().expect("poisoned");
                    match pid {
                        Some(pid) => {
                            *running.handed_over.lock().expect("poisoned") = Some(pid);
                            tracing::info!(successor = pid, "upgrade: successor is ready; draining");
                            if running.reload_after_upgrade.swap(false, Ordering::Relaxed) {
                                tracing::info!(successor = pid, "passing on the reload asked for during the upgrade");
                                crate::upgrade::forward(pid, rustix::process::Signal::HUP);
                            }
                            break;
                        }
                        None => tracing::info!("SIGUSR1 ignored: no upgrade in progress"),
                    }
                }
            },
            _ = async {
                match watcher.as_mut() {
                    Some(w) => {
                        w.changed().await;
                        w.settle(Duration::from_millis(250)).await;
                    }
                    None => std::future::pending().await,
                }
            } => {
                let now = content(&watch);
                if now != last_seen {
                    last_seen = now;
                    tracing::info!("configuration file changed: reloading");
                    let _ = reload_unless_upgrading(&running, &loader).await;
                }
            }
        }
    }
    running.begin_drain();
    let running_successor = *running.handed_over.lock().expect("poisoned");
    // After a handover the service is not stopping: the successor, already
    // the main process for systemd, carries on.
    if running_successor.is_none() {
        crate::upgrade::announce_stopping();
    }
    let shutdown = running.shutdown();
    tokio::pin!(shutdown);
    // A drain that follows a handover was not asked for by a signal: the
    // first SIGTERM/SIGINT then (`systemctl stop` signals every process of
    // the unit) asks for what is happening already, and only a second one
    // cuts the connections still finishing.
    let mut stop_asked = running_successor.is_none();
    let passes_on = running_successor.is_some() && crate::upgrade::is_init();
    loop {
        tokio::select! {
            outcome = &mut shutdown => return Some(outcome),
            sig = signals.next() => match sig {
                // As a container's init this process must outlive the
                // drain to keep the successor alive; stop requests, reloads
                // and upgrades are for the successor, which serves now.
                // Once this process has drained, `upgrade::supervise` goes
                // on passing them.
                event if passes_on => match event.passed_on() {
                    Some(signal) => {
                        tracing::info!(signal = ?event, "forwarding to the successor");
                        crate::upgrade::forward_to_descendants(signal);
                    }
                    None => tracing::info!(signal = ?event, "signal ignored while draining"),
                },
                SignalEvent::Stop(sig) if !stop_asked => {
                    stop_asked = true;
                    tracing::info!(signal = sig, "already draining after the handover; a second signal exits at once");
                }
                SignalEvent::Stop(sig) => {
                    tracing::warn!(signal = sig, "second signal: exiting without finishing the drain");
                    return None;
                }
                // Nothing left to reload or hand over while draining.
                other => tracing::info!(signal = ?other, "signal ignored while draining"),
            }
        }
    }
}

/// Reload, unless a successor is starting: it read the configuration
/// file already, and a reload here (a listener bound, say) would vanish
/// with this process once the successor takes over without it. The reload
/// goes to the successor once it has, or is applied here if it dies.
async fn reload_unless_upgrading(running: &Running, loader: &ConfigLoader) -> Result<u64, String> {
    if let Some(pid) = *running.successor.lock().expect("poisoned") {
        running.reload_after_upgrade.store(true, Ordering::Relaxed);
        let why = format!(
            "an upgrade is in progress: the new process (pid {pid}) reloads once it has taken over"
        );
        tracing::info!("{why}");
        return Err(why);
    }
    reload_from(running, loader).await
}

/// Read the configuration again and apply it; every failure is counted
/// and logged, and leaves the running configuration in force.
async fn reload_from(running: &Running, loader: &ConfigLoader) -> Result<u64, String> {
    match loader() {
        Ok(config) => running.reload(config).await.map_err(|e| e.to_string()),
        Err(e) => {
            running.reloads.failed.fetch_add(1, Ordering::Relaxed);
            *running.reloads.last_error.lock().expect("poisoned") = Some(e.to_string());
            tracing::error!(error = %e, "reload failed; the running configuration stays in force");
            Err(e.to_string())
        }
    }
}

fn build_state(
    listener: &ListenerConfig,
    certs: Arc<ListenerCerts>,
    acme_tls: Option<Arc<rustls::ServerConfig>>,
    client_verifier: Option<Arc<ClientVerifier>>,
    peer_verifier: Option<Arc<PeerVerifier>>,
    http: Option<UpstreamClient<proxy::client_body::ClientBody>>,
    moved: CancellationToken,
) -> Result<Arc<ListenerState>, StartError> {
    let configured: Vec<&[u8]> = listener.alpn.iter().map(|p| p.as_bytes()).collect();
    let alpn: &[&[u8]] = match listener.mode {
        Mode::Http => &[ALPN_H2, ALPN_HTTP11],
        Mode::Tcp => &configured,
        // Offered to the peer instead, by the TLS client below.
        Mode::Outbound => &[],
    };
    let verifier = client_verifier
        .clone()
        .map(|v| v as Arc<dyn rustls::server::danger::ClientCertVerifier>);
    let tls = tls::server_config(certs.clone(), alpn, verifier, listener.tls_min_version).map_err(
        |source| StartError::Tls {
            listener: listener.name.clone(),
            source,
        },
    )?;
    // Outbound mode presents the listener's (default) certificate. CA files
    // are watched through `peer_verifier`; the system's roots are read
    // again on every reload.
    let outbound = match &listener.outbound {
        Some(o) => Some(
            tls::outbound::client_config(
                o,
                &listener.alpn,
                listener.tls_min_version,
                Arc::clone(&certs.all()[0]),
                peer_verifier,
            )
            .map_err(|source| StartError::Outbound {
                listener: listener.name.clone(),
                source,
            })?,
        ),
        None => None,
    };
    Ok(Arc::new(ListenerState {
        config: Arc::new(listener.clone()),
        tls,
        acme_tls,
        certs,
        client_verifier,
        http,
        outbound,
        moved,
    }))
}

/// Does a reload from `old` to `new` send the listener's requests
/// elsewhere: to another upstream, in another protocol, or through
/// another mode? Then the connections open under `old` are asked to close
/// once their requests in flight are done (see `ListenerState::moved`).
fn requests_move(old: &ListenerConfig, new: &ListenerConfig) -> bool {
    old.upstream != new.upstream
        || old.upstream_protocol != new.upstream_protocol
        || old.mode != new.mode
}
