//! The TLS policy every listener shares.
//!
//! TLS 1.2 and 1.3 only, and only the aws-lc-rs provider's default suites,
//! which are all forward-secret AEAD. rustls never renegotiates and never
//! compresses; early data stays off (its replay risk is the backend's
//! problem, and a generic proxy cannot know the backend is idempotent).

use std::sync::{Arc, OnceLock};

use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::ServerConfig;

use crate::config::TlsVersion;

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Session ticket keys shared by every listener and every rebuilt config, so
/// a client's ticket stays valid across certificate and config reloads. The
/// ticketer rotates its own keys.
fn ticketer() -> Result<Arc<dyn ProducesTickets>, rustls::Error> {
    static TICKETER: OnceLock<Arc<dyn ProducesTickets>> = OnceLock::new();
    if let Some(t) = TICKETER.get() {
        return Ok(Arc::clone(t));
    }
    let t = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    Ok(Arc::clone(TICKETER.get_or_init(|| t)))
}

/// The aws-lc-rs provider with its default suites, AES-128-GCM first.
///
/// The same set as the default, only the order differs: the default puts
/// AES-256-GCM with SHA-384 first. AES-128 matches the 128-bit security of
/// the P-256 and X25519 key exchange and signatures every handshake uses
/// anyway, and it is the order Mozilla's server guidelines and Go's
/// crypto/tls choose. SHA-256 runs on the SHA extensions of current x86 and
/// ARM cores while SHA-384 does not, so the handshake's transcript hash and
/// key schedule cost less, and AES-128 bulk encryption takes fewer rounds.
pub(crate) fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let preferred = [
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    // Sort the default list by the preference above rather than replacing
    // it, so the set stays exactly the provider's default (a suite the
    // provider drops, for example in FIPS mode, stays dropped).
    let rank = |s: &rustls::SupportedCipherSuite| {
        preferred
            .iter()
            .position(|p| p.suite() == s.suite())
            .unwrap_or(preferred.len())
    };
    provider.cipher_suites.sort_by_key(rank);
    provider
}

/// Build a server config around a certificate resolver and, for mTLS
/// listeners, a client certificate verifier.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    min_version: TlsVersion,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(min_version.and_newer())?;
    let mtls = client_verifier.is_some();
    let mut config = match client_verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    }
    .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    if mtls {
        // Resumption is off where clients present certificates: a resumed
        // session skips certificate verification, so a client revoked by a
        // new CRL, or no longer trusted after a CA rotation, or outside a
        // changed allow-list, could keep reconnecting on an old ticket.
        // Full handshakes cost a little CPU; they keep every connection
        // under the current trust.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    } else {
        config.ticketer = ticketer()?;
        config.session_storage = ServerSessionMemoryCache::new(4096);
    }
    config.max_early_data_size = 0;
    // The server's suite order (see `provider`) wins over the client's.
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    /// Complete a handshake in memory between `client` and `server`.
    fn handshake(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
        let mut buf = Vec::new();
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                return;
            }
            buf.clear();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            buf.clear();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        panic!("handshake did not complete");
    }

    /// A handshake in memory between a client built on `client_provider`
    /// (limited to `versions`) and sheath's server config for a
    /// self-signed `localhost`; the server side, done.
    fn serve_one(
        client_provider: rustls::crypto::CryptoProvider,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ServerConnection {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let certified =
            rustls::sign::CertifiedKey::from_der(vec![cert.cert.der().clone()], key, &provider)
                .unwrap();
        let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(certified));
        let server_config =
            server_config(resolver, &[ALPN_HTTP11], None, TlsVersion::default()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(client_provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client =
            rustls::ClientConnection::new(Arc::new(client_config), "localhost".try_into().unwrap())
                .unwrap();
        let mut server = rustls::ServerConnection::new(server_config).unwrap();
        handshake(&mut client, &mut server);
        server
    }

    /// Clients that offer the X25519MLKEM768 hybrid first get it (rustls
    /// takes the group in the client's order), so a recorded session
    /// cannot be decrypted later with a quantum computer; clients that
    /// offer only classical groups still connect.
    #[test]
    fn post_quantum_hybrid_key_exchange_when_the_client_offers_it() {
        use rustls::crypto::aws_lc_rs::kx_group;
        for (groups, want) in [
            (
                vec![kx_group::X25519MLKEM768, kx_group::X25519],
                rustls::NamedGroup::X25519MLKEM768,
            ),
            (vec![kx_group::X25519], rustls::NamedGroup::X25519),
            (vec![kx_group::SECP256R1], rustls::NamedGroup::secp256r1),
        ] {
            let client_provider = rustls::crypto::CryptoProvider {
                kx_groups: groups,
                ..rustls::crypto::aws_lc_rs::default_provider()
            };
            let server = serve_one(client_provider, rustls::DEFAULT_VERSIONS);
            assert_eq!(
                server.negotiated_key_exchange_group().map(|g| g.name()),
                Some(want)
            );
        }
    }

    /// The server's order decides, so a client that lists AES-256 first
    /// (as OpenSSL does) still gets AES-128-GCM, in TLS 1.3 and 1.2.
    #[test]
    fn aes_128_gcm_wins_over_a_client_preferring_aes_256() {
        for (version, client_order, want) in [
            (
                &rustls::version::TLS13,
                vec![cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_AES_128_GCM_SHA256],
                cs::TLS13_AES_128_GCM_SHA256,
            ),
            (
                &rustls::version::TLS12,
                vec![
                    cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                    cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                ],
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ),
        ] {
            let client_provider = rustls::crypto::CryptoProvider {
                cipher_suites: client_order,
                ..rustls::crypto::aws_lc_rs::default_provider()
            };
            let server = serve_one(client_provider, &[version]);
            assert_eq!(
                server.negotiated_cipher_suite().map(|s| s.suite()),
                Some(want.suite())
            );
        }
    }

    /// Reordering keeps exactly the provider's default set of suites.
    #[test]
    fn the_suite_set_is_the_providers_default() {
        let mut ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let mut default: Vec<_> = rustls::crypto::aws_lc_rs::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(ours[0], cs::TLS13_AES_128_GCM_SHA256.suite());
        ours.sort_by_key(|s| u16::from(*s));
        default.sort_by_key(|s| u16::from(*s));
        assert_eq!(ours, default);
    }
}
