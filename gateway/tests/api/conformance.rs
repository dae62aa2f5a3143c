//! The BalanceStore conformance suite: every scenario runs against the in-process store and
//! against a real Redis, and both must give the same answers.

use serde_json::{json, Value};
use std::sync::Arc;

use gateway::ids::{
    AccountId, AdjustmentId, IdempotencyKey, MerchantId, MerchantOrderId, PaymentId,
};
use gateway::money::Currency;
use gateway::preauth::{
    AcceptedAttempt, AccountKey, AccountRebuild, AdjustOutcome, AdjustRequest, AuthorizeOutcome,
    AuthorizeRequest, BalanceStore, Direction, HoldSpec, IdempotencyClaim, Method, OpContext,
    PaymentDoc, PaymentRecord, PaymentStatus, Purpose, Scope, SettledMark, StoredOutcome,
    SucceedOutcome, SucceedRequest, SuccessEffect, TransitionOutcome, UpsertOutcome,
};

use crate::helpers::{store_for, Backend, RedisServer};

const NOW: u64 = 1_800_000_000_000;

fn ctx(now_ms: u64) -> OpContext {
    OpContext {
        now_ms,
        lazy_release_max: 16,
    }
}

fn key(account: &str) -> AccountKey {
    AccountKey::new(
        MerchantId::parse("alpha").unwrap(),
        AccountId::parse(account).unwrap(),
    )
}

fn claim(k: &str, hash: &str) -> IdempotencyClaim {
    IdempotencyClaim {
        key: IdempotencyKey::parse(k, 255).unwrap(),
        request_hash: hash.into(),
        retention_seconds: 3600,
    }
}

/// An authorize request: `capture_now` for balance, else a hold expiring at `expiry`.
fn authorize(
    account: &AccountKey,
    idem: &str,
    order: &str,
    amount: i64,
    hold: HoldSpec,
) -> AuthorizeRequest {
    let id = PaymentId::generate(account.tag, NOW);
    AuthorizeRequest {
        scope: Scope::Account(account.clone()),
        idempotency: claim(idem, &format!("hash-{idem}")),
        order_id: MerchantOrderId::parse(order, 64).unwrap(),
        doc: PaymentDoc {
            id: id.as_str().into(),
            merchant_id: account.merchant.as_str().into(),
            account_id: Some(account.account.as_str().into()),
            merchant_order_id: order.into(),
            amount_minor: amount,
            currency: Currency::Cny,
            method: if hold.capture_now {
                Method::Balance
            } else {
                Method::Supplier
            },
            purpose: Purpose::Charge,
            created_at_ms: NOW,
            expires_at_ms: hold.expires_at_ms,
            description: None,
            notify_url: None,
            metadata: None,
        },
        hold: Some(hold),
        pending_record: None,
        doc_json: None,
    }
}

fn hold_until(expires_at_ms: u64) -> HoldSpec {
    HoldSpec {
        expires_at_ms,
        capture_now: false,
    }
}

const CAPTURE: HoldSpec = HoldSpec {
    expires_at_ms: NOW + 60_000,
    capture_now: true,
};

fn adjust(account: &AccountKey, idem: &str, direction: Direction, amount: i64) -> AdjustRequest {
    AdjustRequest {
        account: account.clone(),
        idempotency: claim(idem, &format!("adj-{idem}-{amount}")),
        adjustment_id: AdjustmentId::generate(account.tag, NOW),
        direction,
        amount_minor: amount,
        currency: Currency::Cny,
        doc: format!("{{\"amount\":{amount}}}"),
        pending_record: format!("{{\"settlement\":{{\"amount\":{amount}}}}}"),
    }
}

async fn funded(
    store: &Arc<dyn BalanceStore>,
    account: &str,
    balance: i64,
    credit: i64,
) -> AccountKey {
    let k = key(account);
    let created = store
        .upsert_account(&k, Currency::Cny, credit, ctx(NOW))
        .await
        .unwrap();
    assert!(matches!(created, UpsertOutcome::Created(_)), "{created:?}");
    if balance > 0 {
        let applied = store
            .adjust(
                &adjust(&k, &format!("fund-{account}"), Direction::Credit, balance),
                ctx(NOW),
            )
            .await
            .unwrap();
        assert!(matches!(applied, AdjustOutcome::Applied(_)), "{applied:?}");
    }
    k
}

async fn snapshot(store: &Arc<dyn BalanceStore>, k: &AccountKey, now: u64) -> (i64, i64, i64) {
    let s = store
        .read_account(k, ctx(now))
        .await
        .unwrap()
        .expect("account exists");
    (s.balance, s.held, s.available())
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    let store = super::store_for(super::Backend::Memory, None).await;
                    super::$name(store).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let server = super::RedisServer::start().await;
                    let store = super::store_for(super::Backend::Redis, Some(&server)).await;
                    super::$name(store).await;
                }
            )*
        }
    };
}

/// A channel's success with `effect`, and its settlement (a marker JSON) into the outbox.
async fn succeed(
    store: &Arc<dyn BalanceStore>,
    id: &PaymentId,
    effect: SuccessEffect,
    amount: i64,
    now: u64,
) -> SucceedOutcome {
    let request = SucceedRequest {
        payment: id.clone(),
        effect,
        amount_minor: amount,
        pending_record: format!("{{\"settlement\":{{\"of\":\"{id}\"}}}}"),
    };
    store.succeed(&request, ctx(now)).await.unwrap()
}

/// A supplier charge's success (its hold captured), read as a plain transition.
async fn capture(store: &Arc<dyn BalanceStore>, id: &PaymentId, now: u64) -> TransitionOutcome {
    match succeed(store, id, SuccessEffect::Capture, 0, now).await {
        SucceedOutcome::Done { .. } => {
            TransitionOutcome::Done(store.payment(id).await.unwrap().expect("succeeded"))
        }
        SucceedOutcome::NotPending(status) => TransitionOutcome::NotPending(status),
        SucceedOutcome::NotFound => TransitionOutcome::NotFound,
        other => panic!("{other:?}"),
    }
}

/// A payment without hold: a top-up of `account` (`Some`) or a merchant's Alipay charge.
fn holdless(account: Option<&AccountKey>, idem: &str, amount: i64) -> AuthorizeRequest {
    let merchant = MerchantId::parse("alpha").unwrap();
    let scope = match account {
        Some(k) => Scope::Account(k.clone()),
        None => Scope::merchant(merchant),
    };
    let id = PaymentId::generate(scope.tag(), NOW);
    AuthorizeRequest {
        idempotency: claim(idem, &format!("hash-{idem}")),
        order_id: MerchantOrderId::parse(idem, 64).unwrap(),
        doc: PaymentDoc {
            id: id.as_str().into(),
            merchant_id: "alpha".into(),
            account_id: account.map(|k| k.account.as_str().into()),
            merchant_order_id: idem.into(),
            amount_minor: amount,
            currency: Currency::Cny,
            method: Method::Alipay,
            purpose: if account.is_some() {
                Purpose::Topup
            } else {
                Purpose::Charge
            },
            created_at_ms: NOW,
            expires_at_ms: NOW + 60_000,
            description: None,
            notify_url: None,
            metadata: None,
        },
        scope,
        hold: None,
        pending_record: Some("{\"intent\":{}}".into()),
        doc_json: None,
    }
}

async fn created_id(store: &Arc<dyn BalanceStore>, request: &AuthorizeRequest) -> PaymentId {
    let out = store.authorize(request, ctx(NOW)).await.unwrap();
    let AuthorizeOutcome::Created { payment, .. } = out else {
        panic!("{out:?}")
    };
    PaymentId::parse(&payment.doc.id).unwrap()
}

