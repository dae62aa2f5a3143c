//! Targets: what a request of each [`Operation`] looks like for the system under test, how
//! the run's accounts are set up, and what an answer means.
//!
//! Two targets:
//! - the **gateway** (its sandbox, through the manifest): payments through its API;
//! - the **baseline**: the bare pass-through proxy of [`crate::baseline`] in front of the same
//!   channel-sim. Each request is one supplier create-order, whatever the operation: the
//!   generator writes the supplier's JSON body, the proxy signs it and forwards it. It has no
//!   accounts to prepare and nothing settles, and the rest of the run (schedule, recording,
//!   reports, `find-max`) is shared.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use serde::Deserialize;
use tokio::task::JoinSet;

use crate::baseline;
use crate::client::{Answer, HttpClient, SendError};
use crate::manifest::{check_loopback_url, Manifest, Secret};
use crate::scenario::{Operation, Scenario};
use crate::Error;

/// Every payment of a run is this much, in this currency.
pub const CURRENCY: &str = "CNY";
/// 1.00 CNY, in fen.
pub const AMOUNT_MINOR: i64 = 100;
/// Minor digits of [`CURRENCY`].
const MINOR_DIGITS: u32 = 2;
/// Account set-up requests in flight at once.
const SETUP_CONCURRENCY: usize = 8;
/// Admin adjustments one account may need in one set-up (each bounded by the gateway's
/// `limits.max_adjustment_amount`).
const MAX_ADJUSTMENTS_PER_ACCOUNT: u32 = 4;
/// The channel a top-up goes through.
pub const TOPUP_METHOD: &str = "alipay";
/// How long a baseline order lives at the supplier: the gateway's default payment expiry
/// (`payments.default_expires_in_seconds`), so both send the same order.
pub const BASELINE_ORDER_LIFETIME_SECONDS: u64 = 900;

/// The channel kind a `checkout` pays through (`--checkout-method`). The same-run baseline
/// proxies supplier creates only, so the ratios are `supplier`'s; Alipay and WeChat Pay
/// checkouts are measured apart (channel-sim signs their callbacks with RSA-2048, which
/// costs it several times what the gateway spends verifying them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutMethod {
    /// An account's hold, captured when the supplier reports the order paid (HMAC).
    Supplier,
    /// A customer payment through Alipay (RSA2): no account.
    Alipay,
    /// A customer payment through WeChat Pay (RSA, AES-GCM callbacks): no account.
    Wechatpay,
}

impl CheckoutMethod {
    pub const ALL: [CheckoutMethod; 3] = [
        CheckoutMethod::Supplier,
        CheckoutMethod::Alipay,
        CheckoutMethod::Wechatpay,
    ];

    /// The payment's `method`, which is also the manifest's channel `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckoutMethod::Supplier => "supplier",
            CheckoutMethod::Alipay => "alipay",
            CheckoutMethod::Wechatpay => "wechatpay",
        }
    }

    /// Whether the payment names an account (DESIGN.md §3: a supplier charge holds on one;
    /// an Alipay or WeChat Pay charge must not name one).
    pub fn needs_account(self) -> bool {
        self == CheckoutMethod::Supplier
    }
}

impl std::fmt::Display for CheckoutMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CheckoutMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CheckoutMethod::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a checkout method (supplier, alipay, wechatpay)"))
    }
}

/// The system under test.
#[derive(Debug, Clone)]
pub enum Target {
    /// The gateway, through the sandbox manifest.
    Gateway(Arc<GatewayTarget>),
    /// The same-run baseline: the pass-through proxy of [`crate::baseline`].
    Baseline(Arc<BaselineTarget>),
}

/// A channel payment the target created, to follow until it settles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedPayment {
    pub payment_id: String,
    /// The channel order id of its last attempt: how channel-sim knows it.
    pub channel_order_id: String,
    /// The channel of its last attempt (empty if the answer did not say).
    pub channel_id: String,
}

/// What became of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The answer the operation expects (`201` with the payment). `created` is set for a
    /// payment that settles later.
    Answered { created: Option<CreatedPayment> },
    /// Any other HTTP answer; `key` is `"<status> <error code>"`, e.g. `402 insufficient_funds`.
    Refused { key: String },
    /// No HTTP answer: `key` is `transport <kind>`.
    Transport { key: String },
    /// No complete answer within the request timeout.
    Timeout,
}

