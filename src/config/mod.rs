//! Configuration: raw TOML (`file`) → validated [`Config`] (`validate`).
//!
//! The two stages keep serde concerns (field names, defaults, unknown keys)
//! apart from the rules sheath enforces (loopback upstreams, sane limits).
//! Every error names where the offending value came from: a file with line
//! and column, or the command-line flag / environment variable.

mod file;
mod validate;

pub use file::FileConfig;
pub use validate::{
    check_alpn, check_outbound_bind, parse_bind, parse_fingerprint, parse_names, parse_server_name,
    parse_upstream, DEFAULT_ADMIN, DEFAULT_DRAIN_TIMEOUT, DEFAULT_LOCAL_CA_LIFETIME,
    MAX_CONNECTIONS_LIMIT, MAX_DURATION, MAX_DURATION_MESSAGE, OUTBOUND_CLIENT_AUTH,
};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A validated configuration, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this configuration was read from, if any.
    pub path: Option<PathBuf>,
    /// Where sheath keeps its local CA and other persistent state.
    pub state_dir: PathBuf,
    /// Upper bound on how long shutdown waits for in-flight connections.
    pub drain_timeout: Duration,
    pub listeners: Vec<ListenerConfig>,
    /// The admin endpoint (health, metrics, certificates), if enabled.
    pub admin: Option<SocketAddr>,
    /// Where settings were written, for errors only found when they are
    /// used (a certificate file that cannot be read, say).
    pub origins: Origins,
}

/// Where each setting that names a file or an address was written, by
/// dotted key (`listener[1].cert.key`). Not part of what a configuration
/// means: two configurations that differ only in layout are equal.
#[derive(Debug, Clone, Default)]
pub struct Origins(std::collections::HashMap<String, Origin>);

impl PartialEq for Origins {
    fn eq(&self, _: &Origins) -> bool {
        true
    }
}

impl Origins {
    /// Where `key` was written, if it was.
    pub fn get(&self, key: &str) -> Option<&Origin> {
        self.0.get(key)
    }

    pub fn insert(&mut self, key: impl Into<String>, origin: Origin) {
        self.0.insert(key.into(), origin);
    }
}

/// One TLS listener and the upstream it fronts.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub upstream: Upstream,
    pub mode: Mode,
    /// Connections served at once; further clients wait in the kernel's
    /// accept queue until a slot frees.
    pub max_connections: usize,
    pub timeouts: Timeouts,
    /// The default certificate: served when the client's SNI names none of
    /// the `sni_certs`, or when it sends none.
    pub cert: CertSource,
    pub cert_policy: CertPolicy,
    /// Further certificates, each served to clients whose SNI matches one
    /// of its names (exact names before wildcards, in the order given).
    pub sni_certs: Vec<SniCert>,
    pub client_auth: ClientAuthConfig,
    /// TCP mode: announce the client to the upstream with a PROXY header.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// HTTP mode: the HTTP version spoken to the upstream.
    pub upstream_protocol: UpstreamProtocol,
    /// The oldest TLS version negotiated, with clients or (outbound) the peer.
    pub tls_min_version: TlsVersion,
    /// TCP mode: the ALPN protocols offered to clients, in order of
    /// preference; outbound mode: those offered to the peer. (HTTP mode
    /// always negotiates `h2` and `http/1.1`.)
    pub alpn: Vec<String>,
    /// Outbound mode: verification of the remote peer.
    pub outbound: Option<OutboundConfig>,
}

impl ListenerConfig {
    /// Every certificate the listener serves, the default first.
    pub fn certs(&self) -> impl Iterator<Item = (CertRef, &CertSource, &CertPolicy)> {
        std::iter::once((CertRef::Default, &self.cert, &self.cert_policy)).chain(
            self.sni_certs
                .iter()
                .enumerate()
                .map(|(i, c)| (CertRef::Sni(i), &c.source, &c.policy)),
        )
    }

