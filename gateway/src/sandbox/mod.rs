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

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use channel_sim::{Sim, SimHandle};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::channels::keys::{RsaPrivateKey, RsaPublicKey};
use crate::channels::{ChannelKind, ChannelSettings};
use crate::config::{self, Config, ConfigError, FieldError, Mode};
use crate::secret::KeyDigest;

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

/// The WeChat Pay APIv3 key is exactly 32 bytes; the HMAC secrets both sides accept are at
/// least 16; ours are 64 hex characters (256 random bits).
const APIV3_KEY_BYTES: usize = 32;
const MIN_SUPPLIER_SECRET_BYTES: usize = 16;
const SUPPLIER_SECRET_RANDOM_BYTES: usize = 32;
/// The largest key, secret or earlier manifest read back.
const MAX_FILE_BYTES: u64 = 256 * 1024;
/// Tries at finding free ports beyond the number wanted (a port the OS hands out may be one
/// an earlier manifest reserved).
const EXTRA_PORT_TRIES: usize = 16;

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

// --- Keys --------------------------------------------------------------------------------------

/// Which side of a channel holds a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The gateway (it signs its requests with it).
    Gateway,
    /// The simulated channel (it signs replies and callbacks with it).
    Channel,
}

/// An RSA key pair of a kind: the manifest names of its halves, and who holds it.
struct PairDef {
    private: &'static str,
    public: &'static str,
    side: Side,
}

/// A text secret of a kind (held by both sides; listed under `channel_keys`).
#[derive(Clone, Copy)]
enum TextDef {
    ApiV3Key,
    SupplierSecret,
}

impl TextDef {
    fn name(self) -> &'static str {
        match self {
            TextDef::ApiV3Key => "apiv3_key",
            TextDef::SupplierSecret => "supplier_secret",
        }
    }

    fn generate(self) -> String {
        match self {
            TextDef::ApiV3Key => random_alphanumeric(APIV3_KEY_BYTES),
            TextDef::SupplierSecret => {
                let mut bytes = [0u8; SUPPLIER_SECRET_RANDOM_BYTES];
                getrandom::fill(&mut bytes)
                    .expect("the operating system's random generator failed");
                hex::encode(bytes)
            }
        }
    }

    /// Whether a secret read back is usable (the file's surrounding whitespace trimmed).
    fn check(self, value: &str) -> Result<(), String> {
        match self {
            TextDef::ApiV3Key if value.len() != APIV3_KEY_BYTES => {
                Err(format!("an APIv3 key is exactly {APIV3_KEY_BYTES} bytes"))
            }
            TextDef::SupplierSecret if value.len() < MIN_SUPPLIER_SECRET_BYTES => Err(format!(
                "a supplier secret is at least {MIN_SUPPLIER_SECRET_BYTES} bytes"
            )),
            _ => Ok(()),
        }
    }
}

fn rsa_pairs(kind: ChannelKind) -> &'static [PairDef] {
    match kind {
        ChannelKind::Alipay => &[
            PairDef {
                private: "app_private_key",
                public: "app_public_key",
                side: Side::Gateway,
            },
            PairDef {
                private: "alipay_private_key",
                public: "alipay_public_key",
                side: Side::Channel,
            },
        ],
        ChannelKind::Wechatpay => &[
            PairDef {
                private: "merchant_private_key",
                public: "merchant_public_key",
                side: Side::Gateway,
            },
            PairDef {
                private: "platform_private_key",
                public: "platform_public_key",
                side: Side::Channel,
            },
        ],
        ChannelKind::Supplier => &[],
    }
}

fn text_secrets(kind: ChannelKind) -> &'static [TextDef] {
    match kind {
        ChannelKind::Alipay => &[],
        ChannelKind::Wechatpay => &[TextDef::ApiV3Key],
        ChannelKind::Supplier => &[TextDef::SupplierSecret],
    }
}

