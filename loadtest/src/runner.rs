//! One run, start to report: fund the accounts, drive the schedule, wait for the answers,
//! follow the settlements, measure the processes' CPU and the target's other resources
//! ([`crate::resources`]) over the measured window, and judge whether the generator itself
//! was the bottleneck. A failover run also takes a channel down and back up during the
//! window ([`crate::failover`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::client::HttpClient;
use crate::failover::{self, FailoverPlan, FailoverReport, PhaseBounds, WallSpans};
use crate::procstat::{self, ProcessSpec};
use crate::recorder::{Recorder, Timing};
use crate::redis_info;
use crate::report::{
    Latency, OperationReport, Report, RequestCounts, RunEcho, SecondPoint, Throughput,
};
use crate::resources::{self, Probe, Samples, Units};
use crate::scenario::{Operation, Scenario};
use crate::schedule::{self, DispatchLimits, Pacer, Schedule, Slot};
use crate::settle::{self, SettleSettings};
use crate::target::Target;
use crate::Error;

/// Time between the end of set-up and the first intended send, so that the first requests
/// are not late because the dispatcher was still starting.
const START_LEAD: Duration = Duration::from_millis(100);
/// The most requests a run may schedule (each costs a few hundred bytes while in flight and
/// nothing after; this bounds a typo like `--rate 1e9`).
pub const MAX_SLOTS: u64 = 50_000_000;
/// A generator busier than this share of its worker threads is likely the bottleneck.
const GENERATOR_BUSY_SHARE: f64 = 0.85;
/// A measured process below this many cores is "idle-ish".
const IDLE_CORES: f64 = 0.5;

/// What a run does.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub scenario: Scenario,
    /// Intended requests per second (fixed arrival rate).
    pub rate_per_second: f64,
    /// Sent but not measured: connections opened, caches warm.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// The in-flight bound (one HTTP/1 connection per request in flight).
    pub connections: usize,
    /// How late past its intended time a request may still be sent; later, it is missed.
    pub max_send_lag: Duration,
    /// Whole exchange (connect, send, answer, body).
    pub request_timeout: Duration,
    /// Processes whose CPU and RSS are measured besides the generator's own CPU.
    pub processes: Vec<ProcessSpec>,
    /// The gateway's Redis, whose `INFO commandstats` is read at the window's edges
    /// (loopback only; gateway target only).
    pub redis_addr: Option<SocketAddr>,
    /// How channel payments are followed after the run.
    pub settle: SettleSettings,
    /// The outage of a `failover` run (`None`: [`FailoverPlan::thirds`] of the window).
    /// Only for that scenario.
    pub failover: Option<FailoverPlan>,
}

impl Default for RunSettings {
    fn default() -> Self {
        Self {
            scenario: Scenario::Authorize,
            rate_per_second: 200.0,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            connections: 64,
            max_send_lag: Duration::from_millis(50),
            request_timeout: Duration::from_secs(5),
            processes: Vec::new(),
            redis_addr: None,
            settle: SettleSettings::default(),
            failover: None,
        }
    }
}

