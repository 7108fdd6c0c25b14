//! Wiring: build every listener's TLS state, bind, spawn the accept loops
//! and the certificate tasks, and tear it all down within the drain bound.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cert::acme::AcmeIssuer;
use crate::cert::manager::Source;
use crate::cert::{self, CertError, CertManager, CertStatus, Challenges, LocalCa};
use crate::config::{AcmeChallenge, CertSource, ClientAuthMode, Config, ListenerConfig, Mode};
use crate::proxy::{self, http::UpstreamClient, Listener, ListenerState, ListenerStats};
use crate::shutdown::{Drain, DrainOutcome};
use crate::tls::client_auth::ClientVerifier;
use crate::tls::{self, CertResolver, ALPN_H2, ALPN_HTTP11};

/// Why sheath could not start.
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
    #[error("listener `{listener}`: certificate: {source}")]
    Cert {
        listener: String,
        #[source]
        source: CertError,
    },
    #[error("listener `{listener}`: client trust: {source}")]
    ClientTrust {
        listener: String,
        #[source]
        source: tls::client_auth::TrustError,
    },
    #[error("local CA: {0}")]
    LocalCa(#[source] CertError),
    #[error("listener `{listener}`: TLS configuration: {source}")]
    Tls {
        listener: String,
        #[source]
        source: rustls::Error,
    },
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
    pub resolver: Arc<CertResolver>,
    pub cert_status: Arc<ArcSwap<CertStatus>>,
    /// The client verifier, on mTLS listeners.
    pub client_verifier: Option<Arc<ClientVerifier>>,
}

impl ListenerHandle {
    /// A snapshot of this listener's certificate status.
    pub fn cert_status(&self) -> Arc<CertStatus> {
        self.cert_status.load_full()
    }
}

/// A started sheath.
#[derive(Debug)]
pub struct Running {
    listeners: Vec<ListenerHandle>,
    stop_accepting: CancellationToken,
    stop_background: CancellationToken,
    drain: Drain,
    drain_timeout: Duration,
    accept_loops: Vec<JoinHandle<()>>,
    local_ca: Option<Arc<LocalCa>>,
}

impl Running {
    pub fn listeners(&self) -> &[ListenerHandle] {
        &self.listeners
    }

    /// The bound address of a listener (useful with port 0).
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listener(name).map(|l| l.local_addr)
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerHandle> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// Connections open right now, across listeners.
    pub fn active_connections(&self) -> u64 {
        self.listeners
            .iter()
            .map(|l| l.stats.active.load(Ordering::Relaxed))
            .sum()
    }

    /// The local CA, when any listener uses it.
    pub fn local_ca(&self) -> Option<&LocalCa> {
        self.local_ca.as_deref()
    }

    /// Stop accepting (new connections are refused), then drain in-flight
    /// connections for at most the drain timeout.
    pub async fn shutdown(self) -> ShutdownOutcome {
        self.stop_accepting.cancel();
        // The accept loops drop their sockets when they return; waiting for
        // them makes "refused from now on" true before draining starts.
        for handle in self.accept_loops {
            let _ = handle.await;
        }
        self.stop_background.cancel();
        tracing::info!(timeout = ?self.drain_timeout, "draining connections");
        match self.drain.run(self.drain_timeout).await {
            DrainOutcome::Drained => ShutdownOutcome::Drained,
            DrainOutcome::TimedOut { remaining } => {
                tracing::warn!(remaining, "drain timeout expired; connections were cut");
                ShutdownOutcome::DrainTimedOut { remaining }
            }
        }
    }
}

