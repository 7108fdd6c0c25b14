//! Raw file values → [`Config`]: the rules sheath enforces, each error
//! naming where the value came from.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::file::{
    line_col, CertFile, ClientAuthFile, FileConfig, HumanDuration, ListenerFile, OneOrMany,
    OutboundFile, TimeoutsFile,
};
use super::{
    default_state_dir, AcmeChallenge, AcmeConfig, AcmeTrust, AllowList, CertPolicy, CertRef,
    CertSource, ClientAuthConfig, ClientAuthMode, Config, ConfigError, ExportConfig,
    ForwardIdentity, KeyType, ListenerConfig, Mode, Origin, Origins, OutboundConfig, ProxyProtocol,
    SniCert, Timeouts, TlsVersion, Upstream, UpstreamProtocol, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TRUST_POLL_INTERVAL,
};

pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The admin endpoint: loopback, so only the pod/namespace can reach it.
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9190);
pub const DEFAULT_LOCAL_CA_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The longest duration any setting takes. Deadlines and certificate dates
/// are computed by adding durations to the clock, and a duration near
/// `u64::MAX` seconds (which the duration syntax accepts) overflows it: a
/// connection panicked its worker, a local-CA leaf stopped startup.
/// A century stands for "never" wherever that is meant; `100y` is
/// accepted (the syntax counts a year as 365.25 days).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);
/// Why a duration above [`MAX_DURATION`] is refused.
pub const MAX_DURATION_MESSAGE: &str = "must be at most 100 years";

/// The most connections a listener may be given at once. The limit is a
/// semaphore, whose capacity is bounded (a larger value panicked at
/// startup); no process has file descriptors for this many anyway.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000_000;

/// Resolves spans in one file into origins.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
    /// Where the keys that name files and addresses were written, kept
    /// with the configuration for errors found when they are used.
    origins: std::cell::RefCell<Origins>,
}

impl Locator<'_> {
    /// Remember where `key` was written.
    fn record<T>(&self, key: &str, spanned: &Spanned<T>) {
        let origin = self.at(spanned);
        self.origins.borrow_mut().insert(key, origin);
    }

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

    /// A file named by `key`, written at `origin`. An empty string is
    /// refused: resolved like any relative path it named the config
    /// file's directory, which `check` passed and `run` failed to read.
    fn file(&self, value: &str, origin: &Origin, key: &str) -> Result<PathBuf, ConfigError> {
        if value.trim().is_empty() {
            return Err(invalid(
                origin.clone(),
                key,
                "a file path must not be empty",
            ));
        }
        Ok(self.resolve_path(value))
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

/// A duration key's value and where it was written, refused above
/// [`MAX_DURATION`]; further bounds are the caller's.
fn duration(
    loc: &Locator<'_>,
    raw: &Option<Spanned<HumanDuration>>,
    key: &str,
) -> Result<Option<(Duration, Origin)>, ConfigError> {
    let Some(spanned) = raw else { return Ok(None) };
    let value = spanned.get_ref().0;
    if value > MAX_DURATION {
        return Err(invalid(loc.at(spanned), key, MAX_DURATION_MESSAGE));
    }
    Ok(Some((value, loc.at(spanned))))
}

/// `value` unless it is below `min`, which is refused at its line.
fn at_least(
    value: Option<(Duration, Origin)>,
    min: Duration,
    key: impl Into<String>,
    message: &str,
) -> Result<Option<Duration>, ConfigError> {
    match value {
        Some((v, origin)) if v < min => Err(invalid(origin, key, message)),
        other => Ok(other.map(|(v, _)| v)),
    }
}

/// See [`at_least`]: the least duration that is not zero.
const NOT_ZERO: Duration = Duration::from_nanos(1);

fn invalid(origin: Origin, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin,
        key: key.into(),
        message: message.into(),
    }
}