async fn topups_credit_once_and_collections_move_no_account(store: Arc<dyn BalanceStore>) {
    let k = funded(&store, "acc", 1_000, 0).await;
    let seq0 = store.read_account(&k, ctx(NOW)).await.unwrap().unwrap().seq;
    // A top-up above the available balance is fine: it takes nothing from the account.
    let topup = created_id(&store, &holdless(Some(&k), "top-1", 5_000)).await;
    assert_eq!(snapshot(&store, &k, NOW).await, (1_000, 0, 1_000));
    let done = succeed(&store, &topup, SuccessEffect::Credit, 5_000, NOW).await;
    let SucceedOutcome::Done { seq } = done else {
        panic!("{done:?}")
    };
    let payment = store.payment(&topup).await.unwrap().unwrap();
    assert_eq!((payment.status, seq), (PaymentStatus::Succeeded, seq0 + 1));
    assert_eq!(snapshot(&store, &k, NOW).await, (6_000, 0, 6_000));
    // Exactly once: a second report changes nothing.
    assert_eq!(
        succeed(&store, &topup, SuccessEffect::Credit, 5_000, NOW).await,
        SucceedOutcome::NotPending(PaymentStatus::Succeeded)
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (6_000, 0, 6_000));
    // The settlement waits in the outbox under its own id, with the account's sequence.
    let outbox = all_unsettled(&store).await;
    let entry = outbox
        .iter()
        .find(|u| u.id == format!("{topup}#m"))
        .expect("the credit's settlement is in the outbox");
    assert_eq!(entry.seq, seq0 + 1);
    assert!(entry.record.contains(topup.as_str()));

    let charge = created_id(&store, &holdless(None, "ali-1", 700)).await;
    let done = succeed(&store, &charge, SuccessEffect::Collect, 700, NOW).await;
    assert_eq!(done, SucceedOutcome::Done { seq: 0 });
    assert_eq!(
        store.payment(&charge).await.unwrap().unwrap().status,
        PaymentStatus::Succeeded
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (6_000, 0, 6_000));
    let unknown = PaymentId::generate(k.tag, NOW);
    assert_eq!(
        succeed(&store, &unknown, SuccessEffect::Credit, 1, NOW).await,
        SucceedOutcome::NotFound
    );
}

async fn an_unrouted_payment_fails_releases_its_hold_and_replays_no_channel(
    store: Arc<dyn BalanceStore>,
) {
    let k = funded(&store, "acc", 10_000, 0).await;
    let mut request = authorize(&k, "i1", "o1", 4_000, hold_until(NOW + 60_000));
    request.pending_record = Some("{\"intent\":{}}".into());
    let id = created_id(&store, &request).await;
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 4_000, 6_000));
    let out = store
        .fail_unrouted(&id, &request.idempotency.key, ctx(NOW))
        .await
        .unwrap();
    assert!(
        matches!(out, TransitionOutcome::Done(ref r) if r.status == PaymentStatus::Failed),
        "{out:?}"
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 0, 10_000));
    // In flight until its intent is settled, then the stored answer is no_channel_available.
    assert_eq!(
        store.authorize(&request, ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::IdempotencyInFlight
    );
    settle_all(&store).await;
    assert_eq!(
        store.authorize(&request, ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::Replay(StoredOutcome::NoChannelAvailable(id.clone()))
    );
    // A failed payment frees its order id.
    let again = authorize(&k, "i2", "o1", 4_000, hold_until(NOW + 60_000));
    created_id(&store, &again).await;
}

async fn a_late_capture_debits_once_and_never_below_available(store: Arc<dyn BalanceStore>) {
    use gateway::preauth::{LateCaptureOutcome, LateCaptureRequest};
    let k = funded(&store, "acc", 10_000, 0).await;
    let request = authorize(&k, "i1", "o1", 4_000, hold_until(NOW + 60_000));
    let id = created_id(&store, &request).await;
    let late = |amount: i64| LateCaptureRequest {
        payment: id.clone(),
        attempt: 1,
        amount_minor: amount,
        pending_record: "{\"settlement\":{}}".into(),
    };
    // Not late while pending.
    assert_eq!(
        store.late_capture(&late(4_000), ctx(NOW)).await.unwrap(),
        LateCaptureOutcome::Pending
    );
    store
        .release(&id, PaymentStatus::Expired, ctx(NOW))
        .await
        .unwrap();
    let seq = store.read_account(&k, ctx(NOW)).await.unwrap().unwrap().seq;
    // More than available: nothing moves.
    assert_eq!(
        store.late_capture(&late(10_001), ctx(NOW)).await.unwrap(),
        LateCaptureOutcome::Insufficient { available: 10_000 }
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 0, 10_000));
    let done = store.late_capture(&late(4_000), ctx(NOW)).await.unwrap();
    assert_eq!(done, LateCaptureOutcome::Done { seq: seq + 1 });
    assert_eq!(snapshot(&store, &k, NOW).await, (6_000, 0, 6_000));
    // At most once per payment, also after its record was settled.
    settle_all(&store).await;
    assert_eq!(
        store.late_capture(&late(4_000), ctx(NOW)).await.unwrap(),
        done
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (6_000, 0, 6_000));
    assert_eq!(
        store.payment(&id).await.unwrap().unwrap().status,
        PaymentStatus::Expired
    );
}

async fn a_lost_payment_is_restored_once_with_its_refunds(store: Arc<dyn BalanceStore>) {
    use gateway::preauth::{RefundReserveOutcome, RefundReserveRequest, RestorePayment};
    let request = holdless(None, "lost-1", 900);
    let id = PaymentId::parse(&request.doc.id).unwrap();
    let restore = RestorePayment {
        record: PaymentRecord {
            doc: request.doc.clone(),
            status: PaymentStatus::PartiallyRefunded,
            held_minor: 0,
            accepted: None,
        },
        refund_count: 2,
        refunds_reserved: 700,
        refunds_succeeded: 400,
        pending_refunds: vec![(format!("re_{}_2", &id.as_str()[4..]), 2, 300, NOW)],
    };
    assert!(store.restore_payment(&restore).await.unwrap());
    assert!(
        !store.restore_payment(&restore).await.unwrap(),
        "never twice"
    );
    let record = store.payment(&id).await.unwrap().unwrap();
    assert_eq!(
        (record.status, record.doc.amount_minor),
        (PaymentStatus::PartiallyRefunded, 900)
    );
    let order = MerchantOrderId::parse("lost-1", 64).unwrap();
    let scope = Scope::merchant(MerchantId::parse("alpha").unwrap());
    assert!(store
        .live_payment_by_order(&scope, &order)
        .await
        .unwrap()
        .is_some());
    // 200 is left to refund, and the next refund is the third.
    let reserve = |amount: i64, key: &str| RefundReserveRequest {
        payment: id.clone(),
        amount_minor: Some(amount),
        idempotency: claim(key, key),
        hold_expires_at_ms: NOW + 1_000,
        intent_template: "{}".into(),
    };
    assert_eq!(
        store
            .reserve_refund(&reserve(201, "rr1"), ctx(NOW))
            .await
            .unwrap(),
        RefundReserveOutcome::Exceeds { remaining: 200 }
    );
    let created = store
        .reserve_refund(&reserve(200, "rr2"), ctx(NOW))
        .await
        .unwrap();
    assert!(
        matches!(
            created,
            RefundReserveOutcome::Created {
                number: 3,
                amount_minor: 200,
                ..
            }
        ),
        "{created:?}"
    );
}

/// Every pending record: pages until a full pass.
async fn all_unsettled(store: &Arc<dyn BalanceStore>) -> Vec<gateway::preauth::Unsettled> {
    let mut all = Vec::new();
    for _ in 0..1_000 {
        let page = store.unsettled(100).await.unwrap();
        for entry in page.entries {
            if !all.contains(&entry) {
                all.push(entry);
            }
        }
        if page.complete {
            return all;
        }
    }
    panic!("the outbox scan never completed");
}

/// Marks every pending record settled, as the settlement stream does after a commit.
async fn settle_all(store: &Arc<dyn BalanceStore>) {
    let marks: Vec<SettledMark> = all_unsettled(store)
        .await
        .into_iter()
        .map(|u| SettledMark {
            tag: u.tag,
            id: u.id,
            idempotency_key: u.idempotency_key,
        })
        .collect();
    store.mark_settled(&marks).await.unwrap();
}