/// One channel's key files, by manifest name (absolute paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelKeys {
    pub gateway_keys: BTreeMap<&'static str, PathBuf>,
    pub channel_keys: BTreeMap<&'static str, PathBuf>,
    /// WeChat Pay: serials derived from the merchant and platform public keys.
    pub merchant_serial: Option<String>,
    pub platform_serial: Option<String>,
}

/// Makes sure every key and secret of `channels` exists under `keys_dir` (an absolute path),
/// generating what is missing; reads back and checks what exists. Blocking (RSA generation
/// takes a good part of a second per key): run it off the async threads.
pub fn ensure_keys(
    keys_dir: &Path,
    channels: &[ChannelDef],
) -> Result<BTreeMap<&'static str, ChannelKeys>, SandboxError> {
    create_private_dir(keys_dir)?;
    let mut missing = Vec::new();
    for def in channels {
        let dir = keys_dir.join(def.id);
        create_private_dir(&dir)?;
        for pair in rsa_pairs(def.kind) {
            let private = dir.join(format!("{}.pem", pair.private));
            if !exists(&private)? {
                missing.push((private, dir.join(format!("{}.pem", pair.public))));
            }
        }
    }
    generate_pairs(&missing)?;

    let mut all = BTreeMap::new();
    for def in channels {
        let dir = keys_dir.join(def.id);
        let mut keys = ChannelKeys::default();
        for pair in rsa_pairs(def.kind) {
            let private = dir.join(format!("{}.pem", pair.private));
            let public = dir.join(format!("{}.pem", pair.public));
            let public_pem = check_pair(&private, &public)?;
            let serial = wechatpay_serial(&public_pem);
            let side = match pair.side {
                Side::Gateway => {
                    keys.merchant_serial = Some(serial);
                    &mut keys.gateway_keys
                }
                Side::Channel => {
                    keys.platform_serial = Some(serial);
                    &mut keys.channel_keys
                }
            };
            side.insert(pair.private, private);
            side.insert(pair.public, public);
        }
        if def.kind != ChannelKind::Wechatpay {
            keys.merchant_serial = None;
            keys.platform_serial = None;
        }
        for text in text_secrets(def.kind) {
            let path = dir.join(format!("{}.txt", text.name()));
            if exists(&path)? {
                let value = read_limited(&path)?;
                text.check(value.trim())
                    .map_err(|message| SandboxError::Key {
                        path: path.clone(),
                        message,
                    })?;
            } else {
                write_private_file(&path, format!("{}\n", text.generate()).as_bytes())?;
            }
            keys.channel_keys.insert(text.name(), path);
        }
        all.insert(def.id, keys);
    }
    Ok(all)
}

/// Generates the missing pairs, one thread each (at most two per channel, so bounded).
fn generate_pairs(missing: &[(PathBuf, PathBuf)]) -> Result<(), SandboxError> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = missing
            .iter()
            .map(|(private, public)| scope.spawn(move || generate_pair(private, public)))
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("key generation does not panic"))
            .collect::<Result<Vec<()>, SandboxError>>()
    })?;
    Ok(())
}

fn generate_pair(private: &Path, public: &Path) -> Result<(), SandboxError> {
    let key = RsaPrivateKey::generate_2048().map_err(|e| SandboxError::Key {
        path: private.to_owned(),
        message: e.to_string(),
    })?;
    // The public half first: the private file's presence is what marks the pair as made.
    write_private_file(public, key.public_pem.as_bytes())?;
    write_private_file(private, key.private_pem.expose().as_bytes())?;
    tracing::info!(key = %private.display(), "generated a sandbox key");
    Ok(())
}

/// Loads a private key and its public file (written from the private one if missing); they
/// must match. Returns the public key's PEM.
fn check_pair(private: &Path, public: &Path) -> Result<String, SandboxError> {
    let key_error = |path: &Path, message: String| SandboxError::Key {
        path: path.to_owned(),
        message,
    };
    let derived = RsaPrivateKey::from_pem_file(private)
        .map_err(|e| key_error(private, e.to_string()))?
        .public_key()
        .to_pem();
    if !exists(public)? {
        write_private_file(public, derived.as_bytes())?;
        return Ok(derived);
    }
    let stored = RsaPublicKey::from_pem_file(public)
        .map_err(|e| key_error(public, e.to_string()))?
        .to_pem();
    if stored != derived {
        return Err(key_error(
            public,
            format!("is not the public half of {}", private.display()),
        ));
    }
    Ok(derived)
}

