//! The Redis backend: every operation is one Lua script (`scripts/*.lua`, each with a header
//! giving its keys, arguments, replies and invariant) over keys of one hash tag, so it is one
//! round trip and runs unchanged on Redis Cluster. Scripts are loaded once at start and called
//! with EVALSHA; redis-rs re-loads a script when Redis answers NOSCRIPT (after a restart or a
//! failover).
//!
//! What must be found without knowing its key — scopes with unsettled records (recovery),
//! scopes with live holds (the sweeper), payments whose state leaves after
//! `redis.payment_retention_seconds` — is indexed in one key per cluster slot (see `slots`),
//! written by the same script as the state, read a bounded number of slots per call: no
//! keyspace SCAN on any periodic path (only `has_accounts`, once at start).
//!
//! Connections are a few multiplexed `ConnectionManager`s used round-robin: each pipelines
//! every concurrent request, and reconnects by itself when Redis comes back. Every call is
//! bounded by `redis.command_timeout_ms`; a failure or a timeout is an operating error that
//! the API answers with `503 unavailable`, never an authorization.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Script};
use async_trait::async_trait;

use super::{
    late_record_id, money_record_id, AcceptedAttempt, AccountKey, AccountRebuild, AccountSnapshot,
    AdjustOutcome, AdjustRequest, AuthorizeOutcome, AuthorizeRequest, BalanceStore, Direction,
    KeyRestore, LateCaptureOutcome, LateCaptureRequest, OpContext, PaymentDoc, PaymentRecord,
    PaymentStatus, RebuildGuard, RefundFinishOutcome, RefundFinishRequest, RefundReserveOutcome,
    RefundReserveRequest, RefundUnwind, RestorePayment, Scope, SettledMark, StoreError,
    StoredOutcome, SucceedOutcome, SucceedRequest, TransitionOutcome, Unsettled, UnsettledPage,
    Unwind, UpsertOutcome,
};
use super::{lua, slots};
use crate::config::RedisSettings;
use crate::ids::{IdempotencyKey, MerchantOrderId, PaymentId, ScopeTag};
use crate::money::Currency;
use crate::telemetry;

const COMMON: &str = include_str!("scripts/common.lua");

/// The index keys' prefixes (each followed by `{`, a slot's tag and `}`; see `common.lua`).
const UNSETTLED_INDEX: &str = "ux:";
const HOLDS_INDEX: &str = "hx:";
const RETENTION_INDEX: &str = "rx:";

/// Set once the slot indexes cover everything in this Redis (see `index_existing`).
const INDEXES_BUILT: &str = "gateway:slot-indexes:v1";

/// Payments handed to one `evict.lua` call at most: bounds one script's run time (about ten
/// commands each).
const EVICTIONS_PER_SCRIPT: usize = 128;

/// The scripts, each prepended with the helpers of `common.lua` it uses (`lua.rs`).
struct Scripts {
    upsert_account: Script,
    read_account: Script,
    authorize: Script,
    succeed: Script,
    late_capture: Script,
    refund_reserve: Script,
    refund_finish: Script,
    restore_payment: Script,
    release: Script,
    adjust: Script,
    read_payment: Script,
    settled: Script,
    accept: Script,
    abandon: Script,
    void: Script,
    unwind: Script,
    restore_keys: Script,
    refund_unwind: Script,
    rebuild_account: Script,
    rebuild_fence: Script,
    evict: Script,
    prune_index: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_common = |body: &str| Script::new(&lua::with_helpers(COMMON, body));
        Self {
            upsert_account: with_common(include_str!("scripts/upsert_account.lua")),
            read_account: with_common(include_str!("scripts/read_account.lua")),
            authorize: with_common(include_str!("scripts/authorize.lua")),
            succeed: with_common(include_str!("scripts/succeed.lua")),
            late_capture: with_common(include_str!("scripts/late_capture.lua")),
            refund_reserve: with_common(include_str!("scripts/refund_reserve.lua")),
            refund_finish: with_common(include_str!("scripts/refund_finish.lua")),
            restore_payment: with_common(include_str!("scripts/restore_payment.lua")),
            release: with_common(include_str!("scripts/release.lua")),
            adjust: with_common(include_str!("scripts/adjust.lua")),
            read_payment: with_common(include_str!("scripts/read_payment.lua")),
            settled: with_common(include_str!("scripts/settled.lua")),
            accept: with_common(include_str!("scripts/accept.lua")),
            abandon: with_common(include_str!("scripts/abandon.lua")),
            void: with_common(include_str!("scripts/void.lua")),
            unwind: with_common(include_str!("scripts/unwind.lua")),
            restore_keys: with_common(include_str!("scripts/restore_keys.lua")),
            refund_unwind: with_common(include_str!("scripts/refund_unwind.lua")),
            rebuild_account: with_common(include_str!("scripts/rebuild_account.lua")),
            rebuild_fence: Script::new(include_str!("scripts/rebuild_fence.lua")),
            evict: with_common(include_str!("scripts/evict.lua")),
            prune_index: Script::new(include_str!("scripts/prune_index.lua")),
        }
    }

    fn all(&self) -> [&Script; 21] {
        [
            &self.upsert_account,
            &self.read_account,
            &self.authorize,
            &self.succeed,
            &self.late_capture,
            &self.refund_reserve,
            &self.refund_finish,
            &self.restore_payment,
            &self.release,
            &self.adjust,
            &self.read_payment,
            &self.settled,
            &self.accept,
            &self.abandon,
            &self.void,
            &self.unwind,
            &self.restore_keys,
            &self.refund_unwind,
            &self.rebuild_account,
            &self.evict,
            &self.prune_index,
        ]
    }
}

/// The keys of one scope (see `scripts/common.lua` for the layout), and its slot's index keys.
struct Keys {
    account: String,
    holds: String,
    hold_amounts: String,
    statuses: String,
    docs: String,
    orders: String,
    unsettled: String,
    refunds: String,
    late_captures: String,
    /// `ux:{S}`, `hx:{S}`, `rx:{S}` of the scope's slot S (see `slots`): passed as the last
    /// keys of every script that may add to them.
    indexes: [String; 3],
}

impl Keys {
    fn of(tag: ScopeTag) -> Self {
        let tag = tag.as_str();
        Self {
            unsettled: tagged("u:", tag),
            account: tagged("a:", tag),
            holds: tagged("h:", tag),
            hold_amounts: tagged("ph:", tag),
            statuses: tagged("ps:", tag),
            docs: tagged("pd:", tag),
            orders: tagged("o:", tag),
            refunds: tagged("rf:", tag),
            late_captures: tagged("lc:", tag),
            indexes: Self::slot_indexes(slots::slot_of_str(tag)),
        }
    }

    /// The outbox key `u:{T}` alone (what `settled.lua` needs of a scope).
    fn unsettled(tag: ScopeTag) -> String {
        tagged("u:", tag.as_str())
    }

    /// The index keys of one slot: outbox (`ux`), holds (`hx`), retention (`rx`).
    fn slot_indexes(slot: u16) -> [String; 3] {
        [0, 1, 2].map(|which| Self::slot_index(slot, which))
    }

