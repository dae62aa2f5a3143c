//! The `failover` scenario: checkout traffic while the primary supplier channel goes down
//! and comes back, injected through channel-sim's admin API.
//!
//! At `outage_after` into the measured window the injector reads the channel's faults
//! (`GET {sim_admin_url}/channels/{id}/faults`) and puts them back with `"outage": true`
//! (`PUT`, the whole fault set: the admin API replaces it): channel-sim closes the channel's
//! listener and drops its connections, so the gateway's calls are refused — certainly not
//! executed — and it fails over to the next channel by priority (`supplier-backup` in the
//! sandbox) until its breaker opens and routes there directly. `outage_for` later the
//! original faults are put back (retried: a channel left down would spoil the next run).
//!
//! The report splits the measured window in three phases by each request's *intended* send
//! time against the planned instants: before, during and after the outage. For each: counts,
//! errors by code, corrected latency, and which channel the gateway's `201`s name as the last
//! attempt's. Independently, channel-sim's own record says where the orders went: every
//! channel of the same kind is listed (`GET /channels/{id}/orders`) and its orders counted by
//! creation time against the instants the outage really started and ended.
//!
//! What the gateway may answer during the switch (DESIGN-NOTES "Channel payments: failover and
//! resolution"): `201` (`pending`, on the backup, or on the primary when a call was cut
//! mid-flight and its outcome is unknown), or `503 no_channel_available` when no channel could
//! take the payment. Anything else is a finding.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::HttpClient;
use crate::histogram::Percentiles;
use crate::recorder::PhaseRecord;
use crate::Error;

/// The channel taken down unless told otherwise: the sandbox's primary supplier.
pub const DEFAULT_CHANNEL: &str = "supplier-main";
/// The answers a failover run may give besides `201`, as `"<status> <code>"`.
pub const DOCUMENTED_ERRORS: [&str; 1] = ["503 no_channel_available"];
/// Attempts at putting the faults back, and the pause between them.
const LIFT_ATTEMPTS: u32 = 10;
const LIFT_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// The largest order listing read from channel-sim (about 600 bytes an order).
pub const MAX_LISTING_BYTES: usize = 256 * 1024 * 1024;
/// The longest time an admin call may take (a listing of many orders included).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// When the outage happens, relative to the measured window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverPlan {
    /// The channel taken down (a channel id of channel-sim).
    pub channel: String,
    /// From the start of the measured window to the outage.
    pub outage_after: Duration,
    /// How long the channel stays down.
    pub outage_for: Duration,
}

impl FailoverPlan {
    /// The middle third of a window of `measured`: before, during and after equally long.
    pub fn thirds(measured: Duration) -> Self {
        Self {
            channel: DEFAULT_CHANNEL.to_owned(),
            outage_after: measured / 3,
            outage_for: measured / 3,
        }
    }

    /// The outage must start after the window does and end before it ends, so that each
    /// phase has requests.
    pub fn validate(&self, measured: Duration) -> Result<(), Error> {
        if self.channel.is_empty()
            || !self
                .channel
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::Settings(format!(
                "--outage-channel {:?} is not a channel id",
                self.channel
            )));
        }
        if self.outage_after.is_zero()
            || self.outage_for.is_zero()
            || self.outage_after + self.outage_for >= measured
        {
            return Err(Error::Settings(format!(
                "the outage ({} s after the window's start, for {} s) must start and end inside the {} s window",
                self.outage_after.as_secs_f64(),
                self.outage_for.as_secs_f64(),
                measured.as_secs_f64()
            )));
        }
        Ok(())
    }
}

/// Where a request's intended time falls against the outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutagePhase {
    Before,
    During,
    After,
}

impl OutagePhase {
    pub const ALL: [OutagePhase; 3] =
        [OutagePhase::Before, OutagePhase::During, OutagePhase::After];

    pub fn index(self) -> usize {
        match self {
            OutagePhase::Before => 0,
            OutagePhase::During => 1,
            OutagePhase::After => 2,
        }
    }
}

/// The planned outage on the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseBounds {
    pub outage_from: Instant,
    pub outage_to: Instant,
}

impl PhaseBounds {
    pub fn phase_of(&self, intended: Instant) -> OutagePhase {
        if intended < self.outage_from {
            OutagePhase::Before
        } else if intended < self.outage_to {
            OutagePhase::During
        } else {
            OutagePhase::After
        }
    }
}

