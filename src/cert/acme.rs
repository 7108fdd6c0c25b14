//! The `acme` certificate source (RFC 8555), with instant-acme doing the
//! protocol and sheath answering the challenges itself.
//!
//! State lives under `<state_dir>/acme/<server>/`: the account credentials
//! (`account.json`, 0600, reused across restarts so a restart never creates
//! a new account), the pinned server root when trust came from a
//! fingerprint, and one directory per set of names with the last issued
//! chain and key, served at the next start while still valid.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    ExternalAccountKey, HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::RootCertStore;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::challenge::Challenges;
use super::inspect::sha256_hex;
use super::manager::{Material, ObtainError};
use super::store::{self, PRIVATE, PUBLIC};
use super::{bootstrap, certified_key, files, parse_chain_pem};
use crate::config::{AcmeChallenge, AcmeConfig, AcmeTrust, KeyType};

/// Upper bound on one whole issuance (account, order, challenges,
/// finalization, download).
const ORDER_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Issues certificates for one listener from one ACME server.
pub struct AcmeIssuer {
    listener: String,
    config: AcmeConfig,
    dir: PathBuf,
    challenges: Arc<Challenges>,
    account: tokio::sync::Mutex<Option<Account>>,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl std::fmt::Debug for AcmeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeIssuer")
            .field("listener", &self.listener)
            .field("directory", &self.config.directory)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl AcmeIssuer {
    pub fn new(
        listener: &str,
        config: &AcmeConfig,
        state_dir: &Path,
        challenges: Arc<Challenges>,
    ) -> AcmeIssuer {
        AcmeIssuer {
            listener: listener.to_string(),
            config: config.clone(),
            dir: Self::server_dir(state_dir, &config.directory),
            challenges,
            account: tokio::sync::Mutex::new(None),
            retry_after: Arc::new(Mutex::new(None)),
        }
    }

    /// `<state_dir>/acme/<host>-<hash of the directory URL>`: readable, and
    /// distinct per server even on one host.
    pub fn server_dir(state_dir: &Path, directory: &str) -> PathBuf {
        let host: String = directory
            .trim_start_matches("https://")
            .split(['/', '?'])
            .next()
            .unwrap_or("server")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let hash = sha256_hex(directory.as_bytes());
        state_dir
            .join("acme")
            .join(format!("{host}-{}", &hash[..12]))
    }

    fn cert_dir(&self) -> PathBuf {
        let mut names = self.config.names.clone();
        names.sort();
        let hash = sha256_hex(names.join(",").as_bytes());
        self.dir.join("certs").join(&hash[..16])
    }

    pub fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    /// A still-valid certificate from the last run, if it covers our names.
    pub fn cached(&self) -> Option<Material> {
        let dir = self.cert_dir();
        let cert = dir.join("fullchain.pem");
        if !cert.exists() {
            return None;
        }
        match files::load_material(&cert, &dir.join("key.pem")) {
            Ok(m) if covers(&m.info.names, &self.config.names) => Some(m),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(listener = %self.listener, error = %e, "cached ACME certificate not usable; a new one will be ordered");
                None
            }
        }
    }

    /// Order, validate and store a new certificate.
    pub async fn obtain(&self) -> Result<Material, ObtainError> {
        *self.retry_after.lock().expect("poisoned") = None;
        let result = tokio::time::timeout(ORDER_TIMEOUT, self.obtain_inner()).await;
        let retry_after = self.retry_after.lock().expect("poisoned").take();
        let message = match result {
            Ok(Ok(material)) => return Ok(material),
            Ok(Err(message)) => message,
            Err(_) => format!("ACME issuance did not finish within {ORDER_TIMEOUT:?}"),
        };
        Err(ObtainError {
            message,
            retry_after,
        })
    }

    async fn obtain_inner(&self) -> Result<Material, String> {
        let account = self.account().await?;
        match self.order(&account).await {
            Err(OrderError::AccountGone(detail)) => {
                // The server forgot the account (a reset test CA, a
                // deactivated account): register again, once.
                tracing::warn!(listener = %self.listener, detail, "ACME account unknown to the server; registering a new one");
                self.forget_account(account.id()).await;
                let account = self.account().await?;
                self.order(&account).await.map_err(|e| e.to_string())
            }
            other => other.map_err(|e| e.to_string()),
        }
    }

