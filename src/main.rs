//! The `sheath` binary: arguments → logging → crypto provider → runtime →
//! the library. Only this file decides exit codes.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sheath::cli::{BootstrapArgs, CaCommand, Cli, Command, ConfigArgs, DemoArgs, HealthcheckArgs};
use sheath::config::{self, CertSource, Config, ListenerConfig, Mode, Timeouts};
use sheath::{app, cert::LocalCa, ShutdownOutcome};

/// Exit status for an unusable configuration, as distinct from a failure
/// at run time.
const EXIT_CONFIG: u8 = 2;
/// Exit status when a second signal cut the drain short.
const EXIT_FORCED: u8 = 130;

fn main() -> ExitCode {
    // Before any thread exists: this reads and clears LISTEN_FDS.
    sheath::upgrade::collect_inherited();
    let cli = Cli::parse();
    if let Err(message) = sheath::logging::init(cli.log_format, &cli.log_level) {
        let error = config::ConfigError::Invalid {
            origin: config::Origin::Flag("--log-level"),
            key: String::new(),
            message,
        };
        return report(&error, EXIT_CONFIG);
    }
    sheath::install_crypto_provider();

    match &cli.command {
        Command::Check(args) => check(args, &cli),
        Command::Ca(CaCommand::Export(args)) => {
            let state_dir = match (&cli.state_dir, &args.config) {
                (Some(dir), _) => dir.clone(),
                (None, Some(path)) => match Config::load(path) {
                    Ok(c) => c.state_dir,
                    Err(e) => return report(&e, EXIT_CONFIG),
                },
                (None, None) => config::default_state_dir(),
            };
            match LocalCa::load_or_create(&state_dir) {
                Ok(ca) => {
                    print!("{}", ca.cert_pem());
                    ExitCode::SUCCESS
                }
                Err(e) => report(&e, 1),
            }
        }
        Command::Bootstrap(args) => bootstrap(args),
        Command::Healthcheck(args) => healthcheck(args, &cli),
        Command::Run(args) => match args
            .to_config(cli.state_dir.as_ref())
            .and_then(|mut c| cli.apply_admin(&mut c).map(|()| c))
        {
            Ok(config) => {
                let watch = args.config.clone();
                serve(&cli, config, false, reloader(args, &cli), watch)
            }
            Err(e) => report(&e, EXIT_CONFIG),
        },
        Command::Demo(args) => {
            match demo_config(args, &cli).and_then(|mut c| cli.apply_admin(&mut c).map(|()| c)) {
                Ok(config) => serve(
                    &cli,
                    config,
                    true,
                    Box::new(|| Err(app::ReloadError::NoFile)),
                    None,
                ),
                Err(e) => report(&e, EXIT_CONFIG),
            }
        }
    }
}

fn check(args: &ConfigArgs, cli: &Cli) -> ExitCode {
    match args
        .to_config(cli.state_dir.as_ref())
        .and_then(|mut c| cli.apply_admin(&mut c).map(|()| c))
    {
        Ok(config) => {
            print!("{}", config.render());
            eprintln!(
                "configuration OK: {} listener(s){}",
                config.listeners.len(),
                config
                    .path
                    .as_ref()
                    .map(|p| format!(" in {}", p.display()))
                    .unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => report(&e, EXIT_CONFIG),
    }
}

fn healthcheck(args: &HealthcheckArgs, cli: &Cli) -> ExitCode {
    let mut admin = Some(config::DEFAULT_ADMIN);
    if let Some(path) = &args.config {
        match Config::load(path) {
            Ok(c) => admin = c.admin,
            Err(e) => return report(&e, EXIT_CONFIG),
        }
    }
    let addr = match cli.admin_override(admin) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            eprintln!("sheath: the admin endpoint is disabled; nothing to ask");
            return ExitCode::FAILURE;
        }
        Err(e) => return report(&e, EXIT_CONFIG),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&e, 1),
    };
    match runtime.block_on(sheath::admin::healthcheck(addr, args.timeout)) {
        Ok(body) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            print!("{why}");
            if !why.ends_with('\n') {
                println!();
            }
            ExitCode::FAILURE
        }
    }
}

