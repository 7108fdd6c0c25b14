//! sheath's own certificate authority: the zero-setup default.
//!
//! An ECDSA P-256 root is created on first start and kept in
//! `<state_dir>/local-ca/` (`ca.pem`, and `ca.key` with mode 0600). The pair
//! is first written into a temporary directory that is renamed into place,
//! so a crash never leaves a half CA behind, and two processes starting at
//! once end up with the same CA. An existing CA that cannot be read is an
//! error: regenerating it silently would break every client that trusts it.

use std::io::ErrorKind;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::store::{self, PRIVATE, PUBLIC};
use super::{certified_key, parse_chain_pem, CertError, CertInfo};

const DIR: &str = "local-ca";
const CERT_FILE: &str = "ca.pem";
const KEY_FILE: &str = "ca.key";
/// The root outlives any sensible deployment; leaves are short-lived.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating absorbs clock skew between sheath and its clients.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A loaded local CA, able to issue leaf certificates.
pub struct LocalCa {
    dir: PathBuf,
    cert_pem: String,
    info: CertInfo,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("dir", &self.dir)
            .field("sha256", &self.info.sha256)
            .finish_non_exhaustive()
    }
}

/// A freshly issued leaf, in every form callers need.
#[derive(Debug)]
pub struct IssuedLeaf {
    pub certified: Arc<CertifiedKey>,
    pub info: CertInfo,
    pub chain_pem: String,
    pub key_pem: String,
}

impl LocalCa {
    /// The directory holding the CA for a state directory.
    pub fn dir_in(state_dir: &Path) -> PathBuf {
        state_dir.join(DIR)
    }

    /// Path of the CA certificate clients should trust.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    /// Load the CA from `state_dir`, creating it if it does not exist yet.
    pub fn load_or_create(state_dir: &Path) -> Result<LocalCa, CertError> {
        let dir = Self::dir_in(state_dir);
        match std::fs::symlink_metadata(&dir) {
            Ok(_) => Self::load(&dir),
            Err(e) if e.kind() == ErrorKind::NotFound => Self::create(state_dir, &dir),
            Err(source) => Err(CertError::Read { path: dir, source }),
        }
    }

