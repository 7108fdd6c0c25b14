//! Bootstrapping trust in a CA from a URL and the SHA-256 fingerprint of its
//! root, the way `step ca bootstrap` does.
//!
//! The CA's TLS endpoint is contacted without verification; its root is
//! accepted only if its fingerprint matches. The root is looked for first in
//! the chain the server presents, then in `/roots.pem` (step-ca) fetched
//! over that same connection. Nothing from the unverified connection is
//! used unless it matches the fingerprint, and then only if it can serve
//! as a trust anchor: a CA certificate within its validity period.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::inspect::sha256_hex;
use super::{parse_chain_pem, CertInfo};
use crate::tls::danger::AcceptAnyChain;

const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    #[error("`{0}` is not an https:// URL with a host")]
    BadUrl(String),
    #[error("connecting to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{url}: no certificate with SHA-256 fingerprint {fingerprint} in the presented chain or in /roots.pem; refusing to trust it")]
    NoMatch { url: String, fingerprint: String },
    #[error("{url}: the certificate with SHA-256 fingerprint {fingerprint} {reason}; refusing to trust it")]
    NotUsable {
        url: String,
        fingerprint: String,
        reason: String,
    },
    #[error("bootstrapping from {0} timed out")]
    Timeout(String),
}

/// Fetch the root with `fingerprint` (lowercase hex) from the CA at `url`,
/// as PEM.
pub async fn fetch_root(url: &str, fingerprint: &str) -> Result<String, BootstrapError> {
    tokio::time::timeout(TIMEOUT, fetch(url, fingerprint))
        .await
        .map_err(|_| BootstrapError::Timeout(url.to_string()))?
}

async fn fetch(url: &str, fingerprint: &str) -> Result<String, BootstrapError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| BootstrapError::BadUrl(url.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(BootstrapError::BadUrl(url.to_string()));
    }
    let host = uri
        .host()
        .ok_or_else(|| BootstrapError::BadUrl(url.to_string()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let connect_err = |reason: String| BootstrapError::Connect {
        url: url.to_string(),
        reason,
    };

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| connect_err(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyChain(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let name = ServerName::try_from(host.clone()).map_err(|e| connect_err(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| connect_err(e.to_string()))?;

    let presented: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.clone().into_owned())
        .collect();
    let usable = |root: &CertificateDer<'_>| {
        check_anchor(root)
            .map(|()| to_pem(root))
            .map_err(|reason| BootstrapError::NotUsable {
                url: url.to_string(),
                fingerprint: fingerprint.to_string(),
                reason,
            })
    };
    if let Some(root) = presented
        .iter()
        .find(|c| sha256_hex(c.as_ref()) == fingerprint)
    {
        return usable(root);
    }

    // step-ca publishes its roots; ask over the same connection.
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    tokio::spawn(conn);
    let request = http::Request::get("/roots.pem")
        .header(
            http::header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .body(Empty::<bytes::Bytes>::new())
        .expect("static request is valid");
    if let Ok(response) = sender.send_request(request).await {
        if response.status().is_success() {
            // A roots file is small; do not let an impostor stream forever.
            if let Ok(body) = Limited::new(response.into_body(), 1 << 20).collect().await {
                let bytes = body.to_bytes();
                if let Ok(certs) = parse_chain_pem("roots.pem", &bytes) {
                    if let Some(root) = certs.iter().find(|c| sha256_hex(c.as_ref()) == fingerprint)
                    {
                        return usable(root);
                    }
                }
            }
        }
    }
    Err(BootstrapError::NoMatch {
        url: url.to_string(),
        fingerprint: fingerprint.to_string(),
    })
}

/// Can the certificate the fingerprint named be trusted as a root? The
/// fingerprint proves only which certificate it is. One that is no CA (the
/// server's own, when the operator took the fingerprint of the wrong
/// certificate) or is expired was written out as the root all the same,
/// with exit 0, and every later connection to the CA then failed to verify,
/// far from the cause.
fn check_anchor(der: &CertificateDer<'_>) -> Result<(), String> {
    let info = CertInfo::from_der(der).map_err(|e| format!("does not parse: {e}"))?;
    if !info.is_ca {
        return Err(format!(
            "(subject `{}`) is not a CA certificate; give the fingerprint of the CA's root, not of a server certificate",
            info.subject
        ));
    }
    let now = std::time::SystemTime::now();
    if now > info.not_after {
        return Err(format!(
            "(subject `{}`) expired at {}",
            info.subject,
            humantime::format_rfc3339_seconds(info.not_after)
        ));
    }
    if now < info.not_before {
        return Err(format!(
            "(subject `{}`) is not valid before {}",
            info.subject,
            humantime::format_rfc3339_seconds(info.not_before)
        ));
    }
    Ok(())
}

/// Does this PEM hold a certificate with the fingerprint, still usable as
/// a root? A pinned root that has expired since is not used; fetching it
/// again reports why.
pub fn pem_matches(pem: &str, fingerprint: &str) -> bool {
    parse_chain_pem("pinned root", pem.as_bytes())
        .map(|certs| {
            certs
                .iter()
                .any(|c| sha256_hex(c.as_ref()) == fingerprint && check_anchor(c).is_ok())
        })
        .unwrap_or(false)
}

/// DER → PEM.
pub fn to_pem(der: &CertificateDer<'_>) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
