//! The sandbox's five channels for in-process test apps: one `channel-sim` serving
//! `alipay-main` (priority 1), `alipay-backup` (2), `wechatpay-main` (1), `supplier-main` (1)
//! and `supplier-backup` (2) on loopback, with the test-only fixture keys, and the gateway's
//! `ChannelSettings` pointing at them (DESIGN.md §10's names and priorities).

use std::collections::BTreeMap;
use std::path::PathBuf;

use channel_sim::{
    CallbackPolicy, ChannelKind as SimKind, ChannelSpec, Faults, OrderRecord, Secret as SimSecret,
    Sim, SimConfig, SimHandle,
};
use gateway::channels::{ChannelKind, ChannelSettings, KeySource};
use gateway::routing::BreakerSettings;

pub const ALIPAY_MAIN: &str = "alipay-main";
pub const ALIPAY_BACKUP: &str = "alipay-backup";
pub const WECHATPAY_MAIN: &str = "wechatpay-main";
pub const SUPPLIER_MAIN: &str = "supplier-main";
pub const SUPPLIER_BACKUP: &str = "supplier-backup";

pub const MCHID: &str = "1900000109";
pub const APPID: &str = "wxd678efh567hg6787";
const MERCHANT_SERIAL: &str = "3775B6A45ACD588826D15E583A95F5DD0FFB9C4E";
pub const PLATFORM_SERIAL: &str = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";
pub const API_V3_KEY: &str = "TestOnlyApiV3Key0123456789abcdef";
pub const SUPPLIER_SECRET: &str = "whsec_test_only_supplier_0123456789";

pub const MERCHANT_PRIVATE: &str = "test-only-merchant-rsa2048.pkcs8.pem";
const MERCHANT_PUBLIC: &str = "test-only-merchant-rsa2048.spki.pem";
pub const PLATFORM_PRIVATE: &str = "test-only-platform-rsa2048.pkcs1.pem";
const PLATFORM_PUBLIC: &str = "test-only-platform-rsa2048.spki.pem";

/// What a test changes from the quiet defaults (no auto-pay, 2 s request timeout, the
/// default breaker, one quick callback attempt).
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    pub auto_pay: bool,
    pub auto_pay_delay_ms: u64,
    pub request_timeout_ms: u64,
    pub max_in_flight: u32,
    pub breaker: BreakerSettings,
    pub callbacks: CallbackPolicy,
    /// This channel's gateway side signs with a key the simulator does not know.
    pub wrong_key_for: Option<&'static str>,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            auto_pay: false,
            auto_pay_delay_ms: 0,
            request_timeout_ms: 2_000,
            max_in_flight: 64,
            breaker: BreakerSettings::default(),
            callbacks: CallbackPolicy {
                max_attempts: 1,
                initial_backoff_ms: 50,
                max_backoff_ms: 50,
                attempt_timeout_ms: 1_000,
                trade_finished_delay_ms: None,
            },
            wrong_key_for: None,
        }
    }
}

/// The running simulator and the gateway's settings for its channels.
pub struct SimChannels {
    pub sim: SimHandle,
    pub settings: BTreeMap<String, ChannelSettings>,
    _secrets: tempfile::TempDir,
}

pub fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

fn key_pem(name: &str) -> String {
    std::fs::read_to_string(key_path(name)).expect("fixture key")
}

fn settings(kind: ChannelKind, priority: u32, options: &ChannelOptions) -> ChannelSettings {
    ChannelSettings {
        kind,
        base_url: String::new(),
        app_id: None,
        mchid: None,
        appid: None,
        merchant_serial: None,
        keys: Default::default(),
        priority,
        weight: 100,
        fee_bps: 60,
        methods: vec![kind.as_str().to_owned()],
        currencies: vec!["CNY".into()],
        min_amount: "0.01".into(),
        max_amount: "50000.00".into(),
        connect_timeout_ms: (options.request_timeout_ms / 2).max(1),
        request_timeout_ms: options.request_timeout_ms,
        max_in_flight: options.max_in_flight,
        max_idle_connections_per_host: 16,
        idle_connection_timeout_ms: 30_000,
        max_response_bytes: 64 * 1024,
        breaker: options.breaker.clone(),
        enabled: true,
    }
}

