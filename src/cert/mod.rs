//! Certificate material: loading and checking it, sheath's local CA, and
//! writing state atomically.
//!
//! Whatever the source, material becomes a rustls [`CertifiedKey`] only
//! after it has been checked: the chain parses, the key matches the leaf and
//! the leaf is within its validity period. Half-valid material never reaches
//! the resolver. A chain that only some clients refuse (a wrong or expired
//! intermediate) is served with a warning instead; see [`chain`].

pub mod acme;
pub mod bootstrap;
pub mod chain;
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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::der_parser::ber::{parse_ber, BerObject};

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
    #[error("{}: no PEM certificate found{hint}", path.display())]
    NoCertificate { path: PathBuf, hint: &'static str },
    #[error("{}: no PEM private key found{hint}", path.display())]
    NoKey { path: PathBuf, hint: &'static str },
    #[error(
        "{}: the private key is encrypted, and sheath cannot ask for its passphrase; write it out decrypted with `openssl pkey -in {} -out <new file>` (it asks for the passphrase), make the new file readable by sheath alone, and give that as the key",
        path.display(), path.display()
    )]
    EncryptedKey { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("{what}: malformed PEM: {reason}")]
    Pem { what: String, reason: String },
    #[error("{what}: cannot parse certificate: {reason}")]
    Parse { what: String, reason: String },
    #[error("{what}: private key does not match the certificate")]
    KeyMismatch { what: String },
    /// `position` counts from 1 for the first certificate of the file, as
    /// the chain warnings do (see `chain::problems`).
    #[error("{what}: the private key belongs to certificate {position} of the chain, not to the first; the leaf (the server's own certificate) must come first")]
    ChainOrder { what: String, position: usize },
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
    CertificateDer::pem_slice_iter(without_bom(pem))
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
    match PrivateKeyDer::from_pem_slice(without_bom(pem)) {
        Ok(key) => Ok(Some(key)),
        Err(pem::Error::NoItemsFound) => Ok(None),
        Err(e) => Err(CertError::Pem {
            what: what.to_string(),
            reason: pem_reason(&e),
        }),
    }
}

/// The text after a UTF-8 byte order mark, which Windows editors write
/// at the start of a file. The PEM parser reads a BEGIN line only at the
/// start of a line, so behind a mark the first block (a chain's leaf, a
/// bundle's first CA) was silently skipped.
pub fn without_bom(data: &[u8]) -> &[u8] {
    data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data)
}

/// Binary content: DER (an ASN.1 SEQUENCE) and no PEM block anywhere.
fn is_der(data: &[u8]) -> bool {
    data.first() == Some(&0x30) && !data.windows(11).any(|w| w == b"-----BEGIN ")
}

fn is_der_certificate(data: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(data).is_ok_and(|(rest, _)| rest.is_empty())
}

/// A PKCS#12 PFX: SEQUENCE { version 3, ContentInfo { pkcs7 content
/// type, ... }, ... } (RFC 7292 §4). BER, as some exporters write it.
fn is_pkcs12(data: &[u8]) -> bool {
    ber_sequence(data, |items| {
        items.first().and_then(|v| v.as_u32().ok()) == Some(3)
            && leading_oid(items.get(1)).is_some_and(|oid| oid.starts_with("1.2.840.113549.1.7."))
    })
}

/// A PKCS#8 EncryptedPrivateKeyInfo in DER (`openssl pkcs8 -topk8
/// -outform DER`): SEQUENCE { AlgorithmIdentifier of a password-based
/// scheme (PKCS#5, or PKCS#12's), OCTET STRING } (RFC 5958 §3).
fn is_encrypted_der_key(data: &[u8]) -> bool {
    ber_sequence(data, |items| {
        items.len() == 2
            && items[1].as_slice().is_ok()
            && leading_oid(items.first()).is_some_and(|oid| {
                oid.starts_with("1.2.840.113549.1.5.") || oid.starts_with("1.2.840.113549.1.12.1.")
            })
    })
}

