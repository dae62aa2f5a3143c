//! The channel layer's CPU costs per payment: signing and verifying per protocol (RSA-2048
//! through aws-lc-rs, HMAC-SHA256, AES-256-GCM), the routing decision and the breaker's
//! bookkeeping. Keys are the test-only fixtures in gateway/tests/fixtures/keys.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gateway::channels::alipay;
use gateway::channels::keys::{RsaPrivateKey, RsaPublicKey};
use gateway::channels::supplier::{self, SupplierKey};
use gateway::channels::wechatpay::{self, ApiV3Key, PlatformKeys, SignatureHeaders};
use gateway::routing::{
    rank, Breaker, BreakerSettings, CallOutcome, Candidate, ChannelRoute, LiveStats, RouteRequest,
};
use gateway::secret::Secret;

const PRIVATE: &str =
    include_str!("../../gateway/tests/fixtures/keys/test-only-merchant-rsa2048.pkcs8.pem");
const PUBLIC: &str =
    include_str!("../../gateway/tests/fixtures/keys/test-only-merchant-rsa2048.spki.pem");

fn signing(c: &mut Criterion) {
    let key = RsaPrivateKey::from_pem(PRIVATE).unwrap();
    let public = RsaPublicKey::from_pem(PUBLIC).unwrap();
    let params = [
        ("app_id", "2021000000000000"),
        ("method", "alipay.trade.precreate"),
        ("format", "JSON"),
        ("charset", "utf-8"),
        ("sign_type", "RSA2"),
        ("timestamp", "2026-11-26 20:00:00"),
        ("version", "1.0"),
        (
            "notify_url",
            "https://gateway.example/v1/callbacks/alipay-main",
        ),
        (
            "biz_content",
            r#"{"out_trade_no":"0Vc56zIVPldNxEBvDkumBy1ZhV-1","total_amount":"90.00","subject":"Game card","time_expire":"2026-11-26 20:15:00"}"#,
        ),
    ];
    let content = alipay::sign_content(&params);
    let signature = alipay::sign(&key, &content);
    let mut group = c.benchmark_group("channels");
    group.bench_function("alipay/sign_request", |b| {
        b.iter(|| alipay::sign(&key, &alipay::sign_content(&params)))
    });
    group.bench_function("alipay/verify", |b| {
        b.iter(|| assert!(alipay::verify(&public, &content, &signature)))
    });

    let body = r#"{"id":"EV-2018022511223320873","event_type":"TRANSACTION.SUCCESS","resource_type":"encrypt-resource"}"#;
    let now = 1_795_694_400;
    let reply_signature =
        wechatpay::sign_response(&key, now, "5K8264ILTKCH16CQ2502SI8ZNMTM67VS", body);
    let mut platform = PlatformKeys::default();
    platform.insert("5157F09EFDC096DE15EBE81A47057A7232F1B8E1", public.clone());
    let headers = SignatureHeaders {
        timestamp: "1795694400",
        nonce: "5K8264ILTKCH16CQ2502SI8ZNMTM67VS",
        signature: &reply_signature,
        serial: "5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
        signature_type: Some("WECHATPAY2-SHA256-RSA2048"),
    };
    group.bench_function("wechatpay/sign_request", |b| {
        b.iter(|| {
            wechatpay::sign_request(
                &key,
                "GET",
                "/v3/pay/transactions/out-trade-no/x?mchid=1900000109",
                now,
                "nonce",
                "",
            )
        })
    });
    group.bench_function("wechatpay/verify_response", |b| {
        b.iter(|| wechatpay::verify_response(&platform, &headers, body, now).unwrap())
    });
    let apiv3 = ApiV3Key::new(&Secret::new("0123456789abcdef0123456789abcdef")).unwrap();
    let transaction = br#"{"out_trade_no":"x-1","transaction_id":"4200000000","trade_state":"SUCCESS","amount":{"total":9000,"currency":"CNY"}}"#;
    let resource =
        wechatpay::encrypt_resource(&apiv3, "0123456789ab", "transaction", transaction).unwrap();
    group.bench_function("wechatpay/decrypt_resource", |b| {
        b.iter(|| wechatpay::decrypt_resource(&apiv3, &resource).unwrap())
    });

    let secret = SupplierKey::new(&Secret::new("supplier-test-secret-0123456789")).unwrap();
    let supplier_body = br#"{"order_id":"x-1","supplier_order_id":"S1","status":"succeeded","amount":"90.00","currency":"CNY"}"#;
    let header = supplier::signature_header(&secret, now, supplier_body);
    group.bench_function("supplier/sign", |b| {
        b.iter(|| supplier::signature_header(&secret, now, supplier_body))
    });
    group.bench_function("supplier/verify", |b| {
        b.iter(|| supplier::verify(&secret, &header, supplier_body, now).unwrap())
    });
    group.finish();
}

fn routing(c: &mut Criterion) {
    let route = |id: &str, priority: u32, weight: u32| ChannelRoute {
        channel_id: id.into(),
        priority,
        weight,
        fee_bps: 60,
        enabled: true,
        methods: vec!["supplier".into()],
        currencies: vec!["CNY".into()],
        min_amount_minor: 1,
        max_amount_minor: 5_000_000,
    };
    let routes = [
        route("s-main", 1, 70),
        route("s-alt", 1, 30),
        route("s-backup", 2, 100),
        route("s-far", 3, 100),
        route("s-off", 1, 0),
    ];
    let live = LiveStats {
        admits: true,
        success_rate_percent: 98,
        latency_ms: 40,
    };
    let candidates: Vec<Candidate<'_>> = routes
        .iter()
        .map(|route| Candidate { route, live })
        .collect();
    let request = RouteRequest {
        method: "supplier",
        currency: "CNY",
        amount_minor: 9_000,
    };
    let mut group = c.benchmark_group("routing");
    let mut seed = 0u64;
    group.bench_function("rank_5_channels", |b| {
        b.iter(|| {
            seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            rank(&candidates, &request, seed)
        })
    });
    let mut breaker = Breaker::new("s-main", BreakerSettings::default());
    let now = tokio::time::Instant::now();
    group.bench_function("breaker_acquire_and_record", |b| {
        b.iter(|| {
            let permit = breaker.try_acquire(now).unwrap();
            breaker.record(
                now,
                permit,
                CallOutcome::Success {
                    latency: Duration::from_millis(40),
                },
            );
        })
    });
    group.finish();
}

criterion_group! {
    name = channels;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = signing, routing
}
criterion_main!(channels);
