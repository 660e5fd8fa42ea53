-- The schema of a migrated logstore shard as migrations/CURRENT.sql shows it, one object per
-- row: each table (columns in their physical order, then its constraints), each index that no
-- constraint creates, and each logstore_* function as pg_get_functiondef returns it.
-- worker/tests/store.rs runs this on a freshly migrated database and compares the answer with
-- migrations/CURRENT.sql; scripts/current-schema.sh rewrites the file from it.
-- Read-only: also usable on a live shard (psql -AtX -f scripts/current-schema.sql URL).
WITH tables AS (
    SELECT c.oid, c.relname
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
),
columns AS (
    SELECT a.attrelid AS oid, a.attnum AS ord,
           format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod))
           || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
           || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '') AS line
    FROM pg_attribute a
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid IN (SELECT oid FROM tables) AND a.attnum > 0 AND NOT a.attisdropped
),
constraints AS (
    -- After every column, by name. NOT NULL (catalogued as constraints from PostgreSQL 18 on)
    -- is already on its column.
    SELECT k.conrelid AS oid,
           10000 + row_number() OVER (PARTITION BY k.conrelid ORDER BY k.conname) AS ord,
           format('CONSTRAINT %I %s', k.conname, pg_get_constraintdef(k.oid)) AS line
    FROM pg_constraint k
    WHERE k.conrelid IN (SELECT oid FROM tables) AND k.contype IN ('p', 'u', 'c', 'f', 'x')
),
objects AS (
    SELECT 1 AS kind, t.relname::text AS name,
           format(E'CREATE TABLE %I (\n    %s\n);', t.relname,
                  string_agg(l.line, E',\n    ' ORDER BY l.ord)) AS ddl
    FROM tables t
    JOIN (SELECT * FROM columns UNION ALL SELECT * FROM constraints) l ON l.oid = t.oid
    GROUP BY t.relname
    UNION ALL
    SELECT 2, i.relname::text, pg_get_indexdef(x.indexrelid) || ';'
    FROM pg_index x
    JOIN pg_class i ON i.oid = x.indexrelid
    WHERE x.indrelid IN (SELECT oid FROM tables)
      AND NOT EXISTS (SELECT 1 FROM pg_constraint k
                      WHERE k.conindid = x.indexrelid AND k.conrelid = x.indrelid
                        AND k.contype IN ('p', 'u', 'x'))
    UNION ALL
    SELECT 3, p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
           rtrim(pg_get_functiondef(p.oid), E'\n') || ';'
    FROM pg_proc p
    JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = current_schema() AND p.proname LIKE 'logstore\_%'
)
SELECT ddl FROM objects ORDER BY kind, name