    /// The HTTP-01 listeners its ACME certificates ask for, each with the
    /// key that asks (`listener[0].cert.http01_bind`); `index` is the
    /// listener's place in the configuration.
    pub fn http01_binds(&self, index: usize) -> impl Iterator<Item = (SocketAddr, String)> + '_ {
        self.certs()
            .filter_map(move |(cert, source, _)| match source {
                CertSource::Acme(acme) => acme
                    .http01_bind
                    .map(|bind| (bind, format!("{}.http01_bind", cert.table_key(index)))),
                _ => None,
            })
    }
}

/// Which of a listener's certificates: `[listener.cert]`, or the Nth
/// `[[listener.sni_cert]]`. Shown as `default` or `sni_cert[N]` in logs,
/// metrics, the admin API and the `on_renew` hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CertRef {
    #[default]
    Default,
    Sni(usize),
}

impl CertRef {
    /// The certificate's table in listener `index`, for config errors.
    pub fn table_key(self, index: usize) -> String {
        match self {
            CertRef::Default => format!("listener[{index}].cert"),
            CertRef::Sni(_) => format!("listener[{index}].{self}"),
        }
    }
}

impl fmt::Display for CertRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertRef::Default => f.write_str("default"),
            CertRef::Sni(i) => write!(f, "sni_cert[{i}]"),
        }
    }
}

/// A certificate chosen by the name the client asks for (SNI).
#[derive(Debug, Clone, PartialEq)]
pub struct SniCert {
    pub source: CertSource,
    pub policy: CertPolicy,
}

/// PROXY protocol version sent to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    V1,
    V2,
}

impl ProxyProtocol {
    /// The version as written in the config.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }
}

/// Whether and how clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuthMode {
    #[default]
    None,
    /// Verified if presented; anonymous clients are let through.
    Optional,
    Require,
}

impl ClientAuthMode {
    /// The mode as written in the config.
    pub fn as_str(&self) -> &'static str {
        match self {
            ClientAuthMode::None => "none",
            ClientAuthMode::Optional => "optional",
            ClientAuthMode::Require => "require",
        }
    }
}

/// How often trust files (client CAs and CRLs, an outbound listener's peer
/// CAs) are re-read by default.
pub const DEFAULT_TRUST_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// Client-certificate verification, authorization and identity forwarding.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAuthConfig {
    pub mode: ClientAuthMode,
    /// CA bundles clients are verified against.
    pub ca: Vec<PathBuf>,
    /// CRL files (PEM or DER); revoked client certificates are refused.
    pub crl: Vec<PathBuf>,
    pub allow: AllowList,
    pub forward: ForwardIdentity,
    /// How often trust files are re-read without a change notification.
    pub poll_interval: Duration,
}

/// No client certificates. The poll interval is the same default a
/// `[listener.client_auth]` table gets, so a listener without that table
/// and one with an empty table are the same configuration.
impl Default for ClientAuthConfig {
    fn default() -> Self {
        ClientAuthConfig {
            mode: ClientAuthMode::None,
            ca: Vec::new(),
            crl: Vec::new(),
            allow: AllowList::default(),
            forward: ForwardIdentity::default(),
            poll_interval: DEFAULT_TRUST_POLL_INTERVAL,
        }
    }
}

/// Who may connect, once verified. Empty means "any verified client"; as
/// soon as one list is set, a client must match at least one entry of some
/// list. Matching is exact (byte for byte) except for `*` path segments in
/// URI patterns and DNS names, whose case does not count.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowList {
    pub dns: Vec<String>,
    /// URI SANs; SPIFFE-style patterns where a `*` segment matches exactly
    /// one non-empty path segment.
    pub uri: Vec<String>,
    pub ip: Vec<std::net::IpAddr>,
    pub cn: Vec<String>,
    pub ou: Vec<String>,
    /// SHA-256 of the whole certificate, lowercase hex.
    pub cert_sha256: Vec<String>,
    /// SHA-256 of the SubjectPublicKeyInfo, lowercase hex.
    pub spki_sha256: Vec<String>,
}