on_both_backends!(
    a_hold_released_by_the_channel_has_no_clock,
    a_voided_movement_can_happen_again,
    a_refunds_outcome_in_the_outbox_names_the_status_it_reached,
    an_unwound_payment_gives_back_what_it_took_once,
    restored_keys_replay_and_never_overwrite,
    a_lost_payment_is_restored_once_with_its_refunds,
    a_late_capture_debits_once_and_never_below_available,
    topups_credit_once_and_collections_move_no_account,
    an_unrouted_payment_fails_releases_its_hold_and_replays_no_channel,
    pending_records_wait_in_the_outbox_until_settled,
    final_statuses_reach_the_outbox,
    abandon_undoes_a_pending_payment_and_frees_its_key,
    an_acceptance_is_kept_with_the_payment_and_lets_the_key_replay,
    rebuild_replaces_balances_and_holds,
    accounts_are_created_updated_and_keep_their_currency,
    holds_count_against_available_and_insufficient_funds_is_recorded,
    idempotency_replays_conflicts_and_never_holds_twice,
    order_ids_are_unique_among_live_payments_and_freed_by_release,
    a_hold_is_captured_or_released_exactly_once,
    expired_holds_are_released_lazily_and_by_the_sweeper,
    an_authorize_spends_what_the_holds_it_releases_freed,
    adjustments_credit_debit_and_never_overdraw,
    concurrent_authorizations_never_overspend,
    payments_without_account_hold_nothing,
);

async fn accounts_are_created_updated_and_keep_their_currency(store: Arc<dyn BalanceStore>) {
    let k = key("acc");
    assert_eq!(store.read_account(&k, ctx(NOW)).await.unwrap(), None);
    let created = store
        .upsert_account(&k, Currency::Cny, 500, ctx(NOW))
        .await
        .unwrap();
    let UpsertOutcome::Created(s) = created else {
        panic!("{created:?}")
    };
    assert_eq!(
        (s.balance, s.held, s.credit_limit, s.seq, s.available()),
        (0, 0, 500, 0, 500)
    );
    let updated = store
        .upsert_account(&k, Currency::Cny, 1_000, ctx(NOW))
        .await
        .unwrap();
    let UpsertOutcome::Updated(s) = updated else {
        panic!("{updated:?}")
    };
    assert_eq!(s.credit_limit, 1_000);
    let mismatch = store
        .upsert_account(&k, Currency::Usd, 0, ctx(NOW))
        .await
        .unwrap();
    assert_eq!(mismatch, UpsertOutcome::CurrencyMismatch(Currency::Cny));
    assert_eq!(snapshot(&store, &k, NOW).await, (0, 0, 1_000));
    // Another merchant's account of the same id is another account.
    let other = AccountKey::new(
        MerchantId::parse("beta").unwrap(),
        AccountId::parse("acc").unwrap(),
    );
    assert_eq!(store.read_account(&other, ctx(NOW)).await.unwrap(), None);
}

async fn holds_count_against_available_and_insufficient_funds_is_recorded(
    store: Arc<dyn BalanceStore>,
) {
    let k = funded(&store, "acc", 10_000, 2_000).await;
    let first = store
        .authorize(
            &authorize(&k, "i1", "o1", 7_000, hold_until(NOW + 60_000)),
            ctx(NOW),
        )
        .await
        .unwrap();
    let AuthorizeOutcome::Created { payment, account } = first else {
        panic!("{first:?}")
    };
    assert_eq!(payment.status, PaymentStatus::Pending);
    assert_eq!(payment.held_minor, 7_000);
    assert_eq!(account.unwrap().held, 7_000);
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 7_000, 5_000));

    let refused = store
        .authorize(
            &authorize(&k, "i2", "o2", 5_001, hold_until(NOW + 60_000)),
            ctx(NOW),
        )
        .await
        .unwrap();
    assert_eq!(
        refused,
        AuthorizeOutcome::InsufficientFunds {
            available: 5_000,
            shortfall: 1
        }
    );
    // The refusal is recorded under its key and replayed; nothing changed.
    let replay = store
        .authorize(
            &authorize(&k, "i2", "o2", 5_001, hold_until(NOW + 60_000)),
            ctx(NOW),
        )
        .await
        .unwrap();
    assert_eq!(
        replay,
        AuthorizeOutcome::Replay(StoredOutcome::InsufficientFunds {
            available: 5_000,
            shortfall: 1
        })
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 7_000, 5_000));
    // The refused order id was not used up.
    let exact = store
        .authorize(&authorize(&k, "i3", "o2", 5_000, CAPTURE), ctx(NOW))
        .await
        .unwrap();
    let AuthorizeOutcome::Created { payment, .. } = exact else {
        panic!("{exact:?}")
    };
    assert_eq!(payment.status, PaymentStatus::Succeeded);
    assert_eq!(payment.held_minor, 0);
    // Balance 5 000, held 7 000, credit 2 000: available 0, balance spent into the credit line.
    assert_eq!(snapshot(&store, &k, NOW).await, (5_000, 7_000, 0));
}

async fn idempotency_replays_conflicts_and_never_holds_twice(store: Arc<dyn BalanceStore>) {
    let k = funded(&store, "acc", 10_000, 0).await;
    let request = authorize(&k, "same", "o1", 1_000, hold_until(NOW + 60_000));
    let first = store.authorize(&request, ctx(NOW)).await.unwrap();
    let AuthorizeOutcome::Created { payment, .. } = first else {
        panic!("{first:?}")
    };
    let id = PaymentId::parse(&payment.doc.id).unwrap();
    // The same request again (even with a fresh payment id) replays the first payment.
    let again = store
        .authorize(
            &authorize(&k, "same", "o1", 1_000, hold_until(NOW + 60_000)),
            ctx(NOW),
        )
        .await
        .unwrap();
    assert_eq!(
        again,
        AuthorizeOutcome::Replay(StoredOutcome::Payment(id.clone()))
    );
    // The same key with another request is a conflict.
    let mut other = authorize(&k, "same", "o9", 2_000, hold_until(NOW + 60_000));
    other.idempotency.request_hash = "a different request".into();
    assert_eq!(
        store.authorize(&other, ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::IdempotencyConflict
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 1_000, 9_000));
    let stored = store.payment(&id).await.unwrap().unwrap();
    assert_eq!(stored.status, PaymentStatus::Pending);
    assert_eq!(stored.doc, payment.doc);
}

async fn order_ids_are_unique_among_live_payments_and_freed_by_release(
    store: Arc<dyn BalanceStore>,
) {
    let k = funded(&store, "acc", 10_000, 0).await;
    let first = store
        .authorize(
            &authorize(&k, "i1", "order", 1_000, hold_until(NOW + 60_000)),
            ctx(NOW),
        )
        .await
        .unwrap();
    let AuthorizeOutcome::Created { payment, .. } = first else {
        panic!("{first:?}")
    };
    let id = PaymentId::parse(&payment.doc.id).unwrap();
    let dup = store
        .authorize(
            &authorize(&k, "i2", "order", 1_000, hold_until(NOW + 60_000)),
            ctx(NOW),
        )
        .await
        .unwrap();
    assert_eq!(dup, AuthorizeOutcome::DuplicateOrder(id.clone()));
    let scope = Scope::Account(k.clone());
    let order = MerchantOrderId::parse("order", 64).unwrap();
    assert_eq!(
        store
            .live_payment_by_order(&scope, &order)
            .await
            .unwrap()
            .unwrap()
            .doc
            .id,
        id.as_str()
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 1_000, 9_000));

    let released = store
        .release(&id, PaymentStatus::Canceled, ctx(NOW))
        .await
        .unwrap();
    let TransitionOutcome::Done(record) = released else {
        panic!("{released:?}")
    };
    assert_eq!(
        (record.status, record.held_minor),
        (PaymentStatus::Canceled, 0)
    );
    assert_eq!(
        store.live_payment_by_order(&scope, &order).await.unwrap(),
        None
    );
    let reused = store
        .authorize(&authorize(&k, "i3", "order", 1_000, CAPTURE), ctx(NOW))
        .await
        .unwrap();
    assert!(
        matches!(reused, AuthorizeOutcome::Created { .. }),
        "{reused:?}"
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (9_000, 0, 9_000));
}

