//! One task per certificate keeps it current.
//!
//! The task obtains material from the listener's source, validates it
//! (chain parses, key matches, names covered, within validity) and only then
//! publishes it to the resolver. A failure never touches what is being
//! served: the old certificate keeps serving and the attempt is retried with
//! capped exponential backoff, honouring the CA's `Retry-After`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use super::acme::AcmeIssuer;
use super::renew::{self, Backoff, CertStatus};
use super::{chain, export, files, CertError, CertInfo, LocalCa};
use crate::config::{CertPolicy, CertRef};
use crate::tls::CertResolver;

/// Validated certificate material, in every form the manager needs.
#[derive(Debug, Clone)]
pub struct Material {
    pub certified: Arc<CertifiedKey>,
    pub info: CertInfo,
    pub chain_pem: String,
    pub key_pem: String,
}

/// Where a listener's certificates come from.
#[derive(Debug)]
pub enum Source {
    LocalCa {
        ca: Arc<LocalCa>,
        names: Vec<String>,
        lifetime: Duration,
    },
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    Acme(Arc<AcmeIssuer>),
}

impl Source {
    fn kind(&self) -> &'static str {
        match self {
            Source::LocalCa { .. } => "local_ca",
            Source::Files { .. } => "files",
            Source::Acme(_) => "acme",
        }
    }
}

/// Why an attempt to get a new certificate failed, and when the issuer
/// asked to be contacted again.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ObtainError {
    pub message: String,
    pub retry_after: Option<SystemTime>,
}

impl From<CertError> for ObtainError {
    fn from(e: CertError) -> Self {
        ObtainError {
            message: e.to_string(),
            retry_after: None,
        }
    }
}

/// Keeps one of a listener's certificates fresh.
#[derive(Debug)]
pub struct CertManager {
    pub listener: String,
    /// Which of the listener's certificates.
    pub cert: CertRef,
    source: Source,
    policy: CertPolicy,
    resolver: Arc<CertResolver>,
    status: Arc<ArcSwap<CertStatus>>,
    /// Files source: watching starts here, before the first load, so no
    /// change between loading and the task's start can be missed.
    watcher: Option<files::Watcher>,
    /// The first certificate, installed while a reload was being prepared:
    /// exported once the task runs, that is once the reload applied. A
    /// reload that fails must not leave its certificate in the export
    /// directory nor run the hook for something never served.
    pending_export: Option<(Material, export::Turn)>,
    /// Presented to peers as a client (outbound mode): files must allow
    /// client authentication.
    client_identity: bool,
}

impl CertManager {
    pub fn new(
        listener: String,
        cert: CertRef,
        source: Source,
        policy: CertPolicy,
        resolver: Arc<CertResolver>,
    ) -> Self {
        let status = Arc::new(ArcSwap::from_pointee(CertStatus {
            listener: listener.clone(),
            cert,
            source: source.kind(),
            ..CertStatus::default()
        }));
        let watcher = match &source {
            Source::Files { cert, key } => Some(files::Watcher::new(&[cert, key])),
            _ => None,
        };
        CertManager {
            listener,
            cert,
            source,
            policy,
            resolver,
            status,
            watcher,
            pending_export: None,
            client_identity: false,
        }
    }

    /// This certificate is an outbound listener's identity. A pair of
    /// files whose certificate does not allow client authentication is
    /// refused like a broken one: installed, it would end every new
    /// connection at the peer. Issued certificates are not checked: the
    /// local CA's allow it, and refusing an ACME CA's would order again
    /// on every retry, to be refused again.
    pub fn presented_as_client(&mut self) {
        self.client_identity = true;
    }

    fn usable_files(
        &self,
        material: Material,
        cert: &std::path::Path,
    ) -> Result<Material, CertError> {
        if !self.client_identity {
            return Ok(material);
        }
        let what = cert.display().to_string();
        match CertInfo::allows_client_auth(&material.certified.cert[0]) {
            Ok(true) => Ok(material),
            Ok(false) => Err(CertError::NotForClients { what }),
            Err(reason) => Err(CertError::Parse { what, reason }),
        }
    }

    /// A shared handle on this listener's certificate status.
    pub fn status(&self) -> Arc<ArcSwap<CertStatus>> {
        Arc::clone(&self.status)
    }

    /// The first certificate, from what is available without the network:
    /// a local-CA issuance, the files, or a still-valid cached ACME
    /// certificate. `Ok(None)` means "serve nothing until issued".
    pub fn initial(&self) -> Result<Option<Material>, CertError> {
        match &self.source {
            Source::LocalCa {
                ca,
                names,
                lifetime,
            } => {
                let leaf = ca.issue(names, *lifetime)?;
                Ok(Some(Material {
                    certified: leaf.certified,
                    info: leaf.info,
                    chain_pem: leaf.chain_pem,
                    key_pem: leaf.key_pem,
                }))
            }
            Source::Files { cert, key } => files::load_material(cert, key)
                .and_then(|m| self.usable_files(m, cert))
                .map(Some),
            Source::Acme(acme) => Ok(acme.cached()),
        }
    }

