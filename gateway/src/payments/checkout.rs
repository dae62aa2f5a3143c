//! A channel payment's create call (DESIGN.md §6): route it, then call channels one attempt
//! at a time, failing over **only** when an attempt certainly did not take effect.
//!
//! The order of things, for every payment that goes to a channel:
//! 1. [`Route::plan`] ranks the channels that accept it now, and reserves a breaker permit on
//!    the first one that grants it, so the payment's intent (committed before anything is
//!    sent) names its first attempt and its channel order id;
//! 2. [`attempt`] calls the channel. Accepted → done (`201 pending` with the action; the
//!    outcome rides the next group commit, unwaited, and the balance store keeps the action
//!    meanwhile: see `BalanceStore::accept`). Certainly
//!    not executed (connection refused, open breaker, verified refusal) → the next channel,
//!    whose attempt row is committed before its call. Unknown (timeout, 5xx, unverifiable
//!    reply) → the attempt is closed at the channel first: a close that confirms the order
//!    is dead allows the next channel; a close that finds it paid makes the payment succeed;
//!    anything else stops here (`201 pending`, hold kept, resolved later by query/close) —
//!    never a second execution;
//! 3. at most `payments.max_attempts` attempts; when none executed, the caller fails the
//!    payment and answers `503 no_channel_available`.
//!
//! A close that answers "no such order" confirms a dead order only for the customer-paid
//! channels (Alipay, WeChat Pay): their order is paid by a customer scanning a code that
//! never reached anyone, since its create timed out. A supplier executes an order on its
//! own, so a late-arriving create could still execute after "no such order": that attempt
//! stays unknown.

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::channels::{
    Action, ChannelKind, ChannelOrderId, CloseOutcome, CreateOrder, MAX_DESCRIPTION_CHARS,
};
use crate::ids::PaymentId;
use crate::money::{Amount, Currency};
use crate::preauth::{AcceptedAttempt, Method, PaymentDoc};
use crate::routing::{CallPermit, RouteRequest};
use crate::settlement::{AttemptOutcome, AttemptRow, AttemptUpdate};
use crate::state::Core;
use crate::telemetry;

/// The failover order of one payment and where it stands.
pub struct Route {
    order: Vec<usize>,
    next: usize,
}

/// A reserved call: the channel (an index into the registry) and its breaker permit.
pub struct Reserved {
    pub index: usize,
    pub permit: CallPermit,
}

impl Route {
    /// Ranks the channels for `doc` now and reserves the first one that grants a permit.
    pub fn plan(state: &Core, doc: &PaymentDoc) -> (Self, Option<Reserved>) {
        let method = method_name(doc.method);
        let request = RouteRequest {
            method,
            currency: doc.currency.code(),
            amount_minor: doc.amount_minor,
        };
        let random = crate::ids::random_u64();
        let order = state.channels.rank(&request, Instant::now(), random);
        let mut route = Route { order, next: 0 };
        let first = route.reserve_next(state);
        (route, first)
    }

    /// The next ranked channel whose breaker grants a permit now (the breaker may have
    /// changed since the ranking).
    fn reserve_next(&mut self, state: &Core) -> Option<Reserved> {
        while let Some(&index) = self.order.get(self.next) {
            self.next += 1;
            if let Some(permit) = state.channels.entries()[index].try_acquire(Instant::now()) {
                return Some(Reserved { index, permit });
            }
        }
        None
    }
}

/// The API's name of a method (the channels' `methods` setting uses it).
pub fn method_name(method: Method) -> &'static str {
    match method {
        Method::Balance => "balance",
        Method::Supplier => "supplier",
        Method::Alipay => "alipay",
        Method::Wechatpay => "wechatpay",
    }
}

/// The attempt row committed before attempt `number` is sent to the reserved channel.
pub fn attempt_row(
    state: &Core,
    payment: &PaymentId,
    number: u8,
    reserved: &Reserved,
    now_ms: u64,
) -> AttemptRow {
    let entry = &state.channels.entries()[reserved.index];
    AttemptRow {
        payment_id: payment.as_str().to_owned(),
        attempt: u32::from(number),
        channel_id: entry.route.channel_id.clone(),
        channel_order_id: ChannelOrderId::for_attempt(payment, number).to_string(),
        // Until the channel answers, the attempt may or may not have taken effect.
        outcome: AttemptOutcome::Unknown,
        latency_ms: None,
        action: None,
        channel_txn_id: None,
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
    }
}

/// How the create call ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Routed {
    /// A channel accepted the order: the customer's next step, if any, for the balance store
    /// to keep until the attempt's outcome is committed (see `BalanceStore::accept`).
    Accepted(AcceptedAttempt),
    /// An attempt's outcome is unknown and could not be settled by closing it: the payment
    /// stays pending with its hold, to be resolved by query/close.
    Unknown,
    /// Closing an unknown attempt found the order paid.
    Paid {
        attempt: AttemptRow,
        channel_txn_id: String,
        amount_minor: i64,
        currency: Currency,
    },
    /// No attempt took effect anywhere: the payment can be failed and its hold released.
    NoChannel,
}