impl Target {
    /// The gateway of `manifest`, as merchant `merchant` (the manifest's first when `None`),
    /// spreading payments over `accounts` accounts (`lt-000`, `lt-001`, …) so that no single
    /// account is a hot key.
    pub fn gateway(
        manifest: &Manifest,
        merchant: Option<&str>,
        accounts: usize,
        checkout_method: CheckoutMethod,
    ) -> Result<Self, Error> {
        GatewayTarget::new(manifest, merchant, accounts, checkout_method)
            .map(|g| Target::Gateway(Arc::new(g)))
    }

    /// The baseline proxy listening at `proxy_url` (`http://127.0.0.1:PORT`, loopback only),
    /// in front of the channel-sim of `manifest`.
    pub fn baseline(manifest: &Manifest, proxy_url: &str) -> Result<Self, Error> {
        manifest.check_loopback()?;
        BaselineTarget::new(proxy_url, &manifest.sim_admin_url)
            .map(|b| Target::Baseline(Arc::new(b)))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Target::Gateway(_) => "gateway",
            Target::Baseline(_) => "baseline",
        }
    }

    /// Refuses a scenario the target cannot serve: the baseline only proxies supplier
    /// creates (`checkout`).
    pub fn check_scenario(&self, scenario: Scenario) -> Result<(), Error> {
        match (self, scenario) {
            (Target::Gateway(_), _) | (Target::Baseline(_), Scenario::Checkout) => Ok(()),
            (Target::Baseline(_), other) => Err(Error::Settings(format!(
                "the baseline serves only the checkout scenario (one proxied supplier create per request), not {other}"
            ))),
        }
    }

    /// The channel kind its checkouts pay through (the baseline forwards supplier creates).
    pub fn checkout_method(&self) -> CheckoutMethod {
        match self {
            Target::Gateway(g) => g.checkout_method,
            Target::Baseline(_) => CheckoutMethod::Supplier,
        }
    }

    /// How many accounts the payments are spread over.
    pub fn accounts(&self) -> usize {
        match self {
            Target::Gateway(g) => g.accounts.len(),
            Target::Baseline(_) => 0,
        }
    }

    /// channel-sim's admin API, where settlements are checked and faults injected.
    pub fn sim_admin_url(&self) -> Option<&str> {
        match self {
            Target::Gateway(g) => Some(&g.sim_admin_url),
            Target::Baseline(b) => Some(&b.sim_admin_url),
        }
    }

    /// Whether its channel payments are followed until they settle (the baseline ignores
    /// callbacks: nothing of it settles).
    pub fn follows_settlement(&self) -> bool {
        match self {
            Target::Gateway(_) => true,
            Target::Baseline(_) => false,
        }
    }

    /// Makes the target ready for `slots` requests of which `spending_share` spend an
    /// account's balance: every account exists and can afford its share.
    pub async fn prepare(
        &self,
        client: &HttpClient,
        slots: u64,
        spending_share: f64,
        run_id: &str,
    ) -> Result<(), Error> {
        match self {
            Target::Gateway(g) => {
                Arc::clone(g)
                    .fund_accounts(client, slots, spending_share, run_id)
                    .await
            }
            Target::Baseline(_) => Ok(()),
        }
    }

    /// Request `seq` of run `run_id`, an `operation`.
    pub fn request(&self, operation: Operation, run_id: &str, seq: u64) -> Request<Full<Bytes>> {
        match self {
            Target::Gateway(g) => g.request(operation, run_id, seq),
            Target::Baseline(b) => b.request(run_id, seq, unix_seconds()),
        }
    }

    /// What the answer (or its absence) means for `operation`.
    pub fn interpret(&self, operation: Operation, result: Result<Answer, SendError>) -> Outcome {
        match self {
            Target::Gateway(_) => GatewayTarget::interpret(operation, result),
            Target::Baseline(_) => BaselineTarget::interpret(result),
        }
    }

    /// The gateway's Prometheus endpoint (`{gateway_url}/metrics`, unauthenticated and never
    /// shed), read at the edges of the window and once a second; the baseline has none.
    pub fn metrics_uri(&self) -> Option<Uri> {
        match self {
            Target::Gateway(g) => Some(g.metrics_uri.clone()),
            Target::Baseline(_) => None,
        }
    }

    /// `GET` of a payment as the merchant sees it (to check a settled payment), if the
    /// target has payments.
    pub fn payment_request(&self, payment_id: &str) -> Option<Request<Full<Bytes>>> {
        match self {
            Target::Gateway(g) => Some(g.payment_request(payment_id)),
            Target::Baseline(_) => None,
        }
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The baseline proxy, as the generator sees it.
#[derive(Debug)]
pub struct BaselineTarget {
    orders_uri: Uri,
    /// Where channel-sim calls back: the proxy, which acknowledges and ignores it.
    notify_url: String,
    sim_admin_url: String,
}

impl BaselineTarget {
    fn new(proxy_url: &str, sim_admin_url: &str) -> Result<Self, Error> {
        check_loopback_url("the baseline proxy's URL", proxy_url)?;
        let base = proxy_url.trim_end_matches('/');
        Ok(Self {
            orders_uri: uri(format!("{base}{}", baseline::ORDERS_PATH))?,
            notify_url: format!("{base}{}", baseline::CALLBACK_PATH),
            sim_admin_url: sim_admin_url.trim_end_matches('/').to_owned(),
        })
    }

    /// The supplier create-order body the gateway would send for a payment of the run (the
    /// same fields, in the same order, DESIGN.md §5), written by hand like the gateway's
    /// requests: every value is ours and needs no escaping. The proxy forwards it byte for
    /// byte, signed.
    fn request(&self, run_id: &str, seq: u64, now_unix_seconds: u64) -> Request<Full<Bytes>> {
        let order_id = baseline_order_id(run_id, seq);
        let amount = format_minor(AMOUNT_MINOR);
        let expires_at = rfc3339_utc(now_unix_seconds + BASELINE_ORDER_LIFETIME_SECONDS);
        let body = format!(
            r#"{{"order_id":"{order_id}","amount":"{amount}","currency":"{CURRENCY}","notify_url":"{}","expires_at":"{expires_at}"}}"#,
            self.notify_url
        );
        Request::builder()
            .method(Method::POST)
            .uri(self.orders_uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a request of valid parts")
    }

    /// channel-sim answers a new order `200` with the order (status `accepted`); its
    /// refusals are `{"error": "<text>"}`, and so are the proxy's own (`502`, `503`, `504`).
    fn interpret(result: Result<Answer, SendError>) -> Outcome {
        match result {
            Ok(answer) if answer.status == StatusCode::OK => Outcome::Answered { created: None },
            Ok(answer) => Outcome::Refused {
                key: baseline_refusal_key(answer.status, &answer.body),
            },
            Err(SendError::Timeout) => Outcome::Timeout,
            Err(SendError::Transport { kind, .. }) => Outcome::Transport {
                key: format!("transport {kind}"),
            },
        }
    }
}

/// A supplier order id for request `seq` of run `run_id`: `b<16 hex>-<seq>`, at most 27
/// characters of `[0-9a-z-]` (the gateway's channel order ids are at most 32), unique per run
/// through a 64-bit hash of the run id (the run id itself is too long to fit).
pub fn baseline_order_id(run_id: &str, seq: u64) -> String {
    // FNV-1a: a fixed, dependency-free hash; collisions between run ids are what matters
    // and 64 bits make them negligible.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in run_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("b{hash:016x}-{seq}")
}

/// `"<status> <error>"` of a channel-sim or proxy refusal (spaces in the error text become
/// `_`, so that the key stays one word).
fn baseline_refusal_key(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let error = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error.replace(' ', "_"))
        .filter(|e| !e.is_empty() && e.len() <= 64 && e.bytes().all(|b| b.is_ascii_graphic()));
    format!("{} {}", status.as_u16(), error.as_deref().unwrap_or("-"))
}

/// Unix seconds as RFC 3339 UTC, `YYYY-MM-DDTHH:MM:SSZ` (days to civil date: Howard
/// Hinnant's algorithm, exact for every date this tool will see).
pub fn rfc3339_utc(unix_seconds: u64) -> String {
    let days = unix_seconds / 86_400;
    let second_of_day = unix_seconds % 86_400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3_600,
        second_of_day % 3_600 / 60,
        second_of_day % 60
    )
}

