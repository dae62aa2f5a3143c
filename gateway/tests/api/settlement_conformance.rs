//! The SettlementStore conformance suite: every scenario runs against SQLite (a real file in a
//! temp dir) and against a real PostgreSQL started by the harness.

use std::sync::Arc;

use gateway::money::Currency;
use gateway::settlement::sqlite::SqliteStore;
use gateway::settlement::{
    check_schema, ledger, AccountRow, AttemptOutcome, AttemptRow, AttemptUpdate, CommitOutcome,
    IntentOutcome, KeyHolder, PaymentRow, PendingRecord, Posting, SchemaStore, SettleError,
    Settlement, SettlementKind, SettlementStore, StatusChange, WebhookAttempt, WebhookOutcome,
    Write, Written, MIGRATIONS, SCHEMA_VERSION,
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
        method: "supplier".parse().unwrap(),
        purpose: "charge".parse().unwrap(),
        status: status.parse().unwrap(),
        held_minor: held,
        hold_expires_at_ms: (held > 0).then_some(9_000),
        created_at_ms: 1,
        expires_at_ms: 5_000,
        updated_at_ms: 1,
        doc: format!("{{\"id\":\"{id}\"}}"),
        next_check_at_ms: None,
        checks: 0,
        idempotency_key: None,
        request_hash: None,
    }
}

/// A pending channel payment (no hold) the resolution loop looks at first at `next_check`.
pub fn channel_payment(id: &str, next_check: Option<u64>) -> PaymentRow {
    let mut p = payment_row(id, &format!("order-{id}"), "pending", 0);
    p.account_id = None;
    p.method = "alipay".parse().unwrap();
    p.next_check_at_ms = next_check;
    p
}

pub fn attempt_row(payment: &str, attempt: u32) -> AttemptRow {
    AttemptRow {
        payment_id: payment.into(),
        attempt,
        channel_id: format!("ch{attempt}"),
        channel_order_id: format!("{payment}-{attempt}"),
        outcome: AttemptOutcome::Accepted,
        latency_ms: None,
        action: None,
        channel_txn_id: None,
        created_at_ms: 2,
        updated_at_ms: 2,
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
        adjustment: None,
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
    an_intent_and_its_first_attempt_are_recorded_together,
    a_retried_intent_adds_its_missing_attempt,
    attempts_are_recorded_once_and_clashing_order_ids_are_refused,
    updating_an_attempt_keeps_what_it_does_not_replace,
    an_accepted_outcome_only_follows_the_unknown_recorded_before_the_call,
    claim_due_leases_due_pending_payments_oldest_first,
    schedule_check_sets_the_next_check_and_counts,
    payment_rows_keep_their_resolution_schedule,
    refunds_are_recorded_once_end_once_and_announce_a_failure,
    a_refunded_payment_never_moves_back_whatever_order_commits_arrive_in,
    a_group_commit_holds_intents_attempt_outcomes_and_settlements,
    a_refused_write_leaves_nothing_and_the_rest_of_its_batch_commits,
    the_store_decides_on_idempotency_keys_and_order_ids,
    new_payments_of_one_batch_are_decided_each_on_its_own,
    intents_of_one_batch_are_decided_each_on_its_own,
    the_store_caps_refunds_and_flags_a_conflict,
    refusals_are_kept_once_per_key,
    old_keys_are_purged_under_a_lease,
    keyed_payments_come_back_page_by_page,
    a_payment_is_found_by_its_scope_and_key,
    a_batchs_attempt_outcomes_apply_each_as_alone,
    a_batchs_movements_are_decided_each_as_alone,
);

/// alpha's `account` as the store's transfers make it: (balance, sequence) per currency.
async fn balance_and_seq(store: &dyn SettlementStore, account: &str) -> Vec<(i64, u64)> {
    store
        .balances(Some(("alpha", account)))
        .await
        .unwrap()
        .iter()
        .map(|b| (b.balance_minor, b.seq))
        .collect()
}

/// Commits `batch` in one group commit: what each write did, every one of them accepted.
async fn all_written(store: &dyn SettlementStore, batch: &[Write]) -> Vec<Written> {
    store
        .commit_writes(batch)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

fn outcome_update(payment: &str, attempt: u32, outcome: &str, txn: Option<&str>) -> AttemptUpdate {
    AttemptUpdate {
        payment_id: payment.into(),
        attempt,
        outcome: AttemptOutcome::parse(outcome).unwrap(),
        latency_ms: None,
        action: None,
        channel_txn_id: txn.map(str::to_owned),
        now_ms: 50,
    }
}

async fn a_group_commit_holds_intents_attempt_outcomes_and_settlements(
    store: Arc<dyn SettlementStore>,
) {
    store.migrate().await.unwrap();
    store.upsert_account(&account_row("acc")).await.unwrap();
    assert!(store.commit_writes(&[]).await.unwrap().is_empty());
    let first = attempt_row("pay_1", 1);
    store
        .record_intent(&channel_payment("pay_1", Some(60_000)), Some(&first))
        .await
        .unwrap();
    let second = channel_payment("pay_2", Some(60_000));
    let mut rival = channel_payment("pay_3", Some(60_000));
    rival.merchant_order_id = second.merchant_order_id.clone();
    // Listed out of order on purpose: the store applies intents, then attempt outcomes, then
    // settlements; two outcomes of one attempt apply in the order given.
    let batch = vec![
        Write::Settlement(capture("pay_c", "acc", 100, 1)),
        Write::Attempt(outcome_update("pay_1", 1, "succeeded", Some("txn-1"))),
        Write::Intent {
            payment: second.clone(),
            first_attempt: Some(attempt_row("pay_2", 1)),
        },
        Write::Intent {
            payment: rival.clone(),
            first_attempt: Some(attempt_row("pay_3", 1)),
        },
        Write::Attempt(outcome_update("pay_1", 1, "accepted", None)),
        Write::Attempt(outcome_update("pay_x", 1, "failed", None)),
        Write::Intent {
            payment: channel_payment("pay_1", Some(60_000)),
            first_attempt: Some(first.clone()),
        },
        // No such event: nothing to record.
        Write::Webhook(WebhookAttempt {
            id: "evt_none".into(),
            outcome: WebhookOutcome::Delivered,
            http_status: Some(200),
            error: None,
            now_ms: 50,
        }),
    ];
    let results = all_written(store.as_ref(), &batch).await;
    assert_eq!(
        results,
        vec![
            Written::Settlement(CommitOutcome::Inserted),
            Written::Attempt(true),
            Written::Intent(IntentOutcome::Inserted),
            Written::Intent(IntentOutcome::DuplicateOrder("pay_2".into())),
            // A late `accepted` never moves a succeeded attempt back.
            Written::Attempt(false),
            Written::Attempt(false),
            Written::Intent(IntentOutcome::AlreadyRecorded),
            Written::Webhook(false),
        ]
    );
    assert_eq!(store.payment("pay_2").await.unwrap(), Some(second));
    assert_eq!(
        store.attempts("pay_2").await.unwrap(),
        vec![attempt_row("pay_2", 1)]
    );
    assert_eq!(store.payment("pay_3").await.unwrap(), None);
    assert!(store.attempts("pay_3").await.unwrap().is_empty());
    let stored = store.attempts("pay_1").await.unwrap();
    assert_eq!(
        (
            stored[0].outcome.as_str(),
            stored[0].channel_txn_id.as_deref()
        ),
        ("succeeded", Some("txn-1"))
    );
    assert_eq!(
        balance_and_seq(store.as_ref(), "acc").await,
        vec![(-100, 1)]
    );
    // The same batch again: every write is recognized, nothing doubles.
    let again = all_written(store.as_ref(), &batch).await;
    assert_eq!(
        again[0],
        Written::Settlement(CommitOutcome::AlreadyCommitted)
    );
    assert_eq!(again[2], Written::Intent(IntentOutcome::AlreadyRecorded));
    assert_eq!(
        store.balances(Some(("alpha", "acc"))).await.unwrap()[0].balance_minor,
        -100
    );
}

async fn a_refused_write_leaves_nothing_and_the_rest_of_its_batch_commits(
    store: Arc<dyn SettlementStore>,
) {
    store.migrate().await.unwrap();
    store.upsert_account(&account_row("acc")).await.unwrap();
    store
        .record_intent(
            &channel_payment("pay_1", Some(60_000)),
            Some(&attempt_row("pay_1", 1)),
        )
        .await
        .unwrap();
    // An attempt whose channel order id another payment's attempt holds: found out only after
    // its payment row was written, which must not survive.
    let mut clash = attempt_row("pay_4", 1);
    clash.channel_order_id = "pay_1-1".into();
    let mut unbalanced = capture("pay_u", "acc", 100, 2);
    unbalanced.postings[0].amount_minor = -99;
    let batch = vec![
        Write::Intent {
            payment: channel_payment("pay_4", Some(60_000)),
            first_attempt: Some(clash),
        },
        // An attempt of another payment: refused before the transaction.
        Write::Intent {
            payment: channel_payment("pay_5", Some(60_000)),
            first_attempt: Some(attempt_row("pay_9", 1)),
        },
        Write::Settlement(unbalanced),
        Write::Intent {
            payment: channel_payment("pay_6", Some(60_000)),
            first_attempt: Some(attempt_row("pay_6", 1)),
        },
        Write::Settlement(capture("pay_c", "acc", 100, 1)),
    ];
    let results = store.commit_writes(&batch).await.unwrap();
    assert!(
        matches!(results[0], Err(SettleError::Invalid(_))),
        "{results:?}"
    );
    assert!(
        matches!(results[1], Err(SettleError::Invalid(_))),
        "{results:?}"
    );
    assert!(
        matches!(results[2], Err(SettleError::Invalid(_))),
        "{results:?}"
    );
    assert_eq!(
        results[3].as_ref().unwrap(),
        &Written::Intent(IntentOutcome::Inserted)
    );
    assert_eq!(
        results[4].as_ref().unwrap(),
        &Written::Settlement(CommitOutcome::Inserted)
    );
    for refused in ["pay_4", "pay_5", "pay_u"] {
        assert_eq!(store.payment(refused).await.unwrap(), None, "{refused}");
        assert!(
            store.attempts(refused).await.unwrap().is_empty(),
            "{refused}"
        );
    }
    assert!(store.attempts("pay_9").await.unwrap().is_empty());
    assert_eq!(
        store.attempts("pay_1").await.unwrap(),
        vec![attempt_row("pay_1", 1)]
    );
    assert_eq!(store.attempts("pay_6").await.unwrap().len(), 1);
    assert_eq!(
        store.balances(Some(("alpha", "acc"))).await.unwrap()[0].balance_minor,
        -100
    );
    assert_eq!(store.postings_sum_by_movement().await.unwrap().len(), 1);
}

async fn a_refunded_payment_never_moves_back_whatever_order_commits_arrive_in(
    store: Arc<dyn SettlementStore>,
) {
    store.migrate().await.unwrap();
    let payment = channel_payment("pay_o", None);
    store.record_intent(&payment, None).await.unwrap();
    let refund = |seq: u32, status: &str| {
        let mut s = capture("pay_o", "acc", 100, u64::from(seq) + 10);
        s.kind = SettlementKind::Refund;
        s.sequence = seq;
        let mut row = payment.clone();
        row.status = status.parse().unwrap();
        s.payment = Some(row);
        s
    };
    // The second refund's commit (refunded) lands before the first's (partially refunded).
    store.commit(&[refund(2, "refunded")]).await.unwrap();
    store
        .commit(&[refund(1, "partially_refunded")])
        .await
        .unwrap();
    assert_eq!(
        store
            .payment("pay_o")
            .await
            .unwrap()
            .unwrap()
            .status
            .as_str(),
        "refunded"
    );
    let flagged = store.flagged(10).await.unwrap();
    assert!(flagged.is_empty(), "nothing to flag: {flagged:?}");
}

async fn refunds_are_recorded_once_end_once_and_announce_a_failure(
    store: Arc<dyn SettlementStore>,
) {
    use gateway::settlement::{RefundRow, RefundStatusChange};
    store.migrate().await.unwrap();
    let payment = channel_payment("pay_r", Some(60_000));
    store.record_intent(&payment, None).await.unwrap();
    let refund = |n: u32| RefundRow {
        refund_id: format!("re_r_{n}"),
        payment_id: "pay_r".into(),
        number: n,
        amount_minor: 100 * i64::from(n),
        currency: gateway::money::Currency::Cny,
        status: "pending".parse().unwrap(),
        channel_id: Some("ch".into()),
        channel_order_id: Some("pay_r-1".into()),
        reason: Some("why".into()),
        created_at_ms: 5,
        updated_at_ms: 5,
        idempotency_key: None,
    };
    use gateway::settlement::RefundRecorded;
    assert_eq!(
        store.record_refund(&refund(1)).await.unwrap(),
        RefundRecorded::Inserted
    );
    assert_eq!(
        store.record_refund(&refund(1)).await.unwrap(),
        RefundRecorded::AlreadyRecorded
    );
    assert_eq!(
        store.record_refund(&refund(2)).await.unwrap(),
        RefundRecorded::Inserted
    );
    assert_eq!(
        store.refunds("pay_r").await.unwrap(),
        vec![refund(1), refund(2)]
    );
    assert_eq!(store.stale_refunds(6, 10).await.unwrap().len(), 2);
    assert!(store.stale_refunds(5, 10).await.unwrap().is_empty());

    let failed = RefundStatusChange {
        refund_id: "re_r_2".into(),
        status: "failed".parse().unwrap(),
        updated_at_ms: 9,
    };
    assert!(store.set_refund_status(&failed).await.unwrap());
    assert!(
        !store.set_refund_status(&failed).await.unwrap(),
        "ends once"
    );
    let refunds = store.refunds("pay_r").await.unwrap();
    assert_eq!(
        (refunds[1].status.as_str(), refunds[1].updated_at_ms),
        ("failed", 9)
    );
    assert_eq!(store.stale_refunds(100, 10).await.unwrap(), vec![refund(1)]);
    let events = store.webhook_events("pay_r").await.unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, vec!["refund.failed"], "announced once");
    assert_eq!(events[0].sequence, 2);
}

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
        store.record_intent(&first, None).await.unwrap(),
        IntentOutcome::Inserted
    );
    assert_eq!(
        store.record_intent(&first, None).await.unwrap(),
        IntentOutcome::AlreadyRecorded
    );
    let second = payment_row("pay_2", "order", "pending", 1_000);
    assert_eq!(
        store.record_intent(&second, None).await.unwrap(),
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
        store.record_intent(&second, None).await.unwrap(),
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
    store.record_intent(&pending, None).await.unwrap();
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
        store
            .payment("pay_9")
            .await
            .unwrap()
            .unwrap()
            .status
            .as_str(),
        "succeeded"
    );
    assert_eq!(store.balances(None).await.unwrap()[0].balance_minor, -1_300);
}

