//! Batch appends (a JSON array body): all-or-nothing validation naming the bad entry, derived
//! keys `<Nats-Msg-Id>#<index>` / stream identity `#<index>`, per-entry results in array order,
//! consecutive seqs for one object's entries of one message, one event per stored entry, and a
//! batch spanning a shard that goes down and comes back (core and JetStream): nothing lost or
//! doubled.

mod support;

use std::collections::HashMap;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use logstore_protocol::{BatchReply, EntryResult, ErrorCode, ErrorReply};
use support::*;

/// The shard (index into `names`) owning `id`.
fn owner(names: &[&str], id: u64) -> usize {
    worker::ring::Ring::new(names, 1000).shard_of(id)
}

/// The first id from `from` up owned by `names[shard]`.
fn id_on(names: &[&str], shard: usize, from: u64) -> u64 {
    (from..).find(|id| owner(names, *id) == shard).unwrap()
}

fn batch_body(entries: &[(u64, &str, Option<&str>)]) -> Bytes {
    let array: Vec<serde_json::Value> = entries
        .iter()
        .map(|(id, log, key)| {
            let mut entry = serde_json::json!({ "id": id, "log": log });
            if let Some(key) = key {
                entry["key"] = (*key).into();
            }
            entry
        })
        .collect();
    serde_json::to_vec(&array).unwrap().into()
}

async fn batch_request(
    client: &async_nats::Client,
    env: &Env,
    body: Bytes,
    msg_id: Option<&str>,
) -> BatchReply {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(id) = msg_id {
        headers.insert("Nats-Msg-Id", id);
    }
    let reply = within(
        10,
        "batch reply",
        client.request_with_headers(env.subject("logs"), headers, body),
    )
    .await
    .expect("batch request");
    serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
        panic!(
            "not a batch reply ({e}): {}",
            String::from_utf8_lossy(&reply.payload)
        )
    })
}

fn stored(result: &EntryResult) -> (u64, u64, bool) {
    match result {
        EntryResult::Stored(r) => (r.id, r.seq, r.duplicate),
        EntryResult::Failed { id, error } => panic!("entry for {id} failed: {error}"),
    }
}

