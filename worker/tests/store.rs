//! The append function's batch semantics, called directly against a real Postgres: duplicates
//! within a batch and across batches, keyless entries, the same key on different objects, and
//! receipt times that go backwards.

mod support;

use std::time::{Duration, SystemTime};

use support::*;
use worker::config::ShardConfig;
use worker::store::{NewEntry, Shard, Stored};

fn entry(id: u64, key: Option<&str>, log: &str, received: SystemTime) -> NewEntry {
    NewEntry {
        id,
        key: key.map(str::to_string),
        log: log.to_string(),
        received,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_numbers_entries_and_answers_duplicates_with_the_original() {
    let url = fresh_db(&shared().pg[0], "store").await;
    let shard = Shard::new(
        &ShardConfig {
            name: "s".into(),
            url: url.clone(),
        },
        2,
        Duration::from_secs(10),
    )
    .unwrap();
    within(30, "initialise", shard.initialise()).await.unwrap();

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
        shard.append(&batch.iter().collect::<Vec<_>>()),
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
        shard.append(&second.iter().collect::<Vec<_>>()),
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