async fn a_hold_is_captured_or_released_exactly_once(store: Arc<dyn BalanceStore>) {
    let k = funded(&store, "acc", 10_000, 0).await;
    let mut ids = Vec::new();
    for (i, amount) in [(1, 3_000), (2, 2_000)] {
        let out = store
            .authorize(
                &authorize(
                    &k,
                    &format!("i{i}"),
                    &format!("o{i}"),
                    amount,
                    hold_until(NOW + 60_000),
                ),
                ctx(NOW),
            )
            .await
            .unwrap();
        let AuthorizeOutcome::Created { payment, .. } = out else {
            panic!("{out:?}")
        };
        ids.push(PaymentId::parse(&payment.doc.id).unwrap());
    }
    let captured = capture(&store, &ids[0], NOW).await;
    let TransitionOutcome::Done(record) = captured else {
        panic!("{captured:?}")
    };
    assert_eq!(record.status, PaymentStatus::Succeeded);
    assert_eq!(snapshot(&store, &k, NOW).await, (7_000, 2_000, 5_000));
    assert_eq!(
        capture(&store, &ids[0], NOW).await,
        TransitionOutcome::NotPending(PaymentStatus::Succeeded)
    );
    assert_eq!(
        store
            .release(&ids[0], PaymentStatus::Failed, ctx(NOW))
            .await
            .unwrap(),
        TransitionOutcome::NotPending(PaymentStatus::Succeeded)
    );

    let released = store
        .release(&ids[1], PaymentStatus::Failed, ctx(NOW))
        .await
        .unwrap();
    assert!(
        matches!(released, TransitionOutcome::Done(ref r) if r.status == PaymentStatus::Failed),
        "{released:?}"
    );
    assert_eq!(
        store
            .release(&ids[1], PaymentStatus::Canceled, ctx(NOW))
            .await
            .unwrap(),
        TransitionOutcome::NotPending(PaymentStatus::Failed)
    );
    assert_eq!(
        capture(&store, &ids[1], NOW).await,
        TransitionOutcome::NotPending(PaymentStatus::Failed)
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (7_000, 0, 7_000));
    let unknown = PaymentId::generate(k.tag, NOW);
    assert_eq!(
        capture(&store, &unknown, NOW).await,
        TransitionOutcome::NotFound
    );
    let seq = store.read_account(&k, ctx(NOW)).await.unwrap().unwrap().seq;
    assert_eq!(
        seq, 2,
        "one funding credit and one capture moved the balance"
    );
}

async fn expired_holds_are_released_lazily_and_by_the_sweeper(store: Arc<dyn BalanceStore>) {
    let k = funded(&store, "acc", 10_000, 0).await;
    let out = store
        .authorize(
            &authorize(&k, "i1", "o1", 4_000, hold_until(NOW + 1_000)),
            ctx(NOW),
        )
        .await
        .unwrap();
    let AuthorizeOutcome::Created { payment, .. } = out else {
        panic!("{out:?}")
    };
    let id = PaymentId::parse(&payment.doc.id).unwrap();
    assert_eq!(
        snapshot(&store, &k, NOW + 999).await,
        (10_000, 4_000, 6_000)
    );
    // Lazily, inside the next operation on the account after the expiry.
    assert_eq!(snapshot(&store, &k, NOW + 1_000).await, (10_000, 0, 10_000));
    let record = store.payment(&id).await.unwrap().unwrap();
    assert_eq!(
        (record.status, record.held_minor),
        (PaymentStatus::Expired, 0)
    );
    // An expired payment never captures, and its order id is free again.
    assert_eq!(
        capture(&store, &id, NOW + 2_000).await,
        TransitionOutcome::NotPending(PaymentStatus::Expired)
    );
    let reuse = store
        .authorize(
            &authorize(&k, "i2", "o1", 4_000, hold_until(NOW + 5_000)),
            ctx(NOW + 2_000),
        )
        .await
        .unwrap();
    let AuthorizeOutcome::Created { payment, .. } = reuse else {
        panic!("{reuse:?}")
    };
    let second = PaymentId::parse(&payment.doc.id).unwrap();

    // By the sweeper, for an account nobody touches.
    let released = store.sweep_expired(ctx(NOW + 4_999), 100).await.unwrap();
    assert_eq!(released, 0);
    let mut total = 0;
    for _ in 0..20 {
        total += store.sweep_expired(ctx(NOW + 5_000), 100).await.unwrap();
        if total > 0 {
            break;
        }
    }
    assert_eq!(total, 1);
    assert_eq!(
        store.payment(&second).await.unwrap().unwrap().status,
        PaymentStatus::Expired
    );
    assert_eq!(snapshot(&store, &k, NOW + 5_000).await, (10_000, 0, 10_000));
}

/// The authorize that finds expired holds releases them first and checks the funds (and
/// answers the account) with what they freed: nothing stale in between.
async fn an_authorize_spends_what_the_holds_it_releases_freed(store: Arc<dyn BalanceStore>) {
    let k = funded(&store, "acc", 10_000, 0).await;
    for (idem, order) in [("i1", "o1"), ("i2", "o2")] {
        let out = store
            .authorize(
                &authorize(&k, idem, order, 4_000, hold_until(NOW + 1_000)),
                ctx(NOW),
            )
            .await
            .unwrap();
        assert!(matches!(out, AuthorizeOutcome::Created { .. }), "{out:?}");
    }
    // 2_000 available before the expiry: refused, nothing changed.
    let early = store
        .authorize(&authorize(&k, "i3", "o3", 9_000, CAPTURE), ctx(NOW + 999))
        .await
        .unwrap();
    assert_eq!(
        early,
        AuthorizeOutcome::InsufficientFunds {
            available: 2_000,
            shortfall: 7_000
        }
    );
    assert_eq!(
        snapshot(&store, &k, NOW + 999).await,
        (10_000, 8_000, 2_000)
    );

    // At the expiry, in the same call: both holds released, 9_000 captured from 10_000.
    let out = store
        .authorize(&authorize(&k, "i4", "o4", 9_000, CAPTURE), ctx(NOW + 1_000))
        .await
        .unwrap();
    let AuthorizeOutcome::Created { payment, account } = out else {
        panic!("{out:?}")
    };
    assert_eq!(payment.status, PaymentStatus::Succeeded);
    let account = account.expect("an account payment answers its account");
    assert_eq!(
        (account.balance, account.held, account.available()),
        (1_000, 0, 1_000)
    );
    assert_eq!(snapshot(&store, &k, NOW + 1_000).await, (1_000, 0, 1_000));

    // And a new hold over an expired one answers the held amount it leaves.
    let k2 = funded(&store, "acc2", 10_000, 0).await;
    store
        .authorize(
            &authorize(&k2, "j1", "p1", 6_000, hold_until(NOW + 1_000)),
            ctx(NOW),
        )
        .await
        .unwrap();
    let out = store
        .authorize(
            &authorize(&k2, "j2", "p2", 7_000, hold_until(NOW + 9_000)),
            ctx(NOW + 1_000),
        )
        .await
        .unwrap();
    let AuthorizeOutcome::Created { account, .. } = out else {
        panic!("{out:?}")
    };
    let account = account.expect("an account payment answers its account");
    assert_eq!(
        (account.balance, account.held, account.seq),
        (10_000, 7_000, 1)
    );
    assert_eq!(
        snapshot(&store, &k2, NOW + 1_000).await,
        (10_000, 7_000, 3_000)
    );
}