async fn an_intent_and_its_first_attempt_are_recorded_together(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    let payment = channel_payment("pay_1", Some(60_000));
    let first = attempt_row("pay_1", 1);
    assert_eq!(
        store.record_intent(&payment, Some(&first)).await.unwrap(),
        IntentOutcome::Inserted
    );
    assert_eq!(store.payment("pay_1").await.unwrap(), Some(payment.clone()));
    assert_eq!(store.attempts("pay_1").await.unwrap(), vec![first.clone()]);
    assert_eq!(
        store.attempt_by_channel_order("pay_1-1").await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(store.attempt_by_channel_order("nope").await.unwrap(), None);

    // Another payment for the same order id: nothing written, not even its attempt.
    let mut rival = channel_payment("pay_2", Some(60_000));
    rival.merchant_order_id = payment.merchant_order_id.clone();
    assert_eq!(
        store
            .record_intent(&rival, Some(&attempt_row("pay_2", 1)))
            .await
            .unwrap(),
        IntentOutcome::DuplicateOrder("pay_1".into())
    );
    assert!(store.attempts("pay_2").await.unwrap().is_empty());
    assert_eq!(
        store.attempt_by_channel_order("pay_2-1").await.unwrap(),
        None
    );

    // An attempt whose channel order id is taken: refused, and the payment is not written
    // either (the channel must never be called with an order id the store does not hold).
    let third = channel_payment("pay_3", Some(60_000));
    let mut clash = attempt_row("pay_3", 1);
    clash.channel_order_id = "pay_1-1".into();
    assert!(matches!(
        store.record_intent(&third, Some(&clash)).await,
        Err(SettleError::Invalid(_))
    ));
    assert_eq!(store.payment("pay_3").await.unwrap(), None);
    assert!(store.attempts("pay_3").await.unwrap().is_empty());
    // An attempt of another payment: refused before anything is written.
    assert!(matches!(
        store
            .record_intent(&third, Some(&attempt_row("pay_1", 2)))
            .await,
        Err(SettleError::Invalid(_))
    ));
    assert_eq!(store.payment("pay_3").await.unwrap(), None);
    assert_eq!(store.attempts("pay_1").await.unwrap(), vec![first]);
}

async fn a_retried_intent_adds_its_missing_attempt(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    let payment = channel_payment("pay_1", Some(60_000));
    assert_eq!(
        store.record_intent(&payment, None).await.unwrap(),
        IntentOutcome::Inserted
    );
    assert!(store.attempts("pay_1").await.unwrap().is_empty());
    let first = attempt_row("pay_1", 1);
    assert_eq!(
        store.record_intent(&payment, Some(&first)).await.unwrap(),
        IntentOutcome::AlreadyRecorded
    );
    assert_eq!(store.attempts("pay_1").await.unwrap(), vec![first.clone()]);
    // Again, with the attempt already there (its outcome moved on meanwhile): nothing changes.
    store
        .update_attempt(
            "pay_1",
            1,
            AttemptOutcome::Unknown,
            Some(3_000),
            None,
            None,
            5,
        )
        .await
        .unwrap();
    let stored = store.attempts("pay_1").await.unwrap();
    assert_eq!(
        store.record_intent(&payment, Some(&first)).await.unwrap(),
        IntentOutcome::AlreadyRecorded
    );
    assert_eq!(store.attempts("pay_1").await.unwrap(), stored);
    assert_eq!(stored[0].outcome, AttemptOutcome::Unknown);
    // A retry whose attempt clashes with the stored one is refused.
    let mut other = first.clone();
    other.channel_order_id = "pay_1-x".into();
    assert!(matches!(
        store.record_intent(&payment, Some(&other)).await,
        Err(SettleError::Invalid(_))
    ));
    assert_eq!(store.attempts("pay_1").await.unwrap(), stored);
    assert_eq!(store.payment("pay_1").await.unwrap(), Some(payment));
}

async fn attempts_are_recorded_once_and_clashing_order_ids_are_refused(
    store: Arc<dyn SettlementStore>,
) {
    store.migrate().await.unwrap();
    store
        .record_intent(&channel_payment("pay_1", Some(60_000)), None)
        .await
        .unwrap();
    // Recorded out of order, read back by attempt number.
    let (one, two, three) = (
        attempt_row("pay_1", 1),
        attempt_row("pay_1", 2),
        attempt_row("pay_1", 3),
    );
    store.record_attempt(&three).await.unwrap();
    store.record_attempt(&one).await.unwrap();
    store.record_attempt(&two).await.unwrap();
    let all = vec![one.clone(), two.clone(), three.clone()];
    assert_eq!(store.attempts("pay_1").await.unwrap(), all);

    // The same attempt again (other fields differ): Ok, nothing changes.
    let mut again = two.clone();
    again.outcome = AttemptOutcome::Refused;
    again.channel_id = "elsewhere".into();
    again.updated_at_ms = 99;
    store.record_attempt(&again).await.unwrap();
    assert_eq!(store.attempts("pay_1").await.unwrap(), all);

    // Another channel order id for a stored attempt: refused.
    let mut renamed = two.clone();
    renamed.channel_order_id = "pay_1-other".into();
    assert!(matches!(
        store.record_attempt(&renamed).await,
        Err(SettleError::Invalid(_))
    ));
    assert_eq!(
        store.attempt_by_channel_order("pay_1-other").await.unwrap(),
        None
    );
    // A channel order id another attempt (of this payment or another) uses: refused.
    let mut stolen = attempt_row("pay_1", 4);
    stolen.channel_order_id = one.channel_order_id.clone();
    assert!(matches!(
        store.record_attempt(&stolen).await,
        Err(SettleError::Invalid(_))
    ));
    let mut foreign = attempt_row("pay_9", 1);
    foreign.channel_order_id = three.channel_order_id.clone();
    assert!(matches!(
        store.record_attempt(&foreign).await,
        Err(SettleError::Invalid(_))
    ));
    assert_eq!(store.attempts("pay_1").await.unwrap(), all);
    assert!(store.attempts("pay_9").await.unwrap().is_empty());
    assert_eq!(
        store
            .attempt_by_channel_order(&one.channel_order_id)
            .await
            .unwrap(),
        Some(one)
    );
    // An attempt without a channel order id is refused.
    let mut nameless = attempt_row("pay_1", 5);
    nameless.channel_order_id.clear();
    assert!(matches!(
        store.record_attempt(&nameless).await,
        Err(SettleError::Invalid(_))
    ));
    assert_eq!(store.attempts("pay_1").await.unwrap().len(), 3);
}

/// The accepted outcome rides a later group commit than the checkout's answer: an outcome
/// that overtook it (the channel's failure, a close) stands.
async fn an_accepted_outcome_only_follows_the_unknown_recorded_before_the_call(
    store: Arc<dyn SettlementStore>,
) {
    let before_the_call = |attempt| AttemptRow {
        outcome: AttemptOutcome::Unknown,
        ..attempt_row("pay_1", attempt)
    };
    store.migrate().await.unwrap();
    store
        .record_intent(
            &channel_payment("pay_1", Some(60_000)),
            Some(&before_the_call(1)),
        )
        .await
        .unwrap();
    store.record_attempt(&before_the_call(2)).await.unwrap();
    let accept = |attempt| {
        store.update_attempt(
            "pay_1",
            attempt,
            AttemptOutcome::Accepted,
            Some(5),
            Some("{}"),
            None,
            20,
        )
    };
    // Attempt 1 failed at the channel before its acceptance landed.
    assert!(store
        .update_attempt("pay_1", 1, AttemptOutcome::Failed, None, None, None, 10)
        .await
        .unwrap());
    assert!(!accept(1).await.unwrap());
    // Attempt 2 is still as recorded before its call: accepted.
    assert!(accept(2).await.unwrap());
    let outcomes: Vec<(u32, AttemptOutcome, Option<String>)> = store
        .attempts("pay_1")
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.attempt, a.outcome, a.action))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (1, AttemptOutcome::Failed, None),
            (2, AttemptOutcome::Accepted, Some("{}".into()))
        ]
    );
}

