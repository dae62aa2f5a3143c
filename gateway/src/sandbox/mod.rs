//! The sandbox's channels (DESIGN.md §10): what `gateway serve --sandbox` adds to its
//! configuration before it starts, the simulator that serves them, and the manifest
//! (`DIR/sandbox.json`, DIR = `data_dir`) it leaves for outside tools.
//!
//! - **Keys.** One set per channel under `DIR/keys/<channel id>/`: each sandbox channel
//!   plays an account of its own, so a key mixed up between two channels of a kind fails as
//!   it would in production. Generated on first start (RSA-2048 through aws-lc-rs, files mode
//!   0600 in directories mode 0700, each written to a temporary file and renamed so a crash
//!   never leaves half a key behind), then reused as they are: a private key present is never
//!   replaced. A file is named as the manifest names it (`app_private_key.pem`,
//!   `apiv3_key.txt`, …). WeChat Pay serials are derived from the public keys, so they change
//!   only with the keys, as certificate serials do.
//! - **Channels.** The five of [`CHANNELS`] are added unless the configuration defines one
//!   with the same id: then the configuration's is kept as written, and neither simulated nor
//!   listed in the manifest. Environment overrides reach an added channel as any other
//!   (`GATEWAY__CHANNELS__ALIPAY_MAIN__MAX_IN_FLIGHT=…`): [`load_config`] holds them back
//!   from the file's load (where they would make a half channel) and [`prepare`] applies them.
//!   A `base_url` set that way is also where the simulator listens for that channel.
//! - **Simulator.** `channel-sim` in-process, configured from the very manifest entries that
//!   `channel-sim serve --manifest` reads, on ports the OS picks. With
//!   `sandbox.external_sim` nothing is started: ports are chosen — an earlier manifest's
//!   reused, so a `channel-sim serve` left running stays valid across gateway restarts — and
//!   `channel-sim serve --manifest DIR/sandbox.json` is started by whoever wants it.
//! - **Manifest.** Written by [`Sandbox::write_manifest`] once the gateway listens (its URL
//!   is then known), atomically, mode 0600 (it holds webhook secrets).

mod keys;
mod manifest;

pub use keys::{ensure_keys, ChannelKeys};
pub use manifest::{Manifest, ManifestChannel, ManifestIds};

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use channel_sim::{Sim, SimHandle};
use serde::Serialize;

use crate::channels::{ChannelKind, ChannelSettings};
use crate::config::{self, Config, ConfigError, FieldError, Mode};
use crate::secret::KeyDigest;
use manifest::{earlier_ports, manifest_channel};

/// The manifest's file name under the data dir.
pub const MANIFEST_FILE: &str = "sandbox.json";
/// The keys' directory under the data dir.
pub const KEYS_DIR: &str = "keys";

/// The documented sandbox merchants and their API keys (README, DESIGN.md §10): printed and
/// put in the manifest only when the configuration really accepts them.
pub const MERCHANT_KEYS: &[(&str, &str)] = &[("alpha", "sk_test_alpha"), ("beta", "sk_test_beta")];
/// The documented sandbox admin key.
pub const ADMIN_KEY: &str = "sk_test_admin";

/// One sandbox channel, as DESIGN.md §10 fixes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelDef {
    pub id: &'static str,
    pub kind: ChannelKind,
    pub priority: u32,
    /// Alipay's `app_id`, WeChat Pay's `mchid` and `appid`, where the kind has them.
    pub app_id: Option<&'static str>,
    pub mchid: Option<&'static str>,
    pub appid: Option<&'static str>,
}

/// The sandbox channels.
pub const CHANNELS: [ChannelDef; 5] = [
    ChannelDef {
        id: "alipay-main",
        kind: ChannelKind::Alipay,
        priority: 1,
        app_id: Some("2021000000000001"),
        mchid: None,
        appid: None,
    },
    ChannelDef {
        id: "alipay-backup",
        kind: ChannelKind::Alipay,
        priority: 2,
        app_id: Some("2021000000000002"),
        mchid: None,
        appid: None,
    },
    ChannelDef {
        id: "wechatpay-main",
        kind: ChannelKind::Wechatpay,
        priority: 1,
        app_id: None,
        mchid: Some("1900000001"),
        appid: Some("wx0000000000000001"),
    },
    ChannelDef {
        id: "supplier-main",
        kind: ChannelKind::Supplier,
        priority: 1,
        app_id: None,
        mchid: None,
        appid: None,
    },
    ChannelDef {
        id: "supplier-backup",
        kind: ChannelKind::Supplier,
        priority: 2,
        app_id: None,
        mchid: None,
        appid: None,
    },
];

