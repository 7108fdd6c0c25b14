//! Certificate material: loading and checking it, sheath's local CA, and
//! writing state atomically.
//!
//! Whatever the source, material becomes a rustls [`CertifiedKey`] only
//! after it has been checked: the chain parses, the key matches the leaf and
//! the leaf is within its validity period. Half-valid material never reaches
//! the resolver.

pub mod acme;
pub mod bootstrap;
pub mod challenge;
pub mod export;
pub mod files;
pub mod http01;
pub mod inspect;
pub mod local_ca;
pub mod manager;
pub mod renew;
pub mod store;

pub use challenge::Challenges;
pub use inspect::CertInfo;
pub use local_ca::LocalCa;
pub use manager::{CertManager, Material};
pub use renew::CertStatus;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why certificate material was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: no PEM certificate found", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no PEM private key found", path.display())]
    NoKey { path: PathBuf },
    #[error("{what}: malformed PEM: {reason}")]
    Pem { what: String, reason: String },
    #[error("{what}: cannot parse certificate: {reason}")]
    Parse { what: String, reason: String },
    #[error("{what}: private key does not match the certificate")]
    KeyMismatch { what: String },
    #[error("{what}: the private key belongs to certificate #{index} of the chain, not to the first; the leaf (the server's own certificate) must come first")]
    ChainOrder { what: String, index: usize },
    #[error("{what}: unusable private key: {reason}")]
    BadKey { what: String, reason: String },
    #[error("{what}: certificate expired at {not_after}")]
    Expired { what: String, not_after: String },
    #[error("{what}: the certificate's extended key usage does not include clientAuth, so peers refuse it as this sidecar's identity in outbound mode; ask its issuer for one with clientAuth")]
    NotForClients { what: String },
    #[error("{what}: certificate not valid before {not_before}")]
    NotYetValid { what: String, not_before: String },
    #[error(
        "local CA in {} is corrupt ({reason}); refusing to start rather than silently replacing the CA clients trust. Restore it from a backup, or remove the directory to create a new CA",
        dir.display()
    )]
    CorruptCa { dir: PathBuf, reason: String },
    #[error(
        "local CA key {} is open to other users (mode {mode:04o}): anyone on this machine could issue certificates that sheath's clients trust. Refusing to start; run `chmod 600 {}` (for a Kubernetes Secret volume, set defaultMode to 0400 or 0440), and treat the key as leaked if others could have read it",
        path.display(), path.display()
    )]
    CaKeyExposed { path: PathBuf, mode: u32 },
    #[error(
        "local CA in {} expired at {not_after}: no client accepts a certificate it issues. Refusing to start; remove the directory to create a new CA, and give the clients its root",
        dir.display()
    )]
    CaExpired { dir: PathBuf, not_after: String },
    #[error("issuing certificate: {0}")]
    Issue(#[from] rcgen::Error),
}

/// Parse every certificate in a PEM text.
pub fn parse_chain_pem(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            what: what.to_string(),
            reason: pem_reason(&e),
        })
}

/// A PEM parse error in words. The parser's own text gives the label it
/// looked for as a list of byte values ("missing section end marker: [67,
/// 69, 82, ...]"), which is what an operator saw for a file cut short or
/// caught half-written, the commonest broken file of all.
pub fn pem_reason(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "no `-----END {}-----` line after its BEGIN line (the file is cut short, or was read while being written)",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => format!(
            "malformed BEGIN line `{}`",
            String::from_utf8_lossy(line).trim_end()
        ),
        other => other.to_string(),
    }
}

/// Parse the first private key (PKCS#8, SEC1 or PKCS#1) in a PEM text.
pub fn parse_key_pem(what: &str, pem: &[u8]) -> Result<Option<PrivateKeyDer<'static>>, CertError> {
    use rustls_pki_types::pem::{self, PemObject};
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(key) => Ok(Some(key)),
        Err(pem::Error::NoItemsFound) => Ok(None),
        Err(e) => Err(CertError::Pem {
            what: what.to_string(),
            reason: pem_reason(&e),
        }),
    }
}

/// Check a chain and key and turn them into something rustls can serve.
///
/// `what` names the material in errors (usually the file path).
pub fn certified_key(
    what: &str,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(Arc<CertifiedKey>, CertInfo), CertError> {
    let leaf = chain.first().ok_or_else(|| CertError::Parse {
        what: what.to_string(),
        reason: "empty certificate chain".into(),
    })?;
    let info = CertInfo::from_der(leaf).map_err(|reason| CertError::Parse {
        what: what.to_string(),
        reason,
    })?;
    for (i, intermediate) in chain.iter().enumerate().skip(1) {
        CertInfo::from_der(intermediate).map_err(|reason| CertError::Parse {
            what: what.to_string(),
            reason: format!("chain certificate #{i}: {reason}"),
        })?;
    }
    info.check_validity_now(what)?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| CertError::BadKey {
                what: what.to_string(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(chain, signing_key);
    // An unknown answer (a key type that cannot report its public key) is an
    // error here: sheath only serves what it could check.
    if certified.keys_match().is_err() {
        // `cat chain.pem cert.pem` is a common slip; "does not match" would
        // send its author looking at the wrong file.
        let index = (1..certified.cert.len()).find(|&i| {
            CertifiedKey::new(vec![certified.cert[i].clone()], certified.key.clone())
                .keys_match()
                .is_ok()
        });
        return Err(match index {
            Some(index) => CertError::ChainOrder {
                what: what.to_string(),
                index,
            },
            None => CertError::KeyMismatch {
                what: what.to_string(),
            },
        });
    }
    Ok((Arc::new(certified), info))
}
