//! The gateway's channel adapters against `channel-sim`, over real loopback HTTP.
//!
//! The two sides were written independently (the simulator has its own crypto and does not
//! depend on the gateway), so every passing exchange here is a cross-check of both: request
//! signatures, reply signatures, amounts, expiries, error mappings and callbacks.
//!
//! Each scenario is one `async fn` taking the protocol, run once per protocol by
//! [`per_protocol!`]; each run starts its own simulator with one channel (auto-pay off: the
//! customer pays on demand through the simulator) and builds the gateway's adapter through
//! `build_channel` from a `ChannelSettings` pointing at it, with the test-only fixture keys
//! (`gateway/tests/fixtures/keys/`): the gateway holds the merchant private key and the
//! platform public key, the simulator the other halves.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use channel_sim::{
    CallbackPolicy, ChannelKind as SimKind, ChannelSpec, CloseReason, Faults, OrderRecord,
    OrderStatus, PayOutcome, Secret as SimSecret, Sim, SimConfig, SimHandle,
};
use gateway::channels::keys::RsaPublicKey;
use gateway::channels::wechatpay::{self, PlatformKeys, SignatureHeaders};
use gateway::channels::{
    alipay, build_channel, supplier, Action, Callback, CallbackAnswer, CallbackRefusal,
    CallbackReply, Channel, ChannelError, ChannelKind, ChannelOrderId, ChannelRefundId,
    ChannelSettings, CloseOutcome, CreateOrder, KeySource, Notice, NoticeEvent, OrderState,
    RefundOutcome, RefundRequest,
};
use gateway::ids::{MerchantId, PaymentId, ScopeTag};
use gateway::money::{Amount, Currency};
use gateway::routing::BreakerSettings;
use gateway::secret::Secret;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

const CHANNEL: &str = "ch-it";
const APP_ID: &str = "2021000000000001";
const MCHID: &str = "1900000109";
const APPID: &str = "wxd678efh567hg6787";
const MERCHANT_SERIAL: &str = "3775B6A45ACD588826D15E583A95F5DD0FFB9C4E";
const PLATFORM_SERIAL: &str = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";
const API_V3_KEY: &str = "TestOnlyApiV3Key0123456789abcdef";
const SUPPLIER_SECRET: &str = "whsec_test_only_supplier_0123456789";
const WRONG_SUPPLIER_SECRET: &str = "whsec_test_only_not_the_suppliers";

const MERCHANT_PRIVATE: &str = "test-only-merchant-rsa2048.pkcs8.pem";
const MERCHANT_PUBLIC: &str = "test-only-merchant-rsa2048.spki.pem";
const PLATFORM_PRIVATE: &str = "test-only-platform-rsa2048.pkcs1.pem";
const PLATFORM_PUBLIC: &str = "test-only-platform-rsa2048.spki.pem";

/// Every order is 88.88 CNY.
const TOTAL: i64 = 8888;
/// Where orders of tests that do not look at callbacks send them: nothing listens there.
const NOWHERE: &str = "http://127.0.0.1:9/v1/callbacks/ch-it";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Alipay,
    Wechatpay,
    Supplier,
}

/// Runs a scenario `async fn(Protocol)` as one test per protocol: `<scenario>::alipay`, ….
macro_rules! per_protocol {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::Protocol;
            #[tokio::test]
            async fn alipay() {
                super::$scenario(Protocol::Alipay).await
            }
            #[tokio::test]
            async fn wechatpay() {
                super::$scenario(Protocol::Wechatpay).await
            }
            #[tokio::test]
            async fn supplier() {
                super::$scenario(Protocol::Supplier).await
            }
        }
    )*};
}

per_protocol!(
    create_then_query_before_payment,
    paid_order_queries_paid_and_cannot_be_closed,
    closed_order_cannot_be_paid,
    refunds_once_per_number_and_never_above_the_paid_amount,
    a_request_signed_with_the_wrong_key_is_refused,
    faults_map_to_the_documented_error_classes,
    paid_callback_verifies_with_the_gateway_and_is_acknowledged_once,
);

// --- Fixtures ---------------------------------------------------------------------------------

fn key_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

fn key_file(name: &str) -> KeySource {
    KeySource::File(key_path(name))
}