/// Wait until the shard at `url` holds `n` entries of the JetStream round.
async fn wait_for_rows(url: &str, n: i64, what: &str) {
    let db = pg_connect(url).await;
    eventually(60, what, || {
        let db = &db;
        async move {
            let rows: i64 = db
                .query_one(
                    "SELECT count(*) FROM logs WHERE log LIKE 'jetstream-%'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (rows == n).then_some(())
        }
    })
    .await
}

/// Per object: (seq, key, log) of every stored entry, from the shard databases.
async fn stored_rows(env: &Env) -> HashMap<u64, Vec<(i64, Option<String>, String)>> {
    let mut rows: HashMap<u64, Vec<(i64, Option<String>, String)>> = HashMap::new();
    for (_, url) in &env.shards {
        let db = pg_connect(url).await;
        for row in db
            .query(
                "SELECT object_id, seq, key, log FROM logs ORDER BY object_id, seq",
                &[],
            )
            .await
            .expect("read logs")
        {
            rows.entry(row.get::<_, i64>(0) as u64).or_default().push((
                row.get(1),
                row.get(2),
                row.get(3),
            ));
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_batch_is_answered_per_entry_in_array_order_with_one_event_each() {
    let names = ["a", "b"];
    let env = Env::shared(&names).await;
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let (x, y) = (id_on(&names, 0, 100), id_on(&names, 1, 100));
    let mut events = client
        .subscribe(format!("{}.>", env.subject("appended")))
        .await
        .unwrap();
    client.flush().await.unwrap();

    // Entries of two objects on two shards, interleaved; some keyed, some not.
    let entries = [
        (x, "x1", Some("kx1")),
        (y, "y1", None),
        (x, "x2", None),
        (y, "y2", Some("ky2")),
        (x, "x3", Some("kx3")),
    ];
    let reply = batch_request(&client, &env, batch_body(&entries), Some("m1")).await;
    let results: Vec<(u64, u64, bool)> = reply.results.iter().map(stored).collect();
    assert_eq!(
        results,
        vec![
            (x, 1, false),
            (y, 1, false),
            (x, 2, false),
            (y, 2, false),
            (x, 3, false)
        ],
        "results in array order, seqs consecutive per object in array order"
    );
    // One event per stored entry.
    let mut seen = Vec::new();
    within(10, "five events", async {
        while seen.len() < 5 {
            let event = events.next().await.unwrap();
            let body: logstore_protocol::AppendReply =
                serde_json::from_slice(&event.payload).unwrap();
            seen.push((body.id, body.seq));
        }
    })
    .await;
    seen.sort();
    assert_eq!(seen, vec![(x, 1), (x, 2), (x, 3), (y, 1), (y, 2)]);

    // The same message again (same Nats-Msg-Id): every entry answers as a duplicate of itself,
    // keyed entries by their key, the others by `m1#<index>`.
    let again = batch_request(&client, &env, batch_body(&entries), Some("m1")).await;
    let again: Vec<(u64, u64, bool)> = again.results.iter().map(stored).collect();
    assert_eq!(
        again,
        results
            .iter()
            .map(|(id, seq, _)| (*id, *seq, true))
            .collect::<Vec<_>>()
    );
    let rows = stored_rows(&env).await;
    let keys: Vec<Option<String>> = rows[&x].iter().map(|r| r.1.clone()).collect();
    assert_eq!(
        keys,
        vec![Some("kx1".into()), Some("m1#2".into()), Some("kx3".into())]
    );
    assert_eq!(rows[&y][0].1.as_deref(), Some("m1#1"));

    // A single-object body still answers exactly as before.
    let single = env.append(&client, x, "single", None).await;
    assert_eq!((single.seq, single.duplicate), (4, false));
    worker.stop().await.expect("worker stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_entry_rejects_the_whole_batch_naming_its_index() {
    let env = Env::shared(&["v"]).await;
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let mut dead = client.subscribe(env.subject("dead_letter")).await.unwrap();
    client.flush().await.unwrap();
    let cases: [(&str, ErrorCode, &str); 2] = [
        (
            r#"[{"id":1,"log":"fine"},{"id":2,"log":7}]"#,
            ErrorCode::InvalidRequest,
            "entry 1:",
        ),
        (r#"[]"#, ErrorCode::InvalidRequest, "empty batch"),
    ];
    for (body, code, needle) in &cases {
        let reply = request(&client, &env.subject("logs"), Bytes::from(*body)).await;
        let error: ErrorReply = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(error.error.code, *code, "{body}");
        assert!(error.error.message.contains(needle), "{body}: {error:?}");
        let letter = within(10, "dead letter", dead.next()).await.unwrap();
        assert_eq!(
            letter.payload,
            Bytes::from(*body),
            "the raw message is dead-lettered"
        );
    }
    // Over MAX_BATCH_ENTRIES (default 1000).
    let many: Vec<(u64, &str, Option<&str>)> = (0..1001).map(|i| (i, "x", None)).collect();
    let reply = request(&client, &env.subject("logs"), batch_body(&many)).await;
    let error: ErrorReply = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(error.error.code, ErrorCode::TooLarge);
    // Nothing of any rejected batch was stored.
    assert!(stored_rows(&env).await.is_empty());
    // The same key twice in one message: the second is a duplicate of the first.
    let reply = batch_request(
        &client,
        &env,
        batch_body(&[(1, "once", Some("k")), (1, "twice", Some("k"))]),
        None,
    )
    .await;
    let results: Vec<(u64, u64, bool)> = reply.results.iter().map(stored).collect();
    assert_eq!(results, vec![(1, 1, false), (1, 1, true)]);
    worker.stop().await.expect("worker stops cleanly");
}

/// One object's entries of one message get consecutive seqs, even while other publishers
/// append single entries to the same object through other workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_messages_entries_of_an_object_get_consecutive_seqs() {
    let env = Env::shared(&["c"]).await;
    let workers = [env.start_worker(&[]).await, env.start_worker(&[]).await];
    let client = env.client().await;
    let id = 77u64;
    let batches = 20usize;
    let per_batch = 25usize;
    let singles = async {
        for i in 0..200 {
            env.append(&client, id, &format!("single-{i}"), None).await;
        }
    };
    let batch_replies = futures::future::join_all((0..batches).map(|b| {
        let (client, env) = (client.clone(), env.clone());
        async move {
            let logs: Vec<String> = (0..per_batch).map(|i| format!("b{b}-{i}")).collect();
            let entries: Vec<(u64, &str, Option<&str>)> =
                logs.iter().map(|l| (id, l.as_str(), None)).collect();
            batch_request(&client, &env, batch_body(&entries), None).await
        }
    }));
    let (_, replies) = futures::join!(singles, batch_replies);
    for reply in &replies {
        let seqs: Vec<u64> = reply.results.iter().map(|r| stored(r).1).collect();
        let first = seqs[0];
        assert_eq!(
            seqs,
            (first..first + per_batch as u64).collect::<Vec<_>>(),
            "a message's entries are consecutive"
        );
    }
    let rows = stored_rows(&env).await;
    assert_eq!(rows[&id].len(), 200 + batches * per_batch);
    check_shard_invariants(&env.shards[0].1).await;
    for worker in workers {
        worker.stop().await.expect("worker stops cleanly");
    }
}

/// A batch spanning a shard that is down: core answers per entry (the down shard's entries
/// `unavailable`, the others stored), a re-send with the same keys completes it; JetStream naks
/// the message until the shard is back, then stores the rest, the stored part answering as
/// duplicates. Either way every entry ends up stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_spanning_a_shard_that_goes_down_and_comes_back_loses_and_doubles_nothing() {
    let nats = NatsServer::start();
    let mut pgs = [PgServer::start(), PgServer::start()];
    let names = ["up", "flaky"];
    let mut shards = Vec::new();
    for (name, pg) in names.iter().zip(&pgs) {
        shards.push((name.to_string(), fresh_db(pg, name).await));
    }
    let (x, y) = (id_on(&names, 0, 1), id_on(&names, 1, 1));
    for intake in ["core", "jetstream"] {
        let env = Env {
            nats_url: nats.url(),
            prefix: unique_name(intake),
            shards: shards.clone(),
            intake,
        };
        let worker = env.start_worker(&[]).await;
        let client = env.client().await;
        let tag = |i: usize| format!("{intake}-{i}");
        let logs: Vec<String> = (0..6).map(tag).collect();
        let entries: Vec<(u64, &str, Option<&str>)> = logs
            .iter()
            .enumerate()
            .map(|(i, l)| (if i % 2 == 0 { x } else { y }, l.as_str(), None))
            .collect();
        let body = batch_body(&entries);
        pgs[1].stop();
        if intake == "core" {
            let reply = batch_request(&client, &env, body.clone(), Some("core-batch")).await;
            for (i, result) in reply.results.iter().enumerate() {
                match (i % 2, result) {
                    (0, EntryResult::Stored(r)) => assert!(!r.duplicate),
                    (1, EntryResult::Failed { id, error }) => {
                        assert_eq!(*id, y);
                        assert_eq!(error.code, ErrorCode::Unavailable, "{error:?}");
                    }
                    other => panic!("entry {i}: {other:?}"),
                }
            }
            pgs[1].restart();
            // The client retries the message as it was, until every entry is stored.
            let reply = eventually(30, "the retried batch completes", || {
                let (client, env, body) = (client.clone(), env.clone(), body.clone());
                async move {
                    let reply = batch_request(&client, &env, body, Some("core-batch")).await;
                    reply
                        .results
                        .iter()
                        .all(|r| matches!(r, EntryResult::Stored(_)))
                        .then_some(reply)
                }
            })
            .await;
            for (i, result) in reply.results.iter().enumerate() {
                let (_, _, duplicate) = stored(result);
                assert_eq!(
                    duplicate,
                    i % 2 == 0,
                    "entry {i}: stored before = duplicate now"
                );
            }
        } else {
            let js = jetstream::new(client.clone());
            // No key, no Nats-Msg-Id: the entries' keys derive from the stream identity.
            within(10, "PubAck", async {
                js.publish(env.subject("logs"), body.clone())
                    .await
                    .unwrap()
                    .await
                    .unwrap()
            })
            .await;
            wait_for_rows(
                &env.shards[0].1,
                3,
                "the up shard's part while the other is down",
            )
            .await;
            pgs[1].restart();
            wait_for_rows(&env.shards[1].1, 3, "the redelivered batch completes").await;
            // Acked once complete: the work-queue stream is empty.
            eventually(30, "the message is acked", || {
                let (js, name) = (js.clone(), env.stream());
                async move {
                    let mut stream = js.get_stream(name).await.ok()?;
                    (stream.info().await.ok()?.state.messages == 0).then_some(())
                }
            })
            .await;
        }
        worker.stop().await.expect("worker stops cleanly");
        // Each entry exactly once, in array order per object, on its owner.
        let rows = stored_rows(&env).await;
        for (id, parity) in [(x, 0), (y, 1)] {
            let mine: Vec<String> = rows[&id]
                .iter()
                .map(|r| r.2.clone())
                .filter(|l| l.starts_with(&format!("{intake}-")))
                .collect();
            let expected: Vec<String> = (0..6).filter(|i| i % 2 == parity).map(tag).collect();
            assert_eq!(mine, expected, "{intake}: object {id}");
        }
        for (_, url) in &env.shards {
            check_shard_invariants(url).await;
        }
    }
}

/// JetStream: a batch's entries are stored and the message is acked once; the same
/// Nats-Msg-Id on appends to different objects stores both (keys are per object).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_batches_and_message_ids_are_per_object() {
    let mut env = Env::shared(&["j1", "j2"]).await;
    env.intake = "jetstream";
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let js = jetstream::new(client.clone());
    let entries: Vec<(u64, String)> = (0..100).map(|i| (i % 7 + 1, format!("e{i}"))).collect();
    let body = batch_body(
        &entries
            .iter()
            .map(|(id, l)| (*id, l.as_str(), None))
            .collect::<Vec<_>>(),
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "batch-1");
    within(10, "PubAck", async {
        js.publish_with_headers(env.subject("logs"), headers, body)
            .await
            .unwrap()
            .await
            .unwrap()
    })
    .await;
    // The same message id on two objects: inside the stream's duplicate window
    // (JS_DUPLICATE_WINDOW_MS, 100 ms by default) the stream drops the second and says so in its
    // PubAck; once the window has passed, both objects store it (keys are per object).
    let publish = |id: u64| {
        let (js, subject) = (js.clone(), env.subject("logs"));
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", "same-id");
            let body = serde_json::json!({ "id": id, "log": format!("same-{id}") }).to_string();
            within(10, "PubAck", async {
                js.publish_with_headers(subject, headers, body.into())
                    .await
                    .unwrap()
                    .await
                    .unwrap()
            })
            .await
        }
    };
    let first = publish(8).await;
    assert!(!first.duplicate);
    let started = std::time::Instant::now();
    let within_window = publish(10).await;
    if started.elapsed() < std::time::Duration::from_millis(90) {
        assert!(
            within_window.duplicate,
            "not silent: the PubAck says duplicate"
        );
    }
    // Waiting out the window is the condition under test here, not a stand-in for one. Well
    // past it: the server forgets ids on a timer, which a busy machine can fire late (150 ms
    // after a 100 ms window once saw the id still remembered).
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let after_window = publish(9).await;
    assert!(
        !after_window.duplicate,
        "another object may reuse the id after the window"
    );
    let expected_rows = 102 + usize::from(!within_window.duplicate);
    let rows = eventually(30, "all stored", || {
        let env = &env;
        async move {
            let rows = stored_rows(env).await;
            let n: usize = rows.values().map(Vec::len).sum();
            (n == expected_rows).then_some(rows)
        }
    })
    .await;
    for id in 1..=7u64 {
        let logs: Vec<&str> = rows[&id].iter().map(|r| r.2.as_str()).collect();
        let expected: Vec<String> = entries
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, l)| l.clone())
            .collect();
        assert_eq!(logs, expected, "object {id}: array order, consecutive");
    }
    assert_eq!(rows[&8][0].1.as_deref(), Some("same-id"));
    assert_eq!(rows[&9][0].1.as_deref(), Some("same-id"));
    worker.stop().await.expect("worker stops cleanly");
}

