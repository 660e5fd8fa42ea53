//! The append function's batch semantics, called directly against a real Postgres: duplicates
//! within a batch and across batches, keyless entries, the same key on different objects,
//! receipt times that go backwards, concurrent batches over the same objects, and a shard
//! upgraded from schema version 1.
//!
//! A batch runs one of two paths (migrations/0002_fast_append.sql): the one-pass fast path when
//! it holds no stored or repeated key, else the careful path. Both must give the same answers.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use support::*;
use worker::config::ShardConfig;
use worker::store::{Appended, Copied, NewEntry, Routing, Shard, StoreError, Stored};

fn entry(id: u64, key: Option<&str>, log: &str, received: SystemTime) -> NewEntry {
    NewEntry {
        id,
        key: key.map(str::to_string),
        log: log.to_string(),
        received,
    }
}

/// Now, at the microsecond precision Postgres stores, so stored times compare equal.
fn now_micros() -> SystemTime {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_micros(since.as_micros() as u64)
}

/// An initialised shard on a fresh database, and the database's URL.
async fn new_shard(pool_size: usize) -> (Shard, String) {
    let url = fresh_db(&shared().pg[0], "store").await;
    let shard = open_shard(&url, pool_size);
    within(30, "initialise", shard.initialise()).await.unwrap();
    (shard, url)
}

fn open_shard(url: &str, pool_size: usize) -> Shard {
    Shard::new(
        &ShardConfig {
            name: "s".into(),
            url: url.to_string(),
        },
        pool_size,
        Duration::from_secs(20),
    )
    .unwrap()
}

/// Append a batch without conditions and without routing (epoch 0, nothing moving), as
/// these tests of the append function's own semantics do: every entry must come back stored.
async fn append_plain(
    shard: &Shard,
    entries: &[&NewEntry],
    deadline: tokio::time::Instant,
) -> Result<Vec<Stored>, StoreError> {
    shard
        .append_expecting(entries, &[], Routing::default(), deadline)
        .await?
        .into_iter()
        .map(|appended| match appended {
            Appended::Stored(stored) => Ok(stored),
            other => Err(StoreError::Unexpected {
                shard: shard.name.clone(),
                what: format!("{other:?} for an append without conditions or routing"),
            }),
        })
        .collect()
}

async fn append(shard: &Shard, batch: &[NewEntry]) -> Vec<Stored> {
    within(
        30,
        "append",
        append_plain(shard, &batch.iter().collect::<Vec<_>>(), soon()),
    )
    .await
    .unwrap()
}