impl AllowList {
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty()
            && self.uri.is_empty()
            && self.ip.is_empty()
            && self.cn.is_empty()
            && self.ou.is_empty()
            && self.cert_sha256.is_empty()
            && self.spki_sha256.is_empty()
    }
}

/// Header name for `forward = ["header"]` when `identity_header` is not set.
pub const DEFAULT_IDENTITY_HEADER: &str = "x-client-identity";

/// How the verified client identity reaches an HTTP upstream. Whatever is
/// chosen, copies of these headers sent by the client are always removed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ForwardIdentity {
    /// `X-Forwarded-Client-Cert`, Envoy's format.
    pub xfcc: bool,
    /// RFC 9440 `Client-Cert` and `Client-Cert-Chain`.
    pub client_cert: bool,
    /// A plain header carrying the SPIFFE ID (URI SAN) or else the CN,
    /// parsed with the config so requests only compare and clone it.
    pub header: Option<http::HeaderName>,
}

impl ForwardIdentity {
    /// The header `forward = ["header"]` (or `--forward-identity header`)
    /// names when no `identity_header` is given.
    pub fn default_header() -> http::HeaderName {
        http::HeaderName::from_static(DEFAULT_IDENTITY_HEADER)
    }
}

/// Where a listener sends decrypted traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host name or IP literal, without brackets.
    pub host: String,
    pub port: u16,
    /// True when the host is a loopback literal or `localhost`.
    pub loopback: bool,
    /// `host:port`, with IPv6 literals bracketed: the authority of every
    /// upstream URI in HTTP mode, parsed once with the config.
    pub authority: http::uri::Authority,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.authority.as_str())
    }
}

/// How traffic is relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Byte-for-byte relay of the decrypted stream (L4).
    Tcp,
    /// HTTP/1.1 and HTTP/2 termination, HTTP/1.1 or h2c to the upstream (L7).
    #[default]
    Http,
    /// The other direction: plaintext from a local client, relayed byte
    /// for byte over mutual TLS to a remote peer, with the listener's
    /// certificate as the client certificate.
    Outbound,
}

/// The oldest TLS version a listener accepts (or, in outbound mode,
/// offers to the peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub enum TlsVersion {
    #[default]
    V1_2,
    V1_3,
}

impl std::str::FromStr for TlsVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "1.2" => Ok(TlsVersion::V1_2),
            "1.3" => Ok(TlsVersion::V1_3),
            other => Err(format!(
                "unknown TLS version `{other}`, expected `1.2` or `1.3`"
            )),
        }
    }
}

impl TlsVersion {
    /// The protocol versions rustls may negotiate from this one up.
    pub fn and_newer(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        match self {
            TlsVersion::V1_2 => rustls::ALL_VERSIONS,
            TlsVersion::V1_3 => TLS13_ONLY,
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        })
    }
}

/// The HTTP version HTTP mode speaks to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over a pool of keep-alive connections, whatever the
    /// client spoke.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (RFC 9113 §3.3), on one
    /// multiplexed connection: what gRPC servers speak.
    H2c,
    /// The client's version: HTTP/2 clients over h2c, HTTP/1.1 clients
    /// (and their WebSocket upgrades) over HTTP/1.1.
    Auto,
}

impl std::str::FromStr for UpstreamProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http1" => Ok(UpstreamProtocol::Http1),
            "h2c" => Ok(UpstreamProtocol::H2c),
            "auto" => Ok(UpstreamProtocol::Auto),
            other => Err(format!(
                "unknown upstream protocol `{other}`, expected `http1`, `h2c` or `auto`"
            )),
        }
    }
}

impl UpstreamProtocol {
    /// Whether a request that came in as `client` goes upstream over h2c.
    pub fn h2c_for(self, client: http::Version) -> bool {
        match self {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::H2c => true,
            UpstreamProtocol::Auto => client == http::Version::HTTP_2,
        }
    }
}