/// The gateway, as one merchant.
#[derive(Debug)]
pub struct GatewayTarget {
    base_url: String,
    sim_admin_url: String,
    merchant: String,
    merchant_auth: HeaderValue,
    admin_auth: Option<HeaderValue>,
    accounts: Vec<String>,
    payments_uri: Uri,
    topup_uris: Vec<Uri>,
    metrics_uri: Uri,
    checkout_method: CheckoutMethod,
}

fn bearer(key: &Secret) -> Result<HeaderValue, Error> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose()))
        .map_err(|_| Error::Settings("an API key in the manifest is not a valid header".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

fn uri(text: String) -> Result<Uri, Error> {
    text.parse()
        .map_err(|_| Error::Settings(format!("cannot make a URL of {text:?}")))
}

impl GatewayTarget {
    fn new(
        manifest: &Manifest,
        merchant: Option<&str>,
        accounts: usize,
        checkout_method: CheckoutMethod,
    ) -> Result<Self, Error> {
        manifest.check_loopback()?;
        if accounts == 0 || accounts > 100_000 {
            return Err(Error::Settings("--accounts must be 1..=100000".into()));
        }
        let (merchant, credentials) = match merchant {
            Some(id) => manifest
                .merchants
                .get_key_value(id)
                .ok_or_else(|| Error::Settings(format!("no merchant {id:?} in the manifest")))?,
            None => manifest
                .merchants
                .iter()
                .next()
                .ok_or_else(|| Error::Settings("the manifest has no merchant".into()))?,
        };
        let base_url = manifest.gateway_url.trim_end_matches('/').to_owned();
        let accounts: Vec<String> = (0..accounts).map(|i| format!("lt-{i:03}")).collect();
        let topup_uris = accounts
            .iter()
            .map(|a| uri(format!("{base_url}/v1/accounts/{a}/topups")))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            payments_uri: uri(format!("{base_url}/v1/payments"))?,
            metrics_uri: uri(format!("{base_url}/metrics"))?,
            topup_uris,
            sim_admin_url: manifest.sim_admin_url.trim_end_matches('/').to_owned(),
            merchant: merchant.clone(),
            merchant_auth: bearer(&credentials.api_key)?,
            admin_auth: manifest.admin_key.as_ref().map(bearer).transpose()?,
            accounts,
            base_url,
            checkout_method,
        })
    }

    fn account_index(&self, seq: u64) -> usize {
        (seq % self.accounts.len() as u64) as usize
    }

    fn post(
        &self,
        uri: Uri,
        auth: &HeaderValue,
        idempotency: &str,
        body: String,
    ) -> Request<Full<Bytes>> {
        Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, auth.clone())
            .header("idempotency-key", idempotency)
            .body(Full::new(Bytes::from(body)))
            .expect("a request of valid parts")
    }

    /// The JSON is written by hand: every value in it is one we generated (ids of
    /// `[A-Za-z0-9-]`, fixed amount and method), so nothing needs escaping, and the generator
    /// spends its CPU on sending rather than serializing.
    fn request(&self, operation: Operation, run_id: &str, seq: u64) -> Request<Full<Bytes>> {
        let account_index = self.account_index(seq);
        let account = &self.accounts[account_index];
        let order_id = format!("{run_id}-{seq}");
        let amount = format_minor(AMOUNT_MINOR);
        match operation {
            Operation::Authorize | Operation::Checkout => {
                let (method, with_account) = if operation == Operation::Authorize {
                    ("balance", true)
                } else {
                    (
                        self.checkout_method.as_str(),
                        self.checkout_method.needs_account(),
                    )
                };
                let body = if with_account {
                    format!(
                        r#"{{"merchant_order_id":"{order_id}","amount":"{amount}","currency":"{CURRENCY}","method":"{method}","account_id":"{account}"}}"#
                    )
                } else {
                    format!(
                        r#"{{"merchant_order_id":"{order_id}","amount":"{amount}","currency":"{CURRENCY}","method":"{method}"}}"#
                    )
                };
                self.post(
                    self.payments_uri.clone(),
                    &self.merchant_auth,
                    &order_id,
                    body,
                )
            }
            Operation::Topup => {
                let body = format!(
                    r#"{{"merchant_order_id":"{order_id}","amount":"{amount}","currency":"{CURRENCY}","method":"{TOPUP_METHOD}"}}"#
                );
                self.post(
                    self.topup_uris[account_index].clone(),
                    &self.merchant_auth,
                    &order_id,
                    body,
                )
            }
        }
    }

    fn payment_request(&self, payment_id: &str) -> Request<Full<Bytes>> {
        Request::builder()
            .method(Method::GET)
            .uri(format!("{}/v1/payments/{payment_id}", self.base_url))
            .header(AUTHORIZATION, self.merchant_auth.clone())
            .body(Full::new(Bytes::new()))
            .expect("a request of valid parts")
    }

    fn interpret(operation: Operation, result: Result<Answer, SendError>) -> Outcome {
        let answer = match result {
            Ok(answer) => answer,
            Err(SendError::Timeout) => return Outcome::Timeout,
            Err(SendError::Transport { kind, .. }) => {
                return Outcome::Transport {
                    key: format!("transport {kind}"),
                }
            }
        };
        if answer.status != StatusCode::CREATED {
            return Outcome::Refused {
                key: refusal_key(answer.status, &answer.body),
            };
        }
        if !operation.settles_later() {
            // A balance payment's 201 is final (captured and committed): nothing to follow,
            // and the body need not be parsed.
            return Outcome::Answered { created: None };
        }
        match created_payment(&answer.body) {
            Some(created) => Outcome::Answered {
                created: Some(created),
            },
            None => Outcome::Refused {
                key: "201 unreadable_payment".to_owned(),
            },
        }
    }

    /// Creates (or updates) every account and makes sure each can afford its share of the
    /// run: an admin credit adjustment when the manifest has the admin key, else a credit
    /// limit set by the merchant's own `PUT`.
    async fn fund_accounts(
        self: Arc<Self>,
        client: &HttpClient,
        slots: u64,
        spending_share: f64,
        run_id: &str,
    ) -> Result<(), Error> {
        let per_account = (slots as f64 * spending_share / self.accounts.len() as f64).ceil();
        // A margin for the rounding of the share and for holds of a previous run not yet
        // released; at least one payment's worth.
        let needed = ((per_account * 1.25) as i64 + 1).saturating_mul(AMOUNT_MINOR);
        let mut tasks = JoinSet::new();
        let mut failures = Vec::new();
        for index in 0..self.accounts.len() {
            if tasks.len() >= SETUP_CONCURRENCY {
                let joined = tasks.join_next().await.expect("a task is running");
                if let Err(e) = joined.expect("a set-up task does not panic") {
                    failures.push(e);
                }
            }
            let target = Arc::clone(&self);
            let client = client.clone();
            let idempotency = format!("{run_id}-fund-{index}");
            tasks.spawn(async move { target.fund_one(&client, index, needed, &idempotency).await });
        }
        while let Some(result) = tasks.join_next().await {
            if let Err(e) = result.expect("a set-up task does not panic") {
                failures.push(e);
            }
        }
        match failures.first() {
            None => Ok(()),
            Some(first) => Err(Error::Setup(format!(
                "{} of {} accounts could not be funded; first: {first}",
                failures.len(),
                self.accounts.len()
            ))),
        }
    }

    async fn fund_one(
        &self,
        client: &HttpClient,
        index: usize,
        needed: i64,
        idempotency: &str,
    ) -> Result<(), String> {
        let account = &self.accounts[index];
        let account_uri = format!("{}/v1/accounts/{account}", self.base_url);
        let put_body = match &self.admin_auth {
            Some(_) => format!(r#"{{"currency":"{CURRENCY}"}}"#),
            None => format!(
                r#"{{"currency":"{CURRENCY}","credit_limit":"{}"}}"#,
                format_minor(needed)
            ),
        };
        let request = Request::builder()
            .method(Method::PUT)
            .uri(&account_uri)
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, self.merchant_auth.clone())
            .body(Full::new(Bytes::from(put_body)))
            .expect("a request of valid parts");
        let answer = checked(
            client,
            request,
            &[StatusCode::OK, StatusCode::CREATED],
            account,
        )
        .await?;
        let mut available = available_minor(&answer.body)
            .ok_or_else(|| format!("account {account}: no `available` in {:?}", answer.body))?;
        let Some(admin) = &self.admin_auth else {
            return if available >= needed {
                Ok(())
            } else {
                Err(format!(
                    "account {account} has {} available, the run needs {}: give the manifest's admin key",
                    format_minor(available),
                    format_minor(needed)
                ))
            };
        };
        for attempt in 0..MAX_ADJUSTMENTS_PER_ACCOUNT {
            if available >= needed {
                return Ok(());
            }
            let body = format!(
                r#"{{"merchant_id":"{}","direction":"credit","amount":"{}","reason":"loadtest funding"}}"#,
                self.merchant,
                format_minor(needed - available)
            );
            let request = self.post(
                uri(format!("{account_uri}/adjustments")).map_err(|e| e.to_string())?,
                admin,
                &format!("{idempotency}-{attempt}"),
                body,
            );
            checked(
                client,
                request,
                &[StatusCode::OK, StatusCode::CREATED],
                account,
            )
            .await?;
            let request = Request::builder()
                .method(Method::GET)
                .uri(&account_uri)
                .header(AUTHORIZATION, self.merchant_auth.clone())
                .body(Full::new(Bytes::new()))
                .expect("a request of valid parts");
            let answer = checked(client, request, &[StatusCode::OK], account).await?;
            available = available_minor(&answer.body)
                .ok_or_else(|| format!("account {account}: no `available` in {:?}", answer.body))?;
        }
        if available >= needed {
            Ok(())
        } else {
            Err(format!(
                "account {account}: still short after {MAX_ADJUSTMENTS_PER_ACCOUNT} adjustments"
            ))
        }
    }
}

