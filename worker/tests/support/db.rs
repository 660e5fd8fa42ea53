//! Reading shard databases directly: a connection in one line, an object's rows, and every
//! storage invariant of a shard checked at once.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

/// Connects with tokio-postgres (NoTls) and drives the connection on a spawned task, so tests
/// can inspect/prepare shard contents in one line. Must be called inside a tokio runtime.
pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("pg_connect({url}): {e}"));
    // Errors here mean the server went away (often on purpose in kill tests): the client
    // reports them on its next call, so they are not printed.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Rows of one object as stored on a shard: (seq, ts, log, key).
pub async fn db_rows(
    url: &str,
    id: u64,
) -> Vec<(i64, std::time::SystemTime, String, Option<String>)> {
    let client = pg_connect(url).await;
    client
        .query(
            "SELECT seq, ts, log, key FROM logs WHERE object_id = $1 ORDER BY seq",
            &[&(id as i64)],
        )
        .await
        .expect("read rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Every storage invariant of one shard database, for every object on it: seq 1..=n without
/// gaps, ts never decreasing along seq, each key once, and the head row equal to what the log
/// holds (count, last seq/ts, and the statistics: first seq/ts, bytes). Returns the number of
/// entries per object. (For shards where nothing was deleted: it expects seqs from 1.)
pub async fn check_shard_invariants(url: &str) -> HashMap<i64, i64> {
    let db = pg_connect(url).await;
    let rows = db
        .query(
            "SELECT object_id, seq, ts, key, octet_length(log) FROM logs ORDER BY object_id, seq",
            &[],
        )
        .await
        .unwrap();
    // Per object: (last seq, last ts, first ts, bytes).
    let mut per_object: HashMap<i64, (i64, SystemTime, SystemTime, i64)> = HashMap::new();
    let mut keys = HashSet::new();
    for row in &rows {
        let (id, seq, ts, key, bytes): (i64, i64, SystemTime, Option<String>, i32) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let (last_seq, last_ts, _, total) =
            per_object
                .entry(id)
                .or_insert((0, SystemTime::UNIX_EPOCH, ts, 0));
        assert_eq!(
            seq,
            *last_seq + 1,
            "object {id}: seq {seq} after {last_seq}"
        );
        assert!(ts >= *last_ts, "object {id}: ts decreases at seq {seq}");
        (*last_seq, *last_ts) = (seq, ts);
        *total += i64::from(bytes);
        if let Some(key) = key {
            assert!(
                keys.insert((id, key.clone())),
                "object {id}: key {key} stored twice"
            );
        }
    }
    let heads = db
        .query(
            "SELECT id, entries, last_seq, last_ts, first_seq, first_ts, bytes, moved_to FROM objects",
            &[],
        )
        .await
        .unwrap();
    let mut counts = HashMap::new();
    for row in &heads {
        let (id, entries, last_seq, last_ts): (i64, i64, i64, SystemTime) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let (first_seq, first_ts, bytes): (Option<i64>, Option<SystemTime>, i64) =
            (row.get(4), row.get(5), row.get(6));
        // A tombstone: the object moved to another shard (docs/resharding.md) and its entries
        // here were purged; its head keeps the seq the object had reached.
        let moved_to: Option<String> = row.get(7);
        if let Some(to) = moved_to {
            assert!(
                !per_object.contains_key(&id),
                "object {id}: moved to {to}, yet entries remain"
            );
            continue;
        }
        let (seq, ts, first, total) = per_object.get(&id).copied().unwrap_or((
            0,
            SystemTime::UNIX_EPOCH,
            SystemTime::UNIX_EPOCH,
            0,
        ));
        assert_eq!((entries, last_seq), (seq, seq), "object {id}: head row");
        assert_eq!(bytes, total, "object {id}: head bytes");
        if seq > 0 {
            assert_eq!(last_ts, ts, "object {id}: head last_ts");
            assert_eq!(
                (first_seq, first_ts),
                (Some(1), Some(first)),
                "object {id}: head first_seq/first_ts"
            );
        } else {
            assert_eq!(
                (first_seq, first_ts),
                (None, None),
                "object {id}: empty head"
            );
        }
        counts.insert(id, entries);
    }
    assert_eq!(counts.len(), per_object.len(), "a head row per object");
    counts
}