/// A WeChat Pay style serial (40 upper-case hex characters) named after the key it belongs
/// to: the first 20 bytes of the SHA-256 of its PEM.
fn wechatpay_serial(public_pem: &str) -> String {
    hex::encode_upper(&Sha256::digest(public_pem.as_bytes())[..20])
}

/// `len` characters of `[A-Za-z0-9]`, uniformly (bytes ≥ 248 are dropped: 248 = 4 × 62).
fn random_alphanumeric(len: usize) -> String {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    const ROUNDS: usize = 64;
    let mut out = String::with_capacity(len);
    let mut bytes = [0u8; 64];
    for _ in 0..ROUNDS {
        getrandom::fill(&mut bytes).expect("the operating system's random generator failed");
        for byte in bytes.iter().filter(|b| **b < 248) {
            if out.len() == len {
                return out;
            }
            out.push(char::from(ALPHABET[usize::from(*byte) % ALPHABET.len()]));
        }
        if out.len() == len {
            return out;
        }
    }
    unreachable!("{ROUNDS} rounds of 64 random bytes give {len} characters");
}

fn exists(path: &Path) -> Result<bool, SandboxError> {
    match fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error(path)(e)),
    }
}

fn read_limited(path: &Path) -> Result<String, SandboxError> {
    let len = fs::metadata(path).map_err(io_error(path))?.len();
    if len > MAX_FILE_BYTES {
        return Err(SandboxError::Key {
            path: path.to_owned(),
            message: format!("is larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    fs::read_to_string(path).map_err(io_error(path))
}

fn create_private_dir(dir: &Path) -> Result<(), SandboxError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_error(dir))
}

/// Writes `contents` to `path` (mode 0600) through a temporary file in the same directory,
/// renamed over it: a reader, or the next start after a crash, sees the old file or the new
/// one, never a part.
fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), SandboxError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        match fs::remove_file(&temporary) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        // The rename itself is durable once the directory is synced.
        #[cfg(unix)]
        fs::File::open(dir)?.sync_all()?;
        Ok(())
    };
    write().map_err(|source| {
        let _ = fs::remove_file(&temporary);
        SandboxError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

// --- Channels and the simulator ----------------------------------------------------------------

/// The manifest's `ids` object: only the ids the kind has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ManifestIds {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mchid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merchant_serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform_serial: Option<String>,
}

/// One channel of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestChannel {
    /// `alipay`, `wechatpay` or `supplier`.
    pub kind: &'static str,
    pub priority: u32,
    pub base_url: String,
    pub callback_url: String,
    pub ids: ManifestIds,
    pub gateway_keys: BTreeMap<&'static str, PathBuf>,
    pub channel_keys: BTreeMap<&'static str, PathBuf>,
}

/// `DIR/sandbox.json` (DESIGN.md §10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    pub merchants: BTreeMap<String, MerchantCredentials>,
    /// `null` when the configuration does not accept the documented admin key.
    pub admin_key: Option<String>,
    pub gateway_url: String,
    pub sim_admin_url: String,
    pub channels: BTreeMap<String, ManifestChannel>,
}

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

