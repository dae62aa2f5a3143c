//! The `gateway` command line: its arguments (clap) and what each command runs. `main.rs`
//! parses the command line into a [`Cli`] and hands it to [`run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config;
use crate::sandbox::{self, Sandbox};
use crate::settlement::check_schema;
use crate::settlement::rebuild::rebuild_balances;
use crate::startup::{
    open_balance_store, open_settlement_store, shutdown_signal, Application, Mode,
};
use crate::telemetry;

/// The target of this module's log events: the one they had when this code was `main.rs`
/// (the binary's crate root), kept so log filters and readers see no change.
const LOG_TARGET: &str = "gateway";

#[derive(Parser)]
#[command(name = "gateway", version, about = "Payment gateway and router")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Check it as `serve --sandbox --config FILE` would (published test keys allowed);
        /// without it, by the production rules of `serve --config FILE`.
        #[arg(long)]
        sandbox: bool,
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Apply the settlement store's migrations (safe to run again; several instances
    /// serialize on PostgreSQL).
    Migrate {
        #[command(flatten)]
        source: ConfigSource,
    },
    /// Recompute balances and live holds from the settlement store and load them into Redis.
    RebuildBalances {
        #[command(flatten)]
        source: ConfigSource,
        /// Only this account, as MERCHANT/ACCOUNT.
        #[arg(long, value_name = "MERCHANT/ACCOUNT")]
        account: Option<String>,
    },
}

/// Where a command reads its configuration from.
#[derive(clap::Args)]
pub struct ConfigSource {
    /// Use the embedded sandbox configuration.
    #[arg(long)]
    sandbox: bool,
    /// Configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (wins over GATEWAY__DATA_DIR and the file).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl ConfigSource {
    fn load(&self) -> Result<config::Config, String> {
        if !self.sandbox && self.config.is_none() {
            return Err("give --config FILE, or --sandbox".into());
        }
        let mut env: Vec<(String, String)> = std::env::vars().collect();
        if let Some(dir) = &self.data_dir {
            env.push(("GATEWAY__DATA_DIR".into(), dir.display().to_string()));
        }
        if self.sandbox {
            // The sandbox channels do not matter here; their overrides must not break the load.
            return sandbox::load_config(self.config.as_deref(), env)
                .map(|(config, _)| config)
                .map_err(|e| e.to_string());
        }
        config::load(self.config.as_deref(), env).map_err(|e| e.to_string())
    }
}

/// Runs the command `cli` names; the exit code is the process's.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::CheckConfig { sandbox, file } => match config::load_for(
            if sandbox {
                Mode::Sandbox
            } else {
                Mode::Production
            },
            Some(&file),
            std::env::vars(),
        ) {
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
        Command::Migrate { source } => run_admin(&source, |config| async move {
            let store = open_settlement_store(&config)
                .await
                .map_err(|e| e.to_string())?;
            let version = store.migrate().await.map_err(|e| e.to_string())?;
            println!("settlement store at schema version {version}");
            Ok(())
        }),
        Command::RebuildBalances { source, account } => run_admin(&source, |config| async move {
            if !config.uses_redis() {
                return Err("rebuild-balances loads Redis: set redis.url (the in-process sandbox store rebuilds itself at every start)".into());
            }
            let only = match &account {
                Some(spec) => Some(
                    spec.split_once('/')
                        .ok_or_else(|| format!("--account takes MERCHANT/ACCOUNT, got {spec:?}"))?,
                ),
                None => None,
            };
            let store = open_settlement_store(&config)
                .await
                .map_err(|e| e.to_string())?;
            check_schema(store.as_ref())
                .await
                .map_err(|e| e.to_string())?;
            let balances = open_balance_store(&config, Mode::Production)
                .await
                .map_err(|e| e.to_string())?;
            let loaded = rebuild_balances(
                store.as_ref(),
                balances.as_ref(),
                only,
                config.settings.preauth.idempotency_retention_seconds,
            )
            .await
            .map_err(|e| e.to_string())?;
            println!("rebuilt {loaded} account(s) from the settlement store");
            if only.is_some() && loaded == 0 {
                return Err("no such account in the settlement store".into());
            }
            Ok(())
        }),
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
            let loaded = if sandbox {
                sandbox::load_config(file.as_deref(), env)
            } else {
                config::load(file.as_deref(), env).map(|config| (config, Vec::new()))
            };
            let (config, channel_overrides) = match loaded {
                Ok(loaded) => loaded,
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
            serve(config, mode, channel_overrides)
        }
    }
}