pub(super) fn validate(path: &Path, text: &str, raw: FileConfig) -> Result<Config, ConfigError> {
    let loc = Locator {
        path,
        text,
        origins: Default::default(),
    };
    let state_dir = match &raw.global.state_dir {
        Some(dir) if dir.get_ref().is_empty() => {
            return Err(invalid(
                loc.at(dir),
                "global.state_dir",
                "must not be empty",
            ))
        }
        Some(dir) => {
            loc.record("global.state_dir", dir);
            loc.resolve_path(dir.get_ref())
        }
        None => default_state_dir(),
    };
    let drain_timeout = at_least(
        duration(&loc, &raw.global.drain_timeout, "global.drain_timeout")?,
        NOT_ZERO,
        "global.drain_timeout",
        "must be greater than zero",
    )?
    .unwrap_or(DEFAULT_DRAIN_TIMEOUT);

    let admin = match (raw.admin.enabled, &raw.admin.bind) {
        (Some(false), _) => None,
        (_, None) => Some(DEFAULT_ADMIN),
        (_, Some(bind)) => Some({
            loc.record("admin.bind", bind);
            parse_bind(bind.get_ref())
                .map_err(|message| invalid(loc.at(bind), "admin.bind", message))?
        }),
    };

    if raw.listeners.is_empty() {
        return Err(invalid(
            loc.at_offset(text.len()),
            "listener",
            "no [[listener]] defined; sheath needs at least one",
        ));
    }

    let mut listeners = Vec::with_capacity(raw.listeners.len());
    let mut names = HashSet::new();
    // Every address sheath listens on, with the key that gives it.
    let mut binds: Vec<(SocketAddr, String)> = Vec::new();
    let mut exports = HashMap::new();
    for (index, spanned) in raw.listeners.into_iter().enumerate() {
        let table_origin = loc.at(&spanned);
        loc.record(&format!("listener[{index}]"), &spanned);
        let (listener, cert_origins) =
            validate_listener(&loc, index, &table_origin, spanned.into_inner())?;
        if !names.insert(listener.name.clone()) {
            return Err(invalid(
                table_origin,
                format!("listener[{index}].name"),
                format!("duplicate listener name `{}`", listener.name),
            ));
        }
        let key = format!("listener[{index}].bind");
        check_bind(&loc, &binds, listener.bind, &key, &table_origin)?;
        binds.push((listener.bind, key));
        // HTTP-01 listeners may be shared by ACME certificates, but not
        // with anything else.
        for (bind, key) in listener.http01_binds(index) {
            if binds
                .iter()
                .any(|(b, k)| *b == bind && k.ends_with(".http01_bind"))
            {
                continue;
            }
            check_bind(&loc, &binds, bind, &key, &table_origin)?;
            binds.push((bind, key));
        }
        // A name selects at most one certificate of a listener.
        let mut cert_names = HashMap::new();
        for ((cert, source, policy), origin) in listener.certs().zip(cert_origins) {
            let table = cert.table_key(index);
            if let Some(export) = &policy.export {
                if let Some(other) = exports.insert(export.dir.clone(), table.clone()) {
                    return Err(invalid(
                        origin,
                        format!("{table}.export.dir"),
                        format!(
                            "{} is already the export directory of {other}; each certificate needs its own",
                            export.dir.display()
                        ),
                    ));
                }
            }
            let configured = match source {
                CertSource::LocalCa { names, .. } => names.as_slice(),
                CertSource::Acme(acme) => acme.names.as_slice(),
                CertSource::Files { .. } => &[],
            };
            // Lowercase already (parse_names).
            for name in configured {
                if let Some(other) = cert_names.insert(name, table.clone()) {
                    return Err(invalid(
                        origin,
                        format!("{table}.names"),
                        format!(
                            "`{name}` is also in {other}.names; a name can select only one certificate of a listener"
                        ),
                    ));
                }
            }
        }
        listeners.push(listener);
    }

    Ok(Config {
        path: Some(path.to_path_buf()),
        state_dir,
        drain_timeout,
        listeners,
        admin,
        origins: loc.origins.into_inner(),
    })
}

fn validate_listener(
    loc: &Locator<'_>,
    index: usize,
    table_origin: &Origin,
    raw: ListenerFile,
) -> Result<(ListenerConfig, Vec<Origin>), ConfigError> {
    let key = |k: &str| format!("listener[{index}].{k}");
    let name = match &raw.name {
        Some(n) => {
            check_listener_name(n.get_ref()).map_err(|m| invalid(loc.at(n), key("name"), m))?;
            n.get_ref().clone()
        }
        None => format!("listener{index}"),
    };
    loc.record(&key("bind"), &raw.bind);
    let bind =
        parse_bind(raw.bind.get_ref()).map_err(|m| invalid(loc.at(&raw.bind), key("bind"), m))?;
    // An outbound listener's upstream is the remote peer, so it may be
    // anywhere; what must stay in the namespace is its plaintext side.
    let outbound_mode = raw.mode == Mode::Outbound;
    let upstream = parse_upstream(
        raw.upstream.get_ref(),
        raw.allow_remote_upstream || outbound_mode,
    )
    .map_err(|m| invalid(loc.at(&raw.upstream), key("upstream"), m))?;
    if outbound_mode {
        check_outbound_bind(bind).map_err(|m| invalid(loc.at(&raw.bind), key("bind"), m))?;
    }
    let max_connections = match &raw.max_connections {
        Some(n) if *n.get_ref() == 0 => {
            return Err(invalid(
                loc.at(n),
                key("max_connections"),
                "must be at least 1",
            ))
        }
        Some(n) if *n.get_ref() > MAX_CONNECTIONS_LIMIT => {
            return Err(invalid(
                loc.at(n),
                key("max_connections"),
                format!("must be at most {MAX_CONNECTIONS_LIMIT}"),
            ))
        }
        Some(n) => *n.get_ref(),
        None => DEFAULT_MAX_CONNECTIONS,
    };
    let timeouts = validate_timeouts(loc, index, &raw.timeouts)?;

    if let (true, Some(first)) = (outbound_mode, raw.sni_cert.first()) {
        return Err(invalid(
            loc.at(first),
            key("sni_cert"),
            "an outbound listener presents one certificate, [listener.cert]; SNI certificates need mode = \"http\" or \"tcp\"",
        ));
    }
    // Where each certificate's table starts, for errors that involve two.
    let mut cert_origins = vec![raw
        .cert
        .as_ref()
        .map_or(table_origin.clone(), |c| loc.at(c))];
    let (cert, cert_policy) =
        validate_cert(loc, &CertRef::Default.table_key(index), raw.cert, false)?;
    let mut sni_certs = Vec::with_capacity(raw.sni_cert.len());
    for (i, table) in raw.sni_cert.into_iter().enumerate() {
        cert_origins.push(loc.at(&table));
        let table_key = CertRef::Sni(i).table_key(index);
        let (source, policy) = validate_cert(loc, &table_key, Some(table), true)?;
        sni_certs.push(SniCert { source, policy });
    }
    let client_auth_origin = raw.client_auth.as_ref().map(|c| loc.at(c));
    let client_auth = validate_client_auth(loc, index, raw.mode, raw.client_auth)?;
    if let (true, Some(origin)) = (
        outbound_mode && client_auth.mode != ClientAuthMode::None,
        client_auth_origin,
    ) {
        return Err(invalid(
            origin,
            key("client_auth.mode"),
            OUTBOUND_CLIENT_AUTH,
        ));
    }
    let outbound = validate_outbound(
        loc,
        index,
        raw.mode,
        (&upstream, &raw.upstream),
        raw.outbound,
    )?;
    let proxy_protocol = match &raw.proxy_protocol {
        None => None,
        Some(p) => {
            let v = match p.get_ref().as_str() {
                "v1" => ProxyProtocol::V1,
                "v2" => ProxyProtocol::V2,
                other => {
                    return Err(invalid(
                        loc.at(p),
                        key("proxy_protocol"),
                        format!("unknown PROXY protocol version `{other}`, expected `v1` or `v2`"),
                    ))
                }
            };
            if raw.mode != Mode::Tcp {
                return Err(invalid(
                    loc.at(p),
                    key("proxy_protocol"),
                    "needs mode = \"tcp\"; in HTTP mode the client is described by forwarding headers",
                ));
            }
            Some(v)
        }
    };
    let upstream_protocol = match &raw.upstream_protocol {
        None => UpstreamProtocol::default(),
        Some(p) => {
            let protocol = p
                .get_ref()
                .parse::<UpstreamProtocol>()
                .map_err(|m| invalid(loc.at(p), key("upstream_protocol"), m))?;
            if raw.mode != Mode::Http {
                return Err(invalid(
                    loc.at(p),
                    key("upstream_protocol"),
                    format!(
                        "needs mode = \"http\"; mode = \"{}\" relays bytes, whatever the protocol",
                        raw.mode
                    ),
                ));
            }
            protocol
        }
    };
    let alpn = match &raw.alpn {
        None => Vec::new(),
        Some(list) => {
            let error = |m: String| invalid(loc.at(list), key("alpn"), m);
            if raw.mode == Mode::Http {
                return Err(error(
                    "needs mode = \"tcp\" or \"outbound\"; HTTP mode negotiates `h2` and `http/1.1` itself".into(),
                ));
            }
            check_alpn(list.get_ref()).map_err(error)?;
            list.get_ref().clone()
        }
    };
    let tls_min_version = match &raw.tls_min_version {
        None => TlsVersion::default(),
        Some(v) => v
            .get_ref()
            .parse()
            .map_err(|m| invalid(loc.at(v), key("tls_min_version"), m))?,
    };

    let listener = ListenerConfig {
        name,
        bind,
        upstream,
        mode: raw.mode,
        max_connections,
        timeouts,
        cert,
        cert_policy,
        sni_certs,
        client_auth,
        proxy_protocol,
        upstream_protocol,
        tls_min_version,
        alpn,
        outbound,
    };
    Ok((listener, cert_origins))
}