fn key_pem(name: &str) -> String {
    std::fs::read_to_string(key_path(name)).expect("fixture key")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// What a test changes from the defaults.
#[derive(Debug, Clone)]
struct Options {
    request_timeout_ms: u64,
    /// The gateway signs with a key the simulator does not know.
    wrong_key: bool,
    callbacks: CallbackPolicy,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            request_timeout_ms: 5_000,
            wrong_key: false,
            // One quick attempt: most tests send callbacks nowhere.
            callbacks: CallbackPolicy {
                max_attempts: 1,
                initial_backoff_ms: 50,
                max_backoff_ms: 50,
                attempt_timeout_ms: 2_000,
                trade_finished_delay_ms: None,
            },
        }
    }
}

/// The settings every kind shares; `base_url` is filled in once the simulator listens.
fn common_settings(kind: ChannelKind, options: &Options) -> ChannelSettings {
    ChannelSettings {
        kind,
        base_url: String::new(),
        app_id: None,
        mchid: None,
        appid: None,
        merchant_serial: None,
        keys: Default::default(),
        priority: 1,
        weight: 100,
        fee_bps: 60,
        methods: vec!["qr".into()],
        currencies: vec!["CNY".into()],
        min_amount: "0.01".into(),
        max_amount: "5000".into(),
        connect_timeout_ms: (options.request_timeout_ms / 2).max(1),
        request_timeout_ms: options.request_timeout_ms,
        max_in_flight: 16,
        max_idle_connections_per_host: 4,
        idle_connection_timeout_ms: 30_000,
        max_response_bytes: 64 * 1024,
        breaker: BreakerSettings::default(),
        enabled: true,
    }
}

/// Alipay: the simulator verifies with the merchant public key and signs with the platform
/// private key; the gateway holds the other halves.
fn alipay_pair(options: &Options) -> (ChannelSpec, ChannelSettings) {
    let mut spec = ChannelSpec::new(CHANNEL, SimKind::Alipay);
    spec.ids.app_id = Some(APP_ID.into());
    spec.gateway_public_key = Some(key_pem(MERCHANT_PUBLIC));
    spec.channel_private_key = Some(SimSecret::new(key_pem(PLATFORM_PRIVATE)));
    let mut settings = common_settings(ChannelKind::Alipay, options);
    settings.app_id = Some(APP_ID.into());
    let app_key = if options.wrong_key {
        PLATFORM_PRIVATE
    } else {
        MERCHANT_PRIVATE
    };
    settings.keys.alipay_app_private_key = Some(key_file(app_key));
    settings.keys.alipay_public_key = Some(key_file(PLATFORM_PUBLIC));
    (spec, settings)
}

/// WeChat Pay: as Alipay, plus the ids, the serials and the APIv3 key (a file in `secrets`).
fn wechatpay_pair(
    options: &Options,
    secrets: &tempfile::TempDir,
) -> (ChannelSpec, ChannelSettings) {
    let mut spec = ChannelSpec::new(CHANNEL, SimKind::Wechatpay);
    spec.ids.mchid = Some(MCHID.into());
    spec.ids.appid = Some(APPID.into());
    spec.ids.merchant_serial = Some(MERCHANT_SERIAL.into());
    spec.ids.platform_serial = Some(PLATFORM_SERIAL.into());
    spec.gateway_public_key = Some(key_pem(MERCHANT_PUBLIC));
    spec.channel_private_key = Some(SimSecret::new(key_pem(PLATFORM_PRIVATE)));
    spec.apiv3_key = Some(SimSecret::new(API_V3_KEY));
    let api_v3_path = secrets.path().join("apiv3");
    std::fs::write(&api_v3_path, API_V3_KEY).unwrap();
    let mut settings = common_settings(ChannelKind::Wechatpay, options);
    settings.mchid = Some(MCHID.into());
    settings.appid = Some(APPID.into());
    settings.merchant_serial = Some(MERCHANT_SERIAL.into());
    let merchant_key = if options.wrong_key {
        PLATFORM_PRIVATE
    } else {
        MERCHANT_PRIVATE
    };
    settings.keys.wechatpay_merchant_private_key = Some(key_file(merchant_key));
    settings
        .keys
        .wechatpay_platform_public_keys
        .insert(PLATFORM_SERIAL.into(), key_file(PLATFORM_PUBLIC));
    settings.keys.wechatpay_api_v3_key = Some(KeySource::File(api_v3_path));
    (spec, settings)
}

