//! The partitioned ordered intake (docs/intake.md): publishers per object on `<logs>.<id>` and
//! per partition on `<logs>.p.<k>.b`; partitions spread over the workers, each pulled in order
//! by one worker at a time; a killed owner's partitions taken over within the lease, the other
//! partitions never pausing; a message on the wrong partition refused whole. Workers run as
//! real processes against a real nats-server 2.15.1 and PostgreSQL.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use logstore_protocol::partition::partition;
use support::*;

/// One worker pulls every partition; three more join and each ends with its share; appends
/// published meanwhile per object and per partition are all stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_spread_over_joining_workers_and_keep_each_objects_order() {
    let env = partitioned_env(&["a", "b"]).await;
    let first = start_partitioned(&env).await;
    partitions_settled(&[&first], 30).await;
    let client = env.client().await;
    let objects: Vec<u64> = (1..=24).collect();
    let publisher = {
        let (env, client, objects) = (env.clone(), client.clone(), objects.clone());
        tokio::spawn(async move {
            publish_per_object(&env, &client, "s", &objects, 60, Duration::from_millis(100)).await
        })
    };
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(start_partitioned(&env).await);
    }
    let all: Vec<&WorkerProcess> = std::iter::once(&first).chain(others.iter()).collect();
    let held = partitions_settled(&all, 30).await;
    assert!(held.iter().all(|h| !h.is_empty()), "{held:?}");
    let acked = within(120, "publisher", publisher)
        .await
        .expect("publisher");
    let stored = verify_stored(&env, &acked, 60).await;
    assert_in_stream_order(&stored, &acked);
    for worker in others {
        assert_eq!(worker.terminate().await, Some(0));
    }
    assert_eq!(first.terminate().await, Some(0));
}

/// The unacknowledged deliveries of partition `k`'s consumer.
async fn ack_pending(env: &Env, client: &async_nats::Client, k: u32) -> u64 {
    let js = jetstream::new(client.clone());
    let Ok(stream) = js.get_stream(env.stream()).await else {
        return 0;
    };
    let Ok(mut consumer) = stream
        .get_consumer::<jetstream::consumer::pull::Config>(&format!("workers-p{k}"))
        .await
    else {
        return 0;
    };
    consumer
        .info()
        .await
        .map_or(0, |info| info.num_ack_pending as u64)
}

/// When the owner of object X's partition dies holding unacknowledged deliveries of it (SIGSTOP,
/// then SIGKILL), X's next entry is stored within the lease + 2 s of the kill (the consumer is
/// reset to its ack floor: nothing waits for ack_wait's 30 s), and an object in a partition of
/// the surviving worker never waits more than 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owners_partitions_resume_within_the_lease_and_others_never_pause() {
    let env = partitioned_env(&["a", "b"]).await;
    let mut workers = vec![start_partitioned(&env).await, start_partitioned(&env).await];
    let held = partitions_settled(&[&workers[0], &workers[1]], 30).await;
    // X in a partition of worker 0 (the victim), Y in one of worker 1.
    let x = (1..)
        .find(|&id| held[0].contains(&partition(id, PARTITIONS)))
        .unwrap();
    let y = (1..)
        .find(|&id| held[1].contains(&partition(id, PARTITIONS)))
        .unwrap();
    let client = env.client().await;
    let mut events = client
        .subscribe(format!("{}.*", env.subject("appended")))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let times: std::sync::Arc<std::sync::Mutex<HashMap<u64, Vec<Instant>>>> = Default::default();
    let collector = {
        let times = times.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let id = event
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|id| id.parse().ok());
                if let Some(id) = id {
                    let mut times = times.lock().unwrap();
                    times.entry(id).or_default().push(Instant::now());
                }
            }
        })
    };
    let stored = |id: u64| times.lock().unwrap().get(&id).map_or(0, Vec::len);
    let publisher = {
        let (env, client) = (env.clone(), client.clone());
        tokio::spawn(async move {
            publish_per_object(&env, &client, "t", &[x, y], 200, Duration::from_millis(50)).await
        })
    };
    eventually(30, "load under way", || async {
        (stored(x) >= 40).then_some(())
    })
    .await;
    let victim = workers.remove(0);
    victim.signal(libc::SIGSTOP);
    let k = partition(x, PARTITIONS);
    eventually(10, "the stopped owner holding X's deliveries", || async {
        (ack_pending(&env, &client, k).await > 0).then_some(())
    })
    .await;
    let before = stored(x);
    victim.kill().await;
    let killed_at = Instant::now();
    eventually(60, "every append stored", || async {
        (stored(x) >= 200 && stored(y) >= 200).then_some(())
    })
    .await;
    collector.abort();
    let times = times.lock().unwrap().clone();
    let resumed = times[&x][before..].first().copied().expect("X resumed");
    let takeover = resumed.saturating_duration_since(killed_at);
    eprintln!("X resumed {takeover:?} after the kill");
    assert!(
        takeover <= Duration::from_millis(LEASE_MS + 2_000),
        "X's partition resumed {takeover:?} after its owner was killed"
    );
    let longest_y = times[&y]
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    eprintln!("Y's longest pause: {longest_y:?}");
    assert!(
        longest_y <= Duration::from_secs(1),
        "Y (a survivor's partition) paused {longest_y:?}"
    );
    let acked = within(60, "publisher", publisher).await.expect("publisher");
    let stored = verify_stored(&env, &acked, 60).await;
    assert_in_stream_order(&stored, &acked);
    // The survivor took the victim's partitions over.
    partitions_settled(&[&workers[0]], 30).await;
    assert_eq!(workers.remove(0).terminate().await, Some(0));
}

