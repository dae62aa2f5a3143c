//! `loadtest`: parses the command line and calls into the library (see lib.rs and
//! README.md). Exit codes: 0 done, 1 the run could not be made (or `find-max` found no rate
//! meeting the SLO, or `compare` no ratio), 2 bad arguments or manifest (a non-loopback URL
//! included).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use loadtest::procstat::ProcessSpec;
use loadtest::settle::SettleSettings;
use loadtest::{
    compare, find_max, run, BaselineProxy, BaselineSettings, CheckoutMethod, CompareSettings,
    Error, FailoverPlan, FindMaxSettings, Manifest, RunSettings, Scenario, Target,
};

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
        #[command(flatten)]
        outage: OutageArgs,
    },
    /// Steps the rate up with short runs; reports the highest rate meeting the SLO.
    FindMax {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        search: SearchArgs,
    },
    /// find-max against the gateway and the baseline proxy in turns (A B A B …); prints each
    /// round's maxima and the ratios gateway ÷ baseline, and their medians.
    Compare {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        search: SearchArgs,
        /// The baseline's first rate (default: --start).
        #[arg(long)]
        baseline_start: Option<f64>,
        /// Rounds, each a gateway search then a baseline search.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// From round 2, each side starts at this share of its best rate so far (0: from
        /// its first start every round).
        #[arg(long, default_value_t = 0.5)]
        resume_share: f64,
    },
    /// The same-run baseline: a bare pass-through proxy that signs the generator's supplier
    /// create-order bodies and forwards them to channel-sim. Runs until SIGINT or SIGTERM.
    BaselineProxy {
        /// The sandbox manifest (for the channel's base_url and secret file).
        #[arg(
            long,
            default_value = "data/sandbox/sandbox.json",
            value_name = "DIR/sandbox.json"
        )]
        manifest: PathBuf,
        /// Where to listen (loopback only; port 0: any free port, printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// The supplier channel forwarded to.
        #[arg(long, default_value = loadtest::baseline::DEFAULT_CHANNEL)]
        channel: String,
        /// Forwards in flight at once (beyond: 503 at once).
        #[arg(long, default_value_t = loadtest::baseline::DEFAULT_MAX_IN_FLIGHT)]
        max_in_flight: usize,
        /// Client connections served at once.
        #[arg(long, default_value_t = loadtest::baseline::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Whole upstream exchange, ms.
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
        /// Worker threads (default: one per CPU, as the gateway's runtime).
        #[arg(long)]
        threads: Option<usize>,
    },
}

#[derive(Args)]
struct Common {
    /// authorize, checkout, topup, mixed (70 % authorize, 25 % checkout, 5 % topup) or
    /// failover (checkout with an outage of the primary supplier channel; `run` only).
    #[arg(long, value_parser = parse_scenario)]
    scenario: Scenario,
    /// The sandbox manifest written by `gateway serve --sandbox --data-dir DIR`.
    #[arg(
        long,
        default_value = "data/sandbox/sandbox.json",
        value_name = "DIR/sandbox.json"
    )]
    manifest: PathBuf,
    /// What to load (run, find-max): the gateway, or the baseline proxy (checkout only).
    #[arg(long, value_enum, default_value_t = TargetKind::Gateway)]
    target: TargetKind,
    /// The channel kind checkouts pay through: supplier (an account's hold, HMAC callbacks;
    /// the only kind the baseline proxy, `compare` and `failover` know), alipay or wechatpay
    /// (customer payments without an account, RSA-signed callbacks: measured apart).
    #[arg(long, default_value = "supplier", value_parser = parse_checkout_method)]
    checkout_method: CheckoutMethod,
    /// A baseline proxy already running (`loadtest baseline-proxy`); without it one is
    /// started inside this process (its CPU then counts as the generator's).
    #[arg(long, value_name = "URL")]
    baseline_url: Option<String>,
    /// The supplier channel of an in-process baseline proxy.
    #[arg(long, default_value = loadtest::baseline::DEFAULT_CHANNEL)]
    baseline_channel: String,
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
    /// A process whose CPU (and RSS, once a second) is measured over the window, as NAME=PID
    /// (repeatable).
    #[arg(long = "pid", value_name = "NAME=PID", value_parser = ProcessSpec::parse)]
    pids: Vec<ProcessSpec>,
    /// The gateway's Redis (loopback only): its INFO commandstats is read at the edges of the
    /// window, to count the scripts and commands it ran per unit of work.
    #[arg(long, value_name = "HOST:PORT", value_parser = loadtest::redis_info::parse_redis_addr)]
    redis_addr: Option<SocketAddr>,
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

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TargetKind {
    Gateway,
    Baseline,
}