/// Is `data` a BER (or DER) SEQUENCE whose items pass `test`?
fn ber_sequence(data: &[u8], test: impl FnOnce(&[BerObject<'_>]) -> bool) -> bool {
    parse_ber(data)
        .ok()
        .is_some_and(|(_, seq)| seq.as_sequence().is_ok_and(|items| test(items)))
}

/// The dotted OID that opens `item`, a SEQUENCE such as an
/// AlgorithmIdentifier or a ContentInfo.
fn leading_oid(item: Option<&BerObject<'_>>) -> Option<String> {
    let first = item?.as_sequence().ok()?.first()?;
    Some(first.as_oid().ok()?.to_id_string())
}

/// Why binary content that is not what was asked for cannot be used.
fn binary_error(path: &Path, data: &[u8], expected: &str) -> CertError {
    let shown = path.display();
    let reason = if is_pkcs12(data) {
        format!(
            "this is a PKCS#12 (.p12/.pfx) bundle, which sheath does not read; extract the chain with `openssl pkcs12 -in {shown} -nokeys -out chain.pem` and the key with `openssl pkcs12 -in {shown} -nocerts -nodes -out key.pem`, and give those as `cert` and `key`"
        )
    } else {
        format!("this is neither PEM nor a DER {expected}")
    };
    CertError::Format {
        path: path.to_path_buf(),
        reason,
    }
}

/// Certificates from a file: a PEM chain (after a byte order mark, between
/// lines of other text), or a single DER certificate.
pub fn read_chain(path: &Path, data: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let data = without_bom(data);
    if is_der(data) {
        if is_der_certificate(data) {
            return Ok(vec![CertificateDer::from(data.to_vec())]);
        }
        // The key format guess takes a PKCS#12 bundle for a key.
        if !is_pkcs12(data) && PrivateKeyDer::try_from(data).is_ok() {
            return Err(CertError::NoCertificate {
                path: path.to_path_buf(),
                hint: SWAPPED_KEY,
            });
        }
        return Err(binary_error(path, data, "certificate"));
    }
    let chain = parse_chain_pem(&path.display().to_string(), data)?;
    if chain.is_empty() {
        let holds_key =
            || parse_key_pem("", data).is_ok_and(|k| k.is_some()) || is_encrypted_key(data);
        return Err(CertError::NoCertificate {
            path: path.to_path_buf(),
            hint: missing_hint(data, holds_key, SWAPPED_KEY),
        });
    }
    Ok(chain)
}

/// What a "no certificate / no key found" error adds: that the file is
/// empty, or that it holds the other half of the pair (`swapped`).
fn missing_hint(
    data: &[u8],
    holds_other: impl FnOnce() -> bool,
    swapped: &'static str,
) -> &'static str {
    if data.iter().all(u8::is_ascii_whitespace) {
        " (the file is empty)"
    } else if holds_other() {
        swapped
    } else {
        ""
    }
}

const SWAPPED_KEY: &str = "; it holds a private key: are the certificate and key paths swapped?";

/// A PEM key sealed with a passphrase: PKCS#8's own block, or the legacy
/// OpenSSL header in an RSA or EC block. The parser skips the first and
/// fails on the second's header lines as if they were base64.
fn is_encrypted_key(data: &[u8]) -> bool {
    let has = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
    has(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || has(b"Proc-Type: 4,ENCRYPTED")
}

/// The first private key in a file: PEM (PKCS#8, SEC1 or PKCS#1, also
/// after other blocks, as in a file holding the chain too) or DER.
pub fn read_key(path: &Path, data: &[u8]) -> Result<PrivateKeyDer<'static>, CertError> {
    let data = without_bom(data);
    if is_der(data) {
        if is_der_certificate(data) {
            return Err(CertError::NoKey {
                path: path.to_path_buf(),
                hint: SWAPPED_CERT,
            });
        }
        if is_pkcs12(data) {
            return Err(binary_error(path, data, "private key"));
        }
        if is_encrypted_der_key(data) {
            return Err(CertError::EncryptedKey {
                path: path.to_path_buf(),
            });
        }
        return PrivateKeyDer::try_from(data.to_vec())
            .map_err(|_| binary_error(path, data, "private key"));
    }
    let parsed = parse_key_pem(&path.display().to_string(), data);
    if let Ok(Some(key)) = parsed {
        return Ok(key);
    }
    if is_encrypted_key(data) {
        return Err(CertError::EncryptedKey {
            path: path.to_path_buf(),
        });
    }
    parsed?;
    let holds_chain = || parse_chain_pem("", data).is_ok_and(|c| !c.is_empty());
    Err(CertError::NoKey {
        path: path.to_path_buf(),
        hint: missing_hint(data, holds_chain, SWAPPED_CERT),
    })
}

const SWAPPED_CERT: &str = "; it holds a certificate: are the certificate and key paths swapped?";

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
            reason: format!("certificate {} of the chain: {reason}", i + 1),
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
                position: index + 1,
            },
            None => CertError::KeyMismatch {
                what: what.to_string(),
            },
        });
    }
    Ok((Arc::new(certified), info))
}
