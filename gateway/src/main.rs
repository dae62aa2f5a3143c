//! The `gateway` command: parses the command line and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gateway::config;
use gateway::secret::KeyDigest;
use gateway::startup::{shutdown_signal, Application, Mode};
use gateway::telemetry;

#[derive(Parser)]
#[command(name = "gateway", version, about = "Payment gateway and router")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve {
        /// Run the sandbox: embedded configuration, test merchants, in-process store unless
        /// GATEWAY__REDIS__URL is set.
        #[arg(long)]
        sandbox: bool,
        /// Configuration file (with --sandbox, replaces the embedded sandbox.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Listen address, e.g. 127.0.0.1:8080 (wins over the file and the environment).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Data directory (wins over GATEWAY__DATA_DIR and the file).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Validate a configuration file (with the environment's overrides) and exit.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// The documented sandbox credentials (README, DESIGN.md §10): printed at start only when the
/// configuration really accepts them.
const SANDBOX_KEYS: &[(&str, &str)] = &[("alpha", "sk_test_alpha"), ("beta", "sk_test_beta")];
const SANDBOX_ADMIN_KEY: &str = "sk_test_admin";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match config::load(Some(&file), std::env::vars()) {
            Ok(config) => {
                println!(
                    "{}: ok ({} merchants, currencies {:?}, balance store {})",
                    file.display(),
                    config.merchants.len(),
                    {
                        let mut codes: Vec<_> =
                            config.currencies.keys().map(|c| c.code()).collect();
                        codes.sort_unstable();
                        codes
                    },
                    if config.uses_redis() {
                        "redis"
                    } else {
                        "in-process (sandbox only)"
                    }
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprint!("{err}");
                ExitCode::FAILURE
            }
        },
        Command::Serve {
            sandbox,
            config: file,
            listen,
            data_dir,
        } => {
            if !sandbox && file.is_none() {
                eprintln!("gateway serve needs --config FILE, or --sandbox");
                return ExitCode::FAILURE;
            }
            let mut env: Vec<(String, String)> = std::env::vars().collect();
            // Flags win over the environment, which wins over the file.
            if let Some(listen) = listen {
                env.push(("GATEWAY__SERVER__LISTEN".into(), listen));
            }
            if let Some(dir) = data_dir {
                env.push(("GATEWAY__DATA_DIR".into(), dir.display().to_string()));
            }
            let config = match config::load(file.as_deref(), env) {
                Ok(config) => config,
                Err(err) => {
                    eprint!("{err}");
                    return ExitCode::FAILURE;
                }
            };
            let mode = if sandbox {
                Mode::Sandbox
            } else {
                Mode::Production
            };
            serve(config, mode)
        }
    }
}

fn serve(config: config::Config, mode: Mode) -> ExitCode {
    telemetry::init_tracing(&config.settings.telemetry);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        if mode == Mode::Sandbox {
            print_sandbox_banner(&config);
        }
        let app = match Application::build(config, mode).await {
            Ok(app) => app,
            Err(err) => {
                tracing::error!(error = %err, "cannot start");
                eprintln!("cannot start: {err}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(addr = %app.local_addr(), "gateway listening");
        println!("gateway listening on http://{}", app.local_addr());
        match app.run_until(shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("server error: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

fn print_sandbox_banner(config: &config::Config) {
    println!("sandbox mode: test credentials (never use in production)");
    for (merchant, key) in SANDBOX_KEYS {
        let accepted = config.merchants.iter().any(|m| {
            m.id.as_str() == *merchant && m.key_digests.iter().any(|d| d.ct_eq(&KeyDigest::of(key)))
        });
        if accepted {
            let secret = config
                .merchants
                .iter()
                .find(|m| m.id.as_str() == *merchant)
                .map(|m| m.webhook_secret.expose().to_owned())
                .unwrap_or_default();
            println!("  merchant {merchant}: API key {key}, webhook secret {secret}");
        }
    }
    if config
        .admin_key_digests
        .iter()
        .any(|d| d.ct_eq(&KeyDigest::of(SANDBOX_ADMIN_KEY)))
    {
        println!("  admin key: {SANDBOX_ADMIN_KEY}");
    }
    println!(
        "  balance store: {}",
        if config.uses_redis() {
            "redis"
        } else {
            "in-process"
        }
    );
}
