#!/usr/bin/env bash
# Instructions per balance payment, by function, counted by valgrind's callgrind: a figure that
# does not drift with the machine (CPU µs per payment on this kind of VM moves 10–30 % from one
# minute to the next, so a change worth 5 % never shows in `bench.sh`; its instruction count
# does).
#
#   scripts/instructions.sh [--duration-s S] [--out DIR]
#
# Starts, on random loopback ports in a temp dir: redis-server (AOF off) and the sandbox
# gateway (release build) under callgrind on its SQLite store with that Redis. Funds 64
# accounts, warms up for 10 s with `wrk -t1 -c8` sending balance payments
# (`scripts/closed-loop.lua`), zeroes the counts, runs the same load for S seconds (default 20)
# and dumps. The gateway runs some 50 times slower under callgrind, so its background loops
# (which tick on wall-clock time) are reported per second and left out of the per-payment
# figure. Valgrind's CPU has no SHA extensions: SHA-256 is counted in its portable form, about
# five times what the hardware path costs. Installs valgrind and wrk with apt-get when missing.
# GATEWAY_BIN=PATH counts that gateway binary instead of the one just built (two builds
# compared on the same load).
# Writes DIR/instructions.md (default target/bench) and prints it; the counts themselves stay
# in DIR/callgrind.out (covering the measured load only).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SCRIPT=instructions.sh
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
DURATION_S=20
OUT=target/bench
while [ $# -gt 0 ]; do
  case "$1" in
    --duration-s) DURATION_S=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) echo "$SCRIPT: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

ACCOUNTS=64
CONNECTIONS=8
WARMUP_S=10
# Functions whose inclusive counts the report lists (per payment), in this order.
FUNCTIONS=(
  'gateway::api::server::serve::{{closure}}::{{closure}}'
  'gateway::payments::create::create::{{closure}}'
  'gateway::payments::create::authorize_request'
  '<gateway::preauth::redis::RedisStore as gateway::preauth::BalanceStore>::authorize::{{closure}}'
  'gateway::api::payments::rendered'
  'gateway::settlement::sqlite::money::settle_in'
  'gateway::settlement::sqlite::payments::write_payment'
  'gateway::settlement::sqlite::keys::arbitrate'
  'gateway::settlement::Settlement::content_hash'
  'gateway::webhooks::Delivery::announced'
  'alloc::fmt::format::format_inner'
  '__memcpy_avx_unaligned_erms'
)

need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v curl >/dev/null 2>&1 || need+=(curl)
install_missing "${need[@]}"

TMP=$(mktemp -d /tmp/instructions.XXXXXX)
PIDS=()
trap stop_started EXIT
trap 'exit 130' INT TERM

echo "$SCRIPT: cargo build --release -p gateway"
cargo build --release -p gateway
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

rport=$(free_port)
mkdir -p "$TMP/redis" "$TMP/gw"
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
  --maxmemory-policy noeviction "${REDIS_TUNING[@]}" --dir "$TMP/redis" \
  >"$OUT/instructions-redis.log" 2>&1 &
PIDS+=("$!")
wait_for 10 redis-server redis-cli -p "$rport" ping

gport=$(free_port)
GW_URL=http://127.0.0.1:$gport
env GATEWAY__REDIS__URL="redis://127.0.0.1:$rport" GATEWAY__TELEMETRY__LOG_FILTER=warn \
    GATEWAY__SANDBOX__AUTO_PAY=false \
    valgrind --tool=callgrind --callgrind-out-file="$TMP/callgrind.out" \
    "${GATEWAY_BIN:-$BIN/gateway}" serve --sandbox --data-dir "$TMP/gw" --listen "127.0.0.1:$gport" \
    >"$OUT/instructions-gateway.log" 2>&1 &
GW_PID=$!; PIDS+=("$GW_PID")
wait_for 300 "the gateway under callgrind" curl -sf -o /dev/null "$GW_URL/readyz"

echo "$SCRIPT: funding $ACCOUNTS accounts"
fund_accounts "$GW_URL" "$ACCOUNTS" "1000.00" fund-ins- "instructions bench"

echo "$SCRIPT: warming up for $WARMUP_S s"
RUN=warm ACCOUNTS=$ACCOUNTS wrk -t1 -c"$CONNECTIONS" -d"${WARMUP_S}s" -s scripts/closed-loop.lua \
  "$GW_URL/v1/payments" >/dev/null
callgrind_control -z "$GW_PID" >/dev/null
echo "$SCRIPT: counting for $DURATION_S s"
report=$(RUN=count ACCOUNTS=$ACCOUNTS wrk -t1 -c"$CONNECTIONS" -d"${DURATION_S}s" \
  -s scripts/closed-loop.lua "$GW_URL/v1/payments")
callgrind_control -d "$GW_PID" >/dev/null
payments=$(echo "$report" | awk '/requests in/ {print $1; exit}')
non2xx=$(echo "$report" | awk '/Non-2xx/ {print $NF; exit}')
if [ -n "$non2xx" ] && [ "$non2xx" != 0 ]; then
  echo "$SCRIPT: $non2xx answers were not 2xx" >&2
  exit 1
fi
dump=$(ls "$TMP"/callgrind.out.* | head -1)
# Kept for callgrind_annotate (by function, exclusive or inclusive) after the temp dir goes.
cp "$dump" "$OUT/callgrind.out"
callgrind_annotate --inclusive=yes --threshold=100 "$dump" >"$TMP/inclusive.txt" 2>/dev/null

# count NAME: the inclusive count of the first line naming NAME (0 when absent).
count() {
  awk -v name="$1" 'index($0, name) && $1 ~ /^[0-9,]+$/ {gsub(",", "", $1); print $1; found=1; exit}
    END {if (!found) print 0}' "$TMP/inclusive.txt"
}
total=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$TMP/inclusive.txt")
background=$(count 'gateway::periodic::spawn_periodic::{{closure}}')
per() { awk -v n="$1" -v d="$payments" 'BEGIN {printf "%.1fk", n / d / 1000}'; }

{
  echo "Instructions, $(date -u +'%Y-%m-%d %H:%M') UTC, commit \`$(git rev-parse --short HEAD)\`:"
  echo "\`scripts/instructions.sh --duration-s $DURATION_S\` (callgrind; wrk -t1 -c$CONNECTIONS, $ACCOUNTS accounts, SQLite store, Redis AOF off): $payments payments."
  echo
  echo "| what | instructions |"
  echo "| --- | --- |"
  echo "| per payment, everything but the background loops | **$(per $((total - background)))** |"
  echo "| background loops, per second | $(awk -v n="$background" -v s="$DURATION_S" 'BEGIN {printf "%.1fM", n / s / 1e6}') |"
  for f in "${FUNCTIONS[@]}"; do
    echo "| \`$f\`, per payment (inclusive) | $(per "$(count "$f")") |"
  done
} | tee "$OUT/instructions.md"
