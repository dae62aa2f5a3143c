//! The in-process backend: the sandbox default. Same layout and semantics as the Redis
//! scripts (see `scripts/common.lua`), one mutex-protected state per scope tag, so two scopes
//! never contend and every operation is atomic for its scope.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use dashmap::DashMap;

use super::{
    final_status_record, money_record_id, refund_outcome_id, status_record_id, AcceptedAttempt,
    AccountKey, AccountRebuild, AccountSnapshot, AdjustOutcome, AdjustRequest, AuthorizeOutcome,
    AuthorizeRequest, BalanceStore, Direction, IdempotencyClaim, KeyRestore, LateCaptureOutcome,
    LateCaptureRequest, OpContext, PaymentDoc, PaymentRecord, PaymentStatus, RebuildGuard,
    RefundFinishOutcome, RefundFinishRequest, RefundReserveOutcome, RefundReserveRequest,
    RefundUnwind, RestorePayment, Scope, SettledMark, StoreError, StoredOutcome, SucceedOutcome,
    SucceedRequest, SuccessEffect, TransitionOutcome, Unsettled, UnsettledPage, Unwind,
    UpsertOutcome, MAX_SAFE_MINOR,
};
use crate::ids::{IdempotencyKey, MerchantOrderId, PaymentId, ScopeTag};
use crate::money::Currency;

/// Marks an order id a rebuild put back (`restore_keys`): `!<payment id>`, held by a payment
/// that ended live, as `restore_keys.lua` marks it in Redis.
const RESTORED_ORDER: &str = "!";

#[derive(Debug)]
struct AccountRow {
    merchant: String,
    account: String,
    currency: Currency,
    balance: i64,
    held: i64,
    credit_limit: i64,
    seq: u64,
    /// A rebuild's fence (as `rb` in Redis): no new movement before this instant (unix ms).
    fence_until_ms: u64,
}

impl AccountRow {
    /// Whether a rebuild holds new movements off (see `BalanceStore::rebuild_guard`).
    fn fenced(&self, now_ms: u64) -> bool {
        self.fence_until_ms > now_ms
    }

    fn snapshot(&self) -> AccountSnapshot {
        AccountSnapshot {
            currency: self.currency,
            balance: self.balance,
            held: self.held,
            credit_limit: self.credit_limit,
            seq: self.seq,
        }
    }
}

#[derive(Debug)]
struct IdempotencyRow {
    request_hash: String,
    outcome: StoredOutcome,
    in_flight: bool,
    expires_at_ms: u64,
}

#[derive(Debug, Clone)]
struct PendingRow {
    seq: u64,
    idempotency_key: String,
    record: String,
    at_ms: u64,
}

#[derive(Debug, Default)]
struct ScopeState {
    account: Option<AccountRow>,
    /// (expiry ms, payment id) of every live hold.
    holds: BTreeSet<(u64, String)>,
    /// payment id -> (amount, expiry ms) of every live hold.
    hold_amounts: HashMap<String, (i64, u64)>,
    statuses: HashMap<String, PaymentStatus>,
    docs: HashMap<String, PaymentDoc>,
    orders: HashMap<String, String>,
    idempotency: HashMap<String, IdempotencyRow>,
    /// id -> movement not yet committed by the settlement store (u:{T} in Redis).
    unsettled: HashMap<String, PendingRow>,
    /// '<payment id>#<attempt>' -> the account sequence of its late capture (lc:{T} in Redis).
    late_captures: HashMap<String, u64>,
    /// payment id -> its refunds' totals (rf:{T} in Redis).
    refund_totals: HashMap<String, RefundTotals>,
    /// refund id -> the refund.
    refunds: HashMap<String, RefundState>,
    /// payment id -> a channel's acceptance of one of its attempts ('<id>#a' in pd:{T}).
    accepted: HashMap<String, AcceptedAttempt>,
}

#[derive(Debug, Default, Clone, Copy)]
struct RefundTotals {
    count: u32,
    /// Pending and succeeded.
    reserved: i64,
    succeeded: i64,
}

#[derive(Debug, Clone)]
struct RefundState {
    payment_id: String,
    amount: i64,
    /// pending | succeeded | failed
    status: &'static str,
}

enum IdempotencyCheck {
    New,
    Conflict,
    InFlight,
    Replay(StoredOutcome),
}

impl ScopeState {
    fn check_account(&self, key: &AccountKey, currency: Option<Currency>) -> Result<(), Reject> {
        let row = self.account.as_ref().ok_or(Reject::NotFound)?;
        if row.merchant != key.merchant.as_str() || row.account != key.account.as_str() {
            return Err(Reject::Collision);
        }
        match currency {
            Some(currency) if currency != row.currency => Err(Reject::Currency(row.currency)),
            _ => Ok(()),
        }
    }

    fn check_idempotency(&mut self, claim: &IdempotencyClaim, now_ms: u64) -> IdempotencyCheck {
        let key = claim.key.as_str();
        match self.idempotency.get(key) {
            Some(row) if row.expires_at_ms <= now_ms => {
                self.idempotency.remove(key);
                IdempotencyCheck::New
            }
            Some(row) if row.request_hash != claim.request_hash => IdempotencyCheck::Conflict,
            Some(row) if row.in_flight => IdempotencyCheck::InFlight,
            Some(row) => IdempotencyCheck::Replay(row.outcome.clone()),
            None => IdempotencyCheck::New,
        }
    }

