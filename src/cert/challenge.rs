//! Answers to ACME challenges, shared by the issuing task and the listeners.
//!
//! TLS-ALPN-01 (RFC 8737) is answered on the listener's own TLS port: a
//! ClientHello offering `acme-tls/1` gets a separate server config whose
//! only certificate is the challenge certificate for the requested name, and
//! the connection is closed after the handshake. That path never asks for a
//! client certificate, so validation works on listeners that require one.
//! HTTP-01 tokens are served by the plain-HTTP listener in `http01`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use rcgen::{CertificateParams, CustomExtension, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::CertError;

pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Pending challenge answers. Only the ACME validation path reads these, so
/// a plain mutex is fine: it is never touched by ordinary handshakes.
#[derive(Debug, Default)]
pub struct Challenges {
    tls_alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    http: Mutex<HashMap<String, String>>,
    server_config: OnceLock<Arc<ServerConfig>>,
}

impl Challenges {
    pub fn new() -> Arc<Self> {
        Arc::new(Challenges::default())
    }

    /// Prepare the TLS-ALPN-01 answer for `name` (a DNS name or IP literal).
    pub fn add_tls_alpn(&self, name: &str, digest: &[u8]) -> Result<(), CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.to_string().try_into()?),
        }];
        params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
        let cert = params.self_signed(&key)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let signing =
            provider
                .key_provider
                .load_private_key(der)
                .map_err(|e| CertError::BadKey {
                    what: "TLS-ALPN-01 challenge".into(),
                    reason: e.to_string(),
                })?;
        let certified = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing));
        self.tls_alpn
            .lock()
            .expect("challenge map poisoned")
            .insert(sni_key(name), certified);
        Ok(())
    }

    pub fn remove_tls_alpn(&self, name: &str) {
        self.tls_alpn
            .lock()
            .expect("challenge map poisoned")
            .remove(&sni_key(name));
    }

    pub fn add_http(&self, token: &str, key_authorization: &str) {
        self.http
            .lock()
            .expect("challenge map poisoned")
            .insert(token.to_string(), key_authorization.to_string());
    }

    pub fn remove_http(&self, token: &str) {
        self.http
            .lock()
            .expect("challenge map poisoned")
            .remove(token);
    }

    pub fn http_answer(&self, token: &str) -> Option<String> {
        self.http
            .lock()
            .expect("challenge map poisoned")
            .get(token)
            .cloned()
    }

    /// The server config used for `acme-tls/1` handshakes.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        Arc::clone(self.server_config.get_or_init(|| {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut config = ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .expect("default provider supports TLS 1.2 and 1.3")
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(ChallengeResolver(Arc::clone(self))));
            config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
            // Validation connections are one-shot; nothing to resume.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
            Arc::new(config)
        }))
    }
}

/// Does this ClientHello come from an ACME validator?
pub fn is_acme_tls_alpn(hello: &ClientHello<'_>) -> bool {
    hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN))
}

/// SNI carries IP identifiers in the reverse-DNS form (RFC 8738 §6); both
/// forms map to the same key.
fn sni_key(name: &str) -> String {
    match name.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        Ok(IpAddr::V6(v6)) => {
            let mut labels: Vec<String> = v6
                .octets()
                .iter()
                .flat_map(|b| [b >> 4, b & 0xf])
                .map(|n| format!("{n:x}"))
                .collect();
            labels.reverse();
            format!("{}.ip6.arpa", labels.join("."))
        }
        Err(_) => name.trim_end_matches('.').to_ascii_lowercase(),
    }
}

#[derive(Debug)]
struct ChallengeResolver(Arc<Challenges>);

impl ResolvesServerCert for ChallengeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        self.0
            .tls_alpn
            .lock()
            .expect("challenge map poisoned")
            .get(&sni_key(name))
            .cloned()
    }
}
