//! The routing policy (DESIGN.md §6): which channels may take a payment, and in which order
//! to try them. One pure function, [`rank`]: no clock, no I/O, no global random source —
//! the caller passes a random `u64`, so a given input always gives the same order.
//!
//! ## Inputs
//!
//! A [`Candidate`] pairs a channel's static facts from configuration ([`ChannelRoute`],
//! built once at start and borrowed, so a request copies no strings) with its live numbers
//! ([`LiveStats`], taken from the channel's breaker for this request). The split keeps the
//! per-request work to a few words per channel.
//!
//! ## The order
//!
//! 1. **Filter**: enabled, the method and the currency are in the channel's lists (exact,
//!    case-sensitive match; an empty list accepts nothing), `min_amount_minor ≤ amount ≤
//!    max_amount_minor`, and the breaker admits a call now.
//! 2. **Tiers**: lower `priority` number first; a backup tier is tried only after every
//!    channel of the tiers before it.
//! 3. **Within a tier**, a weighted random order (draws without replacement) by the
//!    effective weight
//!
//!    ```text
//!    effective = weight × success_rate_percent × 1 000 000 / (latency_ms + 50)
//!    ```
//!
//!    `success_rate_percent / latency` is the rate of *successful answers per unit of
//!    customer waiting*: a channel twice as fast, or twice as likely to succeed, gets twice
//!    the share of first picks, and the configured `weight` scales the whole. The 50 ms
//!    offset keeps the fast end sane: 5 ms against 10 ms is noise, not a 2× difference
//!    (with the offset it is 55 against 60, under 10 %), and a channel reporting 0 ms does
//!    not take everything. The 1 000 000 scale keeps integer rounding negligible, so the
//!    effective weight is 0 only when `weight` or the success rate is 0 (for any latency
//!    under 1 000 s). Bound: `u32::MAX × 100 × 10⁶ ≈ 4.3 × 10¹⁷` before the division, at
//!    most `8.6 × 10¹⁵` after it, and [`MAX_CANDIDATES`] of those sum to `5.5 × 10¹⁷`,
//!    all well inside `u64`.
//! 4. **Fee as tie-breaker**: candidates whose effective weights are exactly equal form
//!    one class; a draw picks a class with probability proportional to its total weight
//!    and takes its *cheapest* remaining member (lowest `fee_bps`, then configuration
//!    order). So the class keeps its fair share of traffic and the cheaper channel goes
//!    first within it. In practice live latencies rarely tie, so this mostly decides
//!    between identically configured channels with no traffic yet.
//! 5. **Zero weights**: a candidate with effective weight 0 is never dropped — a degraded
//!    channel is better than none — but comes after every weighted candidate of its tier,
//!    cheapest first, then in configuration order.
//!
//! Draws use splitmix64 seeded with the caller's `random`, mapped to a range by a widening
//! multiply (bias below `total / 2⁶⁴`, i.e. none that matters).
//!
//! Bound: only the first [`MAX_CANDIDATES`] entries of the input are considered (the
//! configuration should refuse more channels than that). The draw is O(n²) per tier:
//! at most 64² = 4 096 steps, a few microseconds.

/// The most candidates [`rank`] looks at: far above the handful of channels a deployment
/// has per method, and small enough that the quadratic draw stays in microseconds.
pub const MAX_CANDIDATES: usize = 64;

/// Added to the latency in the effective weight (see the module docs for why).
pub const LATENCY_OFFSET_MS: u64 = 50;

/// Scale of the effective weight, so integer division loses nothing that matters.
pub const EFFECTIVE_WEIGHT_SCALE: u64 = 1_000_000;

/// A channel's routing facts from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRoute {
    /// The configured channel id (also the breaker's and the metrics' label).
    pub channel_id: String,
    /// Tier: lower numbers are tried first (primary 0 or 1, backups after).
    pub priority: u32,
    /// Relative share within the tier before live scaling; 0 = only when nothing else is
    /// left in the tier.
    pub weight: u32,
    /// The channel's fee in basis points; the tie-breaker.
    pub fee_bps: u32,
    /// An operator's switch: disabled channels are never candidates.
    pub enabled: bool,
    /// Payment methods accepted, as the API names them (`alipay`, `wechatpay`, `supplier`).
    pub methods: Vec<String>,
    /// ISO 4217 codes accepted.
    pub currencies: Vec<String>,
    /// Smallest amount accepted, in minor units, inclusive.
    pub min_amount_minor: i64,
    /// Largest amount accepted, in minor units, inclusive.
    pub max_amount_minor: i64,
}

