//! The shared types of the channel contract: what the [`Channel`](super::Channel) trait takes
//! and answers, and the ids it speaks in.

use std::fmt;

use serde::Deserialize;

use super::ChannelError;
use crate::ids::PaymentId;
use crate::money::{Amount, Currency};

/// Orders with less time than this left before their expiry are refused locally (an order
/// that expires while it travels is useless). The real bound on how short a payment may live
/// is `payments.min_expires_in_seconds` (60 s by default).
pub const MIN_ORDER_LIFETIME_MS: u64 = 1_000;

/// The longest description sent (WeChat Pay's `description` limit is 127 characters; Alipay's
/// `subject` allows 256).
pub const MAX_DESCRIPTION_CHARS: usize = 127;

/// Which protocol a channel speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Alipay,
    Wechatpay,
    Supplier,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Alipay => "alipay",
            ChannelKind::Wechatpay => "wechatpay",
            ChannelKind::Supplier => "supplier",
        }
    }
}

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The channel's order id (`out_trade_no`, the supplier's `order_id`) of one attempt of one
/// payment: see the `channels` module docs. Holding one proves it has this shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelOrderId {
    text: String,
    attempt: u8,
}

impl ChannelOrderId {
    /// WeChat Pay's limit; ours are 28 to 30 characters.
    pub const MAX_CHARS: usize = 32;
    const PAYMENT_BODY_CHARS: usize = 26;

    /// The id of attempt `attempt` of `payment`: deterministic, distinct for distinct pairs.
    pub fn for_attempt(payment: &PaymentId, attempt: u8) -> Self {
        let body = payment
            .as_str()
            .strip_prefix(PAYMENT_ID_PREFIX)
            .expect("a payment id starts with pay_");
        debug_assert_eq!(body.len(), Self::PAYMENT_BODY_CHARS);
        let text = format!("{body}-{attempt}");
        debug_assert!(text.len() <= Self::MAX_CHARS);
        Self { text, attempt }
    }