/// Sends a set-up request and insists on one of `expected`.
async fn checked(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
    expected: &[StatusCode],
    account: &str,
) -> Result<Answer, String> {
    let what = format!("{} {}", request.method(), request.uri().path());
    match client.send(request).await {
        Ok(answer) if expected.contains(&answer.status) => Ok(answer),
        Ok(answer) => Err(format!(
            "account {account}: {what} answered {}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        )),
        Err(SendError::Timeout) => Err(format!("account {account}: {what} timed out")),
        Err(SendError::Transport { detail, .. }) => {
            Err(format!("account {account}: {what}: {detail}"))
        }
    }
}

/// `"<status> <code>"` of an error answer (`-` when the body has no error code).
fn refusal_key(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: ErrorCode,
    }
    #[derive(Deserialize)]
    struct ErrorCode {
        code: String,
    }
    let code = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error.code)
        .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()));
    format!("{} {}", status.as_u16(), code.as_deref().unwrap_or("-"))
}

/// The payment id and the last attempt's channel order id of a created payment.
fn created_payment(body: &[u8]) -> Option<CreatedPayment> {
    #[derive(Deserialize)]
    struct Payment {
        id: String,
        #[serde(default)]
        attempts: Vec<Attempt>,
    }
    #[derive(Deserialize)]
    struct Attempt {
        channel_order_id: String,
        #[serde(default)]
        channel_id: String,
    }
    let payment: Payment = serde_json::from_slice(body).ok()?;
    let attempt = payment.attempts.last()?;
    Some(CreatedPayment {
        payment_id: payment.id,
        channel_order_id: attempt.channel_order_id.clone(),
        channel_id: attempt.channel_id.clone(),
    })
}

