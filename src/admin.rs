//! The admin endpoint: liveness, readiness, Prometheus metrics, the
//! certificates being served, and a reload trigger.
//!
//! Plain HTTP on loopback by default: it is meant for the orchestrator's
//! probes and a scraper inside the same network namespace, and it carries
//! nothing secret (no keys, only public certificate data). It stops
//! accepting when the process starts draining, so a probe sees a draining
//! sheath as not ready and, during an upgrade, only the successor answers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::app::Observed;
use crate::cert::CertStatus;
use crate::config::CertRef;
use crate::metrics;

const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything a request to the admin endpoint may read.
#[derive(Debug)]
struct Admin {
    observed: Observed,
    registry: Registry,
}

/// Serve the admin endpoint on `socket` until the process drains.
pub async fn serve(socket: TcpListener, observed: Observed) {
    if let Ok(addr) = socket.local_addr() {
        tracing::info!(%addr, "admin endpoint listening");
    }
    let admin = Arc::new(Admin {
        registry: metrics::registry(observed.clone()),
        observed,
    });
    let draining = admin.observed.draining.clone();
    loop {
        let (tcp, _) = tokio::select! {
            _ = draining.cancelled() => break,
            accepted = socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "admin accept failed");
                    // Out of fds: give closing connections a moment.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(route(&admin, req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        });
    }
    tracing::debug!("admin endpoint closed");
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

async fn route(admin: &Admin, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let allowed = match req.uri().path() {
        "/reload" => Method::POST,
        "/livez" | "/readyz" | "/metrics" | "/certs" => Method::GET,
        _ => return respond(StatusCode::NOT_FOUND, TEXT, "not found\n"),
    };
    if method != allowed && !(allowed == Method::GET && method == Method::HEAD) {
        let mut resp = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            format!("use {allowed}\n"),
        );
        resp.headers_mut().insert(
            ALLOW,
            HeaderValue::from_str(allowed.as_str()).expect("method"),
        );
        return resp;
    }
    let resp = match req.uri().path() {
        "/livez" => respond(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => {
            let not_ready = readiness(&admin.observed);
            if not_ready.is_empty() {
                respond(StatusCode::OK, TEXT, "ready\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready:\n{}\n", not_ready.join("\n")),
                )
            }
        }
        "/metrics" if accepts_openmetrics(&req) => respond(
            StatusCode::OK,
            OPENMETRICS,
            metrics::render(&admin.registry),
        ),
        "/metrics" => respond(
            StatusCode::OK,
            PROMETHEUS_TEXT,
            metrics::render_text(&admin.registry),
        ),
        "/certs" => respond(
            StatusCode::OK,
            "application/json",
            format!("{:#}\n", certs(&admin.observed)),
        ),
        "/reload" => reload(&admin.observed).await,
        _ => unreachable!("routed above"),
    };
    if method == Method::HEAD {
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Empty::new().boxed());
    }
    resp
}

/// Does the request's Accept header list OpenMetrics (as Prometheus does)?
/// Anyone else gets the Prometheus text format, which every scraper and
/// promtool reads.
fn accepts_openmetrics<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut params = range.split(';').map(str::trim);
            let media = params.next().unwrap_or_default();
            let refused = params
                .filter_map(|p| p.strip_prefix("q="))
                .any(|q| q.parse::<f32>().is_ok_and(|q| q <= 0.0));
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
}

/// Why the process is not ready, one line per reason; empty when ready.
pub fn readiness(observed: &Observed) -> Vec<String> {
    let mut reasons = Vec::new();
    if observed.draining.is_cancelled() {
        reasons.push("draining: shutting down".to_string());
    }
    let listeners = observed.listeners.load();
    if listeners.is_empty() {
        reasons.push("no listener is running".to_string());
    }
    for l in listeners.iter() {
        for status in l.cert_statuses() {
            if let Some(why) = cert_not_ready(&status) {
                match status.cert {
                    CertRef::Default => reasons.push(format!("listener `{}`: {why}", l.name)),
                    cert => reasons.push(format!("listener `{}` {cert}: {why}", l.name)),
                }
            }
        }
    }
    reasons
}

