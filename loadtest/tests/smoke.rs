//! Smoke tests: a real sandbox gateway (SQLite store, in-process balance store, channel-sim
//! in-process with auto-pay) started in this process on 127.0.0.1:0 with a temp data dir, as
//! `gateway serve --sandbox` starts it — one per test, so that each test's channel-sim record
//! is its own; then the load generator, through its library:
//! - runs `authorize`, `checkout` and `mixed` at small rates for a few seconds each;
//! - runs the same-run baseline proxy against the sandbox's channel-sim, then one short
//!   `compare` round;
//! - runs `failover`: checkouts while `supplier-main` is taken down and brought back.
//!
//! Checked: no unexpected error, no timeout, no missed send; the counts add up; every checkout
//! payment the run created ended `succeeded` in the gateway and paid once, acknowledged, in
//! channel-sim's own record; the baseline's orders reached channel-sim; a failover run's
//! orders moved to `supplier-backup` while `supplier-main` was down; the gateway's counters
//! were scraped at the window's edges (a settlement committed in the window shows as group
//! commits; the in-process balance store makes no Redis round trips, so that counter is
//! absent and reported as such), and the measured process's RSS sampled once a second. No
//! assertion on a time:
//! the rates are far below what a debug build serves, and the missed-send bound is set to a
//! second so that a loaded CI machine's scheduling hiccups are not mistaken for misses.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use gateway::startup::{Application, Mode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use loadtest::procstat::ProcessSpec;
use loadtest::prom::Scrape;
use loadtest::resources::{BATCH_ROWS_COUNT, REDIS_ROUND_TRIPS, STORE_COMMITS};
use loadtest::settle::SettleSettings;
use loadtest::{
    compare, run, BaselineProxy, BaselineSettings, CheckoutMethod, CompareSettings, FailoverPlan,
    FindMaxSettings, Manifest, RunSettings, Scenario, Target,
};
use serde_json::Value;
use tokio::sync::oneshot;

/// The sandbox gateway, served until dropped.
struct SandboxGateway {
    manifest_path: PathBuf,
    sandbox: Option<gateway::sandbox::Sandbox>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _data: tempfile::TempDir,
}

impl SandboxGateway {
    /// What `gateway serve --sandbox --listen 127.0.0.1:0 --data-dir <temp>` does, with
    /// auto-pay after 20 ms. Only the variables given here are read: nothing from the test's
    /// own environment (a GATEWAY__REDIS__URL there must not change this test).
    async fn start() -> Self {
        if std::env::var_os("TEST_LOG").is_some() {
            gateway::telemetry::init_tracing(&Default::default());
        }
        let data = tempfile::tempdir().expect("temp data dir");
        let env = [
            ("GATEWAY__SERVER__LISTEN", "127.0.0.1:0".to_owned()),
            ("GATEWAY__DATA_DIR", data.path().display().to_string()),
            ("GATEWAY__SANDBOX__AUTO_PAY", "true".to_owned()),
            ("GATEWAY__SANDBOX__AUTO_PAY_DELAY_MS", "20".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v));
        let (mut config, overrides) =
            gateway::sandbox::load_config(None, env).expect("the sandbox configuration");
        let sandbox = gateway::sandbox::prepare(&mut config, &overrides)
            .await
            .expect("the sandbox channels");
        let app = Application::build(config, Mode::Sandbox)
            .await
            .expect("the gateway");
        let manifest_path = sandbox
            .write_manifest(app.local_addr())
            .expect("the manifest")
            .to_owned();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        Self {
            manifest_path,
            sandbox: Some(sandbox),
            stop: Some(stop),
            server: Some(server),
            _data: data,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("the server task").expect("the server");
        }
        if let Some(sandbox) = self.sandbox.take() {
            sandbox.shutdown().await;
        }
    }
}

impl Drop for SandboxGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn settings(scenario: Scenario, rate: f64, duration_s: u64) -> RunSettings {
    RunSettings {
        scenario,
        rate_per_second: rate,
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs(duration_s),
        connections: 16,
        // Generous: a miss here would be a stall of a full second, not CI jitter.
        max_send_lag: Duration::from_secs(1),
        request_timeout: Duration::from_secs(10),
        processes: Vec::new(),
        redis_addr: None,
        settle: SettleSettings {
            wait: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            // Follow and verify every payment, not a sample.
            sample_max: usize::MAX,
            verify_max: usize::MAX,
            concurrency: 8,
        },
        failover: None,
    }
}

