//! Least privilege in PostgreSQL (issue 13): an owner role migrates; workers whose login has
//! only the grants of deploy/postgres/roles.sql pass the core scenarios (support::core_scenarios,
//! as core.rs runs them for a superuser), store conditional appends and answer stats and
//! deletes, and cannot drop, truncate or create anything. A worker whose role may not migrate a
//! schema that is not current stops at start with one line that says so.

mod support;

use std::time::Duration;

use logstore_protocol::{DeleteReply, StatsReply};
use support::*;

const ROLES_SQL: &str = include_str!("../../deploy/postgres/roles.sql");
const OWNER: &str = "logstore_owner";
const OWNER_PASSWORD: &str = "owner-secret";
const WORKER: &str = "logstore_worker";
const WORKER_PASSWORD: &str = "worker-secret";

fn env_for(shard_url: String) -> Env {
    Env {
        nats_url: shared().nats.url(),
        prefix: unique_name("t"),
        shards: vec![("a".to_string(), shard_url)],
        intake: "core",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privileged_worker_works_and_cannot_drop_anything() {
    let pg = PgServer::start(); // its own: require_password changes pg_hba.conf for good
    let db = pg.require_password(OWNER, OWNER_PASSWORD).await;
    let url = |role: &str, password: &str, db: &str| {
        format!("postgres://{role}:{password}@127.0.0.1:{}/{db}", pg.port())
    };
    let admin = pg_connect(&pg.url(&db)).await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {WORKER} LOGIN PASSWORD '{WORKER_PASSWORD}'"
        ))
        .await
        .expect("create the worker's login");

    // 1. The worker's role cannot migrate a fresh database (owned by the owner): the start
    //    stops with one line naming the role and what is missing.
    admin
        .batch_execute(&format!(
            "CREATE DATABASE fresh OWNER {OWNER} TEMPLATE template0"
        ))
        .await
        .expect("create a fresh database");
    let env = env_for(url(WORKER, WORKER_PASSWORD, "fresh"));
    let (listener, metrics) = metrics_listener();
    let config = env.config(metrics.port(), &[]);
    let error = within(
        30,
        "a worker that may not migrate",
        worker::run_on(config, listener, std::future::pending::<()>()),
    )
    .await
    .expect_err("a worker that may not migrate started");
    let line = error.to_string();
    eprintln!("refused as expected: {line}");
    assert!(
        line.contains("may not apply") && line.contains(WORKER) && line.contains("0001_schema"),
        "{line}"
    );
    assert!(!line.contains('\n'), "more than one line: {line}");
    assert!(!line.contains(WORKER_PASSWORD), "{line}");

    // 2. The owner migrates (a worker started once with its login), then roles.sql grants.
    let owner_env = env_for(url(OWNER, OWNER_PASSWORD, &db));
    let owner_worker = owner_env.start_worker(&[]).await;
    owner_worker.stop().await.expect("the owner's worker stops");
    admin
        .batch_execute(ROLES_SQL)
        .await
        .expect("deploy/postgres/roles.sql runs");
    // Idempotent: a second run (after an upgrade) changes nothing and does not fail.
    admin
        .batch_execute(ROLES_SQL)
        .await
        .expect("deploy/postgres/roles.sql runs twice");
    admin
        .batch_execute(&format!("GRANT logstore_app TO {WORKER}"))
        .await
        .expect("grant the group");

    // 3. Least-privileged workers do their whole job: the core scenarios core.rs runs as a
    //    superuser (two workers, so keys race across them), then conditional appends, stats
    //    and deletes.
    let env = env_for(url(WORKER, WORKER_PASSWORD, &db));
    let worker = env.start_worker(&[]).await;
    let second = env.start_worker(&[]).await;
    core_scenarios(&env, 100).await;
    second.stop().await.expect("the second worker stops");
    let client = env.client().await;
    let id = 42;
    for (i, log) in ["one", "two", "three"].iter().enumerate() {
        let reply = env.append(&client, id, log, Some(&format!("k{i}"))).await;
        assert_eq!((reply.seq, reply.duplicate), (i as u64 + 1, false));
    }
    let again = env.append(&client, id, "one", Some("k0")).await;
    assert_eq!((again.seq, again.duplicate), (1, true));
    // The conditional path (logstore_append_checked).
    let checked = request(
        &client,
        &env.subject("logs"),
        serde_json::json!({"id": id, "log": "four", "expected_seq": 3})
            .to_string()
            .into(),
    )
    .await;
    let checked = parse_reply(&checked.payload).expect("conditional append");
    assert_eq!(checked.seq, 4);
    let logs: Vec<String> = entries(&env.query_all(&client, id).await)
        .into_iter()
        .map(|e| e.log)
        .collect();
    assert_eq!(logs, ["one", "two", "three", "four"]);
    // Time bounds (logstore_seq_at) and order.
    let bounded = env
        .query(
            &client,
            serde_json::json!({"id": id, "since": "2000-01-01T00:00:00Z", "order": "desc", "limit": 2}),
        )
        .await;
    let logs: Vec<String> = entries(&bounded).into_iter().map(|e| e.log).collect();
    assert_eq!(logs, ["four", "three"]);

    let stats = request(
        &client,
        &env.subject("stats"),
        serde_json::json!({"id": id}).to_string().into(),
    )
    .await;
    let stats: StatsReply = serde_json::from_slice(&stats.payload)
        .unwrap_or_else(|_| panic!("stats: {}", String::from_utf8_lossy(&stats.payload)));
    assert_eq!((stats.count, stats.last_seq), (4, 4));

    let deleted = request(
        &client,
        &env.subject("delete"),
        serde_json::json!({"id": id, "before_seq": 3})
            .to_string()
            .into(),
    )
    .await;
    let deleted: DeleteReply = serde_json::from_slice(&deleted.payload)
        .unwrap_or_else(|_| panic!("delete: {}", String::from_utf8_lossy(&deleted.payload)));
    assert_eq!(deleted.deleted, 2);
    let logs: Vec<String> = entries(&env.query_all(&client, id).await)
        .into_iter()
        .map(|e| e.log)
        .collect();
    assert_eq!(logs, ["three", "four"]);
    worker.stop().await.expect("the worker stops");

    // 4. As that role, nothing can be dropped, emptied, altered or created.
    let mut config: tokio_postgres::Config = url(WORKER, WORKER_PASSWORD, &db)
        .parse()
        .expect("worker URL");
    config.connect_timeout(Duration::from_secs(5));
    let (worker_db, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect as the worker's role");
    tokio::spawn(connection);
    for sql in [
        "DROP TABLE logs",
        "DROP TABLE objects",
        "DROP TABLE logstore_migrations",
        "TRUNCATE logs",
        "ALTER TABLE logs ADD COLUMN x int",
        "DROP FUNCTION logstore_seq_at(bigint, timestamptz)",
        "CREATE TABLE intruder (x int)",
        "DELETE FROM logstore_migrations",
        "UPDATE shard_identity SET name = 'b'",
    ] {
        let error = worker_db
            .batch_execute(sql)
            .await
            .expect_err(&format!("the worker's role may run {sql}"));
        assert_eq!(
            error.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {error:?}"
        );
    }
    // The data is still there.
    let rows: i64 = worker_db
        .query_one("SELECT count(*) FROM logs WHERE object_id = 42", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 2);
}

/// `worker migrate --grant` (the binary, as the compose file and local-up.sh run it with the
/// owner's login): migrates a fresh database, records the shard's name and applies roles.sql,
/// so `logstore_app` may write but not truncate; a second run changes nothing and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_migrate_grant_prepares_every_shard() {
    let servers = shared();
    let shards = [
        ("m1", fresh_db(&servers.pg[0], "m1").await),
        ("m2", fresh_db(&servers.pg[1], "m2").await),
    ];
    let spec = shards
        .iter()
        .map(|(name, url)| format!("{name}={url}"))
        .collect::<Vec<_>>()
        .join(",");
    for run in 1..=2 {
        let (code, _, stderr) = run_once(
            "worker",
            &["migrate", "--grant"],
            &[("POSTGRES_SHARDS", spec.clone())],
            60,
        )
        .await;
        assert_eq!(code, Some(0), "run {run}: {stderr}");
        assert!(stderr.contains("roles.sql applied"), "run {run}: {stderr}");
    }
    // The numbered migrations (CURRENT.sql only shows their result).
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .expect("migrations/")
        .filter(|f| {
            f.as_ref().is_ok_and(|f| {
                f.path().extension().is_some_and(|e| e == "sql")
                    && f.file_name()
                        .to_string_lossy()
                        .starts_with(|c: char| c.is_ascii_digit())
            })
        })
        .count() as i64;
    for (name, url) in &shards {
        let db = pg_connect(url).await;
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM logstore_migrations),
                        (SELECT name FROM shard_identity),
                        has_table_privilege('logstore_app', 'logs', 'INSERT'),
                        has_table_privilege('logstore_app', 'logs', 'TRUNCATE'),
                        has_function_privilege('logstore_app',
                            'logstore_seq_at(bigint, timestamptz)', 'EXECUTE')",
                &[],
            )
            .await
            .expect("read the shard");
        let (migrations, identity): (i64, String) = (row.get(0), row.get(1));
        let (insert, truncate, execute): (bool, bool, bool) = (row.get(2), row.get(3), row.get(4));
        assert_eq!((migrations, identity.as_str()), (files, *name));
        assert_eq!(
            (insert, truncate, execute),
            (true, false, true),
            "shard {name}"
        );
    }
}
