//! What is specific to the PostgreSQL settlement store: server settings, concurrent
//! migrators and writers, restart with crash recovery. The shared scenarios live in the
//! settlement conformance suite.

use gateway::money::Currency;
use gateway::settlement::postgres::PostgresStore;
use gateway::settlement::{
    check_schema, ledger, AccountRow, AttemptOutcome, AttemptUpdate, CommitOutcome, FlagStore,
    IntentOutcome, MoneyStore, PaymentRow, PaymentStore, Posting, SchemaStore, SettleError,
    Settlement, SettlementKind, Write, WriteStore, Written, SCHEMA_VERSION,
};

use crate::postgres_server::PostgresServer;
use crate::settlement_conformance::attempt_row;

async fn store(server: &PostgresServer) -> PostgresStore {
    PostgresStore::connect(&server.url(), 4, 2_000)
        .await
        .expect("connect to the test PostgreSQL")
}

fn capture(payment: &str, amount: i64) -> Settlement {
    Settlement {
        payment_id: payment.into(),
        kind: SettlementKind::Capture,
        sequence: 0,
        merchant_id: "alpha".into(),
        account_id: Some("acc".into()),
        channel_id: None,
        channel_txn_id: None,
        amount_minor: amount,
        currency: Currency::Cny,
        channel_fee_minor: 0,
        commission_minor: 0,
        merchant_net_minor: amount,
        account_seq: None,
        settled_at_ms: 10,
        postings: vec![
            Posting {
                ledger: ledger::account("alpha", "acc"),
                amount_minor: -amount,
            },
            Posting {
                ledger: ledger::merchant_sales("alpha"),
                amount_minor: amount,
            },
        ],
        payment: None,
        adjustment: None,
    }
}

fn payment_row(id: &str, order: &str) -> PaymentRow {
    PaymentRow {
        id: id.into(),
        merchant_id: "alpha".into(),
        account_id: Some("acc".into()),
        scope_tag: "TAG0000000".into(),
        merchant_order_id: order.into(),
        amount_minor: 100,
        currency: Currency::Cny,
        method: "balance".parse().unwrap(),
        purpose: "charge".parse().unwrap(),
        status: "succeeded".parse().unwrap(),
        held_minor: 0,
        hold_expires_at_ms: None,
        created_at_ms: 1,
        expires_at_ms: 5_000,
        updated_at_ms: 2,
        doc: format!("{{\"id\":\"{id}\"}}"),
        next_check_at_ms: None,
        checks: 0,
        idempotency_key: None,
        request_hash: None,
    }
}

fn account() -> AccountRow {
    AccountRow {
        merchant_id: "alpha".into(),
        account_id: "acc".into(),
        currency: Currency::Cny,
        credit_limit_minor: 0,
        created_at_ms: 1,
        updated_at_ms: 1,
    }
}

#[tokio::test]
async fn postgres_runs_with_fsync_on_commit() {
    let server = PostgresServer::start().await;
    let client = server.client().await;
    for (setting, expected) in [("fsync", "on"), ("synchronous_commit", "on")] {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), expected, "{setting}");
    }
}