fn assert_clean(report: &loadtest::Report) {
    let summary = report.summary();
    let q = &report.requests;
    assert!(q.adds_up(), "{summary}");
    assert_eq!(q.sent, q.answered + q.errors + q.timeouts, "{summary}");
    assert_eq!(q.errors, 0, "{summary}");
    assert!(q.errors_by_code.is_empty(), "{summary}");
    assert_eq!(q.timeouts, 0, "{summary}");
    assert_eq!(q.missed.total(), 0, "{summary}");
    assert_eq!(q.answered, q.scheduled, "{summary}");
    assert_eq!(
        report.warmup.errors + report.warmup.timeouts,
        0,
        "{summary}"
    );
    assert_eq!(report.warmup.missed.total(), 0, "{summary}");
    assert_eq!(report.latency.corrected.count, q.answered, "{summary}");
    // The generator measured itself.
    assert!(
        report
            .cpu
            .iter()
            .any(|c| c.pid.is_none() && c.error.is_none()),
        "{summary}"
    );
    // The JSON report and the plot are made.
    let json = serde_json::to_value(report).unwrap();
    assert_eq!(json["requests"]["sent"], q.sent);
    let svg = loadtest::plot::render_svg(report).expect("the plot");
    assert!(
        svg.starts_with("<svg") && svg.contains("p99"),
        "{}",
        &svg[..200.min(svg.len())]
    );
}

