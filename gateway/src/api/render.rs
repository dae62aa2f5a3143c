//! The JSON resources (DESIGN.md §4): amounts as decimal strings with exactly the currency's
//! digits, timestamps as RFC 3339 UTC.
//!
//! Written straight from typed structs, in one pass, into the response: no `Value` tree. The
//! bytes are the ones a `serde_json::Value` gave (clients hold the contract): an object's keys
//! in byte order (the order of `serde_json::Map`), hence each struct's fields in that order.

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::extract::rfc3339;
use crate::money::format_minor;
use crate::preauth::{AccountSnapshot, Method, PaymentRecord, PaymentStatus, Purpose};
use crate::settlement::{AttemptOutcome, AttemptRow, RefundRow, RefundStatus};
use crate::webhooks::Delivery;

pub fn account(id: &str, a: &AccountSnapshot) -> Value {
    json!({
        "id": id,
        "currency": a.currency.code(),
        "balance": format_minor(a.balance, a.currency),
        "held": format_minor(a.held, a.currency),
        "credit_limit": format_minor(a.credit_limit, a.currency),
        "available": format_minor(a.available(), a.currency),
    })
}

/// The payment resource. Fields in byte order of their names (see the module's comment).
#[derive(Serialize)]
pub struct Payment<'a> {
    account_id: &'a Option<String>,
    action: Value,
    amount: String,
    attempts: Vec<Attempt<'a>>,
    created_at: String,
    currency: &'static str,
    description: &'a Option<String>,
    expires_at: String,
    id: &'a str,
    merchant_order_id: &'a str,
    metadata: &'a Option<Map<String, Value>>,
    method: Method,
    notify_url: &'a Option<String>,
    purpose: Purpose,
    refunds: Vec<Refund<'a>>,
    status: PaymentStatus,
    webhooks: &'a [Delivery],
}

#[derive(Serialize)]
struct Attempt<'a> {
    channel_id: &'a str,
    channel_order_id: &'a str,
    latency_ms: Option<u64>,
    outcome: AttemptOutcome,
}

#[derive(Serialize)]
struct Refund<'a> {
    amount: String,
    created_at: String,
    id: &'a str,
    status: RefundStatus,
}

