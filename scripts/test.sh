#!/usr/bin/env bash
# Runs every check and test of the workspace (debug profile): `cargo fmt --check`, clippy with
# warnings as errors, the doctests and the whole test suite. Installs what the tests need
# where it is missing: redis-server and PostgreSQL (apt-get, as root; otherwise it says what
# to install), and cargo-nextest (`cargo install`; if that fails, plain `cargo test` runs the
# suite). Each step says what it does before it starts: the first build takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '==> scripts/test.sh: %s\n' "$*"; }

need=()
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "scripts/test.sh: please install: ${need[*]} (e.g. sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
# The Debian package starts a system Redis on 6379; the tests start their own on random ports
# and never use it.

runner=nextest
if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest (cargo install --locked, once; a few minutes)"
  if ! cargo install cargo-nextest --locked; then
    echo "scripts/test.sh: cargo-nextest could not be installed; running the suite with cargo test" >&2
    runner=cargo
  fi
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings (the first run builds every crate)"
cargo clippy --workspace --all-targets -- -D warnings

step "building the workspace and its tests (the first build takes several minutes)"
cargo build --workspace --all-targets

if [ "$runner" = nextest ]; then
  # nextest does not run doctests: run them first, so the suite's summary is the last line.
  step "doctests"
  cargo test --workspace --doc
  step "the test suite (cargo nextest)"
  cargo nextest run --workspace --no-fail-fast "$@"
else
  step "the test suite (cargo test)"
  cargo test --workspace --no-fail-fast "$@"
fi
