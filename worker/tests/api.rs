//! The query API beyond "after N, oldest first" (issue 12), end to end through a real
//! nats-server into real PostgreSQL: newest-first reads with `before`, time ranges with
//! `since`/`until` (and proof by EXPLAIN that they are one primary-key range scan), stats
//! kept exactly in the head row, optimistic concurrency with `expected_seq`, deletion and the
//! retention sweeper.
//!
//! Tests share one NATS and two Postgres servers; each has its own subjects and databases. Big
//! logs are seeded by calling the append function directly (one statement instead of 10,000
//! NATS round trips); what the worker answers is then compared with what SQL reads back.

mod support;

use std::time::{Duration, SystemTime};

use std::collections::{BTreeMap, HashSet};

use futures::StreamExt;
use logstore_protocol::{
    AppendReply, BatchReply, DeleteReply, EntryResult, ErrorCode, ErrorReply, LogEntry,
    QueryResponse, StatsReply, Timestamp,
};
use support::*;
use worker::config::ShardConfig;
use worker::store::{sql, Shard};

/// A one-shard world (every object on shard `a`) with a worker running, and that shard's URL.
async fn one_shard() -> (Env, TestWorker, async_nats::Client, String) {
    let env = Env::shared(&["a"]).await;
    let worker = env.start_worker(&[]).await; // migrates the database
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

/// A time as the contract writes it, as the receipt time of a seeded entry.
fn at(text: &str) -> SystemTime {
    Timestamp::parse(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .to_system_time()
}

/// Seeds object `id` with 10,000 entries whose times have every edge a time bound can meet:
/// seq 1 at 00:00:00Z, 2 one microsecond later, 3..=5 all at .000002 (equal ts), 6 at 00:00:01,
/// 7 one microsecond before 00:00:02, 8 at 00:00:02, then one per millisecond from 00:00:03
/// (seq n at 3 s + (n - 9) ms, up to seq 10,000 at 00:00:12.991).
async fn seed_timeline(url: &str, id: u64) {
    let mut received = vec![
        at("2026-01-01T00:00:00Z"),
        at("2026-01-01T00:00:00.000001Z"),
        at("2026-01-01T00:00:00.000002Z"),
        at("2026-01-01T00:00:00.000002Z"),
        at("2026-01-01T00:00:00.000002Z"),
        at("2026-01-01T00:00:01Z"),
        at("2026-01-01T00:00:01.999999Z"),
        at("2026-01-01T00:00:02Z"),
    ];
    let t3 = at("2026-01-01T00:00:03Z");
    received.extend((9..=10_000u64).map(|n| t3 + Duration::from_millis(n - 9)));
    let logs: Vec<String> = (1..=10_000).map(|n| format!("t{n}")).collect();
    seed(url, id, &logs, &received).await;
}

/// Done-when 2: `since` (inclusive) and `until` (exclusive) at entry boundaries, on runs of
/// equal ts and at microsecond edges, in any RFC 3339 offset and precision, return exactly the
/// entries in range, in either order, combined with seq cursors and paging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_ranges_return_exactly_the_entries_in_range() {
    let (env, worker, client, url) = one_shard().await;
    let id = 7;
    seed_timeline(&url, id).await;
    let all = sql_entries(&url, id).await;
    assert_eq!(all[2].ts, "2026-01-01T00:00:00.000002Z");
    assert_eq!(
        (all[2].ts.clone(), all[4].ts.clone()),
        (all[3].ts.clone(), all[3].ts.clone())
    );
    assert_eq!(all[9_999].ts, "2026-01-01T00:00:12.991000Z");

    let q = |extra: serde_json::Value| {
        let mut body = serde_json::json!({ "id": id });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let asc = |r: std::ops::RangeInclusive<u64>| r.collect::<Vec<u64>>();
    let desc = |r: std::ops::RangeInclusive<u64>| r.rev().collect::<Vec<u64>>();
    let cases: Vec<(serde_json::Value, Vec<u64>, Option<u64>)> = vec![
        // `since` on a run of equal ts includes the whole run; a microsecond earlier adds seq 2.
        (
            q(serde_json::json!({ "since": "2026-01-01T00:00:00.000002Z", "limit": 5 })),
            asc(3..=7),
            Some(7),
        ),
        (
            q(serde_json::json!({ "since": "2026-01-01T00:00:00.000001Z", "limit": 2 })),
            asc(2..=3),
            Some(3),
        ),
        // Finer than a microsecond rounds up: just after .000001 is .000002.
        (
            q(serde_json::json!({ "since": "2026-01-01T00:00:00.000001001Z", "limit": 1 })),
            asc(3..=3),
            Some(3),
        ),
        (
            q(serde_json::json!({ "since": "2026-01-01T00:00:00.0000010Z", "limit": 1 })),
            asc(2..=2),
            Some(2),
        ),
        // `until` excludes its own instant: the run of equal ts is all out or all in.
        (
            q(serde_json::json!({ "until": "2026-01-01T00:00:00.000002Z" })),
            asc(1..=2),
            None,
        ),
        (
            q(serde_json::json!({ "until": "2026-01-01T00:00:00.0000020001Z" })),
            asc(1..=5),
            None,
        ),
        (
            q(serde_json::json!({ "until": "2026-01-01T00:00:00.000003Z" })),
            asc(1..=5),
            None,
        ),
        // Other offsets: 00:00:01Z written as +05:30 and 00:00:02Z as -05:00.
        (
            q(
                serde_json::json!({ "since": "2026-01-01T05:30:01+05:30", "until": "2025-12-31T19:00:02-05:00" }),
            ),
            asc(6..=7),
            None,
        ),
        (
            q(
                serde_json::json!({ "since": "2026-01-01T00:00:01.999999Z", "until": "2026-01-01T00:00:02.000001Z" }),
            ),
            asc(7..=8),
            None,
        ),
        (
            q(
                serde_json::json!({ "since": "2026-01-01 00:00:01.999999z", "until": "2026-01-01t00:00:02.000000001+00:00" }),
            ),
            asc(7..=8),
            None,
        ),
        // Empty ranges.
        (
            q(
                serde_json::json!({ "since": "2026-01-01T00:00:01Z", "until": "2026-01-01T00:00:01Z" }),
            ),
            vec![],
            None,
        ),
        (
            q(
                serde_json::json!({ "since": "2026-01-01T00:00:02Z", "until": "2026-01-01T00:00:01Z" }),
            ),
            vec![],
            None,
        ),
        (
            q(serde_json::json!({ "until": "2025-01-01T00:00:00Z" })),
            vec![],
            None,
        ),
        (
            q(serde_json::json!({ "since": "2027-01-01T00:00:00Z" })),
            vec![],
            None,
        ),
        (
            q(
                serde_json::json!({ "since": "2026-01-01T00:00:00.000003Z", "until": "2026-01-01T00:00:01Z" }),
            ),
            vec![],
            None,
        ),
        // Newest first.
        (
            q(serde_json::json!({ "since": "2025-01-01T00:00:00Z", "order": "desc", "limit": 3 })),
            desc(9_998..=10_000),
            Some(9_998),
        ),
        (
            q(serde_json::json!({ "until": "2026-01-01T00:00:01Z", "order": "desc" })),
            desc(1..=5),
            None,
        ),
        (
            q(serde_json::json!({ "until": "2026-01-01T00:00:01Z", "order": "desc", "limit": 4 })),
            desc(2..=5),
            Some(2),
        ),
        (
            q(
                serde_json::json!({ "since": "2026-01-01T00:00:05Z", "until": "2026-01-01T00:00:06Z", "order": "desc" }),
            ),
            desc(2_009..=3_008),
            None,
        ),
        // Combined with seq cursors.
        (
            q(
                serde_json::json!({ "since": "2026-01-01T00:00:00.000002Z", "after": 4, "limit": 2 }),
            ),
            asc(5..=6),
            Some(6),
        ),
        (
            q(
                serde_json::json!({ "since": "2026-01-01T00:00:00.000002Z", "until": "2026-01-01T00:00:02Z", "order": "desc", "before": 7 }),
            ),
            desc(3..=6),
            None,
        ),
        (
            q(
                serde_json::json!({ "since": "2026-01-01T00:00:00.000002Z", "after": 5, "before": 6 }),
            ),
            vec![],
            None,
        ),
        (
            q(serde_json::json!({ "until": "2026-01-01T00:00:02Z", "after": 10 })),
            vec![],
            None,
        ),
    ];
    for (body, seqs, next) in cases {
        let answer = page(&env, &client, body.clone()).await;
        assert_eq!(answer.total, 10_000, "{body}: total is the object's count");
        assert_eq!(
            (answer.logs.clone(), answer.next),
            (pick(&all, seqs), next),
            "{body}"
        );
    }

    // Paging through a time range newest first by `before`, and oldest first by `after`,
    // gives the range exactly once.
    for order in ["asc", "desc"] {
        let mut cursor: Option<u64> = None;
        let mut seen = Vec::new();
        loop {
            let mut body = q(serde_json::json!({
                "since": "2026-01-01T00:00:00.000001Z",
                "until": "2026-01-01T00:00:04.000001Z",
                "order": order,
                "limit": 300,
            }));
            if let Some(cursor) = cursor {
                body[if order == "asc" { "after" } else { "before" }] = cursor.into();
            }
            let chunks = env.query(&client, body).await;
            seen.extend(entries(&chunks));
            match chunks.last().and_then(|c| c.next) {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        // 00:00:04.000000 is seq 1,009; .000001 is past it, so it is included.
        let expected = if order == "asc" {
            asc(2..=1_009)
        } else {
            desc(2..=1_009)
        };
        assert_eq!(seen, pick(&all, expected), "{order}");
    }

    // Bad times are refused like any other bad query.
    for bad in [
        r#"{"id":7,"since":"2026-01-01"}"#,
        r#"{"id":7,"until":"2026-01-01T00:00:00+0100"}"#,
        r#"{"id":7,"since":1767225600}"#,
    ] {
        let reply = request(&client, &env.subject("query"), bad.into()).await;
        let error: logstore_protocol::ErrorReply = serde_json::from_slice(&reply.payload)
            .unwrap_or_else(|e| panic!("{bad}: {e}: {:?}", reply.payload));
        assert_eq!(
            error.error.code,
            logstore_protocol::ErrorCode::InvalidRequest,
            "{bad}"
        );
    }
    worker.stop().await.unwrap();
}

/// A `json` column's text (its binary form is the text itself; tokio-postgres reads `json`
/// only with a feature this workspace does not enable).
struct JsonText(String);

impl<'a> tokio_postgres::types::FromSql<'a> for JsonText {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(JsonText(std::str::from_utf8(raw)?.to_string()))
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::JSON
    }
}

/// Every plan node of an `EXPLAIN (FORMAT JSON)` answer, depth first.
fn plan_nodes(plan: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut nodes = vec![plan];
    if let Some(children) = plan.get("Plans").and_then(|p| p.as_array()) {
        for child in children {
            nodes.extend(plan_nodes(child));
        }
    }
    nodes
}

/// Done-when 2, the plan: the exact statements the worker runs for a time-bounded read (first
/// page and following pages, both orders) are, whatever the plan cache picks, one index range
/// scan of the logs primary key with both seq bounds in its index condition: no sequential
/// scan and no sort anywhere in the plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_bounded_read_is_one_primary_key_range_scan() {
    let url = fresh_db(&shared().pg[0], "explain").await;
    let shard = Shard::new(
        &ShardConfig {
            name: "a".into(),
            url: url.clone(),
        },
        1,
        Duration::from_secs(20),
    )
    .unwrap();
    within(30, "initialise", shard.initialise()).await.unwrap();
    let id = 7u64;
    seed_timeline(&url, id).await;
    // Other objects, as on a real shard: with a handful of head rows in one page, reading
    // them all is the planner's right choice, and no real shard looks like that.
    let db = pg_connect(&url).await;
    let ids: Vec<i64> = (10_000..20_000).collect();
    let keys: Vec<Option<String>> = vec![None; ids.len()];
    let logs: Vec<String> = ids.iter().map(|n| format!("other {n}")).collect();
    let received = vec![SystemTime::now(); ids.len()];
    within(
        60,
        "seed other objects",
        db.query(
            "SELECT 1 FROM logstore_append($1, $2, $3, $4)",
            &[&ids, &keys, &logs, &received],
        ),
    )
    .await
    .unwrap();
    db.batch_execute("ANALYZE").await.unwrap();

    let since = Some(at("2026-01-01T00:00:05Z"));
    let until = Some(at("2026-01-01T00:00:06Z"));
    let id = id as i64;
    let first_page: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
        [&id, &0i64, &i64::MAX, &100i64, &since, &until];
    let next_page: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&id, &2_008i64, &3_009i64, &100i64];
    for mode in ["force_custom_plan", "force_generic_plan"] {
        db.batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .await
            .unwrap();
        for (name, statement, params) in [
            ("first page asc", sql::FIRST_PAGE_ASC, &first_page[..]),
            ("first page desc", sql::FIRST_PAGE_DESC, &first_page[..]),
            ("page asc", sql::PAGE_ASC, &next_page[..]),
            ("page desc", sql::PAGE_DESC, &next_page[..]),
        ] {
            let explained: JsonText = db
                .query_one(&format!("EXPLAIN (FORMAT JSON) {statement}"), params)
                .await
                .unwrap_or_else(|e| panic!("{mode} {name}: {e}"))
                .get(0);
            let explained: serde_json::Value = serde_json::from_str(&explained.0).unwrap();
            let root = &explained[0]["Plan"];
            let nodes = plan_nodes(root);
            let shown = serde_json::to_string_pretty(root).unwrap();
            for node in &nodes {
                let kind = node["Node Type"].as_str().unwrap_or_default();
                assert!(
                    !kind.contains("Seq Scan")
                        && !kind.contains("Sort")
                        && !kind.contains("Bitmap"),
                    "{mode} {name}: {kind} in\n{shown}"
                );
            }
            let range_scans: Vec<_> = nodes
                .iter()
                .filter(|n| n["Relation Name"] == "logs")
                .filter(|n| {
                    let cond = n["Index Cond"].as_str().unwrap_or_default();
                    cond.contains("seq >") && cond.contains("seq <")
                })
                .collect();
            assert_eq!(
                range_scans.len(),
                1,
                "{mode} {name}: one range scan in\n{shown}"
            );
            let scan = range_scans[0];
            assert!(
                matches!(
                    scan["Node Type"].as_str(),
                    Some("Index Scan" | "Index Only Scan")
                ),
                "{mode} {name}: {shown}"
            );
            assert_eq!(scan["Index Name"], "logs_pkey", "{mode} {name}: {shown}");
            let backward = scan["Scan Direction"] == "Backward";
            assert_eq!(backward, name.contains("desc"), "{mode} {name}: {shown}");
            // Every other touch of logs is a primary-key probe too.
            for node in nodes.iter().filter(|n| n["Relation Name"] == "logs") {
                assert_eq!(node["Index Name"], "logs_pkey", "{mode} {name}: {shown}");
            }
        }
    }

    // And the statements answer what the bounds say: 00:00:05 to 00:00:06 is seqs 2,009..=3,008.
    let rows = db.query(sql::FIRST_PAGE_ASC, &first_page).await.unwrap();
    let (lo, hi): (i64, i64) = (rows[0].get(1), rows[0].get(2));
    assert_eq!((lo, hi), (2_008, 3_009));
    let seqs: Vec<i64> = rows.iter().map(|r| r.get(3)).collect();
    assert_eq!(seqs, (2_009..=2_108).collect::<Vec<i64>>());
}

/// Stats of `id` through the worker: the decoded reply and its raw body.
async fn stats(env: &Env, client: &async_nats::Client, id: u64) -> (StatsReply, String) {
    let body = serde_json::json!({ "id": id }).to_string();
    let reply = request(client, &env.subject("stats"), body.into()).await;
    let raw = String::from_utf8(reply.payload.to_vec()).unwrap();
    let stats = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("stats {id}: {e}: {raw}"));
    (stats, raw)
}

