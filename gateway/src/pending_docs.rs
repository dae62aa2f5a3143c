//! The documents of the channel payments this instance created and that wait for their
//! channel, with their attempts as committed before each call. A callback (or the resolution
//! loop) settling one finds its attempt and its document here instead of reading them back
//! from the settlement store and from Redis: one store read and one Redis round trip fewer
//! per callback.
//!
//! Only a shortcut, never a source of truth: a payment's document never changes after its
//! creation, nor do an attempt's payment, number, channel and channel order id (its outcome is
//! not read from here); the payment's status is checked by the balance store's success script
//! whatever this holds. A miss (another instance created it, a restart, an eviction) reads the
//! stores as before. Bounded by `payments.pending_doc_cache`: the oldest entries go first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use crate::channels::ChannelOrderId;
use crate::preauth::PaymentDoc;
use crate::settlement::AttemptRow;

struct Pending {
    doc: Arc<PaymentDoc>,
    /// Attempts committed before their calls, in order.
    attempts: Vec<AttemptRow>,
}

pub struct PendingDocs {
    docs: DashMap<String, Pending>,
    /// Insertion order, for eviction; may name ids already removed (skipped when popped).
    order: Mutex<VecDeque<String>>,
    capacity: usize,
}

impl PendingDocs {
    /// `capacity` 0 turns the cache off.
    pub fn new(capacity: usize) -> Self {
        Self {
            docs: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    /// A payment about to be sent to its first channel, with the attempts committed so far.
    pub fn insert(&self, doc: PaymentDoc, attempts: Vec<AttemptRow>) {
        if self.capacity == 0 {
            return;
        }
        debug_assert!(attempts.iter().all(|a| a.payment_id == doc.id));
        let id = doc.id.clone();
        let pending = Pending {
            doc: Arc::new(doc),
            attempts,
        };
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        if self.docs.insert(id.clone(), pending).is_none() {
            order.push_back(id);
        }
        while order.len() > self.capacity {
            match order.pop_front() {
                Some(old) => {
                    self.docs.remove(&old);
                }
                None => break,
            }
        }
        debug_assert!(self.docs.len() <= self.capacity);
    }

    /// A further attempt (failover), committed before its call.
    pub fn add_attempt(&self, attempt: &AttemptRow) {
        if let Some(mut pending) = self.docs.get_mut(&attempt.payment_id) {
            pending.attempts.push(attempt.clone());
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<PaymentDoc>> {
        self.docs.get(id).map(|p| p.doc.clone())
    }

    /// The attempt a channel order id names, if its payment is here.
    pub fn attempt(&self, order: &ChannelOrderId) -> Option<AttemptRow> {
        let pending = self.docs.get(order.payment_id().as_str())?;
        pending
            .attempts
            .iter()
            .find(|a| a.channel_order_id == order.as_str())
            .cloned()
    }

    /// Forgets a payment that no longer waits (settled, failed, expired).
    pub fn remove(&self, id: &str) {
        self.docs.remove(id);
    }

    pub fn len(&self) -> usize {
        self.docs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, MerchantId, PaymentId, ScopeTag};
    use crate::money::Currency;
    use crate::preauth::{Method, Purpose};

    fn doc(id: &str) -> PaymentDoc {
        PaymentDoc {
            id: id.into(),
            merchant_id: "alpha".into(),
            account_id: None,
            merchant_order_id: format!("o-{id}"),
            amount_minor: 100,
            currency: Currency::Cny,
            method: Method::Supplier,
            purpose: Purpose::Charge,
            created_at_ms: 1,
            expires_at_ms: 2,
            description: None,
            notify_url: None,
            metadata: None,
        }
    }

    #[test]
    fn the_oldest_go_first_and_the_bound_holds() {
        let cache = PendingDocs::new(2);
        cache.insert(doc("a"), Vec::new());
        cache.insert(doc("b"), Vec::new());
        cache.insert(doc("c"), Vec::new());
        assert_eq!(cache.len(), 2);
        assert!(cache.get("a").is_none());
        assert_eq!(cache.get("c").unwrap().merchant_order_id, "o-c");
        cache.remove("b");
        assert!(cache.get("b").is_none());
        // A removed id still in the order queue is skipped: the bound stays exact.
        cache.insert(doc("d"), Vec::new());
        cache.insert(doc("e"), Vec::new());
        assert_eq!(cache.len(), 2);
        assert!(cache.get("d").is_some() && cache.get("e").is_some());
    }

    #[test]
    fn capacity_zero_holds_nothing() {
        let cache = PendingDocs::new(0);
        cache.insert(doc("a"), Vec::new());
        assert!(cache.is_empty() && cache.get("a").is_none());
    }

    #[test]
    fn inserting_the_same_payment_twice_keeps_one_entry() {
        let cache = PendingDocs::new(2);
        cache.insert(doc("a"), Vec::new());
        cache.insert(doc("a"), Vec::new());
        cache.insert(doc("b"), Vec::new());
        assert_eq!(cache.len(), 2);
        assert!(cache.get("a").is_some());
    }

    #[test]
    fn attempts_are_found_by_their_channel_order_id_until_the_payment_goes() {
        let tag = ScopeTag::account(
            &MerchantId::parse("alpha").unwrap(),
            &AccountId::parse("acc").unwrap(),
        );
        let payment = PaymentId::generate(tag, 1);
        let row = |n: u8| AttemptRow {
            payment_id: payment.as_str().to_owned(),
            attempt: u32::from(n),
            channel_id: format!("ch{n}"),
            channel_order_id: ChannelOrderId::for_attempt(&payment, n).to_string(),
            outcome: crate::settlement::AttemptOutcome::Unknown,
            latency_ms: None,
            action: None,
            channel_txn_id: None,
            created_at_ms: 1,
            updated_at_ms: 1,
        };
        let cache = PendingDocs::new(4);
        cache.insert(doc(payment.as_str()), vec![row(1)]);
        let first = ChannelOrderId::for_attempt(&payment, 1);
        let second = ChannelOrderId::for_attempt(&payment, 2);
        assert_eq!(cache.attempt(&first).unwrap().channel_id, "ch1");
        assert!(cache.attempt(&second).is_none());
        cache.add_attempt(&row(2));
        assert_eq!(cache.attempt(&second).unwrap().channel_id, "ch2");
        // Another payment's order id names nothing here.
        let other = ChannelOrderId::for_attempt(&PaymentId::generate(tag, 2), 1);
        assert!(cache.attempt(&other).is_none());
        cache.remove(payment.as_str());
        assert!(cache.attempt(&first).is_none() && cache.get(payment.as_str()).is_none());
    }
}
