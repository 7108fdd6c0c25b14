//! The certificate a listener serves, behind an `ArcSwap`.
//!
//! rustls asks the resolver for a certificate on every handshake; loading
//! from an `ArcSwap` is a couple of atomic operations and never blocks, so a
//! swap can happen at any moment without a lock on the hot path. A handshake
//! that already picked a certificate keeps it; the next one sees the new one.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::cert::CertInfo;

/// The current certificate and what it says about itself.
#[derive(Debug)]
pub struct Served {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// Serves one certificate per listener, swappable at any time.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<Served>,
}

impl CertResolver {
    pub fn new(key: Arc<CertifiedKey>, info: CertInfo) -> Self {
        CertResolver {
            current: ArcSwap::from_pointee(Served { key, info }),
        }
    }

    /// Publish a new, already validated certificate. New handshakes use it
    /// from now on; established connections are not touched.
    pub fn swap(&self, key: Arc<CertifiedKey>, info: CertInfo) -> Arc<Served> {
        self.current.swap(Arc::new(Served { key, info }))
    }

    /// The certificate being served now.
    pub fn current(&self) -> Arc<Served> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.load().key))
    }
}
