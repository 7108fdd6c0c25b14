//! The client side of outbound mode: this sidecar's certificate presented
//! to a remote peer, and the peer verified against the configured CAs.
//!
//! The client certificate is read from the listener's resolver on every
//! handshake, so the certificate the manager renews is the one the next
//! connection presents: no restart, no reload.
//!
//! Peer trust from `ca` files is kept current the same way as client
//! trust: the verifier rustls holds delegates to an `ArcSwap`ped webpki
//! verifier, replaced when the files change, so a CA root rotation done by
//! rewriting the bundle reaches the next connection.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_util::sync::CancellationToken;

use super::client_auth::TrustError;
use super::CertResolver;
use crate::config::OutboundConfig;
use crate::config::TlsVersion;

/// Why an outbound listener's TLS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("{0}")]
    Ca(#[from] TrustError),
    #[error("no system root certificates found; set `ca` in [listener.outbound]")]
    NoSystemRoots,
    #[error("{0}")]
    Tls(#[from] rustls::Error),
}

/// Presents the listener's current certificate.
#[derive(Debug)]
struct Identity(Arc<CertResolver>);

impl ResolvesClientCert for Identity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // rustls checks the key against the schemes the server accepts and
        // sends no certificate if none fits; the server then decides.
        self.0.pick()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The peer verifier of an outbound listener with `ca` files: the roots
/// they held when last read well.
#[derive(Debug)]
pub struct PeerVerifier {
    inner: ArcSwap<WebPkiServerVerifier>,
    /// Successful re-reads of the `ca` files since this verifier was made.
    pub reloads: AtomicU64,
    /// Re-reads refused because the files did not load.
    pub failed_reloads: AtomicU64,
}

impl PeerVerifier {
    /// Read `config.ca`, which must not be empty.
    pub fn new(config: &OutboundConfig) -> Result<Arc<PeerVerifier>, OutboundError> {
        Ok(Arc::new(PeerVerifier {
            inner: ArcSwap::new(webpki_verifier(&config.ca)?),
            reloads: AtomicU64::default(),
            failed_reloads: AtomicU64::default(),
        }))
    }

    /// The next handshake verifies against `verifier`; those under way
    /// and done keep the one they started with.
    fn replace(&self, verifier: Arc<WebPkiServerVerifier>) {
        self.inner.store(verifier);
    }
}

/// What `with_root_certificates` builds: the provider's signature
/// algorithms and no revocation checking (no CRLs, and an unknown status
/// allowed, as it does), over the roots in `ca`.
fn webpki_verifier(ca: &[PathBuf]) -> Result<Arc<WebPkiServerVerifier>, TrustError> {
    let roots = super::client_auth::load_roots(ca)?;
    WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(super::server_config::provider()),
    )
    .allow_unknown_revocation_status()
    .build()
    .map_err(|e| TrustError::Verifier(e.to_string()))
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.load().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.load().supported_verify_schemes()
    }
}

/// Keep an outbound listener's peer trust current: re-read the `ca` files
/// on change (and every `poll_interval`), swap in roots that load, keep
/// the last good ones otherwise.
pub async fn reload_peer_trust(
    listener: String,
    config: OutboundConfig,
    verifier: Arc<PeerVerifier>,
    stop: CancellationToken,
) {
    let watched = super::client_auth::WatchedTrust {
        listener: &listener,
        paths: &config.ca,
        poll_interval: config.poll_interval,
        reloads: &verifier.reloads,
        failed_reloads: &verifier.failed_reloads,
        reloaded: "peer trust reloaded (outbound CA bundle)",
        kept: "peer trust not reloaded; the last good outbound CA bundle stays in force",
    };
    watched
        .run(
            &stop,
            || webpki_verifier(&config.ca),
            |inner| verifier.replace(inner),
        )
        .await;
}

/// What an outbound listener connects with: the identity from `identity`,
/// the same protocol versions and suites as the listeners, and the peer
/// verified by `peer` (the watched `ca` files), or else by roots read now
/// from `config.ca` (the system's when empty).
pub fn client_config(
    config: &OutboundConfig,
    alpn: &[String],
    min_version: TlsVersion,
    identity: Arc<CertResolver>,
    peer: Option<Arc<PeerVerifier>>,
) -> Result<Arc<ClientConfig>, OutboundError> {
    let builder = ClientConfig::builder_with_provider(Arc::new(super::server_config::provider()))
        .with_protocol_versions(min_version.and_newer())?;
    let builder = match peer {
        Some(peer) => builder.dangerous().with_custom_certificate_verifier(peer),
        None => builder.with_root_certificates(roots(&config.ca)?),
    };
    let mut tls = builder.with_client_cert_resolver(Arc::new(Identity(identity)));
    // A relay has nothing to send early; 0-RTT data could be replayed.
    tls.enable_early_data = false;
    // Every connection is a full handshake, as on sheath's own mTLS
    // listeners: a resumed session carries the identity of the
    // handshake that created it, so after a renewal (or a revocation
    // on the peer's side) the peer would go on seeing the old one.
    tls.resumption = rustls::client::Resumption::disabled();
    // What the local client speaks, for a peer that picks its handling by
    // ALPN (sheath's HTTP mode takes a connection without one for HTTP/1.1).
    tls.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok(Arc::new(tls))
}

fn roots(ca: &[PathBuf]) -> Result<RootCertStore, OutboundError> {
    if !ca.is_empty() {
        return Ok(super::client_auth::load_roots(ca)?);
    }
    let mut roots = RootCertStore::empty();
    if super::add_system_roots(&mut roots) == 0 {
        return Err(OutboundError::NoSystemRoots);
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ClientHello to the peer leads with the X25519MLKEM768 hybrid
    /// (and carries an X25519 share too, for peers without it): traffic
    /// recorded between sidecars today stays private against a future
    /// quantum computer.
    #[test]
    fn the_peer_is_offered_post_quantum_key_exchange_first() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["peer.test".into()]).unwrap();
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.cert.pem()).unwrap();
        let config = OutboundConfig {
            ca: vec![ca_path],
            server_name: rustls::pki_types::ServerName::try_from("peer.test").unwrap(),
            poll_interval: crate::config::DEFAULT_TRUST_POLL_INTERVAL,
        };
        let tls = client_config(
            &config,
            &[],
            TlsVersion::default(),
            Arc::new(CertResolver::empty()),
            None,
        )
        .unwrap();
        let groups: Vec<_> = tls
            .crypto_provider()
            .kx_groups
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(groups.first(), Some(&rustls::NamedGroup::X25519MLKEM768));
        assert!(groups.contains(&rustls::NamedGroup::X25519));
    }
}
