//! `logstore status --json` (the real binary) checked against the truth read around it, for
//! status.rs: each worker's /metrics, the lease keys in NATS KV, `worker shards status` for the
//! ring record and the move's progress, the consumers' info from the server, the tombstones in
//! SQL. Where the truth moves while the CLI runs, what it printed must lie between the readings
//! before and after ([`look`]).

#![allow(dead_code)] // as the other harness modules: a test binary may use a part of it

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use logstore_protocol::status::WorkerStatus;
use logstore_protocol::Timestamp;
use serde_json::Value;

use crate::resharding::*;
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Running the CLI
// ---------------------------------------------------------------------------------------------

/// `logstore ARGS` with `vars` only: exit code, stdout, stderr.
pub async fn logstore(args: &[&str], vars: &[(&str, String)]) -> (Option<i32>, String, String) {
    run_once("logstore", args, vars, 30).await
}

/// `logstore status --json`, exit 0: its JSON object.
pub async fn status_json(vars: &[(&str, String)]) -> Value {
    let (code, out, err) = logstore(&["status", "--json"], vars).await;
    assert_eq!(code, Some(0), "logstore status --json:\n{out}\n{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not one JSON object ({e}): {out}"))
}

pub fn workers_of(fleet: &Value) -> Vec<WorkerStatus> {
    serde_json::from_value(fleet["workers"].clone())
        .unwrap_or_else(|e| panic!("workers do not decode ({e}): {fleet}"))
}

// ---------------------------------------------------------------------------------------------
// The truth, read around each `logstore status`
// ---------------------------------------------------------------------------------------------

/// One worker process as its /metrics says.
#[derive(Debug, Clone)]
pub struct Seen {
    pub pid: u32,
    pub held: BTreeSet<u32>,
    pub pulls_logs: bool,
    pub mover: bool,
    pub epoch: u64,
    pub shard_up: BTreeMap<String, bool>,
    pub stored: u64,
}

/// Everything `logstore status` reports, read from where it is kept.
#[derive(Debug)]
pub struct Truth {
    pub workers: Vec<Seen>,
    /// Lease key -> holder (`pid N`), None when free.
    pub leases: BTreeMap<String, Option<String>>,
    /// Consumer -> (num_pending, num_ack_pending).
    pub consumers: BTreeMap<String, (u64, u64)>,
    /// `worker shards status --json` (the ring record and the move's progress).
    pub ring: Value,
}

async fn seen(worker: &WorkerProcess, shards: &[&str]) -> Seen {
    let (code, text) = within(10, "GET /metrics", http_get(worker.metrics, "/metrics"))
        .await
        .expect("the worker serves /metrics");
    assert_eq!(code, 200);
    let gauge = |name: &str, labels: &[(&str, &str)]| metric_sum(&text, name, labels);
    Seen {
        pid: worker.pid(),
        held: (0..PARTITIONS)
            .filter(|k| {
                let k = k.to_string();
                gauge("logstore_jetstream_partition_pulling", &[("partition", &k)]) == 1.0
            })
            .collect(),
        pulls_logs: gauge("logstore_jetstream_pulling", &[]) == 1.0,
        mover: gauge("logstore_move_running", &[]) == 1.0,
        epoch: gauge("logstore_ring_epoch", &[]) as u64,
        shard_up: shards
            .iter()
            .map(|s| {
                (
                    s.to_string(),
                    gauge("logstore_shard_up", &[("shard", s)]) == 1.0,
                )
            })
            .collect(),
        stored: gauge("logstore_appends_total", &[("result", "stored")]) as u64,
    }
}

fn logs_lease(env: &Env) -> String {
    format!("intake.{}.workers", env.stream())
}

fn partition_lease(env: &Env, k: u32) -> String {
    format!("{}-p{k}", logs_lease(env))
}

pub fn move_lease(env: &Env) -> String {
    format!("move.{}", env.subject("workers"))
}

/// The lease keys of `env`'s fleet: the `logs` lane's, each partition's, the mover's.
fn lease_keys(env: &Env) -> Vec<String> {
    let mut keys = vec![logs_lease(env), move_lease(env)];
    keys.extend((0..PARTITIONS).map(|k| partition_lease(env, k)));
    keys
}

