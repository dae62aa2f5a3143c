#!/usr/bin/env bash
# The closed-loop bench of issue 14: how much CPU each process spends per balance payment at
# saturation, beside an nginx reverse proxy measured the same way.
#
#   scripts/closed-loop.sh [--runs N] [--duration-s S] [--out DIR]
#
# Starts, on random loopback ports in a temp dir: redis-server (AOF off, no snapshots), the
# sandbox gateway (release build) on its SQLite store with that Redis as its balance store, and
# nginx-light as a reverse proxy in front of channel-sim's admin API (the sandbox's in-process
# simulator). Funds 64 accounts, then `wrk -t1 -c32 -d S` sends balance payments of 0.01 over
# them (unique Idempotency-Keys and order ids, `scripts/closed-loop.lua`), N times; then the
# same wrk against nginx (GET /channels through the proxy). Each run reads utime + stime of
# every process from /proc/<pid>/stat before and after: CPU µs per payment (or per proxied
# request) = CPU time / requests answered. Every payment must be answered 201: a run with a
# non-2xx answer fails. Each run also counts what the store wrote per payment: rows and B-tree
# entries (tables and indexes, from SQLite's dbstat: leaf cells of rowid tables, every cell of
# indexes and WITHOUT ROWID tables) and WAL bytes (the gateway's gateway_sqlite_wal_bytes_total).
# The last rows are the medians of the runs. What Redis ran per payment, by command (INFO
# commandstats, reset before each run), goes to DIR/closed-loop-redis-commands-N.txt.
# Installs wrk, nginx-light and sqlite3 with apt-get when missing (root).
# Writes DIR/closed-loop.md (default target/bench) and prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SCRIPT=closed-loop.sh
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"
RUNS=3
DURATION_S=10
OUT=target/bench
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS=$2; shift ;;
    --duration-s) DURATION_S=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) echo "scripts/closed-loop.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# The load: fixed, so every figure of a run comes from these.