/// `[listener.outbound]`: only in outbound mode, where it is optional
/// (system roots, the upstream's host as the name).
fn validate_outbound(
    loc: &Locator<'_>,
    index: usize,
    mode: Mode,
    (upstream, upstream_span): (&Upstream, &Spanned<String>),
    raw: Option<Spanned<OutboundFile>>,
) -> Result<Option<OutboundConfig>, ConfigError> {
    let key = |k: &str| format!("listener[{index}].outbound{k}");
    if mode != Mode::Outbound {
        return match raw {
            Some(table) => Err(invalid(
                loc.at(&table),
                key(""),
                "[listener.outbound] needs mode = \"outbound\"",
            )),
            None => Ok(None),
        };
    }
    let raw = raw.map(Spanned::into_inner).unwrap_or_default();
    let ca = match raw.ca {
        Some(list) => {
            loc.record(&key(".ca"), &list);
            let origin = loc.at(&list);
            let paths: Vec<PathBuf> = list
                .into_inner()
                .into_vec()
                .iter()
                .map(|p| loc.file(p, &origin, &key(".ca")))
                .collect::<Result<_, _>>()?;
            if paths.is_empty() {
                return Err(invalid(
                    origin,
                    key(".ca"),
                    "an empty list trusts nothing; leave `ca` out to use the system's roots",
                ));
            }
            paths
        }
        None => Vec::new(),
    };
    let server_name = match raw.server_name {
        Some(name) => parse_server_name(name.get_ref())
            .map_err(|m| invalid(loc.at(&name), key(".server_name"), m))?,
        // The upstream syntax is looser than a DNS name (`peer..internal`
        // passes it); what the peer's certificate is checked against must
        // be a name a certificate can carry.
        None => parse_server_name(&upstream.host).map_err(|m| {
            invalid(
                loc.at(upstream_span),
                format!("listener[{index}].upstream"),
                format!("{m}; set [listener.outbound] server_name"),
            )
        })?,
    };
    let poll_interval = at_least(
        duration(loc, &raw.poll_interval, &key(".poll_interval"))?,
        Duration::from_millis(100),
        key(".poll_interval"),
        "must be at least 100ms",
    )?;
    if let (Some(_), true, Some(spanned)) = (poll_interval, ca.is_empty(), &raw.poll_interval) {
        // The system's roots are not watched: a period set for them would
        // read as if they were.
        return Err(invalid(
            loc.at(spanned),
            key(".poll_interval"),
            "poll_interval needs `ca`; the system's roots are read at the start and at a reload",
        ));
    }
    Ok(Some(OutboundConfig {
        ca,
        server_name,
        poll_interval: poll_interval.unwrap_or(DEFAULT_TRUST_POLL_INTERVAL),
    }))
}

/// An outbound listener's plaintext side: anyone who reaches it speaks
/// with this sidecar's identity, so it must stay inside the namespace.
pub fn check_outbound_bind(bind: SocketAddr) -> Result<(), String> {
    if bind.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "{bind}: an outbound listener takes plaintext and connects with this sidecar's certificate, so it binds a loopback address only (127.0.0.1 or [::1])"
        ))
    }
}

/// The longest listener name.
pub const MAX_LISTENER_NAME: usize = 64;