/// What stats must say, computed from the log itself: count(*), min/max seq and ts and
/// sum(octet_length(log)) of the present entries; `last_seq` falls back to the head's (the
/// last seq ever assigned) when no entry is present, 0 for an unknown object.
async fn sql_stats(url: &str, id: u64) -> StatsReply {
    let db = pg_connect(url).await;
    let row = db
        .query_one(
            "SELECT count(*), min(l.seq), max(l.seq), min(l.ts), max(l.ts),
                    coalesce(sum(octet_length(l.log)), 0)::bigint,
                    (SELECT o.last_seq FROM objects o WHERE o.id = $1)
             FROM logs l WHERE l.object_id = $1",
            &[&(id as i64)],
        )
        .await
        .unwrap();
    let format =
        |ts: Option<SystemTime>| ts.map(|ts| humantime::format_rfc3339_micros(ts).to_string());
    let max_seq: Option<i64> = row.get(2);
    let head_last_seq: Option<i64> = row.get(6);
    StatsReply {
        id,
        count: row.get::<_, i64>(0) as u64,
        first_seq: row.get::<_, Option<i64>>(1).map(|s| s as u64),
        last_seq: max_seq.or(head_last_seq).unwrap_or(0) as u64,
        first_ts: format(row.get(3)),
        last_ts: format(row.get(4)),
        bytes: row.get::<_, i64>(5) as u64,
    }
}