/// What every sandbox channel accepts (DESIGN.md §10); the rest is the channel defaults.
const CURRENCY: &str = "CNY";
const MIN_AMOUNT: &str = "0.01";
const MAX_AMOUNT: &str = "50000.00";
const REQUEST_TIMEOUT_MS: i64 = 5_000;
const CONNECT_TIMEOUT_MS: i64 = 1_000;

/// Tries at finding free ports beyond the number wanted (a port the OS hands out may be one
/// an earlier manifest reserved).
const EXTRA_PORT_TRIES: usize = 16;

/// The external simulator's ports are drawn from `[QUIET_PORTS_FROM, start of the kernel's
/// ephemeral range)`: above the well-known services, below the ports `bind(0)` and outgoing
/// connections are given (Linux: `/proc/sys/net/ipv4/ip_local_port_range`, 32768 by default).
const QUIET_PORTS_FROM: u16 = 10_000;

/// Random ports tried in the quiet range per port wanted before falling back to `bind(0)`.
const QUIET_PORT_TRIES: usize = 64;

/// The target of the log events of `keys` and `manifest`: the module's, where they were
/// written before the split, kept so log filters and readers see no change.
const LOG_TARGET: &str = "gateway::sandbox";

/// Why the sandbox could not be prepared. Messages name the file or field, never a key.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message} (delete the channel's key files to generate new ones)")]
    Key { path: PathBuf, message: String },
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("channel simulator: {0}")]
    Sim(#[from] channel_sim::SimError),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError + '_ {
    move |source| SandboxError::Io {
        path: path.to_owned(),
        source,
    }
}

fn config_error(field: impl Into<String>, message: impl Into<String>) -> SandboxError {
    SandboxError::Config(ConfigError(vec![FieldError {
        field: field.into(),
        message: message.into(),
    }]))
}

// --- Configuration -----------------------------------------------------------------------------

/// Loads the configuration for `serve --sandbox` as [`config::load`] does, except for the
/// environment overrides of sandbox channels the file does not define: those are returned,
/// for [`prepare`] to apply once it has added the channels.
pub fn load_config(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(Config, Vec<(String, String)>), ConfigError> {
    let (held, mut passed): (Vec<_>, Vec<_>) = env
        .into_iter()
        .partition(|(name, _)| sandbox_channel_of(name).is_some());
    let config = config::load_for(Mode::Sandbox, file, passed.clone())?;
    let defined = |name: &str| {
        let target = sandbox_channel_of(name).map(config::normalize_name);
        config
            .settings
            .channels
            .keys()
            .any(|id| Some(config::normalize_name(id)) == target)
    };
    let (for_file, for_sandbox): (Vec<_>, Vec<_>) =
        held.into_iter().partition(|(name, _)| defined(name));
    if for_file.is_empty() {
        return Ok((config, for_sandbox));
    }
    // Rare: the file defines a sandbox channel and the environment overrides it.
    passed.extend(for_file);
    Ok((config::load_for(Mode::Sandbox, file, passed)?, for_sandbox))
}

/// The sandbox channel a `GATEWAY__CHANNELS__<ID>__…` override names, if any.
fn sandbox_channel_of(name: &str) -> Option<&'static str> {
    let mut segments = name.strip_prefix(config::ENV_PREFIX)?.split("__");
    if config::normalize_name(segments.next()?) != "channels" {
        return None;
    }
    let id = config::normalize_name(segments.next()?);
    CHANNELS
        .iter()
        .find(|def| config::normalize_name(def.id) == id)
        .map(|def| def.id)
}

/// The documented credentials the configuration accepts (DESIGN.md §10).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Credentials {
    /// Merchant id → its API key and webhook secret.
    pub merchants: BTreeMap<String, MerchantCredentials>,
    pub admin_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MerchantCredentials {
    pub api_key: String,
    pub webhook_secret: String,
}

