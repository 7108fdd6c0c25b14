//! Command-line arguments (raw, as clap parses them) and their conversion
//! into a validated [`Config`].
//!
//! Every flag of the single-listener form has a `SHEATH_*` environment
//! variable, so a Compose file or a pod spec needs no config file.
//!
//! The doc comments on the arguments are clap's `--help` text, printed as
//! written: TOML's `[admin]` and `[[listener]]` and bare URLs are meant
//! for the terminal, not rustdoc links.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::bare_urls)]

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    self, parse_bind, parse_fingerprint, parse_names, parse_upstream, AcmeChallenge, AcmeConfig,
    AcmeTrust, AllowList, CertSource, ClientAuthConfig, ClientAuthMode, Config, ConfigError,
    ForwardIdentity, ListenerConfig, Mode, Origin, OutboundConfig, ProxyProtocol, Timeouts,
    TlsVersion, UpstreamProtocol, DEFAULT_DRAIN_TIMEOUT, DEFAULT_LOCAL_CA_LIFETIME,
    DEFAULT_MAX_CONNECTIONS,
};
use crate::logging::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "sheath",
    version,
    about = "TLS-terminating sidecar that manages its own certificate",
    propagate_version = true
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "SHEATH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `sheath=debug` (RUST_LOG wins when set).
    #[arg(long, global = true, env = "SHEATH_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Worker threads, each a single-threaded event loop that owns the
    /// connections it is given [default: CPUs available to the process].
    #[arg(long, global = true, env = "SHEATH_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,

    /// Directory for persistent state (local CA) [default: from the config
    /// file, else $XDG_STATE_HOME/sheath, ~/.local/state/sheath or
    /// /var/lib/sheath].
    #[arg(long, global = true, env = "SHEATH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Admin endpoint address: /livez, /readyz, /metrics, /certs, POST
    /// /reload [default: the config file's [admin], else 127.0.0.1:9190].
    #[arg(long, global = true, env = "SHEATH_ADMIN", conflicts_with = "no_admin")]
    pub admin: Option<String>,

    /// Do not open the admin endpoint.
    #[arg(long, global = true, env = "SHEATH_NO_ADMIN")]
    pub no_admin: bool,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Apply `--admin` / `--no-admin` over what the configuration says.
    pub fn apply_admin(&self, config: &mut Config) -> Result<(), ConfigError> {
        config.admin = self.admin_override(config.admin)?;
        Ok(())
    }

    /// The admin address after the flags: `current` unless overridden.
    pub fn admin_override(
        &self,
        current: Option<std::net::SocketAddr>,
    ) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.no_admin {
            return Ok(None);
        }
        match &self.admin {
            Some(addr) => Ok(Some(
                parse_bind(addr).map_err(|m| flag_error("--admin", m))?,
            )),
            None => Ok(current),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy, from a config file or from flags alone.
    Run(ConfigArgs),
    /// Validate the configuration and print the effective settings.
    Check(ConfigArgs),
    /// Quickstart: a built-in backend behind sheath with a local-CA certificate.
    Demo(DemoArgs),
    /// Local CA operations.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Fetch a CA's root over TLS and save it if its SHA-256 fingerprint matches.
    Bootstrap(BootstrapArgs),
    /// Ask a running sheath's admin endpoint whether it is ready: exit 0
    /// when ready, 1 otherwise. For images without a shell or curl.
    Healthcheck(HealthcheckArgs),
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// Read the admin address from this config file.
    #[arg(long, short, env = "SHEATH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// The CA's URL, e.g. https://ca.internal:9000
    #[arg(long, env = "SHEATH_CA_URL")]
    pub ca_url: String,
    /// SHA-256 fingerprint of the root (hex, colons allowed).
    #[arg(long, env = "SHEATH_CA_FINGERPRINT")]
    pub fingerprint: String,
    /// Write the root here (atomically) instead of printing it.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the local CA's root certificate (PEM), creating the CA if needed.
    Export(CaExportArgs),
}

#[derive(Debug, Args)]
pub struct CaExportArgs {
    /// Read the state directory from this config file.
    #[arg(long, short, env = "SHEATH_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Address for the demo's TLS listener.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: String,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// TOML configuration file with one or more [[listener]] blocks.
    #[arg(long, short, env = "SHEATH_CONFIG", conflicts_with_all = ["listen", "upstream"])]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub single: SingleListener,