    /// Load an existing CA; any problem is reported as corruption.
    pub fn load(dir: &Path) -> Result<LocalCa, CertError> {
        let corrupt = |reason: String| CertError::CorruptCa {
            dir: dir.to_path_buf(),
            reason,
        };
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| corrupt(format!("cannot read {name}: {e}")))
        };
        let cert_pem = read(CERT_FILE)?;
        let key_pem = read(KEY_FILE)?;
        // sheath writes the key 0600. Open to others (restored from a backup
        // with `cp`, unpacked from an archive under umask 022), it was loaded
        // all the same, and every local user could sign certificates the
        // clients trust; refuse, as ssh does a private key others can read.
        // Group bits are let through: Kubernetes grants a pod's fsGroup read
        // and write on every file of a volume, and the group is the pod's.
        let key_path = dir.join(KEY_FILE);
        let mode = std::fs::metadata(&key_path)
            .map_err(|e| corrupt(format!("cannot read {KEY_FILE}: {e}")))?
            .permissions()
            .mode();
        if mode & 0o007 != 0 {
            return Err(CertError::CaKeyExposed {
                path: key_path,
                mode: mode & 0o7777,
            });
        }
        let chain =
            parse_chain_pem(CERT_FILE, cert_pem.as_bytes()).map_err(|e| corrupt(e.to_string()))?;
        let [der] = <[CertificateDer<'static>; 1]>::try_from(chain).map_err(|c| {
            corrupt(format!(
                "{CERT_FILE} holds {} certificates, expected 1",
                c.len()
            ))
        })?;
        let info = CertInfo::from_der(&der).map_err(|e| corrupt(format!("{CERT_FILE}: {e}")))?;
        if !info.is_ca {
            return Err(corrupt(format!("{CERT_FILE} is not a CA certificate")));
        }
        // Past its ten years (or restored from an old backup), the root
        // still signed leaves, each served as usual and refused by every
        // client as expired, with nothing in sheath's logs or readiness to
        // say why.
        if SystemTime::now() > info.not_after {
            return Err(CertError::CaExpired {
                dir: dir.to_path_buf(),
                not_after: humantime::format_rfc3339_seconds(info.not_after).to_string(),
            });
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| corrupt(format!("{KEY_FILE}: {e}")))?;
        // The pair must belong together, or every leaf would fail to verify.
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        certified_key_ignoring_validity(&der, key_der)
            .map_err(|_| corrupt(format!("{KEY_FILE} does not match {CERT_FILE}")))?;
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| corrupt(format!("{CERT_FILE}: {e}")))?;
        Ok(LocalCa {
            dir: dir.to_path_buf(),
            cert_pem,
            info,
            issuer,
        })
    }

    fn create(state_dir: &Path, dir: &Path) -> Result<LocalCa, CertError> {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CertError::Write { path, source }
        };
        store::create_private_dir(state_dir).map_err(write_err(state_dir))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "sheath");
        dn.push(
            DnType::CommonName,
            format!("sheath local CA {}", &random_hex(4)),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_LIFETIME).into();
        let cert = params.self_signed(&key)?;

        let prefix = format!(".{DIR}.tmp.");
        store::remove_stale_temporaries(state_dir, &prefix);
        let tmp = state_dir.join(format!("{prefix}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        store::create_private_dir(&tmp).map_err(write_err(&tmp))?;
        let key_path = tmp.join(KEY_FILE);
        store::write_atomic(&key_path, key.serialize_pem().as_bytes(), PRIVATE)
            .map_err(write_err(&key_path))?;
        let cert_path = tmp.join(CERT_FILE);
        store::write_atomic(&cert_path, cert.pem().as_bytes(), PUBLIC)
            .map_err(write_err(&cert_path))?;
        match std::fs::rename(&tmp, dir) {
            Ok(()) => {
                store::sync_dir(state_dir).map_err(write_err(state_dir))?;
                tracing::info!(dir = %dir.display(), "created local CA");
            }
            // Another process won the race; its CA is the one to use.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::AlreadyExists | ErrorKind::DirectoryNotEmpty
                ) =>
            {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(source) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(CertError::Write {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
        Self::load(dir)
    }

    /// The root certificate in PEM, for clients to trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Issue a server certificate for `names` (DNS names or IP literals),
    /// valid for `lifetime`, with a fresh ECDSA P-256 key.
    pub fn issue(&self, names: &[String], lifetime: Duration) -> Result<IssuedLeaf, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut sans = Vec::with_capacity(names.len());
        for name in names {
            sans.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into()?),
            });
        }
        params.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        if let Some(first) = names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Client auth too: an outbound listener presents this leaf to its
        // peer, and a peer verifying client certificates requires it.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE.min(lifetime / 4)).into();
        params.not_after = (now + lifetime).into();
        if now + lifetime > self.info.not_after {
            // Clients stop accepting this leaf when the root expires, not
            // when the leaf does.
            tracing::warn!(
                dir = %self.dir.display(),
                ca_not_after = %humantime::format_rfc3339_seconds(self.info.not_after),
                "the local CA expires before the certificate it is issuing; create a new CA and give the clients its root"
            );
        }
        let cert = params.signed_by(&key, &self.issuer)?;

        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let (certified, info) = certified_key("local CA leaf", vec![cert.der().clone()], key_der)?;
        Ok(IssuedLeaf {
            certified,
            info,
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Check that a key belongs to a certificate without the validity check.
fn certified_key_ignoring_validity(
    der: &CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<(), rustls::Error> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider.key_provider.load_private_key(key)?;
    CertifiedKey::new(vec![der.clone()], signing).keys_match()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    aws_lc_rs::rand::fill(&mut buf).expect("system random number generator failed");
    buf
}

/// A positive 16-byte serial: random, as the CA/B Forum asks, so every
/// issuance is distinguishable.
fn random_serial() -> SerialNumber {
    let mut bytes = random_bytes::<16>();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn random_hex(n: usize) -> String {
    random_bytes::<16>()[..n.min(16)]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
