//! Structured logs via tracing: human-readable text by default, one JSON
//! object per line with `--log-format json`. Logs go to stderr so stdout
//! stays clean for commands whose output is data (`ca export`, `check`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// rustls reports a client's protocol slips at WARN on every connection
/// (an IP address sent as SNI, as wrk and other tools do, is one line per
/// connection), so any client could make sheath write a line per connect;
/// the per-line cost showed as ~10% more CPU per resumed connection in the
/// benchmark. sheath logs failed handshakes itself, with the reason, so
/// rustls is kept to errors unless the filter names it.
fn with_quiet_rustls(level: &str) -> String {
    if level.contains("rustls") {
        level.to_string()
    } else {
        format!("{level},rustls=error")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Install the global subscriber. `level` is an `EnvFilter` directive such
/// as `info` or `sheath=debug,hyper=info`; `RUST_LOG`, when set, wins.
///
/// A filter that does not parse is an error, not `info`: the operator
/// would get other lines than asked for and no word of why. That holds for
/// `RUST_LOG` too, which would otherwise give way to `level` in silence.
pub fn init(format: LogFormat, level: &str) -> Result<(), String> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = filter(level, rust_log.as_deref())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_target(false)
            // Colour codes only for a person at a terminal, not in files.
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

/// The filter in force: `RUST_LOG` when set and not empty, else `level`,
/// with rustls kept quiet either way unless the filter names it. Both must
/// parse, so a bad `--log-level` is refused whatever `RUST_LOG` says.
fn filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, String> {
    let level_filter = EnvFilter::try_new(with_quiet_rustls(level))
        .map_err(|e| format!("`{level}` is not a log filter: {e}"))?;
    match rust_log.filter(|v| !v.is_empty()) {
        Some(v) => EnvFilter::try_new(with_quiet_rustls(v)).map_err(|e| {
            format!("RUST_LOG `{v}`, which takes precedence, is not a log filter: {e}")
        }),
        None => Ok(level_filter),
    }
}

#[cfg(test)]
mod tests {
    use super::{filter, with_quiet_rustls};

    #[test]
    fn rustls_quiet_unless_named() {
        assert_eq!(with_quiet_rustls("info"), "info,rustls=error");
        assert_eq!(
            with_quiet_rustls("warn,sheath::cert=info"),
            "warn,sheath::cert=info,rustls=error"
        );
        assert_eq!(with_quiet_rustls("rustls=debug"), "rustls=debug");
    }

    /// The directives of the filter in force, in a stable order.
    fn directives(level: &str, rust_log: Option<&str>) -> Vec<String> {
        let shown = filter(level, rust_log).unwrap().to_string();
        let mut parts: Vec<String> = shown.split(',').map(str::to_string).collect();
        parts.sort();
        parts
    }

    #[test]
    fn rust_log_wins_and_keeps_rustls_quiet() {
        assert_eq!(directives("warn", None), ["rustls=error", "warn"]);
        assert_eq!(directives("warn", Some("")), ["rustls=error", "warn"]);
        assert_eq!(
            directives("warn", Some("sheath=debug")),
            ["rustls=error", "sheath=debug"]
        );
        assert_eq!(
            directives("warn", Some("debug,rustls=info")),
            ["debug", "rustls=info"]
        );
        let err = filter("info", Some("sheath=loud")).unwrap_err();
        assert!(err.contains("RUST_LOG `sheath=loud`"), "{err}");
        let err = filter("sheath=loud", Some("info")).unwrap_err();
        assert!(err.starts_with("`sheath=loud`"), "{err}");
    }
}