fn cert_not_ready(status: &CertStatus) -> Option<String> {
    let error = status
        .last_error
        .as_deref()
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default();
    let now = SystemTime::now();
    match &status.current {
        None => Some(format!("no certificate yet from {}{error}", status.source)),
        Some(c) if now > c.not_after => Some(format!(
            "certificate {} expired at {}{error}",
            c.serial,
            humantime::format_rfc3339_seconds(c.not_after)
        )),
        Some(c) if now < c.not_before => Some(format!(
            "certificate {} not valid before {}",
            c.serial,
            humantime::format_rfc3339_seconds(c.not_before)
        )),
        Some(_) => None,
    }
}

fn time(t: Option<SystemTime>) -> serde_json::Value {
    match t {
        Some(t) => humantime::format_rfc3339_seconds(t).to_string().into(),
        None => serde_json::Value::Null,
    }
}

/// The served certificates of every listener, as JSON: the default's
/// fields on the listener itself, the SNI certificates under `sni_certs`.
pub fn certs(observed: &Observed) -> serde_json::Value {
    let listeners = observed.listeners.load();
    let list: Vec<serde_json::Value> = listeners
        .iter()
        .map(|l| {
            let statuses = l.cert_statuses();
            let (default, by_sni) = statuses.split_first().expect("a default certificate");
            let mut entry = cert_json(default);
            entry["listener"] = l.name.clone().into();
            entry["address"] = l.local_addr.to_string().into();
            if !by_sni.is_empty() {
                entry["sni_certs"] = by_sni
                    .iter()
                    .map(|s| {
                        let mut c = cert_json(s);
                        c["cert"] = s.cert.to_string().into();
                        c
                    })
                    .collect();
            }
            entry
        })
        .collect();
    serde_json::json!({ "listeners": list })
}

fn cert_json(s: &CertStatus) -> serde_json::Value {
    let current = s.current.as_ref().map(|c| {
        serde_json::json!({
            "subject": c.subject,
            "issuer": c.issuer,
            "serial": c.serial,
            "sans": c.names,
            "sha256": c.sha256,
            "not_before": time(Some(c.not_before)),
            "not_after": time(Some(c.not_after)),
        })
    });
    serde_json::json!({
        "source": s.source,
        "valid": s.valid_now(),
        "certificate": current,
        "next_renewal": time(s.next_retry.or(s.renew_at)),
        "last_success": time(s.last_success),
        "last_failure": time(s.last_failure),
        "last_error": s.last_error,
        "consecutive_failures": s.consecutive_failures,
        "installs": s.installs,
        "chain_problems": s.chain_problems,
    })
}

async fn reload(observed: &Observed) -> Response<Body> {
    let (tx, rx) = oneshot::channel();
    if observed.reload.send(tx).await.is_err() {
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "reloads are not being served (shutting down)\n",
        );
    }
    match rx.await {
        Ok(Ok(generation)) => respond(
            StatusCode::OK,
            TEXT,
            format!("reloaded: configuration generation {generation}\n"),
        ),
        Ok(Err(e)) => respond(
            StatusCode::UNPROCESSABLE_ENTITY,
            TEXT,
            format!("reload failed; the running configuration stays in force: {e}\n"),
        ),
        Err(_) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "shutting down; reload ignored\n",
        ),
    }
}

/// `sheath healthcheck`: ask `/readyz`; `Ok` with the body when ready,
/// `Err` with the reason otherwise.
pub async fn healthcheck(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let ask = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot reach the admin endpoint at {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("admin endpoint at {addr}: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get("/readyz")
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .expect("static request");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("admin endpoint at {addr}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        if status == StatusCode::OK {
            Ok(body)
        } else {
            Err(body)
        }
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer from {addr} within {timeout:?}")),
    }
}