/// What the restart test committed, read back through the store.
async fn check_data(store: &PostgresStore) {
    assert_eq!(store.schema_version().await.unwrap(), Some(SCHEMA_VERSION));
    assert_eq!(
        store.postings_sum_by_movement().await.unwrap(),
        vec![("pay_x".to_owned(), "capture".to_owned(), 0, 0)]
    );
    let balances = store.balances(None).await.unwrap();
    assert_eq!(balances.len(), 1);
    assert_eq!(balances[0].balance_minor, -100);
    assert_eq!(
        store.payment("pay_x").await.unwrap(),
        Some(payment_row("pay_x", "order-1"))
    );
    assert_eq!(store.payment("pay_z").await.unwrap(), None);
    assert_eq!(store.flagged(10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn postgres_store_migrates_commits_and_survives_a_restart() {
    let mut server = PostgresServer::start().await;
    let store = store(&server).await;

    assert_eq!(store.schema_version().await.unwrap(), None);
    assert!(matches!(
        check_schema(&store).await,
        Err(SettleError::Unmigrated)
    ));
    assert_eq!(store.migrate().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(store.schema_version().await.unwrap(), Some(SCHEMA_VERSION));
    assert_eq!(store.migrate().await.unwrap(), SCHEMA_VERSION, "a no-op");
    check_schema(&store).await.unwrap();
    store.upsert_account(&account()).await.unwrap();

    // A balanced capture that finalizes its payment.
    let mut first = capture("pay_x", 100);
    first.payment = Some(payment_row("pay_x", "order-1"));
    assert_eq!(
        store.commit(std::slice::from_ref(&first)).await.unwrap(),
        vec![CommitOutcome::Inserted]
    );
    assert_eq!(
        store.commit(std::slice::from_ref(&first)).await.unwrap(),
        vec![CommitOutcome::AlreadyCommitted]
    );
    // Same key, other amount and postings: refused and flagged.
    let mut other = capture("pay_x", 150);
    other.payment = first.payment.clone();
    assert_eq!(
        store.commit(&[other]).await.unwrap(),
        vec![CommitOutcome::Conflict {
            stored_hash: first.content_hash()
        }]
    );
    let flagged = store.flagged(10).await.unwrap();
    assert_eq!(flagged.len(), 1, "{flagged:?}");
    assert_eq!(flagged[0].kind.as_str(), "settlement_conflict");
    assert_eq!(flagged[0].payment_id, "pay_x");

    // Unbalanced: refused before anything is written.
    let mut unbalanced = capture("pay_y", 100);
    unbalanced.postings[1].amount_minor = 99;
    assert!(matches!(
        store.commit(&[capture("pay_z", 5), unbalanced]).await,
        Err(SettleError::Invalid(_))
    ));

    // What PostgreSQL holds: one transfer for the movement (debit, credit, amount).
    let client = server.client().await;
    let transfers: Vec<(String, String, String, i64)> = client
        .query(
            "SELECT payment_id, debit_ledger, credit_ledger, amount_minor FROM transfers \
             ORDER BY payment_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        transfers,
        vec![(
            "pay_x".to_owned(),
            ledger::account("alpha", "acc"),
            ledger::merchant_sales("alpha"),
            100
        )]
    );
    drop(client);

    check_data(&store).await;

    // Down: calls fail (fast, bounded by the timeouts), and come back with the server.
    server.stop();
    assert!(matches!(
        store.ping().await,
        Err(SettleError::Unavailable(_))
    ));
    assert!(store.commit(&[capture("pay_w", 7)]).await.is_err());
    server.restart().await;
    store.ping().await.unwrap();
    check_data(&store).await;
    // The pool's connections were replaced: writes work again.
    assert_eq!(
        store.commit(&[capture("pay_w", 7)]).await.unwrap(),
        vec![CommitOutcome::Inserted]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrators_serialize_and_a_newer_schema_is_refused() {
    let server = PostgresServer::start().await;
    let stores = [
        store(&server).await,
        store(&server).await,
        store(&server).await,
    ];
    let (a, b, c) = tokio::join!(
        stores[0].migrate(),
        stores[1].migrate(),
        stores[2].migrate()
    );
    for result in [a, b, c] {
        assert_eq!(result.unwrap(), SCHEMA_VERSION);
    }
    let client = server.client().await;
    let applied: i64 = client
        .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        applied,
        i64::from(SCHEMA_VERSION),
        "each migration applied once"
    );

    // A newer binary migrated this database: this one refuses it.
    let newer = i32::try_from(SCHEMA_VERSION + 1).unwrap();
    client
        .execute(
            "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, 0)",
            &[&newer],
        )
        .await
        .unwrap();
    assert!(matches!(
        stores[0].migrate().await,
        Err(SettleError::WrongSchema { found, expected }) if found == SCHEMA_VERSION + 1 && expected == SCHEMA_VERSION
    ));
    assert!(matches!(
        check_schema(&stores[1]).await,
        Err(SettleError::WrongSchema { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_from_several_instances_agree() {
    let server = PostgresServer::start().await;
    let one = store(&server).await;
    let two = store(&server).await;
    one.migrate().await.unwrap();

    // Two instances record intents for different payments with the same order id at once:
    // exactly one holds the order id.
    for round in 0..10 {
        let order = format!("order-{round}");
        let mut left = payment_row(&format!("pay_l{round}"), &order);
        let mut right = payment_row(&format!("pay_r{round}"), &order);
        left.status = "pending".parse().unwrap();
        right.status = "pending".parse().unwrap();
        let (l, r) = tokio::join!(
            one.record_intent(&left, None),
            two.record_intent(&right, None)
        );
        let outcomes = [l.unwrap(), r.unwrap()];
        let inserted = outcomes
            .iter()
            .filter(|o| **o == IntentOutcome::Inserted)
            .count();
        assert_eq!(inserted, 1, "{outcomes:?}");
        assert!(
            outcomes
                .iter()
                .any(|o| matches!(o, IntentOutcome::DuplicateOrder(_))),
            "{outcomes:?}"
        );
        // The same intent again: a retry for the winner, a duplicate order for the loser.
        let (winner, loser) = if outcomes[0] == IntentOutcome::Inserted {
            (&left, &right)
        } else {
            (&right, &left)
        };
        assert_eq!(
            two.record_intent(winner, None).await.unwrap(),
            IntentOutcome::AlreadyRecorded
        );
        assert_eq!(
            one.record_intent(loser, None).await.unwrap(),
            IntentOutcome::DuplicateOrder(winner.id.clone())
        );
    }

    // Two instances re-drive the same settlements at once: each is inserted exactly once.
    for round in 0..10 {
        let batch: Vec<Settlement> = (0..5)
            .map(|i| capture(&format!("pay_{round}_{i}"), 10 + i))
            .collect();
        let (l, r) = tokio::join!(one.commit(&batch), two.commit(&batch));
        let (l, r) = (l.unwrap(), r.unwrap());
        for (x, y) in l.iter().zip(&r) {
            let mut pair = [x.clone(), y.clone()];
            pair.sort_by_key(|o| matches!(o, CommitOutcome::AlreadyCommitted));
            assert_eq!(
                pair,
                [CommitOutcome::Inserted, CommitOutcome::AlreadyCommitted],
                "{l:?} {r:?}"
            );
        }
    }
    let sums = one.postings_sum_by_movement().await.unwrap();
    assert_eq!(sums.len(), 50);
    assert!(sums.iter().all(|(_, _, _, sum)| *sum == 0));
    assert!(one.flagged(10).await.unwrap().is_empty());
}

/// Two group commits at once (`store.commits_in_flight = 2`) whose batches update the same
/// attempts listed in opposite orders: each transaction locks its rows in key order, so one
/// waits for the other (no deadlock, no batch lost), and a success is never moved back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commits_in_flight_over_the_same_rows_wait_instead_of_deadlocking() {
    let server = PostgresServer::start().await;
    let store = store(&server).await;
    store.migrate().await.unwrap();
    let update = |payment: &str, outcome: &str| {
        Write::Attempt(AttemptUpdate {
            payment_id: payment.into(),
            attempt: 1,
            outcome: AttemptOutcome::parse(outcome).unwrap(),
            latency_ms: None,
            action: None,
            channel_txn_id: None,
            now_ms: 50,
        })
    };
    for round in 0..20 {
        let (a, b) = (format!("pay_a{round}"), format!("pay_b{round}"));
        let mut intents = Vec::new();
        for id in [&a, &b] {
            let mut row = payment_row(id, &format!("order-{id}"));
            row.status = "pending".parse().unwrap();
            row.method = "supplier".parse().unwrap();
            intents.push(Write::Intent {
                payment: row,
                first_attempt: Some(attempt_row(id, 1)),
            });
        }
        store.commit_writes(&intents).await.unwrap();
        let forward = [update(&a, "accepted"), update(&b, "accepted")];
        let backward = [update(&b, "succeeded"), update(&a, "succeeded")];
        let (one, two) = tokio::join!(
            store.commit_writes(&forward),
            store.commit_writes(&backward)
        );
        for results in [one.unwrap(), two.unwrap()] {
            assert!(
                results.iter().all(|r| matches!(r, Ok(Written::Attempt(_)))),
                "{results:?}"
            );
        }
        for id in [&a, &b] {
            let attempts = store.attempts(id).await.unwrap();
            assert_eq!(attempts.len(), 1);
            assert_eq!(
                attempts[0].outcome,
                AttemptOutcome::Succeeded,
                "round {round}"
            );
        }
    }
}

/// Two instances run the resolution loop on one database: `FOR UPDATE SKIP LOCKED` and the
/// lease keep them from ever looking at the same payment at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_from_several_instances_never_share_a_payment() {
    let server = PostgresServer::start().await;
    let one = store(&server).await;
    let two = store(&server).await;
    one.migrate().await.unwrap();
    crate::settlement_conformance::claims_never_overlap(&one, &two).await;
}
