#!/usr/bin/env bash
# The load-test bench of issue 6: builds release, starts Redis, PostgreSQL, the sandbox gateway,
# an external channel-sim and the same-run baseline proxy (each a process of its own, on random
# loopback ports, in temp dirs), runs `loadtest compare` (checkout, authorize), resources runs
# (authorize and checkout at 80 % of the gateway's median max: Redis round trips, store commits
# and PostgreSQL WAL fsyncs per payment, settlement lag, queue depth), an RSS run (authorize
# at 50 % of the max, long), a half-max latency run (authorize at 50 % of the max, then the
# baseline proxy at the same rate; the mean group-commit time and an fdatasync probe beside
# them), a failover run and checkouts through each channel kind (supplier, WeChat Pay,
# Alipay: CPU per settled payment at one rate) on each store backend, then (full mode) the
# criterion benches, and prints / writes a summary (markdown) and the generated section of
# docs/PERFORMANCE.md. Every loadtest command gets the stack's --pid list and --redis-addr.
#
#   scripts/bench.sh [--quick] [--out DIR] [--no-doc]
#   scripts/bench.sh --serve postgres|sqlite [--out DIR]
#   scripts/bench.sh --closed-loop [--runs N] [--duration-s S] [--out DIR]
#   scripts/bench.sh --budgets [--runs N] [--out DIR]
#   scripts/bench.sh --floors [--runs N] [--out DIR]
#
# --quick  one round, short steps (factor 1.5), 10 s resources and half-max runs, a 60 s RSS
#          run, no criterion benches (target: <= 7 minutes after the build). Full mode: 3 rounds,
#          longer steps, 60 s resources runs, a 300 s RSS run (PostgreSQL only), both
#          scenarios on both backends, then `cargo bench -p benches` (target: ~30 min; the
#          arithmetic is at the settings below).
# --out    where the JSON reports, SVG plots, logs and the summary go (default target/bench).
# --no-doc do not rewrite the generated section of docs/PERFORMANCE.md.
# --closed-loop  the closed-loop bench of issue 14 (`scripts/closed-loop.sh`: wrk against the
#          sandbox on SQLite with Redis, CPU µs per payment by process, beside nginx).
# --budgets  issue 14's CPU budgets at fixed rates, each N times (default 3; medians): on the
#          SQLite and the PostgreSQL stack, `authorize` at 1000/s and `checkout` (supplier) at
#          500/s for 10 s; CPU µs per payment of the gateway, PostgreSQL (all its processes)
#          and Redis, and the group commit's efficiency (payments per commit against arrival
#          rate x mean commit time). Writes DIR/budgets.md.
# --floors  the least work under those budgets on this machine, each N times (default 3):
#          `store_floor` (benches/src/bin) on SQLite and on the stack's PostgreSQL at 1000/s and
#          at saturation, and SQLite's checkouts at 500/s; nginx in front of channel-sim's
#          `GET /channels` at 1000/s (one HTTP exchange in, one upstream round trip: CPU of nginx
#          and of channel-sim per request);
#          a five-command Lua script in a Redis of its own at saturation (redis-benchmark -c 32).
#          Writes DIR/floors.md.
# --serve  start one stack (release build), write its pids, URLs, Redis address, PostgreSQL
#          port and manifest path to DIR/stack.env and keep it up until interrupted: for
#          profiling (perf record -p $GW_PID) and hand-run loadtest commands against the same
#          processes the bench uses.
#
# GATEWAY_BIN=PATH runs that gateway binary instead of the one just built (A/B runs of two
# builds on the same harness; a build with frame pointers for `perf record -g`).
#
# Every process and temp dir it started is removed on exit (trap). Ctrl-C in a terminal reaches
# the running loadtest too; a SIGTERM sent to this script alone takes effect when the running
# loadtest command ends (bash runs traps between commands).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SCRIPT=bench.sh
# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

QUICK=0
OUT=target/bench
WRITE_DOC=1
SERVE=
BUDGETS=0
BUDGET_RUNS=3
FLOORS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT=$2; shift ;;
    --no-doc) WRITE_DOC=0 ;;
    --serve) SERVE=$2; shift ;;
    --budgets) BUDGETS=1 ;;
    --floors) FLOORS=1 ;;
    --runs) BUDGET_RUNS=$2; shift ;;
    --closed-loop) shift; exec "$ROOT/scripts/closed-loop.sh" "$@" ;;
    -h|--help) print_help "$0"; exit 0 ;;
    *) echo "scripts/bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)

# ---- settings (fixed: every figure of a mode comes from these) -----------------------------
# Time budget. A find-max step costs set-up (~0.3 s) + warm-up + window + settle (checkout,
# ~0.5 s when it keeps up; up to --settle-wait-s when it does not) + pause. On 2 vCPUs the
# quick run's maxima were: baseline ~5000-7500/s (from 1500), gateway authorize ~700-1500/s
# (from 300), checkout ~150-500/s (from 150).
#   quick: measured 155 s for the 4 compares (36 steps of ~3.5 s) and the 2 failover runs;
#          resources add per backend 2 x (~1+10+1 s) + the RSS run ~61 s ~= 85 s, x 2
#          ~= 3 min -> ~5.5 min after the build.
#   full:  factor 1.25: round 1 ~5-9 steps per side, rounds 2-3 start at 0.7 x the best so
#          far and take ~3 each: ~13 steps per side, ~26 per compare, x (0.3+1+5+0.5+0.5)
#          ~= 7.3 s ~= 3.2 min per compare, x 4 ~= 13 min; failover 2 x ~25 s ~= 1 min;
#          resources 2 backends x 2 x ~65 s + one ~305 s RSS run ~= 9.5 min; channel kinds
#          2 backends x 3 x ~12 s ~= 1.2 min; criterion ~4 min -> ~29 min after the build
#          (the run of 396a6d6, with an RSS run on both backends: 33 min). (The former warm-up 2 s, pause 1 s and resume share 0.5 made ~35
#          steps x 8.8 s ~= 5 min per compare: ~40 min in all with the resources runs.)
SLO_MS=50
if [ "$QUICK" = 1 ]; then
  MODE=quick
  COMMON=(--rounds 1 --duration-s 2 --warmup-s 1 --pause-ms 300 --step 1.5 --max-steps 12
          --settle-wait-s 5)
  FAILOVER=(--rate 100 --duration-s 9 --warmup-s 1 --outage-at-s 3 --outage-for-s 3 --settle-wait-s 5)
  RESOURCES=(--duration-s 10 --warmup-s 1 --settle-wait-s 5)
  RSS_RUN=(--duration-s 60 --warmup-s 1)
  HALF_RUN=(--duration-s 10 --warmup-s 1)
  CHANNEL_RUN=(--rate 100 --duration-s 4 --warmup-s 1 --settle-wait-s 5)