async fn updating_an_attempt_keeps_what_it_does_not_replace(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    let first = attempt_row("pay_1", 1);
    store
        .record_intent(&channel_payment("pay_1", Some(60_000)), Some(&first))
        .await
        .unwrap();
    let action = r#"{"type":"qr_code","url":"https://qr.example/1"}"#;
    assert!(store
        .update_attempt(
            "pay_1",
            1,
            AttemptOutcome::Accepted,
            Some(120),
            Some(action),
            None,
            10
        )
        .await
        .unwrap());
    let mut expected = AttemptRow {
        latency_ms: Some(120),
        action: Some(action.into()),
        updated_at_ms: 10,
        ..first.clone()
    };
    assert_eq!(
        store.attempts("pay_1").await.unwrap(),
        vec![expected.clone()]
    );
    // Given values replace stored ones.
    assert!(store
        .update_attempt(
            "pay_1",
            1,
            AttemptOutcome::Unknown,
            Some(7),
            Some("{}"),
            Some("txn-41"),
            15
        )
        .await
        .unwrap());
    expected.outcome = AttemptOutcome::Unknown;
    expected.latency_ms = Some(7);
    expected.action = Some("{}".into());
    expected.channel_txn_id = Some("txn-41".into());
    expected.updated_at_ms = 15;
    assert_eq!(
        store.attempts("pay_1").await.unwrap(),
        vec![expected.clone()]
    );
    // The callback: outcome and transaction id; latency and action stay.
    assert!(store
        .update_attempt(
            "pay_1",
            1,
            AttemptOutcome::Succeeded,
            None,
            None,
            Some("txn-42"),
            20
        )
        .await
        .unwrap());
    expected.outcome = AttemptOutcome::Succeeded;
    expected.channel_txn_id = Some("txn-42".into());
    expected.updated_at_ms = 20;
    assert_eq!(
        store.attempt_by_channel_order("pay_1-1").await.unwrap(),
        Some(expected.clone())
    );
    // A succeeded attempt stays so (a late `accepted` or `closed` must not move it back).
    for late in ["accepted", "closed"] {
        assert!(!store
            .update_attempt(
                "pay_1",
                1,
                AttemptOutcome::parse(late).unwrap(),
                Some(9),
                Some("[]"),
                Some("txn-43"),
                30
            )
            .await
            .unwrap());
    }
    assert_eq!(
        store.attempts("pay_1").await.unwrap(),
        vec![expected.clone()]
    );
    // No such attempt: false, nothing written.
    assert!(!store
        .update_attempt("pay_1", 2, AttemptOutcome::Failed, None, None, None, 40)
        .await
        .unwrap());
    assert!(!store
        .update_attempt("pay_x", 1, AttemptOutcome::Failed, None, None, None, 40)
        .await
        .unwrap());
    assert_eq!(store.attempts("pay_1").await.unwrap().len(), 1);
    assert!(store.attempts("pay_x").await.unwrap().is_empty());
}

fn ids(rows: &[PaymentRow]) -> Vec<(&str, Option<u64>)> {
    rows.iter()
        .map(|p| (p.id.as_str(), p.next_check_at_ms))
        .collect()
}

async fn claim_due_leases_due_pending_payments_oldest_first(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    for p in [
        channel_payment("pay_a", Some(100)),
        channel_payment("pay_b", Some(50)),
        channel_payment("pay_c", Some(200)),
        channel_payment("pay_d", None),
        channel_payment("pay_e", Some(10)),
        channel_payment("pay_f", Some(150)),
    ] {
        store.record_intent(&p, None).await.unwrap();
    }
    // pay_e ends without money moving: never claimed again.
    assert!(store
        .set_final_status(&StatusChange {
            payment_id: "pay_e".into(),
            status: "expired".parse().unwrap(),
            updated_at_ms: 5,
        })
        .await
        .unwrap());
    // pay_f succeeds through a settlement: not pending either.
    let mut paid = capture("pay_f", "acc", 1_000, 1);
    paid.account_id = None;
    paid.account_seq = None;
    let mut done = channel_payment("pay_f", None);
    done.status = "succeeded".parse().unwrap();
    paid.payment = Some(done);
    assert_eq!(
        store.commit(&[paid]).await.unwrap(),
        vec![CommitOutcome::Inserted]
    );

    // Due at 150: pay_b (50), then pay_a (100); the limit takes one at a time.
    let claimed = store.claim_due(150, 1_000, 1).await.unwrap();
    assert_eq!(ids(&claimed), vec![("pay_b", Some(1_000))]);
    let claimed = store.claim_due(150, 1_000, 10).await.unwrap();
    assert_eq!(ids(&claimed), vec![("pay_a", Some(1_000))]);
    assert_eq!(claimed[0].status.as_str(), "pending");
    assert_eq!(
        claimed[0],
        PaymentRow {
            next_check_at_ms: Some(1_000),
            ..channel_payment("pay_a", None)
        }
    );
    // Leased: the same tick (or another instance) gets nothing more.
    assert!(store.claim_due(150, 1_000, 10).await.unwrap().is_empty());
    assert!(store.claim_due(150, 2_000, 10).await.unwrap().is_empty());
    assert_eq!(
        store
            .payment("pay_b")
            .await
            .unwrap()
            .unwrap()
            .next_check_at_ms,
        Some(1_000)
    );
    assert!(store.claim_due(10, 2_000, 0).await.unwrap().is_empty());
    // When the leases end they are due again, with pay_c, oldest check first then by id.
    let claimed = store.claim_due(1_000, 2_000, 10).await.unwrap();
    assert_eq!(
        ids(&claimed),
        vec![
            ("pay_c", Some(2_000)),
            ("pay_a", Some(2_000)),
            ("pay_b", Some(2_000))
        ]
    );
    // Claiming counts no check (schedule_check does).
    assert!(claimed.iter().all(|p| p.checks == 0));
    // Never: pay_d (no schedule), pay_e and pay_f (not pending, whatever their schedule).
    let claimed = store.claim_due(u64::MAX / 2, 0, 10).await.unwrap();
    assert_eq!(
        ids(&claimed),
        vec![("pay_a", Some(0)), ("pay_b", Some(0)), ("pay_c", Some(0))]
    );
    for (id, next_check) in [("pay_d", None), ("pay_e", Some(10)), ("pay_f", Some(150))] {
        let p = store.payment(id).await.unwrap().unwrap();
        assert_eq!(p.next_check_at_ms, next_check, "{id}");
    }
}

async fn schedule_check_sets_the_next_check_and_counts(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    store
        .record_intent(&channel_payment("pay_1", Some(100)), None)
        .await
        .unwrap();
    let claimed = store.claim_due(100, 1_100, 10).await.unwrap();
    assert_eq!(ids(&claimed), vec![("pay_1", Some(1_100))]);
    // Looked at: next check in 5 s.
    store.schedule_check("pay_1", Some(5_100)).await.unwrap();
    let p = store.payment("pay_1").await.unwrap().unwrap();
    assert_eq!((p.next_check_at_ms, p.checks), (Some(5_100), 1));
    assert!(store.claim_due(5_099, 9_000, 10).await.unwrap().is_empty());
    let claimed = store.claim_due(5_100, 9_000, 10).await.unwrap();
    assert_eq!(ids(&claimed), vec![("pay_1", Some(9_000))]);
    assert_eq!(claimed[0].checks, 1);
    // The schedule is used up: never again.
    store.schedule_check("pay_1", None).await.unwrap();
    let p = store.payment("pay_1").await.unwrap().unwrap();
    assert_eq!((p.next_check_at_ms, p.checks), (None, 2));
    assert!(store
        .claim_due(u64::MAX / 2, 0, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        store.schedule_check("pay_x", Some(1)).await,
        Err(SettleError::Invalid(_))
    ));
}

async fn payment_rows_keep_their_resolution_schedule(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    store.upsert_account(&account_row("acc")).await.unwrap();
    // A supplier charge with a hold and a schedule, already looked at 3 times (rebuilt from an
    // outbox, say): every field reads back, through `payment` and `live_holds`.
    let mut held = payment_row("pay_1", "o1", "pending", 1_000);
    held.next_check_at_ms = Some(123_456);
    held.checks = 3;
    store.record_intent(&held, None).await.unwrap();
    assert_eq!(store.payment("pay_1").await.unwrap(), Some(held.clone()));
    assert_eq!(store.live_holds(None).await.unwrap(), vec![held.clone()]);
    // Its settlement finalizes it from a row without a schedule: the stored one stays.
    let mut settled = capture("pay_1", "acc", 1_000, 1);
    let mut done = payment_row("pay_1", "o1", "succeeded", 0);
    done.updated_at_ms = 7;
    settled.payment = Some(done);
    store.commit(&[settled]).await.unwrap();
    let stored = store.payment("pay_1").await.unwrap().unwrap();
    assert_eq!(
        (
            stored.status.as_str(),
            stored.next_check_at_ms,
            stored.checks
        ),
        ("succeeded", Some(123_456), 3)
    );
    // A payment first written by its settlement (a balance payment) keeps what its row says.
    let mut balance = capture("pay_2", "acc", 300, 2);
    balance.payment = Some(payment_row("pay_2", "o2", "succeeded", 0));
    store.commit(&[balance.clone()]).await.unwrap();
    assert_eq!(store.payment("pay_2").await.unwrap(), balance.payment);
}

/// Records written to Redis outboxes before the schedule existed still read.
#[test]
fn payment_rows_without_a_schedule_still_deserialize() {
    let row = channel_payment("pay_1", Some(5));
    let mut json: serde_json::Value =
        serde_json::from_str(&PendingRecord::Intent(row.clone()).to_json()).unwrap();
    let fields = json["intent"].as_object_mut().unwrap();
    assert!(fields.remove("next_check_at_ms").is_some());
    assert!(fields.remove("checks").is_some());
    let old: PendingRecord = serde_json::from_value(json).unwrap();
    assert_eq!(
        old,
        PendingRecord::Intent(PaymentRow {
            next_check_at_ms: None,
            checks: 0,
            idempotency_key: None,
            request_hash: None,
            ..row
        })
    );
}

/// A store at schema version 1 (created as the previous binary did), with a payment and an
/// attempt in it, one statement at a time so both backends run the same text.
const VERSION_1_DATA: &[&str] = &[
    "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)",
    "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (1, 0)",
    "INSERT INTO payments (id, merchant_id, account_id, scope_tag, merchant_order_id, \
     amount_minor, currency, method, purpose, status, held_minor, hold_expires_at_ms, \
     created_at_ms, expires_at_ms, updated_at_ms, doc) VALUES ('pay_old', 'alpha', NULL, \
     'TAG0000000', 'order-pay_old', 1000, 'CNY', 'alipay', 'charge', 'pending', 0, NULL, 1, \
     5000, 1, '{\"id\":\"pay_old\"}')",
    "INSERT INTO attempts (payment_id, attempt, channel_id, channel_order_id, outcome, \
     latency_ms, created_at_ms, updated_at_ms) VALUES ('pay_old', 1, 'ch1', 'pay_old-1', \
     'accepted', NULL, 2, 2)",
];

