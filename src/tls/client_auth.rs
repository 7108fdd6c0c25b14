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
//!
//! Each generation of trust remembers the chains it has accepted (see
//! `VerifiedChains`), so a client that reconnects with the same
//! certificate is not verified from scratch on every handshake.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
use crate::cert::{read_chain, without_bom, CertError};
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
    #[error("building the certificate verifier: {0}")]
    Verifier(String),
}

/// Client trust as loaded from its files.
#[derive(Debug)]
pub struct LoadedTrust {
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// The earliest `nextUpdate` among the CRLs, if any has one: when the
    /// CRLs should have been replaced by.
    pub crls_next_update: Option<SystemTime>,
}

/// Load CA bundles and CRLs into a webpki verifier.
pub fn load_verifier(config: &ClientAuthConfig) -> Result<LoadedTrust, TrustError> {
    let roots = load_roots(&config.ca)?;
    let mut crls = Vec::new();
    let mut crls_next_update: Option<SystemTime> = None;
    for path in &config.crl {
        let shown = path.display().to_string();
        let data = read(path)?;
        let (parsed, next_update) = parse_crls(&data).map_err(|reason| TrustError::Invalid {
            path: shown.clone(),
            reason,
        })?;
        if let Some(past) = next_update.filter(|t| *t < SystemTime::now()) {
            // Still applied (see the README), but what was revoked since
            // is not in it: someone should know.
            tracing::warn!(
                crl = %shown,
                next_update = %humantime::format_rfc3339_seconds(past),
                "CRL past its nextUpdate; it still applies, but revocations since are not in it"
            );
        }
        crls_next_update = crls_next_update.into_iter().chain(next_update).min();
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
    let verifier = builder
        .build()
        .map_err(|e| TrustError::Verifier(e.to_string()))?;
    Ok(LoadedTrust {
        verifier,
        crls_next_update,
    })
}

/// CA bundles (PEM, or one DER certificate) as trust anchors; a file
/// without a certificate is an error, not an empty trust.
pub fn load_roots(paths: &[PathBuf]) -> Result<RootCertStore, TrustError> {
    let mut roots = RootCertStore::empty();
    for path in paths {
        let shown = path.display().to_string();
        let data = read(path)?;
        let certs = read_chain(path, &data).map_err(|e| match e {
            CertError::NoCertificate { .. } => TrustError::NoCa {
                path: shown.clone(),
            },
            // These name the file already, as the trust error does.
            CertError::Pem { reason, .. } => TrustError::Invalid {
                path: shown.clone(),
                reason: format!("malformed PEM: {reason}"),
            },
            CertError::Format { reason, .. } => TrustError::Invalid {
                path: shown.clone(),
                reason,
            },
            other => TrustError::Invalid {
                path: shown.clone(),
                reason: other.to_string(),
            },
        })?;
        for cert in certs {
            roots.add(cert).map_err(|e| TrustError::Invalid {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    Ok(roots)
}

fn read(path: &Path) -> Result<Vec<u8>, TrustError> {
    std::fs::read(path).map_err(|e| TrustError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// CRLs in PEM (any number) or a single DER CRL, and the earliest
/// `nextUpdate` among them. Each is parsed so a broken file is refused at
/// load time, not at the first handshake.
type Crls = (
    Vec<CertificateRevocationListDer<'static>>,
    Option<SystemTime>,
);
fn parse_crls(data: &[u8]) -> Result<Crls, String> {
    use rustls::pki_types::pem::PemObject;
    // A byte order mark is not ASCII: the PEM file behind one was taken
    // for DER.
    let data = without_bom(data);
    let crls: Vec<CertificateRevocationListDer<'static>> =
        if data.starts_with(b"-----") || data.iter().take(64).all(|b| b.is_ascii()) {
            CertificateRevocationListDer::pem_slice_iter(data)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("malformed PEM CRL: {}", crate::cert::pem_reason(&e)))?
        } else {
            vec![CertificateRevocationListDer::from(data.to_vec())]
        };
    if crls.is_empty() {
        return Err("no CRL found".into());
    }
    let mut next_update: Option<SystemTime> = None;
    for crl in &crls {
        let (_, parsed) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(crl.as_ref())
                .map_err(|e| format!("cannot parse CRL: {e}"))?;
        let at = parsed
            .next_update()
            .map(|at| UNIX_EPOCH + Duration::from_secs(at.timestamp().max(0) as u64));
        next_update = next_update.into_iter().chain(at).min();
    }
    Ok((crls, next_update))
}

/// One generation of client trust: the webpki verifier for the CA bundles
/// and CRLs as they were loaded, and the chains it has accepted. Replaced
/// whole on reload, so what it remembers never outlives the trust that
/// decided it.
#[derive(Debug)]
struct Trust {
    verifier: Arc<dyn ClientCertVerifier>,
    verified: VerifiedChains,
    crls_next_update: Option<SystemTime>,
}

impl Trust {
    fn new(loaded: LoadedTrust) -> Trust {
        Trust {
            verifier: loaded.verifier,
            verified: VerifiedChains::default(),
            crls_next_update: loaded.crls_next_update,
        }
    }
}

/// Chains one generation of trust has accepted, by their exact bytes, with
/// the identity each carries.
///
/// A sidecar's clients are a few services that reconnect with the same
/// certificate over and over, and verifying the chain is the largest cost
/// of an mTLS handshake after the key exchange: an ECDSA verification per
/// certificate, ~90 µs each on the benchmark machine (W5 in
/// benches/compare.py), plus parsing the certificate for its identity.
/// Whether a chain verifies depends only on its bytes, the trust anchors,
/// the CRLs (whose own expiry sheath does not enforce) and the time. The
/// first three are fixed for one [`Trust`]; for the time, an entry is used
/// only while every certificate the client presented is within its
/// validity period, and a chain is remembered only if that holds when it
/// is verified. Everything else is still checked on every handshake: the
/// client's proof that it holds the key (CertificateVerify, signed over
/// this handshake) and the allow-list.
#[derive(Debug, Default)]
struct VerifiedChains {
    entries: Mutex<HashMap<[u8; 32], Verified>>,
}

/// Enough for every client of a sidecar many times over; bounds the memory
/// (one identity, which holds the chain, per entry).
const MAX_VERIFIED_CHAINS: usize = 1024;

#[derive(Debug)]
struct Verified {
    /// Holds the chain's DER, compared in full on every use: the digest
    /// only finds the entry.
    identity: Arc<ClientIdentity>,
    /// The span, in seconds since the epoch and inclusive at both ends as
    /// webpki checks it, in which every presented certificate is valid.
    valid: (u64, u64),
}

/// SHA-256 over the chain, each certificate prefixed by its length so no
/// two chains run together into the same input.
fn chain_digest(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for der in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        ctx.update(&(der.len() as u64).to_be_bytes());
        ctx.update(der);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// When all of `certs` are valid at once, or None if never (or unreadable).
fn validity_span<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> Option<(u64, u64)> {
    let mut span = (0u64, u64::MAX);
    for der in certs {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let validity = cert.validity();
        let not_before = u64::try_from(validity.not_before.timestamp()).unwrap_or(0);
        let not_after = u64::try_from(validity.not_after.timestamp()).ok()?;
        span = (span.0.max(not_before), span.1.min(not_after));
    }
    (span.0 <= span.1).then_some(span)
}

impl VerifiedChains {
    /// The identity of `chain` if this trust accepted exactly these bytes
    /// and every certificate in it is valid at `now`.
    fn get(
        &self,
        digest: &[u8; 32],
        end_entity: &[u8],
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Option<Arc<ClientIdentity>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(digest)?;
        let same = *entry.identity.cert == *end_entity
            && entry.identity.chain.len() == intermediates.len()
            && entry
                .identity
                .chain
                .iter()
                .zip(intermediates)
                .all(|(a, b)| **a == **b);
        if !same {
            return None;
        }
        let secs = now.as_secs();
        if secs < entry.valid.0 || secs > entry.valid.1 {
            // Expired (or the clock went back): verify afresh, which gives
            // the client the right error.
            entries.remove(digest);
            return None;
        }
        Some(Arc::clone(&entry.identity))
    }

    /// Remember a chain the verifier just accepted at `now`.
    fn insert(&self, digest: [u8; 32], identity: Arc<ClientIdentity>, now: UnixTime) {
        let certs = std::iter::once(identity.cert.as_slice())
            .chain(identity.chain.iter().map(Vec::as_slice));
        let Some(valid) = validity_span(certs) else {
            return;
        };
        if now.as_secs() < valid.0 || now.as_secs() > valid.1 {
            // Accepted with a presented certificate out of its period
            // (one webpki did not need for the path): its outcome could
            // differ at another time, so it is not remembered.
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_VERIFIED_CHAINS && !entries.contains_key(&digest) {
            // Any entry will do: at worst that client is verified in full
            // on its next handshake, as without this cache.
            if let Some(victim) = entries.keys().next().copied() {
                entries.remove(&victim);
            }
        }
        entries.insert(digest, Verified { identity, valid });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

/// The verifier a listener's rustls config holds: current trust plus the
/// allow-list.
#[derive(Debug)]
pub struct ClientVerifier {
    inner: ArcSwap<Trust>,
    allow: AllowList,
    mandatory: bool,
    /// Successful trust reloads since start.
    pub reloads: AtomicU64,
    /// Reload attempts refused because the new trust did not load.
    pub failed_reloads: AtomicU64,
}

impl ClientVerifier {
    pub fn new(config: &ClientAuthConfig) -> Result<Arc<Self>, TrustError> {
        Ok(Arc::new(ClientVerifier {
            inner: ArcSwap::from_pointee(Trust::new(load_verifier(config)?)),
            allow: config.allow.clone(),
            mandatory: config.mode == ClientAuthMode::Require,
            reloads: Default::default(),
            failed_reloads: Default::default(),
        }))
    }

    /// Swap in new trust; the next handshake uses it, and no chain the
    /// old trust accepted is taken as verified.
    pub fn replace(&self, loaded: LoadedTrust) {
        self.inner.store(Arc::new(Trust::new(loaded)));
    }

    /// The earliest `nextUpdate` of the CRLs in force, if any has one.
    pub fn crls_next_update(&self) -> Option<SystemTime> {
        self.inner.load().crls_next_update
    }

    /// The identity in a chain this verifier accepted: the one already
    /// parsed when the chain was verified, while that trust is current.
    pub fn identity(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<Arc<ClientIdentity>, String> {
        let digest = chain_digest(end_entity, intermediates);
        let trust = self.inner.load();
        match trust
            .verified
            .get(&digest, end_entity, intermediates, UnixTime::now())
        {
            Some(identity) => Ok(identity),
            None => ClientIdentity::from_chain(end_entity, intermediates).map(Arc::new),
        }
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
        let trust = self.inner.load();
        let digest = chain_digest(end_entity, intermediates);
        let identity = match trust.verified.get(&digest, end_entity, intermediates, now) {
            Some(identity) => identity,
            None => {
                trust
                    .verifier
                    .verify_client_cert(end_entity, intermediates, now)?;
                let identity = ClientIdentity::from_chain(end_entity, intermediates)
                    .map(Arc::new)
                    .map_err(|_| {
                        rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
                    })?;
                trust.verified.insert(digest, Arc::clone(&identity), now);
                identity
            }
        };
        if self.allow.is_empty() || allowed(&self.allow, &identity) {
            Ok(ClientCertVerified::assertion())
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
        self.inner
            .load()
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .load()
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.load().verifier.supported_verify_schemes()
    }
}

/// Does a verified client match any entry of any allow-list?
pub fn allowed(allow: &AllowList, id: &ClientIdentity) -> bool {
    // DNS names have no case (RFC 4343, RFC 5280 §7.2): a certificate for
    // `API.internal` names the host `api.internal` does.
    allow
        .dns
        .iter()
        .any(|d| id.dns.iter().any(|n| n.eq_ignore_ascii_case(d)))
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
/// pattern segment `*` matches exactly one non-empty segment other than
/// `.` and `..`. A wildcard never spans segments and never stands in for
/// the scheme or trust domain. Dot segments are not valid in a SPIFFE ID,
/// and a backend that resolves them would read `ns/../sa/x` as `sa/x`,
/// outside what `ns/*/sa/x` allows.
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
            .all(|(p, u)| (*p == "*" && !matches!(*u, "" | "." | "..")) || p == u)
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
    /// The subject as an RFC 4514 string, escaped.
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
            subject: crate::cert::inspect::distinguished_name(subject),
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
    let paths: Vec<PathBuf> = config.ca.iter().chain(&config.crl).cloned().collect();
    let watched = WatchedTrust {
        listener: &listener,
        paths: &paths,
        poll_interval: config.poll_interval,
        reloads: &verifier.reloads,
        failed_reloads: &verifier.failed_reloads,
        reloaded: "client trust reloaded (CA bundle / CRL)",
        kept: "client trust not reloaded; the last good CA bundle and CRLs stay in force",
    };
    watched
        .run(
            &stop,
            || load_verifier(&config),
            |inner| verifier.replace(inner),
        )
        .await;
}

/// Trust read from files and kept current the same way wherever it is
/// used (client trust, an outbound listener's peer trust): the files are
/// looked at on a settled change or every poll interval, read again only
/// if their contents changed, and what fails to load leaves the last good
/// trust in force, counted, and logged once per distinct error.
pub(crate) struct WatchedTrust<'a> {
    pub listener: &'a str,
    pub paths: &'a [PathBuf],
    pub poll_interval: std::time::Duration,
    pub reloads: &'a AtomicU64,
    pub failed_reloads: &'a AtomicU64,
    /// Logged when new trust is installed.
    pub reloaded: &'static str,
    /// Logged, with the error, when it is not.
    pub kept: &'static str,
}

impl WatchedTrust<'_> {
    /// Until `stop`: `load` the files when they changed, `install` what
    /// loads.
    pub async fn run<T>(
        &self,
        stop: &CancellationToken,
        load: impl Fn() -> Result<T, TrustError>,
        install: impl Fn(T),
    ) {
        let paths: Vec<&Path> = self.paths.iter().map(PathBuf::as_path).collect();
        let mut watcher = crate::cert::files::Watcher::new(&paths);
        let mut fingerprint = trust_fingerprint(self.paths);
        let mut last_error: Option<String> = None;
        loop {
            if !watcher.next_look(self.poll_interval, stop).await {
                return;
            }
            let now = trust_fingerprint(self.paths);
            if now == fingerprint {
                continue;
            }
            match load() {
                Ok(trust) => {
                    install(trust);
                    self.reloads.fetch_add(1, Ordering::Relaxed);
                    fingerprint = now;
                    last_error = None;
                    tracing::info!(listener = %self.listener, "{}", self.reloaded);
                }
                Err(e) => {
                    self.failed_reloads.fetch_add(1, Ordering::Relaxed);
                    let message = e.to_string();
                    if last_error.as_deref() != Some(&message) {
                        tracing::warn!(listener = %self.listener, error = %message, "{}", self.kept);
                        last_error = Some(message);
                    }
                }
            }
        }
    }
}

/// A hash over the trust files' contents, to tell real changes apart.
fn trust_fingerprint(paths: &[PathBuf]) -> String {
    let mut all = Vec::new();
    for path in paths {
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
    use std::time::{Duration, SystemTime};

    /// A CA that issues client certificates and CRLs.
    struct Ca {
        params: rcgen::CertificateParams,
        key: rcgen::KeyPair,
        pem: String,
    }

    impl Ca {
        fn new() -> Ca {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "clients CA");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            let pem = params.self_signed(&key).unwrap().pem();
            Ca { params, key, pem }
        }

        /// A client certificate for `cn` with `serial`, valid until
        /// `not_after`.
        fn client(
            &self,
            key: &rcgen::KeyPair,
            serial: u64,
            not_after: SystemTime,
        ) -> CertificateDer<'static> {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "frontend");
            params.serial_number = Some(rcgen::SerialNumber::from(serial));
            params.not_before = (SystemTime::now() - Duration::from_secs(3600)).into();
            params.not_after = not_after.into();
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
            params.signed_by(key, &issuer).unwrap().der().clone()
        }

        /// Client auth trusting this CA.
        fn trust(&self, dir: &Path) -> ClientAuthConfig {
            let ca = dir.join("ca.pem");
            std::fs::write(&ca, &self.pem).unwrap();
            ClientAuthConfig {
                mode: ClientAuthMode::Require,
                ca: vec![ca],
                ..Default::default()
            }
        }
    }

    fn in_a_day() -> SystemTime {
        SystemTime::now() + Duration::from_secs(86_400)
    }

    #[test]
    fn an_accepted_chain_is_remembered_with_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let verifier = ClientVerifier::new(&ca.trust(dir.path())).unwrap();
        let leaf = ca.client(&rcgen::KeyPair::generate().unwrap(), 7, in_a_day());
        verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .unwrap();
        assert_eq!(verifier.inner.load().verified.len(), 1);
        // Verified once, parsed once: every connection shares it.
        let first = verifier.identity(&leaf, &[]).unwrap();
        let second = verifier.identity(&leaf, &[]).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.cn.as_deref(), Some("frontend"));
        verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .unwrap();
    }

    #[test]
    fn a_remembered_chain_is_refused_once_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new();
        let verifier = ClientVerifier::new(&ca.trust(dir.path())).unwrap();
        let not_after = in_a_day();
        let leaf = ca.client(&rcgen::KeyPair::generate().unwrap(), 7, not_after);
        verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .unwrap();
        let later = UnixTime::since_unix_epoch(
            not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap() + Duration::from_secs(2),
        );
        let err = verifier.verify_client_cert(&leaf, &[], later).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
                    | rustls::Error::InvalidCertificate(CertificateError::Expired)
            ),
            "{err:?}"
        );
        assert_eq!(verifier.inner.load().verified.len(), 0);
    }

    #[test]
    fn only_the_exact_chain_counts_as_verified() {
        let dir = tempfile::tempdir().unwrap();
        let trusted = Ca::new();
        let verifier = ClientVerifier::new(&trusted.trust(dir.path())).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = trusted.client(&key, 7, in_a_day());
        verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .unwrap();
        // Same key, subject and serial from a CA this listener does not
        // trust: nothing about it is taken from the remembered chain.
        let forged = Ca::new().client(&key, 7, in_a_day());
        assert!(verifier
            .verify_client_cert(&forged, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn new_trust_forgets_the_chains_the_old_one_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let old_ca = Ca::new();
        let verifier = ClientVerifier::new(&old_ca.trust(dir.path())).unwrap();
        let leaf = old_ca.client(&rcgen::KeyPair::generate().unwrap(), 7, in_a_day());
        verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .unwrap();
        let rotated = Ca::new().trust(dir.path());
        verifier.replace(load_verifier(&rotated).unwrap());
        // A CA of the same name but another key: the old signature fails.
        let err = verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::BadSignature)
        );
    }

    #[test]
    fn spiffe_patterns() {
        let p = "spiffe://example.org/ns/*/sa/frontend";
        assert!(uri_matches(p, "spiffe://example.org/ns/prod/sa/frontend"));
        assert!(!uri_matches(
            p,
            "spiffe://example.org/ns/prod/extra/sa/frontend"
        ));
        assert!(!uri_matches(p, "spiffe://example.org/ns//sa/frontend"));
        assert!(!uri_matches(p, "spiffe://example.org/ns/./sa/frontend"));
        assert!(!uri_matches(p, "spiffe://example.org/ns/../sa/frontend"));
        assert!(uri_matches(p, "spiffe://example.org/ns/.../sa/frontend"));
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