pub async fn truth(env: &Env, client: &async_nats::Client, workers: &[&WorkerProcess]) -> Truth {
    let shards = ["pg1", "pg2", "pg3"];
    let mut seen_all = Vec::new();
    for worker in workers {
        seen_all.push(seen(worker, &shards).await);
    }
    let mut leases = BTreeMap::new();
    for key in lease_keys(env) {
        let holder = lease_entry(client, &key)
            .await
            .filter(|e| e.operation == jetstream::kv::Operation::Put)
            .map(|e| String::from_utf8_lossy(&e.value).into_owned());
        leases.insert(key, holder);
    }
    let js = jetstream::new(client.clone());
    let mut consumers = BTreeMap::new();
    let names = std::iter::once("workers".to_string())
        .chain((0..PARTITIONS).map(|k| format!("workers-p{k}")));
    for name in names {
        let consumer: jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream(&name, env.stream())
            .await
            .unwrap_or_else(|e| panic!("consumer {name}: {e}"));
        let info = consumer.cached_info();
        consumers.insert(name, (info.num_pending, info.num_ack_pending as u64));
    }
    let (_, ring) = status(env)
        .await
        .expect("`worker shards status --json` answers");
    Truth {
        workers: seen_all,
        leases,
        consumers,
        ring,
    }
}

/// `value` lies between `a` and `b`.
fn between(value: u64, a: u64, b: u64) -> bool {
    (a.min(b)..=a.max(b)).contains(&value)
}

/// The lease `key` names `holder` in the reading before or in the one after.
pub fn held_by(before: &Truth, after: &Truth, key: &str, holder: &str) -> bool {
    [&before.leases[key], &after.leases[key]]
        .iter()
        .any(|h| h.as_deref() == Some(holder))
}

// ---------------------------------------------------------------------------------------------
// Checking a `logstore status --json` against the truth before and after it
// ---------------------------------------------------------------------------------------------

/// One answer per running worker, each against its process's metrics and the leases.
fn check_workers(env: &Env, fleet: &Value, before: &Truth, after: &Truth, since: SystemTime) {
    let workers = workers_of(fleet);
    let pids: BTreeSet<u32> = workers.iter().map(|w| w.pid).collect();
    let running: BTreeSet<u32> = before.workers.iter().map(|w| w.pid).collect();
    assert_eq!(pids, running, "one answer per running worker: {fleet}");
    assert_eq!(workers.len(), running.len(), "{fleet}");
    assert_eq!(fleet["unanswered"], serde_json::json!([]), "{fleet}");
    for w in &workers {
        check_worker(env, w, before, after, since);
    }
}

