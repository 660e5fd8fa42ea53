#!/usr/bin/env bash
# Writes the NATS users' passwords for docker-compose.yaml: `scripts/nats-secrets.sh [DIR]`.
#
# DIR (default deploy/nats/secrets, which git ignores) gets worker.password, admin.password
# and client.password, 32 random letters and digits each, unless they exist already (an existing
# password is kept: the running server and the workers must agree on it). The directory is
# readable by its owner only; the files themselves are world-readable so that the containers'
# users (nats, logstore) can read them where compose mounts them (/run/secrets/...).
#
# Give the client password to whoever runs the CLI or loadgen against that NATS:
#   NATS_USER=client NATS_PASSWORD_FILE=deploy/nats/secrets/client.password logstore get 1
set -euo pipefail

dir=${1:-$(cd "$(dirname "$0")/.." && pwd)/deploy/nats/secrets}
mkdir -p "$dir"
chmod 700 "$dir"
for user in worker admin client; do
  file="$dir/$user.password"
  if [ -s "$file" ]; then
    echo "kept    $file"
    continue
  fi
  # 32 of [A-Za-z0-9] from the kernel's CSPRNG (tr exits on SIGPIPE when head has enough).
  password=$(LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 32 || true)
  if [ "${#password}" -ne 32 ]; then
    echo "nats-secrets: could not draw a password from /dev/urandom" >&2
    exit 1
  fi
  (umask 022 && printf '%s\n' "$password" >"$file")
  echo "created $file"
done
