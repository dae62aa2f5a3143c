//! Typed configuration: a TOML file (or the embedded sandbox file), then environment
//! overrides `GATEWAY__SECTION__KEY=value` (`__` separates levels; matching is
//! case-insensitive and treats `-` as `_`, so `GATEWAY__MERCHANTS__ALPHA__WEBHOOK_URL`
//! reaches `[merchants.alpha] webhook_url`). Everything is validated at start, every problem
//! reported with the name of its field; unknown fields are errors, so a typo never silently
//! falls back to a default.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ids::MerchantId;
use crate::money::{Amount, Currency};
use crate::preauth::MAX_SAFE_MINOR;
use crate::secret::{KeyDigest, Secret};

/// The sandbox configuration, embedded so `gateway serve --sandbox` runs from any directory.
pub const SANDBOX_TOML: &str = include_str!("../../config/sandbox.toml");

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "GATEWAY__";

/// Keys anyone can read, refused outside the sandbox: the placeholders whose digests
/// config/production.example.toml carries, and the sandbox's test keys (DESIGN.md §10).
pub const PUBLISHED_KEYS: &[&str] = &[
    "replace-me-admin-key",
    "replace-me-merchant-key-shop",
    "replace-me-merchant-key-distributor",
    "sk_test_alpha",
    "sk_test_beta",
    "sk_test_admin",
];

/// Parts of published secrets, refused outside the sandbox: the placeholder of
/// config/production.example.toml (`replace-me-from-environment`) and the sandbox's and
/// tests' secrets (`whsec_test_alpha`, `test_only_…`), compared case-insensitively.
pub const PUBLISHED_SECRET_MARKERS: &[&str] = &["replace-me", "whsec_test_", "test_only"];

/// The shortest secret accepted outside the sandbox: webhook secrets, channel secrets.
pub const MIN_SECRET_BYTES: usize = 32;

pub use crate::mode::Mode;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Where the gateway keeps its files (the SQLite settlement store; the sandbox keys and
    /// manifest, `crate::sandbox`).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub redis: RedisSettings,
    #[serde(default)]
    pub preauth: PreauthSettings,
    #[serde(default)]
    pub store: StoreSettings,
    #[serde(default)]
    pub payments: PaymentSettings,
    #[serde(default)]
    pub resolution: ResolutionSettings,
    pub limits: LimitSettings,
    pub admin: AdminSettings,
    pub merchants: BTreeMap<String, MerchantSettings>,
    /// Upstream channels by id (DESIGN.md §5).
    #[serde(default)]
    pub channels: BTreeMap<String, crate::channels::ChannelSettings>,
    /// `serve --sandbox` only (DESIGN.md §10); ignored otherwise.
    #[serde(default)]
    pub sandbox: SandboxSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// Merchant webhook delivery (`crate::webhooks`).
    #[serde(default)]
    pub webhooks: WebhookSettings,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data/sandbox")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub listen: String,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_grace_ms: u64,
    /// Requests served at once; beyond it the gateway answers 503 at once (load shedding).
    pub max_in_flight_requests: usize,
    pub max_body_bytes: usize,
    /// The gateway's URL as channels reach it (`https://pay.example.com`): channel orders'
    /// notify URLs are `<public_url>/v1/callbacks/<channel id>`. Empty: `http://<bound
    /// address>` (the sandbox).
    pub public_url: String,
    /// Threads of the async runtime; 0: one per CPU but one (at least one), leaving room for
    /// the SQLite thread, Redis and the database on a shared machine (docs/PERFORMANCE.md).
    pub worker_threads: usize,
    /// From a request's first byte to the end of its headers at most; a slower client is
    /// disconnected (`api::server`).
    pub header_read_timeout_ms: u64,
    /// From the end of a request's headers to the end of its body at most; past it the answer
    /// is `408` and the connection is closed.
    pub body_read_timeout_ms: u64,
    /// A keep-alive connection with no request under way is closed after this long.
    pub idle_timeout_ms: u64,
    /// Open client connections at most; one more is answered `503` and closed at once (never
    /// queued), counted in `gateway_http_connections_refused_total`. Keep it below the
    /// process's file descriptor limit.
    pub max_connections: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            shutdown_grace_ms: 10_000,
            max_in_flight_requests: 4_096,
            max_body_bytes: 16 * 1024,
            public_url: String::new(),
            worker_threads: 0,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://…`; empty selects the in-process store (sandbox only).
    pub url: Secret,
    /// Multiplexed connections, used round-robin.
    pub connections: usize,
    pub connect_timeout_ms: u64,
    pub command_timeout_ms: u64,
    pub reconnect_retries: usize,
    pub reconnect_max_delay_ms: u64,
    /// A finished payment's state (status, document, order-id entry, refunds) leaves Redis
    /// this long after it was written, once nothing there still needs it; the settlement
    /// store answers for it from then on (reads, refunds, callbacks put back what they need).
    pub payment_retention_seconds: u64,
    /// Index keys (one per cluster slot, 16384) one sweeper or recovery call reads at most,
    /// pipelined in one round trip.
    pub index_slots_per_call: usize,
    /// Finished payments past the retention let go of per sweeper tick at most.
    pub evictions_per_tick: usize,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: Secret::new(""),
            connections: 2,
            connect_timeout_ms: 1_000,
            command_timeout_ms: 1_000,
            reconnect_retries: 2,
            reconnect_max_delay_ms: 1_000,
            payment_retention_seconds: 86_400,
            index_slots_per_call: 1_024,
            evictions_per_tick: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreauthSettings {
    pub idempotency_retention_seconds: u64,
    /// When a supplier charge's hold is due to be settled by the channel's word at the latest
    /// (its payment's `expires_at` plus this), as the store records it. No clock releases the
    /// hold itself (`preauth::RELEASED_BY_CHANNEL_MS`): the resolution loop closes the order
    /// at expiry and releases the hold only once the channel confirms it closed or failed.
    pub hold_grace_seconds: u64,
    /// Expired holds released inside one operation at most.
    pub lazy_release_max: u32,
    pub sweep_interval_ms: u64,
    pub sweep_accounts_per_tick: usize,
    /// How often the settlement store's idempotency keys past the retention (+ 1 h) are
    /// purged, one instance at a time (a store lease), and how many at most per turn.
    pub key_purge_interval_ms: u64,
    pub key_purge_batch: usize,
}

impl Default for PreauthSettings {
    fn default() -> Self {
        Self {
            idempotency_retention_seconds: 86_400,
            hold_grace_seconds: 300,
            lazy_release_max: 16,
            sweep_interval_ms: 1_000,
            sweep_accounts_per_tick: 500,
            key_purge_interval_ms: 60_000,
            key_purge_batch: 1_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// The settlement store: empty = SQLite at `<data_dir>/gateway.sqlite3`; a path = SQLite
    /// there; `postgres://…` = PostgreSQL.
    pub url: Secret,
    /// PostgreSQL connections.
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
    /// Settlements waiting for the writer at most; beyond it new money movements get 503.
    pub queue_capacity: usize,
    /// A group commit takes at most this many settlements…
    pub batch_max_rows: usize,
    /// …and waits at most this long for payments admitted and on their way.
    pub batch_max_wait_ms: u64,
    /// A commit starts at least this long after the previous one started (µs; 0: at once),
    /// gathering what arrives meanwhile: at moderate rates, where a commit would carry one or
    /// two payments, each payment's share of the commit's fixed cost (the fsync, the pages
    /// written) falls, for at most this much more latency. Under load commits take longer
    /// than this by themselves and nothing waits.
    pub commit_spacing_us: u64,
    /// …but a commit whose batch already holds this many writes does not wait for the spacing
    /// (under a fixed number of clients in flight, waiting would only add latency and cut
    /// throughput: the batch is big enough to share the commit's cost).
    pub commit_spacing_rows: usize,
    /// Group commits running at once (PostgreSQL; SQLite's one connection commits one at a
    /// time whatever this says).
    pub commits_in_flight: usize,
    /// A request waits this long for its commit before answering 503 (the movement is then
    /// finished by recovery and the key replays once it is).
    pub settle_timeout_ms: u64,
    /// While the store is failing, how often the writer checks whether it is back.
    pub health_check_interval_ms: u64,
    pub recovery_interval_ms: u64,
    /// Recovery leaves younger records to the request that wrote them.
    pub recovery_min_age_ms: u64,
    /// Scopes' worth of pending records one recovery pass reads at most.
    pub recovery_batch: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            url: Secret::new(""),
            pool_size: 8,
            connect_timeout_ms: 2_000,
            queue_capacity: 8_192,
            batch_max_rows: 256,
            batch_max_wait_ms: 2,
            commit_spacing_us: 5_000,
            commit_spacing_rows: 16,
            commits_in_flight: 1,
            settle_timeout_ms: 5_000,
            health_check_interval_ms: 500,
            recovery_interval_ms: 1_000,
            recovery_min_age_ms: 10_000,
            recovery_batch: 100,
        }
    }
}

/// Which settlement store a configuration selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    Postgres(Secret),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentSettings {
    pub default_expires_in_seconds: u64,
    pub min_expires_in_seconds: u64,
    pub max_expires_in_seconds: u64,
    /// Channel attempts per create call, the first included (DESIGN.md §6 failover).
    pub max_attempts: u32,
    /// Documents of pending channel payments kept in memory, so a callback need not read
    /// its payment back from Redis (0: off; a miss reads Redis).
    pub pending_doc_cache: usize,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        Self {
            default_expires_in_seconds: 900,
            min_expires_in_seconds: 60,
            max_expires_in_seconds: 86_400,
            max_attempts: 2,
            pending_doc_cache: 100_000,
        }
    }
}

