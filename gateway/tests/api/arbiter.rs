//! The store decides (DESIGN.md §3): whatever the balance store forgot — a restarted sandbox,
//! a flushed Redis, a Redis that lost only its idempotency and order-id records — a retried
//! request is replayed, a new key for a live order id is refused, and nobody is charged twice.
//! After each scenario the store's own invariants are checked.

use serde_json::{json, Value};

use gateway::settlement::SettlementStore;

use crate::binary::Gateway;
use crate::crash::fund;
use crate::helpers::{
    balance_payment, spawn_app_on, supplier_payment, Backend, Store, TestApp, ALPHA,
};

/// What must hold in the settlement store after any scenario: every movement of a payment
/// belongs to a payment row and balances (its postings sum to zero), no refund total exceeds
/// its payment, and each account's balance is what the API shows. (One live payment per
/// scoped order id is the store's own unique index.)
pub(crate) async fn assert_store_invariants(
    store: &dyn SettlementStore,
    api_balances: &[(&str, &str, i64)],
) {
    let movements = store.postings_sum_by_movement().await.unwrap();
    for (payment_id, kind, sequence, sum) in &movements {
        assert_eq!(
            *sum, 0,
            "{payment_id} {kind} #{sequence}: postings do not balance"
        );
        if kind == "adjustment" {
            continue; // an adjustment is a movement of its own, without a payment
        }
        let payment = store.payment(payment_id).await.unwrap();
        let Some(payment) = payment else {
            panic!("{payment_id} {kind} #{sequence}: a movement without its payment row");
        };
        let refunded: i64 = store
            .refunds(payment_id)
            .await
            .unwrap()
            .iter()
            .filter(|r| r.status.as_str() != "failed")
            .map(|r| r.amount_minor)
            .sum();
        assert!(
            refunded <= payment.amount_minor,
            "{payment_id}: refunds {refunded} exceed {}",
            payment.amount_minor
        );
    }
    let balances = store.balances(None).await.unwrap();
    for (merchant, account, minor) in api_balances {
        let stored = balances
            .iter()
            .find(|b| b.account.merchant_id == *merchant && b.account.account_id == *account)
            .unwrap_or_else(|| panic!("{merchant}/{account} is not in the store"));
        assert_eq!(
            stored.balance_minor, *minor,
            "{merchant}/{account}: the store's balance is not the API's"
        );
    }
}

#[tokio::test]
async fn a_restarted_sandbox_replays_a_retried_payment_instead_of_charging_it_again() {
    let data = tempfile::tempdir().unwrap();
    let gw = Gateway::start(data.path(), None);
    fund(&gw).await; // 1000.00
    let pay = |key: &'static str, body: Value| {
        let gw = &gw;
        async move {
            gw.call("POST", "/v1/payments", ALPHA, Some(key), body)
                .await
                .unwrap()
        }
    };
    let charge = balance_payment("O", "acc", "980.00");
    let first = pay("K", charge.clone()).await;
    assert_eq!(first.0, 201, "{}", first.1);
    let hold = supplier_payment("H", "acc", "5.00");
    let held = pay("KH", hold.clone()).await;
    assert_eq!(held.0, 201, "{}", held.1);
    gw.kill(); // SIGKILL: the in-process balance store is gone

    let gw = Gateway::start(data.path(), None);
    let pay = |key: &'static str, body: Value| {
        let gw = &gw;
        async move {
            gw.call("POST", "/v1/payments", ALPHA, Some(key), body)
                .await
                .unwrap()
        }
    };
    // The identical request replays the first answer, though only 20.00 is left: the key came
    // back with the account.
    let again = pay("K", charge.clone()).await;
    assert_eq!(
        (again.0, &again.1["id"], &again.1["status"]),
        (201, &first.1["id"], &json!("succeeded")),
        "{}",
        again.1
    );
    let held_again = pay("KH", hold.clone()).await;
    assert_eq!(
        (held_again.0, &held_again.1["id"]),
        (201, &held.1["id"]),
        "{}",
        held_again.1
    );
    // A new key for the live order id is a duplicate order; another request under the key a
    // conflict.
    let duplicate = pay("K2", charge.clone()).await;
    assert_eq!(
        (
            duplicate.0,
            &duplicate.1["error"]["code"],
            &duplicate.1["error"]["payment_id"]
        ),
        (409, &json!("duplicate_order"), &first.1["id"]),
        "{}",
        duplicate.1
    );
    let conflict = pay("K", balance_payment("O", "acc", "1.00")).await;
    assert_eq!(
        (conflict.0, &conflict.1["error"]["code"]),
        (409, &json!("idempotency_conflict"))
    );
    // The live order id is found though the balance store had forgotten it.
    let found = gw
        .call(
            "GET",
            "/v1/payments?merchant_order_id=O&account_id=acc",
            ALPHA,
            None,
            Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(
        (found.0, &found.1["id"]),
        (200, &first.1["id"]),
        "{}",
        found.1
    );
    let account = gw
        .call("GET", "/v1/accounts/acc", ALPHA, None, Value::Null)
        .await
        .unwrap()
        .1;
    assert_eq!(
        (account["balance"].as_str(), account["held"].as_str()),
        (Some("20.00"), Some("5.00")),
        "charged once: {account}"
    );
    gw.kill();

    let store =
        gateway::settlement::sqlite::SqliteStore::open(&data.path().join("gateway.sqlite3"))
            .unwrap();
    assert_store_invariants(&store, &[("alpha", "acc", 2_000)]).await;
}

