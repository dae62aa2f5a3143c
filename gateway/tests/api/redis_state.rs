//! What the gateway keeps in Redis, against a real redis-server: the outbox record of a balance
//! payment is compact (the document is already in Redis) and recovery rebuilds the very
//! settlement from it; records in the previous, full format still settle.

use std::sync::Arc;
use std::time::Duration;

use gateway::ids::{AccountId, IdempotencyKey, MerchantId, MerchantOrderId, PaymentId, ScopeTag};
use gateway::money::Currency;
use gateway::preauth::redis::RedisStore;
use gateway::preauth::{
    AccountKey, AuthorizeOutcome, AuthorizeRequest, BalanceStore, HoldSpec, IdempotencyClaim,
    Method, OpContext, PaymentDoc, Purpose, Scope,
};
use gateway::settlement::outbox::{self, CompactRecord};
use gateway::settlement::{CommitOutcome, PaymentStore, PendingRecord, SettlementStore};
use redis::AsyncCommands;
use serde_json::json;

use crate::helpers::*;

/// Records older than 100 ms are re-driven every 100 ms.
const FAST_RECOVERY: &[(&str, &str)] = &[
    ("GATEWAY__STORE__RECOVERY_INTERVAL_MS", "100"),
    ("GATEWAY__STORE__RECOVERY_MIN_AGE_MS", "100"),
];

/// The bound issue 14 sets on a balance payment's outbox record.
const MAX_RECORD_BYTES: usize = 256;

fn alpha_acc() -> AccountKey {
    AccountKey::new(
        MerchantId::parse("alpha").unwrap(),
        AccountId::parse("acc").unwrap(),
    )
}

async fn redis_store(url: &str) -> Arc<dyn BalanceStore> {
    let config = test_config(&[("GATEWAY__REDIS__URL", url)]);
    Arc::new(RedisStore::connect(&config.settings.redis).await.unwrap())
}

/// A balance payment of alpha's `acc`, as the request path would ask the balance store for
/// it, with `record` as its outbox record (built from the request by the caller).
fn balance_request(
    key: &str,
    order: &str,
    amount_minor: i64,
    record: impl FnOnce(&PaymentDoc, ScopeTag, &str, &str) -> String,
) -> AuthorizeRequest {
    let account = alpha_acc();
    let tag = account.tag;
    let now_ms = gateway::telemetry::now_ms();
    let id = PaymentId::generate(tag, now_ms);
    let doc = PaymentDoc {
        id: id.as_str().to_owned(),
        merchant_id: "alpha".into(),
        account_id: Some("acc".into()),
        merchant_order_id: order.into(),
        amount_minor,
        currency: Currency::parse("CNY").unwrap(),
        method: Method::Balance,
        purpose: Purpose::Charge,
        created_at_ms: now_ms,
        expires_at_ms: now_ms + 900_000,
        description: Some("a \"quoted\" game card, 100 点".into()),
        notify_url: None,
        metadata: Some(
            json!({"sku": "card-100", "n": 3, "f": 0.1})
                .as_object()
                .unwrap()
                .clone(),
        ),
    };
    let request_hash = format!("{:032x}", amount_minor as u128 * 7919);
    let pending = record(&doc, tag, key, &request_hash);
    AuthorizeRequest {
        scope: Scope::Account(account),
        idempotency: IdempotencyClaim {
            key: IdempotencyKey::parse(key, 255).unwrap(),
            request_hash,
            retention_seconds: 86_400,
        },
        order_id: MerchantOrderId::parse(order, 64).unwrap(),
        doc,
        hold: Some(HoldSpec {
            expires_at_ms: now_ms + 900_000,
            capture_now: true,
        }),
        pending_record: Some(pending),
    }
}

/// Authorizes `request` straight on the balance store — the gateway then "crashes": nothing
/// commits it but recovery. Returns the account's sequence after the capture.
async fn authorize_and_crash(store: &dyn BalanceStore, request: &AuthorizeRequest) -> u64 {
    let ctx = OpContext {
        now_ms: gateway::telemetry::now_ms(),
        lazy_release_max: 16,
    };
    match store.authorize(request, ctx).await.unwrap() {
        AuthorizeOutcome::Created { account, .. } => account.unwrap().seq,
        other => panic!("not created: {other:?}"),
    }
}

