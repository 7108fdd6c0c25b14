//! The TLS handshake under one deadline.
//!
//! The deadline covers reading the ClientHello and the whole handshake, so a
//! client that trickles bytes cannot hold a connection slot longer than the
//! configured time. Each handshake runs in its connection's own task, so a
//! stalled one never holds up the accept loop.

use std::sync::Arc;
use std::time::Duration;

use rustls::server::Acceptor;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

/// Why a handshake did not complete. `sni` is the name the client asked
/// for, when it got as far as sending one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration, Option<String>),
    #[error("reading ClientHello: {0}")]
    ClientHello(std::io::Error),
    #[error("{0}")]
    Tls(std::io::Error, Option<String>),
}

impl HandshakeError {
    /// The SNI the client sent, if any.
    pub fn sni(&self) -> Option<&str> {
        match self {
            HandshakeError::Timeout(_, sni) | HandshakeError::Tls(_, sni) => sni.as_deref(),
            HandshakeError::ClientHello(_) => None,
        }
    }

    /// A short machine-friendly reason, for logs and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Timeout(..) => "timeout",
            HandshakeError::ClientHello(_) => "bad_client_hello",
            HandshakeError::Tls(..) => "tls_error",
        }
    }
}

/// A completed handshake.
#[derive(Debug)]
pub struct Accepted {
    pub stream: TlsStream<TcpStream>,
    pub sni: Option<String>,
}

/// Run the server side of a TLS handshake on `tcp` within `deadline`.
///
/// `config` is read per connection, so a listener whose TLS settings were
/// swapped serves new connections with the new settings.
pub async fn accept(
    tcp: TcpStream,
    config: impl FnOnce(&rustls::server::ClientHello<'_>) -> Arc<ServerConfig>,
    deadline: Duration,
) -> Result<Accepted, HandshakeError> {
    let mut sni: Option<String> = None;
    let handshake = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), tcp)
            .await
            .map_err(HandshakeError::ClientHello)?;
        let hello = start.client_hello();
        sni = hello.server_name().map(str::to_owned);
        let config = config(&hello);
        let stream = start
            .into_stream(config)
            .await
            .map_err(|e| HandshakeError::Tls(e, None))?;
        Ok::<_, HandshakeError>(stream)
    };
    let result = tokio::time::timeout(deadline, handshake).await;
    match result {
        Ok(Ok(stream)) => Ok(Accepted { stream, sni }),
        Ok(Err(HandshakeError::Tls(e, _))) => Err(HandshakeError::Tls(e, sni)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(HandshakeError::Timeout(deadline, sni)),
    }
}
