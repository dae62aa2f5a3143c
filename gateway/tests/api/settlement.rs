//! The system of record end to end: every balance payment and adjustment is on disk before it
//! is answered, the store going down refuses new money and loses nothing, and Redis can be
//! rebuilt from the store at any time.

use std::collections::HashMap;
use std::time::Duration;

use gateway::settlement::SettlementStore;
use serde_json::json;

use crate::helpers::*;

/// Fast recovery for tests: records older than 100 ms are re-driven every 100 ms.
const FAST_RECOVERY: &[(&str, &str)] = &[
    ("GATEWAY__STORE__RECOVERY_INTERVAL_MS", "100"),
    ("GATEWAY__STORE__RECOVERY_MIN_AGE_MS", "100"),
    ("GATEWAY__STORE__HEALTH_CHECK_INTERVAL_MS", "100"),
    ("GATEWAY__STORE__SETTLE_TIMEOUT_MS", "2000"),
    ("GATEWAY__STORE__CONNECT_TIMEOUT_MS", "500"),
];

/// Balances by account as the store recomputes them from postings, in minor units.
async fn stored_balances(store: &dyn SettlementStore) -> HashMap<String, i64> {
    store
        .balances(None)
        .await
        .unwrap()
        .into_iter()
        .map(|b| (b.account.account_id, b.balance_minor))
        .collect()
}

async fn assert_postings_balance(store: &dyn SettlementStore) {
    let sums = store.postings_sum_by_movement().await.unwrap();
    assert!(!sums.is_empty());
    for (payment, kind, sequence, sum) in sums {
        assert_eq!(
            sum, 0,
            "postings of {payment}/{kind}/{sequence} sum to {sum}"
        );
    }
}

