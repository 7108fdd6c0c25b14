//! The certificates a listener serves, each behind an `ArcSwap`, and the
//! choice among them by SNI.
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
use rustls::SignatureScheme;
use tokio::sync::Notify;

use crate::cert::CertInfo;

/// The current certificate and what it says about itself.
#[derive(Debug)]
pub struct Served {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// One certificate, swappable at any time.
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

impl CertResolver {
    /// The key to serve now. Asking for an expired or missing certificate
    /// wakes the manager.
    pub(crate) fn pick(&self) -> Option<Arc<CertifiedKey>> {
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

    /// Can a client that verifies `schemes` use the served certificate's
    /// key? A certificate not there yet suits nobody.
    fn suits(&self, schemes: &[SignatureScheme]) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|served| served.key.key.choose_scheme(schemes).is_some())
    }

    /// Does one of the served certificate's names satisfy `matches`?
    fn names_any(&self, matches: impl Fn(&str) -> bool) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|served| served.info.names.iter().any(|n| matches(n)))
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick()
    }
}

/// Every certificate of one listener: the default first, then those chosen
/// by the name the client asks for (SNI).
///
/// A certificate is chosen by the DNS names it carries now, not by names
/// in the configuration, so a files certificate needs no list of its own
/// and a renewal that changes the names changes the choice with it. An
/// exact name wins over a wildcard (`*.example.com` covers one label, as
/// RFC 6125 has it); among equals the SNI certificates come in their order
/// and the default last. A client that sends no SNI (one that connects by
/// IP address) or a name no certificate carries gets the default.
///
/// Among the certificates that carry the name, the first one whose key
/// the client can verify a signature of wins, so an RSA and an ECDSA
/// certificate for one name serve both old and new clients (as nginx,
/// Envoy and Go do): taking the first by order alone, a client without
/// ECDSA was refused (`NoSignatureSchemesInCommon`) although a
/// certificate it could use was there. When none suits the client, the
/// first by order is taken, and the handshake fails as it would anyway.
#[derive(Debug)]
pub struct ListenerCerts {
    /// Never empty: the default is always there.
    certs: Vec<Arc<CertResolver>>,
}

impl ListenerCerts {
    /// `certs[0]` is the default.
    pub fn new(certs: Vec<Arc<CertResolver>>) -> Self {
        assert!(!certs.is_empty(), "a listener has a default certificate");
        ListenerCerts { certs }
    }

    /// The default certificate, then the SNI ones in configuration order.
    pub fn all(&self) -> &[Arc<CertResolver>] {
        &self.certs
    }

    /// The certificate for a client that asked for `sni` and can verify
    /// signatures of `schemes` (those of the ClientHello, which rustls has
    /// already narrowed to the cipher suites the client offered).
    pub fn select(&self, sni: Option<&str>, schemes: &[SignatureScheme]) -> &Arc<CertResolver> {
        let (default, by_name) = self.certs.split_first().expect("never empty");
        let Some(sni) = sni else {
            return default;
        };
        if by_name.is_empty() {
            return default;
        }
        let candidates = || by_name.iter().chain(std::iter::once(default));
        let exact = |n: &str| n.eq_ignore_ascii_case(sni);
        // `*.example.com` covers exactly one non-empty label.
        let parent = sni
            .split_once('.')
            .filter(|(label, _)| !label.is_empty())
            .map(|(_, parent)| parent);
        let covers = |n: &str| {
            parent.is_some_and(|parent| {
                n.strip_prefix("*.")
                    .is_some_and(|p| p.eq_ignore_ascii_case(parent))
            })
        };
        let matching = || {
            candidates()
                .filter(|c| c.names_any(exact))
                .chain(candidates().filter(|c| c.names_any(covers)))
        };
        matching()
            .find(|c| c.suits(schemes))
            .or_else(|| matching().next())
            .unwrap_or(default)
    }
}

impl ResolvesServerCert for ListenerCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.select(hello.server_name(), hello.signature_schemes())
            .pick()
    }
}