/// The documented sandbox keys, each only if the configuration accepts it.
pub fn credentials(config: &Config) -> Credentials {
    let mut merchants = BTreeMap::new();
    for (merchant_id, key) in MERCHANT_KEYS {
        let digest = KeyDigest::of(key);
        if let Some(merchant) = config.merchants.iter().find(|m| {
            m.id.as_str() == *merchant_id && m.key_digests.iter().any(|d| d.ct_eq(&digest))
        }) {
            merchants.insert(
                (*merchant_id).to_owned(),
                MerchantCredentials {
                    api_key: (*key).to_owned(),
                    webhook_secret: merchant.webhook_secret.expose().to_owned(),
                },
            );
        }
    }
    let admin = KeyDigest::of(ADMIN_KEY);
    let admin_key = config
        .admin_key_digests
        .iter()
        .any(|d| d.ct_eq(&admin))
        .then(|| ADMIN_KEY.to_owned());
    Credentials {
        merchants,
        admin_key,
    }
}

// --- Channels and the simulator ----------------------------------------------------------------

/// The sandbox channels, prepared: the in-process simulator (kept alive by this value) and
/// what the manifest says.
pub struct Sandbox {
    manifest_path: PathBuf,
    sim: Option<SimHandle>,
    sim_admin_url: String,
    auto_pay: bool,
    auto_pay_delay_ms: u64,
    credentials: Credentials,
    /// `server.public_url`, when set: where channels reach the gateway.
    public_url: Option<String>,
    channels: BTreeMap<String, ManifestChannel>,
}

/// A sandbox channel being added: its settings (overrides applied) and its keys.
struct Added {
    def: ChannelDef,
    settings: ChannelSettings,
    keys: ChannelKeys,
    /// The environment set `base_url`: the simulator listens there.
    fixed_base_url: bool,
}

/// Adds the sandbox channels to `config` (keys made or reused, `channel_overrides` from
/// [`load_config`] applied, every setting validated), and starts the in-process simulator
/// unless `sandbox.external_sim`. Call before `Application::build`, then
/// [`Sandbox::write_manifest`] once the gateway listens.
pub async fn prepare(
    config: &mut Config,
    channel_overrides: &[(String, String)],
) -> Result<Sandbox, SandboxError> {
    let settings = config.settings.sandbox.clone();
    let sim_ip = settings
        .sim_ip()
        .ok_or_else(|| config_error("sandbox.sim_host", "must be a loopback IP address"))?;
    let data_dir = &config.settings.data_dir;
    fs::create_dir_all(data_dir).map_err(io_error(data_dir))?;
    let dir = fs::canonicalize(data_dir).map_err(io_error(data_dir))?;

    let defs: Vec<ChannelDef> = CHANNELS
        .iter()
        .filter(|def| {
            let defined = config.settings.channels.contains_key(def.id);
            if defined {
                tracing::info!(
                    channel = def.id,
                    "the configuration defines this sandbox channel: kept as written, not simulated"
                );
            }
            !defined
        })
        .copied()
        .collect();
    if config.settings.channels.len() + defs.len() > crate::routing::MAX_CANDIDATES {
        return Err(config_error(
            "channels",
            format!(
                "at most {} channels, the {} sandbox channels included",
                crate::routing::MAX_CANDIDATES,
                defs.len()
            ),
        ));
    }
    let keys_dir = dir.join(KEYS_DIR);
    let keys = {
        let defs = defs.clone();
        tokio::task::spawn_blocking(move || ensure_keys(&keys_dir, &defs))
            .await
            .expect("key generation does not panic")?
    };
    let mut added = add_channels(&defs, keys, channel_overrides, sim_ip)?;

    let manifest_path = dir.join(MANIFEST_FILE);
    let (sim, sim_admin_url) = if settings.external_sim {
        (
            None,
            choose_external_ports(&mut added, &manifest_path, sim_ip)?,
        )
    } else {
        let sim = start_sim(
            &added,
            &dir,
            sim_ip,
            settings.auto_pay,
            settings.auto_pay_delay_ms,
        )
        .await?;
        for channel in added.iter_mut().filter(|c| !c.fixed_base_url) {
            channel.settings.base_url = sim
                .channel_url(channel.def.id)
                .expect("the simulator serves every channel it was given")
                .to_owned();
        }
        let admin = sim.admin_url().to_owned();
        (Some(sim), admin)
    };

    let mut channels = BTreeMap::new();
    for channel in added {
        channels.insert(
            channel.def.id.to_owned(),
            manifest_channel(&channel, String::new()),
        );
        config
            .settings
            .channels
            .insert(channel.def.id.to_owned(), channel.settings);
    }
    let public_url = Some(config.settings.server.public_url.clone()).filter(|u| !u.is_empty());
    Ok(Sandbox {
        manifest_path,
        sim,
        sim_admin_url,
        auto_pay: settings.auto_pay,
        auto_pay_delay_ms: settings.auto_pay_delay_ms,
        credentials: credentials(config),
        public_url,
        channels,
    })
}

