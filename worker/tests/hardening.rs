//! Right answers under faults and abuse: a hung shard never gets a stored append answered as
//! failed and never stalls the other shard, cursors cover the whole u64 range, a dead letter
//! always fits, a query flood is shed without starving appends, and shutdown is bounded.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use logstore_protocol::{ErrorCode, QueryResponse};
use support::*;

/// Every test here gets this bound on the answer to an append to a hung shard.
const SHARD_TIMEOUT_MS: u64 = 3000;

/// The shard (by index in `names`) that owns `id`, as every worker computes it.
fn owner(names: &[&str], id: u64) -> usize {
    worker::ring::Ring::new(names, 1000).shard_of(id)
}

/// `count` ids from `from` upwards that `names[shard]` owns.
fn ids_on(names: &[&str], shard: usize, from: u64, count: usize) -> Vec<u64> {
    (from..)
        .filter(|id| owner(names, *id) == shard)
        .take(count)
        .collect()
}

#[derive(Debug, Clone)]
enum Outcome {
    Stored,
    Failed(ErrorCode),
    NoReply,
}

struct Sent {
    shard: usize,
    log: String,
    outcome: Outcome,
    latency: Duration,
}

/// Done-when 1: SIGSTOP one shard under core appends with replies, keyed and keyless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_shard_never_gets_a_stored_append_answered_as_failed() {
    let nats = NatsServer::start();
    let pgs = [PgServer::start(), PgServer::start()];
    let names = ["frozen", "healthy"];
    let mut shards = Vec::new();
    for (name, pg) in names.iter().zip(&pgs) {
        shards.push((name.to_string(), fresh_db(pg, name).await));
    }
    let env = Env {
        nats_url: nats.url(),
        prefix: unique_name("frz"),
        shards,
        intake: "core",
    };
    assert_eq!(
        env.settings(0)
            .iter()
            .find(|(k, _)| *k == "SHARD_TIMEOUT_MS")
            .map(|(_, v)| v.as_str()),
        Some("3000"),
        "the test's bounds assume this shard timeout"
    );
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let ids = [ids_on(&names, 0, 1, 20), ids_on(&names, 1, 1, 20)];

    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    // 250 appends/s to the shard that will freeze, 50/s to the other; every second one keyed.
    for (shard, per_second) in [(0usize, 250u64), (1, 50)] {
        let (client, env, sent, stop, ids, tasks2) = (
            client.clone(),
            env.clone(),
            sent.clone(),
            stop.clone(),
            ids[shard].clone(),
            tasks.clone(),
        );
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
            let mut n = 0u64;
            while !stop.is_cancelled() {
                tick.tick().await;
                n += 1;
                let id = ids[(n % ids.len() as u64) as usize];
                let log = format!("s{shard}-{n}");
                let key = n.is_multiple_of(2).then(|| format!("k-{log}"));
                let body = append_body(id, &log, key.as_deref());
                let (client, subject, sent) = (client.clone(), env.subject("logs"), sent.clone());
                tasks2.spawn(async move {
                    let started = Instant::now();
                    let reply = tokio::time::timeout(
                        Duration::from_secs(15),
                        client.request(subject, body),
                    )
                    .await;
                    let outcome = match reply {
                        Ok(Ok(message)) => match parse_reply(&message.payload) {
                            Ok(_) => Outcome::Stored,
                            Err(e) => Outcome::Failed(e.error.code),
                        },
                        _ => Outcome::NoReply,
                    };
                    sent.lock().unwrap().push(Sent {
                        shard,
                        log,
                        outcome,
                        latency: started.elapsed(),
                    });
                });
            }
        });
    }

    tokio::time::sleep(Duration::from_secs(2)).await; // load on healthy shards first
    pgs[0].freeze();
    // Frozen for well over the shard timeout, so appends keep arriving while it is hung.
    tokio::time::sleep(Duration::from_secs(8)).await;
    pgs[0].thaw();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    tasks.close();
    within(30, "every append answered", tasks.wait()).await;

    // What the frozen shard holds, once it has committed whatever was in flight when it froze.
    let db = pg_connect(&env.shards[0].1).await;
    let stored: HashMap<String, i64> = eventually(20, "frozen shard answers again", || async {
        db.query("SELECT log, count(*) FROM logs GROUP BY log", &[])
            .await
            .ok()
            .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    })
    .await;
    check_shard_invariants(&env.shards[0].1).await;

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let mut counts: HashMap<(usize, String), usize> = HashMap::new();
    let mut healthy_latencies = Vec::new();
    for s in sent.iter() {
        let label = match &s.outcome {
            Outcome::Stored => "stored".to_string(),
            Outcome::Failed(code) => code.as_str().to_string(),
            Outcome::NoReply => "no reply".to_string(),
        };
        *counts.entry((s.shard, label)).or_default() += 1;
        assert!(
            !matches!(s.outcome, Outcome::NoReply),
            "{} got no reply within 15 s",
            s.log
        );
        assert!(
            s.latency <= Duration::from_millis(SHARD_TIMEOUT_MS + 1000),
            "{} answered {:?} after {:?}: over SHARD_TIMEOUT_MS + 1 s",
            s.log,
            s.outcome,
            s.latency
        );
        if s.shard == 1 {
            healthy_latencies.push(s.latency);
            assert!(
                matches!(s.outcome, Outcome::Stored),
                "healthy shard: {} {:?}",
                s.log,
                s.outcome
            );
            continue;
        }
        let copies = stored.get(&s.log).copied().unwrap_or(0);
        assert!(copies <= 1, "{} stored {copies} times", s.log);
        match &s.outcome {
            Outcome::Stored => assert_eq!(copies, 1, "{} acknowledged but missing", s.log),
            // The one ambiguous answer: it may or may not be stored.
            Outcome::Failed(ErrorCode::Timeout) => {}
            Outcome::Failed(code) => assert_eq!(
                copies,
                0,
                "{} was answered `{}` (not stored) but is stored",
                s.log,
                code.as_str()
            ),
            Outcome::NoReply => unreachable!(),
        }
    }
    eprintln!("outcomes: {counts:?}");
    let failed_fast = counts
        .get(&(0, "unavailable".to_string()))
        .copied()
        .unwrap_or(0)
        + counts.get(&(0, "busy".to_string())).copied().unwrap_or(0);
    assert!(
        failed_fast > 100,
        "the frozen shard's appends should mostly fail fast while it is down: {counts:?}"
    );
    assert!(
        counts.get(&(0, "stored".to_string())).copied().unwrap_or(0) > 500,
        "appends to the frozen shard before and after the freeze are stored: {counts:?}"
    );
    healthy_latencies.sort();
    let p99 = healthy_latencies[healthy_latencies.len() * 99 / 100];
    assert!(
        p99 < Duration::from_secs(1),
        "the healthy shard's p99 was {p99:?} while the other was frozen"
    );
    worker.stop().await.expect("worker stops cleanly");
}