    fn record_idempotency(
        &mut self,
        claim: &IdempotencyClaim,
        outcome: StoredOutcome,
        in_flight: bool,
        now_ms: u64,
    ) {
        let row = IdempotencyRow {
            request_hash: claim.request_hash.clone(),
            outcome,
            in_flight,
            expires_at_ms: now_ms.saturating_add(claim.retention_seconds.saturating_mul(1000)),
        };
        self.idempotency.insert(claim.key.as_str().to_owned(), row);
    }

    /// The same as `release_expired` in common.lua.
    fn release_expired(&mut self, now_ms: u64, limit: u32) -> u64 {
        let mut released = 0;
        while released < u64::from(limit) {
            let Some((expiry, pid)) = self.holds.first().cloned() else {
                break;
            };
            if expiry > now_ms {
                break;
            }
            self.holds.remove(&(expiry, pid.clone()));
            if let Some((amount, _)) = self.hold_amounts.remove(&pid) {
                if let Some(row) = self.account.as_mut() {
                    row.held -= amount;
                    debug_assert!(row.held >= 0, "held went negative releasing {pid}");
                }
            }
            if let Some(status) = self.statuses.get_mut(&pid) {
                if *status == PaymentStatus::Pending {
                    *status = PaymentStatus::Expired;
                    self.record_final_status(&pid, PaymentStatus::Expired, now_ms);
                }
            }
            released += 1;
        }
        released
    }

    fn record_final_status(&mut self, pid: &str, status: PaymentStatus, now_ms: u64) {
        self.unsettled.insert(
            status_record_id(pid),
            PendingRow {
                seq: 0,
                idempotency_key: String::new(),
                record: final_status_record(pid, status, now_ms),
                at_ms: now_ms,
            },
        );
    }

    fn remove_hold(&mut self, pid: &str) -> i64 {
        match self.hold_amounts.remove(pid) {
            Some((amount, expiry)) => {
                self.holds.remove(&(expiry, pid.to_owned()));
                amount
            }
            None => 0,
        }
    }

    fn record(&self, pid: &str) -> Option<PaymentRecord> {
        let status = *self.statuses.get(pid)?;
        let doc = self.docs.get(pid)?.clone();
        let held_minor = self.hold_amounts.get(pid).map_or(0, |(amount, _)| *amount);
        Some(PaymentRecord {
            doc,
            status,
            held_minor,
            accepted: self.accepted.get(pid).cloned(),
        })
    }

    fn purge_idempotency(&mut self, now_ms: u64) {
        self.idempotency.retain(|_, row| row.expires_at_ms > now_ms);
    }
}

enum Reject {
    NotFound,
    Collision,
    Currency(Currency),
}

/// The in-process balance store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    scopes: DashMap<ScopeTag, ScopeState>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

fn collision(tag: ScopeTag) -> StoreError {
    StoreError::TagCollision(tag.to_string())
}

#[async_trait]
impl BalanceStore for MemoryStore {
    async fn upsert_account(
        &self,
        key: &AccountKey,
        currency: Currency,
        credit_limit: i64,
        ctx: OpContext,
    ) -> Result<UpsertOutcome, StoreError> {
        let mut state = self.scopes.entry(key.tag).or_default();
        let Some(row) = state.account.as_mut() else {
            let row = AccountRow {
                merchant: key.merchant.as_str().to_owned(),
                account: key.account.as_str().to_owned(),
                currency,
                balance: 0,
                held: 0,
                credit_limit,
                seq: 0,
                fence_until_ms: 0,
            };
            let snapshot = row.snapshot();
            state.account = Some(row);
            return Ok(UpsertOutcome::Created(snapshot));
        };
        if row.merchant != key.merchant.as_str() || row.account != key.account.as_str() {
            return Err(collision(key.tag));
        }
        if row.currency != currency {
            return Ok(UpsertOutcome::CurrencyMismatch(row.currency));
        }
        if row
            .balance
            .checked_add(credit_limit)
            .is_none_or(|sum| sum > MAX_SAFE_MINOR)
        {
            return Ok(UpsertOutcome::OutOfRange);
        }
        row.credit_limit = credit_limit;
        state.release_expired(ctx.now_ms, ctx.lazy_release_max);
        let snapshot = state.account.as_ref().map(AccountRow::snapshot);
        Ok(UpsertOutcome::Updated(
            snapshot.expect("the account exists"),
        ))
    }

    async fn read_account(
        &self,
        key: &AccountKey,
        ctx: OpContext,
    ) -> Result<Option<AccountSnapshot>, StoreError> {
        let Some(mut state) = self.scopes.get_mut(&key.tag) else {
            return Ok(None);
        };
        match state.check_account(key, None) {
            Ok(()) => {}
            Err(Reject::Collision) => return Err(collision(key.tag)),
            Err(_) => return Ok(None),
        }
        state.release_expired(ctx.now_ms, ctx.lazy_release_max);
        Ok(state.account.as_ref().map(AccountRow::snapshot))
    }

