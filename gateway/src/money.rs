//! Money: currencies and exact amounts. Decimal strings at the API edge (parsed with
//! rust_decimal), i64 minor units (fen) everywhere inside. No floats, ever.
//!
//! This module owns:
//! - [`Currency`]: the closed set of supported ISO 4217 currencies and their minor-unit digits;
//! - [`Amount`]: a strictly positive minor-unit amount (payments, holds, adjustments), which can
//!   only be built through [`Amount::from_minor`] or [`Amount::parse`], so holding one proves the
//!   value is positive;
//! - the single decimal grammar every monetary string crossing the API edge must satisfy
//!   ([`Amount::parse`], [`parse_non_negative_minor`]) and its inverse ([`format_minor`]);
//! - overflow-checked arithmetic helpers for balances ([`checked_available`]).
//!
//! The grammar is deliberately strict (no signs, exponents, whitespace, leading zeros or
//! non-ASCII digits): a payment amount is money, and anything ambiguous is refused rather than
//! guessed at.

use std::fmt;

use rust_decimal::Decimal;
use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Longest decimal string we even look at. No valid in-range value comes close (the longest is
/// 20 bytes, "92233720368547758.07"), so anything longer is refused up front with
/// [`MoneyError::Overflow`] without inspecting its content, which bounds the work done on
/// hostile input.
const MAX_INPUT_LEN: usize = 40;

/// More integer digits than this cannot fit in an `i64` (19 digits) whatever the currency, so
/// such strings are refused before they reach `rust_decimal` (whose 96-bit mantissa would
/// otherwise be the limit instead of ours).
const MAX_INTEGER_DIGITS: usize = 19;

/// Why a monetary value from outside was refused. The messages are written to follow a field
/// name ("amount must be greater than zero") in API error responses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// The currency code is not one of [`Currency::ALL`] in exact uppercase ISO form.
    #[error("unknown or unsupported currency")]
    UnknownCurrency,
    /// The string does not match the decimal grammar (see [`Amount::parse`]).
    #[error("must be a decimal string like \"90.00\"")]
    Malformed,
    /// The fraction has more digits than the currency's minor unit; the payload is the number
    /// of decimal places the currency allows. Refused rather than rounded: rounding money
    /// silently is a bug.
    #[error("has more decimal places than the currency allows ({0})")]
    TooManyDecimals(u32),
    /// Zero (or, via [`Amount::from_minor`], a negative value) where a positive amount is needed.
    #[error("must be greater than zero")]
    NotPositive,
    /// The value does not fit in `i64` minor units, or the string is longer than 40 bytes.
    #[error("is out of range")]
    Overflow,
}

/// A supported currency. The set is closed on purpose: every currency here has been checked
/// for its minor-unit digits, and routing/settlement code may match exhaustively on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Currency {
    /// Chinese yuan renminbi (2 minor digits: fen).
    Cny,
    /// Hong Kong dollar (2 minor digits: cents).
    Hkd,
    /// US dollar (2 minor digits: cents).
    Usd,
    /// Japanese yen (no minor unit).
    Jpy,
}

impl Currency {
    /// Every supported currency, in declaration order (useful for tests and config validation).
    pub const ALL: [Currency; 4] = [Currency::Cny, Currency::Hkd, Currency::Usd, Currency::Jpy];

    /// Parse an ISO 4217 code. Only the exact uppercase code is accepted ("CNY", not "cny" or
    /// " CNY"), so that a currency has exactly one spelling in requests, logs and storage.
    pub fn parse(code: &str) -> Result<Currency, MoneyError> {
        match code {
            "CNY" => Ok(Currency::Cny),
            "HKD" => Ok(Currency::Hkd),
            "USD" => Ok(Currency::Usd),
            "JPY" => Ok(Currency::Jpy),
            _ => Err(MoneyError::UnknownCurrency),
        }
    }

