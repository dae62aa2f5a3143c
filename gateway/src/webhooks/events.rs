//! The event catalogue (docs/webhooks.md) and how an event is derived from what the settlement
//! store writes. Pure functions: both backends call them inside the transaction that writes the
//! payment's final state, so the outbox holds an event exactly when that state is on disk, and
//! the unique `(payment_id, type, sequence)` makes a re-driven write enqueue nothing.
//!
//! | written | event |
//! | --- | --- |
//! | a `capture` or `credit` settlement whose payment row is `succeeded` | `payment.succeeded` |
//! | a `refund` settlement (sequence = the refund number) | `refund.succeeded` |
//! | a `suspense` settlement (late money; sequence = the attempt) | `payment.late_money` |
//! | an `adjustment` settlement | none (an admin movement, not a payment's) |
//! | a final status `failed` / `canceled` / `expired` | `payment.failed` / `payment.canceled` / `payment.expired` |
//!
//! | a refund ending `failed` (`set_refund_status`) | `refund.failed` (sequence = the refund's number) |

use serde::{Deserialize, Serialize};

use crate::money::format_minor;
use crate::settlement::{PaymentRow, Settlement, SettlementKind, WebhookEvent, WebhookStatus};
use crate::time::rfc3339;

pub const PAYMENT_SUCCEEDED: &str = "payment.succeeded";
pub const PAYMENT_FAILED: &str = "payment.failed";
pub const PAYMENT_CANCELED: &str = "payment.canceled";
pub const PAYMENT_EXPIRED: &str = "payment.expired";
pub const PAYMENT_LATE_MONEY: &str = "payment.late_money";
pub const REFUND_SUCCEEDED: &str = "refund.succeeded";
/// A refund the channel refused (its reservation released).
pub const REFUND_FAILED: &str = "refund.failed";

/// Every event type, as documented.
pub const CATALOGUE: &[&str] = &[
    PAYMENT_SUCCEEDED,
    PAYMENT_FAILED,
    PAYMENT_CANCELED,
    PAYMENT_EXPIRED,
    PAYMENT_LATE_MONEY,
    REFUND_SUCCEEDED,
    REFUND_FAILED,
];

/// Characters of an event id after `evt_` (≈ 155 bits).
const EVENT_ID_CHARS: usize = 26;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The id of a payment's event of `event_type` numbered `sequence` (the store holds one such
/// event: `webhook_events_once`): `evt_` + 26 base62 characters of a SHA-256 of the three.
/// Derived rather than drawn, so a creation's answer names the event its commit enqueued
/// without reading it back, and a re-driven commit names the same event.
pub fn event_id(payment_id: &str, event_type: &str, sequence: u32) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in [payment_id.as_bytes(), event_type.as_bytes()] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.update(sequence.to_be_bytes());
    let digest = hasher.finalize();
    // 26 digits of a 248-bit number, base 62 (62^26 < 2^155 < 2^248: every digit is uniform
    // enough; the first 31 bytes are read as the number, most significant first): its 26 lowest
    // base-62 digits, taken ten at a time (62^10 < 2^64) by a long division over 64-bit limbs.
    let mut bytes = [0u8; 32];
    bytes[1..].copy_from_slice(&digest[..31]);
    let mut limbs = [0u64; 4];
    for (limb, chunk) in limbs.iter_mut().zip(bytes.chunks_exact(8)) {
        *limb = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
    }
    let mut id = String::with_capacity(4 + EVENT_ID_CHARS);
    id.push_str("evt_");
    let mut digits = [0u8; EVENT_ID_CHARS];
    let mut end = EVENT_ID_CHARS;
    while end > 0 {
        let count = end.min(10);
        // limbs /= 62^count, keeping the remainder.
        let divisor = 62u64.pow(count as u32);
        let mut remainder = 0u128;
        for limb in limbs.iter_mut() {
            let value = (remainder << 64) | u128::from(*limb);
            *limb = (value / u128::from(divisor)) as u64;
            remainder = value % u128::from(divisor);
        }
        let mut chunk = remainder as u64;
        for digit in digits[end - count..end].iter_mut().rev() {
            *digit = BASE62[(chunk % 62) as usize];
            chunk /= 62;
        }
        end -= count;
    }
    id.push_str(std::str::from_utf8(&digits).expect("base62 is ASCII"));
    id
}

/// Whether the store must read the stored payment row to announce this settlement (it does not
/// carry one, and its event names the payment): refunds and late money.
pub(crate) fn needs_stored_payment(s: &Settlement) -> bool {
    s.payment.is_none() && matches!(s.kind, SettlementKind::Refund | SettlementKind::Suspense)
}