/// The rate search (find-max, compare).
#[derive(Args)]
struct SearchArgs {
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
}

/// The outage of `run --scenario failover`.
#[derive(Args)]
struct OutageArgs {
    /// The channel taken down.
    #[arg(long, default_value = loadtest::failover::DEFAULT_CHANNEL)]
    outage_channel: String,
    /// Seconds into the measured window when it goes down (default: a third of it).
    #[arg(long)]
    outage_at_s: Option<f64>,
    /// Seconds it stays down (default: a third of the window).
    #[arg(long)]
    outage_for_s: Option<f64>,
}

fn parse_scenario(text: &str) -> Result<Scenario, String> {
    text.parse()
}

fn parse_checkout_method(text: &str) -> Result<CheckoutMethod, String> {
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
            redis_addr: self.redis_addr,
            settle: SettleSettings {
                wait: seconds(self.settle_wait_s, "--settle-wait-s")?,
                sample_max: self.settle_sample,
                verify_max: self.verify,
                ..SettleSettings::default()
            },
            failover: None,
        })
    }

    /// The gateway of `manifest`; its checkouts pay through `--checkout-method`, which the
    /// manifest must have a channel of.
    fn gateway(&self, manifest: &Manifest) -> Result<Target, Error> {
        let method = self.checkout_method;
        if self.scenario.share(loadtest::Operation::Checkout) > 0.0
            && !manifest
                .channels
                .values()
                .any(|c| c.kind == method.as_str())
        {
            return Err(Error::Settings(format!(
                "--checkout-method {method}: the manifest has no {method} channel"
            )));
        }
        Target::gateway(manifest, self.merchant.as_deref(), self.accounts, method)
    }

    /// Refuses `--checkout-method` other than supplier where only supplier is known: the
    /// baseline proxy (and so `compare`) forwards supplier creates, and `failover` takes a
    /// supplier channel down.
    fn supplier_only(&self, what: &str) -> Result<(), Error> {
        if self.checkout_method == CheckoutMethod::Supplier {
            return Ok(());
        }
        Err(Error::Settings(format!(
            "{what} measures supplier checkouts only, not --checkout-method {}",
            self.checkout_method
        )))
    }

    /// The baseline at `--baseline-url`, or a proxy started here (kept alive by the
    /// returned handle).
    async fn baseline(
        &self,
        manifest: &Manifest,
    ) -> Result<(Target, Option<BaselineProxy>), Error> {
        if let Some(url) = &self.baseline_url {
            return Ok((Target::baseline(manifest, url)?, None));
        }
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let settings = BaselineSettings::from_manifest(manifest, &self.baseline_channel, listen)?;
        let proxy = BaselineProxy::start(settings).await?;
        eprintln!(
            "loadtest: baseline proxy started in this process at {} (its CPU counts as the generator's; run `loadtest baseline-proxy` apart and pass --baseline-url and --pid baseline=PID to measure it)",
            proxy.url()
        );
        Ok((Target::baseline(manifest, &proxy.url())?, Some(proxy)))
    }

    /// The target of `run` and `find-max`.
    async fn target(&self) -> Result<(Target, Option<BaselineProxy>), Error> {
        let manifest = Manifest::load(&self.manifest)?;
        if self.scenario == Scenario::Failover {
            self.supplier_only("failover")?;
        }
        match self.target {
            TargetKind::Gateway => Ok((self.gateway(&manifest)?, None)),
            TargetKind::Baseline if self.scenario != Scenario::Checkout => {
                Err(Error::Settings(format!(
                    "the baseline serves only the checkout scenario (one proxied supplier create per request), not {}",
                    self.scenario
                )))
            }
            TargetKind::Baseline => {
                self.supplier_only("the baseline proxy")?;
                self.baseline(&manifest).await
            }
        }
    }
}

impl SearchArgs {
    fn settings(&self, common: &Common) -> Result<FindMaxSettings, Error> {
        let run = common.settings(self.start, self.duration_s)?;
        run.validate()?;
        if !(self.slo_p99_ms.is_finite() && self.slo_p99_ms > 0.0) {
            return Err(Error::Settings("--slo-p99-ms must be positive".into()));
        }
        Ok(FindMaxSettings {
            run,
            slo_p99: Duration::from_secs_f64(self.slo_p99_ms / 1_000.0),
            start_rate: self.start,
            step_factor: self.step,
            max_rate: self.max_rate,
            max_steps: self.max_steps,
            pause: Duration::from_millis(self.pause_ms),
        })
    }
}