/// Forgets every idempotency and order-id record in Redis, keeping accounts, holds and
/// payments: a Redis that rolled back part of its writes.
async fn forget_keys(app: &TestApp) {
    let mut redis = app.redis.as_ref().unwrap().connection().await;
    for pattern in ["i:*", "o:*"] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut redis)
            .await
            .unwrap();
        if keys.is_empty() {
            continue;
        }
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

async fn refused_count(app: &TestApp, reason: &str) -> u64 {
    // Prometheus text: the helper keeps a body that is not JSON as a string.
    let metrics = app.get("/metrics", ALPHA).await;
    let text = metrics.body.as_str().unwrap_or_default();
    let prefix = format!("gateway_store_refused_payments_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

async fn keys_redis_forgot_are_decided_by_the_store(store: Store) {
    let app = spawn_app_on(Backend::Redis, store, &[]).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let charge = balance_payment("O", "acc", "30.00");
    let first = app.pay(ALPHA, "K", charge.clone()).await;
    assert_eq!(first.status, 201, "{:?}", first.body);
    let hold = supplier_payment("H", "acc", "5.00");
    let held = app.pay(ALPHA, "KH", hold.clone()).await;
    assert_eq!(held.status, 201, "{:?}", held.body);
    app.assert_account(ALPHA, "acc", "70.00", "5.00", "65.00")
        .await;

    // Each time Redis has forgotten the key and the order id, so it captures (or holds)
    // again; the store refuses the new payment in the money's commit and it is unwound.
    forget_keys(&app).await;
    let again = app.pay(ALPHA, "K", charge.clone()).await;
    assert_eq!(
        (again.status, &again.body["id"], &again.body["status"]),
        (201, &first.body["id"], &json!("succeeded")),
        "{:?}",
        again.body
    );
    app.assert_account(ALPHA, "acc", "70.00", "5.00", "65.00")
        .await;
    // The key answers from Redis again now: the same replay.
    let cached = app.pay(ALPHA, "K", charge.clone()).await;
    assert_eq!(
        (cached.status, &cached.body["id"]),
        (201, &first.body["id"])
    );

    forget_keys(&app).await;
    let conflict = app
        .pay(ALPHA, "K", balance_payment("O2", "acc", "31.00"))
        .await;
    assert_eq!(
        (conflict.status, conflict.code()),
        (409, "idempotency_conflict")
    );
    app.assert_account(ALPHA, "acc", "70.00", "5.00", "65.00")
        .await;

    forget_keys(&app).await;
    let duplicate = app.pay(ALPHA, "K2", charge.clone()).await;
    assert_eq!(
        (
            duplicate.status,
            duplicate.code(),
            &duplicate.body["error"]["payment_id"]
        ),
        (409, "duplicate_order", &first.body["id"])
    );
    app.assert_account(ALPHA, "acc", "70.00", "5.00", "65.00")
        .await;

    // A channel payment's intent meets the same checks: no second hold.
    forget_keys(&app).await;
    let held_again = app.pay(ALPHA, "KH", hold.clone()).await;
    assert_eq!(
        (held_again.status, &held_again.body["id"]),
        (201, &held.body["id"]),
        "{:?}",
        held_again.body
    );
    forget_keys(&app).await;
    let held_twice = app.pay(ALPHA, "KH2", hold.clone()).await;
    assert_eq!(
        (held_twice.status, held_twice.code()),
        (409, "duplicate_order")
    );
    app.assert_account(ALPHA, "acc", "70.00", "5.00", "65.00")
        .await;

    for (reason, count) in [
        ("replay", 2),
        ("idempotency_conflict", 1),
        ("duplicate_order", 2),
    ] {
        assert!(
            refused_count(&app, reason).await >= count,
            "gateway_store_refused_payments_total{{reason=\"{reason}\"}}"
        );
    }
    let disk = app.settlement_store().await;
    assert_store_invariants(disk.as_ref(), &[("alpha", "acc", 7_000)]).await;
}

#[tokio::test]
async fn keys_redis_forgot_are_decided_by_the_sqlite_store() {
    keys_redis_forgot_are_decided_by_the_store(Store::Sqlite).await;
}

#[tokio::test]
async fn keys_redis_forgot_are_decided_by_the_postgres_store() {
    keys_redis_forgot_are_decided_by_the_store(Store::Postgres).await;
}

/// Redis lost everything: the account is rebuilt on its next payment, with the keys and order
/// ids of the payments made within the retention, so a retry replays (here: where the balance
/// left would otherwise answer 402) and a new key for a taken order id is refused at once.
#[tokio::test]
async fn a_flushed_redis_comes_back_with_its_idempotency_keys() {
    let app = spawn_app_on(Backend::Redis, Store::Sqlite, &[]).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let charge = balance_payment("O", "acc", "80.00");
    let first = app.pay(ALPHA, "K", charge.clone()).await;
    assert_eq!(first.status, 201, "{:?}", first.body);

    let mut redis = app.redis.as_ref().unwrap().connection().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();

    let again = app.pay(ALPHA, "K", charge.clone()).await;
    assert_eq!(
        (again.status, &again.body["id"]),
        (201, &first.body["id"]),
        "{:?}",
        again.body
    );
    let duplicate = app.pay(ALPHA, "K2", charge.clone()).await;
    assert_eq!(
        (duplicate.status, duplicate.code()),
        (409, "duplicate_order")
    );
    // The rebuild put the order id back: refused up front, nothing to unwind at commit.
    assert_eq!(refused_count(&app, "duplicate_order").await, 0);
    app.assert_account(ALPHA, "acc", "20.00", "0.00", "20.00")
        .await;
    let disk = app.settlement_store().await;
    assert_store_invariants(disk.as_ref(), &[("alpha", "acc", 2_000)]).await;
}

/// A channel payment's intent that commits only after its request stopped waiting (a slow
/// store) is failed in the store and let go in Redis: no ghost keeps its hold or its order id,
/// and until its fate is known its key is in flight.
#[tokio::test]
async fn an_intent_committed_after_its_request_gave_up_leaves_no_ghost() {
    let app = spawn_app_on(
        Backend::Memory,
        Store::Sqlite,
        &[("GATEWAY__STORE__SETTLE_TIMEOUT_MS", "200")],
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    // Another connection holds SQLite's write lock: the intent's commit waits (busy timeout)
    // longer than the request does.
    let lock = rusqlite::Connection::open(app.data.path().join("gateway.sqlite3")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let hold = supplier_payment("H", "acc", "5.00");
    let gave_up = app.pay(ALPHA, "KH", hold.clone()).await;
    assert_eq!(
        (gave_up.status, gave_up.code()),
        (503, "unavailable"),
        "{:?}",
        gave_up.body
    );
    let pid = gave_up.body["error"]["payment_id"]
        .as_str()
        .expect("the 503 names the payment")
        .to_owned();
    let retry = app.pay(ALPHA, "KH", hold.clone()).await;
    assert_eq!((retry.status, retry.code()), (409, "idempotency_in_flight"));
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);

    // The intent commits late: it ends failed in the store, and Redis lets go of its hold and
    // its key.
    let disk = app.settlement_store().await;
    let mut status = String::new();
    for _ in 0..200 {
        status = disk
            .payment(&pid)
            .await
            .unwrap()
            .map(|p| p.status.as_str().to_owned())
            .unwrap_or_default();
        let held = app.account(ALPHA, "acc").await.body["held"].clone();
        if status == "failed" && held == "0.00" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, "failed");
    app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
        .await;
    // The key is free again, and so is the order id: a new payment.
    let again = app.pay(ALPHA, "KH", hold).await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert_ne!(again.body["id"], json!(pid));
    app.assert_account(ALPHA, "acc", "100.00", "5.00", "95.00")
        .await;
    assert_store_invariants(disk.as_ref(), &[("alpha", "acc", 10_000)]).await;
}

/// A Redis that rolled back under a top-up's credit: the store refuses the credit (its account
/// sequence is taken), the movement is voided and the account reloaded — and the top-up is
/// pending again, so the channel's word credits it after all (never lost).
#[tokio::test]
async fn a_voided_topup_credit_is_credited_again() {
    let options = crate::helpers::ChannelOptions {
        auto_pay: true,
        auto_pay_delay_ms: 400,
        ..Default::default()
    };
    let app = crate::helpers::spawn_app_full(
        Backend::Redis,
        Store::Sqlite,
        crate::helpers::FAST_RESOLUTION,
        &options,
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "10.00", "0.00")
        .await;
    let topup = app
        .post(
            "/v1/accounts/acc/topups",
            ALPHA,
            "t1",
            json!({"amount": "50.00", "method": "supplier"}),
        )
        .await;
    assert_eq!(topup.status, 201, "{:?}", topup.body);
    // A failover loses Redis's last sequence number: the credit will reuse the funding's.
    let tag = gateway::ids::ScopeTag::account(
        &gateway::ids::MerchantId::parse("alpha").unwrap(),
        &gateway::ids::AccountId::parse("acc").unwrap(),
    );
    let mut redis = app.redis.as_ref().unwrap().connection().await;
    let _: i64 = redis::cmd("HINCRBY")
        .arg(format!("a:{{{tag}}}"))
        .arg("seq")
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();

    let id = topup.body["id"].as_str().unwrap();
    let disk = app.settlement_store().await;
    let mut credited = false;
    for _ in 0..200 {
        let stored = disk.payment(id).await.unwrap().map(|p| p.status.as_str());
        let balance = app.account(ALPHA, "acc").await.body["balance"].clone();
        if stored == Some("succeeded") && balance == "60.00" {
            credited = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        credited,
        "the voided credit came back: {:?} {:?} {:?}",
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body,
        disk.payment(id).await.unwrap().map(|p| p.status),
        disk.attempts(id).await.unwrap()
    );
    let flagged = app.get("/v1/admin/flagged", crate::helpers::ADMIN).await;
    assert!(
        flagged.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["kind"] == "sequence_conflict"),
        "the rollback was seen: {:?}",
        flagged.body
    );
    app.assert_account(ALPHA, "acc", "60.00", "0.00", "60.00")
        .await;
    assert_store_invariants(disk.as_ref(), &[("alpha", "acc", 6_000)]).await;
}

/// A supplier charge's hold outlives its payment's expiry for as long as the channel cannot
/// confirm the order is dead: the supplier may have executed it. Once the channel answers, the
/// hold is released and the payment expires.
#[tokio::test]
async fn a_supplier_hold_waits_for_the_channels_word() {
    let app = spawn_app_on(
        Backend::Redis,
        Store::Sqlite,
        &[
            crate::helpers::QUICK_EXPIRY,
            crate::helpers::FAST_RESOLUTION,
        ]
        .concat(),
    )
    .await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let mut body = supplier_payment("S", "acc", "30.00");
    body["expires_in_seconds"] = json!(2);
    let held = app.pay(ALPHA, "S", body).await;
    assert_eq!(held.status, 201, "{:?}", held.body);
    let id = held.body["id"].as_str().unwrap().to_owned();
    let channel = held.body["attempts"][0]["channel_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The supplier is unreachable past the payment's expiry.
    app.channels.set_faults(
        &channel,
        channel_sim::Faults {
            outage: true,
            ..Default::default()
        },
    );
    tokio::time::sleep(std::time::Duration::from_millis(3_500)).await;
    // A payment made meanwhile runs the lazy release; the sweeper has run many times.
    let other = app
        .pay(ALPHA, "B", balance_payment("B", "acc", "1.00"))
        .await;
    assert_eq!(other.status, 201);
    app.assert_account(ALPHA, "acc", "99.00", "30.00", "69.00")
        .await;
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "pending"
    );

    // The channel answers again: the order is closed unpaid, the hold released.
    app.channels
        .set_faults(&channel, channel_sim::Faults::default());
    app.wait_status(&id, "expired").await;
    app.assert_account(ALPHA, "acc", "99.00", "0.00", "99.00")
        .await;
    let disk = app.settlement_store().await;
    assert_store_invariants(disk.as_ref(), &[("alpha", "acc", 9_900)]).await;
}

/// Redis lost a payment's refund state (its numbering, then its totals): the store refuses the
/// refund it would have allowed twice over — nothing goes back to the account that was not
/// paid — and Redis is set back to the store's refunds.
#[tokio::test]
async fn refunds_are_capped_by_the_store_when_redis_forgot_them() {
    let app = spawn_app_on(Backend::Redis, Store::Sqlite, &[]).await;
    app.funded_account(ALPHA, "alpha", "acc", "1000.00", "0.00")
        .await;
    let paid = app
        .pay(ALPHA, "P", balance_payment("P", "acc", "100.00"))
        .await;
    assert_eq!(paid.status, 201);
    let id = paid.body["id"].as_str().unwrap().to_owned();
    let refund = |key: &'static str, amount: &'static str| {
        let app = &app;
        let path = format!("/v1/payments/{id}/refunds");
        async move {
            app.post(&path, ALPHA, key, json!({ "amount": amount }))
                .await
        }
    };
    let first = refund("r1", "60.00").await;
    assert_eq!(
        (first.status, &first.body["status"]),
        (201, &json!("succeeded")),
        "{:?}",
        first.body
    );
    app.assert_account(ALPHA, "acc", "960.00", "0.00", "960.00")
        .await;

    let mut redis = app.redis.as_ref().unwrap().connection().await;
    let forget = |pattern: &'static str| {
        let mut redis = redis.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut redis)
                .await
                .unwrap();
            assert!(!keys.is_empty());
            let _: () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
    };
    // Redis forgets every refund and every key: the same request makes the same refund again
    // in Redis; the store has it — replayed as it stands, nothing paid twice.
    forget("rf:*").await;
    forget("i:*").await;
    let replayed = refund("r1", "60.00").await;
    assert_eq!(
        (
            replayed.status,
            &replayed.body["id"],
            &replayed.body["status"]
        ),
        (201, &first.body["id"], &json!("succeeded")),
        "{:?}",
        replayed.body
    );
    app.assert_account(ALPHA, "acc", "960.00", "0.00", "960.00")
        .await;
    // Redis forgets every refund: its numbering starts over, at a number the store has.
    forget("rf:*").await;
    let again = refund("r2", "60.00").await;
    assert_eq!(
        (again.status, again.body["error"]["reason"].as_str()),
        (503, Some("account_rebuild_required")),
        "{:?}",
        again.body
    );
    app.assert_account(ALPHA, "acc", "960.00", "0.00", "960.00")
        .await;
    // Set back to the store's refunds: the retry meets the real cap.
    let retried = refund("r2", "60.00").await;
    assert_eq!(
        (retried.status, retried.code()),
        (422, "invalid_state"),
        "{:?}",
        retried.body
    );

    // Redis forgets only the totals (the numbering survives): the store's cap refuses.
    let tag = gateway::ids::PaymentId::parse(&id).unwrap().tag();
    let _: () = redis::cmd("HSET")
        .arg(format!("rf:{{{tag}}}"))
        .arg(format!("{id}#r"))
        .arg(0)
        .arg(format!("{id}#s"))
        .arg(0)
        .query_async(&mut redis)
        .await
        .unwrap();
    let over = refund("r3", "50.00").await;
    assert_eq!(
        (over.status, over.code()),
        (422, "invalid_state"),
        "{:?}",
        over.body
    );
    app.assert_account(ALPHA, "acc", "960.00", "0.00", "960.00")
        .await;
    // What is left is refundable, once.
    let rest = refund("r4", "40.00").await;
    assert_eq!(
        (rest.status, &rest.body["status"]),
        (201, &json!("succeeded")),
        "{:?}",
        rest.body
    );
    app.assert_account(ALPHA, "acc", "1000.00", "0.00", "1000.00")
        .await;
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "refunded"
    );
    let disk = app.settlement_store().await;
    assert_store_invariants(disk.as_ref(), &[("alpha", "acc", 100_000)]).await;
}

