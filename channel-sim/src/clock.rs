//! Wall-clock helpers and the date formats of the protocols, without a date crate: RFC 3339
//! (WeChat Pay `time_expire`, supplier `expires_at`), Alipay's `yyyy-MM-dd HH:mm:ss` in
//! Beijing time (UTC+8), and Alipay's `timeout_express` (`90m`, `2h`, `1d`, `1c`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Beijing time, in which Alipay's and WeChat Pay's local times are written.
const BEIJING_OFFSET_SECONDS: i64 = 8 * 3600;

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_unix_seconds() -> u64 {
    now_unix_ms() / 1000
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn digits(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `YYYY-MM-DD` + `sep` + `HH:MM:SS` as seconds since the epoch, read as UTC.
fn parse_local(text: &str, sep: u8) -> Option<(i64, &str)> {
    let bytes = text.as_bytes();
    if bytes.len() < 19
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || bytes[10] != sep
        || bytes[13] != b':'
        || bytes[16] != b':'
    {
        return None;
    }
    let year = digits(&text[0..4])?;
    let month = digits(&text[5..7])?;
    let day = digits(&text[8..10])?;
    let hour = digits(&text[11..13])?;
    let minute = digits(&text[14..16])?;
    let second = digits(&text[17..19])?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let seconds = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    Some((seconds, &text[19..]))
}

/// RFC 3339 (`2024-05-01T20:15:00+08:00`, `…Z`, optional fraction) → unix seconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let (local, mut rest) = parse_local(text, b'T')?;
    if let Some(fraction) = rest.strip_prefix('.') {
        let end = fraction
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(fraction.len());
        if end == 0 || end > 9 {
            return None;
        }
        rest = &fraction[end..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let bytes = rest.as_bytes();
            if bytes.len() != 6 || bytes[3] != b':' {
                return None;
            }
            let sign = match bytes[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let hours = digits(&rest[1..3])?;
            let minutes = digits(&rest[4..6])?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            sign * i64::from(hours * 3600 + minutes * 60)
        }
    };
    Some(local - offset)
}

/// Alipay's `yyyy-MM-dd HH:mm:ss`, Beijing time → unix seconds.
pub fn parse_alipay_time(text: &str) -> Option<i64> {
    match parse_local(text, b' ')? {
        (local, "") => Some(local - BEIJING_OFFSET_SECONDS),
        _ => None,
    }
}

fn beijing_parts(unix_seconds: i64) -> (i64, u32, u32, i64) {
    let local = unix_seconds + BEIJING_OFFSET_SECONDS;
    let (year, month, day) = civil_from_days(local.div_euclid(86_400));
    (year, month, day, local.rem_euclid(86_400))
}

/// `yyyy-MM-dd HH:mm:ss` in Beijing time (Alipay's `notify_time`, `gmt_payment`).
pub fn format_alipay_time(unix_seconds: i64) -> String {
    let (year, month, day, secs) = beijing_parts(unix_seconds);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// RFC 3339 with the `+08:00` offset, as WeChat Pay writes times.
pub fn format_rfc3339_beijing(unix_seconds: i64) -> String {
    let (year, month, day, secs) = beijing_parts(unix_seconds);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+08:00",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Alipay's `timeout_express` (1m to 15d: `<n>m`, `<n>h`, `<n>d`, or `1c` for "until the end
/// of today, Beijing time") → the expiry in unix seconds from `now`.
pub fn parse_timeout_express(text: &str, now_unix_seconds: i64) -> Option<i64> {
    if text == "1c" {
        let (_, _, _, secs) = beijing_parts(now_unix_seconds);
        return Some(now_unix_seconds - secs + 86_400);
    }
    let unit = text.chars().last()?;
    let count = i64::from(digits(&text[..text.len() - 1])?);
    let seconds = count
        * match unit {
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
    if !(60..=15 * 86_400).contains(&seconds) {
        return None;
    }
    Some(now_unix_seconds + seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_the_protocol_dates() {
        assert_eq!(
            parse_rfc3339("2024-05-01T20:15:00+08:00"),
            Some(1_714_565_700)
        );
        assert_eq!(parse_rfc3339("2024-05-01T12:15:00Z"), Some(1_714_565_700));
        assert_eq!(
            parse_rfc3339("2024-05-01T12:15:00.123Z"),
            Some(1_714_565_700)
        );
        assert_eq!(parse_rfc3339("2024-05-01 12:15:00Z"), None);
        assert_eq!(parse_rfc3339("2024-13-01T12:15:00Z"), None);
        assert_eq!(parse_rfc3339("2024-05-01T12:15:00"), None);
        assert_eq!(
            parse_alipay_time("2024-05-01 20:15:00"),
            Some(1_714_565_700)
        );
        assert_eq!(format_alipay_time(1_714_565_700), "2024-05-01 20:15:00");
        assert_eq!(
            format_rfc3339_beijing(1_714_565_700),
            "2024-05-01T20:15:00+08:00"
        );
        for days in [-1_000_000, -1, 0, 1, 19_844, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn parses_timeout_express() {
        let now = 1_714_564_800; // 2024-05-01 20:00:00 Beijing
        assert_eq!(parse_timeout_express("15m", now), Some(now + 900));
        assert_eq!(parse_timeout_express("2h", now), Some(now + 7200));
        assert_eq!(parse_timeout_express("1c", now), Some(now + 4 * 3600));
        assert_eq!(parse_timeout_express("16d", now), None);
        assert_eq!(parse_timeout_express("0m", now), None);
        assert_eq!(parse_timeout_express("5s", now), None);
        assert_eq!(parse_timeout_express("m", now), None);
    }
}