else
  MODE=full
  COMMON=(--rounds 3 --duration-s 5 --warmup-s 1 --pause-ms 500 --step 1.25 --max-steps 20
          --resume-share 0.7 --settle-wait-s 10)
  FAILOVER=(--rate 200 --duration-s 15 --warmup-s 2 --outage-at-s 5 --outage-for-s 5 --settle-wait-s 10)
  RESOURCES=(--duration-s 60 --warmup-s 2 --settle-wait-s 10)
  RSS_RUN=(--duration-s 300 --warmup-s 2)
  HALF_RUN=(--duration-s 20 --warmup-s 2)
  # Shorter than channel-sim's Alipay TRADE_FINISHED delay (10 s after TRADE_SUCCESS), so
  # that notice (one more callback per Alipay payment) falls after the window.
  CHANNEL_RUN=(--rate 150 --duration-s 8 --warmup-s 1 --settle-wait-s 10)
fi
# Checkouts by channel kind at one fixed rate (CHANNEL_RUN), to set Alipay's and WeChat Pay's
# RSA-signed callbacks beside supplier's HMAC: the baseline proxies supplier creates only, so
# these have CPU per settled payment, not ratios. Alipay last: its TRADE_FINISHED notices
# come after the stack's last run.
CHANNEL_METHODS=(supplier wechatpay alipay)
# The 300 s RSS run on these backends only (PostgreSQL: the production store), which keeps
# the full run near its 30-minute budget.
RSS_BACKENDS=" postgres "
# Resources runs at this share of the gateway's median max from the compare of the same
# scenario and backend; the RSS run (authorize) at the second share. No max: this rate.
RESOURCES_SHARE=0.8
RSS_SHARE=0.5
# The latency bar: authorize at this share of the gateway's own max, and the baseline proxy at
# the same rate.
HALF_SHARE=0.5
FALLBACK_RATE=100
SCENARIOS=(checkout authorize)
GW_START_checkout=150
GW_START_authorize=300
BASELINE_START=1500

# ---- prerequisites --------------------------------------------------------------------------
need=()
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v jq >/dev/null 2>&1 || need+=(jq)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ "$FLOORS" = 1 ]; then
  [ -x /usr/sbin/nginx ] || need+=(nginx-light)
  command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
fi
install_missing "${need[@]}"
REDIS_SERVER=$(command -v redis-server || echo /usr/bin/redis-server)
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

