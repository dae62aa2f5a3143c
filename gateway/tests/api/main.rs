//! The gateway's integration tests: one binary, so the crate links once. Each test starts what
//! it needs (a real redis-server on a random port, the gateway on port 0) and tears it down.
//! `TEST_LOG=1` turns the gateway's logs on.

mod admin_channels;
mod arbiter;
mod binary;
mod callbacks;
mod channels;
mod conformance;
mod crash;
mod helpers;
mod http;
mod http_server;
mod outage;
#[path = "harness/postgres_server.rs"]
mod postgres_server;
mod postgres_store;
#[path = "harness/redis_server.rs"]
mod redis_server;
mod redis_state;
mod refunds;
mod request_bodies;
mod routing;
mod sandbox_binary;
mod sandbox_channels;
mod settlement;
mod settlement_conformance;
mod sim_channels;
mod structure;
mod transfers_migration;
mod webhooks;
