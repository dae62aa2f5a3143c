//! How each kind of money movement becomes a settlement with balanced postings, and a payment
//! a store row. The one place that decides which ledger gains and which loses.

use super::{ledger, PaymentRow, Posting, Settlement, SettlementKind};
use crate::ids::{AdjustmentId, ScopeTag};
use crate::money::Currency;
use crate::preauth::{AccountKey, Direction, Method, PaymentDoc, PaymentStatus, Purpose};

/// A channel payment's row as its intent: pending, holding its amount when it has a hold (due
/// at `hold_expires_at_ms`), first looked at by the resolution loop at `next_check_at_ms`.
pub fn intent_row(
    doc: &PaymentDoc,
    tag: ScopeTag,
    hold_expires_at_ms: Option<u64>,
    next_check_at_ms: u64,
) -> PaymentRow {
    let held = if hold_expires_at_ms.is_some() {
        doc.amount_minor
    } else {
        0
    };
    let mut row = payment_row(
        doc,
        tag,
        PaymentStatus::Pending,
        held,
        hold_expires_at_ms,
        doc.created_at_ms,
    );
    row.next_check_at_ms = Some(next_check_at_ms);
    row
}

/// A payment's store row from its document and state.
pub fn payment_row(
    doc: &PaymentDoc,
    tag: ScopeTag,
    status: PaymentStatus,
    held_minor: i64,
    hold_expires_at_ms: Option<u64>,
    now_ms: u64,
) -> PaymentRow {
    PaymentRow {
        id: doc.id.clone(),
        merchant_id: doc.merchant_id.clone(),
        account_id: doc.account_id.clone(),
        scope_tag: tag.to_string(),
        merchant_order_id: doc.merchant_order_id.clone(),
        amount_minor: doc.amount_minor,
        currency: doc.currency,
        method: doc.method,
        purpose: doc.purpose,
        status,
        held_minor,
        hold_expires_at_ms,
        created_at_ms: doc.created_at_ms,
        expires_at_ms: doc.expires_at_ms,
        updated_at_ms: now_ms,
        doc: serde_json::to_string(doc).expect("a payment document always serializes"),
        next_check_at_ms: None,
        checks: 0,
        idempotency_key: None,
        request_hash: None,
    }
}

/// A `balance` payment: the account pays the merchant at once. `seq` is the account's sequence
/// after the capture (`None` in the template written before the script runs).
pub fn balance_capture(
    doc: &PaymentDoc,
    tag: ScopeTag,
    seq: Option<u64>,
    now_ms: u64,
) -> Settlement {
    let account = doc.account_id.clone().unwrap_or_default();
    debug_assert!(!account.is_empty(), "a balance payment has an account");
    Settlement {
        payment_id: doc.id.clone(),
        kind: SettlementKind::Capture,
        sequence: 0,
        merchant_id: doc.merchant_id.clone(),
        account_id: doc.account_id.clone(),
        channel_id: None,
        channel_txn_id: None,
        amount_minor: doc.amount_minor,
        currency: doc.currency,
        channel_fee_minor: 0,
        commission_minor: 0,
        merchant_net_minor: doc.amount_minor,
        account_seq: seq,
        settled_at_ms: now_ms,
        postings: vec![
            Posting {
                ledger: ledger::account(&doc.merchant_id, &account),
                amount_minor: -doc.amount_minor,
            },
            Posting {
                ledger: ledger::merchant_sales(&doc.merchant_id),
                amount_minor: doc.amount_minor,
            },
        ],
        payment: Some(payment_row(
            doc,
            tag,
            PaymentStatus::Succeeded,
            0,
            None,
            now_ms,
        )),
        adjustment: None,
    }
}

/// A manual credit or debit of an account, against the merchant's adjustments ledger.
pub fn adjustment(
    account: &AccountKey,
    id: &AdjustmentId,
    direction: Direction,
    amount_minor: i64,
    currency: Currency,
    seq: Option<u64>,
    now_ms: u64,
) -> Settlement {
    let signed = match direction {
        Direction::Credit => amount_minor,
        Direction::Debit => -amount_minor,
    };
    let merchant = account.merchant.as_str();
    Settlement {
        payment_id: id.as_str().to_owned(),
        kind: SettlementKind::Adjustment,
        sequence: 0,
        merchant_id: merchant.to_owned(),
        account_id: Some(account.account.as_str().to_owned()),
        channel_id: None,
        channel_txn_id: None,
        amount_minor,
        currency,
        channel_fee_minor: 0,
        commission_minor: 0,
        merchant_net_minor: amount_minor,
        account_seq: seq,
        settled_at_ms: now_ms,
        postings: vec![
            Posting {
                ledger: ledger::account(merchant, account.account.as_str()),
                amount_minor: signed,
            },
            Posting {
                ledger: ledger::adjustments(merchant),
                amount_minor: -signed,
            },
        ],
        payment: None,
        adjustment: None,
    }
}

