//! Certificate resolution: what rustls calls on every handshake.
//!
//! `ListenerCerts::resolve` takes a `ClientHello`, which only rustls can
//! build; a real one is made here by feeding a rustls client's first flight
//! into a server-side `Acceptor`, so the benchmark goes through the same
//! trait call as a handshake does. Cases: a listener with one certificate;
//! one with sixteen SNI certificates, the client asking for the last
//! (every certificate's names are compared); and resolution while another
//! thread keeps swapping certificates, the situation of a rotation.

use std::io::Cursor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::{Accepted, Acceptor, ResolvesServerCert};
use sheath::tls::{CertResolver, ListenerCerts};

fn certified(name: &str) -> (Arc<rustls::sign::CertifiedKey>, sheath::cert::CertInfo) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("cert");
    let der: CertificateDer<'static> = cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    sheath::cert::certified_key("bench", vec![der], key).expect("certified key")
}

/// A ClientHello for `name` as a rustls client sends it, parsed by a
/// server Acceptor.
fn client_hello(name: &str) -> Accepted {
    let roots = Arc::new(rustls::RootCertStore::empty());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut client = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(name.to_string()).expect("name"),
    )
    .expect("client");
    let mut flight = Vec::new();
    client.write_tls(&mut flight).expect("client hello");
    let mut acceptor = Acceptor::default();
    acceptor
        .read_tls(&mut Cursor::new(flight))
        .expect("read hello");
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted,
        _ => panic!("the acceptor did not take the ClientHello"),
    }
}

fn bench(c: &mut Criterion) {
    let (key, info) = certified("localhost");
    let default = Arc::new(CertResolver::new(Arc::clone(&key), info.clone()));
    let single = ListenerCerts::new(vec![Arc::clone(&default)]);
    let accepted = client_hello("localhost");

    c.bench_function("resolve", |b| {
        b.iter(|| {
            single
                .resolve(accepted.client_hello())
                .expect("certificate")
        })
    });

    let mut certs = vec![Arc::clone(&default)];
    for i in 0..16 {
        let (key, info) = certified(&format!("svc{i}.test"));
        certs.push(Arc::new(CertResolver::new(key, info)));
    }
    let sixteen = ListenerCerts::new(certs);
    let last = client_hello("svc15.test");
    c.bench_function("resolve_sni_last_of_16", |b| {
        b.iter(|| sixteen.resolve(last.client_hello()).expect("certificate"))
    });

    // Readers while a writer publishes a new certificate in a tight loop:
    // an ArcSwap load must stay cheap even then.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let resolver = Arc::clone(&default);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                resolver.swap(Arc::clone(&key), info.clone());
                std::thread::yield_now();
            }
        })
    };
    c.bench_function("resolve_during_swaps", |b| {
        b.iter(|| {
            single
                .resolve(accepted.client_hello())
                .expect("certificate")
        })
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
}

criterion_group!(benches, bench);
criterion_main!(benches);
