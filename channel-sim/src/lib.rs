//! `channel-sim`: the sandbox payment channels (DESIGN.md §5, §10). Servers that speak the
//! Alipay (RSA2), WeChat Pay API v3 and HMAC-JSON supplier protocols as strictly as the real
//! services — request signatures, reply signatures, expiry, close, idempotent refunds,
//! signed callbacks retried until acknowledged — with a record of everything done and
//! fault injection (latency, errors, hangs, outages, declines, callback faults).
//!
//! It does not depend on the gateway: its crypto ([`crypto`]) is an independent
//! implementation, so the two cross-check each other.
//!
//! - [`config`]: what runs ([`SimConfig`], [`ChannelSpec`], [`Faults`]).
//! - [`server`]: [`Sim::start`] and the [`SimHandle`]; the admin API.
//! - `alipay`, `wechatpay`, `supplier`: one module per protocol.
//! - [`record`]: what each channel did, for tests and the admin API.
//! - [`manifest`]: the sandbox manifest (`sandbox.json`) → [`SimConfig`].
//! - `persist`: the orders kept across a restart (`SimConfig::orders_file`).

#![forbid(unsafe_code)]

mod alipay;
mod channel;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod manifest;
mod persist;
pub mod record;
mod rng;
pub mod server;
mod supplier;
mod wechatpay;

pub use channel::PayOutcome;
pub use config::{CallbackPolicy, ChannelIds, ChannelKind, ChannelSpec, Faults, Secret, SimConfig};
pub use record::{CallbackRecord, CloseReason, OrderRecord, OrderStatus, RefundRecord};
pub use server::{Sim, SimHandle};

/// Why the simulator could not start (or a run-time change was refused).
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("manifest: {0}")]
    Manifest(String),
}