async fn committed_before_answered(store: Store) {
    let app = spawn_app_on(Backend::Redis, store, &[]).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "5.00")
        .await;
    let paid = app
        .pay(ALPHA, "k1", balance_payment("o1", "acc", "30.00"))
        .await;
    assert_eq!(paid.status, 201, "{:?}", paid.body);
    let id = paid.body["id"].as_str().unwrap();
    let pending = app
        .pay(ALPHA, "k2", supplier_payment("o2", "acc", "20.00"))
        .await;
    assert_eq!(pending.status, 201, "{:?}", pending.body);

    let disk = app.settlement_store().await;
    // The answered payment is on disk, finalized, with its capture.
    let row = disk
        .payment(id)
        .await
        .unwrap()
        .expect("committed before the 201");
    assert_eq!(
        (row.status.as_str(), row.amount_minor),
        ("succeeded", 3_000)
    );
    assert_eq!(stored_balances(disk.as_ref()).await["acc"], 7_000);
    let accounts = disk.balances(None).await.unwrap();
    assert_eq!(accounts[0].account.credit_limit_minor, 500);
    assert_eq!(accounts[0].seq, 2, "one credit, one capture");
    // The supplier payment's intent is on disk with its hold.
    let intent = disk
        .payment(pending.body["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (intent.status.as_str(), intent.held_minor),
        ("pending", 2_000)
    );
    assert_postings_balance(disk.as_ref()).await;
    // Cancel reaches the store too.
    let cancel_path = format!(
        "/v1/payments/{}/cancel",
        pending.body["id"].as_str().unwrap()
    );
    assert_eq!(
        app.post(&cancel_path, ALPHA, "c1", json!({})).await.status,
        200
    );
    let canceled = disk
        .payment(pending.body["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (canceled.status.as_str(), canceled.held_minor),
        ("canceled", 0)
    );
    assert!(disk.live_holds(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn payments_are_committed_before_they_are_answered_on_sqlite() {
    committed_before_answered(Store::Sqlite).await;
}

#[tokio::test]
async fn payments_are_committed_before_they_are_answered_on_postgres() {
    committed_before_answered(Store::Postgres).await;
}

#[tokio::test]
async fn the_store_down_refuses_new_money_and_loses_nothing() {
    let mut app = spawn_app_on(Backend::Redis, Store::Postgres, FAST_RECOVERY).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    assert_eq!(
        app.pay(ALPHA, "k1", balance_payment("o1", "acc", "10.00"))
            .await
            .status,
        201
    );

    app.postgres.as_mut().unwrap().stop();
    // The first payment after the outage moved money in Redis but cannot commit: 503 naming
    // the payment, its key in flight.
    let cut = app
        .pay(ALPHA, "k2", balance_payment("o2", "acc", "10.00"))
        .await;
    assert_eq!(
        (cut.status, cut.code()),
        (503, "unavailable"),
        "{:?}",
        cut.body
    );
    let cut_id = cut.body["error"]["payment_id"]
        .as_str()
        .expect("names the payment")
        .to_owned();
    // From then on nothing starts, not even a retry: refused before Redis, nothing changed.
    let retry = app
        .pay(ALPHA, "k2", balance_payment("o2", "acc", "10.00"))
        .await;
    assert_eq!(
        (retry.status, retry.body["error"]["reason"].as_str()),
        (503, Some("settlement_store_unavailable"))
    );
    let refused = app
        .pay(ALPHA, "k3", balance_payment("o3", "acc", "10.00"))
        .await;
    assert_eq!(
        (refused.status, refused.body["error"]["reason"].as_str()),
        (503, Some("settlement_store_unavailable"))
    );
    assert!(refused.body["error"]["payment_id"].is_null());
    let adj = app.credit("alpha", "acc", "1.00").await;
    assert_eq!(adj.status, 503);
    app.wait_ready(503).await;
    app.assert_account(ALPHA, "acc", "80.00", "0.00", "80.00")
        .await;

    app.postgres.as_mut().unwrap().restart().await;
    app.wait_ready(200).await;
    // Recovery commits the cut payment; its key then replays 201.
    let mut replay = None;
    for _ in 0..100 {
        let reply = app
            .pay(ALPHA, "k2", balance_payment("o2", "acc", "10.00"))
            .await;
        if reply.status == 201 {
            replay = Some(reply);
            break;
        }
        assert_eq!(reply.code(), "idempotency_in_flight");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replay = replay.expect("recovery settles the cut payment");
    assert_eq!(replay.body["id"], cut_id.as_str());
    // k3 was never stored: it works now.
    assert_eq!(
        app.pay(ALPHA, "k3", balance_payment("o3", "acc", "10.00"))
            .await
            .status,
        201
    );
    app.assert_account(ALPHA, "acc", "70.00", "0.00", "70.00")
        .await;
    let disk = app.settlement_store().await;
    assert_eq!(stored_balances(disk.as_ref()).await["acc"], 7_000);
    assert_postings_balance(disk.as_ref()).await;
}

#[tokio::test]
async fn a_flushed_redis_is_rebuilt_exactly_from_the_store() {
    let app = spawn_app_on(Backend::Redis, Store::Sqlite, &[]).await;
    app.funded_account(ALPHA, "alpha", "a1", "100.00", "20.00")
        .await;
    app.funded_account(ALPHA, "alpha", "a2", "50.00", "0.00")
        .await;
    app.funded_account(BETA, "beta", "a1", "10.00", "0.00")
        .await;
    assert_eq!(
        app.pay(ALPHA, "k1", balance_payment("o1", "a1", "110.00"))
            .await
            .status,
        201
    );
    assert_eq!(
        app.pay(ALPHA, "k2", supplier_payment("o2", "a1", "7.50"))
            .await
            .status,
        201
    );
    let held = app
        .pay(ALPHA, "k3", supplier_payment("o3", "a2", "12.25"))
        .await;
    assert_eq!(held.status, 201);
    let snapshot = |reply: Reply| reply.body;
    let a1 = snapshot(app.account(ALPHA, "a1").await);
    let a2 = snapshot(app.account(ALPHA, "a2").await);
    let b1 = snapshot(app.account(BETA, "a1").await);
    assert_eq!(
        (a1["balance"].as_str(), a1["held"].as_str()),
        (Some("-10.00"), Some("7.50"))
    );

    let mut redis = app.redis.as_ref().unwrap().connection().await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();
    let keys: i64 = redis::cmd("DBSIZE").query_async(&mut redis).await.unwrap();
    assert_eq!(keys, 0, "Redis really lost everything");

    // `gateway rebuild-balances`, as the library call the command makes.
    let config = test_config(&[("GATEWAY__REDIS__URL", &app.redis.as_ref().unwrap().url())]);
    let balances = gateway::preauth::redis::RedisStore::connect(&config.settings.redis)
        .await
        .unwrap();
    let disk = app.settlement_store().await;
    let loaded =
        gateway::settlement::rebuild::rebuild_balances(disk.as_ref(), &balances, None, 86_400)
            .await
            .unwrap();
    assert_eq!(loaded, 3);
    assert_eq!(snapshot(app.account(ALPHA, "a1").await), a1);
    assert_eq!(snapshot(app.account(ALPHA, "a2").await), a2);
    assert_eq!(snapshot(app.account(BETA, "a1").await), b1);
    // The rebuilt hold is a real one: cancel releases it exactly once.
    let id = held.body["id"].as_str().unwrap();
    let cancel = app
        .post(&format!("/v1/payments/{id}/cancel"), ALPHA, "c1", json!({}))
        .await;
    assert_eq!(
        (cancel.status, cancel.body["status"].as_str()),
        (200, Some("canceled"))
    );
    app.assert_account(ALPHA, "a2", "50.00", "0.00", "50.00")
        .await;
    // And the sequence continues where the store left it: a new payment commits.
    assert_eq!(
        app.pay(ALPHA, "k4", balance_payment("o4", "a2", "1.00"))
            .await
            .status,
        201
    );
    assert_postings_balance(disk.as_ref()).await;
}

#[derive(Debug, Clone)]
enum Op {
    Pay {
        account: usize,
        cents: i64,
        hold: bool,
    },
    Adjust {
        account: usize,
        cents: i64,
        credit: bool,
    },
    Cancel {
        payment: usize,
    },
    Replay {
        payment: usize,
    },
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..2usize, 1..5_000i64, any::<bool>()).prop_map(|(account, cents, hold)| Op::Pay { account, cents, hold }),
        2 => (0..2usize, 1..5_000i64, any::<bool>()).prop_map(|(account, cents, credit)| Op::Adjust { account, cents, credit }),
        1 => (0..20usize).prop_map(|payment| Op::Cancel { payment }),
        1 => (0..20usize).prop_map(|payment| Op::Replay { payment }),
    ]
}

fn decimal(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

fn cents(text: &str) -> i64 {
    let negative = text.starts_with('-');
    let digits: i64 = text
        .trim_start_matches('-')
        .replace('.', "")
        .parse()
        .unwrap();
    if negative {
        -digits
    } else {
        digits
    }
}

/// Random sequences of payments, holds, adjustments, refusals, cancels and replays: money is
/// conserved (every movement's postings sum to zero), and the balance store agrees with the
/// rebuild from the settlement store, to the fen.
async fn conserve(ops: Vec<Op>) {
    let app = spawn_app(Backend::Memory).await;
    let accounts = ["a0", "a1"];
    for account in accounts {
        app.funded_account(ALPHA, "alpha", account, "30.00", "10.00")
            .await;
    }
    let mut paid: Vec<(String, Value)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Pay {
                account,
                cents,
                hold,
            } => {
                let order = format!("o{i}");
                let body = if *hold {
                    supplier_payment(&order, accounts[*account], &decimal(*cents))
                } else {
                    balance_payment(&order, accounts[*account], &decimal(*cents))
                };
                let reply = app.pay(ALPHA, &format!("k{i}"), body.clone()).await;
                assert!(matches!(reply.status, 201 | 402), "{:?}", reply.body);
                if reply.status == 201 {
                    paid.push((format!("k{i}"), body));
                }
            }
            Op::Adjust {
                account,
                cents,
                credit,
            } => {
                let body = json!({"merchant_id": "alpha", "direction": if *credit { "credit" } else { "debit" },
                    "amount": decimal(*cents), "reason": "property"});
                let reply = app
                    .post(
                        &format!("/v1/accounts/{}/adjustments", accounts[*account]),
                        ADMIN,
                        &format!("a{i}"),
                        body,
                    )
                    .await;
                assert!(matches!(reply.status, 201 | 402), "{:?}", reply.body);
            }
            Op::Cancel { payment } => {
                if let Some((key, body)) = paid.get(*payment) {
                    let found = app.pay(ALPHA, key, body.clone()).await;
                    let id = found.body["id"].as_str().unwrap();
                    let reply = app
                        .post(
                            &format!("/v1/payments/{id}/cancel"),
                            ALPHA,
                            &format!("c{i}"),
                            json!({}),
                        )
                        .await;
                    assert!(matches!(reply.status, 200 | 422), "{:?}", reply.body);
                }
            }
            Op::Replay { payment } => {
                if let Some((key, body)) = paid.get(*payment) {
                    assert_eq!(app.pay(ALPHA, key, body.clone()).await.status, 201);
                }
            }
        }
    }
    let disk = app.settlement_store().await;
    let sums = disk.postings_sum_by_movement().await.unwrap();
    assert!(sums.iter().all(|(_, _, _, sum)| *sum == 0), "{sums:?}");
    let stored = stored_balances(disk.as_ref()).await;
    let holds = disk.live_holds(None).await.unwrap();
    for account in accounts {
        let live = app.account(ALPHA, account).await.body;
        assert_eq!(
            cents(live["balance"].as_str().unwrap()),
            stored[account],
            "{account}: {live}"
        );
        let held: i64 = holds
            .iter()
            .filter(|h| h.account_id.as_deref() == Some(account))
            .map(|h| h.held_minor)
            .sum();
        assert_eq!(
            cents(live["held"].as_str().unwrap()),
            held,
            "{account}: {live}"
        );
        assert!(
            cents(live["available"].as_str().unwrap()) >= 0,
            "never overdrawn: {live}"
        );
    }
}

use serde_json::Value;

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 12, ..Default::default() })]
    #[test]
    fn money_is_conserved_over_random_sequences(ops in proptest::collection::vec(op(), 1..30)) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(conserve(ops));
    }
}

