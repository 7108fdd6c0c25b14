//! A throwaway PKI per test: a CA, a server certificate for localhost and
//! 127.0.0.1, written to files the proxy can load.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

pub struct TestPki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    ca_params: CertificateParams,
    ca_key: KeyPair,
}

/// A PEM certificate and key on disk.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestPki {
    pub fn new() -> TestPki {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "sheath test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&ca_key).unwrap();
        TestPki {
            ca_pem: cert.pem(),
            ca_der: cert.der().clone(),
            ca_params: params,
            ca_key,
        }
    }

    /// A server certificate valid from now for `lifetime`.
    pub fn server_cert(&self, names: &[&str], lifetime: Duration) -> (String, String) {
        let now = SystemTime::now();
        self.server_cert_valid(names, now - Duration::from_secs(60), now + lifetime)
    }

    /// A server certificate with an explicit validity window.
    pub fn server_cert_valid(
        &self,
        names: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().unwrap()),
            })
            .collect();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Write a localhost server certificate and key under `dir`.
    pub fn write_server(&self, dir: &Path, stem: &str) -> CertFiles {
        let (cert_pem, key_pem) =
            self.server_cert(&["localhost", "127.0.0.1"], Duration::from_secs(3600));
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &cert_pem).unwrap();
        std::fs::write(&key, &key_pem).unwrap();
        CertFiles {
            cert,
            key,
            cert_pem,
            key_pem,
        }
    }

    /// Write the CA certificate under `dir`, for curl/openssl.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        Arc::new(roots)
    }
}

/// Roots from a PEM file (for example sheath's local CA).
pub fn roots_from_pem(pem: &str) -> Arc<RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

/// A `[listener.cert]` TOML block for files written by [`TestPki::write_server`].
pub fn files_cert_toml(files: &CertFiles) -> String {
    format!(
        "[listener.cert]\nsource = \"files\"\ncert = \"{}\"\nkey = \"{}\"\n",
        files.cert.display(),
        files.key.display()
    )
}