/// What the injector did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Injection {
    /// Wall clock when channel-sim confirmed the outage (`null`: it never started).
    pub started_unix_ms: Option<u64>,
    /// Wall clock when channel-sim confirmed the channel back (`null`: it was not lifted —
    /// lift it by hand: `PUT {sim_admin_url}/channels/{id}/faults` with `{}`).
    pub lifted_unix_ms: Option<u64>,
    pub errors: Vec<String>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn admin_request(method: Method, url: String, body: Option<String>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("a request of valid parts")
}

/// `method url` with `body`, insisting on `200`; the answer's body.
async fn admin_call(
    client: &HttpClient,
    method: Method,
    url: String,
    body: Option<String>,
    max_answer_bytes: usize,
) -> Result<Bytes, String> {
    let what = format!("{method} {url}");
    match client
        .send_limited(admin_request(method, url, body), max_answer_bytes)
        .await
    {
        Ok(answer) if answer.status == StatusCode::OK => Ok(answer.body),
        Ok(answer) => Err(format!(
            "{what} answered {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        )),
        Err(e) => Err(format!("{what}: {e:?}")),
    }
}

/// Takes `channel` down at `from` and brings it back at `to`, through channel-sim's admin
/// API at `sim_admin_url`. Never panics; what went wrong is in [`Injection::errors`].
pub async fn inject(
    sim_admin_url: String,
    channel: String,
    from: Instant,
    to: Instant,
) -> Injection {
    let client = HttpClient::new(2, ADMIN_TIMEOUT);
    let mut injection = Injection::default();
    let url = format!("{sim_admin_url}/channels/{channel}/faults");
    // The faults as they are, to put back unchanged but for the outage.
    let original = match admin_call(&client, Method::GET, url.clone(), None, 64 * 1024).await {
        Ok(body) => match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Object(faults)) => faults,
            _ => {
                injection.errors.push(format!("GET {url}: not a fault set"));
                return injection;
            }
        },
        Err(e) => {
            injection.errors.push(e);
            return injection;
        }
    };
    let with_outage = |outage: bool| {
        let mut faults = original.clone();
        faults.insert("outage".into(), serde_json::Value::Bool(outage));
        serde_json::Value::Object(faults).to_string()
    };
    tokio::time::sleep_until(from).await;
    match admin_call(
        &client,
        Method::PUT,
        url.clone(),
        Some(with_outage(true)),
        64 * 1024,
    )
    .await
    {
        Ok(_) => injection.started_unix_ms = Some(unix_ms()),
        Err(e) => {
            injection.errors.push(e);
            return injection;
        }
    }
    tokio::time::sleep_until(to).await;
    for attempt in 0..LIFT_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(LIFT_RETRY_PAUSE).await;
        }
        match admin_call(
            &client,
            Method::PUT,
            url.clone(),
            Some(with_outage(false)),
            64 * 1024,
        )
        .await
        {
            Ok(_) => {
                injection.lifted_unix_ms = Some(unix_ms());
                break;
            }
            Err(e) => injection.errors.push(e),
        }
    }
    injection
}

/// Orders one channel received, by when.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PhaseCounts {
    pub before: u64,
    pub during: u64,
    pub after: u64,
}

impl PhaseCounts {
    pub fn get_mut(&mut self, phase: OutagePhase) -> &mut u64 {
        match phase {
            OutagePhase::Before => &mut self.before,
            OutagePhase::During => &mut self.during,
            OutagePhase::After => &mut self.after,
        }
    }
}

/// Wall-clock spans of the phases, for channel-sim's timestamps: `[from, started)`,
/// `[started, lifted)`, `[lifted, to]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WallSpans {
    pub from_unix_ms: u64,
    pub started_unix_ms: u64,
    pub lifted_unix_ms: u64,
    pub to_unix_ms: u64,
}

impl WallSpans {
    pub fn phase_of(&self, at_unix_ms: u64) -> Option<OutagePhase> {
        if at_unix_ms < self.from_unix_ms || at_unix_ms > self.to_unix_ms {
            None
        } else if at_unix_ms < self.started_unix_ms {
            Some(OutagePhase::Before)
        } else if at_unix_ms < self.lifted_unix_ms {
            Some(OutagePhase::During)
        } else {
            Some(OutagePhase::After)
        }
    }
}

