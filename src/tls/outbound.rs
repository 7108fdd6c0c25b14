//! The client side of outbound mode: this sidecar's certificate presented
//! to a remote peer, and the peer verified against the configured CAs.
//!
//! The client certificate is read from the listener's resolver on every
//! handshake, so the certificate the manager renews is the one the next
//! connection presents: no restart, no reload.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};

use super::CertResolver;
use crate::config::OutboundConfig;

/// What an outbound listener connects with.
#[derive(Debug)]
pub struct Outbound {
    pub tls: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// Why an outbound listener's TLS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("cannot read CA file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Ca { path: PathBuf, reason: String },
    #[error("no system root certificates found; set `ca` in [listener.outbound]")]
    NoSystemRoots,
    #[error("`{0}` is neither a DNS name nor an IP address")]
    ServerName(String),
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

impl Outbound {
    /// Roots from `config.ca` (the system's when empty), the identity from
    /// `identity`, the same protocol versions and suites as the listeners.
    pub fn new(
        config: &OutboundConfig,
        identity: Arc<CertResolver>,
    ) -> Result<Self, OutboundError> {
        let roots = roots(&config.ca)?;
        let server_name = ServerName::try_from(config.server_name.clone())
            .map_err(|_| OutboundError::ServerName(config.server_name.clone()))?;
        let mut tls =
            ClientConfig::builder_with_provider(Arc::new(super::server_config::provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_root_certificates(roots)
                .with_client_cert_resolver(Arc::new(Identity(identity)));
        // A relay has nothing to send early; 0-RTT data could be replayed.
        tls.enable_early_data = false;
        // Every connection is a full handshake, as on sheath's own mTLS
        // listeners: a resumed session carries the identity of the
        // handshake that created it, so after a renewal (or a revocation
        // on the peer's side) the peer would go on seeing the old one.
        tls.resumption = rustls::client::Resumption::disabled();
        Ok(Outbound {
            tls: Arc::new(tls),
            server_name,
        })
    }
}

fn roots(ca: &[PathBuf]) -> Result<RootCertStore, OutboundError> {
    let mut roots = RootCertStore::empty();
    if ca.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(OutboundError::NoSystemRoots);
        }
        return Ok(roots);
    }
    for path in ca {
        let pem = std::fs::read(path).map_err(|source| OutboundError::Read {
            path: path.clone(),
            source,
        })?;
        let certs =
            crate::cert::parse_chain_pem(&path.display().to_string(), &pem).map_err(|e| {
                OutboundError::Ca {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
        if certs.is_empty() {
            return Err(OutboundError::Ca {
                path: path.clone(),
                reason: "no PEM certificate found".into(),
            });
        }
        for cert in certs {
            roots.add(cert).map_err(|e| OutboundError::Ca {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    Ok(roots)
}