async fn assert_stats_agree(
    env: &Env,
    client: &async_nats::Client,
    url: &str,
    id: u64,
    when: &str,
) {
    let (got, raw) = stats(env, client, id).await;
    assert_eq!(got, sql_stats(url, id).await, "object {id} {when}: {raw}");
}

/// Done-when 3 (appends and duplicates; deletion and retention are checked where they are
/// tested): stats equal count(*), min/max seq and ts and sum(octet_length(log)), through
/// single appends, multibyte and empty texts, duplicates by key, a batch with a repeated key
/// (the careful path), a big batch (the fast path), and for an unknown object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_equal_what_the_log_holds() {
    let (env, worker, client, url) = one_shard().await;

    let (unknown, raw) = stats(&env, &client, 500).await;
    assert_eq!(
        raw,
        r#"{"id":500,"count":0,"first_seq":null,"last_seq":0,"first_ts":null,"last_ts":null,"bytes":0}"#
    );
    assert_eq!(unknown, sql_stats(&url, 500).await);

    for (i, log) in ["a", "héllo wörld", "", "日本語のログ"].iter().enumerate() {
        env.append(&client, 1, log, Some(&format!("k{i}"))).await;
        assert_stats_agree(&env, &client, &url, 1, &format!("after append {i}")).await;
    }
    let duplicate = env.append(&client, 1, "a resent", Some("k0")).await;
    assert!(duplicate.duplicate);
    assert_stats_agree(&env, &client, &url, 1, "after a duplicate").await;
    let (one, _) = stats(&env, &client, 1).await;
    assert_eq!(
        (one.count, one.first_seq, one.last_seq, one.bytes),
        (
            4,
            Some(1),
            4,
            (1 + "héllo wörld".len() + "日本語のログ".len()) as u64
        )
    );

    // A batch message with a key repeated inside it and one already stored: the careful path.
    let batch = serde_json::json!([
        { "id": 2, "log": "x", "key": "b1" },
        { "id": 2, "log": "yy", "key": "b1" },
        { "id": 1, "log": "zzz", "key": "k1" },
        { "id": 1, "log": "new" },
    ]);
    let reply = request(&client, &env.subject("logs"), batch.to_string().into()).await;
    let reply: logstore_protocol::BatchReply = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply.results.len(), 4);
    for id in [1, 2] {
        assert_stats_agree(&env, &client, &url, id, "after a batch with duplicates").await;
    }

    // A big batch through the fast path, on an object that already has entries and one new.
    let logs: Vec<String> = (0..1_000).map(|i| "é".repeat(i % 7)).collect();
    let received = vec![SystemTime::now(); logs.len()];
    seed(&url, 2, &logs, &received).await;
    seed(&url, 3, &logs, &received).await;
    for id in [1, 2, 3] {
        assert_stats_agree(&env, &client, &url, id, "after a fast-path batch").await;
    }
    check_shard_invariants(&url).await;
    worker.stop().await.unwrap();
}