/// The sandbox channels' settings: the fixed values, the keys, then the environment's
/// overrides; validated as the configuration's own channels are. `base_url` stays a
/// placeholder (a loopback URL) unless the environment set it.
fn add_channels(
    defs: &[ChannelDef],
    mut keys: BTreeMap<&'static str, ChannelKeys>,
    overrides: &[(String, String)],
    sim_ip: IpAddr,
) -> Result<Vec<Added>, SandboxError> {
    let mut tables = toml::Table::new();
    for def in defs {
        tables.insert(
            def.id.to_owned(),
            toml::Value::Table(settings_table(def, &keys[def.id])),
        );
    }
    let mut root = toml::Table::new();
    root.insert("channels".into(), toml::Value::Table(tables));
    let ours: Vec<(String, String)> = overrides
        .iter()
        .filter(|(name, _)| {
            sandbox_channel_of(name).is_some_and(|id| defs.iter().any(|d| d.id == id))
        })
        .cloned()
        .collect();
    config::apply_overrides(&mut root, &ours)?;
    let mut tables = match root.remove("channels") {
        Some(toml::Value::Table(tables)) => tables,
        _ => unreachable!("the channels table was made above and overrides keep sections"),
    };
    let mut added = Vec::new();
    for def in defs {
        let field = format!("channels.{}", def.id);
        let Some(toml::Value::Table(mut table)) = tables.remove(def.id) else {
            unreachable!("the channel's table was made above and overrides keep sections");
        };
        let fixed_base_url = table.contains_key("base_url");
        if !fixed_base_url {
            table.insert(
                "base_url".into(),
                toml::Value::String(format!("http://{}", SocketAddr::new(sim_ip, 1))),
            );
        }
        let settings: ChannelSettings = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| config_error(&field, e.message()))?;
        settings
            .validate()
            .map_err(|message| config_error(&field, message))?;
        if settings.kind != def.kind {
            return Err(config_error(
                format!("{field}.kind"),
                format!("a sandbox channel's kind is fixed ({})", def.kind),
            ));
        }
        added.push(Added {
            def: *def,
            settings,
            keys: keys
                .remove(def.id)
                .expect("keys were made for every channel"),
            fixed_base_url,
        });
    }
    Ok(added)
}

/// A sandbox channel's settings as the configuration file would hold them.
fn settings_table(def: &ChannelDef, keys: &ChannelKeys) -> toml::Table {
    fn string(value: impl Into<String>) -> toml::Value {
        toml::Value::String(value.into())
    }
    fn file(path: &Path) -> toml::Value {
        let mut source = toml::Table::new();
        source.insert("file".into(), string(path.display().to_string()));
        toml::Value::Table(source)
    }
    let mut table = toml::Table::new();
    table.insert("kind".into(), string(def.kind.as_str()));
    table.insert("priority".into(), toml::Value::Integer(def.priority.into()));
    table.insert(
        "methods".into(),
        toml::Value::Array(vec![string(def.kind.as_str())]),
    );
    table.insert(
        "currencies".into(),
        toml::Value::Array(vec![string(CURRENCY)]),
    );
    table.insert("min_amount".into(), string(MIN_AMOUNT));
    table.insert("max_amount".into(), string(MAX_AMOUNT));
    table.insert(
        "request_timeout_ms".into(),
        toml::Value::Integer(REQUEST_TIMEOUT_MS),
    );
    table.insert(
        "connect_timeout_ms".into(),
        toml::Value::Integer(CONNECT_TIMEOUT_MS),
    );
    let mut key_table = toml::Table::new();
    match def.kind {
        ChannelKind::Alipay => {
            table.insert("app_id".into(), string(def.app_id.unwrap_or_default()));
            key_table.insert(
                "alipay_app_private_key".into(),
                file(&keys.gateway_keys["app_private_key"]),
            );
            key_table.insert(
                "alipay_public_key".into(),
                file(&keys.channel_keys["alipay_public_key"]),
            );
        }
        ChannelKind::Wechatpay => {
            table.insert("mchid".into(), string(def.mchid.unwrap_or_default()));
            table.insert("appid".into(), string(def.appid.unwrap_or_default()));
            table.insert(
                "merchant_serial".into(),
                string(keys.merchant_serial.clone().unwrap_or_default()),
            );
            key_table.insert(
                "wechatpay_merchant_private_key".into(),
                file(&keys.gateway_keys["merchant_private_key"]),
            );
            let mut platform = toml::Table::new();
            platform.insert(
                keys.platform_serial.clone().unwrap_or_default(),
                file(&keys.channel_keys["platform_public_key"]),
            );
            key_table.insert(
                "wechatpay_platform_public_keys".into(),
                toml::Value::Table(platform),
            );
            key_table.insert(
                "wechatpay_api_v3_key".into(),
                file(&keys.channel_keys["apiv3_key"]),
            );
        }
        ChannelKind::Supplier => {
            key_table.insert(
                "supplier_secret".into(),
                file(&keys.channel_keys["supplier_secret"]),
            );
        }
    }
    table.insert("keys".into(), toml::Value::Table(key_table));
    table
}