/// A rebuild never interleaves with live traffic: while a supplier hold's intent is on its
/// way to the store (here: the store's write lock held elsewhere), a rebuild of the account
/// loads nothing — before the fence it failed the hold the store did not know yet, after which
/// the intent committed and the supplier was called without a hold. Once the intent is in,
/// the rebuild loads the account with its hold.
#[tokio::test]
async fn a_rebuild_waits_for_movements_on_their_way_to_the_store() {
    let app = std::sync::Arc::new(spawn_app_on(Backend::Redis, Store::Sqlite, &[]).await);
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let lock = rusqlite::Connection::open(app.data.path().join("gateway.sqlite3")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let paying = {
        let app = app.clone();
        tokio::spawn(async move {
            app.pay(ALPHA, "S", supplier_payment("S", "acc", "5.00"))
                .await
        })
    };
    // The hold is placed in Redis; its intent waits for the store.
    for _ in 0..100 {
        if app.account(ALPHA, "acc").await.body["held"] == "5.00" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    app.assert_account(ALPHA, "acc", "100.00", "5.00", "95.00")
        .await;

    // `gateway rebuild-balances --account alpha/acc`, as the library call the command makes.
    let config =
        crate::helpers::test_config(&[("GATEWAY__REDIS__URL", &app.redis.as_ref().unwrap().url())]);
    let redis = gateway::preauth::redis::RedisStore::connect(&config.settings.redis)
        .await
        .unwrap();
    let disk = app.settlement_store().await;
    let busy = gateway::settlement::rebuild::rebuild_balances(
        disk.as_ref(),
        &redis,
        Some(("alpha", "acc")),
        86_400,
    )
    .await;
    assert!(
        matches!(
            busy,
            Err(gateway::settlement::rebuild::RecoveryError::Busy(_))
        ),
        "{busy:?}"
    );
    app.assert_account(ALPHA, "acc", "100.00", "5.00", "95.00")
        .await;

    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    let paid = paying.await.unwrap();
    assert_eq!(
        (paid.status, &paid.body["status"]),
        (201, &json!("pending")),
        "{:?}",
        paid.body
    );
    let loaded = gateway::settlement::rebuild::rebuild_balances(
        disk.as_ref(),
        &redis,
        Some(("alpha", "acc")),
        86_400,
    )
    .await
    .unwrap();
    assert_eq!(loaded, 1);
    app.assert_account(ALPHA, "acc", "100.00", "5.00", "95.00")
        .await;
    let id = paid.body["id"].as_str().unwrap();
    assert_eq!(
        app.get(&format!("/v1/payments/{id}"), ALPHA).await.body["status"],
        "pending"
    );
}

/// A `402` is the key's answer too: kept in the store, it comes back with a rebuilt Redis, so
/// the retry replays the refusal instead of charging an account that can afford it by now.
#[tokio::test]
async fn a_refusal_replays_after_redis_lost_it() {
    let app = spawn_app_on(Backend::Redis, Store::Sqlite, &[]).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let charge = balance_payment("O", "acc", "150.00");
    let refused = app.pay(ALPHA, "K", charge.clone()).await;
    assert_eq!(
        (refused.status, refused.code()),
        (402, "insufficient_funds")
    );
    // Written with the next group commit, not waited for.
    let disk = app.settlement_store().await;
    let mut kept = Vec::new();
    for _ in 0..100 {
        kept = disk.refusals(0, None, None, 10).await.unwrap();
        if !kept.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(kept.len(), 1, "the refusal is in the store");
    assert_eq!(kept[0].idempotency_key, "K");

    let mut redis = app.redis.as_ref().unwrap().connection().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();
    // The account is funded meanwhile (its rebuild brings the keys back).
    let credited = app.credit("alpha", "acc", "100.00").await;
    assert_eq!(credited.status, 201, "{:?}", credited.body);
    app.assert_account(ALPHA, "acc", "200.00", "0.00", "200.00")
        .await;
    let again = app.pay(ALPHA, "K", charge).await;
    assert_eq!(
        (
            again.status,
            again.code(),
            &again.body["error"]["available"]
        ),
        (402, "insufficient_funds", &json!("100.00")),
        "{:?}",
        again.body
    );
    app.assert_account(ALPHA, "acc", "200.00", "0.00", "200.00")
        .await;
}

/// The same for an admin's debit: its `402` is kept in the store under the account's scope and
/// replayed after Redis lost it, even though the account could cover the debit by then.
#[tokio::test]
async fn an_adjustments_refusal_replays_after_redis_lost_it() {
    let app = spawn_app_on(Backend::Redis, Store::Sqlite, &[]).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let debit = json!({
        "merchant_id": "alpha", "direction": "debit", "amount": "150.00", "reason": "chargeback"
    });
    let path = "/v1/accounts/acc/adjustments";
    let refused = app
        .post(path, crate::helpers::ADMIN, "D", debit.clone())
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (402, "insufficient_funds"),
        "{:?}",
        refused.body
    );
    let disk = app.settlement_store().await;
    let mut kept = Vec::new();
    for _ in 0..100 {
        kept = disk.refusals(0, None, None, 10).await.unwrap();
        if !kept.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(kept.len(), 1, "the refusal is in the store");
    assert_eq!(kept[0].idempotency_key, "D");

    let mut redis = app.redis.as_ref().unwrap().connection().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();
    let credited = app.credit("alpha", "acc", "100.00").await;
    assert_eq!(credited.status, 201, "{:?}", credited.body);
    let again = app.post(path, crate::helpers::ADMIN, "D", debit).await;
    assert_eq!(
        (
            again.status,
            again.code(),
            &again.body["error"]["available"]
        ),
        (402, "insufficient_funds", &json!("100.00")),
        "{:?}",
        again.body
    );
    app.assert_account(ALPHA, "acc", "200.00", "0.00", "200.00")
        .await;
    assert_store_invariants(disk.as_ref(), &[("alpha", "acc", 20_000)]).await;
}

/// An admin's adjustment is keyed in the store too: after Redis lost its key, the retried
/// credit and debits replay the first ones (same ids, the money moved once), even a debit the
/// rebuilt balance could not cover (the rebuild put its key back), and another request under
/// a used key is a conflict.
async fn adjustments_redis_forgot_are_replayed_not_applied_twice(store: Store) {
    let app = spawn_app_on(Backend::Redis, store, &[]).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let path = "/v1/accounts/acc/adjustments";
    let admin = crate::helpers::ADMIN;
    let adjustment = |direction: &str, amount: &str| {
        json!({
            "merchant_id": "alpha", "direction": direction, "amount": amount, "reason": "goodwill"
        })
    };
    let mut first = Vec::new();
    // The last, a debit the rebuilt balance could no longer cover: its retry must replay, not
    // answer 402.
    for (key, direction, amount) in [
        ("A", "credit", "25.00"),
        ("B", "debit", "10.00"),
        ("C", "debit", "100.00"),
    ] {
        let made = app
            .post(path, admin, key, adjustment(direction, amount))
            .await;
        assert_eq!(made.status, 201, "{key}: {:?}", made.body);
        first.push((key, direction, amount, made.body["id"].clone()));
    }
    app.assert_account(ALPHA, "acc", "15.00", "0.00", "15.00")
        .await;

    let mut redis = app.redis.as_ref().unwrap().connection().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();
    for (key, direction, amount, id) in &first {
        let again = app
            .post(path, admin, key, adjustment(direction, amount))
            .await;
        assert_eq!(
            (again.status, &again.body["id"]),
            (201, id),
            "{key}: {:?}",
            again.body
        );
        assert_eq!(again.body["account"]["balance"], "15.00", "{key}");
    }
    let other = app
        .post(path, admin, "A", adjustment("credit", "26.00"))
        .await;
    assert_eq!(
        (other.status, other.code()),
        (409, "idempotency_conflict"),
        "{:?}",
        other.body
    );
    app.assert_account(ALPHA, "acc", "15.00", "0.00", "15.00")
        .await;
    let disk = app.settlement_store().await;
    assert_store_invariants(disk.as_ref(), &[("alpha", "acc", 1_500)]).await;
}

#[tokio::test]
async fn adjustments_redis_forgot_are_replayed_by_the_sqlite_store() {
    adjustments_redis_forgot_are_replayed_not_applied_twice(Store::Sqlite).await;
}

#[tokio::test]
async fn adjustments_redis_forgot_are_replayed_by_the_postgres_store() {
    adjustments_redis_forgot_are_replayed_not_applied_twice(Store::Postgres).await;
}

/// A `402` the store keeps is the key's answer at commit too: when Redis forgot the key (and no
/// rebuild put it back), the retry that Redis now lets through is refused by the store in the
/// money's commit, unwound, and answered with the first refusal — for a payment and for an
/// admin's debit, on both stores.
async fn a_kept_refusal_is_the_answer_at_commit(store: Store) {
    let app = spawn_app_on(Backend::Redis, store, &[]).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    let charge = balance_payment("O", "acc", "150.00");
    let path = "/v1/accounts/acc/adjustments";
    let admin = crate::helpers::ADMIN;
    let debit = json!({
        "merchant_id": "alpha", "direction": "debit", "amount": "150.00", "reason": "chargeback"
    });
    let refused = app.pay(ALPHA, "K", charge.clone()).await;
    assert_eq!(refused.status, 402, "{:?}", refused.body);
    let refused = app.post(path, admin, "D", debit.clone()).await;
    assert_eq!(refused.status, 402, "{:?}", refused.body);
    let disk = app.settlement_store().await;
    for _ in 0..100 {
        if disk.refusals(0, None, None, 10).await.unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(disk.refusals(0, None, None, 10).await.unwrap().len(), 2);

    // Redis forgets the keys, and the account can afford both by now.
    forget_keys(&app).await;
    let credited = app.credit("alpha", "acc", "200.00").await;
    assert_eq!(credited.status, 201, "{:?}", credited.body);
    let again = app.pay(ALPHA, "K", charge).await;
    assert_eq!(
        (again.status, &again.body["error"]["available"]),
        (402, &json!("100.00")),
        "{:?}",
        again.body
    );
    let again = app.post(path, admin, "D", debit).await;
    assert_eq!(
        (again.status, &again.body["error"]["available"]),
        (402, &json!("100.00")),
        "{:?}",
        again.body
    );
    app.assert_account(ALPHA, "acc", "300.00", "0.00", "300.00")
        .await;
    assert_store_invariants(disk.as_ref(), &[("alpha", "acc", 30_000)]).await;
}

#[tokio::test]
async fn a_kept_refusal_is_the_answer_at_commit_on_sqlite() {
    a_kept_refusal_is_the_answer_at_commit(Store::Sqlite).await;
}

#[tokio::test]
async fn a_kept_refusal_is_the_answer_at_commit_on_postgres() {
    a_kept_refusal_is_the_answer_at_commit(Store::Postgres).await;
}