    /// Upper bound on the shutdown drain, e.g. `30s`.
    #[arg(long, env = "SHEATH_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
}

/// One listener described by flags alone.
#[derive(Debug, Args)]
pub struct SingleListener {
    /// TLS listen address, e.g. 0.0.0.0:8443.
    #[arg(long, env = "SHEATH_LISTEN")]
    pub listen: Option<String>,

    /// Plaintext upstream HOST:PORT, loopback unless --allow-remote-upstream.
    #[arg(long, env = "SHEATH_UPSTREAM")]
    pub upstream: Option<String>,

    /// Relay mode: `http`, `tcp` or `outbound` [default: http]. Outbound:
    /// --listen is a loopback plaintext port, --upstream the mTLS peer.
    #[arg(long, env = "SHEATH_MODE")]
    pub mode: Option<Mode>,

    /// Outbound mode: CA bundle(s) the peer's certificate must chain to
    /// (comma-separated) [default: the system's roots].
    #[arg(long, env = "SHEATH_PEER_CA", value_delimiter = ',')]
    pub peer_ca: Vec<PathBuf>,

    /// Outbound mode: the name expected in the peer's certificate and sent
    /// as SNI [default: the host of --upstream].
    #[arg(long, env = "SHEATH_PEER_NAME")]
    pub peer_name: Option<String>,

    /// Allow an upstream outside this network namespace's loopback.
    #[arg(long, env = "SHEATH_ALLOW_REMOTE_UPSTREAM")]
    pub allow_remote_upstream: bool,

    /// Certificate names for the local CA or ACME (comma-separated DNS names or IPs).
    #[arg(long = "name", env = "SHEATH_NAMES", value_delimiter = ',', conflicts_with_all = ["cert", "key"])]
    pub names: Vec<String>,

    /// Local CA leaf lifetime, e.g. `24h`.
    #[arg(long, env = "SHEATH_CERT_LIFETIME", value_parser = humantime::parse_duration)]
    pub cert_lifetime: Option<Duration>,

    /// PEM certificate chain (leaf first); uses the files source.
    #[arg(long, env = "SHEATH_CERT", requires = "key")]
    pub cert: Option<PathBuf>,

    /// PEM private key for --cert.
    #[arg(long, env = "SHEATH_KEY", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Maximum concurrent connections.
    #[arg(long, env = "SHEATH_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Deadline for ClientHello plus handshake.
    #[arg(long, env = "SHEATH_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Option<Duration>,

    /// Close connections with no traffic for this long.
    #[arg(long, env = "SHEATH_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,

    /// Upstream connect timeout.
    #[arg(long, env = "SHEATH_CONNECT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,

    /// HTTP mode: time allowed for the upstream's response head.
    #[arg(long, env = "SHEATH_UPSTREAM_TIMEOUT", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Option<Duration>,

    /// HTTP mode: close a pooled upstream connection unused for this long.
    #[arg(long, env = "SHEATH_UPSTREAM_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub upstream_idle_timeout: Option<Duration>,

    /// Close connections older than this, e.g. `1h`.
    #[arg(long, env = "SHEATH_MAX_LIFETIME", value_parser = humantime::parse_duration)]
    pub max_lifetime: Option<Duration>,

    /// Client certificates: `none`, `optional` or `require`.
    #[arg(long, env = "SHEATH_CLIENT_AUTH")]
    pub client_auth: Option<String>,

    /// CA bundle(s) client certificates are verified against (comma-separated).
    #[arg(long, env = "SHEATH_CLIENT_CA", value_delimiter = ',')]
    pub client_ca: Vec<PathBuf>,

    /// CRL file(s) for client certificates (comma-separated).
    #[arg(long, env = "SHEATH_CLIENT_CRL", value_delimiter = ',')]
    pub client_crl: Vec<PathBuf>,

    /// Allowed client URI SANs / SPIFFE ID patterns (comma-separated).
    #[arg(long, env = "SHEATH_ALLOW_URI", value_delimiter = ',')]
    pub allow_uri: Vec<String>,

    /// Allowed client DNS SANs (comma-separated).
    #[arg(long, env = "SHEATH_ALLOW_DNS", value_delimiter = ',')]
    pub allow_dns: Vec<String>,