/// Starts the in-process simulator from the channels' manifest entries — exactly what
/// `channel-sim serve --manifest` would read — on OS-chosen ports (or the environment's
/// `base_url`).
async fn start_sim(
    added: &[Added],
    dir: &Path,
    sim_ip: IpAddr,
    auto_pay: bool,
    auto_pay_delay_ms: u64,
) -> Result<SimHandle, SandboxError> {
    let any_port = format!("http://{}", SocketAddr::new(sim_ip, 0));
    let channels = added
        .iter()
        .map(|channel| {
            let mut entry = manifest_channel(channel, String::new());
            if !channel.fixed_base_url {
                entry.base_url.clone_from(&any_port);
            }
            (channel.def.id.to_owned(), entry)
        })
        .collect();
    let manifest = Manifest {
        merchants: BTreeMap::new(),
        admin_key: None,
        gateway_url: String::new(),
        sim_admin_url: any_port.clone(),
        channels,
    };
    let text = serde_json::to_string(&manifest).expect("the manifest serializes");
    let mut sim_config = channel_sim::manifest::parse(&text, dir)?;
    // As a real channel, the simulator remembers its orders across a restart: a pending
    // supplier charge made before it is still queried, closed or paid afterwards.
    sim_config.orders_file = Some(dir.join(channel_sim::config::ORDERS_FILE_NAME));
    for channel in &mut sim_config.channels {
        channel.auto_pay = auto_pay;
        channel.auto_pay_delay_ms = auto_pay_delay_ms;
    }
    Ok(Sim::start(sim_config).await?)
}

/// External simulator: the channels' and the admin API's ports, each reused from the
/// manifest of an earlier start when it has one, else a free loopback port; writes them into
/// the channels' `base_url`. Returns the admin URL.
fn choose_external_ports(
    added: &mut [Added],
    manifest_path: &Path,
    sim_ip: IpAddr,
) -> Result<String, SandboxError> {
    let (earlier_admin, earlier) = earlier_ports(manifest_path);
    let mut reserved: BTreeSet<u16> = earlier.values().copied().collect();
    reserved.extend(earlier_admin);
    for channel in added.iter().filter(|c| c.fixed_base_url) {
        if let Ok(addr) = channel_sim::manifest::listen_addr(&channel.settings.base_url) {
            reserved.insert(addr.port());
        }
    }
    let wanted = added
        .iter()
        .filter(|c| !c.fixed_base_url && !earlier.contains_key(c.def.id))
        .count()
        + usize::from(earlier_admin.is_none());
    let mut fresh = free_ports(sim_ip, wanted, &reserved)?.into_iter();
    let url = |port: u16| format!("http://{}", SocketAddr::new(sim_ip, port));
    for channel in added.iter_mut().filter(|c| !c.fixed_base_url) {
        let port = match earlier.get(channel.def.id) {
            Some(port) => *port,
            None => fresh.next().expect("free_ports returns as many as wanted"),
        };
        channel.settings.base_url = url(port);
    }
    let admin = match earlier_admin {
        Some(port) => port,
        None => fresh.next().expect("free_ports returns as many as wanted"),
    };
    Ok(url(admin))
}