impl ChannelRoute {
    /// Whether the channel's configuration accepts the request (live health aside).
    pub fn accepts(&self, request: &RouteRequest<'_>) -> bool {
        self.enabled
            && self.methods.iter().any(|m| m == request.method)
            && self.currencies.iter().any(|c| c == request.currency)
            && self.min_amount_minor <= request.amount_minor
            && request.amount_minor <= self.max_amount_minor
    }
}

/// A channel's live numbers at the time of the request (from its breaker: see
/// [`super::live_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveStats {
    /// The breaker would give a permit now.
    pub admits: bool,
    /// Recent success rate, integer percent; values above 100 are read as 100.
    pub success_rate_percent: u32,
    /// Recent latency in milliseconds.
    pub latency_ms: u32,
}

/// One channel as [`rank`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub route: &'a ChannelRoute,
    pub live: LiveStats,
}

impl Candidate<'_> {
    /// Accepted by configuration and admitted by the breaker.
    pub fn is_admissible(&self, request: &RouteRequest<'_>) -> bool {
        self.live.admits && self.route.accepts(request)
    }

    /// The weight used within the tier (see [`effective_weight`]).
    pub fn effective_weight(&self) -> u64 {
        effective_weight(
            self.route.weight,
            self.live.success_rate_percent,
            self.live.latency_ms,
        )
    }
}

/// `weight × min(success, 100) × 1 000 000 / (latency_ms + 50)`; see the module docs.
/// Never overflows: at most about `8.6 × 10¹⁵`.
pub fn effective_weight(weight: u32, success_rate_percent: u32, latency_ms: u32) -> u64 {
    u64::from(weight) * u64::from(success_rate_percent.min(100)) * EFFECTIVE_WEIGHT_SCALE
        / (u64::from(latency_ms) + LATENCY_OFFSET_MS)
}

/// What is being routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRequest<'a> {
    pub method: &'a str,
    pub currency: &'a str,
    pub amount_minor: i64,
}

/// The failover order: indices into `candidates` of the admissible ones, best first (see
/// the module docs). Empty when nothing is admissible. The same inputs and `random` always
/// give the same order.
pub fn rank(candidates: &[Candidate<'_>], request: &RouteRequest<'_>, random: u64) -> Vec<usize> {
    let mut admissible: Vec<Entry> = candidates
        .iter()
        .take(MAX_CANDIDATES)
        .enumerate()
        .filter(|(_, c)| c.is_admissible(request))
        .map(|(index, c)| Entry {
            index,
            priority: c.route.priority,
            weight: c.effective_weight(),
            fee_bps: c.route.fee_bps,
        })
        .collect();
    // Tier, then weight (heaviest first, so zero weights end each tier and equal weights
    // are adjacent), then fee, then configuration order.
    admissible.sort_unstable_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then(b.weight.cmp(&a.weight))
            .then(a.fee_bps.cmp(&b.fee_bps))
            .then(a.index.cmp(&b.index))
    });
    let mut order = Vec::with_capacity(admissible.len());
    let mut rng = SplitMix64(random);
    for tier in admissible.chunk_by(|a, b| a.priority == b.priority) {
        order_tier(tier, &mut rng, &mut order);
    }
    debug_assert!(order.len() <= MAX_CANDIDATES);
    order
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    index: usize,
    priority: u32,
    weight: u64,
    fee_bps: u32,
}