/// A listener's name is a metric label, a log field, part of error
/// messages and of the `on_renew` hook's environment. A space, a newline
/// or a control character there split a log line or a label, or passed
/// for a second field, so names keep to a set every one of them carries
/// as it is.
pub fn check_listener_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_LISTENER_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "{:?}: a listener name is 1 to {MAX_LISTENER_NAME} ASCII letters, digits, `-`, `_` and `.`",
            name
        ));
    }
    Ok(())
}

/// The name an outbound listener expects in its peer's certificate.
pub fn parse_server_name(value: &str) -> Result<rustls::pki_types::ServerName<'static>, String> {
    rustls::pki_types::ServerName::try_from(value.to_ascii_lowercase()).map_err(|_| {
        match value
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .filter(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        {
            Some(ip) => format!("`{value}`: an IPv6 address is written without brackets here, as a certificate holds it: `{ip}`"),
            None => format!("`{value}` is neither a DNS name nor an IP address"),
        }
    })
}

/// Why an outbound listener takes no client-certificate settings.
pub const OUTBOUND_CLIENT_AUTH: &str = "an outbound listener's clients are local and plaintext; it is the remote peer that verifies this sidecar's certificate";

fn validate_client_auth(
    loc: &Locator<'_>,
    index: usize,
    mode: Mode,
    raw: Option<Spanned<ClientAuthFile>>,
) -> Result<ClientAuthConfig, ConfigError> {
    let key = |k: &str| format!("listener[{index}].client_auth.{k}");
    let Some(spanned) = raw else {
        return Ok(ClientAuthConfig::default());
    };
    let table = loc.at(&spanned);
    loc.record(&format!("listener[{index}].client_auth"), &spanned);
    let raw = spanned.into_inner();
    let auth_mode = match raw.mode.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("none") => ClientAuthMode::None,
        Some("optional") => ClientAuthMode::Optional,
        Some("require") => ClientAuthMode::Require,
        Some(other) => {
            return Err(invalid(
                loc.at(raw.mode.as_ref().unwrap()),
                key("mode"),
                format!("unknown mode `{other}`, expected `none`, `optional` or `require`"),
            ))
        }
    };
    let paths = |v: Option<Spanned<OneOrMany>>, name: &str| -> Result<Vec<PathBuf>, ConfigError> {
        let Some(v) = v else { return Ok(Vec::new()) };
        let origin = loc.at(&v);
        v.into_inner()
            .into_vec()
            .iter()
            .map(|p| loc.file(p, &origin, &key(name)))
            .collect()
    };
    let ca_origin = raw.ca.as_ref().map(|c| loc.at(c));
    let crl_origin = raw.crl.as_ref().map(|c| loc.at(c));
    if let Some(ca) = &raw.ca {
        loc.record(&key("ca"), ca);
    }
    if let Some(crl) = &raw.crl {
        loc.record(&key("crl"), crl);
    }
    let ca = paths(raw.ca, "ca")?;
    let crl = paths(raw.crl, "crl")?;
    if auth_mode != ClientAuthMode::None && ca.is_empty() {
        return Err(invalid(
            table,
            key("ca"),
            "client certificates need `ca`: the CA bundle(s) to verify them against",
        ));
    }
    if auth_mode == ClientAuthMode::None && !ca.is_empty() {
        return Err(invalid(
            ca_origin.unwrap_or(table),
            key("mode"),
            "`ca` is set but mode = \"none\"; set mode = \"optional\" or \"require\"",
        ));
    }
    // Revocation lists with no client certificates to check were dropped
    // without a word, and the listener read as checking revocation.
    if auth_mode == ClientAuthMode::None && !crl.is_empty() {
        return Err(invalid(
            crl_origin.unwrap_or(table),
            key("crl"),
            "`crl` is set but mode = \"none\"; set mode = \"optional\" or \"require\" (with `ca`)",
        ));
    }
    // Every entry of every list, checked for its kind at its own line.
    let entries = |v: &Option<Vec<Spanned<String>>>,
                   name: &str,
                   check: &dyn Fn(&str) -> Result<String, String>|
     -> Result<Vec<String>, ConfigError> {
        let Some(v) = v else { return Ok(Vec::new()) };
        v.iter()
            .map(|entry| {
                allow_entry(entry.get_ref(), check)
                    .map_err(|m| invalid(loc.at(entry), key(name), m))
            })
            .collect()
    };
    let ip = entries(&raw.allow_ip, "allow_ip", &|value| {
        value
            .parse::<IpAddr>()
            .map(|ip| ip.to_string())
            .map_err(|_| format!("`{value}` is not an IP address"))
    })?
    .iter()
    .map(|ip| ip.parse().expect("an address just written"))
    .collect();
    let allow = AllowList {
        dns: entries(&raw.allow_dns, "allow_dns", &allow_dns_entry)?,
        uri: entries(&raw.allow_uri, "allow_uri", &allow_uri_entry)?,
        ip,
        cn: entries(&raw.allow_cn, "allow_cn", &|v| Ok(v.to_string()))?,
        ou: entries(&raw.allow_ou, "allow_ou", &|v| Ok(v.to_string()))?,
        cert_sha256: entries(
            &raw.allow_cert_sha256,
            "allow_cert_sha256",
            &parse_fingerprint,
        )?,
        spki_sha256: entries(
            &raw.allow_spki_sha256,
            "allow_spki_sha256",
            &parse_fingerprint,
        )?,
    };
    if !allow.is_empty() && auth_mode == ClientAuthMode::None {
        return Err(invalid(
            table,
            key("mode"),
            "allow-lists need mode = \"optional\" or \"require\"",
        ));
    }
    let mut forward = ForwardIdentity::default();
    if let Some(list) = &raw.forward {
        for f in list.get_ref() {
            match f.as_str() {
                "xfcc" => forward.xfcc = true,
                "client-cert" => forward.client_cert = true,
                "header" => {
                    forward.header = Some(match &raw.identity_header {
                        None => ForwardIdentity::default_header(),
                        // Case-insensitive: the parsed name is lowercase.
                        Some(h) => http::HeaderName::from_bytes(h.get_ref().as_bytes()).map_err(|_| {
                            invalid(
                                loc.at(h),
                                key("identity_header"),
                                format!("`{}` is not a valid header name", h.get_ref()),
                            )
                        })?,
                    })
                }
                other => {
                    return Err(invalid(
                        loc.at(list),
                        key("forward"),
                        format!("unknown identity format `{other}`, expected `xfcc`, `client-cert` or `header`"),
                    ))
                }
            }
        }
        if mode != Mode::Http {
            return Err(invalid(
                loc.at(list),
                key("forward"),
                "identity headers need mode = \"http\"; in TCP mode use proxy_protocol = \"v2\"",
            ));
        }
    }
    if let Some(h) = &raw.identity_header {
        // A header name that is never set would also never be stripped from
        // what clients send: refuse the half-configured form.
        if forward.header.is_none() {
            return Err(invalid(
                loc.at(h),
                key("identity_header"),
                "identity_header needs `header` in forward, e.g. forward = [\"header\"]",
            ));
        }
    }
    let poll_interval = at_least(
        duration(loc, &raw.poll_interval, &key("poll_interval"))?,
        Duration::from_millis(100),
        key("poll_interval"),
        "must be at least 100ms",
    )?
    .unwrap_or(DEFAULT_TRUST_POLL_INTERVAL);
    Ok(ClientAuthConfig {
        mode: auth_mode,
        ca,
        crl,
        allow,
        forward,
        poll_interval,
    })
}