    /// Reads an id back from a channel's callback or reply. `None` unless `s` is exactly what
    /// [`ChannelOrderId::for_attempt`] makes for some payment id and attempt (no leading zeros,
    /// attempt ≤ 255), so the mapping is one-to-one.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() > Self::MAX_CHARS {
            return None;
        }
        let (body, attempt_text) = s.split_once('-')?;
        if body.len() != Self::PAYMENT_BODY_CHARS
            || attempt_text.is_empty()
            || attempt_text.len() > 3
            || !attempt_text.bytes().all(|b| b.is_ascii_digit())
            || (attempt_text.len() > 1 && attempt_text.starts_with('0'))
        {
            return None;
        }
        let attempt: u8 = attempt_text.parse().ok()?;
        PaymentId::parse(&format!("{PAYMENT_ID_PREFIX}{body}"))?;
        Some(Self {
            text: s.to_owned(),
            attempt,
        })
    }

    /// The payment this attempt belongs to.
    pub fn payment_id(&self) -> PaymentId {
        let body = &self.text[..Self::PAYMENT_BODY_CHARS];
        PaymentId::parse(&format!("{PAYMENT_ID_PREFIX}{body}"))
            .expect("a channel order id holds a valid payment id")
    }

    pub fn attempt(&self) -> u8 {
        self.attempt
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for ChannelOrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

const PAYMENT_ID_PREFIX: &str = "pay_";

/// The refund number the caller persisted before the first try (Alipay `out_request_no`,
/// WeChat Pay `out_refund_no`, the supplier's `refund_id`) and reuses on every retry: each
/// channel refunds once per number. 1 to 64 characters of `[0-9A-Za-z_-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelRefundId(String);

impl ChannelRefundId {
    pub const MAX_CHARS: usize = 64;

    pub fn parse(s: &str) -> Option<Self> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_CHARS
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        ok.then(|| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a channel is asked to create: one attempt of one payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOrder {
    pub order_id: ChannelOrderId,
    pub amount: Amount,
    pub currency: Currency,
    /// Shown to the customer (Alipay `subject`, WeChat Pay `description`); 1 to
    /// [`MAX_DESCRIPTION_CHARS`] characters, no control characters.
    pub description: String,
    /// Where the channel sends its callbacks for this order.
    pub notify_url: String,
    /// The instant after which the channel must not accept money (unix milliseconds).
    pub expires_at_ms: u64,
}

/// Checks what every protocol needs of a create request at `now_ms`.
pub(crate) fn check_create(req: &CreateOrder, now_ms: u64) -> Result<(), ChannelError> {
    if req.expires_at_ms < now_ms.saturating_add(MIN_ORDER_LIFETIME_MS) {
        return Err(ChannelError::invalid(format!(
            "the order expires in less than {MIN_ORDER_LIFETIME_MS} ms"
        )));
    }
    let chars = req.description.chars().count();
    if chars == 0 || chars > MAX_DESCRIPTION_CHARS || req.description.chars().any(char::is_control)
    {
        return Err(ChannelError::invalid(format!(
            "the description must be 1 to {MAX_DESCRIPTION_CHARS} characters, none a control character"
        )));
    }
    Ok(())
}

/// What the customer does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Show this text as a QR code (Alipay `qr_code`, WeChat Pay `code_url`).
    QrCode(String),
    /// Send the customer to this URL.
    Redirect(String),
    /// Nothing: the channel settles on its own (a supplier order).
    None,
}

/// A created order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub action: Action,
    /// The channel's own id of the order, when the create reply has one.
    pub channel_txn_id: Option<String>,
}

/// An order's state at the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderState {
    /// The channel has no such order. (Alipay: also a precreated order nobody has scanned
    /// yet — see DESIGN.md §5.)
    NotFound,
    /// Waiting for the customer (Alipay `WAIT_BUYER_PAY`, WeChat `NOTPAY`/`USERPAYING`,
    /// supplier `accepted`).
    Pending,
    /// Paid (Alipay `TRADE_SUCCESS`/`TRADE_FINISHED`, WeChat `SUCCESS`, supplier
    /// `succeeded`). The caller compares `amount_minor` *and* `currency` with the payment's
    /// (the currency travels along so that 88 JPY is never read as 0.88 CNY).
    Paid {
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
    /// Paid, then (partly or fully) refunded (WeChat `REFUND`).
    Refunded {
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
    /// Closed without payment (Alipay `TRADE_CLOSED`, WeChat `CLOSED`/`REVOKED`, supplier
    /// `closed`). Alipay also reports a *fully refunded* trade as `TRADE_CLOSED`: a caller that
    /// already saw the payment succeed must not read this as "never paid".
    Closed,
    /// The payment failed (WeChat `PAYERROR`, supplier `failed`); no money moved.
    Failed,
}

impl OrderState {
    /// The close outcome this state means once a close was asked for: `None` while the order
    /// is still payable (the close did not take).
    pub(crate) fn after_close(self) -> Option<CloseOutcome> {
        match self {
            OrderState::NotFound => Some(CloseOutcome::NotFound),
            OrderState::Pending => None,
            OrderState::Paid {
                channel_txn_id,
                amount_minor,
                currency,
            }
            | OrderState::Refunded {
                channel_txn_id,
                amount_minor,
                currency,
            } => Some(CloseOutcome::AlreadyPaid {
                channel_txn_id,
                amount_minor,
                currency,
            }),
            OrderState::Closed | OrderState::Failed => Some(CloseOutcome::Closed),
        }
    }
}

/// The answer to a close: also whether the order was paid (DESIGN.md §6: an unknown outcome
/// is resolved by closing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseOutcome {
    /// Closed now or earlier, unpaid: no money will be taken for this order.
    Closed,
    /// The channel has no such order. With Alipay, a precreated code nobody scanned is in
    /// this state too, and could still be scanned until its `time_expire`.
    NotFound,
    /// Too late: the order was paid (and maybe refunded since).
    AlreadyPaid {
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
}

/// A refund of (part of) a paid order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub order_id: ChannelOrderId,
    /// Persisted by the caller before the first try, reused on retries.
    pub refund_id: ChannelRefundId,
    pub amount: Amount,
    /// The order's total (WeChat Pay requires it).
    pub order_total: Amount,
    pub currency: Currency,
    pub reason: Option<String>,
    /// Where refund notices go (WeChat Pay, supplier); Alipay uses the app's setting.
    pub notify_url: Option<String>,
}

/// The answer to a refund.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    /// The money went back (or had already, for a retried refund number).
    Succeeded { channel_refund_id: Option<String> },
    /// Accepted, to be settled later (a notice or a query tells).
    Pending { channel_refund_id: Option<String> },
    /// Refused after acceptance (WeChat `CLOSED`/`ABNORMAL`, supplier `failed`).
    Failed {
        channel_refund_id: Option<String>,
        status: String,
    },
}

/// A callback as received on `POST /v1/callbacks/{channel_id}`: the raw body (never
/// re-serialized: signatures cover the exact bytes) and the headers.
#[derive(Debug, Clone, Copy)]
pub struct Callback<'a> {
    pub headers: &'a hyper::HeaderMap,
    pub body: &'a [u8],
}

/// What a verified callback says about one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The gateway's channel order id it is about (`out_trade_no`, supplier `order_id`).
    pub order_id: ChannelOrderId,
    /// The channel's id of this notice when it has one (Alipay `notify_id`, WeChat Pay event
    /// `id`), for logs.
    pub notice_id: Option<String>,
    pub event: NoticeEvent,
}