/// What a store created at version 1 (see `VERSION_1_DATA`) looks like after `migrate`.
async fn a_version_1_store_migrates(store: Arc<dyn SettlementStore>) {
    assert_eq!(store.schema_version().await.unwrap(), Some(1));
    assert!(matches!(
        check_schema(store.as_ref()).await,
        Err(SettleError::WrongSchema {
            found: 1,
            expected: SCHEMA_VERSION
        })
    ));
    assert_eq!(store.migrate().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(store.schema_version().await.unwrap(), Some(SCHEMA_VERSION));
    check_schema(store.as_ref()).await.unwrap();
    assert_eq!(store.migrate().await.unwrap(), SCHEMA_VERSION, "a no-op");
    // Old rows: no schedule, no check yet; attempts without action or transaction id.
    assert_eq!(
        store.payment("pay_old").await.unwrap(),
        Some(channel_payment("pay_old", None))
    );
    assert_eq!(
        store.attempts("pay_old").await.unwrap(),
        vec![attempt_row("pay_old", 1)]
    );
    // And the new columns work on them.
    store.schedule_check("pay_old", Some(10)).await.unwrap();
    let claimed = store.claim_due(10, 20, 10).await.unwrap();
    assert_eq!(ids(&claimed), vec![("pay_old", Some(20))]);
    assert_eq!(claimed[0].checks, 1);
    assert!(store
        .update_attempt(
            "pay_old",
            1,
            AttemptOutcome::Succeeded,
            None,
            None,
            Some("t"),
            30
        )
        .await
        .unwrap());
    assert_eq!(
        store.attempts("pay_old").await.unwrap()[0]
            .channel_txn_id
            .as_deref(),
        Some("t")
    );
}

#[tokio::test]
async fn sqlite_a_version_1_store_migrates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.sqlite3");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let init = MIGRATIONS[0];
        assert_eq!(init.version, 1);
        conn.execute_batch(init.sqlite).unwrap();
        for statement in VERSION_1_DATA {
            conn.execute_batch(statement).unwrap();
        }
    }
    let store = SqliteStore::open(&path).unwrap();
    a_version_1_store_migrates(Arc::new(store)).await;
}

#[tokio::test]
async fn postgres_a_version_1_store_migrates() {
    let server = crate::postgres_server::PostgresServer::start().await;
    {
        let client = server.client().await;
        let init = MIGRATIONS[0];
        assert_eq!(init.version, 1);
        client.batch_execute(init.postgres).await.unwrap();
        for statement in VERSION_1_DATA {
            client.batch_execute(statement).await.unwrap();
        }
    }
    let store = gateway::settlement::postgres::PostgresStore::connect(&server.url(), 4, 2_000)
        .await
        .expect("connect to the test PostgreSQL");
    a_version_1_store_migrates(Arc::new(store)).await;
}

/// Two SQLite stores on one file (two gateway processes on one host, or `gateway` tools beside
/// a server): concurrent claims never hand out the same payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_concurrent_claims_never_share_a_payment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.sqlite3");
    let one = SqliteStore::open(&path).unwrap();
    let two = SqliteStore::open(&path).unwrap();
    one.migrate().await.unwrap();
    claims_never_overlap(&one, &two).await;
}

/// Records 60 due payments, then has `one` and `two` claim them concurrently, a few at a time,
/// until none is left: each payment is claimed exactly once.
pub async fn claims_never_overlap(one: &dyn SettlementStore, two: &dyn SettlementStore) {
    const PAYMENTS: u64 = 60;
    for i in 0..PAYMENTS {
        let p = channel_payment(&format!("pay_{i:03}"), Some(100 + i % 7));
        one.record_intent(&p, None).await.unwrap();
    }
    let mut seen = std::collections::BTreeMap::new();
    for round in 0..PAYMENTS {
        let (l, r) = tokio::join!(
            one.claim_due(1_000, 10_000, 3),
            two.claim_due(1_000, 10_000, 4)
        );
        let (l, r) = (l.unwrap(), r.unwrap());
        if l.is_empty() && r.is_empty() {
            break;
        }
        for (who, p) in l
            .iter()
            .map(|p| ("one", p))
            .chain(r.iter().map(|p| ("two", p)))
        {
            assert_eq!(p.next_check_at_ms, Some(10_000));
            if let Some(earlier) = seen.insert(p.id.clone(), (who, round)) {
                panic!("{} claimed twice: {earlier:?}, then ({who}, {round})", p.id);
            }
        }
    }
    assert_eq!(seen.len() as u64, PAYMENTS, "every due payment was claimed");
}

/// The merchant webhook outbox (migration 0003, `crate::webhooks`): events are enqueued by
/// `commit` and `set_final_status` in their own transaction, once per (payment, type, sequence).
mod webhook_outbox {
    use super::*;
    use gateway::settlement::{NoWebhook, WebhookEvent, WebhookOutcome, WebhookStatus};
    use serde_json::Value;

    on_both_stores!(
        a_committed_capture_enqueues_payment_succeeded_once,
        a_final_status_enqueues_its_event_once,
        refunds_and_late_money_name_the_stored_payment,
        claimed_webhooks_are_leased_and_attempts_recorded,
        a_batchs_delivery_outcomes_apply_each_as_alone,
    );

    fn now_ms() -> u64 {
        gateway::telemetry::now_ms()
    }

    fn with_notify_url(mut p: PaymentRow, url: &str) -> PaymentRow {
        p.doc = serde_json::json!({"id": p.id, "notify_url": url}).to_string();
        p
    }

    /// A channel payment `id` that failed: its `payment.failed` event is enqueued, pending.
    async fn failed_with_event(store: &dyn SettlementStore, id: &str) {
        store
            .record_intent(&channel_payment(id, None), None)
            .await
            .unwrap();
        store
            .set_final_status(&StatusChange {
                payment_id: id.into(),
                status: "failed".parse().unwrap(),
                updated_at_ms: 5,
            })
            .await
            .unwrap();
    }

    fn body(e: &WebhookEvent) -> Value {
        serde_json::from_str(&e.payload).expect("the payload is JSON")
    }

    fn types(events: &[WebhookEvent]) -> Vec<&str> {
        events.iter().map(|e| e.event_type.as_str()).collect()
    }

    async fn a_committed_capture_enqueues_payment_succeeded_once(store: Arc<dyn SettlementStore>) {
        store.migrate().await.unwrap();
        store.upsert_account(&account_row("acc")).await.unwrap();
        let pending = with_notify_url(
            payment_row("pay_1", "o1", "pending", 1_000),
            "https://m.example/hook",
        );
        store.record_intent(&pending, None).await.unwrap();
        // Recording the intent announces nothing.
        assert!(store.webhook_events("pay_1").await.unwrap().is_empty());
        let mut settled = capture("pay_1", "acc", 1_000, 1);
        let mut done = pending.clone();
        done.status = "succeeded".parse().unwrap();
        done.held_minor = 0;
        done.hold_expires_at_ms = None;
        settled.payment = Some(done.clone());
        assert_eq!(
            store.commit(&[settled.clone()]).await.unwrap(),
            vec![CommitOutcome::Inserted]
        );
        let events = store.webhook_events("pay_1").await.unwrap();
        assert_eq!(types(&events), vec!["payment.succeeded"]);
        let e = &events[0];
        assert!(e.id.starts_with("evt_") && e.id.len() == 30, "{}", e.id);
        assert_eq!(
            (
                e.merchant_id.as_str(),
                e.payment_id.as_str(),
                e.sequence,
                e.url.as_deref()
            ),
            ("alpha", "pay_1", 0, Some("https://m.example/hook"))
        );
        assert_eq!((e.status, e.attempts), (WebhookStatus::Pending, 0));
        assert_eq!((e.last_status, e.last_error.as_deref()), (None, None));
        // Dated by the movement (the capture's `settled_at_ms`), due at once.
        assert_eq!((e.created_at_ms, e.next_attempt_at_ms), (10, Some(10)));
        let b = body(e);
        assert_eq!(b["id"], e.id.as_str());
        assert_eq!(b["type"], "payment.succeeded");
        assert_eq!(b["data"]["payment"]["id"], "pay_1");
        assert_eq!(b["data"]["payment"]["status"], "succeeded");
        assert_eq!(b["data"]["payment"]["amount"], "10.00");
        assert_eq!(b["data"]["payment"]["merchant_order_id"], "o1");
        assert_eq!(b["data"]["settlement"]["kind"], "capture");
        assert_eq!(b["data"]["settlement"]["amount"], "10.00");
        // A re-driven identical commit (recovery after a crash) enqueues nothing more.
        let mut again = settled.clone();
        again.settled_at_ms += 1_000;
        assert_eq!(
            store.commit(&[again]).await.unwrap(),
            vec![CommitOutcome::AlreadyCommitted]
        );
        assert_eq!(store.webhook_events("pay_1").await.unwrap(), events);
        // A balance payment (its row inserted with its settlement), without a notify URL: the
        // merchant's configured URL will be used.
        let mut balance = capture("pay_2", "acc", 300, 2);
        balance.payment = Some(payment_row("pay_2", "o2", "succeeded", 0));
        store.commit(&[balance]).await.unwrap();
        let events = store.webhook_events("pay_2").await.unwrap();
        assert_eq!(types(&events), vec!["payment.succeeded"]);
        assert_eq!(events[0].url, None);
        assert_eq!(body(&events[0])["data"]["settlement"]["amount"], "3.00");
        // An adjustment (admin money) and a capture without a succeeded payment announce
        // nothing; a conflicting settlement neither.
        store
            .commit(&[credit("adj_1", "acc", 5_000, 3)])
            .await
            .unwrap();
        assert!(store.webhook_events("adj_1").await.unwrap().is_empty());
        let mut odd = capture("pay_3", "acc", 100, 4);
        odd.payment = Some(payment_row("pay_3", "o3", "pending", 0));
        store.commit(&[odd]).await.unwrap();
        assert!(store.webhook_events("pay_3").await.unwrap().is_empty());
        let mut conflicting = capture("pay_1", "acc", 999, 9);
        conflicting.payment = Some(done);
        assert!(matches!(
            store.commit(&[conflicting]).await.unwrap()[0],
            CommitOutcome::Conflict { .. }
        ));
        assert_eq!(store.webhook_events("pay_1").await.unwrap().len(), 1);
        assert_eq!(store.webhook_backlog().await.unwrap(), 2);
    }

    async fn a_final_status_enqueues_its_event_once(store: Arc<dyn SettlementStore>) {
        store.migrate().await.unwrap();
        for (id, url) in [("pay_1", Some("http://127.0.0.1:9/h")), ("pay_2", None)] {
            let mut p = channel_payment(id, Some(100));
            if let Some(url) = url {
                p = with_notify_url(p, url);
            }
            store.record_intent(&p, None).await.unwrap();
        }
        let change = |id: &str, status: &str| StatusChange {
            payment_id: id.into(),
            status: status.parse().unwrap(),
            updated_at_ms: 50,
        };
        assert!(store
            .set_final_status(&change("pay_1", "canceled"))
            .await
            .unwrap());
        let events = store.webhook_events("pay_1").await.unwrap();
        assert_eq!(types(&events), vec!["payment.canceled"]);
        assert_eq!(events[0].url.as_deref(), Some("http://127.0.0.1:9/h"));
        assert_eq!(events[0].sequence, 0);
        let b = body(&events[0]);
        assert_eq!(b["type"], "payment.canceled");
        assert_eq!(b["data"]["payment"]["status"], "canceled");
        assert_eq!(b["data"]["payment"]["account_id"], Value::Null);
        assert!(b["data"].get("settlement").is_none());
        // No longer pending: nothing changes, nothing is enqueued.
        for status in ["canceled", "expired"] {
            assert!(!store
                .set_final_status(&change("pay_1", status))
                .await
                .unwrap());
        }
        assert_eq!(store.webhook_events("pay_1").await.unwrap(), events);
        assert!(store
            .set_final_status(&change("pay_2", "expired"))
            .await
            .unwrap());
        assert_eq!(
            types(&store.webhook_events("pay_2").await.unwrap()),
            vec!["payment.expired"]
        );
        assert!(!store
            .set_final_status(&change("pay_x", "failed"))
            .await
            .unwrap());
        assert!(store.webhook_events("pay_x").await.unwrap().is_empty());
        assert_eq!(store.webhook_backlog().await.unwrap(), 2);
    }