    /// The ISO 4217 code, e.g. "CNY": the only form a currency takes outside the process.
    pub fn code(self) -> &'static str {
        match self {
            Currency::Cny => "CNY",
            Currency::Hkd => "HKD",
            Currency::Usd => "USD",
            Currency::Jpy => "JPY",
        }
    }

    /// Number of decimal places of the minor unit (CNY/HKD/USD 2, JPY 0): the scale between
    /// the decimal strings at the API edge and the `i64` minor units used internally.
    pub fn minor_digits(self) -> u32 {
        match self {
            Currency::Cny | Currency::Hkd | Currency::Usd => 2,
            Currency::Jpy => 0,
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CurrencyVisitor;

        impl Visitor<'_> for CurrencyVisitor {
            type Value = Currency;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an uppercase ISO 4217 currency code: CNY, HKD, USD or JPY")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Currency, E> {
                Currency::parse(v).map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
            }
        }

        deserializer.deserialize_str(CurrencyVisitor)
    }
}

/// A strictly positive amount in minor units, as used for payments, holds, adjustments.
///
/// The field is private and there is no `Default`: the only ways in are [`Amount::from_minor`]
/// and [`Amount::parse`], both of which refuse zero and negatives, so code receiving an
/// `Amount` never has to re-check its sign. The currency is not part of the value; it travels
/// alongside (the same amount type serves every currency, scaled by its minor digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Amount(i64);

impl Amount {
    /// Wrap a minor-unit value, refusing zero and negatives with [`MoneyError::NotPositive`].
    pub fn from_minor(minor: i64) -> Result<Amount, MoneyError> {
        if minor > 0 {
            Ok(Amount(minor))
        } else {
            Err(MoneyError::NotPositive)
        }
    }

    /// The value in minor units (always > 0).
    pub fn minor(self) -> i64 {
        debug_assert!(self.0 > 0, "Amount invariant violated: {}", self.0);
        self.0
    }

    /// Parse a decimal string for `currency`. Grammar (anything else is refused):
    /// `^(0|[1-9][0-9]*)(\.[0-9]{1,D})?$` where D = `currency.minor_digits()`; for D = 0 no '.'
    /// at all.
    ///
    /// Refused, with the variant returned:
    /// - strings longer than 40 bytes, whatever their content: [`MoneyError::Overflow`];
    /// - empty, whitespace anywhere, non-ASCII (full-width digits, NBSP, ...), signs, exponents,
    ///   "NaN"/"inf", a lone/leading/trailing '.', leading zeros: [`MoneyError::Malformed`];
    /// - more fraction digits than D (including any fraction digit for D = 0, e.g. "1.5" JPY):
    ///   [`MoneyError::TooManyDecimals`]`(D)`;
    /// - more than 19 integer digits, or a value not fitting `i64` minor units:
    ///   [`MoneyError::Overflow`];
    /// - zero ("0", "0.00"): [`MoneyError::NotPositive`].
    ///
    /// Fewer fraction digits than D are fine: "90" and "90.5" are 9000 and 9050 fen for CNY.
    pub fn parse(s: &str, currency: Currency) -> Result<Amount, MoneyError> {
        Amount::from_minor(parse_non_negative_minor(s, currency)?)
    }

    /// Sum of two amounts; `None` on `i64` overflow (a sum of positives is otherwise positive).
    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }

    /// Difference of two amounts; `None` if the result would be zero or negative (it would no
    /// longer be an `Amount`) or on overflow.
    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0
            .checked_sub(other.0)
            .filter(|&minor| minor > 0)
            .map(Amount)
    }
}

/// Format any signed minor-unit value with exactly the currency's digits, e.g.
/// `format_minor(9000, Cny) == "90.00"`, `format_minor(-5, Cny) == "-0.05"`,
/// `format_minor(1200, Jpy) == "1200"`. Used for balances (which may be negative) as well as
/// amounts; the output of a positive value is always accepted by [`Amount::parse`]. Total for
/// every `i64`, including `i64::MIN`.
pub fn format_minor(minor: i64, currency: Currency) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    // `unsigned_abs` is exact for i64::MIN, unlike `abs`.
    let magnitude = minor.unsigned_abs();
    let digits = currency.minor_digits();
    if digits == 0 {
        return format!("{sign}{magnitude}");
    }
    let scale = 10u64.pow(digits);
    let whole = magnitude / scale;
    let fraction = magnitude % scale;
    let width = digits as usize;
    format!("{sign}{whole}.{fraction:0width$}")
}