impl fmt::Display for UpstreamProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::Auto => "auto",
        })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Tcp => "tcp",
            Mode::Http => "http",
            Mode::Outbound => "outbound",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Mode::Tcp),
            "http" => Ok(Mode::Http),
            "outbound" => Ok(Mode::Outbound),
            other => Err(format!(
                "unknown mode `{other}`, expected `tcp`, `http` or `outbound`"
            )),
        }
    }
}

/// Outbound mode: how the remote peer is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundConfig {
    /// CA bundles the peer's certificate must chain to; empty means the
    /// system's roots.
    pub ca: Vec<PathBuf>,
    /// The name sent as SNI and checked against the peer's certificate
    /// (an IP literal is checked against its IP addresses, and no SNI is
    /// sent).
    pub server_name: rustls::pki_types::ServerName<'static>,
    /// How often the `ca` files are re-read without a change notification.
    pub poll_interval: Duration,
}

/// Every phase of a connection has a bound; nothing waits forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// ClientHello plus the whole TLS handshake, as one deadline.
    pub handshake: Duration,
    /// No byte in either direction for this long closes the connection.
    pub idle: Duration,
    /// Establishing the TCP connection to the upstream.
    pub connect: Duration,
    /// HTTP mode: from sending a request upstream to its response head.
    pub upstream_response: Duration,
    /// HTTP/1 mode: reading a complete request head from the client.
    pub header_read: Duration,
    /// HTTP mode: how long an unused pooled upstream connection is kept.
    pub upstream_idle: Duration,
    /// Close connections older than this (None: no limit). Bounds how long
    /// a client-certificate decision made under old trust stays in force.
    pub max_lifetime: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            connect: Duration::from_secs(5),
            upstream_response: Duration::from_secs(60),
            header_read: Duration::from_secs(30),
            upstream_idle: Duration::from_secs(90),
            max_lifetime: None,
        }
    }
}

/// Where a listener's certificate comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum CertSource {
    /// Issued by sheath's own local CA, kept in the state directory.
    LocalCa {
        names: Vec<String>,
        lifetime: Duration,
    },
    /// A PEM chain (leaf first) and a PEM private key, watched for changes.
    Files { cert: PathBuf, key: PathBuf },
    /// Issued by an RFC 8555 (ACME) CA, challenges answered by sheath.
    Acme(Box<AcmeConfig>),
}

impl CertSource {
    /// The source's name as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            CertSource::LocalCa { .. } => "local_ca",
            CertSource::Files { .. } => "files",
            CertSource::Acme(_) => "acme",
        }
    }
}

/// ACME issuance settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeConfig {
    /// The CA's directory URL.
    pub directory: String,
    /// Names to request: DNS names or IP literals.
    pub names: Vec<String>,
    /// Account contacts, e.g. `mailto:ops@example.com`.
    pub contact: Vec<String>,
    pub challenge: AcmeChallenge,
    /// Plain-HTTP listener for HTTP-01 (and redirects to https).
    pub http01_bind: Option<SocketAddr>,
    pub trust: AcmeTrust,
    /// External account binding: key id and base64url HMAC key.
    pub eab: Option<(String, String)>,
    /// Key type of the certificates requested.
    pub key_type: KeyType,
}

/// Private key algorithm for issued certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    #[default]
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
}

impl KeyType {
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Rsa2048 => "rsa-2048",
        }
    }

    pub fn parse(value: &str) -> Result<KeyType, String> {
        match value {
            "ecdsa-p256" => Ok(KeyType::EcdsaP256),
            "ecdsa-p384" => Ok(KeyType::EcdsaP384),
            "rsa-2048" => Ok(KeyType::Rsa2048),
            other => Err(format!(
                "unknown key type `{other}`, expected `ecdsa-p256`, `ecdsa-p384` or `rsa-2048`"
            )),
        }
    }
}

/// Which challenge sheath answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcmeChallenge {
    /// On the listener's own TLS port (`acme-tls/1`), RFC 8737.
    TlsAlpn01,
    /// On the `http01_bind` listener, RFC 8555 §8.3.
    Http01,
}

