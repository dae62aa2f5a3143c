#!/usr/bin/env bash
# The load-test bench of issue 6: builds release, starts Redis, PostgreSQL, the sandbox gateway,
# an external channel-sim and the same-run baseline proxy (each a process of its own, on random
# loopback ports, in temp dirs), runs `loadtest compare` (checkout, authorize) and a failover
# run on each store backend, then (full mode) the criterion benches, and prints / writes a
# summary (markdown) and the generated section of docs/PERFORMANCE.md.
#
#   scripts/bench.sh [--quick] [--out DIR] [--no-doc]
#
# --quick  one round, short steps (factor 1.5), no criterion benches (target: <= 5 minutes
#          after the build). Full mode: 3 rounds, longer steps,
#          both scenarios on both backends, then `cargo bench -p benches` (target: <= 30 min).
# --out    where the JSON reports, SVG plots, logs and the summary go (default target/bench).
# --no-doc do not rewrite the generated section of docs/PERFORMANCE.md.
#
# Every process and temp dir it started is removed on exit (trap). Ctrl-C in a terminal reaches
# the running loadtest too; a SIGTERM sent to this script alone takes effect when the running
# loadtest command ends (bash runs traps between commands).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=0
OUT=target/bench
WRITE_DOC=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT=$2; shift ;;
    --no-doc) WRITE_DOC=0 ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    *) echo "scripts/bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)

# ---- settings (fixed: every figure of a mode comes from these) -----------------------------
SLO_MS=50
if [ "$QUICK" = 1 ]; then
  MODE=quick
  COMMON=(--rounds 1 --duration-s 2 --warmup-s 1 --pause-ms 300 --step 1.5 --max-steps 12
          --settle-wait-s 5)
  FAILOVER=(--rate 100 --duration-s 9 --warmup-s 1 --outage-at-s 3 --outage-for-s 3 --settle-wait-s 5)
else
  MODE=full
  COMMON=(--rounds 3 --duration-s 5 --warmup-s 2 --pause-ms 1000 --step 1.25 --max-steps 20
          --settle-wait-s 10)
  FAILOVER=(--rate 200 --duration-s 15 --warmup-s 2 --outage-at-s 5 --outage-for-s 5 --settle-wait-s 10)
fi
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
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bench.sh: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "bench.sh: please install: ${need[*]}" >&2
    exit 1
  fi
fi
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

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_for() {     # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  for _ in $(seq $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "bench.sh: timed out waiting for $what" >&2
  return 1
}
log() { echo "[bench $(date -u +%H:%M:%S) +$(( $(date +%s) - T0 ))s] $*"; }

# ---- build ------------------------------------------------------------------------------------
log "cargo build --release -p gateway -p channel-sim -p loadtest"
cargo build --release -p gateway -p channel-sim -p loadtest
BIN=$ROOT/target/release
LOADTEST=$BIN/loadtest

# ---- one stack: Redis (+ PostgreSQL) + gateway + channel-sim + baseline proxy -----------------
# Sets REDIS_PID PG_PID GW_PID SIM_PID BASE_PID BASE_URL MANIFEST PG_FSYNC_NOTE
start_stack() {
  local backend=$1 dir=$TMP/$1
  mkdir -p "$dir/redis" "$dir/gw"

  local rport; rport=$(free_port)
  "$REDIS_SERVER" --port "$rport" --bind 127.0.0.1 --save '' --appendonly yes \
    --appendfsync everysec --maxmemory-policy noeviction --dir "$dir/redis" \
    >"$OUT/$backend-redis.log" 2>&1 &
  REDIS_PID=$!; PIDS+=("$REDIS_PID")
  wait_for 10 "redis-server" redis-cli -p "$rport" ping

  local store_env=()
  PG_PID=
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
    store_env=(GATEWAY__STORE__URL="postgres://postgres@127.0.0.1:$pport/postgres")
  fi

  env GATEWAY__SANDBOX__EXTERNAL_SIM=true \
      GATEWAY__SANDBOX__AUTO_PAY=true GATEWAY__SANDBOX__AUTO_PAY_DELAY_MS=20 \
      GATEWAY__REDIS__URL="redis://127.0.0.1:$rport" \
      GATEWAY__TELEMETRY__LOG_FILTER=warn \
      "${store_env[@]}" \
      "$BIN/gateway" serve --sandbox --data-dir "$dir/gw" --listen "127.0.0.1:$(free_port)" \
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
  log "$backend stack: redis=$REDIS_PID postgres=${PG_PID:-none} gateway=$GW_PID channel-sim=$SIM_PID baseline=$BASE_PID ($BASE_URL)"
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
# is not counted (the pool is warm from the second command on).
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
               --manifest "$MANIFEST" --baseline-url "$BASE_URL" "${PIDARGS[@]}"
               --out "$OUT/compare-$sc-$backend.json" --svg "$OUT/compare-$sc-$backend.svg")
    log "$backend: compare $sc"
    COMMANDS+=("loadtest compare --scenario $sc --slo-p99-ms $SLO_MS --start ${!start_var} --baseline-start $BASELINE_START ${COMMON[*]} --pid … --out compare-$sc-$backend.json --svg compare-$sc-$backend.svg   # $backend")
    "${cmd[@]}" 2>&1 | tee "$OUT/compare-$sc-$backend.txt" || log "$backend: compare $sc exited non-zero (see compare-$sc-$backend.txt)"
  done
  pid_args
  if true; then
    log "$backend: failover"
    COMMANDS+=("loadtest run --scenario failover ${FAILOVER[*]} --pid … --out failover-$backend.json --svg failover-$backend.svg   # $backend")
    "$LOADTEST" run --scenario failover "${FAILOVER[@]}" --manifest "$MANIFEST" "${PIDARGS[@]}" \
      --out "$OUT/failover-$backend.json" --svg "$OUT/failover-$backend.svg" 2>&1 \
      | tee "$OUT/failover-$backend.txt" || log "$backend: failover exited non-zero"
  fi
  stop_stack
}

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
      "| \($be) | \($sc) (\(.gateway_measure)) | \(n(.median_ratio)) | \(n(.median_gateway_per_second)) | \(n(.median_baseline_per_second)) | \(ms(.rounds[-1].gateway.corrected_p99_us)) | \(ms(.rounds[-1].baseline.corrected_p99_us)) | gw capped: \([.rounds[].gateway.capped] | any), baseline capped: \([.rounds[].baseline.capped] | any), bound: \(.ratios_are_bounds) |"' "$f"
  done
  echo
  echo "CPU µs per unit of work in each side's best step of the last round (gateway checkout: per settled payment; otherwise per request):"
  echo
  echo "| backend | scenario | side | CPU µs per unit, per process |"
  echo "| --- | --- | --- | --- |"
  for f in "$OUT"/compare-*-*.json; do
    [ -e "$f" ] || continue
    b=$(basename "$f" .json); b=${b#compare-}; sc=${b%%-*}; be=${b#*-}
    echo "| $be | $sc | gateway | $(fmt_cpu '.rounds[-1].gateway.cpu_us_per_unit' "$f") |"
    echo "| $be | $sc | baseline | $(fmt_cpu '.rounds[-1].baseline.cpu_us_per_unit' "$f") |"
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