/// The object's head row: (entries, last_seq, last_ts).
async fn head(url: &str, id: u64) -> (i64, i64, SystemTime) {
    let db = pg_connect(url).await;
    let row = db
        .query_one(
            "SELECT entries, last_seq, last_ts FROM objects WHERE id = $1",
            &[&(id as i64)],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_numbers_entries_and_answers_duplicates_with_the_original() {
    let (shard, url) = new_shard(2).await;

    let t0 = SystemTime::now();
    let later = t0 + Duration::from_secs(5);
    let batch = [
        entry(1, Some("k1"), "a", later),
        entry(1, Some("k2"), "b", t0), // received "earlier" than the entry before it
        entry(1, Some("k1"), "a again", t0),
        entry(2, None, "c", t0),
        entry(2, Some("k1"), "same key, other object", t0),
        entry(1, None, "d", t0),
    ];
    let stored = within(
        30,
        "append",
        append_plain(&shard, &batch.iter().collect::<Vec<_>>(), soon()),
    )
    .await
    .unwrap();
    let view: Vec<(u64, bool)> = stored.iter().map(|s| (s.seq, s.duplicate)).collect();
    assert_eq!(
        view,
        [
            (1, false),
            (2, false),
            (1, true),
            (1, false),
            (2, false),
            (3, false)
        ]
    );
    assert_eq!(
        stored[2].ts, stored[0].ts,
        "a duplicate answers with the original's ts"
    );
    assert!(
        stored[1].ts >= stored[0].ts,
        "ts raised so it never decreases along seq"
    );
    assert!(stored[5].ts >= stored[1].ts);

    let second = [entry(1, Some("k2"), "b again", t0), entry(1, None, "e", t0)];
    let again = within(
        30,
        "append",
        append_plain(&shard, &second.iter().collect::<Vec<_>>(), soon()),
    )
    .await
    .unwrap();
    assert_eq!(
        again[0],
        Stored {
            seq: 2,
            ts: stored[1].ts,
            duplicate: true
        }
    );
    assert_eq!((again[1].seq, again[1].duplicate), (4, false));

    let rows = db_rows(&url, 1).await;
    let logs: Vec<(i64, &str)> = rows.iter().map(|r| (r.0, r.2.as_str())).collect();
    assert_eq!(logs, [(1, "a"), (2, "b"), (3, "d"), (4, "e")]);
    let db = pg_connect(&url).await;
    let head = db
        .query_one("SELECT entries, last_seq FROM objects WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!((head.get::<_, i64>(0), head.get::<_, i64>(1)), (4, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_without_duplicates_continue_each_head_and_never_move_ts_backwards() {
    let (shard, url) = new_shard(2).await;
    let t0 = now_micros();
    let first = append(
        &shard,
        &[
            entry(10, Some("a"), "a", t0 + Duration::from_secs(60)),
            entry(11, None, "b", t0),
            entry(10, None, "c", t0 + Duration::from_secs(30)),
        ],
    )
    .await;
    let view: Vec<(u64, bool)> = first.iter().map(|s| (s.seq, s.duplicate)).collect();
    assert_eq!(view, [(1, false), (1, false), (2, false)]);
    assert_eq!(first[0].ts, t0 + Duration::from_secs(60));
    assert_eq!(
        first[2].ts, first[0].ts,
        "received earlier than the entry before it: raised to its ts"
    );
    assert_eq!(
        first[1].ts, t0,
        "another object's ts is its own receipt time"
    );

    // Received before object 10's last ts: raised to it. Object 12 is new, object 11 goes on.
    let second = append(
        &shard,
        &[
            entry(12, Some("a"), "d", t0),
            entry(10, Some("b"), "e", t0),
            entry(11, Some("a"), "f", t0 + Duration::from_secs(1)),
            entry(10, None, "g", t0 + Duration::from_secs(90)),
        ],
    )
    .await;
    let view: Vec<(u64, bool)> = second.iter().map(|s| (s.seq, s.duplicate)).collect();
    assert_eq!(view, [(1, false), (3, false), (2, false), (4, false)]);
    assert_eq!(second[1].ts, first[0].ts);
    assert_eq!(second[2].ts, t0 + Duration::from_secs(1));
    assert_eq!(second[3].ts, t0 + Duration::from_secs(90));

    assert_eq!(head(&url, 10).await, (4, 4, t0 + Duration::from_secs(90)));
    assert_eq!(head(&url, 12).await, (1, 1, t0));
    let logs: Vec<String> = db_rows(&url, 10).await.into_iter().map(|r| r.2).collect();
    assert_eq!(logs, ["a", "c", "e", "g"]);
    let counts = check_shard_invariants(&url).await;
    assert_eq!(counts, HashMap::from([(10, 4), (11, 2), (12, 1)]));
}

/// Only a batch that holds a stored or repeated key takes the careful path: counted with the
/// function statistics of the calling transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_batch_with_a_duplicate_takes_the_careful_path() {
    let (_shard, url) = new_shard(1).await;
    let mut db = pg_connect(&url).await;
    let tx = db.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL track_functions = 'pl'")
        .await
        .unwrap();
    let call = "SELECT seq, duplicate FROM logstore_append($1::bigint[], $2::text[], $3::text[], \
                array_fill(now(), ARRAY[cardinality($1::bigint[])]))";
    let careful_calls = "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_xact_user_functions \
                         WHERE funcname = 'logstore_append_careful'";
    let append = |ids: Vec<i64>, keys: Vec<Option<&'static str>>| {
        let logs: Vec<String> = (0..ids.len()).map(|i| format!("log {i}")).collect();
        let tx = &tx;
        async move {
            let rows = tx.query(call, &[&ids, &keys, &logs]).await.unwrap();
            let answers: Vec<(i64, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let careful: i64 = tx.query_one(careful_calls, &[]).await.unwrap().get(0);
            (answers, careful)
        }
    };
    assert_eq!(
        append(vec![1, 2, 1], vec![Some("x"), Some("x"), None]).await,
        (vec![(1, false), (1, false), (2, false)], 0)
    );
    assert_eq!(
        append(vec![1, 1], vec![Some("y"), Some("x")]).await,
        (vec![(3, false), (1, true)], 1),
        "a stored key: careful path, its neighbour still stored"
    );
    assert_eq!(
        append(vec![3, 3], vec![Some("z"), Some("z")]).await,
        (vec![(1, false), (1, true)], 2),
        "a key repeated inside the batch: careful path"
    );
    assert_eq!(
        append(vec![3, 1], vec![Some("w"), None]).await,
        (vec![(2, false), (4, false)], 2)
    );
    tx.commit().await.unwrap();
    let counts = check_shard_invariants(&url).await;
    assert_eq!(counts, HashMap::from([(1, 4), (2, 1), (3, 2)]));
}

/// Many batches at once over the same few objects, from separate connections, each with keys
/// that other batches also carry: no deadlock, no error, every key stored once, every log gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overlapping_batches_store_each_key_once_without_gaps() {
    const TASKS: u64 = 6;
    const BATCHES: u64 = 15;
    const KEYS: u64 = 400;
    let (shard, url) = new_shard(TASKS as usize).await;
    let shard = Arc::new(shard);
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let shard = shard.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for batch in 0..BATCHES {
                // Objects 0..5 in an order that differs per task, keys drawn so that tasks
                // overlap: the same key may reach the database from several batches at once.
                let entries: Vec<NewEntry> = (0..40u64)
                    .map(|i| {
                        let k = (task * 7919 + batch * 104_729 + i * 31) % KEYS;
                        let id = (k + task) % 5;
                        entry(id, Some(&format!("k{k}")), "x", SystemTime::now())
                    })
                    .collect();
                let stored = append_plain(&shard, &entries.iter().collect::<Vec<_>>(), soon())
                    .await
                    .map_err(|e| e.to_string())?;
                for (e, s) in entries.iter().zip(stored) {
                    answers.push((e.id, e.key.clone().unwrap_or_default(), s.seq));
                }
            }
            Ok::<_, String>(answers)
        }));
    }
    let mut seen: HashMap<(u64, String), u64> = HashMap::new();
    for task in tasks {
        let answers = within(120, "concurrent appends", task)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("an append failed: {e}"));
        for (id, key, seq) in answers {
            let first = *seen.entry((id, key.clone())).or_insert(seq);
            assert_eq!(first, seq, "object {id} key {key} answered with two seqs");
        }
    }
    let counts = check_shard_invariants(&url).await;
    assert_eq!(
        counts.values().sum::<i64>() as usize,
        seen.len(),
        "one entry per distinct (object, key) sent"
    );
}

