# Helpers the bench scripts share (sourced, not run): bench.sh, closed-loop.sh and
# instructions.sh. Each sets
# SCRIPT (its name, for messages) before sourcing.

# install_missing PACKAGE...: installs the Debian packages named (none: nothing) with apt-get
# when run as root, else says what to install and exits.
install_missing() {
  [ $# -gt 0 ] || return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "$SCRIPT: installing $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$@" >/dev/null
  else
    echo "$SCRIPT: please install: $*" >&2
    exit 1
  fi
}

# Redis settings of deploy/redis.conf that change what a command costs, for the Redis every
# bench starts (each on its own port and temp dir, with its own persistence flags).
REDIS_TUNING=(--hash-max-listpack-entries 32)

# nginx_conf DIR PORT UPSTREAM LOCATION: writes DIR/nginx.conf, one worker (as the gateway: one
# process), listening on 127.0.0.1:PORT, its temp files and pid in DIR, with `location / {
# LOCATION }` in front of the upstream `sim` at UPSTREAM (host:port, 32 keep-alive connections).
nginx_conf() {
  local dir=$1 port=$2 upstream=$3 location=$4
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $dir;
  proxy_temp_path $dir;
  fastcgi_temp_path $dir;
  uwsgi_temp_path $dir;
  scgi_temp_path $dir;
  upstream sim { server $upstream; keepalive 32; }
  server {
    listen 127.0.0.1:$port;
    location / { $location }
  }
}
EOF
}

# A free TCP port on loopback.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.1 s until it succeeds.
wait_for() {
  local secs=$1 what=$2; shift 2
  for _ in $(seq $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "$SCRIPT: timed out waiting for $what" >&2
  return 1
}

# median NUMBER...: the median (the lower middle of an even count).
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }

# stop_started: the EXIT trap of a script that starts processes (closed-loop.sh,
# instructions.sh): stops those in PIDS, newest first (TERM, then KILL half a second later),
# removes TMP and exits with the script's status.
stop_started() {
  local rc=$?
  set +e
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -TERM "${PIDS[$i]}" 2>/dev/null; done
  sleep 0.5
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill -KILL "${PIDS[$i]}" 2>/dev/null; done
  rm -rf "$TMP"
  exit $rc
}

# fund_accounts URL COUNT AMOUNT KEY_PREFIX REASON: creates the sandbox merchant alpha's
# accounts cl_0 … cl_<COUNT-1> (CNY) on the gateway at URL and credits each AMOUNT with an admin
# adjustment (Idempotency-Key KEY_PREFIX<i>): the accounts `scripts/closed-loop.lua` pays from.
fund_accounts() {
  local url=$1 count=$2 amount=$3 key_prefix=$4 reason=$5 i
  for i in $(seq 0 $((count - 1))); do
    curl -sf -o /dev/null -X PUT "$url/v1/accounts/cl_$i" \
      -H 'Authorization: Bearer sk_test_alpha' -H 'Content-Type: application/json' \
      -d '{"currency": "CNY"}'
    curl -sf -o /dev/null -X POST "$url/v1/accounts/cl_$i/adjustments" \
      -H 'Authorization: Bearer sk_test_admin' -H 'Content-Type: application/json' \
      -H "Idempotency-Key: $key_prefix$i" \
      -d "{\"merchant_id\": \"alpha\", \"direction\": \"credit\", \"amount\": \"$amount\", \"reason\": \"$reason\"}"
  done
}

# print_help SCRIPT_PATH: the script's header comment (its usage), without the shebang.
print_help() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$1"
}
