//! A front for Pebble's API that answers chosen requests with the failures
//! a production CA gives (rate limits with `Retry-After`, server errors)
//! and passes everything else through to the real Pebble.
//!
//! Pebble builds every URL it hands out (directory, order, authorization,
//! finalize) from the request's `Host`, and checks each JWS `url` against
//! the same, so passing `Host` through unchanged keeps a client talking to
//! the front for the whole order without any rewriting. The front serves
//! Pebble's own API certificate, so the client's `ca_root` trusts both.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::pebble::Pebble;

/// A canned answer for the next request whose path starts with `path`.
#[derive(Debug, Clone)]
pub struct Fault {
    pub path: &'static str,
    pub status: u16,
    /// RFC 8555 problem type, after `urn:ietf:params:acme:error:`.
    pub problem: &'static str,
    pub retry_after_secs: Option<u64>,
}

/// One request the front saw: its path, when, and the status it got.
#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    pub at: Instant,
    pub status: u16,
}

#[derive(Debug, Default)]
struct State {
    faults: VecDeque<Fault>,
    hits: Vec<Hit>,
}

#[derive(Debug)]
pub struct AcmeFront {
    /// The directory URL to give sheath instead of Pebble's.
    pub directory: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl AcmeFront {
    pub async fn start(pebble: &Pebble) -> AcmeFront {
        let dir = pebble.dir.path();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.join("api-cert.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("api-key.pem")).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pebble.api_roots())
        .with_no_client_auth();

        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let upstream: SocketAddr = ([127, 0, 0, 1], pebble.api_port).into();
        let state = Arc::new(Mutex::new(State::default()));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let task = {
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = socket.accept().await else {
                        continue;
                    };
                    let (acceptor, connector) = (acceptor.clone(), connector.clone());
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper::service::service_fn(move |req| {
                            handle(req, upstream, connector.clone(), Arc::clone(&state))
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                }
            })
        };
        AcmeFront {
            directory: format!("https://{addr}/dir"),
            state,
            task,
        }
    }

    /// Answer the next requests matching each fault, in order.
    pub fn inject(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.lock().unwrap().faults.extend(faults);
    }

    /// Requests seen whose path starts with `prefix`.
    pub fn hits(&self, prefix: &str) -> Vec<Hit> {
        let state = self.state.lock().unwrap();
        state
            .hits
            .iter()
            .filter(|h| h.path.starts_with(prefix))
            .cloned()
            .collect()
    }
}

impl Drop for AcmeFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    req: Request<Incoming>,
    upstream: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let path = req.uri().path().to_string();
    let at = Instant::now();
    let fault = {
        let mut state = state.lock().unwrap();
        let position = state.faults.iter().position(|f| path.starts_with(f.path));
        position.and_then(|i| state.faults.remove(i))
    };
    let response = match fault {
        Some(fault) => {
            let body = format!(
                r#"{{"type":"urn:ietf:params:acme:error:{}","detail":"injected by the test's front","status":{}}}"#,
                fault.problem, fault.status
            );
            let mut response = Response::builder()
                .status(fault.status)
                .header("content-type", "application/problem+json");
            if let Some(secs) = fault.retry_after_secs {
                response = response.header("retry-after", secs.to_string());
            }
            response.body(Full::new(Bytes::from(body))).unwrap()
        }
        None => forward(req, upstream, connector).await?,
    };
    state.lock().unwrap().hits.push(Hit {
        path,
        at,
        status: response.status().as_u16(),
    });
    Ok(response)
}

async fn forward(
    req: Request<Incoming>,
    upstream: SocketAddr,
    connector: tokio_rustls::TlsConnector,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let tcp = tokio::net::TcpStream::connect(upstream).await?;
    let name = ServerName::IpAddress(upstream.ip().into());
    let tls = connector.connect(name, tcp).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    // Host (the front's address) passes through: Pebble's URLs follow it.
    let response = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(std::io::Error::other)?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
