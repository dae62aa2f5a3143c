//! The record of everything a channel did: each order accepted, paid, closed and refunded,
//! and each callback attempt with its answer, so tests can prove nothing happened twice.
//! Served by the admin API and by `SimHandle::orders`.

use serde::{Deserialize, Serialize};

use crate::config::ChannelKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Accepted, not paid (Alipay `WAIT_BUYER_PAY` once scanned, WeChat `NOTPAY`, supplier
    /// `accepted`).
    Unpaid,
    Paid,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Closed by a close call.
    Closed,
    /// Its expiry passed unpaid.
    Expired,
}

/// One refund, executed once; repeats of its number only count in `requests`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefundRecord {
    /// `out_request_no` / `out_refund_no` / `refund_id`.
    pub refund_no: String,
    /// The channel's own refund id.
    pub channel_refund_id: String,
    pub amount_cents: u64,
    /// How many requests carried this number (1 = no repeat).
    pub requests: u32,
    pub at_unix_ms: u64,
}

/// One callback attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallbackRecord {
    /// `TRADE_SUCCESS`, `TRADE_FINISHED`, `TRANSACTION.SUCCESS`, `succeeded`.
    pub event: String,
    /// 1-based within the notice; 0 for a notice dropped by the `callback_drop` fault.
    pub attempt: u32,
    /// The HTTP status answered, if any.
    pub status: Option<u16>,
    /// Whether the answer was the protocol's acknowledgement.
    pub acknowledged: bool,
    /// The connection or timeout error, or `dropped`.
    pub error: Option<String>,
    /// Sent again after acknowledgement by the `callback_duplicate` fault.
    pub duplicate: bool,
    pub at_unix_ms: u64,
}

/// An order as the channel sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderRecord {
    pub channel_id: String,
    pub kind: ChannelKind,
    /// The gateway's id for it (`out_trade_no`, supplier `order_id`).
    pub channel_order_id: String,
    /// The channel's own id (Alipay `trade_no`, WeChat `transaction_id`, supplier
    /// `supplier_order_id`).
    pub channel_trade_no: String,
    /// Hundredths of the currency unit (fen for CNY).
    pub amount_cents: u64,
    pub currency: String,
    pub notify_url: String,
    pub status: OrderStatus,
    pub close_reason: Option<CloseReason>,
    /// Alipay: the buyer scanned the code (before that, query answers TRADE_NOT_EXIST).
    pub scanned: bool,
    pub expires_at_unix_seconds: Option<i64>,
    pub created_at_unix_ms: u64,
    pub paid_at_unix_ms: Option<u64>,
    pub closed_at_unix_ms: Option<u64>,
    /// How many create requests carried this order id (repeats return the same order).
    pub create_requests: u32,
    /// How many times money moved for it: never more than 1.
    pub pay_count: u32,
    pub refunded_cents: u64,
    pub refunds: Vec<RefundRecord>,
    pub callbacks: Vec<CallbackRecord>,
    /// The create parameters, to tell a repeat from a conflicting reuse of the id.
    #[serde(skip)]
    pub(crate) fingerprint: String,
    /// The QR code / code URL handed out.
    pub code_url: Option<String>,
    #[serde(skip)]
    pub(crate) seq: u64,
}

impl OrderRecord {
    /// Closes an unpaid order whose expiry has passed; true if it did.
    pub(crate) fn expire_if_due(&mut self, now_unix_ms: u64) -> bool {
        let due = self
            .expires_at_unix_seconds
            .is_some_and(|at| (now_unix_ms / 1000) as i64 >= at);
        if self.status == OrderStatus::Unpaid && due {
            self.status = OrderStatus::Closed;
            self.close_reason = Some(CloseReason::Expired);
            self.closed_at_unix_ms = Some(now_unix_ms);
            return true;
        }
        false
    }

    pub fn refundable_cents(&self) -> u64 {
        if self.status == OrderStatus::Paid {
            self.amount_cents - self.refunded_cents
        } else {
            0
        }
    }
}

/// Strict decimal money: digits, optionally `.` and one or two digits; at most 12 integer
/// digits. Returns hundredths.
pub fn parse_cents(text: &str) -> Option<u64> {
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (text, ""),
    };
    if whole.is_empty()
        || whole.len() > 12
        || (whole.len() > 1 && whole.starts_with('0'))
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || fraction.len() > 2
        || (text.contains('.') && fraction.is_empty())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let fraction: u64 = match fraction.len() {
        0 => 0,
        1 => fraction.parse::<u64>().ok()? * 10,
        _ => fraction.parse().ok()?,
    };
    Some(whole * 100 + fraction)
}

/// Hundredths as `x.yy`.
pub fn format_cents(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_parsed_strictly() {
        assert_eq!(parse_cents("88.88"), Some(8888));
        assert_eq!(parse_cents("88.8"), Some(8880));
        assert_eq!(parse_cents("0.01"), Some(1));
        assert_eq!(parse_cents("100"), Some(10000));
        for bad in [
            "", ".5", "1.", "1.234", "-1", "+1", "01", "1e3", "1,00", " 1",
        ] {
            assert_eq!(parse_cents(bad), None, "{bad}");
        }
        assert_eq!(format_cents(8888), "88.88");
        assert_eq!(format_cents(5), "0.05");
    }
}
