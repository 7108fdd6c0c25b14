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

    /// Why, as one of a small fixed set: log field and metrics label.
    pub fn reason(&self) -> FailureReason {
        match self {
            HandshakeError::Timeout(..) => FailureReason::Timeout,
            HandshakeError::ClientHello(e) => match rustls_error(e) {
                Some(_) => FailureReason::BadClientHello,
                None => FailureReason::Io,
            },
            HandshakeError::Tls(e, _) => match rustls_error(e) {
                Some(e) => FailureReason::of(e),
                None => FailureReason::Io,
            },
        }
    }
}

/// tokio-rustls reports TLS errors as `io::Error`s carrying the
/// `rustls::Error`; anything else is the transport failing.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Handshake failure classes. Kept small and fixed so that a metrics
/// label never grows with what clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    Timeout,
    /// Not TLS, or a ClientHello rustls cannot parse.
    BadClientHello,
    /// No common protocol version, cipher suite or ALPN protocol.
    Incompatible,
    /// No certificate to serve (e.g. waiting for the first ACME issuance).
    NoCertificate,
    /// A client certificate was required and none was presented.
    ClientCertMissing,
    /// The client certificate failed verification or the allow-list.
    ClientCertRejected,
    /// The client aborted with an alert, e.g. it does not trust sheath.
    AlertReceived,
    /// Any other TLS protocol error.
    Protocol,
    /// The connection failed underneath TLS (reset, early close).
    Io,
    /// Outbound mode: the remote peer's certificate failed verification
    /// (unknown CA, wrong name, expired).
    PeerCertRejected,
}

impl FailureReason {
    pub const ALL: [FailureReason; 10] = [
        FailureReason::Timeout,
        FailureReason::BadClientHello,
        FailureReason::Incompatible,
        FailureReason::NoCertificate,
        FailureReason::ClientCertMissing,
        FailureReason::ClientCertRejected,
        FailureReason::AlertReceived,
        FailureReason::Protocol,
        FailureReason::Io,
        FailureReason::PeerCertRejected,
    ];

    /// The class of a failed outbound (client-side) handshake.
    pub fn of_outbound(e: &std::io::Error) -> FailureReason {
        match rustls_error(e) {
            Some(rustls::Error::InvalidCertificate(_)) => FailureReason::PeerCertRejected,
            Some(e) => FailureReason::of(e),
            None => FailureReason::Io,
        }
    }

    fn of(e: &rustls::Error) -> FailureReason {
        use rustls::Error as E;
        match e {
            E::NoCertificatesPresented => FailureReason::ClientCertMissing,
            E::InvalidCertificate(_) | E::InvalidCertRevocationList(_) => {
                FailureReason::ClientCertRejected
            }
            E::PeerIncompatible(_) | E::NoApplicationProtocol => FailureReason::Incompatible,
            E::AlertReceived(_) => FailureReason::AlertReceived,
            // What rustls says when the resolver has nothing to offer.
            E::General(m) if m.contains("no server certificate") => FailureReason::NoCertificate,
            _ => FailureReason::Protocol,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::BadClientHello => "bad_client_hello",
            FailureReason::Incompatible => "incompatible",
            FailureReason::NoCertificate => "no_certificate",
            FailureReason::ClientCertMissing => "client_cert_missing",
            FailureReason::ClientCertRejected => "client_cert_rejected",
            FailureReason::AlertReceived => "alert_received",
            FailureReason::Protocol => "protocol_error",
            FailureReason::Io => "io_error",
            FailureReason::PeerCertRejected => "peer_cert_rejected",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