/// Done-when 2: cursors beyond i64 and seqs around 2^31 and 2^32.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_cover_the_whole_u64_range() {
    let env = Env::shared(&["c1"]).await;
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    for i in 0..3 {
        env.append(&client, 7, &format!("e{i}"), None).await;
    }
    for after in [1u64 << 63, u64::MAX, (1u64 << 63) - 1] {
        let chunks = env
            .query(&client, serde_json::json!({ "id": 7, "after": after }))
            .await;
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].total, 3, "after {after}");
        assert!(chunks[0].logs.is_empty(), "after {after}: {:?}", chunks[0]);
        assert_eq!(chunks[0].next, None, "after {after}");
    }

    // Objects whose seqs cross 2^31 and 2^32: head rows seeded as if earlier entries existed.
    let db = pg_connect(&env.shards[0].1).await;
    for (id, boundary) in [(31u64, 1i64 << 31), (32, 1i64 << 32)] {
        db.execute(
            "INSERT INTO objects (id, entries, last_seq, last_ts) VALUES ($1, 0, $2, now())",
            &[&(id as i64), &(boundary - 3)],
        )
        .await
        .expect("seed head row");
        let mut seqs = Vec::new();
        for i in 0..6 {
            seqs.push(env.append(&client, id, &format!("x{i}"), None).await.seq);
        }
        let expected: Vec<u64> = (0..6).map(|i| (boundary - 2 + i) as u64).collect();
        assert_eq!(seqs, expected, "seqs continue across 2^{id}");
        // Page two at a time from just before the boundary, following `next`.
        let mut cursor = (boundary - 3) as u64;
        let mut paged = Vec::new();
        loop {
            let chunks = env
                .query(
                    &client,
                    serde_json::json!({ "id": id, "after": cursor, "limit": 2 }),
                )
                .await;
            paged.extend(entries(&chunks).iter().map(|e| e.seq));
            match chunks.last().and_then(|c| c.next) {
                Some(next) => cursor = next,
                None => break,
            }
            assert!(paged.len() <= 6, "paging does not end: {paged:?}");
        }
        assert_eq!(paged, expected, "paged across 2^{id}");
        let after_boundary = env
            .query(
                &client,
                serde_json::json!({ "id": id, "after": boundary as u64 }),
            )
            .await;
        let tail: Vec<u64> = entries(&after_boundary).iter().map(|e| e.seq).collect();
        assert_eq!(tail, expected[3..].to_vec());
    }
    worker.stop().await.expect("worker stops cleanly");
}