/// Supplier: one shared HMAC secret (a file in `secrets`).
fn supplier_pair(options: &Options, secrets: &tempfile::TempDir) -> (ChannelSpec, ChannelSettings) {
    let mut spec = ChannelSpec::new(CHANNEL, SimKind::Supplier);
    spec.supplier_secret = Some(SimSecret::new(SUPPLIER_SECRET));
    let secret_path = secrets.path().join("supplier");
    let secret = if options.wrong_key {
        WRONG_SUPPLIER_SECRET
    } else {
        SUPPLIER_SECRET
    };
    std::fs::write(&secret_path, format!("{secret}\n")).unwrap();
    let mut settings = common_settings(ChannelKind::Supplier, options);
    settings.keys.supplier_secret = Some(KeySource::File(secret_path));
    (spec, settings)
}

/// One simulator with one channel, and the gateway's adapter for it.
struct Fixture {
    sim: SimHandle,
    channel: Arc<dyn Channel>,
    _secrets: tempfile::TempDir,
}

impl Fixture {
    async fn start(protocol: Protocol, options: Options) -> Self {
        let secrets = tempfile::tempdir().unwrap();
        let (spec, mut settings) = match protocol {
            Protocol::Alipay => alipay_pair(&options),
            Protocol::Wechatpay => wechatpay_pair(&options, &secrets),
            Protocol::Supplier => supplier_pair(&options, &secrets),
        };
        let mut config = SimConfig::new(vec![spec]);
        config.callbacks = options.callbacks.clone();
        let sim = Sim::start(config).await.expect("start channel-sim");
        settings.base_url = sim
            .channel_url(CHANNEL)
            .expect("the channel's URL")
            .to_owned();
        let channel = build_channel(CHANNEL, &settings).expect("build the adapter");
        Self {
            sim,
            channel,
            _secrets: secrets,
        }
    }

    /// The simulator's record of an order, which must exist.
    fn record(&self, order: &ChannelOrderId) -> OrderRecord {
        self.sim
            .order(order.as_str())
            .unwrap_or_else(|| panic!("the simulator has no order {order}"))
    }

    fn orders(&self) -> Vec<OrderRecord> {
        self.sim.orders(CHANNEL).expect("the channel exists")
    }

    fn set_faults(&self, faults: Faults) {
        self.sim.set_faults(CHANNEL, faults).expect("valid faults");
    }

    async fn shutdown(self) {
        self.sim.shutdown().await;
    }
}

/// A fresh order of 88.88 CNY, expiring in 15 minutes.
fn new_order(notify_url: &str) -> CreateOrder {
    let now = now_ms();
    let tag = ScopeTag::merchant(&MerchantId::parse("m1").unwrap());
    CreateOrder {
        order_id: ChannelOrderId::for_attempt(&PaymentId::generate(tag, now), 1),
        amount: Amount::from_minor(TOTAL).unwrap(),
        currency: Currency::Cny,
        // `&` and non-ASCII: the form encoding and the signed strings must agree.
        description: "Top-up 充值 & more".into(),
        notify_url: notify_url.into(),
        expires_at_ms: now + 15 * 60 * 1000,
    }
}

fn refund_request(order: &ChannelOrderId, refund_id: &str, minor: i64) -> RefundRequest {
    RefundRequest {
        order_id: order.clone(),
        refund_id: ChannelRefundId::parse(refund_id).unwrap(),
        amount: Amount::from_minor(minor).unwrap(),
        order_total: Amount::from_minor(TOTAL).unwrap(),
        currency: Currency::Cny,
        reason: Some("customer asked".into()),
        notify_url: None,
    }
}

/// The state of a paid order as the simulator recorded it.
fn paid_state(record: &OrderRecord) -> OrderState {
    OrderState::Paid {
        channel_txn_id: record.channel_trade_no.clone(),
        amount_minor: TOTAL,
        currency: Currency::Cny,
    }
}

/// Polls `probe` up to 100 × 20 ms.
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..100 {
        if let Some(value) = probe().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within 2 s");
}

/// `POST {admin}/orders/{id}/pay`, as an outside tool would pay: (status, JSON body).
async fn admin_pay(sim: &SimHandle, order: &ChannelOrderId) -> (u16, Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = hyper::Request::post(format!("{}/orders/{order}/pay", sim.admin_url()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.expect("admin API");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).expect("admin JSON"))
}

#[track_caller]
fn assert_not_executed_not_counted(error: &ChannelError) {
    assert!(error.certainly_not_executed(), "{error:?}");
    assert!(!error.counts_as_failure(), "{error:?}");
}

#[track_caller]
fn assert_unknown_and_counted(error: &ChannelError) {
    assert!(!error.certainly_not_executed(), "{error:?}");
    assert!(error.counts_as_failure(), "{error:?}");
}

// --- Scenarios --------------------------------------------------------------------------------

