//! The worker's contract, end to end through a real nats-server into real PostgreSQL servers.
//! Tests here share one NATS and two Postgres servers; each has its own subjects and databases.

mod support;

use std::collections::{BTreeMap, HashSet};

use futures::StreamExt;
use logstore_protocol::{AppendReply, ErrorCode, QueryResponse};
use support::*;

/// The core scenarios shared with privilege.rs and tls.rs (support::core_scenarios: the
/// original's format, keys and duplicates, sorted and paged queries, extreme ids), here with
/// two workers as the servers' superuser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_scenarios_hold_for_a_superuser() {
    let env = Env::shared(&["a", "b"]).await;
    let workers = [env.start_worker(&[]).await, env.start_worker(&[]).await];
    core_scenarios(&env, 5).await;
    for worker in workers {
        worker.stop().await.unwrap();
    }
}

/// 4 workers in one queue group, 4 concurrent publishers, 20,000 keyed appends over 50 objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_and_publishers_store_every_append_exactly_once() {
    const OBJECTS: u64 = 50;
    const PUBLISHERS: u64 = 4;
    const PER_PUBLISHER: u64 = 5_000;
    let env = Env::shared(&["a", "b"]).await;
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(env.start_worker(&[]).await);
    }
    let base = 1_000_000u64;

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let env = env.clone();
        publishers.push(tokio::spawn(async move {
            let client = env.client().await;
            futures::stream::iter(0..PER_PUBLISHER)
                .for_each_concurrent(64, |i| {
                    let (client, env) = (client.clone(), env.clone());
                    async move {
                        let id = base + (i * PUBLISHERS + p) % OBJECTS;
                        let key = format!("p{p}-{i}");
                        let reply = env.append(&client, id, &key, Some(&key)).await;
                        assert!(!reply.duplicate);
                    }
                })
                .await;
        }));
    }
    for publisher in publishers {
        within(300, "publishers", publisher).await.unwrap();
    }

    let mut total = 0;
    let client = env.client().await;
    for id in base..base + OBJECTS {
        let logs = entries(&env.query_all(&client, id).await);
        let expected: HashSet<String> = (0..PUBLISHERS)
            .flat_map(|p| {
                (0..PER_PUBLISHER)
                    .filter(move |i| (i * PUBLISHERS + p) % OBJECTS == id - base)
                    .map(move |i| format!("p{p}-{i}"))
            })
            .collect();
        let got: Vec<&str> = logs.iter().map(|e| e.log.as_str()).collect();
        assert_eq!(got.len(), expected.len(), "object {id}: entry count");
        assert_eq!(
            got.iter().map(|s| s.to_string()).collect::<HashSet<_>>(),
            expected,
            "object {id}: entries"
        );
        for (i, entry) in logs.iter().enumerate() {
            assert_eq!(entry.seq, i as u64 + 1, "object {id}: seq gapless");
            if i > 0 {
                assert!(
                    logs[i - 1].ts <= entry.ts,
                    "object {id}: ts never decreases"
                );
            }
        }
        total += logs.len() as u64;
    }
    assert_eq!(total, PUBLISHERS * PER_PUBLISHER);

    // The head rows agree with the log tables, shard by shard.
    for (_, url) in &env.shards {
        let db = pg_connect(url).await;
        let mismatched = db
            .query(
                "SELECT o.id FROM objects o
                 LEFT JOIN (SELECT object_id, count(*) AS n, max(seq) AS m FROM logs GROUP BY object_id) l
                   ON l.object_id = o.id
                 WHERE o.entries <> coalesce(l.n, 0) OR o.last_seq <> coalesce(l.m, 0)",
                &[],
            )
            .await
            .unwrap();
        assert!(
            mismatched.is_empty(),
            "objects whose head row disagrees with their rows: {}",
            mismatched.len()
        );
    }
    for worker in workers {
        worker.stop().await.unwrap();
    }
}