/// A `[listener.cert]` table (`sni: false`) or a `[[listener.sni_cert]]`
/// one; `table_key` is its place in the file, for errors.
fn validate_cert(
    loc: &Locator<'_>,
    table_key: &str,
    raw: Option<Spanned<CertFile>>,
    sni: bool,
) -> Result<(CertSource, CertPolicy), ConfigError> {
    let key = |k: &str| format!("{table_key}.{k}");
    let Some(spanned) = raw else {
        return Ok((CertSource::default_local_ca(), CertPolicy::default()));
    };
    let table = loc.at(&spanned);
    loc.record(table_key, &spanned);
    for (name, value) in [
        ("cert", &spanned.get_ref().cert),
        ("key", &spanned.get_ref().key),
        ("ca_root", &spanned.get_ref().ca_root),
        ("http01_bind", &spanned.get_ref().http01_bind),
    ] {
        if let Some(value) = value {
            loc.record(&key(name), value);
        }
    }
    let cert = spanned.into_inner();
    let source = cert
        .source
        .as_ref()
        .map_or("local_ca", |s| s.get_ref().as_str());

    // Keys that belong to one source only.
    let only = |present: Option<Origin>, name: &str, wanted: &str| match present {
        Some(origin) if source != wanted => Err(invalid(
            origin,
            key(name),
            format!("`{name}` needs source = \"{wanted}\""),
        )),
        _ => Ok(()),
    };
    only(cert.cert.as_ref().map(|c| loc.at(c)), "cert", "files")?;
    only(cert.key.as_ref().map(|c| loc.at(c)), "key", "files")?;
    for (name, value) in [
        ("directory", &cert.directory),
        ("challenge", &cert.challenge),
        ("http01_bind", &cert.http01_bind),
        ("ca_root", &cert.ca_root),
        ("ca_fingerprint", &cert.ca_fingerprint),
        ("eab_kid", &cert.eab_kid),
        ("eab_hmac_key", &cert.eab_hmac_key),
        ("key_type", &cert.key_type),
    ] {
        only(value.as_ref().map(|v| loc.at(v)), name, "acme")?;
    }
    let lifetime = duration(loc, &cert.lifetime, &key("lifetime"))?;
    let retry_min = duration(loc, &cert.retry_min, &key("retry_min"))?;
    let retry_max = duration(loc, &cert.retry_max, &key("retry_max"))?;
    let poll_interval = duration(loc, &cert.poll_interval, &key("poll_interval"))?;
    if let (Some((_, origin)), false) = (&lifetime, source == "local_ca") {
        return Err(invalid(
            origin.clone(),
            key("lifetime"),
            "`lifetime` needs source = \"local_ca\" (other sources' lifetimes are set by the issuer)",
        ));
    }

    let names = |required: bool| -> Result<Option<Vec<String>>, ConfigError> {
        match &cert.names {
            Some(n) => {
                let names =
                    parse_names(n.get_ref()).map_err(|m| invalid(loc.at(n), key("names"), m))?;
                // SNI carries DNS names only (RFC 6066): a client that
                // connects by address sends none and gets the default
                // certificate, so an address here was never served to
                // anyone, while the configuration read as if it were.
                if let Some(ip) = names.iter().find(|n| sni && n.parse::<IpAddr>().is_ok()) {
                    return Err(invalid(
                        loc.at(n),
                        key("names"),
                        format!(
                            "`{ip}`: an IP address never selects an SNI certificate (clients connecting by address send no SNI and get [listener.cert]); list it under [listener.cert] names"
                        ),
                    ));
                }
                Ok(Some(names))
            }
            None if required => Err(invalid(
                table.clone(),
                key("names"),
                format!("source = \"{source}\" needs `names`"),
            )),
            None => Ok(None),
        }
    };

    let source = match source {
        "local_ca" => {
            // The default names (localhost and its addresses) suit a
            // listener's default certificate; an SNI certificate exists
            // for the names it is given.
            let names = names(sni)?.unwrap_or_else(|| match CertSource::default_local_ca() {
                CertSource::LocalCa { names, .. } => names,
                _ => unreachable!(),
            });
            let lifetime = at_least(
                lifetime,
                Duration::from_secs(10),
                key("lifetime"),
                "must be at least 10 seconds",
            )?
            .unwrap_or(DEFAULT_LOCAL_CA_LIFETIME);
            CertSource::LocalCa { names, lifetime }
        }
        "files" => {
            let (Some(c), Some(k)) = (&cert.cert, &cert.key) else {
                return Err(invalid(
                    table,
                    table_key.to_string(),
                    "source = \"files\" needs both `cert` (PEM chain) and `key` (PEM private key)",
                ));
            };
            if let Some(n) = &cert.names {
                return Err(invalid(
                    loc.at(n),
                    key("names"),
                    "`names` comes from the certificate itself with source = \"files\"",
                ));
            }
            CertSource::Files {
                cert: loc.file(c.get_ref(), &loc.at(c), &key("cert"))?,
                key: loc.file(k.get_ref(), &loc.at(k), &key("key"))?,
            }
        }
        "acme" => {
            let names = names(true)?.unwrap_or_default();
            // A CA validates a wildcard only by DNS-01, which sheath does
            // not answer: such an order would fail at every attempt, for
            // good, each one a new order counted against the CA's limits.
            if let Some(wildcard) = names.iter().find(|n| n.starts_with("*.")) {
                let n = cert.names.as_ref().expect("names are required for acme");
                return Err(invalid(
                    loc.at(n),
                    key("names"),
                    format!(
                        "`{wildcard}`: a wildcard needs the dns-01 challenge, which sheath does not support; list the names, or use source = \"files\" with a certificate issued elsewhere"
                    ),
                ));
            }
            let directory = cert.directory.as_ref().ok_or_else(|| {
                invalid(
                    table.clone(),
                    key("directory"),
                    "source = \"acme\" needs the CA's `directory` URL",
                )
            })?;
            let url = directory.get_ref();
            if !url.starts_with("https://") {
                return Err(invalid(
                    loc.at(directory),
                    key("directory"),
                    format!("`{url}` is not an https:// URL; ACME requires HTTPS"),
                ));
            }
            let challenge = match cert.challenge.as_ref().map(|c| c.get_ref().as_str()) {
                None | Some("tls-alpn-01") => AcmeChallenge::TlsAlpn01,
                Some("http-01") => AcmeChallenge::Http01,
                Some(other) => {
                    return Err(invalid(
                        loc.at(cert.challenge.as_ref().unwrap()),
                        key("challenge"),
                        format!("unknown challenge `{other}`, expected `tls-alpn-01` or `http-01`"),
                    ))
                }
            };
            let http01_bind = match &cert.http01_bind {
                Some(b) => Some(
                    parse_bind(b.get_ref())
                        .map_err(|m| invalid(loc.at(b), key("http01_bind"), m))?,
                ),
                None => None,
            };
            if challenge == AcmeChallenge::Http01 && http01_bind.is_none() {
                return Err(invalid(
                    table,
                    key("http01_bind"),
                    "challenge = \"http-01\" needs `http01_bind`, e.g. \"0.0.0.0:80\"",
                ));
            }
            let trust = match (&cert.ca_root, &cert.ca_fingerprint) {
                (Some(_), Some(f)) => {
                    return Err(invalid(
                        loc.at(f),
                        key("ca_fingerprint"),
                        "give either `ca_root` or `ca_fingerprint`, not both",
                    ))
                }
                (Some(r), None) => {
                    AcmeTrust::RootFile(loc.file(r.get_ref(), &loc.at(r), &key("ca_root"))?)
                }
                (None, Some(f)) => AcmeTrust::Fingerprint(
                    parse_fingerprint(f.get_ref())
                        .map_err(|m| invalid(loc.at(f), key("ca_fingerprint"), m))?,
                ),
                (None, None) => AcmeTrust::System,
            };
            let eab = match (&cert.eab_kid, &cert.eab_hmac_key) {
                (Some(k), Some(h)) => Some((k.get_ref().clone(), h.get_ref().clone())),
                (None, None) => None,
                (Some(k), None) => {
                    return Err(invalid(
                        loc.at(k),
                        key("eab_hmac_key"),
                        "`eab_kid` needs `eab_hmac_key`",
                    ))
                }
                (None, Some(h)) => {
                    return Err(invalid(
                        loc.at(h),
                        key("eab_kid"),
                        "`eab_hmac_key` needs `eab_kid`",
                    ))
                }
            };
            let key_type = match &cert.key_type {
                Some(k) => KeyType::parse(k.get_ref())
                    .map_err(|m| invalid(loc.at(k), key("key_type"), m))?,
                None => KeyType::default(),
            };
            CertSource::Acme(Box::new(AcmeConfig {
                key_type,
                directory: url.clone(),
                names,
                contact: cert.contact.clone().unwrap_or_default(),
                challenge,
                http01_bind,
                trust,
                eab,
            }))
        }
        other => {
            let origin = cert.source.as_ref().map_or(table, |s| loc.at(s));
            return Err(invalid(
                origin,
                key("source"),
                format!(
                    "unknown certificate source `{other}`, expected `local_ca`, `files` or `acme`"
                ),
            ));
        }
    };

    let defaults = CertPolicy::default();
    let renew_ratio = match &cert.renew_ratio {
        Some(r) if !(0.1..=0.95).contains(r.get_ref()) => {
            return Err(invalid(
                loc.at(r),
                key("renew_ratio"),
                "must be between 0.1 and 0.95 of the certificate's lifetime",
            ))
        }
        Some(r) => *r.get_ref(),
        None => defaults.renew_ratio,
    };
    let retry_origin = retry_min
        .as_ref()
        .or(retry_max.as_ref())
        .map_or(table.clone(), |(_, origin)| origin.clone());
    let retry_min = retry_min.map_or(defaults.retry_min, |(d, _)| d);
    let retry_max = retry_max.map_or(defaults.retry_max.max(retry_min), |(d, _)| d);
    if retry_min.is_zero() || retry_max < retry_min {
        return Err(invalid(
            retry_origin,
            key("retry_min"),
            "retry_min must be positive and not above retry_max",
        ));
    }
    let poll_interval = at_least(
        poll_interval,
        Duration::from_millis(100),
        key("poll_interval"),
        "must be at least 100ms",
    )?
    .unwrap_or(defaults.poll_interval);
    let export = match cert.export {
        Some(e) => {
            let origin = loc.at(&e);
            let e = e.into_inner();
            if e.dir.get_ref().is_empty() {
                return Err(invalid(origin, key("export.dir"), "must not be empty"));
            }
            Some(ExportConfig {
                dir: loc.resolve_path(e.dir.get_ref()),
                on_renew: e.on_renew.filter(|c| !c.trim().is_empty()),
            })
        }
        None => None,
    };
    Ok((
        source,
        CertPolicy {
            renew_ratio,
            retry_min,
            retry_max,
            poll_interval,
            export,
        },
    ))
}