/// The async runtime's threads: as configured, else (0) one per CPU but one, at least one.
/// The CPU left is for the gateway's other threads (the SQLite connection's) and the stores
/// beside it: on two cores, one worker spends 8–12 % less CPU per payment than two, which
/// wake each other for every task they pass along (docs/PERFORMANCE.md).
fn worker_threads(configured: usize, cpus: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        cpus.saturating_sub(1).max(1)
    }
}

/// `channel_overrides`: the sandbox channels' environment overrides, held back by
/// [`sandbox::load_config`].
fn serve(
    mut config: config::Config,
    mode: Mode,
    channel_overrides: Vec<(String, String)>,
) -> ExitCode {
    telemetry::init_tracing(&config.settings.telemetry);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    builder.worker_threads(worker_threads(config.settings.server.worker_threads, cpus));
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // The sandbox channels (keys, simulator) exist before the gateway that uses them.
        let sandbox = if mode == Mode::Sandbox {
            match sandbox::prepare(&mut config, &channel_overrides).await {
                Ok(sandbox) => {
                    print_sandbox_banner(&config);
                    Some(sandbox)
                }
                Err(err) => {
                    tracing::error!(target: LOG_TARGET, error = %err, "cannot prepare the sandbox");
                    eprintln!("cannot prepare the sandbox: {err}");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            None
        };
        let app = match Application::build(config, mode).await {
            Ok(app) => app,
            Err(err) => {
                tracing::error!(target: LOG_TARGET, error = %err, "cannot start");
                eprintln!("cannot start: {err}");
                stop_sandbox(sandbox).await;
                return ExitCode::FAILURE;
            }
        };
        // The manifest is written before the listening line, so whoever waits for that line
        // finds it.
        let written = sandbox
            .as_ref()
            .map(|s| s.write_manifest(app.local_addr()).map(|_| s.banner()));
        match written {
            Some(Ok(banner)) => print!("{banner}"),
            Some(Err(err)) => {
                eprintln!("cannot write the sandbox manifest: {err}");
                stop_sandbox(sandbox).await;
                return ExitCode::FAILURE;
            }
            None => {}
        }
        // Handlers first: whoever reads the next line may signal at once.
        let shutdown = shutdown_signal();
        tracing::info!(target: LOG_TARGET, addr = %app.local_addr(), "gateway listening");
        println!("gateway listening on http://{}", app.local_addr());
        let result = app.run_until(shutdown).await;
        stop_sandbox(sandbox).await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("server error: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Stops the in-process channel simulator, if one runs.
async fn stop_sandbox(sandbox: Option<Sandbox>) {
    if let Some(sandbox) = sandbox {
        sandbox.shutdown().await;
    }
}

fn print_sandbox_banner(config: &config::Config) {
    println!("sandbox mode: test credentials (never use in production)");
    let credentials = sandbox::credentials(config);
    for (merchant, c) in &credentials.merchants {
        println!(
            "  merchant {merchant}: API key {}, webhook secret {}",
            c.api_key, c.webhook_secret
        );
    }
    if let Some(key) = &credentials.admin_key {
        println!("  admin key: {key}");
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

/// Runs an administrative command on a small runtime; errors go to stderr with exit code 1.
fn run_admin<F, Fut>(source: &ConfigSource, command: F) -> ExitCode
where
    F: FnOnce(config::Config) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let config = match source.load() {
        Ok(config) => config,
        Err(err) => {
            eprint!("{err}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::init_tracing(&config.settings.telemetry);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn the_runtime_leaves_one_cpu_unless_configured() {
        assert_eq!(worker_threads(0, 1), 1);
        assert_eq!(worker_threads(0, 2), 1);
        assert_eq!(worker_threads(0, 16), 15);
        assert_eq!(worker_threads(3, 2), 3);
        assert_eq!(worker_threads(1, 64), 1);
    }
}