/// A shard created by schema version 1 (before the fast path) keeps its numbering and ts order
/// once a newer worker migrates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_from_schema_version_1_continues_after_the_upgrade() {
    let url = fresh_db(&shared().pg[0], "store").await;
    let db = pg_connect(&url).await;
    let v1 = include_str!("../../migrations/0001_schema.sql");
    db.batch_execute(&format!(
        "CREATE TABLE logstore_migrations (version integer PRIMARY KEY, name text NOT NULL, \
         applied_at timestamptz NOT NULL DEFAULT now());
         {v1}
         INSERT INTO logstore_migrations (version, name) VALUES (1, 'schema');
         INSERT INTO shard_identity (name) VALUES ('s');
         SELECT count(*) FROM logstore_append(ARRAY[7, 7]::bigint[], ARRAY['a', NULL],
             ARRAY['old 1', 'old 2'], ARRAY[now() + interval '1 hour', now()]);"
    ))
    .await
    .unwrap();
    let (_, _, old_last_ts) = head(&url, 7).await;

    let shard = open_shard(&url, 1);
    within(30, "initialise", shard.initialise()).await.unwrap();
    let t0 = now_micros();
    let stored = append(
        &shard,
        &[
            entry(7, Some("b"), "new 1", t0),
            entry(7, Some("a"), "dup", t0),
        ],
    )
    .await;
    assert_eq!(
        (
            stored[0].seq,
            stored[0].ts,
            stored[1].seq,
            stored[1].duplicate
        ),
        (3, old_last_ts, 1, true)
    );
    let stored = append(&shard, &[entry(7, None, "new 2", t0)]).await;
    assert_eq!((stored[0].seq, stored[0].ts), (4, old_last_ts));
    assert_eq!(check_shard_invariants(&url).await, HashMap::from([(7, 4)]));
}