    /// Publish the first certificate, before the task runs; its export
    /// waits for [`CertManager::run`].
    pub fn install_first(&mut self, material: Material) {
        // A cached ACME certificate was issued by an earlier run, and may be
        // due already; a local-CA leaf was issued just now.
        let issued_now = matches!(self.source, Source::LocalCa { .. });
        self.publish(&material, "startup", issued_now);
        // Its place in line is taken now: managers of reloads in quick
        // succession may start running in any order.
        self.pending_export = Some((material, export::Turn::take()));
    }

    /// Publish validated material, record it and export it.
    pub fn install(&self, material: Material, why: &str) {
        self.publish(&material, why, true);
        self.export(material, export::Turn::take());
    }

    /// `issued_now`: the certificate was issued for this install, not
    /// found cached.
    fn publish(&self, material: &Material, why: &str, issued_now: bool) {
        let old = self
            .resolver
            .swap(material.certified.clone(), material.info.clone());
        let info = &material.info;
        let ratio = self.policy.renew_ratio;
        let renew_at = match self.source {
            Source::Files { .. } => None,
            _ if issued_now => Some(renew::renew_issued_at(info, ratio, SystemTime::now())),
            _ => Some(renew::renew_at(info, ratio)),
        };
        tracing::info!(
            listener = %self.listener,
            cert = %self.cert,
            source = self.source.kind(),
            serial = %info.serial,
            old_serial = old.as_ref().map_or("-", |o| o.info.serial.as_str()),
            names = ?info.names,
            not_after = %humantime::format_rfc3339_seconds(info.not_after),
            renew_at = %renew_at.map_or("-".to_string(), |t| humantime::format_rfc3339_seconds(t).to_string()),
            why,
            "certificate installed"
        );
        let now = SystemTime::now();
        // Here, at install, and not where the files are read: an unchanged
        // chain is read again every poll_interval, and would repeat its
        // warnings each time.
        let chain_problems = chain::problems(&material.certified.cert, now);
        let file = match &self.source {
            Source::Files { cert, .. } => cert.display().to_string(),
            _ => "-".to_string(),
        };
        for problem in &chain_problems {
            tracing::warn!(
                listener = %self.listener,
                cert = %self.cert,
                source = self.source.kind(),
                file,
                serial = %info.serial,
                problem,
                "the certificate chain has a problem; it is served as it is"
            );
        }
        let previous = self.status.load();
        self.status.store(Arc::new(CertStatus {
            current: Some(info.clone()),
            chain_problems,
            renew_at,
            last_success: Some(now),
            consecutive_failures: 0,
            next_retry: None,
            installs: previous.installs + 1,
            ..(**previous).clone()
        }));
    }

    /// Export in the background; `turn`, taken when the certificate was
    /// installed, keeps an older certificate from overwriting a newer one.
    fn export(&self, material: Material, turn: export::Turn) {
        if let Some(export) = &self.policy.export {
            let export = export.clone();
            let (listener, cert) = (self.listener.clone(), self.cert);
            tokio::spawn(async move {
                export::export(&listener, cert, &export, &material, turn).await;
            });
        }
    }

    fn record_failure(&self, error: &str, next_retry: Option<SystemTime>) -> u32 {
        let previous = self.status.load();
        let failures = previous.consecutive_failures + 1;
        self.status.store(Arc::new(CertStatus {
            last_failure: Some(SystemTime::now()),
            last_error: Some(error.to_string()),
            consecutive_failures: failures,
            next_retry,
            ..(**previous).clone()
        }));
        failures
    }