# ---- cleanup ----------------------------------------------------------------------------------
TMP=$(mktemp -d /tmp/bench.XXXXXX)
chmod 755 "$TMP"
PIDS=()          # processes we started (killed on exit, newest first)
PGDATA_DIRS=()   # PostgreSQL data dirs (stopped with pg_ctl on exit)
as_pg() {        # initdb/pg_ctl refuse root: run them as postgres (or nobody)
  if [ "$(id -u)" = 0 ]; then
    local u=postgres; id -u postgres >/dev/null 2>&1 || u=nobody
    runuser -u "$u" -- "$@"
  else
    "$@"
  fi
}
stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  set +e
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do stop_pid "${PIDS[$i]}"; done
  for d in "${PGDATA_DIRS[@]}"; do as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1; done
  rm -rf "$TMP"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[bench $(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }

# ---- build ------------------------------------------------------------------------------------
log "cargo build --release -p gateway -p channel-sim -p loadtest"
cargo build --release -p gateway -p channel-sim -p loadtest
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
LOADTEST=$BIN/loadtest

# ---- one stack: Redis (+ PostgreSQL) + gateway + channel-sim + baseline proxy -----------------
# Sets REDIS_PID REDIS_ADDR PG_PID PG_PORT GW_PID SIM_PID BASE_PID BASE_URL MANIFEST
start_stack() {
  local backend=$1 dir=$TMP/$1
  mkdir -p "$dir/redis" "$dir/gw"

  local rport; rport=$(free_port)
  "$REDIS_SERVER" --port "$rport" --bind 127.0.0.1 --save '' --appendonly yes \
    --appendfsync everysec --maxmemory-policy noeviction \
    "${REDIS_TUNING[@]}" --dir "$dir/redis" \
    >"$OUT/$backend-redis.log" 2>&1 &
  REDIS_PID=$!; PIDS+=("$REDIS_PID")
  REDIS_ADDR=127.0.0.1:$rport
  wait_for 10 "redis-server" redis-cli -p "$rport" ping

  local store_env=()
  PG_PID=
  PG_PORT=
  if [ "$backend" = postgres ]; then
    local pgdir; pgdir=$(mktemp -d "$TMP/pg.XXXXXX")
    [ "$(id -u)" = 0 ] && chown -R "$(id -u postgres >/dev/null 2>&1 && echo postgres || echo nobody)" "$pgdir"
    as_pg "$PGBIN/initdb" -D "$pgdir/data" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >/dev/null
    local pport; pport=$(free_port)
    as_pg "$PGBIN/pg_ctl" -D "$pgdir/data" -l "$pgdir/postgres.log" -w -t 30 \
      -o "-p $pport -k $pgdir -c listen_addresses=127.0.0.1 -c fsync=on -c synchronous_commit=on" \
      start >/dev/null
    PGDATA_DIRS+=("$pgdir/data")
    PG_PID=$(head -1 "$pgdir/data/postmaster.pid")
    PG_PORT=$pport
    store_env=(GATEWAY__STORE__URL="postgres://postgres@127.0.0.1:$pport/postgres")
  fi

  env GATEWAY__SANDBOX__EXTERNAL_SIM=true \
      GATEWAY__SANDBOX__AUTO_PAY=true GATEWAY__SANDBOX__AUTO_PAY_DELAY_MS=20 \
      GATEWAY__REDIS__URL="redis://127.0.0.1:$rport" \
      GATEWAY__TELEMETRY__LOG_FILTER=warn \
      "${store_env[@]}" \
      "${GATEWAY_BIN:-$BIN/gateway}" serve --sandbox --data-dir "$dir/gw" --listen "127.0.0.1:$(free_port)" \
      >"$OUT/$backend-gateway.log" 2>&1 &
  GW_PID=$!; PIDS+=("$GW_PID")
  MANIFEST=$dir/gw/sandbox.json
  wait_for 60 "the manifest $MANIFEST" test -s "$MANIFEST"
  local gw_url; gw_url=$(jq -r .gateway_url "$MANIFEST")
  wait_for 30 "the gateway at $gw_url" curl -s -o /dev/null "$gw_url/"

  GATEWAY__SANDBOX__AUTO_PAY=true GATEWAY__SANDBOX__AUTO_PAY_DELAY_MS=20 \
    "$BIN/channel-sim" serve --manifest "$MANIFEST" >"$OUT/$backend-channel-sim.log" 2>&1 &
  SIM_PID=$!; PIDS+=("$SIM_PID")
  local sim_url; sim_url=$(jq -r .sim_admin_url "$MANIFEST")
  wait_for 30 "channel-sim at $sim_url" curl -sf -o /dev/null "$sim_url/channels"

  "$LOADTEST" baseline-proxy --manifest "$MANIFEST" >"$dir/proxy.out" 2>"$OUT/$backend-baseline.log" &
  BASE_PID=$!; PIDS+=("$BASE_PID")
  wait_for 30 "baseline-proxy" grep -q listening "$dir/proxy.out"
  BASE_URL=$(awk '{print $4; exit}' "$dir/proxy.out")
  log "$backend stack: redis=$REDIS_PID ($REDIS_ADDR) postgres=${PG_PID:-none} gateway=$GW_PID channel-sim=$SIM_PID baseline=$BASE_PID ($BASE_URL)"
}
stop_stack() {
  for pid in "$BASE_PID" "$SIM_PID" "$GW_PID" "$REDIS_PID"; do stop_pid "$pid"; done
  for d in "${PGDATA_DIRS[@]}"; do as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1 || true; done
  PGDATA_DIRS=()
  PIDS=()
}
# PostgreSQL is one process per connection: besides the postmaster, every child alive when the
# command starts (backends of the gateway's pool, WAL writer, checkpointer…) is measured as
# `pg<PID>`; the summary adds them up as `postgres(all)`. A backend forked during the command
# is not counted (the pool is warm from the second command on; `--budgets` runs an unmeasured
# warm-up first).
pid_args() {
  PIDARGS=(--pid "gateway=$GW_PID" --pid "channel-sim=$SIM_PID" --pid "redis=$REDIS_PID"
           --pid "baseline=$BASE_PID")
  if [ -n "$PG_PID" ]; then
    PIDARGS+=(--pid "postgres=$PG_PID")
    local c
    for c in $(pgrep -P "$PG_PID" || true); do PIDARGS+=(--pid "pg$c=$c"); done
  fi
  return 0
}

# rate_of SCENARIO BACKEND SHARE: SHARE x the gateway's median max of that compare
# (`median_gateway_per_second`), or FALLBACK_RATE when it found none.
rate_of() {
  local max
  max=$(jq -r '.median_gateway_per_second // empty' "$OUT/compare-$1-$2.json" 2>/dev/null || true)
  if [ -z "$max" ]; then
    echo "$FALLBACK_RATE"
  else
    awk -v m="$max" -v s="$3" 'BEGIN { r = m * s; if (r < 1) r = 1; printf "%.1f\n", r }'
  fi
}
# WAL fsyncs PostgreSQL issued since it started (empty: not PostgreSQL, or unreadable).
wal_sync() {
  [ -n "$PG_PORT" ] || return 0
  "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -At -c 'SELECT wal_sync FROM pg_stat_wal' \
    2>/dev/null || true
}
# resources_run BACKEND SCENARIO RATE KIND RUN-OPTIONS…: one `loadtest run` whose report is
# KIND-SCENARIO-BACKEND.json; on PostgreSQL also pg_stat_wal.wal_sync before and after it
# (KIND-SCENARIO-BACKEND.wal: the delta), printed per payment next to the gateway's own
# store commits per payment. The WAL figure covers the whole command (account set-up,
# warm-up, settle wait, background writes): an upper bound of the window's; the gateway's
# counter covers the measured window only.
resources_run() {
  local be=$1 sc=$2 rate=$3 kind=$4; shift 4
  local name=$kind-$sc-$be w0 w1
  pid_args
  w0=$(wal_sync)
  log "$be: $kind run, $sc at $rate/s ($*)"
  COMMANDS+=("loadtest run --scenario $sc --rate $rate $* --redis-addr … --pid … --out $name.json --svg $name.svg   # $be")
  "$LOADTEST" run --scenario "$sc" --rate "$rate" "$@" --manifest "$MANIFEST" \
    --redis-addr "$REDIS_ADDR" "${PIDARGS[@]}" --out "$OUT/$name.json" --svg "$OUT/$name.svg" 2>&1 \
    | tee "$OUT/$name.txt" || log "$be: $kind $sc exited non-zero (see $name.txt)"
  w1=$(wal_sync)
  rm -f "$OUT/$name.wal"
  if [ -n "$w0" ] && [ -n "$w1" ] && [ -s "$OUT/$name.json" ]; then
    echo $((w1 - w0)) >"$OUT/$name.wal"
    jq -r --argjson wal $((w1 - w0)) '
      def payments: if .settlement != null then .settlement.settled
                    else .requests.answered + .warmup.answered end;
      def unit(o): if o == null then null elif .settlement != null then o.per_settled else o.per_request end;
      def n(x): if x == null then "-" else (x * 1000 | round / 1000 | tostring) end;
      "wal_sync per payment \(if payments > 0 then n($wal / payments) else "-" end) (\($wal) fsyncs over the whole command, \(payments) payments)  gateway store commits per payment \(n(unit(.gateway_metrics.store_commits))) (window)"' \
      "$OUT/$name.json" | tee -a "$OUT/$name.txt"
  fi
}

# The gateway's mean group-commit time so far, in µs, from its /metrics (sum / count of
# gateway_settlement_store_call_seconds{op="commit_writes"}), as "SUM COUNT".
commit_sum_count() {
  local gw_url; gw_url=$(jq -r .gateway_url "$MANIFEST")
  curl -sf "$gw_url/metrics" | awk '
    /^gateway_settlement_store_call_seconds_sum\{.*op="commit_writes"/ { s = $2 }
    /^gateway_settlement_store_call_seconds_count\{.*op="commit_writes"/ { c = $2 }
    END { printf "%s %s\n", s + 0, c + 0 }'
}
# Median time of one 4 KiB write + fdatasync(2) in DIR, µs (what one commit's fsync costs on
# this disk; python3 when there, else empty).
fsync_probe() {
  command -v python3 >/dev/null 2>&1 || return 0
  python3 - "$1" <<'PY' 2>/dev/null || true
import os, sys, time, statistics
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
block, times = b"\0" * 4096, []
for i in range(200):
    os.pwrite(fd, block, (i % 64) * 4096)
    t = time.perf_counter_ns()
    os.fdatasync(fd)
    times.append((time.perf_counter_ns() - t) / 1000)
os.close(fd)
os.unlink(path)
print(int(statistics.median(times)))
PY
}
# half_run BACKEND: authorize at HALF_SHARE of the gateway's max, then the baseline proxy at the
# same rate (half-authorize-BACKEND.json, half-baseline-BACKEND.json, half-BACKEND.commit: the
# mean commit time in µs over the gateway's run, and the fdatasync probe).
half_run() {
  local be=$1 rate c0 c1
  rate=$(rate_of authorize "$be" "$HALF_SHARE")
  c0=$(commit_sum_count)
  resources_run "$be" authorize "$rate" half "${HALF_RUN[@]}"
  c1=$(commit_sum_count)
  log "$be: half run, the baseline proxy at $rate/s"
  COMMANDS+=("loadtest run --scenario checkout --target baseline --baseline-url … --rate $rate ${HALF_RUN[*]} --out half-baseline-$be.json   # $be")
  "$LOADTEST" run --scenario checkout --target baseline --baseline-url "$BASE_URL" \
    --rate "$rate" "${HALF_RUN[@]}" --manifest "$MANIFEST" "${PIDARGS[@]}" \
    --out "$OUT/half-baseline-$be.json" 2>&1 | tee "$OUT/half-baseline-$be.txt" \
    || log "$be: half baseline exited non-zero"
  awk -v a="$c0" -v b="$c1" -v f="$(fsync_probe "$TMP")" 'BEGIN {
    split(a, x, " "); split(b, y, " "); n = y[2] - x[2]
    printf "%s %s\n", (n > 0 ? int((y[1] - x[1]) / n * 1e6) : "-"), (f == "" ? "-" : f) }' \
    >"$OUT/half-$be.commit"
}

COMMANDS=()
run_backend() {
  local backend=$1; shift
  start_stack "$backend"
  local sc
  for sc in "$@"; do
    pid_args
    local start_var=GW_START_$sc
    local cmd=("$LOADTEST" compare --scenario "$sc" --slo-p99-ms "$SLO_MS"
               --start "${!start_var}" --baseline-start "$BASELINE_START" "${COMMON[@]}"
               --manifest "$MANIFEST" --baseline-url "$BASE_URL" --redis-addr "$REDIS_ADDR"
               "${PIDARGS[@]}"
               --out "$OUT/compare-$sc-$backend.json" --svg "$OUT/compare-$sc-$backend.svg")
    log "$backend: compare $sc"
    COMMANDS+=("loadtest compare --scenario $sc --slo-p99-ms $SLO_MS --start ${!start_var} --baseline-start $BASELINE_START ${COMMON[*]} --redis-addr … --pid … --out compare-$sc-$backend.json --svg compare-$sc-$backend.svg   # $backend")
    "${cmd[@]}" 2>&1 | tee "$OUT/compare-$sc-$backend.txt" || log "$backend: compare $sc exited non-zero (see compare-$sc-$backend.txt)"
  done
  # Resources: authorize and checkout at RESOURCES_SHARE of this backend's median max, then
  # the RSS run.
  resources_run "$backend" authorize "$(rate_of authorize "$backend" "$RESOURCES_SHARE")" \
    resources "${RESOURCES[@]}"
  resources_run "$backend" checkout "$(rate_of checkout "$backend" "$RESOURCES_SHARE")" \
    resources "${RESOURCES[@]}"
  if [[ "$RSS_BACKENDS" == *" $backend "* ]]; then
    resources_run "$backend" authorize "$(rate_of authorize "$backend" "$RSS_SHARE")" \
      rss "${RSS_RUN[@]}"
  fi
  half_run "$backend"
  pid_args
  if true; then
    log "$backend: failover"
    COMMANDS+=("loadtest run --scenario failover ${FAILOVER[*]} --redis-addr … --pid … --out failover-$backend.json --svg failover-$backend.svg   # $backend")
    "$LOADTEST" run --scenario failover "${FAILOVER[@]}" --manifest "$MANIFEST" \
      --redis-addr "$REDIS_ADDR" "${PIDARGS[@]}" \
      --out "$OUT/failover-$backend.json" --svg "$OUT/failover-$backend.svg" 2>&1 \
      | tee "$OUT/failover-$backend.txt" || log "$backend: failover exited non-zero"
  fi
  local method
  for method in "${CHANNEL_METHODS[@]}"; do
    pid_args
    log "$backend: checkout through $method (${CHANNEL_RUN[*]})"
    COMMANDS+=("loadtest run --scenario checkout --checkout-method $method ${CHANNEL_RUN[*]} --redis-addr … --pid … --out channel-$method-$backend.json   # $backend")
    "$LOADTEST" run --scenario checkout --checkout-method "$method" "${CHANNEL_RUN[@]}" \
      --manifest "$MANIFEST" --redis-addr "$REDIS_ADDR" "${PIDARGS[@]}" \
      --out "$OUT/channel-$method-$backend.json" 2>&1 \
      | tee "$OUT/channel-$method-$backend.txt" || log "$backend: checkout through $method exited non-zero"
  done
  stop_stack
}

if [ -n "$SERVE" ]; then
  case "$SERVE" in postgres|sqlite) ;; *) echo "bench.sh: --serve postgres|sqlite" >&2; exit 2 ;; esac
  start_stack "$SERVE"
  pid_args
  {
    echo "REDIS_PID=$REDIS_PID"; echo "REDIS_ADDR=$REDIS_ADDR"
    echo "PG_PID=${PG_PID}"; echo "PG_PORT=${PG_PORT}"; echo "GW_PID=$GW_PID"
    echo "SIM_PID=$SIM_PID"; echo "BASE_PID=$BASE_PID"; echo "BASE_URL=$BASE_URL"
    echo "MANIFEST=$MANIFEST"; echo "PIDARGS=\"${PIDARGS[*]}\""
  } >"$OUT/stack.env"
  log "stack up; its pids and URLs are in $OUT/stack.env; Ctrl-C (or SIGTERM) stops it"
  while kill -0 "$GW_PID" 2>/dev/null; do sleep 1; done
  log "the gateway exited"; exit 1
