//! The certificate a listener serves, behind an `ArcSwap`.
//!
//! rustls asks the resolver for a certificate on every handshake; loading
//! from an `ArcSwap` is a couple of atomic operations and never blocks, so a
//! swap can happen at any moment without a lock on the hot path. A handshake
//! that already picked a certificate keeps it; the next one sees the new one.
//!
//! The resolver also notices, at handshake time, a certificate that has
//! expired or is missing and wakes the certificate manager: a machine that
//! slept past the renewal time renews on the first handshake after waking,
//! not when a timer next fires.

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;

use crate::cert::CertInfo;

/// The current certificate and what it says about itself.
#[derive(Debug)]
pub struct Served {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// Serves one certificate per listener, swappable at any time.
#[derive(Debug, Default)]
pub struct CertResolver {
    current: ArcSwapOption<Served>,
    stale: Notify,
}

impl CertResolver {
    pub fn new(key: Arc<CertifiedKey>, info: CertInfo) -> Self {
        let resolver = CertResolver::empty();
        resolver.swap(key, info);
        resolver
    }

    /// A resolver with nothing to serve yet (waiting for a first issuance):
    /// handshakes fail until a certificate is published.
    pub fn empty() -> Self {
        CertResolver::default()
    }

    /// Publish a new, already validated certificate. New handshakes use it
    /// from now on; established connections are not touched.
    pub fn swap(&self, key: Arc<CertifiedKey>, info: CertInfo) -> Option<Arc<Served>> {
        self.current.swap(Some(Arc::new(Served { key, info })))
    }

    /// The certificate being served now, if any.
    pub fn current(&self) -> Option<Arc<Served>> {
        self.current.load_full()
    }

    /// Resolves when a handshake found the certificate expired or missing.
    pub async fn stale(&self) {
        self.stale.notified().await
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.load();
        match current.as_ref() {
            Some(served) => {
                if SystemTime::now() > served.info.not_after {
                    self.stale.notify_one();
                }
                Some(Arc::clone(&served.key))
            }
            None => {
                self.stale.notify_one();
                None
            }
        }
    }
}