/// Build TLS state, bind every listener and start serving.
///
/// Everything that can fail (certificates, binds) is done before the first
/// connection is accepted, so a bad start fails as a whole.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let needs_local_ca = config
        .listeners
        .iter()
        .any(|l| matches!(l.cert, CertSource::LocalCa { .. }));
    let local_ca = if needs_local_ca {
        let dir = config.state_dir.clone();
        let ca = tokio::task::spawn_blocking(move || LocalCa::load_or_create(&dir))
            .await
            .expect("local CA task panicked")
            .map_err(StartError::LocalCa)?;
        tracing::info!(
            cert = %ca.cert_path().display(),
            sha256 = %ca.info().sha256,
            "local CA ready"
        );
        Some(Arc::new(ca))
    } else {
        None
    };

    let challenges = Challenges::new();
    let mut prepared = Vec::with_capacity(config.listeners.len());
    let mut http01_binds = Vec::new();
    for listener in &config.listeners {
        let resolver = Arc::new(CertResolver::empty());
        let (source, acme_tls) = match &listener.cert {
            CertSource::LocalCa { names, lifetime } => (
                Source::LocalCa {
                    ca: Arc::clone(local_ca.as_ref().expect("local CA loaded when needed")),
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
            CertSource::Acme(acme) => {
                if let Some(bind) = acme.http01_bind {
                    if !http01_binds.contains(&bind) {
                        http01_binds.push(bind);
                    }
                }
                let acme_tls = (acme.challenge == AcmeChallenge::TlsAlpn01)
                    .then(|| challenges.server_config());
                (
                    Source::Acme(Arc::new(AcmeIssuer::new(
                        &listener.name,
                        acme,
                        &config.state_dir,
                        Arc::clone(&challenges),
                    ))),
                    acme_tls,
                )
            }
        };
        let manager = CertManager::new(
            listener.name.clone(),
            source,
            listener.cert_policy.clone(),
            Arc::clone(&resolver),
        );
        // Whatever can be had without the network is served from the
        // first connection; an ACME listener without a cached certificate
        // starts empty and is not ready until its first issuance.
        match manager.initial() {
            Ok(Some(material)) => manager.install(material, "startup"),
            Ok(None) => tracing::info!(
                listener = %listener.name,
                "no certificate yet; handshakes fail until the first issuance"
            ),
            Err(source) => {
                return Err(StartError::Cert {
                    listener: listener.name.clone(),
                    source,
                })
            }
        }
        let client_verifier = match listener.client_auth.mode {
            ClientAuthMode::None => None,
            _ => Some(
                ClientVerifier::new(&listener.client_auth).map_err(|source| {
                    StartError::ClientTrust {
                        listener: listener.name.clone(),
                        source,
                    }
                })?,
            ),
        };
        let state = build_state(listener, resolver, acme_tls, client_verifier.clone())?;
        let socket = proxy::bind(listener.bind).map_err(|source| StartError::Bind {
            listener: listener.name.clone(),
            addr: listener.bind,
            source,
        })?;
        prepared.push((socket, state, manager, client_verifier));
    }
    let mut http01_sockets = Vec::new();
    for bind in http01_binds {
        let socket = proxy::bind(bind).map_err(|source| StartError::Bind {
            listener: "http-01".into(),
            addr: bind,
            source,
        })?;
        http01_sockets.push(socket);
    }

    let stop_accepting = CancellationToken::new();
    let stop_background = CancellationToken::new();
    let drain = Drain::new();
    let mut listeners = Vec::new();
    let mut accept_loops = Vec::new();
    for socket in http01_sockets {
        tracing::info!(addr = ?socket.local_addr().ok(), "HTTP-01 challenge listener");
        tokio::spawn(cert::http01::serve(
            socket,
            Arc::clone(&challenges),
            stop_background.clone(),
        ));
    }
    for (socket, state, manager, client_verifier) in prepared {
        let stats = Arc::new(ListenerStats::default());
        let resolver = Arc::clone(&state.resolver);
        let config = Arc::clone(&state.config);
        let listener = Listener::new(socket, state, Arc::clone(&stats)).map_err(|source| {
            StartError::Bind {
                listener: config.name.clone(),
                addr: config.bind,
                source,
            }
        })?;
        tracing::info!(
            listener = %listener.name,
            addr = %listener.local_addr,
            upstream = %config.upstream,
            mode = %config.mode,
            "listening"
        );
        listeners.push(ListenerHandle {
            name: listener.name.clone(),
            local_addr: listener.local_addr,
            stats,
            resolver: Arc::clone(&resolver),
            cert_status: manager.status(),
            client_verifier: client_verifier.clone(),
        });
        tokio::spawn(manager.run(stop_background.clone()));
        if let Some(verifier) = client_verifier {
            tokio::spawn(tls::client_auth::reload_trust(
                config.name.clone(),
                config.client_auth.clone(),
                verifier,
                stop_background.clone(),
            ));
        }
        accept_loops.push(tokio::spawn(
            listener.run(stop_accepting.clone(), drain.clone()),
        ));
    }

    Ok(Running {
        listeners,
        stop_accepting,
        stop_background,
        drain,
        drain_timeout: config.drain_timeout,
        accept_loops,
        local_ca,
    })
}

/// Run until SIGTERM or SIGINT, then drain. A second signal during the
/// drain returns at once with `None`: the operator asked twice.
pub async fn run_until_signal(running: Running) -> Option<ShutdownOutcome> {
    let mut signals = match crate::shutdown::Signals::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for signals; shutting down");
            return Some(running.shutdown().await);
        }
    };
    let sig = signals.recv().await;
    tracing::info!(signal = sig, "shutting down");
    tokio::select! {
        outcome = running.shutdown() => Some(outcome),
        sig = signals.recv() => {
            tracing::warn!(signal = sig, "second signal: exiting without finishing the drain");
            None
        }
    }
}

fn build_state(
    listener: &ListenerConfig,
    resolver: Arc<CertResolver>,
    acme_tls: Option<Arc<rustls::ServerConfig>>,
    client_verifier: Option<Arc<ClientVerifier>>,
) -> Result<Arc<ListenerState>, StartError> {
    let alpn: &[&[u8]] = match listener.mode {
        Mode::Http => &[ALPN_H2, ALPN_HTTP11],
        Mode::Tcp => &[],
    };
    let verifier =
        client_verifier.map(|v| v as Arc<dyn rustls::server::danger::ClientCertVerifier>);
    let tls =
        tls::server_config(resolver.clone(), alpn, verifier).map_err(|source| StartError::Tls {
            listener: listener.name.clone(),
            source,
        })?;
    let http = (listener.mode == Mode::Http).then(|| UpstreamClient::new(listener));
    Ok(Arc::new(ListenerState {
        config: Arc::new(listener.clone()),
        tls,
        acme_tls,
        resolver,
        http,
    }))
}