    /// Allowed client subject CNs (comma-separated).
    #[arg(long, env = "SHEATH_ALLOW_CN", value_delimiter = ',')]
    pub allow_cn: Vec<String>,

    /// Identity to the HTTP upstream: `xfcc`, `client-cert`, `header` (comma-separated).
    #[arg(long, env = "SHEATH_FORWARD_IDENTITY", value_delimiter = ',')]
    pub forward_identity: Vec<String>,

    /// TCP mode: PROXY protocol header to the upstream, `v1` or `v2`.
    #[arg(long, env = "SHEATH_PROXY_PROTOCOL")]
    pub proxy_protocol: Option<String>,

    /// HTTP mode: HTTP version to the upstream, `http1`, `h2c` (gRPC) or `auto` (the client's).
    #[arg(long, env = "SHEATH_UPSTREAM_PROTOCOL")]
    pub upstream_protocol: Option<UpstreamProtocol>,

    /// TCP mode: ALPN protocols offered to clients; outbound mode: to the peer (comma-separated).
    #[arg(long, env = "SHEATH_ALPN", value_delimiter = ',')]
    pub alpn: Vec<String>,

    /// Oldest TLS version negotiated: `1.2` (default) or `1.3`.
    #[arg(long, env = "SHEATH_TLS_MIN_VERSION")]
    pub tls_min_version: Option<TlsVersion>,

    /// ACME directory URL; certificates for --name are then issued by ACME.
    #[arg(long, env = "SHEATH_ACME_DIRECTORY")]
    pub acme_directory: Option<String>,

    /// ACME challenge: `tls-alpn-01` (on the TLS port) or `http-01`.
    #[arg(long, env = "SHEATH_ACME_CHALLENGE")]
    pub acme_challenge: Option<String>,

    /// Listen address for HTTP-01 challenges, e.g. 0.0.0.0:80.
    #[arg(long, env = "SHEATH_ACME_HTTP01_BIND")]
    pub acme_http01_bind: Option<String>,

    /// PEM root to trust for the ACME server's HTTPS.
    #[arg(long, env = "SHEATH_ACME_CA_ROOT")]
    pub acme_ca_root: Option<PathBuf>,

    /// SHA-256 fingerprint of the ACME server's root (bootstrap trust).
    #[arg(long, env = "SHEATH_ACME_CA_FINGERPRINT")]
    pub acme_ca_fingerprint: Option<String>,

    /// ACME account contacts (comma-separated), e.g. mailto:ops@example.com.
    #[arg(long, env = "SHEATH_ACME_CONTACT", value_delimiter = ',')]
    pub acme_contact: Vec<String>,

    /// External account binding key id.
    #[arg(long, env = "SHEATH_ACME_EAB_KID", requires = "acme_eab_hmac_key")]
    pub acme_eab_kid: Option<String>,

    /// External account binding HMAC key (base64url).
    #[arg(long, env = "SHEATH_ACME_EAB_HMAC_KEY", requires = "acme_eab_kid")]
    pub acme_eab_hmac_key: Option<String>,
}

