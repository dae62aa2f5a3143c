//! The SettlementStore conformance suite: every scenario runs against SQLite (a real file in a
//! temp dir) and against a real PostgreSQL started by the harness.

use std::sync::Arc;

use gateway::money::Currency;
use gateway::settlement::sqlite::SqliteStore;
use gateway::settlement::{
    check_schema, ledger, AccountRow, CommitOutcome, IntentOutcome, PaymentRow, Posting,
    SettleError, Settlement, SettlementKind, SettlementStore, SCHEMA_VERSION,
};

pub struct Sqlite {
    pub store: Arc<dyn SettlementStore>,
    _dir: tempfile::TempDir,
}

pub async fn sqlite_store() -> Sqlite {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("gateway.sqlite3")).unwrap();
    Sqlite {
        store: Arc::new(store),
        _dir: dir,
    }
}

pub fn account_row(account: &str) -> AccountRow {
    AccountRow {
        merchant_id: "alpha".into(),
        account_id: account.into(),
        currency: Currency::Cny,
        credit_limit_minor: 0,
        created_at_ms: 1,
        updated_at_ms: 1,
    }
}

pub fn payment_row(id: &str, order: &str, status: &str, held: i64) -> PaymentRow {
    PaymentRow {
        id: id.into(),
        merchant_id: "alpha".into(),
        account_id: Some("acc".into()),
        scope_tag: "TAG0000000".into(),
        merchant_order_id: order.into(),
        amount_minor: 1_000,
        currency: Currency::Cny,
        method: "supplier".into(),
        purpose: "charge".into(),
        status: status.into(),
        held_minor: held,
        hold_expires_at_ms: (held > 0).then_some(9_000),
        created_at_ms: 1,
        expires_at_ms: 5_000,
        updated_at_ms: 1,
        doc: format!("{{\"id\":\"{id}\"}}"),
    }
}

/// A capture of `amount` from alpha's `account` into alpha's sales.
pub fn capture(payment: &str, account: &str, amount: i64, seq: u64) -> Settlement {
    Settlement {
        payment_id: payment.into(),
        kind: SettlementKind::Capture,
        sequence: 0,
        merchant_id: "alpha".into(),
        account_id: Some(account.into()),
        channel_id: None,
        channel_txn_id: None,
        amount_minor: amount,
        currency: Currency::Cny,
        channel_fee_minor: 0,
        commission_minor: 0,
        merchant_net_minor: amount,
        account_seq: Some(seq),
        settled_at_ms: 10,
        postings: vec![
            Posting {
                ledger: ledger::account("alpha", account),
                amount_minor: -amount,
            },
            Posting {
                ledger: ledger::merchant_sales("alpha"),
                amount_minor: amount,
            },
        ],
        payment: None,
    }
}

pub fn credit(payment: &str, account: &str, amount: i64, seq: u64) -> Settlement {
    let mut s = capture(payment, account, amount, seq);
    s.kind = SettlementKind::Adjustment;
    s.postings = vec![
        Posting {
            ledger: ledger::account("alpha", account),
            amount_minor: amount,
        },
        Posting {
            ledger: ledger::adjustments("alpha"),
            amount_minor: -amount,
        },
    ];
    s
}

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let s = super::sqlite_store().await;
                    super::$name(s.store.clone()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let server = crate::postgres_server::PostgresServer::start().await;
                    let store = gateway::settlement::postgres::PostgresStore::connect(&server.url(), 4, 2_000)
                        .await
                        .expect("connect to the test PostgreSQL");
                    super::$name(std::sync::Arc::new(store)).await;
                }
            )*
        }
    };
}

on_both_stores!(
    migrations_apply_once_and_the_schema_is_checked,
    settlements_commit_once_and_conflicts_are_flagged,
    an_invalid_settlement_is_refused_and_nothing_is_written,
    balances_and_sequences_are_rebuilt_from_postings,
    intents_keep_one_live_payment_per_order_id,
    a_settlement_finalizes_its_payment_in_the_same_transaction,
);