/// The statistics of objects stored before migration 0004 are filled in by it, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_migration_fills_in_existing_objects() {
    let url = fresh_db(&shared().pg[0], "upgrade").await;
    let db = pg_connect(&url).await;
    db.batch_execute(&format!(
        "CREATE TABLE logstore_migrations (version integer PRIMARY KEY, name text NOT NULL, \
         applied_at timestamptz NOT NULL DEFAULT now());
         {}
         {}
         {}
         INSERT INTO logstore_migrations (version, name)
             VALUES (1, 'schema'), (2, 'fast_append'), (3, 'time_bounds');
         INSERT INTO shard_identity (name) VALUES ('a');
         SELECT count(*) FROM logstore_append(ARRAY[7, 7, 8]::bigint[], ARRAY['a', NULL, NULL],
             ARRAY['old 1', 'ölder 2', ''], ARRAY[now(), now(), now()]);
         SELECT count(*) FROM logstore_append(ARRAY[7, 9]::bigint[], ARRAY['a', NULL],
             ARRAY['dup', 'nine'], ARRAY[now(), now()]);",
        include_str!("../../migrations/0001_schema.sql"),
        include_str!("../../migrations/0002_fast_append.sql"),
        include_str!("../../migrations/0003_time_bounds.sql"),
    ))
    .await
    .unwrap();
    let shard = Shard::new(
        &ShardConfig {
            name: "a".into(),
            url: url.clone(),
        },
        1,
        Duration::from_secs(20),
    )
    .unwrap();
    within(30, "initialise", shard.initialise()).await.unwrap();
    let counts = check_shard_invariants(&url).await;
    assert_eq!(counts.len(), 3);
    let (seven, exists) = within(10, "stats", shard.stats(7, 0)).await.unwrap();
    assert!(exists, "object 7 has a head row");
    assert_eq!(
        (seven.count, seven.first_seq, seven.last_seq, seven.bytes),
        (2, Some(1), 2, ("old 1".len() + "ölder 2".len()) as u64)
    );
}