async fn adjustments_credit_debit_and_never_overdraw(store: Arc<dyn BalanceStore>) {
    let k = funded(&store, "acc", 10_000, 1_000).await;
    let hold = store
        .authorize(
            &authorize(&k, "i1", "o1", 2_000, hold_until(NOW + 60_000)),
            ctx(NOW),
        )
        .await
        .unwrap();
    assert!(matches!(hold, AuthorizeOutcome::Created { .. }));
    // available = 10 000 + 1 000 − 2 000 = 9 000.
    let too_much = store
        .adjust(&adjust(&k, "d1", Direction::Debit, 9_001), ctx(NOW))
        .await
        .unwrap();
    assert_eq!(
        too_much,
        AdjustOutcome::InsufficientFunds {
            available: 9_000,
            shortfall: 1
        }
    );
    let debit = store
        .adjust(&adjust(&k, "d2", Direction::Debit, 9_000), ctx(NOW))
        .await
        .unwrap();
    let AdjustOutcome::Applied(s) = debit else {
        panic!("{debit:?}")
    };
    assert_eq!((s.balance, s.held, s.available()), (1_000, 2_000, 0));
    // Until its settlement is committed the key is in flight; then it replays the document.
    let in_flight = store
        .adjust(&adjust(&k, "d2", Direction::Debit, 9_000), ctx(NOW))
        .await
        .unwrap();
    assert_eq!(in_flight, AdjustOutcome::IdempotencyInFlight);
    settle_all(&store).await;
    let replay = store
        .adjust(&adjust(&k, "d2", Direction::Debit, 9_000), ctx(NOW))
        .await
        .unwrap();
    assert_eq!(
        replay,
        AdjustOutcome::Replay(StoredOutcome::Adjustment("{\"amount\":9000}".into()))
    );
    let mut conflicting = adjust(&k, "d2", Direction::Credit, 5);
    conflicting.idempotency.request_hash = "other".into();
    assert_eq!(
        store.adjust(&conflicting, ctx(NOW)).await.unwrap(),
        AdjustOutcome::IdempotencyConflict
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (1_000, 2_000, 0));
    let missing = store
        .adjust(&adjust(&key("nobody"), "x", Direction::Credit, 5), ctx(NOW))
        .await
        .unwrap();
    assert_eq!(missing, AdjustOutcome::AccountNotFound);
    let mut usd = adjust(&k, "usd", Direction::Credit, 5);
    usd.currency = Currency::Usd;
    assert_eq!(
        store.adjust(&usd, ctx(NOW)).await.unwrap(),
        AdjustOutcome::CurrencyMismatch(Currency::Cny)
    );
    let huge = store
        .adjust(
            &adjust(
                &k,
                "huge",
                Direction::Credit,
                gateway::preauth::MAX_SAFE_MINOR,
            ),
            ctx(NOW),
        )
        .await
        .unwrap();
    assert_eq!(huge, AdjustOutcome::OutOfRange);
    assert_eq!(snapshot(&store, &k, NOW).await, (1_000, 2_000, 0));
}

async fn concurrent_authorizations_never_overspend(store: Arc<dyn BalanceStore>) {
    // 10 000 + 2 500 credit affords exactly 12 holds of 1 000 (12 500 ≥ 12 000 < 13 000).
    let k = funded(&store, "acc", 10_000, 2_500).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = store.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            store
                .authorize(
                    &authorize(
                        &k,
                        &format!("c{i}"),
                        &format!("o{i}"),
                        1_000,
                        hold_until(NOW + 60_000),
                    ),
                    ctx(NOW),
                )
                .await
                .unwrap()
        }));
    }
    let mut created = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            AuthorizeOutcome::Created { .. } => created += 1,
            AuthorizeOutcome::InsufficientFunds {
                available,
                shortfall,
            } => {
                assert_eq!((available, shortfall), (500, 500));
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((created, refused), (12, 28));
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 12_000, 500));
}

async fn payments_without_account_hold_nothing(store: Arc<dyn BalanceStore>) {
    let merchant = MerchantId::parse("alpha").unwrap();
    let scope = Scope::merchant(merchant.clone());
    let id = PaymentId::generate(scope.tag(), NOW);
    let request = AuthorizeRequest {
        scope: scope.clone(),
        idempotency: claim("alipay-1", "h"),
        order_id: MerchantOrderId::parse("ali-1", 64).unwrap(),
        doc: PaymentDoc {
            id: id.as_str().into(),
            merchant_id: "alpha".into(),
            account_id: None,
            merchant_order_id: "ali-1".into(),
            amount_minor: 500,
            currency: Currency::Cny,
            method: Method::Alipay,
            purpose: Purpose::Charge,
            created_at_ms: NOW,
            expires_at_ms: NOW + 60_000,
            description: Some("game card".into()),
            notify_url: None,
            metadata: None,
        },
        hold: None,
        pending_record: None,
        doc_json: None,
    };
    let out = store.authorize(&request, ctx(NOW)).await.unwrap();
    let AuthorizeOutcome::Created { payment, account } = out else {
        panic!("{out:?}")
    };
    assert_eq!(
        (payment.status, payment.held_minor, account),
        (PaymentStatus::Pending, 0, None)
    );
    let stored = store.payment(&id).await.unwrap().unwrap();
    assert_eq!(stored.doc.description.as_deref(), Some("game card"));
    let released = store
        .release(&id, PaymentStatus::Canceled, ctx(NOW))
        .await
        .unwrap();
    assert!(
        matches!(released, TransitionOutcome::Done(ref r) if r.status == PaymentStatus::Canceled)
    );
}

async fn pending_records_wait_in_the_outbox_until_settled(store: Arc<dyn BalanceStore>) {
    let k = funded(&store, "acc", 10_000, 0).await;
    settle_all(&store).await;
    let mut request = authorize(&k, "p1", "o1", 2_500, CAPTURE);
    request.pending_record = Some("{\"settlement\":{\"x\":1}}".into());
    let out = store.authorize(&request, ctx(NOW)).await.unwrap();
    let AuthorizeOutcome::Created { account, .. } = out else {
        panic!("{out:?}")
    };
    assert_eq!(account.unwrap().seq, 2);
    let pending = all_unsettled(&store).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    let u = &pending[0];
    assert_eq!(
        (u.id.as_str(), u.seq, u.idempotency_key.as_str()),
        (request.doc.id.as_str(), 2, "p1")
    );
    assert_eq!(u.record, "{\"settlement\":{\"x\":1}}");
    assert_eq!(u.at_ms, NOW);
    // In flight until settled: a retry neither replays nor charges again.
    let retry = store
        .authorize(&authorize(&k, "p1", "o1", 2_500, CAPTURE), ctx(NOW))
        .await
        .unwrap();
    assert_eq!(retry, AuthorizeOutcome::IdempotencyInFlight);
    assert_eq!(snapshot(&store, &k, NOW).await, (7_500, 0, 7_500));
    settle_all(&store).await;
    assert!(all_unsettled(&store).await.is_empty());
    let id = PaymentId::parse(&request.doc.id).unwrap();
    let replay = store
        .authorize(&authorize(&k, "p1", "o1", 2_500, CAPTURE), ctx(NOW))
        .await
        .unwrap();
    assert_eq!(replay, AuthorizeOutcome::Replay(StoredOutcome::Payment(id)));
    // Settling twice is harmless.
    settle_all(&store).await;
}

async fn final_statuses_reach_the_outbox(store: Arc<dyn BalanceStore>) {
    let k = funded(&store, "acc", 10_000, 0).await;
    settle_all(&store).await;
    let mut ids = Vec::new();
    for (i, expiry) in [(1, NOW + 60_000), (2, NOW + 1_000)] {
        let out = store
            .authorize(
                &authorize(
                    &k,
                    &format!("i{i}"),
                    &format!("o{i}"),
                    1_000,
                    hold_until(expiry),
                ),
                ctx(NOW),
            )
            .await
            .unwrap();
        let AuthorizeOutcome::Created { payment, .. } = out else {
            panic!("{out:?}")
        };
        ids.push(payment.doc.id.clone());
    }
    store
        .release(
            &PaymentId::parse(&ids[0]).unwrap(),
            PaymentStatus::Canceled,
            ctx(NOW + 5),
        )
        .await
        .unwrap();
    snapshot(&store, &k, NOW + 1_000).await; // expires the second lazily
    let mut pending = all_unsettled(&store).await;
    pending.sort_by(|a, b| a.id.cmp(&b.id));
    let mut expected = vec![
        (
            format!("{}#s", ids[0]),
            gateway::preauth::final_status_record(&ids[0], PaymentStatus::Canceled, NOW + 5),
        ),
        (
            format!("{}#s", ids[1]),
            gateway::preauth::final_status_record(&ids[1], PaymentStatus::Expired, NOW + 1_000),
        ),
    ];
    expected.sort();
    let got: Vec<(String, String)> = pending
        .iter()
        .map(|u| (u.id.clone(), u.record.clone()))
        .collect();
    assert_eq!(got, expected);
    let parsed: serde_json::Value = serde_json::from_str(&pending[0].record).unwrap();
    assert!(parsed["status"]["payment_id"].is_string(), "{parsed}");
    settle_all(&store).await;
    assert!(all_unsettled(&store).await.is_empty());
}