#[tokio::test]
async fn a_redis_that_rolled_back_is_detected_and_the_account_rebuilt() {
    let app = spawn_app_on(Backend::Redis, Store::Sqlite, &[]).await;
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    assert_eq!(
        app.pay(ALPHA, "k1", balance_payment("o1", "acc", "10.00"))
            .await
            .status,
        201
    );
    // A failover loses Redis's last write: the capture is gone from Redis (not from the store).
    let tag = gateway::ids::ScopeTag::account(
        &gateway::ids::MerchantId::parse("alpha").unwrap(),
        &gateway::ids::AccountId::parse("acc").unwrap(),
    );
    let mut redis = app.redis.as_ref().unwrap().connection().await;
    let key = format!("a:{{{tag}}}");
    let _: i64 = redis::cmd("HINCRBY")
        .arg(&key)
        .arg("bal")
        .arg(1_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: i64 = redis::cmd("HINCRBY")
        .arg(&key)
        .arg("seq")
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    app.assert_account(ALPHA, "acc", "100.00", "0.00", "100.00")
        .await;

    // The next movement reuses a sequence number the store has: refused, nothing committed,
    // the account reloaded from the store.
    let refused = app
        .pay(ALPHA, "k2", balance_payment("o2", "acc", "20.00"))
        .await;
    assert_eq!(
        (refused.status, refused.body["error"]["reason"].as_str()),
        (503, Some("account_rebuild_required")),
        "{:?}",
        refused.body
    );
    let voided = refused.body["error"]["payment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    app.assert_account(ALPHA, "acc", "90.00", "0.00", "90.00")
        .await;
    let disk = app.settlement_store().await;
    assert!(
        disk.payment(&voided).await.unwrap().is_none(),
        "the refused capture never reached the record"
    );
    assert_eq!(
        app.get(&format!("/v1/payments/{voided}"), ALPHA).await.body["status"],
        "failed"
    );
    // The client retries with the same key: a new payment, committed.
    let retried = app
        .pay(ALPHA, "k2", balance_payment("o2", "acc", "20.00"))
        .await;
    assert_eq!(retried.status, 201, "{:?}", retried.body);
    assert_ne!(retried.body["id"], voided.as_str());
    app.assert_account(ALPHA, "acc", "70.00", "0.00", "70.00")
        .await;
    assert_eq!(stored_balances(disk.as_ref()).await["acc"], 7_000);

    // A human sees it.
    let flagged = app.get("/v1/admin/flagged", ADMIN).await;
    assert_eq!(flagged.status, 200);
    let items = flagged.body["items"].as_array().unwrap();
    assert!(
        items
            .iter()
            .any(|i| i["kind"] == "sequence_conflict" && i["payment_id"] == voided.as_str()),
        "{items:?}"
    );
    assert_eq!(app.get("/v1/admin/flagged", ALPHA).await.status, 403);
    assert_eq!(
        app.get("/v1/admin/flagged?limit=0", ADMIN).await.body["error"]["field"],
        "limit"
    );
}

#[tokio::test]
async fn an_account_redis_lost_is_reloaded_on_first_use() {
    let app = spawn_app_on(Backend::Redis, Store::Sqlite, &[]).await;
    app.funded_account(ALPHA, "alpha", "a1", "100.00", "0.00")
        .await;
    app.funded_account(ALPHA, "alpha", "a2", "50.00", "0.00")
        .await;
    assert_eq!(
        app.pay(ALPHA, "k1", balance_payment("o1", "a1", "10.00"))
            .await
            .status,
        201
    );
    assert_eq!(
        app.pay(ALPHA, "k2", supplier_payment("o2", "a2", "5.00"))
            .await
            .status,
        201
    );
    let tag = |account: &str| {
        gateway::ids::ScopeTag::account(
            &gateway::ids::MerchantId::parse("alpha").unwrap(),
            &gateway::ids::AccountId::parse(account).unwrap(),
        )
    };
    let mut redis = app.redis.as_ref().unwrap().connection().await;
    let mut del = redis::cmd("DEL");
    del.arg(format!("a:{{{}}}", tag("a1")));
    for prefix in ["a", "h", "ph", "ps", "pd", "o", "u"] {
        del.arg(format!("{prefix}:{{{}}}", tag("a2")));
    }
    let _: i64 = del.query_async(&mut redis).await.unwrap();

    // A read reloads a1; a payment reloads a2 (with its live hold) and goes through.
    app.assert_account(ALPHA, "a1", "90.00", "0.00", "90.00")
        .await;
    let paid = app
        .pay(ALPHA, "k3", balance_payment("o3", "a2", "1.00"))
        .await;
    assert_eq!(paid.status, 201, "{:?}", paid.body);
    app.assert_account(ALPHA, "a2", "49.00", "5.00", "44.00")
        .await;
    // An account neither store knows is still 404, and nothing is created.
    assert_eq!(app.account(ALPHA, "ghost").await.status, 404);
    assert_eq!(
        app.pay(ALPHA, "k4", balance_payment("o4", "ghost", "1.00"))
            .await
            .status,
        404
    );
    let disk = app.settlement_store().await;
    assert_eq!(disk.balances(None).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_full_settlement_queue_refuses_new_money_before_it_moves() {
    let app = std::sync::Arc::new(
        spawn_app_on(
            Backend::Memory,
            Store::Sqlite,
            &[
                ("GATEWAY__STORE__QUEUE_CAPACITY", "2"),
                ("GATEWAY__STORE__SETTLE_TIMEOUT_MS", "20000"),
            ],
        )
        .await,
    );
    app.funded_account(ALPHA, "alpha", "acc", "100.00", "0.00")
        .await;
    // Another connection holds the database's write lock: the writer's next commit waits.
    let lock = rusqlite::Connection::open(app.data.path().join("gateway.sqlite3")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut waiting = Vec::new();
    for i in 0..2 {
        let app = app.clone();
        waiting.push(tokio::spawn(async move {
            app.pay(
                ALPHA,
                &format!("k{i}"),
                balance_payment(&format!("o{i}"), "acc", "10.00"),
            )
            .await
        }));
    }
    let mut depth = String::new();
    for _ in 0..200 {
        let metrics = app
            .request(hyper::Method::GET, "/metrics", None, None, None)
            .await;
        depth = metrics
            .body
            .as_str()
            .unwrap()
            .lines()
            .find(|l| l.starts_with("gateway_settlement_queue_depth "))
            .unwrap_or("")
            .to_owned();
        if depth.ends_with(" 2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(depth, "gateway_settlement_queue_depth 2");

    // The queue is full: refused before any money moves.
    let refused = app
        .pay(ALPHA, "k9", balance_payment("o9", "acc", "10.00"))
        .await;
    assert_eq!(
        (refused.status, refused.body["error"]["reason"].as_str()),
        (503, Some("settlement_queue_full"))
    );
    assert!(refused.body["error"]["payment_id"].is_null());
    app.assert_account(ALPHA, "acc", "80.00", "0.00", "80.00")
        .await;

    // The lock goes away: the two waiting payments commit and are answered.
    lock.execute_batch("ROLLBACK").unwrap();
    for task in waiting {
        assert_eq!(task.await.unwrap().status, 201);
    }
    assert_eq!(
        app.pay(ALPHA, "k9", balance_payment("o9", "acc", "10.00"))
            .await
            .status,
        201
    );
    let disk = app.settlement_store().await;
    assert_eq!(stored_balances(disk.as_ref()).await["acc"], 7_000);
}