impl SingleListener {
    /// The flags that were given, for refusing them next to --config.
    fn given(&self) -> Vec<&'static str> {
        // Destructured without `..` so that a new flag cannot be added
        // without deciding here whether it conflicts with --config.
        let SingleListener {
            // clap itself refuses these next to --config (conflicts_with_all).
            listen: _,
            upstream: _,
            mode,
            peer_ca,
            peer_name,
            allow_remote_upstream,
            names,
            cert_lifetime,
            cert,
            key,
            max_connections,
            handshake_timeout,
            idle_timeout,
            connect_timeout,
            upstream_timeout,
            upstream_idle_timeout,
            max_lifetime,
            client_auth,
            client_ca,
            client_crl,
            allow_uri,
            allow_dns,
            allow_cn,
            forward_identity,
            proxy_protocol,
            upstream_protocol,
            alpn,
            tls_min_version,
            acme_directory,
            acme_challenge,
            acme_http01_bind,
            acme_ca_root,
            acme_ca_fingerprint,
            acme_contact,
            acme_eab_kid,
            acme_eab_hmac_key,
        } = self;
        let mut given = Vec::new();
        let mut flag = |set: bool, name: &'static str| {
            if set {
                given.push(name);
            }
        };
        flag(mode.is_some(), "--mode");
        flag(!peer_ca.is_empty(), "--peer-ca");
        flag(peer_name.is_some(), "--peer-name");
        flag(*allow_remote_upstream, "--allow-remote-upstream");
        flag(!names.is_empty(), "--name");
        flag(cert_lifetime.is_some(), "--cert-lifetime");
        flag(cert.is_some(), "--cert");
        flag(key.is_some(), "--key");
        flag(max_connections.is_some(), "--max-connections");
        flag(handshake_timeout.is_some(), "--handshake-timeout");
        flag(idle_timeout.is_some(), "--idle-timeout");
        flag(connect_timeout.is_some(), "--connect-timeout");
        flag(upstream_timeout.is_some(), "--upstream-timeout");
        flag(upstream_idle_timeout.is_some(), "--upstream-idle-timeout");
        flag(max_lifetime.is_some(), "--max-lifetime");
        flag(client_auth.is_some(), "--client-auth");
        flag(!client_ca.is_empty(), "--client-ca");
        flag(!client_crl.is_empty(), "--client-crl");
        flag(!allow_uri.is_empty(), "--allow-uri");
        flag(!allow_dns.is_empty(), "--allow-dns");
        flag(!allow_cn.is_empty(), "--allow-cn");
        flag(!forward_identity.is_empty(), "--forward-identity");
        flag(proxy_protocol.is_some(), "--proxy-protocol");
        flag(upstream_protocol.is_some(), "--upstream-protocol");
        flag(!alpn.is_empty(), "--alpn");
        flag(tls_min_version.is_some(), "--tls-min-version");
        flag(acme_directory.is_some(), "--acme-directory");
        flag(acme_challenge.is_some(), "--acme-challenge");
        flag(acme_http01_bind.is_some(), "--acme-http01-bind");
        flag(acme_ca_root.is_some(), "--acme-ca-root");
        flag(acme_ca_fingerprint.is_some(), "--acme-ca-fingerprint");
        flag(!acme_contact.is_empty(), "--acme-contact");
        flag(acme_eab_kid.is_some(), "--acme-eab-kid");
        flag(acme_eab_hmac_key.is_some(), "--acme-eab-hmac-key");
        given
    }
}

impl ConfigArgs {
    /// The configuration these arguments describe: the config file when
    /// given, otherwise the single listener from flags. `state_dir`
    /// overrides the file's.
    pub fn to_config(&self, state_dir: Option<&PathBuf>) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => {
                // Silently ignoring a flag would run something other than
                // what the operator asked for.
                if let Some(flag) = self.single.given().first() {
                    return Err(flag_error(
                        flag,
                        "single-listener flags cannot be combined with --config; put the setting in the config file",
                    ));
                }
                Config::load(path)?
            }
            None => self.single.to_config()?,
        };
        if let Some(dir) = state_dir {
            config.state_dir = dir.clone();
            config
                .origins
                .insert("global.state_dir", Origin::Flag("--state-dir"));
        }
        if let Some(t) = self.drain_timeout {
            if t.is_zero() {
                return Err(flag_error("--drain-timeout", "must be greater than zero"));
            }
            if t > config::MAX_DURATION {
                return Err(flag_error("--drain-timeout", config::MAX_DURATION_MESSAGE));
            }
            config.drain_timeout = t;
        }
        Ok(config)
    }
}

fn flag_error(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: Origin::Flag(flag),
        key: String::new(),
        message: message.into(),
    }
}