async fn migrations_apply_once_and_the_schema_is_checked(store: Arc<dyn SettlementStore>) {
    assert_eq!(store.schema_version().await.unwrap(), None);
    assert!(matches!(
        check_schema(store.as_ref()).await,
        Err(SettleError::Unmigrated)
    ));
    assert_eq!(store.migrate().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(store.migrate().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(store.schema_version().await.unwrap(), Some(SCHEMA_VERSION));
    check_schema(store.as_ref()).await.unwrap();
    store.ping().await.unwrap();
}

async fn settlements_commit_once_and_conflicts_are_flagged(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    store.upsert_account(&account_row("acc")).await.unwrap();
    let first = capture("pay_1", "acc", 1_000, 1);
    let second = capture("pay_2", "acc", 2_000, 2);
    assert_eq!(
        store
            .commit(&[first.clone(), second.clone()])
            .await
            .unwrap(),
        vec![CommitOutcome::Inserted, CommitOutcome::Inserted]
    );
    // A re-drive (another settled_at) is the same movement.
    let mut again = first.clone();
    again.settled_at_ms = 99;
    assert_eq!(
        store.commit(&[again]).await.unwrap(),
        vec![CommitOutcome::AlreadyCommitted]
    );
    // The same key with other content is a conflict: nothing written, flagged.
    let other = capture("pay_1", "acc", 1_500, 1);
    let outcome = store.commit(&[other]).await.unwrap();
    assert!(
        matches!(outcome[0], CommitOutcome::Conflict { ref stored_hash } if *stored_hash == first.content_hash()),
        "{outcome:?}"
    );
    let flagged = store.flagged(10).await.unwrap();
    assert_eq!(flagged.len(), 1);
    assert_eq!(
        (flagged[0].kind.as_str(), flagged[0].payment_id.as_str()),
        ("settlement_conflict", "pay_1")
    );
    let balances = store.balances(None).await.unwrap();
    assert_eq!(balances[0].balance_minor, -3_000);
    let sums = store.postings_sum_by_movement().await.unwrap();
    assert_eq!(sums.len(), 2);
    assert!(sums.iter().all(|(_, _, _, sum)| *sum == 0), "{sums:?}");
}

async fn an_invalid_settlement_is_refused_and_nothing_is_written(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    store.upsert_account(&account_row("acc")).await.unwrap();
    let mut unbalanced = capture("pay_1", "acc", 1_000, 1);
    unbalanced.postings[1].amount_minor = 999;
    let good = capture("pay_2", "acc", 500, 2);
    // One bad settlement refuses the whole batch before anything is written.
    assert!(matches!(
        store.commit(&[good.clone(), unbalanced]).await,
        Err(SettleError::Invalid(_))
    ));
    let mut split_wrong = capture("pay_3", "acc", 1_000, 3);
    split_wrong.channel_fee_minor = 1;
    assert!(matches!(
        store.commit(&[split_wrong]).await,
        Err(SettleError::Invalid(_))
    ));
    assert!(store.postings_sum_by_movement().await.unwrap().is_empty());
    assert_eq!(store.balances(None).await.unwrap()[0].balance_minor, 0);
}

async fn balances_and_sequences_are_rebuilt_from_postings(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    for account in ["a1", "a2", "idle"] {
        store.upsert_account(&account_row(account)).await.unwrap();
    }
    let mut limit = account_row("a2");
    limit.credit_limit_minor = 5_000;
    limit.updated_at_ms = 2;
    store.upsert_account(&limit).await.unwrap();
    store
        .commit(&[
            credit("adj_1", "a1", 10_000, 1),
            capture("pay_1", "a1", 2_500, 2),
            credit("adj_2", "a2", 700, 1),
        ])
        .await
        .unwrap();
    store
        .commit(&[capture("pay_2", "a1", 500, 3)])
        .await
        .unwrap();
    let balances = store.balances(None).await.unwrap();
    let view: Vec<(&str, i64, u64, i64)> = balances
        .iter()
        .map(|b| {
            (
                b.account.account_id.as_str(),
                b.balance_minor,
                b.seq,
                b.account.credit_limit_minor,
            )
        })
        .collect();
    assert_eq!(
        view,
        vec![
            ("a1", 7_000, 3, 0),
            ("a2", 700, 1, 5_000),
            ("idle", 0, 0, 0)
        ]
    );
}

async fn intents_keep_one_live_payment_per_order_id(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    let first = payment_row("pay_1", "order", "pending", 1_000);
    assert_eq!(
        store.record_intent(&first).await.unwrap(),
        IntentOutcome::Inserted
    );
    assert_eq!(
        store.record_intent(&first).await.unwrap(),
        IntentOutcome::AlreadyRecorded
    );
    let second = payment_row("pay_2", "order", "pending", 1_000);
    assert_eq!(
        store.record_intent(&second).await.unwrap(),
        IntentOutcome::DuplicateOrder("pay_1".into())
    );
    assert_eq!(store.live_holds(None).await.unwrap(), vec![first.clone()]);
    assert_eq!(store.payment("pay_1").await.unwrap(), Some(first));
    assert_eq!(store.payment("pay_2").await.unwrap(), None);
    // Once the first is no longer live (via a settlement that finalizes it), the id is free.
    let mut failed = payment_row("pay_1", "order", "failed", 0);
    failed.updated_at_ms = 2;
    let mut release = credit("rel_1", "acc", 1, 0);
    release.payment = Some(failed);
    store.upsert_account(&account_row("acc")).await.unwrap();
    store.commit(&[release]).await.unwrap();
    assert_eq!(
        store.record_intent(&second).await.unwrap(),
        IntentOutcome::Inserted
    );
    assert_eq!(store.live_holds(None).await.unwrap(), vec![second]);
}

async fn a_settlement_finalizes_its_payment_in_the_same_transaction(
    store: Arc<dyn SettlementStore>,
) {
    store.migrate().await.unwrap();
    store.upsert_account(&account_row("acc")).await.unwrap();
    let pending = payment_row("pay_1", "o1", "pending", 1_000);
    store.record_intent(&pending).await.unwrap();
    let mut settled = capture("pay_1", "acc", 1_000, 1);
    let mut done = payment_row("pay_1", "o1", "succeeded", 0);
    done.updated_at_ms = 7;
    settled.payment = Some(done.clone());
    assert_eq!(
        store.commit(&[settled]).await.unwrap(),
        vec![CommitOutcome::Inserted]
    );
    let stored = store.payment("pay_1").await.unwrap().unwrap();
    assert_eq!(
        (
            stored.status.as_str(),
            stored.held_minor,
            stored.updated_at_ms
        ),
        ("succeeded", 0, 7)
    );
    assert!(store.live_holds(None).await.unwrap().is_empty());
    assert_eq!(
        store.payment_events("pay_1").await.unwrap(),
        vec![("pending".to_owned(), 1), ("succeeded".to_owned(), 7)]
    );
    // A re-drive of the same commit adds no event.
    let mut again = capture("pay_1", "acc", 1_000, 1);
    again.payment = Some(done.clone());
    assert_eq!(
        store.commit(&[again]).await.unwrap(),
        vec![CommitOutcome::AlreadyCommitted]
    );
    assert_eq!(store.payment_events("pay_1").await.unwrap().len(), 2);
    // A balance payment has no intent: its row is inserted with its settlement.
    let mut balance = capture("pay_9", "acc", 300, 2);
    balance.payment = Some(payment_row("pay_9", "o9", "succeeded", 0));
    store.commit(&[balance]).await.unwrap();
    assert_eq!(
        store.payment("pay_9").await.unwrap().unwrap().status,
        "succeeded"
    );
    assert_eq!(store.balances(None).await.unwrap()[0].balance_minor, -1_300);
}
