//! PROXY protocol headers towards a TCP-mode upstream, so L4 backends learn
//! who is calling: the client address always, and in v2 the TLS details and
//! the verified client certificate as TLVs.
//!
//! v2 TLVs sent: `PP2_TYPE_ALPN` (the protocol negotiated, if any),
//! `PP2_TYPE_AUTHORITY` (the SNI), `PP2_TYPE_SSL` with the `PP2_CLIENT_SSL`
//! flag (and, for a client with a certificate, `PP2_CLIENT_CERT_CONN` and
//! `PP2_CLIENT_CERT_SESS`: mTLS listeners never resume, so the session is
//! the connection's), verify = 0 and the sub-TLVs `PP2_SUBTYPE_SSL_VERSION`, `PP2_SUBTYPE_SSL_CIPHER` and
//! `PP2_SUBTYPE_SSL_CN`; and, in the range the specification reserves for
//! custom use, [`PP2_TYPE_SHEATH_CLIENT_CERT`] with the client's leaf
//! certificate in DER.

use std::net::SocketAddr;

use ppp::v2::{Builder, Command, Protocol, Type, Version};

use super::ConnInfo;
use crate::config::ProxyProtocol;

/// Custom TLV carrying the verified client certificate (DER).
pub const PP2_TYPE_SHEATH_CLIENT_CERT: u8 = 0xE0;
const PP2_CLIENT_SSL: u8 = 0x01;
const PP2_CLIENT_CERT_CONN: u8 = 0x02;
const PP2_CLIENT_CERT_SESS: u8 = 0x04;

/// The header to write to the upstream before any client byte; `alpn` is
/// the protocol the client and sheath agreed on.
pub fn header(
    version: ProxyProtocol,
    conn: &ConnInfo,
    local: SocketAddr,
    alpn: Option<&[u8]>,
) -> std::io::Result<Vec<u8>> {
    // Both of one family, so a v1 line never mixes TCP4 and TCP6 addresses.
    let peer = super::unmapped(conn.peer);
    let local = super::unmapped(local);
    match version {
        ProxyProtocol::V1 => {
            let addresses: ppp::v1::Addresses = match (peer, local) {
                (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
                    (peer, local).into()
                }
                _ => ppp::v1::Addresses::Unknown,
            };
            // ppp writes the whole line, its CRLF included; another one
            // would reach the upstream as the client's first two bytes.
            Ok(addresses.to_string().into_bytes())
        }
        ProxyProtocol::V2 => {
            let mut builder = Builder::with_addresses(
                Version::Two | Command::Proxy,
                Protocol::Stream,
                (peer, local),
            );
            if let Some(alpn) = alpn {
                builder = builder.write_tlv(Type::ALPN, alpn)?;
            }
            if let Some(sni) = &conn.sni {
                builder = builder.write_tlv(Type::Authority, sni.as_bytes())?;
            }
            builder = builder.write_tlv(Type::SSL, &ssl_tlv(conn))?;
            if let Some(identity) = &conn.identity {
                builder = builder.write_tlv(PP2_TYPE_SHEATH_CLIENT_CERT, &identity.cert)?;
            }
            builder.build()
        }
    }
}

/// `PP2_TYPE_SSL` value: client flags, verify result, then sub-TLVs.
fn ssl_tlv(conn: &ConnInfo) -> Vec<u8> {
    let mut client = PP2_CLIENT_SSL;
    if conn.identity.is_some() {
        client |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS;
    }
    let mut value = vec![client];
    // 0: the client certificate, if any, was verified (unverified clients
    // never get this far).
    value.extend_from_slice(&0u32.to_be_bytes());
    let mut sub = |kind: Type, data: &[u8]| {
        value.push(kind as u8);
        value.extend_from_slice(&(data.len() as u16).to_be_bytes());
        value.extend_from_slice(data);
    };
    sub(
        Type::SSLVersion,
        tls_version_name(conn.tls_version).as_bytes(),
    );
    sub(Type::SSLCipher, conn.cipher.as_bytes());
    if let Some(cn) = conn.identity.as_ref().and_then(|i| i.cn.as_deref()) {
        sub(Type::SSLCommonName, cn.as_bytes());
    }
    value
}

/// rustls says `TLSv1_3`; the convention (OpenSSL, HAProxy) is `TLSv1.3`.
fn tls_version_name(rustls_name: &str) -> String {
    rustls_name.replace('_', ".")
}