    /// One index key of a slot: `which` is 0 (`ux`), 1 (`hx`) or 2 (`rx`).
    fn slot_index(slot: u16, which: usize) -> String {
        const PREFIXES: [&str; 3] = [UNSETTLED_INDEX, HOLDS_INDEX, RETENTION_INDEX];
        tagged(PREFIXES[which], slots::slot_tag(slot))
    }

    /// The keys of the scripts that work on one account and release its expired holds
    /// (upsert, read, sweep, succeed, release): `a h ph ps u`, then the slot's indexes.
    fn account_script_keys(&self) -> [&str; 8] {
        let [ux, hx, rx] = &self.indexes;
        [
            &self.account,
            &self.holds,
            &self.hold_amounts,
            &self.statuses,
            &self.unsettled,
            ux,
            hx,
            rx,
        ]
    }

    /// `keys` followed by the slot's index keys (they come last: see `common.lua`).
    fn with_indexes<'a>(&'a self, keys: &[&'a str]) -> Vec<&'a str> {
        let mut all = Vec::with_capacity(keys.len() + 3);
        all.extend_from_slice(keys);
        all.extend(self.indexes.iter().map(String::as_str));
        all
    }

    fn idempotency(tag: ScopeTag, key: &str) -> String {
        let mut k = tagged("i:", tag.as_str());
        k.reserve(1 + key.len());
        k.push(':');
        k.push_str(key);
        k
    }
}

/// `prefix{tag}`: a key of a scope or slot. Built by hand, not with `format!`: the hot path
/// builds a dozen per payment and the background loops thousands per second (`format!` took
/// about four times the instructions: `Keys::of` 8.3k → 2.2k by `scripts/instructions.sh`).
fn tagged(prefix: &str, tag: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + tag.len() + 2);
    key.push_str(prefix);
    key.push('{');
    key.push_str(tag);
    key.push('}');
    key
}

type Reply = Vec<Option<String>>;

pub struct RedisStore {
    connections: Vec<ConnectionManager>,
    next: AtomicUsize,
    scripts: Scripts,
    command_timeout: Duration,
    /// The slot whose holds index the sweeper reads next.
    sweep_cursor: Mutex<u16>,
    /// The slot whose outbox index the recovery loop reads next.
    unsettled_cursor: Mutex<u16>,
    /// The slot whose retention index the sweeper reads next.
    retention_cursor: Mutex<u16>,
    /// `redis.index_slots_per_call`.
    index_slots_per_call: u16,
    /// `redis.payment_retention_seconds`, in ms.
    retention_ms: u64,
    /// `redis.evictions_per_tick`.
    evictions_per_tick: usize,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}

fn unavailable(err: ::redis::RedisError) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

impl RedisStore {
    /// Connects, refuses a Redis that may evict keys, and loads every script.
    pub async fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        let client = Client::open(settings.url.expose()).map_err(|e| {
            StoreError::Misconfigured(format!("redis.url is not a valid Redis URL: {e}"))
        })?;
        let command_timeout = Duration::from_millis(settings.command_timeout_ms);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
            .set_response_timeout(Some(command_timeout))
            .set_number_of_retries(settings.reconnect_retries)
            .set_max_delay(Duration::from_millis(settings.reconnect_max_delay_ms));
        let mut connections = Vec::with_capacity(settings.connections);
        for _ in 0..settings.connections {
            let connect = client.get_connection_manager_with_config(config.clone());
            let connection = tokio::time::timeout(
                command_timeout.max(Duration::from_millis(settings.connect_timeout_ms)),
                connect,
            )
            .await
            .map_err(|_| StoreError::Timeout(settings.connect_timeout_ms))?
            .map_err(unavailable)?;
            connections.push(connection);
        }
        let store = Self {
            connections,
            next: AtomicUsize::new(0),
            scripts: Scripts::new(),
            command_timeout,
            sweep_cursor: Mutex::new(0),
            unsettled_cursor: Mutex::new(0),
            retention_cursor: Mutex::new(0),
            index_slots_per_call: u16::try_from(settings.index_slots_per_call)
                .unwrap_or(slots::SLOTS)
                .clamp(1, slots::SLOTS),
            retention_ms: settings.payment_retention_seconds.saturating_mul(1000),
            evictions_per_tick: settings.evictions_per_tick.max(1),
        };
        store.check_eviction_policy().await?;
        for script in store.scripts.all() {
            let mut conn = store.connection();
            store
                .bounded("script_load", script.load_async(&mut conn))
                .await?;
        }
        store.index_existing().await?;
        Ok(store)
    }

    /// Indexes what a Redis written by a release without the slot indexes holds — outboxes
    /// (`u:{T}` → `ux`), holds (`h:{T}` → `hx`), payments (`ps:{T}` → `rx`, dated now) — so
    /// nothing it left is missed by recovery, the sweeper or the retention. Once per Redis:
    /// [`INDEXES_BUILT`] marks it done (every script keeps the indexes from then on; mixed
    /// versions are not supported). Walks the keyspace with SCAN: start only, like
    /// `has_accounts`.
    async fn index_existing(&self) -> Result<(), StoreError> {
        let mut conn = self.connection();
        let built: bool = self
            .bounded(
                "index_existing",
                ::redis::cmd("EXISTS")
                    .arg(INDEXES_BUILT)
                    .query_async(&mut conn),
            )
            .await?;
        if built {
            return Ok(());
        }
        let now_ms = crate::telemetry::now_ms();
        let mut indexed = 0u64;
        for (pattern, prefix, which) in
            [("u:{*", "u:{", 0), ("h:{*", "h:{", 1), ("ps:{*", "ps:{", 2)]
        {
            let mut cursor = 0u64;
            loop {
                let (next, keys) = self.scan(cursor, pattern, 1_000).await?;
                for key in keys {
                    let Some(tag) = key
                        .strip_prefix(prefix)
                        .and_then(|rest| rest.strip_suffix('}'))
                        .and_then(ScopeTag::parse)
                    else {
                        continue;
                    };
                    let index = &Keys::slot_index(slots::slot_of(tag), which);
                    let mut conn = self.connection();
                    if which < 2 {
                        let _: i64 = self
                            .bounded(
                                "index_existing",
                                ::redis::cmd("SADD")
                                    .arg(index)
                                    .arg(tag.as_str())
                                    .query_async(&mut conn),
                            )
                            .await?;
                        indexed += 1;
                        continue;
                    }
                    let pids: Vec<String> = self
                        .bounded(
                            "index_existing",
                            ::redis::cmd("HKEYS").arg(&key).query_async(&mut conn),
                        )
                        .await?;
                    for chunk in pids.chunks(1_000) {
                        let mut zadd = ::redis::cmd("ZADD");
                        zadd.arg(index).arg("NX");
                        for pid in chunk {
                            zadd.arg(now_ms).arg(pid);
                        }
                        let _: i64 = self
                            .bounded("index_existing", zadd.query_async(&mut conn))
                            .await?;
                        indexed += chunk.len() as u64;
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        let _: () = self
            .bounded(
                "index_existing",
                ::redis::cmd("SET")
                    .arg(INDEXES_BUILT)
                    .arg(now_ms)
                    .query_async(&mut conn),
            )
            .await?;
        if indexed > 0 {
            tracing::info!(indexed, "indexed what an earlier release left in Redis");
        }
        Ok(())
    }

    /// Redis must never evict a key: a vanished hold or idempotency record is lost money or a
    /// double charge. `INFO memory` works where `CONFIG GET` is disabled (managed Redis).
    async fn check_eviction_policy(&self) -> Result<(), StoreError> {
        let mut conn = self.connection();
        let info: String = self
            .bounded(
                "info",
                ::redis::cmd("INFO").arg("memory").query_async(&mut conn),
            )
            .await?;
        let policy = info
            .lines()
            .find_map(|line| line.trim().strip_prefix("maxmemory_policy:"))
            .unwrap_or("unknown");
        if policy != "noeviction" {
            return Err(StoreError::Misconfigured(format!(
                "Redis maxmemory-policy is {policy:?}; the gateway requires noeviction \
                 (an evicted hold or idempotency record would lose money)"
            )));
        }
        Ok(())
    }

    fn connection(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        self.connections[i].clone()
    }

    /// One round trip, counted and bounded by the command timeout.
    async fn bounded<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        telemetry::redis_round_trip(op);
        match tokio::time::timeout(self.command_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(unavailable(err)),
            Err(_) => Err(StoreError::Timeout(self.command_timeout.as_millis() as u64)),
        }
    }

    async fn run(
        &self,
        op: &'static str,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<Reply, StoreError> {
        self.eval(op, script, keys, args).await
    }

    /// Calls `script` with `keys` and `args`: one `EVALSHA` packed straight into one buffer
    /// (the redis crate's `ScriptInvocation` first copies each key and argument into a vector
    /// of its own, 26 allocations for an `authorize`), and, when Redis does not have the
    /// script (a restart, `SCRIPT FLUSH`), `SCRIPT LOAD` and the same call again, inside the
    /// same bound.
    async fn eval<T: ::redis::FromRedisValue>(
        &self,
        op: &'static str,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, StoreError> {
        let bytes = keys.iter().chain(args).map(|a| a.len()).sum::<usize>();
        let mut cmd = ::redis::Cmd::with_capacity(3 + keys.len() + args.len(), 64 + bytes);
        cmd.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        let mut conn = self.connection();
        self.bounded(op, async {
            match cmd.query_async(&mut conn).await {
                Err(err)
                    if err.kind()
                        == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript) =>
                {
                    script.load_async(&mut conn).await?;
                    cmd.query_async(&mut conn).await
                }
                other => other,
            }
        })
        .await
    }
}

fn corrupt(what: &str, reply: &Reply) -> StoreError {
    StoreError::Corrupt(format!("unexpected {what} reply {reply:?}"))
}

fn field<'a>(reply: &'a Reply, i: usize, what: &str) -> Result<&'a str, StoreError> {
    reply
        .get(i)
        .and_then(|v| v.as_deref())
        .ok_or_else(|| corrupt(what, reply))
}

