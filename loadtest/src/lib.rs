//! `loadtest`: the open-loop load generator of DESIGN.md §1 and issue 6.
//!
//! It drives a target (the gateway in its sandbox, or the same-run baseline proxy of
//! [`baseline`]) at a **fixed arrival rate**: request `i` has an intended send time
//! `start + i / rate`, whatever happened to the requests before it. Latency is measured from
//! that intended time (*corrected*: what a client arriving on schedule would see) and from
//! the actual send (*uncorrected*), into HDR histograms. A request that could not be sent
//! within a bound of its intended time is counted as a *missed send* rather than silently
//! delayed, so coordinated omission is visible instead of hidden.
//!
//! One module per concern:
//! - [`manifest`]: the sandbox manifest (DESIGN.md §10) and the loopback-only rule;
//! - [`schedule`]: intended times, the dispatcher and its missed-send accounting;
//! - [`histogram`]: latency histograms and their percentiles;
//! - [`client`]: the keep-alive HTTP client with its request timeout;
//! - [`scenario`]: scenarios as weighted mixes of operations;
//! - [`target`]: what a request looks like for a target, and what its answer means;
//! - [`recorder`]: per-request outcomes into counts, histograms and per-second series;
//! - [`settle`]: which channel payments settled, when, and whether the gateway agrees with
//!   channel-sim's record;
//! - [`procstat`]: CPU time and resident memory of processes from `/proc`;
//! - [`resources`]: what the target spent besides CPU over the window: the gateway's counters
//!   of Redis round trips and store commits ([`prom`]: its Prometheus text, parsed), Redis's
//!   own command counts ([`redis_info`]: `INFO commandstats`), RSS and queue depths once a
//!   second;
//! - [`runner`]: one run, start to report; [`mod@find_max`]: the rate search;
//! - [`failover`]: the outage of the `failover` scenario and its report;
//! - [`baseline`]: the same-run baseline, a bare pass-through proxy to channel-sim, and
//!   [`signing`]: the supplier signature it adds; [`mod@compare`]: gateway and baseline in
//!   turns, as ratios;
//! - [`report`]: the JSON report and the human summary; [`plot`]: the SVG plot.

#![forbid(unsafe_code)]

pub mod baseline;
pub mod client;
pub mod compare;
pub mod error;
pub mod failover;
pub mod find_max;
pub mod histogram;
pub mod manifest;
pub mod plot;
pub mod procstat;
pub mod prom;
pub mod recorder;
pub mod redis_info;
pub mod report;
pub mod resources;
pub mod runner;
pub mod scenario;
pub mod schedule;
pub mod settle;
pub mod signing;
pub mod target;

pub use baseline::{BaselineProxy, BaselineSettings};
pub use compare::{compare, CompareReport, CompareSettings};
pub use error::Error;
pub use failover::FailoverPlan;
pub use find_max::{find_max, FindMaxReport, FindMaxSettings};
pub use manifest::Manifest;
pub use report::Report;
pub use runner::{run, RunSettings};
pub use scenario::{Operation, Scenario};
pub use target::{CheckoutMethod, Target};