    async fn account(&self) -> Result<Account, String> {
        let mut cached = self.account.lock().await;
        if let Some(account) = cached.as_ref() {
            return Ok(account.clone());
        }
        // Every certificate from this server shares its account.json. Each
        // found none at a first start and registered its own, the last
        // rename deciding which was kept, and their writes shared one
        // temporary file; one at a time, the first creates it and the
        // others read it.
        let _shared = ACCOUNTS.of(&self.dir).lock_owned().await;
        let http = self.http_client().await?;
        let path = self.account_path();
        let account = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let credentials: AccountCredentials = serde_json::from_str(&text)
                    .map_err(|e| format!("{}: unreadable ACME account: {e}", path.display()))?;
                Account::builder_with_http(Box::new(http))
                    .from_credentials(credentials)
                    .await
                    .map_err(|e| format!("restoring ACME account: {e}"))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let eab = match &self.config.eab {
                    Some((kid, hmac)) => {
                        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(hmac.trim_end_matches('='))
                            .map_err(|e| format!("eab_hmac_key is not base64url: {e}"))?;
                        Some(ExternalAccountKey::new(kid.clone(), &key))
                    }
                    None => None,
                };
                let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
                let (account, credentials) = Account::builder_with_http(Box::new(http))
                    .create(
                        &NewAccount {
                            contact: &contact,
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        self.config.directory.clone(),
                        eab.as_ref(),
                    )
                    .await
                    .map_err(|e| format!("creating ACME account: {e}"))?;
                let json = serde_json::to_vec_pretty(&credentials)
                    .map_err(|e| format!("serializing ACME account: {e}"))?;
                store::create_private_dir(&self.dir)
                    .and_then(|()| store::write_atomic(&path, &json, PRIVATE))
                    .map_err(|e| format!("saving ACME account to {}: {e}", path.display()))?;
                tracing::info!(listener = %self.listener, account = %account.id(), "created ACME account");
                account
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        *cached = Some(account.clone());
        Ok(account)
    }

    /// Drop the account `gone` from this certificate's cache and, if
    /// account.json still holds it, from the disk. Every certificate from
    /// this server keeps its own copy of the shared account, so each learns
    /// in turn that the server forgot it: the first removes the file and
    /// registers a new account, the others must load that one instead of
    /// removing it and registering one each.
    async fn forget_account(&self, gone: &str) {
        *self.account.lock().await = None;
        let _shared = ACCOUNTS.of(&self.dir).lock_owned().await;
        let path = self.account_path();
        let Ok(text) = std::fs::read(&path) else {
            return;
        };
        let saved_id = serde_json::from_slice::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("id")?.as_str().map(str::to_owned));
        // An unreadable file goes too: registering again replaces it.
        if saved_id.is_none_or(|id| id == gone) {
            let _ = std::fs::remove_file(&path);
        }
    }