impl AcmeChallenge {
    pub fn as_str(&self) -> &'static str {
        match self {
            AcmeChallenge::TlsAlpn01 => "tls-alpn-01",
            AcmeChallenge::Http01 => "http-01",
        }
    }
}

/// How sheath trusts the ACME server's HTTPS certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcmeTrust {
    /// The system's root store.
    System,
    /// A PEM root file.
    RootFile(PathBuf),
    /// The SHA-256 fingerprint of the server's root, fetched and pinned on
    /// first use (like `step ca bootstrap`).
    Fingerprint(String),
}

/// How a listener's certificate is kept fresh and shared.
#[derive(Debug, Clone, PartialEq)]
pub struct CertPolicy {
    /// Renew when this fraction of the lifetime has passed (default 2/3).
    pub renew_ratio: f64,
    /// First retry delay after a failed renewal; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Files source: how often the files are re-read even without a
    /// change notification (some volumes never send one).
    pub poll_interval: Duration,
    pub export: Option<ExportConfig>,
}

impl Default for CertPolicy {
    fn default() -> Self {
        CertPolicy {
            renew_ratio: 2.0 / 3.0,
            retry_min: Duration::from_secs(10),
            retry_max: Duration::from_secs(3600),
            poll_interval: Duration::from_secs(10),
            export: None,
        }
    }
}

/// Write issued material to a directory after each renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub dir: PathBuf,
    /// Shell command run after each export.
    pub on_renew: Option<String>,
}

impl CertSource {
    pub fn default_local_ca() -> Self {
        CertSource::LocalCa {
            names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            lifetime: DEFAULT_LOCAL_CA_LIFETIME,
        }
    }
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    /// A command-line flag (and its environment variable).
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line, column } => {
                write!(f, "{}:{line}:{column}", path.display())
            }
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// A configuration that cannot be used, and exactly why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: {}{message}", key_prefix(.key))]
    Invalid {
        origin: Origin,
        /// Dotted path of the offending key, e.g. `listener[0].upstream`.
        key: String,
        message: String,
    },
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("key `{key}`: ")
    }
}

impl ConfigError {
    pub fn origin(&self) -> Option<&Origin> {
        match self {
            ConfigError::Invalid { origin, .. } => Some(origin),
            ConfigError::Read { .. } => None,
        }
    }
}

impl Config {
    /// Read, parse and validate a TOML configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(path, &text)
    }

    /// Parse and validate TOML text; `path` is used for messages and to
    /// resolve relative file paths.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw = file::parse(path, text)?;
        validate::validate(path, text, raw)
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

/// The state directory used when none is configured: `$XDG_STATE_HOME/sheath`,
/// then `~/.local/state/sheath`, then `/var/lib/sheath` (containers, where
/// `HOME` is usually unset or `/`).
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("sheath");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty() && h != "/") {
        Some(home) => PathBuf::from(home).join(".local/state/sheath"),
        None => PathBuf::from("/var/lib/sheath"),
    }
}