/// The simulator accepts the order as sent; the action comes back; before payment the query
/// says pending (Alipay: "no such trade" until the code is scanned, read as `NotFound`).
async fn create_then_query_before_payment(protocol: Protocol) {
    let fx = Fixture::start(protocol, Options::default()).await;
    let order = new_order(NOWHERE);
    let created = fx.channel.create_order(&order).await.expect("create");

    let record = fx.record(&order.order_id);
    assert_eq!(record.status, OrderStatus::Unpaid);
    assert_eq!(record.amount_cents, TOTAL as u64);
    assert_eq!(record.currency, "CNY");
    assert_eq!(
        record.expires_at_unix_seconds,
        Some((order.expires_at_ms / 1000) as i64),
        "the expiry sent is the payment's, to the second"
    );
    assert_eq!(record.notify_url, order.notify_url);
    assert_eq!((record.create_requests, record.pay_count), (1, 0));
    match (&created.action, protocol) {
        (Action::QrCode(code), Protocol::Alipay | Protocol::Wechatpay) => {
            assert_eq!(record.code_url.as_deref(), Some(code.as_str()));
        }
        // The supplier settles on its own: no action, but its order id.
        (Action::None, Protocol::Supplier) => {
            assert_eq!(
                created.channel_txn_id.as_deref(),
                Some(record.channel_trade_no.as_str())
            );
        }
        (action, _) => panic!("unexpected action {action:?}"),
    }

    let state = fx.channel.query(&order.order_id).await.expect("query");
    let expected = match protocol {
        Protocol::Alipay => OrderState::NotFound,
        Protocol::Wechatpay | Protocol::Supplier => OrderState::Pending,
    };
    assert_eq!(state, expected);

    // A retried create of the same attempt is the same order at the channel.
    let again = fx
        .channel
        .create_order(&order)
        .await
        .expect("retried create");
    assert_eq!(again.action, created.action);
    assert_eq!(fx.record(&order.order_id).create_requests, 2);
    assert_eq!(fx.orders().len(), 1);
    fx.shutdown().await;
}

/// Paid on demand: the query says paid with the amount; a close is too late and says so; the
/// money moved once.
async fn paid_order_queries_paid_and_cannot_be_closed(protocol: Protocol) {
    let fx = Fixture::start(protocol, Options::default()).await;
    let order = new_order(NOWHERE);
    fx.channel.create_order(&order).await.expect("create");
    assert!(matches!(
        fx.sim.pay(order.order_id.as_str()),
        PayOutcome::Paid(_)
    ));
    let record = fx.record(&order.order_id);

    let state = fx.channel.query(&order.order_id).await.expect("query");
    assert_eq!(state, paid_state(&record));

    let closed = fx.channel.close(&order.order_id).await.expect("close");
    assert_eq!(
        closed,
        CloseOutcome::AlreadyPaid {
            channel_txn_id: record.channel_trade_no.clone(),
            amount_minor: TOTAL,
            currency: Currency::Cny,
        }
    );
    assert!(matches!(
        fx.sim.pay(order.order_id.as_str()),
        PayOutcome::AlreadyPaid(_)
    ));
    let record = fx.record(&order.order_id);
    assert_eq!(record.status, OrderStatus::Paid);
    assert_eq!(record.pay_count, 1);
    assert_eq!(record.close_reason, None);
    fx.shutdown().await;
}

/// Closed unpaid: the close says so (twice: a retried close is harmless), and the customer
/// can no longer pay.
async fn closed_order_cannot_be_paid(protocol: Protocol) {
    let fx = Fixture::start(protocol, Options::default()).await;
    let order = new_order(NOWHERE);
    fx.channel.create_order(&order).await.expect("create");

    if protocol == Protocol::Alipay {
        // A precreated code nobody scanned is not a trade yet: Alipay cannot close it
        // (`ACQ.TRADE_NOT_EXIST`) and it stays payable until its expiry — late money the
        // gateway must expect after a cancel.
        let closed = fx.channel.close(&order.order_id).await.expect("close");
        assert_eq!(closed, CloseOutcome::NotFound);
        assert_eq!(
            fx.channel.query(&order.order_id).await.expect("query"),
            OrderState::NotFound
        );
        let (status, answer) = admin_pay(&fx.sim, &order.order_id).await;
        assert_eq!(
            (status, &answer["outcome"]),
            (200, &json!("paid")),
            "{answer}"
        );
        fx.shutdown().await;
        return;
    }
    let closed = fx.channel.close(&order.order_id).await.expect("close");
    assert_eq!(closed, CloseOutcome::Closed);
    let again = fx
        .channel
        .close(&order.order_id)
        .await
        .expect("close again");
    assert_eq!(again, CloseOutcome::Closed);
    let state = fx.channel.query(&order.order_id).await.expect("query");
    assert_eq!(state, OrderState::Closed);

    let (status, answer) = admin_pay(&fx.sim, &order.order_id).await;
    assert_eq!((status, &answer["outcome"]), (409, &json!("closed")));
    let record = fx.record(&order.order_id);
    assert_eq!(record.status, OrderStatus::Closed);
    assert_eq!(record.close_reason, Some(CloseReason::Closed));
    assert_eq!((record.pay_count, record.paid_at_unix_ms), (0, None));
    fx.shutdown().await;
}