/// A malformed append gets a success PubAck under JetStream (the stream took it), so its dead
/// letter carries what its publisher can match: the stream sequence and the message id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_dead_letter_names_the_stream_sequence_and_message_id() {
    let mut env = Env::shared(&["dl"]).await;
    env.intake = "jetstream";
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let mut dead = client.subscribe(env.subject("dead_letter")).await.unwrap();
    client.flush().await.unwrap();
    let js = jetstream::new(client.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "bad-1");
    let ack = within(10, "PubAck", async {
        js.publish_with_headers(env.subject("logs"), headers, r#"[{"id":1}]"#.into())
            .await
            .unwrap()
            .await
            .unwrap()
    })
    .await;
    let letter = within(10, "dead letter", dead.next()).await.unwrap();
    assert_eq!(
        header(&letter.headers, "Logstore-Stream-Sequence"),
        Some(ack.sequence.to_string())
    );
    assert_eq!(header(&letter.headers, "Logstore-Stream"), Some(ack.stream));
    assert_eq!(
        header(&letter.headers, "Logstore-Msg-Id").as_deref(),
        Some("bad-1")
    );
    assert!(header(&letter.headers, "Logstore-Error")
        .unwrap()
        .starts_with("entry 0: "));
    worker.stop().await.expect("worker stops cleanly");
}