    /// Keep the certificate fresh until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        if let Some((material, turn)) = self.pending_export.take() {
            self.export(material, turn);
        }
        match &self.source {
            Source::Files { cert, key } => {
                let (cert, key) = (cert.clone(), key.clone());
                let watcher = self
                    .watcher
                    .take()
                    .unwrap_or_else(|| files::Watcher::new(&[&cert, &key]));
                self.run_files(cert, key, watcher, stop).await
            }
            _ => self.run_issuer(stop).await,
        }
    }

    async fn run_issuer(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.policy.retry_min, self.policy.retry_max);
        let mut retry_at: Option<SystemTime> = None;
        loop {
            let status = self.status.load_full();
            let due = match (retry_at, status.current.is_some(), status.renew_at) {
                (Some(retry), _, _) => retry,
                (None, false, _) => SystemTime::now(),
                (None, true, Some(renew)) => renew,
                (None, true, None) => SystemTime::now() + Duration::from_secs(3600),
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sleep_until(due) => {}
                _ = self.resolver.stale() => {
                    // A handshake saw an expired or missing certificate.
                    // That overrides the renewal schedule, never a backoff.
                    // The wake is kept until this task next waits, so it
                    // may come from a handshake during the attempt that
                    // installed what is served now: no reason to renew.
                    let now = SystemTime::now();
                    let served = self.resolver.current();
                    if served.is_some_and(|c| now <= c.info.not_after)
                        || retry_at.is_some_and(|t| t > now)
                    {
                        continue;
                    }
                    tracing::info!(listener = %self.listener, cert = %self.cert, "certificate expired or missing at handshake time; renewing now");
                }
            }
            let attempt = match &self.source {
                Source::LocalCa {
                    ca,
                    names,
                    lifetime,
                } => ca
                    .issue(names, *lifetime)
                    .map(|leaf| Material {
                        certified: leaf.certified,
                        info: leaf.info,
                        chain_pem: leaf.chain_pem,
                        key_pem: leaf.key_pem,
                    })
                    .map_err(ObtainError::from),
                Source::Acme(acme) => tokio::select! {
                    _ = stop.cancelled() => return,
                    r = acme.obtain() => r,
                },
                Source::Files { .. } => unreachable!("files have their own loop"),
            };
            match attempt {
                Ok(material) => {
                    backoff.reset();
                    retry_at = None;
                    let why = if status.current.is_some() {
                        "renewal"
                    } else {
                        "first issuance"
                    };
                    self.install(material, why);
                }
                Err(e) => {
                    let now = SystemTime::now();
                    let mut delay = backoff.failed(e.retry_after);
                    // A wait that runs past the served certificate's end
                    // would serve it expired for the rest of the wait,
                    // though the CA may be back long before (up to
                    // retry_max, an hour by default): one more attempt as it
                    // expires instead. Unless the CA itself asked to wait.
                    let end = self.resolver.current().map(|c| c.info.not_after);
                    if let (None, Some(end)) = (e.retry_after, end) {
                        if let Ok(left) = end.duration_since(now) {
                            delay = delay.min(left);
                        }
                    }
                    let next = now + delay;
                    retry_at = Some(next);
                    let failures = self.record_failure(&e.message, Some(next));
                    let current = self.resolver.current();
                    tracing::error!(
                        listener = %self.listener,
                        cert = %self.cert,
                        source = self.source.kind(),
                        error = %e.message,
                        consecutive_failures = failures,
                        retry_in = ?delay,
                        serving_serial = current.as_ref().map_or("-", |c| c.info.serial.as_str()),
                        serving_not_after = %current.as_ref().map_or("-".into(), |c| humantime::format_rfc3339_seconds(c.info.not_after).to_string()),
                        "certificate renewal failed; the current certificate keeps serving"
                    );
                }
            }
        }
    }

    async fn run_files(
        self,
        cert: PathBuf,
        key: PathBuf,
        mut watcher: files::Watcher,
        stop: CancellationToken,
    ) {
        let mut last_error: Option<String> = None;
        loop {
            if !watcher.next_look(self.policy.poll_interval, &stop).await {
                return;
            }
            let current = self.resolver.current();
            let cert_path = cert.clone();
            let key_path = key.clone();
            let loaded =
                tokio::task::spawn_blocking(move || files::load_material(&cert_path, &key_path))
                    .await
                    .expect("file loading panicked")
                    .and_then(|m| self.usable_files(m, &cert));
            match loaded {
                Ok(material) => {
                    last_error = None;
                    // Same chain means same key: a pair whose key does not
                    // match its certificate never loads. The whole chain is
                    // compared, not the leaf: an intermediate added, fixed
                    // or reordered under the same leaf must be served too.
                    let unchanged = current
                        .as_ref()
                        .is_some_and(|c| c.key.cert == material.certified.cert);
                    if !unchanged {
                        self.install(material, "files changed");
                    } else if self.status.load().consecutive_failures > 0 {
                        // The files are back to what is served: nothing to
                        // install, but the failure is over.
                        self.status.rcu(|s| CertStatus {
                            consecutive_failures: 0,
                            next_retry: None,
                            ..(**s).clone()
                        });
                        tracing::info!(
                            listener = %self.listener,
                            cert = %self.cert,
                            serial = %material.info.serial,
                            "certificate files usable again; they hold the certificate being served"
                        );
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    self.record_failure(&message, None);
                    // The same broken state is seen on every poll; say it once.
                    if last_error.as_deref() != Some(message.as_str()) {
                        tracing::warn!(
                            listener = %self.listener,
                            cert = %self.cert,
                            error = %message,
                            serving_serial = current.as_ref().map_or("-", |c| c.info.serial.as_str()),
                            "certificate files not usable; the current certificate keeps serving"
                        );
                        last_error = Some(message);
                    }
                }
            }
        }
    }
}

/// Sleep until a wall-clock time. Sleeping in bounded steps re-reads the
/// clock, so a suspended machine does not oversleep a renewal.
async fn sleep_until(when: SystemTime) {
    loop {
        let Ok(left) = when.duration_since(SystemTime::now()) else {
            return;
        };
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(Duration::from_secs(30))).await;
    }
}
