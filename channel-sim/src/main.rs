//! `channel-sim serve --manifest FILE`: the sandbox channels as a process of their own
//! (DESIGN.md §10, `GATEWAY__SANDBOX__EXTERNAL_SIM=true`). Parses the command line and
//! calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "channel-sim",
    about = "Sandbox payment channels with fault injection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the channels of a sandbox manifest on the ports of their base URLs.
    Serve {
        /// The sandbox manifest (`DIR/sandbox.json`, written by `gateway serve --sandbox`).
        #[arg(long)]
        manifest: PathBuf,
        /// Pay every order automatically, as a customer would.
        #[arg(long, env = "GATEWAY__SANDBOX__AUTO_PAY", default_value_t = true, action = clap::ArgAction::Set)]
        auto_pay: bool,
        /// How long after its creation an order is auto-paid.
        #[arg(
            long,
            env = "GATEWAY__SANDBOX__AUTO_PAY_DELAY_MS",
            default_value_t = 500
        )]
        auto_pay_delay_ms: u64,
        /// Where the orders are kept across a restart (default: `channel-sim-orders.json`
        /// beside the manifest).
        #[arg(long)]
        orders_file: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal, never with NO_COLOR set.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .init();
    let Cli {
        command:
            Command::Serve {
                manifest,
                auto_pay,
                auto_pay_delay_ms,
                orders_file,
            },
    } = Cli::parse();
    let mut config = match channel_sim::manifest::load(&manifest) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("channel-sim: {e}");
            return ExitCode::from(2);
        }
    };
    config.orders_file = Some(
        orders_file
            .unwrap_or_else(|| manifest.with_file_name(channel_sim::config::ORDERS_FILE_NAME)),
    );
    for channel in &mut config.channels {
        channel.auto_pay = auto_pay;
        channel.auto_pay_delay_ms = auto_pay_delay_ms;
    }
    let handle = match channel_sim::Sim::start(config).await {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("channel-sim: {e}");
            return ExitCode::from(2);
        }
    };
    println!("channel-sim admin: {}", handle.admin_url());
    for (id, url) in handle.channel_urls() {
        println!("channel-sim {id}: {url}");
    }
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("channel-sim: cannot wait for Ctrl-C: {e}");
    }
    handle.shutdown().await;
    ExitCode::SUCCESS
}