    async fn authorize(
        &self,
        req: &AuthorizeRequest,
        ctx: OpContext,
    ) -> Result<AuthorizeOutcome, StoreError> {
        let tag = req.scope.tag();
        let mut state = self.scopes.entry(tag).or_default();
        match state.check_idempotency(&req.idempotency, ctx.now_ms) {
            IdempotencyCheck::New => {}
            IdempotencyCheck::Conflict => return Ok(AuthorizeOutcome::IdempotencyConflict),
            IdempotencyCheck::InFlight => return Ok(AuthorizeOutcome::IdempotencyInFlight),
            IdempotencyCheck::Replay(outcome) => return Ok(AuthorizeOutcome::Replay(outcome)),
        }
        if let Scope::Account(key) = &req.scope {
            match state.check_account(key, Some(req.doc.currency)) {
                Ok(()) => {}
                Err(Reject::NotFound) => return Ok(AuthorizeOutcome::AccountNotFound),
                Err(Reject::Collision) => return Err(collision(tag)),
                Err(Reject::Currency(c)) => return Ok(AuthorizeOutcome::CurrencyMismatch(c)),
            }
            if state
                .account
                .as_ref()
                .is_some_and(|row| row.fenced(ctx.now_ms))
            {
                return Ok(AuthorizeOutcome::AccountBusy);
            }
            state.release_expired(ctx.now_ms, ctx.lazy_release_max);
        }
        if let Some(existing) = state.orders.get(req.order_id.as_str()) {
            // `!<id>`: put back by a rebuild, held by a payment that ended live.
            let (restored, holder) = match existing.strip_prefix(RESTORED_ORDER) {
                Some(holder) => (true, holder),
                None => (false, existing.as_str()),
            };
            if restored || state.statuses.get(holder).is_some_and(|s| s.is_live()) {
                let id = PaymentId::parse(holder)
                    .ok_or_else(|| StoreError::Corrupt(format!("payment id {holder:?}")))?;
                return Ok(AuthorizeOutcome::DuplicateOrder(id));
            }
        }

        let pid = req.doc.id.clone();
        let amount = req.doc.amount_minor;
        let mut status = PaymentStatus::Pending;
        if let (Some(hold), Some(row)) = (req.hold, state.account.as_mut()) {
            let available = row.snapshot().available();
            if available < amount {
                let outcome = StoredOutcome::InsufficientFunds {
                    available,
                    shortfall: amount - available,
                };
                state.record_idempotency(&req.idempotency, outcome, false, ctx.now_ms);
                return Ok(AuthorizeOutcome::InsufficientFunds {
                    available,
                    shortfall: amount - available,
                });
            }
            if hold.capture_now {
                row.balance -= amount;
                row.seq += 1;
                status = PaymentStatus::Succeeded;
            } else {
                row.held += amount;
                state.holds.insert((hold.expires_at_ms, pid.clone()));
                state
                    .hold_amounts
                    .insert(pid.clone(), (amount, hold.expires_at_ms));
            }
        }
        state.statuses.insert(pid.clone(), status);
        state.docs.insert(pid.clone(), req.doc.clone());
        state
            .orders
            .insert(req.order_id.as_str().to_owned(), pid.clone());
        let id = PaymentId::parse(&pid)
            .ok_or_else(|| StoreError::Corrupt(format!("payment id {pid:?}")))?;
        let pending = req.pending_record.is_some();
        if let Some(record) = &req.pending_record {
            let seq = state.account.as_ref().map_or(0, |row| row.seq);
            state.unsettled.insert(
                pid.clone(),
                PendingRow {
                    seq,
                    idempotency_key: req.idempotency.key.as_str().to_owned(),
                    record: record.clone(),
                    at_ms: ctx.now_ms,
                },
            );
        }
        state.record_idempotency(
            &req.idempotency,
            StoredOutcome::Payment(id),
            pending,
            ctx.now_ms,
        );
        let payment = state.record(&pid).expect("just written");
        let account = state.account.as_ref().map(AccountRow::snapshot);
        Ok(AuthorizeOutcome::Created { payment, account })
    }

    async fn succeed(
        &self,
        req: &SucceedRequest,
        ctx: OpContext,
    ) -> Result<SucceedOutcome, StoreError> {
        let Some(mut state) = self.scopes.get_mut(&req.payment.tag()) else {
            return Ok(SucceedOutcome::NotFound);
        };
        let pid = req.payment.as_str();
        match state.statuses.get(pid) {
            None => return Ok(SucceedOutcome::NotFound),
            Some(PaymentStatus::Pending) => {}
            Some(other) => return Ok(SucceedOutcome::NotPending(*other)),
        }
        let corrupt =
            |what: &str| StoreError::Corrupt(format!("{} of {pid}: {what}", req.effect.as_str()));
        let seq = match req.effect {
            SuccessEffect::Capture => {
                if !state.hold_amounts.contains_key(pid) {
                    return Err(corrupt("no_hold"));
                }
                let amount = state.remove_hold(pid);
                let row = state
                    .account
                    .as_mut()
                    .ok_or_else(|| corrupt("no_account"))?;
                row.balance -= amount;
                row.held -= amount;
                row.seq += 1;
                debug_assert!(row.held >= 0);
                row.seq
            }
            SuccessEffect::Credit => {
                let row = state
                    .account
                    .as_mut()
                    .ok_or_else(|| corrupt("no_account"))?;
                let fits = row
                    .balance
                    .checked_add(row.credit_limit)
                    .and_then(|v| v.checked_add(req.amount_minor))
                    .is_some_and(|v| v <= MAX_SAFE_MINOR);
                if !fits {
                    return Ok(SucceedOutcome::OutOfRange);
                }
                row.balance += req.amount_minor;
                row.seq += 1;
                row.seq
            }
            SuccessEffect::Collect => 0,
        };
        state
            .statuses
            .insert(pid.to_owned(), PaymentStatus::Succeeded);
        state.unsettled.insert(
            money_record_id(pid),
            PendingRow {
                seq,
                idempotency_key: String::new(),
                record: req.pending_record.clone(),
                at_ms: ctx.now_ms,
            },
        );
        Ok(SucceedOutcome::Done { seq })
    }

