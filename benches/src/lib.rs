//! Criterion micro-benchmarks of the gateway's hot paths (see `benches/`). The library part
//! is empty: the benches live in `benches/benches/*.rs` and are run by `scripts/bench.sh` or
//! `cargo bench -p benches`.
