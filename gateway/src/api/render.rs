//! The JSON resources (DESIGN.md §4): amounts as decimal strings with exactly the currency's
//! digits, timestamps as RFC 3339 UTC.

use serde_json::{json, Value};

use super::extract::rfc3339;
use crate::money::format_minor;
use crate::preauth::{AccountSnapshot, PaymentRecord};
use crate::settlement::{AttemptRow, RefundRow};

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

/// A payment with its attempts; its `action` is the one the accepted attempt gave, while the
/// payment is pending (once it ended there is nothing left for the customer to do).
pub fn payment(
    p: &PaymentRecord,
    attempts: &[AttemptRow],
    refunds: &[RefundRow],
    webhooks: Value,
) -> Value {
    let d = &p.doc;
    let action = match p.status {
        crate::preauth::PaymentStatus::Pending => attempts
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