/// A payment with its attempts; its `action` is the one the accepted attempt gave, while the
/// payment is pending (once it ended there is nothing left for the customer to do).
pub fn payment<'a>(
    p: &'a PaymentRecord,
    attempts: &'a [AttemptRow],
    refunds: &'a [RefundRow],
    webhooks: &'a [Delivery],
) -> Payment<'a> {
    let d = &p.doc;
    let action = match p.status {
        // Read into a `Value`: its keys come out in byte order, whatever the channel's order.
        PaymentStatus::Pending => attempts
            .iter()
            .rev()
            .find_map(|a| a.action.as_deref())
            .and_then(|text| serde_json::from_str::<Value>(text).ok())
            .unwrap_or(Value::Null),
        _ => Value::Null,
    };
    Payment {
        account_id: &d.account_id,
        action,
        amount: format_minor(d.amount_minor, d.currency),
        attempts: attempts
            .iter()
            .map(|a| Attempt {
                channel_id: &a.channel_id,
                channel_order_id: &a.channel_order_id,
                latency_ms: a.latency_ms,
                outcome: a.outcome,
            })
            .collect(),
        created_at: rfc3339(d.created_at_ms),
        currency: d.currency.code(),
        description: &d.description,
        expires_at: rfc3339(d.expires_at_ms),
        id: &d.id,
        merchant_order_id: &d.merchant_order_id,
        metadata: &d.metadata,
        method: d.method,
        notify_url: &d.notify_url,
        purpose: d.purpose,
        refunds: refunds
            .iter()
            .map(|r| Refund {
                amount: format_minor(r.amount_minor, r.currency),
                created_at: rfc3339(r.created_at_ms),
                id: &r.refund_id,
                status: r.status,
            })
            .collect(),
        status: p.status,
        webhooks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use crate::preauth::PaymentDoc;
    use crate::settlement::WebhookStatus;

    /// The payment resource as first written: a `Value` tree.
    fn reference(
        p: &PaymentRecord,
        attempts: &[AttemptRow],
        refunds: &[RefundRow],
        webhooks: Value,
    ) -> Value {
        let d = &p.doc;
        let action = match p.status {
            PaymentStatus::Pending => attempts
                .iter()
                .rev()
                .find_map(|a| a.action.as_deref())
                .and_then(|text| serde_json::from_str::<Value>(text).ok())
                .unwrap_or(Value::Null),
            _ => Value::Null,
        };
        let attempts: Vec<Value> = attempts
            .iter()
            .map(|a| {
                json!({
                    "channel_id": a.channel_id,
                    "channel_order_id": a.channel_order_id,
                    "outcome": a.outcome,
                    "latency_ms": a.latency_ms,
                })
            })
            .collect();
        json!({
            "id": d.id,
            "merchant_order_id": d.merchant_order_id,
            "account_id": d.account_id,
            "amount": format_minor(d.amount_minor, d.currency),
            "currency": d.currency.code(),
            "method": d.method,
            "purpose": d.purpose,
            "status": p.status,
            "created_at": rfc3339(d.created_at_ms),
            "expires_at": rfc3339(d.expires_at_ms),
            "action": action,
            "attempts": attempts,
            "refunds": refunds.iter().map(|r| json!({
                "id": r.refund_id,
                "amount": format_minor(r.amount_minor, r.currency),
                "status": r.status,
                "created_at": rfc3339(r.created_at_ms),
            })).collect::<Vec<_>>(),
            "webhooks": webhooks,
            "description": d.description,
            "notify_url": d.notify_url,
            "metadata": d.metadata,
        })
    }

    fn record(status: PaymentStatus, extras: bool) -> PaymentRecord {
        let mut metadata = Map::new();
        metadata.insert("z\"key".into(), json!("v\u{1}é"));
        metadata.insert("a".into(), json!("</script>"));
        PaymentRecord {
            doc: PaymentDoc {
                id: "pay_1".into(),
                merchant_id: "alpha".into(),
                account_id: extras.then(|| "acc".into()),
                merchant_order_id: "o-\"1\"".into(),
                amount_minor: 12_345,
                currency: Currency::Cny,
                method: Method::Supplier,
                purpose: Purpose::Charge,
                created_at_ms: 1_714_565_700_123,
                expires_at_ms: 1_714_566_700_000,
                description: extras.then(|| "a \\ description\n".into()),
                notify_url: extras.then(|| "https://m.example/h?a=1&b=2".into()),
                metadata: extras.then_some(metadata),
            },
            status,
            held_minor: 0,
            accepted: None,
        }
    }

    fn attempt(n: u32, action: Option<&str>) -> AttemptRow {
        AttemptRow {
            payment_id: "pay_1".into(),
            attempt: n,
            channel_id: format!("supplier-{n}"),
            channel_order_id: format!("pay_1_{n}"),
            outcome: AttemptOutcome::Unknown,
            latency_ms: (n > 1).then_some(u64::from(n) * 10),
            action: action.map(str::to_owned),
            channel_txn_id: None,
            created_at_ms: 1,
            updated_at_ms: 2,
        }
    }

    fn refund(n: u32) -> RefundRow {
        RefundRow {
            refund_id: format!("re_1_{n}"),
            payment_id: "pay_1".into(),
            number: n,
            amount_minor: 100,
            currency: Currency::Cny,
            status: RefundStatus::Pending,
            channel_id: None,
            channel_order_id: None,
            reason: None,
            created_at_ms: 1_714_565_700_000,
            updated_at_ms: 1,
            idempotency_key: None,
        }
    }

    #[test]
    fn the_payment_resource_is_byte_for_byte_the_value_tree_it_was() {
        let deliveries = [Delivery::announced(
            "pay_1",
            "payment.succeeded",
            0,
            WebhookStatus::Skipped,
            1_714_565_700_000,
        )];
        let attempts = [
            attempt(1, None),
            attempt(
                2,
                Some(r#"{"type":"qr_code","qr_code":"https://q/1","b":[1,{"z":1,"a":2}]}"#),
            ),
            attempt(3, Some("not json")),
        ];
        let refunds = [refund(1), refund(2)];
        for status in [PaymentStatus::Pending, PaymentStatus::Succeeded] {
            for extras in [false, true] {
                let p = record(status, extras);
                for (attempts, refunds, webhooks) in [
                    (&attempts[..], &refunds[..], &deliveries[..]),
                    (&attempts[..2], &[][..], &[][..]),
                    (&[][..], &refunds[..1], &deliveries[..]),
                ] {
                    let typed =
                        serde_json::to_vec(&payment(&p, attempts, refunds, webhooks)).unwrap();
                    let tree = reference(
                        &p,
                        attempts,
                        refunds,
                        serde_json::to_value(webhooks).unwrap(),
                    );
                    assert_eq!(
                        String::from_utf8(typed).unwrap(),
                        serde_json::to_string(&tree).unwrap()
                    );
                }
            }
        }
    }
}