/// The resolution loop (DESIGN.md §7): pending channel payments are queried, and closed at
/// expiry, even when no callback comes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolutionSettings {
    /// How often the loop looks for due payments.
    pub interval_ms: u64,
    /// The first look at a payment, this long after its creation.
    pub first_check_delay_ms: u64,
    /// The wait after the first look; doubled after each further one, capped.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Payments taken per tick.
    pub batch: usize,
    /// Payments resolved at once.
    pub concurrency: usize,
    /// A taken payment is not taken again (by this or another instance) for this long.
    pub lease_ms: u64,
}

impl Default for ResolutionSettings {
    fn default() -> Self {
        Self {
            interval_ms: 500,
            first_check_delay_ms: 5_000,
            backoff_initial_ms: 5_000,
            backoff_max_ms: 60_000,
            batch: 64,
            concurrency: 8,
            lease_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    #[serde(default = "default_255")]
    pub max_idempotency_key_chars: usize,
    #[serde(default = "default_64")]
    pub max_merchant_order_id_chars: usize,
    #[serde(default = "default_256")]
    pub max_description_chars: usize,
    #[serde(default = "default_512")]
    pub max_notify_url_chars: usize,
    #[serde(default = "default_20")]
    pub max_metadata_keys: usize,
    #[serde(default = "default_40")]
    pub max_metadata_key_chars: usize,
    #[serde(default = "default_500")]
    pub max_metadata_value_chars: usize,
    #[serde(default = "default_256")]
    pub max_reason_chars: usize,
    /// Per currency (ISO code → decimal string); the currencies listed are the ones accepted.
    pub max_payment_amount: BTreeMap<String, String>,
    pub max_adjustment_amount: BTreeMap<String, String>,
    pub max_credit_limit: BTreeMap<String, String>,
}

fn default_20() -> usize {
    20
}
fn default_40() -> usize {
    40
}
fn default_64() -> usize {
    64
}
fn default_255() -> usize {
    255
}
fn default_256() -> usize {
    256
}
fn default_500() -> usize {
    500
}
fn default_512() -> usize {
    512
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// SHA-256 (hex) of each accepted admin key; several during a rotation.
    pub api_key_sha256: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantSettings {
    /// SHA-256 (hex) of each accepted API key; several during a rotation.
    pub api_key_sha256: Vec<String>,
    #[serde(default)]
    pub webhook_url: Option<String>,
    pub webhook_secret: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// `text` or `json`.
    pub log_format: String,
    /// A tracing filter (`info`, `gateway=debug,info`); `RUST_LOG` wins when set.
    pub log_filter: String,
    /// How often the Prometheus recorder folds its histograms' pending samples (every
    /// observation is kept until then, or until a scrape): the bound on that memory when
    /// nobody scrapes `/metrics`.
    pub metrics_upkeep_ms: u64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: "text".into(),
            log_filter: "info".into(),
            metrics_upkeep_ms: 5_000,
        }
    }
}

/// The sandbox's channels (DESIGN.md §10, `crate::sandbox`): who serves them and how the
/// simulated customer pays.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSettings {
    /// Do not start the simulator in-process: a separate `channel-sim serve --manifest
    /// DIR/sandbox.json` serves the channels (so load tests can measure each process).
    pub external_sim: bool,
    /// The in-process simulator pays every order `auto_pay_delay_ms` after its creation.
    pub auto_pay: bool,
    pub auto_pay_delay_ms: u64,
    /// The loopback address the simulator listens on (channels use plain http, which the
    /// gateway allows for loopback hosts only).
    pub sim_host: String,
}

/// The longest auto-pay delay accepted: one hour (the longest a sandbox order waits in
/// practice is its expiry).
pub const MAX_AUTO_PAY_DELAY_MS: u64 = 3_600_000;

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            external_sim: false,
            auto_pay: true,
            auto_pay_delay_ms: 500,
            sim_host: "127.0.0.1".into(),
        }
    }
}

impl SandboxSettings {
    /// `sim_host` as an address (validated at load: a loopback IP).
    pub fn sim_ip(&self) -> Option<std::net::IpAddr> {
        self.sim_host
            .parse::<std::net::IpAddr>()
            .ok()
            .filter(|ip| ip.is_loopback())
    }

    fn validate(&self, c: &mut Checker) {
        c.range(
            "sandbox.auto_pay_delay_ms",
            self.auto_pay_delay_ms,
            0,
            MAX_AUTO_PAY_DELAY_MS,
        );
        if self.sim_ip().is_none() {
            c.fail(
                "sandbox.sim_host",
                "must be a loopback IP address (127.0.0.1, ::1)",
            );
        }
    }
}