    async fn order(&self, account: &Account) -> Result<Material, OrderError> {
        let identifiers: Vec<Identifier> = self
            .config
            .names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Identifier::Ip(ip),
                Err(_) => Identifier::Dns(n.clone()),
            })
            .collect();
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(OrderError::from_acme("creating order"))?;
        let kind = match self.config.challenge {
            AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            AcmeChallenge::Http01 => ChallengeType::Http01,
        };
        let mut answers = Answers {
            challenges: &self.challenges,
            tls: Vec::new(),
            http: Vec::new(),
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(OrderError::from_acme("fetching authorization"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => {
                    return Err(OrderError::Other(format!(
                        "authorization is {status:?}, cannot proceed"
                    )))
                }
            }
            let mut challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                OrderError::Other(format!(
                    "the CA offers no {} challenge",
                    self.config.challenge.as_str()
                ))
            })?;
            let identifier = challenge.identifier().to_string();
            let key_authorization = challenge.key_authorization();
            match self.config.challenge {
                AcmeChallenge::TlsAlpn01 => {
                    self.challenges
                        .add_tls_alpn(&identifier, key_authorization.digest().as_ref())
                        .map_err(|e| OrderError::Other(e.to_string()))?;
                    answers.tls.push(identifier.clone());
                }
                AcmeChallenge::Http01 => {
                    self.challenges
                        .add_http(&challenge.token, key_authorization.as_str());
                    answers.http.push(challenge.token.clone());
                }
            }
            tracing::debug!(listener = %self.listener, identifier, challenge = self.config.challenge.as_str(), "challenge ready");
            challenge
                .set_ready()
                .await
                .map_err(OrderError::from_acme("answering challenge"))?;
        }

        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(Duration::from_secs(120));
        let status = order
            .poll_ready(&retries)
            .await
            .map_err(OrderError::from_acme("waiting for validation"))?;
        if status != OrderStatus::Ready {
            let problems: Vec<String> = order.state().error.iter().map(|p| p.to_string()).collect();
            return Err(OrderError::Other(format!(
                "order is {status:?} after validation{}",
                if problems.is_empty() {
                    String::new()
                } else {
                    format!(": {}", problems.join("; "))
                }
            )));
        }
        drop(answers);

        let key = match self.config.key_type {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            }
        }
        .map_err(|e| OrderError::Other(e.to_string()))?;
        let mut params = CertificateParams::new(self.config.names.clone())
            .map_err(|e| OrderError::Other(e.to_string()))?;
        params.distinguished_name = DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| OrderError::Other(e.to_string()))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(OrderError::from_acme("finalizing order"))?;
        let chain_pem = order
            .poll_certificate(&retries)
            .await
            .map_err(OrderError::from_acme("downloading certificate"))?;

        let material = self.validate(chain_pem, key).map_err(OrderError::Other)?;
        self.store(&material).map_err(OrderError::Other)?;
        Ok(material)
    }

    /// Check what the CA returned before anything is stored or served.
    fn validate(&self, chain_pem: String, key: KeyPair) -> Result<Material, String> {
        let chain = parse_chain_pem("issued certificate", chain_pem.as_bytes())
            .map_err(|e| e.to_string())?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let (certified, info) =
            certified_key("issued certificate", chain, key_der).map_err(|e| e.to_string())?;
        if !covers(&info.names, &self.config.names) {
            return Err(format!(
                "issued certificate names {:?} do not cover {:?}",
                info.names, self.config.names
            ));
        }
        Ok(Material {
            certified,
            info,
            chain_pem,
            key_pem: key.serialize_pem(),
        })
    }

    fn store(&self, material: &Material) -> Result<(), String> {
        let dir = self.cert_dir();
        let write = || -> std::io::Result<()> {
            store::create_private_dir(&dir)?;
            // Key first: whoever sees the new chain finds its key.
            store::write_atomic(&dir.join("key.pem"), material.key_pem.as_bytes(), PRIVATE)?;
            store::write_atomic(
                &dir.join("fullchain.pem"),
                material.chain_pem.as_bytes(),
                PUBLIC,
            )
        };
        write().map_err(|e| format!("saving certificate to {}: {e}", dir.display()))
    }

    async fn http_client(&self) -> Result<RecordingClient, String> {
        let roots = self.roots().await?;
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let connector: Connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Ok(RecordingClient {
            inner: HyperClient::builder(TokioExecutor::new()).build(connector),
            retry_after: Arc::clone(&self.retry_after),
        })
    }

    /// The trust anchors for the ACME server's own HTTPS certificate.
    async fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match &self.config.trust {
            AcmeTrust::System => {
                if crate::tls::add_system_roots(&mut roots) == 0 {
                    return Err(
                        "no system root certificates found; set ca_root or ca_fingerprint".into(),
                    );
                }
            }
            AcmeTrust::RootFile(path) => {
                let pem =
                    std::fs::read(path).map_err(|e| format!("ca_root {}: {e}", path.display()))?;
                add_pem_roots(&mut roots, &pem, &path.display().to_string())?;
            }
            AcmeTrust::Fingerprint(fingerprint) => {
                let pinned = self.dir.join("root.pem");
                let pem = match std::fs::read_to_string(&pinned) {
                    Ok(pem) if bootstrap::pem_matches(&pem, fingerprint) => pem,
                    _ => {
                        let pem = bootstrap::fetch_root(&self.config.directory, fingerprint)
                            .await
                            .map_err(|e| e.to_string())?;
                        store::create_private_dir(&self.dir)
                            .and_then(|()| store::write_atomic(&pinned, pem.as_bytes(), PUBLIC))
                            .map_err(|e| format!("saving pinned root: {e}"))?;
                        tracing::info!(listener = %self.listener, sha256 = %fingerprint, "bootstrapped trust in the ACME server's root");
                        pem
                    }
                };
                add_pem_roots(&mut roots, pem.as_bytes(), "pinned root")?;
            }
        }
        Ok(roots)
    }
}

