//! Targets: what a request of each [`Operation`] looks like for the system under test, how
//! the run's accounts are set up, and what an answer means.
//!
//! Today the one target is the gateway (its sandbox, through the manifest). The same-run
//! baseline of issue 6 — a bare pass-through proxy in front of the same channel-sim — joins
//! as a second variant: it has no accounts to prepare and answers the supplier create-order
//! request, so it builds its own requests here and the rest of the run (schedule, recording,
//! reports, `find-max`) is shared.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use serde::Deserialize;
use tokio::task::JoinSet;

use crate::client::{Answer, HttpClient, SendError};
use crate::manifest::{Manifest, Secret};
use crate::scenario::Operation;
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

/// The system under test.
#[derive(Debug, Clone)]
pub enum Target {
    /// The gateway, through the sandbox manifest.
    Gateway(Arc<GatewayTarget>),
}

/// A channel payment the target created, to follow until it settles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedPayment {
    pub payment_id: String,
    /// The channel order id of its last attempt: how channel-sim knows it.
    pub channel_order_id: String,
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
    ) -> Result<Self, Error> {
        GatewayTarget::new(manifest, merchant, accounts).map(|g| Target::Gateway(Arc::new(g)))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Target::Gateway(_) => "gateway",
        }
    }

    /// How many accounts the payments are spread over.
    pub fn accounts(&self) -> usize {
        match self {
            Target::Gateway(g) => g.accounts.len(),
        }
    }

    /// channel-sim's admin API, where settlements are checked.
    pub fn sim_admin_url(&self) -> Option<&str> {
        match self {
            Target::Gateway(g) => Some(&g.sim_admin_url),
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
        }
    }

    /// Request `seq` of run `run_id`, an `operation`.
    pub fn request(&self, operation: Operation, run_id: &str, seq: u64) -> Request<Full<Bytes>> {
        match self {
            Target::Gateway(g) => g.request(operation, run_id, seq),
        }
    }

    /// What the answer (or its absence) means for `operation`.
    pub fn interpret(&self, operation: Operation, result: Result<Answer, SendError>) -> Outcome {
        match self {
            Target::Gateway(_) => GatewayTarget::interpret(operation, result),
        }
    }

    /// `GET` of a payment as the merchant sees it (to check a settled payment), if the
    /// target has payments.
    pub fn payment_request(&self, payment_id: &str) -> Option<Request<Full<Bytes>>> {
        match self {
            Target::Gateway(g) => Some(g.payment_request(payment_id)),
        }
    }
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
    fn new(manifest: &Manifest, merchant: Option<&str>, accounts: usize) -> Result<Self, Error> {
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
            topup_uris,
            sim_admin_url: manifest.sim_admin_url.trim_end_matches('/').to_owned(),
            merchant: merchant.clone(),
            merchant_auth: bearer(&credentials.api_key)?,
            admin_auth: manifest.admin_key.as_ref().map(bearer).transpose()?,
            accounts,
            base_url,
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
                let method = if operation == Operation::Authorize {
                    "balance"
                } else {
                    "supplier"
                };
                let body = format!(
                    r#"{{"merchant_order_id":"{order_id}","amount":"{amount}","currency":"{CURRENCY}","method":"{method}","account_id":"{account}"}}"#
                );
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
    }
    let payment: Payment = serde_json::from_slice(body).ok()?;
    let attempt = payment.attempts.last()?;
    Some(CreatedPayment {
        payment_id: payment.id,
        channel_order_id: attempt.channel_order_id.clone(),
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
        let target = Target::gateway(&manifest(true), None, 256).unwrap();
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
    fn a_merchant_is_chosen_by_id() {
        let target = Target::gateway(&manifest(false), Some("beta"), 1).unwrap();
        let (head, _) = body(target.request(Operation::Authorize, "r", 0));
        assert_eq!(head.headers()[AUTHORIZATION], "Bearer sk_test_beta");
        assert!(Target::gateway(&manifest(false), Some("gamma"), 1).is_err());
        assert!(Target::gateway(&manifest(false), None, 0).is_err());
    }

    fn answer(status: u16, body: &str) -> Result<Answer, SendError> {
        Ok(Answer {
            status: StatusCode::from_u16(status).unwrap(),
            body: Bytes::from(body.to_owned()),
        })
    }

    #[test]
    fn answers_are_interpreted() {
        let target = Target::gateway(&manifest(true), None, 1).unwrap();
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
                    channel_order_id: "pay_1_2".into()
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
