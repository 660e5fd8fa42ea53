//! The partitioned intake under test (docs/intake.md): workers with [`PARTITIONS`] partitions
//! and a short lease, who pulls what (from each worker's metrics), and publishers per object.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use logstore_protocol::partition::partition;

use super::env::Env;
use super::eventually;
use super::http::{http_get, metric_sum};
use super::load::{publish_until_acked, Acked};
use super::worker::{WorkerCommand, WorkerProcess};

/// Partitions of the stream the workers under test create.
pub const PARTITIONS: u32 = 8;
/// JS_LEASE_MS of the workers under test: a crashed owner's partitions move this soon.
pub const LEASE_MS: u64 = 1500;

/// Shards `names` and JetStream intake.
pub async fn partitioned_env(names: &[&str]) -> Env {
    let mut env = Env::shared(names).await;
    env.intake = "jetstream";
    env
}

/// The settings that make a worker pull [`PARTITIONS`] partitions with a [`LEASE_MS`] lease.
pub fn partition_settings() -> [(&'static str, String); 2] {
    [
        ("JS_PARTITIONS", PARTITIONS.to_string()),
        ("JS_LEASE_MS", LEASE_MS.to_string()),
    ]
}

/// A worker process with [`partition_settings`], ready.
pub async fn start_partitioned(env: &Env) -> WorkerProcess {
    WorkerCommand::new(env)
        .extra(&partition_settings())
        .start()
        .await
}

/// The partitions `worker` says it pulls (`logstore_jetstream_partition_pulling` = 1).
pub async fn pulled_by(worker: &WorkerProcess) -> BTreeSet<u32> {
    let Some((200, text)) = http_get(worker.metrics, "/metrics").await else {
        return BTreeSet::new();
    };
    (0..PARTITIONS)
        .filter(|k| {
            metric_sum(
                &text,
                "logstore_jetstream_partition_pulling",
                &[("partition", &k.to_string())],
            ) == 1.0
        })
        .collect()
}

/// Wait until every partition is pulled by exactly one of `workers`, each pulling at most
/// ⌈P/W⌉; returns who pulls what.
pub async fn partitions_settled(workers: &[&WorkerProcess], secs: u64) -> Vec<BTreeSet<u32>> {
    let share = (PARTITIONS as usize).div_ceil(workers.len());
    eventually(secs, "partitions spread over the workers", || async {
        let mut held = Vec::new();
        for worker in workers {
            held.push(pulled_by(worker).await);
        }
        let total: usize = held.iter().map(BTreeSet::len).sum();
        let union: BTreeSet<u32> = held.iter().flatten().copied().collect();
        let spread = total == PARTITIONS as usize
            && union.len() == PARTITIONS as usize
            && held.iter().all(|h| h.len() <= share);
        spread.then_some(held)
    })
    .await
}

/// `n` appends to each of `objects`, in turn, each on `<logs>.<id>` (or, every fifth, as a
/// one-entry batch on `<logs>.p.<k>.b`), waiting for each PubAck; `pace` apart.
pub async fn publish_per_object(
    env: &Env,
    client: &async_nats::Client,
    tag: &str,
    objects: &[u64],
    n: usize,
    pace: Duration,
) -> Vec<Acked> {
    let js = jetstream::new(client.clone());
    let logs = env.subject("logs");
    let mut acked = Vec::new();
    let mut ticker = tokio::time::interval(pace);
    for i in 0..n {
        ticker.tick().await;
        for &id in objects {
            let log = format!("{tag}-{id}-{i}");
            let (subject, body) = if i % 5 == 4 {
                let k = partition(id, PARTITIONS);
                let body = serde_json::json!([{ "id": id, "log": log }]);
                (format!("{logs}.p.{k}.b"), body)
            } else {
                (
                    format!("{logs}.{id}"),
                    serde_json::json!({ "id": id, "log": log }),
                )
            };
            let sequence = publish_until_acked(&js, &subject, Some(&log), body.to_string()).await;
            acked.push((id, sequence, log));
        }
    }
    acked
}