    async fn late_capture(
        &self,
        req: &LateCaptureRequest,
        ctx: OpContext,
    ) -> Result<LateCaptureOutcome, StoreError> {
        let Some(mut state) = self.scopes.get_mut(&req.payment.tag()) else {
            return Ok(LateCaptureOutcome::NotFound);
        };
        let pid = req.payment.as_str();
        match state.statuses.get(pid) {
            None => return Ok(LateCaptureOutcome::NotFound),
            Some(PaymentStatus::Pending) => return Ok(LateCaptureOutcome::Pending),
            Some(_) => {}
        }
        let marker = format!("{pid}#{}", req.attempt);
        if let Some(seq) = state.late_captures.get(&marker) {
            return Ok(LateCaptureOutcome::Done { seq: *seq });
        }
        state.release_expired(ctx.now_ms, ctx.lazy_release_max);
        let Some(row) = state.account.as_mut() else {
            return Ok(LateCaptureOutcome::NotFound);
        };
        let available = row.snapshot().available();
        if available < req.amount_minor {
            return Ok(LateCaptureOutcome::Insufficient { available });
        }
        row.balance -= req.amount_minor;
        row.seq += 1;
        let seq = row.seq;
        state.late_captures.insert(marker, seq);
        state.unsettled.insert(
            super::late_record_id(pid, req.attempt),
            PendingRow {
                seq,
                idempotency_key: String::new(),
                record: req.pending_record.clone(),
                at_ms: ctx.now_ms,
            },
        );
        Ok(LateCaptureOutcome::Done { seq })
    }

    async fn reserve_refund(
        &self,
        req: &RefundReserveRequest,
        ctx: OpContext,
    ) -> Result<RefundReserveOutcome, StoreError> {
        let Some(mut state) = self.scopes.get_mut(&req.payment.tag()) else {
            return Ok(RefundReserveOutcome::NotFound);
        };
        match state.check_idempotency(&req.idempotency, ctx.now_ms) {
            IdempotencyCheck::New => {}
            IdempotencyCheck::Conflict => return Ok(RefundReserveOutcome::IdempotencyConflict),
            IdempotencyCheck::InFlight => return Ok(RefundReserveOutcome::IdempotencyInFlight),
            IdempotencyCheck::Replay(outcome) => return Ok(RefundReserveOutcome::Replay(outcome)),
        }
        let pid = req.payment.as_str();
        match state.statuses.get(pid) {
            None => return Ok(RefundReserveOutcome::NotFound),
            Some(PaymentStatus::Succeeded | PaymentStatus::PartiallyRefunded) => {}
            Some(other) => return Ok(RefundReserveOutcome::InvalidState(*other)),
        }
        let doc = state.docs.get(pid).cloned().ok_or_else(|| {
            StoreError::Corrupt(format!("payment {pid} has a status but no document"))
        })?;
        let totals = state.refund_totals.get(pid).copied().unwrap_or_default();
        let remaining = doc.amount_minor - totals.reserved;
        let amount = req.amount_minor.unwrap_or(remaining);
        if amount <= 0 || amount > remaining {
            return Ok(RefundReserveOutcome::Exceeds { remaining });
        }
        let number = totals.count + 1;
        let refund_id = format!("re_{}_{number}", &pid[4..]);
        if doc.purpose == super::Purpose::Topup {
            state.release_expired(ctx.now_ms, ctx.lazy_release_max);
            let Some(row) = state.account.as_mut() else {
                return Ok(RefundReserveOutcome::NotFound);
            };
            if row.fenced(ctx.now_ms) {
                return Ok(RefundReserveOutcome::AccountBusy);
            }
            let available = row.snapshot().available();
            if available < amount {
                let outcome = StoredOutcome::InsufficientFunds {
                    available,
                    shortfall: amount - available,
                };
                state.record_idempotency(&req.idempotency, outcome, false, ctx.now_ms);
                return Ok(RefundReserveOutcome::InsufficientFunds {
                    available,
                    shortfall: amount - available,
                });
            }
            row.held += amount;
            state
                .holds
                .insert((req.hold_expires_at_ms, refund_id.clone()));
            state
                .hold_amounts
                .insert(refund_id.clone(), (amount, req.hold_expires_at_ms));
        }
        state.refund_totals.insert(
            pid.to_owned(),
            RefundTotals {
                count: number,
                reserved: totals.reserved + amount,
                succeeded: totals.succeeded,
            },
        );
        state.refunds.insert(
            refund_id.clone(),
            RefundState {
                payment_id: pid.to_owned(),
                amount,
                status: "pending",
            },
        );
        let intent = req
            .intent_template
            .replace(super::REFUND_ID_PLACEHOLDER, &refund_id)
            .replace(
                &super::REFUND_NUMBER_PLACEHOLDER.to_string(),
                &number.to_string(),
            )
            .replace(
                &super::REFUND_AMOUNT_PLACEHOLDER.to_string(),
                &amount.to_string(),
            );
        state.unsettled.insert(
            refund_id.clone(),
            PendingRow {
                seq: 0,
                idempotency_key: req.idempotency.key.as_str().to_owned(),
                record: intent,
                at_ms: ctx.now_ms,
            },
        );
        state.record_idempotency(
            &req.idempotency,
            StoredOutcome::Refund(refund_id.clone()),
            true,
            ctx.now_ms,
        );
        Ok(RefundReserveOutcome::Created {
            refund_id,
            number,
            amount_minor: amount,
        })
    }