ACCOUNTS=64
CONNECTIONS=32
FUNDING=1000.00

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
[ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v jq >/dev/null 2>&1 || need+=(jq)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
install_missing "${need[@]}"

TMP=$(mktemp -d /tmp/closed-loop.XXXXXX)
PIDS=()
trap stop_started EXIT
trap 'exit 130' INT TERM

# cpu_ticks PID...: the sum of utime + stime (clock ticks) of the processes.
cpu_ticks() {
  local total=0 pid
  for pid in "$@"; do
    # Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
    total=$((total + $(sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')))
  done
  echo "$total"
}
TICK=$(getconf CLK_TCK)

echo "closed-loop.sh: cargo build --release -p gateway"
cargo build --release -p gateway
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

# ---- the stack ------------------------------------------------------------------------------
rport=$(free_port)
mkdir -p "$TMP/redis" "$TMP/gw"
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
  --maxmemory-policy noeviction "${REDIS_TUNING[@]}" --dir "$TMP/redis" \
  >"$OUT/closed-loop-redis.log" 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID")
wait_for 10 redis-server redis-cli -p "$rport" ping

gport=$(free_port)
GW_URL=http://127.0.0.1:$gport
env GATEWAY__REDIS__URL="redis://127.0.0.1:$rport" GATEWAY__TELEMETRY__LOG_FILTER=warn \
    GATEWAY__SANDBOX__AUTO_PAY=false \
    "$BIN/gateway" serve --sandbox --data-dir "$TMP/gw" --listen "127.0.0.1:$gport" \
    >"$OUT/closed-loop-gateway.log" 2>&1 &
GW_PID=$!; PIDS+=("$GW_PID")
wait_for 60 "the gateway" curl -sf -o /dev/null "$GW_URL/readyz"
SIM_ADMIN=$(jq -r .sim_admin_url "$TMP/gw/sandbox.json")

# nginx in front of channel-sim's admin API.
nport=$(free_port)
nginx_conf "$TMP/nginx" "$nport" "${SIM_ADMIN#http://}" \
  'proxy_pass http://sim; proxy_http_version 1.1; proxy_set_header Connection "";'
/usr/sbin/nginx -c "$TMP/nginx/nginx.conf" -g 'daemon off;' >"$OUT/closed-loop-nginx.log" 2>&1 &
NGINX_PID=$!; PIDS+=("$NGINX_PID")
wait_for 10 nginx curl -sf -o /dev/null "http://127.0.0.1:$nport/channels"
NGINX_WORKERS=$(pgrep -P "$NGINX_PID" | tr '\n' ' ')

# ---- the accounts ---------------------------------------------------------------------------
echo "closed-loop.sh: funding $ACCOUNTS accounts with $FUNDING each"
fund_accounts "$GW_URL" "$ACCOUNTS" "$FUNDING" fund-cl- "closed-loop bench"

# ---- what the store writes ------------------------------------------------------------------
DB=$TMP/gw/gateway.sqlite3
# btree_counts: "rows entries" over every table and index of the store (not sqlite_schema).
btree_counts() {
  sqlite3 -readonly "$DB" "
    SELECT COALESCE(SUM(CASE WHEN m.type = 'table' THEN n ELSE 0 END), 0), COALESCE(SUM(n), 0)
    FROM (SELECT d.name AS name, SUM(CASE
            WHEN t.type = 'table' AND COALESCE(t.sql, '') NOT LIKE '%WITHOUT ROWID%'
              THEN CASE WHEN d.pagetype = 'leaf' THEN d.ncell ELSE 0 END
            ELSE d.ncell END) AS n
          FROM dbstat d JOIN sqlite_master t ON t.name = d.name GROUP BY d.name) c
    JOIN sqlite_master m ON m.name = c.name;" | tr '|' ' '
}
wal_bytes() {
  local metrics
  metrics=$(curl -sS --retry 3 --retry-all-errors "$GW_URL/metrics") \
    || { echo "closed-loop.sh: cannot read the gateway's metrics" >&2; return 1; }
  awk '/^gateway_sqlite_wal_bytes_total/ {print $2; found=1; exit} END {if (!found) print 0}' \
    <<<"$metrics"
}

# ---- the runs -------------------------------------------------------------------------------
# run_wrk NAME URL SCRIPT PIDS...: one wrk run; prints "requests non2xx cpu_us_per_request..."
run_wrk() {
  local name=$1 url=$2 script=$3; shift 3
  local before after report requests non2xx
  before=()
  for pid in "$@"; do before+=("$(cpu_ticks "$pid")"); done
  report=$(RUN="$name" ACCOUNTS=$ACCOUNTS wrk -t1 -c"$CONNECTIONS" -d"${DURATION_S}s" \
    ${script:+-s "$script"} "$url")
  echo "$report" >"$OUT/closed-loop-$name.txt"
  requests=$(echo "$report" | awk '/requests in/ {print $1; exit}')
  non2xx=$(echo "$report" | awk '/Non-2xx/ {print $NF; exit}')
  local out="$requests ${non2xx:-0}" i=0
  for pid in "$@"; do
    after=$(cpu_ticks "$pid")
    out+=" $(( (after - before[i]) * 1000000 / TICK / requests ))"
    i=$((i + 1))
  done
  echo "$out"
}

ROWS=()
M_RATE=(); M_GW=(); M_RD=(); M_ROWS=(); M_ENTRIES=(); M_WAL=()
for r in $(seq "$RUNS"); do
  read -r rows0 entries0 <<<"$(btree_counts)"
  wal0=$(wal_bytes)
  redis-cli -p "$rport" config resetstat >/dev/null
  read -r req bad gw rd <<<"$(run_wrk "pay-$r" "$GW_URL/v1/payments" scripts/closed-loop.lua "$GW_PID" "$REDIS_PID")"
  # What Redis ran per payment, by command (the commands inside scripts count under their own
  # names, and again inside evalsha's time): calls and µs per payment, from INFO commandstats.
  redis-cli -p "$rport" info commandstats | tr -d '\r' | awk -F'[:,=]' -v n="$req" '
    /^cmdstat_/ { sub(/^cmdstat_/, "", $1)
                  printf "%-12s %6.2f calls %7.2f us per payment\n", $1, $3 / n, $5 / n }' \
    | sort -k4 -nr >"$OUT/closed-loop-redis-commands-$r.txt"
  if [ "$bad" != 0 ]; then
    echo "closed-loop.sh: run $r: $bad answers were not 2xx (see $OUT/closed-loop-pay-$r.txt)" >&2
    exit 1
  fi
  # Answered 201 = committed (durable before answered): the store holds every payment now.
  read -r rows1 entries1 <<<"$(btree_counts)"
  wal1=$(wal_bytes)
  per() { awk -v d="$1" -v n="$req" 'BEGIN {printf "%.2f", d / n}'; }
  prow=$(per $((rows1 - rows0))); pent=$(per $((entries1 - entries0)))
  pwal=$(awk -v d="$(( ${wal1%.*} - ${wal0%.*} ))" -v n="$req" 'BEGIN {printf "%.1f", d / n / 1024}')
  ROWS+=("| balance payments, run $r | $((req / DURATION_S))/s | gateway $gw µs, Redis $rd µs | $prow | $pent | $pwal KiB |")
  M_RATE+=($((req / DURATION_S))); M_GW+=("$gw"); M_RD+=("$rd")
  M_ROWS+=("$prow"); M_ENTRIES+=("$pent"); M_WAL+=("$pwal")
  echo "run $r: $req payments, gateway $gw µs, Redis $rd µs per payment; store: $prow rows, $pent B-tree entries, $pwal KiB WAL per payment"
done
ROWS+=("| **balance payments, median of $RUNS** | $(median "${M_RATE[@]}")/s | gateway $(median "${M_GW[@]}") µs, Redis $(median "${M_RD[@]}") µs | $(median "${M_ROWS[@]}") | $(median "${M_ENTRIES[@]}") | $(median "${M_WAL[@]}") KiB |")
# shellcheck disable=SC2086
read -r req bad ng sim <<<"$(run_wrk nginx "http://127.0.0.1:$nport/channels" "" $NGINX_WORKERS "$GW_PID")"
ROWS+=("| nginx → channel-sim (GET /channels) | $((req / DURATION_S))/s | nginx $ng µs (the simulator in the gateway's process: $sim µs) | — | — | — |")

{
  echo "Closed loop, $(date -u +'%Y-%m-%d %H:%M') UTC, commit \`$(git rev-parse --short HEAD)\`:"
  echo "\`scripts/closed-loop.sh --runs $RUNS --duration-s $DURATION_S\` (wrk -t1 -c$CONNECTIONS, $ACCOUNTS accounts, SQLite store, Redis AOF off)."
  echo
  echo "| load | rate | CPU per request, by process | store rows / payment | B-tree entries / payment | SQLite WAL / payment |"
  echo "| --- | --- | --- | --- | --- | --- |"
  printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/closed-loop.md"
