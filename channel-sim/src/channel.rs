//! One running channel: its keys, its orders, its faults, and the parts every protocol
//! shares — customer payment, expiry, and callback delivery with retries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use tokio::sync::watch;

use crate::clock::{now_unix_ms, now_unix_seconds};
use crate::config::{CallbackPolicy, ChannelIds, ChannelKind, ChannelSpec, Faults};
use crate::crypto::{ApiV3Key, HmacKey, RsaSigner, RsaVerifier};
use crate::record::{CallbackRecord, OrderRecord, OrderStatus};
use crate::rng::SplitMix64;
use crate::{alipay, supplier, wechatpay, SimError};

/// The largest callback answer read (the acknowledgements are a few bytes).
const MAX_ACK_BODY_BYTES: usize = 16 * 1024;

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// What all channels share: the shutdown signal, the callback client and policy.
pub(crate) struct Runtime {
    pub shutdown: watch::Receiver<bool>,
    pub client: HttpClient,
    pub policy: CallbackPolicy,
    pub max_orders: usize,
}

impl Runtime {
    /// Sleeps `ms`, or returns false at once if the simulator shuts down.
    pub async fn sleep(&self, ms: u64) -> bool {
        let mut shutdown = self.shutdown.clone();
        if *shutdown.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => true,
            _ = shutdown.wait_for(|down| *down) => false,
        }
    }
}

/// A channel's keys, parsed at start.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    pub gateway_public: Option<RsaVerifier>,
    pub channel_private: Option<RsaSigner>,
    pub apiv3: Option<ApiV3Key>,
    pub hmac: Option<HmacKey>,
}

pub(crate) struct Orders {
    pub by_id: HashMap<String, OrderRecord>,
    next_seq: u64,
}

pub(crate) struct Channel {
    pub id: String,
    pub kind: ChannelKind,
    pub ids: ChannelIds,
    pub keys: Keys,
    pub auto_pay: bool,
    pub auto_pay_delay_ms: u64,
    pub faults: watch::Sender<Faults>,
    pub rng: Mutex<SplitMix64>,
    orders: Mutex<Orders>,
    /// Set whenever the orders may have changed since they were last saved.
    changed: AtomicBool,
    pub runtime: Arc<Runtime>,
}

fn missing(id: &str, what: &str) -> SimError {
    SimError::Config(format!("channel `{id}` needs {what}"))
}

impl Channel {
    pub fn new(spec: &ChannelSpec, runtime: Arc<Runtime>) -> Result<Self, SimError> {
        crate::config::validate_id(&spec.id).map_err(SimError::Config)?;
        spec.faults.validate().map_err(SimError::Config)?;
        let id = spec.id.as_str();
        let key_error = |what: &str, e: crate::crypto::CryptoError| {
            SimError::Config(format!("channel `{id}`: {what}: {e}"))
        };
        let mut keys = Keys::default();
        let ids = &spec.ids;
        match spec.kind {
            ChannelKind::Alipay | ChannelKind::Wechatpay => {
                let public = spec
                    .gateway_public_key
                    .as_deref()
                    .ok_or_else(|| missing(id, "gateway_public_key"))?;
                keys.gateway_public = Some(
                    RsaVerifier::from_pem(public)
                        .map_err(|e| key_error("gateway_public_key", e))?,
                );
                let private = spec
                    .channel_private_key
                    .as_ref()
                    .ok_or_else(|| missing(id, "channel_private_key"))?;
                keys.channel_private = Some(
                    RsaSigner::from_pem(private.expose())
                        .map_err(|e| key_error("channel_private_key", e))?,
                );
                if spec.kind == ChannelKind::Alipay {
                    ids.app_id
                        .as_ref()
                        .ok_or_else(|| missing(id, "ids.app_id"))?;
                } else {
                    for (value, name) in [
                        (&ids.mchid, "ids.mchid"),
                        (&ids.appid, "ids.appid"),
                        (&ids.merchant_serial, "ids.merchant_serial"),
                        (&ids.platform_serial, "ids.platform_serial"),
                    ] {
                        value.as_ref().ok_or_else(|| missing(id, name))?;
                    }
                    let apiv3 = spec
                        .apiv3_key
                        .as_ref()
                        .ok_or_else(|| missing(id, "apiv3_key"))?;
                    keys.apiv3 = Some(
                        ApiV3Key::new(apiv3.expose().as_bytes())
                            .map_err(|e| key_error("apiv3_key", e))?,
                    );
                }
            }
            ChannelKind::Supplier => {
                let secret = spec
                    .supplier_secret
                    .as_ref()
                    .ok_or_else(|| missing(id, "supplier_secret"))?;
                keys.hmac = Some(
                    HmacKey::new(secret.expose().as_bytes())
                        .map_err(|e| key_error("supplier_secret", e))?,
                );
            }
        }
        Ok(Self {
            id: spec.id.clone(),
            kind: spec.kind,
            ids: spec.ids.clone(),
            keys,
            auto_pay: spec.auto_pay,
            auto_pay_delay_ms: spec.auto_pay_delay_ms,
            rng: Mutex::new(SplitMix64::new(spec.faults.seed)),
            faults: watch::Sender::new(spec.faults.clone()),
            orders: Mutex::new(Orders {
                by_id: HashMap::new(),
                next_seq: 0,
            }),
            changed: AtomicBool::new(false),
            runtime,
        })
    }

