//! Raw file values → [`Config`]: the rules sheath enforces, each error
//! naming where the value came from.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::file::{line_col, FileConfig, ListenerFile, TimeoutsFile};
use super::{
    default_state_dir, CertSource, Config, ConfigError, ListenerConfig, Origin, Timeouts, Upstream,
    DEFAULT_MAX_CONNECTIONS,
};

pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_LOCAL_CA_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Resolves spans in one file into origins.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn at<T>(&self, spanned: &Spanned<T>) -> Origin {
        self.at_offset(spanned.span().start)
    }

    fn at_offset(&self, offset: usize) -> Origin {
        let (line, column) = line_col(self.text, offset);
        Origin::File {
            path: self.path.to_path_buf(),
            line,
            column,
        }
    }

    /// Relative paths in a config file are relative to the file's directory,
    /// so a config and its certificates can move together.
    fn resolve_path(&self, value: &str) -> PathBuf {
        let p = Path::new(value);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

fn invalid(origin: Origin, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin,
        key: key.into(),
        message: message.into(),
    }
}

pub(super) fn validate(path: &Path, text: &str, raw: FileConfig) -> Result<Config, ConfigError> {
    let loc = Locator { path, text };
    let state_dir = match &raw.global.state_dir {
        Some(dir) if dir.get_ref().is_empty() => {
            return Err(invalid(
                loc.at(dir),
                "global.state_dir",
                "must not be empty",
            ))
        }
        Some(dir) => loc.resolve_path(dir.get_ref()),
        None => default_state_dir(),
    };
    let drain_timeout = raw.global.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT);
    if drain_timeout.is_zero() {
        return Err(invalid(
            loc.at_offset(0),
            "global.drain_timeout",
            "must be greater than zero",
        ));
    }

    if raw.listeners.is_empty() {
        return Err(invalid(
            loc.at_offset(text.len()),
            "listener",
            "no [[listener]] defined; sheath needs at least one",
        ));
    }

    let mut listeners = Vec::with_capacity(raw.listeners.len());
    let mut names = HashSet::new();
    let mut binds = HashSet::new();
    for (index, spanned) in raw.listeners.into_iter().enumerate() {
        let table_origin = loc.at(&spanned);
        let listener = validate_listener(&loc, index, &table_origin, spanned.into_inner())?;
        if !names.insert(listener.name.clone()) {
            return Err(invalid(
                table_origin,
                format!("listener[{index}].name"),
                format!("duplicate listener name `{}`", listener.name),
            ));
        }
        // Port 0 asks the kernel for a fresh port each time, so it never collides.
        if listener.bind.port() != 0 && !binds.insert(listener.bind) {
            return Err(invalid(
                table_origin,
                format!("listener[{index}].bind"),
                format!("{} is already used by another listener", listener.bind),
            ));
        }
        listeners.push(listener);
    }

    Ok(Config {
        path: Some(path.to_path_buf()),
        state_dir,
        drain_timeout,
        listeners,
    })
}

