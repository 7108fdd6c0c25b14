//! The quickstart: a small plaintext backend on 127.0.0.1 with sheath in
//! front of it, using a certificate from sheath's local CA.
//!
//! The backend answers every request with what it received, so the user
//! sees the forwarding headers sheath adds.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Start the demo backend on an ephemeral loopback port.
pub async fn start_backend() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut text = format!(
        "Hello from the demo backend, served over TLS by sheath.\n\n{} {} {:?}\n",
        req.method(),
        req.uri(),
        req.version()
    );
    for (name, value) in req.headers() {
        text.push_str(&format!(
            "{name}: {}\n",
            value.to_str().unwrap_or("<binary>")
        ));
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
    if let Ok(n) = body {
        if n > 0 {
            text.push_str(&format!("\n(received a {n}-byte body)\n"));
        }
    }
    Ok(Response::new(Full::new(Bytes::from(text))))
}
