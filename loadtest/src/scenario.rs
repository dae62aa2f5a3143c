//! Scenarios: which operation each request of a run is. A scenario is a weighted mix of
//! operations, chosen per request from its sequence number alone (a fixed hash), so a run is
//! reproducible and the dispatcher decides nothing at run time.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// One kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// A balance payment: hold and capture at once, answered after its settlement commit.
    Authorize,
    /// A supplier charge on an account: hold, channel order; channel-sim pays it and calls
    /// back, and the gateway captures and settles.
    Checkout,
    /// A top-up of an account through Alipay: credited when channel-sim's callback comes.
    Topup,
}

impl Operation {
    pub const ALL: [Operation; 3] = [Operation::Authorize, Operation::Checkout, Operation::Topup];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Authorize => "authorize",
            Operation::Checkout => "checkout",
            Operation::Topup => "topup",
        }
    }

    /// Whether the operation creates a channel payment that settles later (on a callback).
    pub fn settles_later(self) -> bool {
        match self {
            Operation::Authorize => false,
            Operation::Checkout | Operation::Topup => true,
        }
    }

    /// Whether it spends an account's money (so the account must be funded first).
    pub fn spends_balance(self) -> bool {
        match self {
            Operation::Authorize | Operation::Checkout => true,
            Operation::Topup => false,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Authorize,
    Checkout,
    Topup,
    /// [`MIXED_WEIGHTS`]: mostly balance payments, a quarter checkouts, a few top-ups.
    Mixed,
    /// Checkouts, with the primary supplier channel taken down mid-run and brought back
    /// ([`crate::failover`]): each request is a [`Operation::Checkout`].
    Failover,
}

/// The mixed scenario, in percent: 70 % authorize, 25 % checkout, 5 % top-up.
pub const MIXED_WEIGHTS: [(Operation, u64); 3] = [
    (Operation::Authorize, 70),
    (Operation::Checkout, 25),
    (Operation::Topup, 5),
];

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::Authorize,
        Scenario::Checkout,
        Scenario::Topup,
        Scenario::Mixed,
        Scenario::Failover,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Authorize => "authorize",
            Scenario::Checkout => "checkout",
            Scenario::Topup => "topup",
            Scenario::Mixed => "mixed",
            Scenario::Failover => "failover",
        }
    }

    /// The operation of request `seq`.
    pub fn operation(self, seq: u64) -> Operation {
        match self {
            Scenario::Authorize => Operation::Authorize,
            Scenario::Checkout | Scenario::Failover => Operation::Checkout,
            Scenario::Topup => Operation::Topup,
            Scenario::Mixed => {
                let total: u64 = MIXED_WEIGHTS.iter().map(|(_, w)| w).sum();
                let mut point = splitmix64(seq) % total;
                for (operation, weight) in MIXED_WEIGHTS {
                    if point < weight {
                        return operation;
                    }
                    point -= weight;
                }
                unreachable!("the point is below the total weight")
            }
        }
    }

    /// The share of requests (0..=1) that are `operation`.
    pub fn share(self, operation: Operation) -> f64 {
        match self {
            Scenario::Mixed => {
                let total: u64 = MIXED_WEIGHTS.iter().map(|(_, w)| w).sum();
                let weight = MIXED_WEIGHTS
                    .iter()
                    .find(|(op, _)| *op == operation)
                    .map_or(0, |(_, w)| *w);
                weight as f64 / total as f64
            }
            single => f64::from(u8::from(single.operation(0) == operation)),
        }
    }

    /// Whether some of its payments settle on a callback (checkout, topup, mixed).
    pub fn settles_later(self) -> bool {
        Operation::ALL
            .iter()
            .any(|op| op.settles_later() && self.share(*op) > 0.0)
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|scenario| scenario.as_str() == s)
            .ok_or_else(|| {
                format!("unknown scenario {s:?}: authorize, checkout, topup, mixed or failover")
            })
    }
}

/// SplitMix64: a fixed, well-mixed hash of the sequence number.
fn splitmix64(seq: u64) -> u64 {
    let mut z = seq.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_scenarios_send_one_operation() {
        for seq in [0, 1, 99, u64::MAX] {
            assert_eq!(Scenario::Authorize.operation(seq), Operation::Authorize);
            assert_eq!(Scenario::Checkout.operation(seq), Operation::Checkout);
            assert_eq!(Scenario::Topup.operation(seq), Operation::Topup);
        }
        assert_eq!(Scenario::Checkout.share(Operation::Checkout), 1.0);
        assert_eq!(Scenario::Checkout.share(Operation::Authorize), 0.0);
        assert!(!Scenario::Authorize.settles_later());
        assert!(Scenario::Checkout.settles_later());
        assert!(Scenario::Mixed.settles_later());
        assert_eq!(Scenario::Failover.operation(7), Operation::Checkout);
        assert_eq!(Scenario::Failover.share(Operation::Checkout), 1.0);
        assert!(Scenario::Failover.settles_later());
    }

    #[test]
    fn the_mix_follows_its_weights_and_is_reproducible() {
        let mut counts = std::collections::BTreeMap::new();
        for seq in 0..100_000 {
            *counts.entry(Scenario::Mixed.operation(seq)).or_insert(0u64) += 1;
        }
        let share = |op| counts[&op] as f64 / 100_000.0;
        assert!(
            (share(Operation::Authorize) - 0.70).abs() < 0.01,
            "{counts:?}"
        );
        assert!(
            (share(Operation::Checkout) - 0.25).abs() < 0.01,
            "{counts:?}"
        );
        assert!((share(Operation::Topup) - 0.05).abs() < 0.01, "{counts:?}");
        assert_eq!(
            Scenario::Mixed.operation(12_345),
            Scenario::Mixed.operation(12_345)
        );
        assert!((Scenario::Mixed.share(Operation::Checkout) - 0.25).abs() < 1e-9);
    }

    #[test]
    fn scenarios_parse_by_name() {
        for scenario in Scenario::ALL {
            assert_eq!(scenario.as_str().parse::<Scenario>(), Ok(scenario));
        }
        assert!("outage".parse::<Scenario>().is_err());
    }
}
