//! Latency histograms (HdrHistogram, microseconds) and the percentiles the reports show.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The largest latency recorded as itself: one hour. Larger values are recorded as this
/// bound (and show as the maximum), never dropped.
pub const MAX_TRACKABLE_US: u64 = 3_600_000_000;
/// Three significant figures: 0.1 % resolution at any magnitude.
const SIGNIFICANT_FIGURES: u8 = 3;
/// The per-second series need less precision, and there are many of them.
const SERIES_SIGNIFICANT_FIGURES: u8 = 2;

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    inner: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        Self {
            inner: Histogram::new_with_bounds(1, MAX_TRACKABLE_US, SIGNIFICANT_FIGURES)
                .expect("valid histogram bounds"),
        }
    }

    /// A coarser histogram for one second of a series (2 significant figures).
    pub fn for_series() -> Self {
        Self {
            inner: Histogram::new_with_bounds(1, MAX_TRACKABLE_US, SERIES_SIGNIFICANT_FIGURES)
                .expect("valid histogram bounds"),
        }
    }

    pub fn record(&mut self, latency: Duration) {
        self.record_us(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn record_us(&mut self, us: u64) {
        self.inner.saturating_record(us.min(MAX_TRACKABLE_US));
    }

    pub fn add(&mut self, other: &LatencyHistogram) {
        self.inner
            .add(&other.inner)
            .expect("histograms of the same bounds add");
    }

    pub fn count(&self) -> u64 {
        self.inner.len()
    }

    /// The value at `quantile` (0..=1), in µs; 0 when empty.
    pub fn quantile_us(&self, quantile: f64) -> u64 {
        if self.inner.is_empty() {
            return 0;
        }
        self.inner.value_at_quantile(quantile)
    }

    pub fn percentiles(&self) -> Percentiles {
        if self.inner.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: self.inner.len(),
            mean_us: self.inner.mean().round() as u64,
            p50_us: self.inner.value_at_quantile(0.50),
            p90_us: self.inner.value_at_quantile(0.90),
            p99_us: self.inner.value_at_quantile(0.99),
            p999_us: self.inner.value_at_quantile(0.999),
            max_us: self.inner.max(),
        }
    }
}

/// A latency distribution as reported. Values are HdrHistogram's: the highest value
/// equivalent (within 0.1 %) to the one at that rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// Microseconds as milliseconds with three decimals, for the human summary.
pub fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within HdrHistogram's 3-significant-figure resolution.
    fn close(actual: u64, expected: u64) -> bool {
        actual.abs_diff(expected) <= expected / 1_000 + 1
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut h = LatencyHistogram::new();
        for us in 1..=10_000 {
            h.record_us(us);
        }
        let p = h.percentiles();
        assert_eq!(p.count, 10_000);
        assert!(close(p.p50_us, 5_000), "{p:?}");
        assert!(close(p.p90_us, 9_000), "{p:?}");
        assert!(close(p.p99_us, 9_900), "{p:?}");
        assert!(close(p.p999_us, 9_990), "{p:?}");
        assert!(close(p.max_us, 10_000), "{p:?}");
        assert!(close(p.mean_us, 5_000), "{p:?}");
    }

    #[test]
    fn the_tail_is_not_averaged_away() {
        // 99.5 % fast answers and a few stalls: p99 stays fast, p99.9 and max show the stall.
        let mut h = LatencyHistogram::new();
        for _ in 0..9_950 {
            h.record(Duration::from_micros(800));
        }
        for _ in 0..50 {
            h.record(Duration::from_millis(250));
        }
        let p = h.percentiles();
        assert!(close(p.p50_us, 800), "{p:?}");
        assert!(close(p.p99_us, 800), "{p:?}");
        assert!(close(p.p999_us, 250_000), "{p:?}");
        assert!(close(p.max_us, 250_000), "{p:?}");
    }

    #[test]
    fn empty_zero_and_huge_values() {
        assert_eq!(
            LatencyHistogram::new().percentiles(),
            Percentiles::default()
        );
        assert_eq!(LatencyHistogram::new().quantile_us(0.99), 0);
        let mut h = LatencyHistogram::new();
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(100_000));
        let p = h.percentiles();
        assert_eq!(p.count, 2);
        assert!(close(p.max_us, MAX_TRACKABLE_US), "{p:?}");
    }

    #[test]
    fn histograms_add_up() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        a.record_us(100);
        b.record_us(300);
        b.record_us(300);
        a.add(&b);
        assert_eq!(a.count(), 3);
        assert!(close(a.percentiles().p50_us, 300));
        let mut s = LatencyHistogram::for_series();
        s.record_us(12_345);
        // Two significant figures: within 1 %.
        assert!(s.quantile_us(0.5).abs_diff(12_345) <= 124);
    }

    #[test]
    fn ms_formats_microseconds() {
        assert_eq!(ms(1_234), "1.234");
        assert_eq!(ms(0), "0.000");
    }
}