/// Counts the orders of every channel of `channel`'s kind in channel-sim's record, by phase.
pub async fn count_orders(
    sim_admin_url: &str,
    channel: &str,
    spans: WallSpans,
) -> Result<BTreeMap<String, PhaseCounts>, String> {
    #[derive(Deserialize)]
    struct SimChannel {
        id: String,
        kind: serde_json::Value,
    }
    #[derive(Deserialize)]
    struct SimOrder {
        created_at_unix_ms: u64,
    }
    let client = HttpClient::new(2, ADMIN_TIMEOUT);
    let listed = admin_call(
        &client,
        Method::GET,
        format!("{sim_admin_url}/channels"),
        None,
        1024 * 1024,
    )
    .await?;
    let channels: Vec<SimChannel> = serde_json::from_slice(&listed)
        .map_err(|e| format!("GET {sim_admin_url}/channels: {e}"))?;
    let kind = &channels
        .iter()
        .find(|c| c.id == channel)
        .ok_or_else(|| format!("channel-sim has no channel {channel:?}"))?
        .kind;
    let mut counts = BTreeMap::new();
    for sim_channel in channels.iter().filter(|c| &c.kind == kind) {
        let url = format!("{sim_admin_url}/channels/{}/orders", sim_channel.id);
        let body = admin_call(&client, Method::GET, url.clone(), None, MAX_LISTING_BYTES).await?;
        let orders: Vec<SimOrder> =
            serde_json::from_slice(&body).map_err(|e| format!("GET {url}: {e}"))?;
        let mut by_phase = PhaseCounts::default();
        for order in orders {
            if let Some(phase) = spans.phase_of(order.created_at_unix_ms) {
                *by_phase.get_mut(phase) += 1;
            }
        }
        counts.insert(sim_channel.id.clone(), by_phase);
    }
    Ok(counts)
}

/// One phase of the measured window, as the generator saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseReport {
    pub sent: u64,
    pub answered: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub errors_by_code: BTreeMap<String, u64>,
    pub corrected: Percentiles,
    /// `201`s by the channel of the payment's last attempt, as the gateway answered.
    pub accepted_by_channel: BTreeMap<String, u64>,
}

impl From<&PhaseRecord> for PhaseReport {
    fn from(record: &PhaseRecord) -> Self {
        Self {
            sent: record.counts.sent,
            answered: record.counts.answered,
            errors: record.counts.errors,
            timeouts: record.counts.timeouts,
            errors_by_code: record.counts.errors_by_key.clone(),
            corrected: record.corrected.percentiles(),
            accepted_by_channel: record.accepted_by_channel.clone(),
        }
    }
}

/// The three phases.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    pub before: PhaseReport,
    pub during: PhaseReport,
    pub after: PhaseReport,
}

/// The failover part of a run's report.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub channel: String,
    pub outage_after_seconds: f64,
    pub outage_for_seconds: f64,
    pub injection: Injection,
    /// By the requests' intended send times against the planned outage.
    pub phases: Phases,
    /// channel-sim's orders per channel of the same kind, by creation time against the
    /// outage as it really happened (measured window up to the last answer).
    pub sim_orders: BTreeMap<String, PhaseCounts>,
    pub sim_orders_error: Option<String>,
    /// Orders reached another channel while `channel` was down.
    pub traffic_moved: bool,
    /// Errors outside `201` and [`DOCUMENTED_ERRORS`] (timeouts and transport errors
    /// included): must be 0.
    pub undocumented_errors: u64,
}

