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
        // A distinct name per CA: chain building and CRL matching go by
        // name, and tests often use several CAs at once.
        params.distinguished_name.push(
            DnType::CommonName,
            format!("sheath test CA {:08x}", rand::random::<u32>()),
        );
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
        self.server_cert_for_key(names, not_before, not_after, &rcgen::PKCS_ECDSA_P256_SHA256)
    }

    /// A server certificate valid from now for an hour, with a key of
    /// `alg` (`rcgen::PKCS_RSA_SHA256`, `PKCS_ED25519`, …).
    pub fn server_cert_keyed(
        &self,
        names: &[&str],
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> (String, String) {
        let now = SystemTime::now();
        self.server_cert_for_key(
            names,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
            alg,
        )
    }

    fn server_cert_for_key(
        &self,
        names: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
        alg: &'static rcgen::SignatureAlgorithm,
    ) -> (String, String) {
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        leaf(names, not_before, not_after, alg, &issuer)
    }

    /// An intermediate CA named `cn` under this CA, valid from
    /// `not_before` to `not_after`.
    pub fn intermediate(
        &self,
        cn: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Intermediate {
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        intermediate(cn, not_before, not_after, &issuer)
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

    /// The CA's private key, PEM, for issuing with `openssl x509 -req`.
    pub fn ca_key_pem(&self) -> String {
        self.ca_key.serialize_pem()
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

/// A server certificate for `names` signed by `issuer`, and its key: PEM.
fn leaf(
    names: &[&str],
    not_before: SystemTime,
    not_after: SystemTime,
    alg: &'static rcgen::SignatureAlgorithm,
    issuer: &Issuer<'_, &KeyPair>,
) -> (String, String) {
    let key = KeyPair::generate_for(alg).unwrap();
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
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// An intermediate CA: its certificate, and what it takes to issue more.
pub struct Intermediate {
    pub pem: String,
    params: CertificateParams,
    key: KeyPair,
}

fn intermediate(
    cn: &str,
    not_before: SystemTime,
    not_after: SystemTime,
    issuer: &Issuer<'_, &KeyPair>,
) -> Intermediate {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let cert = params.signed_by(&key, issuer).unwrap();
    Intermediate {
        pem: cert.pem(),
        params,
        key,
    }
}

impl Intermediate {
    /// An intermediate CA named `cn` under this one.
    pub fn intermediate(
        &self,
        cn: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Intermediate {
        intermediate(
            cn,
            not_before,
            not_after,
            &Issuer::from_params(&self.params, &self.key),
        )
    }

    /// A server certificate for `names`, valid from a minute ago for an
    /// hour, and its key: PEM.
    pub fn server_cert(&self, names: &[&str]) -> (String, String) {
        let now = SystemTime::now();
        leaf(
            names,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &Issuer::from_params(&self.params, &self.key),
        )
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

/// What a client certificate should say.
#[derive(Clone)]
pub struct ClientSpec {
    pub cn: String,
    pub ou: Vec<String>,
    pub dns: Vec<String>,
    pub uris: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
    pub eku: Vec<ExtendedKeyUsagePurpose>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    pub serial: u64,
}

impl ClientSpec {
    pub fn new(cn: &str) -> ClientSpec {
        let now = SystemTime::now();
        ClientSpec {
            cn: cn.to_string(),
            ou: vec![],
            dns: vec![],
            uris: vec![],
            ips: vec![],
            eku: vec![ExtendedKeyUsagePurpose::ClientAuth],
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(3600),
            is_ca: false,
            serial: rand::random::<u32>() as u64 + 1,
        }
    }
}

/// A client certificate and key, ready for rustls, curl and openssl.
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    pub serial: u64,
}

impl ClientCert {
    pub fn rustls_config(
        &self,
        roots: Arc<RootCertStore>,
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        sheath::install_crypto_provider();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![self.der.clone()], key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// Write `<stem>.pem` and `<stem>.key` under `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

impl TestPki {
    /// A client certificate issued by this CA (or self-signed).
    pub fn client(&self, spec: &ClientSpec) -> ClientCert {
        self.client_signed(spec, false)
    }

    pub fn client_self_signed(&self, spec: &ClientSpec) -> ClientCert {
        self.client_signed(spec, true)
    }

    fn client_signed(&self, spec: &ClientSpec, self_signed: bool) -> ClientCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.cn.as_str());
        for ou in &spec.ou {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, ou.as_str());
        }
        let mut sans = Vec::new();
        for d in &spec.dns {
            sans.push(SanType::DnsName(d.as_str().try_into().unwrap()));
        }
        for u in &spec.uris {
            sans.push(SanType::URI(u.as_str().try_into().unwrap()));
        }
        for ip in &spec.ips {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        params.extended_key_usages = spec.eku.clone();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages.push(KeyUsagePurpose::KeyCertSign);
        }
        params.not_before = spec.not_before.into();
        params.not_after = spec.not_after.into();
        params.serial_number = Some(rcgen::SerialNumber::from(spec.serial));
        let cert = if self_signed {
            params.self_signed(&key).unwrap()
        } else {
            let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
            params.signed_by(&key, &issuer).unwrap()
        };
        ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            serial: spec.serial,
        }
    }

    /// A CRL revoking `serials`, PEM.
    pub fn crl(&self, serials: &[u64]) -> String {
        let now = SystemTime::now();
        self.crl_valid(
            serials,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
        .0
    }

    /// A CRL revoking `serials`, issued at `this_update` and due for
    /// replacement at `next_update`: PEM and DER.
    pub fn crl_valid(
        &self,
        serials: &[u64],
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> (String, Vec<u8>) {
        let params = rcgen::CertificateRevocationListParams {
            this_update: this_update.into(),
            next_update: next_update.into(),
            crl_number: rcgen::SerialNumber::from(rand::random::<u32>() as u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*s),
                    revocation_time: this_update.into(),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let crl = params.signed_by(&issuer).unwrap();
        (crl.pem().unwrap(), crl.der().to_vec())
    }
}