    async fn refunds_and_late_money_name_the_stored_payment(store: Arc<dyn SettlementStore>) {
        store.migrate().await.unwrap();
        store.upsert_account(&account_row("acc")).await.unwrap();
        // Late money for a canceled channel payment: a suspense settlement without a row.
        let p = with_notify_url(channel_payment("pay_1", None), "https://m.example/h");
        store.record_intent(&p, None).await.unwrap();
        store
            .set_final_status(&StatusChange {
                payment_id: "pay_1".into(),
                status: "canceled".parse().unwrap(),
                updated_at_ms: 5,
            })
            .await
            .unwrap();
        let mut late = capture("pay_1", "acc", 1_000, 0);
        late.kind = SettlementKind::Suspense;
        late.sequence = 2;
        late.account_id = None;
        late.account_seq = None;
        late.channel_id = Some("alipay-main".into());
        late.channel_txn_id = Some("T-2".into());
        late.postings = vec![
            Posting {
                ledger: ledger::channel_clearing("alipay-main"),
                amount_minor: -1_000,
            },
            Posting {
                ledger: ledger::suspense("alpha"),
                amount_minor: 1_000,
            },
        ];
        for _ in 0..2 {
            store.commit(&[late.clone()]).await.unwrap();
        }
        let events = store.webhook_events("pay_1").await.unwrap();
        let late_money: Vec<&WebhookEvent> = events
            .iter()
            .filter(|e| e.event_type == "payment.late_money")
            .collect();
        assert_eq!(late_money.len(), 1, "{events:?}");
        assert_eq!(late_money[0].sequence, 2);
        assert_eq!(late_money[0].url.as_deref(), Some("https://m.example/h"));
        let b = body(late_money[0]);
        assert_eq!(b["data"]["payment"]["status"], "canceled");
        assert_eq!(b["data"]["payment"]["merchant_order_id"], "order-pay_1");
        assert_eq!(b["data"]["settlement"]["kind"], "suspense");
        assert_eq!(b["data"]["settlement"]["channel_txn_id"], "T-2");
        // Two refunds of a balance payment: one event each, by refund number.
        let mut paid = capture("pay_2", "acc", 1_000, 1);
        paid.payment = Some(payment_row("pay_2", "o2", "succeeded", 0));
        store.commit(&[paid]).await.unwrap();
        for number in [1u32, 2] {
            let mut refund = capture("pay_2", "acc", 200, 1 + u64::from(number));
            refund.kind = SettlementKind::Refund;
            refund.sequence = number;
            refund.postings.reverse();
            for p in &mut refund.postings {
                p.amount_minor = -p.amount_minor;
            }
            store.commit(&[refund.clone(), refund]).await.unwrap();
        }
        let events = store.webhook_events("pay_2").await.unwrap();
        let mut refunds: Vec<(u32, String)> = events
            .iter()
            .filter(|e| e.event_type == "refund.succeeded")
            .map(|e| {
                (
                    e.sequence,
                    body(e)["data"]["settlement"]["amount"].to_string(),
                )
            })
            .collect();
        refunds.sort();
        assert_eq!(
            refunds,
            vec![(1, "\"2.00\"".to_owned()), (2, "\"2.00\"".to_owned())]
        );
    }

    /// Many delivery outcomes in one batch (PostgreSQL: one statement for the first outcome of
    /// each event): each applies, or not, exactly as it would alone and in the order given.
    async fn a_batchs_delivery_outcomes_apply_each_as_alone(store: Arc<dyn SettlementStore>) {
        store.migrate().await.unwrap();
        let mut ids = Vec::new();
        for id in ["pay_a", "pay_b", "pay_c"] {
            failed_with_event(store.as_ref(), id).await;
            ids.push(store.webhook_events(id).await.unwrap().remove(0).id);
        }
        let now = now_ms();
        // pay_c's event is delivered already: nothing moves it.
        assert!(store
            .record_webhook_attempt(&ids[2], WebhookOutcome::Delivered, Some(200), None, now)
            .await
            .unwrap());
        let attempt =
            |id: &str, outcome: WebhookOutcome, status: Option<u16>, error: Option<&str>| {
                Write::Webhook(WebhookAttempt {
                    id: id.to_owned(),
                    outcome,
                    http_status: status,
                    error: error.map(str::to_owned),
                    now_ms: now + 1,
                })
            };
        let batch = vec![
            // Put off, then delivered: both apply, in this order.
            attempt(&ids[0], WebhookOutcome::Deferred(now + 9_000), None, None),
            attempt(
                &ids[1],
                WebhookOutcome::RetryAt(now + 500),
                Some(502),
                Some("bad gateway"),
            ),
            attempt(&ids[0], WebhookOutcome::Delivered, Some(204), None),
            attempt(&ids[2], WebhookOutcome::Failed, Some(500), Some("late")),
            attempt("evt_none", WebhookOutcome::Delivered, Some(200), None),
        ];
        assert_eq!(
            all_written(store.as_ref(), &batch).await,
            [true, true, true, false, false].map(Written::Webhook)
        );
        let stored = |payment: &'static str| {
            let store = store.clone();
            async move { store.webhook_events(payment).await.unwrap().remove(0) }
        };
        let a = stored("pay_a").await;
        assert_eq!(
            (a.status, a.attempts, a.last_status),
            (WebhookStatus::Delivered, 1, Some(204))
        );
        let b = stored("pay_b").await;
        assert_eq!(
            (
                b.status,
                b.attempts,
                b.next_attempt_at_ms,
                b.last_status,
                b.last_error.as_deref()
            ),
            (
                WebhookStatus::Pending,
                1,
                Some(now + 500),
                Some(502),
                Some("bad gateway")
            )
        );
        let c = stored("pay_c").await;
        assert_eq!(
            (c.status, c.attempts, c.last_status, c.last_error),
            (WebhookStatus::Delivered, 1, Some(200), None)
        );
    }

    async fn claimed_webhooks_are_leased_and_attempts_recorded(store: Arc<dyn SettlementStore>) {
        store.migrate().await.unwrap();
        for id in ["pay_a", "pay_b", "pay_c"] {
            failed_with_event(store.as_ref(), id).await;
        }
        assert_eq!(store.webhook_backlog().await.unwrap(), 3);
        let now = now_ms() + 1_000;
        // Nothing is due before it was enqueued.
        assert!(store
            .claim_webhooks(now - 60_000, now + 1, 10)
            .await
            .unwrap()
            .is_empty());
        assert!(store
            .claim_webhooks(now, now + 1, 0)
            .await
            .unwrap()
            .is_empty());
        // Two, then the third; leased: the same tick (or another instance) gets no more.
        let first = store.claim_webhooks(now, now + 60_000, 2).await.unwrap();
        assert_eq!(first.len(), 2);
        assert!(first
            .iter()
            .all(|e| e.next_attempt_at_ms == Some(now + 60_000)
                && e.status == WebhookStatus::Pending));
        let second = store.claim_webhooks(now, now + 60_000, 10).await.unwrap();
        assert_eq!(second.len(), 1);
        assert!(store
            .claim_webhooks(now, now + 60_000, 10)
            .await
            .unwrap()
            .is_empty());
        let mut all: Vec<String> = first
            .iter()
            .chain(&second)
            .map(|e| e.payment_id.clone())
            .collect();
        all.sort();
        assert_eq!(all, vec!["pay_a", "pay_b", "pay_c"]);
        let (a, b, c) = (&first[0], &first[1], &second[0]);
        let stored = |e: &WebhookEvent| {
            let store = store.clone();
            let payment_id = e.payment_id.clone();
            async move { store.webhook_events(&payment_id).await.unwrap().remove(0) }
        };
        // A failed attempt: retried later, counted, with what the receiver said.
        assert!(store
            .record_webhook_attempt(
                &a.id,
                WebhookOutcome::RetryAt(now + 500),
                Some(500),
                Some(&"x".repeat(2_000)),
                now + 10
            )
            .await
            .unwrap());
        let row = stored(a).await;
        assert_eq!(
            (
                row.status,
                row.attempts,
                row.next_attempt_at_ms,
                row.last_status
            ),
            (WebhookStatus::Pending, 1, Some(now + 500), Some(500))
        );
        assert_eq!(row.last_error.as_deref().map(str::len), Some(500));
        assert_eq!(row.updated_at_ms, now + 10);
        assert!(store
            .claim_webhooks(now + 499, now + 9_000, 10)
            .await
            .unwrap()
            .is_empty());
        let again = store
            .claim_webhooks(now + 500, now + 9_000, 10)
            .await
            .unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(
            (again[0].id.as_str(), again[0].attempts),
            (a.id.as_str(), 1)
        );
        // Delivered: final, never claimed or changed again; the last error stays for history.
        assert!(store
            .record_webhook_attempt(&a.id, WebhookOutcome::Delivered, Some(204), None, now + 20)
            .await
            .unwrap());
        let row = stored(a).await;
        assert_eq!(
            (
                row.status,
                row.attempts,
                row.next_attempt_at_ms,
                row.last_status
            ),
            (WebhookStatus::Delivered, 2, None, Some(204))
        );
        for outcome in [
            WebhookOutcome::Failed,
            WebhookOutcome::RetryAt(1),
            WebhookOutcome::Deferred(1),
        ] {
            assert!(!store
                .record_webhook_attempt(&a.id, outcome, Some(500), Some("late"), now + 30)
                .await
                .unwrap());
        }
        assert_eq!(stored(a).await, row);
        // Deferred: due again, no attempt counted. Then failed at the horizon.
        assert!(store
            .record_webhook_attempt(&b.id, WebhookOutcome::Deferred(now + 100), None, None, now)
            .await
            .unwrap());
        let row = stored(b).await;
        assert_eq!(
            (row.status, row.attempts, row.next_attempt_at_ms),
            (WebhookStatus::Pending, 0, Some(now + 100))
        );
        assert!(store
            .record_webhook_attempt(&b.id, WebhookOutcome::Failed, None, Some("timeout"), now)
            .await
            .unwrap());
        let row = stored(b).await;
        assert_eq!(
            (
                row.status,
                row.attempts,
                row.next_attempt_at_ms,
                row.last_error.as_deref()
            ),
            (WebhookStatus::Failed, 1, None, Some("timeout"))
        );
        // Skipped: nowhere to send it; no attempt.
        assert!(store
            .record_webhook_attempt(&c.id, WebhookOutcome::Skipped, None, None, now)
            .await
            .unwrap());
        let row = stored(c).await;
        assert_eq!((row.status, row.attempts), (WebhookStatus::Skipped, 0));
        assert!(!store
            .record_webhook_attempt("evt_unknown", WebhookOutcome::Delivered, None, None, now)
            .await
            .unwrap());
        assert_eq!(store.webhook_backlog().await.unwrap(), 0);
        assert!(store
            .claim_webhooks(u64::MAX / 2, u64::MAX / 2, 10)
            .await
            .unwrap()
            .is_empty());
    }

    /// Two gateway instances (two stores on one database) claim concurrently: each event is
    /// handed out exactly once.
    async fn webhook_claims_never_overlap(one: &dyn SettlementStore, two: &dyn SettlementStore) {
        const EVENTS: usize = 40;
        for i in 0..EVENTS {
            let id = format!("pay_{i:03}");
            one.record_intent(&channel_payment(&id, None), None)
                .await
                .unwrap();
            assert!(one
                .set_final_status(&StatusChange {
                    payment_id: id,
                    status: "expired".parse().unwrap(),
                    updated_at_ms: 5,
                })
                .await
                .unwrap());
        }
        let now = now_ms() + 1_000;
        let mut seen = std::collections::BTreeMap::new();
        for round in 0..EVENTS {
            let (l, r) = tokio::join!(
                one.claim_webhooks(now, now + 60_000, 3),
                two.claim_webhooks(now, now + 60_000, 4)
            );
            let (l, r) = (l.unwrap(), r.unwrap());
            if l.is_empty() && r.is_empty() {
                break;
            }
            for (who, e) in l
                .iter()
                .map(|e| ("one", e))
                .chain(r.iter().map(|e| ("two", e)))
            {
                if let Some(earlier) = seen.insert(e.id.clone(), (who, round)) {
                    panic!("{} claimed twice: {earlier:?}, then ({who}, {round})", e.id);
                }
            }
        }
        assert_eq!(seen.len(), EVENTS, "every due event was claimed");
    }

    /// A store told which merchants have no webhook URL: their events without the payment's
    /// `notify_url` are not written (nor the payment's status history), and read back as
    /// `skipped` (never due, never claimed, not in the backlog), derived from the payment and
    /// its transfers with the ids and dates the commit would have given them; every other
    /// event is stored and waits for the worker as before.
    async fn events_with_nowhere_to_go_are_derived_not_stored(store: &dyn SettlementStore) {
        store.migrate().await.unwrap();
        store.upsert_account(&account_row("acc")).await.unwrap();
        // alpha has no webhook URL; a payment of alpha's without notify_url…
        let mut silent = capture("pay_1", "acc", 300, 1);
        silent.payment = Some(payment_row("pay_1", "o1", "succeeded", 0));
        // …and one with a notify_url: that one still goes out.
        let mut named = capture("pay_2", "acc", 400, 2);
        named.payment = Some(with_notify_url(
            payment_row("pay_2", "o2", "succeeded", 0),
            "https://m.example/hook",
        ));
        assert_eq!(
            store
                .commit_writes(&[Write::Settlement(silent), Write::Settlement(named)])
                .await
                .unwrap()
                .into_iter()
                .map(Result::unwrap)
                .collect::<Vec<_>>(),
            vec![
                Written::Settlement(CommitOutcome::Inserted),
                Written::Settlement(CommitOutcome::Inserted)
            ]
        );
        // A final status of alpha's without notify_url: skipped too.
        store
            .record_intent(&channel_payment("pay_3", None), None)
            .await
            .unwrap();
        store
            .set_final_status(&StatusChange {
                payment_id: "pay_3".into(),
                status: "failed".parse().unwrap(),
                updated_at_ms: 5,
            })
            .await
            .unwrap();
        let state = |e: &WebhookEvent| (e.event_type.clone(), e.status, e.next_attempt_at_ms);
        let one = store.webhook_events("pay_1").await.unwrap();
        assert_eq!(
            one.iter().map(state).collect::<Vec<_>>(),
            vec![("payment.succeeded".to_owned(), WebhookStatus::Skipped, None)]
        );
        assert_eq!(one[0].attempts, 0);
        assert_eq!(
            one[0].id,
            gateway::webhooks::events::event_id("pay_1", "payment.succeeded", 0)
        );
        assert_eq!(store.payment_events("pay_1").await.unwrap(), Vec::new());
        let three = store.webhook_events("pay_3").await.unwrap();
        assert_eq!(
            three.iter().map(state).collect::<Vec<_>>(),
            vec![("payment.failed".to_owned(), WebhookStatus::Skipped, None)]
        );
        let two = store.webhook_events("pay_2").await.unwrap();
        assert_eq!(two.len(), 1);
        assert_eq!(two[0].status, WebhookStatus::Pending);
        assert!(two[0].next_attempt_at_ms.is_some());
        // Only the one with somewhere to go is due.
        assert_eq!(store.webhook_backlog().await.unwrap(), 1);
        let claimed = store
            .claim_webhooks(now_ms() + 1_000, now_ms() + 60_000, 10)
            .await
            .unwrap();
        assert_eq!(
            claimed
                .iter()
                .map(|e| e.payment_id.as_str())
                .collect::<Vec<_>>(),
            vec!["pay_2"]
        );
    }

    #[tokio::test]
    async fn sqlite_events_with_nowhere_to_go_are_derived_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("gateway.sqlite3"))
            .unwrap()
            .with_no_webhook(NoWebhook::new(["alpha".to_owned()]));
        events_with_nowhere_to_go_are_derived_not_stored(&store).await;
    }

    #[tokio::test]
    async fn postgres_events_with_nowhere_to_go_are_derived_not_stored() {
        let server = crate::postgres_server::PostgresServer::start().await;
        let store = gateway::settlement::postgres::PostgresStore::connect(&server.url(), 4, 2_000)
            .await
            .expect("connect to the test PostgreSQL")
            .with_no_webhook(NoWebhook::new(["alpha".to_owned()]));
        events_with_nowhere_to_go_are_derived_not_stored(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_concurrent_webhook_claims_never_share_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.sqlite3");
        let one = SqliteStore::open(&path).unwrap();
        let two = SqliteStore::open(&path).unwrap();
        one.migrate().await.unwrap();
        webhook_claims_never_overlap(&one, &two).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_concurrent_webhook_claims_never_share_an_event() {
        let server = crate::postgres_server::PostgresServer::start().await;
        let url = server.url();
        let connect = || gateway::settlement::postgres::PostgresStore::connect(&url, 4, 2_000);
        let one = connect().await.expect("connect to the test PostgreSQL");
        let two = connect().await.expect("connect to the test PostgreSQL");
        one.migrate().await.unwrap();
        webhook_claims_never_overlap(&one, &two).await;
    }
}

/// A balance payment of `amount` from alpha's `acc`, created under `key` with `hash`: its
/// capture creates its row (`Settlement::creates_payment`).
fn balance_payment(
    id: &str,
    order: &str,
    key: &str,
    hash: &str,
    seq: u64,
    amount: i64,
) -> Settlement {
    let mut s = capture(id, "acc", amount, seq);
    let mut row = payment_row(id, order, "succeeded", 0);
    row.method = "balance".parse().unwrap();
    row.amount_minor = amount;
    s.payment = Some(row.with_idempotency(key, hash));
    assert!(s.creates_payment());
    s
}

fn holder(id: &str, hash: &str) -> KeyHolder {
    KeyHolder {
        payment_id: id.into(),
        request_hash: hash.into(),
        created_at_ms: 1,
        answer: None,
    }
}

/// What the store holds of the account: (balance, sequence, payment ids with a movement).
async fn account_state(store: &dyn SettlementStore) -> (i64, u64, Vec<String>) {
    let balance = &store.balances(None).await.unwrap()[0];
    let mut moved: Vec<String> = store
        .postings_sum_by_movement()
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _, _, _)| id)
        .collect();
    moved.dedup();
    (balance.balance_minor, balance.seq, moved)
}