impl Config {
    /// The effective settings, defaults filled in, as TOML that `run
    /// --config` would accept back.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let dur = |d: Duration| humantime::format_duration(d).to_string();
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut out = String::new();
        let _ = writeln!(out, "[global]");
        let _ = writeln!(out, "state_dir = {}", q(&self.state_dir.to_string_lossy()));
        let _ = writeln!(out, "drain_timeout = {}", q(&dur(self.drain_timeout)));
        let _ = writeln!(out, "\n[admin]");
        match self.admin {
            Some(bind) => {
                let _ = writeln!(out, "bind = {}", q(&bind.to_string()));
            }
            None => {
                let _ = writeln!(out, "enabled = false");
            }
        }
        for l in &self.listeners {
            let _ = writeln!(out, "\n[[listener]]");
            let _ = writeln!(out, "name = {}", q(&l.name));
            let _ = writeln!(out, "bind = {}", q(&l.bind.to_string()));
            let _ = writeln!(out, "upstream = {}", q(l.upstream.authority.as_str()));
            let _ = writeln!(out, "allow_remote_upstream = {}", !l.upstream.loopback);
            let _ = writeln!(out, "mode = {}", q(&l.mode.to_string()));
            let _ = writeln!(out, "max_connections = {}", l.max_connections);
            if let Some(p) = l.proxy_protocol {
                let _ = writeln!(out, "proxy_protocol = {}", q(p.as_str()));
            }
            if l.mode == Mode::Http {
                let _ = writeln!(
                    out,
                    "upstream_protocol = {}",
                    q(&l.upstream_protocol.to_string())
                );
            }
            let _ = writeln!(
                out,
                "tls_min_version = {}",
                q(&l.tls_min_version.to_string())
            );
            if !l.alpn.is_empty() {
                let names: Vec<String> = l.alpn.iter().map(|p| q(p)).collect();
                let _ = writeln!(out, "alpn = [{}]", names.join(", "));
            }
            let t = &l.timeouts;
            let _ = writeln!(out, "\n[listener.timeouts]");
            let _ = writeln!(out, "handshake = {}", q(&dur(t.handshake)));
            let _ = writeln!(out, "idle = {}", q(&dur(t.idle)));
            let _ = writeln!(out, "connect = {}", q(&dur(t.connect)));
            let _ = writeln!(out, "upstream_response = {}", q(&dur(t.upstream_response)));
            let _ = writeln!(out, "header_read = {}", q(&dur(t.header_read)));
            let _ = writeln!(out, "upstream_idle = {}", q(&dur(t.upstream_idle)));
            if let Some(max) = t.max_lifetime {
                let _ = writeln!(out, "max_lifetime = {}", q(&dur(max)));
            }
            render_cert(&mut out, "[listener.cert]", &l.cert, &l.cert_policy);
            for c in &l.sni_certs {
                render_cert(&mut out, "[[listener.sni_cert]]", &c.source, &c.policy);
            }
            if let Some(o) = &l.outbound {
                let _ = writeln!(out, "\n[listener.outbound]");
                if !o.ca.is_empty() {
                    let ca = quoted_list(o.ca.iter().map(|p| p.to_string_lossy()));
                    let _ = writeln!(out, "ca = {ca}");
                    let _ = writeln!(out, "poll_interval = {}", q(&dur(o.poll_interval)));
                }
                let _ = writeln!(out, "server_name = {}", q(&o.server_name.to_str()));
            }
            render_client_auth(&mut out, &l.client_auth);
        }
        out
    }
}