/// What a channel's success does (DESIGN.md §3's table), as a settlement: a supplier charge
/// moves the account's money to the channel's clearing ledger (the platform owes the
/// supplier); a customer's Alipay/WeChat Pay charge is owed by the channel to the merchant
/// (clearing → sales); a top-up moves it from the channel's clearing ledger to the account.
/// The channel's fee (`fee_bps`, rounded half up) and the merchant's net sum to the amount.
/// `seq` is the account's sequence after the movement (`None` in the template written before
/// the script runs, and for a collection, which moves no account).
pub fn channel_success(
    doc: &PaymentDoc,
    tag: ScopeTag,
    channel_id: &str,
    channel_txn_id: Option<&str>,
    fee_bps: u32,
    seq: Option<u64>,
    now_ms: u64,
) -> Settlement {
    let merchant = doc.merchant_id.as_str();
    let amount = doc.amount_minor;
    let clearing = ledger::channel_clearing(channel_id);
    let account = || ledger::account(merchant, doc.account_id.as_deref().unwrap_or_default());
    let (kind, postings) = match (doc.purpose, doc.method) {
        (Purpose::Topup, _) => (
            SettlementKind::Credit,
            vec![(clearing, -amount), (account(), amount)],
        ),
        (Purpose::Charge, Method::Supplier) => (
            SettlementKind::Capture,
            vec![(account(), -amount), (clearing, amount)],
        ),
        (Purpose::Charge, _) => (
            SettlementKind::Capture,
            vec![
                (clearing, -amount),
                (ledger::merchant_sales(merchant), amount),
            ],
        ),
    };
    let fee = crate::money::fee_minor(amount, fee_bps);
    Settlement {
        payment_id: doc.id.clone(),
        kind,
        sequence: 0,
        merchant_id: merchant.to_owned(),
        account_id: doc.account_id.clone(),
        channel_id: Some(channel_id.to_owned()),
        channel_txn_id: channel_txn_id.map(str::to_owned),
        amount_minor: amount,
        currency: doc.currency,
        channel_fee_minor: fee,
        commission_minor: 0,
        merchant_net_minor: amount - fee,
        account_seq: seq,
        settled_at_ms: now_ms,
        postings: postings
            .into_iter()
            .map(|(ledger, amount_minor)| Posting {
                ledger,
                amount_minor,
            })
            .collect(),
        payment: Some(payment_row(
            doc,
            tag,
            PaymentStatus::Succeeded,
            0,
            None,
            now_ms,
        )),
        adjustment: None,
    }
}

/// A refund of `amount_minor` of `doc`, the payment's `number`-th, that the channel (or, for a
/// balance payment, the gateway itself) executed: the reverse of what the payment did. A
/// customer charge: sales → the channel's clearing; a balance or supplier charge: back to the
/// account; a top-up: out of the account to the channel. `refund_id` is kept as the
/// settlement's transaction id; `payment` is the payment's row in its new status.
#[allow(clippy::too_many_arguments)]
pub fn refund(
    doc: &PaymentDoc,
    tag: ScopeTag,
    number: u32,
    refund_id: &str,
    channel_id: Option<&str>,
    amount_minor: i64,
    status: PaymentStatus,
    seq: Option<u64>,
    now_ms: u64,
) -> Settlement {
    let merchant = doc.merchant_id.as_str();
    let account = || ledger::account(merchant, doc.account_id.as_deref().unwrap_or_default());
    let clearing = || ledger::channel_clearing(channel_id.unwrap_or("gateway"));
    let postings = match (doc.purpose, doc.method) {
        (Purpose::Topup, _) => vec![(account(), -amount_minor), (clearing(), amount_minor)],
        (Purpose::Charge, Method::Balance) => vec![
            (ledger::merchant_sales(merchant), -amount_minor),
            (account(), amount_minor),
        ],
        (Purpose::Charge, Method::Supplier) => {
            vec![(clearing(), -amount_minor), (account(), amount_minor)]
        }
        (Purpose::Charge, Method::Alipay | Method::Wechatpay) => vec![
            (ledger::merchant_sales(merchant), -amount_minor),
            (clearing(), amount_minor),
        ],
    };
    let moves_account = matches!(
        (doc.purpose, doc.method),
        (Purpose::Topup, _) | (Purpose::Charge, Method::Balance | Method::Supplier)
    );
    let mut row = payment_row(doc, tag, status, 0, None, now_ms);
    row.status = status;
    Settlement {
        payment_id: doc.id.clone(),
        kind: SettlementKind::Refund,
        sequence: number,
        merchant_id: merchant.to_owned(),
        account_id: if moves_account {
            doc.account_id.clone()
        } else {
            None
        },
        channel_id: channel_id.map(str::to_owned),
        channel_txn_id: Some(refund_id.to_owned()),
        amount_minor,
        currency: doc.currency,
        channel_fee_minor: 0,
        commission_minor: 0,
        merchant_net_minor: amount_minor,
        account_seq: if moves_account { seq } else { None },
        settled_at_ms: now_ms,
        postings: postings
            .into_iter()
            .map(|(ledger, amount_minor)| Posting {
                ledger,
                amount_minor,
            })
            .collect(),
        payment: Some(row),
        adjustment: None,
    }
}

