//! The Pebble harness itself: Pebble starts, serves its ACME directory over
//! TLS trusted via the per-instance API CA, and hands out its issuing root.

use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::common::pebble::{free_port, Pebble, PebbleOptions};
use crate::common::within;

#[tokio::test]
async fn pebble_smoke_directory_and_root() {
    let started = Instant::now();
    let opts = PebbleOptions {
        http_port: free_port(),
        tls_port: free_port(),
        ..Default::default()
    };
    let Some(mut pebble) = Pebble::start(opts).await else {
        return;
    };
    eprintln!("pebble ready after {:?}", started.elapsed());

    let (status, dir) = within("directory", pebble.get(&pebble.directory))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(dir.contains("newOrder"), "directory: {dir}");
    assert!(dir.contains("newNonce"), "directory: {dir}");

    let api_ca = std::fs::read(&pebble.api_root_pem_path).unwrap();
    let api_ca = CertificateDer::from_pem_slice(&api_ca).unwrap();
    assert_eq!(pebble.api_ca_sha256, crate::common::sha256(&api_ca));

    let root = within("issuing root", pebble.issuing_root_pem()).await;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(root.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(certs.len(), 1, "root: {root}");

    // An outage and recovery: Pebble comes back on the same ports with a new root.
    pebble.stop();
    assert!(pebble.get(&pebble.directory).await.is_err());
    within("restart", pebble.restart()).await;
    let root2 = within("issuing root", pebble.issuing_root_pem()).await;
    assert_ne!(root, root2, "pebble makes a new root on restart");
    eprintln!("smoke done after {:?}", started.elapsed());
}