/// The event a settlement the store has just *inserted* announces, if any. `payment` is the
/// payment row as now stored: the settlement's own row when it was written, else (refunds,
/// late money) the stored one, `None` if there is none.
pub(crate) fn for_settlement(
    s: &Settlement,
    payment: Option<&PaymentRow>,
    now_ms: u64,
) -> Option<WebhookEvent> {
    let event_type = match s.kind {
        SettlementKind::Capture | SettlementKind::Credit => {
            if payment?.status != crate::preauth::PaymentStatus::Succeeded {
                return None;
            }
            PAYMENT_SUCCEEDED
        }
        SettlementKind::Refund => REFUND_SUCCEEDED,
        SettlementKind::Suspense => PAYMENT_LATE_MONEY,
        SettlementKind::Adjustment => return None,
    };
    let payment_json = match payment {
        Some(p) => EventPayment::of(p),
        // No stored payment (should not happen for a refund or late money): name what the
        // settlement knows.
        None => EventPayment {
            account_id: s.account_id.as_deref(),
            amount: None,
            currency: s.currency.code(),
            id: &s.payment_id,
            merchant_order_id: None,
            method: None,
            purpose: None,
            status: None,
        },
    };
    Some(build(
        event_type,
        &s.merchant_id,
        &s.payment_id,
        s.sequence,
        payment.and_then(notify_url),
        &EventData {
            payment: payment_json,
            refund: None,
            settlement: Some(EventSettlement {
                amount: format_minor(s.amount_minor, s.currency),
                channel_id: s.channel_id.as_deref(),
                channel_txn_id: s.channel_txn_id.as_deref(),
                currency: s.currency.code(),
                kind: s.kind.as_str(),
                sequence: s.sequence,
            }),
        },
        // Dated by the movement (not the commit), so a creation's answer can name it.
        s.settled_at_ms.min(now_ms),
    ))
}

/// The event a pending payment's final status without money announces (`payment` is its row
/// as now stored), if any.
pub(crate) fn for_final_status(payment: &PaymentRow, now_ms: u64) -> Option<WebhookEvent> {
    let event_type = match payment.status.as_str() {
        "failed" => PAYMENT_FAILED,
        "canceled" => PAYMENT_CANCELED,
        "expired" => PAYMENT_EXPIRED,
        _ => return None,
    };
    Some(build(
        event_type,
        &payment.merchant_id,
        &payment.id,
        0,
        notify_url(payment),
        &EventData {
            payment: EventPayment::of(payment),
            refund: None,
            settlement: None,
        },
        now_ms,
    ))
}

/// `refund.failed`: the channel refused a refund (its reservation was released). `payment` is
/// the payment's row as stored; the refund's number is the event's sequence.
pub(crate) fn for_failed_refund(
    payment: &PaymentRow,
    refund: &crate::settlement::RefundRow,
    now_ms: u64,
) -> WebhookEvent {
    build(
        REFUND_FAILED,
        &payment.merchant_id,
        &payment.id,
        refund.number,
        notify_url(payment),
        &EventData {
            payment: EventPayment::of(payment),
            refund: Some(EventRefund {
                amount: format_minor(refund.amount_minor, refund.currency),
                id: &refund.refund_id,
                status: "failed",
            }),
            settlement: None,
        },
        now_ms,
    )
}

/// An event's JSON body, written in one pass: `{"created_at", "data", "id", "type"}`. Every
/// object's fields are declared in byte order of their names: the order the payloads have
/// always had (they were `serde_json::Value` trees), which receivers may have pinned.
#[derive(Serialize)]
struct Payload<'a> {
    created_at: String,
    data: &'a EventData<'a>,
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
}

#[derive(Serialize)]
struct EventData<'a> {
    payment: EventPayment<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refund: Option<EventRefund<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    settlement: Option<EventSettlement<'a>>,
}

/// The payment as an event shows it (a subset of the API's payment resource, DESIGN.md §4).
#[derive(Serialize)]
struct EventPayment<'a> {
    account_id: Option<&'a str>,
    amount: Option<String>,
    currency: &'static str,
    id: &'a str,
    merchant_order_id: Option<&'a str>,
    method: Option<crate::preauth::Method>,
    purpose: Option<crate::preauth::Purpose>,
    status: Option<crate::preauth::PaymentStatus>,
}

