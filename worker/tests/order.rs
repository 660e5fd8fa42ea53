//! Per-object order: with any number of workers, each object's entries are stored in the order
//! they were published (JetStream: the stream's order, with the stream's own timestamps; core:
//! each publisher's order, since it waits for each reply). Proven across a SIGKILLed worker and
//! a shard outage, with concurrent publishers writing the same objects.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use async_nats::jetstream::kv::Operation;
use support::*;

/// Short, so a takeover after a SIGKILL (lease expiry + ack_wait) takes seconds.
const ACK_WAIT: (&str, &str) = ("JS_ACK_WAIT_MS", "3000");

async fn js_env(names: &[&str]) -> Env {
    let mut env = Env::shared(names).await;
    env.intake = "jetstream";
    env
}

/// The index of the worker that pulls the stream.
async fn puller(workers: &[WorkerProcess]) -> usize {
    eventually(10, "one worker pulls the stream", || async {
        for (i, worker) in workers.iter().enumerate() {
            if is_leader(worker).await {
                return Some(i);
            }
        }
        None
    })
    .await
}

async fn is_leader(worker: &WorkerProcess) -> bool {
    match http_get(worker.metrics, "/metrics").await {
        Some((200, body)) => metric_sum(&body, "logstore_jetstream_pulling", &[]) == 1.0,
        _ => false,
    }
}