/// A conditional append through NATS request-reply: the reply, or the error reply.
async fn append_expecting(
    env: &Env,
    client: &async_nats::Client,
    id: u64,
    log: &str,
    key: &str,
    expected_seq: u64,
) -> Result<AppendReply, ErrorReply> {
    let body =
        serde_json::json!({ "id": id, "log": log, "key": key, "expected_seq": expected_seq });
    let reply = request(client, &env.subject("logs"), body.to_string().into()).await;
    parse_reply(&reply.payload)
}

/// Done-when 4: 8 writers race to append to one object, each always expecting the last seq it
/// knows, through two workers. Every acknowledged append got exactly the seq after the one it
/// expected; every refusal is `conflict` (409) carrying a last seq past what it expected, from
/// which the writer continues; the log is gapless and holds exactly the acknowledged appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_with_expected_seq_store_exactly_the_acknowledged_appends() {
    const WRITERS: usize = 8;
    const EACH: usize = 25;
    let env = Env::shared(&["a"]).await;
    let workers = [env.start_worker(&[]).await, env.start_worker(&[]).await];
    let url = env.shards[0].1.clone();
    let id = 77u64;

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            let client = env.client().await;
            let mut known = 0u64;
            let (mut stored, mut conflicts) = (Vec::new(), Vec::new());
            let mut attempt = 0;
            while stored.len() < EACH {
                attempt += 1;
                let log = format!("w{w}-{attempt}");
                match append_expecting(&env, &client, id, &log, &log, known).await {
                    Ok(reply) => {
                        assert!(!reply.duplicate, "{log}");
                        assert_eq!(reply.seq, known + 1, "{log} expected {known}");
                        known = reply.seq;
                        stored.push((reply.seq, log));
                    }
                    Err(ErrorReply { error }) => {
                        assert_eq!(error.code, ErrorCode::Conflict, "{log}: {error}");
                        let last = error.last_seq.unwrap_or_else(|| panic!("{log}: {error}"));
                        assert!(last > known, "{log}: conflict at {last}, expected {known}");
                        conflicts.push((known, last));
                        known = last;
                    }
                }
            }
            (stored, conflicts)
        }));
    }
    let mut acknowledged: BTreeMap<u64, String> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for task in tasks {
        let (stored, refused) = within(120, "racing writers", task).await.unwrap();
        for (seq, log) in stored {
            assert!(
                acknowledged.insert(seq, log).is_none(),
                "seq {seq} acknowledged twice"
            );
        }
        conflicts.extend(refused);
    }
    let total = (WRITERS * EACH) as u64;
    assert_eq!(
        acknowledged.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>(),
        "acknowledged seqs are 1..=n"
    );
    // The log holds exactly the acknowledged appends: refused ones stored nothing.
    let rows = db_rows(&url, id).await;
    let stored: BTreeMap<u64, String> = rows
        .into_iter()
        .map(|(seq, _, log, _)| (seq as u64, log))
        .collect();
    assert_eq!(stored, acknowledged);
    // Every refusal named a last seq the object really had: one of the acknowledged ones.
    assert!(
        !conflicts.is_empty(),
        "8 writers on one object must collide"
    );
    for (expected, last) in &conflicts {
        assert!(
            acknowledged.contains_key(last),
            "conflict named seq {last} (expected {expected})"
        );
    }
    // Each refusal was counted once, by whichever worker answered it.
    let mut counted = 0.0;
    for worker in &workers {
        let (_, metrics) = worker.get("/metrics").await;
        counted += metric_sum(
            &metrics,
            "logstore_appends_total",
            &[("result", "conflict")],
        );
    }
    assert_eq!(counted as usize, conflicts.len());
    check_shard_invariants(&url).await;
    for worker in workers {
        worker.stop().await.unwrap();
    }
}

