//! The documents of the channel payments this instance created and that wait for their
//! channel. A callback (or the resolution loop) settling one finds its document here instead of
//! reading it back from Redis: one Redis round trip fewer per callback.
//!
//! Only a shortcut, never a source of truth: a payment's document never changes after its
//! creation, and its status is checked by the balance store's success script whatever this
//! holds. A miss (another instance created it, a restart, an eviction) reads Redis as before.
//! Bounded by `payments.pending_doc_cache`: the oldest entries go first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use crate::preauth::PaymentDoc;

pub struct PendingDocs {
    docs: DashMap<String, Arc<PaymentDoc>>,
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

    pub fn insert(&self, doc: PaymentDoc) {
        if self.capacity == 0 {
            return;
        }
        let id = doc.id.clone();
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        if self.docs.insert(id.clone(), Arc::new(doc)).is_none() {
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

    pub fn get(&self, id: &str) -> Option<Arc<PaymentDoc>> {
        self.docs.get(id).map(|d| d.clone())
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
        cache.insert(doc("a"));
        cache.insert(doc("b"));
        cache.insert(doc("c"));
        assert_eq!(cache.len(), 2);
        assert!(cache.get("a").is_none());
        assert_eq!(cache.get("c").unwrap().merchant_order_id, "o-c");
        cache.remove("b");
        assert!(cache.get("b").is_none());
        // A removed id still in the order queue is skipped: the bound stays exact.
        cache.insert(doc("d"));
        cache.insert(doc("e"));
        assert_eq!(cache.len(), 2);
        assert!(cache.get("d").is_some() && cache.get("e").is_some());
    }

    #[test]
    fn capacity_zero_holds_nothing() {
        let cache = PendingDocs::new(0);
        cache.insert(doc("a"));
        assert!(cache.is_empty() && cache.get("a").is_none());
    }

    #[test]
    fn inserting_the_same_payment_twice_keeps_one_entry() {
        let cache = PendingDocs::new(2);
        cache.insert(doc("a"));
        cache.insert(doc("a"));
        cache.insert(doc("b"));
        assert_eq!(cache.len(), 2);
        assert!(cache.get("a").is_some());
    }
}
