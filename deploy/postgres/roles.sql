-- Least privilege for logstore workers (issue 13). Run in EACH shard database, after the
-- migrations, as a superuser (or the owner role, if it has CREATEROLE):
--
--   psql "postgres://postgres@shard-host/logstore" -f deploy/postgres/roles.sql
--
-- then give each worker its own login in the group role this file creates:
--
--   CREATE ROLE logstore_worker LOGIN PASSWORD '…' IN ROLE logstore_app;
--
-- and point POSTGRES_SHARDS at that login. Idempotent: run it again after an upgrade that adds
-- migrations (new tables and functions are covered by the ON ALL … grants).
--
-- The owner role runs the migrations: a worker started once with the owner's URL applies them
-- (every start checks logstore_migrations; a worker whose role may not migrate a schema that
-- is not current stops with one line saying so). logstore_app can read and write the tables
-- and call the functions; it owns nothing and may create nothing, so it cannot DROP, ALTER or
-- TRUNCATE any table.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'logstore_app') THEN
        CREATE ROLE logstore_app NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO logstore_app', current_database());
END
$$;

-- PostgreSQL before 15 lets every role create objects in `public`: take that away (15 and
-- later already do), and let the group only look things up there.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO logstore_app;

-- The data: appends insert and update (objects' head rows, logs), deletes and retention delete.
GRANT SELECT, INSERT, UPDATE, DELETE ON objects, logs TO logstore_app;
-- The shard's name is recorded on first start (by whoever starts first) and checked on every one.
-- Its fleet (migrations/0008_fleet.sql) is recorded through logstore_claim_fleet, SECURITY
-- DEFINER, which only ever fills an empty one: no UPDATE here.
GRANT SELECT, INSERT ON shard_identity TO logstore_app;
-- The ring's epoch fence (migrations/0007_resharding.sql): read by every append and read,
-- raised by the first request of a new epoch and by the mover, which also keeps the shard's
-- copy of the ring record there (0008).
GRANT SELECT, UPDATE ON ring_fence TO logstore_app;
-- Read only: every start compares it with the migrations the binary carries.
GRANT SELECT ON logstore_migrations TO logstore_app;
-- logstore_append, logstore_append_checked, logstore_append_careful, logstore_seq_at,
-- logstore_delete: SECURITY INVOKER, so they act with the grants above. (PUBLIC has EXECUTE on
-- new functions by default; granted here explicitly so the file still holds where that default
-- was revoked.)
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO logstore_app;