/// Appends one tier's order to `out`. `tier` is sorted by weight (descending), fee, index.
fn order_tier(tier: &[Entry], rng: &mut SplitMix64, out: &mut Vec<usize>) {
    let weighted = tier.iter().take_while(|e| e.weight > 0).count();
    let mut remaining: Vec<Entry> = tier[..weighted].to_vec();
    let mut total: u64 = remaining.iter().map(|e| e.weight).sum();
    while remaining.len() > 1 {
        let point = rng.below(total);
        let mut pick = 0;
        let mut cumulative = 0;
        for (at, e) in remaining.iter().enumerate() {
            cumulative += e.weight;
            if point < cumulative {
                pick = at;
                break;
            }
        }
        // Fee tie-break: the class of equal weights is contiguous and cheapest first, so
        // its first remaining member is the one to take.
        while pick > 0 && remaining[pick - 1].weight == remaining[pick].weight {
            pick -= 1;
        }
        let chosen = remaining.remove(pick);
        total -= chosen.weight;
        out.push(chosen.index);
    }
    out.extend(remaining.iter().map(|e| e.index));
    out.extend(tier[weighted..].iter().map(|e| e.index));
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough to spread traffic.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (`bound > 0`).
    fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        ((u128::from(self.next()) * u128::from(bound)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};

    fn route(id: &str, priority: u32, weight: u32, fee_bps: u32) -> ChannelRoute {
        ChannelRoute {
            channel_id: id.to_owned(),
            priority,
            weight,
            fee_bps,
            enabled: true,
            methods: vec!["alipay_qr".to_owned(), "wechat_qr".to_owned()],
            currencies: vec!["CNY".to_owned()],
            min_amount_minor: 100,
            max_amount_minor: 100_000,
        }
    }

    fn healthy() -> LiveStats {
        LiveStats {
            admits: true,
            success_rate_percent: 100,
            latency_ms: 100,
        }
    }

    fn candidates(routes: &[ChannelRoute]) -> Vec<Candidate<'_>> {
        routes
            .iter()
            .map(|route| Candidate {
                route,
                live: healthy(),
            })
            .collect()
    }

    const REQUEST: RouteRequest<'static> = RouteRequest {
        method: "alipay_qr",
        currency: "CNY",
        amount_minor: 1_000,
    };

    fn ids(routes: &[ChannelRoute], order: &[usize]) -> Vec<String> {
        order
            .iter()
            .map(|&i| routes[i].channel_id.clone())
            .collect()
    }

    #[test]
    fn filters_by_enabled_method_currency_amount_and_breaker() {
        let base = route("ok", 1, 10, 60);
        let routes = vec![
            base.clone(),
            ChannelRoute {
                channel_id: "disabled".into(),
                enabled: false,
                ..base.clone()
            },
            ChannelRoute {
                channel_id: "no-method".into(),
                methods: vec!["wechat_qr".into()],
                ..base.clone()
            },
            ChannelRoute {
                channel_id: "no-currency".into(),
                currencies: vec!["USD".into()],
                ..base.clone()
            },
            ChannelRoute {
                channel_id: "too-small".into(),
                min_amount_minor: 1_001,
                ..base.clone()
            },
            ChannelRoute {
                channel_id: "too-large".into(),
                max_amount_minor: 999,
                ..base.clone()
            },
            ChannelRoute {
                channel_id: "exact-bounds".into(),
                min_amount_minor: 1_000,
                max_amount_minor: 1_000,
                ..base.clone()
            },
            ChannelRoute {
                channel_id: "empty-lists".into(),
                methods: vec![],
                ..base.clone()
            },
            ChannelRoute {
                channel_id: "open-breaker".into(),
                ..base.clone()
            },
            ChannelRoute {
                channel_id: "case".into(),
                currencies: vec!["cny".into()],
                ..base
            },
        ];
        let mut cands = candidates(&routes);
        cands[8].live.admits = false;
        let mut order = rank(&cands, &REQUEST, 7);
        order.sort_unstable();
        assert_eq!(ids(&routes, &order), ["ok", "exact-bounds"]);
        assert!(rank(&[], &REQUEST, 7).is_empty());
    }

    #[test]
    fn lower_priority_number_first_whatever_the_weights() {
        let routes = vec![
            route("backup-heavy", 2, 1_000, 10),
            route("primary-light", 1, 1, 90),
            route("third", 3, 1_000, 10),
        ];
        let cands = candidates(&routes);
        for seed in 0..100 {
            assert_eq!(
                ids(&routes, &rank(&cands, &REQUEST, seed)),
                ["primary-light", "backup-heavy", "third"]
            );
        }
    }

    #[test]
    fn equal_effective_weights_go_cheapest_first() {
        let routes = vec![
            route("dear", 1, 10, 80),
            route("cheap", 1, 10, 40),
            route("mid", 1, 10, 60),
        ];
        let cands = candidates(&routes);
        for seed in 0..100 {
            assert_eq!(
                ids(&routes, &rank(&cands, &REQUEST, seed)),
                ["cheap", "mid", "dear"]
            );
        }
        // Equal fees too: configuration order.
        let routes = vec![route("a", 1, 10, 50), route("b", 1, 10, 50)];
        assert_eq!(rank(&candidates(&routes), &REQUEST, 1), [0, 1]);
    }

    #[test]
    fn a_tied_class_keeps_its_share_of_first_picks() {
        // Two tied channels of weight 1 against one of weight 2: the tied class has half the
        // total, and its cheaper member takes that half.
        let routes = vec![
            route("heavy", 1, 2, 50),
            route("tied-dear", 1, 1, 70),
            route("tied-cheap", 1, 1, 30),
        ];
        let cands = candidates(&routes);
        let firsts = (0..10_000u64)
            .filter(|&seed| rank(&cands, &REQUEST, seed)[0] == 2)
            .count();
        assert!((4_700..=5_300).contains(&firsts), "{firsts}");
        assert!((0..10_000u64).all(|seed| rank(&cands, &REQUEST, seed)[0] != 1));
    }

    #[test]
    fn zero_weights_come_last_in_their_tier_cheapest_first() {
        let routes = vec![
            route("zero-dear", 1, 0, 90),
            route("weighted", 1, 5, 90),
            route("zero-cheap", 1, 0, 10),
            route("backup", 2, 5, 10),
            route("failing", 1, 5, 10),
        ];
        let mut cands = candidates(&routes);
        cands[4].live.success_rate_percent = 0;
        for seed in 0..100 {
            assert_eq!(
                ids(&routes, &rank(&cands, &REQUEST, seed)),
                ["weighted", "zero-cheap", "failing", "zero-dear", "backup"]
            );
        }
    }

    #[test]
    fn deterministic_for_a_seed_and_varied_across_seeds() {
        let routes: Vec<ChannelRoute> = (0..6)
            .map(|i| route(&format!("c{i}"), 1, 10 + i, 50))
            .collect();
        let cands = candidates(&routes);
        let first = rank(&cands, &REQUEST, 42);
        assert_eq!(rank(&cands, &REQUEST, 42), first);
        let distinct: std::collections::BTreeSet<Vec<usize>> =
            (0..200).map(|seed| rank(&cands, &REQUEST, seed)).collect();
        assert!(distinct.len() > 50, "only {} orders", distinct.len());
    }

    #[test]
    fn live_stats_scale_the_weight() {
        assert_eq!(effective_weight(1, 100, 50), 1_000_000);
        assert_eq!(effective_weight(1, 100, 150), 500_000);
        assert_eq!(effective_weight(2, 50, 150), 500_000);
        assert_eq!(effective_weight(1, 250, 50), 1_000_000, "clamped to 100 %");
        assert_eq!(effective_weight(0, 100, 0), 0);
        assert_eq!(effective_weight(1, 0, 0), 0);
        assert_eq!(
            effective_weight(1, 1, 999_000),
            1,
            "only 0 weight or 0 % gives 0"
        );
        assert_eq!(
            effective_weight(u32::MAX, u32::MAX, 0),
            u64::from(u32::MAX) * 100 * 1_000_000 / 50
        );
        // A slow channel loses first picks to a fast one of the same configured weight.
        let routes = vec![route("slow", 1, 10, 50), route("fast", 1, 10, 50)];
        let mut cands = candidates(&routes);
        cands[0].live.latency_ms = 950; // 1 000 vs 150 (+50): about 13 % of first picks
        let slow_first = (0..10_000u64)
            .filter(|&seed| rank(&cands, &REQUEST, seed)[0] == 0)
            .count();
        assert!((1_000..=1_600).contains(&slow_first), "{slow_first}");
    }

    #[test]
    fn considers_at_most_max_candidates() {
        let routes: Vec<ChannelRoute> = (0..MAX_CANDIDATES + 10)
            .map(|i| route(&format!("c{i}"), 1, 1, 50))
            .collect();
        let order = rank(&candidates(&routes), &REQUEST, 3);
        assert_eq!(order.len(), MAX_CANDIDATES);
        assert!(order.iter().all(|&i| i < MAX_CANDIDATES));
    }

    // ---- properties ----

    const METHODS: [&str; 2] = ["alipay_qr", "wechat_qr"];
    const CURRENCIES: [&str; 2] = ["CNY", "USD"];

    fn subset(names: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
        prop::sample::subsequence(names.to_vec(), 0..=names.len())
            .prop_map(|v| v.into_iter().map(str::to_owned).collect())
    }

    fn any_route() -> impl Strategy<Value = (ChannelRoute, LiveStats)> {
        (
            (0u32..4, 0u32..20, 0u32..100, prop::bool::weighted(0.9)),
            (
                subset(&METHODS),
                subset(&CURRENCIES),
                0i64..2_000,
                0i64..2_000,
            ),
            (prop::bool::weighted(0.8), 0u32..=100, 0u32..1_000),
        )
            .prop_map(
                |((priority, weight, fee_bps, enabled), (methods, currencies, lo, hi), live)| {
                    let route = ChannelRoute {
                        channel_id: "c".to_owned(),
                        priority,
                        weight,
                        fee_bps,
                        enabled,
                        methods,
                        currencies,
                        min_amount_minor: lo.min(hi),
                        max_amount_minor: lo.max(hi),
                    };
                    let (admits, success_rate_percent, latency_ms) = live;
                    let live = LiveStats {
                        admits,
                        success_rate_percent,
                        latency_ms,
                    };
                    (route, live)
                },
            )
    }

    fn any_request() -> impl Strategy<Value = (usize, usize, i64)> {
        (0..METHODS.len(), 0..CURRENCIES.len(), 0i64..2_000)
    }

    /// The expected share of first picks in a single tier of `weights` / `fees` (see the
    /// module docs: a tied class's share goes to its cheapest member).
    fn expected_first_shares(weights: &[u64], fees: &[u32]) -> Vec<f64> {
        let total: u64 = weights.iter().sum();
        let n = weights.len();
        // The leader of i's class: the cheapest, then earliest, with the same weight.
        let leader = |i: usize| {
            (0..n)
                .filter(|&j| weights[j] == weights[i])
                .min_by_key(|&j| (fees[j], j))
                .expect("i itself")
        };
        (0..n)
            .map(|i| {
                if leader(i) != i {
                    0.0
                } else if total == 0 {
                    1.0
                } else {
                    let class = weights.iter().filter(|&&w| w == weights[i]).count() as u64;
                    (weights[i] * class) as f64 / total as f64
                }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn prop_order_is_a_permutation_of_the_admissible_in_tier_order(
            pool in prop::collection::vec(any_route(), 0..12),
            (m, c, amount) in any_request(),
            random in any::<u64>(),
        ) {
            let request = RouteRequest { method: METHODS[m], currency: CURRENCIES[c], amount_minor: amount };
            let cands: Vec<Candidate<'_>> = pool.iter().map(|(route, live)| Candidate { route, live: *live }).collect();
            let order = rank(&cands, &request, random);

            let mut sorted = order.clone();
            sorted.sort_unstable();
            let admissible: Vec<usize> = (0..cands.len()).filter(|&i| cands[i].is_admissible(&request)).collect();
            prop_assert_eq!(sorted, admissible);
            for pair in order.windows(2) {
                let (a, b) = (&cands[pair[0]], &cands[pair[1]]);
                prop_assert!(a.route.priority <= b.route.priority);
                if a.route.priority == b.route.priority && a.effective_weight() == 0 {
                    prop_assert_eq!(b.effective_weight(), 0, "a weighted candidate after a zero one");
                }
            }
            prop_assert_eq!(rank(&cands, &request, random), order);
        }
    }

    proptest! {
        // Fixed seeds: the generated tiers and the 10 000 draw seeds are the same on every
        // run, so this statistical test either always passes or always fails.
        #![proptest_config(Config { cases: 40, rng_seed: RngSeed::Fixed(0x5EED), failure_persistence: None, ..Config::default() })]
        #[test]
        fn prop_first_pick_frequency_follows_effective_weights(
            tier in prop::collection::vec((0u32..20, 0u32..=100, 0u32..500, 0u32..4), 1..7),
        ) {
            let routes: Vec<ChannelRoute> = tier
                .iter()
                .enumerate()
                .map(|(i, &(weight, _, _, fee))| route(&format!("c{i}"), 1, weight, fee))
                .collect();
            let cands: Vec<Candidate<'_>> = routes
                .iter()
                .zip(&tier)
                .map(|(route, &(_, success, latency, _))| Candidate {
                    route,
                    live: LiveStats { admits: true, success_rate_percent: success, latency_ms: latency },
                })
                .collect();
            let weights: Vec<u64> = cands.iter().map(Candidate::effective_weight).collect();
            let fees: Vec<u32> = routes.iter().map(|r| r.fee_bps).collect();
            let expected = expected_first_shares(&weights, &fees);

            const SEEDS: u64 = 10_000;
            let mut firsts = vec![0u64; cands.len()];
            for seed in 0..SEEDS {
                firsts[rank(&cands, &REQUEST, seed)[0]] += 1;
            }
            for (i, &count) in firsts.iter().enumerate() {
                let observed = count as f64 / SEEDS as f64;
                // One standard deviation is at most 0.005 at 10 000 draws: 0.03 is 6σ.
                prop_assert!(
                    (observed - expected[i]).abs() <= 0.03,
                    "candidate {} picked first {:.3}, expected {:.3} (weights {:?})",
                    i, observed, expected[i], weights
                );
            }
        }
    }
}
