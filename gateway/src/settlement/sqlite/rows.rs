//! SQLite: a payment row as every table group reads it (payments, keys, checks, refunds,
//! webhooks), so none of them needs another's file.

use super::{currency, named};
use crate::preauth::{Method, PaymentStatus, Purpose};
use crate::settlement::PaymentRow;

/// A `payments` row selected with [`PAYMENT_COLUMNS`].
pub(super) fn payment_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PaymentRow> {
    Ok(PaymentRow {
        id: r.get(0)?,
        merchant_id: r.get(1)?,
        account_id: r.get(2)?,
        scope_tag: r.get(3)?,
        merchant_order_id: r.get(4)?,
        amount_minor: r.get(5)?,
        currency: currency(r.get(6)?)?,
        method: named(r.get(7)?, Method::parse)?,
        purpose: named(r.get(8)?, Purpose::parse)?,
        status: named(r.get(9)?, PaymentStatus::parse)?,
        held_minor: r.get(10)?,
        hold_expires_at_ms: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        created_at_ms: r.get::<_, i64>(12)? as u64,
        expires_at_ms: r.get::<_, i64>(13)? as u64,
        updated_at_ms: r.get::<_, i64>(14)? as u64,
        doc: r.get(15)?,
        next_check_at_ms: r.get::<_, Option<i64>>(16)?.map(|v| v as u64),
        checks: r.get(17)?,
        idempotency_key: r.get(18)?,
        request_hash: r.get(19)?,
    })
}

/// The columns of `payments`, in the order [`payment_from_row`] reads them.
pub(super) const PAYMENT_COLUMNS: &str =
    "id, merchant_id, account_id, scope_tag, merchant_order_id, \
    amount_minor, currency, method, purpose, status, held_minor, hold_expires_at_ms, \
    created_at_ms, expires_at_ms, updated_at_ms, doc, next_check_at_ms, checks, \
    idempotency_key, request_hash";