/// A refund number refunds once however often it is sent; more than was paid is declined.
async fn refunds_once_per_number_and_never_above_the_paid_amount(protocol: Protocol) {
    let fx = Fixture::start(protocol, Options::default()).await;
    let order = new_order(NOWHERE);
    fx.channel.create_order(&order).await.expect("create");
    assert!(matches!(
        fx.sim.pay(order.order_id.as_str()),
        PayOutcome::Paid(_)
    ));

    let first = refund_request(&order.order_id, "rf_0001", 1000);
    let once = fx.channel.refund(&first).await.expect("refund");
    let twice = fx.channel.refund(&first).await.expect("retried refund");
    assert!(matches!(once, RefundOutcome::Succeeded { .. }), "{once:?}");
    assert_eq!(twice, once, "the retry answers the same refund");
    let record = fx.record(&order.order_id);
    assert_eq!(record.refunds.len(), 1);
    assert_eq!(record.refunds[0].refund_no, "rf_0001");
    assert_eq!(
        (record.refunds[0].amount_cents, record.refunds[0].requests),
        (1000, 2)
    );
    assert_eq!(record.refunded_cents, 1000);

    let too_much = refund_request(&order.order_id, "rf_0002", TOTAL + 1);
    let error = fx
        .channel
        .refund(&too_much)
        .await
        .expect_err("a refund above the paid amount");
    assert!(matches!(error, ChannelError::Declined { .. }), "{error:?}");
    assert_not_executed_not_counted(&error);
    let record = fx.record(&order.order_id);
    assert_eq!((record.refunds.len(), record.refunded_cents), (1, 1000));

    // Partly refunded, the order still reads as paid (WeChat Pay: `REFUND`).
    let state = fx.channel.query(&order.order_id).await.expect("query");
    match (protocol, state) {
        (Protocol::Wechatpay, OrderState::Refunded { amount_minor, .. })
        | (Protocol::Alipay | Protocol::Supplier, OrderState::Paid { amount_minor, .. }) => {
            assert_eq!(amount_minor, TOTAL)
        }
        (_, state) => panic!("unexpected state {state:?}"),
    }
    fx.shutdown().await;
}

/// A gateway signing with a key the channel does not know: nothing is created. Alipay and
/// WeChat Pay answer with a refusal signed by the platform key, which the adapter verifies and
/// reads as a decline (certainly not executed). The supplier's refusal is signed with the
/// secret the gateway lacks, so the adapter cannot verify it: an unknown outcome.
async fn a_request_signed_with_the_wrong_key_is_refused(protocol: Protocol) {
    let options = Options {
        wrong_key: true,
        ..Options::default()
    };
    let fx = Fixture::start(protocol, options).await;
    let order = new_order(NOWHERE);
    let error = fx
        .channel
        .create_order(&order)
        .await
        .expect_err("a request signed with the wrong key");
    match protocol {
        Protocol::Alipay | Protocol::Wechatpay => {
            let expected_code = match protocol {
                Protocol::Alipay => "isv.invalid-signature",
                _ => "SIGN_ERROR",
            };
            // A refusal of our credentials: nothing executed, and the breaker counts it (a
            // misconfigured channel must open its breaker, not be retried for ever).
            assert!(
                matches!(&error, ChannelError::Rejected { code, .. } if code == expected_code),
                "{error:?}"
            );
            assert!(error.certainly_not_executed() && error.counts_as_failure());
        }
        Protocol::Supplier => {
            assert!(
                matches!(error, ChannelError::Unverifiable { .. }),
                "{error:?}"
            );
            assert_unknown_and_counted(&error);
        }
    }
    assert!(fx.orders().is_empty(), "{:?}", fx.orders());
    fx.shutdown().await;
}

