//! Client certificates: verification against reloadable trust (CA bundles
//! and CRLs), allow-list authorization, and the verified identity.
//!
//! Authorization happens inside the handshake: a client that fails the
//! allow-list gets a TLS alert, and the upstream never sees a byte from it.
//!
//! Trust is swappable like server certificates: the verifier rustls holds
//! delegates to an `ArcSwap`ped inner verifier, so a new CA bundle or CRL
//! applies to the next handshake without rebuilding the listener. A bundle
//! that fails to load leaves the last good trust in place.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use tokio_util::sync::CancellationToken;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::cert::inspect::sha256_hex;
use crate::cert::parse_chain_pem;
use crate::config::{AllowList, ClientAuthConfig, ClientAuthMode};

/// Why client trust could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: no CA certificate found")]
    NoCa { path: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("building client verifier: {0}")]
    Verifier(String),
}

/// Load CA bundles and CRLs into a webpki verifier.
pub fn load_verifier(config: &ClientAuthConfig) -> Result<Arc<dyn ClientCertVerifier>, TrustError> {
    let mut roots = RootCertStore::empty();
    for path in &config.ca {
        let shown = path.display().to_string();
        let pem = read(path)?;
        let certs = parse_chain_pem(&shown, &pem).map_err(|e| TrustError::Invalid {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        if certs.is_empty() {
            return Err(TrustError::NoCa { path: shown });
        }
        for cert in certs {
            roots.add(cert).map_err(|e| TrustError::Invalid {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    let mut crls = Vec::new();
    for path in &config.crl {
        let shown = path.display().to_string();
        let data = read(path)?;
        let parsed = parse_crls(&data).map_err(|reason| TrustError::Invalid {
            path: shown.clone(),
            reason,
        })?;
        crls.extend(parsed);
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .with_crls(crls)
        // A CRL revokes what it lists; a chain whose issuer published no
        // CRL here is not refused for that alone.
        .allow_unknown_revocation_status();
    if config.mode == ClientAuthMode::Optional {
        builder = builder.allow_unauthenticated();
    }
    builder
        .build()
        .map_err(|e| TrustError::Verifier(e.to_string()))
}

fn read(path: &Path) -> Result<Vec<u8>, TrustError> {
    std::fs::read(path).map_err(|e| TrustError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// CRLs in PEM (any number) or a single DER CRL. Each is parsed so a broken
/// file is refused at load time, not at the first handshake.
fn parse_crls(data: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let crls: Vec<CertificateRevocationListDer<'static>> =
        if data.starts_with(b"-----") || data.iter().take(64).all(|b| b.is_ascii()) {
            CertificateRevocationListDer::pem_slice_iter(data)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("malformed PEM CRL: {e}"))?
        } else {
            vec![CertificateRevocationListDer::from(data.to_vec())]
        };
    if crls.is_empty() {
        return Err("no CRL found".into());
    }
    for crl in &crls {
        x509_parser::revocation_list::CertificateRevocationList::from_der(crl.as_ref())
            .map_err(|e| format!("cannot parse CRL: {e}"))?;
    }
    Ok(crls)
}

/// The verifier a listener's rustls config holds: current trust plus the
/// allow-list.
#[derive(Debug)]
pub struct ClientVerifier {
    inner: ArcSwap<Arc<dyn ClientCertVerifier>>,
    allow: AllowList,
    mandatory: bool,
    /// Successful trust reloads since start.
    pub reloads: std::sync::atomic::AtomicU64,
    /// Reload attempts refused because the new trust did not load.
    pub failed_reloads: std::sync::atomic::AtomicU64,
}

impl ClientVerifier {
    pub fn new(config: &ClientAuthConfig) -> Result<Arc<Self>, TrustError> {
        Ok(Arc::new(ClientVerifier {
            inner: ArcSwap::from_pointee(load_verifier(config)?),
            allow: config.allow.clone(),
            mandatory: config.mode == ClientAuthMode::Require,
            reloads: Default::default(),
            failed_reloads: Default::default(),
        }))
    }

    /// Swap in new trust; the next handshake uses it.
    pub fn replace(&self, verifier: Arc<dyn ClientCertVerifier>) {
        self.inner.store(Arc::new(verifier));
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints must outlive the swappable trust; clients that pick a
        // certificate by CA name fall back to their configured one.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .load()
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allow.is_empty() {
            return Ok(verified);
        }
        let identity = ClientIdentity::from_chain(end_entity, intermediates)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if allowed(&self.allow, &identity) {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
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

/// Does a verified client match any entry of any allow-list?
pub fn allowed(allow: &AllowList, id: &ClientIdentity) -> bool {
    allow.dns.iter().any(|d| id.dns.contains(d))
        || allow
            .uri
            .iter()
            .any(|p| id.uris.iter().any(|u| uri_matches(p, u)))
        || allow.ip.iter().any(|ip| id.ips.contains(ip))
        || allow
            .cn
            .iter()
            .any(|cn| id.cn.as_deref() == Some(cn.as_str()))
        || allow.ou.iter().any(|ou| id.ou.contains(ou))
        || allow.cert_sha256.contains(&id.sha256)
        || allow.spki_sha256.contains(&id.spki_sha256)
}

/// URI pattern match: segments split on `/` must be equal, except that a
/// pattern segment `*` matches exactly one non-empty segment. A wildcard
/// never spans segments and never stands in for the scheme or trust domain.
pub fn uri_matches(pattern: &str, uri: &str) -> bool {
    let (Some((p_head, p_path)), Some((u_head, u_path))) =
        (split_authority(pattern), split_authority(uri))
    else {
        return pattern == uri;
    };
    if p_head != u_head {
        return false;
    }
    let p: Vec<&str> = p_path.split('/').collect();
    let u: Vec<&str> = u_path.split('/').collect();
    p.len() == u.len()
        && p.iter()
            .zip(&u)
            .all(|(p, u)| (*p == "*" && !u.is_empty()) || p == u)
}

/// `scheme://authority` and the path after it.
fn split_authority(uri: &str) -> Option<(&str, &str)> {
    let after = uri.find("://")? + 3;
    match uri[after..].find('/') {
        Some(i) => Some((&uri[..after + i], &uri[after + i..])),
        None => Some((uri, "")),
    }
}

/// What sheath knows about a verified client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The leaf, DER.
    pub cert: Vec<u8>,
    /// Intermediates the client sent, DER.
    pub chain: Vec<Vec<u8>>,
    pub sha256: String,
    pub spki_sha256: String,
    /// RFC 4514 string of the subject.
    pub subject: String,
    pub cn: Option<String>,
    pub ou: Vec<String>,
    pub dns: Vec<String>,
    pub uris: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl ClientIdentity {
    pub fn from_chain(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<ClientIdentity, String> {
        let (_, cert) =
            X509Certificate::from_der(end_entity.as_ref()).map_err(|e| e.to_string())?;
        let mut dns = Vec::new();
        let mut uris = Vec::new();
        let mut ips = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns.push(d.to_string()),
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => ips.push(IpAddr::from(
                            <[u8; 4]>::try_from(*b).expect("length checked"),
                        )),
                        16 => ips.push(IpAddr::from(
                            <[u8; 16]>::try_from(*b).expect("length checked"),
                        )),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        let subject = cert.subject();
        let cn = subject
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_owned);
        let ou = subject
            .iter_organizational_unit()
            .filter_map(|a| a.as_str().ok())
            .map(str::to_owned)
            .collect();
        Ok(ClientIdentity {
            cert: end_entity.to_vec(),
            chain: intermediates.iter().map(|c| c.to_vec()).collect(),
            sha256: sha256_hex(end_entity.as_ref()),
            spki_sha256: sha256_hex(cert.public_key().raw),
            subject: subject.to_string(),
            cn,
            ou,
            dns,
            uris,
            ips,
        })
    }

    /// The SPIFFE ID (first `spiffe://` URI SAN), else the CN.
    pub fn principal(&self) -> Option<&str> {
        self.uris
            .iter()
            .find(|u| u.starts_with("spiffe://"))
            .map(String::as_str)
            .or(self.cn.as_deref())
    }
}

/// Keep a listener's client trust current: re-read the CA bundles and CRLs
/// on change (and every `poll_interval`), swap in trust that loads, keep
/// the last good trust otherwise.
pub async fn reload_trust(
    listener: String,
    config: ClientAuthConfig,
    verifier: Arc<ClientVerifier>,
    stop: CancellationToken,
) {
    let paths: Vec<&Path> = config
        .ca
        .iter()
        .chain(&config.crl)
        .map(|p| p.as_path())
        .collect();
    let mut watcher = crate::cert::files::Watcher::new(&paths);
    let mut fingerprint = trust_fingerprint(&config);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = watcher.changed() => watcher.settle(Duration::from_millis(250)).await,
            _ = tokio::time::sleep(config.poll_interval) => {}
        }
        let now = trust_fingerprint(&config);
        if now == fingerprint {
            continue;
        }
        match load_verifier(&config) {
            Ok(inner) => {
                verifier.replace(inner);
                verifier
                    .reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                fingerprint = now;
                last_error = None;
                tracing::info!(listener = %listener, "client trust reloaded (CA bundle / CRL)");
            }
            Err(e) => {
                verifier
                    .failed_reloads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let message = e.to_string();
                if last_error.as_deref() != Some(&message) {
                    tracing::warn!(listener = %listener, error = %message, "client trust not reloaded; the last good CA bundle and CRLs stay in force");
                    last_error = Some(message);
                }
            }
        }
    }
}

/// A hash over the trust files' contents, to tell real changes apart.
fn trust_fingerprint(config: &ClientAuthConfig) -> String {
    let mut all = Vec::new();
    for path in config.ca.iter().chain(&config.crl) {
        all.extend_from_slice(path.as_os_str().as_encoded_bytes());
        all.push(0);
        all.extend(std::fs::read(path).unwrap_or_default());
        all.push(0);
    }
    sha256_hex(&all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_patterns() {
        let p = "spiffe://example.org/ns/*/sa/frontend";
        assert!(uri_matches(p, "spiffe://example.org/ns/prod/sa/frontend"));
        assert!(!uri_matches(
            p,
            "spiffe://example.org/ns/prod/extra/sa/frontend"
        ));
        assert!(!uri_matches(p, "spiffe://example.org/ns//sa/frontend"));
        assert!(!uri_matches(p, "spiffe://other.org/ns/prod/sa/frontend"));
        assert!(!uri_matches(p, "spiffe://example.org/ns/prod/sa/frontend/"));
        assert!(!uri_matches(p, "SPIFFE://example.org/ns/prod/sa/frontend"));
        assert!(uri_matches(
            "spiffe://example.org/a",
            "spiffe://example.org/a"
        ));
        assert!(!uri_matches("spiffe://*/a", "spiffe://example.org/a"));
    }
}