fn bootstrap(args: &BootstrapArgs) -> ExitCode {
    let fingerprint = match config::parse_fingerprint(&args.fingerprint) {
        Ok(f) => f,
        Err(message) => {
            return report(
                &config::ConfigError::Invalid {
                    origin: config::Origin::Flag("--fingerprint"),
                    key: String::new(),
                    message,
                },
                EXIT_CONFIG,
            )
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&e, 1),
    };
    let pem = match runtime.block_on(sheath::cert::bootstrap::fetch_root(
        &args.ca_url,
        &fingerprint,
    )) {
        Ok(pem) => pem,
        // A URL that is not https:// with a host is wrong input, like a
        // malformed fingerprint, not a CA that could answer on a retry.
        Err(e @ sheath::cert::bootstrap::BootstrapError::BadUrl(_)) => {
            return report(&e, EXIT_CONFIG)
        }
        Err(e) => return report(&e, 1),
    };
    match &args.out {
        Some(path) => {
            if let Err(e) = sheath::cert::store::write_atomic(path, pem.as_bytes(), 0o644) {
                return report(&e, 1);
            }
            eprintln!(
                "root with SHA-256 {fingerprint} saved to {}",
                path.display()
            );
        }
        None => print!("{pem}"),
    }
    ExitCode::SUCCESS
}

fn demo_config(args: &DemoArgs, cli: &Cli) -> Result<Config, config::ConfigError> {
    let bind =
        config::parse_bind(&args.listen).map_err(|message| config::ConfigError::Invalid {
            origin: config::Origin::Flag("--listen"),
            key: String::new(),
            message,
        })?;
    Ok(Config {
        path: None,
        state_dir: cli
            .state_dir
            .clone()
            .unwrap_or_else(config::default_state_dir),
        drain_timeout: Duration::from_secs(5),
        // The demo runs next to whatever else is on the machine; it only
        // opens an admin port when asked to with --admin.
        admin: None,
        origins: Default::default(),
        listeners: vec![ListenerConfig {
            name: "demo".into(),
            bind,
            // Replaced by the backend's real address once it is bound.
            upstream: config::parse_upstream("127.0.0.1:1", false).expect("valid literal"),
            mode: Mode::Http,
            max_connections: config::DEFAULT_MAX_CONNECTIONS,
            timeouts: Timeouts::default(),
            cert: CertSource::default_local_ca(),
            cert_policy: Default::default(),
            sni_certs: Vec::new(),
            outbound: None,
            client_auth: Default::default(),
            proxy_protocol: None,
            upstream_protocol: Default::default(),
            alpn: Vec::new(),
            tls_min_version: Default::default(),
        }],
    })
}

/// How SIGHUP and file changes re-read the configuration: the same file,
/// with the same command-line overrides.
fn reloader(args: &ConfigArgs, cli: &Cli) -> app::ConfigLoader {
    let Some(path) = args.config.clone() else {
        return Box::new(|| Err(app::ReloadError::NoFile));
    };
    let state_dir = cli.state_dir.clone();
    let drain_timeout = args.drain_timeout;
    // `--admin` / `--no-admin` override the file at every reload as at the
    // start: the file's `[admin]` is then no change, and the reload does
    // not warn of one. The flags were checked at the start.
    let admin_flag = (cli.no_admin || cli.admin.is_some())
        .then(|| cli.admin_override(None))
        .and_then(Result::ok);
    Box::new(move || {
        let mut config = Config::load(&path)?;
        if let Some(admin) = admin_flag {
            config.admin = admin;
        }
        if let Some(dir) = &state_dir {
            config.state_dir = dir.clone();
            config
                .origins
                .insert("global.state_dir", config::Origin::Flag("--state-dir"));
        }
        if let Some(t) = drain_timeout.filter(|t| !t.is_zero()) {
            config.drain_timeout = t;
        }
        Ok(config)
    })
}