fn check_worker(env: &Env, w: &WorkerStatus, before: &Truth, after: &Truth, since: SystemTime) {
    let b = before
        .workers
        .iter()
        .find(|s| s.pid == w.pid)
        .expect("seen");
    let a = after.workers.iter().find(|s| s.pid == w.pid).expect("seen");
    let holder = format!("pid {}", w.pid);
    assert_eq!(w.version, env!("CARGO_PKG_VERSION"), "{w:?}");
    assert!(w.ready && w.problems.is_empty(), "{w:?}");
    let started = Timestamp::parse(w.started.as_deref().expect("started"))
        .expect("RFC 3339")
        .to_system_time();
    assert!(started + Duration::from_secs(1) >= since, "{w:?}");
    let up_at_most = SystemTime::now().duration_since(since).unwrap_or_default();
    assert!(
        w.uptime_secs.expect("uptime") <= up_at_most.as_secs() + 1,
        "{w:?}"
    );
    let stored = w.counts["appends"]["stored"].as_u64().unwrap_or(0);
    assert!(between(stored, b.stored, a.stored), "{w:?} {b:?} {a:?}");

    let intake = w.intake.as_ref().expect("intake");
    assert_eq!(intake.kind, "jetstream");
    assert_eq!(intake.stream.as_deref(), Some(env.stream().as_str()));
    assert!(
        intake.ordered && intake.partitions == PARTITIONS,
        "{intake:?}"
    );
    let held: BTreeSet<u32> = intake.held.iter().copied().collect();
    let both: BTreeSet<u32> = b.held.intersection(&a.held).copied().collect();
    let either: BTreeSet<u32> = b.held.union(&a.held).copied().collect();
    assert!(
        both.is_subset(&held) && held.is_subset(&either),
        "{}: status says it pulls {held:?}, its metrics {:?} then {:?}",
        w.pid,
        b.held,
        a.held
    );
    for k in &held {
        assert!(
            held_by(before, after, &partition_lease(env, *k), &holder),
            "{holder} pulls partition {k} without holding its lease"
        );
    }
    assert!(
        [b.pulls_logs, a.pulls_logs].contains(&intake.pulls_logs),
        "{w:?}"
    );
    if intake.pulls_logs {
        assert!(held_by(before, after, &logs_lease(env), &holder), "{w:?}");
    }
    let ring = w.ring.as_ref().expect("ring");
    assert!([b.epoch, a.epoch].contains(&ring.epoch), "{w:?}");
    assert!([b.mover, a.mover].contains(&ring.mover), "{w:?}");
    if ring.mover {
        assert!(held_by(before, after, &move_lease(env), &holder), "{w:?}");
    }
    let names: Vec<&str> = w.shards.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ring_names(ring), "a lane per ring member: {w:?}");
    for shard in &w.shards {
        let up = [b.shard_up[&shard.name], a.shard_up[&shard.name]];
        assert!(up.contains(&shard.up), "{holder}: {shard:?} vs {up:?}");
    }
}

/// The shards a worker routing by `ring` has lanes to, sorted: members and previous members.
fn ring_names(ring: &logstore_protocol::status::RingStatus) -> Vec<&str> {
    let mut names: BTreeSet<&str> = ring.members.iter().map(String::as_str).collect();
    names.extend(ring.previous.iter().flatten().map(String::as_str));
    names.into_iter().collect()
}

/// The fleet's ring against the ring record and the move's progress (`worker shards status`)
/// and the tombstones the move left (`tombstones`, counted after).
fn check_ring(fleet: &Value, before: &Truth, after: &Truth, tombstones: i64) {
    let ring = &fleet["ring"];
    for truth in [before, after] {
        let record = &truth.ring["ring"];
        assert_eq!(ring["epoch"], record["epoch"], "{fleet}\n{}", truth.ring);
        assert_eq!(ring["state"], record["state"], "{fleet}\n{}", truth.ring);
        assert_eq!(names(&ring["members"]), member_names(&record["members"]));
        match record["previous"].as_array() {
            Some(_) => assert_eq!(names(&ring["previous"]), member_names(&record["previous"])),
            None => assert!(ring["previous"].is_null(), "{fleet}"),
        }
    }
    let workers = workers_of(fleet);
    let ranks: BTreeSet<(u64, u8)> = workers
        .iter()
        .map(|w| w.ring.as_ref().expect("ring").rank())
        .collect();
    assert_eq!(ring["agreed"], ranks.len() == 1, "{fleet}");
    let movers: Vec<&str> = workers
        .iter()
        .filter(|w| w.ring.as_ref().is_some_and(|r| r.mover))
        .map(|w| w.id.as_str())
        .collect();
    assert_eq!(ring["movers"], serde_json::json!(movers), "{fleet}");
    let progress = &ring["progress"];
    if progress.is_null() {
        return;
    }
    let moved = |v: &Value| v["progress"]["moved"].as_u64().unwrap_or(0);
    let shown = progress["moved"].as_u64().expect("moved");
    assert!(
        between(shown, moved(&before.ring), moved(&after.ring)),
        "{fleet}\n{}\n{}",
        before.ring,
        after.ring
    );
    assert!(
        shown as i64 <= tombstones,
        "{shown} moved, {tombstones} tombstones"
    );
}

pub fn names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = serde_json::from_value(list.clone()).expect("names");
    names.sort();
    names
}

