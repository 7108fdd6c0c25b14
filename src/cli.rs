//! Command-line arguments (raw, as clap parses them) and their conversion
//! into a validated [`Config`].
//!
//! Every flag of the single-listener form has a `SHEATH_*` environment
//! variable, so a Compose file or a pod spec needs no config file.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    self, parse_bind, parse_names, parse_upstream, CertSource, Config, ConfigError, ListenerConfig,
    Mode, Origin, Timeouts, DEFAULT_DRAIN_TIMEOUT, DEFAULT_LOCAL_CA_LIFETIME,
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

    /// Runtime worker threads [default: CPUs available to the process].
    #[arg(long, global = true, env = "SHEATH_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,

    /// Directory for persistent state (local CA) [default: from the config
    /// file, else $XDG_STATE_HOME/sheath, ~/.local/state/sheath or
    /// /var/lib/sheath].
    #[arg(long, global = true, env = "SHEATH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
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

    /// Relay mode.
    #[arg(long, env = "SHEATH_MODE", default_value = "http")]
    pub mode: Mode,

    /// Allow an upstream outside this network namespace's loopback.
    #[arg(long, env = "SHEATH_ALLOW_REMOTE_UPSTREAM")]
    pub allow_remote_upstream: bool,

    /// Certificate names for the local CA (comma-separated DNS names or IPs).
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
}

impl ConfigArgs {
    /// The configuration these arguments describe: the config file when
    /// given, otherwise the single listener from flags. `state_dir`
    /// overrides the file's.
    pub fn to_config(&self, state_dir: Option<&PathBuf>) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => self.single.to_config()?,
        };
        if let Some(dir) = state_dir {
            config.state_dir = dir.clone();
        }
        if let Some(t) = self.drain_timeout {
            if t.is_zero() {
                return Err(flag_error("--drain-timeout", "must be greater than zero"));
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
        let bind = parse_bind(listen).map_err(|m| flag_error("--listen", m))?;
        let upstream = parse_upstream(upstream, self.allow_remote_upstream)
            .map_err(|m| flag_error("--upstream", m))?;
        let cert = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => {
                let names = if self.names.is_empty() {
                    match CertSource::default_local_ca() {
                        CertSource::LocalCa { names, .. } => names,
                        _ => unreachable!(),
                    }
                } else {
                    parse_names(&self.names).map_err(|m| flag_error("--name", m))?
                };
                CertSource::LocalCa {
                    names,
                    lifetime: self.cert_lifetime.unwrap_or(DEFAULT_LOCAL_CA_LIFETIME),
                }
            }
        };
        let d = Timeouts::default();
        let positive = |flag: &'static str, v: Option<Duration>, default: Duration| match v {
            Some(v) if v.is_zero() => Err(flag_error(flag, "must be greater than zero")),
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
            max_lifetime: None,
        };
        let max_connections = match self.max_connections {
            Some(0) => return Err(flag_error("--max-connections", "must be at least 1")),
            Some(n) => n,
            None => DEFAULT_MAX_CONNECTIONS,
        };
        Ok(Config {
            path: None,
            state_dir: config::default_state_dir(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            listeners: vec![ListenerConfig {
                name: "default".into(),
                bind,
                upstream,
                mode: self.mode,
                max_connections,
                timeouts,
                cert,
                cert_policy: Default::default(),
                client_auth: Default::default(),
                proxy_protocol: None,
            }],
        })
    }
}