/// The README's Rust example (loadgen/examples/quickstart.rs) runs as written against a fleet
/// with the default subjects: one append, a batch, and a chunked whole-log read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_rust_example_runs_as_written() {
    let nats = NatsServer::start();
    let mut env = Env::shared(&["r1", "r2"]).await;
    env.nats_url = nats.url();
    env.intake = "jetstream";
    let defaults = [
        ("NATS_LOGS_TOPIC", "logs"),
        ("NATS_QUERY_TOPIC", "query"),
        ("NATS_RESPONSE_TOPIC", "response"),
        ("NATS_EVENTS_PREFIX", "appended"),
        ("NATS_DEAD_LETTER_TOPIC", "dead_letter"),
        ("NATS_STREAM", "LOGS"),
    ];
    let worker = WorkerCommand::new(&env).extra(&defaults).start().await;
    let example = bin_path("examples/quickstart");
    let output = within(
        60,
        "the example finishes",
        tokio::process::Command::new(example)
            .env("NATS_URL", nats.url())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "example failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert!(lines[0].starts_with("stored seq 1 at "), "{stdout}");
    assert!(lines[2].starts_with("stored seq 3 at "), "{stdout}");
    for (line, (seq, log)) in
        lines[3..]
            .iter()
            .zip([(1, "disk full"), (2, "retrying"), (3, "recovered")])
    {
        assert!(line.starts_with(&format!("{seq} ")), "{stdout}");
        assert!(line.ends_with(&format!(" {log}")), "{stdout}");
    }
    assert_eq!(worker.terminate().await, Some(0));
}
