//! The partitioned intake under faults (docs/intake.md, "Invariants"): workers SIGKILLed at
//! random and replaced, a deposed owner woken after its lease passed on. Every append the
//! stream acknowledged is stored exactly once, each object's entries in stream order with
//! gapless seqs. Real worker processes, nats-server 2.15.1 and PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use logstore_protocol::partition::partition;
use support::*;

/// 4 workers; for 60 s a random one is SIGKILLed every 5 s and a new one started, while
/// publishers append per object and per partition: zero inversions, every acknowledged append
/// stored once, seqs gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_every_5_s_for_60_s_keep_order_and_exactly_once() {
    let env = partitioned_env(&["a", "b"]).await;
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(start_partitioned(&env).await);
    }
    let client = env.client().await;
    let objects: Vec<u64> = (1..=16).collect();
    // ~66 s of load: 1,320 rounds of 16 objects, 50 ms apart.
    let publisher = {
        let (env, client) = (env.clone(), client.clone());
        tokio::spawn(async move {
            publish_per_object(
                &env,
                &client,
                "c",
                &objects,
                1_320,
                Duration::from_millis(50),
            )
            .await
        })
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("kill order seed {seed}");
    let mut state = seed;
    let started = Instant::now();
    let mut kills = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.tick().await;
    while started.elapsed() < Duration::from_secs(60) {
        ticker.tick().await;
        // xorshift: which worker dies this time.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let victim = (state % workers.len() as u64) as usize;
        workers.remove(victim).kill().await;
        kills += 1;
        workers.push(start_partitioned(&env).await);
    }
    let acked = within(180, "publisher", publisher)
        .await
        .expect("publisher");
    let stored = verify_stored(&env, &acked, 120).await;
    assert_in_stream_order(&stored, &acked);
    eprintln!(
        "{kills} kills, {} appends acknowledged and stored once, in order",
        acked.len()
    );
    let all: Vec<&WorkerProcess> = workers.iter().collect();
    partitions_settled(&all, 30).await;
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// The owner of X's partition is stopped (SIGSTOP) past its lease while appends keep coming;
/// the other worker takes the partition over; then the owner wakes (SIGCONT). It pulls nothing
/// more of that partition while the other holds it (its lease is gone), whatever it had in hand
/// lands as duplicates, and every acknowledged append is stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_owner_woken_after_its_lease_passed_on_changes_nothing() {
    let env = partitioned_env(&["a", "b"]).await;
    let workers = [start_partitioned(&env).await, start_partitioned(&env).await];
    let held = partitions_settled(&[&workers[0], &workers[1]], 30).await;
    let x = (1..)
        .find(|&id| held[0].contains(&partition(id, PARTITIONS)))
        .expect("an object in worker 0's partitions");
    let k = partition(x, PARTITIONS);
    let client = env.client().await;
    let publisher = {
        let (env, client) = (env.clone(), client.clone());
        tokio::spawn(async move {
            publish_per_object(
                &env,
                &client,
                "d",
                &[x, x + 1, x + 2],
                150,
                Duration::from_millis(40),
            )
            .await
        })
    };
    eventually(30, "load under way", || async {
        (stored_rows(&env).await.len() > 60).then_some(())
    })
    .await;
    workers[0].signal(libc::SIGSTOP);
    eventually(30, "the other worker pulls X's partition", || async {
        pulled_by(&workers[1]).await.contains(&k).then_some(())
    })
    .await;
    workers[0].signal(libc::SIGCONT);
    let acked = within(120, "publisher", publisher)
        .await
        .expect("publisher");
    let stored = verify_stored(&env, &acked, 60).await;
    assert_in_stream_order(&stored, &acked);
    // Never both at once: the woken worker gave the partition up (or holds it again only after
    // the other released it).
    let (first, second) = (pulled_by(&workers[0]).await, pulled_by(&workers[1]).await);
    assert!(
        first.is_disjoint(&second),
        "both pull a partition: {first:?} and {second:?}"
    );
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// A shard outage, a takeover during it and a NATS restart, one after the other under load:
/// the takeover resets the partitions' consumers while appends wait behind the down shard; the
/// shard comes back; NATS restarts. Every acknowledged append is stored once, in stream order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_outage_a_takeover_and_a_nats_restart_keep_order_and_exactly_once() {
    let mut nats = NatsServer::start();
    let mut own = PgServer::start();
    let mut env = partitioned_env(&["steady"]).await;
    env.nats_url = nats.url();
    env.shards
        .push(("flaky".to_string(), fresh_db(&own, "flaky").await));
    let mut workers = vec![start_partitioned(&env).await, start_partitioned(&env).await];
    let client = within(
        10,
        "connect",
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(nats.url()),
    )
    .await
    .expect("connect");
    let objects: Vec<u64> = (1..=16).collect();
    // ~30 s of load: 600 rounds of 16 objects, 50 ms apart.
    let publisher = {
        let (env, client) = (env.clone(), client.clone());
        tokio::spawn(async move {
            publish_per_object(&env, &client, "o", &objects, 600, Duration::from_millis(50)).await
        })
    };
    eventually(60, "load under way", || async {
        (stored_rows(&env).await.len() > 300).then_some(())
    })
    .await;
    own.kill();
    let at_outage = stored_rows(&env).await.len();
    // The steady shard keeps storing while the flaky one's appends wait in the workers.
    eventually(30, "the steady shard storing during the outage", || async {
        (stored_rows(&env).await.len() > at_outage + 200).then_some(())
    })
    .await;
    // A takeover during the outage: the survivor resets the dead owner's consumers.
    workers.remove(0).kill().await;
    // Not ready while a shard is down (/readyz says so), but it pulls.
    workers.push(
        WorkerCommand::new(&env)
            .extra(&partition_settings())
            .spawn(),
    );
    let all: Vec<&WorkerProcess> = workers.iter().collect();
    partitions_settled(&all, 30).await;
    own.restart();
    nats.restart();
    let acked = within(180, "publisher", publisher)
        .await
        .expect("publisher");
    let stored = verify_stored(&env, &acked, 120).await;
    assert_in_stream_order(&stored, &acked);
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// `worker shards add` while a random worker is SIGKILLed every 5 s: objects move to the new
/// shard while their partitions change hands. Every acknowledged append is stored once, in
/// stream order, on whichever shard now owns its object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_add_during_the_kills_keeps_order_and_exactly_once() {
    let mut env = partitioned_env(&["a", "b"]).await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(start_partitioned(&env).await);
    }
    let client = env.client().await;
    let objects: Vec<u64> = (1..=32).collect();
    // ~30 s of load: 600 rounds of 32 objects, 50 ms apart.
    let publisher = {
        let (env, client) = (env.clone(), client.clone());
        tokio::spawn(async move {
            publish_per_object(&env, &client, "m", &objects, 600, Duration::from_millis(50)).await
        })
    };
    eventually(60, "load under way", || async {
        (stored_rows(&env).await.len() > 300).then_some(())
    })
    .await;
    let servers = shared();
    let c = fresh_db(&servers.pg[0], "c").await;
    let add = {
        let settings = env.settings(free_port());
        let shard = format!("c={c}");
        tokio::spawn(
            async move { run_once("worker", &["shards", "add", &shard], &settings, 120).await },
        )
    };
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let victim = (state % workers.len() as u64) as usize;
        workers.remove(victim).kill().await;
        workers.push(start_partitioned(&env).await);
    }
    let (code, stdout, stderr) = within(150, "worker shards add", add).await.expect("add");
    assert_eq!(code, Some(0), "`worker shards add c`:\n{stdout}\n{stderr}");
    env.shards.push(("c".to_string(), c));
    let acked = within(180, "publisher", publisher)
        .await
        .expect("publisher");
    // The move is carried out in the background: until the ring is steady again (moved and
    // the old copies purged), an object may have a copy on its old and its new shard.
    let settings = env.settings(free_port());
    eventually(180, "the ring steady after the move", || async {
        let (code, _, _) = run_once("worker", &["shards", "status"], &settings, 30).await;
        (code == Some(0)).then_some(())
    })
    .await;
    let stored = verify_stored(&env, &acked, 180).await;
    assert_in_stream_order(&stored, &acked);
    let on_c = stored
        .values()
        .flatten()
        .filter(|row| row.shard == "c")
        .count();
    assert!(on_c > 0, "objects moved to the new shard c");
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}
