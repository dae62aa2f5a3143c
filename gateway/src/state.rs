//! What the payment core shares: the configuration, the balance and settlement stores, the
//! channels with their breakers, and the documents of the payments in flight. The HTTP layer
//! (`api::AppState`) holds it beside what only HTTP needs (authentication, admission, the
//! metrics handle); the core's modules (`checkout`, `resolution`, `refunds`, `webhooks`) take
//! it and never see the HTTP layer.

use std::sync::Arc;

use crate::config::Config;
use crate::preauth::{BalanceStore, OpContext};
use crate::routing::ChannelRegistry;
use crate::settlement::settler::Settler;
use crate::telemetry;

pub struct Core {
    pub config: Arc<Config>,
    /// The hot state: balances, holds, payments, idempotency (Redis or in-process).
    pub balances: Arc<dyn BalanceStore>,
    /// The system of record and the way to it.
    pub settler: Arc<Settler>,
    /// The configured upstream channels with their breakers.
    pub channels: Arc<ChannelRegistry>,
    /// Documents of the channel payments this instance created, until they settle.
    pub pending_docs: crate::pending_docs::PendingDocs,
    /// The gateway's URL as channels reach it: notify URLs are `<public_url>/v1/callbacks/<id>`.
    pub public_url: String,
}

impl Core {
    pub fn new(
        config: Arc<Config>,
        balances: Arc<dyn BalanceStore>,
        settler: Arc<Settler>,
        channels: Arc<ChannelRegistry>,
        public_url: String,
    ) -> Self {
        Self {
            pending_docs: crate::pending_docs::PendingDocs::new(
                config.settings.payments.pending_doc_cache,
            ),
            config,
            balances,
            settler,
            channels,
            public_url,
        }
    }

    /// The context of one store operation, at this instant.
    pub fn op(&self) -> OpContext {
        OpContext {
            now_ms: telemetry::now_ms(),
            lazy_release_max: self.config.settings.preauth.lazy_release_max,
        }
    }
}