impl<'a> EventPayment<'a> {
    fn of(p: &'a PaymentRow) -> Self {
        Self {
            account_id: p.account_id.as_deref(),
            amount: Some(format_minor(p.amount_minor, p.currency)),
            currency: p.currency.code(),
            id: &p.id,
            merchant_order_id: Some(&p.merchant_order_id),
            method: Some(p.method),
            purpose: Some(p.purpose),
            status: Some(p.status),
        }
    }
}

#[derive(Serialize)]
struct EventRefund<'a> {
    amount: String,
    id: &'a str,
    status: &'static str,
}

#[derive(Serialize)]
struct EventSettlement<'a> {
    amount: String,
    channel_id: Option<&'a str>,
    channel_txn_id: Option<&'a str>,
    currency: &'static str,
    kind: &'static str,
    sequence: u32,
}

fn build(
    event_type: &'static str,
    merchant_id: &str,
    payment_id: &str,
    sequence: u32,
    url: Option<String>,
    data: &EventData<'_>,
    now_ms: u64,
) -> WebhookEvent {
    let id = event_id(payment_id, event_type, sequence);
    let payload = serde_json::to_string(&Payload {
        created_at: rfc3339(now_ms),
        data,
        id: &id,
        event_type,
    })
    .expect("an event payload serializes");
    WebhookEvent {
        id,
        merchant_id: merchant_id.to_owned(),
        payment_id: payment_id.to_owned(),
        event_type: event_type.to_owned(),
        sequence,
        payload,
        url,
        status: WebhookStatus::Pending,
        attempts: 0,
        next_attempt_at_ms: Some(now_ms),
        last_status: None,
        last_error: None,
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
    }
}

/// The only part of the payment document an event needs. Read leniently: a document that does
/// not parse has no notify URL (the merchant's configured URL is used), never a failed commit.
#[derive(Deserialize)]
struct NotifyUrl {
    #[serde(default)]
    notify_url: Option<String>,
}