/// A deadline no healthy test shard comes near.
fn soon() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(20)
}

/// The ring's epoch fence and tombstones (migrations/0007_resharding.sql), called directly: a
/// request routed by an older ring than the shard has seen stores nothing (so a worker that
/// has not learnt of a move cannot create an object where the new ring does not place it), the
/// first request of a newer epoch raises the fence, an object named as moving is stored only
/// where it lives, and a moved object answers `moved` to appends and reads alike.
#[tokio::test]
async fn the_epoch_fence_and_tombstones_decide_what_a_shard_stores() {
    let (a, a_url) = new_shard(2).await;
    let b_url = fresh_db(&shared().pg[1], "store_b").await;
    let b = Shard::new(
        &ShardConfig {
            name: "b".into(),
            url: b_url.clone(),
        },
        2,
        Duration::from_secs(20),
    )
    .unwrap();
    within(30, "initialise b", b.initialise()).await.unwrap();
    let at = |epoch: u64, moving: &'static [u64]| Routing { epoch, moving };
    let now = now_micros();
    let first = entry(1, Some("k1"), "one", now);
    let append_at = |shard: &'static str, routing: Routing<'static>, e: &NewEntry| {
        let shard = if shard == "a" { &a } else { &b };
        let e = e.clone();
        async move {
            within(
                30,
                "append",
                shard.append_expecting(&[&e], &[], routing, soon()),
            )
            .await
        }
    };

    // Epoch 2 raises the fence; epoch 1 is refused from then on, and stores nothing.
    let stored = append_at("a", at(2, &[]), &first).await.unwrap();
    assert!(matches!(stored[..], [Appended::Stored(_)]), "{stored:?}");
    let fresh = entry(99, Some("k99"), "stale", now);
    match append_at("a", at(1, &[]), &fresh).await {
        Err(StoreError::StaleEpoch { epoch, fence, .. }) => assert_eq!((epoch, fence), (1, 2)),
        other => panic!("an epoch-1 append after epoch 2: {other:?}"),
    }
    assert_eq!(
        count(&a_url, "SELECT count(*) FROM objects WHERE id = 99").await,
        0,
        "a stale append created its object"
    );
    match a.stats(1, 1).await {
        Err(StoreError::StaleEpoch { fence: 2, .. }) => {}
        other => panic!("an epoch-1 read after epoch 2: {other:?}"),
    }

    // An object named as moving is stored where it lives, and answered `moved` where it never
    // lived (it goes to its new owner instead).
    let more = entry(1, Some("k2"), "two", now);
    let stored = append_at("a", at(2, &[1]), &more).await.unwrap();
    assert!(
        matches!(stored[..], [Appended::Stored(Stored { seq: 2, .. })]),
        "{stored:?}"
    );
    let absent = entry(7, Some("k7"), "never here", now);
    let moved = append_at("a", at(2, &[7]), &absent).await.unwrap();
    assert_eq!(moved, vec![Appended::Moved]);
    assert_eq!(
        count(&a_url, "SELECT count(*) FROM objects WHERE id = 7").await,
        0
    );

    // Moving object 1 to b: b continues its seqs and keys, a keeps a tombstone that sends
    // appends and reads on.
    // (Pages of 2: an object of one page is copied under its lock, with nothing copied first.)
    let copied = within(30, "move", a.move_to(&b, 1, 2, 2)).await.unwrap();
    assert_eq!(copied, Some(Copied { bulk: 0, locked: 2 }));
    assert_eq!(
        within(30, "move again", a.move_to(&b, 1, 2, 2))
            .await
            .unwrap(),
        None
    );
    let again = append_at("a", at(2, &[1]), &entry(1, Some("k3"), "three", now))
        .await
        .unwrap();
    assert_eq!(again, vec![Appended::Moved]);
    let on_b = append_at("b", at(2, &[]), &entry(1, Some("k3"), "three", now))
        .await
        .unwrap();
    assert!(
        matches!(
            on_b[..],
            [Appended::Stored(Stored {
                seq: 3,
                duplicate: false,
                ..
            })]
        ),
        "{on_b:?}"
    );
    let dup = append_at("b", at(2, &[]), &entry(1, Some("k1"), "one", now))
        .await
        .unwrap();
    assert!(
        matches!(
            dup[..],
            [Appended::Stored(Stored {
                seq: 1,
                duplicate: true,
                ..
            })]
        ),
        "{dup:?}"
    );
    match a.stats(1, 2).await {
        Err(StoreError::Moved { to, .. }) => assert_eq!(to, "b"),
        other => panic!("stats of a moved object on its old shard: {other:?}"),
    }
    let (stats, exists) = b.stats(1, 2).await.unwrap();
    assert!(exists);
    assert_eq!((stats.count, stats.last_seq), (3, 3));
}