fn available_minor(body: &[u8]) -> Option<i64> {
    #[derive(Deserialize)]
    struct Account {
        available: String,
    }
    let account: Account = serde_json::from_slice(body).ok()?;
    parse_minor(&account.available)
}

/// `"12.34"` or `"-0.50"` (exactly two decimals) as minor units.
pub fn parse_minor(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.')?;
    if whole.is_empty()
        || fraction.len() != MINOR_DIGITS as usize
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let value = whole
        .parse::<i64>()
        .ok()?
        .checked_mul(10_i64.pow(MINOR_DIGITS))?
        .checked_add(fraction.parse::<i64>().ok()?)?;
    Some(if negative { -value } else { value })
}

/// Minor units as a decimal string with two decimals.
pub fn format_minor(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    let unit = 10_u64.pow(MINOR_DIGITS);
    format!("{sign}{}.{:02}", abs / unit, abs % unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(admin: bool) -> Manifest {
        serde_json::from_value(serde_json::json!({
            "merchants": {"alpha": {"api_key": "sk_test_alpha"}, "beta": {"api_key": "sk_test_beta"}},
            "admin_key": if admin { Some("sk_test_admin") } else { None },
            "gateway_url": "http://127.0.0.1:8080/",
            "sim_admin_url": "http://127.0.0.1:9090",
            "channels": {}
        }))
        .unwrap()
    }

    fn body(request: Request<Full<Bytes>>) -> (Request<()>, serde_json::Value) {
        let (parts, body) = request.into_parts();
        let bytes = futures_body(body);
        (
            Request::from_parts(parts, ()),
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    fn futures_body(body: Full<Bytes>) -> Bytes {
        use http_body_util::BodyExt;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async { body.collect().await.unwrap().to_bytes() })
    }

    #[test]
    fn requests_are_valid_json_with_unique_ids_over_many_accounts() {
        let target = Target::gateway(&manifest(true), None, 256, CheckoutMethod::Supplier).unwrap();
        let (head, json) = body(target.request(Operation::Authorize, "lt-run", 300));
        assert_eq!(head.uri(), "http://127.0.0.1:8080/v1/payments");
        assert_eq!(head.headers()["idempotency-key"], "lt-run-300");
        assert_eq!(head.headers()[AUTHORIZATION], "Bearer sk_test_alpha");
        assert_eq!(json["merchant_order_id"], "lt-run-300");
        assert_eq!(json["method"], "balance");
        assert_eq!(json["amount"], "1.00");
        assert_eq!(json["account_id"], "lt-044");
        let (_, json) = body(target.request(Operation::Checkout, "lt-run", 1));
        assert_eq!(json["method"], "supplier");
        assert_eq!(json["account_id"], "lt-001");
        let (head, json) = body(target.request(Operation::Topup, "lt-run", 2));
        assert_eq!(
            head.uri(),
            "http://127.0.0.1:8080/v1/accounts/lt-002/topups"
        );
        assert_eq!(json["method"], "alipay");
        // The key never shows in Debug.
        assert!(!format!("{target:?}").contains("sk_test"));
    }

    #[test]
    fn a_checkout_pays_through_the_chosen_method_and_names_an_account_only_for_supplier() {
        for method in CheckoutMethod::ALL {
            let target = Target::gateway(&manifest(true), None, 4, method).unwrap();
            assert_eq!(target.checkout_method(), method);
            let (head, json) = body(target.request(Operation::Checkout, "lt-run", 6));
            assert_eq!(head.uri(), "http://127.0.0.1:8080/v1/payments");
            assert_eq!(json["method"], method.as_str());
            assert_eq!(json["merchant_order_id"], "lt-run-6");
            assert_eq!(json["amount"], "1.00");
            let account = json.get("account_id").and_then(|a| a.as_str());
            if method == CheckoutMethod::Supplier {
                assert_eq!(account, Some("lt-002"));
            } else {
                assert_eq!(account, None, "{method}: {json}");
            }
            // Authorize stays a balance payment on an account whatever the checkout method.
            let (_, json) = body(target.request(Operation::Authorize, "lt-run", 7));
            assert_eq!(json["method"], "balance");
            assert_eq!(json["account_id"], "lt-003");
        }
        assert_eq!("alipay".parse(), Ok(CheckoutMethod::Alipay));
        assert_eq!("wechatpay".parse(), Ok(CheckoutMethod::Wechatpay));
        assert_eq!("supplier".parse(), Ok(CheckoutMethod::Supplier));
        assert!("balance".parse::<CheckoutMethod>().is_err());
        assert!("Alipay".parse::<CheckoutMethod>().is_err());
        assert!("".parse::<CheckoutMethod>().is_err());
    }

    #[test]
    fn a_merchant_is_chosen_by_id() {
        let target =
            Target::gateway(&manifest(false), Some("beta"), 1, CheckoutMethod::Supplier).unwrap();
        let (head, _) = body(target.request(Operation::Authorize, "r", 0));
        assert_eq!(head.headers()[AUTHORIZATION], "Bearer sk_test_beta");
        assert!(
            Target::gateway(&manifest(false), Some("gamma"), 1, CheckoutMethod::Supplier).is_err()
        );
        assert!(Target::gateway(&manifest(false), None, 0, CheckoutMethod::Supplier).is_err());
    }

    fn answer(status: u16, body: &str) -> Result<Answer, SendError> {
        Ok(Answer {
            status: StatusCode::from_u16(status).unwrap(),
            body: Bytes::from(body.to_owned()),
        })
    }

    #[test]
    fn answers_are_interpreted() {
        let target = Target::gateway(&manifest(true), None, 1, CheckoutMethod::Supplier).unwrap();
        assert_eq!(
            target.interpret(Operation::Authorize, answer(201, "{}")),
            Outcome::Answered { created: None }
        );
        let pending = r#"{"id":"pay_1","status":"pending","attempts":[
            {"channel_id":"supplier-main","channel_order_id":"pay_1_1","outcome":"refused"},
            {"channel_id":"supplier-backup","channel_order_id":"pay_1_2","outcome":"accepted"}]}"#;
        assert_eq!(
            target.interpret(Operation::Checkout, answer(201, pending)),
            Outcome::Answered {
                created: Some(CreatedPayment {
                    payment_id: "pay_1".into(),
                    channel_order_id: "pay_1_2".into(),
                    channel_id: "supplier-backup".into(),
                })
            }
        );
        assert_eq!(
            target.interpret(Operation::Checkout, answer(201, "not json")),
            Outcome::Refused {
                key: "201 unreadable_payment".into()
            }
        );
        assert_eq!(
            target.interpret(
                Operation::Authorize,
                answer(
                    402,
                    r#"{"error":{"code":"insufficient_funds","message":"…"}}"#
                )
            ),
            Outcome::Refused {
                key: "402 insufficient_funds".into()
            }
        );
        assert_eq!(
            target.interpret(Operation::Authorize, answer(502, "Bad Gateway")),
            Outcome::Refused {
                key: "502 -".into()
            }
        );
        assert_eq!(
            target.interpret(Operation::Topup, Err(SendError::Timeout)),
            Outcome::Timeout
        );
        assert_eq!(
            target.interpret(
                Operation::Topup,
                Err(SendError::Transport {
                    kind: "connect",
                    detail: "refused".into()
                })
            ),
            Outcome::Transport {
                key: "transport connect".into()
            }
        );
    }

    #[test]
    fn baseline_requests_are_supplier_create_orders() {
        let target = Target::baseline(&manifest(true), "http://127.0.0.1:7000/").unwrap();
        assert_eq!(target.name(), "baseline");
        assert!(!target.follows_settlement());
        assert!(target.check_scenario(Scenario::Checkout).is_ok());
        assert!(target.check_scenario(Scenario::Authorize).is_err());
        let Target::Baseline(baseline) = &target else {
            unreachable!()
        };
        let (head, json) = body(baseline.request("lt-18f-2a-0", 12, 1_700_000_000));
        assert_eq!(head.method(), Method::POST);
        assert_eq!(head.uri(), "http://127.0.0.1:7000/v1/orders");
        assert!(head.headers().get(AUTHORIZATION).is_none());
        // Exactly channel-sim's create body (it refuses unknown fields).
        let mut fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            ["amount", "currency", "expires_at", "notify_url", "order_id"]
        );
        assert_eq!(json["amount"], "1.00");
        assert_eq!(json["currency"], "CNY");
        assert_eq!(json["notify_url"], "http://127.0.0.1:7000/callback");
        assert_eq!(json["expires_at"], "2023-11-14T22:28:20Z");
        let id = json["order_id"].as_str().unwrap();
        assert_eq!(id, baseline_order_id("lt-18f-2a-0", 12));
        // Valid for the gateway's channel order ids (and channel-sim's).
        let longest = baseline_order_id("lt-19a8f3c2b1d-3fffff-4294967295", 49_999_999);
        for id in [id, longest.as_str()] {
            assert!(id.len() <= 32, "{id}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
        assert_ne!(
            baseline_order_id("lt-a-1-0", 1),
            baseline_order_id("lt-a-1-1", 1)
        );
        assert!(Target::baseline(&manifest(true), "http://10.0.0.1:7000").is_err());
    }

    #[test]
    fn baseline_answers_are_interpreted() {
        let target = Target::baseline(&manifest(true), "http://127.0.0.1:7000").unwrap();
        assert_eq!(
            target.interpret(
                Operation::Checkout,
                answer(200, r#"{"order_id":"b1","status":"accepted"}"#)
            ),
            Outcome::Answered { created: None }
        );
        assert_eq!(
            target.interpret(
                Operation::Checkout,
                answer(401, r#"{"error":"bad signature"}"#)
            ),
            Outcome::Refused {
                key: "401 bad_signature".into()
            }
        );
        assert_eq!(
            target.interpret(
                Operation::Checkout,
                answer(502, r#"{"error":"upstream_connect"}"#)
            ),
            Outcome::Refused {
                key: "502 upstream_connect".into()
            }
        );
        assert_eq!(
            target.interpret(Operation::Checkout, answer(500, "oops")),
            Outcome::Refused {
                key: "500 -".into()
            }
        );
    }

    #[test]
    fn rfc3339_dates_are_exact() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(951_868_799), "2000-02-29T23:59:59Z");
        assert_eq!(rfc3339_utc(951_868_800), "2000-03-01T00:00:00Z");
        assert_eq!(rfc3339_utc(4_102_444_800), "2100-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1_735_689_599), "2024-12-31T23:59:59Z");
    }

    #[test]
    fn money_is_parsed_and_formatted_exactly() {
        assert_eq!(parse_minor("12.34"), Some(1_234));
        assert_eq!(parse_minor("-0.50"), Some(-50));
        assert_eq!(parse_minor("0.00"), Some(0));
        for bad in [
            "12", "12.3", "12.345", "", ".50", "1e3.00", "--1.00", "1.-0",
        ] {
            assert_eq!(parse_minor(bad), None, "{bad}");
        }
        assert_eq!(format_minor(100), "1.00");
        assert_eq!(format_minor(-5), "-0.05");
        assert_eq!(format_minor(123_456_789), "1234567.89");
        for v in [-100_000, -1, 0, 7, 99, 100, 100_000_001] {
            assert_eq!(parse_minor(&format_minor(v)), Some(v));
        }
    }
}