/// Late money (DESIGN.md §7): the channel took `amount_minor` for attempt `attempt` of a
/// payment that had already ended (or for an abandoned attempt). Held in the merchant's
/// suspense ledger; the payment itself is not changed. For a customer payment the channel owes
/// the money (clearing −, suspense +: to refund); for a supplier charge the platform owes the
/// supplier (clearing +, suspense −: to recover from the account). One per attempt (its number
/// is the sequence): a duplicate notice is the same movement.
pub fn suspense(
    doc: &PaymentDoc,
    attempt: u32,
    channel_id: &str,
    channel_txn_id: &str,
    amount_minor: i64,
    now_ms: u64,
) -> Settlement {
    let owed_to_supplier = doc.method == Method::Supplier && doc.purpose == Purpose::Charge;
    let sign = if owed_to_supplier { 1 } else { -1 };
    late_movement(
        doc,
        SettlementKind::Suspense,
        attempt,
        channel_id,
        channel_txn_id,
        amount_minor,
        vec![
            (ledger::channel_clearing(channel_id), sign * amount_minor),
            (ledger::suspense(&doc.merchant_id), -sign * amount_minor),
        ],
        None,
        now_ms,
    )
}

/// The late money of a supplier charge's attempt `attempt` recovered from its account
/// (suspense → account), with the account's sequence after the debit. Its sequence is the
/// attempt's number (the payment's own capture, if any, is sequence 0).
pub fn late_capture(
    doc: &PaymentDoc,
    attempt: u32,
    channel_id: &str,
    channel_txn_id: &str,
    seq: Option<u64>,
    now_ms: u64,
) -> Settlement {
    let account = ledger::account(
        &doc.merchant_id,
        doc.account_id.as_deref().unwrap_or_default(),
    );
    let mut s = late_movement(
        doc,
        SettlementKind::Capture,
        attempt,
        channel_id,
        channel_txn_id,
        doc.amount_minor,
        vec![
            (account, -doc.amount_minor),
            (ledger::suspense(&doc.merchant_id), doc.amount_minor),
        ],
        seq,
        now_ms,
    );
    s.account_id = doc.account_id.clone();
    s
}

/// The sequence of the automatic refund of an attempt's late money (clear of the refund
/// numbers the refunds API hands out).
pub const LATE_REFUND_SEQUENCE_BASE: u32 = 1_000;

/// Late money of a customer payment given back through the channel (suspense → clearing).
pub fn late_refund(
    doc: &PaymentDoc,
    attempt: u32,
    channel_id: &str,
    channel_refund_id: &str,
    amount_minor: i64,
    now_ms: u64,
) -> Settlement {
    late_movement(
        doc,
        SettlementKind::Refund,
        LATE_REFUND_SEQUENCE_BASE + attempt,
        channel_id,
        channel_refund_id,
        amount_minor,
        vec![
            (ledger::suspense(&doc.merchant_id), -amount_minor),
            (ledger::channel_clearing(channel_id), amount_minor),
        ],
        None,
        now_ms,
    )
}