/// Runs the attempts of one payment. `attempts` holds the first attempt's row (committed with
/// the intent) when `first` is some; rows of later attempts are committed here before their
/// calls. An accepted attempt's outcome is queued for the next group commit, not waited for:
/// the caller hands the acceptance to the balance store before it answers. Returns how it
/// ended and every attempt as it stands.
pub async fn attempt(
    state: &Core,
    doc: &PaymentDoc,
    route: &mut Route,
    first: Option<Reserved>,
    mut attempts: Vec<AttemptRow>,
) -> (Routed, Vec<AttemptRow>) {
    let payment = PaymentId::parse(&doc.id).expect("a created payment has a valid id");
    let max_attempts = state.config.settings.payments.max_attempts as usize;
    let mut current = first;
    debug_assert_eq!(attempts.len(), usize::from(current.is_some()));
    while let Some(reserved) = current.take() {
        let entry = &state.channels.entries()[reserved.index];
        let row = attempts
            .last_mut()
            .expect("every reserved call has its row");
        let order_id =
            ChannelOrderId::parse(&row.channel_order_id).expect("rows hold ids made by us");
        let request = create_request(state, doc, &entry.route.channel_id, order_id.clone());
        let started = Instant::now();
        let result = entry.channel.create_order(&request).await;
        entry.record(reserved.permit, started, &result);
        row.latency_ms = Some(started.elapsed().as_millis() as u64);
        telemetry::channel_call(
            &entry.route.channel_id,
            "create",
            result.as_ref().map_or_else(|e| e.label(), |_| "ok"),
        );
        match result {
            Ok(created) => {
                let now_ms = telemetry::now_ms();
                row.outcome = AttemptOutcome::Accepted;
                row.action = action_json(&created.action).map(|a| a.to_string());
                row.channel_txn_id = created.channel_txn_id;
                row.updated_at_ms = now_ms;
                if let Err(err) = state.settler.save_attempt_later(update_of(row, now_ms)) {
                    // Still `unknown` in the store: the resolution loop queries it.
                    tracing::warn!(payment_id = %row.payment_id, attempt = row.attempt, error = %err, "accepted attempt not queued");
                }
                let accepted = AcceptedAttempt {
                    attempt: row.attempt,
                    action: row.action.clone(),
                    channel_txn_id: row.channel_txn_id.clone(),
                    latency_ms: row.latency_ms,
                    at_ms: now_ms,
                };
                return (Routed::Accepted(accepted), attempts);
            }
            Err(err) if err.certainly_not_executed() => {
                tracing::info!(payment_id = %payment, channel = %entry.route.channel_id, error = %err, "attempt refused; failing over");
                row.outcome = AttemptOutcome::Refused;
                save(state, row).await;
            }
            Err(err) => {
                tracing::warn!(payment_id = %payment, channel = %entry.route.channel_id, error = %err, "attempt outcome unknown; closing it before anything else");
                let closed = entry.channel.close(&order_id).await;
                telemetry::channel_call(
                    &entry.route.channel_id,
                    "close",
                    closed.as_ref().map_or_else(|e| e.label(), |_| "ok"),
                );
                match closed {
                    Ok(CloseOutcome::Closed) => row.outcome = AttemptOutcome::Closed,
                    Ok(CloseOutcome::NotFound) if customer_paid(entry.kind) => {
                        row.outcome = AttemptOutcome::Closed
                    }
                    Ok(CloseOutcome::AlreadyPaid {
                        channel_txn_id,
                        amount_minor,
                        currency,
                    }) => {
                        // Still `unknown` until the payment is settled as paid (the
                        // settling marks it `succeeded`): if that fails, the resolution
                        // loop finds the attempt open and settles it.
                        save(state, row).await;
                        let attempt = row.clone();
                        return (
                            Routed::Paid {
                                attempt,
                                channel_txn_id,
                                amount_minor,
                                currency,
                            },
                            attempts,
                        );
                    }
                    Ok(CloseOutcome::NotFound) | Err(_) => {
                        save(state, row).await;
                        return (Routed::Unknown, attempts);
                    }
                }
                save(state, row).await;
            }
        }
        if attempts.len() >= max_attempts {
            break;
        }
        let Some(next) = route.reserve_next(state) else {
            break;
        };
        let number = attempts.len() as u8 + 1;
        let row = attempt_row(state, &payment, number, &next, telemetry::now_ms());
        // Durable before the call: a callback for it can always be matched.
        if let Err(err) = state.settler.store.record_attempt(&row).await {
            tracing::warn!(payment_id = %payment, error = %err, "cannot record the next attempt; not calling it");
            state.channels.entries()[next.index].release(next.permit);
            break;
        }
        state.pending_docs.add_attempt(&row);
        attempts.push(row);
        current = Some(next);
    }
    (Routed::NoChannel, attempts)
}