/// Moving an object of more than one page copies its bulk before taking its lock
/// (`Shard::precopy`): entries appended and a prefix deleted on the old shard between that copy
/// and the move end up on the new shard exactly as on the old one, with only what was appended
/// meanwhile copied later (and nothing under the lock). A copy with a gap (which the reasoning
/// in `precopy` rules out) is not trusted: the object is copied again, whole, under its lock.
#[tokio::test]
async fn a_large_object_is_copied_in_bulk_first_and_arrives_exactly_as_it_was() {
    let (a, a_url) = new_shard(2).await;
    let b_url = fresh_db(&shared().pg[1], "store_bulk").await;
    let b = open_shard(&b_url, 2);
    within(30, "initialise b", b.initialise()).await.unwrap();
    let now = now_micros();
    let entries = |id: u64, seqs: std::ops::Range<u64>| -> Vec<NewEntry> {
        seqs.map(|n| {
            entry(
                id,
                Some(&format!("k{n}")),
                &format!("entry {n} of {id}"),
                now,
            )
        })
        .collect()
    };
    for start in (1..2_501).step_by(500) {
        append(&a, &entries(5, start..start + 500)).await;
    }
    append(&a, &entries(6, 1..1_501)).await;

    // The bulk, without a lock: object 5 up to its last entry, in pages of 1,000.
    assert_eq!(
        within(60, "precopy", a.precopy(&b, 5, 1_000))
            .await
            .unwrap(),
        2_500
    );
    assert_eq!(
        count(&b_url, "SELECT count(*) FROM logs WHERE object_id = 5").await,
        2_500
    );
    assert_eq!(
        count(&b_url, "SELECT count(*) FROM objects WHERE id = 5").await,
        0,
        "b is not the object's home before the move"
    );
    // Meanwhile on a: 100 more entries, and the entries below seq 1,201 deleted.
    append(&a, &entries(5, 2_501..2_601)).await;
    let db = pg_connect(&a_url).await;
    db.execute("SELECT logstore_delete(5, 1201, 1000000, false)", &[])
        .await
        .unwrap();
    let before = rows(&a_url, 5).await;
    assert_eq!(before.len(), 1_400);
    let head_before = heads(&a_url, 5).await;

    // The move copies the 100 new entries before its lock too, trims the deleted ones, and
    // finds nothing left to copy under the lock.
    let copied = within(60, "move", a.move_to(&b, 5, 2, 1_000))
        .await
        .unwrap();
    assert_eq!(
        copied,
        Some(Copied {
            bulk: 100,
            locked: 0
        }),
        "entries copied before and under the lock"
    );
    assert_eq!(rows(&b_url, 5).await, before, "object 5 on b");
    assert_eq!(heads(&b_url, 5).await, head_before, "object 5's head on b");
    assert_eq!(
        count(
            &a_url,
            "SELECT count(*) FROM objects WHERE id = 5 AND moved_to = 's'"
        )
        .await,
        1,
        "a keeps a tombstone naming b"
    );

    // A copy with a gap is replaced by a whole copy under the lock.
    a.precopy(&b, 6, 1_000).await.unwrap();
    pg_connect(&b_url)
        .await
        .execute("DELETE FROM logs WHERE object_id = 6 AND seq = 700", &[])
        .await
        .unwrap();
    let before = rows(&a_url, 6).await;
    let copied = within(60, "move", a.move_to(&b, 6, 2, 1_000))
        .await
        .unwrap();
    assert_eq!(
        copied,
        Some(Copied {
            bulk: 0,
            locked: 1_500
        })
    );
    assert_eq!(rows(&b_url, 6).await, before, "object 6 on b");
}

