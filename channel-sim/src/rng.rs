//! SplitMix64: a tiny seeded generator, so that fault injection (error rate, jitter) is
//! reproducible in tests. Not for anything secret.

#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=max` (a modulo bias of at most `max / 2^64`, irrelevant here).
    pub fn up_to(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        self.next_u64() % (max + 1)
    }

    /// True with probability `per_million / 1_000_000`.
    pub fn chance_per_million(&mut self, per_million: u32) -> bool {
        per_million > 0 && self.next_u64() % 1_000_000 < u64::from(per_million)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_deterministic_and_roughly_fair() {
        // The reference sequence of SplitMix64 seeded with 1234567.
        let mut rng = SplitMix64::new(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
        let mut rng = SplitMix64::new(7);
        let hits = (0..10_000)
            .filter(|_| rng.chance_per_million(250_000))
            .count();
        assert!((2_200..2_800).contains(&hits), "{hits}");
        assert!(!SplitMix64::new(1).chance_per_million(0));
        assert!((0..100).all(|_| rng.up_to(5) <= 5));
    }
}