/// Done-when 4: a malformed message of max_payload bytes still yields a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_payload_sized_bad_message_yields_a_dead_letter_that_arrives() {
    let env = Env::shared(&["d1"]).await;
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let mut dead = client
        .subscribe(env.subject("dead_letter"))
        .await
        .expect("subscribe dead letters");
    client.flush().await.expect("flush");
    let max = client.server_info().max_payload;
    let body = Bytes::from(vec![b'{'; max]);
    let reply = request(&client, &env.subject("logs"), body).await;
    let error = parse_reply(&reply.payload).expect_err("a bad message is refused");
    assert_eq!(error.error.code, ErrorCode::InvalidRequest);
    let letter = within(10, "the dead letter", dead.next())
        .await
        .expect("dead-letter subscription open");
    assert_eq!(
        header(&letter.headers, "Logstore-Error-Code").as_deref(),
        Some("invalid_request")
    );
    assert_eq!(
        header(&letter.headers, "Logstore-Truncated"),
        Some(max.to_string()),
        "the copy says it was cut and how big the original was"
    );
    assert!(!letter.payload.is_empty() && letter.payload.len() < max);
    assert!(
        letter.payload.iter().all(|b| *b == b'{'),
        "the copy is the original's first bytes"
    );
    let (_, metrics) = worker.get("/metrics").await;
    assert_eq!(
        metric_sum(
            &metrics,
            "logstore_dead_letters_total",
            &[("reason", "invalid_request")]
        ),
        1.0
    );
    worker.stop().await.expect("worker stops cleanly");
}

/// Done-when 6: 2,000 concurrent whole-log queries while appends to the same shard go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_flood_is_shed_without_starving_appends() {
    let env = Env::shared(&["q1"]).await;
    // Seed one object with a 1,000-entry log (~250 KB as a whole-log answer) by SQL.
    let db = pg_connect(&env.shards[0].1).await;
    let worker = WorkerCommand::new(&env)
        .extra(&[("QUERY_TIMEOUT_MS", "5000")])
        .start()
        .await;
    let big_id = 42u64;
    let n = 1000usize;
    db.execute(
        "SELECT * FROM logstore_append($1, $2, $3, $4)",
        &[
            &vec![big_id as i64; n],
            &vec![None::<String>; n],
            &(0..n).map(|i| format!("{i:0>200}")).collect::<Vec<_>>(),
            &vec![std::time::SystemTime::now(); n],
        ],
    )
    .await
    .expect("seed the big log");
    let client = env.client().await;

    // Appends to the same shard, 50/s, timed, while the flood runs.
    let stop = tokio_util::sync::CancellationToken::new();
    let appender = {
        let (client, env, stop) = (client.clone(), env.clone(), stop.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut i = 0u64;
            while !stop.is_cancelled() {
                tick.tick().await;
                i += 1;
                let started = Instant::now();
                let reply = request(
                    &client,
                    &env.subject("logs"),
                    append_body(1000 + i % 10, "during the flood", Some(&format!("f{i}"))),
                )
                .await;
                assert!(
                    parse_reply(&reply.payload).is_ok(),
                    "append refused during the query flood: {}",
                    String::from_utf8_lossy(&reply.payload)
                );
                latencies.push(started.elapsed());
            }
            latencies
        })
    };

    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(format!("{inbox}.*"))
        .await
        .expect("subscribe replies");
    client.flush().await.expect("flush");
    let queries = 2000;
    for q in 0..queries {
        client
            .publish_with_reply(
                env.subject("query"),
                format!("{inbox}.{q}"),
                serde_json::json!({ "id": big_id }).to_string().into(),
            )
            .await
            .expect("publish query");
    }
    // Each query ends in its last chunk or an error; count how each one ended.
    let mut ended: HashMap<String, String> = HashMap::new();
    within(60, "every query answered", async {
        while ended.len() < queries {
            let message = replies.next().await.expect("reply subscription open");
            let q = message
                .subject
                .as_str()
                .rsplit('.')
                .next()
                .unwrap()
                .to_string();
            if let Ok(chunk) = serde_json::from_slice::<QueryResponse>(&message.payload) {
                if chunk.last {
                    assert_eq!(chunk.total, n as u64);
                    ended.insert(q, "complete".into());
                }
            } else {
                let error = parse_reply(&message.payload).expect_err("an error reply");
                ended.insert(q, error.error.code.as_str().to_string());
            }
        }
    })
    .await;
    stop.cancel();
    let mut latencies = within(30, "appender stops", appender)
        .await
        .expect("appender task");

    let mut by_outcome: HashMap<&str, usize> = HashMap::new();
    for outcome in ended.values() {
        *by_outcome.entry(outcome.as_str()).or_default() += 1;
    }
    eprintln!("query outcomes: {by_outcome:?}");
    for outcome in by_outcome.keys() {
        assert!(
            ["complete", "busy", "timeout"].contains(outcome),
            "unexpected query outcome {outcome}: {by_outcome:?}"
        );
    }
    assert!(by_outcome.get("complete").copied().unwrap_or(0) > 0);
    assert!(
        by_outcome.get("busy").copied().unwrap_or(0) > 0,
        "2,000 at once is more than a worker admits"
    );
    latencies.sort();
    assert!(latencies.len() > 20, "appends ran during the flood");
    let p99 = latencies[latencies.len() * 99 / 100];
    assert!(
        p99 < Duration::from_secs(1),
        "append p99 {p99:?} during the query flood"
    );
    let pid = worker.child.id().expect("worker running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    assert!(
        peak_kib < 200 * 1024,
        "worker peak RSS {peak_kib} KiB during the flood"
    );
    assert_eq!(worker.terminate().await, Some(0));
}