    async fn finish_refund(
        &self,
        req: &RefundFinishRequest,
        ctx: OpContext,
    ) -> Result<RefundFinishOutcome, StoreError> {
        let Some(mut state) = self.scopes.get_mut(&req.payment.tag()) else {
            return Ok(RefundFinishOutcome::NotFound);
        };
        let Some(refund) = state.refunds.get(&req.refund_id).cloned() else {
            return Ok(RefundFinishOutcome::NotFound);
        };
        if refund.status != "pending" {
            return Ok(RefundFinishOutcome::Already(refund.status.to_owned()));
        }
        let pid = refund.payment_id.clone();
        let doc =
            state.docs.get(&pid).cloned().ok_or_else(|| {
                StoreError::Corrupt(format!("refund of {pid} without its payment"))
            })?;
        let held = state.remove_hold(&req.refund_id);
        if let Some(row) = state.account.as_mut() {
            row.held -= held;
            debug_assert!(row.held >= 0);
        }
        let mut totals = state.refund_totals.get(&pid).copied().unwrap_or_default();
        let mut seq = 0;
        if req.succeeded {
            let delta = match (doc.purpose, doc.method) {
                (super::Purpose::Topup, _) => Some(-refund.amount),
                (_, super::Method::Supplier | super::Method::Balance) => Some(refund.amount),
                _ => None,
            };
            if let (Some(delta), Some(row)) = (delta, state.account.as_mut()) {
                row.balance += delta;
                row.seq += 1;
                seq = row.seq;
            }
            totals.succeeded += refund.amount;
            let status = if totals.succeeded >= doc.amount_minor {
                PaymentStatus::Refunded
            } else {
                PaymentStatus::PartiallyRefunded
            };
            state.statuses.insert(pid.clone(), status);
        } else {
            totals.reserved -= refund.amount;
        }
        state.refund_totals.insert(pid.clone(), totals);
        if let Some(r) = state.refunds.get_mut(&req.refund_id) {
            r.status = if req.succeeded { "succeeded" } else { "failed" };
        }
        let payment_status = *state.statuses.get(&pid).expect("exists");
        let record = if req.succeeded {
            req.pending_record
                .replacen(
                    super::REFUND_STATUS_PLACEHOLDER,
                    &format!("\"status\":\"{}\"", payment_status.as_str()),
                    1,
                )
                .replace(&super::REFUND_SEQ_PLACEHOLDER.to_string(), &seq.to_string())
        } else {
            req.pending_record.clone()
        };
        state.unsettled.insert(
            refund_outcome_id(&req.refund_id),
            PendingRow {
                seq,
                idempotency_key: String::new(),
                record,
                at_ms: ctx.now_ms,
            },
        );
        Ok(RefundFinishOutcome::Done {
            seq,
            payment_status,
        })
    }

    async fn restore_payment(&self, restore: &RestorePayment) -> Result<bool, StoreError> {
        let doc = &restore.record.doc;
        let id = PaymentId::parse(&doc.id)
            .ok_or_else(|| StoreError::Corrupt(format!("payment id {:?}", doc.id)))?;
        let mut state = self.scopes.entry(id.tag()).or_default();
        if state.statuses.contains_key(&doc.id) {
            return Ok(false);
        }
        let status = restore.record.status;
        state.statuses.insert(doc.id.clone(), status);
        state.docs.insert(doc.id.clone(), doc.clone());
        if status.is_live() {
            let holder_live = state
                .orders
                .get(&doc.merchant_order_id)
                .and_then(|holder| state.statuses.get(holder))
                .is_some_and(|s| s.is_live());
            if !holder_live {
                state
                    .orders
                    .insert(doc.merchant_order_id.clone(), doc.id.clone());
            }
        }
        if restore.refund_count > 0 {
            state.refund_totals.insert(
                doc.id.clone(),
                RefundTotals {
                    count: restore.refund_count,
                    reserved: restore.refunds_reserved,
                    succeeded: restore.refunds_succeeded,
                },
            );
        }
        for (refund_id, _, amount, _) in &restore.pending_refunds {
            state.refunds.insert(
                refund_id.clone(),
                RefundState {
                    payment_id: doc.id.clone(),
                    amount: *amount,
                    status: "pending",
                },
            );
        }
        Ok(true)
    }