/// Refuse `bind` (given by `key`) if it cannot be bound next to the
/// addresses in `taken`: the same address and port, or the same port with
/// the wildcard address of the same family on either side. `check`
/// passed such a configuration and `run` failed with "Address already in
/// use" after the first listeners were up.
fn check_bind(
    loc: &Locator<'_>,
    taken: &[(SocketAddr, String)],
    bind: SocketAddr,
    key: &str,
    fallback: &Origin,
) -> Result<(), ConfigError> {
    // Port 0 asks the kernel for a fresh port each time, so it never collides.
    if bind.port() == 0 {
        return Ok(());
    }
    let clash = taken.iter().find(|(other, _)| {
        other.port() == bind.port()
            && other.is_ipv4() == bind.is_ipv4()
            && (other.ip() == bind.ip()
                || other.ip().is_unspecified()
                || bind.ip().is_unspecified())
    });
    let Some((other, other_key)) = clash else {
        return Ok(());
    };
    let origin = loc
        .origins
        .borrow()
        .get(key)
        .cloned()
        .unwrap_or_else(|| fallback.clone());
    let message = if *other == bind {
        format!("{bind} is already used by {other_key}")
    } else {
        format!("{bind} overlaps {other} of {other_key}: a wildcard address takes the port on every address of its family")
    };
    Err(invalid(origin, key, message))
}