/// Alipay and WeChat Pay orders are paid by a customer (see the module docs).
fn customer_paid(kind: ChannelKind) -> bool {
    matches!(kind, ChannelKind::Alipay | ChannelKind::Wechatpay)
}

/// Writes an attempt's outcome through the group commit; a failure is logged (the resolution loop treats an attempt
/// still recorded as unknown the same way as an accepted one).
async fn save(state: &Core, row: &AttemptRow) {
    let update = update_of(row, telemetry::now_ms());
    if let Err(err) = state.settler.save_attempt(update, None).await {
        tracing::warn!(payment_id = %row.payment_id, attempt = row.attempt, error = %err, "attempt outcome not recorded");
    }
}

/// The store's update for `row` as it stands.
fn update_of(row: &AttemptRow, now_ms: u64) -> AttemptUpdate {
    AttemptUpdate {
        payment_id: row.payment_id.clone(),
        attempt: row.attempt,
        outcome: row.outcome,
        latency_ms: row.latency_ms,
        action: row.action.clone(),
        channel_txn_id: row.channel_txn_id.clone(),
        now_ms,
    }
}

/// The channel's create request for one attempt of `doc`.
fn create_request(
    state: &Core,
    doc: &PaymentDoc,
    channel_id: &str,
    order_id: ChannelOrderId,
) -> CreateOrder {
    CreateOrder {
        order_id,
        amount: Amount::from_minor(doc.amount_minor).expect("a stored amount is valid"),
        currency: doc.currency,
        description: order_description(doc),
        notify_url: format!("{}/v1/callbacks/{channel_id}", state.public_url),
        expires_at_ms: doc.expires_at_ms,
    }
}

/// What the customer sees at the channel: the merchant's description, else the order id;
/// control characters replaced, cut to the channels' limit.
fn order_description(doc: &PaymentDoc) -> String {
    let text = doc
        .description
        .as_deref()
        .filter(|d| !d.trim().is_empty())
        .map_or_else(|| format!("Order {}", doc.merchant_order_id), str::to_owned);
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_DESCRIPTION_CHARS)
        .collect()
}

/// The API's `action` object (DESIGN.md §4).
pub fn action_json(action: &Action) -> Option<Value> {
    match action {
        Action::QrCode(code) => Some(json!({"type": "qr_code", "qr_code": code})),
        Action::Redirect(url) => Some(json!({"type": "redirect", "url": url})),
        Action::None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preauth::Purpose;

    fn doc(description: Option<&str>) -> PaymentDoc {
        PaymentDoc {
            id: "pay_x".into(),
            merchant_id: "alpha".into(),
            account_id: None,
            merchant_order_id: "o-1".into(),
            amount_minor: 100,
            currency: Currency::Cny,
            method: Method::Alipay,
            purpose: Purpose::Charge,
            created_at_ms: 1,
            expires_at_ms: 2,
            description: description.map(str::to_owned),
            notify_url: None,
            metadata: None,
        }
    }

    #[test]
    fn the_description_is_the_merchants_or_the_order_id_and_fits_every_channel() {
        assert_eq!(order_description(&doc(None)), "Order o-1");
        assert_eq!(order_description(&doc(Some("  "))), "Order o-1");
        assert_eq!(order_description(&doc(Some("a\nb"))), "a b");
        let long = "字".repeat(300);
        assert_eq!(
            order_description(&doc(Some(&long))).chars().count(),
            MAX_DESCRIPTION_CHARS
        );
    }

    #[test]
    fn actions_render_as_the_api_documents_them() {
        assert_eq!(
            action_json(&Action::QrCode("https://qr.alipay.com/x".into())),
            Some(json!({"type": "qr_code", "qr_code": "https://qr.alipay.com/x"}))
        );
        assert_eq!(
            action_json(&Action::Redirect("https://pay/x".into())),
            Some(json!({"type": "redirect", "url": "https://pay/x"}))
        );
        assert_eq!(action_json(&Action::None), None);
        // Open: may still take (or have taken) money; the rest are over.
        let open: Vec<AttemptOutcome> = AttemptOutcome::ALL
            .into_iter()
            .filter(|o| o.is_open())
            .collect();
        assert_eq!(
            open,
            vec![
                AttemptOutcome::Accepted,
                AttemptOutcome::Unknown,
                AttemptOutcome::Succeeded
            ]
        );
        for outcome in AttemptOutcome::ALL {
            assert_eq!(AttemptOutcome::parse(outcome.as_str()), Some(outcome));
            assert_eq!(
                serde_json::to_value(outcome).unwrap(),
                json!(outcome.as_str())
            );
        }
        assert_eq!(AttemptOutcome::parse("paid"), None);
    }
}
