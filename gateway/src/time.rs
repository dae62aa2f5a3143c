//! Calendar time as the API and the channels write it: RFC 3339 in UTC (the API's timestamps,
//! the supplier's `expires_at`), RFC 3339 and `yyyy-MM-dd HH:mm:ss` in Beijing time (WeChat
//! Pay's and Alipay's fields). A leaf: it imports nothing of the gateway.

/// Calendar fields of a unix time shifted by `offset_seconds` (UTC+8 for Beijing time, which
/// has no daylight saving time since 1991).
struct Civil {
    year: u64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
}

const SHANGHAI_OFFSET_SECONDS: u64 = 8 * 3600;

fn civil(unix_seconds: u64, offset_seconds: u64) -> Civil {
    let local = unix_seconds + offset_seconds;
    let days = local / 86_400;
    let in_day = local % 86_400;
    // Howard Hinnant's `civil_from_days`, for days since 1970-01-01 (never negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + u64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        hour: in_day / 3_600,
        minute: in_day % 3_600 / 60,
        second: in_day % 60,
    }
}

impl Civil {
    /// `yyyy-MM-dd{sep}HH:mm:ss{suffix}`, as `format!("{:04}-{:02}-…")` writes it (a year past
    /// 9999 takes the digits it needs), digit by digit: the API writes a few of these per
    /// payment, and six padded fields through the formatting machinery cost several times the
    /// instructions.
    fn text(&self, sep: char, suffix: &str) -> String {
        fn two(out: &mut String, v: u64) {
            debug_assert!(v < 100);
            out.push(char::from(b'0' + (v / 10) as u8));
            out.push(char::from(b'0' + (v % 10) as u8));
        }
        let mut out = String::with_capacity(19 + suffix.len());
        if self.year < 10_000 {
            two(&mut out, self.year / 100);
            two(&mut out, self.year % 100);
        } else {
            out.push_str(&self.year.to_string());
        }
        out.push('-');
        two(&mut out, u64::from(self.month));
        out.push('-');
        two(&mut out, u64::from(self.day));
        out.push(sep);
        two(&mut out, self.hour);
        out.push(':');
        two(&mut out, self.minute);
        out.push(':');
        two(&mut out, self.second);
        out.push_str(suffix);
        out
    }
}

/// `yyyy-MM-dd HH:mm:ss` in Beijing time (Alipay's `timestamp` and `time_expire`).
pub fn shanghai_datetime(unix_seconds: u64) -> String {
    civil(unix_seconds, SHANGHAI_OFFSET_SECONDS).text(' ', "")
}

/// RFC 3339 with `+08:00` (WeChat Pay's `time_expire`).
pub fn rfc3339_shanghai(unix_seconds: u64) -> String {
    civil(unix_seconds, SHANGHAI_OFFSET_SECONDS).text('T', "+08:00")
}

/// RFC 3339 in UTC with `Z` (the supplier's `expires_at`).
pub fn rfc3339_utc(unix_seconds: u64) -> String {
    civil(unix_seconds, 0).text('T', "Z")
}

/// RFC 3339 in UTC with second precision, e.g. `2026-11-26T12:00:00Z` (the API's timestamps).
pub fn rfc3339(unix_ms: u64) -> String {
    rfc3339_utc(unix_ms / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        // Independent vectors: `date -u -d @0`, `date -u -d @951782400` (a leap day),
        // `date -u -d @1795694400`.
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_694_400_999), "2026-11-26T12:00:00Z");
    }

    #[test]
    fn formats_channel_times() {
        assert_eq!(shanghai_datetime(1_714_564_800), "2024-05-01 20:00:00");
        assert_eq!(rfc3339_shanghai(1_714_565_700), "2024-05-01T20:15:00+08:00");
        assert_eq!(rfc3339_utc(1_714_565_700), "2024-05-01T12:15:00Z");
        // Crossing midnight, a leap day and a year end in Beijing time.
        assert_eq!(shanghai_datetime(1_709_222_400), "2024-03-01 00:00:00");
        assert_eq!(shanghai_datetime(1_709_222_399), "2024-02-29 23:59:59");
        assert_eq!(rfc3339_shanghai(1_704_038_400), "2024-01-01T00:00:00+08:00");
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    proptest::proptest! {
        /// The digit-by-digit text is what `format!` writes, for any time (years past 9999
        /// included).
        #[test]
        fn text_is_what_format_writes(unix_seconds in 0u64..400_000_000_000) {
            let c = civil(unix_seconds, SHANGHAI_OFFSET_SECONDS);
            let expected = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}+08:00",
                c.year, c.month, c.day, c.hour, c.minute, c.second
            );
            proptest::prop_assert_eq!(c.text('T', "+08:00"), expected);
            let c = civil(unix_seconds, 0);
            let expected = format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                c.year, c.month, c.day, c.hour, c.minute, c.second
            );
            proptest::prop_assert_eq!(c.text(' ', ""), expected);
        }
    }
}
