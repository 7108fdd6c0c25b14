//! Configuration: shipped examples parse, errors name file, line and key.

use std::path::{Path, PathBuf};

use sheath::config::{CertSource, Config, ConfigError, Mode, Origin};

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("/etc/sheath/test.toml"), text)
}

fn error_at(text: &str) -> (usize, String, String) {
    match parse(text).expect_err("config must be rejected") {
        ConfigError::Invalid {
            origin: Origin::File { path, line, .. },
            key,
            message,
        } => {
            assert_eq!(path, Path::new("/etc/sheath/test.toml"));
            (line, key, message)
        }
        other => panic!("unexpected error {other:?}"),
    }
}

/// The example configs shipped in config/.
fn shipped_examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("config/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 3, "expected the shipped examples in config/");
    paths
}

#[test]
fn every_shipped_example_parses() {
    for path in shipped_examples() {
        let config = Config::load(&path)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
        assert!(!config.listeners.is_empty());
    }
}

/// `sheath check` prints `render()` as the effective settings, meant to be
/// used as a config file again: every setting must survive the trip.
fn assert_round_trip(path: &Path, config: &Config) -> Config {
    let rendered = config.render();
    let again = Config::from_toml(path, &rendered).unwrap_or_else(|e| {
        panic!(
            "{}: rendered settings do not parse: {e}\n{rendered}",
            path.display()
        )
    });
    // Rendering what was read back must be stable too.
    assert_eq!(again.render(), rendered, "{}", path.display());
    again
}

#[test]
fn every_shipped_example_renders_back_to_the_same_settings() {
    for path in shipped_examples() {
        let config = Config::load(&path).unwrap();
        let again = assert_round_trip(&path, &config);
        assert_eq!(again, config, "{}:\n{}", path.display(), config.render());
    }
}