/// New balance payments of one group commit (on PostgreSQL, one statement for all of them)
/// are each decided as if committed alone: a twin of one in the same batch (a re-drive beside
/// the first) is the same movement, and one refused (its key, order id or sequence taken)
/// leaves nothing while the others commit.
async fn new_payments_of_one_batch_are_decided_each_on_its_own(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    store.upsert_account(&account_row("acc")).await.unwrap();
    let results = store
        .commit_writes(&[
            Write::Settlement(balance_payment("pay_1", "o1", "K1", "h1", 1, 100)),
            Write::Settlement(balance_payment("pay_2", "o2", "K2", "h2", 2, 200)),
            Write::Settlement(balance_payment("pay_1", "o1", "K1", "h1", 1, 100)),
            Write::Settlement(balance_payment("pay_3", "o2", "K3", "h3", 3, 300)),
            Write::Settlement(balance_payment("pay_4", "o4", "K4", "h4", 2, 400)),
            Write::Settlement(balance_payment("pay_5", "o5", "K5", "h5", 4, 500)),
        ])
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
    assert_eq!(
        results,
        vec![
            Written::Settlement(CommitOutcome::Inserted),
            Written::Settlement(CommitOutcome::Inserted),
            Written::Settlement(CommitOutcome::AlreadyCommitted),
            Written::Settlement(CommitOutcome::DuplicateOrder {
                payment_id: "pay_2".into()
            }),
            Written::Settlement(CommitOutcome::SequenceConflict { account_seq: 2 }),
            Written::Settlement(CommitOutcome::Inserted),
        ]
    );
    for refused in ["pay_3", "pay_4"] {
        assert_eq!(store.payment(refused).await.unwrap(), None, "{refused}");
    }
    assert_eq!(
        account_state(store.as_ref()).await,
        (
            -800,
            4,
            vec!["pay_1".to_owned(), "pay_2".to_owned(), "pay_5".to_owned()]
        )
    );
}

/// A batch's intents (PostgreSQL: one statement for the new ones) are decided one by one, as
/// each would be alone: new, a retry, a twin, a taken order id, a key another payment or a
/// refusal holds.
async fn intents_of_one_batch_are_decided_each_on_its_own(store: Arc<dyn SettlementStore>) {
    use gateway::settlement::RefusalRow;
    store.migrate().await.unwrap();
    let refused = RefusalRow {
        scope_tag: "TAG0000000".into(),
        idempotency_key: "K9".into(),
        request_hash: "h9".into(),
        outcome: "E:insufficient_funds:100:50".into(),
        created_at_ms: 1,
    };
    store
        .commit_writes(&[Write::Refusal(refused)])
        .await
        .unwrap();
    let intent = |id: &str, order: &str, key: &str, hash: &str, attempt: bool| {
        let mut p = channel_payment(id, Some(60_000)).with_idempotency(key, hash);
        p.merchant_order_id = order.into();
        Write::Intent {
            payment: p,
            first_attempt: attempt.then(|| attempt_row(id, 1)),
        }
    };
    let results = store
        .commit_writes(&[
            intent("pay_1", "o1", "K1", "h1", true),
            intent("pay_2", "o2", "K2", "h2", true),
            intent("pay_1", "o1", "K1", "h1", true),
            intent("pay_3", "o2", "K3", "h3", true),
            intent("pay_4", "o4", "K1", "h1", true),
            intent("pay_5", "o5", "K9", "h9", true),
            intent("pay_6", "o6", "K6", "h6", false),
        ])
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
    assert_eq!(results[0], Written::Intent(IntentOutcome::Inserted));
    assert_eq!(results[1], Written::Intent(IntentOutcome::Inserted));
    assert_eq!(results[2], Written::Intent(IntentOutcome::AlreadyRecorded));
    assert_eq!(
        results[3],
        Written::Intent(IntentOutcome::DuplicateOrder("pay_2".into()))
    );
    assert!(
        matches!(&results[4], Written::Intent(IntentOutcome::Replay(h)) if h.payment_id == "pay_1"),
        "{:?}",
        results[4]
    );
    assert!(
        matches!(&results[5], Written::Intent(IntentOutcome::Replay(_))),
        "{:?}",
        results[5]
    );
    assert_eq!(results[6], Written::Intent(IntentOutcome::Inserted));
    for (id, kept) in [
        ("pay_1", true),
        ("pay_2", true),
        ("pay_3", false),
        ("pay_4", false),
        ("pay_5", false),
        ("pay_6", true),
    ] {
        assert_eq!(store.payment(id).await.unwrap().is_some(), kept, "{id}");
    }
    for (id, attempts) in [("pay_1", 1), ("pay_2", 1), ("pay_3", 0), ("pay_6", 0)] {
        assert_eq!(store.attempts(id).await.unwrap().len(), attempts, "{id}");
    }
}