    async fn fail_unrouted(
        &self,
        payment: &PaymentId,
        idempotency: &IdempotencyKey,
        ctx: OpContext,
    ) -> Result<TransitionOutcome, StoreError> {
        let outcome = self.release(payment, PaymentStatus::Failed, ctx).await?;
        if matches!(outcome, TransitionOutcome::Done(_)) {
            if let Some(mut state) = self.scopes.get_mut(&payment.tag()) {
                if let Some(row) = state.idempotency.get_mut(idempotency.as_str()) {
                    row.outcome = StoredOutcome::NoChannelAvailable(payment.clone());
                }
            }
        }
        Ok(outcome)
    }

    async fn release(
        &self,
        payment: &PaymentId,
        to: PaymentStatus,
        ctx: OpContext,
    ) -> Result<TransitionOutcome, StoreError> {
        debug_assert!(!to.is_live(), "release ends a payment: {to}");
        let Some(mut state) = self.scopes.get_mut(&payment.tag()) else {
            return Ok(TransitionOutcome::NotFound);
        };
        let pid = payment.as_str();
        match state.statuses.get(pid) {
            None => return Ok(TransitionOutcome::NotFound),
            Some(PaymentStatus::Pending) => {}
            Some(other) => return Ok(TransitionOutcome::NotPending(*other)),
        }
        let amount = state.remove_hold(pid);
        if amount > 0 {
            if let Some(row) = state.account.as_mut() {
                row.held -= amount;
                debug_assert!(row.held >= 0);
            }
        }
        state.statuses.insert(pid.to_owned(), to);
        state.record_final_status(pid, to, ctx.now_ms);
        Ok(TransitionOutcome::Done(state.record(pid).expect("exists")))
    }

    async fn adjust(
        &self,
        req: &AdjustRequest,
        ctx: OpContext,
    ) -> Result<AdjustOutcome, StoreError> {
        let mut state = self.scopes.entry(req.account.tag).or_default();
        match state.check_idempotency(&req.idempotency, ctx.now_ms) {
            IdempotencyCheck::New => {}
            IdempotencyCheck::Conflict => return Ok(AdjustOutcome::IdempotencyConflict),
            IdempotencyCheck::InFlight => return Ok(AdjustOutcome::IdempotencyInFlight),
            IdempotencyCheck::Replay(outcome) => return Ok(AdjustOutcome::Replay(outcome)),
        }
        match state.check_account(&req.account, Some(req.currency)) {
            Ok(()) => {}
            Err(Reject::NotFound) => return Ok(AdjustOutcome::AccountNotFound),
            Err(Reject::Collision) => return Err(collision(req.account.tag)),
            Err(Reject::Currency(c)) => return Ok(AdjustOutcome::CurrencyMismatch(c)),
        }
        if state
            .account
            .as_ref()
            .is_some_and(|row| row.fenced(ctx.now_ms))
        {
            return Ok(AdjustOutcome::AccountBusy);
        }
        state.release_expired(ctx.now_ms, ctx.lazy_release_max);
        let row = state.account.as_ref().expect("checked");
        let amount = req.amount_minor;
        let delta = match req.direction {
            Direction::Credit => amount,
            Direction::Debit => {
                let available = row.snapshot().available();
                if available < amount {
                    let outcome = StoredOutcome::InsufficientFunds {
                        available,
                        shortfall: amount - available,
                    };
                    state.record_idempotency(&req.idempotency, outcome, false, ctx.now_ms);
                    return Ok(AdjustOutcome::InsufficientFunds {
                        available,
                        shortfall: amount - available,
                    });
                }
                -amount
            }
        };
        let new_balance = row.balance + delta;
        if new_balance + row.credit_limit > MAX_SAFE_MINOR || new_balance < -MAX_SAFE_MINOR {
            return Ok(AdjustOutcome::OutOfRange);
        }
        let row = state.account.as_mut().expect("checked");
        row.balance = new_balance;
        row.seq += 1;
        let snapshot = row.snapshot();
        state.unsettled.insert(
            req.adjustment_id.as_str().to_owned(),
            PendingRow {
                seq: snapshot.seq,
                idempotency_key: req.idempotency.key.as_str().to_owned(),
                record: req.pending_record.clone(),
                at_ms: ctx.now_ms,
            },
        );
        state.record_idempotency(
            &req.idempotency,
            StoredOutcome::Adjustment(req.doc.clone()),
            true,
            ctx.now_ms,
        );
        Ok(AdjustOutcome::Applied(snapshot))
    }

    async fn payment(&self, id: &PaymentId) -> Result<Option<PaymentRecord>, StoreError> {
        Ok(self
            .scopes
            .get(&id.tag())
            .and_then(|state| state.record(id.as_str())))
    }

    async fn live_payment_by_order(
        &self,
        scope: &Scope,
        order_id: &MerchantOrderId,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        let Some(state) = self.scopes.get(&scope.tag()) else {
            return Ok(None);
        };
        Ok(state
            .orders
            .get(order_id.as_str())
            .and_then(|pid| state.record(pid))
            .filter(|record| record.status.is_live()))
    }

    async fn sweep_expired(&self, ctx: OpContext, budget: usize) -> Result<u64, StoreError> {
        let mut released = 0;
        let mut visited = 0;
        for mut state in self.scopes.iter_mut() {
            if visited >= budget {
                break;
            }
            let due = state
                .holds
                .first()
                .is_some_and(|(expiry, _)| *expiry <= ctx.now_ms);
            if due {
                visited += 1;
                released += state.release_expired(ctx.now_ms, ctx.lazy_release_max);
            }
            state.purge_idempotency(ctx.now_ms);
        }
        Ok(released)
    }