/// `count` distinct ports that were free on `ip` a moment ago, none of them in `avoid` (all
/// listeners are held until every port is chosen, so they differ from each other). The
/// external simulator binds them later: another process could take one in between, which
/// `channel-sim serve` then reports. To make that rare they come from below the kernel's
/// ephemeral range ([`QUIET_PORTS_FROM`]), which no `bind(0)` and no outgoing connection of
/// another process draws from; where that range is unknown, from `bind(0)`.
fn free_ports(ip: IpAddr, count: usize, avoid: &BTreeSet<u16>) -> Result<Vec<u16>, SandboxError> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    if let Some(end) = ephemeral_start().filter(|end| *end > QUIET_PORTS_FROM) {
        let span = u64::from(end - QUIET_PORTS_FROM);
        for _ in 0..count * QUIET_PORT_TRIES {
            if ports.len() == count {
                return Ok(ports);
            }
            let port = QUIET_PORTS_FROM + (crate::ids::random_u64() % span) as u16;
            if avoid.contains(&port) || ports.contains(&port) {
                continue;
            }
            if let Ok(listener) = std::net::TcpListener::bind(SocketAddr::new(ip, port)) {
                ports.push(port);
                held.push(listener);
            }
        }
    }
    let path = PathBuf::from(SocketAddr::new(ip, 0).to_string());
    for _ in 0..count + EXTRA_PORT_TRIES {
        if ports.len() == count {
            break;
        }
        let listener =
            std::net::TcpListener::bind(SocketAddr::new(ip, 0)).map_err(io_error(&path))?;
        let port = listener.local_addr().map_err(io_error(&path))?.port();
        if !avoid.contains(&port) && !ports.contains(&port) {
            ports.push(port);
        }
        held.push(listener);
    }
    if ports.len() < count {
        return Err(SandboxError::Io {
            path,
            source: std::io::Error::new(ErrorKind::AddrInUse, "no free ports"),
        });
    }
    Ok(ports)
}

/// The first port of the kernel's ephemeral range, where the system says (Linux).
fn ephemeral_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

impl Sandbox {
    /// `DIR/sandbox.json` (absolute).
    pub fn manifest_path(&self) -> &Path {
        &self.manifest_path
    }

    pub fn sim_admin_url(&self) -> &str {
        &self.sim_admin_url
    }

    /// Whether the simulator runs in this process.
    pub fn sim_in_process(&self) -> bool {
        self.sim.is_some()
    }

    /// What the start banner says about the channels (URLs and paths; no secret).
    pub fn banner(&self) -> String {
        let mut out = format!("  manifest: {}\n", self.manifest_path.display());
        if self.sim.is_some() {
            let pay = if self.auto_pay {
                format!("auto-pay after {} ms", self.auto_pay_delay_ms)
            } else {
                "auto-pay off".to_owned()
            };
            out.push_str(&format!(
                "  channel simulator (in-process, {pay}): admin {}\n",
                self.sim_admin_url
            ));
        } else {
            out.push_str(&format!(
                "  channel simulator: external, admin {}\n",
                self.sim_admin_url
            ));
            out.push_str(&format!(
                "  start it: channel-sim serve --manifest {}\n",
                self.manifest_path.display()
            ));
        }
        for (id, channel) in &self.channels {
            out.push_str(&format!(
                "  channel {id} ({}, priority {}): {}\n",
                channel.kind, channel.priority, channel.base_url
            ));
        }
        out
    }

    /// Stops the in-process simulator (listeners closed, pending callbacks dropped).
    pub async fn shutdown(self) {
        if let Some(sim) = self.sim {
            sim.shutdown().await;
        }
    }
}

#[cfg(test)]
mod test_support {
    //! The fixtures of the sandbox tests.
    use super::*;

    const MERCHANT_PKCS8: &str =
        include_str!("../../tests/fixtures/keys/test-only-merchant-rsa2048.pkcs8.pem");
    const MERCHANT_SPKI: &str =
        include_str!("../../tests/fixtures/keys/test-only-merchant-rsa2048.spki.pem");
    const PLATFORM_PKCS1: &str =
        include_str!("../../tests/fixtures/keys/test-only-platform-rsa2048.pkcs1.pem");
    const PLATFORM_SPKI: &str =
        include_str!("../../tests/fixtures/keys/test-only-platform-rsa2048.spki.pem");

