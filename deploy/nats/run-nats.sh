#!/bin/sh
# Starts nats-server with deploy/nats/nats-server.conf, the passwords of its users read from
# files: `run-nats.sh [NATS_SERVER_FLAGS...]` (the flags follow `-c CONF` and override it).
#
# Environment:
#   NATS_WORKER_PASSWORD_FILE  the worker user's password (default /run/secrets/nats_worker_password)
#   NATS_ADMIN_PASSWORD_FILE   the admin user's password (default /run/secrets/nats_admin_password)
#   NATS_CLIENT_PASSWORD_FILE  the client user's password (default /run/secrets/nats_client_password)
#   NATS_CONF                  the configuration (default: nats-server.conf beside this script)
#   NATS_SERVER_BIN            the server binary (default: nats-server from PATH)
#
# The configuration reads the passwords as $NATS_WORKER_PASSWORD, $NATS_ADMIN_PASSWORD and
# $NATS_CLIENT_PASSWORD; the server parses such a value as a configuration value, so it is
# handed over quoted, and a password may hold only letters, digits and . _ ~ + / = - (what `openssl rand -base64` or
# scripts/nats-secrets.sh produce). A trailing newline in a file is ignored. The passwords
# never appear on a command line (where `ps` would show them).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
conf=${NATS_CONF:-$here/nats-server.conf}

# read_password VAR FILE: export VAR as the quoted content of FILE.
read_password() {
  if [ ! -r "$2" ]; then
    echo "run-nats: cannot read the password file $2 (for \$$1)" >&2
    exit 1
  fi
  value=$(cat "$2") # $(...) drops the trailing newlines
  case "$value" in
    "")
      echo "run-nats: the password file $2 is empty" >&2
      exit 1
      ;;
    *[!A-Za-z0-9._~+/=-]*)
      echo "run-nats: the password in $2 may hold only letters, digits and ._~+/=-" >&2
      exit 1
      ;;
  esac
  export "$1=\"$value\""
}

read_password NATS_WORKER_PASSWORD "${NATS_WORKER_PASSWORD_FILE:-/run/secrets/nats_worker_password}"
read_password NATS_ADMIN_PASSWORD "${NATS_ADMIN_PASSWORD_FILE:-/run/secrets/nats_admin_password}"
read_password NATS_CLIENT_PASSWORD "${NATS_CLIENT_PASSWORD_FILE:-/run/secrets/nats_client_password}"
exec "${NATS_SERVER_BIN:-nats-server}" -c "$conf" "$@"