/// A fee of `bps` basis points on `amount_minor`, rounded half up to the minor unit, in
/// integer arithmetic: `0 ≤ fee ≤ amount` for every `amount ≥ 0` and `bps ≤ 10 000`, so
/// `amount − fee` (the merchant's net) is never negative and the two sum to the amount.
pub fn fee_minor(amount_minor: i64, bps: u32) -> i64 {
    debug_assert!(amount_minor >= 0 && bps <= 10_000);
    let fee = (i128::from(amount_minor) * i128::from(bps) + 5_000) / 10_000;
    // Fits: fee ≤ amount because bps ≤ 10 000.
    i64::try_from(fee).unwrap_or(amount_minor).min(amount_minor)
}

/// Parse a non-negative decimal (zero allowed) with the same grammar and refusals as
/// [`Amount::parse`], except that zero is accepted: for credit limits and other configured
/// values where "none" is meaningful.
pub fn parse_non_negative_minor(s: &str, currency: Currency) -> Result<i64, MoneyError> {
    if s.len() > MAX_INPUT_LEN {
        return Err(MoneyError::Overflow);
    }
    let digits = currency.minor_digits();

    // Validate the grammar by hand first: rust_decimal on its own is laxer than we want (it
    // takes signs, '_' separators, ".5" and "5."), and we refuse all of those.
    let (integer, fraction) = match s.split_once('.') {
        Some((integer, fraction)) => (integer, Some(fraction)),
        None => (s, None),
    };
    if !is_ascii_digits(integer) || (integer.len() > 1 && integer.starts_with('0')) {
        return Err(MoneyError::Malformed);
    }
    if let Some(fraction) = fraction {
        if !is_ascii_digits(fraction) {
            return Err(MoneyError::Malformed);
        }
        if fraction.len() > digits as usize {
            return Err(MoneyError::TooManyDecimals(digits));
        }
    }
    if integer.len() > MAX_INTEGER_DIGITS {
        return Err(MoneyError::Overflow);
    }

    // At most 19 + 2 significant digits now, well inside rust_decimal's 28; an error here can
    // only mean the value is out of range.
    let value = Decimal::from_str_exact(s).map_err(|_| MoneyError::Overflow)?;
    let scale = value.scale();
    if scale > digits {
        return Err(MoneyError::TooManyDecimals(digits));
    }
    // Rescale to exactly `digits` places: minor = mantissa * 10^(digits - scale), checked.
    let minor = 10i128
        .checked_pow(digits - scale)
        .and_then(|factor| value.mantissa().checked_mul(factor))
        .ok_or(MoneyError::Overflow)?;
    let minor = i64::try_from(minor).map_err(|_| MoneyError::Overflow)?;
    if minor < 0 {
        // Unreachable given the grammar (no sign allowed); refuse rather than trust that.
        return Err(MoneyError::Malformed);
    }
    Ok(minor)
}

/// Funds available to spend: `balance + credit_limit - held`, or `None` if the result does not
/// fit in `i64`. Computed exactly in `i128`, so an intermediate sum that would overflow `i64`
/// (e.g. a huge balance plus a credit limit, minus a hold) does not cause a spurious `None`.
/// The result may be negative (an account over its limit); callers compare it to an amount.
pub fn checked_available(balance: i64, credit_limit: i64, held: i64) -> Option<i64> {
    let exact = i128::from(balance) + i128::from(credit_limit) - i128::from(held);
    i64::try_from(exact).ok()
}