/// Concurrent publishers on shared objects, 3 workers, the one pulling the stream SIGKILLed
/// mid-run (with deliveries in its hands) and replaced: every acknowledged append stored once,
/// and each object's entries in stream order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_keeps_stream_order_when_the_puller_is_sigkilled() {
    let env = js_env(&["a", "b"]).await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(WorkerCommand::new(&env).extra(&[ACK_WAIT]).start().await);
    }
    let client = env.client().await;
    let acked = Arc::new(AtomicUsize::new(0));
    let publishers = spawn_publishers(
        &env,
        &client,
        0..6,
        800,
        Some(Duration::from_millis(5)),
        &acked,
    );
    eventually(60, "appends being stored", || async {
        (stored_rows(&env).await.len() > 600).then_some(())
    })
    .await;
    let leader = puller(&workers).await;
    workers.remove(leader).kill().await;
    let at_kill = acked.load(Ordering::Relaxed);
    workers.push(WorkerCommand::new(&env).extra(&[ACK_WAIT]).start().await);
    let sent = join_publishers(publishers, 120).await;
    assert!(
        at_kill < sent.len(),
        "the kill came before the last publish"
    );
    let by_object = verify_stored(&env, &sent, 120).await;
    assert_in_stream_order(&by_object, &sent);
    for entries in by_object.values() {
        for pair in entries.windows(2) {
            assert!(
                pair[0].ts <= pair[1].ts,
                "object {}: ts went back",
                pair[0].id
            );
        }
    }
    let (mut leaders, mut taken_over) = (0, 0.0);
    for worker in &workers {
        leaders += usize::from(is_leader(worker).await);
        let (_, metrics) = within(10, "metrics", http_get(worker.metrics, "/metrics"))
            .await
            .expect("metrics");
        // Taken over with deliveries unacknowledged: counted as a `crash` takeover (the
        // server then resets the consumer, and they come again as first deliveries).
        taken_over += metric_sum(
            &metrics,
            "logstore_jetstream_takeovers_total",
            &[("kind", "crash")],
        );
    }
    assert_eq!(leaders, 1, "exactly one worker pulls the stream");
    assert!(
        taken_over > 0.0,
        "the kill left deliveries unacknowledged, taken over by the next puller"
    );
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// SIGTERM to the puller hands the stream over cleanly: it drains, acks and releases its lease,
/// so a standby takes over at once (well within the default 30 s ack_wait a crash would cost),
/// and order holds across the handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_stream_over_without_waiting_for_ack_wait() {
    let env = js_env(&["a", "b"]).await;
    let mut workers = vec![
        WorkerCommand::new(&env).start().await,
        WorkerCommand::new(&env).start().await,
    ];
    let client = env.client().await;
    let acked = Arc::new(AtomicUsize::new(0));
    let publishers = spawn_publishers(
        &env,
        &client,
        0..4,
        600,
        Some(Duration::from_millis(5)),
        &acked,
    );
    eventually(60, "appends being stored", || async {
        (stored_rows(&env).await.len() > 300).then_some(())
    })
    .await;
    let leader = puller(&workers).await;
    let stopped = workers.remove(leader);
    let holder = format!("pid {}", stopped.pid());
    assert_eq!(stopped.terminate().await, Some(0));
    // It released the lease on its way out (else the standby would wait for it to expire).
    let lease = lease_entry(&client, &format!("intake.{}.workers", env.stream()))
        .await
        .filter(|entry| entry.operation == Operation::Put)
        .map(|entry| entry.value);
    assert_ne!(
        lease.as_deref(),
        Some(holder.as_bytes()),
        "the stopped puller still holds the lease"
    );
    let standby = &workers[0];
    // A crash would leave its deliveries to expire first (JS_ACK_WAIT_MS, 30 s here).
    eventually(10, "the standby takes over", || async {
        is_leader(standby).await.then_some(())
    })
    .await;
    let sent = join_publishers(publishers, 120).await;
    let by_object = verify_stored(&env, &sent, 60).await;
    assert_in_stream_order(&by_object, &sent);
    let (_, metrics) = within(10, "metrics", http_get(standby.metrics, "/metrics"))
        .await
        .expect("metrics");
    assert_eq!(
        metric_sum(&metrics, "logstore_jetstream_redeliveries_total", &[]),
        0.0,
        "a clean handover redelivers nothing"
    );
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// A backlog published by concurrent publishers while no worker runs, then taken by 3 workers:
/// each entry's ts is exactly its message's stream timestamp, and each object's entries are in
/// stream order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_entries_carry_the_stream_timestamps_in_stream_order() {
    let env = js_env(&["a", "b"]).await;
    // Create the stream and consumer, then leave no worker running.
    WorkerCommand::new(&env).start().await.terminate().await;
    let client = env.client().await;
    let acked = Arc::new(AtomicUsize::new(0));
    let publishers = spawn_publishers(&env, &client, 0..6, 100, None, &acked);
    let sent = join_publishers(publishers, 60).await;
    let stream = jetstream::new(client.clone())
        .get_stream(env.stream())
        .await
        .expect("stream");
    let mut stream_ts = HashMap::new();
    for (_, sequence, log) in &sent {
        let message = stream
            .get_raw_message(*sequence)
            .await
            .expect("message in the stream");
        stream_ts.insert(log.clone(), SystemTime::from(message.time));
    }
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(WorkerCommand::new(&env).start().await);
    }
    let by_object = verify_stored(&env, &sent, 120).await;
    assert_in_stream_order(&by_object, &sent);
    for entries in by_object.values() {
        for Row { ts, log, .. } in entries {
            let published = stream_ts[log.as_str()];
            let micros = |t: SystemTime| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .expect("after 1970")
                    .as_micros()
            };
            assert_eq!(
                micros(*ts),
                micros(published),
                "{log}: ts is not the stream timestamp"
            );
        }
    }
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// One of two shards SIGKILLed mid-run and restarted: its appends wait in the puller (nothing
/// nak'ed, nothing overtaken), the other shard keeps storing meanwhile, and afterwards every
/// object is in stream order with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_order_holds_across_a_shard_outage() {
    let mut own = PgServer::start();
    let mut env = js_env(&["steady"]).await;
    env.shards
        .push(("flaky".to_string(), fresh_db(&own, "flaky").await));
    let workers = vec![
        WorkerCommand::new(&env).extra(&[ACK_WAIT]).start().await,
        WorkerCommand::new(&env).extra(&[ACK_WAIT]).start().await,
    ];
    let client = env.client().await;
    let steady_rows = || async {
        let db = pg_connect(&env.shards[0].1).await;
        db.query_one("SELECT count(*) FROM logs", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
    };
    let acked = Arc::new(AtomicUsize::new(0));
    let publishers = spawn_publishers(
        &env,
        &client,
        0..4,
        1_500,
        Some(Duration::from_millis(5)),
        &acked,
    );
    eventually(60, "appends being stored", || async {
        (steady_rows().await > 200).then_some(())
    })
    .await;
    own.kill();
    let at_kill = steady_rows().await;
    eventually(30, "the steady shard storing during the outage", || async {
        (steady_rows().await > at_kill + 300).then_some(())
    })
    .await;
    // The flaky shard's appends wait in the puller: held, never nak'ed or refused.
    let mut held = 0.0;
    for worker in &workers {
        if is_leader(worker).await {
            let (_, metrics) = within(10, "metrics", http_get(worker.metrics, "/metrics"))
                .await
                .expect("metrics");
            held = metric_sum(&metrics, "logstore_jetstream_held_messages", &[]);
            let refused = metric_sum(&metrics, "logstore_errors_total", &[("kind", "append")]);
            assert_eq!(
                refused, 0.0,
                "an append was refused or nak'ed during the outage"
            );
        }
    }
    assert!(held > 0.0, "the puller holds the down shard's appends");
    own.restart();
    let sent = join_publishers(publishers, 120).await;
    let by_object = verify_stored(&env, &sent, 120).await;
    assert_in_stream_order(&by_object, &sent);
    let total = stored_rows(&env).await.len();
    assert!(
        total > steady_rows().await as usize,
        "some objects live on the flaky shard"
    );
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// A resync while a shard is down (here: forced by a NATS restart, after which the puller
/// must re-check what it holds) counts the appends parked behind that shard as in hand: intake
/// to the other shard goes on during the outage, and nothing is lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_during_a_shard_outage_does_not_wait_for_the_shard() {
    let mut nats = NatsServer::start();
    let mut own = PgServer::start();
    let mut env = js_env(&["steady"]).await;
    env.nats_url = nats.url();
    env.shards
        .push(("flaky".to_string(), fresh_db(&own, "flaky").await));
    let worker = WorkerCommand::new(&env).extra(&[ACK_WAIT]).start().await;
    let steady_rows = || async {
        let db = pg_connect(&env.shards[0].1).await;
        db.query_one("SELECT count(*) FROM logs", &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
    };
    let publish_round = |round: usize| {
        let env = env.clone();
        async move {
            let client = env.client().await;
            let acked = Arc::new(AtomicUsize::new(0));
            let publishers =
                spawn_publishers(&env, &client, round * 10..round * 10 + 4, 200, None, &acked);
            join_publishers(publishers, 60).await
        }
    };
    let mut sent = publish_round(0).await;
    eventually(30, "the first round stored", || async {
        (stored_rows(&env).await.len() == sent.len()).then_some(())
    })
    .await;
    assert!(
        steady_rows().await > 0,
        "some objects live on the steady shard"
    );
    assert!(
        (stored_rows(&env).await.len() as i64) > steady_rows().await,
        "some objects live on the flaky shard"
    );
    // The flaky shard goes down; appends to it are parked in the worker.
    own.kill();
    sent.extend(publish_round(1).await);
    eventually(30, "appends parked behind the down shard", || async {
        let (_, metrics) = http_get(worker.metrics, "/metrics").await?;
        (metric_sum(&metrics, "logstore_jetstream_held_messages", &[]) > 0.0).then_some(())
    })
    .await;
    let resyncs = |metrics: &str| metric_sum(metrics, "logstore_jetstream_resyncs_total", &[]);
    let (_, before) = within(10, "metrics", http_get(worker.metrics, "/metrics"))
        .await
        .expect("metrics");
    nats.stop();
    nats.restart();
    eventually(30, "the puller resynced after the reconnect", || async {
        let (_, metrics) = http_get(worker.metrics, "/metrics").await?;
        (resyncs(&metrics) > resyncs(&before)).then_some(())
    })
    .await;
    let at_restart = steady_rows().await;
    sent.extend(publish_round(2).await);
    // Every publisher cycles through all 8 objects, so each shard that owns one gets at least
    // 100 of this round's 800 appends.
    eventually(
        30,
        "the steady shard storing while the other is still down",
        || async { (steady_rows().await > at_restart + 50).then_some(()) },
    )
    .await;
    own.restart();
    let by_object = verify_stored(&env, &sent, 120).await;
    assert_in_stream_order(&by_object, &sent);
    assert_eq!(worker.terminate().await, Some(0));
}

/// Core intake: concurrent publishers on shared objects, each waiting for its reply (and
/// retrying with the same key when a reply does not come), one of 3 workers SIGKILLed mid-run:
/// each publisher's entries appear in each object in the order it sent them, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_keeps_each_publishers_order_when_a_worker_is_sigkilled() {
    let env = Env::shared(&["a", "b"]).await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(WorkerCommand::new(&env).start().await);
    }
    let client = env.client().await;
    let publishers: Vec<_> = (0..6)
        .map(|p| {
            let (client, subject) = (client.clone(), env.subject("logs"));
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for i in 0..300 {
                    let id = object_of(p, i);
                    let log = format!("p{p}-{i}");
                    let body = append_body(id, &log, Some(&log));
                    // Until a reply says stored (or already stored): a request to the killed
                    // worker gets none, and its retry goes to another.
                    within(60, "append answered", async {
                        loop {
                            let reply = tokio::time::timeout(
                                Duration::from_secs(2),
                                client.request(subject.clone(), body.clone()),
                            )
                            .await;
                            if let Ok(Ok(reply)) = reply {
                                if parse_reply(&reply.payload).is_ok() {
                                    return;
                                }
                            }
                        }
                    })
                    .await;
                    sent.push((id, i as u64, log));
                }
                sent
            })
        })
        .collect();
    eventually(60, "appends being stored", || async {
        (stored_rows(&env).await.len() > 400).then_some(())
    })
    .await;
    workers.remove(0).kill().await;
    let sent = join_publishers(publishers, 180).await;
    let by_object = verify_stored(&env, &sent, 60).await;
    // Order is each publisher's: its counter must grow along each object's seqs.
    let counter: HashMap<&str, (&str, u64)> = sent
        .iter()
        .map(|(_, i, log)| (log.as_str(), (log.split('-').next().unwrap_or(""), *i)))
        .collect();
    for (id, entries) in &by_object {
        let mut last: HashMap<&str, u64> = HashMap::new();
        for Row { seq, log, .. } in entries {
            let (publisher, i) = counter[log.as_str()];
            if let Some(previous) = last.insert(publisher, i) {
                assert!(
                    previous < i,
                    "object {id}: {log} (seq {seq}) after {publisher}-{previous}"
                );
            }
        }
    }
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}