fn serve(
    cli: &Cli,
    mut config: Config,
    demo: bool,
    loader: app::ConfigLoader,
    watch: Option<std::path::PathBuf>,
) -> ExitCode {
    // Before any connection: each takes two descriptors, and a soft
    // limit of 1,024 is common (see `sheath::resources`).
    match sheath::resources::raise_open_files() {
        Ok(Some(raised)) => {
            tracing::debug!(
                from = raised.from,
                to = raised.to,
                "raised the open-file limit"
            )
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit to its hard limit"),
    }
    // Rust's count honours CPU affinity and cgroup quotas, so a sidecar
    // limited to one CPU gets one worker.
    let workers = cli.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        usize::from,
    );
    // One single-threaded runtime per worker, this thread's included
    // (see `sheath::workers` for why not tokio's multi-thread runtime).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("sheath-blocking")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(&e, 1),
    };
    if let Err(e) = sheath::workers::start(runtime.handle(), workers.saturating_sub(1)) {
        return report(&e, 1);
    }
    let code = runtime.block_on(async move {
        if demo {
            let backend = match sheath::demo::start_backend().await {
                Ok(addr) => addr,
                Err(e) => return report(&e, 1),
            };
            config.listeners[0].upstream =
                config::parse_upstream(&backend.to_string(), false).expect("loopback address");
        }
        let admin = config.admin;
        let running = match app::start(config).await {
            Ok(r) => r,
            Err(e) => return report(&e, 1),
        };
        if let Some(addr) = admin {
            let socket = match sheath::proxy::bind(addr) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("sheath: error: admin endpoint: cannot bind {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Ok(fd) = std::os::fd::AsFd::as_fd(&socket).try_clone_to_owned() {
                running.hand_over_too(fd);
            }
            tokio::spawn(sheath::admin::serve(socket, running.observe()));
        }
        sheath::upgrade::close_unclaimed();
        if demo {
            print_demo_banner(&running);
        }
        // Before announcing: the predecessor may pass on a SIGHUP at once.
        let mut signals = match sheath::shutdown::Signals::new() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("sheath: error: cannot listen for signals: {e}");
                return ExitCode::FAILURE;
            }
        };
        sheath::upgrade::announce_ready();
        let handed_over = running.handed_over();
        let ended = app::run_until_signal(running, loader, watch, &mut signals).await;
        if handed_over.lock().expect("poisoned").is_some() && sheath::upgrade::is_init() {
            // The same streams: a signal that came as the drain ended is
            // still in them, where streams created now would miss it.
            return ExitCode::from(sheath::upgrade::supervise(&mut signals).await);
        }
        match ended {
            Some(ShutdownOutcome::Drained) => ExitCode::SUCCESS,
            Some(ShutdownOutcome::DrainTimedOut { .. }) => ExitCode::FAILURE,
            None => ExitCode::from(EXIT_FORCED),
        }
    });
    // Blocking DNS lookups cannot be interrupted; do not wait on them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

fn print_demo_banner(running: &app::Running) {
    let addr = running.addr("demo").expect("demo listener");
    let ca = running
        .local_ca()
        .map(|ca| ca.cert_path().display().to_string())
        .unwrap_or_default();
    let host = if addr.ip().is_loopback() || addr.ip().is_unspecified() {
        "localhost".to_string()
    } else {
        addr.ip().to_string()
    };
    let url = format!("https://{host}:{}/", addr.port());
    println!("sheath demo: TLS on {addr} in front of a built-in plaintext backend");
    println!("local CA root: {ca}");
    println!();
    println!("Try it:");
    println!("  curl --cacert {ca} {url}");
    println!();
    println!("Stop with Ctrl-C.");
}

/// Print an error with its whole chain of causes. A cause whose text the
/// message above it already includes is not repeated.
fn report(error: &dyn std::error::Error, code: u8) -> ExitCode {
    let mut message = format!("sheath: error: {error}");
    let mut shown = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !shown.contains(&text) {
            message.push_str(&format!("\n  caused by: {text}"));
        }
        shown = text;
        source = cause.source();
    }
    eprintln!("{message}");
    ExitCode::from(code)
}