    async fn mark_settled(&self, marks: &[SettledMark]) -> Result<(), StoreError> {
        for mark in marks {
            if let Some(mut state) = self.scopes.get_mut(&mark.tag) {
                state.unsettled.remove(&mark.id);
                if let Some(row) = state.idempotency.get_mut(&mark.idempotency_key) {
                    row.in_flight = false;
                }
            }
        }
        Ok(())
    }

    async fn accept(
        &self,
        mark: &SettledMark,
        accepted: &AcceptedAttempt,
    ) -> Result<(), StoreError> {
        let Some(mut state) = self.scopes.get_mut(&mark.tag) else {
            return Ok(());
        };
        if !state.docs.contains_key(&mark.id) {
            return Ok(());
        }
        state.accepted.insert(mark.id.clone(), accepted.clone());
        drop(state);
        self.mark_settled(std::slice::from_ref(mark)).await
    }

    async fn abandon(
        &self,
        payment: &PaymentId,
        idempotency: &IdempotencyKey,
    ) -> Result<(), StoreError> {
        let Some(mut state) = self.scopes.get_mut(&payment.tag()) else {
            return Ok(());
        };
        let pid = payment.as_str();
        match state.statuses.get(pid) {
            Some(PaymentStatus::Pending) | None => {}
            Some(_) => return Ok(()),
        }
        let amount = state.remove_hold(pid);
        if let Some(row) = state.account.as_mut() {
            row.held -= amount;
            debug_assert!(row.held >= 0);
        }
        if let Some(status) = state.statuses.get_mut(pid) {
            *status = PaymentStatus::Failed;
        }
        state.unsettled.remove(pid);
        state.idempotency.remove(idempotency.as_str());
        Ok(())
    }

    async fn void(&self, mark: &SettledMark) -> Result<(), StoreError> {
        let Some(mut state) = self.scopes.get_mut(&mark.tag) else {
            return Ok(());
        };
        // As void.lua: what made the movement can make it again.
        match mark.id.split_once('#') {
            None => {
                if let Some(status) = state.statuses.get_mut(&mark.id) {
                    *status = PaymentStatus::Failed;
                }
            }
            Some((pid, "m")) => {
                if let Some(status) = state.statuses.get_mut(pid) {
                    if *status == PaymentStatus::Succeeded {
                        *status = PaymentStatus::Pending;
                    }
                }
            }
            Some((rid, "f")) => {
                let refund = state.refunds.get(rid).cloned();
                if let Some(refund) = refund.filter(|r| r.status == "succeeded") {
                    let mut totals = state
                        .refund_totals
                        .get(&refund.payment_id)
                        .copied()
                        .unwrap_or_default();
                    totals.succeeded -= refund.amount;
                    debug_assert!(totals.succeeded >= 0, "refunded total below zero: {rid}");
                    state
                        .refund_totals
                        .insert(refund.payment_id.clone(), totals);
                    let status = if totals.succeeded > 0 {
                        PaymentStatus::PartiallyRefunded
                    } else {
                        PaymentStatus::Succeeded
                    };
                    state.statuses.insert(refund.payment_id.clone(), status);
                    if let Some(r) = state.refunds.get_mut(rid) {
                        r.status = "pending";
                    }
                }
            }
            Some((pid, late)) => {
                if let Some(attempt) = late.strip_prefix('l') {
                    state.late_captures.remove(&format!("{pid}#{attempt}"));
                }
            }
        }
        state.unsettled.remove(&mark.id);
        state.idempotency.remove(&mark.idempotency_key);
        Ok(())
    }

    async fn unwind(&self, unwind: &Unwind) -> Result<bool, StoreError> {
        let mark = &unwind.mark;
        let Some(mut state) = self.scopes.get_mut(&mark.tag) else {
            return Ok(false);
        };
        let pid = mark.id.as_str();
        // As unwind.lua: only while its pending record is there, so at most once.
        if state.unsettled.remove(pid).is_none() {
            return Ok(false);
        }
        let held = state.remove_hold(pid);
        if let Some(row) = state.account.as_mut() {
            row.held -= held;
            row.balance += unwind.captured_minor;
            debug_assert!(row.held >= 0, "held went negative unwinding {pid}");
        }
        state.statuses.remove(pid);
        state.docs.remove(pid);
        if state.orders.get(&unwind.order_id).map(String::as_str) == Some(pid) {
            state.orders.remove(&unwind.order_id);
        }
        let key = mark.idempotency_key.clone();
        match &unwind.key_record {
            None => {
                state.idempotency.remove(&key);
            }
            Some(record) => {
                let now_ms = crate::telemetry::now_ms();
                state.idempotency.insert(
                    key,
                    IdempotencyRow {
                        request_hash: record.request_hash.clone(),
                        outcome: record.outcome.clone(),
                        in_flight: false,
                        expires_at_ms: now_ms
                            .saturating_add(record.ttl_seconds.saturating_mul(1000)),
                    },
                );
            }
        }
        Ok(true)
    }