impl RunSettings {
    /// Refuses settings that cannot make a meaningful, bounded run.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::Settings(m.to_owned()));
        if !(self.rate_per_second.is_finite() && self.rate_per_second >= 0.001) {
            return bad("--rate must be at least 0.001 per second");
        }
        if self.duration < Duration::from_millis(100) {
            return bad("--duration-s must be at least 0.1 s");
        }
        if self.duration + self.warmup > Duration::from_secs(24 * 3600) {
            return bad("a run lasts at most 24 h");
        }
        if !(1..=100_000).contains(&self.connections) {
            return bad("--connections must be 1..=100000");
        }
        if self.request_timeout < Duration::from_millis(1) {
            return bad("--timeout-ms must be at least 1");
        }
        let slots = Schedule::new(
            Instant::now(),
            self.rate_per_second,
            self.warmup,
            self.duration,
        )
        .slots();
        if slots > MAX_SLOTS {
            return Err(Error::Settings(format!(
                "{slots} requests is more than {MAX_SLOTS}: lower the rate or the duration"
            )));
        }
        if slots == 0 {
            return bad("the run would send no request");
        }
        if let Some(addr) = self.redis_addr {
            if !addr.ip().is_loopback() {
                return Err(Error::Settings(format!(
                    "--redis-addr {addr} is not a loopback address: loadtest only talks to this machine"
                )));
            }
        }
        match (self.scenario, &self.failover) {
            (Scenario::Failover, _) => self.failover_plan().validate(self.duration)?,
            (_, Some(_)) => return bad("an outage is planned only in the failover scenario"),
            (_, None) => {}
        }
        Ok(())
    }

    /// The outage of a failover run: the one given, or the middle third of the window.
    pub fn failover_plan(&self) -> FailoverPlan {
        self.failover
            .clone()
            .unwrap_or_else(|| FailoverPlan::thirds(self.duration))
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A prefix unique to this run (time, process, a counter), for order ids and idempotency keys.
fn new_run_id() -> String {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    format!("lt-{:x}-{:x}-{n}", unix_ms(), std::process::id())
}

/// Runs `settings` against `target` and reports. Needs a Tokio runtime with the time driver;
/// the generator's worker threads are that runtime's.
pub async fn run(target: &Target, settings: &RunSettings) -> Result<Report, Error> {
    settings.validate()?;
    target.check_scenario(settings.scenario)?;
    let failover_plan = (settings.scenario == Scenario::Failover).then(|| settings.failover_plan());
    let sim_admin_url = target.sim_admin_url().map(str::to_owned);
    if failover_plan.is_some() && sim_admin_url.is_none() {
        return Err(Error::Settings(
            "the failover scenario needs channel-sim's admin URL".into(),
        ));
    }
    let client = HttpClient::new(settings.connections, settings.request_timeout);
    let run_id: Arc<str> = Arc::from(new_run_id());
    let scenario = settings.scenario;
    let slots = Schedule::new(
        Instant::now(),
        settings.rate_per_second,
        settings.warmup,
        settings.duration,
    )
    .slots();
    let spending: f64 = Operation::ALL
        .iter()
        .filter(|op| op.spends_balance())
        .map(|op| scenario.share(*op))
        .sum();
    target.prepare(&client, slots, spending, &run_id).await?;

    let mut processes = vec![ProcessSpec::this_process()];
    processes.extend(settings.processes.iter().cloned());

    let (now, now_unix_ms) = (Instant::now(), unix_ms());
    let start = now + START_LEAD;
    let schedule = Schedule::new(
        start,
        settings.rate_per_second,
        settings.warmup,
        settings.duration,
    );
    let (window_start, window_end) = schedule.window();
    let window_start_unix_ms = now_unix_ms + (window_start - now).as_millis() as u64;
    let window_end_unix_ms = window_start_unix_ms + settings.duration.as_millis() as u64;
    let outage = failover_plan.as_ref().map(|plan| PhaseBounds {
        outage_from: window_start + plan.outage_after,
        outage_to: window_start + plan.outage_after + plan.outage_for,
    });
    let new_recorder = || {
        let recorder = Recorder::new(window_start, settings.duration);
        match outage {
            Some(bounds) => recorder.with_outage(bounds),
            None => recorder,
        }
    };
    let recorder = Arc::new(Mutex::new(new_recorder()));
    // The outage, on its own task: it must happen on time whatever the dispatcher does.
    let injector = match (&failover_plan, outage, &sim_admin_url) {
        (Some(plan), Some(bounds), Some(url)) => Some(tokio::spawn(failover::inject(
            url.clone(),
            plan.channel.clone(),
            bounds.outage_from,
            bounds.outage_to,
        ))),
        _ => None,
    };

    // CPU readings (and Redis's command counts) at the edges of the measured window,
    // whatever the dispatcher is doing. Redis is the gateway's: read only when it is the
    // target.
    let redis_addr = settings
        .redis_addr
        .filter(|_| matches!(target, Target::Gateway(_)));
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(window_start).await;
        let before = procstat::read_all(&processes);
        let from = Instant::now();
        let redis_before = match redis_addr {
            Some(addr) => Some(redis_info::commandstats(addr).await),
            None => None,
        };
        tokio::time::sleep_until(window_end).await;
        let after = procstat::read_all(&processes);
        let elapsed = from.elapsed();
        let redis = match (redis_addr, redis_before) {
            (Some(addr), Some(before)) => {
                Some((addr, before, redis_info::commandstats(addr).await))
            }
            _ => None,
        };
        (before, after, elapsed, redis)
    });
    // RSS and the gateway's gauges once a second, its counters at the edges, on a task of
    // their own so that a slow scrape never delays the CPU readings.
    let probe = Probe {
        metrics: target.metrics_uri(),
        processes: settings.processes.clone(),
    };
    let probed = (!probe.is_empty()).then(|| {
        tokio::spawn(resources::sample_window(
            probe.clone(),
            window_start,
            window_end,
        ))
    });

    let in_flight = Arc::new(Semaphore::new(settings.connections));
    let limits = DispatchLimits {
        max_send_lag: settings.max_send_lag,
    };
    // The dispatcher runs on a blocking-pool thread of its own and paces with the OS's
    // sleep: tokio's timer has 1 ms granularity, which would add up to a millisecond of send
    // lag to every request of a target that answers in a few hundred µs. The requests
    // themselves run on the runtime's workers.
    let launch = {
        let (target, client, recorder) = (target.clone(), client.clone(), Arc::clone(&recorder));
        let run_id = Arc::clone(&run_id);
        move |slot: Slot, permit: OwnedSemaphorePermit| {
            let (target, client, recorder) =
                (target.clone(), client.clone(), Arc::clone(&recorder));
            let run_id = Arc::clone(&run_id);
            tokio::spawn(async move {
                let operation = scenario.operation(slot.seq);
                let request = target.request(operation, &run_id, slot.seq);
                let sent_at = Instant::now();
                let result = client.send(request).await;
                let done_at = Instant::now();
                let timing = Timing {
                    sent_at,
                    done_at,
                    done_unix_ms: unix_ms(),
                };
                let outcome = target.interpret(operation, result);
                recorder
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(slot, operation, timing, outcome);
                // Only now may the next request take this slot of the in-flight bound.
                drop(permit);
            });
        }
    };
    let dispatcher = {
        let (schedule, in_flight) = (schedule.clone(), Arc::clone(&in_flight));
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            runtime.block_on(schedule::drive(
                &schedule,
                limits,
                &in_flight,
                Pacer::Thread,
                launch,
            ))
        })
    };
    let dispatched = dispatcher.await.expect("the dispatcher does not panic");
    // Every request sent ends within its timeout: then all permits are back.
    let _all = in_flight
        .acquire_many(settings.connections as u32)
        .await
        .expect("the in-flight semaphore is never closed");
    let (before, after, window_elapsed, redis) =
        sampler.await.expect("the CPU sampler does not panic");
    let answers_done_unix_ms = unix_ms();
    // Its last scrape follows the window's end (bounded by its timeout).
    let samples = match probed {
        Some(task) => task.await.expect("the resource sampler does not panic"),
        None => Samples::default(),
    };
    // Every task has recorded (it records before it gives its permit back).
    let recorder = std::mem::replace(
        &mut *recorder.lock().unwrap_or_else(PoisonError::into_inner),
        new_recorder(),
    );
    let failover = match (injector, &failover_plan, &sim_admin_url) {
        (Some(injector), Some(plan), Some(url)) => {
            let injection = injector.await.expect("the injector does not panic");
            let sim_orders = match (injection.started_unix_ms, injection.lifted_unix_ms) {
                (Some(started), Some(lifted)) => {
                    let spans = WallSpans {
                        from_unix_ms: window_start_unix_ms,
                        started_unix_ms: started,
                        lifted_unix_ms: lifted,
                        to_unix_ms: answers_done_unix_ms,
                    };
                    failover::count_orders(url, &plan.channel, spans).await
                }
                _ => Err("the outage did not happen as planned (see injection.errors)".into()),
            };
            Some(FailoverReport::new(
                plan,
                injection,
                &recorder.phases,
                sim_orders,
            ))
        }
        _ => None,
    };

    let settlement = if scenario.settles_later() && target.follows_settlement() {
        Some(
            settle::follow(
                &client,
                target,
                &recorder.tracked,
                recorder.untracked,
                (window_start_unix_ms, window_end_unix_ms),
                &settings.settle,
            )
            .await,
        )
    } else {
        None
    };

    let requests = RequestCounts::new(&recorder.measured, dispatched.measured_missed);
    let warmup = RequestCounts::new(&recorder.warmup, dispatched.warmup_missed);
    assert_eq!(
        requests.sent, dispatched.measured_sent,
        "every measured send was recorded"
    );
    assert_eq!(
        warmup.sent, dispatched.warmup_sent,
        "every warm-up send was recorded"
    );
    assert_eq!(requests.scheduled, schedule.measured_slots());

    let window_seconds = settings.duration.as_secs_f64();
    let settled_in_window = settlement
        .as_ref()
        .map(|s| (s.settled_per_second * window_seconds).round() as u64);
    let cpu = before.since(after, window_elapsed, requests.answered, settled_in_window);
    let units = Units {
        answered: requests.answered,
        settled: settled_in_window,
    };
    let mut resource_warnings = Vec::new();
    let gateway_metrics = probe
        .metrics
        .as_ref()
        .map(|uri| resources::gateway_metrics(uri, &samples, units, &mut resource_warnings));
    let redis_commandstats = redis.map(|(addr, before, after)| {
        resources::redis_commandstats(addr, before, after, units, &mut resource_warnings)
    });
    let rss = resources::rss_reports(&probe.processes, &samples.ticks);
    let per_second =
        resources::per_second(&probe.processes, &samples.ticks, recorder.seconds.len());

    let series = recorder
        .seconds
        .iter()
        .zip(per_second)
        .enumerate()
        .map(|(i, (second, resources))| {
            let answered_any = second.corrected.count() > 0;
            SecondPoint {
                second: i as u32,
                answered: second.answered,
                errors: second.errors,
                settled: settlement
                    .as_ref()
                    .map(|s| s.per_second.get(i).copied().unwrap_or(0.0)),
                p50_us: answered_any.then(|| second.corrected.quantile_us(0.50)),
                p99_us: answered_any.then(|| second.corrected.quantile_us(0.99)),
                rss_mib: resources.rss_mib,
                settlement_queue_depth: resources.settlement_queue_depth,
                webhook_backlog: resources.webhook_backlog,
            }
        })
        .collect();

    let operations = recorder
        .operations
        .iter()
        .map(|(op, record)| {
            (
                op.as_str().to_owned(),
                OperationReport {
                    sent: record.counts.sent,
                    answered: record.counts.answered,
                    errors: record.counts.errors,
                    timeouts: record.counts.timeouts,
                    corrected: record.corrected.percentiles(),
                },
            )
        })
        .collect();

    let generator_threads = tokio::runtime::Handle::current().metrics().num_workers();
    let latency = Latency {
        corrected: recorder.corrected.percentiles(),
        uncorrected: recorder.uncorrected.percentiles(),
        send_lag: recorder.send_lag.percentiles(),
    };
    let (generator_bottleneck, mut warnings) =
        judge_generator(&requests, &cpu, &latency, settings, generator_threads);
    warnings.extend(resource_warnings);

    let report = Report {
        run: RunEcho {
            scenario: scenario.as_str().to_owned(),
            target: target.name().to_owned(),
            checkout_method: (scenario.share(Operation::Checkout) > 0.0)
                .then(|| target.checkout_method().as_str().to_owned()),
            rate_per_second: schedule.rate_per_second(),
            warmup_seconds: settings.warmup.as_secs_f64(),
            duration_seconds: window_seconds,
            connections: settings.connections,
            max_send_lag_ms: settings.max_send_lag.as_millis() as u64,
            request_timeout_ms: settings.request_timeout.as_millis() as u64,
            accounts: target.accounts(),
            generator_threads,
            run_id: run_id.to_string(),
            window_start_unix_ms,
        },
        throughput: Throughput {
            answered_per_second: requests.answered as f64 / window_seconds,
            settled_per_second: settlement.as_ref().map(|s| s.settled_per_second),
        },
        requests,
        warmup,
        latency,
        operations,
        settlement,
        cpu,
        gateway_metrics,
        redis_commandstats,
        rss,
        series,
        failover,
        generator_bottleneck,
        warnings,
    };
    report.assert_consistent();
    Ok(report)
}