async fn abandon_undoes_a_pending_payment_and_frees_its_key(store: Arc<dyn BalanceStore>) {
    let k = funded(&store, "acc", 10_000, 0).await;
    settle_all(&store).await;
    let mut request = authorize(&k, "a1", "o1", 4_000, hold_until(NOW + 60_000));
    request.pending_record = Some("{\"intent\":{}}".into());
    store.authorize(&request, ctx(NOW)).await.unwrap();
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 4_000, 6_000));
    let id = PaymentId::parse(&request.doc.id).unwrap();
    store.abandon(&id, &request.idempotency.key).await.unwrap();
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 0, 10_000));
    assert_eq!(
        store.payment(&id).await.unwrap().unwrap().status,
        PaymentStatus::Failed
    );
    assert!(all_unsettled(&store).await.is_empty());
    // The key and the order id are free: a retry makes a new payment.
    let retry = store
        .authorize(
            &authorize(&k, "a1", "o1", 4_000, hold_until(NOW + 60_000)),
            ctx(NOW),
        )
        .await
        .unwrap();
    assert!(
        matches!(retry, AuthorizeOutcome::Created { .. }),
        "{retry:?}"
    );
    // A captured payment is never undone.
    let paid = authorize(&k, "a2", "o2", 1_000, CAPTURE);
    store.authorize(&paid, ctx(NOW)).await.unwrap();
    let paid_id = PaymentId::parse(&paid.doc.id).unwrap();
    store
        .abandon(&paid_id, &paid.idempotency.key)
        .await
        .unwrap();
    assert_eq!(
        store.payment(&paid_id).await.unwrap().unwrap().status,
        PaymentStatus::Succeeded
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (9_000, 4_000, 5_000));
}