// ---- merchant webhooks (crate::webhooks, docs/webhooks.md) ----

/// The webhook delivery worker: how often it looks for due events, how many it takes, how hard
/// it may push one merchant, and how long it keeps trying.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// How often the worker looks for due events.
    pub interval_ms: u64,
    /// Events taken per tick at most, and events in flight at most (all merchants together).
    pub batch: usize,
    /// Deliveries in flight to one merchant at most; its further due events wait their turn.
    pub per_merchant_concurrency: usize,
    /// One delivery, from connecting to the end of the reply.
    pub request_timeout_ms: u64,
    /// The wait before the first retry; doubled after each further failure, capped, and drawn
    /// at random below that bound (full jitter), so failed receivers are not hit in waves.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// An event not delivered this long after it was enqueued is `failed`.
    pub horizon_seconds: u64,
    /// A taken event is not taken again (by this or another instance) for this long; it must
    /// outlast one delivery.
    pub lease_ms: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            interval_ms: 200,
            batch: 100,
            per_merchant_concurrency: 4,
            request_timeout_ms: 5_000,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 300_000,
            horizon_seconds: 3 * 86_400,
            lease_ms: 60_000,
        }
    }
}

impl WebhookSettings {
    fn validate(&self, c: &mut Checker) {
        c.range("webhooks.interval_ms", self.interval_ms, 10, 600_000);
        c.range("webhooks.batch", self.batch, 1, 10_000);
        c.range(
            "webhooks.per_merchant_concurrency",
            self.per_merchant_concurrency,
            1,
            1_000,
        );
        c.range(
            "webhooks.request_timeout_ms",
            self.request_timeout_ms,
            100,
            60_000,
        );
        c.range(
            "webhooks.backoff_initial_ms",
            self.backoff_initial_ms,
            10,
            3_600_000,
        );
        c.range(
            "webhooks.backoff_max_ms",
            self.backoff_max_ms,
            self.backoff_initial_ms,
            86_400_000,
        );
        c.range(
            "webhooks.horizon_seconds",
            self.horizon_seconds,
            1,
            30 * 86_400,
        );
        // A lease shorter than a delivery would let another worker send the event again.
        c.range(
            "webhooks.lease_ms",
            self.lease_ms,
            self.request_timeout_ms.saturating_add(1_000),
            86_400_000,
        );
    }
}

#[cfg(test)]
mod webhook_settings_tests {
    use super::*;

    #[test]
    fn webhook_settings_default_take_overrides_and_are_bounded() {
        let defaults = load(None, Vec::new()).unwrap().settings.webhooks;
        assert_eq!((defaults.interval_ms, defaults.batch), (200, 100));
        assert_eq!(defaults.horizon_seconds, 259_200);
        let set = load(
            None,
            vec![("GATEWAY__WEBHOOKS__INTERVAL_MS".into(), "50".into())],
        )
        .unwrap()
        .settings
        .webhooks;
        assert_eq!(set.interval_ms, 50);
        let err = load(
            None,
            [
                ("GATEWAY__WEBHOOKS__BATCH", "0"),
                ("GATEWAY__WEBHOOKS__LEASE_MS", "5000"),
                ("GATEWAY__WEBHOOKS__BACKOFF_MAX_MS", "10"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        for field in [
            "webhooks.batch",
            "webhooks.lease_ms",
            "webhooks.backoff_max_ms",
        ] {
            assert!(fields.contains(&field), "{field}: {err}");
        }
    }
}

/// Applies `GATEWAY__…` overrides to a table rooted like the configuration file, exactly as
/// [`load`] does: the sandbox applies the overrides of the channels it adds itself
/// (`GATEWAY__CHANNELS__ALIPAY_MAIN__…`) to them once they exist.
pub(crate) fn apply_overrides(
    table: &mut toml::Table,
    overrides: &[(String, String)],
) -> Result<(), ConfigError> {
    let mut sorted = overrides.to_vec();
    sorted.sort();
    for (name, value) in &sorted {
        apply_override(table, name, value)?;
    }
    Ok(())
}

/// The normalized form of a name in an override (`ALIPAY_MAIN` and `alipay-main` match).
pub(crate) fn normalize_name(segment: &str) -> String {
    normalize(segment)
}

/// One problem with the configuration, naming its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Every problem found, so an operator fixes them in one go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError(pub Vec<FieldError>);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for e in &self.0 {
            writeln!(f, "  {}: {}", e.field, e.message)?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn one(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }
}

/// Per-currency limits in minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurrencyLimits {
    pub max_payment_minor: i64,
    pub max_adjustment_minor: i64,
    pub max_credit_limit_minor: i64,
}

/// A merchant as the gateway uses it.
#[derive(Debug, Clone)]
pub struct Merchant {
    pub id: MerchantId,
    pub key_digests: Vec<KeyDigest>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Secret,
}

/// Configuration checked and turned into the types the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The rules the configuration was checked under, and the ones it runs under (webhook
    /// URLs): [`load`] checks the embedded sandbox configuration as the sandbox and a file as
    /// production; [`load_for`] says which.
    pub mode: Mode,
    pub settings: Settings,
    pub listen: SocketAddr,
    pub currencies: HashMap<Currency, CurrencyLimits>,
    pub merchants: Vec<Merchant>,
    pub admin_key_digests: Vec<KeyDigest>,
}

impl Config {
    /// The in-process store is used when no Redis URL is configured.
    pub fn uses_redis(&self) -> bool {
        !self.settings.redis.url.expose().is_empty()
    }

    /// The settlement store this configuration selects.
    pub fn store_location(&self) -> StoreLocation {
        let url = self.settings.store.url.expose();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            StoreLocation::Postgres(self.settings.store.url.clone())
        } else if url.is_empty() {
            StoreLocation::Sqlite(self.settings.data_dir.join("gateway.sqlite3"))
        } else {
            StoreLocation::Sqlite(PathBuf::from(url.strip_prefix("sqlite://").unwrap_or(url)))
        }
    }
}

/// Reads `file` (or the embedded sandbox configuration when `None`), applies the environment
/// overrides in `env`, and validates: a file under the production rules, the embedded
/// sandbox configuration (with its published test keys) under the sandbox's.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mode = match file {
        Some(_) => Mode::Production,
        None => Mode::Sandbox,
    };
    load_for(mode, file, env)
}

/// As [`load`], under the rules of `mode` (`serve --sandbox --config FILE` checks its file as
/// the sandbox).
pub fn load_for(
    mode: Mode,
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let (text, origin) = match file {
        Some(path) => (
            std::fs::read_to_string(path).map_err(|e| {
                ConfigError::one(path.display().to_string(), format!("cannot read: {e}"))
            })?,
            path.display().to_string(),
        ),
        None => (SANDBOX_TOML.to_owned(), "embedded sandbox.toml".to_owned()),
    };
    from_toml(mode, &text, &origin, env)
}

/// Parses TOML text, applies environment overrides, validates under the rules of `mode`.
pub fn from_toml(
    mode: Mode,
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::one(origin, e.to_string()))?;
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    overrides.sort();
    for (name, value) in overrides {
        apply_override(&mut table, &name, &value)?;
    }
    let settings: Settings = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::one(origin, e.message().to_owned()))?;
    validate(settings, mode)
}

