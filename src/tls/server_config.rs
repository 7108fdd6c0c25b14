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

/// Build a server config around a certificate resolver and, for mTLS
/// listeners, a client certificate verifier.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
    client_verifier: Option<Arc<dyn ClientCertVerifier>>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
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
    // The server's suite order (strongest first) wins over the client's.
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}
