//! The status endpoint's answer ([`WorkerStatus`]): what this worker knows, read where it
//! keeps it. Readiness and counts from `/readyz` and the metrics; the partitions it pulls and
//! whether it pulls the `logs` lane from the gauges its intake sets when it takes and gives
//! one up (`logstore_jetstream_partition_pulling`, `logstore_jetstream_pulling`); the ring
//! from the view it routes by, the move's progress from the ring's KV bucket, whether it is
//! the mover from `logstore_move_running`; the shards from their health; the consumers' lag
//! from the server, asked when the request comes.

use std::time::Duration;

use async_nats::jetstream::consumer;
use async_nats::service::Request;
use futures::StreamExt;
use logstore_protocol::status::{
    ConsumerLag, IntakeStatus, MoveProgress, RingState, RingStatus, ShardStatus, WorkerStatus,
};
use logstore_protocol::Timestamp;
use prometheus::core::Collector;

use super::{counts, Sources};
use crate::config::{Intake, JetStreamConfig};
use crate::intake::partition_consumer;
use crate::ring::{MoveState, Record};

/// Longest wait for the server's answer about one consumer, and for the move's progress.
const ASK_WAIT: Duration = Duration::from_secs(1);
/// Consumers asked about at once.
const ASK_AT_ONCE: usize = 16;

/// Answer one status request (from `worker`'s registration `id`) with [`status`].
pub(super) async fn answer(sources: &Sources, id: &str, worker: &str, request: Request) {
    // The reply subject is the asker's choice (NATS_REPLY_PREFIXES). The crate's own
    // PING/INFO/STATS verbs answer any reply subject: deployments that let untrusted users
    // publish `$SRV.>` put them in an account of their own (deploy/nats/nats-server.conf),
    // where every reply is the server's.
    let reply = request.message.reply.as_deref().unwrap_or_default();
    if !sources.config.replies.admits(reply) {
        sources
            .metrics
            .replies_refused
            .with_label_values(&["status"])
            .inc();
        return;
    }
    let body = match serde_json::to_vec(&status(sources, id, worker).await) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the status answer");
            return;
        }
    };
    if let Err(e) = request.respond(Ok(body.into())).await {
        tracing::debug!(error = %e, "cannot answer a service status request");
    }
}

/// What this worker knows of itself and the fleet, now.
pub(super) async fn status(sources: &Sources, id: &str, worker: &str) -> WorkerStatus {
    let problems = (sources.readiness)();
    let record = sources.shards.view().layout.record.clone();
    let (intake, ring) = futures::join!(intake(sources), ring(sources, &record));
    WorkerStatus {
        id: id.to_string(),
        worker: worker.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        started: Some(Timestamp::from_system_time(sources.started).to_string()),
        uptime_secs: sources.started.elapsed().ok().map(|d| d.as_secs()),
        ready: problems.is_empty(),
        problems,
        counts: counts(&sources.metrics),
        intake: Some(intake),
        ring: Some(ring),
        shards: sources
            .shards
            .states()
            .into_iter()
            .map(|lane| ShardStatus {
                name: lane.name,
                up: lane.up,
                problem: lane.problem,
            })
            .collect(),
    }
}

/// The ring `record` this worker routes by, whether it moves objects, and the move's
/// progress as its mover last published it (this epoch's only).
async fn ring(sources: &Sources, record: &Record) -> RingStatus {
    let progress = async {
        let membership = sources.shards.membership(&sources.client).await.ok()?;
        membership.progress().await
    };
    let progress = tokio::time::timeout(ASK_WAIT, progress)
        .await
        .ok()
        .flatten()
        .filter(|p| p.epoch == record.epoch)
        .map(|p| MoveProgress {
            epoch: p.epoch,
            todo: p.todo,
            moved: p.moved,
            errors: p.errors,
            purged: p.purged,
        });
    RingStatus {
        epoch: record.epoch,
        state: match record.state {
            MoveState::Steady => RingState::Steady,
            MoveState::Moving => RingState::Moving,
            MoveState::Purging => RingState::Purging,
        },
        members: names(&record.members),
        previous: record.previous.as_deref().map(names),
        mover: sources.metrics.move_running.get() == 1,
        progress,
    }
}

fn names(members: &[crate::ring::Member]) -> Vec<String> {
    members.iter().map(|m| m.name.clone()).collect()
}

/// This worker's intake: what it pulls now, and the fleet's consumers' lag.
async fn intake(sources: &Sources) -> IntakeStatus {
    let js = match &sources.config.intake {
        Intake::Core => {
            return IntakeStatus {
                kind: "core".to_string(),
                ..Default::default()
            }
        }
        Intake::JetStream(js) => js,
    };
    let metrics = &sources.metrics;
    IntakeStatus {
        kind: "jetstream".to_string(),
        stream: Some(js.stream.clone()),
        consumer: Some(js.consumer.clone()),
        ordered: js.ordered,
        partitions: sources.partitions,
        pulls_logs: metrics.jetstream_pulling.get() == 1,
        held: held(&metrics.jetstream_partition_pulling),
        consumers: lag(&sources.client, js, sources.partitions).await,
    }
}

/// The partitions whose `logstore_jetstream_partition_pulling` gauge is 1, in order.
fn held(pulling: &prometheus::IntGaugeVec) -> Vec<u32> {
    let mut held: Vec<u32> = pulling
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .filter(|metric| metric.get_gauge().get_value() == 1.0)
        .filter_map(|metric| {
            metric
                .get_label()
                .iter()
                .find(|pair| pair.name() == "partition")
                .and_then(|pair| pair.value().parse().ok())
        })
        .collect();
    held.sort_unstable();
    held
}

/// The `logs` lane's consumer and each partition's, as the server reports them now.
async fn lag(
    client: &async_nats::Client,
    js: &JetStreamConfig,
    partitions: u32,
) -> Vec<ConsumerLag> {
    let context = async_nats::jetstream::new(client.clone());
    let lanes = std::iter::once((js.consumer.clone(), None))
        .chain((0..partitions).map(|k| (partition_consumer(&js.consumer, k), Some(k))));
    futures::stream::iter(lanes)
        .map(|(name, partition)| {
            let context = &context;
            async move {
                let mut lag = ConsumerLag {
                    name,
                    partition,
                    ..Default::default()
                };
                let asked = context.get_consumer_from_stream::<consumer::pull::Config, _, _>(
                    &lag.name, &js.stream,
                );
                match tokio::time::timeout(ASK_WAIT, asked).await {
                    Ok(Ok(consumer)) => {
                        let info = consumer.cached_info();
                        lag.num_pending = Some(info.num_pending);
                        lag.num_ack_pending = Some(info.num_ack_pending as u64);
                        lag.num_redelivered = Some(info.num_redelivered as u64);
                    }
                    Ok(Err(e)) => lag.error = Some(e.to_string()),
                    Err(_) => lag.error = Some(format!("no answer within {ASK_WAIT:?}")),
                }
                lag
            }
        })
        .buffered(ASK_AT_ONCE)
        .collect()
        .await
}