async fn an_acceptance_is_kept_with_the_payment_and_lets_the_key_replay(
    store: Arc<dyn BalanceStore>,
) {
    let k = funded(&store, "acc", 10_000, 0).await;
    settle_all(&store).await;
    let mut request = authorize(&k, "c1", "o1", 4_000, hold_until(NOW + 60_000));
    request.pending_record = Some("{\"intent\":{}}".into());
    store.authorize(&request, ctx(NOW)).await.unwrap();
    let id = PaymentId::parse(&request.doc.id).unwrap();
    let retry = || authorize(&k, "c1", "o1", 4_000, hold_until(NOW + 60_000));
    assert_eq!(
        store.authorize(&retry(), ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::IdempotencyInFlight
    );
    assert_eq!(store.payment(&id).await.unwrap().unwrap().accepted, None);
    let accepted = AcceptedAttempt {
        attempt: 2,
        action: Some(r#"{"type":"qr_code","qr_code":"https://qr.example/\"x\""}"#.into()),
        channel_txn_id: Some("T-1".into()),
        latency_ms: Some(12),
        at_ms: NOW + 5,
    };
    let mark = SettledMark {
        tag: k.tag,
        id: id.as_str().to_owned(),
        idempotency_key: "c1".into(),
    };
    store.accept(&mark, &accepted).await.unwrap();
    // Kept with the payment, the intent's pending record gone, the key replaying; the hold
    // and the status untouched.
    let record = store.payment(&id).await.unwrap().unwrap();
    assert_eq!(record.accepted.as_ref(), Some(&accepted));
    assert_eq!(
        (record.status, record.held_minor),
        (PaymentStatus::Pending, 4_000)
    );
    assert!(all_unsettled(&store).await.is_empty());
    assert_eq!(
        store.authorize(&retry(), ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::Replay(StoredOutcome::Payment(id.clone()))
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 4_000, 6_000));
    // A payment the store does not have keeps nothing.
    let ghost = PaymentId::generate(k.tag, NOW);
    let ghost_mark = SettledMark {
        id: ghost.as_str().to_owned(),
        ..mark
    };
    store.accept(&ghost_mark, &accepted).await.unwrap();
    assert_eq!(store.payment(&ghost).await.unwrap(), None);
}

async fn rebuild_replaces_balances_and_holds(store: Arc<dyn BalanceStore>) {
    assert!(!store.has_accounts().await.unwrap());
    let k = funded(&store, "acc", 10_000, 0).await;
    assert!(store.has_accounts().await.unwrap());
    // Redis has a hold the store never heard of, and a wrong balance.
    let stray = authorize(&k, "s1", "stray", 3_000, hold_until(NOW + 60_000));
    store.authorize(&stray, ctx(NOW)).await.unwrap();
    let kept = authorize(&k, "s2", "kept", 2_000, hold_until(NOW + 60_000));
    let kept_record = PaymentRecord {
        doc: kept.doc.clone(),
        status: PaymentStatus::Pending,
        held_minor: 2_000,
        accepted: None,
    };
    let rebuild = |expect| AccountRebuild {
        key: k.clone(),
        currency: Currency::Cny,
        balance: 8_000,
        credit_limit: 500,
        seq: 7,
        created_at_ms: NOW,
        holds: vec![kept_record.clone()],
        hold_expiries_ms: vec![NOW + 30_000],
        expect,
    };
    // The fence: not while a movement is on its way to the settlement store (the funding)…
    let fence = NOW + 1_000;
    let guard = store.rebuild_guard(&k, fence).await.unwrap();
    assert_eq!(
        guard,
        Some(gateway::preauth::RebuildGuard {
            seq: 1,
            held: 3_000
        })
    );
    assert!(!store.rebuild_account(&rebuild(guard)).await.unwrap());
    settle_all(&store).await;
    // Meanwhile no new movement starts (the account is fenced off; nothing is recorded, not
    // even the key), so the movements on their way drain…
    let moved = authorize(&k, "s3", "moved", 100, hold_until(NOW + 60_000));
    assert_eq!(
        store.authorize(&moved, ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::AccountBusy
    );
    let credit = adjust(&k, "s3-credit", Direction::Credit, 100);
    assert_eq!(
        store.adjust(&credit, ctx(NOW)).await.unwrap(),
        AdjustOutcome::AccountBusy
    );
    // …nor when the account moved since it was read before the snapshot (here: once the
    // fence lapsed)…
    store.authorize(&moved, ctx(fence)).await.unwrap();
    assert!(!store.rebuild_account(&rebuild(guard)).await.unwrap());
    assert!(!store.rebuild_account(&rebuild(None)).await.unwrap());
    assert_eq!(
        snapshot(&store, &k, NOW).await,
        (10_000, 3_100, 6_900),
        "nothing loaded"
    );
    // …then, read again, it loads, and lifts the fence.
    let guard = store.rebuild_guard(&k, NOW + 1_000).await.unwrap();
    assert!(store.rebuild_account(&rebuild(guard)).await.unwrap());
    // (An authorize is heard again: refused for the money, not for the fence.)
    let after = authorize(&k, "s4", "after", 1_000_000, CAPTURE);
    assert!(matches!(
        store.authorize(&after, ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::InsufficientFunds { .. }
    ));
    let s = store.read_account(&k, ctx(NOW)).await.unwrap().unwrap();
    assert_eq!(
        (s.balance, s.held, s.credit_limit, s.seq, s.available()),
        (8_000, 2_000, 500, 7, 6_500)
    );
    let stray_id = PaymentId::parse(&stray.doc.id).unwrap();
    assert_eq!(
        store.payment(&stray_id).await.unwrap().unwrap().status,
        PaymentStatus::Failed
    );
    let kept_id = PaymentId::parse(&kept.doc.id).unwrap();
    let restored = store.payment(&kept_id).await.unwrap().unwrap();
    assert_eq!(
        (restored.status, restored.held_minor),
        (PaymentStatus::Pending, 2_000)
    );
    let order = MerchantOrderId::parse("kept", 64).unwrap();
    assert!(store
        .live_payment_by_order(&Scope::Account(k.clone()), &order)
        .await
        .unwrap()
        .is_some());
    // The rebuilt hold expires and captures like any other.
    assert_eq!(
        capture(&store, &kept_id, NOW).await,
        TransitionOutcome::Done(PaymentRecord {
            doc: kept.doc.clone(),
            status: PaymentStatus::Succeeded,
            held_minor: 0,
            accepted: None,
        })
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (6_000, 0, 6_500));
}

/// Past `NOW` (in 2027) for either store: the in-process one dates a record from its own clock.
const KEY_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;

fn void_mark(k: &AccountKey, id: String) -> SettledMark {
    SettledMark {
        tag: k.tag,
        id,
        idempotency_key: String::new(),
    }
}

/// A movement the settlement store refused (the balance store had rolled back) is voided and
/// must not be lost: what made it can make it again (`void.lua`).
async fn a_voided_movement_can_happen_again(store: Arc<dyn BalanceStore>) {
    use gateway::preauth::{
        LateCaptureOutcome, LateCaptureRequest, RefundFinishOutcome, RefundFinishRequest,
        RefundReserveOutcome, RefundReserveRequest,
    };
    let k = funded(&store, "acc", 10_000, 0).await;

    // A top-up's credit: the top-up is pending again, and succeeds again.
    let topup = created_id(&store, &holdless(Some(&k), "top-1", 500)).await;
    let done = succeed(&store, &topup, SuccessEffect::Credit, 500, NOW).await;
    assert!(matches!(done, SucceedOutcome::Done { .. }), "{done:?}");
    store
        .void(&void_mark(&k, format!("{topup}#m")))
        .await
        .unwrap();
    assert_eq!(
        store.payment(&topup).await.unwrap().unwrap().status,
        PaymentStatus::Pending
    );
    let again = succeed(&store, &topup, SuccessEffect::Credit, 500, NOW).await;
    assert!(matches!(again, SucceedOutcome::Done { .. }), "{again:?}");
    assert!(
        all_unsettled(&store)
            .await
            .iter()
            .any(|u| u.id == format!("{topup}#m")),
        "the credit is in the outbox again"
    );

    // A refund's success: the refund is pending again, the payment's status goes back, and it
    // finishes again.
    let paid = created_id(&store, &authorize(&k, "b1", "b1", 1_000, CAPTURE)).await;
    let reserved = store
        .reserve_refund(
            &RefundReserveRequest {
                payment: paid.clone(),
                amount_minor: Some(300),
                idempotency: claim("r1", "r1"),
                hold_expires_at_ms: NOW + 1_000,
                intent_template: "{}".into(),
            },
            ctx(NOW),
        )
        .await
        .unwrap();
    let RefundReserveOutcome::Created { refund_id, .. } = reserved else {
        panic!("{reserved:?}")
    };
    let finish = RefundFinishRequest {
        payment: paid.clone(),
        refund_id: refund_id.clone(),
        succeeded: true,
        pending_record: "{}".into(),
    };
    let first = store.finish_refund(&finish, ctx(NOW)).await.unwrap();
    assert!(
        matches!(
            first,
            RefundFinishOutcome::Done {
                payment_status: PaymentStatus::PartiallyRefunded,
                ..
            }
        ),
        "{first:?}"
    );
    store
        .void(&void_mark(&k, format!("{refund_id}#f")))
        .await
        .unwrap();
    assert_eq!(
        store.payment(&paid).await.unwrap().unwrap().status,
        PaymentStatus::Succeeded
    );
    let second = store.finish_refund(&finish, ctx(NOW)).await.unwrap();
    assert!(
        matches!(
            second,
            RefundFinishOutcome::Done {
                payment_status: PaymentStatus::PartiallyRefunded,
                ..
            }
        ),
        "{second:?}"
    );

    // A late capture: its marker goes, so the retried callback captures again (a new
    // sequence number, not the voided one's answer).
    let held = created_id(
        &store,
        &authorize(&k, "h1", "h1", 400, hold_until(NOW + 60_000)),
    )
    .await;
    store
        .release(&held, PaymentStatus::Expired, ctx(NOW))
        .await
        .unwrap();
    let late = LateCaptureRequest {
        payment: held.clone(),
        attempt: 1,
        amount_minor: 400,
        pending_record: "{\"settlement\":{}}".into(),
    };
    let LateCaptureOutcome::Done { seq: first_seq } =
        store.late_capture(&late, ctx(NOW)).await.unwrap()
    else {
        panic!("the late capture was refused")
    };
    store
        .void(&void_mark(&k, format!("{held}#l1")))
        .await
        .unwrap();
    let LateCaptureOutcome::Done { seq: second_seq } =
        store.late_capture(&late, ctx(NOW)).await.unwrap()
    else {
        panic!("the late capture was refused")
    };
    assert!(
        second_seq > first_seq,
        "captured again: {first_seq} -> {second_seq}"
    );
}

/// A payment the settlement store refused to create is undone at most once: its capture (or
/// hold) given back, the payment gone, its key answering the store's payment.
async fn an_unwound_payment_gives_back_what_it_took_once(store: Arc<dyn BalanceStore>) {
    use gateway::preauth::{KeyRecord, Unwind};
    let k = funded(&store, "acc", 10_000, 0).await;
    let mut charge = authorize(&k, "K", "O", 3_000, CAPTURE);
    charge.pending_record = Some("{\"settlement\":{}}".into());
    let id = created_id(&store, &charge).await;
    assert_eq!(snapshot(&store, &k, NOW).await, (7_000, 0, 7_000));
    let first = PaymentId::generate(k.tag, NOW - 1);
    let unwind = Unwind {
        mark: SettledMark {
            tag: k.tag,
            id: id.as_str().to_owned(),
            idempotency_key: "K".into(),
        },
        order_id: "O".into(),
        captured_minor: 3_000,
        key_record: Some(KeyRecord {
            request_hash: "hash-K".into(),
            outcome: StoredOutcome::Payment(first.clone()),
            ttl_seconds: KEY_TTL_SECONDS,
        }),
    };
    assert!(store.unwind(&unwind).await.unwrap());
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 0, 10_000));
    assert!(!store.unwind(&unwind).await.unwrap(), "never twice");
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 0, 10_000));
    assert_eq!(store.payment(&id).await.unwrap(), None);
    assert!(all_unsettled(&store)
        .await
        .iter()
        .all(|u| u.id != id.as_str()));
    // The key answers the store's payment; the order id is free in this store.
    assert_eq!(
        store.authorize(&charge, ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::Replay(StoredOutcome::Payment(first))
    );
    let other = authorize(&k, "K2", "O", 1_000, hold_until(NOW + 60_000));
    created_id(&store, &other).await;

    // A held payment: its hold is released; without a key record its key is forgotten.
    let mut held = authorize(&k, "H", "H", 2_000, hold_until(NOW + 60_000));
    held.pending_record = Some("{\"intent\":{}}".into());
    let held_id = created_id(&store, &held).await;
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 3_000, 7_000));
    let unwind = Unwind {
        mark: SettledMark {
            tag: k.tag,
            id: held_id.as_str().to_owned(),
            idempotency_key: "H".into(),
        },
        order_id: "H".into(),
        captured_minor: 0,
        key_record: None,
    };
    assert!(store.unwind(&unwind).await.unwrap());
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 1_000, 9_000));
    // The key is free: the same request is authorized afresh.
    created_id(&store, &held).await;
    assert_eq!(snapshot(&store, &k, NOW).await, (10_000, 3_000, 7_000));
}

