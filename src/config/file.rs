//! The configuration file exactly as written: serde types with
//! `deny_unknown_fields`, and spans kept on every value that the validation
//! stage may reject, so its errors can point at a line.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Mode, Origin};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub global: GlobalFile,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Spanned<ListenerFile>>,
    #[serde(default)]
    pub admin: AdminFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub bind: Option<Spanned<String>>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalFile {
    pub state_dir: Option<Spanned<String>>,
    pub drain_timeout: Option<Spanned<HumanDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub name: Option<Spanned<String>>,
    pub bind: Spanned<String>,
    pub upstream: Spanned<String>,
    #[serde(default)]
    pub allow_remote_upstream: bool,
    #[serde(default)]
    pub mode: Mode,
    pub max_connections: Option<Spanned<usize>>,
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    pub cert: Option<Spanned<CertFile>>,
    /// Further certificates, each served to clients whose SNI it names.
    #[serde(default)]
    pub sni_cert: Vec<Spanned<CertFile>>,
    pub client_auth: Option<Spanned<ClientAuthFile>>,
    pub proxy_protocol: Option<Spanned<String>>,
    pub upstream_protocol: Option<Spanned<String>>,
    pub alpn: Option<Spanned<Vec<String>>>,
    pub tls_min_version: Option<Spanned<String>>,
    pub outbound: Option<Spanned<OutboundFile>>,
}

/// `[listener.outbound]`: how an outbound listener verifies its peer.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundFile {
    pub ca: Option<Spanned<OneOrMany>>,
    pub server_name: Option<Spanned<String>>,
    pub poll_interval: Option<Spanned<HumanDuration>>,
}

/// A single value or a list, for keys like `ca` where one file is usual.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthFile {
    pub mode: Option<Spanned<String>>,
    pub ca: Option<Spanned<OneOrMany>>,
    pub crl: Option<Spanned<OneOrMany>>,
    // Each entry keeps its own place: a list written over several lines
    // is reported at the entry that is wrong.
    pub allow_dns: Option<Vec<Spanned<String>>>,
    pub allow_uri: Option<Vec<Spanned<String>>>,
    pub allow_ip: Option<Vec<Spanned<String>>>,
    pub allow_cn: Option<Vec<Spanned<String>>>,
    pub allow_ou: Option<Vec<Spanned<String>>>,
    pub allow_cert_sha256: Option<Vec<Spanned<String>>>,
    pub allow_spki_sha256: Option<Vec<Spanned<String>>>,
    pub forward: Option<Spanned<Vec<String>>>,
    pub identity_header: Option<Spanned<String>>,
    pub poll_interval: Option<Spanned<HumanDuration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsFile {
    pub handshake: Option<Spanned<HumanDuration>>,
    pub idle: Option<Spanned<HumanDuration>>,
    pub connect: Option<Spanned<HumanDuration>>,
    pub upstream_response: Option<Spanned<HumanDuration>>,
    pub header_read: Option<Spanned<HumanDuration>>,
    pub upstream_idle: Option<Spanned<HumanDuration>>,
    pub max_lifetime: Option<Spanned<HumanDuration>>,
}

/// One flat table for every source; which keys belong to which source is a
/// validation rule, so the error can say "`cert` needs source = \"files\""
/// instead of serde's generic untagged-enum message.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFile {
    pub source: Option<Spanned<String>>,
    pub names: Option<Spanned<Vec<String>>>,
    pub lifetime: Option<Spanned<HumanDuration>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    // acme
    pub directory: Option<Spanned<String>>,
    pub contact: Option<Vec<String>>,
    pub challenge: Option<Spanned<String>>,
    pub http01_bind: Option<Spanned<String>>,
    pub ca_root: Option<Spanned<String>>,
    pub ca_fingerprint: Option<Spanned<String>>,
    pub eab_kid: Option<Spanned<String>>,
    pub eab_hmac_key: Option<Spanned<String>>,
    pub key_type: Option<Spanned<String>>,
    // every source
    pub renew_ratio: Option<Spanned<f64>>,
    pub retry_min: Option<Spanned<HumanDuration>>,
    pub retry_max: Option<Spanned<HumanDuration>>,
    pub poll_interval: Option<Spanned<HumanDuration>>,
    pub export: Option<Spanned<ExportFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportFile {
    pub dir: Spanned<String>,
    pub on_renew: Option<String>,
}

/// A duration as written in the file (`30s`, `5m`, `1h 30m`), kept with
/// its place so that a value refused later is reported at its own line.
#[derive(Debug, Clone, Copy)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        humantime_serde::deserialize(d).map(HumanDuration)
    }
}

/// Parse TOML text into the raw file types, turning serde errors into
/// messages with the file, line and dotted key.
pub(super) fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    // Not TOML at all: there is no key to name, only a place.
    let de =
        toml::Deserializer::parse(text).map_err(|err| located(path, text, &err, String::new()))?;
    serde_path_to_error::deserialize(de).map_err(|err| {
        let key = dotted_key(err.path());
        located(path, text, &err.into_inner(), key)
    })
}

/// A TOML error at its line and column, under `key`.
fn located(path: &Path, text: &str, err: &toml::de::Error, key: String) -> ConfigError {
    let (line, column) = err
        .span()
        .map(|span| line_col(text, span.start))
        .unwrap_or((1, 1));
    ConfigError::Invalid {
        origin: Origin::File {
            path: path.to_path_buf(),
            line,
            column,
        },
        key,
        message: err.message().trim_end().to_string(),
    }
}

/// 1-based line and column of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// `listener[0].timeouts.idle`, without the internal segments that
/// `Spanned` adds to the path.
fn dotted_key(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } if key.starts_with("$__serde_spanned") => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}
