#!/usr/bin/env bash
# Runs every test of the workspace (debug profile). Installs what the tests need where it is
# missing: redis-server and PostgreSQL (apt-get, as root; otherwise it says what to install),
# and cargo-nextest if cargo can fetch it (else plain `cargo test`).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing ${need[*]}"
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

if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doctests: run them first, so the suite's summary is the last line.
  cargo test --workspace --doc -q
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
