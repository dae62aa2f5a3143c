//! A channel's configuration (`[channels.<id>]`): [`ChannelSettings`], its keys'
//! [`KeySource`]s, their bounds and validation, and the [`BaseUrl`] it calls.

use serde::Deserialize;

use super::client::HttpSettings;
use super::keys;
use super::{ChannelError, ChannelKind};
use crate::money::Currency;
use crate::secret::Secret;

/// A channel's base URL: `http(s)://authority` plus an optional path prefix, with no query,
/// fragment or trailing `/`. Plain `http` only for loopback hosts (the sandbox), so a
/// misconfigured production channel cannot send signed payment calls in clear text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl(String);

impl BaseUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: hyper::Uri = text.parse().map_err(|e| format!("not a URL ({e})"))?;
        let host = uri.host().ok_or("no host")?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if is_loopback(host) => {}
            Some("http") => return Err("plain http is allowed only for loopback hosts".into()),
            _ => return Err("the scheme must be https (or http for loopback)".into()),
        }
        if uri.query().is_some() || text.contains('#') {
            return Err("no query or fragment allowed".into());
        }
        Ok(Self(text.trim_end_matches('/').to_owned()))
    }

    /// `self` + `path_and_query` (which starts with `/`).
    pub fn join(&self, path_and_query: &str) -> Result<hyper::Uri, ChannelError> {
        debug_assert!(path_and_query.starts_with('/'));
        format!("{}{path_and_query}", self.0)
            .parse()
            .map_err(|_| ChannelError::invalid("the request URL does not parse"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where a key or secret comes from: a file (`{ file = "/etc/gateway/alipay-app.pem" }`) or an
/// environment variable (`{ env = "ALIPAY_APP_PRIVATE_KEY" }`). Never the value itself, so a
/// configuration file holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum KeySource {
    File(std::path::PathBuf),
    Env(String),
}

impl KeySource {
    pub(super) fn private_key(&self) -> Result<keys::RsaPrivateKey, keys::KeyError> {
        match self {
            KeySource::File(path) => keys::RsaPrivateKey::from_pem_file(path),
            KeySource::Env(name) => keys::RsaPrivateKey::from_pem_env(name),
        }
    }

    pub(super) fn public_key(&self) -> Result<keys::RsaPublicKey, keys::KeyError> {
        match self {
            KeySource::File(path) => keys::RsaPublicKey::from_pem_file(path),
            KeySource::Env(name) => keys::RsaPublicKey::from_pem_env(name),
        }
    }

    /// A text secret (APIv3 key, supplier secret), surrounding whitespace trimmed; at most
    /// [`keys::MAX_PEM_BYTES`]. Also read by the configuration's production checks.
    pub(crate) fn secret(&self) -> Result<Secret, String> {
        let text = match self {
            KeySource::File(path) => {
                let len = std::fs::metadata(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                    .len();
                if len > keys::MAX_PEM_BYTES as u64 {
                    return Err(format!("{} is too large for a secret", path.display()));
                }
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            }
            KeySource::Env(name) => std::env::var(name)
                .map_err(|_| format!("the environment variable {name} is not set"))?,
        };
        Ok(Secret::new(text.trim()))
    }
}

/// The keys of a channel; which are required depends on its kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelKeySettings {
    /// Alipay: the app's RSA private key (signs requests).
    pub alipay_app_private_key: Option<KeySource>,
    /// Alipay: Alipay's RSA public key (verifies replies and callbacks).
    pub alipay_public_key: Option<KeySource>,
    /// WeChat Pay: the merchant's RSA private key (signs requests).
    pub wechatpay_merchant_private_key: Option<KeySource>,
    /// WeChat Pay: the platform public keys by serial (`Wechatpay-Serial`); several during a
    /// rotation.
    #[serde(default)]
    pub wechatpay_platform_public_keys: std::collections::BTreeMap<String, KeySource>,
    /// WeChat Pay: the 32-byte APIv3 key (decrypts callback resources).
    pub wechatpay_api_v3_key: Option<KeySource>,
    /// Supplier: the shared HMAC secret (at least 16 bytes).
    pub supplier_secret: Option<KeySource>,
}

/// One channel's configuration (DESIGN.md §5). Limits carry their units.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSettings {
    pub kind: ChannelKind,
    /// `https://…` (or `http://` for a loopback sandbox), no trailing path beyond a prefix.
    pub base_url: String,
    /// Alipay `app_id`.
    #[serde(default)]
    pub app_id: Option<String>,
    /// WeChat Pay merchant id.
    #[serde(default)]
    pub mchid: Option<String>,
    /// WeChat Pay app id.
    #[serde(default)]
    pub appid: Option<String>,
    /// WeChat Pay: the serial of the merchant certificate whose key signs requests.
    #[serde(default)]
    pub merchant_serial: Option<String>,
    #[serde(default)]
    pub keys: ChannelKeySettings,
    /// Tier: lower first (1 = primary, 2 = backup, …).
    pub priority: u32,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub fee_bps: u32,
    /// Payment methods, as the API names them (`alipay`, `wechatpay`, `supplier`).
    pub methods: Vec<String>,
    /// ISO 4217 codes; all must have the same number of minor digits (the amount bounds are
    /// read with it).
    pub currencies: Vec<String>,
    /// Decimal strings, inclusive.
    pub min_amount: String,
    pub max_amount: String,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    #[serde(default = "default_max_idle_per_host")]
    pub max_idle_connections_per_host: u32,
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_connection_timeout_ms: u64,
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u32,
    #[serde(default)]
    pub breaker: crate::routing::BreakerSettings,
    #[serde(default = "default_enabled")]
    pub enabled: bool,
}

fn default_weight() -> u32 {
    100
}
fn default_connect_timeout_ms() -> u64 {
    HttpSettings::default().connect_timeout_ms
}
fn default_request_timeout_ms() -> u64 {
    HttpSettings::default().request_timeout_ms
}
fn default_max_in_flight() -> u32 {
    HttpSettings::default().max_in_flight
}
fn default_max_idle_per_host() -> u32 {
    HttpSettings::default().max_idle_per_host as u32
}
fn default_idle_timeout_ms() -> u64 {
    HttpSettings::default().idle_timeout_ms
}
fn default_max_response_bytes() -> u32 {
    HttpSettings::default().max_response_bytes as u32
}
fn default_enabled() -> bool {
    true
}

/// Bounds of the channel settings.
pub const MAX_REQUEST_TIMEOUT_MS: u64 = 120_000;
pub const MAX_IN_FLIGHT: u32 = 10_000;
pub const MAX_IDLE_CONNECTIONS_PER_HOST: u32 = 1_000;
pub const MAX_RESPONSE_BYTES: u32 = 16 * 1024 * 1024;
pub const MAX_CHANNEL_ID_CHARS: usize = 32;

/// A channel that cannot be built: the message names the channel and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("channel `{channel}`: {message}")]
pub struct ChannelSettingsError {
    pub channel: String,
    pub message: String,
}

impl ChannelSettings {
    /// Checks every field that needs no file or variable (those are read by
    /// [`build_channel`](super::build_channel)); the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        BaseUrl::parse(&self.base_url).map_err(|e| format!("base_url: {e}"))?;
        let required = |field: &str, value: &Option<String>| match value {
            Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()) => Ok(()),
            _ => Err(format!(
                "{field} is required for a {} channel (visible ASCII)",
                self.kind
            )),
        };
        let key = |field: &str, present: bool| {
            if present {
                Ok(())
            } else {
                Err(format!(
                    "keys.{field} is required for a {} channel",
                    self.kind
                ))
            }
        };
        match self.kind {
            ChannelKind::Alipay => {
                required("app_id", &self.app_id)?;
                key(
                    "alipay_app_private_key",
                    self.keys.alipay_app_private_key.is_some(),
                )?;
                key("alipay_public_key", self.keys.alipay_public_key.is_some())?;
            }
            ChannelKind::Wechatpay => {
                required("mchid", &self.mchid)?;
                if !self
                    .mchid
                    .as_deref()
                    .unwrap_or("")
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                {
                    return Err("mchid must be digits".into());
                }
                required("appid", &self.appid)?;
                required("merchant_serial", &self.merchant_serial)?;
                key(
                    "wechatpay_merchant_private_key",
                    self.keys.wechatpay_merchant_private_key.is_some(),
                )?;
                key(
                    "wechatpay_platform_public_keys",
                    !self.keys.wechatpay_platform_public_keys.is_empty(),
                )?;
                key(
                    "wechatpay_api_v3_key",
                    self.keys.wechatpay_api_v3_key.is_some(),
                )?;
            }
            ChannelKind::Supplier => {
                key("supplier_secret", self.keys.supplier_secret.is_some())?;
            }
        }
        if self.methods.is_empty() {
            return Err("methods must not be empty".into());
        }
        let (min_minor, max_minor) = self.amount_bounds_minor()?;
        if min_minor > max_minor {
            return Err("min_amount must not exceed max_amount".into());
        }
        let range = |field: &str, value: u64, min: u64, max: u64| {
            if value < min || value > max {
                Err(format!(
                    "{field} must be between {min} and {max}, got {value}"
                ))
            } else {
                Ok(())
            }
        };
        range(
            "request_timeout_ms",
            self.request_timeout_ms,
            1,
            MAX_REQUEST_TIMEOUT_MS,
        )?;
        // A connect timeout at least as long as the request timeout would turn connect
        // failures (certainly not executed) into timeouts (unknown outcome).
        range(
            "connect_timeout_ms",
            self.connect_timeout_ms,
            1,
            self.request_timeout_ms.saturating_sub(1).max(1),
        )?;
        range(
            "max_in_flight",
            u64::from(self.max_in_flight),
            1,
            u64::from(MAX_IN_FLIGHT),
        )?;
        range(
            "max_idle_connections_per_host",
            u64::from(self.max_idle_connections_per_host),
            0,
            u64::from(MAX_IDLE_CONNECTIONS_PER_HOST),
        )?;
        range(
            "idle_connection_timeout_ms",
            self.idle_connection_timeout_ms,
            1,
            3_600_000,
        )?;
        range(
            "max_response_bytes",
            u64::from(self.max_response_bytes),
            1024,
            u64::from(MAX_RESPONSE_BYTES),
        )?;
        range("fee_bps", u64::from(self.fee_bps), 0, 10_000)?;
        self.breaker
            .validate()
            .map_err(|e| format!("breaker.{e}"))?;
        Ok(())
    }

    /// `min_amount` and `max_amount` in minor units of the channel's currencies.
    pub fn amount_bounds_minor(&self) -> Result<(i64, i64), String> {
        let mut digits = None;
        for code in &self.currencies {
            let currency =
                Currency::parse(code).map_err(|_| format!("currencies: unknown `{code}`"))?;
            match digits {
                None => digits = Some(currency),
                Some(first) if first.minor_digits() != currency.minor_digits() => {
                    return Err("currencies must all have the same number of minor digits".into())
                }
                Some(_) => {}
            }
        }
        let currency = digits.ok_or("currencies must not be empty")?;
        let min = crate::money::parse_non_negative_minor(&self.min_amount, currency)
            .map_err(|e| format!("min_amount: {e}"))?;
        let max = crate::money::parse_non_negative_minor(&self.max_amount, currency)
            .map_err(|e| format!("max_amount: {e}"))?;
        Ok((min, max))
    }

    /// The HTTP client limits.
    pub fn http(&self) -> HttpSettings {
        HttpSettings {
            connect_timeout_ms: self.connect_timeout_ms,
            request_timeout_ms: self.request_timeout_ms,
            max_in_flight: self.max_in_flight,
            max_idle_per_host: self.max_idle_connections_per_host as usize,
            idle_timeout_ms: self.idle_connection_timeout_ms,
            max_response_bytes: self.max_response_bytes as usize,
        }
    }

    /// The routing facts of this channel (for [`crate::routing::rank`]); call after
    /// [`ChannelSettings::validate`].
    pub fn route(&self, id: &str) -> Result<crate::routing::ChannelRoute, String> {
        let (min_amount_minor, max_amount_minor) = self.amount_bounds_minor()?;
        Ok(crate::routing::ChannelRoute {
            channel_id: id.to_owned(),
            priority: self.priority,
            weight: self.weight,
            fee_bps: self.fee_bps,
            enabled: self.enabled,
            methods: self.methods.clone(),
            currencies: self.currencies.clone(),
            min_amount_minor,
            max_amount_minor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_require_https_except_on_loopback() {
        assert!(BaseUrl::parse("https://openapi.alipay.com").is_ok());
        assert_eq!(
            BaseUrl::parse("https://api.example.com/prefix/")
                .unwrap()
                .as_str(),
            "https://api.example.com/prefix"
        );
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:9/x",
        ] {
            assert!(BaseUrl::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://api.mch.weixin.qq.com",
            "ftp://x",
            "https://x/?a=1",
            "nope",
            "/path",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
