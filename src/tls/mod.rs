//! TLS termination: the server configuration policy, the lock-free
//! certificate resolver, and the handshake under one deadline; and the
//! client side of outbound mode.

pub mod client_auth;
pub mod danger;
pub mod handshake;
pub mod outbound;
pub mod resolver;
pub mod server_config;

pub use handshake::{accept, Accepted, HandshakeError};

/// Add the system's root certificates (rustls-native-certs) to `roots`;
/// how many were usable.
pub fn add_system_roots(roots: &mut rustls::RootCertStore) -> usize {
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs).0
}
pub use resolver::{CertResolver, ListenerCerts};
pub use server_config::{server_config, ALPN_H2, ALPN_HTTP11};