impl SimChannels {
    pub async fn start(options: &ChannelOptions) -> Self {
        let secrets = tempfile::tempdir().expect("temp dir for secrets");
        let api_v3 = secrets.path().join("apiv3");
        std::fs::write(&api_v3, API_V3_KEY).unwrap();
        let supplier_secret = secrets.path().join("supplier");
        std::fs::write(&supplier_secret, SUPPLIER_SECRET).unwrap();
        let file = |name: &str| KeySource::File(key_path(name));

        let mut specs = Vec::new();
        let mut all = BTreeMap::new();
        for (id, app_id, priority) in [
            (ALIPAY_MAIN, "2021000000000001", 1),
            (ALIPAY_BACKUP, "2021000000000002", 2),
        ] {
            let mut spec = ChannelSpec::new(id, SimKind::Alipay);
            spec.ids.app_id = Some(app_id.into());
            spec.gateway_public_key = Some(key_pem(MERCHANT_PUBLIC));
            spec.channel_private_key = Some(SimSecret::new(key_pem(PLATFORM_PRIVATE)));
            specs.push(spec);
            let mut s = settings(ChannelKind::Alipay, priority, options);
            s.app_id = Some(app_id.into());
            s.keys.alipay_app_private_key = Some(file(MERCHANT_PRIVATE));
            s.keys.alipay_public_key = Some(file(PLATFORM_PUBLIC));
            all.insert(id.to_owned(), s);
        }
        {
            let mut spec = ChannelSpec::new(WECHATPAY_MAIN, SimKind::Wechatpay);
            spec.ids.mchid = Some(MCHID.into());
            spec.ids.appid = Some(APPID.into());
            spec.ids.merchant_serial = Some(MERCHANT_SERIAL.into());
            spec.ids.platform_serial = Some(PLATFORM_SERIAL.into());
            spec.gateway_public_key = Some(key_pem(MERCHANT_PUBLIC));
            spec.channel_private_key = Some(SimSecret::new(key_pem(PLATFORM_PRIVATE)));
            spec.apiv3_key = Some(SimSecret::new(API_V3_KEY));
            specs.push(spec);
            let mut s = settings(ChannelKind::Wechatpay, 1, options);
            s.mchid = Some(MCHID.into());
            s.appid = Some(APPID.into());
            s.merchant_serial = Some(MERCHANT_SERIAL.into());
            s.keys.wechatpay_merchant_private_key = Some(file(MERCHANT_PRIVATE));
            s.keys
                .wechatpay_platform_public_keys
                .insert(PLATFORM_SERIAL.into(), file(PLATFORM_PUBLIC));
            s.keys.wechatpay_api_v3_key = Some(KeySource::File(api_v3.clone()));
            all.insert(WECHATPAY_MAIN.to_owned(), s);
        }
        for (id, priority) in [(SUPPLIER_MAIN, 1), (SUPPLIER_BACKUP, 2)] {
            let mut spec = ChannelSpec::new(id, SimKind::Supplier);
            spec.supplier_secret = Some(SimSecret::new(SUPPLIER_SECRET));
            specs.push(spec);
            let mut s = settings(ChannelKind::Supplier, priority, options);
            s.keys.supplier_secret = Some(KeySource::File(supplier_secret.clone()));
            all.insert(id.to_owned(), s);
        }
        if let Some(id) = options.wrong_key_for {
            let s = all.get_mut(id).expect("a sandbox channel");
            match s.kind {
                ChannelKind::Alipay => s.keys.alipay_app_private_key = Some(file(PLATFORM_PRIVATE)),
                ChannelKind::Wechatpay => {
                    s.keys.wechatpay_merchant_private_key = Some(file(PLATFORM_PRIVATE))
                }
                ChannelKind::Supplier => {
                    let wrong = secrets.path().join("wrong-supplier");
                    std::fs::write(&wrong, "whsec_test_only_not_the_suppliers").unwrap();
                    s.keys.supplier_secret = Some(KeySource::File(wrong));
                }
            }
        }
        for spec in &mut specs {
            spec.auto_pay = options.auto_pay;
            spec.auto_pay_delay_ms = options.auto_pay_delay_ms;
        }
        let mut config = SimConfig::new(specs);
        config.callbacks = options.callbacks.clone();
        let sim = Sim::start(config).await.expect("start channel-sim");
        for (id, s) in &mut all {
            s.base_url = sim.channel_url(id).expect("a served channel").to_owned();
        }
        Self {
            sim,
            settings: all,
            _secrets: secrets,
        }
    }

    /// Every order the channel accepted, as the simulator recorded it.
    pub fn orders(&self, channel: &str) -> Vec<OrderRecord> {
        self.sim.orders(channel).expect("a configured channel")
    }

    pub fn set_faults(&self, channel: &str, faults: Faults) {
        self.sim.set_faults(channel, faults).expect("valid faults");
    }
}
