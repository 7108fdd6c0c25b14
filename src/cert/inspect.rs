//! What a certificate says about itself, read with x509-parser: names,
//! serial, validity window and fingerprint. Expiry and renewal are always
//! computed from here, never from a remembered timestamp.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::CertError;

/// A summary of one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex with colons.
    pub serial: String,
    pub subject: String,
    pub issuer: String,
    /// DNS and IP subject alternative names, or the CN when there are none.
    pub names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SHA-256 of the DER encoding, lowercase hex.
    pub sha256: String,
    pub is_ca: bool,
}

impl CertInfo {
    pub fn from_der(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
        let (rest, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err("trailing data after certificate".into());
        }
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => names.push(dns.to_string()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            names.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        // Only when there is no SAN at all does the CN count as a name, as
        // browsers and rustls' verifier do.
        if names.is_empty() {
            if let Some(cn) = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
            {
                names.push(cn.to_string());
            }
        }
        let validity = cert.validity();
        Ok(CertInfo {
            serial: cert.raw_serial_as_string(),
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            names,
            not_before: to_system_time(validity.not_before.timestamp()),
            not_after: to_system_time(validity.not_after.timestamp()),
            sha256: sha256_hex(der.as_ref()),
            is_ca: cert.is_ca(),
        })
    }

    /// The full validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }

    /// Refuse material outside its validity window.
    pub fn check_validity_now(&self, what: &str) -> Result<(), CertError> {
        let now = SystemTime::now();
        if now > self.not_after {
            return Err(CertError::Expired {
                what: what.to_string(),
                not_after: humantime::format_rfc3339_seconds(self.not_after).to_string(),
            });
        }
        if now < self.not_before {
            return Err(CertError::NotYetValid {
                what: what.to_string(),
                not_before: humantime::format_rfc3339_seconds(self.not_before).to_string(),
            });
        }
        Ok(())
    }
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => Some(<[u8; 4]>::try_from(bytes).ok()?.into()),
        16 => Some(<[u8; 16]>::try_from(bytes).ok()?.into()),
        _ => None,
    }
}

/// Lowercase hex SHA-256, the form `openssl x509 -fingerprint -sha256`
/// prints once colons are removed.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = String::with_capacity(64);
    for b in digest.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}
