//! The client side of outbound mode: this sidecar's certificate presented
//! to a remote peer, and the peer verified against the configured CAs.
//!
//! The client certificate is read from the listener's resolver on every
//! handshake, so the certificate the manager renews is the one the next
//! connection presents: no restart, no reload.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};

use super::CertResolver;
use crate::config::OutboundConfig;
use crate::config::TlsVersion;

/// Why an outbound listener's TLS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("{0}")]
    Ca(#[from] super::client_auth::TrustError),
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

/// What an outbound listener connects with: roots from `config.ca` (the
/// system's when empty), the identity from `identity`, the same protocol
/// versions and suites as the listeners.
pub fn client_config(
    config: &OutboundConfig,
    alpn: &[String],
    min_version: TlsVersion,
    identity: Arc<CertResolver>,
) -> Result<Arc<ClientConfig>, OutboundError> {
    let roots = roots(&config.ca)?;
    let mut tls = ClientConfig::builder_with_provider(Arc::new(super::server_config::provider()))
        .with_protocol_versions(min_version.and_newer())?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(Identity(identity)));
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
        };
        let tls = client_config(
            &config,
            &[],
            TlsVersion::default(),
            Arc::new(CertResolver::empty()),
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