/// A SHA-256 fingerprint: 64 hex digits, colons and case ignored.
pub fn parse_fingerprint(value: &str) -> Result<String, String> {
    let hex: String = value
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(format!(
            "`{value}` is not a SHA-256 fingerprint (64 hex digits)"
        ))
    }
}

/// `[listener.timeouts]`: every one positive, each error at its own line.
fn validate_timeouts(
    loc: &Locator<'_>,
    index: usize,
    raw: &TimeoutsFile,
) -> Result<Timeouts, ConfigError> {
    let d = Timeouts::default();
    let given = |field: &str, v: &Option<Spanned<HumanDuration>>| {
        let key = format!("listener[{index}].timeouts.{field}");
        at_least(
            duration(loc, v, &key)?,
            NOT_ZERO,
            key,
            "must be greater than zero",
        )
    };
    let pick = |field: &str, v: &Option<Spanned<HumanDuration>>, default: Duration| {
        given(field, v).map(|v| v.unwrap_or(default))
    };
    Ok(Timeouts {
        handshake: pick("handshake", &raw.handshake, d.handshake)?,
        idle: pick("idle", &raw.idle, d.idle)?,
        connect: pick("connect", &raw.connect, d.connect)?,
        upstream_response: pick(
            "upstream_response",
            &raw.upstream_response,
            d.upstream_response,
        )?,
        header_read: pick("header_read", &raw.header_read, d.header_read)?,
        upstream_idle: pick("upstream_idle", &raw.upstream_idle, d.upstream_idle)?,
        max_lifetime: given("max_lifetime", &raw.max_lifetime)?,
    })
}

/// A listen address: `IP:PORT`, IPv6 in brackets, a link-local one's zone
/// by interface number (`[fe80::1%2]:8443`).
pub fn parse_bind(value: &str) -> Result<SocketAddr, String> {
    let addr = value.parse::<SocketAddr>().map_err(|_| {
        ipv6_mistake(value).unwrap_or_else(|| {
            format!("`{value}` is not a valid listen address; expected IP:PORT such as 0.0.0.0:8443 or [::]:8443")
        })
    })?;
    if let Some(v4) = mapped(addr) {
        // sheath's IPv6 sockets are IPv6 only; the kernel refuses to bind
        // one to such an address, and said only "Invalid argument".
        return Err(format!(
            "`{value}` is an IPv4 address in IPv6 form, which an IPv6-only socket cannot bind; write {v4}"
        ));
    }
    Ok(addr)
}

/// `addr` as IPv4, if it is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
fn mapped(addr: SocketAddr) -> Option<SocketAddr> {
    Some(crate::proxy::unmapped(addr)).filter(|v4| *v4 != addr)
}

