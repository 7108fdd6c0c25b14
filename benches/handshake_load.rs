//! Load client for W3 (and W5L) of `benches/compare.py`: full TLS 1.3
//! handshakes, one HTTP/1.1 request each, from many connections at once.
//!
//! The usual clients cannot do this at a rate that loads a proxy: h2load
//! offers the previous session when it reconnects (so its handshakes after
//! the first are resumptions), and an OpenSSL 3.0 client (`openssl s_time
//! -new`) spends ~1.4 ms of CPU per full handshake, so four of them keep a
//! proxy at a quarter of its core, where its CPU per handshake is mostly
//! waking up from idle. This client never offers a session, checks the
//! server's handshake signature like any client (but not the certificate's
//! chain, which would only spend the client's CPU, the limit here) and
//! offers what h2load and s_time offer: TLS 1.3, an X25519 key share, ALPN http/1.1.
//!
//! ```text
//! handshake_load ADDR CONNECTIONS SECONDS PATH [CLIENT_CERT CLIENT_KEY]
//! ```
//!
//! prints `N connections, E errors in S s` (and the first error on stderr).
//! A connection counts once the proxy completed the handshake and answered
//! 200. `cargo bench` runs every bench target with `--bench`; this one has
//! nothing to measure alone and says so.
//!
//! With a client certificate and key (PEM) it presents them when the proxy
//! asks, for mutual TLS: each handshake then costs the proxy a verification
//! of the client's signature too (and of its chain, for a proxy that does
//! not remember verified chains). It names the server `localhost` in SNI
//! then, as the request's `Host` does: a server that verifies clients on
//! some names only (Caddy) refuses a request whose `Host` names another
//! server than the handshake did.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};
use rustls::ClientConfig;
use sheath::tls::danger::AcceptAnyChain;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const USAGE: &str = "usage: handshake_load ADDR CONNECTIONS SECONDS PATH \
                     [CLIENT_CERT CLIENT_KEY] (a load client for benches/compare.py, W3 and W5L)";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(args.len() == 4 || args.len() == 6) || args.iter().any(|a| a.starts_with("--")) {
        eprintln!("{USAGE}");
        // Under `cargo bench` (which passes --bench) this is not a failure.
        std::process::exit(if args.iter().any(|a| a == "--bench") {
            0
        } else {
            2
        });
    }
    let parsed = (
        args[0].parse::<SocketAddr>(),
        args[1].parse::<usize>(),
        args[2].parse::<f64>(),
    );
    let (Ok(addr), Ok(conns), Ok(seconds)) = parsed else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let path = args[3].clone();
    let (config, server_name) = match args.get(4..6) {
        Some([cert, key]) => (
            load_client_auth(cert, key).and_then(|auth| client_config(Some(auth))),
            ServerName::DnsName(DnsName::try_from("localhost").expect("a DNS name")),
        ),
        // An IP address: no SNI, as h2load and s_time send for 127.0.0.1.
        _ => (client_config(None), ServerName::IpAddress(addr.ip().into())),
    };
    let config = config.unwrap_or_else(|e| {
        eprintln!("handshake_load: {e}");
        std::process::exit(2);
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (ok, errors, elapsed) =
        runtime.block_on(run(addr, server_name, conns, seconds, path, config));
    println!(
        "{ok} connections, {errors} errors in {:.3} s",
        elapsed.as_secs_f64()
    );
}

type ClientAuth = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load_client_auth(cert: &str, key: &str) -> Result<ClientAuth, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert}: no certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    Ok((chain, key))
}

async fn run(
    addr: SocketAddr,
    server_name: ServerName<'static>,
    conns: usize,
    seconds: f64,
    path: String,
    config: ClientConfig,
) -> (u64, u64, Duration) {
    let connector = TlsConnector::from(Arc::new(config));
    let request: Arc<[u8]> =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .into_bytes()
            .into();
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (connector, request) = (connector.clone(), Arc::clone(&request));
        let server_name = server_name.clone();
        let (ok, errors) = (Arc::clone(&ok), Arc::clone(&errors));
        tasks.spawn(async move {
            let mut response = Vec::with_capacity(1024);
            while Instant::now() < deadline {
                response.clear();
                match one(&connector, addr, &server_name, &request, &mut response).await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        // The first error says why; the count says how often.
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("handshake_load: first error: {e}");
                        }
                        0
                    }
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    (
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        started.elapsed(),
    )
}

/// One connection: handshake, request, the whole response.
async fn one(
    connector: &TlsConnector,
    addr: SocketAddr,
    server_name: &ServerName<'static>,
    request: &[u8],
    response: &mut Vec<u8>,
) -> std::io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut tls = connector.connect(server_name.clone(), tcp).await?;
    tls.write_all(request).await?;
    // Some proxies close without close_notify after `Connection: close`;
    // the response is what counts.
    let read = tls.read_to_end(response).await;
    if response.starts_with(b"HTTP/1.1 200") || response.starts_with(b"HTTP/1.0 200") {
        Ok(())
    } else {
        read?;
        Err(std::io::Error::other("no 200 response"))
    }
}

fn client_config(client_auth: Option<ClientAuth>) -> Result<ClientConfig, String> {
    let provider = CryptoProvider {
        kx_groups: vec![aws_lc_rs::kx_group::X25519],
        ..aws_lc_rs::default_provider()
    };
    let provider = Arc::new(provider);
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with the aws-lc-rs provider")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyChain(provider)));
    let mut config = match client_auth {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("client certificate and key: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