impl SingleListener {
    fn to_config(&self) -> Result<Config, ConfigError> {
        let listen = self.listen.as_deref().ok_or_else(|| {
            flag_error(
                "--listen",
                "give --config FILE, or --listen and --upstream (or SHEATH_LISTEN and SHEATH_UPSTREAM)",
            )
        })?;
        let upstream = self.upstream.as_deref().ok_or_else(|| {
            flag_error("--upstream", "--listen needs --upstream (SHEATH_UPSTREAM)")
        })?;
        let outbound_mode = self.mode == Some(Mode::Outbound);
        let bind = parse_bind(listen).map_err(|m| flag_error("--listen", m))?;
        let upstream = parse_upstream(upstream, self.allow_remote_upstream || outbound_mode)
            .map_err(|m| flag_error("--upstream", m))?;
        let outbound = if outbound_mode {
            config::check_outbound_bind(bind).map_err(|m| flag_error("--listen", m))?;
            let server_name = match &self.peer_name {
                Some(n) => {
                    config::parse_server_name(n).map_err(|m| flag_error("--peer-name", m))?
                }
                None => config::parse_server_name(&upstream.host)
                    .map_err(|m| flag_error("--upstream", format!("{m}; give --peer-name")))?,
            };
            Some(OutboundConfig {
                ca: self.peer_ca.clone(),
                server_name,
                poll_interval: config::DEFAULT_TRUST_POLL_INTERVAL,
            })
        } else {
            if !self.peer_ca.is_empty() {
                return Err(flag_error("--peer-ca", "needs --mode outbound"));
            }
            if self.peer_name.is_some() {
                return Err(flag_error("--peer-name", "needs --mode outbound"));
            }
            None
        };
        let names = if self.names.is_empty() {
            None
        } else {
            Some(parse_names(&self.names).map_err(|m| flag_error("--name", m))?)
        };
        if self.cert_lifetime.is_some() && (self.cert.is_some() || self.acme_directory.is_some()) {
            // Ignoring it would leave the operator expecting leaves of a
            // lifetime that nothing here issues.
            return Err(flag_error(
                "--cert-lifetime",
                "sets the lifetime of local-CA certificates; it has no effect with --cert/--key or --acme-directory",
            ));
        }
        if self.acme_directory.is_none() {
            // Without a directory there is no ACME client to hand these
            // to; taken silently, the operator would wait for a
            // certificate from a CA sheath never asks.
            let acme_only = [
                (self.acme_challenge.is_some(), "--acme-challenge"),
                (self.acme_http01_bind.is_some(), "--acme-http01-bind"),
                (self.acme_ca_root.is_some(), "--acme-ca-root"),
                (self.acme_ca_fingerprint.is_some(), "--acme-ca-fingerprint"),
                (!self.acme_contact.is_empty(), "--acme-contact"),
                (self.acme_eab_kid.is_some(), "--acme-eab-kid"),
            ];
            if let Some((_, flag)) = acme_only.into_iter().find(|(set, _)| *set) {
                return Err(flag_error(
                    flag,
                    "needs --acme-directory (without it the certificate comes from --cert/--key or the local CA)",
                ));
            }
        }
        let cert = match (&self.cert, &self.key, &self.acme_directory) {
            (Some(_), _, Some(_)) => {
                return Err(flag_error(
                    "--acme-directory",
                    "choose --cert/--key or --acme-directory, not both",
                ))
            }
            (Some(cert), Some(key), None) => CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            (_, _, Some(directory)) => CertSource::Acme(Box::new(self.acme(directory, names)?)),
            _ => {
                let names = names.unwrap_or_else(|| match CertSource::default_local_ca() {
                    CertSource::LocalCa { names, .. } => names,
                    _ => unreachable!(),
                });
                let lifetime = self.cert_lifetime.unwrap_or(DEFAULT_LOCAL_CA_LIFETIME);
                if lifetime < Duration::from_secs(10) {
                    return Err(flag_error("--cert-lifetime", "must be at least 10 seconds"));
                }
                if lifetime > config::MAX_DURATION {
                    return Err(flag_error("--cert-lifetime", config::MAX_DURATION_MESSAGE));
                }
                CertSource::LocalCa { names, lifetime }
            }
        };
        let mode = self.mode.unwrap_or_default();
        let client_auth = self.client_auth_config(mode)?;
        if outbound_mode && client_auth.mode != ClientAuthMode::None {
            return Err(flag_error("--client-auth", config::OUTBOUND_CLIENT_AUTH));
        }
        let proxy_protocol = match self.proxy_protocol.as_deref() {
            None => None,
            Some(_) if mode != Mode::Tcp => {
                return Err(flag_error("--proxy-protocol", "needs --mode tcp"))
            }
            Some("v1") => Some(ProxyProtocol::V1),
            Some("v2") => Some(ProxyProtocol::V2),
            Some(other) => {
                return Err(flag_error(
                    "--proxy-protocol",
                    format!("unknown version `{other}`, expected `v1` or `v2`"),
                ))
            }
        };
        if self.upstream_protocol.is_some() && mode != Mode::Http {
            return Err(flag_error("--upstream-protocol", "needs --mode http"));
        }
        if !self.alpn.is_empty() {
            if mode == Mode::Http {
                return Err(flag_error("--alpn", "needs --mode tcp or outbound"));
            }
            config::check_alpn(&self.alpn).map_err(|m| flag_error("--alpn", m))?;
        }
        let d = Timeouts::default();
        let positive = |flag: &'static str, v: Option<Duration>, default: Duration| match v {
            Some(v) if v.is_zero() => Err(flag_error(flag, "must be greater than zero")),
            Some(v) if v > config::MAX_DURATION => {
                Err(flag_error(flag, config::MAX_DURATION_MESSAGE))
            }
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let timeouts = Timeouts {
            handshake: positive("--handshake-timeout", self.handshake_timeout, d.handshake)?,
            idle: positive("--idle-timeout", self.idle_timeout, d.idle)?,
            connect: positive("--connect-timeout", self.connect_timeout, d.connect)?,
            upstream_response: positive(
                "--upstream-timeout",
                self.upstream_timeout,
                d.upstream_response,
            )?,
            header_read: d.header_read,
            upstream_idle: positive(
                "--upstream-idle-timeout",
                self.upstream_idle_timeout,
                d.upstream_idle,
            )?,
            max_lifetime: match self.max_lifetime {
                Some(v) if v.is_zero() => {
                    return Err(flag_error("--max-lifetime", "must be greater than zero"))
                }
                Some(v) if v > config::MAX_DURATION => {
                    return Err(flag_error("--max-lifetime", config::MAX_DURATION_MESSAGE))
                }
                v => v,
            },
        };
        let max_connections = match self.max_connections {
            Some(0) => return Err(flag_error("--max-connections", "must be at least 1")),
            Some(n) if n > config::MAX_CONNECTIONS_LIMIT => {
                return Err(flag_error(
                    "--max-connections",
                    format!("must be at most {}", config::MAX_CONNECTIONS_LIMIT),
                ))
            }
            Some(n) => n,
            None => DEFAULT_MAX_CONNECTIONS,
        };
        Ok(Config {
            path: None,
            state_dir: config::default_state_dir(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            admin: Some(config::DEFAULT_ADMIN),
            origins: self.origins(),
            listeners: vec![ListenerConfig {
                name: "default".into(),
                bind,
                upstream,
                mode: self.mode.unwrap_or_default(),
                max_connections,
                timeouts,
                cert,
                cert_policy: Default::default(),
                sni_certs: Vec::new(),
                client_auth,
                proxy_protocol,
                upstream_protocol: self.upstream_protocol.unwrap_or_default(),
                alpn: self.alpn.clone(),
                tls_min_version: self.tls_min_version.unwrap_or_default(),
                outbound,
            }],
        })
    }
}

impl SingleListener {
    /// Which flag gave each setting that names a file or an address, for
    /// errors found when it is used.
    fn origins(&self) -> config::Origins {
        let mut origins = config::Origins::default();
        for (key, flag) in [
            ("listener[0].bind", "--listen"),
            ("listener[0].cert.cert", "--cert"),
            ("listener[0].cert.key", "--key"),
            ("listener[0].cert.ca_root", "--acme-ca-root"),
            ("listener[0].cert.http01_bind", "--acme-http01-bind"),
            ("listener[0].client_auth.ca", "--client-ca"),
            ("listener[0].client_auth.crl", "--client-crl"),
            ("listener[0].outbound.ca", "--peer-ca"),
        ] {
            origins.insert(key, Origin::Flag(flag));
        }
        origins
    }

