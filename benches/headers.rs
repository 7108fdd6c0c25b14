//! Header rewriting: the per-request work `proxy::http` does on every
//! request head before it goes upstream (hop-by-hop removal, the length
//! in plain decimal, replaced forwarding headers, client identity headers).

use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::header::{HeaderMap, HeaderValue};
use rustls::pki_types::CertificateDer;
use sheath::config::ForwardIdentity;
use sheath::proxy::forward;
use sheath::tls::client_auth::ClientIdentity;

/// A browser-like request head, with a spoofed forwarding header that must
/// be replaced.
fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("host", "app.example.com:8443"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "en-US,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("connection", "keep-alive"),
        (
            "cookie",
            "session=0123456789abcdef0123456789abcdef; theme=dark",
        ),
        ("x-forwarded-for", "203.0.113.9"),
        ("upgrade-insecure-requests", "1"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    h
}

fn client_identity() -> ClientIdentity {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "frontend");
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/ns/prod/sa/frontend"
            .try_into()
            .expect("uri"),
    )];
    let cert = params.self_signed(&key).expect("cert");
    let der: CertificateDer<'static> = cert.der().clone();
    ClientIdentity::from_chain(&der, &[]).expect("identity")
}

fn rewrite(
    headers: &mut HeaderMap,
    client: &forward::ClientAddr,
    forward: &ForwardIdentity,
    id: Option<&ClientIdentity>,
) {
    forward::strip_hop_by_hop(headers, false);
    forward::plain_length(headers);
    let host = headers.get(http::header::HOST).cloned();
    forward::set_forwarded(headers, client, host.as_ref());
    forward::set_identity(headers, forward, id);
}

fn bench(c: &mut Criterion) {
    let template = request_headers();
    let peer: SocketAddr = "192.0.2.7:51234".parse().expect("addr");
    // Formatted once per connection, as proxy::http does.
    let peer = forward::ClientAddr::new(peer);
    let none = ForwardIdentity::default();
    let xfcc = ForwardIdentity {
        xfcc: true,
        ..ForwardIdentity::default()
    };
    let id = client_identity();

    c.bench_function("rewrite_request_headers", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| rewrite(h, &peer, &none, None),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("rewrite_request_headers_mtls_xfcc", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| rewrite(h, &peer, &xfcc, Some(&id)),
            BatchSize::SmallInput,
        )
    });

    let mut response = HeaderMap::new();
    for (name, value) in [
        ("content-type", "text/html; charset=utf-8"),
        ("content-length", "1234"),
        ("date", "Mon, 23 Nov 2026 10:00:00 GMT"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("cache-control", "no-store"),
    ] {
        response.insert(name, HeaderValue::from_static(value));
    }
    c.bench_function("strip_response_hop_by_hop", |b| {
        b.iter_batched_ref(
            || response.clone(),
            |h| forward::strip_hop_by_hop(h, false),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