/// One key published 5 times at once across workers gives one entry; every later reply is a
/// duplicate carrying the original seq and ts. The Nats-Msg-Id header works as a key too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_stores_once_even_when_racing() {
    let env = Env::shared(&["a", "b"]).await;
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(env.start_worker(&[]).await);
    }
    let client = env.client().await;
    let id = 77;
    for round in 0..5 {
        let key = format!("race-{round}");
        let replies: Vec<AppendReply> =
            futures::future::join_all((0..5).map(|_| env.append(&client, id, "once", Some(&key))))
                .await;
        let originals: Vec<&AppendReply> = replies.iter().filter(|r| !r.duplicate).collect();
        assert_eq!(
            originals.len(),
            1,
            "round {round}: exactly one original: {replies:?}"
        );
        for reply in &replies {
            assert_eq!((reply.seq, &reply.ts), (originals[0].seq, &originals[0].ts));
        }
        let later = env.append(&client, id, "once", Some(&key)).await;
        assert!(later.duplicate);
        assert_eq!((later.seq, &later.ts), (originals[0].seq, &originals[0].ts));
    }

    // Nats-Msg-Id header as the key.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "header-key");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let reply = within(
            10,
            "request with header",
            client.request_with_headers(
                env.subject("logs"),
                headers.clone(),
                append_body(id, "hdr", None),
            ),
        )
        .await
        .unwrap();
        seen.push(parse_reply(&reply.payload).unwrap());
    }
    assert!(!seen[0].duplicate && seen[1].duplicate && seen[2].duplicate);
    assert_eq!(seen[1].seq, seen[0].seq);

    let logs = entries(&env.query_all(&client, id).await);
    assert_eq!(logs.len(), 6, "5 racing keys + 1 header key: {logs:?}");
    for worker in workers {
        worker.stop().await.unwrap();
    }
}

/// Objects spread over the shards, each object's entries on exactly one shard, at the place the
/// golden vectors pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_land_on_the_shard_the_ring_pins() {
    let env = Env::shared(&["shard-a", "shard-b", "shard-c"]).await;
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let ids: Vec<u64> = worker::ring::GOLDEN_PLACEMENTS
        .iter()
        .map(|(id, _)| *id)
        .chain(0..200)
        .collect();
    for &id in &ids {
        env.append(&client, id, "x", None).await;
    }
    let mut holders: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (name, url) in &env.shards {
        let db = pg_connect(url).await;
        let rows = db
            .query("SELECT DISTINCT object_id FROM logs", &[])
            .await
            .unwrap();
        assert!(!rows.is_empty(), "shard {name} holds objects");
        for row in rows {
            holders
                .entry(row.get::<_, i64>(0) as u64)
                .or_default()
                .push(name.clone());
        }
    }
    for &id in &ids {
        assert_eq!(
            holders.get(&id).map(Vec::len),
            Some(1),
            "object {id} on exactly one shard: {:?}",
            holders.get(&id)
        );
    }
    for (id, shard) in worker::ring::GOLDEN_PLACEMENTS {
        assert_eq!(holders[&id], vec![shard.to_string()], "object {id}");
    }
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_ids_round_trip() {
    let env = Env::shared(&["a", "b"]).await;
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    for id in [0, 1, (1u64 << 63) - 1, 1u64 << 63, u64::MAX] {
        let reply = env.append(&client, id, &format!("log of {id}"), None).await;
        assert_eq!((reply.id, reply.seq), (id, 1));
        let chunks = env.query_all(&client, id).await;
        assert_eq!(chunks[0].id, id);
        let logs = entries(&chunks);
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].log, format!("log of {id}"));
    }
    worker.stop().await.unwrap();
}

/// Paging with after/next, and a whole-log answer larger than one NATS message in chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_chunks_return_every_entry_once_in_order() {
    let env = Env::shared(&["a", "b"]).await;
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let small = 10u64;
    append_many(&env, &client, small, 1_000, |i| format!("entry {i}")).await;
    let mut after = 0;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let chunks = env
            .query(&client, serde_json::json!({ "id": small, "after": after, "limit": 100, "request_id": "pg" }))
            .await;
        assert_eq!(chunks.len(), 1);
        let page = &chunks[0];
        assert_eq!(
            (page.total, page.request_id.as_deref()),
            (1_000, Some("pg"))
        );
        seen.extend(page.logs.iter().map(|e| e.seq));
        pages += 1;
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(pages, 10);
    assert_eq!(seen, (1..=1_000).collect::<Vec<_>>());

    // 20,000 x 200 bytes is about 5 MB: several messages of at most max_payload each.
    let big = 11u64;
    let log = "x".repeat(200);
    append_many(&env, &client, big, 20_000, |_| log.clone()).await;
    let max_payload = client.server_info().max_payload;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(
            env.subject("query"),
            inbox,
            serde_json::json!({ "id": big }).to_string().into(),
        )
        .await
        .unwrap();
    let mut seqs = Vec::new();
    let mut chunks = 0;
    within(60, "whole-log chunks", async {
        while let Some(message) = replies.next().await {
            let size = message.payload.len();
            assert!(
                size <= max_payload,
                "chunk of {size} bytes > max_payload {max_payload}"
            );
            let chunk: QueryResponse = serde_json::from_slice(&message.payload).unwrap();
            assert_eq!((chunk.chunk, chunk.total), (chunks, 20_000));
            chunks += 1;
            seqs.extend(chunk.logs.iter().map(|e| e.seq));
            if chunk.last {
                assert_eq!(chunk.next, None);
                return;
            }
        }
    })
    .await;
    assert!(
        chunks >= 4,
        "20,000 x 200 bytes needs several chunks, got {chunks}"
    );
    assert_eq!(seqs, (1..=20_000).collect::<Vec<_>>());
    worker.stop().await.unwrap();
}