/// Polls the store until the payment's row is there (bounded: 10 s).
async fn wait_committed(app: &TestApp, store: &dyn SettlementStore, id: &str) {
    for _ in 0..200 {
        if store.payment(id).await.unwrap().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "recovery never committed {id}; redis at {:?}",
        app.redis.as_ref().map(|r| r.url())
    );
}

/// Recovery committed `request`'s payment exactly as the request path would have: the same
/// settlement (a re-commit is recognized as already committed, by its content hash), the same
/// row with its key and request hash; and its key replays.
async fn assert_settled_as_built(app: &TestApp, request: &AuthorizeRequest, seq: u64) {
    let disk = app.settlement_store().await;
    wait_committed(app, disk.as_ref(), &request.doc.id).await;
    let mut expected = outbox::balance_capture(
        &request.doc,
        request.scope.tag(),
        request.idempotency.key.as_str(),
        &request.idempotency.request_hash,
    );
    expected.account_seq = Some(seq);
    assert_eq!(
        disk.commit(std::slice::from_ref(&expected)).await.unwrap(),
        vec![CommitOutcome::AlreadyCommitted]
    );
    let row = disk.payment(&request.doc.id).await.unwrap().unwrap();
    let want = expected.payment.clone().unwrap();
    assert_eq!(row.idempotency_key, want.idempotency_key);
    assert_eq!(row.request_hash, want.request_hash);
    assert_eq!(row.scope_tag, want.scope_tag);
    assert_eq!(row.doc, want.doc);
    assert_eq!(
        (row.status, row.amount_minor, row.created_at_ms),
        (want.status, want.amount_minor, want.created_at_ms)
    );
    // The outbox entry is gone and the key replays (no longer in flight).
    let mut conn = app.redis.as_ref().unwrap().connection().await;
    let tag = request.scope.tag();
    for _ in 0..100 {
        let left: bool = conn
            .hexists(format!("u:{{{tag}}}"), &request.doc.id)
            .await
            .unwrap();
        let state: Option<String> = conn
            .hget(
                format!("i:{{{tag}}}:{}", request.idempotency.key.as_str()),
                "s",
            )
            .await
            .unwrap();
        if !left && state.as_deref() == Some("D") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the outbox entry of {} was not marked settled",
        request.doc.id
    );
}

#[tokio::test]
async fn a_balance_payment_cut_before_its_commit_is_settled_from_its_compact_record() {
    let app = spawn_app_with(Backend::Redis, FAST_RECOVERY).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let balances = redis_store(&app.redis.as_ref().unwrap().url()).await;
    let key = uuidish();
    let request = balance_request(&key, "o-compact", 1_250, |_, _, _, hash| {
        CompactRecord::balance_capture(hash).to_json()
    });
    let seq = authorize_and_crash(balances.as_ref(), &request).await;

    // What the script stored for it: the envelope and a compact record, no document.
    let mut conn = app.redis.as_ref().unwrap().connection().await;
    let tag = request.scope.tag();
    let stored: Option<String> = conn
        .hget(format!("u:{{{tag}}}"), &request.doc.id)
        .await
        .unwrap();
    if let Some(stored) = stored {
        assert!(
            stored.len() <= MAX_RECORD_BYTES,
            "{} bytes: {stored}",
            stored.len()
        );
        assert!(!stored.contains("card-100"), "{stored}");
    }

    assert_settled_as_built(&app, &request, seq).await;
    app.assert_account(ALPHA, "acc", "87.50", "0.00", "87.50")
        .await;
    let got = app
        .get(&format!("/v1/payments/{}", request.doc.id), ALPHA)
        .await;
    assert_eq!(
        (got.status, got.body["status"].as_str()),
        (200, Some("succeeded"))
    );
}