/// The lock on each server directory's account, shared by every issuer of
/// the process (a listener's certificates, other listeners, reloads).
static ACCOUNTS: super::store::PathLocks<()> = super::store::PathLocks::new();

fn add_pem_roots(roots: &mut RootCertStore, pem: &[u8], what: &str) -> Result<(), String> {
    let certs = parse_chain_pem(what, pem).map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate found"));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(())
}

/// Does a certificate's name list cover every wanted name?
fn covers(have: &[String], want: &[String]) -> bool {
    want.iter()
        .all(|w| have.iter().any(|h| h.eq_ignore_ascii_case(w)))
}

/// Removes challenge answers however the order ends.
struct Answers<'a> {
    challenges: &'a Challenges,
    tls: Vec<String>,
    http: Vec<String>,
}

impl Drop for Answers<'_> {
    fn drop(&mut self) {
        for name in &self.tls {
            self.challenges.remove_tls_alpn(name);
        }
        for token in &self.http {
            self.challenges.remove_http(token);
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum OrderError {
    #[error("{0}")]
    AccountGone(String),
    #[error("{0}")]
    Other(String),
}

impl OrderError {
    fn from_acme(step: &'static str) -> impl Fn(instant_acme::Error) -> OrderError {
        move |e| match &e {
            instant_acme::Error::Api(problem)
                if problem
                    .r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":accountDoesNotExist")) =>
            {
                OrderError::AccountGone(e.to_string())
            }
            _ => OrderError::Other(format!("{step}: {e}")),
        }
    }
}

/// The HTTP client instant-acme uses, recording the `Retry-After` of error
/// responses (rate limits, maintenance) so the backoff can honour it.
struct RecordingClient {
    inner: HyperClient<Connector, BodyWrapper<Bytes>>,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl HttpClient for RecordingClient {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = HttpClient::request(&self.inner, req);
        let slot = Arc::clone(&self.retry_after);
        Box::pin(async move {
            let response = fut.await?;
            if response.parts.status.is_client_error() || response.parts.status.is_server_error() {
                if let Some(at) = parse_retry_after(&response.parts.headers) {
                    *slot.lock().expect("poisoned") = Some(at);
                }
            }
            Ok(response)
        })
    }
}

/// `Retry-After`: delay-seconds or an HTTP-date.
pub fn parse_retry_after(headers: &http::HeaderMap) -> Option<SystemTime> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    match value.parse::<u64>() {
        Ok(secs) => Some(SystemTime::now() + Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(value).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_both_forms() {
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", "120".parse().unwrap());
        let t = parse_retry_after(&h).unwrap();
        let d = t.duration_since(SystemTime::now()).unwrap();
        assert!(d > Duration::from_secs(118) && d <= Duration::from_secs(120));
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2065 07:28:00 GMT".parse().unwrap(),
        );
        assert!(parse_retry_after(&h).unwrap() > SystemTime::now());
        h.insert("retry-after", "soon".parse().unwrap());
        assert!(parse_retry_after(&h).is_none());
    }

    #[test]
    fn server_dirs_differ_per_directory() {
        let a = AcmeIssuer::server_dir(Path::new("/s"), "https://ca.internal:9000/acme/dir");
        let b = AcmeIssuer::server_dir(Path::new("/s"), "https://ca.internal:9000/other/dir");
        assert_ne!(a, b);
        assert!(a.to_string_lossy().contains("ca.internal_9000-"));
    }
}
