//! The `files` certificate source: a PEM chain and a PEM private key.

use std::path::Path;
use std::sync::Arc;

use rustls::sign::CertifiedKey;

use super::{certified_key, parse_chain_pem, parse_key_pem, CertError, CertInfo};

/// Read and check a certificate chain and its key from disk.
pub fn load(cert_path: &Path, key_path: &Path) -> Result<(Arc<CertifiedKey>, CertInfo), CertError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| CertError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let what = cert_path.display().to_string();
    let chain = parse_chain_pem(&what, &cert_pem)?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    }
    let key = parse_key_pem(&key_path.display().to_string(), &key_pem)?.ok_or_else(|| {
        CertError::NoKey {
            path: key_path.to_path_buf(),
        }
    })?;
    certified_key(&what, chain, key)
}