/// The payment's `notify_url`, with control characters percent-encoded (PostgreSQL text cannot
/// hold NUL; the worker refuses such a URL rather than the store refusing the commit).
pub(crate) fn notify_url(p: &PaymentRow) -> Option<String> {
    let url = serde_json::from_str::<NotifyUrl>(&p.doc).ok()?.notify_url?;
    if !url.chars().any(char::is_control) {
        return Some(url);
    }
    Some(
        url.chars()
            .map(|c| {
                if c.is_control() {
                    let mut buf = [0u8; 4];
                    c.encode_utf8(&mut buf)
                        .bytes()
                        .map(|b| format!("%{b:02X}"))
                        .collect()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::money::Currency;
    use crate::settlement::Posting;

    fn row(status: &str, doc: &str) -> PaymentRow {
        PaymentRow {
            id: "pay_1".into(),
            merchant_id: "alpha".into(),
            account_id: Some("acc".into()),
            scope_tag: "TAG0000000".into(),
            merchant_order_id: "o1".into(),
            amount_minor: 12_345,
            currency: Currency::Cny,
            method: "balance".parse().unwrap(),
            purpose: "charge".parse().unwrap(),
            status: status.parse().unwrap(),
            held_minor: 0,
            hold_expires_at_ms: None,
            created_at_ms: 1,
            expires_at_ms: 2,
            updated_at_ms: 3,
            doc: doc.into(),
            next_check_at_ms: None,
            checks: 0,
            idempotency_key: None,
            request_hash: None,
        }
    }

    fn settlement(kind: SettlementKind, payment: Option<PaymentRow>) -> Settlement {
        Settlement {
            payment_id: "pay_1".into(),
            kind,
            sequence: 2,
            merchant_id: "alpha".into(),
            account_id: Some("acc".into()),
            channel_id: Some("supplier-main".into()),
            channel_txn_id: Some("T1".into()),
            amount_minor: 500,
            currency: Currency::Cny,
            channel_fee_minor: 0,
            commission_minor: 0,
            merchant_net_minor: 500,
            account_seq: None,
            settled_at_ms: 9,
            postings: vec![
                Posting {
                    ledger: "a".into(),
                    amount_minor: -500,
                },
                Posting {
                    ledger: "b".into(),
                    amount_minor: 500,
                },
            ],
            payment,
            adjustment: None,
        }
    }

    /// The digits as first defined: one byte-wise long division by 62 per digit.
    fn event_id_by_bytes(payment_id: &str, event_type: &str, sequence: u32) -> String {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for part in [payment_id.as_bytes(), event_type.as_bytes()] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.update(sequence.to_be_bytes());
        let digest = hasher.finalize();
        let mut number = [0u8; 31];
        number.copy_from_slice(&digest[..31]);
        let mut digits = [0u8; EVENT_ID_CHARS];
        for digit in digits.iter_mut().rev() {
            let mut remainder = 0u32;
            for byte in number.iter_mut() {
                let value = (remainder << 8) | u32::from(*byte);
                *byte = (value / 62) as u8;
                remainder = value % 62;
            }
            *digit = BASE62[remainder as usize];
        }
        format!("evt_{}", std::str::from_utf8(&digits).unwrap())
    }

    #[test]
    fn event_ids_are_the_same_as_with_the_first_division() {
        // Ids already stored and announced must come out the same.
        for n in 0..2_000u32 {
            let payment = format!("pay_{n:x}");
            for event in [PAYMENT_SUCCEEDED, REFUND_SUCCEEDED] {
                assert_eq!(
                    event_id(&payment, event, n % 7),
                    event_id_by_bytes(&payment, event, n % 7)
                );
            }
        }
    }

    #[test]
    fn event_ids_are_evt_and_26_base62_characters_one_per_event() {
        let a = event_id("pay_1", PAYMENT_SUCCEEDED, 0);
        assert_eq!(
            a,
            event_id("pay_1", PAYMENT_SUCCEEDED, 0),
            "derived, not drawn"
        );
        assert!(a.starts_with("evt_"));
        assert_eq!(a.len(), 4 + EVENT_ID_CHARS);
        assert!(a[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        let others = [
            event_id("pay_2", PAYMENT_SUCCEEDED, 0),
            event_id("pay_1", REFUND_SUCCEEDED, 0),
            event_id("pay_1", PAYMENT_SUCCEEDED, 1),
            // The parts are length-prefixed: no two splits of one string meet.
            event_id("pay_1p", "ayment.succeeded", 0),
        ];
        for other in &others {
            assert_ne!(&a, other);
        }
    }

    #[test]
    fn a_succeeded_capture_announces_payment_succeeded_with_its_payment_and_url() {
        let p = row(
            "succeeded",
            r#"{"id":"pay_1","notify_url":"https://m.example/h"}"#,
        );
        let mut s = settlement(SettlementKind::Capture, Some(p.clone()));
        // Dated by the movement (a minute before the commit), due at once.
        s.settled_at_ms = 1_714_565_700_000;
        let e = for_settlement(&s, s.payment.as_ref(), 1_714_565_760_000).unwrap();
        assert_eq!(e.id, event_id("pay_1", PAYMENT_SUCCEEDED, 2));
        assert_eq!(e.event_type, PAYMENT_SUCCEEDED);
        assert_eq!(e.url.as_deref(), Some("https://m.example/h"));
        assert_eq!(
            (e.sequence, e.status, e.attempts),
            (2, WebhookStatus::Pending, 0)
        );
        assert_eq!(e.next_attempt_at_ms, Some(1_714_565_700_000));
        let body: Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(body["id"], e.id);
        assert_eq!(body["type"], "payment.succeeded");
        assert_eq!(body["created_at"], "2024-05-01T12:15:00Z");
        assert_eq!(body["data"]["payment"]["amount"], "123.45");
        assert_eq!(body["data"]["payment"]["status"], "succeeded");
        assert_eq!(body["data"]["payment"]["merchant_order_id"], "o1");
        assert_eq!(body["data"]["settlement"]["amount"], "5.00");
        assert_eq!(body["data"]["settlement"]["kind"], "capture");
        assert_eq!(body["data"]["settlement"]["channel_txn_id"], "T1");
    }

    #[test]
    fn only_money_a_merchant_must_hear_about_is_announced() {
        let pending = row("pending", "{}");
        let s = settlement(SettlementKind::Capture, Some(pending.clone()));
        assert!(for_settlement(&s, Some(&pending), 1).is_none());
        let s = settlement(SettlementKind::Capture, None);
        assert!(for_settlement(&s, None, 1).is_none());
        let done = row("succeeded", "{}");
        let s = settlement(SettlementKind::Adjustment, Some(done.clone()));
        assert!(for_settlement(&s, Some(&done), 1).is_none());
        let s = settlement(SettlementKind::Refund, None);
        assert!(needs_stored_payment(&s));
        let e = for_settlement(&s, Some(&done), 1).unwrap();
        assert_eq!((e.event_type.as_str(), e.sequence), (REFUND_SUCCEEDED, 2));
        assert_eq!(e.url, None, "no notify_url: the merchant's URL");
        let s = settlement(SettlementKind::Suspense, None);
        let e = for_settlement(&s, None, 1).unwrap();
        assert_eq!(e.event_type, PAYMENT_LATE_MONEY);
        let body: Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(body["data"]["payment"]["id"], "pay_1");
    }

    #[test]
    fn final_statuses_map_to_their_events() {
        for (status, event) in [
            ("failed", Some(PAYMENT_FAILED)),
            ("canceled", Some(PAYMENT_CANCELED)),
            ("expired", Some(PAYMENT_EXPIRED)),
            ("succeeded", None),
            ("pending", None),
        ] {
            let e = for_final_status(&row(status, "not json"), 1);
            assert_eq!(e.as_ref().map(|e| e.event_type.as_str()), event, "{status}");
            if let Some(e) = e {
                assert_eq!((e.sequence, e.url), (0, None));
                let body: Value = serde_json::from_str(&e.payload).unwrap();
                assert!(body["data"].get("settlement").is_none());
            }
        }
    }

    #[test]
    fn control_characters_in_a_notify_url_are_percent_encoded() {
        let p = row("failed", r#"{"notify_url":"https://m.example/\u0000x"}"#);
        let e = for_final_status(&p, 1).unwrap();
        assert_eq!(e.url.as_deref(), Some("https://m.example/%00x"));
    }

    /// A payload as first written: a `serde_json::Value` tree.
    fn reference_payload(e: &WebhookEvent, data: Value) -> String {
        json!({
            "id": e.id,
            "type": e.event_type,
            "created_at": rfc3339(e.created_at_ms),
            "data": data,
        })
        .to_string()
    }

    fn reference_payment(p: &PaymentRow) -> Value {
        json!({
            "id": p.id,
            "merchant_order_id": p.merchant_order_id,
            "account_id": p.account_id,
            "amount": format_minor(p.amount_minor, p.currency),
            "currency": p.currency.code(),
            "method": p.method,
            "purpose": p.purpose,
            "status": p.status,
        })
    }

    fn reference_settlement(s: &Settlement) -> Value {
        json!({
            "kind": s.kind.as_str(),
            "sequence": s.sequence,
            "amount": format_minor(s.amount_minor, s.currency),
            "currency": s.currency.code(),
            "channel_id": s.channel_id,
            "channel_txn_id": s.channel_txn_id,
        })
    }

    #[test]
    fn payloads_are_byte_for_byte_the_value_trees_they_were() {
        let mut p = row("succeeded", "{}");
        p.merchant_order_id = "o-\"quoted\"\n".into();
        let mut no_account = p.clone();
        no_account.account_id = None;
        for p in [p, no_account] {
            for kind in [
                SettlementKind::Capture,
                SettlementKind::Refund,
                SettlementKind::Suspense,
            ] {
                let mut s = settlement(kind, Some(p.clone()));
                for channel in [None, Some("supplier-main".to_owned())] {
                    s.channel_id = channel.clone();
                    s.channel_txn_id = channel.clone();
                    let e = for_settlement(&s, Some(&p), 7).unwrap();
                    let data = json!({"payment": reference_payment(&p), "settlement": reference_settlement(&s)});
                    assert_eq!(e.payload, reference_payload(&e, data));
                    if kind != SettlementKind::Capture {
                        let e = for_settlement(&s, None, 7).unwrap();
                        let data = json!({
                            "payment": {
                                "id": s.payment_id,
                                "merchant_order_id": null,
                                "account_id": s.account_id,
                                "amount": null,
                                "currency": s.currency.code(),
                                "method": null,
                                "purpose": null,
                                "status": null,
                            },
                            "settlement": reference_settlement(&s),
                        });
                        assert_eq!(e.payload, reference_payload(&e, data));
                    }
                }
            }
            for status in ["failed", "canceled", "expired"] {
                let mut ended = p.clone();
                ended.status = status.parse().unwrap();
                let e = for_final_status(&ended, 9).unwrap();
                let data = json!({"payment": reference_payment(&ended)});
                assert_eq!(e.payload, reference_payload(&e, data));
            }
            let refund = crate::settlement::RefundRow {
                refund_id: "re_1_1".into(),
                payment_id: p.id.clone(),
                number: 1,
                amount_minor: 250,
                currency: Currency::Cny,
                status: crate::settlement::RefundStatus::Failed,
                channel_id: None,
                channel_order_id: None,
                reason: None,
                created_at_ms: 1,
                updated_at_ms: 2,
                idempotency_key: None,
            };
            let e = for_failed_refund(&p, &refund, 11);
            let data = json!({
                "payment": reference_payment(&p),
                "refund": {
                    "id": refund.refund_id,
                    "amount": format_minor(refund.amount_minor, refund.currency),
                    "status": "failed",
                },
            });
            assert_eq!(e.payload, reference_payload(&e, data));
        }
    }
}