fn number<T: std::str::FromStr>(reply: &Reply, i: usize, what: &str) -> Result<T, StoreError> {
    field(reply, i, what)?
        .parse()
        .map_err(|_| corrupt(what, reply))
}

/// Parses `cur, bal, held, cred, seq` starting at `at`.
fn snapshot(reply: &Reply, at: usize) -> Result<AccountSnapshot, StoreError> {
    let what = "account";
    let currency = Currency::parse(field(reply, at, what)?).map_err(|_| corrupt(what, reply))?;
    Ok(AccountSnapshot {
        currency,
        balance: number(reply, at + 1, what)?,
        held: number(reply, at + 2, what)?,
        credit_limit: number(reply, at + 3, what)?,
        seq: number(reply, at + 4, what)?,
    })
}

fn status(reply: &Reply, i: usize, what: &str) -> Result<PaymentStatus, StoreError> {
    PaymentStatus::parse(field(reply, i, what)?).ok_or_else(|| corrupt(what, reply))
}

fn currency_of(reply: &Reply, what: &str) -> Result<Currency, StoreError> {
    Currency::parse(field(reply, 1, what)?).map_err(|_| corrupt(what, reply))
}

fn tag_collision(tag: ScopeTag) -> StoreError {
    StoreError::TagCollision(tag.to_string())
}