/// The events the gateway acts on (DESIGN.md §5, §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeEvent {
    /// The order was paid (Alipay `TRADE_SUCCESS` without refund fields, WeChat Pay
    /// `TRANSACTION.SUCCESS` with `trade_state` `SUCCESS`, supplier `succeeded`). The caller
    /// compares amount *and* currency with the payment's.
    Paid {
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
    /// Alipay `TRADE_FINISHED`: paid, and no longer refundable. Captures only if the payment
    /// is still pending (its `TRADE_SUCCESS` was lost); never twice.
    Finished {
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
    /// Closed unpaid (Alipay `TRADE_CLOSED` — also sent after a *full refund*, so the caller
    /// checks the payment's state; supplier `closed`).
    Closed,
    /// The payment failed at the channel (supplier `failed`).
    Failed,
    /// A refund of (part of) the order (Alipay `TRADE_SUCCESS` with `refund_fee`/`out_biz_no`,
    /// WeChat Pay `REFUND.*`): the refund logic's business.
    Refund {
        /// Our refund number as sent (`out_biz_no` / `out_refund_no`), when the notice has it.
        refund_id: Option<String>,
        /// The refunded amount (Alipay: `refund_fee`, the total refunded so far).
        amount_minor: i64,
        succeeded: bool,
    },
    /// A genuine notice of a kind the gateway does not act on (acknowledged, nothing done).
    Other(String),
}

/// The answer to a callback, in the protocol's form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackReply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

/// Why a callback was answered as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackAnswer {
    /// Processed (or a genuine duplicate): Alipay `success`, WeChat Pay 204, supplier 200
    /// `{"received": true}`.
    Ack,
    /// Refused for good (forged, stale, mismatched, not ours): 4xx.
    Refused,
    /// Could not be processed now (store down, queue full): 5xx, the channel retries.
    RetryLater,
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::ids::{MerchantId, ScopeTag};
    use proptest::prelude::*;

    #[test]
    fn channel_order_ids_round_trip_and_refuse_other_shapes() {
        let id = order_id();
        assert_eq!(id.as_str().len(), 28);
        assert!(id.as_str().ends_with("-1"));
        let parsed = ChannelOrderId::parse(id.as_str()).unwrap();
        assert_eq!(parsed, id);
        assert_eq!(parsed.attempt(), 1);
        assert_eq!(
            format!("pay_{}", &id.as_str()[..26]),
            parsed.payment_id().as_str()
        );
        let body = &id.as_str()[..26];
        for bad in [
            format!("{body}-01"),
            format!("{body}-256"),
            format!("{body}-"),
            format!("{body}1"),
            format!("{body}-+1"),
            format!("{}-1", &body[..25]),
            format!("{body}x-1"),
            format!("pay_{body}-1"),
            format!("{}{{-1", &body[..25]),
            String::new(),
        ] {
            assert_eq!(ChannelOrderId::parse(&bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn channel_order_ids_are_short_safe_distinct_and_parse_back(
            now_ms in 0u64..(1u64 << 44),
            merchant in "[a-z0-9]{1,12}",
            attempt: u8,
            other_attempt: u8,
        ) {
            let tag = ScopeTag::merchant(&MerchantId::parse(&merchant).unwrap());
            let payment = PaymentId::generate(tag, now_ms);
            let id = ChannelOrderId::for_attempt(&payment, attempt);
            prop_assert!(id.as_str().len() <= ChannelOrderId::MAX_CHARS);
            prop_assert!(id.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
            prop_assert_eq!(ChannelOrderId::for_attempt(&payment, attempt), id.clone());
            let parsed = ChannelOrderId::parse(id.as_str()).unwrap();
            prop_assert_eq!(parsed.payment_id(), payment.clone());
            prop_assert_eq!(parsed.attempt(), attempt);
            if other_attempt != attempt {
                prop_assert_ne!(ChannelOrderId::for_attempt(&payment, other_attempt), id);
            }
        }
    }

    #[test]
    fn create_requests_need_time_left_and_a_sane_description() {
        let order = create_order();
        assert_eq!(check_create(&order, NOW_MS), Ok(()));
        let late = CreateOrder {
            expires_at_ms: NOW_MS + MIN_ORDER_LIFETIME_MS - 1,
            ..order.clone()
        };
        assert!(matches!(
            check_create(&late, NOW_MS),
            Err(ChannelError::InvalidRequest { .. })
        ));
        for description in [String::new(), "a\nb".into(), "x".repeat(128)] {
            let bad = CreateOrder {
                description,
                ..order.clone()
            };
            assert!(check_create(&bad, NOW_MS).is_err());
        }
    }
}