async fn append_many(
    env: &Env,
    client: &async_nats::Client,
    id: u64,
    n: u64,
    log: impl Fn(u64) -> String,
) {
    let logs: Vec<String> = (0..n).map(log).collect();
    let keys: Vec<String> = (0..n).map(|i| format!("bulk-{i}")).collect();
    within(
        300,
        "bulk appends",
        futures::stream::iter(0..n as usize).for_each_concurrent(128, |i| {
            let (logs, keys) = (&logs, &keys);
            async move {
                env.append(client, id, &logs[i], Some(&keys[i])).await;
            }
        }),
    )
    .await;
}

/// Every kind of bad input: an error reply with the micro headers, a dead-letter copy, the
/// counters rise, and the worker keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_dead_lettered_and_counted() {
    let env = Env::shared(&["a", "b"]).await;
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let mut dead = client.subscribe(env.subject("dead_letter")).await.unwrap();
    client.flush().await.unwrap();

    let big_log = format!(r#"{{"id":1,"log":"{}"}}"#, "x".repeat(64 * 1024 + 1));
    let big_key = format!(r#"{{"id":1,"log":"a","key":"{}"}}"#, "k".repeat(257));
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        (
            "invalid JSON",
            b"{not json".to_vec(),
            ErrorCode::InvalidRequest,
        ),
        ("empty body", Vec::new(), ErrorCode::InvalidRequest),
        ("array", b"[1,2]".to_vec(), ErrorCode::InvalidRequest),
        (
            "missing id",
            br#"{"log":"a"}"#.to_vec(),
            ErrorCode::InvalidRequest,
        ),
        (
            "negative id",
            br#"{"id":-1,"log":"a"}"#.to_vec(),
            ErrorCode::InvalidRequest,
        ),
        (
            "string id",
            br#"{"id":"1","log":"a"}"#.to_vec(),
            ErrorCode::InvalidRequest,
        ),
        (
            "id above u64",
            br#"{"id":18446744073709551616,"log":"a"}"#.to_vec(),
            ErrorCode::InvalidRequest,
        ),
        (
            "fractional id",
            br#"{"id":1.5,"log":"a"}"#.to_vec(),
            ErrorCode::InvalidRequest,
        ),
        (
            "non-string log",
            br#"{"id":1,"log":{"a":1}}"#.to_vec(),
            ErrorCode::InvalidRequest,
        ),
        (
            "missing log",
            br#"{"id":1}"#.to_vec(),
            ErrorCode::InvalidRequest,
        ),
        ("oversized log", big_log.into_bytes(), ErrorCode::TooLarge),
        ("oversized key", big_key.into_bytes(), ErrorCode::TooLarge),
        (
            "invalid UTF-8",
            b"{\"id\":1,\"log\":\"\xff\xfe\"}".to_vec(),
            ErrorCode::InvalidRequest,
        ),
    ];
    for (what, body, code) in &cases {
        let reply = request(&client, &env.subject("logs"), body.clone().into()).await;
        let error = parse_reply(&reply.payload).expect_err(what);
        assert_eq!(error.error.code, *code, "{what}: {}", error.error.message);
        assert_eq!(
            header(&reply.headers, "Nats-Service-Error-Code"),
            Some(code.status().to_string()),
            "{what}"
        );
        assert!(
            header(&reply.headers, "Nats-Service-Error").is_some_and(|m| !m.is_empty()),
            "{what}"
        );

        let copy = within(10, "dead letter", dead.next()).await.unwrap();
        assert_eq!(
            copy.payload.as_ref(),
            body.as_slice(),
            "{what}: dead letter is a raw copy"
        );
        assert_eq!(
            header(&copy.headers, "Logstore-Error-Code").as_deref(),
            Some(code.as_str()),
            "{what}"
        );
        assert_eq!(
            header(&copy.headers, "Logstore-Subject"),
            Some(env.subject("logs"))
        );
    }
    // Without a reply subject: no answer to send, but still dead-lettered.
    client
        .publish(env.subject("logs"), "nope".into())
        .await
        .unwrap();
    let copy = within(10, "dead letter without reply", dead.next())
        .await
        .unwrap();
    assert_eq!(copy.payload.as_ref(), b"nope");
    // A bad query is rejected the same way.
    let reply = request(&client, &env.subject("query"), r#"{"id":-5}"#.into()).await;
    assert_eq!(
        parse_reply(&reply.payload).unwrap_err().error.code,
        ErrorCode::InvalidRequest
    );
    within(10, "dead letter for query", dead.next())
        .await
        .unwrap();

    let ok = env.append(&client, 1, "fine", None).await;
    assert_eq!(ok.seq, 1);
    assert!(worker.is_running());
    let (_, metrics) = worker.get("/metrics").await;
    assert_eq!(
        metric_sum(&metrics, "logstore_dead_letters_total", &[]),
        cases.len() as f64 + 2.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "logstore_appends_total",
            &[("result", "rejected")]
        ),
        cases.len() as f64 + 1.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "logstore_queries_total",
            &[("result", "rejected")]
        ),
        1.0
    );
    worker.stop().await.unwrap();
}