    async fn unwind_refund(&self, u: &RefundUnwind) -> Result<bool, StoreError> {
        let Some(mut state) = self.scopes.get_mut(&u.payment.tag()) else {
            return Ok(false);
        };
        // As refund_unwind.lua: only while its pending record is there.
        if state.unsettled.remove(&u.refund_id).is_none() {
            return Ok(false);
        }
        let held = state.remove_hold(&u.refund_id);
        if let Some(row) = state.account.as_mut() {
            row.held -= held;
            debug_assert!(
                row.held >= 0,
                "held went negative unwinding {}",
                u.refund_id
            );
        }
        state.refunds.remove(&u.refund_id);
        state.refund_totals.insert(
            u.payment.as_str().to_owned(),
            RefundTotals {
                count: u.count,
                reserved: u.reserved_minor,
                succeeded: u.succeeded_minor,
            },
        );
        state.idempotency.remove(&u.idempotency_key);
        Ok(true)
    }

    async fn restore_keys(&self, records: &[KeyRestore]) -> Result<u64, StoreError> {
        let now_ms = crate::telemetry::now_ms();
        let mut restored = 0;
        for r in records {
            let mut state = self.scopes.entry(r.tag).or_default();
            if state
                .idempotency
                .get(&r.key)
                .is_some_and(|row| row.expires_at_ms > now_ms)
            {
                continue;
            }
            state.idempotency.insert(
                r.key.clone(),
                IdempotencyRow {
                    request_hash: r.record.request_hash.clone(),
                    outcome: r.record.outcome.clone(),
                    in_flight: false,
                    expires_at_ms: now_ms.saturating_add(r.record.ttl_seconds.saturating_mul(1000)),
                },
            );
            restored += 1;
        }
        // As restore_keys.lua: an ended live payment's order id, unless a live one holds it.
        for r in records {
            let Some((order, payment)) = &r.order else {
                continue;
            };
            let mut state = self.scopes.entry(r.tag).or_default();
            let held = state.orders.get(order).is_some_and(|holder| {
                holder.starts_with(RESTORED_ORDER)
                    || state.statuses.get(holder).is_some_and(|s| s.is_live())
            });
            if !held {
                state
                    .orders
                    .insert(order.clone(), format!("{RESTORED_ORDER}{payment}"));
            }
        }
        Ok(restored)
    }

    async fn unsettled(&self, budget: usize) -> Result<UnsettledPage, StoreError> {
        let mut out = Vec::new();
        let mut complete = true;
        for entry in self.scopes.iter() {
            if out.len() >= budget {
                complete = false;
                break;
            }
            for (id, row) in &entry.unsettled {
                out.push(Unsettled {
                    tag: *entry.key(),
                    id: id.clone(),
                    seq: row.seq,
                    idempotency_key: row.idempotency_key.clone(),
                    record: row.record.clone(),
                    at_ms: row.at_ms,
                });
            }
        }
        Ok(UnsettledPage {
            entries: out,
            complete,
        })
    }

    async fn rebuild_guard(
        &self,
        key: &AccountKey,
        fence_until_ms: u64,
    ) -> Result<Option<RebuildGuard>, StoreError> {
        let Some(mut state) = self.scopes.get_mut(&key.tag) else {
            return Ok(None);
        };
        Ok(state.account.as_mut().map(|row| {
            row.fence_until_ms = fence_until_ms;
            RebuildGuard {
                seq: row.seq,
                held: row.held,
            }
        }))
    }

    async fn rebuild_account(&self, rebuild: &AccountRebuild) -> Result<bool, StoreError> {
        let mut state = self.scopes.entry(rebuild.key.tag).or_default();
        // The fence, as in rebuild_account.lua.
        let now = state.account.as_ref().map(|row| RebuildGuard {
            seq: row.seq,
            held: row.held,
        });
        if !state.unsettled.is_empty() || now != rebuild.expect {
            return Ok(false);
        }
        let held: i64 = rebuild.holds.iter().map(|h| h.held_minor).sum();
        state.account = Some(AccountRow {
            merchant: rebuild.key.merchant.as_str().to_owned(),
            account: rebuild.key.account.as_str().to_owned(),
            currency: rebuild.currency,
            balance: rebuild.balance,
            held,
            credit_limit: rebuild.credit_limit,
            seq: rebuild.seq,
            // Loaded: new movements may start again.
            fence_until_ms: 0,
        });
        let known: std::collections::HashSet<&str> =
            rebuild.holds.iter().map(|h| h.doc.id.as_str()).collect();
        let stale: Vec<String> = state
            .hold_amounts
            .keys()
            .filter(|pid| !known.contains(pid.as_str()))
            .cloned()
            .collect();
        for pid in stale {
            state.remove_hold(&pid);
            if let Some(status) = state.statuses.get_mut(&pid) {
                if *status == PaymentStatus::Pending {
                    *status = PaymentStatus::Failed;
                }
            }
        }
        for (hold, expiry) in rebuild.holds.iter().zip(&rebuild.hold_expiries_ms) {
            let pid = hold.doc.id.clone();
            state.remove_hold(&pid);
            state.holds.insert((*expiry, pid.clone()));
            state
                .hold_amounts
                .insert(pid.clone(), (hold.held_minor, *expiry));
            state.statuses.insert(pid.clone(), PaymentStatus::Pending);
            state.docs.insert(pid.clone(), hold.doc.clone());
            state.orders.insert(hold.doc.merchant_order_id.clone(), pid);
        }
        Ok(true)
    }

    async fn has_accounts(&self) -> Result<bool, StoreError> {
        Ok(self.scopes.iter().any(|state| state.account.is_some()))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