/// Who pulls which partition, and which nobody pulls, against the workers' metrics.
fn check_partitions(fleet: &Value, before: &Truth, after: &Truth) {
    let workers = workers_of(fleet);
    let partitions = &fleet["partitions"];
    assert_eq!(partitions["count"], PARTITIONS, "{fleet}");
    let unpulled: BTreeSet<u32> =
        serde_json::from_value(partitions["unpulled"].clone()).expect("unpulled");
    for k in 0..PARTITIONS {
        let pullers: Vec<&str> = workers
            .iter()
            .filter(|w| w.intake.as_ref().is_some_and(|i| i.held.contains(&k)))
            .map(|w| w.id.as_str())
            .collect();
        assert_eq!(unpulled.contains(&k), pullers.is_empty(), "{fleet}");
        let listed = &partitions["pulled_by"][k.to_string()];
        match pullers.is_empty() {
            true => assert!(listed.is_null(), "{fleet}"),
            false => assert_eq!(*listed, serde_json::json!(pullers), "{fleet}"),
        }
        if pullers.is_empty() {
            // Nobody pulled it in at least one of the readings.
            let free = |t: &Truth| t.workers.iter().all(|w| !w.held.contains(&k));
            assert!(free(before) || free(after), "partition {k}: {fleet}");
        }
    }
    let lane: Vec<&str> = workers
        .iter()
        .filter(|w| w.intake.as_ref().is_some_and(|i| i.pulls_logs))
        .map(|w| w.id.as_str())
        .collect();
    assert_eq!(fleet["logs_lane"], serde_json::json!(lane), "{fleet}");
}

/// Every consumer's lag between the server's numbers before and after.
fn check_consumers(fleet: &Value, before: &Truth, after: &Truth) {
    let consumers = fleet["consumers"].as_array().expect("consumers");
    let listed: BTreeSet<&str> = consumers
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    let known: BTreeSet<&str> = before.consumers.keys().map(String::as_str).collect();
    assert_eq!(listed, known, "{fleet}");
    for c in consumers {
        let name = c["name"].as_str().expect("name");
        assert!(c["error"].is_null(), "{c}");
        let (b, a) = (before.consumers[name], after.consumers[name]);
        let pending = c["num_pending"].as_u64().expect("num_pending");
        let ack_pending = c["num_ack_pending"].as_u64().expect("num_ack_pending");
        assert!(between(pending, b.0, a.0), "{c}: {b:?} then {a:?}");
        assert!(between(ack_pending, b.1, a.1), "{c}: {b:?} then {a:?}");
    }
}

/// Each shard's up and down workers as the answers say.
fn check_shards(fleet: &Value) {
    for shard in fleet["shards"].as_array().expect("shards") {
        let name = shard["name"].as_str().expect("name");
        for w in workers_of(fleet) {
            let up = w.shards.iter().find(|s| s.name == name).map(|s| s.up);
            let listed_up = shard["up"]
                .as_array()
                .expect("up")
                .contains(&w.id.as_str().into());
            let listed_down = shard["down"]
                .as_array()
                .expect("down")
                .contains(&w.id.as_str().into());
            assert_eq!(
                (listed_up, listed_down),
                (up == Some(true), up == Some(false))
            );
        }
    }
}

/// Read the truth, run `logstore status --json`, read the truth again, and check the one
/// against the other.
pub async fn look(
    world: &World,
    client: &async_nats::Client,
    workers: &[&WorkerProcess],
    since: SystemTime,
) -> (Value, Truth, Truth) {
    let env = &world.env;
    let before = truth(env, client, workers).await;
    let fleet = status_json(&env.settings(free_port())).await;
    let after = truth(env, client, workers).await;
    let dbs = connect_all(&world.all_shards()).await;
    let tombstones = count(
        &dbs,
        "SELECT count(*) FROM objects WHERE moved_to IS NOT NULL",
    )
    .await;
    check_workers(env, &fleet, &before, &after, since);
    check_ring(&fleet, &before, &after, tombstones);
    check_partitions(&fleet, &before, &after);
    check_consumers(&fleet, &before, &after);
    check_shards(&fleet);
    (fleet, before, after)
}