/// Each injected fault, and what the adapter makes of it: the class the failover rule and the
/// breaker read.
async fn faults_map_to_the_documented_error_classes(protocol: Protocol) {
    let options = Options {
        request_timeout_ms: 400,
        ..Options::default()
    };
    let fx = Fixture::start(protocol, options).await;

    // Latency below the timeout: slower, but a success.
    fx.set_faults(Faults {
        latency_ms: 150,
        ..Faults::default()
    });
    let slow = new_order(NOWHERE);
    let started = Instant::now();
    fx.channel.create_order(&slow).await.expect("a slow create");
    assert!(started.elapsed() >= Duration::from_millis(150));

    // Every request a server error: unknown outcome, a failure for the breaker.
    fx.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let error = fx
        .channel
        .create_order(&new_order(NOWHERE))
        .await
        .unwrap_err();
    let expected_status = match protocol {
        Protocol::Wechatpay => 500,
        Protocol::Alipay | Protocol::Supplier => 503,
    };
    assert!(
        matches!(error, ChannelError::ServerError { status, .. } if status == expected_status),
        "{error:?}"
    );
    assert_unknown_and_counted(&error);

    // A business decline: certainly not executed, not the channel's fault.
    fx.set_faults(Faults {
        decline: true,
        ..Faults::default()
    });
    let error = fx
        .channel
        .create_order(&new_order(NOWHERE))
        .await
        .unwrap_err();
    assert!(matches!(error, ChannelError::Declined { .. }), "{error:?}");
    assert_not_executed_not_counted(&error);

    // A channel that never answers: a timeout, unknown outcome, a failure.
    fx.set_faults(Faults {
        hang: true,
        ..Faults::default()
    });
    let started = Instant::now();
    let error = fx
        .channel
        .create_order(&new_order(NOWHERE))
        .await
        .unwrap_err();
    assert_eq!(error, ChannelError::Timeout);
    assert_unknown_and_counted(&error);
    assert!(started.elapsed() < Duration::from_secs(2));

    // Not listening: refused, certainly not executed, a failure.
    fx.set_faults(Faults {
        outage: true,
        ..Faults::default()
    });
    let channel = &fx.channel;
    let probe = &slow.order_id;
    eventually("the outage refuses connections", move || async move {
        matches!(
            channel.query(probe).await,
            Err(ChannelError::ConnectRefused)
        )
        .then_some(())
    })
    .await;
    let error = fx
        .channel
        .create_order(&new_order(NOWHERE))
        .await
        .unwrap_err();
    assert_eq!(error, ChannelError::ConnectRefused);
    assert!(error.certainly_not_executed() && error.counts_as_failure());

    // Back up: a create goes through again.
    fx.set_faults(Faults::default());
    let recovered = new_order(NOWHERE);
    let order = &recovered;
    eventually("the channel serves again", move || async move {
        channel.create_order(order).await.ok()
    })
    .await;

    // Only the orders that got through exist at the channel.
    let ids: Vec<String> = fx
        .orders()
        .into_iter()
        .map(|o| o.channel_order_id)
        .collect();
    assert_eq!(
        ids,
        [slow.order_id.to_string(), recovered.order_id.to_string()]
    );
    fx.shutdown().await;
}