/// /metrics counts appends by shard and result exactly as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_appends_by_shard_and_result() {
    let env = Env::shared(&["a", "b"]).await;
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let ring = worker::ring::Ring::new(&["a", "b"], worker::ring::DEFAULT_VNODES);
    let mut expected: BTreeMap<(String, &str), f64> = BTreeMap::new();
    for id in 0..60u64 {
        let key = format!("k{id}");
        env.append(&client, id, "m", Some(&key)).await;
        *expected
            .entry((ring.shard_name_of(id).to_string(), "stored"))
            .or_default() += 1.0;
        if id % 3 == 0 {
            assert!(env.append(&client, id, "m", Some(&key)).await.duplicate);
            *expected
                .entry((ring.shard_name_of(id).to_string(), "duplicate"))
                .or_default() += 1.0;
        }
    }
    request(&client, &env.subject("logs"), "bad".into()).await;
    let (_, metrics) = worker.get("/metrics").await;
    for shard in ["a", "b"] {
        for result in ["stored", "duplicate", "failed"] {
            let want = expected
                .get(&(shard.to_string(), result))
                .copied()
                .unwrap_or(0.0);
            let got = metric_sum(
                &metrics,
                "logstore_appends_total",
                &[("shard", shard), ("result", result)],
            );
            assert_eq!(got, want, "shard {shard} result {result}");
        }
    }
    assert!(
        expected[&("a".to_string(), "stored")] > 0.0
            && expected[&("b".to_string(), "stored")] > 0.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "logstore_appends_total",
            &[("result", "rejected")]
        ),
        1.0
    );
    assert_eq!(metric_sum(&metrics, "logstore_shard_up", &[]), 2.0);
    assert!(metrics.contains("logstore_append_duration_seconds_bucket"));
    assert!(metrics.contains("logstore_batch_size_bucket"));
    worker.stop().await.unwrap();
}

/// Two workers starting at the same moment on empty databases both migrate safely and serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_starting_at_once_on_empty_databases_both_come_up() {
    let env = Env::shared(&["a", "b"]).await;
    let first = env.spawn_worker(&[]);
    let second = env.spawn_worker(&[]);
    within(
        60,
        "both ready",
        futures::future::join(first.wait_ready(), second.wait_ready()),
    )
    .await;
    let client = env.client().await;
    env.append(&client, 3, "hello", None).await;
    // Every migration in migrations/ (NNNN_name.sql; CURRENT.sql only shows their result)
    // applied, each recorded once, in order.
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .unwrap()
        .filter(|f| {
            f.as_ref().is_ok_and(|f| {
                f.path().extension().is_some_and(|e| e == "sql")
                    && f.file_name()
                        .to_string_lossy()
                        .starts_with(|c: char| c.is_ascii_digit())
            })
        })
        .count() as i32;
    for (_, url) in &env.shards {
        let db = pg_connect(url).await;
        let versions: Vec<i32> = db
            .query(
                "SELECT version FROM logstore_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(versions, (1..=files).collect::<Vec<_>>());
    }
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}
