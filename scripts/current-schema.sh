#!/usr/bin/env bash
# Regenerate migrations/CURRENT.sql: migrate a fresh database (the test suite's own PostgreSQL,
# as worker/tests/store.rs starts it), read its schema with scripts/current-schema.sql and
# write it under the file's header. The migrations stay the source of truth; run this after
# adding one, and commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
LOGSTORE_WRITE_CURRENT_SQL=1 cargo test -p logstore-worker --test store -- \
    --exact current_sql_is_the_schema_the_migrations_make
git diff --stat -- migrations/CURRENT.sql
