//! The payment gateway library: everything `main.rs` runs, and everything the integration
//! tests and benchmarks drive directly. See DESIGN.md §2 for the module map.
#![forbid(unsafe_code)]

pub mod api;
pub mod channels;
pub mod cli;
pub mod config;
pub mod ids;
pub mod mode;
pub mod money;
pub mod payments;
pub mod pending_docs;
pub mod periodic;
pub mod preauth;
pub mod routing;
pub mod sandbox;
pub mod secret;
pub mod settlement;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod time;
pub mod webhooks;