#[tokio::test]
async fn a_full_format_record_from_the_previous_release_still_settles() {
    let app = spawn_app_with(Backend::Redis, FAST_RECOVERY).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let balances = redis_store(&app.redis.as_ref().unwrap().url()).await;
    // As the previous release wrote it: the whole settlement, its payment row and document.
    let request = balance_request("old-format-key", "o-old", 2_000, |doc, tag, key, hash| {
        PendingRecord::Settlement(outbox::balance_capture(doc, tag, key, hash)).to_json()
    });
    assert!(request.pending_record.as_ref().unwrap().len() > 600);
    let seq = authorize_and_crash(balances.as_ref(), &request).await;
    assert_settled_as_built(&app, &request, seq).await;
    app.assert_account(ALPHA, "acc", "80.00", "0.00", "80.00")
        .await;
}

/// The real request path, against a PostgreSQL that goes away between the Redis capture and
/// the commit: the outbox record Redis keeps for the payment is at most 256 bytes, and a new
/// gateway process (the first one is gone) settles the payment from it; its key then replays
/// the payment.
#[tokio::test]
async fn the_outbox_record_of_a_real_balance_payment_is_compact_and_recovers() {
    let redis = RedisServer::start().await;
    let mut postgres = PostgresServer::start().await;
    let (redis_url, pg_url) = (redis.url(), postgres.url());
    let first_run: Vec<(&str, &str)> = vec![
        ("GATEWAY__REDIS__URL", &redis_url),
        ("GATEWAY__STORE__URL", &pg_url),
        // The first process never re-drives anything itself.
        ("GATEWAY__STORE__RECOVERY_MIN_AGE_MS", "3600000"),
        ("GATEWAY__STORE__SETTLE_TIMEOUT_MS", "2000"),
        ("GATEWAY__STORE__CONNECT_TIMEOUT_MS", "500"),
        ("GATEWAY__STORE__HEALTH_CHECK_INTERVAL_MS", "100"),
    ];
    let app = spawn_app_with(Backend::Memory, &first_run).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let key = uuidish();
    let body = balance_payment("o-real", "acc", "10.00");
    assert_eq!(
        app.pay(ALPHA, &uuidish(), balance_payment("o-ok", "acc", "1.00"))
            .await
            .status,
        201
    );

    postgres.stop();
    let cut = app.pay(ALPHA, &key, body.clone()).await;
    assert_eq!(
        (cut.status, cut.code()),
        (503, "unavailable"),
        "{:?}",
        cut.body
    );
    let id = cut.body["error"]["payment_id"].as_str().unwrap().to_owned();
    let tag = alpha_acc().tag;
    let mut conn = redis.connection().await;
    let stored: String = conn.hget(format!("u:{{{tag}}}"), &id).await.unwrap();
    assert!(
        stored.len() <= MAX_RECORD_BYTES,
        "the outbox record is {} bytes: {stored}",
        stored.len()
    );
    let doc: String = conn.hget(format!("pd:{{{tag}}}"), &id).await.unwrap();
    assert!(
        !stored.contains(&doc) && !stored.contains("merchant_order_id"),
        "{stored}"
    );
    drop(app);

    postgres.restart().await;
    let second_run: Vec<(&str, &str)> = vec![
        ("GATEWAY__REDIS__URL", &redis_url),
        ("GATEWAY__STORE__URL", &pg_url),
    ];
    // Startup recovery settles it before the new process serves.
    let app = spawn_app_with(Backend::Memory, &second_run).await;
    let replay = app.pay(ALPHA, &key, body).await;
    assert_eq!(
        (replay.status, replay.body["id"].as_str()),
        (201, Some(id.as_str())),
        "{:?}",
        replay.body
    );
    app.assert_account(ALPHA, "acc", "89.00", "0.00", "89.00")
        .await;
    let disk = gateway::settlement::postgres::PostgresStore::connect(&pg_url, 2, 2_000)
        .await
        .unwrap();
    let row = disk.payment(&id).await.unwrap().unwrap();
    assert_eq!(row.idempotency_key.as_deref(), Some(key.as_str()));
    assert!(row.request_hash.is_some());
    let left: bool = conn.hexists(format!("u:{{{tag}}}"), &id).await.unwrap();
    assert!(!left);
}