impl OutageArgs {
    /// The plan for a failover run (`None` for other scenarios; an outage option given with
    /// another scenario is refused by the run's validation).
    fn plan(&self, scenario: Scenario, duration_s: f64) -> Result<Option<FailoverPlan>, Error> {
        let given = self.outage_at_s.is_some()
            || self.outage_for_s.is_some()
            || self.outage_channel != loadtest::failover::DEFAULT_CHANNEL;
        if scenario != Scenario::Failover && !given {
            return Ok(None);
        }
        let mut plan = FailoverPlan::thirds(seconds(duration_s, "--duration-s")?);
        plan.channel = self.outage_channel.clone();
        if let Some(at) = self.outage_at_s {
            plan.outage_after = seconds(at, "--outage-at-s")?;
        }
        if let Some(length) = self.outage_for_s {
            plan.outage_for = seconds(length, "--outage-for-s")?;
        }
        Ok(Some(plan))
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
            outage,
        } => {
            let mut settings = common.settings(rate, duration_s)?;
            settings.failover = outage.plan(common.scenario, duration_s)?;
            settings.validate()?;
            let (target, proxy) = common.target().await?;
            let report = run(&target, &settings).await?;
            print!("{}", report.summary());
            if let Some(path) = &common.out {
                report.write_json(path)?;
            }
            if let Some(path) = &common.svg {
                loadtest::plot::write_svg(&report, path)?;
            }
            if let Some(proxy) = proxy {
                proxy.shutdown().await;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::FindMax { common, search } => {
            let settings = search.settings(&common)?;
            let (target, proxy) = common.target().await?;
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
            if let Some(proxy) = proxy {
                proxy.shutdown().await;
            }
            Ok(if report.max_rate_per_second.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Compare {
            common,
            search,
            baseline_start,
            rounds,
            resume_share,
        } => {
            if common.target == TargetKind::Baseline {
                return Err(Error::Settings(
                    "compare loads both targets: leave out --target".into(),
                ));
            }
            common.supplier_only("compare (its baseline proxies supplier creates)")?;
            let settings = CompareSettings {
                baseline_start_rate: baseline_start.unwrap_or(search.start),
                search: search.settings(&common)?,
                rounds,
                resume_share,
            };
            let manifest = Manifest::load(&common.manifest)?;
            let gateway = common.gateway(&manifest)?;
            let (baseline, proxy) = common.baseline(&manifest).await?;
            let report = compare(&gateway, &baseline, &settings).await?;
            print!("{}", report.summary());
            if let Some(path) = &common.out {
                write_json(path, &report)?;
            }
            // The plot of the last round's gateway search, at its best rate.
            let last_best = report
                .rounds
                .iter()
                .rev()
                .find_map(|r| r.gateway.search.best.as_ref());
            if let (Some(path), Some(best)) = (&common.svg, last_best) {
                loadtest::plot::write_svg(best, path)?;
            }
            if let Some(proxy) = proxy {
                proxy.shutdown().await;
            }
            Ok(if report.median_ratio.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::BaselineProxy {
            manifest,
            listen,
            channel,
            max_in_flight,
            max_connections,
            timeout_ms,
            threads: _,
        } => {
            let manifest = Manifest::load(&manifest)?;
            let mut settings = BaselineSettings::from_manifest(&manifest, &channel, listen)?;
            settings.max_in_flight = max_in_flight;
            settings.max_connections = max_connections;
            settings.upstream_timeout = Duration::from_millis(timeout_ms);
            let upstream = settings.upstream_base_url.clone();
            // The handlers first: a signal right after the line below must stop us cleanly.
            let stop = stop_signal()?;
            let proxy = BaselineProxy::start(settings).await?;
            println!(
                "baseline-proxy listening on {} (pid {}), forwarding to {channel} at {upstream}",
                proxy.url(),
                std::process::id()
            );
            stop.await;
            proxy.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Resolves at the first SIGINT or SIGTERM (the handlers are installed before it returns).
fn stop_signal() -> Result<impl std::future::Future<Output = ()>, Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let install = |kind: SignalKind| {
        signal(kind).map_err(|e| Error::Setup(format!("cannot handle signals: {e}")))
    };
    let mut interrupt = install(SignalKind::interrupt())?;
    let mut terminate = install(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Run { common, .. }
        | Command::FindMax { common, .. }
        | Command::Compare { common, .. } => common.threads,
        Command::BaselineProxy { threads, .. } => threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
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