    /// The fixture keys in place of generated ones (generation is slow in debug builds).
    pub(super) fn place_fixture_keys(dir: &Path) {
        for def in CHANNELS {
            let channel = dir.join(KEYS_DIR).join(def.id);
            fs::create_dir_all(&channel).unwrap();
            let write = |name: &str, text: &str| fs::write(channel.join(name), text).unwrap();
            match def.kind {
                ChannelKind::Alipay => {
                    write("app_private_key.pem", MERCHANT_PKCS8);
                    write("app_public_key.pem", MERCHANT_SPKI);
                    write("alipay_private_key.pem", PLATFORM_PKCS1);
                    write("alipay_public_key.pem", PLATFORM_SPKI);
                }
                ChannelKind::Wechatpay => {
                    write("merchant_private_key.pem", MERCHANT_PKCS8);
                    write("merchant_public_key.pem", MERCHANT_SPKI);
                    write("platform_private_key.pem", PLATFORM_PKCS1);
                    write("platform_public_key.pem", PLATFORM_SPKI);
                    write("apiv3_key.txt", "TestOnlyApiV3Key0123456789abcdef\n");
                }
                ChannelKind::Supplier => write(
                    "supplier_secret.txt",
                    "test_only_supplier_secret_0123456789\n",
                ),
            }
        }
    }

    pub(super) fn env(dir: &Path, pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = vec![
            ("GATEWAY__DATA_DIR".to_owned(), dir.display().to_string()),
            (
                "GATEWAY__SERVER__LISTEN".to_owned(),
                "127.0.0.1:0".to_owned(),
            ),
        ];
        env.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }

    #[cfg(unix)]
    pub(super) fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    /// The external simulator's ports are distinct, free, outside what the caller reserved,
    /// and below the ephemeral range, so no other process's `bind(0)` or outgoing connection
    /// takes one before `channel-sim` binds it.
    #[test]
    fn free_ports_come_from_below_the_ephemeral_range() {
        let ip = IpAddr::from([127, 0, 0, 1]);
        let avoid: BTreeSet<u16> = (QUIET_PORTS_FROM..QUIET_PORTS_FROM + 2_000).collect();
        let ports = free_ports(ip, 6, &avoid).unwrap();
        assert_eq!(ports.len(), 6);
        assert_eq!(ports.iter().collect::<BTreeSet<_>>().len(), 6, "{ports:?}");
        // A machine whose ephemeral range starts below the quiet range has none: bind(0) then.
        let quiet = ephemeral_start()
            .filter(|end| *end > QUIET_PORTS_FROM)
            .map(|end| QUIET_PORTS_FROM..end);
        for port in &ports {
            assert!(!avoid.contains(port), "{port} was reserved");
            if let Some(quiet) = &quiet {
                assert!(quiet.contains(port), "{port} not in {quiet:?}");
            }
            std::net::TcpListener::bind(SocketAddr::new(ip, *port))
                .unwrap_or_else(|e| panic!("{port} is not free: {e}"));
        }
    }

    /// The key halves are where each side looks for them: the gateway's own adapters, built
    /// from the added settings, create orders the in-process simulator accepts and read back
    /// its signed answers.
    #[tokio::test]
    async fn the_gateways_adapters_and_the_in_process_simulator_agree() {
        use crate::channels::{build_channel, CreateOrder, OrderState};
        use crate::ids::{MerchantId, PaymentId, ScopeTag};
        use crate::money::{Amount, Currency};

        let dir = tempfile::tempdir().unwrap();
        place_fixture_keys(dir.path());
        let (mut config, held) = load_config(
            None,
            env(dir.path(), &[("GATEWAY__SANDBOX__AUTO_PAY", "false")]),
        )
        .unwrap();
        let sandbox = prepare(&mut config, &held).await.unwrap();
        let sim = sandbox.sim.as_ref().unwrap();
        for def in CHANNELS {
            let channel = build_channel(def.id, &config.settings.channels[def.id]).unwrap();
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let tag = ScopeTag::merchant(&MerchantId::parse("alpha").unwrap());
            let order = CreateOrder {
                order_id: crate::channels::ChannelOrderId::for_attempt(
                    &PaymentId::generate(tag, now_ms),
                    1,
                ),
                amount: Amount::from_minor(1234).unwrap(),
                currency: Currency::Cny,
                description: "sandbox".into(),
                notify_url: format!("http://127.0.0.1:1/v1/callbacks/{}", def.id),
                expires_at_ms: now_ms + 600_000,
            };
            channel
                .create_order(&order)
                .await
                .unwrap_or_else(|e| panic!("{}: {e:?}", def.id));
            assert!(matches!(
                sim.pay(order.order_id.as_str()),
                channel_sim::PayOutcome::Paid(_)
            ));
            let state = channel
                .query(&order.order_id)
                .await
                .unwrap_or_else(|e| panic!("{}: {e:?}", def.id));
            assert!(
                matches!(
                    state,
                    OrderState::Paid {
                        amount_minor: 1234,
                        ..
                    }
                ),
                "{}: {state:?}",
                def.id
            );
        }
        sandbox.shutdown().await;
    }