/// Done-when 7: SIGTERM while NATS is unreachable exits within SHUTDOWN_TIMEOUT_MS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nats_unreachable_exits_in_time() {
    for intake in ["core", "jetstream"] {
        let mut env = Env::shared(&["n1"]).await;
        env.intake = intake;
        env.nats_url = format!("nats://127.0.0.1:{}", free_port()); // nothing listens there
        let worker = WorkerCommand::new(&env)
            .extra(&[("SHUTDOWN_TIMEOUT_MS", "2000")])
            .spawn();
        let addr = worker.metrics;
        // Up (HTTP answers) but not ready: it keeps trying to reach NATS.
        eventually(30, "worker serves /healthz", || async move {
            matches!(http_get(addr, "/healthz").await, Some((200, _))).then_some(())
        })
        .await;
        let started = Instant::now();
        let code = worker.terminate().await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(2500),
            "{intake}: exit took {took:?} with SHUTDOWN_TIMEOUT_MS=2000"
        );
        assert_eq!(
            code,
            Some(0),
            "{intake}: nothing was received, so nothing is unsettled"
        );
    }
}

/// The byte cap of one answer: a whole-log read ends early with a `next` cursor, and following
/// it reads everything, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_log_answer_stops_at_max_query_bytes_and_next_continues() {
    let env = Env::shared(&["b1"]).await;
    let worker = WorkerCommand::new(&env)
        .extra(&[("MAX_QUERY_BYTES", "2000")])
        .start()
        .await;
    let client = env.client().await;
    for i in 0..50 {
        env.append(&client, 9, &format!("{i:0>100}"), None).await;
    }
    let mut seqs = Vec::new();
    let mut after = 0u64;
    let mut requests = 0;
    loop {
        requests += 1;
        let chunks = env
            .query(&client, serde_json::json!({ "id": 9, "after": after }))
            .await;
        let bytes: usize = chunks
            .iter()
            .map(|c| serde_json::to_vec(c).expect("encode").len())
            .sum();
        assert!(
            bytes < 2000 + 400,
            "one answer of {bytes} bytes over the cap"
        );
        seqs.extend(entries(&chunks).iter().map(|e| e.seq));
        let last = chunks.last().expect("a last chunk");
        assert!(last.last);
        match last.next {
            Some(next) => after = next,
            None => break,
        }
        assert!(requests < 50, "paging does not end");
    }
    assert!(
        requests > 2,
        "a 50 x 100-byte log does not fit in 2,000 bytes"
    );
    assert_eq!(seqs, (1..=50).collect::<Vec<u64>>());
    assert_eq!(worker.terminate().await, Some(0));
}