/// What to write instead of an `IP:PORT` that fails to parse the ways
/// people write IPv6 wrongly: without brackets (`::1:8443` is itself an
/// address, so no port is read), or with a zone named (`%eth0`), which
/// only a number can give.
fn ipv6_mistake(value: &str) -> Option<String> {
    if value.parse::<std::net::Ipv6Addr>().is_ok() {
        let fix = match value.rsplit_once(':') {
            Some((ip, port))
                if ip.parse::<std::net::Ipv6Addr>().is_ok() && port.parse::<u16>().is_ok() =>
            {
                format!("[{ip}]:{port}")
            }
            _ => format!("[{value}]:PORT"),
        };
        return Some(format!(
            "`{value}` reads as an IPv6 address with no port; an IPv6 address goes in brackets before its port: {fix}"
        ));
    }
    let (_, zone) = value
        .strip_prefix('[')?
        .split_once(']')?
        .0
        .split_once('%')?;
    (zone.parse::<u32>().is_err()).then(|| {
        format!(
            "`{value}`: a zone is given by interface number (`ip link` lists them), such as [fe80::1%2]:8443, not by name"
        )
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
        if let Some(v4) = mapped(addr) {
            return Err(format!(
                "`{value}` is an IPv4 address in IPv6 form; write {v4}"
            ));
        }
        if let SocketAddr::V6(v6) = addr {
            // The host is kept as text, and the zone would be lost with
            // it: a link-local address without one cannot be reached.
            if v6.scope_id() != 0 {
                return Err(format!(
                    "`{value}`: an upstream address with a zone (`%`) is not supported"
                ));
            }
        }
        (addr.ip().to_string(), addr.port())
    } else {
        if let Some(fix) = ipv6_mistake(value) {
            return Err(fix);
        }
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
    // HTTP mode puts it in every upstream URI, so what a URI cannot carry
    // is refused here.
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let authority = authority.parse().map_err(|_| bad())?;
    Ok(Upstream {
        host,
        port,
        loopback,
        authority,
    })
}

/// Certificate names: DNS names (optionally one leading wildcard label) or
/// IP literals, each in the one form a certificate carries it (and a
/// client's SNI and an ACME identifier give it): lowercase, a DNS name
/// without its trailing dot, an address as its canonical text. A name
/// kept as written (`app.test.`, `0:0:0:0:0:0:0:1`) would never equal the
/// issued certificate's: ACME refused the order or discarded every
/// certificate issued, and a local-CA certificate carried a name no client
/// verifies.
pub fn parse_names(names: &[String]) -> Result<Vec<String>, String> {
    if names.is_empty() {
        return Err("at least one name is needed".into());
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let written = name.trim().to_ascii_lowercase();
        let name = match written.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => {
                let name = written.strip_suffix('.').unwrap_or(&written).to_string();
                let dns = name.strip_prefix("*.").unwrap_or(&name);
                if rustls_pki_types::DnsName::try_from(dns).is_err()
                    || dns.contains('*')
                    || dns.ends_with('.')
                {
                    return Err(format!(
                        "`{written}` is neither a DNS name nor an IP address"
                    ));
                }
                name
            }
        };
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

/// One allow-list entry, refused when empty: an empty entry can never
/// match a name (and an empty `allow_cn` entry matched a certificate with
/// an empty CN), so it only hid a typo.
fn allow_entry(
    value: &str,
    check: &dyn Fn(&str) -> Result<String, String>,
) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err("an entry must not be empty: it never matches a client".into());
    }
    check(value)
}

/// An `allow_dns` entry, in the form certificates carry names: lowercase
/// (DNS names have no case, RFC 4343; the match ignores case too) and
/// without the root's trailing dot. No wildcards: the list matches names
/// exactly, and a `*` matched only a certificate that carried the `*`
/// itself, which a reader of `*.example.com` does not expect. Refusing it
/// is safer than widening the match: a client certificate for any name
/// under a domain is a far broader grant than a server certificate's.
pub fn allow_dns_entry(value: &str) -> Result<String, String> {
    if value.contains('*') {
        return Err(format!(
            "`{value}`: allow_dns matches names exactly and has no wildcards; list each name, or match SPIFFE IDs with allow_uri and a `*` path segment"
        ));
    }
    if value.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "`{value}` is an IP address; list it in allow_ip, which matches IP SANs"
        ));
    }
    let lower = value.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.ends_with('.') || rustls_pki_types::DnsName::try_from(name).is_err() {
        return Err(format!(
            "`{value}` is not a DNS name (letters, digits, `-` and `_` in dot-separated labels)"
        ));
    }
    Ok(name.to_string())
}

/// An `allow_uri` entry: `scheme://authority[/path]`, nothing a URI cannot
/// carry, and a `*` only as a whole path segment, the one place the
/// matcher reads it as a wildcard; anywhere else it matched only itself.
pub fn allow_uri_entry(value: &str) -> Result<String, String> {
    let not_a_uri = || format!("`{value}` is not a URI, e.g. spiffe://example.org/ns/prod/sa/web");
    let (scheme, rest) = value.split_once("://").ok_or_else(not_a_uri)?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if !scheme_ok
        || authority.is_empty()
        || value.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(not_a_uri());
    }
    let stray_star = authority.contains('*')
        || path
            .split('/')
            .any(|segment| segment != "*" && segment.contains('*'));
    if stray_star {
        return Err(format!(
            "`{value}`: a `*` matches only as a whole path segment (`/ns/*/sa/web`), not in the authority or part of a segment"
        ));
    }
    Ok(value.to_string())
}

/// ALPN protocol names as RFC 7301 allows them: 1 to 255 bytes, each once.
pub fn check_alpn(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err("must name at least one protocol, or be left out".into());
    }
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() || name.len() > 255 {
            return Err(format!(
                "`{name}`: a protocol name is 1 to 255 bytes (RFC 7301)"
            ));
        }
        if names[..i].contains(name) {
            return Err(format!("`{name}` is listed twice"));
        }
    }
    Ok(())
}
