//! The query API beyond "after N, oldest first" (issue 12), end to end through a real
//! nats-server into real PostgreSQL: newest-first reads with `before`.
//!
//! Tests share one NATS and two Postgres servers; each has its own subjects and databases. Big
//! logs are seeded by calling the append function directly (one statement instead of 10,000
//! NATS round trips); what the worker answers is then compared with what SQL reads back.

mod support;

use std::time::{Duration, SystemTime};

use logstore_protocol::{LogEntry, QueryResponse};
use support::*;

/// A one-shard world (every object on shard `a`) with a worker running, and that shard's URL.
async fn one_shard() -> (Env, TestWorker, async_nats::Client, String) {
    let env = Env::shared(&["a"]).await;
    let worker = env.start_worker().await; // migrates the database
    let client = env.client().await;
    let url = env.shards[0].1.clone();
    (env, worker, client, url)
}

/// Append `logs` to object `id` with receipt times `received` in one call of the SQL append
/// function, as the worker would in one batch.
async fn seed(url: &str, id: u64, logs: &[String], received: &[SystemTime]) {
    let db = pg_connect(url).await;
    let ids = vec![id as i64; logs.len()];
    let keys: Vec<Option<String>> = vec![None; logs.len()];
    let stored: i64 = within(
        120,
        "seed",
        db.query_one(
            "SELECT count(*) FROM logstore_append($1, $2, $3, $4)",
            &[&ids, &keys, &logs, &received],
        ),
    )
    .await
    .expect("seed through logstore_append")
    .get(0);
    assert_eq!(stored, logs.len() as i64);
}

/// The object's entries as SQL reads them, formatted as a query answers them, by seq.
async fn sql_entries(url: &str, id: u64) -> Vec<LogEntry> {
    db_rows(url, id)
        .await
        .into_iter()
        .map(|(seq, ts, log, _)| LogEntry {
            seq: seq as u64,
            ts: humantime::format_rfc3339_micros(ts).to_string(),
            log,
        })
        .collect()
}

/// One query answered in a single chunk.
async fn page(env: &Env, client: &async_nats::Client, body: serde_json::Value) -> QueryResponse {
    let mut chunks = env.query(client, body.clone()).await;
    assert_eq!(chunks.len(), 1, "{body}: one chunk");
    chunks.remove(0)
}

/// Entries `seqs` (1-based) of `all`, in the order given.
fn pick(all: &[LogEntry], seqs: impl IntoIterator<Item = u64>) -> Vec<LogEntry> {
    seqs.into_iter()
        .map(|seq| all[seq as usize - 1].clone())
        .collect()
}

/// Done-when 1: the last 20 of a 10,000-entry object newest first, then the next page by
/// `before`, are exactly the stored entries; a newest-first read of the whole log streams in
/// chunks whose `next` each continue it; `before` and `after` bound a range in either order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_first_pages_by_before() {
    let (env, worker, client, url) = one_shard().await;
    let id = 42;
    let t0 = SystemTime::now() - Duration::from_secs(3_600);
    // ~150 bytes each: the whole log (about 2 MB as JSON) needs several messages.
    let logs: Vec<String> = (1..=10_000)
        .map(|i| format!("entry {i} {}", "x".repeat(140)))
        .collect();
    let received: Vec<SystemTime> = (0..10_000).map(|i| t0 + Duration::from_millis(i)).collect();
    seed(&url, id, &logs, &received).await;
    let all = sql_entries(&url, id).await;
    assert_eq!(all.len(), 10_000);

    let last20 = page(
        &env,
        &client,
        serde_json::json!({ "id": id, "order": "desc", "limit": 20 }),
    )
    .await;
    assert_eq!(last20.logs, pick(&all, (9_981..=10_000).rev()));
    assert_eq!(
        (last20.total, last20.next, last20.chunk, last20.last),
        (10_000, Some(9_981), 0, true)
    );
    let next20 = page(
        &env,
        &client,
        serde_json::json!({ "id": id, "order": "desc", "limit": 20, "before": 9_981 }),
    )
    .await;
    assert_eq!(next20.logs, pick(&all, (9_961..=9_980).rev()));
    assert_eq!(next20.next, Some(9_961));

    // The whole log newest first: several chunks, each a complete response whose `next` is
    // the `before` cursor after its last entry; together every entry once, newest first.
    let chunks = env
        .query(&client, serde_json::json!({ "id": id, "order": "desc" }))
        .await;
    assert!(chunks.len() >= 2, "2 MB needs several chunks");
    for chunk in &chunks[..chunks.len() - 1] {
        assert_eq!(chunk.next, chunk.logs.last().map(|e| e.seq));
    }
    assert_eq!(chunks.last().map(|c| c.next), Some(None));
    assert_eq!(entries(&chunks), pick(&all, (1..=10_000).rev()));

    // Following `next` with `before` from the end of a chunked read reaches seq 1 exactly.
    let mut before: Option<u64> = None;
    let mut seen = Vec::new();
    loop {
        let mut body = serde_json::json!({ "id": id, "order": "desc", "limit": 3_000 });
        if let Some(before) = before {
            body["before"] = before.into();
        }
        let chunks = env.query(&client, body).await;
        seen.extend(entries(&chunks).into_iter().map(|e| e.seq));
        match chunks.last().and_then(|c| c.next) {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, (1..=10_000).rev().collect::<Vec<_>>());

    // `after` and `before` bound a range in both orders; `next` is null at its end.
    let cases = [
        (
            serde_json::json!({ "id": id, "order": "desc", "after": 9_990, "limit": 5 }),
            (9_996..=10_000).rev().collect::<Vec<u64>>(),
            Some(9_996),
        ),
        (
            serde_json::json!({ "id": id, "order": "desc", "after": 9_990, "before": 9_996 }),
            (9_991..=9_995).rev().collect(),
            None,
        ),
        (
            serde_json::json!({ "id": id, "order": "desc", "after": 9_990, "before": 9_996, "limit": 5 }),
            (9_991..=9_995).rev().collect(),
            None,
        ),
        (
            serde_json::json!({ "id": id, "after": 5, "before": 9 }),
            vec![6, 7, 8],
            None,
        ),
        (
            serde_json::json!({ "id": id, "after": 5, "before": 9, "limit": 2 }),
            vec![6, 7],
            Some(7),
        ),
        (
            serde_json::json!({ "id": id, "order": "desc", "before": 3, "limit": 2 }),
            vec![2, 1],
            None,
        ),
        (
            serde_json::json!({ "id": id, "order": "desc", "before": 1 }),
            vec![],
            None,
        ),
        (
            serde_json::json!({ "id": id, "order": "desc", "before": 18_446_744_073_709_551_615u64, "limit": 1 }),
            vec![10_000],
            Some(10_000),
        ),
        (
            serde_json::json!({ "id": id + 1, "order": "desc", "limit": 20 }),
            vec![],
            None,
        ),
    ];
    for (body, seqs, next) in cases {
        let answer = page(&env, &client, body.clone()).await;
        let got: Vec<u64> = answer.logs.iter().map(|e| e.seq).collect();
        assert_eq!((got, answer.next), (seqs, next), "{body}");
    }

    // A bad order is refused like any other bad query.
    let reply = request(
        &client,
        &env.subject("query"),
        r#"{"id":42,"order":"newest"}"#.into(),
    )
    .await;
    let error: logstore_protocol::ErrorReply = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(
        error.error.code,
        logstore_protocol::ErrorCode::InvalidRequest
    );
    worker.stop().await.unwrap();
}