/// Whether the generator, rather than the target, limited the run, with the reasons.
fn judge_generator(
    requests: &RequestCounts,
    cpu: &[procstat::ProcessCpu],
    latency: &Latency,
    settings: &RunSettings,
    generator_threads: usize,
) -> (bool, Vec<String>) {
    let mut bottleneck = false;
    let mut warnings = Vec::new();
    if let Some(generator) = cpu.iter().find(|c| c.pid.is_none() && c.error.is_none()) {
        let limit = GENERATOR_BUSY_SHARE * generator_threads.max(1) as f64;
        if generator.cores >= limit {
            bottleneck = true;
            warnings.push(format!(
                "the generator used {:.2} cores with {generator_threads} worker thread(s): it may be the bottleneck (give it more threads, or a lower rate)",
                generator.cores
            ));
        }
    }
    if requests.missed.generator_late > 0 {
        bottleneck = true;
        warnings.push(format!(
            "{} requests were missed because the generator itself fell more than {} ms behind its schedule",
            requests.missed.generator_late,
            settings.max_send_lag.as_millis()
        ));
    }
    let targets: Vec<_> = cpu
        .iter()
        .filter(|c| c.pid.is_some() && c.error.is_none())
        .collect();
    if requests.missed.in_flight_full > 0
        && !targets.is_empty()
        && targets.iter().all(|c| c.cores < IDLE_CORES)
    {
        bottleneck = true;
        warnings.push(format!(
            "{} requests were missed with every measured process below {IDLE_CORES} cores: the generator or --connections ({}) is the limit, not the target",
            requests.missed.in_flight_full, settings.connections
        ));
    }
    if latency.send_lag.p99_us > settings.max_send_lag.as_micros() as u64 / 2 {
        warnings.push(format!(
            "p99 send lag {} ms: requests left late (waiting for a connection, or the generator was busy); corrected latency includes it",
            crate::histogram::ms(latency.send_lag.p99_us)
        ));
    }
    (bottleneck, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::Percentiles;
    use crate::procstat::ProcessCpu;
    use crate::schedule::Missed;

    fn cpu(name: &str, pid: Option<u32>, cores: f64) -> ProcessCpu {
        ProcessCpu {
            name: name.into(),
            pid,
            cpu_seconds: cores * 10.0,
            cores,
            us_per_request: None,
            us_per_settled: None,
            error: None,
            threads: Vec::new(),
        }
    }

    fn latency() -> Latency {
        Latency {
            corrected: Percentiles::default(),
            uncorrected: Percentiles::default(),
            send_lag: Percentiles::default(),
        }
    }

    #[test]
    fn the_generator_is_judged_by_its_cpu_and_its_misses() {
        let settings = RunSettings::default();
        let quiet = RequestCounts::default();
        let (busy, warnings) = judge_generator(
            &quiet,
            &[cpu("loadtest", None, 0.3)],
            &latency(),
            &settings,
            1,
        );
        assert!(!busy, "{warnings:?}");
        assert!(warnings.is_empty());

        let (busy, warnings) = judge_generator(
            &quiet,
            &[cpu("loadtest", None, 0.95)],
            &latency(),
            &settings,
            1,
        );
        assert!(busy);
        assert!(warnings[0].contains("0.95 cores"), "{warnings:?}");
        // With two worker threads, 0.95 cores is not the limit.
        assert!(
            !judge_generator(
                &quiet,
                &[cpu("loadtest", None, 0.95)],
                &latency(),
                &settings,
                2
            )
            .0
        );

        let late = RequestCounts {
            missed: Missed {
                in_flight_full: 0,
                generator_late: 3,
            },
            ..RequestCounts::default()
        };
        assert!(judge_generator(&late, &[], &latency(), &settings, 1).0);

        // Misses on a full in-flight bound: the target's fault when it is busy, not when idle.
        let full = RequestCounts {
            missed: Missed {
                in_flight_full: 5,
                generator_late: 0,
            },
            ..RequestCounts::default()
        };
        let busy_target = [cpu("loadtest", None, 0.2), cpu("gateway", Some(7), 1.7)];
        assert!(!judge_generator(&full, &busy_target, &latency(), &settings, 1).0);
        let idle_target = [cpu("loadtest", None, 0.2), cpu("gateway", Some(7), 0.1)];
        let (busy, warnings) = judge_generator(&full, &idle_target, &latency(), &settings, 1);
        assert!(busy);
        assert!(warnings[0].contains("--connections"), "{warnings:?}");
        // Unknown target CPU: no verdict from misses alone.
        assert!(
            !judge_generator(
                &full,
                &[cpu("loadtest", None, 0.2)],
                &latency(),
                &settings,
                1
            )
            .0
        );
    }

    #[test]
    fn settings_are_validated() {
        assert!(RunSettings::default().validate().is_ok());
        let with = |f: fn(&mut RunSettings)| {
            let mut s = RunSettings::default();
            f(&mut s);
            s.validate()
        };
        assert!(with(|s| s.rate_per_second = 0.0).is_err());
        assert!(with(|s| s.rate_per_second = f64::NAN).is_err());
        assert!(with(|s| s.connections = 0).is_err());
        assert!(with(|s| s.duration = Duration::ZERO).is_err());
        assert!(with(|s| s.rate_per_second = 1e9).is_err());
        let err = with(|s| s.connections = 0).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        // An outage belongs to the failover scenario, and must fit in its window.
        assert!(with(|s| s.failover = Some(FailoverPlan::thirds(s.duration))).is_err());
        assert!(with(|s| s.scenario = Scenario::Failover).is_ok());
        assert!(with(|s| {
            s.scenario = Scenario::Failover;
            s.failover = Some(FailoverPlan {
                outage_for: s.duration,
                ..FailoverPlan::thirds(s.duration)
            });
        })
        .is_err());
    }

    #[test]
    fn run_ids_are_unique_and_valid_order_ids() {
        let (a, b) = (new_run_id(), new_run_id());
        assert_ne!(a, b);
        assert!(a.len() + 1 + 20 <= 64, "{a}");
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
    }
}