/// A message whose entries do not belong to its partition subject is refused whole: a dead
/// letter says why, a `rejected.<id>` event tells each object's publisher, nothing of it is
/// stored, and the partition goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_on_the_wrong_partition_is_refused_whole() {
    let env = partitioned_env(&["a"]).await;
    let worker = start_partitioned(&env).await;
    partitions_settled(&[&worker], 30).await;
    let client = env.client().await;
    let mut dead = client.subscribe(env.subject("dead_letter")).await.unwrap();
    let mut rejected = client
        .subscribe(format!("{}.*", env.subject("rejected")))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let js = jetstream::new(client.clone());
    let logs = env.subject("logs");
    // Object 43's append on object 42's subject.
    let wrong_object = serde_json::json!({ "id": 43, "log": "x" }).to_string();
    // A batch on partition k holding an object of another partition.
    let k = partition(1, PARTITIONS);
    let stranger = (2..).find(|&id| partition(id, PARTITIONS) != k).unwrap();
    let wrong_partition =
        serde_json::json!([{ "id": 1, "log": "y" }, { "id": stranger, "log": "z" }]).to_string();
    for (subject, body, named) in [
        (format!("{logs}.42"), wrong_object, vec![43]),
        (
            format!("{logs}.p.{k}.b"),
            wrong_partition,
            vec![1, stranger],
        ),
    ] {
        js.publish(subject, body.into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
        let letter = within(10, "dead letter", dead.next())
            .await
            .expect("subscription open");
        let reason =
            String::from_utf8_lossy(&letter.payload).to_string() + &format!("{:?}", letter.headers);
        assert!(reason.contains("does not belong on"), "{reason}");
        // Its publisher hears of it too: one `rejected.<id>` per object it names.
        let mut heard = Vec::new();
        for _ in &named {
            let event = within(10, "rejected event", rejected.next())
                .await
                .expect("subscription open");
            let event: serde_json::Value =
                serde_json::from_slice(&event.payload).expect("a JSON event");
            assert_eq!(event["error"]["code"], "invalid_request", "{event}");
            heard.push(event["id"].as_u64().expect("an id"));
        }
        heard.sort();
        assert_eq!(heard, named);
    }
    // The partitions go on: a good append after them is stored, the refused ones never are.
    let good = serde_json::json!({ "id": 1, "log": "good" }).to_string();
    js.publish(format!("{logs}.1"), good.into())
        .await
        .expect("publish")
        .await
        .expect("PubAck");
    let rows = eventually(20, "the good append stored", || async {
        let rows = stored_rows(&env).await;
        rows.iter().any(|r| r.log == "good").then_some(rows)
    })
    .await;
    let logs: Vec<&str> = rows.iter().map(|r| r.log.as_str()).collect();
    assert_eq!(logs, ["good"], "{rows:?}");
    assert_eq!(worker.terminate().await, Some(0));
}

/// Publishers of the `logs` lane and of the partitions side by side (different objects): both
/// keep each object's order, everything acknowledged is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_and_partitioned_publishers_side_by_side_both_keep_order() {
    let env = partitioned_env(&["a", "b"]).await;
    let workers = [start_partitioned(&env).await, start_partitioned(&env).await];
    partitions_settled(&[&workers[0], &workers[1]], 30).await;
    let client = env.client().await;
    let acked_legacy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // `logs`: objects 1..=8 (support's publishers); partitions: objects 101..=116.
    let legacy = spawn_publishers(
        &env,
        &client,
        0..3,
        150,
        Some(Duration::from_millis(10)),
        &acked_legacy,
    );
    let objects: Vec<u64> = (101..=116).collect();
    let mut acked =
        publish_per_object(&env, &client, "p", &objects, 40, Duration::from_millis(20)).await;
    acked.extend(join_publishers(legacy, 120).await);
    let stored = verify_stored(&env, &acked, 60).await;
    assert_in_stream_order(&stored, &acked);
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// A worker of the previous version rewrites the stream with `subjects: ["logs"]` and no
/// transform (as it would at its start): a current worker puts the partitions' subjects back
/// within seconds, and appends published per object are stored again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_narrowed_by_an_older_worker_is_widened_again() {
    let env = partitioned_env(&["a"]).await;
    let worker = start_partitioned(&env).await;
    partitions_settled(&[&worker], 30).await;
    let client = env.client().await;
    let js = jetstream::new(client.clone());
    let logs = env.subject("logs");
    let mut stream = js.get_stream(env.stream()).await.expect("stream");
    let mut narrowed = stream.info().await.expect("stream info").config.clone();
    narrowed.subjects = vec![logs.clone()];
    narrowed.subject_transform = None;
    narrowed.metadata.clear();
    js.update_stream(narrowed).await.expect("narrow the stream");
    let info = eventually(
        30,
        "the partitions' subjects back in the stream",
        || async {
            let mut stream = js.get_stream(env.stream()).await.ok()?;
            let config = stream.info().await.ok()?.config.clone();
            config
                .subjects
                .contains(&format!("{logs}.*"))
                .then_some(config)
        },
    )
    .await;
    assert!(info.subjects.contains(&format!("{logs}.p.*.b")), "{info:?}");
    assert_eq!(
        info.metadata.get("logstore.partitions").map(String::as_str),
        Some(PARTITIONS.to_string().as_str())
    );
    let body = serde_json::json!({ "id": 7, "log": "after" }).to_string();
    within(10, "PubAck", async {
        js.publish(format!("{logs}.7"), body.into())
            .await
            .expect("publish")
            .await
            .expect("PubAck")
    })
    .await;
    eventually(20, "the append stored", || async {
        stored_rows(&env)
            .await
            .iter()
            .any(|r| r.id == 7 && r.log == "after")
            .then_some(())
    })
    .await;
    assert_eq!(worker.terminate().await, Some(0));
}
