# Helpers the bench scripts share (sourced, not run): bench.sh and closed-loop.sh. Each sets
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