#[test]
fn render_keeps_settings_the_examples_leave_out() {
    let text = r#"
[[listener]]
name = "acme"
bind = "127.0.0.1:8443"
upstream = "127.0.0.1:8080"

[listener.timeouts]
max_lifetime = "90m"

[listener.cert]
source = "acme"
directory = "https://ca.internal/acme/directory"
names = ["app.internal", "10.0.0.1"]
challenge = "http-01"
http01_bind = "0.0.0.0:8080"
ca_root = "/etc/sheath/acme-root.pem"
eab_kid = "kid-1"
eab_hmac_key = "c2VjcmV0LWhtYWMta2V5"
key_type = "rsa-2048"

[listener.cert.export]
dir = "/var/lib/sheath/export"

[listener.client_auth]
mode = "optional"
ca = "/etc/sheath/clients/ca.pem"
allow_ip = ["10.0.12.7", "2001:db8::1"]
allow_cert_sha256 = ["9F:86:D0:81:88:4C:7D:65:9A:2F:EA:A0:C5:5A:D0:15:A3:BF:4F:1B:2B:0B:82:2C:D1:5D:6C:15:B0:F0:0A:08"]
forward = ["client-cert", "header"]
identity_header = "X-Spiffe-Id"

[[listener]]
name = "tcp"
bind = "127.0.0.1:9443"
upstream = "localhost:9000"
mode = "tcp"
proxy_protocol = "v1"

[listener.cert]
source = "local_ca"
names = ["tcp.internal"]
lifetime = "3h"

[listener.client_auth]
mode = "none"
poll_interval = "2s"
"#;
    let config = parse(text).unwrap();
    let rendered = config.render();
    assert!(
        !rendered.contains("c2VjcmV0LWhtYWMta2V5"),
        "the EAB HMAC key is a secret and must not be printed:\n{rendered}"
    );
    let mut again = assert_round_trip(Path::new("/etc/sheath/test.toml"), &config);
    // The one deliberate difference: the redacted EAB key.
    match &mut again.listeners[0].cert {
        CertSource::Acme(acme) => {
            let (kid, hmac) = acme.eab.as_mut().expect("eab survives");
            assert_eq!(kid, "kid-1");
            *hmac = "c2VjcmV0LWhtYWMta2V5".into();
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(again, config, "rendered:\n{rendered}");
}

/// Every `.toml` below `examples/` is a sheath config (the Kubernetes
/// ConfigMaps and the systemd unit's file) and must load as it stands.
#[test]
fn every_deployment_example_parses() {
    fn tomls(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("readable examples dir") {
            let path = entry.unwrap().path();
            if path.is_dir() {
                tomls(&path, found);
            } else if path.extension().is_some_and(|e| e == "toml") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    tomls(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"),
        &mut found,
    );
    for path in &found {
        let config =
            Config::load(path).unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
        assert!(!config.listeners.is_empty(), "{}", path.display());
    }
    assert!(
        found.len() >= 3,
        "expected the Kubernetes and systemd configs in examples/, found {found:?}"
    );
}

/// The README, the user's reference for every command, flag and key.
fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md is readable")
}

/// The ```toml blocks of the README, with the indentation of a block
/// inside a list item taken off.
fn readme_toml_blocks(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for line in readme.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut current {
            None if trimmed == "```toml" => current = Some((indent, String::new())),
            None => {}
            Some(_) if trimmed.starts_with("```") => {
                blocks.push(current.take().expect("inside a block").1);
            }
            Some((indent, text)) => {
                text.push_str(line.get(*indent..).unwrap_or("").trim_end());
                text.push('\n');
            }
        }
    }
    assert!(
        current.is_none(),
        "a ```toml block in README.md is not closed"
    );
    blocks
}

/// Every ```toml block in the README is a configuration sheath accepts as
/// shown. A block with a `[[listener]]` table is a whole file; a block
/// without one (a `[listener.cert.export]` or `[listener.client_auth]`
/// table, say) is part of a listener and is checked under a minimal
/// `[[listener]]`, where it belongs.
#[test]
fn every_toml_block_in_the_readme_is_a_valid_config() {
    let readme = readme();
    let blocks = readme_toml_blocks(&readme);
    assert!(
        blocks.len() >= 5,
        "expected the README's TOML examples, found {}",
        blocks.len()
    );
    for (i, block) in blocks.iter().enumerate() {
        let text = if block.lines().any(|l| l.trim() == "[[listener]]") {
            block.clone()
        } else {
            format!(
                "[[listener]]\nbind = \"127.0.0.1:8443\"\nupstream = \"127.0.0.1:8080\"\n\n{block}"
            )
        };
        let config = Config::from_toml(Path::new("/etc/sheath/README.toml"), &text)
            .unwrap_or_else(|e| panic!("README.md TOML block {i} is refused: {e}\n{text}"));
        assert!(!config.listeners.is_empty());
    }
}

/// The keys the parser accepts in one table, read from its answer to a
/// key it does not know (`expected one of `a`, `b``).
fn accepted_keys(text: &str) -> Vec<String> {
    let message = match parse(text).expect_err("an unknown key is refused") {
        ConfigError::Invalid { message, .. } => message,
        other => panic!("unexpected error {other:?}"),
    };
    let list = message
        .split_once("expected")
        .unwrap_or_else(|| panic!("no list of keys in {message:?}"))
        .1;
    let keys: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(!keys.is_empty(), "no keys in {message:?}");
    keys
}

/// Every key the config parser accepts is in the README's configuration
/// reference, under its own table (a sub-table counts as its key).
#[test]
fn the_readme_reference_lists_every_config_key() {
    let readme = readme();
    let start = readme
        .find("### Configuration reference")
        .expect("README has a configuration reference");
    let end = start + readme[start..].find("\n## ").expect("a section follows");
    let reference = &readme[start..end];
    // Each table's part of the reference: from its "`[name]`" heading line
    // to the next one.
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in reference.lines() {
        if line.starts_with("`[") {
            let name = line[1..].split('`').next().unwrap().to_string();
            sections.push((name, String::new()));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    let section = |name: &str| -> &str {
        sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, body)| body.as_str())
            .unwrap_or_else(|| panic!("README's reference has no `{name}` table"))
    };
    let listener = "[[listener]]\nbind = \"127.0.0.1:8443\"\nupstream = \"127.0.0.1:8080\"\n";
    let tables: [(&str, &str, String); 9] = [
        ("", "", "zz_unknown = 1\n".to_string()),
        (
            "[global]",
            "global",
            format!("[global]\nzz_unknown = 1\n{listener}"),
        ),
        (
            "[admin]",
            "admin",
            format!("[admin]\nzz_unknown = 1\n{listener}"),
        ),
        (
            "[[listener]]",
            "listener",
            format!("{listener}zz_unknown = 1\n"),
        ),
        (
            "[listener.timeouts]",
            "listener.timeouts",
            format!("{listener}[listener.timeouts]\nzz_unknown = 1\n"),
        ),
        (
            "[listener.cert]",
            "listener.cert",
            format!("{listener}[listener.cert]\nzz_unknown = 1\n"),
        ),
        (
            "[listener.cert.export]",
            "listener.cert.export",
            format!("{listener}[listener.cert.export]\ndir = \"x\"\nzz_unknown = 1\n"),
        ),
        (
            "[listener.client_auth]",
            "listener.client_auth",
            format!("{listener}[listener.client_auth]\nzz_unknown = 1\n"),
        ),
        (
            "[listener.outbound]",
            "listener.outbound",
            format!("{listener}[listener.outbound]\nzz_unknown = 1\n"),
        ),
    ];
    let mut checked = 0;
    for (heading, prefix, text) in &tables {
        for key in accepted_keys(text) {
            let full = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            // A sub-table is documented by a table of its own.
            let as_table = sections
                .iter()
                .any(|(n, _)| n == &format!("[{full}]") || n == &format!("[[{full}]]"));
            let as_row = !heading.is_empty() && section(heading).contains(&format!("`{key}`"));
            assert!(
                as_table || as_row,
                "`{full}` is accepted in a config file but not in README's configuration reference"
            );
            checked += 1;
        }
    }
    assert!(checked >= 60, "only {checked} keys checked");
}

/// Every environment variable the command line reads is in the README,
/// and every flag of `run` has its row in the table of variables.
#[test]
fn the_readme_lists_every_flag_and_variable() {
    use clap::CommandFactory as _;
    let readme = readme();
    let cli = sheath::cli::Cli::command();
    let mut checked = 0;
    let mut commands = vec![&cli];
    let mut i = 0;
    while i < commands.len() {
        commands.extend(commands[i].get_subcommands());
        i += 1;
    }
    for command in commands {
        for arg in command.get_arguments() {
            let Some(env) = arg.get_env() else { continue };
            let env = env.to_str().unwrap();
            let long = arg.get_long().expect("every flag has a long name");
            assert!(
                readme.contains(&format!("`{env}`")),
                "{env} (--{long} of `{}`) is not in README.md",
                command.get_name()
            );
            let row = format!("| `{env}` | `--{long}`");
            let row_short = format!("| `{env}` | `-");
            if command.get_name() == "run" || command.get_name() == "sheath" {
                assert!(
                    readme.contains(&row) || readme.contains(&row_short),
                    "README.md's table of variables has no row `{row}`"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 45, "only {checked} variables checked");
}

#[test]
fn minimal_listener_gets_safe_defaults() {
    let c =
        parse("[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n").unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.mode, Mode::Http);
    assert_eq!(l.max_connections, 4096);
    assert_eq!(l.timeouts.handshake.as_secs(), 10);
    assert_eq!(c.drain_timeout.as_secs(), 30);
    assert!(matches!(l.cert, CertSource::LocalCa { .. }));
}

#[test]
fn unknown_key_names_line_and_key() {
    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\nbnd = \"x\"\n",
    );
    assert_eq!(line, 4);
    assert!(key.contains("bnd"), "{key}");
    assert!(message.contains("unknown field"), "{message}");
    let shown = parse(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\nbnd = \"x\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(shown.starts_with("/etc/sheath/test.toml:4:"), "{shown}");
}

#[test]
fn bad_bind_address_names_line_and_key() {
    let (line, key, message) = error_at(
        "[global]\ndrain_timeout = \"5s\"\n\n[[listener]]\nname = \"web\"\nbind = \"localhost:http\"\nupstream = \"127.0.0.1:8080\"\n",
    );
    assert_eq!(line, 6);
    assert_eq!(key, "listener[0].bind");
    assert!(message.contains("not a valid listen address"), "{message}");
}

#[test]
fn an_upstream_a_uri_cannot_carry_is_refused_at_its_line() {
    let text = "[[listener]]\nbind = \"0.0.0.0:8443\"\n\nupstream = \"app{v}.localhost:8080\"\n";
    let (line, key, message) = error_at(text);
    assert_eq!(line, 4);
    assert_eq!(key, "listener[0].upstream");
    assert!(
        message.contains("not a valid upstream address"),
        "{message}"
    );
}

#[test]
fn remote_upstream_is_refused_unless_allowed() {
    let text = "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"192.0.2.10:80\"\n";
    let (line, key, message) = error_at(text);
    assert_eq!(line, 3);
    assert_eq!(key, "listener[0].upstream");
    assert!(message.contains("not a loopback address"), "{message}");

    for host in ["db.internal:5432", "[2001:db8::1]:80"] {
        let text = format!("[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"{host}\"\n");
        assert!(parse(&text).is_err(), "{host} accepted without opt-in");
        let allowed = format!("{text}allow_remote_upstream = true\n");
        let c = parse(&allowed).unwrap();
        assert!(!c.listeners[0].upstream.loopback);
    }
    for host in ["localhost:8080", "[::1]:8080", "127.0.0.2:80"] {
        let text = format!("[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"{host}\"\n");
        assert!(
            parse(&text).unwrap().listeners[0].upstream.loopback,
            "{host}"
        );
    }
}

/// An IPv6 address takes its port after brackets. Written without them
/// (`::1:8443` is itself an IPv6 address, so no port is read), with an
/// IPv4 address in IPv6 form (a socket sheath binds on IPv6 is IPv6 only,
/// and the kernel refused it only when binding) or with a zone named
/// instead of numbered, the error says what to write. `server_name`
/// takes an address bare, as the certificate holds it.
#[test]
fn ipv6_addresses_written_the_wrong_way_get_the_way_to_write_them() {
    let listener = |bind: &str, upstream: &str| {
        format!("[[listener]]\nbind = \"{bind}\"\nupstream = \"{upstream}\"\n")
    };
    let outbound = |server_name: &str| {
        format!(
            "{}mode = \"outbound\"\n[listener.outbound]\nserver_name = \"{server_name}\"\n",
            listener("127.0.0.1:15001", "[::1]:8443")
        )
    };
    for (text, line, key, fix) in [
        (
            listener("::1:8443", "127.0.0.1:8080"),
            2,
            "bind",
            "[::1]:8443",
        ),
        (
            listener("2001:db8::1", "127.0.0.1:8080"),
            2,
            "bind",
            "[2001:db8::1]:PORT",
        ),
        (
            listener("[::ffff:127.0.0.1]:8443", "127.0.0.1:8080"),
            2,
            "bind",
            "127.0.0.1:8443",
        ),
        (
            listener("[fe80::1%eth0]:8443", "127.0.0.1:8080"),
            2,
            "bind",
            "interface number",
        ),
        (
            listener("[::1]:8443", "::1:8080"),
            3,
            "upstream",
            "[::1]:8080",
        ),
        (
            listener("[::1]:8443", "[::ffff:127.0.0.1]:8080"),
            3,
            "upstream",
            "127.0.0.1:8080",
        ),
        (
            format!(
                "{}allow_remote_upstream = true\n",
                listener("[::1]:8443", "[fe80::1%2]:8080")
            ),
            3,
            "upstream",
            "zone",
        ),
        (outbound("[::1]"), 6, "outbound.server_name", "`::1`"),
    ] {
        let (at, k, message) = error_at(&text);
        assert_eq!(
            (at, k.as_str()),
            (line, &*format!("listener[0].{key}")),
            "{text}"
        );
        assert!(message.contains(fix), "{text}: {message}");
    }
    // The forms that work: an address in brackets, a zone by number.
    let c = parse(&listener("[fe80::1%2]:8443", "[::1]:8080")).unwrap();
    assert_eq!(c.listeners[0].bind, "[fe80::1%2]:8443".parse().unwrap());
    assert_eq!(c.listeners[0].upstream.authority, "[::1]:8080");
}

#[test]
fn type_errors_and_bad_values_are_located() {
    let (line, key, _) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\nmax_connections = \"many\"\n",
    );
    assert_eq!((line, key.as_str()), (4, "listener[0].max_connections"));

    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\nmode = \"udp\"\n",
    );
    assert_eq!((line, key.as_str()), (4, "listener[0].mode"));
    assert!(message.contains("unknown variant"), "{message}");

    let (line, key, _) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.timeouts]\nidle = \"forever\"\n",
    );
    assert_eq!((line, key.as_str()), (5, "listener[0].timeouts.idle"));

    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.cert]\nsource = \"acme-ish\"\n",
    );
    assert_eq!((line, key.as_str()), (5, "listener[0].cert.source"));
    assert!(message.contains("unknown certificate source"), "{message}");

    let (_, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.cert]\nsource = \"files\"\ncert = \"a.pem\"\n",
    );
    assert_eq!(key, "listener[0].cert");
    assert!(message.contains("needs both"), "{message}");

    // Revocation lists on a listener that takes no client certificates.
    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.client_auth]\ncrl = \"revoked.crl\"\n",
    );
    assert_eq!((line, key.as_str()), (5, "listener[0].client_auth.crl"));
    assert!(message.contains("mode = \"none\""), "{message}");

    // A header name that would never be set (nor stripped) is refused.
    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.client_auth]\nmode = \"require\"\nca = \"ca.pem\"\nidentity_header = \"X-Caller\"\n",
    );
    assert_eq!(
        (line, key.as_str()),
        (7, "listener[0].client_auth.identity_header")
    );
    assert!(message.contains("needs `header` in forward"), "{message}");
    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.client_auth]\nmode = \"require\"\nca = \"ca.pem\"\nforward = [\"header\"]\nidentity_header = \"X Caller\"\n",
    );
    assert_eq!(
        (line, key.as_str()),
        (8, "listener[0].client_auth.identity_header")
    );
    assert!(message.contains("not a valid header name"), "{message}");

    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\nupstream_protocol = \"h3\"\n",
    );
    assert_eq!((line, key.as_str()), (4, "listener[0].upstream_protocol"));
    assert!(message.contains("`http1`, `h2c` or `auto`"), "{message}");
    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\nmode = \"tcp\"\nupstream_protocol = \"h2c\"\n",
    );
    assert_eq!((line, key.as_str()), (5, "listener[0].upstream_protocol"));
    assert!(message.contains("needs mode = \"http\""), "{message}");

    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\nalpn = [\"h2\"]\n",
    );
    assert_eq!((line, key.as_str()), (4, "listener[0].alpn"));
    assert!(
        message.contains("needs mode = \"tcp\" or \"outbound\""),
        "{message}"
    );
    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\nmode = \"tcp\"\nalpn = [\"h2\", \"h2\"]\n",
    );
    assert_eq!((line, key.as_str()), (5, "listener[0].alpn"));
    assert!(message.contains("listed twice"), "{message}");

    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\ntls_min_version = \"1.1\"\n",
    );
    assert_eq!((line, key.as_str()), (4, "listener[0].tls_min_version"));
    assert!(message.contains("`1.2` or `1.3`"), "{message}");

    // The admin address is checked like any other.
    let (line, key, _) = error_at(
        "[admin]\nbind = \"localhost:nine\"\n[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n",
    );
    assert_eq!((line, key.as_str()), (2, "admin.bind"));
}

