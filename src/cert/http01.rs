//! The plain-HTTP listener for ACME HTTP-01 challenges.
//!
//! It serves `/.well-known/acme-challenge/<token>` from the pending
//! challenges and redirects everything else to https, so port 80 is useful
//! to people too. Nothing else is ever served in plaintext.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Challenges;

const PREFIX: &str = "/.well-known/acme-challenge/";

/// Serve challenges on `listener` until `stop`.
pub async fn serve(listener: TcpListener, challenges: Arc<Challenges>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP-01 accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let challenges = Arc::clone(&challenges);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let challenges = Arc::clone(&challenges);
                async move { Ok::<_, Infallible>(answer(&req, &challenges)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
        });
    }
}

fn answer(req: &Request<Incoming>, challenges: &Challenges) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if let Some(token) = path.strip_prefix(PREFIX) {
        return match challenges.http_answer(token) {
            Some(key_authorization) => Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(Full::new(Bytes::from(key_authorization)))
                .expect("static response"),
            None => Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Full::new(Bytes::from_static(b"unknown challenge token\n")))
                .expect("static response"),
        };
    }
    // The Host must be an authority and nothing more: one with user
    // information ('app.test@evil.example') or a path ('evil.example/x')
    // was copied into the Location, sending the client to another host.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(crate::proxy::http::host_authority);
    match host {
        Some(authority) => {
            let target = format!(
                "https://{}{}",
                authority.host(),
                req.uri().path_and_query().map_or("/", |pq| pq.as_str())
            );
            Response::builder()
                .status(StatusCode::MOVED_PERMANENTLY)
                .header(header::LOCATION, target)
                .body(Full::new(Bytes::new()))
                .unwrap_or_else(|_| bad_request())
        }
        None => bad_request(),
    }
}

fn bad_request() -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .body(Full::new(Bytes::from_static(b"missing or invalid Host\n")))
        .expect("static response")
}
