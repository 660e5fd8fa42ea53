//! `logstore status`, the real binary, against real fleets.
//!
//! - A partitioned JetStream fleet of three workers in the middle of `worker shards add pg3`
//!   (a slow move), then with its mover SIGKILLed, then steady again: every field `logstore
//!   status --json` prints is checked against the truth read around it (each worker's
//!   /metrics, the lease keys in NATS KV, `worker shards status` for the ring record and the
//!   move's progress, the consumers' info from the server, the tombstones in SQL). Where the
//!   truth moves while the CLI runs, it must lie between the readings before and after. And
//!   once the move is steady, every worker's `$SRV.INFO` names the new shard (it registers
//!   again when the ring's members change). With no worker left, the CLI exits 4.
//! - The shipped NATS config: the `client` user sees the fleet.
//!
//! The dead letters (`logstore dead-letters`) are dead_letters.rs's.

mod fleet_status;
mod resharding;
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use fleet_status::*;
use logstore_protocol::discover;
use logstore_protocol::partition::partition;
use resharding::*;
use serde_json::Value;
use support::*;

/// JS_LEASE_MS of the fleet: long enough that a killed worker's partitions stay unpulled
/// while `logstore status` looks (every test here on the shared server uses core intake or
/// this value, since the first worker to create the lease bucket sets its lifetime).
const FLEET_LEASE_MS: &str = "6000";
/// Objects given one entry each before pg3 is added (about a third of them move).
const SEEDED: u64 = 120;
/// MOVE_RATE: slow enough to look at the move half-way.
const SLOW_MOVE: u32 = 4;

// ---------------------------------------------------------------------------------------------
// The fleet under test
// ---------------------------------------------------------------------------------------------

async fn start_worker(world: &World) -> WorkerProcess {
    WorkerCommand::new(&world.env)
        .extra(&world.extra())
        .extra(&[
            ("JS_PARTITIONS", PARTITIONS.to_string()),
            ("JS_LEASE_MS", FLEET_LEASE_MS.to_string()),
        ])
        .start()
        .await
}

/// One entry in each of objects 1..=SEEDED, on their own lanes, stored.
async fn seed_objects(world: &World, client: &async_nats::Client) {
    let env = &world.env;
    let objects: Vec<u64> = (1..=SEEDED).collect();
    publish_per_object(env, client, "seed", &objects, 1, Duration::from_millis(1)).await;
    let dbs = connect_all(&env.shards).await;
    eventually(60, "every seeded entry stored", || async {
        (count(&dbs, "SELECT count(*) FROM logs").await == SEEDED as i64).then_some(())
    })
    .await;
}

/// Waits until a worker carries the move out and has published progress; its index.
async fn wait_for_mover(env: &Env, workers: &[WorkerProcess]) -> usize {
    eventually(
        60,
        "a worker moves objects and publishes progress",
        || async {
            let running = each_worker(workers, "logstore_move_running", &[]).await?;
            let at = running.iter().position(|r| *r == 1.0)?;
            let (code, json) = status(env).await?;
            let moved = json["progress"]["moved"].as_u64().unwrap_or(0);
            (code == 3 && json["progress"]["epoch"] == 2 && moved >= 2).then_some(at)
        },
    )
    .await
}

/// Waits until `workers` registrations answer `$SRV.INFO` (one per worker: no old one left),
/// each naming `shards` in its metadata.
async fn shards_named(client: &async_nats::Client, env: &Env, shards: &str, workers: usize) {
    let logs = env.subject("logs");
    let what = format!("{workers} workers' $SRV.INFO name the shards {shards}");
    eventually(30, &what, || async {
        let instances = discover::instances(client, &logs, Duration::from_secs(1))
            .await
            .ok()?;
        let named = instances.iter().all(|i| i.metadata["shards"] == shards);
        (named && instances.len() == workers).then_some(())
    })
    .await;
}