/// The manifest entry of an added channel (its ids as the gateway's settings have them, so
/// an override of an id reaches the simulator too).
fn manifest_channel(channel: &Added, callback_url: String) -> ManifestChannel {
    let s = &channel.settings;
    let ids = match s.kind {
        ChannelKind::Alipay => ManifestIds {
            app_id: s.app_id.clone(),
            ..ManifestIds::default()
        },
        ChannelKind::Wechatpay => ManifestIds {
            mchid: s.mchid.clone(),
            appid: s.appid.clone(),
            merchant_serial: s.merchant_serial.clone(),
            platform_serial: channel.keys.platform_serial.clone(),
            ..ManifestIds::default()
        },
        ChannelKind::Supplier => ManifestIds::default(),
    };
    ManifestChannel {
        kind: s.kind.as_str(),
        priority: s.priority,
        base_url: s.base_url.clone(),
        callback_url,
        ids,
        gateway_keys: channel.keys.gateway_keys.clone(),
        channel_keys: channel.keys.channel_keys.clone(),
    }
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

/// The ports of an earlier manifest (admin, channels by id); nothing when there is none or it
/// does not parse.
fn earlier_ports(manifest_path: &Path) -> (Option<u16>, BTreeMap<String, u16>) {
    let Ok(text) = read_limited(manifest_path) else {
        return (None, BTreeMap::new());
    };
    let Ok(manifest) = serde_json::from_str::<serde_json::Value>(&text) else {
        tracing::warn!(
            path = %manifest_path.display(),
            "the earlier sandbox manifest does not parse: choosing new ports"
        );
        return (None, BTreeMap::new());
    };
    let port = |url: &serde_json::Value| {
        url.as_str()
            .and_then(|u| channel_sim::manifest::listen_addr(u).ok())
            .map(|addr| addr.port())
            .filter(|port| *port != 0)
    };
    let admin = port(&manifest["sim_admin_url"]);
    let mut channels = BTreeMap::new();
    if let Some(entries) = manifest["channels"].as_object() {
        for (id, entry) in entries {
            if let Some(p) = port(&entry["base_url"]) {
                channels.insert(id.clone(), p);
            }
        }
    }
    (admin, channels)
}

/// `count` distinct ports that were free on `ip` a moment ago, none of them in `avoid` (all
/// listeners are held until every port is chosen, so they differ from each other). The
/// external simulator binds them later: another process could take one in between, which
/// `channel-sim serve` then reports.
fn free_ports(ip: IpAddr, count: usize, avoid: &BTreeSet<u16>) -> Result<Vec<u16>, SandboxError> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    let path = PathBuf::from(SocketAddr::new(ip, 0).to_string());
    for _ in 0..count + EXTRA_PORT_TRIES {
        if ports.len() == count {
            break;
        }
        let listener =
            std::net::TcpListener::bind(SocketAddr::new(ip, 0)).map_err(io_error(&path))?;
        let port = listener.local_addr().map_err(io_error(&path))?.port();
        if !avoid.contains(&port) {
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

    /// The manifest for a gateway listening on `gateway_addr` (an unspecified address, as in
    /// `0.0.0.0:8080`, is reached on loopback).
    pub fn manifest(&self, gateway_addr: SocketAddr) -> Manifest {
        let mut addr = gateway_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
                IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        let gateway_url = format!("http://{addr}");
        let callback_base = self.public_url.as_deref().unwrap_or(&gateway_url);
        let channels = self
            .channels
            .iter()
            .map(|(id, channel)| {
                let mut channel = channel.clone();
                channel.callback_url = format!("{callback_base}/v1/callbacks/{id}");
                (id.clone(), channel)
            })
            .collect();
        Manifest {
            merchants: self.credentials.merchants.clone(),
            admin_key: self.credentials.admin_key.clone(),
            gateway_url,
            sim_admin_url: self.sim_admin_url.clone(),
            channels,
        }
    }

    /// Writes the manifest atomically (temporary file, then rename; mode 0600).
    pub fn write_manifest(&self, gateway_addr: SocketAddr) -> Result<&Path, SandboxError> {
        let mut text = serde_json::to_vec_pretty(&self.manifest(gateway_addr))
            .expect("the manifest serializes");
        text.push(b'\n');
        write_private_file(&self.manifest_path, &text)?;
        Ok(&self.manifest_path)
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
mod tests {
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
    fn place_fixture_keys(dir: &Path) {
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

    fn env(dir: &Path, pairs: &[(&str, &str)]) -> Vec<(String, String)> {
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

    fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(files_under(&path));
            } else {
                files.insert(path.clone(), fs::read(&path).unwrap());
            }
        }
        files
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn keys_are_generated_once_private_to_the_owner_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join(KEYS_DIR);
        // One channel of each kind: four RSA keys, an APIv3 key and a supplier secret.
        let defs = [CHANNELS[0], CHANNELS[2], CHANNELS[3]];
        let first = ensure_keys(&keys_dir, &defs).unwrap();
        let files = files_under(&keys_dir);
        assert_eq!(files.len(), 10, "{:?}", files.keys());

        let alipay = &first["alipay-main"];
        let app = RsaPrivateKey::from_pem_file(&alipay.gateway_keys["app_private_key"]).unwrap();
        let app_public =
            RsaPublicKey::from_pem_file(&alipay.gateway_keys["app_public_key"]).unwrap();
        assert!(app_public.verify_sha256(b"m", &app.sign_sha256(b"m")));
        let channel = RsaPrivateKey::from_pem_file(&alipay.channel_keys["alipay_private_key"])
            .unwrap()
            .public_key();
        assert_ne!(
            channel.to_pem(),
            app_public.to_pem(),
            "each side its own key"
        );
        let wechat = &first["wechatpay-main"];
        let apiv3 = fs::read_to_string(&wechat.channel_keys["apiv3_key"]).unwrap();
        assert_eq!(apiv3.trim().len(), 32);
        assert!(apiv3.trim().bytes().all(|b| b.is_ascii_alphanumeric()));
        for serial in [&wechat.merchant_serial, &wechat.platform_serial] {
            let serial = serial.as_deref().unwrap();
            assert_eq!(serial.len(), 40);
            assert!(serial
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()));
        }
        assert!(alipay.platform_serial.is_none());
        let secret =
            fs::read_to_string(&first["supplier-main"].channel_keys["supplier_secret"]).unwrap();
        assert!(secret.trim().len() >= 32);
        #[cfg(unix)]
        {
            assert_eq!(mode(&keys_dir), 0o700);
            for path in files.keys() {
                assert_eq!(mode(path), 0o600, "{}", path.display());
            }
        }

        // Later starts reuse every file as it is, and find the same serials.
        let second = ensure_keys(&keys_dir, &defs).unwrap();
        assert_eq!(second, first);
        assert_eq!(files_under(&keys_dir), files);

        // A lost public half is derived again from its private key.
        let public = &wechat.gateway_keys["merchant_public_key"];
        fs::remove_file(public).unwrap();
        ensure_keys(&keys_dir, &defs).unwrap();
        assert_eq!(files_under(&keys_dir), files);

        // A public half that belongs to another key is refused, not replaced.
        fs::copy(&alipay.gateway_keys["app_public_key"], public).unwrap();
        let err = ensure_keys(&keys_dir, &defs).unwrap_err().to_string();
        assert!(err.contains("merchant_public_key.pem"), "{err}");
        assert!(!err.contains("BEGIN"), "no key material in errors: {err}");

        // So is an APIv3 key of the wrong length.
        fs::remove_file(public).unwrap();
        fs::write(&wechat.channel_keys["apiv3_key"], "short\n").unwrap();
        let err = ensure_keys(&keys_dir, &[CHANNELS[2]])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("apiv3_key.txt"), "{err}");
    }

    #[test]
    fn random_secrets_have_their_length_and_alphabet() {
        let a = random_alphanumeric(32);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, random_alphanumeric(32));
        let secret = TextDef::SupplierSecret.generate();
        assert_eq!(secret.len(), 64);
        assert!(TextDef::SupplierSecret.check(&secret).is_ok());
        assert!(TextDef::ApiV3Key
            .check(&TextDef::ApiV3Key.generate())
            .is_ok());
    }

    #[tokio::test]
    async fn the_manifest_has_the_contract_schema_and_channel_sim_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        place_fixture_keys(dir.path());
        let (mut config, overrides) = load_config(
            None,
            env(dir.path(), &[("GATEWAY__SANDBOX__EXTERNAL_SIM", "true")]),
        )
        .unwrap();
        let sandbox = prepare(&mut config, &overrides).await.unwrap();
        assert!(!sandbox.sim_in_process());
        let gateway: SocketAddr = "127.0.0.1:8123".parse().unwrap();
        let path = sandbox.write_manifest(gateway).unwrap().to_owned();
        assert_eq!(path, dir.path().canonicalize().unwrap().join(MANIFEST_FILE));
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);

        let manifest: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let top: BTreeSet<&str> = manifest
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            top,
            BTreeSet::from([
                "merchants",
                "admin_key",
                "gateway_url",
                "sim_admin_url",
                "channels"
            ])
        );
        assert_eq!(
            manifest["merchants"],
            serde_json::json!({
                "alpha": {"api_key": "sk_test_alpha", "webhook_secret": "whsec_test_alpha"},
                "beta": {"api_key": "sk_test_beta", "webhook_secret": "whsec_test_beta"},
            })
        );
        assert_eq!(manifest["admin_key"], "sk_test_admin");
        assert_eq!(manifest["gateway_url"], "http://127.0.0.1:8123");
        assert!(manifest["sim_admin_url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"));
        let channels = manifest["channels"].as_object().unwrap();
        assert_eq!(channels.len(), 5);
        for def in CHANNELS {
            let c = &channels[def.id];
            let fields: BTreeSet<&str> =
                c.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(
                fields,
                BTreeSet::from([
                    "kind",
                    "priority",
                    "base_url",
                    "callback_url",
                    "ids",
                    "gateway_keys",
                    "channel_keys"
                ]),
                "{}",
                def.id
            );
            assert_eq!(c["kind"], def.kind.as_str());
            assert_eq!(c["priority"], def.priority);
            assert_eq!(
                c["callback_url"],
                format!("http://127.0.0.1:8123/v1/callbacks/{}", def.id)
            );
            let ids: BTreeSet<&str> = c["ids"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let expected: BTreeSet<&str> = match def.kind {
                ChannelKind::Alipay => ["app_id"].into(),
                ChannelKind::Wechatpay => {
                    ["mchid", "appid", "merchant_serial", "platform_serial"].into()
                }
                ChannelKind::Supplier => BTreeSet::new(),
            };
            assert_eq!(ids, expected, "{}", def.id);
            for keys in ["gateway_keys", "channel_keys"] {
                for (_, key_path) in c[keys].as_object().unwrap() {
                    let key_path = Path::new(key_path.as_str().unwrap());
                    assert!(key_path.is_absolute() && key_path.exists());
                }
            }
            // The gateway's settings agree with the manifest.
            let settings = &config.settings.channels[def.id];
            assert_eq!(settings.base_url, c["base_url"].as_str().unwrap());
            assert_eq!(settings.priority, def.priority);
            assert_eq!(settings.methods, [def.kind.as_str()]);
        }
        assert_eq!(
            channels["wechatpay-main"]["channel_keys"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            ["apiv3_key", "platform_private_key", "platform_public_key"]
        );

        // `channel-sim serve --manifest` reads it: every channel on its base URL's port.
        let sim = channel_sim::manifest::load(&path).unwrap();
        assert_eq!(sim.channels.len(), 5);
        for spec in &sim.channels {
            let base_url = channels[&spec.id]["base_url"].as_str().unwrap();
            assert_eq!(
                spec.listen,
                Some(channel_sim::manifest::listen_addr(base_url).unwrap())
            );
        }
        assert_eq!(
            sim.admin_listen,
            Some(
                channel_sim::manifest::listen_addr(manifest["sim_admin_url"].as_str().unwrap())
                    .unwrap()
            )
        );

        // A later external start reuses the ports.
        let (mut again, overrides) = load_config(
            None,
            env(dir.path(), &[("GATEWAY__SANDBOX__EXTERNAL_SIM", "true")]),
        )
        .unwrap();
        let second = prepare(&mut again, &overrides).await.unwrap();
        assert_eq!(second.manifest(gateway), sandbox.manifest(gateway));
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
