//! Configuration: shipped examples parse, errors name file, line and key.

use std::path::Path;

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

#[test]
fn every_shipped_example_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = Config::load(&path)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
            assert!(!config.listeners.is_empty());
            count += 1;
        }
    }
    assert!(count >= 3, "expected the shipped examples in config/");
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