fn validate_listener(
    loc: &Locator<'_>,
    index: usize,
    table_origin: &Origin,
    raw: ListenerFile,
) -> Result<ListenerConfig, ConfigError> {
    let key = |k: &str| format!("listener[{index}].{k}");
    let name = match &raw.name {
        Some(n) if n.get_ref().trim().is_empty() => {
            return Err(invalid(loc.at(n), key("name"), "must not be empty"))
        }
        Some(n) => n.get_ref().clone(),
        None => format!("listener{index}"),
    };
    let bind =
        parse_bind(raw.bind.get_ref()).map_err(|m| invalid(loc.at(&raw.bind), key("bind"), m))?;
    let upstream = parse_upstream(raw.upstream.get_ref(), raw.allow_remote_upstream)
        .map_err(|m| invalid(loc.at(&raw.upstream), key("upstream"), m))?;
    let max_connections = match &raw.max_connections {
        Some(n) if *n.get_ref() == 0 => {
            return Err(invalid(
                loc.at(n),
                key("max_connections"),
                "must be at least 1",
            ))
        }
        Some(n) => *n.get_ref(),
        None => DEFAULT_MAX_CONNECTIONS,
    };
    let timeouts = validate_timeouts(&raw.timeouts).map_err(|(field, message)| {
        invalid(
            table_origin.clone(),
            key(&format!("timeouts.{field}")),
            message,
        )
    })?;

    let cert = match raw.cert {
        None => CertSource::default_local_ca(),
        Some(spanned) => {
            let table = loc.at(&spanned);
            let cert = spanned.into_inner();
            let source = cert
                .source
                .as_ref()
                .map_or("local_ca", |s| s.get_ref().as_str());
            match source {
                "local_ca" => {
                    if let Some(c) = cert.cert.as_ref().or(cert.key.as_ref()) {
                        return Err(invalid(
                            loc.at(c),
                            key("cert"),
                            "`cert` and `key` need source = \"files\"",
                        ));
                    }
                    let names = match &cert.names {
                        Some(n) => parse_names(n.get_ref())
                            .map_err(|m| invalid(loc.at(n), key("cert.names"), m))?,
                        None => match CertSource::default_local_ca() {
                            CertSource::LocalCa { names, .. } => names,
                            CertSource::Files { .. } => unreachable!(),
                        },
                    };
                    let lifetime = cert.lifetime.unwrap_or(DEFAULT_LOCAL_CA_LIFETIME);
                    if lifetime < Duration::from_secs(60) {
                        return Err(invalid(
                            table,
                            key("cert.lifetime"),
                            "must be at least 1 minute",
                        ));
                    }
                    CertSource::LocalCa { names, lifetime }
                }
                "files" => {
                    let (Some(c), Some(k)) = (&cert.cert, &cert.key) else {
                        return Err(invalid(
                            table,
                            key("cert"),
                            "source = \"files\" needs both `cert` (PEM chain) and `key` (PEM private key)",
                        ));
                    };
                    if let Some(n) = &cert.names {
                        return Err(invalid(
                            loc.at(n),
                            key("cert.names"),
                            "`names` comes from the certificate itself with source = \"files\"",
                        ));
                    }
                    CertSource::Files {
                        cert: loc.resolve_path(c.get_ref()),
                        key: loc.resolve_path(k.get_ref()),
                    }
                }
                other => {
                    let origin = cert.source.as_ref().map_or(table, |s| loc.at(s));
                    return Err(invalid(
                        origin,
                        key("cert.source"),
                        format!(
                            "unknown certificate source `{other}`, expected `local_ca` or `files`"
                        ),
                    ));
                }
            }
        }
    };

    Ok(ListenerConfig {
        name,
        bind,
        upstream,
        mode: raw.mode,
        max_connections,
        timeouts,
        cert,
    })
}

fn validate_timeouts(raw: &TimeoutsFile) -> Result<Timeouts, (&'static str, String)> {
    let d = Timeouts::default();
    let pick = |field: &'static str, v: Option<Duration>, default: Duration| match v {
        Some(v) if v.is_zero() => Err((field, "must be greater than zero".to_string())),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    Ok(Timeouts {
        handshake: pick("handshake", raw.handshake, d.handshake)?,
        idle: pick("idle", raw.idle, d.idle)?,
        connect: pick("connect", raw.connect, d.connect)?,
        upstream_response: pick(
            "upstream_response",
            raw.upstream_response,
            d.upstream_response,
        )?,
        header_read: pick("header_read", raw.header_read, d.header_read)?,
    })
}

/// A listen address: `IP:PORT`, IPv6 in brackets.
pub fn parse_bind(value: &str) -> Result<SocketAddr, String> {
    value.parse::<SocketAddr>().map_err(|_| {
        format!("`{value}` is not a valid listen address; expected IP:PORT such as 0.0.0.0:8443 or [::]:8443")
    })
}

/// An upstream `HOST:PORT`. Only loopback is accepted unless remote upstreams
/// were explicitly allowed: sheath exists to front a service in its own
/// network namespace, and a typo must not turn it into an open relay.
pub fn parse_upstream(value: &str, allow_remote: bool) -> Result<Upstream, String> {
    let bad = || {
        format!(
            "`{value}` is not a valid upstream address; expected HOST:PORT such as 127.0.0.1:8080"
        )
    };
    let (host, port) = if let Ok(addr) = value.parse::<SocketAddr>() {
        (addr.ip().to_string(), addr.port())
    } else {
        let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || host.contains(':') || host.contains('/') || host.contains(' ') {
            return Err(bad());
        }
        (host.to_ascii_lowercase(), port)
    };
    if port == 0 {
        return Err(format!("`{value}`: upstream port must not be 0"));
    }
    let loopback = match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host == "localhost" || host.ends_with(".localhost"),
    };
    if !loopback && !allow_remote {
        return Err(format!(
            "`{value}` is not a loopback address; sheath only proxies to its own namespace unless allow_remote_upstream = true (flag --allow-remote-upstream)"
        ));
    }
    Ok(Upstream {
        host,
        port,
        loopback,
    })
}

/// Certificate names: DNS names (optionally one leading wildcard label) or
/// IP literals.
pub fn parse_names(names: &[String]) -> Result<Vec<String>, String> {
    if names.is_empty() {
        return Err("at least one name is needed".into());
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let name = name.trim().to_ascii_lowercase();
        if name.parse::<IpAddr>().is_err() {
            let dns = name.strip_prefix("*.").unwrap_or(&name);
            if rustls_pki_types::DnsName::try_from(dns).is_err() || dns.contains('*') {
                return Err(format!("`{name}` is neither a DNS name nor an IP address"));
            }
        }
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}