/// `expected_seq` in a batch is checked entry by entry in array order, each seeing the
/// entries before it; a key already stored answers as a duplicate whatever it expected (a
/// retry of a stored conditional append learns its seq); 0 means "no entries yet"; a
/// conflict's error body carries `last_seq`, other errors stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_seq_in_batches_is_checked_in_array_order() {
    let (env, worker, client, url) = one_shard().await;
    let batch = serde_json::json!([
        { "id": 5, "log": "a", "expected_seq": 0 },
        { "id": 5, "log": "b", "expected_seq": 1, "key": "kb" },
        { "id": 5, "log": "c", "expected_seq": 1 },
        { "id": 5, "log": "d" },
        { "id": 6, "log": "e", "expected_seq": 3 },
        { "id": 5, "log": "b again", "expected_seq": 0, "key": "kb" },
        { "id": 6, "log": "f", "expected_seq": 0 },
    ]);
    let reply = request(&client, &env.subject("logs"), batch.to_string().into()).await;
    let raw = String::from_utf8(reply.payload.to_vec()).unwrap();
    let results: BatchReply = serde_json::from_str(&raw).unwrap();
    /// An entry's result: (id, Ok((seq, duplicate)) or Err((code, last_seq))).
    type Outcome = (u64, Result<(u64, bool), (ErrorCode, Option<u64>)>);
    let view: Vec<Outcome> = results
        .results
        .iter()
        .map(|r| match r {
            EntryResult::Stored(r) => (r.id, Ok((r.seq, r.duplicate))),
            EntryResult::Failed { id, error } => (*id, Err((error.code, error.last_seq))),
        })
        .collect();
    assert_eq!(
        view,
        vec![
            (5, Ok((1, false))),
            (5, Ok((2, false))),
            (5, Err((ErrorCode::Conflict, Some(2)))),
            (5, Ok((3, false))),
            (6, Err((ErrorCode::Conflict, Some(0)))),
            (5, Ok((2, true))),
            (6, Ok((1, false))),
        ],
        "{raw}"
    );
    assert!(
        raw.contains(r#""error":{"code":"conflict","message":"#),
        "{raw}"
    );

    // A single conditional append: refused with the micro headers and last_seq, stored when
    // right, and its retry (same key) answers as a duplicate though the object moved on.
    let reply = request(
        &client,
        &env.subject("logs"),
        r#"{"id":5,"log":"late","expected_seq":2}"#.into(),
    )
    .await;
    assert_eq!(
        header(&reply.headers, "Nats-Service-Error-Code").as_deref(),
        Some("409")
    );
    let error: ErrorReply = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(
        (error.error.code, error.error.last_seq),
        (ErrorCode::Conflict, Some(3))
    );
    let stored = append_expecting(&env, &client, 5, "right", "k-right", 3)
        .await
        .unwrap();
    assert_eq!((stored.seq, stored.duplicate), (4, false));
    env.append(&client, 5, "someone else", None).await;
    let retried = append_expecting(&env, &client, 5, "right", "k-right", 3)
        .await
        .unwrap();
    assert_eq!((retried.seq, retried.duplicate), (4, true));
    let error = append_expecting(&env, &client, 5, "x", "k-x", 0)
        .await
        .unwrap_err();
    assert_eq!(error.error.last_seq, Some(5), "0 means no entries yet");

    // Other error replies carry no last_seq, byte for byte as before.
    let reply = request(&client, &env.subject("logs"), r#"{"id":5}"#.into()).await;
    assert_eq!(
        String::from_utf8_lossy(&reply.payload),
        r#"{"error":{"code":"invalid_request","message":"missing field `log`"}}"#
    );
    let refused: HashSet<&str> = ["c", "e", "late", "x"].into();
    for (seq, _, log, _) in db_rows(&url, 5)
        .await
        .into_iter()
        .chain(db_rows(&url, 6).await)
    {
        assert!(
            !refused.contains(log.as_str()),
            "refused {log} stored at {seq}"
        );
    }
    check_shard_invariants(&url).await;
    worker.stop().await.unwrap();
}

/// With JetStream intake a conflict is final: the message is acked (not redelivered, not
/// dead-lettered), and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_conflict_is_acked_and_never_dead_lettered() {
    let mut env = Env::shared(&["a"]).await;
    env.intake = "jetstream";
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let url = env.shards[0].1.clone();
    let mut dead = client.subscribe(env.subject("dead_letter")).await.unwrap();
    let mut events = client.subscribe(env.subject("appended.9")).await.unwrap();
    client.flush().await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    for body in [
        r#"{"id":9,"log":"first","expected_seq":0}"#,
        r#"{"id":9,"log":"refused","expected_seq":0}"#,
        r#"[{"id":9,"log":"second","expected_seq":1},{"id":9,"log":"refused too","expected_seq":1}]"#,
    ] {
        within(10, "publish", async {
            js.publish(env.subject("logs"), body.into())
                .await
                .unwrap()
                .await
                .unwrap()
        })
        .await;
    }
    for seq in [1, 2] {
        let event = within(10, "stored event", events.next()).await.unwrap();
        let event: AppendReply = serde_json::from_slice(&event.payload).unwrap();
        assert_eq!(event.seq, seq);
    }
    // Every message acked: nothing pending, nothing waiting for redelivery.
    eventually(10, "all acked", || {
        let js = js.clone();
        let stream = env.stream();
        async move {
            let mut stream = js.get_stream(stream).await.ok()?;
            let info = stream.info().await.ok()?;
            (info.state.messages == 0).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(10), dead.next())
            .await
            .is_err(),
        "a conflict was dead-lettered"
    );
    let logs: Vec<String> = db_rows(&url, 9).await.into_iter().map(|r| r.2).collect();
    assert_eq!(logs, ["first", "second"]);
    worker.stop().await.unwrap();
}

/// A delete request through NATS request-reply.
async fn delete(env: &Env, client: &async_nats::Client, body: serde_json::Value) -> DeleteReply {
    let reply = request(client, &env.subject("delete"), body.to_string().into()).await;
    serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
        panic!(
            "delete {body}: {e}: {}",
            String::from_utf8_lossy(&reply.payload)
        )
    })
}

fn seqs_of(logs: &[LogEntry]) -> Vec<u64> {
    logs.iter().map(|e| e.seq).collect()
}