/// One certificate table: `[listener.cert]` or a `[[listener.sni_cert]]`.
fn render_cert(out: &mut String, header: &str, source: &CertSource, policy: &CertPolicy) {
    use std::fmt::Write as _;
    let dur = |d: Duration| humantime::format_duration(d).to_string();
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let _ = writeln!(out, "\n{header}");
    match source {
        CertSource::LocalCa { names, lifetime } => {
            let _ = writeln!(out, "source = \"local_ca\"");
            let names: Vec<String> = names.iter().map(|n| q(n)).collect();
            let _ = writeln!(out, "names = [{}]", names.join(", "));
            let _ = writeln!(out, "lifetime = {}", q(&dur(*lifetime)));
        }
        CertSource::Files { cert, key } => {
            let _ = writeln!(out, "source = \"files\"");
            let _ = writeln!(out, "cert = {}", q(&cert.to_string_lossy()));
            let _ = writeln!(out, "key = {}", q(&key.to_string_lossy()));
        }
        CertSource::Acme(acme) => {
            let _ = writeln!(out, "source = \"acme\"");
            let names: Vec<String> = acme.names.iter().map(|n| q(n)).collect();
            let _ = writeln!(out, "names = [{}]", names.join(", "));
            let _ = writeln!(out, "directory = {}", q(&acme.directory));
            let contact: Vec<String> = acme.contact.iter().map(|n| q(n)).collect();
            let _ = writeln!(out, "contact = [{}]", contact.join(", "));
            let _ = writeln!(out, "challenge = {}", q(acme.challenge.as_str()));
            let _ = writeln!(out, "key_type = {}", q(acme.key_type.as_str()));
            if let Some(bind) = acme.http01_bind {
                let _ = writeln!(out, "http01_bind = {}", q(&bind.to_string()));
            }
            match &acme.trust {
                AcmeTrust::System => {}
                AcmeTrust::RootFile(p) => {
                    let _ = writeln!(out, "ca_root = {}", q(&p.to_string_lossy()));
                }
                AcmeTrust::Fingerprint(f) => {
                    let _ = writeln!(out, "ca_fingerprint = {}", q(f));
                }
            }
            if let Some((kid, _)) = &acme.eab {
                let _ = writeln!(out, "eab_kid = {}", q(kid));
                let _ = writeln!(out, "eab_hmac_key = \"<redacted>\"");
            }
        }
    }
    let p = policy;
    let _ = writeln!(out, "renew_ratio = {}", p.renew_ratio);
    let _ = writeln!(out, "retry_min = {}", q(&dur(p.retry_min)));
    let _ = writeln!(out, "retry_max = {}", q(&dur(p.retry_max)));
    let _ = writeln!(out, "poll_interval = {}", q(&dur(p.poll_interval)));
    if let Some(export) = &p.export {
        let table = header.trim_matches(['[', ']']);
        let _ = writeln!(out, "\n[{table}.export]");
        let _ = writeln!(out, "dir = {}", q(&export.dir.to_string_lossy()));
        if let Some(cmd) = &export.on_renew {
            let _ = writeln!(out, "on_renew = {}", q(cmd));
        }
    }
}

/// `[listener.client_auth]`, written even for mode = "none" so that the
/// effective settings show that clients are not asked for certificates.
fn render_client_auth(out: &mut String, c: &ClientAuthConfig) {
    use std::fmt::Write as _;
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let _ = writeln!(out, "\n[listener.client_auth]");
    let _ = writeln!(out, "mode = {}", q(c.mode.as_str()));
    if !c.ca.is_empty() {
        let _ = writeln!(
            out,
            "ca = {}",
            quoted_list(c.ca.iter().map(|p| p.to_string_lossy()))
        );
    }
    if !c.crl.is_empty() {
        let _ = writeln!(
            out,
            "crl = {}",
            quoted_list(c.crl.iter().map(|p| p.to_string_lossy()))
        );
    }
    let _ = writeln!(
        out,
        "poll_interval = {}",
        q(&humantime::format_duration(c.poll_interval).to_string())
    );
    let a = &c.allow;
    let ips: Vec<String> = a.ip.iter().map(|ip| ip.to_string()).collect();
    for (key, values) in [
        ("allow_dns", &a.dns),
        ("allow_uri", &a.uri),
        ("allow_ip", &ips),
        ("allow_cn", &a.cn),
        ("allow_ou", &a.ou),
        ("allow_cert_sha256", &a.cert_sha256),
        ("allow_spki_sha256", &a.spki_sha256),
    ] {
        if !values.is_empty() {
            let _ = writeln!(out, "{key} = {}", quoted_list(values));
        }
    }
    let f = &c.forward;
    let forward: Vec<&str> = [
        (f.xfcc, "xfcc"),
        (f.client_cert, "client-cert"),
        (f.header.is_some(), "header"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    if !forward.is_empty() {
        let _ = writeln!(out, "forward = {}", quoted_list(forward));
    }
    if let Some(header) = &f.header {
        let _ = writeln!(out, "identity_header = {}", q(header.as_str()));
    }
}

/// A TOML array of strings on one line.
fn quoted_list<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let items: Vec<String> = items
        .into_iter()
        .map(|s| toml::Value::String(s.as_ref().to_string()).to_string())
        .collect();
    format!("[{}]", items.join(", "))
}