fi

# ---- budgets (issue 14) -----------------------------------------------------------------------
BUDGET_AUTHORIZE_RATE=1000
BUDGET_CHECKOUT_RATE=500
BUDGET_RUN=(--duration-s 10 --warmup-s 2 --settle-wait-s 10)
# budget_figures FILE: "gateway postgres(all) redis payments_per_commit sqlite_thread" of one
# run report, per payment (per settled payment for checkout); sqlite_thread is the gateway's
# `sqlite` thread (the SQLite store, "-" on PostgreSQL), to set beside `--floors`.
budget_figures() {
  jq -r '
    def unit: if .settlement != null then .us_per_settled else .us_per_request end;
    def cpu(f): [.cpu[] | select(.name | f) | unit // 0] | add // 0;
    def payments: if .settlement != null then .settlement.settled else .requests.answered end;
    (cpu(. == "gateway")) as $gw
    | (cpu(. == "postgres" or test("^pg[0-9]+$"))) as $pg
    | (cpu(. == "redis")) as $rd
    | ([.cpu[] | select(.name == "gateway") | .threads[]? | select(.name == "sqlite") | unit]
       | first // null) as $st
    | (.gateway_metrics.store_commits.by_op.commit_writes // 0) as $commits
    | "\($gw | round) \($pg | round) \($rd | round) \(if $commits > 0 then (payments / $commits * 100 | round / 100) else 0 end) \(if $st == null then "-" else ($st | round) end)"' "$1"
}
if [ "$BUDGETS" = 1 ]; then
  BUDGET_ROWS=()
  for be in sqlite postgres; do
    start_stack "$be"
    # Unmeasured warm-up: PostgreSQL's pool opens its connections under load, and a backend
    # forked during a command is not counted (pid_args lists the children before it), so
    # without it the first run would leave out the backends that did half of the work.
    log "$be: warm-up, authorize at $BUDGET_AUTHORIZE_RATE/s for 3 s (not measured)"
    "$LOADTEST" run --scenario authorize --rate "$BUDGET_AUTHORIZE_RATE" --duration-s 3 \
      --warmup-s 1 --settle-wait-s 2 --manifest "$MANIFEST" >/dev/null 2>&1 \
      || log "$be: warm-up exited non-zero"
    for sc in authorize checkout; do
      rate_var=BUDGET_${sc^^}_RATE
      gws=(); pgs=(); rds=(); ppcs=(); bars=(); sts=()
      for r in $(seq "$BUDGET_RUNS"); do
        read -r cs0 cc0 <<<"$(commit_sum_count)"
        resources_run "$be" "$sc" "${!rate_var}" "budget$r" "${BUDGET_RUN[@]}"
        read -r cs1 cc1 <<<"$(commit_sum_count)"
        f=$OUT/budget$r-$sc-$be.json
        [ -s "$f" ] || { log "$be: $sc run $r wrote no report"; continue; }
        read -r gw pg rd ppc st <<<"$(budget_figures "$f")"
        # Mean commit time over the run (set-up and settle wait included: a bound).
        bar=$(awk -v s0="$cs0" -v s1="$cs1" -v c0="$cc0" -v c1="$cc1" -v rate="${!rate_var}" \
          'BEGIN { if (c1 > c0) printf "%.2f", 0.8 * rate * (s1 - s0) / (c1 - c0); else print 0 }')
        gws+=("$gw"); pgs+=("$pg"); rds+=("$rd"); ppcs+=("$ppc"); bars+=("$bar")
        [ "$st" = - ] || sts+=("$st")
        log "$be $sc run $r: gateway $gw µs (sqlite thread $st), postgres $pg µs, redis $rd µs per payment; $ppc payments per commit (bar $bar)"
      done
      [ ${#gws[@]} -gt 0 ] || continue
      BUDGET_ROWS+=("| $be | $sc at ${!rate_var}/s | $(median "${gws[@]}") µs$([ ${#sts[@]} -gt 0 ] && echo " (\`sqlite\` thread $(median "${sts[@]}") µs)" || true) | $(if [ "$be" = postgres ]; then echo "$(median "${pgs[@]}") µs"; else echo "— (in the gateway)"; fi) | $(median "${rds[@]}") µs | $(median "${ppcs[@]}") (≥ $(median "${bars[@]}")) | ${gws[*]} |")
    done
    stop_stack
  done
  {
    echo "Budgets, $(date -u +'%Y-%m-%d %H:%M') UTC, commit \`$(git rev-parse --short HEAD)\`: \`scripts/bench.sh --budgets --runs $BUDGET_RUNS\` (${BUDGET_RUN[*]}; medians of $BUDGET_RUNS runs)."
    echo
    echo "| store | load | gateway CPU / payment | PostgreSQL CPU / payment | Redis CPU / payment | payments per commit (bar: 0.8 × rate × mean commit time) | gateway, each run |"
    echo "| --- | --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${BUDGET_ROWS[@]}"
  } | tee "$OUT/budgets.md"
  exit 0
fi

# ---- floors (issue 14) ------------------------------------------------------------------------
# The least work under each budget, measured on this machine (docs/PERFORMANCE.md, "Another
# machine kind, and the floors"): a bar below its floor is out of reach here.
FLOOR_RATE=1000
FLOOR_NGINX_RUN=(--duration-s 10 --warmup-s 2 --settle-wait-s 1)
# The least a balance payment asks of Redis: its idempotency record with the expiry, the
# account read and written, the order id, the document (authorize.lua does these and more).
FLOOR_SCRIPT='local i = redis.call("SET", KEYS[1], ARGV[1], "NX", "EX", 86400)
if not i then return 0 end
redis.call("HMGET", KEYS[2], "bal", "seq")
redis.call("HSET", KEYS[2], "bal", ARGV[2], "seq", ARGV[2])
redis.call("HSETNX", KEYS[3], ARGV[1], ARGV[3])
redis.call("HSET", KEYS[4], ARGV[3], ARGV[4])
return 1'
# What the contract needs besides (FLOOR_SCRIPT's five commands are not all of it): the
# payment's status, its outbox record (the store decides: the movement must reach it after a
# crash) and its retention index entry (its state leaves Redis later), in the fewest commands
# the contract allows (the idempotency record one string; the order id refused if taken; the
# status beside the document; the index appended to), on one scope's keys as the gateway's
# payments of an account share theirs; then the batched call that forgets six committed
# payments' outbox records (in flight = its outbox record is there, so nothing else to write).
FLOOR_CONTRACT_SCRIPT='if not redis.call("SET", KEYS[1], ARGV[1], "NX", "EX", 86400) then return 0 end
redis.call("HMGET", KEYS[2], "bal", "seq")
redis.call("HSET", KEYS[2], "bal", ARGV[2], "seq", ARGV[2])
if redis.call("HSETNX", KEYS[3], ARGV[3], ARGV[4]) == 0 then return 0 end
redis.call("HSET", KEYS[4], ARGV[4], ARGV[5])
redis.call("HSET", KEYS[5], ARGV[4], ARGV[6])
redis.call("RPUSH", KEYS[6], ARGV[7] .. ":" .. ARGV[4])
return 1'
FLOOR_SETTLE_SCRIPT='for n = 1, #ARGV do redis.call("HDEL", KEYS[n], ARGV[n]) end
return #ARGV'
if [ "$FLOORS" = 1 ]; then
  log "cargo build --release -p benches --bin store_floor"
  cargo build --release -p benches --bin store_floor
  FLOOR_ROWS=()
  # floor_runs LABEL ARGS...: BUDGET_RUNS runs of store_floor, each a row of floors.md.
  floor_runs() {
    local label=$1 r line; shift
    for r in $(seq "$BUDGET_RUNS"); do
      if line=$("$BIN/store_floor" "$@" 2>&1); then
        log "$label, run $r: $line"
        local shown=${*//$TMP/<tmp>}
        [ -n "${floor_url:-}" ] && shown=${shown//$floor_url/<the stack\'s PostgreSQL>/floor}
        FLOOR_ROWS+=("| $label | $line | \`store_floor $shown\` |")
      else
        log "$label, run $r failed: $line"
      fi
    done
  }
  floor_runs "SQLite store, $FLOOR_RATE/s" --dir "$TMP" --rate "$FLOOR_RATE"
  floor_runs "SQLite store, saturation" --dir "$TMP" --saturate
  floor_runs "SQLite store, checkouts at $BUDGET_CHECKOUT_RATE/s" --dir "$TMP" --checkout \
    --rate "$BUDGET_CHECKOUT_RATE"
  start_stack postgres
  "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -q -c 'CREATE DATABASE floor'
  floor_url="postgres://postgres@127.0.0.1:$PG_PORT/floor"
  floor_runs "PostgreSQL store, $FLOOR_RATE/s" --postgres "$floor_url" --rate "$FLOOR_RATE"
  floor_runs "PostgreSQL store, saturation" --postgres "$floor_url" --saturate

  # nginx in front of channel-sim's admin API: every request becomes GET /channels.
  nport=$(free_port)
  sim_admin=$(jq -r .sim_admin_url "$MANIFEST")
  nginx_conf "$TMP/nginx" "$nport" "${sim_admin#http://}" 'rewrite ^ /channels break;
      proxy_method GET; proxy_pass_request_body off; proxy_set_header Content-Length "";
      proxy_http_version 1.1; proxy_set_header Connection ""; proxy_pass http://sim;'
  /usr/sbin/nginx -c "$TMP/nginx/nginx.conf" -g 'daemon off;' >"$OUT/floor-nginx.log" 2>&1 &
  NGINX_PID=$!; PIDS+=("$NGINX_PID")
  wait_for 10 nginx curl -sf -o /dev/null -X POST -d '{}' "http://127.0.0.1:$nport/v1/orders"
  nginx_worker=$(pgrep -P "$NGINX_PID" | head -1)
  for r in $(seq "$BUDGET_RUNS"); do
    f=$OUT/floor-nginx-$r.json
    "$LOADTEST" run --scenario checkout --target baseline --baseline-url "http://127.0.0.1:$nport" \
      --rate "$FLOOR_RATE" "${FLOOR_NGINX_RUN[@]}" --manifest "$MANIFEST" \
      --pid "nginx=$nginx_worker" --pid "channel-sim=$SIM_PID" --out "$f" >"${f%.json}.txt" 2>&1 \
      || log "nginx run $r exited non-zero (see ${f%.json}.txt)"
    line=$(jq -r '[.cpu[] | select(.name == "nginx" or .name == "channel-sim")
      | "\(.name) \(.us_per_request | round) µs"] | join(", ")' "$f" 2>/dev/null || echo "?")
    log "nginx at $FLOOR_RATE/s, run $r: $line per request"
    FLOOR_ROWS+=("| one proxied HTTP request, $FLOOR_RATE/s | $line per request (nginx: the exchange in and the upstream round trip; channel-sim: a trivial GET) | \`loadtest run --scenario checkout --target baseline --baseline-url <nginx> --rate $FLOOR_RATE\` |")
  done
  stop_pid "$NGINX_PID"
  stop_stack

  # A Redis of its own (AOF off, as the closed loop's), the script at saturation.
  rport=$(free_port)
  mkdir -p "$TMP/floor-redis"
  "$REDIS_SERVER" --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
    --maxmemory-policy noeviction "${REDIS_TUNING[@]}" --dir "$TMP/floor-redis" \
    >"$OUT/floor-redis.log" 2>&1 &
  PIDS+=("$!")
  wait_for 10 "redis-server" redis-cli -p "$rport" ping
  redis_cpu() {
    redis-cli -p "$rport" info cpu \
      | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.6f", s}'
  }
  # redis_us N ARGS...: Redis's CPU µs per call of `redis-benchmark -n N -c 32 ARGS...`.
  redis_us() {
    local n=$1 c0 c1; shift
    c0=$(redis_cpu)
    redis-benchmark -p "$rport" -n "$n" -c 32 -r 100000000 -q "$@" >/dev/null 2>&1
    c1=$(redis_cpu)
    awk -v a="$c0" -v b="$c1" -v n="$n" 'BEGIN { printf "%.0f", (b - a) * 1e6 / n }'
  }
  sha=$(redis-cli -p "$rport" script load "$FLOOR_SCRIPT")
  contract=$(redis-cli -p "$rport" script load "$FLOOR_CONTRACT_SCRIPT")
  settle=$(redis-cli -p "$rport" script load "$FLOOR_SETTLE_SCRIPT")
  nothing=$(redis-cli -p "$rport" script load "return 1")
  doc=$(printf '{"doc":"%0900d"}' 0)
  record=$(printf '{"r":"%0130d"}' 0)
  contract_args=(6 'i:{t1}:k__rand_int__' 'a:{t1}' 'o:{t1}' 'pd:{t1}' 'u:{t1}' 'rx:{s1}'
    'key__rand_int__' 1000 'ord__rand_int__' 'pay__rand_int__' "$doc" "$record" 1700000000000)
  for r in $(seq "$BUDGET_RUNS"); do
    redis-cli -p "$rport" flushall >/dev/null
    us=$(redis_us 100000 evalsha "$sha" 4 \
      'i:{t__rand_int__}:k__rand_int__' 'a:{t__rand_int__}' 'o:{t__rand_int__}' \
      'pd:{t__rand_int__}' 'key__rand_int__' 1000 'pay__rand_int__' "$doc")
    log "Redis, a five-command script, run $r: $us µs per call"
    FLOOR_ROWS+=("| the least Redis script per balance payment, saturation | Redis $us µs per call | \`redis-benchmark -c 32 evalsha\` (FLOOR_SCRIPT in scripts/bench.sh) |")
    redis-cli -p "$rport" flushall >/dev/null
    empty=$(redis_us 100000 evalsha "$nothing" "${contract_args[@]}")
    auth=$(redis_us 100000 evalsha "$contract" "${contract_args[@]}")
    batch=$(redis_us 20000 evalsha "$settle" 6 'u:{t1}' 'u:{t1}' 'u:{t1}' 'u:{t1}' 'u:{t1}' \
      'u:{t1}' 'pay__rand_int__' 'pay__rand_int__' 'pay__rand_int__' 'pay__rand_int__' \
      'pay__rand_int__' 'pay__rand_int__')
    per=$(awk -v a="$auth" -v b="$batch" 'BEGIN { printf "%.0f", a + b / 6 }')
    log "Redis, the contract's least, run $r: $per µs per payment ($auth per call, $batch per settle of 6; a call doing nothing $empty)"
    FLOOR_ROWS+=("| the contract's least in Redis per balance payment, saturation | Redis $per µs per payment: $auth µs per call, $batch µs per batched settle of 6; a call with the same arguments doing nothing $empty µs | \`redis-benchmark -c 32 evalsha\` (FLOOR_CONTRACT_SCRIPT, FLOOR_SETTLE_SCRIPT in scripts/bench.sh) |")
  done
  {
    echo "Floors, $(date -u +'%Y-%m-%d %H:%M') UTC, commit \`$(git rev-parse --short HEAD)\`: \`scripts/bench.sh --floors --runs $BUDGET_RUNS\`."
    echo
    echo "| the least work of | measured | command |"
    echo "| --- | --- | --- |"
    printf '%s\n' "${FLOOR_ROWS[@]}"
  } | tee "$OUT/floors.md"
  exit 0
fi

run_backend postgres "${SCENARIOS[@]}"
run_backend sqlite "${SCENARIOS[@]}"

if [ "$QUICK" = 0 ]; then
  log "cargo bench -p benches"
  cargo bench -p benches 2>&1 | tee "$OUT/criterion.txt" || log "cargo bench exited non-zero"
fi

# ---- summary ----------------------------------------------------------------------------------
DURATION=$(( $(date +%s) - T0 ))
SUMMARY=$OUT/summary.md
fmt_cpu() {  # the cpu_us_per_unit map of a side, as "name µs, …" (pg<PID> summed as postgres(all))
  jq -r "$1"' | to_entries
    | (map(select(.key | test("^(pg[0-9]+|postgres)$")))) as $pg
    | map(select(.key | test("^pg[0-9]+$") | not) | select(.key != "postgres"))
      + (if ($pg | length) > 0 then [{key: "postgres(all \($pg | length) processes)", value: ($pg | map(.value) | add)}] else [] end)
    | map("\(.key) \(.value | floor)") | join(", ")' "$2" 2>/dev/null || echo "?"
}
{
  echo "Run of $(date -u '+%Y-%m-%d %H:%M UTC'), \`scripts/bench.sh$( [ "$QUICK" = 1 ] && echo ' --quick')\` ($MODE mode, ${DURATION} s including the build)."
  echo
  echo "| | |"
  echo "| --- | --- |"
  echo "| machine | $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/^Mem:/{print $2}') GiB RAM (\`free -g\`) |"
  echo "| commit | \`$(git rev-parse --short HEAD)\`$(git diff --quiet HEAD -- . ':!docs/PERFORMANCE.md' ':!scripts/bench.sh' 2>/dev/null || echo ' (with uncommitted changes)') |"
  echo "| Redis | $("$REDIS_SERVER" --version | awk '{print $3}' | sed 's/v=//'), AOF appendfsync everysec, noeviction |"
  echo "| PostgreSQL | $("$PGBIN/postgres" --version | awk '{print $3}'), fsync=on, synchronous_commit=on |"
  echo "| SLO | corrected p99 ≤ $SLO_MS ms, no error, no timeout, no missed send (checkout: every payment settled and verified) |"
  echo "| settings | \`${COMMON[*]}\`; gateway starts at checkout $GW_START_checkout/s, authorize $GW_START_authorize/s; baseline at $BASELINE_START/s |"
  echo
  echo "| backend | scenario | ratio (median) | gateway /s (median) | baseline req/s (median) | gateway p99 | baseline p99 | capped / bound |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
  for f in "$OUT"/compare-*-*.json; do
    [ -e "$f" ] || continue
    b=$(basename "$f" .json); b=${b#compare-}; sc=${b%%-*}; be=${b#*-}
    jq -r --arg be "$be" --arg sc "$sc" '
      def n(x): if x == null then "—" else (x * 1000 | round / 1000 | tostring) end;
      def ms(x): if x == null then "—" else ((x / 10 | round) / 100 | tostring) + " ms" end;
      def lastp99(side): [.rounds[] | side.corrected_p99_us | select(. != null)] | last;
      "| \($be) | \($sc) (\(.gateway_measure)) | \(n(.median_ratio)) | \(n(.median_gateway_per_second)) | \(n(.median_baseline_per_second)) | \(ms(lastp99(.gateway))) | \(ms(lastp99(.baseline))) | gw capped: \([.rounds[].gateway.capped] | any), baseline capped: \([.rounds[].baseline.capped] | any), bound: \(.ratios_are_bounds) |"' "$f"
  done
  echo
  echo "CPU µs per unit of work in each side's best step of the last round that found one (gateway checkout: per settled payment; otherwise per request); the p99 columns above are from the same steps:"
  echo
  echo "| backend | scenario | side | CPU µs per unit, per process |"
  echo "| --- | --- | --- | --- |"
  for f in "$OUT"/compare-*-*.json; do
    [ -e "$f" ] || continue
    b=$(basename "$f" .json); b=${b#compare-}; sc=${b%%-*}; be=${b#*-}
    # A round whose search found no passing step has an empty map: the last one that has one.
    echo "| $be | $sc | gateway | $(fmt_cpu '[.rounds[].gateway.cpu_us_per_unit | select(length > 0)] | last // {}' "$f") |"
    echo "| $be | $sc | baseline | $(fmt_cpu '[.rounds[].baseline.cpu_us_per_unit | select(length > 0)] | last // {}' "$f") |"
  done
  echo
  echo "Resources (gateway): \`run\` at ${RESOURCES_SHARE} x the gateway's median max of the backend's compare (${FALLBACK_RATE}/s when it found none), \`${RESOURCES[*]}\`; the RSS run: authorize at ${RSS_SHARE} x, \`${RSS_RUN[*]}\`. Per payment: per answered request (authorize), per settled payment (checkout); window figures, but wal_sync (PostgreSQL \`pg_stat_wal\`) covers the whole command (set-up, warm-up, settle wait): an upper bound. INFO evalsha+eval counts each script of a pipeline (the gateway counts the pipeline as one round trip)."
  echo
  echo "| backend | run | rate /s | store commits / payment | wal_sync / payment | Redis round trips / payment | INFO evalsha+eval / payment | settlement lag p99 (callback→ack) | queue depth max, grew? | gateway RSS first → last (growth) |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for f in "$OUT"/resources-*-*.json "$OUT"/rss-*-*.json; do
    [ -e "$f" ] || continue
    b=$(basename "$f" .json); kind=${b%%-*}; b=${b#*-}; sc=${b%%-*}; be=${b#*-}
    wal=$(cat "${f%.json}.wal" 2>/dev/null || echo null)
    jq -r --arg be "$be" --arg kind "$kind" --arg sc "$sc" --argjson wal "${wal:-null}" '
      def n(x): if x == null then "—" else (x * 1000 | round / 1000 | tostring) end;
      def unit(o): if o == null then null elif .settlement != null then o.per_settled else o.per_request end;
      def payments: if .settlement != null then .settlement.settled
                    else .requests.answered + .warmup.answered end;
      (.rss | map(select(.name == "gateway")) | first) as $rss
      | .gateway_metrics.settlement_queue_depth as $q
      | .redis_commandstats as $r
      | "| \($be) | \($kind) \($sc) | \(.run.rate_per_second) | \(n(unit(.gateway_metrics.store_commits))) | \(if $wal == null or payments == 0 then "—" else n($wal / payments) end) | \(n(unit(.gateway_metrics.redis_round_trips))) | \(if $r == null then "—" elif .settlement != null then n($r.script_calls_per_settled) else n($r.script_calls_per_request) end) | \(if .settlement == null then "—" else ((.settlement.callback_to_ack.p99_us / 10 | round) / 100 | tostring) + " ms" end) | \(if $q == null then "—" else "\($q.max), \(if $q.grew then "**grew**" else "no" end)" end) | \(if $rss == null or $rss.growth == null then "—" else "\($rss.first_mib * 10 | round / 10) → \($rss.last_mib * 10 | round / 10) MiB (\($rss.growth * 1000 | round / 10) %\(if $rss.flat then ", flat" else ", **not flat**" end))" end) |"' "$f" 2>/dev/null \
      || echo "| $be | $kind $sc | (report unreadable) | | | | | | | |"
  done
  echo
  echo "Latency at half the gateway's own maximum (\`authorize\` at ${HALF_SHARE} x its median max, \`${HALF_RUN[*]}\`; the baseline proxy at the same rate right after): the bar is gateway p50 ≤ baseline p50 + one group commit, p99 ≤ baseline p99 + 5 ms. One group commit: the mean \`commit_writes\` time over the gateway's run (its /metrics); fdatasync: median of 200 4 KiB write + fdatasync(2) on the same disk."
  echo
  echo "| backend | rate /s | gateway p50 / p99 | baseline p50 / p99 | p50 above the baseline | one group commit | fdatasync | p50 bar | p99 bar |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for f in "$OUT"/half-authorize-*.json; do
    [ -e "$f" ] || continue
    be=$(basename "$f" .json); be=${be#half-authorize-}
    read -r commit_us fsync_us <"$OUT/half-$be.commit" 2>/dev/null || { commit_us=-; fsync_us=-; }
    jq -r -n --slurpfile g "$f" --slurpfile b "$OUT/half-baseline-$be.json" --arg be "$be" \
      --arg commit "$commit_us" --arg fsync "$fsync_us" '
      def ms(x): ((x / 10 | round) / 100 | tostring) + " ms";
      ($g[0].latency.corrected) as $gl | ($b[0].latency.corrected) as $bl
      | ($gl.p50_us - $bl.p50_us) as $gap
      | "| \($be) | \($g[0].run.rate_per_second) | \(ms($gl.p50_us)) / \(ms($gl.p99_us)) | \(ms($bl.p50_us)) / \(ms($bl.p99_us)) | \($gap) µs | \($commit) µs | \($fsync) µs | \(if $commit == "-" then "?" elif $gap <= ($commit | tonumber) then "met" else "no" end) | \(if $gl.p99_us <= $bl.p99_us + 5000 then "met" else "no" end) |"' \
      2>/dev/null || echo "| $be | (report unreadable) | | | | | | | |"
  done
  echo
  echo "Checkouts by channel kind (\`run --scenario checkout --checkout-method M ${CHANNEL_RUN[*]}\`): the same rate for each, so the CPU each process spends per settled payment compares across kinds. Supplier: an account's hold, HMAC-signed create and callback. Alipay / WeChat Pay: customer payments (no account); the gateway signs each create with RSA-2048 and verifies each callback, channel-sim verifies each create and signs each callback (WeChat Pay's also AES-GCM encrypted)."
  echo
  echo "| backend | method | settled /s | p99 | callback→ack p99 | gateway µs / settled | channel-sim µs / settled | other processes µs / settled | Redis round trips / settled | store commits / settled |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  for be in postgres sqlite; do
    for m in "${CHANNEL_METHODS[@]}"; do
      f="$OUT/channel-$m-$be.json"
      [ -e "$f" ] || continue
      jq -r --arg be "$be" --arg m "$m" '
        def n(x): if x == null then "—" else (x * 100 | round / 100 | tostring) end;
        def cpu(name): ([.cpu[] | select(.name == name) | .us_per_settled] | first);
        ([.cpu[] | select(.name != "gateway" and .name != "channel-sim" and .name != "baseline" and .us_per_settled != null and .us_per_settled >= 1)
          | if (.name | test("^pg[0-9]+$")) or .name == "postgres" then .name = "postgres(all)" else . end]
          | group_by(.name) | map("\(.[0].name) \(map(.us_per_settled) | add | floor)") | join(", ")) as $others
        | "| \($be) | \($m) | \(n(.throughput.settled_per_second)) | \(n(.latency.corrected.p99_us / 1000)) ms | \(if .settlement == null then "—" else n(.settlement.callback_to_ack.p99_us / 1000) + " ms" end) | \(cpu("gateway") // 0 | floor) | \(cpu("channel-sim") // 0 | floor) | \($others) | \(n(.gateway_metrics.redis_round_trips.per_settled)) | \(n(.gateway_metrics.store_commits.per_settled)) |"' "$f" 2>/dev/null \
        || echo "| $be | $m | (report unreadable) | | | | | | | |"
    done
  done
  for f in "$OUT"/failover-*.json; do
    [ -e "$f" ] || continue
    be=$(basename "$f" .json); be=${be#failover-}
    echo
    echo "Failover ($be): $(jq -c '{scheduled: .requests.scheduled, answered: .requests.answered, errors: .requests.errors_by_code, traffic_moved: .failover.traffic_moved, undocumented_errors: .failover.undocumented_errors, phases: (.failover.phases | with_entries(.value |= {sent, answered, accepted_by_channel, p99_ms: ((.corrected.p99_us // 0) / 1000)}))}' "$f" 2>/dev/null || echo '(report unreadable)')"
  done
  echo
  echo "Files (in \`$(realpath --relative-to="$ROOT" "$OUT" 2>/dev/null || echo "$OUT")/\`): $(cd "$OUT" && ls *.json *.svg 2>/dev/null | tr '\n' ' ')"
  echo
  echo "Commands (\`--pid gateway=… --pid channel-sim=… --pid redis=… --pid baseline=… [--pid postgres=<postmaster> --pid pg<PID>=<PID> per child]\`, \`--manifest\` and \`--baseline-url\` of the stack):"
  echo
  echo '```sh'
  for c in "${COMMANDS[@]}"; do echo "$c"; done
  [ "$QUICK" = 0 ] && echo "cargo bench -p benches"
  echo '```'
} >"$SUMMARY"
echo
cat "$SUMMARY"

if [ "$WRITE_DOC" = 1 ] && grep -q '<!-- bench:begin -->' docs/PERFORMANCE.md && grep -q '<!-- bench:end -->' docs/PERFORMANCE.md; then
  awk -v f="$SUMMARY" '
    /<!-- bench:begin -->/ { print; while ((getline l < f) > 0) print l; skip = 1; next }
    /<!-- bench:end -->/ { skip = 0 }
    !skip { print }' docs/PERFORMANCE.md >"$TMP/perf.md" && cat "$TMP/perf.md" >docs/PERFORMANCE.md
  log "rewrote the generated section of docs/PERFORMANCE.md"
fi
log "done in ${DURATION} s; reports in $OUT"
