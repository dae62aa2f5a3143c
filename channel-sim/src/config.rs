//! What the simulator runs: its channels, each with its protocol, identifiers, keys, customer
//! behaviour (auto-pay) and faults, and the callback retry policy. Validated once, at start.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A secret (private key PEM, APIv3 key, supplier secret) whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value, on purpose.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The protocol a channel speaks (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    Alipay,
    Wechatpay,
    Supplier,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Alipay => "alipay",
            ChannelKind::Wechatpay => "wechatpay",
            ChannelKind::Supplier => "supplier",
        }
    }
}

/// The public identifiers of a channel account; which ones a kind needs is checked at start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelIds {
    /// Alipay: the app id every request must carry.
    pub app_id: Option<String>,
    /// WeChat Pay: the merchant id (in the `Authorization` header and the bodies).
    pub mchid: Option<String>,
    /// WeChat Pay: the app id bound to the merchant.
    pub appid: Option<String>,
    /// WeChat Pay: the serial of the merchant certificate whose key signs requests.
    pub merchant_serial: Option<String>,
    /// WeChat Pay: the serial of the platform key that signs replies and callbacks.
    pub platform_serial: Option<String>,
}

/// Faults injected into one channel; all off by default. Settable at start and at run time
/// (`PUT {admin}/channels/{id}/faults`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every request before it is handled.
    pub latency_ms: u64,
    /// Plus a uniform `0..=jitter_ms`.
    pub jitter_ms: u64,
    /// The share of requests (0.0–1.0) answered with the protocol's server error (Alipay
    /// 503, WeChat Pay 500 `SYSTEM_ERROR`, supplier 503) before anything is done.
    pub error_rate: f64,
    /// Seeds the generator behind `error_rate` and `jitter_ms` (reset on every change).
    pub seed: u64,
    /// Accept requests and never answer (the connection stays open until the client gives
    /// up): a timeout, an unknown outcome.
    pub hang: bool,
    /// Stop listening: connections are refused (and open ones dropped) until turned off.
    pub outage: bool,
    /// Refuse new orders in the protocol's business-decline form.
    pub decline: bool,
    /// Wait this long before the first callback attempt.
    pub callback_delay_ms: u64,
    /// Send each acknowledged callback once more.
    pub callback_duplicate: bool,
    /// Never send callbacks (the gateway must query or close).
    pub callback_drop: bool,
}

/// The most `latency_ms + jitter_ms` and `callback_delay_ms` accepted: one hour.
pub const MAX_FAULT_DELAY_MS: u64 = 3_600_000;

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err("error_rate must be between 0.0 and 1.0".into());
        }
        if self.latency_ms.saturating_add(self.jitter_ms) > MAX_FAULT_DELAY_MS
            || self.callback_delay_ms > MAX_FAULT_DELAY_MS
        {
            return Err(format!("delays are limited to {MAX_FAULT_DELAY_MS} ms"));
        }
        Ok(())
    }

    pub(crate) fn error_per_million(&self) -> u32 {
        (self.error_rate * 1_000_000.0).round() as u32
    }
}

/// One simulated channel.
#[derive(Debug, Clone)]
pub struct ChannelSpec {
    /// The channel id (as in the gateway's configuration), `[A-Za-z0-9_-]{1,64}`.
    pub id: String,
    pub kind: ChannelKind,
    /// Where to listen; `None` = `127.0.0.1:0` (a free port, read back from the handle).
    pub listen: Option<SocketAddr>,
    pub ids: ChannelIds,
    /// PEM: the key that verifies the gateway's requests (Alipay app public key, WeChat Pay
    /// merchant public key). A private key PEM is accepted too; its public half is used.
    pub gateway_public_key: Option<String>,
    /// PEM: the channel's own signing key (Alipay's key, the WeChat Pay platform key).
    pub channel_private_key: Option<Secret>,
    /// WeChat Pay: the 32-byte APIv3 key that encrypts callback resources.
    pub apiv3_key: Option<Secret>,
    /// Supplier: the shared HMAC secret (at least 16 bytes).
    pub supplier_secret: Option<Secret>,
    /// Pay every new order after `auto_pay_delay_ms`, as a customer would.
    pub auto_pay: bool,
    pub auto_pay_delay_ms: u64,
    pub faults: Faults,
}