fn ring_state(fleet: &Value) -> (u64, String) {
    let ring = &fleet["ring"];
    (
        ring["epoch"].as_u64().expect("epoch"),
        ring["state"].as_str().expect("state").to_string(),
    )
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// Done-when: `logstore status` against a partitioned JetStream fleet of three workers while
/// pg3 is being added (a slow move), then with the mover SIGKILLed (its partitions unpulled,
/// with appends waiting in one of them, and nobody moving until its lease expires), then steady
/// again; each run checked field by field against the truth around it (see [`look`]). Once
/// steady, every worker's `$SRV.INFO` names pg3; with no worker left, the CLI exits 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_the_truth_mid_move_after_a_kill_and_once_steady() {
    let world = World::new("jetstream", SLOW_MOVE).await;
    let env = &world.env;
    let since = SystemTime::now();
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(start_worker(&world).await);
    }
    let client = env.client().await;
    seed_objects(&world, &client).await;
    partitions_settled(&workers.iter().collect::<Vec<_>>(), 60).await;

    shards_named(&client, env, "pg1,pg2", 3).await;

    // Mid-move.
    add_shard(env, "pg3", &world.pg3_url, 2).await;
    let mover = wait_for_mover(env, &workers).await;
    let (fleet, _, after) = look(&world, &client, &workers.iter().collect::<Vec<_>>(), since).await;
    assert_eq!(ring_state(&fleet), (2, "moving".to_string()), "{fleet}");
    assert_eq!(names(&fleet["ring"]["previous"]), sorted(&OLD), "{fleet}");
    assert_eq!(
        fleet["ring"]["movers"].as_array().map(Vec::len),
        Some(1),
        "{fleet}"
    );
    assert_eq!(
        fleet["partitions"]["unpulled"],
        serde_json::json!([]),
        "{fleet}"
    );
    for shard in fleet["shards"].as_array().expect("shards") {
        assert_eq!(shard["down"], serde_json::json!([]), "{fleet}");
    }

    // The mover SIGKILLed, and appends on one of its partitions that nobody pulls now.
    let dead = workers.remove(mover);
    let dead_holder = format!("pid {}", dead.pid());
    let orphaned = after.workers[mover].held.clone();
    let k = *orphaned.iter().next().expect("the mover pulled partitions");
    dead.kill().await;
    let id = (1..)
        .find(|id| partition(*id, PARTITIONS) == k)
        .expect("an object");
    publish_per_object(env, &client, "orphan", &[id], 3, Duration::from_millis(1)).await;
    let survivors: Vec<&WorkerProcess> = workers.iter().collect();
    let (fleet, before, after) = look(&world, &client, &survivors, since).await;
    assert_eq!(workers_of(&fleet).len(), 2, "{fleet}");
    let unpulled: BTreeSet<u32> =
        serde_json::from_value(fleet["partitions"]["unpulled"].clone()).expect("unpulled");
    assert!(
        before.workers.iter().all(|w| w.held.is_disjoint(&orphaned)),
        "looked in time: no survivor took the killed worker's partitions yet"
    );
    assert!(unpulled.contains(&k), "partition {k} nobody pulls: {fleet}");
    assert!(
        unpulled.is_subset(&orphaned),
        "{unpulled:?} of {orphaned:?}: {fleet}"
    );
    let lane = format!("workers-p{k}");
    let (pending, ack_pending) = before.consumers[&lane];
    assert_eq!(pending + ack_pending, 3, "the 3 appends wait in {lane}");
    let shown = fleet["consumers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == lane.as_str()))
        .expect("the partition's consumer");
    assert!(
        shown["num_pending"].as_u64().unwrap_or(0) + shown["num_ack_pending"].as_u64().unwrap_or(0)
            >= 1
    );
    assert!(held_by(&before, &after, &move_lease(env), &dead_holder));
    assert_eq!(
        fleet["ring"]["movers"],
        serde_json::json!([]),
        "nobody moves: {fleet}"
    );
    assert_eq!(ring_state(&fleet), (2, "moving".to_string()), "{fleet}");

    steady_and_gone(&world, &client, workers, since).await;
}