async fn the_store_decides_on_idempotency_keys_and_order_ids(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    store.upsert_account(&account_row("acc")).await.unwrap();
    assert_eq!(
        store
            .commit(&[balance_payment("pay_1", "o1", "K", "h1", 1, 1_000)])
            .await
            .unwrap(),
        vec![CommitOutcome::Inserted]
    );
    let before = account_state(store.as_ref()).await;
    assert_eq!(before, (-1_000, 1, vec!["pay_1".to_owned()]));

    // The balance store forgot the key: the same request made a new payment there. The store
    // refuses it and names the first one; nothing of it is written.
    assert_eq!(
        store
            .commit(&[balance_payment("pay_2", "o1", "K", "h1", 2, 1_000)])
            .await
            .unwrap(),
        vec![CommitOutcome::Replay(holder("pay_1", "h1"))]
    );
    // Another request under the key: a conflict, naming the first one.
    assert_eq!(
        store
            .commit(&[balance_payment("pay_3", "o3", "K", "h2", 2, 500)])
            .await
            .unwrap(),
        vec![CommitOutcome::IdempotencyConflict(holder("pay_1", "h1"))]
    );
    // A new key for a live order id: a duplicate order.
    assert_eq!(
        store
            .commit(&[balance_payment("pay_4", "o1", "K4", "h4", 2, 1_000)])
            .await
            .unwrap(),
        vec![CommitOutcome::DuplicateOrder {
            payment_id: "pay_1".into()
        }]
    );
    // An account sequence taken (the balance store rolled back): nothing of it either.
    assert_eq!(
        store
            .commit(&[balance_payment("pay_5", "o5", "K5", "h5", 1, 100)])
            .await
            .unwrap(),
        vec![CommitOutcome::SequenceConflict { account_seq: 1 }]
    );
    for refused in ["pay_2", "pay_3", "pay_4", "pay_5"] {
        assert_eq!(store.payment(refused).await.unwrap(), None, "{refused}");
        assert!(store.payment_events(refused).await.unwrap().is_empty());
    }
    assert_eq!(account_state(store.as_ref()).await, before);

    // Sequence 2 is still free; in one batch, the second payment under a key replays the
    // first; a re-drive of pay_1 is recognized.
    assert_eq!(
        store
            .commit(&[
                balance_payment("pay_6", "o6", "K6", "h6", 2, 200),
                balance_payment("pay_7", "o7", "K6", "h6", 3, 200),
                balance_payment("pay_1", "o1", "K", "h1", 1, 1_000),
            ])
            .await
            .unwrap(),
        vec![
            CommitOutcome::Inserted,
            CommitOutcome::Replay(holder("pay_6", "h6")),
            CommitOutcome::AlreadyCommitted,
        ]
    );
    assert_eq!(
        account_state(store.as_ref()).await,
        (-1_200, 2, vec!["pay_1".to_owned(), "pay_6".to_owned()])
    );

    // Intents meet the same checks, key first.
    let intent = |id: &str, order: &str, key: &str, hash: &str| {
        payment_row(id, order, "pending", 0).with_idempotency(key, hash)
    };
    assert_eq!(
        store
            .record_intent(&intent("pay_8", "o8", "K", "h1"), None)
            .await
            .unwrap(),
        IntentOutcome::Replay(holder("pay_1", "h1"))
    );
    assert_eq!(
        store
            .record_intent(&intent("pay_8", "o1", "K", "h9"), None)
            .await
            .unwrap(),
        IntentOutcome::IdempotencyConflict(holder("pay_1", "h1"))
    );
    assert_eq!(
        store
            .record_intent(&intent("pay_8", "o6", "K8", "h8"), None)
            .await
            .unwrap(),
        IntentOutcome::DuplicateOrder("pay_6".into())
    );
    assert_eq!(store.payment("pay_8").await.unwrap(), None);
    // A key is scoped: another scope may use it.
    let mut elsewhere = intent("pay_9", "o1", "K", "h1");
    elsewhere.scope_tag = "TAG0000001".into();
    assert_eq!(
        store.record_intent(&elsewhere, None).await.unwrap(),
        IntentOutcome::Inserted
    );
    // A payment that ended frees its order id, never its key.
    let mut failed = intent("pay_10", "o10", "K10", "h10");
    failed.status = "failed".parse().unwrap();
    store.record_intent(&failed, None).await.unwrap();
    assert_eq!(
        store
            .record_intent(&intent("pay_11", "o10", "K11", "h11"), None)
            .await
            .unwrap(),
        IntentOutcome::Inserted
    );
    assert_eq!(
        store
            .record_intent(&intent("pay_12", "o12", "K10", "h10"), None)
            .await
            .unwrap(),
        IntentOutcome::Replay(holder("pay_10", "h10"))
    );
    // Until a failed payment given up before any channel call lets go of its key; a live
    // one never does.
    assert!(!store.release_idempotency_key("pay_1").await.unwrap());
    assert!(store.release_idempotency_key("pay_10").await.unwrap());
    assert_eq!(
        store
            .record_intent(&intent("pay_12", "o12", "K10", "h10"), None)
            .await
            .unwrap(),
        IntentOutcome::Inserted
    );
    // The live payment of an order id, as the store knows it.
    let live = |order: &'static str| {
        let store = store.clone();
        async move {
            store
                .live_payment_by_order("TAG0000000", order)
                .await
                .unwrap()
                .map(|p| p.id)
        }
    };
    assert_eq!(live("o1").await.as_deref(), Some("pay_1"));
    assert_eq!(live("o10").await.as_deref(), Some("pay_11"));
    assert_eq!(live("o2").await, None);
}

async fn keyed_payments_come_back_page_by_page(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    let mut rows = Vec::new();
    for (i, created) in [(1, 10), (2, 10), (3, 20), (4, 30)] {
        let mut p = payment_row(&format!("pay_{i}"), &format!("o{i}"), "pending", 0)
            .with_idempotency(&format!("K{i}"), &format!("h{i}"));
        p.created_at_ms = created;
        if i == 4 {
            p.scope_tag = "TAG0000001".into();
        }
        rows.push(p);
    }
    // One without a key (written before keys were kept) is never listed.
    rows.push(payment_row("pay_5", "o5", "pending", 0));
    for row in &rows {
        assert_eq!(
            store.record_intent(row, None).await.unwrap(),
            IntentOutcome::Inserted
        );
    }
    let ids = |page: Vec<gateway::settlement::StoredKey>| {
        page.into_iter()
            .map(|k| {
                (
                    k.payment_id,
                    k.idempotency_key,
                    k.request_hash,
                    k.created_at_ms,
                )
            })
            .collect::<Vec<_>>()
    };
    let key = |i: u32, created: u64| {
        (
            format!("pay_{i}"),
            format!("K{i}"),
            format!("h{i}"),
            created,
        )
    };
    assert_eq!(
        ids(store.keyed_payments(0, None, None, 2).await.unwrap()),
        vec![key(1, 10), key(2, 10)]
    );
    assert_eq!(
        ids(store
            .keyed_payments(0, None, Some((10, "pay_2")), 2)
            .await
            .unwrap()),
        vec![key(3, 20), key(4, 30)]
    );
    assert_eq!(
        ids(store
            .keyed_payments(0, None, Some((30, "pay_4")), 2)
            .await
            .unwrap()),
        vec![]
    );
    assert_eq!(
        ids(store.keyed_payments(20, None, None, 10).await.unwrap()),
        vec![key(3, 20), key(4, 30)]
    );
    assert_eq!(
        ids(store
            .keyed_payments(0, Some("TAG0000001"), None, 10)
            .await
            .unwrap()),
        vec![key(4, 30)]
    );
}

/// Many movements of existing payments in one batch (PostgreSQL: one statement for the first
/// of each movement key): each is inserted, recognized or refused exactly as it would be alone
/// and in the order given.
async fn a_batchs_movements_are_decided_each_as_alone(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    store.upsert_account(&account_row("acc")).await.unwrap();
    store.upsert_account(&account_row("acc2")).await.unwrap();
    // pay_a's key (its capture, sequence 0) with other contents.
    let other = capture("pay_a", "acc", 300, 9);
    let batch = vec![
        Write::Settlement(capture("pay_a", "acc", 200, 1)),
        Write::Settlement(capture("pay_b", "acc", 100, 2)),
        // The same movement again (a re-drive beside the first): recognized.
        Write::Settlement(capture("pay_a", "acc", 200, 1)),
        // Another movement under pay_a's key: a conflict.
        Write::Settlement(other),
        // acc's sequence 2 again, by another payment: the balance store rolled back.
        Write::Settlement(capture("pay_c", "acc", 50, 2)),
        Write::Settlement(capture("pay_d", "acc2", 70, 1)),
    ];
    let first_hash = capture("pay_a", "acc", 200, 1).content_hash();
    assert_eq!(
        all_written(store.as_ref(), &batch).await,
        vec![
            Written::Settlement(CommitOutcome::Inserted),
            Written::Settlement(CommitOutcome::Inserted),
            Written::Settlement(CommitOutcome::AlreadyCommitted),
            Written::Settlement(CommitOutcome::Conflict {
                stored_hash: first_hash
            }),
            Written::Settlement(CommitOutcome::SequenceConflict { account_seq: 2 }),
            Written::Settlement(CommitOutcome::Inserted),
        ]
    );
    assert_eq!(
        balance_and_seq(store.as_ref(), "acc").await,
        vec![(-300, 2)]
    );
    assert_eq!(
        balance_and_seq(store.as_ref(), "acc2").await,
        vec![(-70, 1)]
    );
}

