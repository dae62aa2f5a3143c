//! `loadtest`: parses the command line and calls into the library (see lib.rs and
//! README.md). Exit codes: 0 done, 1 the run could not be made (or `find-max` found no rate
//! meeting the SLO), 2 bad arguments or manifest (a non-loopback URL included).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use loadtest::procstat::ProcessSpec;
use loadtest::settle::SettleSettings;
use loadtest::{find_max, run, Error, FindMaxSettings, Manifest, RunSettings, Scenario, Target};

#[derive(Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Open-loop load generator for the gateway's sandbox (fixed arrival rate, corrected latency)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One run at a fixed arrival rate: summary on stdout, optional JSON report and SVG plot.
    Run {
        #[command(flatten)]
        common: Common,
        /// Intended requests per second.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Measured window, seconds.
        #[arg(long, default_value_t = 10.0)]
        duration_s: f64,
    },
    /// Steps the rate up with short runs; reports the highest rate meeting the SLO.
    FindMax {
        #[command(flatten)]
        common: Common,
        /// The SLO: corrected p99 at most this, in ms (and no error, no missed send).
        #[arg(long)]
        slo_p99_ms: f64,
        /// First rate tried, requests per second.
        #[arg(long, default_value_t = 100.0)]
        start: f64,
        /// Each step's rate over the previous one.
        #[arg(long, default_value_t = 1.25)]
        step: f64,
        /// Never try more than this rate.
        #[arg(long, default_value_t = 1_000_000.0)]
        max_rate: f64,
        /// The most steps.
        #[arg(long, default_value_t = 40)]
        max_steps: u32,
        /// Measured window of each step, seconds.
        #[arg(long, default_value_t = 5.0)]
        duration_s: f64,
        /// Quiet time between steps, ms.
        #[arg(long, default_value_t = 1_000)]
        pause_ms: u64,
    },
}

#[derive(Args)]
struct Common {
    /// authorize, checkout, topup or mixed (70 % authorize, 25 % checkout, 5 % topup).
    #[arg(long, value_parser = parse_scenario)]
    scenario: Scenario,
    /// The sandbox manifest written by `gateway serve --sandbox --data-dir DIR`.
    #[arg(
        long,
        default_value = "data/sandbox/sandbox.json",
        value_name = "DIR/sandbox.json"
    )]
    manifest: PathBuf,
    /// Warm-up before the measured window, seconds (sent, not measured).
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// The in-flight bound: connections (HTTP/1, one request each) at most.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// A request that cannot leave within this of its intended time is a missed send.
    #[arg(long, default_value_t = 50)]
    max_send_lag_ms: u64,
    /// Whole-exchange timeout of one request.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
    /// The merchant to pay as (default: the manifest's first).
    #[arg(long)]
    merchant: Option<String>,
    /// Accounts the payments are spread over (lt-000, lt-001, …).
    #[arg(long, default_value_t = 256)]
    accounts: usize,
    /// A process whose CPU is measured over the window, as NAME=PID (repeatable).
    #[arg(long = "pid", value_name = "NAME=PID", value_parser = ProcessSpec::parse)]
    pids: Vec<ProcessSpec>,
    /// Worker threads of the generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds to wait after the run for channel payments to settle.
    #[arg(long, default_value_t = 10.0)]
    settle_wait_s: f64,
    /// Channel payments looked up at channel-sim at most (an even sample beyond).
    #[arg(long, default_value_t = 20_000)]
    settle_sample: usize,
    /// Settled payments checked against the gateway's GET /v1/payments/{id} at most.
    #[arg(long, default_value_t = 200)]
    verify: usize,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Write the SVG plot here.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

fn parse_scenario(text: &str) -> Result<Scenario, String> {
    text.parse()
}

fn seconds(value: f64, flag: &str) -> Result<Duration, Error> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| Error::Settings(format!("{flag} must be a non-negative number of seconds")))
}

impl Common {
    fn settings(&self, rate: f64, duration_s: f64) -> Result<RunSettings, Error> {
        if !(1..=64).contains(&self.threads) {
            return Err(Error::Settings("--threads must be 1..=64".into()));
        }
        for spec in &self.pids {
            spec.cpu_time().map_err(|e| {
                Error::Settings(format!(
                    "--pid {}={}: {e}",
                    spec.name,
                    spec.pid.unwrap_or_default()
                ))
            })?;
        }
        Ok(RunSettings {
            scenario: self.scenario,
            rate_per_second: rate,
            warmup: seconds(self.warmup_s, "--warmup-s")?,
            duration: seconds(duration_s, "--duration-s")?,
            connections: self.connections,
            max_send_lag: Duration::from_millis(self.max_send_lag_ms),
            request_timeout: Duration::from_millis(self.timeout_ms),
            processes: self.pids.clone(),
            settle: SettleSettings {
                wait: seconds(self.settle_wait_s, "--settle-wait-s")?,
                sample_max: self.settle_sample,
                verify_max: self.verify,
                ..SettleSettings::default()
            },
        })
    }

    fn target(&self) -> Result<Target, Error> {
        let manifest = Manifest::load(&self.manifest)?;
        Target::gateway(&manifest, self.merchant.as_deref(), self.accounts)
    }
}

fn write_json(path: &PathBuf, value: &impl serde::Serialize) -> Result<(), Error> {
    let mut text = serde_json::to_vec_pretty(value).expect("reports serialize");
    text.push(b'\n');
    std::fs::write(path, text).map_err(|source| Error::Output {
        path: path.clone(),
        source,
    })
}

async fn execute(command: Command) -> Result<ExitCode, Error> {
    match command {
        Command::Run {
            common,
            rate,
            duration_s,
        } => {
            let settings = common.settings(rate, duration_s)?;
            settings.validate()?;
            let target = common.target()?;
            let report = run(&target, &settings).await?;
            print!("{}", report.summary());
            if let Some(path) = &common.out {
                report.write_json(path)?;
            }
            if let Some(path) = &common.svg {
                loadtest::plot::write_svg(&report, path)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::FindMax {
            common,
            slo_p99_ms,
            start,
            step,
            max_rate,
            max_steps,
            duration_s,
            pause_ms,
        } => {
            let run_settings = common.settings(start, duration_s)?;
            run_settings.validate()?;
            if !(slo_p99_ms.is_finite() && slo_p99_ms > 0.0) {
                return Err(Error::Settings("--slo-p99-ms must be positive".into()));
            }
            let settings = FindMaxSettings {
                run: run_settings,
                slo_p99: Duration::from_secs_f64(slo_p99_ms / 1_000.0),
                start_rate: start,
                step_factor: step,
                max_rate,
                max_steps,
                pause: Duration::from_millis(pause_ms),
            };
            let target = common.target()?;
            let report = find_max(&target, &settings).await?;
            print!("{}", report.summary());
            if let Some(best) = &report.best {
                println!("\nthe best step:");
                print!("{}", best.summary());
            }
            if let Some(path) = &common.out {
                write_json(path, &report)?;
            }
            if let (Some(path), Some(best)) = (&common.svg, &report.best) {
                loadtest::plot::write_svg(best, path)?;
            }
            Ok(if report.max_rate_per_second.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Run { common, .. } | Command::FindMax { common, .. } => common.threads,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.clamp(1, 64))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