/// Done-when 5 (delete) and 3 (stats after deletes): `before_seq` removes exactly the entries
/// below it and no other object's, deleting everything leaves the head's last seq, the next
/// append continues the seq (with `expected_seq` too), and queries (seq and time bounds, both
/// orders) and stats agree with the database after each step; a big delete runs in steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_a_prefix_and_seqs_continue() {
    let (env, worker, client, url) = one_shard().await;
    let mut stored = Vec::new();
    for i in 1..=10 {
        stored.push(env.append(&client, 3, &format!("e{i}"), None).await);
    }
    env.append(&client, 4, "bystander", None).await;

    let reply = delete(
        &env,
        &client,
        serde_json::json!({ "id": 3, "before_seq": 4 }),
    )
    .await;
    assert_eq!(reply, DeleteReply { id: 3, deleted: 3 });
    let left: Vec<u64> = db_rows(&url, 3).await.iter().map(|r| r.0 as u64).collect();
    assert_eq!(
        left,
        (4..=10).collect::<Vec<_>>(),
        "seqs 1..=3 gone from the table"
    );
    assert_stats_agree(&env, &client, &url, 3, "after delete before_seq 4").await;
    let (three, _) = stats(&env, &client, 3).await;
    assert_eq!(
        (three.count, three.first_seq, three.last_seq),
        (7, Some(4), 10)
    );
    let all = env.query_all(&client, 3).await;
    assert_eq!(
        (all[0].total, seqs_of(&entries(&all))),
        (7, (4..=10).collect())
    );
    for (body, seqs, next) in [
        (
            serde_json::json!({ "id": 3, "order": "desc", "limit": 3 }),
            vec![10, 9, 8],
            Some(8),
        ),
        (
            serde_json::json!({ "id": 3, "order": "desc", "before": 6, "limit": 2 }),
            vec![5, 4],
            None,
        ),
        (
            serde_json::json!({ "id": 3, "limit": 7 }),
            (4..=10).collect(),
            None,
        ),
        (
            serde_json::json!({ "id": 3, "since": stored[0].ts, "limit": 2 }),
            vec![4, 5],
            Some(5),
        ),
        (
            serde_json::json!({ "id": 3, "until": stored[4].ts }),
            vec![4],
            None,
        ),
    ] {
        let answer = page(&env, &client, body.clone()).await;
        assert_eq!((seqs_of(&answer.logs), answer.next), (seqs, next), "{body}");
    }
    // Deleting below the first present seq again removes nothing.
    let reply = delete(
        &env,
        &client,
        serde_json::json!({ "id": 3, "before_seq": 4 }),
    )
    .await;
    assert_eq!(reply.deleted, 0);

    assert_eq!(env.append(&client, 3, "e11", None).await.seq, 11);
    let reply = delete(&env, &client, serde_json::json!({ "id": 3 })).await;
    assert_eq!(reply, DeleteReply { id: 3, deleted: 8 });
    assert!(
        db_rows(&url, 3).await.is_empty(),
        "everything gone from the table"
    );
    let (_, raw) = stats(&env, &client, 3).await;
    assert_eq!(
        raw,
        r#"{"id":3,"count":0,"first_seq":null,"last_seq":11,"first_ts":null,"last_ts":null,"bytes":0}"#
    );
    assert_stats_agree(&env, &client, &url, 3, "after delete all").await;
    let all = env.query_all(&client, 3).await;
    assert_eq!((all[0].total, all[0].logs.len(), all[0].next), (0, 0, None));
    let desc = page(
        &env,
        &client,
        serde_json::json!({ "id": 3, "order": "desc", "limit": 5 }),
    )
    .await;
    assert_eq!((desc.logs.len(), desc.next), (0, None));

    // Seqs are never reused: the next append continues, and expected_seq sees the old last seq.
    let error = append_expecting(&env, &client, 3, "too early", "k-early", 0)
        .await
        .unwrap_err();
    assert_eq!(error.error.last_seq, Some(11));
    let next = append_expecting(&env, &client, 3, "e12", "k12", 11)
        .await
        .unwrap();
    assert_eq!(next.seq, 12);
    let (three, _) = stats(&env, &client, 3).await;
    assert_eq!(
        (three.count, three.first_seq, three.last_seq),
        (1, Some(12), 12)
    );
    assert_stats_agree(&env, &client, &url, 3, "after appending again").await;
    assert_eq!(
        seqs_of(&entries(&env.query_all(&client, 3).await)),
        vec![12]
    );

    // Nothing to delete, and bad requests.
    assert_eq!(
        delete(&env, &client, serde_json::json!({ "id": 999 }))
            .await
            .deleted,
        0
    );
    assert_eq!(
        delete(
            &env,
            &client,
            serde_json::json!({ "id": 3, "before_seq": 0 })
        )
        .await
        .deleted,
        0
    );
    let reply = request(
        &client,
        &env.subject("delete"),
        r#"{"id":3,"before_seq":-1}"#.into(),
    )
    .await;
    let error: ErrorReply = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(error.error.code, ErrorCode::InvalidRequest);
    assert_stats_agree(&env, &client, &url, 4, "the bystander").await;
    assert_eq!(
        db_rows(&url, 4).await.len(),
        1,
        "another object is untouched"
    );

    // A delete larger than one step (10,000 rows) runs as several and answers the total.
    let logs: Vec<String> = (0..25_000).map(|i| format!("big {i}")).collect();
    seed(&url, 5, &logs, &vec![SystemTime::now(); logs.len()]).await;
    let reply = delete(
        &env,
        &client,
        serde_json::json!({ "id": 5, "before_seq": 20_001 }),
    )
    .await;
    assert_eq!(reply.deleted, 20_000);
    let left = db_rows(&url, 5).await;
    assert_eq!((left.len(), left[0].0), (5_000, 20_001));
    assert_stats_agree(&env, &client, &url, 5, "after a big delete").await;
    let last = page(
        &env,
        &client,
        serde_json::json!({ "id": 5, "order": "desc", "before": 20_003 }),
    )
    .await;
    assert_eq!(seqs_of(&last.logs), vec![20_002, 20_001]);

    let (_, metrics) = worker.get("/metrics").await;
    assert_eq!(
        metric_sum(
            &metrics,
            "logstore_requests_total",
            &[("kind", "delete"), ("result", "ok")]
        ),
        6.0
    );
    worker.stop().await.unwrap();
}