/// The move finishes under the survivors: `$SRV.INFO` names pg3, status says steady and every
/// partition pulled, the text form says the same; then no worker answers (exit 4).
async fn steady_and_gone(
    world: &World,
    client: &async_nats::Client,
    workers: Vec<WorkerProcess>,
    since: SystemTime,
) {
    let env = &world.env;
    wait_steady(env, 120).await;
    wait_epoch(&workers, 2).await;
    wait_no_mover(&workers).await;
    let survivors: Vec<&WorkerProcess> = workers.iter().collect();
    partitions_settled(&survivors, 60).await;
    let logs = env.subject("logs");
    shards_named(client, env, "pg1,pg2,pg3", 2).await;

    let (fleet, before, _) = look(world, client, &survivors, since).await;
    assert_eq!(ring_state(&fleet), (2, "steady".to_string()), "{fleet}");
    assert_eq!(names(&fleet["ring"]["members"]), sorted(&NEW), "{fleet}");
    assert!(fleet["ring"]["previous"].is_null() && fleet["ring"]["agreed"] == true);
    assert_eq!(
        fleet["partitions"]["unpulled"],
        serde_json::json!([]),
        "{fleet}"
    );
    for c in fleet["consumers"].as_array().expect("consumers") {
        let name = c["name"].as_str().expect("name");
        let shown = (c["num_pending"].as_u64(), c["num_ack_pending"].as_u64());
        let (pending, ack_pending) = before.consumers[name];
        assert_eq!(shown, (Some(pending), Some(ack_pending)), "{c}");
    }
    let vars = env.settings(free_port());
    let (code, text, err) = logstore(&["status"], &vars).await;
    assert_eq!(code, Some(0), "{text}\n{err}");
    println!("{text}");
    for line in [
        format!(
            "2 workers on {logs} (jetstream intake, stream {}",
            env.stream()
        ),
        "ring: epoch 2, steady: pg1, pg2, pg3 (every worker routes by it)".to_string(),
        format!("partitions: all {PARTITIONS} pulled"),
        "shards: pg1 up, pg2 up, pg3 up".to_string(),
    ] {
        assert!(text.contains(&line), "{line:?} in:\n{text}");
    }
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
    let (code, out, err) = logstore(&["status"], &vars).await;
    assert_eq!(code, Some(4), "no worker answers: {out}\n{err}");
    assert!(err.contains("no worker"), "{err}");
}

/// The shipped NATS config (deploy/nats/run-nats.sh): the `client` user, whose account has no
/// JetStream, sees the fleet through its service imports (`$SRV.>`, `logstore.status.>`): the
/// worker, its ring, the `logs` lane it pulls, the consumer's lag, its shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_user_sees_the_fleet_with_the_shipped_config() {
    let shipped = Shipped::start();
    let env = Env::shared(&["a"]).await;
    let worker = shipped.start_worker(&env).await;
    let client_vars = shipped.login("client");

    // The worker registers with the service API once it takes work.
    let fleet = eventually(30, "`logstore status` as client", || async {
        let (code, out, _) = logstore(&["status", "--json"], &client_vars).await;
        (code == Some(0)).then(|| serde_json::from_str::<Value>(out.trim()).expect("JSON"))
    })
    .await;
    let workers = workers_of(&fleet);
    assert_eq!(workers.len(), 1, "{fleet}");
    let w = &workers[0];
    assert_eq!(w.pid, worker.pid(), "{fleet}");
    assert!(w.ready, "{fleet}");
    let ring = w.ring.as_ref().expect("ring");
    assert_eq!(
        (ring.epoch, ring.members.as_slice()),
        (1, &["a".to_string()][..])
    );
    assert_eq!(fleet["logs_lane"], serde_json::json!([w.id]), "{fleet}");
    assert_eq!(fleet["consumers"][0]["name"], "workers", "{fleet}");
    assert_eq!(fleet["consumers"][0]["num_pending"], 0, "{fleet}");
    assert_eq!(
        fleet["shards"][0]["up"],
        serde_json::json!([w.id]),
        "{fleet}"
    );

    let output = worker.stop().await;
    assert!(!output.contains(" ERROR "), "{output}");
}