/// Non-empty and only ASCII digits (so no whitespace, signs, underscores or non-ASCII digits).
fn is_ascii_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fees_round_half_up_and_never_exceed_the_amount() {
        assert_eq!(fee_minor(10_000, 60), 60);
        assert_eq!(fee_minor(1, 60), 0);
        assert_eq!(fee_minor(84, 60), 1); // 0.504 fen rounds up
        assert_eq!(fee_minor(83, 60), 0); // 0.498 fen rounds down
        assert_eq!(fee_minor(5, 10_000), 5);
        assert_eq!(fee_minor(i64::MAX, 10_000), i64::MAX);
    }

    proptest::proptest! {
        #[test]
        fn a_fee_and_its_net_sum_to_the_amount(amount in 0i64..=i64::MAX, bps in 0u32..=10_000) {
            let fee = fee_minor(amount, bps);
            proptest::prop_assert!((0..=amount).contains(&fee));
            proptest::prop_assert_eq!(fee + (amount - fee), amount);
        }
    }

    use super::*;
    use proptest::prelude::*;

    const CNY: Currency = Currency::Cny;
    const JPY: Currency = Currency::Jpy;

    fn parse(s: &str, c: Currency) -> Result<i64, MoneyError> {
        Amount::parse(s, c).map(Amount::minor)
    }

    // ---- Currency ----

    #[test]
    fn currency_parse_exact_codes_only() {
        for c in Currency::ALL {
            assert_eq!(Currency::parse(c.code()), Ok(c));
            assert_eq!(c.to_string(), c.code());
        }
        for bad in [
            "",
            "cny",
            "Cny",
            " CNY",
            "CNY ",
            "CN",
            "CNYY",
            "EUR",
            "RMB",
            "ＣＮＹ",
        ] {
            assert_eq!(
                Currency::parse(bad),
                Err(MoneyError::UnknownCurrency),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn currency_minor_digits() {
        assert_eq!(Currency::Cny.minor_digits(), 2);
        assert_eq!(Currency::Hkd.minor_digits(), 2);
        assert_eq!(Currency::Usd.minor_digits(), 2);
        assert_eq!(Currency::Jpy.minor_digits(), 0);
    }

    #[test]
    fn currency_serde_as_code_string() {
        for c in Currency::ALL {
            let json = serde_json::to_string(&c).expect("serialize");
            assert_eq!(json, format!("\"{}\"", c.code()));
            let back: Currency = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, c);
        }
        // Owned string source (not borrowable) also works.
        let v = serde_json::Value::String("HKD".to_owned());
        assert_eq!(
            serde_json::from_value::<Currency>(v).ok(),
            Some(Currency::Hkd)
        );
        for bad in ["\"cny\"", "\"\"", "\"EUR\"", "1", "null", "[\"CNY\"]"] {
            assert!(serde_json::from_str::<Currency>(bad).is_err(), "{bad}");
        }
    }

    // ---- Amount::parse acceptance ----

    #[test]
    fn parse_accepts() {
        assert_eq!(parse("0.01", CNY), Ok(1));
        assert_eq!(parse("0.1", CNY), Ok(10));
        assert_eq!(parse("1", CNY), Ok(100));
        assert_eq!(parse("90", CNY), Ok(9000));
        assert_eq!(parse("90.5", CNY), Ok(9050));
        assert_eq!(parse("90.00", CNY), Ok(9000));
        assert_eq!(parse("10.05", Currency::Usd), Ok(1005));
        assert_eq!(parse("100", Currency::Hkd), Ok(10000));
        assert_eq!(parse("92233720368547758.07", CNY), Ok(i64::MAX));
        assert_eq!(parse("1200", JPY), Ok(1200));
        assert_eq!(parse("1", JPY), Ok(1));
        assert_eq!(parse("9223372036854775807", JPY), Ok(i64::MAX));
    }

    // ---- Amount::parse refusals ----

    fn assert_refused(cases: &[&str], c: Currency, want: MoneyError) {
        for s in cases {
            assert_eq!(parse(s, c), Err(want.clone()), "Amount::parse({s:?}, {c})");
        }
    }

    #[test]
    fn parse_refuses_empty_and_dots() {
        assert_refused(
            &["", ".", "..", "5.", ".5", "1..0", "1.0.0", "1.2.3"],
            CNY,
            MoneyError::Malformed,
        );
        assert_refused(&["", ".", "5.", ".5"], JPY, MoneyError::Malformed);
    }

    #[test]
    fn parse_refuses_whitespace_anywhere() {
        assert_refused(
            &[
                " 1",
                "1 ",
                " 1 ",
                "1 000",
                "1. 5",
                "1 .5",
                "\t1",
                "1\n",
                "\u{a0}1",
                "1\u{a0}",
                "1\u{3000}",
            ],
            CNY,
            MoneyError::Malformed,
        );
    }

    #[test]
    fn parse_refuses_non_ascii() {
        // Full-width digits, Arabic-Indic digits, full-width full stop, NBSP.
        assert_refused(
            &[
                "１",
                "１２.００",
                "\u{0661}",
                "1\u{ff0e}5",
                "1\u{a0}000",
                "12.0０",
            ],
            CNY,
            MoneyError::Malformed,
        );
    }

    #[test]
    fn parse_refuses_signs_exponents_and_words() {
        assert_refused(
            &[
                "+1", "-1", "-0", "+0.01", "1-", "1e3", "1E3", "1e-2", "1.0e2", "NaN", "nan",
                "inf", "-inf", "Infinity", "0x10", "1_000", "1,000", "1,5", "abc", "¥1",
            ],
            CNY,
            MoneyError::Malformed,
        );
        assert_refused(
            &["+1", "-1", "1e3", "NaN", "inf"],
            JPY,
            MoneyError::Malformed,
        );
    }

    #[test]
    fn parse_refuses_leading_zeros() {
        assert_refused(
            &["00", "05", "05.00", "00.01", "007", "0000"],
            CNY,
            MoneyError::Malformed,
        );
        assert_refused(&["00", "01200"], JPY, MoneyError::Malformed);
    }

    #[test]
    fn parse_refuses_too_many_decimals() {
        assert_refused(
            &["1.001", "0.001", "90.000", "0.000"],
            CNY,
            MoneyError::TooManyDecimals(2),
        );
        assert_refused(
            &["1.5", "1.0", "1200.00", "0.0"],
            JPY,
            MoneyError::TooManyDecimals(0),
        );
    }

    #[test]
    fn parse_refuses_zero() {
        assert_refused(&["0", "0.0", "0.00"], CNY, MoneyError::NotPositive);
        assert_refused(&["0"], JPY, MoneyError::NotPositive);
    }

    #[test]
    fn parse_refuses_out_of_range() {
        assert_refused(
            &[
                "92233720368547758.08",
                "92233720368547759",
                "99999999999999999999",
                "9999999999999999999.99",
                "12345678901234567890123456789",
            ],
            CNY,
            MoneyError::Overflow,
        );
        assert_refused(
            &["9223372036854775808", "10000000000000000000"],
            JPY,
            MoneyError::Overflow,
        );
    }

    #[test]
    fn parse_refuses_overlong_strings_up_front() {
        let digits = "1".repeat(MAX_INPUT_LEN + 1);
        let garbage = "x".repeat(MAX_INPUT_LEN + 1);
        let zeros = format!("0.{}", "0".repeat(MAX_INPUT_LEN));
        for s in [&digits, &garbage, &zeros] {
            assert_eq!(parse(s, CNY), Err(MoneyError::Overflow), "{s}");
            assert_eq!(
                parse_non_negative_minor(s, CNY),
                Err(MoneyError::Overflow),
                "{s}"
            );
        }
    }

    // ---- parse_non_negative_minor ----

    #[test]
    fn non_negative_accepts_zero_and_shares_grammar() {
        assert_eq!(parse_non_negative_minor("0", CNY), Ok(0));
        assert_eq!(parse_non_negative_minor("0.00", CNY), Ok(0));
        assert_eq!(parse_non_negative_minor("0", JPY), Ok(0));
        assert_eq!(parse_non_negative_minor("500", CNY), Ok(50000));
        assert_eq!(parse_non_negative_minor("0.5", CNY), Ok(50));
        assert_eq!(
            parse_non_negative_minor("-1", CNY),
            Err(MoneyError::Malformed)
        );
        assert_eq!(
            parse_non_negative_minor("-0", CNY),
            Err(MoneyError::Malformed)
        );
        assert_eq!(
            parse_non_negative_minor("00", CNY),
            Err(MoneyError::Malformed)
        );
        assert_eq!(
            parse_non_negative_minor("", CNY),
            Err(MoneyError::Malformed)
        );
        assert_eq!(
            parse_non_negative_minor("0.001", CNY),
            Err(MoneyError::TooManyDecimals(2))
        );
        assert_eq!(
            parse_non_negative_minor("0.0", JPY),
            Err(MoneyError::TooManyDecimals(0))
        );
        assert_eq!(
            parse_non_negative_minor("92233720368547758.08", CNY),
            Err(MoneyError::Overflow)
        );
    }

    // ---- Amount construction and arithmetic ----

    #[test]
    fn from_minor_refuses_non_positive() {
        assert_eq!(Amount::from_minor(0), Err(MoneyError::NotPositive));
        assert_eq!(Amount::from_minor(-1), Err(MoneyError::NotPositive));
        assert_eq!(Amount::from_minor(i64::MIN), Err(MoneyError::NotPositive));
        assert_eq!(Amount::from_minor(1).map(Amount::minor), Ok(1));
        assert_eq!(
            Amount::from_minor(i64::MAX).map(Amount::minor),
            Ok(i64::MAX)
        );
    }

    #[test]
    fn checked_arithmetic_edges() {
        let a = |m| Amount::from_minor(m).expect("positive");
        assert_eq!(a(1).checked_add(a(2)), Some(a(3)));
        assert_eq!(a(i64::MAX).checked_add(a(1)), None);
        assert_eq!(a(5).checked_sub(a(2)), Some(a(3)));
        assert_eq!(a(5).checked_sub(a(5)), None);
        assert_eq!(a(5).checked_sub(a(6)), None);
    }

    #[test]
    fn checked_available_edges() {
        assert_eq!(checked_available(100, 50, 30), Some(120));
        assert_eq!(checked_available(0, 0, 30), Some(-30));
        assert_eq!(checked_available(i64::MAX, 1, 1), Some(i64::MAX));
        assert_eq!(checked_available(i64::MAX, 1, 0), None);
        assert_eq!(checked_available(i64::MIN, 0, 1), None);
        assert_eq!(checked_available(i64::MIN, 0, 0), Some(i64::MIN));
    }

    // ---- format_minor ----

    #[test]
    fn format_examples() {
        assert_eq!(format_minor(9000, CNY), "90.00");
        assert_eq!(format_minor(9050, CNY), "90.50");
        assert_eq!(format_minor(1, CNY), "0.01");
        assert_eq!(format_minor(-5, CNY), "-0.05");
        assert_eq!(format_minor(-12345, Currency::Usd), "-123.45");
        assert_eq!(format_minor(0, CNY), "0.00");
        assert_eq!(format_minor(1200, JPY), "1200");
        assert_eq!(format_minor(0, JPY), "0");
        assert_eq!(format_minor(-7, JPY), "-7");
        assert_eq!(format_minor(i64::MAX, CNY), "92233720368547758.07");
        assert_eq!(format_minor(i64::MIN, CNY), "-92233720368547758.08");
        assert_eq!(format_minor(i64::MIN, JPY), "-9223372036854775808");
    }

    // ---- properties ----

    fn currency() -> impl Strategy<Value = Currency> {
        prop::sample::select(Currency::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn prop_format_then_parse_round_trips(m in 1..=i64::MAX, c in currency()) {
            let s = format_minor(m, c);
            prop_assert_eq!(parse(&s, c), Ok(m));
            prop_assert_eq!(parse_non_negative_minor(&s, c), Ok(m));
        }

        #[test]
        fn prop_format_has_exact_digits_and_value(m in any::<i64>(), c in currency()) {
            let s = format_minor(m, c);
            let digits = c.minor_digits() as usize;
            let unsigned = s.strip_prefix('-').unwrap_or(&s);
            prop_assert_eq!(s.starts_with('-'), m < 0);
            let (whole, fraction) = match unsigned.split_once('.') {
                Some((w, f)) => (w, f),
                None => (unsigned, ""),
            };
            prop_assert_eq!(fraction.len(), digits);
            prop_assert!(digits > 0 || !unsigned.contains('.'));
            prop_assert!(is_ascii_digits(whole));
            prop_assert!(whole == "0" || !whole.starts_with('0'));
            prop_assert!(fraction.bytes().all(|b| b.is_ascii_digit()));
            // The digits, read as one integer, are exactly the minor value.
            let joined: String = s.chars().filter(|&ch| ch != '.').collect();
            prop_assert_eq!(joined.parse::<i128>().ok(), Some(i128::from(m)));
        }

        #[test]
        fn prop_checked_add_sub_match_i128(a in 1..=i64::MAX, b in 1..=i64::MAX) {
            let (x, y) = (Amount::from_minor(a).expect("a > 0"), Amount::from_minor(b).expect("b > 0"));
            let in_range = |v: i128| (1..=i128::from(i64::MAX)).contains(&v);
            let sum = i128::from(a) + i128::from(b);
            let diff = i128::from(a) - i128::from(b);
            prop_assert_eq!(x.checked_add(y).map(Amount::minor).map(i128::from), Some(sum).filter(|&v| in_range(v)));
            prop_assert_eq!(x.checked_sub(y).map(Amount::minor).map(i128::from), Some(diff).filter(|&v| in_range(v)));
        }

        #[test]
        fn prop_checked_sub_small_differences(a in 1..=1_000i64, b in 1..=1_000i64) {
            let (x, y) = (Amount::from_minor(a).expect("a > 0"), Amount::from_minor(b).expect("b > 0"));
            prop_assert_eq!(x.checked_sub(y).map(Amount::minor), Some(a - b).filter(|&v| v > 0));
        }

        #[test]
        fn prop_checked_available_matches_i128(b in any::<i64>(), l in any::<i64>(), h in any::<i64>()) {
            let exact = i128::from(b) + i128::from(l) - i128::from(h);
            let want = i64::try_from(exact).ok();
            prop_assert_eq!(checked_available(b, l, h), want);
        }

        #[test]
        fn prop_checked_available_near_boundary(b in (i64::MAX - 1000)..=i64::MAX, l in 0..=1000i64, h in 0..=2000i64) {
            let exact = i128::from(b) + i128::from(l) - i128::from(h);
            prop_assert_eq!(checked_available(b, l, h), i64::try_from(exact).ok());
        }

        #[test]
        fn prop_foreign_char_is_refused(
            prefix in "[0-9.]{0,12}",
            bad in any::<char>().prop_filter("outside [0-9.]", |ch| !ch.is_ascii_digit() && *ch != '.'),
            suffix in "[0-9.]{0,12}",
            c in currency(),
        ) {
            let s = format!("{prefix}{bad}{suffix}");
            prop_assert!(Amount::parse(&s, c).is_err(), "accepted {:?}", s);
            prop_assert!(parse_non_negative_minor(&s, c).is_err(), "accepted {:?}", s);
        }

        #[test]
        fn prop_arbitrary_strings_never_panic_and_accepted_ones_round_trip(s in "\\PC{0,45}", c in currency()) {
            if let Ok(m) = parse_non_negative_minor(&s, c) {
                prop_assert!(m >= 0);
                // Canonical output is the longest spelling of the value, so never shorter.
                prop_assert!(format_minor(m, c).len() >= s.len());
            }
        }

        #[test]
        fn prop_digit_strings_agree_with_grammar(s in "[0-9]{0,22}(\\.[0-9]{0,3})?", c in currency()) {
            // Reference model: the documented regex, evaluated by hand, plus range check in i128.
            let digits = c.minor_digits() as usize;
            let (int, frac) = match s.split_once('.') {
                Some((i, f)) => (i, Some(f)),
                None => (s.as_str(), None),
            };
            let int_ok = int == "0" || (!int.is_empty() && !int.starts_with('0'));
            let result = parse_non_negative_minor(&s, c);
            match frac {
                _ if !int_ok => prop_assert_eq!(result, Err(MoneyError::Malformed)),
                Some("") => prop_assert_eq!(result, Err(MoneyError::Malformed)),
                Some(f) if f.len() > digits => prop_assert_eq!(result, Err(MoneyError::TooManyDecimals(c.minor_digits()))),
                _ => {
                    let f = frac.unwrap_or("");
                    let padded = format!("{int}{f:0<digits$}");
                    let want = padded.parse::<i128>().ok().and_then(|v| i64::try_from(v).ok());
                    match want {
                        Some(v) => prop_assert_eq!(result, Ok(v)),
                        None => prop_assert_eq!(result, Err(MoneyError::Overflow)),
                    }
                }
            }
        }
    }
}