    #[tokio::test]
    async fn overrides_reach_added_channels_and_a_configured_channel_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        place_fixture_keys(dir.path());
        let overrides = [
            ("GATEWAY__CHANNELS__ALIPAY_BACKUP__MAX_IN_FLIGHT", "7"),
            (
                "GATEWAY__CHANNELS__SUPPLIER_MAIN__BREAKER__MINIMUM_CALLS",
                "3",
            ),
            ("GATEWAY__CHANNELS__WECHATPAY_MAIN__APPID", "wx_overridden"),
            ("GATEWAY__SANDBOX__AUTO_PAY", "false"),
        ];
        let (mut config, held) = load_config(None, env(dir.path(), &overrides)).unwrap();
        assert_eq!(
            held.len(),
            3,
            "channel overrides wait for prepare: {held:?}"
        );
        assert!(!config.settings.sandbox.auto_pay);
        let sandbox = prepare(&mut config, &held).await.unwrap();
        assert!(sandbox.sim_in_process());
        let channels = &config.settings.channels;
        assert_eq!(channels["alipay-backup"].max_in_flight, 7);
        assert_eq!(channels["supplier-main"].breaker.minimum_calls, 3);
        let manifest = sandbox.manifest("127.0.0.1:1".parse().unwrap());
        assert_eq!(
            manifest.channels["wechatpay-main"].ids.appid.as_deref(),
            Some("wx_overridden"),
            "the simulator is configured with the overridden id"
        );
        assert!(sandbox.banner().contains("auto-pay off"));
        sandbox.shutdown().await;

        // A bad override names its field.
        let (_, held) = load_config(
            None,
            env(
                dir.path(),
                &[("GATEWAY__CHANNELS__ALIPAY_MAIN__MIN_AMOUNT", "-1")],
            ),
        )
        .unwrap();
        let mut config = load_config(None, env(dir.path(), &[])).unwrap().0;
        let err = prepare(&mut config, &held).await.err().unwrap().to_string();
        assert!(err.contains("channels.alipay-main"), "{err}");

        // A configuration that defines a sandbox id keeps its own channel, overrides applied.
        let file = dir.path().join("gateway.toml");
        let own = r#"
[channels.supplier-main]
kind = "supplier"
base_url = "https://supplier.example.com"
priority = 3
methods = ["supplier"]
currencies = ["CNY"]
min_amount = "1.00"
max_amount = "10.00"
keys = { supplier_secret = { env = "SUPPLIER_SECRET" } }
"#;
        fs::write(&file, format!("{}\n{own}", config::SANDBOX_TOML)).unwrap();
        let (mut config, held) = load_config(
            Some(&file),
            env(
                dir.path(),
                &[("GATEWAY__CHANNELS__SUPPLIER_MAIN__FEE_BPS", "25")],
            ),
        )
        .unwrap();
        assert!(held.is_empty());
        assert_eq!(config.settings.channels["supplier-main"].fee_bps, 25);
        let sandbox = prepare(&mut config, &held).await.unwrap();
        let supplier = &config.settings.channels["supplier-main"];
        assert_eq!(
            (supplier.priority, supplier.base_url.as_str()),
            (3, "https://supplier.example.com")
        );
        let manifest = sandbox.manifest("127.0.0.1:1".parse().unwrap());
        assert_eq!(manifest.channels.len(), 4);
        assert!(!manifest.channels.contains_key("supplier-main"));
        sandbox.shutdown().await;
    }
}