/// The customer pays; the simulator's callback reaches a notify URL served here, where the
/// gateway's adapter (as `build_channel` makes it) verifies it with `verify_callback` and
/// answers with its `callback_reply(Ack, "")` (the two implementations agree on callbacks
/// too); the signature primitives decode the same callback as a cross-check; the simulator
/// records exactly one delivery, acknowledged.
async fn paid_callback_verifies_with_the_gateway_and_is_acknowledged_once(protocol: Protocol) {
    let options = Options {
        callbacks: CallbackPolicy {
            max_attempts: 3,
            ..Options::default().callbacks
        },
        ..Options::default()
    };
    let fx = Fixture::start(protocol, options).await;
    let receiver = Receiver::start(protocol, Arc::clone(&fx.channel)).await;
    let order = new_order(&receiver.url);
    fx.channel.create_order(&order).await.expect("create");

    let (status, answer) = admin_pay(&fx.sim, &order.order_id).await;
    assert_eq!((status, &answer["outcome"]), (200, &json!("paid")));
    let sim = &fx.sim;
    let id = order.order_id.as_str();
    let received = &receiver.received;
    let record = eventually("an acknowledged or refused callback", move || async move {
        let refused = received.lock().unwrap().iter().any(|d| d.notice.is_err());
        sim.order(id)
            .filter(|r| refused || r.callbacks.iter().any(|c| c.acknowledged))
    })
    .await;
    // A refusal would make the simulator retry: say why at once.
    for delivery in receiver.received.lock().unwrap().iter() {
        if let Err(refusal) = &delivery.notice {
            panic!("the adapter refused the callback: {refusal}");
        }
    }
    assert_eq!(record.callbacks.len(), 1, "{:?}", record.callbacks);
    let delivery = &record.callbacks[0];
    assert!(delivery.acknowledged, "{delivery:?}");
    assert_eq!((delivery.attempt, delivery.duplicate), (1, false));
    let expected_status = match protocol {
        Protocol::Wechatpay => 204,
        Protocol::Alipay | Protocol::Supplier => 200,
    };
    assert_eq!(delivery.status, Some(expected_status));

    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let notice = received[0]
        .notice
        .as_ref()
        .unwrap_or_else(|e| panic!("the adapter refused the callback: {e}"));
    assert_eq!(notice.order_id, order.order_id);
    assert_eq!(
        notice.event,
        NoticeEvent::Paid {
            channel_txn_id: record.channel_trade_no.clone(),
            amount_minor: TOTAL,
            currency: Currency::Cny,
        }
    );
    // Alipay's `notify_id` and WeChat Pay's event `id`; the supplier's callbacks have none.
    assert_eq!(
        notice.notice_id.is_some(),
        protocol != Protocol::Supplier,
        "{notice:?}"
    );

    let decoded = received[0]
        .decoded
        .as_ref()
        .unwrap_or_else(|e| panic!("the signature primitives refused the callback: {e}"));
    let expected = match protocol {
        Protocol::Alipay => json!({
            "app_id": APP_ID,
            "out_trade_no": id,
            "trade_no": record.channel_trade_no,
            "trade_status": "TRADE_SUCCESS",
            "total_amount": "88.88",
        }),
        Protocol::Wechatpay => json!({
            "mchid": MCHID,
            "appid": APPID,
            "out_trade_no": id,
            "transaction_id": record.channel_trade_no,
            "trade_state": "SUCCESS",
            "amount": {"total": TOTAL, "currency": "CNY"},
        }),
        Protocol::Supplier => json!({
            "order_id": id,
            "supplier_order_id": record.channel_trade_no,
            "status": "succeeded",
            "amount": "88.88",
            "currency": "CNY",
        }),
    };
    assert_contains(decoded, &expected);
    receiver.task.abort();
    fx.shutdown().await;
}

/// Every field of `expected` is in `actual` with the same value (objects compared
/// recursively, other values exactly).
#[track_caller]
fn assert_contains(actual: &Value, expected: &Value) {
    match (actual, expected) {
        (Value::Object(actual_fields), Value::Object(expected_fields)) => {
            for (name, value) in expected_fields {
                let found = actual_fields
                    .get(name)
                    .unwrap_or_else(|| panic!("no `{name}` in {actual}"));
                assert_contains(found, value);
            }
        }
        _ => assert_eq!(actual, expected),
    }
}

/// WeChat Pay's query is a GET whose signed URL line carries `?mchid=…`: the simulator checks
/// the signature before anything else, so a `404 ORDER_NOT_EXIST` (read as `NotFound`) and a
/// `NOTPAY` transaction (read as `Pending`) both prove the query was signed correctly; a
/// signature mismatch would be a `401 SIGN_ERROR` refusal of our credentials.
#[tokio::test]
async fn wechatpay_signed_get_query_is_accepted() {
    let fx = Fixture::start(Protocol::Wechatpay, Options::default()).await;
    let unknown = new_order(NOWHERE);
    let state = fx.channel.query(&unknown.order_id).await.expect("query");
    assert_eq!(state, OrderState::NotFound);

    let order = new_order(NOWHERE);
    fx.channel.create_order(&order).await.expect("create");
    let state = fx.channel.query(&order.order_id).await.expect("query");
    assert_eq!(state, OrderState::Pending);
    assert!(matches!(
        fx.sim.pay(order.order_id.as_str()),
        PayOutcome::Paid(_)
    ));
    let state = fx.channel.query(&order.order_id).await.expect("query");
    assert_eq!(state, paid_state(&fx.record(&order.order_id)));
    fx.shutdown().await;
}

// --- The notify URL -------------------------------------------------------------------------

/// One callback received: what the adapter's `verify_callback` read in it, and its content
/// as the signature primitives decode it.
#[derive(Debug, Clone)]
struct Delivery {
    notice: Result<Notice, CallbackRefusal>,
    decoded: Result<Value, String>,
}