fn doc_json(doc: &PaymentDoc) -> Result<String, StoreError> {
    serde_json::to_string(doc).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn transition(
    reply: Reply,
    record: Option<PaymentRecord>,
) -> Result<TransitionOutcome, StoreError> {
    match field(&reply, 0, "transition")? {
        "done" => record
            .map(TransitionOutcome::Done)
            .ok_or_else(|| corrupt("transition", &reply)),
        "not_pending" => Ok(TransitionOutcome::NotPending(status(
            &reply,
            1,
            "transition",
        )?)),
        "not_found" => Ok(TransitionOutcome::NotFound),
        _ => Err(corrupt("transition", &reply)),
    }
}

#[async_trait]
impl BalanceStore for RedisStore {
    async fn upsert_account(
        &self,
        key: &AccountKey,
        currency: Currency,
        credit_limit: i64,
        ctx: OpContext,
    ) -> Result<UpsertOutcome, StoreError> {
        let k = Keys::of(key.tag);
        let reply = self
            .run(
                "upsert_account",
                &self.scripts.upsert_account,
                &k.account_script_keys(),
                &[
                    key.merchant.as_str(),
                    key.account.as_str(),
                    currency.code(),
                    &credit_limit.to_string(),
                    &ctx.now_ms.to_string(),
                    &ctx.lazy_release_max.to_string(),
                ],
            )
            .await?;
        match field(&reply, 0, "upsert")? {
            "created" => Ok(UpsertOutcome::Created(snapshot(&reply, 1)?)),
            "updated" => Ok(UpsertOutcome::Updated(snapshot(&reply, 1)?)),
            "currency" => Ok(UpsertOutcome::CurrencyMismatch(currency_of(
                &reply, "upsert",
            )?)),
            "range" => Ok(UpsertOutcome::OutOfRange),
            "collision" => Err(tag_collision(key.tag)),
            _ => Err(corrupt("upsert", &reply)),
        }
    }

    async fn read_account(
        &self,
        key: &AccountKey,
        ctx: OpContext,
    ) -> Result<Option<AccountSnapshot>, StoreError> {
        let k = Keys::of(key.tag);
        let reply = self
            .run(
                "read_account",
                &self.scripts.read_account,
                &k.account_script_keys(),
                &[
                    key.merchant.as_str(),
                    key.account.as_str(),
                    &ctx.now_ms.to_string(),
                    &ctx.lazy_release_max.to_string(),
                ],
            )
            .await?;
        match field(&reply, 0, "read_account")? {
            "ok" => Ok(Some(snapshot(&reply, 2)?)),
            "not_found" => Ok(None),
            "collision" => Err(tag_collision(key.tag)),
            _ => Err(corrupt("read_account", &reply)),
        }
    }

    async fn authorize(
        &self,
        req: &AuthorizeRequest,
        ctx: OpContext,
    ) -> Result<AuthorizeOutcome, StoreError> {
        let tag = req.scope.tag();
        let k = Keys::of(tag);
        let idempotency_key = Keys::idempotency(tag, req.idempotency.key.as_str());
        let doc = match &req.doc_json {
            Some(json) => {
                debug_assert_eq!(Some(json), doc_json(&req.doc).ok().as_ref());
                std::borrow::Cow::Borrowed(json.as_str())
            }
            None => std::borrow::Cow::Owned(doc_json(&req.doc)?),
        };
        let (hold_expiry, capture_now) = match req.hold {
            Some(hold) => (hold.expires_at_ms, hold.capture_now),
            None => (0, false),
        };
        let reply = self
            .run(
                "authorize",
                &self.scripts.authorize,
                &k.with_indexes(&[
                    &k.account,
                    &k.holds,
                    &k.hold_amounts,
                    &k.statuses,
                    &k.docs,
                    &k.orders,
                    &idempotency_key,
                    &k.unsettled,
                ]),
                &[
                    req.scope.merchant_id().as_str(),
                    req.scope.account_id().map_or("", |a| a.as_str()),
                    &req.idempotency.request_hash,
                    &req.idempotency.retention_seconds.to_string(),
                    &req.doc.id,
                    &req.doc.amount_minor.to_string(),
                    req.doc.currency.code(),
                    &hold_expiry.to_string(),
                    if capture_now { "1" } else { "0" },
                    &ctx.now_ms.to_string(),
                    &ctx.lazy_release_max.to_string(),
                    req.order_id.as_str(),
                    &doc,
                    req.pending_record.as_deref().unwrap_or(""),
                    req.idempotency.key.as_str(),
                ],
            )
            .await?;
        let what = "authorize";
        Ok(match field(&reply, 0, what)? {
            "created" => {
                let status = status(&reply, 1, what)?;
                let account = if reply.len() > 2 {
                    Some(snapshot(&reply, 2)?)
                } else {
                    None
                };
                let held_minor = match (status, req.hold) {
                    (PaymentStatus::Pending, Some(hold)) if !hold.capture_now => {
                        req.doc.amount_minor
                    }
                    _ => 0,
                };
                AuthorizeOutcome::Created {
                    payment: PaymentRecord {
                        doc: req.doc.clone(),
                        status,
                        held_minor,
                        accepted: None,
                    },
                    account,
                }
            }
            "replay" => AuthorizeOutcome::Replay(StoredOutcome::decode(field(&reply, 1, what)?)?),
            "conflict" => AuthorizeOutcome::IdempotencyConflict,
            "in_flight" => AuthorizeOutcome::IdempotencyInFlight,
            "not_found" => AuthorizeOutcome::AccountNotFound,
            "currency" => AuthorizeOutcome::CurrencyMismatch(currency_of(&reply, what)?),
            "duplicate" => AuthorizeOutcome::DuplicateOrder(
                PaymentId::parse(field(&reply, 1, what)?).ok_or_else(|| corrupt(what, &reply))?,
            ),
            "insufficient" => AuthorizeOutcome::InsufficientFunds {
                available: number(&reply, 1, what)?,
                shortfall: number(&reply, 2, what)?,
            },
            "busy" => AuthorizeOutcome::AccountBusy,
            "collision" => return Err(tag_collision(tag)),
            _ => return Err(corrupt(what, &reply)),
        })
    }

    async fn succeed(
        &self,
        req: &SucceedRequest,
        ctx: OpContext,
    ) -> Result<SucceedOutcome, StoreError> {
        let payment = &req.payment;
        let k = Keys::of(payment.tag());
        let what = "succeed";
        let reply = self
            .run(
                what,
                &self.scripts.succeed,
                &k.account_script_keys(),
                &[
                    payment.as_str(),
                    req.effect.as_str(),
                    &req.amount_minor.to_string(),
                    &ctx.now_ms.to_string(),
                    &req.pending_record,
                    &money_record_id(payment.as_str()),
                ],
            )
            .await?;
        match field(&reply, 0, what)? {
            "done" => Ok(SucceedOutcome::Done {
                seq: number(&reply, 1, what)?,
            }),
            "not_pending" => Ok(SucceedOutcome::NotPending(status(&reply, 1, what)?)),
            "not_found" => Ok(SucceedOutcome::NotFound),
            "out_of_range" => Ok(SucceedOutcome::OutOfRange),
            "no_hold" | "no_account" => Err(StoreError::Corrupt(format!(
                "{} of {payment}: {}",
                req.effect.as_str(),
                field(&reply, 0, what)?
            ))),
            _ => Err(corrupt(what, &reply)),
        }
    }

    async fn late_capture(
        &self,
        req: &LateCaptureRequest,
        ctx: OpContext,
    ) -> Result<LateCaptureOutcome, StoreError> {
        let payment = &req.payment;
        let tag = payment.tag();
        let k = Keys::of(tag);
        let what = "late_capture";
        let reply = self
            .run(
                what,
                &self.scripts.late_capture,
                &k.with_indexes(&[
                    &k.account,
                    &k.holds,
                    &k.hold_amounts,
                    &k.statuses,
                    &k.unsettled,
                    &k.late_captures,
                ]),
                &[
                    payment.as_str(),
                    &req.amount_minor.to_string(),
                    &ctx.now_ms.to_string(),
                    &req.pending_record,
                    &late_record_id(payment.as_str(), req.attempt),
                    &ctx.lazy_release_max.to_string(),
                    &req.attempt.to_string(),
                ],
            )
            .await?;
        Ok(match field(&reply, 0, what)? {
            "done" => LateCaptureOutcome::Done {
                seq: number(&reply, 1, what)?,
            },
            "insufficient" => LateCaptureOutcome::Insufficient {
                available: number(&reply, 1, what)?,
            },
            "pending" => LateCaptureOutcome::Pending,
            "not_found" => LateCaptureOutcome::NotFound,
            _ => return Err(corrupt(what, &reply)),
        })
    }

    async fn reserve_refund(
        &self,
        req: &RefundReserveRequest,
        ctx: OpContext,
    ) -> Result<RefundReserveOutcome, StoreError> {
        let payment = &req.payment;
        let tag = payment.tag();
        let k = Keys::of(tag);
        let key = req.idempotency.key.as_str();
        let idempotency_key = Keys::idempotency(tag, key);
        let what = "refund_reserve";
        let reply = self
            .run(
                what,
                &self.scripts.refund_reserve,
                &k.with_indexes(&[
                    &k.account,
                    &k.holds,
                    &k.hold_amounts,
                    &k.statuses,
                    &k.docs,
                    &k.unsettled,
                    &idempotency_key,
                    &k.refunds,
                ]),
                &[
                    payment.as_str(),
                    &req.amount_minor.map(|a| a.to_string()).unwrap_or_default(),
                    &ctx.now_ms.to_string(),
                    &req.idempotency.request_hash,
                    &req.idempotency.retention_seconds.to_string(),
                    key,
                    &req.hold_expires_at_ms.to_string(),
                    &ctx.lazy_release_max.to_string(),
                    &req.intent_template,
                ],
            )
            .await?;
        Ok(match field(&reply, 0, what)? {
            "created" => RefundReserveOutcome::Created {
                refund_id: field(&reply, 1, what)?.to_owned(),
                number: number(&reply, 2, what)?,
                amount_minor: number(&reply, 3, what)?,
            },
            "replay" => {
                RefundReserveOutcome::Replay(StoredOutcome::decode(field(&reply, 1, what)?)?)
            }
            "conflict" => RefundReserveOutcome::IdempotencyConflict,
            "in_flight" => RefundReserveOutcome::IdempotencyInFlight,
            "not_found" => RefundReserveOutcome::NotFound,
            "invalid_state" => RefundReserveOutcome::InvalidState(status(&reply, 1, what)?),
            "exceeds" => RefundReserveOutcome::Exceeds {
                remaining: number(&reply, 1, what)?,
            },
            "insufficient" => RefundReserveOutcome::InsufficientFunds {
                available: number(&reply, 1, what)?,
                shortfall: number(&reply, 2, what)?,
            },
            "busy" => RefundReserveOutcome::AccountBusy,
            _ => return Err(corrupt(what, &reply)),
        })
    }

    async fn finish_refund(
        &self,
        req: &RefundFinishRequest,
        ctx: OpContext,
    ) -> Result<RefundFinishOutcome, StoreError> {
        let tag = req.payment.tag();
        let k = Keys::of(tag);
        let what = "refund_finish";
        let reply = self
            .run(
                what,
                &self.scripts.refund_finish,
                &k.with_indexes(&[
                    &k.account,
                    &k.holds,
                    &k.hold_amounts,
                    &k.statuses,
                    &k.docs,
                    &k.unsettled,
                    &k.refunds,
                ]),
                &[
                    &req.refund_id,
                    if req.succeeded { "succeeded" } else { "failed" },
                    &ctx.now_ms.to_string(),
                    &req.pending_record,
                ],
            )
            .await?;
        Ok(match field(&reply, 0, what)? {
            "done" => RefundFinishOutcome::Done {
                seq: number(&reply, 1, what)?,
                payment_status: status(&reply, 2, what)?,
            },
            "already" => RefundFinishOutcome::Already(field(&reply, 1, what)?.to_owned()),
            "not_found" => RefundFinishOutcome::NotFound,
            _ => return Err(corrupt(what, &reply)),
        })
    }

    async fn restore_payment(&self, restore: &RestorePayment) -> Result<bool, StoreError> {
        let doc = &restore.record.doc;
        let id = PaymentId::parse(&doc.id)
            .ok_or_else(|| StoreError::Corrupt(format!("payment id {:?}", doc.id)))?;
        let tag = id.tag();
        let k = Keys::of(tag);
        let mut args = vec![
            doc.id.clone(),
            restore.record.status.as_str().to_owned(),
            doc_json(doc)?,
            doc.merchant_order_id.clone(),
            restore.refund_count.to_string(),
            restore.refunds_reserved.to_string(),
            restore.refunds_succeeded.to_string(),
        ];
        for (refund_id, number, amount, created) in &restore.pending_refunds {
            args.extend([
                refund_id.clone(),
                number.to_string(),
                amount.to_string(),
                created.to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = self
            .run(
                "restore_payment",
                &self.scripts.restore_payment,
                &k.with_indexes(&[&k.statuses, &k.docs, &k.orders, &k.refunds]),
                &args,
            )
            .await?;
        Ok(field(&reply, 0, "restore_payment")? == "1")
    }

    async fn fail_unrouted(
        &self,
        payment: &PaymentId,
        idempotency: &IdempotencyKey,
        ctx: OpContext,
    ) -> Result<TransitionOutcome, StoreError> {
        let tag = payment.tag();
        let k = Keys::of(tag);
        let idempotency_key = Keys::idempotency(tag, idempotency.as_str());
        let reply = self
            .run(
                "fail_unrouted",
                &self.scripts.release,
                &k.with_indexes(&[
                    &k.account,
                    &k.holds,
                    &k.hold_amounts,
                    &k.statuses,
                    &k.unsettled,
                    &idempotency_key,
                ]),
                &[
                    payment.as_str(),
                    PaymentStatus::Failed.as_str(),
                    &ctx.now_ms.to_string(),
                    &StoredOutcome::NoChannelAvailable(payment.clone()).encode(),
                ],
            )
            .await?;
        if field(&reply, 0, "fail_unrouted")? != "done" {
            return transition(reply, None);
        }
        let record = self.payment(payment).await?;
        transition(reply, record)
    }

    async fn release(
        &self,
        payment: &PaymentId,
        to: PaymentStatus,
        ctx: OpContext,
    ) -> Result<TransitionOutcome, StoreError> {
        debug_assert!(!to.is_live(), "release ends a payment: {to}");
        let k = Keys::of(payment.tag());
        let reply = self
            .run(
                "release",
                &self.scripts.release,
                &k.account_script_keys(),
                &[payment.as_str(), to.as_str(), &ctx.now_ms.to_string()],
            )
            .await?;
        if field(&reply, 0, "release")? != "done" {
            return transition(reply, None);
        }
        let record = self.payment(payment).await?;
        transition(reply, record)
    }

    async fn adjust(
        &self,
        req: &AdjustRequest,
        ctx: OpContext,
    ) -> Result<AdjustOutcome, StoreError> {
        let tag = req.account.tag;
        let k = Keys::of(tag);
        let idempotency_key = Keys::idempotency(tag, req.idempotency.key.as_str());
        let outcome = StoredOutcome::Adjustment(req.doc.clone()).encode();
        let direction = match req.direction {
            Direction::Credit => "credit",
            Direction::Debit => "debit",
        };
        let reply = self
            .run(
                "adjust",
                &self.scripts.adjust,
                &k.with_indexes(&[
                    &k.account,
                    &k.holds,
                    &k.hold_amounts,
                    &k.statuses,
                    &idempotency_key,
                    &k.unsettled,
                ]),
                &[
                    req.account.merchant.as_str(),
                    req.account.account.as_str(),
                    &req.idempotency.request_hash,
                    &req.idempotency.retention_seconds.to_string(),
                    direction,
                    &req.amount_minor.to_string(),
                    req.currency.code(),
                    &ctx.now_ms.to_string(),
                    &ctx.lazy_release_max.to_string(),
                    &outcome,
                    &req.pending_record,
                    req.adjustment_id.as_str(),
                    req.idempotency.key.as_str(),
                ],
            )
            .await?;
        let what = "adjust";
        Ok(match field(&reply, 0, what)? {
            "applied" => AdjustOutcome::Applied(snapshot(&reply, 1)?),
            "replay" => AdjustOutcome::Replay(StoredOutcome::decode(field(&reply, 1, what)?)?),
            "conflict" => AdjustOutcome::IdempotencyConflict,
            "in_flight" => AdjustOutcome::IdempotencyInFlight,
            "not_found" => AdjustOutcome::AccountNotFound,
            "currency" => AdjustOutcome::CurrencyMismatch(currency_of(&reply, what)?),
            "range" => AdjustOutcome::OutOfRange,
            "insufficient" => AdjustOutcome::InsufficientFunds {
                available: number(&reply, 1, what)?,
                shortfall: number(&reply, 2, what)?,
            },
            "busy" => AdjustOutcome::AccountBusy,
            "collision" => return Err(tag_collision(tag)),
            _ => return Err(corrupt(what, &reply)),
        })
    }

    async fn payment(&self, id: &PaymentId) -> Result<Option<PaymentRecord>, StoreError> {
        self.read_payment(id.tag(), "id", id.as_str()).await
    }

    async fn live_payment_by_order(
        &self,
        scope: &Scope,
        order_id: &MerchantOrderId,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        self.read_payment(scope.tag(), "order", order_id.as_str())
            .await
    }

    async fn sweep_expired(&self, ctx: OpContext, budget: usize) -> Result<u64, StoreError> {
        // The scopes with live holds, from the holds index of the next slots (no SCAN).
        let (scopes, _) = self.indexed_scopes(&self.sweep_cursor, 1, budget).await?;
        let mut released = 0;
        for (_, tag) in scopes {
            let k = Keys::of(tag);
            let reply = self
                .run(
                    "sweep",
                    &self.scripts.read_account,
                    &k.account_script_keys(),
                    &[
                        "",
                        "",
                        &ctx.now_ms.to_string(),
                        &ctx.lazy_release_max.to_string(),
                    ],
                )
                .await?;
            if field(&reply, 0, "sweep")? == "ok" {
                released += number::<u64>(&reply, 1, "sweep")?;
            } else {
                // The account is gone (its holds with it): out of the index.
                self.forget_scope(&k.indexes[1], tag).await?;
            }
        }
        Ok(released)
    }

    async fn evict_finished(&self, now_ms: u64) -> Result<u64, StoreError> {
        let cutoff = now_ms.saturating_sub(self.retention_ms);
        let mut budget = self.evictions_per_tick;
        let start = *self.retention_cursor.lock().expect("retention cursor lock");
        let count = self.index_slots_per_call.min(slots::SLOTS - start);
        let mut pipe = ::redis::pipe();
        for slot in start..start + count {
            pipe.cmd("ZRANGEBYSCORE")
                .arg(Keys::slot_index(slot, 2))
                .arg("-inf")
                .arg(cutoff)
                .arg("LIMIT")
                .arg(0)
                .arg(budget);
        }
        let mut conn = self.connection();
        let due: Vec<Vec<String>> = self
            .bounded("retention_index", pipe.query_async(&mut conn))
            .await?;
        let mut evicted = 0;
        let mut next = start + count;
        for (slot, members) in (start..).zip(due) {
            if budget == 0 {
                next = slot;
                break;
            }
            let members = &members[..members.len().min(budget)];
            budget -= members.len();
            evicted += self.evict_slot(slot, members, cutoff, now_ms).await?;
            if budget == 0 {
                // This slot may hold more: it comes first next time.
                next = slot;
                break;
            }
        }
        *self.retention_cursor.lock().expect("retention cursor lock") = next % slots::SLOTS;
        Ok(evicted)
    }

    async fn mark_settled(&self, marks: &[SettledMark]) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        // One script call: one round trip, one EVALSHA, for a whole commit's worth of
        // movements (bounded by `store.batch_max_rows`).
        let keys: Vec<String> = marks
            .iter()
            .flat_map(|mark| {
                [
                    Keys::unsettled(mark.tag),
                    Keys::idempotency(mark.tag, &mark.idempotency_key),
                ]
            })
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let ids: Vec<&str> = marks.iter().map(|mark| mark.id.as_str()).collect();
        self.eval::<i64>("mark_settled", &self.scripts.settled, &keys, &ids)
            .await
            .map(|_| ())
    }

    async fn accept(
        &self,
        mark: &SettledMark,
        accepted: &AcceptedAttempt,
    ) -> Result<(), StoreError> {
        let k = Keys::of(mark.tag);
        let json = serde_json::to_string(accepted).expect("an acceptance serializes");
        let idempotency = Keys::idempotency(mark.tag, &mark.idempotency_key);
        self.eval::<i64>(
            "accept",
            &self.scripts.accept,
            &[&k.docs, &k.unsettled, &idempotency],
            &[&mark.id, &json],
        )
        .await
        .map(|_| ())
    }

    async fn abandon(
        &self,
        payment: &PaymentId,
        idempotency: &IdempotencyKey,
    ) -> Result<(), StoreError> {
        let tag = payment.tag();
        let k = Keys::of(tag);
        let reply = self
            .run(
                "abandon",
                &self.scripts.abandon,
                &[
                    &k.account,
                    &k.holds,
                    &k.hold_amounts,
                    &k.statuses,
                    &k.unsettled,
                    &Keys::idempotency(tag, idempotency.as_str()),
                ],
                &[payment.as_str()],
            )
            .await?;
        match field(&reply, 0, "abandon")? {
            "done" | "not_pending" => Ok(()),
            _ => Err(corrupt("abandon", &reply)),
        }
    }

    async fn void(&self, mark: &SettledMark) -> Result<(), StoreError> {
        let k = Keys::of(mark.tag);
        let mut invocation = self.scripts.void.prepare_invoke();
        invocation
            .key(&k.statuses)
            .key(&k.unsettled)
            .key(Keys::idempotency(mark.tag, &mark.idempotency_key))
            .key(&k.refunds)
            .key(&k.late_captures)
            .arg(&mark.id);
        let mut conn = self.connection();
        let _: i64 = self
            .bounded("void", invocation.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    async fn unwind(&self, unwind: &Unwind) -> Result<bool, StoreError> {
        let mark = &unwind.mark;
        let k = Keys::of(mark.tag);
        let (hash, outcome, ttl) = match &unwind.key_record {
            Some(r) => (
                r.request_hash.as_str(),
                r.outcome.encode(),
                r.ttl_seconds.to_string(),
            ),
            None => ("", String::new(), String::new()),
        };
        let mut invocation = self.scripts.unwind.prepare_invoke();
        invocation
            .key(&k.account)
            .key(&k.holds)
            .key(&k.hold_amounts)
            .key(&k.statuses)
            .key(&k.docs)
            .key(&k.orders)
            .key(&k.unsettled)
            .key(Keys::idempotency(mark.tag, &mark.idempotency_key))
            .arg(&mark.id)
            .arg(&unwind.order_id)
            .arg(unwind.captured_minor.to_string())
            .arg(hash)
            .arg(outcome)
            .arg(ttl);
        let mut conn = self.connection();
        let undone: i64 = self
            .bounded("unwind", invocation.invoke_async(&mut conn))
            .await?;
        Ok(undone == 1)
    }

    async fn unwind_refund(&self, u: &RefundUnwind) -> Result<bool, StoreError> {
        let tag = u.payment.tag();
        let k = Keys::of(tag);
        let mut invocation = self.scripts.refund_unwind.prepare_invoke();
        invocation
            .key(&k.account)
            .key(&k.holds)
            .key(&k.hold_amounts)
            .key(&k.unsettled)
            .key(&k.refunds)
            .key(Keys::idempotency(tag, &u.idempotency_key))
            .arg(&u.refund_id)
            .arg(u.payment.as_str())
            .arg(u.count)
            .arg(u.reserved_minor)
            .arg(u.succeeded_minor);
        let mut conn = self.connection();
        let undone: i64 = self
            .bounded("refund_unwind", invocation.invoke_async(&mut conn))
            .await?;
        Ok(undone == 1)
    }

    async fn restore_keys(&self, records: &[KeyRestore]) -> Result<u64, StoreError> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.scripts.restore_keys.prepare_invoke();
        for r in records {
            let scope = Keys::of(r.tag);
            let (order, payment) = r.order.as_ref().map_or(("", ""), |(order, payment)| {
                (order.as_str(), payment.as_str())
            });
            let [_, _, retention] = scope.indexes;
            invocation
                .key(Keys::idempotency(r.tag, &r.key))
                .key(scope.orders)
                .key(scope.statuses)
                .key(retention)
                .arg(&r.record.request_hash)
                .arg(r.record.outcome.encode())
                .arg(r.record.ttl_seconds)
                .arg(order)
                .arg(payment);
        }
        let mut conn = self.connection();
        let restored: i64 = self
            .bounded("restore_keys", invocation.invoke_async(&mut conn))
            .await?;
        Ok(u64::try_from(restored).unwrap_or(0))
    }

    async fn unsettled(&self, budget: usize) -> Result<UnsettledPage, StoreError> {
        // The scopes with records, from the outbox index of the next slots (no SCAN).
        let (scopes, complete) = self
            .indexed_scopes(&self.unsettled_cursor, 0, budget)
            .await?;
        let mut out = Vec::new();
        for (_, tag) in scopes {
            let k = Keys::of(tag);
            let mut conn = self.connection();
            let entries: Vec<(String, String)> = self
                .bounded(
                    "unsettled",
                    ::redis::cmd("HGETALL")
                        .arg(&k.unsettled)
                        .query_async(&mut conn),
                )
                .await?;
            if entries.is_empty() {
                self.prune_unsettled(&k, tag).await?;
            }
            for (id, json) in entries {
                #[derive(serde::Deserialize)]
                struct Entry {
                    seq: u64,
                    key: String,
                    at: u64,
                    record: Box<serde_json::value::RawValue>,
                }
                let entry: Entry = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("pending record of {id}: {e}")))?;
                out.push(Unsettled {
                    tag,
                    id,
                    seq: entry.seq,
                    idempotency_key: entry.key,
                    record: entry.record.get().to_owned(),
                    at_ms: entry.at,
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
        let k = Keys::of(key.tag);
        let mut conn = self.connection();
        let mut invocation = self.scripts.rebuild_fence.prepare_invoke();
        invocation.key(&k.account).arg(fence_until_ms);
        let state: Vec<String> = self
            .bounded("rebuild_guard", invocation.invoke_async(&mut conn))
            .await?;
        let [seq, held] = <[String; 2]>::try_from(state).unwrap_or_default();
        if seq.is_empty() {
            return Ok(None);
        }
        let held = Some(held);
        let parse = |v: &str, what: &str| {
            v.parse::<i64>()
                .map_err(|_| StoreError::Corrupt(format!("account {what} {v:?}")))
        };
        Ok(Some(RebuildGuard {
            seq: u64::try_from(parse(&seq, "seq")?)
                .map_err(|_| StoreError::Corrupt(format!("account seq {seq:?}")))?,
            held: parse(held.as_deref().unwrap_or("0"), "held")?,
        }))
    }

    async fn rebuild_account(&self, rebuild: &AccountRebuild) -> Result<bool, StoreError> {
        let k = Keys::of(rebuild.key.tag);
        let (expect_seq, expect_held) = match rebuild.expect {
            Some(guard) => (guard.seq.to_string(), guard.held.to_string()),
            None => (String::new(), String::new()),
        };
        let mut args: Vec<String> = vec![
            rebuild.key.merchant.as_str().to_owned(),
            rebuild.key.account.as_str().to_owned(),
            rebuild.currency.code().to_owned(),
            rebuild.balance.to_string(),
            rebuild.credit_limit.to_string(),
            rebuild.seq.to_string(),
            rebuild.created_at_ms.to_string(),
            expect_seq,
            expect_held,
        ];
        for (hold, expiry) in rebuild.holds.iter().zip(&rebuild.hold_expiries_ms) {
            args.push(hold.doc.id.clone());
            args.push(hold.held_minor.to_string());
            args.push(expiry.to_string());
            args.push(hold.doc.merchant_order_id.clone());
            args.push(doc_json(&hold.doc)?);
        }
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = self
            .run(
                "rebuild_account",
                &self.scripts.rebuild_account,
                &k.with_indexes(&[
                    &k.account,
                    &k.holds,
                    &k.hold_amounts,
                    &k.statuses,
                    &k.docs,
                    &k.orders,
                    &k.unsettled,
                ]),
                &arg_refs,
            )
            .await?;
        match field(&reply, 0, "rebuild_account")? {
            "ok" => Ok(true),
            "busy" => Ok(false),
            _ => Err(corrupt("rebuild_account", &reply)),
        }
    }

    async fn has_accounts(&self) -> Result<bool, StoreError> {
        // Walks the keyspace until one account key turns up or the scan completes (called at
        // start, not on the request path).
        let mut cursor = 0u64;
        loop {
            let (next, keys) = self.scan(cursor, "a:{*", 1_000).await?;
            if !keys.is_empty() {
                return Ok(true);
            }
            if next == 0 {
                return Ok(false);
            }
            cursor = next;
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.connection();
        let pong: String = self
            .bounded("ping", ::redis::cmd("PING").query_async(&mut conn))
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!("PING answered {pong:?}")))
        }
    }
}

impl RedisStore {
    /// One SCAN call: the next cursor and the keys of this page.
    async fn scan(
        &self,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let mut conn = self.connection();
        self.bounded(
            "scan",
            ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut conn),
        )
        .await
    }

    /// The scopes listed in one kind of slot index (`which`: 0 outbox, 1 holds), read from
    /// the slot `cursor` names onwards: at most `redis.index_slots_per_call` slots in one
    /// pipelined round trip, and about `budget` scopes (a slot's whole set is taken). The
    /// cursor moves past what was read; `true` when this call reached the last slot (a full
    /// pass ended).
    async fn indexed_scopes(
        &self,
        cursor: &Mutex<u16>,
        which: usize,
        budget: usize,
    ) -> Result<(Vec<(u16, ScopeTag)>, bool), StoreError> {
        let start = *cursor.lock().expect("index cursor lock");
        let count = self.index_slots_per_call.min(slots::SLOTS - start);
        let mut pipe = ::redis::pipe();
        for slot in start..start + count {
            pipe.cmd("SMEMBERS").arg(Keys::slot_index(slot, which));
        }
        let mut conn = self.connection();
        let sets: Vec<Vec<String>> = self
            .bounded("slot_index", pipe.query_async(&mut conn))
            .await?;
        let mut scopes = Vec::new();
        let mut next = start + count;
        for (slot, members) in (start..).zip(sets) {
            scopes.extend(
                members
                    .iter()
                    .filter_map(|tag| ScopeTag::parse(tag))
                    .map(|tag| (slot, tag)),
            );
            if scopes.len() >= budget.max(1) {
                next = slot + 1;
                break;
            }
        }
        *cursor.lock().expect("index cursor lock") = next % slots::SLOTS;
        Ok((scopes, next == slots::SLOTS))
    }

    /// Takes a scope whose outbox is empty out of its slot's outbox index (atomically: a
    /// record written meanwhile keeps it there).
    async fn prune_unsettled(&self, k: &Keys, tag: ScopeTag) -> Result<(), StoreError> {
        let mut invocation = self.scripts.prune_index.prepare_invoke();
        invocation
            .key(&k.unsettled)
            .key(&k.indexes[0])
            .arg(tag.as_str());
        let mut conn = self.connection();
        let _: i64 = self
            .bounded("prune_index", invocation.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    /// Takes a scope out of an index outright (its account is gone).
    async fn forget_scope(&self, index: &str, tag: ScopeTag) -> Result<(), StoreError> {
        let mut conn = self.connection();
        let _: i64 = self
            .bounded(
                "slot_index",
                ::redis::cmd("SREM")
                    .arg(index)
                    .arg(tag.as_str())
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// Lets go of the due payments `members` of slot `slot`'s retention index: one
    /// `evict.lua` call per scope and [`EVICTIONS_PER_SCRIPT`] payments. Returns how many left.
    async fn evict_slot(
        &self,
        slot: u16,
        members: &[String],
        cutoff_ms: u64,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let index = &Keys::slot_index(slot, 2);
        let mut by_scope: Vec<(ScopeTag, Vec<&str>)> = Vec::new();
        let mut junk: Vec<&str> = Vec::new();
        for member in members {
            // An order-id marker a rebuild put back: '!<payment id>:<order id>'.
            let pid = match member.strip_prefix('!') {
                Some(marker) => marker.split_once(':').map_or(marker, |(pid, _)| pid),
                None => member,
            };
            match PaymentId::parse(pid) {
                Some(pid) => match by_scope.iter_mut().find(|(tag, _)| *tag == pid.tag()) {
                    Some((_, pids)) => pids.push(member),
                    None => by_scope.push((pid.tag(), vec![member])),
                },
                None => junk.push(member),
            }
        }
        if !junk.is_empty() {
            let mut conn = self.connection();
            let _: i64 = self
                .bounded(
                    "retention_index",
                    ::redis::cmd("ZREM")
                        .arg(index)
                        .arg(&junk)
                        .query_async(&mut conn),
                )
                .await?;
        }
        let mut evicted = 0;
        let (cutoff, now) = (cutoff_ms.to_string(), now_ms.to_string());
        for (tag, pids) in by_scope {
            let k = Keys::of(tag);
            for chunk in pids.chunks(EVICTIONS_PER_SCRIPT) {
                let mut invocation = self.scripts.evict.prepare_invoke();
                invocation
                    .key(index)
                    .key(&k.statuses)
                    .key(&k.docs)
                    .key(&k.orders)
                    .key(&k.refunds)
                    .key(&k.late_captures)
                    .key(&k.unsettled)
                    .arg(&cutoff)
                    .arg(&now);
                for pid in chunk {
                    invocation.arg(*pid);
                }
                let mut conn = self.connection();
                let (done, _deferred): (u64, u64) = self
                    .bounded("evict", invocation.invoke_async(&mut conn))
                    .await?;
                evicted += done;
            }
        }
        Ok(evicted)
    }

    async fn read_payment(
        &self,
        tag: ScopeTag,
        mode: &str,
        value: &str,
    ) -> Result<Option<PaymentRecord>, StoreError> {
        let k = Keys::of(tag);
        let reply = self
            .run(
                "read_payment",
                &self.scripts.read_payment,
                &[&k.docs, &k.statuses, &k.hold_amounts, &k.orders],
                &[mode, value],
            )
            .await?;
        if reply.is_empty() {
            return Ok(None);
        }
        let what = "read_payment";
        let doc: PaymentDoc = serde_json::from_str(field(&reply, 0, what)?)
            .map_err(|e| StoreError::Corrupt(format!("payment document: {e}")))?;
        // An older release's script answers three fields: no acceptance then.
        let accepted = match reply.get(3).and_then(Option::as_deref) {
            None | Some("") => None,
            Some(json) => Some(serde_json::from_str(json).map_err(|e| {
                StoreError::Corrupt(format!("payment {value}'s channel acceptance: {e}"))
            })?),
        };
        Ok(Some(PaymentRecord {
            doc,
            status: status(&reply, 1, what)?,
            held_minor: number(&reply, 2, what)?,
            accepted,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AccountId, MerchantId};

    #[test]
    fn keys_carry_the_scope_and_slot_tags_the_scripts_expect() {
        let tag = ScopeTag::account(
            &MerchantId::parse("alpha").unwrap(),
            &AccountId::parse("acct_1").unwrap(),
        );
        let t = tag.as_str();
        let k = Keys::of(tag);
        assert_eq!(k.account, format!("a:{{{t}}}"));
        assert_eq!(k.holds, format!("h:{{{t}}}"));
        assert_eq!(k.hold_amounts, format!("ph:{{{t}}}"));
        assert_eq!(k.statuses, format!("ps:{{{t}}}"));
        assert_eq!(k.docs, format!("pd:{{{t}}}"));
        assert_eq!(k.orders, format!("o:{{{t}}}"));
        assert_eq!(k.unsettled, format!("u:{{{t}}}"));
        assert_eq!(Keys::unsettled(tag), k.unsettled);
        assert_eq!(k.refunds, format!("rf:{{{t}}}"));
        assert_eq!(k.late_captures, format!("lc:{{{t}}}"));
        assert_eq!(Keys::idempotency(tag, "key-1"), format!("i:{{{t}}}:key-1"));
        // The slot's index keys: `common.lua` finds them by these prefixes, and each hashes to
        // the scope's own slot (Redis Cluster: one slot per script call).
        let slot = slots::slot_of(tag);
        let s = slots::slot_tag(slot);
        assert_eq!(
            k.indexes,
            [
                format!("ux:{{{s}}}"),
                format!("hx:{{{s}}}"),
                format!("rx:{{{s}}}")
            ]
        );
        for (which, index) in k.indexes.iter().enumerate() {
            assert_eq!(&Keys::slot_index(slot, which), index);
            assert_eq!(slots::slot_of_str(s), slot);
        }
    }
}
