//! sheath: a TLS-terminating sidecar that lives in the network namespace of
//! the service it protects, manages its own certificate and swaps
//! certificates and configuration without dropping connections.
//!
//! The binary in `main.rs` is a thin shell over this library so that the
//! integration tests and benchmarks can run the real proxy in-process.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cert;
pub mod cli;
pub mod config;
pub mod demo;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod resources;
pub mod shutdown;
pub mod tls;
pub mod upgrade;
pub mod workers;

pub use app::{Running, ShutdownOutcome};
pub use config::{Config, ConfigError};

/// Install the process-wide rustls crypto provider (aws-lc-rs).
///
/// Every `ServerConfig` and `ClientConfig` in sheath is built with an explicit
/// provider, but libraries that build their own configs (the ACME client, test
/// clients) fall back to the process default, so it is installed once here.
/// Calling it more than once is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