    fn acme(&self, directory: &str, names: Option<Vec<String>>) -> Result<AcmeConfig, ConfigError> {
        let names = names
            .ok_or_else(|| flag_error("--name", "ACME needs the names to request (--name)"))?;
        if !directory.starts_with("https://") {
            return Err(flag_error(
                "--acme-directory",
                format!("`{directory}` is not an https:// URL"),
            ));
        }
        let challenge = match self.acme_challenge.as_deref() {
            None | Some("tls-alpn-01") => AcmeChallenge::TlsAlpn01,
            Some("http-01") => AcmeChallenge::Http01,
            Some(other) => {
                return Err(flag_error(
                    "--acme-challenge",
                    format!("unknown challenge `{other}`, expected `tls-alpn-01` or `http-01`"),
                ))
            }
        };
        let http01_bind = match &self.acme_http01_bind {
            Some(b) => Some(parse_bind(b).map_err(|m| flag_error("--acme-http01-bind", m))?),
            None if challenge == AcmeChallenge::Http01 => {
                return Err(flag_error(
                    "--acme-http01-bind",
                    "http-01 needs --acme-http01-bind, e.g. 0.0.0.0:80",
                ))
            }
            None => None,
        };
        let trust = match (&self.acme_ca_root, &self.acme_ca_fingerprint) {
            (Some(_), Some(_)) => {
                return Err(flag_error(
                    "--acme-ca-fingerprint",
                    "give --acme-ca-root or --acme-ca-fingerprint, not both",
                ))
            }
            (Some(root), None) => AcmeTrust::RootFile(root.clone()),
            (None, Some(fp)) => AcmeTrust::Fingerprint(
                parse_fingerprint(fp).map_err(|m| flag_error("--acme-ca-fingerprint", m))?,
            ),
            (None, None) => AcmeTrust::System,
        };
        Ok(AcmeConfig {
            directory: directory.to_string(),
            names,
            contact: self.acme_contact.clone(),
            challenge,
            http01_bind,
            trust,
            eab: self
                .acme_eab_kid
                .clone()
                .zip(self.acme_eab_hmac_key.clone()),
            key_type: Default::default(),
        })
    }