    pub fn faults(&self) -> Faults {
        self.faults.borrow().clone()
    }

    pub fn set_faults(&self, faults: Faults) -> Result<(), String> {
        faults.validate()?;
        *lock(&self.rng) = SplitMix64::new(faults.seed);
        self.faults.send_replace(faults);
        Ok(())
    }

    /// The orders, locked; expiry is applied lazily by the callers that read an order.
    /// Counted as a change (to be saved): most callers change something.
    pub fn orders(&self) -> MutexGuard<'_, Orders> {
        self.changed.store(true, Ordering::Relaxed);
        lock(&self.orders)
    }

    /// Whether the orders may have changed since the last call (and clears it).
    pub(crate) fn take_changed(&self) -> bool {
        self.changed.swap(false, Ordering::Relaxed)
    }

    pub(crate) fn mark_changed(&self) {
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Every order with its create fingerprint, oldest first: what `persist` keeps.
    pub(crate) fn saved_orders(&self) -> Vec<(OrderRecord, String)> {
        let orders = lock(&self.orders);
        let mut list: Vec<(OrderRecord, String)> = orders
            .by_id
            .values()
            .map(|order| (order.clone(), order.fingerprint.clone()))
            .collect();
        list.sort_by_key(|(order, _)| order.seq);
        list
    }

    /// Takes back the orders saved before a restart (oldest first), then picks up what was
    /// under way: an unpaid order is still auto-paid (when the channel auto-pays), and a paid
    /// order whose success notice was never acknowledged is notified again, as a real channel
    /// goes on notifying.
    pub(crate) fn restore(self: &Arc<Self>, saved: Vec<(OrderRecord, String)>) {
        let mut unpaid = Vec::new();
        let mut unnotified = Vec::new();
        {
            let mut orders = lock(&self.orders);
            for (mut order, fingerprint) in saved {
                order.fingerprint = fingerprint;
                order.seq = orders.next_seq;
                orders.next_seq += 1;
                match order.status {
                    OrderStatus::Unpaid => unpaid.push(order.channel_order_id.clone()),
                    OrderStatus::Paid if !order.callbacks.iter().any(|c| c.acknowledged) => {
                        unnotified.push(order.clone())
                    }
                    OrderStatus::Paid | OrderStatus::Closed => {}
                }
                orders.by_id.insert(order.channel_order_id.clone(), order);
            }
        }
        tracing::info!(channel = %self.id, unpaid = unpaid.len(), unnotified = unnotified.len(), "orders restored");
        if self.auto_pay {
            for id in unpaid {
                self.schedule_auto_pay(id);
            }
        }
        for order in unnotified {
            let channel = Arc::clone(self);
            tokio::spawn(async move { channel.notify_paid(order).await });
        }
    }

    fn schedule_auto_pay(self: &Arc<Self>, channel_order_id: String) {
        let channel = Arc::clone(self);
        tokio::spawn(async move {
            if channel.runtime.sleep(channel.auto_pay_delay_ms).await {
                channel.pay(&channel_order_id);
            }
        });
    }

    /// A snapshot of every order, oldest first, expiry applied.
    pub fn order_list(&self) -> Vec<OrderRecord> {
        let now = now_unix_ms();
        let mut orders = self.orders();
        let mut list: Vec<OrderRecord> = orders
            .by_id
            .values_mut()
            .map(|order| {
                order.expire_if_due(now);
                order.clone()
            })
            .collect();
        list.sort_by_key(|order| order.seq);
        list
    }

    pub fn order(&self, channel_order_id: &str) -> Option<OrderRecord> {
        let mut orders = self.orders();
        let order = orders.by_id.get_mut(channel_order_id)?;
        order.expire_if_due(now_unix_ms());
        Some(order.clone())
    }

    /// The customer pays: exactly once, never after expiry or close.
    pub fn pay(self: &Arc<Self>, channel_order_id: &str) -> PayOutcome {
        let now = now_unix_ms();
        let snapshot = {
            let mut orders = self.orders();
            let Some(order) = orders.by_id.get_mut(channel_order_id) else {
                return PayOutcome::NotFound;
            };
            if order.expire_if_due(now) {
                tracing::info!(channel = %self.id, order = %channel_order_id, "pay after expiry refused; order closed");
            }
            match order.status {
                OrderStatus::Paid => return PayOutcome::AlreadyPaid(order.clone()),
                OrderStatus::Closed => return PayOutcome::Closed(order.clone()),
                OrderStatus::Unpaid => {}
            }
            order.status = OrderStatus::Paid;
            order.scanned = true;
            order.paid_at_unix_ms = Some(now);
            order.pay_count += 1;
            assert_eq!(order.pay_count, 1, "an order is paid at most once");
            order.clone()
        };
        tracing::info!(channel = %self.id, order = %channel_order_id, "paid");
        let channel = Arc::clone(self);
        let paid = snapshot.clone();
        tokio::spawn(async move { channel.notify_paid(paid).await });
        PayOutcome::Paid(snapshot)
    }

    /// Registers a new order (the protocol module has checked it), schedules auto-pay.
    /// `Err` when the channel holds its maximum of orders.
    pub fn insert_order(self: &Arc<Self>, mut order: OrderRecord) -> Result<OrderRecord, ()> {
        {
            let mut orders = self.orders();
            if orders.by_id.len() >= self.runtime.max_orders {
                return Err(());
            }
            order.seq = orders.next_seq;
            orders.next_seq += 1;
            orders
                .by_id
                .insert(order.channel_order_id.clone(), order.clone());
        }
        if self.auto_pay {
            self.schedule_auto_pay(order.channel_order_id.clone());
        }
        Ok(order)
    }

    /// Sends the success notice(s) of a freshly paid order, with the callback faults.
    async fn notify_paid(self: Arc<Self>, order: OrderRecord) {
        let faults = self.faults();
        let event = match self.kind {
            ChannelKind::Alipay => "TRADE_SUCCESS",
            ChannelKind::Wechatpay => "TRANSACTION.SUCCESS",
            ChannelKind::Supplier => "succeeded",
        };
        if faults.callback_drop {
            self.record_callback(
                &order.channel_order_id,
                CallbackRecord {
                    event: event.into(),
                    attempt: 0,
                    status: None,
                    acknowledged: false,
                    error: Some("dropped".into()),
                    duplicate: false,
                    at_unix_ms: now_unix_ms(),
                },
            );
            return;
        }
        if order.notify_url.is_empty() {
            // Alipay allows orders without a notify URL: nothing to call.
            return;
        }
        if faults.callback_delay_ms > 0 && !self.runtime.sleep(faults.callback_delay_ms).await {
            return;
        }
        let notice = match self.kind {
            ChannelKind::Alipay => alipay::notice(&self, &order, "TRADE_SUCCESS"),
            ChannelKind::Wechatpay => wechatpay::notice(&self, &order),
            ChannelKind::Supplier => supplier::notice(&self, &order),
        };
        let acknowledged = self.deliver(&order, &notice).await;
        if !acknowledged {
            return;
        }
        if faults.callback_duplicate {
            self.attempt(&order, &notice, 1, true).await;
        }
        if self.kind == ChannelKind::Alipay {
            if let Some(delay_ms) = self.runtime.policy.trade_finished_delay_ms {
                if self.runtime.sleep(delay_ms).await {
                    let finished = alipay::notice(&self, &order, "TRADE_FINISHED");
                    self.deliver(&order, &finished).await;
                }
            }
        }
    }

    /// Attempts a notice until acknowledged, at most `max_attempts` times with backoff.
    async fn deliver(&self, order: &OrderRecord, notice: &Notice) -> bool {
        let policy = &self.runtime.policy;
        for attempt in 1..=policy.max_attempts {
            if self.attempt(order, notice, attempt, false).await {
                return true;
            }
            if attempt < policy.max_attempts
                && !self.runtime.sleep(policy.backoff_ms(attempt)).await
            {
                return false;
            }
        }
        tracing::warn!(channel = %self.id, order = %order.channel_order_id, event = %notice.event, "callback never acknowledged");
        false
    }

    /// One attempt, recorded. True if acknowledged.
    async fn attempt(
        &self,
        order: &OrderRecord,
        notice: &Notice,
        attempt: u32,
        duplicate: bool,
    ) -> bool {
        let mut request = http::Request::post(&order.notify_url)
            .header(http::header::CONTENT_TYPE, notice.content_type);
        for (name, value) in self.callback_headers(&notice.body) {
            request = request.header(name, value);
        }
        let (status, error, acknowledged) = match request.body(Full::new(notice.body.clone())) {
            Err(e) => (None, Some(format!("bad request: {e}")), false),
            Ok(request) => {
                let timeout = Duration::from_millis(self.runtime.policy.attempt_timeout_ms);
                match tokio::time::timeout(timeout, self.send(request)).await {
                    Err(_) => (None, Some("timeout".to_owned()), false),
                    Ok(Err(e)) => (None, Some(e), false),
                    Ok(Ok((status, body))) => {
                        let ack = self.is_acknowledgement(status, &body);
                        (Some(status), None, ack)
                    }
                }
            }
        };
        self.record_callback(
            &order.channel_order_id,
            CallbackRecord {
                event: notice.event.clone(),
                attempt,
                status,
                acknowledged,
                error,
                duplicate,
                at_unix_ms: now_unix_ms(),
            },
        );
        acknowledged
    }

    async fn send(&self, request: http::Request<Full<Bytes>>) -> Result<(u16, Bytes), String> {
        let response = self
            .runtime
            .client
            .request(request)
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_ACK_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    }

    fn callback_headers(&self, body: &[u8]) -> Vec<(&'static str, String)> {
        match self.kind {
            ChannelKind::Alipay => Vec::new(),
            ChannelKind::Wechatpay => wechatpay::signature_headers(self, body),
            ChannelKind::Supplier => vec![(
                supplier::HEADER,
                self.keys
                    .hmac
                    .as_ref()
                    .expect("a supplier channel has its secret")
                    .signature_header(now_unix_seconds(), body),
            )],
        }
    }

    /// The protocol's acknowledgement: Alipay the plain text `success`; WeChat Pay 200 or
    /// 204; the supplier `200 {"received": true}`.
    fn is_acknowledgement(&self, status: u16, body: &[u8]) -> bool {
        match self.kind {
            ChannelKind::Alipay => status == 200 && body == b"success",
            ChannelKind::Wechatpay => status == 200 || status == 204,
            ChannelKind::Supplier => {
                status == 200
                    && serde_json::from_slice::<serde_json::Value>(body)
                        .is_ok_and(|v| v.get("received") == Some(&serde_json::Value::Bool(true)))
            }
        }
    }

    fn record_callback(&self, channel_order_id: &str, record: CallbackRecord) {
        if let Some(order) = self.orders().by_id.get_mut(channel_order_id) {
            order.callbacks.push(record);
        }
    }
}

/// A callback body, sent unchanged on every attempt (signature headers are made per
/// attempt, so their timestamps stay fresh).
pub(crate) struct Notice {
    pub event: String,
    pub content_type: &'static str,
    pub body: Bytes,
}

/// What a customer payment did.
#[derive(Debug, Clone)]
pub enum PayOutcome {
    Paid(OrderRecord),
    /// Paid before: nothing happened.
    AlreadyPaid(OrderRecord),
    /// Closed, or expired (now closed): refused.
    Closed(OrderRecord),
    NotFound,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