/// Object `id`'s entries at `url`: (seq, ts, key, log) by seq.
async fn rows(url: &str, id: i64) -> Vec<(i64, SystemTime, Option<String>, String)> {
    pg_connect(url)
        .await
        .query(
            "SELECT seq, ts, key, log FROM logs WHERE object_id = $1 ORDER BY seq",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Object `id`'s head row at `url`: (entries, first_seq, last_seq, bytes, last_ts as text).
async fn heads(url: &str, id: i64) -> (i64, Option<i64>, i64, i64, String) {
    let row = pg_connect(url)
        .await
        .query_one(
            "SELECT entries, first_seq, last_seq, bytes, last_ts::text FROM objects WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
}

/// The single bigint `sql` answers on the database at `url`.
async fn count(url: &str, sql: &str) -> i64 {
    pg_connect(url)
        .await
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

/// migrations/CURRENT.sql is the schema the migrations make: a freshly migrated database's
/// tables, indexes and logstore_* functions, as scripts/current-schema.sql reads them from the
/// catalog, equal the file's (its header of `--` lines left out, whitespace runs read as one
/// space). A migration that changes any of them fails this until the file is regenerated
/// (scripts/current-schema.sh, which runs this test with LOGSTORE_WRITE_CURRENT_SQL=1).
#[tokio::test]
async fn current_sql_is_the_schema_the_migrations_make() {
    let (_shard, url) = new_shard(1).await;
    let rows = pg_connect(&url)
        .await
        .query(include_str!("../../scripts/current-schema.sql"), &[])
        .await
        .unwrap();
    let schema: Vec<String> = rows.iter().map(|row| row.get("ddl")).collect();
    let schema = schema.join("\n\n") + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/CURRENT.sql");
    let file = std::fs::read_to_string(path).unwrap_or_default();
    let header: String = file
        .lines()
        .take_while(|line| line.starts_with("--") || line.is_empty())
        .map(|line| format!("{line}\n"))
        .collect();
    if std::env::var_os("LOGSTORE_WRITE_CURRENT_SQL").is_some() {
        std::fs::write(path, format!("{header}{schema}")).unwrap();
    }
    let file = std::fs::read_to_string(path).unwrap();
    let lines = |text: &str| -> Vec<String> {
        text.lines()
            .skip_while(|line| line.starts_with("--") || line.is_empty())
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|line| !line.is_empty())
            .collect()
    };
    let (want, have) = (lines(&schema), lines(&file));
    if let Some(at) = (0..want.len().max(have.len())).find(|&i| want.get(i) != have.get(i)) {
        panic!(
            "migrations/CURRENT.sql differs from the migrated schema at its body's line {}:\n  \
             file:     {:?}\n  migrated: {:?}\nrun scripts/current-schema.sh (migrations stay \
             the source of truth; CURRENT.sql only shows their result)",
            at + 1,
            have.get(at),
            want.get(at)
        );
    }
}