impl FailoverReport {
    pub fn new(
        plan: &FailoverPlan,
        injection: Injection,
        records: &[PhaseRecord; 3],
        sim_orders: Result<BTreeMap<String, PhaseCounts>, String>,
    ) -> Self {
        let phases = Phases {
            before: PhaseReport::from(&records[OutagePhase::Before.index()]),
            during: PhaseReport::from(&records[OutagePhase::During.index()]),
            after: PhaseReport::from(&records[OutagePhase::After.index()]),
        };
        let undocumented_errors = records
            .iter()
            .map(|r| {
                r.counts.timeouts
                    + r.counts
                        .errors_by_key
                        .iter()
                        .filter(|(key, _)| !DOCUMENTED_ERRORS.contains(&key.as_str()))
                        .map(|(_, n)| n)
                        .sum::<u64>()
            })
            .sum();
        let (sim_orders, sim_orders_error) = match sim_orders {
            Ok(orders) => (orders, None),
            Err(e) => (BTreeMap::new(), Some(e)),
        };
        let traffic_moved = sim_orders
            .iter()
            .filter(|(id, _)| **id != plan.channel)
            .any(|(_, counts)| counts.during > 0);
        Self {
            channel: plan.channel.clone(),
            outage_after_seconds: plan.outage_after.as_secs_f64(),
            outage_for_seconds: plan.outage_for.as_secs_f64(),
            injection,
            phases,
            sim_orders,
            sim_orders_error,
            traffic_moved,
            undocumented_errors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::Counts;

    #[test]
    fn plans_must_fit_in_the_window() {
        let window = Duration::from_secs(9);
        let plan = FailoverPlan::thirds(window);
        assert_eq!(plan.outage_after, Duration::from_secs(3));
        assert_eq!(plan.outage_for, Duration::from_secs(3));
        assert_eq!(plan.channel, "supplier-main");
        assert!(plan.validate(window).is_ok());
        let with = |f: fn(&mut FailoverPlan)| {
            let mut p = FailoverPlan::thirds(window);
            f(&mut p);
            p.validate(window)
        };
        assert!(with(|p| p.outage_after = Duration::ZERO).is_err());
        assert!(with(|p| p.outage_for = Duration::ZERO).is_err());
        assert!(with(|p| p.outage_for = Duration::from_secs(6)).is_err());
        assert!(with(|p| p.channel = "../x".into()).is_err());
        assert_eq!(
            with(|p| p.channel = String::new()).unwrap_err().exit_code(),
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn phases_split_at_the_planned_instants() {
        let now = Instant::now();
        let bounds = PhaseBounds {
            outage_from: now + Duration::from_secs(1),
            outage_to: now + Duration::from_secs(2),
        };
        assert_eq!(bounds.phase_of(now), OutagePhase::Before);
        assert_eq!(
            bounds.phase_of(now + Duration::from_secs(1)),
            OutagePhase::During
        );
        assert_eq!(
            bounds.phase_of(now + Duration::from_millis(1_999)),
            OutagePhase::During
        );
        assert_eq!(
            bounds.phase_of(now + Duration::from_secs(2)),
            OutagePhase::After
        );
        let spans = WallSpans {
            from_unix_ms: 1_000,
            started_unix_ms: 2_000,
            lifted_unix_ms: 3_000,
            to_unix_ms: 4_000,
        };
        assert_eq!(spans.phase_of(999), None);
        assert_eq!(spans.phase_of(1_000), Some(OutagePhase::Before));
        assert_eq!(spans.phase_of(2_000), Some(OutagePhase::During));
        assert_eq!(spans.phase_of(3_000), Some(OutagePhase::After));
        assert_eq!(spans.phase_of(4_000), Some(OutagePhase::After));
        assert_eq!(spans.phase_of(4_001), None);
    }

    #[test]
    fn the_report_names_undocumented_errors_and_the_move() {
        let mut records: [PhaseRecord; 3] = Default::default();
        records[1].counts = Counts {
            sent: 5,
            answered: 2,
            errors: 2,
            timeouts: 1,
            errors_by_key: [
                ("503 no_channel_available".to_owned(), 1),
                ("502 -".to_owned(), 1),
            ]
            .into_iter()
            .collect(),
        };
        let orders = [
            (
                "supplier-main".to_owned(),
                PhaseCounts {
                    before: 10,
                    during: 0,
                    after: 9,
                },
            ),
            (
                "supplier-backup".to_owned(),
                PhaseCounts {
                    before: 0,
                    during: 10,
                    after: 1,
                },
            ),
        ]
        .into_iter()
        .collect();
        let plan = FailoverPlan::thirds(Duration::from_secs(9));
        let report = FailoverReport::new(&plan, Injection::default(), &records, Ok(orders));
        assert!(report.traffic_moved);
        // The 502 and the timeout; the 503 no_channel_available is documented.
        assert_eq!(report.undocumented_errors, 2);
        assert_eq!(report.phases.during.sent, 5);
        let report = FailoverReport::new(
            &plan,
            Injection::default(),
            &Default::default(),
            Err("down".into()),
        );
        assert!(!report.traffic_moved);
        assert_eq!(report.sim_orders_error.as_deref(), Some("down"));
    }
}