#[allow(clippy::too_many_arguments)]
fn late_movement(
    doc: &PaymentDoc,
    kind: SettlementKind,
    sequence: u32,
    channel_id: &str,
    channel_txn_id: &str,
    amount_minor: i64,
    postings: Vec<(String, i64)>,
    account_seq: Option<u64>,
    now_ms: u64,
) -> Settlement {
    Settlement {
        payment_id: doc.id.clone(),
        kind,
        sequence,
        merchant_id: doc.merchant_id.clone(),
        account_id: None,
        channel_id: Some(channel_id.to_owned()),
        channel_txn_id: Some(channel_txn_id.to_owned()),
        amount_minor,
        currency: doc.currency,
        channel_fee_minor: 0,
        commission_minor: 0,
        merchant_net_minor: amount_minor,
        account_seq,
        settled_at_ms: now_ms,
        postings: postings
            .into_iter()
            .map(|(ledger, amount_minor)| Posting {
                ledger,
                amount_minor,
            })
            .collect(),
        payment: None,
        adjustment: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, MerchantId};
    use proptest::prelude::*;

    fn doc(amount: i64) -> PaymentDoc {
        PaymentDoc {
            id: "pay_x".into(),
            merchant_id: "alpha".into(),
            account_id: Some("acc".into()),
            merchant_order_id: "o".into(),
            amount_minor: amount,
            currency: Currency::Cny,
            method: Method::Balance,
            purpose: Purpose::Charge,
            created_at_ms: 1,
            expires_at_ms: 2,
            description: None,
            notify_url: None,
            metadata: None,
        }
    }

    proptest! {
        #[test]
        fn every_movement_balances_and_splits_exactly(amount in 1i64..=crate::preauth::MAX_SAFE_MINOR, credit in any::<bool>()) {
            let key = AccountKey::new(MerchantId::parse("alpha").unwrap(), AccountId::parse("acc").unwrap());
            let capture = balance_capture(&doc(amount), key.tag, Some(1), 5);
            prop_assert!(capture.check().is_ok());
            let direction = if credit { Direction::Credit } else { Direction::Debit };
            let adj = adjustment(&key, &AdjustmentId::generate(key.tag, 1), direction, amount, Currency::Cny, Some(2), 5);
            prop_assert!(adj.check().is_ok());
            let account_delta: i64 = adj.postings.iter().filter(|p| p.ledger == ledger::account("alpha", "acc")).map(|p| p.amount_minor).sum();
            prop_assert_eq!(account_delta, if credit { amount } else { -amount });
        }

        #[test]
        fn every_channel_success_balances_and_splits_exactly(
            amount in 1i64..=crate::preauth::MAX_SAFE_MINOR,
            fee_bps in 0u32..=10_000,
            which in 0usize..4,
        ) {
            let (method, purpose) = [
                (Method::Supplier, Purpose::Charge),
                (Method::Alipay, Purpose::Charge),
                (Method::Wechatpay, Purpose::Charge),
                (Method::Supplier, Purpose::Topup),
            ][which];
            let mut d = doc(amount);
            d.method = method;
            d.purpose = purpose;
            let key = AccountKey::new(MerchantId::parse("alpha").unwrap(), AccountId::parse("acc").unwrap());
            let s = channel_success(&d, key.tag, "ch", Some("T1"), fee_bps, Some(3), 5);
            prop_assert!(s.check().is_ok());
            let account_delta: i64 = s.postings.iter().filter(|p| p.ledger == ledger::account("alpha", "acc")).map(|p| p.amount_minor).sum();
            let expected = match (method, purpose) {
                (_, Purpose::Topup) => amount,
                (Method::Supplier, _) => -amount,
                _ => 0,
            };
            prop_assert_eq!(account_delta, expected);
        }
    }

    #[test]
    fn a_capture_finalizes_its_payment_and_its_hash_ignores_when_it_was_written() {
        let key = AccountKey::new(
            MerchantId::parse("alpha").unwrap(),
            AccountId::parse("acc").unwrap(),
        );
        let a = balance_capture(&doc(900), key.tag, Some(3), 5);
        let b = balance_capture(&doc(900), key.tag, Some(3), 99);
        assert_eq!(a.content_hash(), b.content_hash());
        assert_ne!(
            a.content_hash(),
            balance_capture(&doc(901), key.tag, Some(3), 5).content_hash()
        );
        assert_ne!(
            a.content_hash(),
            balance_capture(&doc(900), key.tag, Some(4), 5).content_hash()
        );
        assert_eq!(a.payment.as_ref().unwrap().status, PaymentStatus::Succeeded);
        assert_eq!(a.payment.as_ref().unwrap().method, Method::Balance);
    }
}