/// Done-when 5 (retention) and 3 (stats after retention): with RETENTION_MAX_AGE=10m, a worker
/// removes every entry older than that, and only those (younger entries of the same objects
/// stay), while 4 publishers keep appending to the same objects: none of their appends fails
/// or waits long, every acknowledged one is kept, seqs stay contiguous, stats agree, and
/// `logstore_retention_deleted_total` counts exactly the old entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_old_entries_under_load() {
    const OBJECTS: u64 = 20;
    const OLD: usize = 5_000;
    const YOUNG: usize = 100;
    let env = Env::shared(&["a"]).await;
    let url = env.shards[0].1.clone();
    // A worker without retention creates the schema; the old entries are seeded before any
    // live append (ts never decreases along seq, so entries seeded after live ones would get
    // the live ones' ts).
    let plain = WorkerCommand::new(&env).start().await;
    let now = SystemTime::now();
    let old: Vec<SystemTime> = (0..OLD)
        .map(|i| now - Duration::from_secs(7_200) + Duration::from_millis(i as u64))
        .collect();
    let young = vec![now - Duration::from_secs(60); YOUNG];
    let received: Vec<SystemTime> = old.into_iter().chain(young).collect();
    for id in 1..=OBJECTS {
        let logs: Vec<String> = (0..OLD + YOUNG)
            .map(|i| {
                if i < OLD {
                    format!("old {i}")
                } else {
                    format!("young {i}")
                }
            })
            .collect();
        seed(&url, id, &logs, &received).await;
    }

    // Publishers append to the same objects while the old entries are swept.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..4u64 {
        let (env, stop) = (env.clone(), stop.clone());
        publishers.push(tokio::spawn(async move {
            let client = env.client().await;
            let mut acknowledged = Vec::new();
            let mut slowest = Duration::ZERO;
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = 1 + (i * 4 + p) % OBJECTS;
                let key = format!("live-{p}-{i}");
                let started = std::time::Instant::now();
                let reply = env.append(&client, id, &key, Some(&key)).await;
                slowest = slowest.max(started.elapsed());
                acknowledged.push((id, reply.seq, key));
                i += 1;
            }
            (acknowledged, slowest)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The sweeping worker joins the queue group under load (and takes appends too).
    let sweep_started = std::time::Instant::now();
    let worker = WorkerCommand::new(&env)
        .extra(&[
            ("RETENTION_MAX_AGE", "10m"),
            ("RETENTION_INTERVAL", "200ms"),
        ])
        .start()
        .await;

    let db = pg_connect(&url).await;
    eventually(120, "retention removes every old entry", || {
        let db = &db;
        async move {
            let old: i64 = db
                .query_one("SELECT count(*) FROM logs WHERE log LIKE 'old %'", &[])
                .await
                .ok()?
                .get(0);
            (old == 0).then_some(())
        }
    })
    .await;
    // Keep appending a little past the sweep, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    let mut slowest = Duration::ZERO;
    for publisher in publishers {
        let (acked, slow) = within(60, "publishers stop", publisher).await.unwrap();
        slowest = slowest.max(slow);
        acknowledged.extend(acked);
    }
    eprintln!(
        "retention under load: swept in {:?}, {} appends acknowledged meanwhile, slowest {slowest:?}",
        sweep_started.elapsed(),
        acknowledged.len()
    );
    assert!(
        slowest < Duration::from_secs(2),
        "an append waited {slowest:?}"
    );
    assert!(
        acknowledged.len() > 100,
        "appends kept flowing: {}",
        acknowledged.len()
    );

    let client = env.client().await;
    for id in 1..=OBJECTS {
        let rows = db_rows(&url, id).await;
        let young = rows.iter().filter(|r| r.2.starts_with("young ")).count();
        assert_eq!(young, YOUNG, "object {id}: younger entries are kept");
        let live: Vec<&(u64, u64, String)> = acknowledged.iter().filter(|a| a.0 == id).collect();
        assert_eq!(
            rows.len(),
            YOUNG + live.len(),
            "object {id}: nothing else removed"
        );
        for (_, seq, key) in live {
            assert!(
                rows.iter()
                    .any(|r| r.0 as u64 == *seq && r.3.as_deref() == Some(key.as_str())),
                "object {id}: acknowledged {key} at {seq} is missing"
            );
        }
        let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
        let first = seqs[0];
        assert_eq!(
            seqs,
            (first..first + seqs.len() as i64).collect::<Vec<_>>(),
            "object {id}: contiguous"
        );
        assert_stats_agree(&env, &client, &url, id, "after retention").await;
    }
    let (_, metrics) = http_get(worker.metrics, "/metrics").await.expect("metrics");
    assert_eq!(
        metric_sum(
            &metrics,
            "logstore_retention_deleted_total",
            &[("shard", "a")]
        ),
        (OBJECTS as usize * OLD) as f64
    );
    assert_eq!(worker.terminate().await, Some(0));
    assert_eq!(plain.terminate().await, Some(0));
}