fn normalize(segment: &str) -> String {
    segment.to_ascii_lowercase().replace('-', "_")
}

/// Sets one `GATEWAY__A__B=value` override into `table`.
fn apply_override(table: &mut toml::Table, name: &str, value: &str) -> Result<(), ConfigError> {
    let path: Vec<&str> = name[ENV_PREFIX.len()..].split("__").collect();
    if path.iter().any(|segment| segment.is_empty()) {
        return Err(ConfigError::one(name, "malformed override name"));
    }
    let mut current = table;
    for (i, segment) in path.iter().enumerate() {
        let wanted = normalize(segment);
        let existing = current.keys().find(|k| normalize(k) == wanted).cloned();
        let key = existing.unwrap_or(wanted);
        if i + 1 == path.len() {
            let parsed = parse_override(current.get(&key), value)
                .map_err(|message| ConfigError::one(name, message))?;
            current.insert(key, parsed);
            return Ok(());
        }
        let next = current
            .entry(key)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = next
            .as_table_mut()
            .ok_or_else(|| ConfigError::one(name, format!("{segment} is not a section")))?;
    }
    unreachable!("the loop returns at the last segment")
}

/// An override keeps the type of the value it replaces; a new value is read as TOML when it
/// parses as a number, boolean or array, else as a string.
fn parse_override(existing: Option<&toml::Value>, raw: &str) -> Result<toml::Value, String> {
    let as_toml = || -> Option<toml::Value> {
        let table: toml::Table = format!("v = {raw}").parse().ok()?;
        table.get("v").cloned()
    };
    match existing {
        Some(toml::Value::String(_)) => Ok(toml::Value::String(raw.to_owned())),
        Some(toml::Value::Integer(_)) => raw
            .parse()
            .map(toml::Value::Integer)
            .map_err(|_| format!("expected an integer, got {raw:?}")),
        Some(toml::Value::Boolean(_)) => raw
            .parse()
            .map(toml::Value::Boolean)
            .map_err(|_| format!("expected true or false, got {raw:?}")),
        Some(toml::Value::Array(_)) => match as_toml() {
            Some(value @ toml::Value::Array(_)) => Ok(value),
            _ => Err(format!(
                "expected a TOML array like [\"a\", \"b\"], got {raw:?}"
            )),
        },
        Some(toml::Value::Table(_)) => Err("is a section, not a value".into()),
        _ => Ok(match as_toml() {
            Some(
                value @ (toml::Value::Integer(_) | toml::Value::Boolean(_) | toml::Value::Array(_)),
            ) => value,
            _ => toml::Value::String(raw.to_owned()),
        }),
    }
}

struct Checker(Vec<FieldError>);

