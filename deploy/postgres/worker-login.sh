#!/bin/sh
# Creates the workers' least-privileged login `logstore_worker` (a member of the group role
# `logstore_app`, whose grants deploy/postgres/roles.sql gives once the schema exists) with the
# password read from a file, never from the command line. Idempotent: a second run only sets
# the password again.
#
# - docker-compose.yaml mounts it into the postgres image's /docker-entrypoint-initdb.d/, so it
#   runs once, on a node's first start (as POSTGRES_USER, in POSTGRES_DB, over the socket);
#   the password file is the compose secret postgres_worker_password.
# - scripts/local-up.sh runs it with PGHOST/PGPORT, POSTGRES_USER, POSTGRES_DB and
#   LOGSTORE_WORKER_PASSWORD_FILE set.
#
# Then `worker migrate --grant` (as the owner) creates the schema and applies roles.sql.
set -e
password_file=${LOGSTORE_WORKER_PASSWORD_FILE:-/run/secrets/postgres_worker_password}
if [ ! -r "$password_file" ]; then
  echo "worker-login.sh: cannot read the worker's password file $password_file" >&2
  exit 1
fi
# psql reads the password itself (\set with a backquoted command, trailing newline dropped) and
# quotes it as a literal (:'password'), so it is on no command line and needs no escaping.
LOGSTORE_WORKER_PASSWORD_FILE=$password_file psql -v ON_ERROR_STOP=1 -q \
  --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
\set password `cat "$LOGSTORE_WORKER_PASSWORD_FILE"`
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'logstore_app') THEN
        CREATE ROLE logstore_app NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'logstore_worker') THEN
        CREATE ROLE logstore_worker LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE IN ROLE logstore_app;
    END IF;
END
$$;
ALTER ROLE logstore_worker PASSWORD :'password';
SQL