#[test]
fn duplicate_listeners_are_refused() {
    let text = "[[listener]]\nname = \"a\"\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n\n[[listener]]\nname = \"a\"\nbind = \"0.0.0.0:9443\"\nupstream = \"127.0.0.1:8080\"\n";
    let (line, key, message) = error_at(text);
    assert_eq!((line, key.as_str()), (6, "listener[1].name"));
    assert!(message.contains("duplicate"), "{message}");
}

#[test]
fn no_listener_is_an_error() {
    let (_, key, message) = error_at("[global]\ndrain_timeout = \"1s\"\n");
    assert_eq!(key, "listener");
    assert!(message.contains("at least one"), "{message}");
}

#[test]
fn relative_paths_are_relative_to_the_config_file() {
    let c = parse(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.cert]\nsource = \"files\"\ncert = \"tls/cert.pem\"\nkey = \"/abs/key.pem\"\n",
    )
    .unwrap();
    match &c.listeners[0].cert {
        CertSource::Files { cert, key } => {
            assert_eq!(cert, Path::new("/etc/sheath/tls/cert.pem"));
            assert_eq!(key, Path::new("/abs/key.pem"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rendered_config_parses_back_to_the_same_settings() {
    let c = parse(
        "[[listener]]\nname = \"web\"\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\nmax_connections = 7\n[listener.timeouts]\nidle = \"90s\"\n",
    )
    .unwrap();
    let again = parse(&c.render()).unwrap();
    assert_eq!(again.listeners, c.listeners);
}

#[test]
fn sni_certificates_parse_render_and_are_told_apart() {
    let text = r#"
[[listener]]
name = "web"
bind = "127.0.0.1:8443"
upstream = "127.0.0.1:8080"

[listener.cert]
source = "files"
cert = "/etc/sheath/default.pem"
key = "/etc/sheath/default.key"

[[listener.sni_cert]]
source = "local_ca"
names = ["api.internal", "*.apps.internal"]
lifetime = "2h"

[listener.sni_cert.export]
dir = "/var/lib/sheath/api"

[[listener.sni_cert]]
source = "acme"
directory = "https://ca.internal/acme/directory"
names = ["api.example.com"]
"#;
    let config = parse(text).unwrap();
    let l = &config.listeners[0];
    assert_eq!(l.sni_certs.len(), 2);
    assert!(matches!(l.cert, CertSource::Files { .. }));
    assert!(matches!(l.sni_certs[0].source, CertSource::LocalCa { .. }));
    assert!(matches!(l.sni_certs[1].source, CertSource::Acme(_)));
    let labels: Vec<String> = l.certs().map(|(cert, _, _)| cert.to_string()).collect();
    assert_eq!(labels, ["default", "sni_cert[0]", "sni_cert[1]"]);
    assert_eq!(
        l.sni_certs[0].policy.export.as_ref().unwrap().dir,
        Path::new("/var/lib/sheath/api")
    );
    let again = assert_round_trip(Path::new("/etc/sheath/test.toml"), &config);
    assert_eq!(again, config, "rendered:\n{}", config.render());
}

#[test]
fn sni_certificate_errors_name_their_table() {
    let head = "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n";

    // A local-CA SNI certificate exists for the names it is given.
    let (line, key, message) = error_at(&format!(
        "{head}[[listener.sni_cert]]\nsource = \"local_ca\"\n"
    ));
    assert_eq!(key, "listener[0].sni_cert[0].names");
    assert_eq!(line, 4, "{message}");
    assert!(message.contains("needs `names`"), "{message}");

    // Source-specific keys are checked as in [listener.cert].
    let (line, key, message) = error_at(&format!(
        "{head}[[listener.sni_cert]]\nsource = \"files\"\ncert = \"a.pem\"\nkey = \"a.key\"\nnames = [\"a.test\"]\n"
    ));
    assert_eq!((line, key.as_str()), (8, "listener[0].sni_cert[0].names"));
    assert!(message.contains("comes from the certificate"), "{message}");

    // A name can select one certificate only: the second table is named.
    let (line, key, message) = error_at(&format!(
        "{head}[listener.cert]\nnames = [\"a.test\", \"localhost\"]\n\n[[listener.sni_cert]]\nnames = [\"b.test\"]\n\n[[listener.sni_cert]]\nnames = [\"B.test\"]\n"
    ));
    assert_eq!((line, key.as_str()), (10, "listener[0].sni_cert[1].names"));
    assert!(
        message.contains("`b.test` is also in listener[0].sni_cert[0].names"),
        "{message}"
    );

    // An address never selects an SNI certificate: clients connecting by
    // address send no SNI and get the default, so it would never be served.
    let acme = "source = \"acme\"\ndirectory = \"https://ca.internal/acme/directory\"\n";
    for (extra, names) in [("", "[\"api.test\", \"10.0.0.7\"]"), (acme, "[\"::1\"]")] {
        let (line, key, message) = error_at(&format!(
            "{head}[[listener.sni_cert]]\n{extra}names = {names}\n"
        ));
        assert_eq!(key, "listener[0].sni_cert[0].names", "{message}");
        assert_eq!(line, 5 + extra.lines().count(), "{message}");
        assert!(
            message.contains("never selects an SNI certificate"),
            "{message}"
        );
    }
    // In the default certificate an address is what such clients verify.
    parse(&format!(
        "{head}[listener.cert]\nnames = [\"10.0.0.7\", \"::1\"]\n"
    ))
    .unwrap();

    // Two certificates exporting into one directory would overwrite each other.
    let (line, key, message) = error_at(&format!(
        "{head}[listener.cert]\n[listener.cert.export]\ndir = \"/x\"\n[[listener.sni_cert]]\nnames = [\"b.test\"]\n[listener.sni_cert.export]\ndir = \"/x\"\n"
    ));
    assert_eq!(
        (line, key.as_str()),
        (7, "listener[0].sni_cert[0].export.dir")
    );
    assert!(
        message.contains("already the export directory of listener[0].cert"),
        "{message}"
    );
}

#[test]
fn an_acme_wildcard_is_refused_at_its_names() {
    // Neither tls-alpn-01 nor http-01 can validate a wildcard: the CA offers
    // only dns-01 for it, so every order would fail.
    let head = "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n";
    let acme = "source = \"acme\"\ndirectory = \"https://ca.internal/acme/directory\"\n";
    for table in ["[listener.cert]", "[[listener.sni_cert]]"] {
        let (line, key, message) = error_at(&format!(
            "{head}{table}\n{acme}names = [\"app.example.com\", \"*.Example.com\"]\n"
        ));
        assert_eq!(line, 7, "{message}");
        assert!(key.ends_with(".names"), "{key}");
        assert!(
            message.contains("`*.example.com`") && message.contains("dns-01"),
            "{message}"
        );
    }
    // The local CA issues wildcards itself.
    parse(&format!(
        "{head}[listener.cert]\nsource = \"local_ca\"\nnames = [\"*.example.com\"]\n"
    ))
    .unwrap();
}

#[test]
fn names_take_the_form_certificates_carry() {
    let config = parse(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.cert]\nsource = \"acme\"\ndirectory = \"https://ca.internal/acme/directory\"\nnames = [\"App.Example.com.\", \"0:0:0:0:0:0:0:1\", \"2001:DB8:0::1\", \"app.example.com\"]\n[[listener.sni_cert]]\nnames = [\"API.internal.\", \"*.apps.internal.\"]\n",
    )
    .unwrap();
    let l = &config.listeners[0];
    let CertSource::Acme(acme) = &l.cert else {
        panic!("{:?}", l.cert)
    };
    assert_eq!(acme.names, ["app.example.com", "::1", "2001:db8::1"]);
    let CertSource::LocalCa { names, .. } = &l.sni_certs[0].source else {
        panic!("{:?}", l.sni_certs[0].source)
    };
    assert_eq!(names, &["api.internal", "*.apps.internal"]);

    // One address written two ways is one name: two certificates of a
    // listener cannot both claim it.
    let (_, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.cert]\nnames = [\"::1\", \"a.test\"]\n[[listener.sni_cert]]\nnames = [\"0::1\"]\n",
    );
    assert_eq!(key, "listener[0].sni_cert[0].names", "{message}");
    // Only one trailing dot is the root's.
    let (_, _, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.cert]\nnames = [\"a.test..\"]\n",
    );
    assert!(message.contains("neither a DNS name"), "{message}");
}

#[test]
fn outbound_listeners_bind_loopback_and_verify_their_peer() {
    let text = r#"
[[listener]]
name = "billing"
bind = "127.0.0.1:15001"
upstream = "billing.internal:8443"
mode = "outbound"

[listener.cert]
source = "local_ca"
names = ["web.internal"]

[listener.outbound]
ca = "mesh-ca.pem"
"#;
    let config = parse(text).unwrap();
    let l = &config.listeners[0];
    assert_eq!(l.mode, Mode::Outbound);
    let o = l.outbound.as_ref().unwrap();
    // The upstream is remote without allow_remote_upstream, and its host
    // is the name the peer's certificate must carry unless told otherwise.
    assert_eq!(o.server_name.to_str(), "billing.internal");
    assert_eq!(o.ca, [Path::new("/etc/sheath/mesh-ca.pem")]);
    let again = assert_round_trip(Path::new("/etc/sheath/test.toml"), &config);
    assert_eq!(again, config, "rendered:\n{}", config.render());

    let head = "[[listener]]\nupstream = \"peer.internal:8443\"\nmode = \"outbound\"\n";
    // Its plaintext side must not be reachable from outside the namespace.
    let (line, key, message) = error_at(&format!("{head}bind = \"0.0.0.0:15001\"\n"));
    assert_eq!((line, key.as_str()), (4, "listener[0].bind"));
    assert!(message.contains("loopback"), "{message}");

    let local = format!("{head}bind = \"127.0.0.1:15001\"\n");
    let (line, key, _) = error_at(&format!(
        "{local}[listener.client_auth]\nmode = \"require\"\nca = \"ca.pem\"\n"
    ));
    assert_eq!((line, key.as_str()), (5, "listener[0].client_auth.mode"));
    let (line, key, _) = error_at(&format!(
        "{local}[listener.outbound]\nserver_name = \"not a name\"\n"
    ));
    assert_eq!(
        (line, key.as_str()),
        (6, "listener[0].outbound.server_name")
    );
    let (line, key, message) = error_at(&format!(
        "{local}[[listener.sni_cert]]\nnames = [\"a.test\"]\n"
    ));
    assert_eq!((line, key.as_str()), (5, "listener[0].sni_cert"));
    assert!(message.contains("one certificate"), "{message}");

    // A host the upstream syntax takes but no certificate can carry needs an
    // explicit name to verify.
    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"127.0.0.1:15001\"\nupstream = \"peer..internal:8443\"\nmode = \"outbound\"\n",
    );
    assert_eq!((line, key.as_str()), (3, "listener[0].upstream"));
    assert!(
        message.contains("set [listener.outbound] server_name"),
        "{message}"
    );

    // [listener.outbound] belongs to outbound mode only.
    let (line, key, message) = error_at(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.outbound]\nca = \"ca.pem\"\n",
    );
    assert_eq!((line, key.as_str()), (4, "listener[0].outbound"));
    assert!(message.contains("needs mode = \"outbound\""), "{message}");

    // The peer CA files' re-read period: bounded like client trust's, and
    // only where there are files to re-read.
    let outbound = "[[listener]]\nbind = \"127.0.0.1:15001\"\nupstream = \"peer.test:8443\"\nmode = \"outbound\"\n[listener.outbound]\n";
    let (line, key, message) = error_at(&format!(
        "{outbound}ca = \"ca.pem\"\npoll_interval = \"1ms\"\n"
    ));
    assert_eq!(
        (line, key.as_str()),
        (7, "listener[0].outbound.poll_interval")
    );
    assert!(message.contains("at least 100ms"), "{message}");
    let (line, key, message) = error_at(&format!("{outbound}poll_interval = \"5s\"\n"));
    assert_eq!(
        (line, key.as_str()),
        (6, "listener[0].outbound.poll_interval")
    );
    assert!(message.contains("needs `ca`"), "{message}");
    let config = parse(&format!(
        "{outbound}ca = \"ca.pem\"\npoll_interval = \"250ms\"\n"
    ))
    .unwrap();
    let peer = config.listeners[0].outbound.as_ref().unwrap();
    assert_eq!(peer.poll_interval, std::time::Duration::from_millis(250));
}

#[test]
fn a_cert_table_opened_only_by_its_export_subtable_is_the_default_source() {
    // `[listener.cert.export]` alone defines `[listener.cert]` implicitly:
    // the default local-CA certificate, exported.
    let config = parse(
        "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.cert.export]\ndir = \"/var/lib/sheath/export\"\n",
    )
    .unwrap();
    let l = &config.listeners[0];
    assert!(matches!(l.cert, CertSource::LocalCa { .. }));
    assert_eq!(
        l.cert_policy.export.as_ref().unwrap().dir,
        Path::new("/var/lib/sheath/export")
    );
}

/// Values the syntax takes but sheath cannot use are refused, each at its
/// own line: a huge `max_connections` or local-CA `lifetime` panicked at
/// startup, a huge timeout panicked the worker serving the first
/// connection. Bounds that were checked already are reported at the
/// value's line too, not at the top of the file or of the table.
#[test]
fn out_of_range_numbers_and_durations_are_refused_at_their_line() {
    let head = "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n";
    let cases = [
        (
            "max_connections = 9223372036854775807\n",
            4,
            "listener[0].max_connections",
            "at most 1000000000",
        ),
        (
            "[listener.timeouts]\nhandshake = \"5s\"\nidle = \"500000000000y\"\n",
            6,
            "listener[0].timeouts.idle",
            "at most 100 years",
        ),
        (
            "[listener.timeouts]\nconnect = \"1s\"\n\nmax_lifetime = \"500000000000y\"\n",
            7,
            "listener[0].timeouts.max_lifetime",
            "at most 100 years",
        ),
        (
            "[listener.timeouts]\nhandshake = \"5s\"\nconnect = \"0s\"\n",
            6,
            "listener[0].timeouts.connect",
            "greater than zero",
        ),
        (
            "[listener.cert]\nnames = [\"localhost\"]\nlifetime = \"20000y\"\n",
            6,
            "listener[0].cert.lifetime",
            "at most 100 years",
        ),
        (
            "[listener.cert]\nnames = [\"localhost\"]\nretry_min = \"500000000000y\"\n",
            6,
            "listener[0].cert.retry_min",
            "at most 100 years",
        ),
        (
            "[listener.client_auth]\nmode = \"require\"\nca = \"ca.pem\"\npoll_interval = \"1ms\"\n",
            7,
            "listener[0].client_auth.poll_interval",
            "at least 100ms",
        ),
    ];
    for (tail, want_line, want_key, want_message) in cases {
        let (line, key, message) = error_at(&format!("{head}{tail}"));
        assert_eq!((line, key.as_str()), (want_line, want_key), "{tail}");
        assert!(message.contains(want_message), "{tail}: {message}");
    }
    let (line, key, message) = error_at(&format!(
        "# sheath\n\n[global]\ndrain_timeout = \"0s\"\n\n{head}"
    ));
    assert_eq!((line, key.as_str()), (4, "global.drain_timeout"));
    assert!(message.contains("greater than zero"), "{message}");
    let (line, key, _) = error_at(&format!("[global]\n\ndrain_timeout = \"200y\"\n{head}"));
    assert_eq!((line, key.as_str()), (3, "global.drain_timeout"));
    // At the bound, still accepted.
    let config = parse(&format!(
        "{head}max_connections = 1000000000\n[listener.timeouts]\nidle = \"100y\"\n"
    ))
    .unwrap();
    assert_eq!(config.listeners[0].max_connections, 1_000_000_000);
}

/// Addresses that cannot be bound side by side are refused by `check`,
/// at the second one's line: a wildcard takes its port on every address
/// of its family, and the HTTP-01 listener is a listener too. `run` failed
/// with "Address already in use" once the first listeners were up.
#[test]
fn addresses_that_cannot_be_bound_together_are_refused() {
    let listener =
        |bind: &str| format!("[[listener]]\nbind = \"{bind}\"\nupstream = \"127.0.0.1:8080\"\n");
    let (line, key, message) = error_at(&format!(
        "{}{}",
        listener("127.0.0.1:8443"),
        listener("0.0.0.0:8443")
    ));
    assert_eq!((line, key.as_str()), (5, "listener[1].bind"));
    assert!(message.contains("overlaps 127.0.0.1:8443"), "{message}");
    let (line, key, _) = error_at(&format!(
        "{}{}",
        listener("[::]:8443"),
        listener("[::1]:8443")
    ));
    assert_eq!((line, key.as_str()), (5, "listener[1].bind"));
    let (line, key, message) = error_at(&format!(
        "{}{}",
        listener("127.0.0.1:8443"),
        listener("127.0.0.1:8443")
    ));
    assert_eq!((line, key.as_str()), (5, "listener[1].bind"));
    assert!(
        message.contains("already used by listener[0].bind"),
        "{message}"
    );

    let acme = "[listener.cert]\nsource = \"acme\"\nnames = [\"app.example.com\"]\ndirectory = \"https://ca.example.com/directory\"\nchallenge = \"http-01\"\nhttp01_bind = \"0.0.0.0:80\"\n";
    let (line, key, message) = error_at(&format!("{}{acme}", listener("127.0.0.1:80")));
    assert_eq!((line, key.as_str()), (9, "listener[0].cert.http01_bind"));
    assert!(message.contains("overlaps 127.0.0.1:80"), "{message}");

    // What the kernel allows side by side stays allowed: IPv6 wildcards are
    // IPv6 only, port 0 is a new port each time, and ACME listeners share
    // an HTTP-01 listener.
    for text in [
        format!("{}{}", listener("[::]:8443"), listener("0.0.0.0:8443")),
        format!("{}{}", listener("127.0.0.1:0"), listener("0.0.0.0:0")),
        format!(
            "{}{}",
            listener("127.0.0.1:8443"),
            listener("127.0.0.2:8443")
        ),
        format!(
            "{}{acme}{}{}",
            listener("0.0.0.0:443"),
            listener("0.0.0.0:8443"),
            acme.replace("app.", "api.")
        ),
    ] {
        parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
}

/// An empty file path is refused where it is written. It resolved to the
/// config file's own directory, so `check` passed it and `run` failed
/// reading a directory.
#[test]
fn empty_file_paths_are_refused_at_their_line() {
    let head = "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n";
    let cases = [
        (
            "[listener.cert]\nsource = \"files\"\ncert = \"\"\nkey = \"k.pem\"\n",
            6,
            "listener[0].cert.cert",
        ),
        (
            "[listener.cert]\nsource = \"files\"\ncert = \"c.pem\"\nkey = \" \"\n",
            7,
            "listener[0].cert.key",
        ),
        (
            "[listener.client_auth]\nmode = \"require\"\nca = [\"ca.pem\", \"\"]\n",
            6,
            "listener[0].client_auth.ca",
        ),
        (
            "[listener.client_auth]\nmode = \"require\"\nca = \"ca.pem\"\ncrl = \"\"\n",
            7,
            "listener[0].client_auth.crl",
        ),
        (
            "[listener.cert]\nsource = \"acme\"\nnames = [\"a.example.com\"]\ndirectory = \"https://ca.example.com/dir\"\nca_root = \"\"\n",
            8,
            "listener[0].cert.ca_root",
        ),
    ];
    for (tail, want_line, want_key) in cases {
        let (line, key, message) = error_at(&format!("{head}{tail}"));
        assert_eq!((line, key.as_str()), (want_line, want_key), "{tail}");
        assert!(message.contains("must not be empty"), "{tail}: {message}");
    }
    let (line, key, _) = error_at(
        "[[listener]]\nbind = \"127.0.0.1:8443\"\nupstream = \"peer.example.com:443\"\nmode = \"outbound\"\n[listener.outbound]\nca = \"\"\n",
    );
    assert_eq!((line, key.as_str()), (6, "listener[0].outbound.ca"));
}

/// An allow-list entry that can never match, or matches otherwise than it
/// reads, is refused at its own line. An empty entry matched nothing (and
/// an empty `allow_cn` entry matched a certificate with an empty CN), and
/// a `*` in `allow_dns` matched only a certificate carrying the `*`
/// itself, so a typo or a wildcard left the list quietly narrower.
#[test]
fn allow_list_entries_that_cannot_match_are_refused_at_their_line() {
    let head = "[[listener]]\nbind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n[listener.client_auth]\nmode = \"require\"\nca = \"ca.pem\"\n";
    let cases = [
        ("allow_dns = [\"api.internal\", \"\"]\n", 7, "allow_dns", "empty"),
        (
            "allow_dns = [\n  \"api.internal\",\n  \"*.internal\",\n]\n",
            9,
            "allow_dns",
            "no wildcards",
        ),
        ("allow_dns = [\"api internal\"]\n", 7, "allow_dns", "not a DNS name"),
        ("allow_dns = [\"api..internal\"]\n", 7, "allow_dns", "not a DNS name"),
        ("allow_dns = [\"192.0.2.7\"]\n", 7, "allow_dns", "allow_ip"),
        ("allow_uri = [\"\"]\n", 7, "allow_uri", "empty"),
        (
            "allow_uri = [\n  \"spiffe://example.org/ns/prod/sa/web\",\n  \"spiffe://example.org/ns/prod*/sa/web\",\n]\n",
            9,
            "allow_uri",
            "whole path segment",
        ),
        (
            "allow_uri = [\"spiffe://*/ns/prod/sa/web\"]\n",
            7,
            "allow_uri",
            "whole path segment",
        ),
        (
            "allow_uri = [\"spiffe://example.org/ns/prod/sa/web \"]\n",
            7,
            "allow_uri",
            "not a URI",
        ),
        ("allow_uri = [\"://example.org/x\"]\n", 7, "allow_uri", "not a URI"),
        ("allow_uri = [\"spiffe:///ns/x\"]\n", 7, "allow_uri", "not a URI"),
        ("allow_cn = [\"\"]\n", 7, "allow_cn", "empty"),
        ("allow_ou = [\n  \"ops\",\n  \"\",\n]\n", 9, "allow_ou", "empty"),
        ("allow_ip = [\"10.0.0.1\",\n  \"\"]\n", 8, "allow_ip", "empty"),
        (
            "allow_cert_sha256 = [\n  \"\",\n]\n",
            8,
            "allow_cert_sha256",
            "empty",
        ),
        ("allow_spki_sha256 = [\"\"]\n", 7, "allow_spki_sha256", "empty"),
    ];
    for (tail, want_line, want_key, phrase) in cases {
        let (line, key, message) = error_at(&format!("{head}{tail}"));
        assert_eq!(
            (line, key.as_str()),
            (
                want_line,
                format!("listener[0].client_auth.{want_key}").as_str()
            ),
            "{tail}: {message}"
        );
        assert!(
            message.contains(phrase),
            "{tail}: want {phrase:?} in {message}"
        );
    }

    // DNS names are compared without regard to case (RFC 4343), and one
    // trailing dot is the root's: both are written in the form
    // certificates carry.
    let config = parse(&format!(
        "{head}allow_dns = [\"API.Internal.\", \"svc_a.internal\"]\nallow_uri = [\"spiffe://example.org/ns/*/sa/web\"]\n"
    ))
    .unwrap();
    assert_eq!(
        config.listeners[0].client_auth.allow.dns,
        ["api.internal", "svc_a.internal"]
    );
}

/// A listener's name goes into metric labels, log fields, error messages
/// and the `on_renew` hook's environment: a space, a newline or a control
/// character there split a log line or a label where nothing else does.
#[test]
fn listener_names_outside_a_plain_set_are_refused_at_their_line() {
    let body = "bind = \"0.0.0.0:8443\"\nupstream = \"127.0.0.1:8080\"\n";
    let long = "a".repeat(65);
    let bad = [
        "\"web api\"",
        "\"web\\napi\"",
        "\"web\\u0007\"",
        "\"web\\tapi\"",
        "\"wéb\"",
        "\"web/api\"",
        "\"web\\\"api\"",
        "\"\"",
        "\" \"",
        &format!("\"{long}\""),
    ];
    for name in bad {
        let (line, key, message) = error_at(&format!("[[listener]]\n{body}name = {name}\n"));
        assert_eq!(
            (line, key.as_str()),
            (4, "listener[0].name"),
            "{name}: {message}"
        );
        assert!(
            message.contains("letters, digits") || message.contains("must not be empty"),
            "{name}: {message}"
        );
    }
    let max = "b".repeat(64);
    for good in ["web", "api-v2", "orders_eu.1", "A0", max.as_str()] {
        let config = parse(&format!("[[listener]]\n{body}name = \"{good}\"\n"))
            .unwrap_or_else(|e| panic!("{good}: {e}"));
        assert_eq!(config.listeners[0].name, good);
    }
}