    fn client_auth_config(&self, mode: Mode) -> Result<ClientAuthConfig, ConfigError> {
        let auth_mode = match self.client_auth.as_deref() {
            None | Some("none") => ClientAuthMode::None,
            Some("optional") => ClientAuthMode::Optional,
            Some("require") => ClientAuthMode::Require,
            Some(other) => {
                return Err(flag_error(
                    "--client-auth",
                    format!("unknown mode `{other}`, expected `none`, `optional` or `require`"),
                ))
            }
        };
        if auth_mode != ClientAuthMode::None && self.client_ca.is_empty() {
            return Err(flag_error(
                "--client-ca",
                "client certificates need --client-ca",
            ));
        }
        if auth_mode == ClientAuthMode::None && !self.client_crl.is_empty() {
            // Without client certificates there is nothing to revoke: the
            // operator meant to turn client authentication on.
            return Err(flag_error(
                "--client-crl",
                "revokes client certificates; it needs --client-auth optional or require",
            ));
        }
        if auth_mode == ClientAuthMode::None
            && (!self.client_ca.is_empty()
                || !self.allow_uri.is_empty()
                || !self.allow_dns.is_empty()
                || !self.allow_cn.is_empty())
        {
            return Err(flag_error(
                "--client-auth",
                "client CA and allow-lists need --client-auth optional or require",
            ));
        }
        let mut forward = ForwardIdentity::default();
        for f in &self.forward_identity {
            match f.as_str() {
                "xfcc" => forward.xfcc = true,
                "client-cert" => forward.client_cert = true,
                "header" => forward.header = Some(config::ForwardIdentity::default_header()),
                other => {
                    return Err(flag_error(
                        "--forward-identity",
                        format!("unknown identity format `{other}`, expected `xfcc`, `client-cert` or `header`"),
                    ))
                }
            }
        }
        if !self.forward_identity.is_empty() && mode != Mode::Http {
            return Err(flag_error(
                "--forward-identity",
                "identity headers need --mode http",
            ));
        }
        for u in &self.allow_uri {
            if !u.contains("://") {
                return Err(flag_error("--allow-uri", format!("`{u}` is not a URI")));
            }
        }
        Ok(ClientAuthConfig {
            mode: auth_mode,
            ca: self.client_ca.clone(),
            crl: self.client_crl.clone(),
            allow: AllowList {
                dns: self.allow_dns.clone(),
                uri: self.allow_uri.clone(),
                cn: self.allow_cn.clone(),
                ..AllowList::default()
            },
            forward,
            poll_interval: config::DEFAULT_TRUST_POLL_INTERVAL,
        })
    }
}