impl ChannelSpec {
    /// A channel with no keys, no ids, no auto-pay and no faults: fill in the rest.
    pub fn new(id: impl Into<String>, kind: ChannelKind) -> Self {
        Self {
            id: id.into(),
            kind,
            listen: None,
            ids: ChannelIds::default(),
            gateway_public_key: None,
            channel_private_key: None,
            apiv3_key: None,
            supplier_secret: None,
            auto_pay: false,
            auto_pay_delay_ms: 0,
            faults: Faults::default(),
        }
    }
}

/// How callbacks are delivered: attempts with exponential backoff until acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackPolicy {
    /// Attempts per notice, the first included (Alipay retries ≈ 8 times, WeChat Pay 15).
    pub max_attempts: u32,
    /// The wait after the first failed attempt; doubled after each further one.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// How long one attempt may take before it counts as failed.
    pub attempt_timeout_ms: u64,
    /// Alipay: send `TRADE_FINISHED` this long after `TRADE_SUCCESS` was acknowledged
    /// (`None`: never).
    pub trade_finished_delay_ms: Option<u64>,
}

impl Default for CallbackPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
            attempt_timeout_ms: 5_000,
            trade_finished_delay_ms: Some(10_000),
        }
    }
}

/// The whole simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub channels: Vec<ChannelSpec>,
    /// The admin API's address; `None` = `127.0.0.1:0`.
    pub admin_listen: Option<SocketAddr>,
    pub callbacks: CallbackPolicy,
    /// Orders kept per channel; a create beyond it is refused as a server error.
    pub max_orders_per_channel: usize,
    /// Where the orders are kept across a restart, as a real channel keeps them (`None`: in
    /// memory only). Loaded at start; written when they changed, at most every
    /// `orders_save_interval_ms`, and at shutdown.
    pub orders_file: Option<PathBuf>,
    pub orders_save_interval_ms: u64,
}

impl SimConfig {
    pub fn new(channels: Vec<ChannelSpec>) -> Self {
        Self {
            channels,
            admin_listen: None,
            callbacks: CallbackPolicy::default(),
            max_orders_per_channel: 1_000_000,
            orders_file: None,
            orders_save_interval_ms: DEFAULT_ORDERS_SAVE_INTERVAL_MS,
        }
    }
}

/// The orders file's name in a sandbox's data dir (beside `sandbox.json`).
pub const ORDERS_FILE_NAME: &str = "channel-sim-orders.json";

/// How often changed orders are written to `orders_file` by default: a `kill -9` loses at
/// most this much of the channel's record.
pub const DEFAULT_ORDERS_SAVE_INTERVAL_MS: u64 = 1_000;

/// The most callback attempts per notice accepted in configuration.
pub const MAX_CALLBACK_ATTEMPTS: u32 = 32;

pub(crate) fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "channel id `{id}` is not 1 to 64 characters of [A-Za-z0-9_-]"
        ));
    }
    Ok(())
}

impl CallbackPolicy {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 || self.max_attempts > MAX_CALLBACK_ATTEMPTS {
            return Err(format!(
                "callbacks.max_attempts must be 1 to {MAX_CALLBACK_ATTEMPTS}"
            ));
        }
        if self.attempt_timeout_ms == 0 || self.max_backoff_ms < self.initial_backoff_ms {
            return Err(
                "callbacks: attempt_timeout_ms must be positive and max_backoff_ms at least \
                 initial_backoff_ms"
                    .into(),
            );
        }
        Ok(())
    }

    /// The wait after failed attempt `attempt` (1-based).
    pub(crate) fn backoff_ms(&self, attempt: u32) -> u64 {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        self.initial_backoff_ms
            .saturating_mul(factor)
            .min(self.max_backoff_ms)
    }
}