impl Checker {
    fn fail(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn range<T: PartialOrd + std::fmt::Display + Copy>(
        &mut self,
        field: &str,
        value: T,
        min: T,
        max: T,
    ) {
        if value < min || value > max {
            self.fail(
                field,
                format!("must be between {min} and {max}, got {value}"),
            );
        }
    }

    /// Outside the sandbox: no key digest of a published key (the placeholders of
    /// config/production.example.toml, the sandbox's test keys).
    fn no_published_keys(&mut self, field: &str, hexes: &[String]) {
        for (i, hex) in hexes.iter().enumerate() {
            let Some(digest) = KeyDigest::from_hex(hex) else {
                continue;
            };
            if let Some(key) = PUBLISHED_KEYS
                .iter()
                .find(|key| KeyDigest::of(key).ct_eq(&digest))
            {
                self.fail(
                    format!("{field}[{i}]"),
                    format!(
                        "is the digest of the published key {key:?}: anyone can use it; make a key \
                         of your own (`openssl rand -hex 24`) and configure its digest"
                    ),
                );
            }
        }
    }

    /// Outside the sandbox: a secret of at least [`MIN_SECRET_BYTES`] that is not a published
    /// placeholder or test secret.
    fn strong_secret(&mut self, field: &str, secret: &str) {
        let lower = secret.to_ascii_lowercase();
        if PUBLISHED_SECRET_MARKERS
            .iter()
            .any(|marker| lower.contains(marker))
        {
            self.fail(
                field,
                "is a published placeholder or test secret: set a secret of your own \
                 (`openssl rand -hex 32`), preferably in the environment",
            );
        } else if secret.len() < MIN_SECRET_BYTES {
            self.fail(
                field,
                format!(
                    "must be at least {MIN_SECRET_BYTES} bytes outside the sandbox (`openssl rand \
                     -hex 32`)"
                ),
            );
        }
    }

    fn digests(&mut self, field: &str, hexes: &[String]) -> Vec<KeyDigest> {
        if hexes.is_empty() {
            self.fail(field, "needs at least one key digest");
        }
        hexes
            .iter()
            .enumerate()
            .filter_map(|(i, hex)| {
                let digest = KeyDigest::from_hex(hex);
                if digest.is_none() {
                    self.fail(
                        format!("{field}[{i}]"),
                        "must be 64 hex characters (SHA-256 of the key)",
                    );
                }
                digest
            })
            .collect()
    }
}

fn validate(settings: Settings, mode: Mode) -> Result<Config, ConfigError> {
    let mut c = Checker(Vec::new());
    let s = &settings;

    if s.data_dir.as_os_str().is_empty() {
        c.fail("data_dir", "must not be empty");
    }
    let listen = s.server.listen.parse::<SocketAddr>().unwrap_or_else(|e| {
        c.fail("server.listen", format!("must be IP:PORT ({e})"));
        SocketAddr::from(([127, 0, 0, 1], 0))
    });
    c.range(
        "server.shutdown_grace_ms",
        s.server.shutdown_grace_ms,
        1,
        600_000,
    );
    c.range("server.worker_threads", s.server.worker_threads, 0, 1_024);
    c.range(
        "server.max_in_flight_requests",
        s.server.max_in_flight_requests,
        1,
        1_000_000,
    );
    c.range(
        "server.max_body_bytes",
        s.server.max_body_bytes,
        1_024,
        1 << 20,
    );
    c.range(
        "server.header_read_timeout_ms",
        s.server.header_read_timeout_ms,
        10,
        300_000,
    );
    c.range(
        "server.body_read_timeout_ms",
        s.server.body_read_timeout_ms,
        10,
        600_000,
    );
    c.range(
        "server.idle_timeout_ms",
        s.server.idle_timeout_ms,
        10,
        3_600_000,
    );
    c.range(
        "server.max_connections",
        s.server.max_connections,
        1,
        1_000_000,
    );
    let public_url = &s.server.public_url;
    if !(public_url.is_empty()
        || ((public_url.starts_with("https://") || public_url.starts_with("http://"))
            && !public_url.ends_with('/')
            && public_url.len() <= 256))
    {
        c.fail(
            "server.public_url",
            "must be empty or an http(s):// URL of at most 256 characters without a trailing /",
        );
    }
    c.range("payments.max_attempts", s.payments.max_attempts, 1, 8);
    c.range(
        "payments.pending_doc_cache",
        s.payments.pending_doc_cache,
        0,
        10_000_000,
    );
    let r = &s.resolution;
    c.range("resolution.interval_ms", r.interval_ms, 10, 600_000);
    c.range(
        "resolution.first_check_delay_ms",
        r.first_check_delay_ms,
        0,
        86_400_000,
    );
    c.range(
        "resolution.backoff_initial_ms",
        r.backoff_initial_ms,
        10,
        86_400_000,
    );
    c.range(
        "resolution.backoff_max_ms",
        r.backoff_max_ms,
        r.backoff_initial_ms,
        86_400_000,
    );
    c.range("resolution.batch", r.batch, 1, 10_000);
    c.range("resolution.concurrency", r.concurrency, 1, 1_000);
    c.range("resolution.lease_ms", r.lease_ms, 1_000, 86_400_000);

    let url = s.redis.url.expose();
    if !(url.is_empty() || url.starts_with("redis://") || url.starts_with("rediss://")) {
        c.fail(
            "redis.url",
            "must start with redis:// or rediss://, or be empty for the in-process store",
        );
    }
    c.range("redis.connections", s.redis.connections, 1, 64);
    c.range(
        "redis.connect_timeout_ms",
        s.redis.connect_timeout_ms,
        1,
        60_000,
    );
    c.range(
        "redis.command_timeout_ms",
        s.redis.command_timeout_ms,
        1,
        60_000,
    );
    c.range("redis.reconnect_retries", s.redis.reconnect_retries, 0, 100);
    c.range(
        "redis.reconnect_max_delay_ms",
        s.redis.reconnect_max_delay_ms,
        1,
        60_000,
    );
    c.range(
        "redis.payment_retention_seconds",
        s.redis.payment_retention_seconds,
        1,
        30 * 86_400,
    );
    c.range(
        "redis.index_slots_per_call",
        s.redis.index_slots_per_call,
        1,
        usize::from(crate::preauth::slots::SLOTS),
    );
    c.range(
        "redis.evictions_per_tick",
        s.redis.evictions_per_tick,
        1,
        1_000_000,
    );

    c.range(
        "preauth.idempotency_retention_seconds",
        s.preauth.idempotency_retention_seconds,
        1,
        30 * 86_400,
    );
    c.range(
        "preauth.hold_grace_seconds",
        s.preauth.hold_grace_seconds,
        0,
        86_400,
    );
    c.range(
        "preauth.lazy_release_max",
        s.preauth.lazy_release_max,
        1,
        1_000,
    );
    c.range(
        "preauth.sweep_interval_ms",
        s.preauth.sweep_interval_ms,
        10,
        60_000,
    );
    c.range(
        "preauth.sweep_accounts_per_tick",
        s.preauth.sweep_accounts_per_tick,
        1,
        100_000,
    );
    c.range(
        "preauth.key_purge_interval_ms",
        s.preauth.key_purge_interval_ms,
        100,
        3_600_000,
    );
    c.range(
        "preauth.key_purge_batch",
        s.preauth.key_purge_batch,
        1,
        100_000,
    );

    let st = &s.store;
    c.range("store.pool_size", st.pool_size, 1, 256);
    c.range("store.connect_timeout_ms", st.connect_timeout_ms, 1, 60_000);
    c.range("store.queue_capacity", st.queue_capacity, 1, 1_000_000);
    c.range("store.batch_max_rows", st.batch_max_rows, 1, 10_000);
    c.range("store.batch_max_wait_ms", st.batch_max_wait_ms, 0, 1_000);
    c.range("store.commit_spacing_us", st.commit_spacing_us, 0, 100_000);
    c.range(
        "store.commit_spacing_rows",
        st.commit_spacing_rows,
        1,
        10_000,
    );
    c.range("store.commits_in_flight", st.commits_in_flight, 1, 16);
    c.range("store.settle_timeout_ms", st.settle_timeout_ms, 1, 600_000);
    c.range(
        "store.health_check_interval_ms",
        st.health_check_interval_ms,
        1,
        60_000,
    );
    c.range(
        "store.recovery_interval_ms",
        st.recovery_interval_ms,
        10,
        600_000,
    );
    c.range(
        "store.recovery_min_age_ms",
        st.recovery_min_age_ms,
        0,
        3_600_000,
    );
    c.range("store.recovery_batch", st.recovery_batch, 1, 100_000);

    let p = &s.payments;
    c.range(
        "payments.min_expires_in_seconds",
        p.min_expires_in_seconds,
        1,
        30 * 86_400,
    );
    c.range(
        "payments.max_expires_in_seconds",
        p.max_expires_in_seconds,
        p.min_expires_in_seconds,
        30 * 86_400,
    );
    c.range(
        "payments.default_expires_in_seconds",
        p.default_expires_in_seconds,
        p.min_expires_in_seconds,
        p.max_expires_in_seconds,
    );

    let l = &s.limits;
    c.range(
        "limits.max_idempotency_key_chars",
        l.max_idempotency_key_chars,
        1,
        255,
    );
    c.range(
        "limits.max_merchant_order_id_chars",
        l.max_merchant_order_id_chars,
        1,
        64,
    );
    c.range(
        "limits.max_description_chars",
        l.max_description_chars,
        1,
        4_096,
    );
    c.range(
        "limits.max_notify_url_chars",
        l.max_notify_url_chars,
        1,
        2_048,
    );
    c.range("limits.max_metadata_keys", l.max_metadata_keys, 0, 100);
    c.range(
        "limits.max_metadata_key_chars",
        l.max_metadata_key_chars,
        1,
        256,
    );
    c.range(
        "limits.max_metadata_value_chars",
        l.max_metadata_value_chars,
        1,
        4_096,
    );
    c.range("limits.max_reason_chars", l.max_reason_chars, 1, 4_096);

    let mut currencies = HashMap::new();
    let limit_of = |c: &mut Checker,
                    map: &BTreeMap<String, String>,
                    name: &str,
                    code: &str,
                    currency: Currency|
     -> i64 {
        let field = format!("limits.{name}.{code}");
        let Some(text) = map.get(code) else {
            c.fail(field, "missing: every currency needs all three limits");
            return 0;
        };
        match Amount::parse(text, currency) {
            Ok(amount) if amount.minor() <= MAX_SAFE_MINOR => amount.minor(),
            Ok(_) => {
                c.fail(
                    field,
                    "is above the largest amount the store keeps exactly (2^53 - 1 minor units)",
                );
                0
            }
            Err(e) => {
                c.fail(field, format!("{text:?} {e}"));
                0
            }
        }
    };
    if l.max_payment_amount.is_empty() {
        c.fail("limits.max_payment_amount", "needs at least one currency");
    }
    for code in l
        .max_payment_amount
        .keys()
        .chain(l.max_adjustment_amount.keys())
        .chain(l.max_credit_limit.keys())
    {
        let Ok(currency) = Currency::parse(code) else {
            c.fail(
                format!("limits.*.{code}"),
                "unknown currency (CNY, HKD, USD, JPY)",
            );
            continue;
        };
        if currencies.contains_key(&currency) {
            continue;
        }
        let limits = CurrencyLimits {
            max_payment_minor: limit_of(
                &mut c,
                &l.max_payment_amount,
                "max_payment_amount",
                code,
                currency,
            ),
            max_adjustment_minor: limit_of(
                &mut c,
                &l.max_adjustment_amount,
                "max_adjustment_amount",
                code,
                currency,
            ),
            max_credit_limit_minor: limit_of(
                &mut c,
                &l.max_credit_limit,
                "max_credit_limit",
                code,
                currency,
            ),
        };
        currencies.insert(currency, limits);
    }

    let admin_key_digests = c.digests("admin.api_key_sha256", &s.admin.api_key_sha256);
    if mode == Mode::Production {
        c.no_published_keys("admin.api_key_sha256", &s.admin.api_key_sha256);
    }
    let mut merchants = Vec::new();
    if s.merchants.is_empty() {
        c.fail("merchants", "needs at least one merchant");
    }
    for (name, m) in &s.merchants {
        let field = format!("merchants.{name}");
        let id = match MerchantId::parse(name) {
            Ok(id) => id,
            Err(e) => {
                c.fail(&field, format!("merchant id {e}"));
                continue;
            }
        };
        let key_digests = c.digests(&format!("{field}.api_key_sha256"), &m.api_key_sha256);
        if mode == Mode::Production {
            c.no_published_keys(&format!("{field}.api_key_sha256"), &m.api_key_sha256);
        }
        if let Some(url) = &m.webhook_url {
            // The rules of every webhook URL (crate::webhooks::url): production calls only
            // https:// to public hosts; the sandbox also loopback hosts over http://.
            if let Err(problem) = crate::webhooks::url::check_url(url, mode) {
                c.fail(format!("{field}.webhook_url"), problem);
            }
        }
        match mode {
            Mode::Sandbox if m.webhook_secret.expose().len() < 8 => c.fail(
                format!("{field}.webhook_secret"),
                "must be at least 8 characters",
            ),
            Mode::Sandbox => {}
            Mode::Production => c.strong_secret(
                &format!("{field}.webhook_secret"),
                m.webhook_secret.expose(),
            ),
        }
        merchants.push(Merchant {
            id,
            key_digests,
            webhook_url: m.webhook_url.clone(),
            webhook_secret: m.webhook_secret.clone(),
        });
    }
    // One key, one principal: a digest shared by two merchants (or a merchant and the admin)
    // would make authentication ambiguous.
    let mut seen = HashMap::new();
    let principals = std::iter::once(("admin".to_owned(), &admin_key_digests)).chain(
        merchants
            .iter()
            .map(|m| (format!("merchants.{}", m.id), &m.key_digests)),
    );
    for (owner, digests) in principals {
        for digest in digests {
            if let Some(other) = seen.insert(digest.to_hex(), owner.clone()) {
                if other != owner {
                    c.fail(
                        format!("{owner}.api_key_sha256"),
                        format!("the same key is also configured for {other}"),
                    );
                }
            }
        }
    }

    if s.channels.len() > crate::routing::MAX_CANDIDATES {
        c.fail(
            "channels",
            format!("at most {} channels", crate::routing::MAX_CANDIDATES),
        );
    }
    for (id, channel) in &s.channels {
        if crate::ids::AccountId::parse(id).is_err() {
            c.fail(
                format!("channels.{id}"),
                "channel ids are [A-Za-z0-9_-]{1,64}",
            );
        }
        if let Err(problem) = channel.validate() {
            c.fail(format!("channels.{id}"), problem);
        }
        // The channel's shared secrets (the supplier's HMAC secret; an APIv3 key is exactly 32
        // bytes by WeChat Pay's rules, checked when the channel is built). One that cannot be
        // read is reported when the channel is built at start.
        if let (Mode::Production, Some(source)) = (mode, &channel.keys.supplier_secret) {
            if let Ok(secret) = source.secret() {
                c.strong_secret(
                    &format!("channels.{id}.keys.supplier_secret"),
                    secret.expose(),
                );
            }
        }
    }

    s.sandbox.validate(&mut c);
    s.webhooks.validate(&mut c);

    c.range(
        "telemetry.metrics_upkeep_ms",
        s.telemetry.metrics_upkeep_ms,
        100,
        60_000,
    );
    if !matches!(s.telemetry.log_format.as_str(), "text" | "json") {
        c.fail("telemetry.log_format", "must be \"text\" or \"json\"");
    }
    if s.telemetry
        .log_filter
        .parse::<tracing_subscriber::EnvFilter>()
        .is_err()
    {
        c.fail("telemetry.log_filter", "is not a valid tracing filter");
    }

    if !c.0.is_empty() {
        return Err(ConfigError(c.0));
    }
    Ok(Config {
        mode,
        listen,
        currencies,
        merchants,
        admin_key_digests,
        settings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_embedded_sandbox_configuration_is_valid() {
        let config = load(None, Vec::new()).expect("sandbox.toml validates");
        assert!(!config.uses_redis());
        assert_eq!(config.merchants.len(), 2);
        assert!(config.currencies.contains_key(&Currency::Cny));
        let alpha = config
            .merchants
            .iter()
            .find(|m| m.id.as_str() == "alpha")
            .unwrap();
        assert!(alpha.key_digests[0].ct_eq(&KeyDigest::of("sk_test_alpha")));
        assert!(config.admin_key_digests[0].ct_eq(&KeyDigest::of("sk_test_admin")));
    }

    #[test]
    fn environment_overrides_reach_nested_and_hyphenated_fields() {
        let config = load(
            None,
            env(&[
                ("GATEWAY__REDIS__URL", "redis://127.0.0.1:6390"),
                ("GATEWAY__SERVER__MAX_BODY_BYTES", "4096"),
                (
                    "GATEWAY__MERCHANTS__ALPHA__WEBHOOK_URL",
                    "http://127.0.0.1:9/hook",
                ),
                ("GATEWAY__DATA_DIR", "/tmp/elsewhere"),
                ("OTHER__REDIS__URL", "ignored"),
            ]),
        )
        .unwrap();
        assert!(config.uses_redis());
        assert_eq!(config.settings.redis.url.expose(), "redis://127.0.0.1:6390");
        assert_eq!(config.settings.server.max_body_bytes, 4096);
        assert_eq!(config.settings.data_dir, PathBuf::from("/tmp/elsewhere"));
        let alpha = config
            .merchants
            .iter()
            .find(|m| m.id.as_str() == "alpha")
            .unwrap();
        assert_eq!(
            alpha.webhook_url.as_deref(),
            Some("http://127.0.0.1:9/hook")
        );
    }

    #[test]
    fn errors_name_every_bad_field() {
        let err = load(
            None,
            env(&[
                ("GATEWAY__SERVER__MAX_BODY_BYTES", "10"),
                ("GATEWAY__REDIS__URL", "http://nope"),
                ("GATEWAY__LIMITS__MAX_PAYMENT_AMOUNT__CNY", "-1"),
            ]),
        )
        .unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"server.max_body_bytes"), "{err}");
        assert!(fields.contains(&"redis.url"), "{err}");
        assert!(fields.contains(&"limits.max_payment_amount.CNY"), "{err}");
    }

    #[test]
    fn connection_timeouts_and_the_connection_cap_default_and_are_bounded() {
        let server = load(None, env(&[])).unwrap().settings.server;
        assert_eq!(
            (
                server.header_read_timeout_ms,
                server.body_read_timeout_ms,
                server.idle_timeout_ms,
                server.max_connections
            ),
            (10_000, 10_000, 60_000, 10_000)
        );
        let err = load(
            None,
            env(&[
                ("GATEWAY__SERVER__HEADER_READ_TIMEOUT_MS", "9"),
                ("GATEWAY__SERVER__BODY_READ_TIMEOUT_MS", "600001"),
                ("GATEWAY__SERVER__IDLE_TIMEOUT_MS", "0"),
                ("GATEWAY__SERVER__MAX_CONNECTIONS", "0"),
            ]),
        )
        .unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        for field in [
            "server.header_read_timeout_ms",
            "server.body_read_timeout_ms",
            "server.idle_timeout_ms",
            "server.max_connections",
        ] {
            assert!(fields.contains(&field), "{field}: {err}");
        }
        let server = load(
            None,
            env(&[
                ("GATEWAY__SERVER__IDLE_TIMEOUT_MS", "250"),
                ("GATEWAY__SERVER__MAX_CONNECTIONS", "3"),
            ]),
        )
        .unwrap()
        .settings
        .server;
        assert_eq!((server.idle_timeout_ms, server.max_connections), (250, 3));
    }

    #[test]
    fn runtime_threads_and_the_pending_cache_are_bounded() {
        let err = load(
            None,
            env(&[
                ("GATEWAY__SERVER__WORKER_THREADS", "1025"),
                ("GATEWAY__PAYMENTS__PENDING_DOC_CACHE", "10000001"),
            ]),
        )
        .unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"server.worker_threads"), "{err}");
        assert!(fields.contains(&"payments.pending_doc_cache"), "{err}");
        let config = load(
            None,
            env(&[
                ("GATEWAY__SERVER__WORKER_THREADS", "1"),
                ("GATEWAY__PAYMENTS__PENDING_DOC_CACHE", "0"),
            ]),
        )
        .unwrap();
        assert_eq!(config.settings.server.worker_threads, 1);
        assert_eq!(config.settings.payments.pending_doc_cache, 0);
    }

    #[test]
    fn the_group_commit_settings_are_bounded() {
        let defaults = load(None, env(&[])).unwrap().settings.store;
        assert_eq!(
            (defaults.batch_max_wait_ms, defaults.commits_in_flight),
            (2, 1)
        );
        let err = load(
            None,
            env(&[
                ("GATEWAY__STORE__COMMITS_IN_FLIGHT", "0"),
                ("GATEWAY__STORE__BATCH_MAX_WAIT_MS", "1001"),
            ]),
        )
        .unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"store.commits_in_flight"), "{err}");
        assert!(fields.contains(&"store.batch_max_wait_ms"), "{err}");
        // The commit spacing: 5 ms unless 16 writes are waiting; at most 100 ms, at least one.
        assert_eq!(
            (defaults.commit_spacing_us, defaults.commit_spacing_rows),
            (5_000, 16)
        );
        let err = load(
            None,
            env(&[
                ("GATEWAY__STORE__COMMIT_SPACING_US", "100001"),
                ("GATEWAY__STORE__COMMIT_SPACING_ROWS", "0"),
            ]),
        )
        .unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"store.commit_spacing_us"), "{err}");
        assert!(fields.contains(&"store.commit_spacing_rows"), "{err}");
        let off = load(None, env(&[("GATEWAY__STORE__COMMIT_SPACING_US", "0")]))
            .unwrap()
            .settings
            .store;
        assert_eq!(off.commit_spacing_us, 0);
        let err = load(None, env(&[("GATEWAY__STORE__COMMITS_IN_FLIGHT", "17")])).unwrap_err();
        assert!(err.to_string().contains("store.commits_in_flight"), "{err}");
        let store = load(None, env(&[("GATEWAY__STORE__COMMITS_IN_FLIGHT", "4")]))
            .unwrap()
            .settings
            .store;
        assert_eq!(store.commits_in_flight, 4);
    }

    #[test]
    fn the_key_purge_settings_default_and_are_bounded() {
        let defaults = load(None, env(&[])).unwrap().settings.preauth;
        assert_eq!(
            (defaults.key_purge_interval_ms, defaults.key_purge_batch),
            (60_000, 1_000)
        );
        let err = load(
            None,
            env(&[
                ("GATEWAY__PREAUTH__KEY_PURGE_INTERVAL_MS", "99"),
                ("GATEWAY__PREAUTH__KEY_PURGE_BATCH", "0"),
            ]),
        )
        .unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"preauth.key_purge_interval_ms"), "{err}");
        assert!(fields.contains(&"preauth.key_purge_batch"), "{err}");
        let preauth = load(
            None,
            env(&[
                ("GATEWAY__PREAUTH__KEY_PURGE_INTERVAL_MS", "100"),
                ("GATEWAY__PREAUTH__KEY_PURGE_BATCH", "100000"),
            ]),
        )
        .unwrap()
        .settings
        .preauth;
        assert_eq!(
            (preauth.key_purge_interval_ms, preauth.key_purge_batch),
            (100, 100_000)
        );
    }

    #[test]
    fn the_metrics_upkeep_interval_is_bounded() {
        let defaults = load(None, env(&[])).unwrap().settings.telemetry;
        assert_eq!(defaults.metrics_upkeep_ms, 5_000);
        for bad in ["99", "60001", "0"] {
            let err =
                load(None, env(&[("GATEWAY__TELEMETRY__METRICS_UPKEEP_MS", bad)])).unwrap_err();
            assert!(
                err.to_string().contains("telemetry.metrics_upkeep_ms"),
                "{bad}: {err}"
            );
        }
        let telemetry = load(
            None,
            env(&[("GATEWAY__TELEMETRY__METRICS_UPKEEP_MS", "100")]),
        )
        .unwrap()
        .settings
        .telemetry;
        assert_eq!(telemetry.metrics_upkeep_ms, 100);
    }

    #[test]
    fn webhook_urls_follow_the_rules_of_the_mode() {
        let loopback = [(
            "GATEWAY__MERCHANTS__ALPHA__WEBHOOK_URL",
            "http://127.0.0.1:9/h",
        )];
        assert!(load(None, env(&loopback)).is_ok());
        for url in [
            "http://127.0.0.1:9/h",
            "https://10.0.0.7/h",
            "https://localhost/h",
        ] {
            let err = from_toml(
                Mode::Production,
                SANDBOX_TOML,
                "test",
                env(&[("GATEWAY__MERCHANTS__ALPHA__WEBHOOK_URL", url)]),
            )
            .unwrap_err();
            let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
            assert!(
                fields.contains(&"merchants.alpha.webhook_url"),
                "{url}: {err}"
            );
        }
        let err = load(
            None,
            env(&[(
                "GATEWAY__MERCHANTS__ALPHA__WEBHOOK_URL",
                "https://192.168.0.2/h",
            )]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("merchants.alpha.webhook_url"),
            "{err}"
        );
    }

    const PRODUCTION_EXAMPLE: &str = include_str!("../../config/production.example.toml");

    fn production(overrides: &[(&str, &str)]) -> Result<Config, ConfigError> {
        from_toml(
            Mode::Production,
            PRODUCTION_EXAMPLE,
            "production.example.toml",
            env(overrides),
        )
    }

    /// Real credentials for the example file: keys of 48 hex characters, secrets of 64.
    fn real_credentials() -> Vec<(&'static str, String)> {
        let digest = |key: &str| format!("[\"{}\"]", KeyDigest::of(key).to_hex());
        vec![
            ("GATEWAY__ADMIN__API_KEY_SHA256", digest(&"a1".repeat(24))),
            (
                "GATEWAY__MERCHANTS__EXAMPLE_SHOP__API_KEY_SHA256",
                digest(&"b2".repeat(24)),
            ),
            (
                "GATEWAY__MERCHANTS__EXAMPLE_DISTRIBUTOR__API_KEY_SHA256",
                digest(&"c3".repeat(24)),
            ),
            (
                "GATEWAY__MERCHANTS__EXAMPLE_SHOP__WEBHOOK_SECRET",
                "d4".repeat(32),
            ),
            (
                "GATEWAY__MERCHANTS__EXAMPLE_DISTRIBUTOR__WEBHOOK_SECRET",
                "e5".repeat(32),
            ),
        ]
    }

    #[test]
    fn the_production_example_stops_on_its_placeholders_naming_each() {
        let err = production(&[]).unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        for field in [
            "admin.api_key_sha256[0]",
            "merchants.example_shop.api_key_sha256[0]",
            "merchants.example_distributor.api_key_sha256[0]",
            "merchants.example_shop.webhook_secret",
            "merchants.example_distributor.webhook_secret",
        ] {
            assert!(fields.contains(&field), "{field}: {err}");
        }
        assert_eq!(fields.len(), 5, "nothing else is wrong with it: {err}");
        // With credentials of its own, the example is a valid production configuration.
        let real = real_credentials();
        let overrides: Vec<(&str, &str)> = real.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let config = production(&overrides).expect("valid with real credentials");
        assert_eq!(config.mode, Mode::Production);
    }

    #[test]
    fn outside_the_sandbox_short_and_test_secrets_and_test_keys_stop_the_start() {
        let real = real_credentials();
        let mut overrides: Vec<(&str, &str)> = real.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let alpha = format!("[\"{}\"]", KeyDigest::of("sk_test_alpha").to_hex());
        let short = "f".repeat(MIN_SECRET_BYTES - 1);
        overrides.extend([
            (
                "GATEWAY__MERCHANTS__EXAMPLE_SHOP__API_KEY_SHA256",
                alpha.as_str(),
            ),
            (
                "GATEWAY__MERCHANTS__EXAMPLE_SHOP__WEBHOOK_SECRET",
                short.as_str(),
            ),
            (
                "GATEWAY__MERCHANTS__EXAMPLE_DISTRIBUTOR__WEBHOOK_SECRET",
                "whsec_test_alpha_but_long_enough_to_pass_the_length_rule",
            ),
        ]);
        let err = production(&overrides).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("merchants.example_shop.api_key_sha256[0]: is the digest of the published key \"sk_test_alpha\""),
            "{text}"
        );
        assert!(
            text.contains("merchants.example_shop.webhook_secret: must be at least 32 bytes"),
            "{text}"
        );
        assert!(
            text.contains("merchants.example_distributor.webhook_secret: is a published"),
            "{text}"
        );
        // A secret never appears in the message.
        assert!(!text.contains(&short), "{text}");
        // The same keys and secrets are the sandbox's own: accepted there.
        let config = load(None, Vec::new()).unwrap();
        assert_eq!(config.mode, Mode::Sandbox);
    }

    #[test]
    fn outside_the_sandbox_a_short_supplier_secret_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let short = write("short", &"s".repeat(MIN_SECRET_BYTES - 1));
        let long = write("long", &"s".repeat(MIN_SECRET_BYTES));
        let channel = |path: &str| {
            format!(
                "{PRODUCTION_EXAMPLE}\n[channels.supplier-x]\nkind = \"supplier\"\npriority = 1\nmethods = [\"supplier\"]\n\
                 currencies = [\"CNY\"]\nmin_amount = \"1.00\"\nmax_amount = \"10.00\"\n\
                 base_url = \"https://supplier.example\"\n\
                 keys = {{ supplier_secret = {{ file = \"{path}\" }} }}\n"
            )
        };
        let real = real_credentials();
        let overrides: Vec<(String, String)> = real
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let err =
            from_toml(Mode::Production, &channel(&short), "t", overrides.clone()).unwrap_err();
        assert!(
            err.to_string()
                .contains("channels.supplier-x.keys.supplier_secret: must be at least 32 bytes"),
            "{err}"
        );
        from_toml(Mode::Production, &channel(&long), "t", overrides).expect("32 bytes will do");
    }

    #[test]
    fn type_errors_and_unknown_fields_are_refused() {
        let err = load(None, env(&[("GATEWAY__SERVER__MAX_BODY_BYTES", "lots")])).unwrap_err();
        assert_eq!(err.0[0].field, "GATEWAY__SERVER__MAX_BODY_BYTES");
        let err = load(None, env(&[("GATEWAY__SERVER__MAX_BODDY_BYTES", "1")])).unwrap_err();
        assert!(err.to_string().contains("max_boddy_bytes"), "{err}");
    }

    #[test]
    fn a_key_shared_by_two_principals_is_refused() {
        let alpha = KeyDigest::of("sk_test_alpha").to_hex();
        let err = load(
            None,
            env(&[("GATEWAY__ADMIN__API_KEY_SHA256", &format!("[\"{alpha}\"]"))]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("also configured"), "{err}");
    }

    #[test]
    fn sandbox_settings_default_take_overrides_and_are_bounded() {
        let defaults = load(None, Vec::new()).unwrap().settings.sandbox;
        assert!(!defaults.external_sim && defaults.auto_pay);
        assert_eq!(defaults.auto_pay_delay_ms, 500);
        assert_eq!(defaults.sim_ip(), Some([127, 0, 0, 1].into()));
        let set = load(
            None,
            env(&[
                ("GATEWAY__SANDBOX__EXTERNAL_SIM", "true"),
                ("GATEWAY__SANDBOX__AUTO_PAY", "false"),
                ("GATEWAY__SANDBOX__AUTO_PAY_DELAY_MS", "0"),
                ("GATEWAY__SANDBOX__SIM_HOST", "::1"),
            ]),
        )
        .unwrap()
        .settings
        .sandbox;
        assert!(set.external_sim && !set.auto_pay);
        assert_eq!(set.auto_pay_delay_ms, 0);
        assert_eq!(set.sim_ip(), Some(std::net::Ipv6Addr::LOCALHOST.into()));
        let err = load(
            None,
            env(&[
                ("GATEWAY__SANDBOX__AUTO_PAY_DELAY_MS", "3600001"),
                ("GATEWAY__SANDBOX__SIM_HOST", "0.0.0.0"),
            ]),
        )
        .unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"sandbox.auto_pay_delay_ms"), "{err}");
        assert!(fields.contains(&"sandbox.sim_host"), "{err}");
        let err = load(None, env(&[("GATEWAY__SANDBOX__AUTO_PAI", "true")])).unwrap_err();
        assert!(err.to_string().contains("auto_pai"), "{err}");
    }
}
