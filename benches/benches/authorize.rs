//! The authorize path: one `BalanceStore::authorize` (idempotency + order id + lazy release +
//! available check + capture, atomically) on the in-process store and on a real Redis that the
//! bench starts itself on a random loopback port; and the whole `POST /v1/payments` over HTTP
//! on loopback against the in-process store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gateway::config;
use gateway::ids::{
    AccountId, AdjustmentId, IdempotencyKey, MerchantId, MerchantOrderId, PaymentId,
};
use gateway::money::Currency;
use gateway::preauth::memory::MemoryStore;
use gateway::preauth::redis::RedisStore;
use gateway::preauth::{
    AccountKey, AdjustRequest, AuthorizeOutcome, AuthorizeRequest, BalanceStore, Direction,
    HoldSpec, IdempotencyClaim, Method, OpContext, PaymentDoc, Purpose, Scope,
};
use gateway::settlement::sqlite::SqliteStore;
use gateway::settlement::SettlementStore;
use gateway::startup::Application;

static NEXT: AtomicU64 = AtomicU64::new(0);

fn ctx() -> OpContext {
    OpContext {
        now_ms: gateway::telemetry::now_ms(),
        lazy_release_max: 16,
    }
}

fn account() -> AccountKey {
    AccountKey::new(
        MerchantId::parse("alpha").unwrap(),
        AccountId::parse("bench").unwrap(),
    )
}

async fn fund(store: &dyn BalanceStore) {
    let key = account();
    store
        .upsert_account(&key, Currency::Cny, 0, ctx())
        .await
        .unwrap();
    let request = AdjustRequest {
        account: key.clone(),
        idempotency: IdempotencyClaim {
            key: IdempotencyKey::parse("bench-funding", 255).unwrap(),
            request_hash: "funding".into(),
            retention_seconds: 3600,
        },
        adjustment_id: AdjustmentId::generate(key.tag, 0),
        direction: Direction::Credit,
        amount_minor: 1_000_000_000_000,
        currency: Currency::Cny,
        doc: "{}".into(),
        pending_record: "{}".into(),
    };
    store.adjust(&request, ctx()).await.unwrap();
}

fn request() -> AuthorizeRequest {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let key = account();
    let now = gateway::telemetry::now_ms();
    let id = PaymentId::generate(key.tag, now);
    let order = format!("bench-{n}");
    AuthorizeRequest {
        idempotency: IdempotencyClaim {
            key: IdempotencyKey::parse(&order, 255).unwrap(),
            request_hash: "0123456789abcdef0123456789abcdef".into(),
            retention_seconds: 3600,
        },
        order_id: MerchantOrderId::parse(&order, 64).unwrap(),
        doc: PaymentDoc {
            id: id.as_str().into(),
            merchant_id: "alpha".into(),
            account_id: Some("bench".into()),
            merchant_order_id: order,
            amount_minor: 100,
            currency: Currency::Cny,
            method: Method::Balance,
            purpose: Purpose::Charge,
            created_at_ms: now,
            expires_at_ms: now + 900_000,
            description: None,
            notify_url: None,
            metadata: None,
        },
        hold: Some(HoldSpec {
            expires_at_ms: now + 900_000,
            capture_now: true,
        }),
        pending_record: None,
        doc_json: None,
        scope: Scope::Account(key),
    }
}

async fn authorize_once(store: &dyn BalanceStore) {
    let outcome = store.authorize(&request(), ctx()).await.unwrap();
    assert!(
        matches!(outcome, AuthorizeOutcome::Created { .. }),
        "{outcome:?}"
    );
}

#[path = "../../gateway/tests/api/harness/redis_server.rs"]
#[allow(dead_code)] // the tests use the rest of the harness
mod redis_server;

fn bench_store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("authorize");
    group.throughput(Throughput::Elements(1));

    let memory: Arc<dyn BalanceStore> = Arc::new(MemoryStore::new());
    rt.block_on(fund(memory.as_ref()));
    group.bench_function("store/in_process", |b| {
        b.to_async(&rt).iter(|| authorize_once(memory.as_ref()))
    });

    // Production's AOF policy (deploy/redis.conf): everysec.
    let redis = rt.block_on(redis_server::RedisServer::start_with_fsync("everysec"));
    let settings = config::load(None, vec![("GATEWAY__REDIS__URL".into(), redis.url())]).unwrap();
    let store: Arc<dyn BalanceStore> = Arc::new(
        rt.block_on(RedisStore::connect(&settings.settings.redis))
            .unwrap(),
    );
    rt.block_on(fund(store.as_ref()));
    group.bench_function("store/redis", |b| {
        b.to_async(&rt).iter(|| authorize_once(store.as_ref()))
    });
    // 32 authorizations in flight at once: what one multiplexed connection pipelines.
    group.throughput(Throughput::Elements(32));
    group.bench_function("store/redis_32_concurrent", |b| {
        b.to_async(&rt).iter(|| async {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..32 {
                let store = store.clone();
                calls.spawn(async move { authorize_once(store.as_ref()).await });
            }
            while let Some(done) = calls.join_next().await {
                done.unwrap();
            }
        })
    });
    group.finish();
    drop(redis);
}

fn bench_http(c: &mut Criterion) {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cfg = config::load(
        None,
        vec![("GATEWAY__SERVER__LISTEN".into(), "127.0.0.1:0".into())],
    )
    .unwrap();
    let store: Arc<dyn BalanceStore> = Arc::new(MemoryStore::new());
    rt.block_on(fund(store.as_ref()));
    // The whole path: every balance payment is group-committed to SQLite (fsync on commit).
    let data = tempfile::tempdir().unwrap();
    let settlements: Arc<dyn SettlementStore> =
        Arc::new(SqliteStore::open(&data.path().join("bench.sqlite3")).unwrap());
    rt.block_on(settlements.migrate()).unwrap();
    let app = rt
        .block_on(Application::build_with(cfg, store, settlements))
        .unwrap();
    let addr = app.local_addr();
    rt.spawn(app.run_until(std::future::pending()));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut group = c.benchmark_group("authorize");
    group.throughput(Throughput::Elements(1));
    let pay = move |client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >| async move {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let body = format!(
            r#"{{"merchant_order_id":"h{n}","amount":"1.00","currency":"CNY","method":"balance","account_id":"bench"}}"#
        );
        let request = hyper::Request::post(format!("http://{addr}/v1/payments"))
            .header("authorization", "Bearer sk_test_alpha")
            .header("idempotency-key", format!("h{n}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 201);
        response.into_body().collect().await.unwrap();
    };
    // One client, one payment at a time: the latency of a payment, commit included.
    group.bench_function("http/in_process_sqlite", |b| {
        b.to_async(&rt).iter(|| pay(client.clone()))
    });
    // 32 payments in flight: what group commit buys.
    group.throughput(Throughput::Elements(32));
    group.bench_function("http/in_process_sqlite_32_concurrent", |b| {
        b.to_async(&rt).iter(|| async {
            let mut calls = tokio::task::JoinSet::new();
            for _ in 0..32 {
                calls.spawn(pay(client.clone()));
            }
            while let Some(done) = calls.join_next().await {
                done.unwrap();
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = bench_store, bench_http
}
criterion_main!(benches);