/// A rebuild puts keys back: each replays its payment, and a record that is there stays. The
/// order id of a payment that ended live comes back too (a new key for it is a duplicate),
/// but never takes an order id from the live payment that holds it.
async fn restored_keys_replay_and_never_overwrite(store: Arc<dyn BalanceStore>) {
    use gateway::preauth::{KeyRecord, KeyRestore};
    let k = funded(&store, "acc", 10_000, 0).await;
    let live = authorize(&k, "L", "L", 1_000, CAPTURE);
    let live_id = created_id(&store, &live).await;
    let stored = PaymentId::generate(k.tag, NOW - 5);
    let record = |key: &str, hash: &str, id: &PaymentId| KeyRestore {
        tag: k.tag,
        key: key.into(),
        record: KeyRecord {
            request_hash: hash.into(),
            outcome: StoredOutcome::Payment(id.clone()),
            ttl_seconds: KEY_TTL_SECONDS,
        },
        order: None,
    };
    let holding = |key: &str, order: &str| KeyRestore {
        order: Some((order.into(), stored.to_string())),
        ..record(key, &format!("hash-{key}"), &stored)
    };
    let restored = store
        .restore_keys(&[
            record("R", "hash-R", &stored),
            record("L", "other", &stored),
            holding("D", "done-order"),
            holding("X", "L"),
        ])
        .await
        .unwrap();
    assert_eq!(restored, 3, "the live record stays");
    // The ended payment's order id is held again; the live payment keeps its own.
    let reuse = authorize(&k, "N1", "done-order", 100, CAPTURE);
    assert_eq!(
        store.authorize(&reuse, ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::DuplicateOrder(stored.clone())
    );
    let steal = authorize(&k, "N2", "L", 100, CAPTURE);
    assert_eq!(
        store.authorize(&steal, ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::DuplicateOrder(live_id.clone())
    );
    // Nobody reads a payment by a restored order id here: the store is asked instead.
    let scope = Scope::Account(k.clone());
    let order = MerchantOrderId::parse("done-order", 64).unwrap();
    assert_eq!(
        store.live_payment_by_order(&scope, &order).await.unwrap(),
        None
    );
    let retry = authorize(&k, "R", "R", 500, CAPTURE);
    assert_eq!(
        store.authorize(&retry, ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::Replay(StoredOutcome::Payment(stored))
    );
    assert_eq!(
        store.authorize(&live, ctx(NOW)).await.unwrap(),
        AuthorizeOutcome::Replay(StoredOutcome::Payment(live_id))
    );
    assert_eq!(snapshot(&store, &k, NOW).await, (9_000, 0, 9_000));
}

/// A supplier charge's hold: neither the lazy release nor the sweeper ever takes it, however
/// late; only a release (the channel's word) or a capture does — also once rebuilt.
async fn a_hold_released_by_the_channel_has_no_clock(store: Arc<dyn BalanceStore>) {
    use gateway::preauth::RELEASED_BY_CHANNEL_MS;
    let k = funded(&store, "acc", 10_000, 0).await;
    let id = created_id(
        &store,
        &authorize(&k, "s1", "s1", 4_000, hold_until(RELEASED_BY_CHANNEL_MS)),
    )
    .await;
    let years_later = NOW + 10 * 365 * 24 * 3600 * 1000;
    assert_eq!(
        snapshot(&store, &k, years_later).await,
        (10_000, 4_000, 6_000)
    );
    assert_eq!(store.sweep_expired(ctx(years_later), 100).await.unwrap(), 0);
    // An authorize's lazy release leaves it too.
    let other = authorize(&k, "s2", "s2", 1_000, hold_until(NOW + 1));
    created_id(&store, &other).await;
    let later = authorize(&k, "s3", "s3", 500, CAPTURE);
    let out = store.authorize(&later, ctx(years_later)).await.unwrap();
    assert!(matches!(out, AuthorizeOutcome::Created { .. }), "{out:?}");
    assert_eq!(
        snapshot(&store, &k, years_later).await,
        (9_500, 4_000, 5_500),
        "the clocked hold went, the channel's stayed"
    );
    assert_eq!(
        store.payment(&id).await.unwrap().unwrap().status,
        PaymentStatus::Pending
    );
    // Rebuilt with its hold: still no clock.
    let record = store.payment(&id).await.unwrap().unwrap();
    settle_all(&store).await;
    let expect = store.rebuild_guard(&k, NOW).await.unwrap();
    let loaded = store
        .rebuild_account(&AccountRebuild {
            key: k.clone(),
            currency: Currency::Cny,
            balance: 9_500,
            credit_limit: 0,
            seq: 10,
            created_at_ms: NOW,
            holds: vec![PaymentRecord {
                held_minor: 4_000,
                ..record
            }],
            hold_expiries_ms: vec![RELEASED_BY_CHANNEL_MS],
            expect,
        })
        .await
        .unwrap();
    assert!(loaded);
    assert_eq!(store.sweep_expired(ctx(years_later), 100).await.unwrap(), 0);
    assert_eq!(
        snapshot(&store, &k, years_later).await,
        (9_500, 4_000, 5_500)
    );
    // The channel's word.
    let released = store
        .release(&id, PaymentStatus::Expired, ctx(years_later))
        .await
        .unwrap();
    assert!(
        matches!(released, TransitionOutcome::Done(_)),
        "{released:?}"
    );
    assert_eq!(snapshot(&store, &k, years_later).await, (9_500, 0, 9_500));
}

/// A succeeded refund's settlement waits in the outbox with its payment row's status and the
/// account's sequence as the balance store reached them (the template says
/// `partially_refunded` and a placeholder sequence): what recovery commits after a crash.
async fn a_refunds_outcome_in_the_outbox_names_the_status_it_reached(store: Arc<dyn BalanceStore>) {
    use gateway::preauth::{
        RefundFinishOutcome, RefundFinishRequest, RefundReserveOutcome, RefundReserveRequest,
        REFUND_SEQ_PLACEHOLDER, REFUND_STATUS_PLACEHOLDER,
    };
    let k = funded(&store, "acc", 10_000, 0).await;
    let paid = created_id(&store, &authorize(&k, "b1", "b1", 1_000, CAPTURE)).await;
    let mut refunded = Vec::new();
    for (key, amount, reached) in [
        ("r1", 300, PaymentStatus::PartiallyRefunded),
        ("r2", 700, PaymentStatus::Refunded),
    ] {
        let reserved = store
            .reserve_refund(
                &RefundReserveRequest {
                    payment: paid.clone(),
                    amount_minor: Some(amount),
                    idempotency: claim(key, key),
                    hold_expires_at_ms: NOW + 1_000,
                    intent_template: "{}".into(),
                },
                ctx(NOW),
            )
            .await
            .unwrap();
        let RefundReserveOutcome::Created { refund_id, .. } = reserved else {
            panic!("{reserved:?}")
        };
        let template = format!(
            "{{\"settlement\":{{\"account_seq\":{REFUND_SEQ_PLACEHOLDER},\"payment\":{{\"id\":\"{paid}\",{REFUND_STATUS_PLACEHOLDER},\"doc\":\"{{\\\"status\\\":1}}\"}}}}}}"
        );
        let finish = RefundFinishRequest {
            payment: paid.clone(),
            refund_id: refund_id.clone(),
            succeeded: true,
            pending_record: template,
        };
        let done = store.finish_refund(&finish, ctx(NOW)).await.unwrap();
        let RefundFinishOutcome::Done {
            seq,
            payment_status,
        } = done
        else {
            panic!("{done:?}")
        };
        assert_eq!(payment_status, reached);
        refunded.push((format!("{refund_id}#f"), seq, reached));
    }
    let outbox = all_unsettled(&store).await;
    for (id, seq, reached) in refunded {
        let entry = outbox
            .iter()
            .find(|u| u.id == id)
            .unwrap_or_else(|| panic!("{id} is in the outbox: {outbox:?}"));
        let record: Value = serde_json::from_str(&entry.record).unwrap();
        assert_eq!(
            (
                &record["settlement"]["payment"]["status"],
                &record["settlement"]["account_seq"],
                &record["settlement"]["payment"]["doc"],
            ),
            (
                &json!(reached.as_str()),
                &json!(seq),
                &json!("{\"status\":1}")
            ),
            "{}",
            entry.record
        );
    }
}