/// Many attempt outcomes in one batch (PostgreSQL: one statement for the first outcome of each
/// attempt): each applies, or not, exactly as it would alone and in the order given.
async fn a_batchs_attempt_outcomes_apply_each_as_alone(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    for p in ["pay_1", "pay_2", "pay_3", "pay_4"] {
        store
            .record_intent(&channel_payment(p, Some(60_000)), Some(&attempt_row(p, 1)))
            .await
            .unwrap();
    }
    // pay_4's attempt already succeeded: nothing moves it.
    assert!(store
        .update_attempt(
            "pay_4",
            1,
            AttemptOutcome::Succeeded,
            None,
            None,
            Some("t4"),
            5
        )
        .await
        .unwrap());
    let mut accepted = outcome_update("pay_1", 1, "accepted", None);
    accepted.latency_ms = Some(80);
    accepted.action = Some(r#"{"type":"qr_code"}"#.into());
    let batch = vec![
        // Accepted, then its success: both apply, in this order.
        Write::Attempt(accepted),
        Write::Attempt(outcome_update("pay_2", 1, "failed", None)),
        Write::Attempt(outcome_update("pay_1", 1, "succeeded", Some("t1"))),
        Write::Attempt(outcome_update("pay_4", 1, "failed", None)),
        // No such attempt.
        Write::Attempt(outcome_update("pay_3", 2, "failed", None)),
        Write::Attempt(outcome_update("pay_3", 1, "unknown", Some("t3"))),
        // Beyond any stored attempt number.
        Write::Attempt(outcome_update("pay_3", u32::MAX, "failed", None)),
    ];
    let results = all_written(store.as_ref(), &batch).await;
    assert_eq!(
        results,
        [true, true, true, false, false, true, false].map(Written::Attempt)
    );
    let first = |p: &'static str| {
        let store = store.clone();
        async move { store.attempts(p).await.unwrap().remove(0) }
    };
    let one = first("pay_1").await;
    assert_eq!(
        (
            one.outcome.as_str(),
            one.latency_ms,
            one.action.as_deref(),
            one.channel_txn_id.as_deref(),
        ),
        (
            "succeeded",
            Some(80),
            Some(r#"{"type":"qr_code"}"#),
            Some("t1")
        )
    );
    assert_eq!(first("pay_2").await.outcome.as_str(), "failed");
    let three = first("pay_3").await;
    assert_eq!(
        (three.outcome.as_str(), three.channel_txn_id.as_deref()),
        ("unknown", Some("t3"))
    );
    let four = first("pay_4").await;
    assert_eq!(
        (four.outcome.as_str(), four.channel_txn_id.as_deref()),
        ("succeeded", Some("t4"))
    );
}

/// `payment_by_key`: the payment under exactly (scope, key), with its request hash and status;
/// nothing for another scope, another key, or a payment written without a key.
async fn a_payment_is_found_by_its_scope_and_key(store: Arc<dyn SettlementStore>) {
    store.migrate().await.unwrap();
    let mut other_scope = payment_row("pay_2", "o2", "pending", 0).with_idempotency("K1", "h2");
    other_scope.scope_tag = "TAG0000001".into();
    for row in [
        payment_row("pay_1", "o1", "succeeded", 0).with_idempotency("K1", "h1"),
        other_scope,
        payment_row("pay_3", "o3", "pending", 0),
    ] {
        assert_eq!(
            store.record_intent(&row, None).await.unwrap(),
            IntentOutcome::Inserted
        );
    }
    let tag = payment_row("pay_x", "ox", "pending", 0).scope_tag;
    let found = store.payment_by_key(&tag, "K1").await.unwrap().unwrap();
    assert_eq!(
        (
            found.payment_id.as_str(),
            found.request_hash.as_str(),
            found.status.as_str()
        ),
        ("pay_1", "h1", "succeeded")
    );
    let found = store
        .payment_by_key("TAG0000001", "K1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.payment_id, "pay_2");
    assert!(store.payment_by_key(&tag, "K2").await.unwrap().is_none());
    assert!(store
        .payment_by_key("TAG0000009", "K1")
        .await
        .unwrap()
        .is_none());
    // A NUL cannot be stored: never found, never an error.
    assert!(store
        .payment_by_key(&tag, "K\u{0}1")
        .await
        .unwrap()
        .is_none());
}

/// Refunds are capped by the store as by Redis, and another refund under a stored id is a
/// conflict: both flagged, nothing written.
async fn the_store_caps_refunds_and_flags_a_conflict(store: Arc<dyn SettlementStore>) {
    use gateway::settlement::{RefundRecorded, RefundRow, RefundStatusChange};
    store.migrate().await.unwrap();
    // A 1_000 payment.
    store
        .record_intent(&channel_payment("pay_c", None), None)
        .await
        .unwrap();
    let refund = |n: u32, amount: i64| RefundRow {
        refund_id: format!("re_c_{n}"),
        payment_id: "pay_c".into(),
        number: n,
        amount_minor: amount,
        currency: gateway::money::Currency::Cny,
        status: "pending".parse().unwrap(),
        channel_id: None,
        channel_order_id: None,
        reason: None,
        created_at_ms: 5,
        updated_at_ms: 5,
        idempotency_key: None,
    };
    assert_eq!(
        store.record_refund(&refund(1, 600)).await.unwrap(),
        RefundRecorded::Inserted
    );
    // The balance store lost its numbering: number 1 again, another amount.
    assert_eq!(
        store.record_refund(&refund(1, 300)).await.unwrap(),
        RefundRecorded::Conflict
    );
    // It lost its totals: 600 + 500 > 1_000.
    assert_eq!(
        store.record_refund(&refund(2, 500)).await.unwrap(),
        RefundRecorded::Exceeds {
            remaining_minor: 400
        }
    );
    assert_eq!(store.refunds("pay_c").await.unwrap(), vec![refund(1, 600)]);
    let flagged = store.flagged(10).await.unwrap();
    let kinds: Vec<&str> = flagged
        .iter()
        .filter(|f| f.payment_id == "pay_c")
        .map(|f| f.kind.as_str())
        .collect();
    assert!(
        kinds.contains(&"refund_conflict") && kinds.contains(&"refund_cap"),
        "{kinds:?}"
    );
    // A failed refund frees what it reserved; exactly what is left fits.
    assert!(store
        .set_refund_status(&RefundStatusChange {
            refund_id: "re_c_1".into(),
            status: "failed".parse().unwrap(),
            updated_at_ms: 6,
        })
        .await
        .unwrap());
    assert_eq!(
        store.record_refund(&refund(2, 1_000)).await.unwrap(),
        RefundRecorded::Inserted
    );
    assert_eq!(
        store.record_refund(&refund(3, 1)).await.unwrap(),
        RefundRecorded::Exceeds { remaining_minor: 0 }
    );
    // A refund of a payment the store does not know is refused.
    let mut unknown = refund(1, 1);
    unknown.refund_id = "re_x_1".into();
    unknown.payment_id = "pay_x".into();
    assert!(matches!(
        store.record_refund(&unknown).await,
        Err(SettleError::Invalid(_))
    ));
}

/// A refusal under a key is kept with the group commit, once per key, and comes back page by
/// page for a rebuild.
async fn refusals_are_kept_once_per_key(store: Arc<dyn SettlementStore>) {
    use gateway::settlement::RefusalRow;
    store.migrate().await.unwrap();
    let refusal = |key: &str, tag: &str, at: u64| RefusalRow {
        scope_tag: tag.into(),
        idempotency_key: key.into(),
        request_hash: format!("h-{key}"),
        outcome: "E:insufficient_funds:100:50".into(),
        created_at_ms: at,
    };
    let written: Vec<Written> = store
        .commit_writes(&[
            Write::Refusal(refusal("K1", "TAG0000000", 10)),
            Write::Refusal(refusal("K2", "TAG0000000", 20)),
            Write::Refusal(refusal("K3", "TAG0000001", 30)),
        ])
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(written, vec![Written::Refusal(true); 3]);
    // A key keeps its first answer.
    let mut other = refusal("K1", "TAG0000000", 40);
    other.outcome = "E:insufficient_funds:1:1".into();
    let again = store.commit_writes(&[Write::Refusal(other)]).await.unwrap();
    assert!(
        matches!(again[..], [Ok(Written::Refusal(false))]),
        "{again:?}"
    );
    let keys = |page: Vec<RefusalRow>| {
        page.into_iter()
            .map(|r| r.idempotency_key)
            .collect::<Vec<_>>()
    };
    let first = store.refusals(0, None, None, 2).await.unwrap();
    assert_eq!(first[0], refusal("K1", "TAG0000000", 10));
    assert_eq!(keys(first), vec!["K1", "K2"]);
    assert_eq!(
        keys(store.refusals(0, None, Some((20, "K2")), 2).await.unwrap()),
        vec!["K3"]
    );
    assert_eq!(
        keys(
            store
                .refusals(15, Some("TAG0000000"), None, 10)
                .await
                .unwrap()
        ),
        vec!["K2"]
    );
}

/// Keys past the retention are purged in bounded batches, by one lease holder at a time.
async fn old_keys_are_purged_under_a_lease(store: Arc<dyn SettlementStore>) {
    use gateway::settlement::RefusalRow;
    store.migrate().await.unwrap();
    for (i, created) in [(1, 100), (2, 200), (3, 900)] {
        let mut p = payment_row(&format!("pay_{i}"), &format!("o{i}"), "pending", 0)
            .with_idempotency(&format!("K{i}"), "h");
        p.created_at_ms = created;
        store.record_intent(&p, None).await.unwrap();
    }
    let refusal = |key: &str, at: u64| {
        Write::Refusal(RefusalRow {
            scope_tag: "TAG0000000".into(),
            idempotency_key: key.into(),
            request_hash: "h".into(),
            outcome: "E:insufficient_funds:1:1".into(),
            created_at_ms: at,
        })
    };
    store
        .commit_writes(&[refusal("R1", 150), refusal("R2", 950)])
        .await
        .unwrap();
    let adjusted = |id: &str, key: &str, at: u64, seq: u64| {
        let mut s = credit(id, "acc", 100, seq);
        s.adjustment = Some(gateway::settlement::AdjustmentKey {
            scope_tag: "TAG0000000".into(),
            idempotency_key: key.into(),
            request_hash: "h".into(),
            doc: "{}".into(),
            created_at_ms: at,
        });
        s
    };
    let committed = store
        .commit(&[
            adjusted("adj_1", "A1", 120, 1),
            adjusted("adj_2", "A2", 990, 2),
        ])
        .await
        .unwrap();
    assert_eq!(committed, vec![CommitOutcome::Inserted; 2]);

    // One payment key, one refusal and one adjustment key per turn, only those older than 500.
    assert_eq!(
        store.purge_keys("a", 1_000, 10_000, 500, 1).await.unwrap(),
        Some(3)
    );
    // Another instance waits while the lease runs; the holder goes on.
    assert_eq!(
        store.purge_keys("b", 2_000, 10_000, 500, 1).await.unwrap(),
        None
    );
    assert_eq!(
        store.purge_keys("a", 3_000, 10_000, 500, 10).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store.purge_keys("a", 4_000, 10_000, 500, 10).await.unwrap(),
        Some(0)
    );
    let key_of = |id: &'static str| {
        let store = store.clone();
        async move { store.payment(id).await.unwrap().unwrap().idempotency_key }
    };
    assert_eq!(key_of("pay_1").await, None);
    assert_eq!(key_of("pay_2").await, None);
    assert_eq!(key_of("pay_3").await.as_deref(), Some("K3"));
    let left: Vec<String> = store
        .refusals(0, None, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.idempotency_key)
        .collect();
    assert_eq!(left, vec!["R2"]);
    let left: Vec<String> = store
        .adjustment_keys(0, None, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.idempotency_key)
        .collect();
    assert_eq!(
        left,
        vec!["A2"],
        "the movements stay, only the old key goes"
    );
    let moved: Vec<String> = store
        .postings_sum_by_movement()
        .await
        .unwrap()
        .into_iter()
        .map(|(id, ..)| id)
        .filter(|id| id.starts_with("adj_"))
        .collect();
    assert_eq!(moved, vec!["adj_1", "adj_2"]);
    // A purged key is free again in the store.
    let mut reused = payment_row("pay_4", "o4", "pending", 0).with_idempotency("K1", "other");
    reused.created_at_ms = 5_000;
    assert_eq!(
        store.record_intent(&reused, None).await.unwrap(),
        IntentOutcome::Inserted
    );
    // Once the lease ran out, another instance takes it.
    assert_eq!(
        store
            .purge_keys("b", 20_000, 10_000, 500, 10)
            .await
            .unwrap(),
        Some(0)
    );
}
