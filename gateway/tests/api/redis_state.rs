//! What the gateway keeps in Redis, against a real redis-server: the outbox record of a balance
//! payment is compact (the document is already in Redis) and recovery rebuilds the very
//! settlement from it; records in the previous, full format still settle; a finished payment's
//! state leaves after the retention (Redis returns to its size) and the store answers for it;
//! the outbox and the holds are found through per-slot indexes, not a keyspace scan.

use std::sync::Arc;
use std::time::Duration;

use gateway::ids::{AccountId, IdempotencyKey, MerchantId, MerchantOrderId, PaymentId, ScopeTag};
use gateway::money::Currency;
use gateway::preauth::redis::RedisStore;
use gateway::preauth::slots;
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

/// A replayed create answers what the first one did: `201` with the same payment.
fn assert_replays(replay: &Reply, id: &str) {
    assert_eq!(
        (replay.status, replay.body["id"].as_str()),
        (201, Some(id)),
        "{:?}",
        replay.body
    );
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
        doc_json: None,
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
        // A done record keeps its request hash and has no in-flight state ('s' absent).
        let (hash, state): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(format!("i:{{{tag}}}:{}", request.idempotency.key.as_str()))
            .arg("h")
            .arg("s")
            .query_async(&mut conn)
            .await
            .unwrap();
        if !left && hash.is_some() && state.is_none() {
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
    // The previous release kept no slot indexes: take the record's entries out, and the mark
    // that this Redis was indexed. The next gateway to connect indexes what it finds.
    let mut conn = app.redis.as_ref().unwrap().connection().await;
    let [ux, _, rx] = slot_keys("acc");
    let tag = request.scope.tag().to_string();
    let _: () = redis::pipe()
        .cmd("SREM")
        .arg(&ux)
        .arg(&tag)
        .cmd("ZREM")
        .arg(&rx)
        .arg(&request.doc.id)
        .cmd("DEL")
        .arg("gateway:slot-indexes:v1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _restarted = redis_store(&app.redis.as_ref().unwrap().url()).await;
    let indexed: bool = conn.sismember(&ux, &tag).await.unwrap();
    assert!(indexed, "the outbox found at start is indexed");
    let dated: Option<f64> = conn.zscore(&rx, &request.doc.id).await.unwrap();
    assert!(
        dated.is_some(),
        "the payment found at start is in the retention index"
    );
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
    // As long as a UUID, as clients commonly send.
    let key = format!("{:-<36}", uuidish());
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
    eprintln!("outbox record: {} bytes: {stored}", stored.len());
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
    assert_replays(&replay, &id);
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

/// Scripts Redis no longer holds (a restart without its data, `SCRIPT FLUSH`) are loaded again
/// by the call that finds them missing: the payment goes through, its commit's batched mark
/// forgets its outbox record and lets its key replay, and nothing is done twice.
#[tokio::test]
async fn scripts_redis_lost_are_loaded_again_by_their_next_call() {
    let app = spawn_app(Backend::Redis).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let redis = app.redis.as_ref().unwrap();
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();

    let body = balance_payment("o-flush", "acc", "10.00");
    let paid = app.pay(ALPHA, "k-flush", body.clone()).await;
    assert_eq!(paid.status, 201, "{:?}", paid.body);
    let id = paid.body["id"].as_str().unwrap().to_owned();
    let tag = alpha_acc().tag;
    let mut settled = false;
    for _ in 0..100 {
        let pending: bool = conn.hexists(format!("u:{{{tag}}}"), &id).await.unwrap();
        if !pending {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(settled, "the outbox record was never forgotten");
    let replay = app.pay(ALPHA, "k-flush", body).await;
    assert_replays(&replay, &id);
    app.assert_account(ALPHA, "acc", "90.00", "0.00", "90.00")
        .await;
}

/// Finished payments leave Redis one second after they were written; the sweeper runs every
/// 50 ms and recovery prunes its index every 100 ms.
const SHORT_RETENTION: &[(&str, &str)] = &[
    ("GATEWAY__REDIS__PAYMENT_RETENTION_SECONDS", "1"),
    ("GATEWAY__PREAUTH__IDEMPOTENCY_RETENTION_SECONDS", "1"),
    ("GATEWAY__PREAUTH__SWEEP_INTERVAL_MS", "50"),
    ("GATEWAY__STORE__RECOVERY_INTERVAL_MS", "100"),
    ("GATEWAY__STORE__RECOVERY_MIN_AGE_MS", "100"),
];

/// Polls (every 100 ms, 10 s at most) until none of these hash fields (key, field) and keys
/// is in Redis; whether they all left.
async fn left_redis(
    conn: &mut redis::aio::MultiplexedConnection,
    fields: &[(String, &str)],
    keys: &[String],
) -> bool {
    for _ in 0..100 {
        let mut here = false;
        for (key, field) in fields {
            here |= conn.hexists::<_, _, bool>(key, *field).await.unwrap();
        }
        for key in keys {
            here |= conn.exists::<_, bool>(key).await.unwrap();
        }
        if !here {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `DBSIZE` and `INFO memory`'s `used_memory`.
async fn redis_size(redis: &RedisServer) -> (u64, u64) {
    let mut conn = redis.connection().await;
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    let used = info
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory in INFO memory");
    (keys, used)
}

/// Polls until the keyspace is back to `keys` keys at most and `used_memory` within `slack`
/// bytes of `used` (bounded: 30 s); returns what it saw last.
async fn wait_back_to(redis: &RedisServer, keys: u64, used: u64, slack: u64) -> (u64, u64) {
    let mut now = redis_size(redis).await;
    for _ in 0..300 {
        if now.0 <= keys && now.1 <= used + slack {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = redis_size(redis).await;
    }
    now
}

const ACCOUNTS: usize = 8;
const PAYMENTS: usize = 2_000;
const WORKERS: usize = 16;

#[tokio::test]
async fn finished_payments_leave_redis_after_the_retention() {
    let app = Arc::new(spawn_app_with(Backend::Redis, SHORT_RETENTION).await);
    for a in 0..ACCOUNTS {
        app.funded_account(ALPHA, "alpha", &format!("acc{a}"), "100000.00", "0.00")
            .await;
    }
    // A first round, so that what every run keeps (loaded scripts, connections, the accounts)
    // is in the baseline; then the baseline once it has left.
    for i in 0..20 {
        let account = format!("acc{}", i % ACCOUNTS);
        let paid = app
            .pay(
                ALPHA,
                &uuidish(),
                balance_payment(&format!("warm{i}"), &account, "1.00"),
            )
            .await;
        assert_eq!(paid.status, 201, "{:?}", paid.body);
    }
    let redis = app.redis.as_ref().unwrap();
    // The accounts and the mark that the slot indexes cover this Redis.
    let kept = ACCOUNTS as u64 + 1;
    let (accounts_only, _) = wait_back_to(redis, kept, u64::MAX / 2, 0).await;
    assert_eq!(accounts_only, kept, "only the accounts are left");
    let (keys_before, used_before) = redis_size(redis).await;

    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let app = app.clone();
        workers.push(tokio::spawn(async move {
            for i in (w..PAYMENTS).step_by(WORKERS) {
                let account = format!("acc{}", i % ACCOUNTS);
                let paid = app
                    .pay(
                        ALPHA,
                        &uuidish(),
                        balance_payment(&format!("o{i}"), &account, "1.00"),
                    )
                    .await;
                assert_eq!(paid.status, 201, "{:?}", paid.body);
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let (keys_peak, used_peak) = redis_size(redis).await;
    assert!(
        keys_peak > keys_before + 100 && used_peak > used_before + 100_000,
        "the payments were in Redis: {keys_before} -> {keys_peak} keys, {used_before} -> \
         {used_peak} bytes"
    );

    // Everything of theirs leaves: their state (ps, pd, o), their keys, the indexes.
    let (keys_after, used_after) = wait_back_to(redis, keys_before, used_before, 64 * 1024).await;
    eprintln!(
        "DBSIZE {keys_before} -> {keys_peak} -> {keys_after}; used_memory {used_before} -> \
         {used_peak} -> {used_after}"
    );
    assert_eq!(
        keys_after, keys_before,
        "DBSIZE {keys_before} -> {keys_peak} -> {keys_after}"
    );
    assert!(
        used_after <= used_before + 64 * 1024,
        "used_memory {used_before} -> {used_peak} -> {used_after}"
    );
    // Every balance is exact, as the store has it.
    let disk = app.settlement_store().await;
    let balances = disk.balances(None).await.unwrap();
    assert_eq!(balances.len(), ACCOUNTS);
    for balance in balances {
        let a: usize = balance.account.account_id[3..].parse().unwrap();
        let paid = (0..20)
            .chain(0..PAYMENTS)
            .filter(|i| i % ACCOUNTS == a)
            .count() as i64;
        assert_eq!(
            balance.balance_minor,
            10_000_000 - paid * 100,
            "{balance:?}"
        );
    }
}

#[tokio::test]
async fn an_evicted_payment_is_read_refunded_and_replayed_from_the_store() {
    let app = spawn_app_with(Backend::Redis, SHORT_RETENTION).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let body = balance_payment("o-evicted", "acc", "10.00");
    let paid = app.pay(ALPHA, "k-evicted", body.clone()).await;
    assert_eq!(paid.status, 201, "{:?}", paid.body);
    let id = paid.body["id"].as_str().unwrap().to_owned();

    // Gone from Redis: its state and its idempotency record.
    let tag = alpha_acc().tag;
    let mut conn = app.redis.as_ref().unwrap().connection().await;
    let gone = left_redis(
        &mut conn,
        &[
            (format!("ps:{{{tag}}}"), &id),
            (format!("pd:{{{tag}}}"), &id),
            (format!("o:{{{tag}}}"), "o-evicted"),
        ],
        &[format!("i:{{{tag}}}:k-evicted")],
    )
    .await;
    assert!(gone, "the payment's state never left Redis");

    // Read from the store, by id and by its live order id.
    let got = app.get(&format!("/v1/payments/{id}"), ALPHA).await;
    assert_eq!(
        (got.status, got.body["status"].as_str()),
        (200, Some("succeeded"))
    );
    let by_order = app
        .get(
            "/v1/payments?merchant_order_id=o-evicted&account_id=acc",
            ALPHA,
        )
        .await;
    assert_eq!(
        (by_order.status, by_order.body["id"].as_str()),
        (200, Some(id.as_str())),
        "{:?}",
        by_order.body
    );
    // Its key replays it (the store decides): no second charge.
    let replay = app.pay(ALPHA, "k-evicted", body).await;
    assert_replays(&replay, &id);
    app.assert_account(ALPHA, "acc", "90.00", "0.00", "90.00")
        .await;
    // Its order id is still taken (the store's live order index).
    let again = app
        .pay(
            ALPHA,
            "k-other",
            balance_payment("o-evicted", "acc", "10.00"),
        )
        .await;
    assert_eq!(
        (again.status, again.code()),
        (409, "duplicate_order"),
        "{:?}",
        again.body
    );
    app.assert_account(ALPHA, "acc", "90.00", "0.00", "90.00")
        .await;
    // Refunded: put back from the store, then refunded as usual.
    let back = app
        .post(
            &format!("/v1/payments/{id}/refunds"),
            ALPHA,
            "r-evicted",
            json!({"amount": "4.00"}),
        )
        .await;
    assert_eq!(
        (back.status, back.body["status"].as_str()),
        (201, Some("succeeded")),
        "{:?}",
        back.body
    );
    app.assert_account(ALPHA, "acc", "94.00", "0.00", "94.00")
        .await;
    let got = app.wait_status(&id, "partially_refunded").await;
    assert_eq!(got["refunds"][0]["amount"], "4.00");
}

/// Index keys of the slot of alpha's account `account` (`ux`, `hx`, `rx`).
fn slot_keys(account: &str) -> [String; 3] {
    let key = AccountKey::new(
        MerchantId::parse("alpha").unwrap(),
        AccountId::parse(account).unwrap(),
    );
    let s = slots::slot_tag(slots::slot_of(key.tag));
    [
        format!("ux:{{{s}}}"),
        format!("hx:{{{s}}}"),
        format!("rx:{{{s}}}"),
    ]
}

/// Recovery finds the outbox through one index key per cluster slot, a bounded number of slots
/// per call (here 64: a full pass is 256 calls), never by scanning the keyspace; the sweeper
/// finds live holds the same way; both indexes empty themselves once nothing is left.
#[tokio::test]
async fn the_outbox_and_the_holds_are_found_through_slot_indexes() {
    let redis = RedisServer::start().await;
    let config = test_config(&[
        ("GATEWAY__REDIS__URL", &redis.url()),
        ("GATEWAY__REDIS__INDEX_SLOTS_PER_CALL", "64"),
    ]);
    let store: Arc<dyn BalanceStore> =
        Arc::new(RedisStore::connect(&config.settings.redis).await.unwrap());
    let now_ms = gateway::telemetry::now_ms();
    let ctx = |now_ms| OpContext {
        now_ms,
        lazy_release_max: 16,
    };
    const SCOPES: usize = 40;
    let mut ids = Vec::new();
    for a in 0..SCOPES {
        let account = AccountKey::new(
            MerchantId::parse("alpha").unwrap(),
            AccountId::parse(&format!("acc{a}")).unwrap(),
        );
        store
            .upsert_account(
                &account,
                Currency::parse("CNY").unwrap(),
                100_000,
                ctx(now_ms),
            )
            .await
            .unwrap();
        // One captured payment waiting for its commit, one hold expiring in a second.
        for (n, capture_now) in [(0, true), (1, false)] {
            let id = PaymentId::generate(account.tag, now_ms);
            let order = format!("o{a}-{n}");
            let doc = PaymentDoc {
                id: id.as_str().to_owned(),
                merchant_id: "alpha".into(),
                account_id: Some(format!("acc{a}")),
                merchant_order_id: order.clone(),
                amount_minor: 100,
                currency: Currency::parse("CNY").unwrap(),
                method: if capture_now {
                    Method::Balance
                } else {
                    Method::Supplier
                },
                purpose: Purpose::Charge,
                created_at_ms: now_ms,
                expires_at_ms: now_ms + 1_000,
                description: None,
                notify_url: None,
                metadata: None,
            };
            let request = AuthorizeRequest {
                scope: Scope::Account(account.clone()),
                idempotency: IdempotencyClaim {
                    key: IdempotencyKey::parse(&format!("k{a}-{n}"), 255).unwrap(),
                    request_hash: "h".into(),
                    retention_seconds: 86_400,
                },
                order_id: MerchantOrderId::parse(&order, 64).unwrap(),
                doc,
                hold: Some(HoldSpec {
                    expires_at_ms: now_ms + 1_000,
                    capture_now,
                }),
                pending_record: capture_now.then(|| CompactRecord::balance_capture("h").to_json()),
                doc_json: None,
            };
            let created = store.authorize(&request, ctx(now_ms)).await.unwrap();
            assert!(
                matches!(created, AuthorizeOutcome::Created { .. }),
                "{created:?}"
            );
            if capture_now {
                ids.push(id.as_str().to_owned());
            }
        }
        let [ux, hx, rx] = slot_keys(&format!("acc{a}"));
        let mut conn = redis.connection().await;
        let tag = account.tag.to_string();
        assert!(conn.sismember::<_, _, bool>(&ux, &tag).await.unwrap());
        assert!(conn.sismember::<_, _, bool>(&hx, &tag).await.unwrap());
        assert!(conn.zcard::<_, u64>(&rx).await.unwrap() >= 2);
    }
    // A record no index names (written by hand) is not found: nothing scans the keyspace.
    let mut conn = redis.connection().await;
    let _: () = conn
        .hset("u:{0000000000}", "pay_unindexed", "{}")
        .await
        .unwrap();

    // A full pass takes 16384 / 64 calls; it finds every record, once.
    let mut found = Vec::new();
    let mut calls = 0;
    loop {
        let page = store.unsettled(SCOPES).await.unwrap();
        calls += 1;
        found.extend(page.entries.into_iter().map(|e| e.id));
        if page.complete {
            break;
        }
    }
    assert_eq!(calls, 16_384 / 64);
    found.sort();
    ids.sort();
    assert_eq!(found, ids);

    // Settled, then pruned by the next pass: the outbox index is empty.
    let marks: Vec<_> = found
        .iter()
        .map(|id| gateway::preauth::SettledMark {
            tag: PaymentId::parse(id).unwrap().tag(),
            id: id.clone(),
            idempotency_key: String::new(),
        })
        .collect();
    store.mark_settled(&marks).await.unwrap();
    loop {
        let page = store.unsettled(SCOPES).await.unwrap();
        assert!(page.entries.is_empty());
        if page.complete {
            break;
        }
    }
    // The holds expire; the sweeper (64 slots a call) releases every one and empties its index.
    let mut released = 0;
    for _ in 0..(16_384 / 64) {
        released += store
            .sweep_expired(ctx(now_ms + 2_000), 1_000)
            .await
            .unwrap();
    }
    assert_eq!(released, SCOPES as u64);
    let tag_of = |a: usize| {
        AccountKey::new(
            MerchantId::parse("alpha").unwrap(),
            AccountId::parse(&format!("acc{a}")).unwrap(),
        )
        .tag
        .to_string()
    };
    for a in 0..SCOPES {
        let [_, hx, _] = slot_keys(&format!("acc{a}"));
        assert!(
            !conn.sismember::<_, _, bool>(&hx, tag_of(a)).await.unwrap(),
            "hx of acc{a}"
        );
    }
    // The releases' final statuses went to the outbox, found through the index again; once
    // settled, the next pass empties the index.
    let mut statuses = Vec::new();
    loop {
        let page = store.unsettled(SCOPES).await.unwrap();
        statuses.extend(page.entries.into_iter().filter(|e| e.id.ends_with("#s")));
        if page.complete {
            break;
        }
    }
    assert_eq!(statuses.len(), SCOPES);
    let marks: Vec<_> = statuses
        .iter()
        .map(|e| gateway::preauth::SettledMark {
            tag: e.tag,
            id: e.id.clone(),
            idempotency_key: String::new(),
        })
        .collect();
    store.mark_settled(&marks).await.unwrap();
    loop {
        if store.unsettled(SCOPES).await.unwrap().complete {
            break;
        }
    }
    for a in 0..SCOPES {
        let [ux, _, _] = slot_keys(&format!("acc{a}"));
        assert!(
            !conn.sismember::<_, _, bool>(&ux, tag_of(a)).await.unwrap(),
            "ux of acc{a}"
        );
    }
}

/// A supplier's success captured in Redis and cut before its commit: recovery settles the
/// payment from the compact record (`<payment id>#m`) and the payment's document.
#[tokio::test]
async fn a_channel_success_cut_before_its_commit_is_settled_from_its_compact_record() {
    let app = spawn_app_with(Backend::Redis, FAST_RECOVERY).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let created = app
        .pay(
            ALPHA,
            &uuidish(),
            supplier_payment("o-supplier", "acc", "30.00"),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["status"], "pending");
    let id = created.body["id"].as_str().unwrap().to_owned();
    let channel = created.body["attempts"][0]["channel_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pid = PaymentId::parse(&id).unwrap();
    let balances = redis_store(&app.redis.as_ref().unwrap().url()).await;
    let now_ms = gateway::telemetry::now_ms();
    let request = gateway::preauth::SucceedRequest {
        payment: pid.clone(),
        effect: gateway::preauth::SuccessEffect::Capture,
        amount_minor: 3_000,
        pending_record: CompactRecord::channel_success(&channel, Some("TXN-cut"), 0, now_ms)
            .to_json(),
    };
    let ctx = OpContext {
        now_ms,
        lazy_release_max: 16,
    };
    assert!(matches!(
        balances.succeed(&request, ctx).await.unwrap(),
        gateway::preauth::SucceedOutcome::Done { .. }
    ));
    let disk = app.settlement_store().await;
    let mut committed = None;
    for _ in 0..200 {
        committed = disk.committed_success(&id).await.unwrap();
        if committed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(committed, Some((Some(channel), Some("TXN-cut".to_owned()))));
    app.assert_account(ALPHA, "acc", "70.00", "0.00", "70.00")
        .await;
    assert_eq!(
        disk.payment(&id).await.unwrap().unwrap().status,
        gateway::preauth::PaymentStatus::Succeeded
    );
}

/// A rebuild puts back the order ids of payments that ended live as markers (`!<payment id>`
/// in `o:{T}`); they leave after the retention too, and the store still refuses the order id.
#[tokio::test]
async fn order_markers_a_rebuild_puts_back_leave_after_the_retention() {
    let app = spawn_app_with(Backend::Redis, SHORT_RETENTION).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let paid = app
        .pay(
            ALPHA,
            "k-marker",
            balance_payment("o-marker", "acc", "10.00"),
        )
        .await;
    assert_eq!(paid.status, 201, "{:?}", paid.body);
    let id = paid.body["id"].as_str().unwrap().to_owned();
    let redis = app.redis.as_ref().unwrap();
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();

    let balances = redis_store(&redis.url()).await;
    let disk = app.settlement_store().await;
    gateway::settlement::rebuild::rebuild_balances(disk.as_ref(), balances.as_ref(), None, 86_400)
        .await
        .unwrap();
    let tag = alpha_acc().tag;
    let marker: Option<String> = conn.hget(format!("o:{{{tag}}}"), "o-marker").await.unwrap();
    assert_eq!(marker, Some(format!("!{id}")));
    let [_, _, rx] = slot_keys("acc");
    let indexed: Option<f64> = conn.zscore(&rx, format!("!{id}:o-marker")).await.unwrap();
    assert!(indexed.is_some());

    // The app's sweeper lets the marker go after the retention (the idempotency record put
    // back expires on its own TTL).
    let gone = left_redis(
        &mut conn,
        &[(format!("o:{{{tag}}}"), "o-marker")],
        std::slice::from_ref(&rx),
    )
    .await;
    assert!(gone, "the order-id marker never left");
    // The store still holds the order id for the payment.
    let again = app
        .pay(
            ALPHA,
            "k-marker-2",
            balance_payment("o-marker", "acc", "10.00"),
        )
        .await;
    assert_eq!(
        (again.status, again.code()),
        (409, "duplicate_order"),
        "{:?}",
        again.body
    );
    app.assert_account(ALPHA, "acc", "90.00", "0.00", "90.00")
        .await;
}

/// A channel's acceptance kept beside the payment's document (`<id>#a` in `pd:{T}`, see
/// `accept.lua`) leaves with the document once the payment is finished and past the
/// retention; the store then answers with the attempt as it committed it.
#[tokio::test]
async fn a_kept_acceptance_leaves_redis_with_its_payment() {
    let app = spawn_app_with(Backend::Redis, SHORT_RETENTION).await;
    let created = app
        .pay(
            ALPHA,
            "k-accepted",
            json!({"merchant_order_id": "o-accepted", "amount": "3.00", "currency": "CNY",
                   "method": "alipay"}),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let tag = PaymentId::parse(&id).unwrap().tag();
    let accepted_field = format!("{id}#a");
    let mut conn = app.redis.as_ref().unwrap().connection().await;
    let kept: Option<String> = conn
        .hget(format!("pd:{{{tag}}}"), &accepted_field)
        .await
        .unwrap();
    let kept: serde_json::Value = serde_json::from_str(&kept.expect("kept at the answer")).unwrap();
    assert_eq!(kept["n"], 1);
    let action: serde_json::Value = serde_json::from_str(kept["a"].as_str().unwrap()).unwrap();
    assert_eq!(action, created.body["action"]);

    // Paid at the channel: its callback settles it; then, past the retention, it leaves.
    let order = created.body["attempts"][0]["channel_order_id"]
        .as_str()
        .unwrap();
    assert!(matches!(
        app.channels.sim.pay(order),
        channel_sim::PayOutcome::Paid(_)
    ));
    app.wait_status(&id, "succeeded").await;
    let gone = left_redis(
        &mut conn,
        &[
            (format!("pd:{{{tag}}}"), &id),
            (format!("pd:{{{tag}}}"), &accepted_field),
        ],
        &[],
    )
    .await;
    assert!(gone, "the document or the acceptance stayed in Redis");
    let got = app.get(&format!("/v1/payments/{id}"), ALPHA).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.body["status"], "succeeded");
    assert_eq!(got.body["attempts"][0]["outcome"], "succeeded");
}