async fn get_text(url: &str) -> String {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client.get(url.parse().unwrap()).await.expect("GET");
    assert_eq!(response.status(), 200, "{url}");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The resource figures of a gateway run: scraped at both edges, and bounded by what the
/// test itself scraped before and after the whole run (`outer`).
fn assert_gateway_resources(report: &loadtest::Report, outer: (&Scrape, &Scrape)) {
    let summary = report.summary();
    let metrics = report
        .gateway_metrics
        .as_ref()
        .expect("the gateway's metrics are read when it is the target");
    assert_eq!(metrics.error, None, "{summary}");
    assert!(metrics.url.ends_with("/metrics"), "{summary}");
    assert_eq!(metrics.malformed_lines, 0, "{summary}");
    // The in-process balance store makes no Redis round trips: only the Redis store
    // (gateway/src/preauth/redis.rs) increments gateway_redis_round_trips_total, and no
    // such store exists in this process. Absent is reported as null, not as 0.
    assert!(outer.1.total(REDIS_ROUND_TRIPS).is_none(), "{summary}");
    assert_eq!(metrics.redis_round_trips, None, "{summary}");
    assert!(
        summary.contains("redis round trips  none counted"),
        "{summary}"
    );
    // Group commits happened between the two scrapes (authorize: every request answered in
    // the window waited for its settlement's commit; checkout: settlements were acknowledged
    // in the window), and no more than the test saw around the whole run.
    let batches = metrics
        .settlement_batches
        .as_ref()
        .expect("group commits in the window");
    assert!(batches.commits >= 1, "{summary}");
    assert!(batches.rows >= batches.commits, "{summary}");
    assert!(batches.rows_per_commit.unwrap() >= 1.0, "{summary}");
    let outer_commits =
        outer.1.total(BATCH_ROWS_COUNT).unwrap() - outer.0.total(BATCH_ROWS_COUNT).unwrap_or(0.0);
    assert!(batches.commits as f64 <= outer_commits, "{summary}");
    // gateway_store_commits_total, when this gateway exports it: positive, per unit too.
    if let Some(commits) = &metrics.store_commits {
        assert!(commits.total >= 1, "{summary}");
        assert!(commits.per_request.unwrap() > 0.0, "{summary}");
        assert_eq!(
            commits.total,
            commits.by_op.values().sum::<u64>(),
            "{summary}"
        );
        let outer_total =
            outer.1.total(STORE_COMMITS).unwrap() - outer.0.total(STORE_COMMITS).unwrap_or(0.0);
        assert!(commits.total as f64 <= outer_total, "{summary}");
    }
    assert!(summary.contains("store commits"), "{summary}");
    // The queue depth gauge is set by every settlement submitted (warm-up included): in
    // every scrape that succeeded.
    let depth = metrics
        .settlement_queue_depth
        .as_ref()
        .expect("the queue depth was sampled");
    assert_eq!(
        depth.samples,
        metrics.scrapes - metrics.failed_scrapes,
        "{summary}"
    );
    assert!(depth.min >= 0.0 && depth.min <= depth.max, "{summary}");
    if metrics.failed_scrapes == 0 {
        assert!(
            report.series[0].settlement_queue_depth.is_some(),
            "{summary}"
        );
    }
    // This test process was given as a --pid: its RSS, sampled at the window's start (and
    // every second), is in the report and the series.
    assert_eq!(report.rss.len(), 1, "{summary}");
    let rss = &report.rss[0];
    assert_eq!(rss.name, "self");
    assert!(rss.samples >= 2, "{summary}");
    assert_eq!(rss.error, None, "{summary}");
    assert!(rss.first_mib.unwrap() > 0.0, "{summary}");
    assert!(rss.min_mib.unwrap() <= rss.max_mib.unwrap(), "{summary}");
    assert!(rss.growth.is_some() && rss.flat.is_some(), "{summary}");
    assert!(report.series[0].rss_mib["self"] > 0.0, "{summary}");
    assert!(summary.contains("rss self"), "{summary}");
    // No Redis was given: no INFO.
    assert!(report.redis_commandstats.is_none(), "{summary}");
    let json = serde_json::to_value(report).unwrap();
    assert!(json["gateway_metrics"]["settlement_batches"]["commits"].is_u64());
    assert!(json["gateway_metrics"]["redis_round_trips"].is_null());
    assert!(json["series"][0]["rss_mib"]["self"].is_number());
}

async fn get_json(url: &str) -> Value {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client.get(url.parse().unwrap()).await.expect("GET");
    assert_eq!(response.status(), 200, "{url}");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_checkout_and_mixed_against_a_real_sandbox() {
    let gateway = SandboxGateway::start().await;
    let manifest = Manifest::load(&gateway.manifest_path).expect("the manifest");
    let target =
        Target::gateway(&manifest, None, 16, CheckoutMethod::Supplier).expect("the target");
    let metrics_url = format!("{}/metrics", manifest.gateway_url.trim_end_matches('/'));
    // This test process stands for a measured --pid (its RSS is sampled).
    let me = ProcessSpec::parse(&format!("self={}", std::process::id())).unwrap();

    // authorize: 50/s for 3 s after 1 s of warm-up.
    let mut authorize = settings(Scenario::Authorize, 50.0, 3);
    authorize.processes = vec![me.clone()];
    let outer_before = Scrape::parse(&get_text(&metrics_url).await);
    let report = run(&target, &authorize).await.expect("the authorize run");
    let outer_after = Scrape::parse(&get_text(&metrics_url).await);
    assert_clean(&report);
    assert_eq!(report.requests.scheduled, 150);
    assert_eq!(report.warmup.sent, 50);
    assert!(report.settlement.is_none());
    assert_gateway_resources(&report, (&outer_before, &outer_after));

    // checkout: supplier charges, paid by channel-sim 20 ms after creation.
    let mut checkout = settings(Scenario::Checkout, 50.0, 3);
    checkout.processes = vec![me];
    let outer_before = Scrape::parse(&get_text(&metrics_url).await);
    let report = run(&target, &checkout).await.expect("the checkout run");
    let outer_after = Scrape::parse(&get_text(&metrics_url).await);
    assert_clean(&report);
    assert_gateway_resources(&report, (&outer_before, &outer_after));
    let summary = report.summary();
    // Checkout figures are also per settled payment, the unit of its CPU figures.
    if let Some(commits) = &report.gateway_metrics.as_ref().unwrap().store_commits {
        assert!(commits.per_settled.is_some(), "{summary}");
    }
    let settlement = report
        .settlement
        .as_ref()
        .expect("checkout follows settlement");
    let created = report.requests.answered + report.warmup.answered;
    assert_eq!(settlement.tracked, created, "{summary}");
    assert_eq!(settlement.checked, created, "{summary}");
    assert_eq!(settlement.settled, created, "{summary}");
    assert_eq!(
        settlement.unsettled + settlement.closed + settlement.missing + settlement.paid_twice,
        0,
        "{summary}"
    );
    assert_eq!(settlement.verified, created, "{summary}");
    assert_eq!(settlement.verify_failures, 0, "{summary}");
    assert!(settlement.settled_in_window > 0, "{summary}");
    assert_eq!(settlement.callback_to_ack.count, created, "{summary}");

    // channel-sim's own record, read independently: the sandbox is fresh and only the checkout
    // run made supplier orders, so its orders are exactly the run's, each paid once, for
    // 1.00, with its callback acknowledged (the settlement committed).
    let mut orders = Vec::new();
    for channel in ["supplier-main", "supplier-backup"] {
        let listed = get_json(&format!(
            "{}/channels/{channel}/orders",
            manifest.sim_admin_url
        ))
        .await;
        orders.extend(listed.as_array().expect("a list").iter().cloned());
    }
    assert_eq!(orders.len() as u64, created, "{summary}");
    let mut ids = BTreeSet::new();
    for order in &orders {
        assert_eq!(order["status"], "paid", "{order}");
        assert_eq!(order["pay_count"], 1, "{order}");
        assert_eq!(order["amount_cents"], 100, "{order}");
        let acknowledged = order["callbacks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["acknowledged"] == true);
        assert!(acknowledged, "{order}");
        ids.insert(order["channel_order_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len() as u64, created);

    // mixed: balance payments, supplier charges and Alipay top-ups together.
    let report = run(&target, &settings(Scenario::Mixed, 40.0, 2))
        .await
        .expect("the mixed run");
    assert_clean(&report);
    let summary = report.summary();
    let settlement = report
        .settlement
        .as_ref()
        .expect("mixed follows settlement");
    assert_eq!(settlement.settled, settlement.tracked, "{summary}");
    assert_eq!(settlement.verify_failures, 0, "{summary}");
    let by_op: u64 = report.operations.values().map(|o| o.sent).sum();
    assert_eq!(by_op, report.requests.sent);
    assert!(report.operations.contains_key("authorize"), "{summary}");

    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alipay_and_wechatpay_checkouts_settle_through_their_own_channels() {
    let gateway = SandboxGateway::start().await;
    let manifest = Manifest::load(&gateway.manifest_path).expect("the manifest");
    for method in [CheckoutMethod::Alipay, CheckoutMethod::Wechatpay] {
        let target = Target::gateway(&manifest, None, 4, method).expect("the target");
        let report = run(&target, &settings(Scenario::Checkout, 20.0, 2))
            .await
            .expect("the checkout run");
        assert_clean(&report);
        let summary = report.summary();
        assert_eq!(
            report.run.checkout_method.as_deref(),
            Some(method.as_str()),
            "{summary}"
        );
        assert!(
            summary.contains(&format!("checkout through {method}")),
            "{summary}"
        );
        let settlement = report
            .settlement
            .as_ref()
            .expect("checkout follows settlement");
        let created = report.requests.answered + report.warmup.answered;
        assert_eq!(created, 60, "{summary}");
        assert_eq!(settlement.tracked, created, "{summary}");
        assert_eq!(settlement.settled, created, "{summary}");
        assert_eq!(settlement.verified, created, "{summary}");
        assert_eq!(settlement.verify_failures, 0, "{summary}");
        assert_eq!(
            settlement.unsettled + settlement.closed + settlement.missing + settlement.paid_twice,
            0,
            "{summary}"
        );

        // channel-sim's record: every order of the run went to a channel of this kind (and
        // none to another kind), each paid once for 1.00 with its callback acknowledged.
        let mut orders = Vec::new();
        for (id, channel) in &manifest.channels {
            let listed =
                get_json(&format!("{}/channels/{id}/orders", manifest.sim_admin_url)).await;
            let listed = listed.as_array().expect("a list").clone();
            if channel.kind == method.as_str() {
                orders.extend(listed);
            } else if channel.kind != "alipay" || method != CheckoutMethod::Wechatpay {
                // The Alipay run comes first: only its own kind has orders by then.
                assert!(
                    listed.is_empty(),
                    "{id} ({}) has orders: {listed:?}",
                    channel.kind
                );
            }
        }
        assert_eq!(orders.len() as u64, created, "{summary}");
        for order in &orders {
            assert_eq!(order["status"], "paid", "{order}");
            assert_eq!(order["pay_count"], 1, "{order}");
            assert_eq!(order["amount_cents"], 100, "{order}");
            assert!(
                order["callbacks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["acknowledged"] == true),
                "{order}"
            );
        }
    }
    gateway.stop().await;
}

/// The baseline proxy of `manifest`, in this process, on a free loopback port.
async fn start_baseline(manifest: &Manifest) -> (BaselineProxy, Target) {
    let settings = BaselineSettings::from_manifest(
        manifest,
        loadtest::baseline::DEFAULT_CHANNEL,
        "127.0.0.1:0".parse().unwrap(),
    )
    .expect("the baseline settings");
    let proxy = BaselineProxy::start(settings).await.expect("the proxy");
    let target = Target::baseline(manifest, &proxy.url()).expect("the baseline target");
    (proxy, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_baseline_proxy_and_a_compare_round_against_the_sandbox_channel_sim() {
    let gateway = SandboxGateway::start().await;
    let manifest = Manifest::load(&gateway.manifest_path).expect("the manifest");
    let (proxy, baseline) = start_baseline(&manifest).await;

    // checkout against the baseline: one proxied, signed supplier create per request.
    let report = run(&baseline, &settings(Scenario::Checkout, 50.0, 2))
        .await
        .expect("the baseline run");
    assert_clean(&report);
    let summary = report.summary();
    assert_eq!(report.run.target, "baseline", "{summary}");
    assert_eq!(report.requests.scheduled, 100, "{summary}");
    assert!(report.settlement.is_none(), "{summary}");
    // channel-sim holds each order as the generator wrote it (so the signature verified):
    // the first of the warm-up and the last of the window, on the primary channel.
    let slots = report.warmup.sent + report.requests.sent;
    for seq in [0, slots - 1] {
        let id = loadtest::target::baseline_order_id(&report.run.run_id, seq);
        let order = get_json(&format!("{}/orders/{id}", manifest.sim_admin_url)).await;
        assert_eq!(order["channel_id"], "supplier-main", "{order}");
        assert_eq!(order["amount_cents"], 100, "{order}");
        assert_eq!(order["currency"], "CNY", "{order}");
        assert_eq!(
            order["notify_url"],
            format!("{}/callback", proxy.url()),
            "{order}"
        );
    }
    // The baseline is not a payment API: nothing else runs through it.
    assert!(run(&baseline, &settings(Scenario::Authorize, 10.0, 1))
        .await
        .is_err());

    // One short compare round at tiny rates: two steps of 1 s per side, an SLO no debug
    // build misses at these rates.
    let gateway_target =
        Target::gateway(&manifest, None, 16, CheckoutMethod::Supplier).expect("the gateway target");
    let mut step = settings(Scenario::Checkout, 20.0, 1);
    step.warmup = Duration::from_millis(500);
    let settings = CompareSettings {
        search: FindMaxSettings {
            run: step,
            slo_p99: Duration::from_secs(5),
            start_rate: 20.0,
            step_factor: 1.5,
            max_rate: 30.0,
            max_steps: 2,
            pause: Duration::from_millis(100),
        },
        baseline_start_rate: 20.0,
        rounds: 1,
        resume_share: 0.5,
    };
    let report = compare(&gateway_target, &baseline, &settings)
        .await
        .expect("the comparison");
    let summary = report.summary();
    assert_eq!(report.rounds.len(), 1, "{summary}");
    let round = &report.rounds[0];
    assert_eq!(round.gateway.target, "gateway", "{summary}");
    assert_eq!(round.baseline.target, "baseline", "{summary}");
    assert_eq!(round.gateway.measure, "settled_per_second", "{summary}");
    assert!(round.gateway.max_rate_per_second.is_some(), "{summary}");
    assert!(round.baseline.max_rate_per_second.is_some(), "{summary}");
    // A search that never missed stopped at --max-rate: its maximum is only a bound.
    for side in [&round.gateway, &round.baseline] {
        assert_eq!(
            side.capped,
            side.max_rate_per_second == Some(30.0),
            "{summary}"
        );
    }
    assert_eq!(
        round.ratio_is_bound,
        round.gateway.capped || round.baseline.capped,
        "{summary}"
    );
    let ratio = round.ratio.expect("a ratio");
    assert!(ratio.is_finite() && ratio > 0.0, "{summary}");
    assert_eq!(report.median_ratio, Some(ratio), "{summary}");
    assert_eq!(report.ratios, vec![ratio], "{summary}");
    // The JSON report carries the rounds and the ratios.
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["rounds"][0]["ratio"], ratio);
    assert!(json["median_ratio"].is_number());
    assert!(json["rounds"][0]["baseline"]["search"]["steps"].is_array());
    // The gateway's resource figures are the gateway side's; the baseline has none.
    let best = round.gateway.search.best.as_ref().expect("a best step");
    assert!(best.gateway_metrics.is_some(), "{summary}");
    assert_eq!(round.gateway.redis_round_trips_per_unit, None, "{summary}");
    assert!(json["rounds"][0]["gateway"]
        .as_object()
        .unwrap()
        .contains_key("store_commits_per_unit"));
    let baseline_best = round.baseline.search.best.as_ref().expect("a best step");
    assert!(baseline_best.gateway_metrics.is_none(), "{summary}");
    assert_eq!(round.baseline.store_commits_per_unit, None, "{summary}");
    assert_eq!(round.baseline.settlement_rows_per_commit, None, "{summary}");

    proxy.shutdown().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_moves_checkouts_to_the_backup_channel_and_back() {
    let gateway = SandboxGateway::start().await;
    let manifest = Manifest::load(&gateway.manifest_path).expect("the manifest");
    let target =
        Target::gateway(&manifest, None, 16, CheckoutMethod::Supplier).expect("the target");

    // 20 checkouts/s; supplier-main down from 2 s to 4 s of a 6 s window.
    let mut settings = settings(Scenario::Failover, 20.0, 6);
    settings.failover = Some(FailoverPlan {
        channel: "supplier-main".into(),
        outage_after: Duration::from_secs(2),
        outage_for: Duration::from_secs(2),
    });
    let report = run(&target, &settings).await.expect("the failover run");
    let summary = report.summary();
    let q = &report.requests;
    assert!(q.adds_up(), "{summary}");
    assert_eq!(q.timeouts, 0, "{summary}");
    assert_eq!(q.missed.total(), 0, "{summary}");
    // Every payment was created (201) or refused with a documented error.
    let documented: u64 = q
        .errors_by_code
        .iter()
        .filter(|(code, _)| loadtest::failover::DOCUMENTED_ERRORS.contains(&code.as_str()))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(q.answered + documented, q.sent, "{summary}");
    let failover = report.failover.as_ref().expect("a failover report");
    assert_eq!(failover.undocumented_errors, 0, "{summary}");
    assert!(failover.injection.errors.is_empty(), "{summary}");
    assert!(failover.injection.started_unix_ms.is_some(), "{summary}");
    assert!(failover.injection.lifted_unix_ms.is_some(), "{summary}");
    // channel-sim's own record: while the primary was down, orders went to the backup.
    assert!(failover.sim_orders_error.is_none(), "{summary}");
    assert!(
        failover.sim_orders["supplier-backup"].during > 0,
        "{summary}"
    );
    assert!(failover.traffic_moved, "{summary}");
    // The gateway's answers say the same.
    assert!(
        failover.phases.during.accepted_by_channel["supplier-backup"] > 0,
        "{summary}"
    );
    let phases = &failover.phases;
    assert_eq!(
        phases.before.sent + phases.during.sent + phases.after.sent,
        q.sent,
        "{summary}"
    );
    // Before the outage the primary took the traffic.
    assert!(
        phases.before.accepted_by_channel["supplier-main"] > 0,
        "{summary}"
    );
    // The channel is back up: its faults are as before.
    let faults = get_json(&format!(
        "{}/channels/supplier-main/faults",
        manifest.sim_admin_url
    ))
    .await;
    assert_eq!(faults["outage"], false, "{faults}");
    // Settlement was followed and nothing was paid twice.
    let settlement = report
        .settlement
        .as_ref()
        .expect("failover follows settlement");
    assert_eq!(settlement.paid_twice, 0, "{summary}");
    assert_eq!(settlement.verify_failures, 0, "{summary}");
    assert!(settlement.settled > 0, "{summary}");

    gateway.stop().await;
}
