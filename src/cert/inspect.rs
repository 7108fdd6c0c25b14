//! What a certificate says about itself, read with x509-parser: names,
//! serial, validity window and fingerprint. Expiry and renewal are always
//! computed from here, never from a remembered timestamp.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::der_parser::asn1_rs::ToDer;
use x509_parser::extensions::GeneralName;
use x509_parser::objects::{oid2abbrev, oid_registry};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::X509Name;

use super::CertError;

/// A summary of one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex with colons.
    pub serial: String,
    pub subject: String,
    pub issuer: String,
    /// DNS and IP subject alternative names, or the CN when there are none
    /// (which most clients do not accept as a name; see `from_der`).
    pub names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SHA-256 of the DER encoding, lowercase hex.
    pub sha256: String,
    pub is_ca: bool,
}

/// A distinguished name written as RFC 4514 says, and as OpenSSL's
/// RFC 2253 printing (Envoy's XFCC `Subject`) writes it: the RDNs last
/// first, joined by `,`, the attributes of one RDN by `+`; in a value,
/// `\` before each character that would end it or start another, and
/// control characters and non-ASCII bytes as `\XX`, so the string reads
/// back as what the certificate says and travels in an HTTP header as it
/// is. x509-parser's `Display` joins the values as they are, so that a
/// client certificate whose CN was `alice, O=Admins` read as an O of
/// `Admins` to a backend splitting the subject it was told.
pub fn distinguished_name(name: &X509Name<'_>) -> String {
    let mut out = String::new();
    let rdns: Vec<_> = name.iter().collect();
    for (i, rdn) in rdns.into_iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match oid2abbrev(attr.attr_type(), oid_registry()) {
                Ok(abbrev) => out.push_str(abbrev),
                Err(_) => out.push_str(&attr.attr_type().to_id_string()),
            }
            out.push('=');
            match attr.as_str() {
                Ok(value) => escape_dn_value(value, &mut out),
                // Not a string type: its DER in hex (RFC 4514 §2.4).
                Err(_) => {
                    out.push('#');
                    for b in attr.attr_value().to_der_vec().unwrap_or_default() {
                        let _ = write!(out, "{b:02x}");
                    }
                }
            }
        }
    }
    out
}

fn escape_dn_value(value: &str, out: &mut String) {
    let last = value.len().saturating_sub(1);
    for (i, b) in value.bytes().enumerate() {
        match b {
            b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\' => {
                out.push('\\');
                out.push(char::from(b));
            }
            b'#' if i == 0 => out.push_str("\\#"),
            b' ' if i == 0 || i == last => out.push_str("\\ "),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\{b:02X}");
            }
        }
    }
}

impl CertInfo {
    /// May the certificate authenticate a TLS client? Without the extended
    /// key usage extension any use is allowed; with it, clientAuth (or
    /// anyExtendedKeyUsage) must be listed, or peers refuse it.
    pub fn allows_client_auth(der: &CertificateDer<'_>) -> Result<bool, String> {
        let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| e.to_string())?;
        match cert.extended_key_usage() {
            Ok(Some(eku)) => Ok(eku.value.client_auth || eku.value.any),
            Ok(None) => Ok(true),
            Err(e) => Err(e.to_string()),
        }
    }

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
        // Only when there is no DNS or IP SAN does the CN count as a name,
        // and only for choosing which certificate to serve (and for showing
        // one): HAProxy selects on the CN of such a certificate too. Clients
        // verifying it mostly do not accept that name: rustls' webpki never
        // reads the CN, Chrome stopped in version 58, Firefox in 101,
        // Safari in macOS 10.15 / iOS 13, Go in 1.15. OpenSSL's
        // X509_check_host still falls back to it unless the caller sets
        // X509_CHECK_FLAG_NEVER_CHECK_SUBJECT (OpenSSL 1.1.0+), so some
        // OpenSSL-based clients verify it. Serving the certificate for its
        // CN is then right for them and changes nothing for the others,
        // which refuse it whichever certificate is chosen.
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
            subject: distinguished_name(cert.subject()),
            issuer: distinguished_name(cert.issuer()),
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

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn subject_of(attributes: &[(DnType, &str)]) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in attributes {
            params.distinguished_name.push(kind.clone(), *value);
        }
        let cert = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        super::distinguished_name(parsed.subject())
    }

    #[test]
    fn distinguished_names_are_written_last_first_and_escaped() {
        assert_eq!(
            subject_of(&[
                (DnType::CountryName, "DE"),
                (DnType::OrganizationName, "Example"),
                (DnType::CommonName, "web"),
            ]),
            "CN=web,O=Example,C=DE"
        );
        // What would end a value or start another is escaped; a space or
        // `#` only where it would be taken for something else.
        assert_eq!(
            subject_of(&[(DnType::CommonName, r#"a,b+c;d<e>f"g\h"#)]),
            r#"CN=a\,b\+c\;d\<e\>f\"g\\h"#
        );
        assert_eq!(
            subject_of(&[(DnType::CommonName, " #a #b ")]),
            r"CN=\ #a #b\ "
        );
        assert_eq!(subject_of(&[(DnType::CommonName, "#x")]), r"CN=\#x");
        // Control characters and non-ASCII bytes as hex pairs.
        assert_eq!(
            subject_of(&[(DnType::CommonName, "Jörg\r\n")]),
            r"CN=J\C3\B6rg\0D\0A"
        );
    }
}