/// Callbacks received, in order.
type Received = Arc<Mutex<Vec<Delivery>>>;

/// A notify URL served in the test, standing in for `POST /v1/callbacks/{channel}`: verifies
/// each callback with the adapter, keeps the result, and answers with the adapter's reply —
/// an acknowledgement only for what verified.
struct Receiver {
    url: String,
    received: Received,
    task: tokio::task::JoinHandle<()>,
}

type ReceiverState = (Protocol, Arc<dyn Channel>, Received);

impl Receiver {
    async fn start(protocol: Protocol, channel: Arc<dyn Channel>) -> Self {
        let received = Received::default();
        let state: ReceiverState = (protocol, channel, Arc::clone(&received));
        let router = axum::Router::new()
            .route("/notify", axum::routing::post(notify))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/notify", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Self {
            url,
            received,
            task,
        }
    }
}

async fn notify(
    State((protocol, channel, received)): State<ReceiverState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let notice = channel.verify_callback(
        &Callback {
            headers: &headers,
            body: &body,
        },
        now_ms(),
    );
    let reply = match &notice {
        Ok(_) => channel.callback_reply(CallbackAnswer::Ack, ""),
        Err(refusal) => channel.callback_reply(CallbackAnswer::Refused, &refusal.to_string()),
    };
    let decoded = decode_with_primitives(protocol, &headers, &body);
    received.lock().unwrap().push(Delivery { notice, decoded });
    into_response(reply)
}

/// The adapter's reply as an HTTP response, as the gateway's callback route sends it.
fn into_response(reply: CallbackReply) -> Response {
    let status = StatusCode::from_u16(reply.status).expect("a valid status");
    (
        status,
        [(axum::http::header::CONTENT_TYPE, reply.content_type)],
        reply.body,
    )
        .into_response()
}

/// Verifies a callback with the gateway's signature primitives and returns its content:
/// Alipay's form fields, WeChat Pay's decrypted transaction, the supplier's JSON body.
fn decode_with_primitives(
    protocol: Protocol,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, String> {
    let now_seconds = now_ms() / 1000;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("no {name}"))
    };
    match protocol {
        Protocol::Alipay => {
            let fields: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
            let borrowed: Vec<(&str, &str)> = fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let alipay_key = RsaPublicKey::from_pem(&key_pem(PLATFORM_PUBLIC)).unwrap();
            alipay::verify_notify(&alipay_key, &borrowed).map_err(|e| e.to_string())?;
            Ok(fields
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect())
        }
        Protocol::Wechatpay => {
            let signature = SignatureHeaders {
                timestamp: header("Wechatpay-Timestamp")?,
                nonce: header("Wechatpay-Nonce")?,
                signature: header("Wechatpay-Signature")?,
                serial: header("Wechatpay-Serial")?,
                signature_type: header("Wechatpay-Signature-Type").ok(),
            };
            let text = std::str::from_utf8(body).map_err(|e| e.to_string())?;
            let platform_keys: PlatformKeys = [(
                PLATFORM_SERIAL.to_owned(),
                RsaPublicKey::from_pem(&key_pem(PLATFORM_PUBLIC)).unwrap(),
            )]
            .into_iter()
            .collect();
            wechatpay::verify_response(&platform_keys, &signature, text, now_seconds)
                .map_err(|e| e.to_string())?;
            let envelope: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            if envelope["event_type"] != "TRANSACTION.SUCCESS"
                || envelope["resource_type"] != "encrypt-resource"
            {
                return Err(format!("unexpected event {envelope}"));
            }
            let resource: wechatpay::EncryptedResource =
                serde_json::from_value(envelope["resource"].clone()).map_err(|e| e.to_string())?;
            let api_v3_key = wechatpay::ApiV3Key::new(&Secret::new(API_V3_KEY)).unwrap();
            let plaintext =
                wechatpay::decrypt_resource(&api_v3_key, &resource).map_err(|e| e.to_string())?;
            serde_json::from_slice(&plaintext).map_err(|e| e.to_string())
        }
        Protocol::Supplier => {
            let key = supplier::SupplierKey::new(&Secret::new(SUPPLIER_SECRET)).unwrap();
            supplier::verify(
                &key,
                header(supplier::HEADER_NAME)?.trim(),
                body,
                now_seconds,
            )
            .map_err(|e| e.to_string())?;
            serde_json::from_slice(body).map_err(|e| e.to_string())
        }
    }
}
