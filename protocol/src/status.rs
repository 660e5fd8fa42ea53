//! What a worker's `status` endpoint answers (the NATS service API: every worker registers the
//! endpoint `status` on a subject of its own, `logstore.status.<id>`, named in its service
//! info): the worker's readiness and counts, and what it knows of the fleet: its intake (which
//! partitions it pulls, the consumers' lag), the ring it routes by (epoch, move state, the
//! move's progress) and its shards (up or down). `logstore status` asks every worker and puts
//! the answers side by side (docs/protocol.md, "Worker status").
//!
//! Every field but `id` and `ready` has a default, so the answer of a worker older than a field
//! still decodes.

use serde::{Deserialize, Serialize};

/// The name of the status endpoint in each worker's service info.
pub const STATUS_ENDPOINT: &str = "status";

/// Service-info metadata key: the worker's own id, the same for every registration of one
/// worker process (its service instance id changes when it registers again, which it does
/// when the ring changes, so that its metadata names the ring's shards).
pub const WORKER_KEY: &str = "worker";

/// One worker's answer on its status endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The service instance id (the endpoint's subject ends with it).
    pub id: String,
    /// The worker process's id ([`WORKER_KEY`]).
    #[serde(default)]
    pub worker: String,
    /// The worker's version (its service version).
    #[serde(default)]
    pub version: String,
    /// The worker's process id on its host (the intake and mover leases name their holder
    /// `pid <pid>`).
    #[serde(default)]
    pub pid: u32,
    /// When the worker started (RFC 3339).
    #[serde(default)]
    pub started: Option<String>,
    /// Seconds since it started.
    #[serde(default)]
    pub uptime_secs: Option<u64>,
    /// What `/readyz` says: ready when `problems` is empty.
    pub ready: bool,
    #[serde(default)]
    pub problems: Vec<String>,
    /// Appends and queries by result, errors by code, dead letters by reason, in flight.
    #[serde(default)]
    pub counts: serde_json::Value,
    #[serde(default)]
    pub intake: Option<IntakeStatus>,
    #[serde(default)]
    pub ring: Option<RingStatus>,
    /// The shards this worker has lanes to (the ring's members, and while objects move the
    /// previous ones), by name.
    #[serde(default)]
    pub shards: Vec<ShardStatus>,
}

/// Where a worker takes appends from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntakeStatus {
    /// `core` or `jetstream`.
    pub kind: String,
    #[serde(default)]
    pub stream: Option<String>,
    /// The `logs` lane's durable consumer (partition k's is `<consumer>-p<k>`).
    #[serde(default)]
    pub consumer: Option<String>,
    /// JS_ORDERED: one puller per lane, under a lease.
    #[serde(default)]
    pub ordered: bool,
    /// The stream's partitions this worker takes part in pulling (0: none).
    #[serde(default)]
    pub partitions: u32,
    /// This worker pulls the `logs` lane now (holds its lease; every unordered JetStream
    /// worker pulls it).
    #[serde(default)]
    pub pulls_logs: bool,
    /// The partitions this worker pulls now, in order.
    #[serde(default)]
    pub held: Vec<u32>,
    /// The fleet's consumers as the server reported them when this worker answered.
    #[serde(default)]
    pub consumers: Vec<ConsumerLag>,
}

/// One durable consumer's lag, from the server's consumer info.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerLag {
    pub name: String,
    /// The partition it pulls; none for the `logs` lane.
    #[serde(default)]
    pub partition: Option<u32>,
    /// Messages not yet delivered to any worker.
    #[serde(default)]
    pub num_pending: Option<u64>,
    /// Delivered and not yet acknowledged.
    #[serde(default)]
    pub num_ack_pending: Option<u64>,
    /// Of those, delivered more than once.
    #[serde(default)]
    pub num_redelivered: Option<u64>,
    /// Why the numbers are missing (the server did not answer in time, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether objects are moving (docs/resharding.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RingState {
    Steady,
    Moving,
    Purging,
}

impl RingState {
    pub fn as_str(self) -> &'static str {
        match self {
            RingState::Steady => "steady",
            RingState::Moving => "moving",
            RingState::Purging => "purging",
        }
    }

    /// Within one epoch a change goes moving, purging, steady.
    pub fn step(self) -> u8 {
        match self {
            RingState::Moving => 0,
            RingState::Purging => 1,
            RingState::Steady => 2,
        }
    }
}

/// The ring a worker routes by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingStatus {
    pub epoch: u64,
    pub state: RingState,
    /// The members' names.
    pub members: Vec<String>,
    /// The members before the change being carried out.
    #[serde(default)]
    pub previous: Option<Vec<String>>,
    /// This worker carries the change out now (holds the mover's lease).
    #[serde(default)]
    pub mover: bool,
    /// The move's progress as its mover last published it (this epoch's only).
    #[serde(default)]
    pub progress: Option<MoveProgress>,
}

impl RingStatus {
    /// The order of rings in time: a later epoch, or the same one further along.
    pub fn rank(&self) -> (u64, u8) {
        (self.epoch, self.state.step())
    }
}

/// A move's progress (`worker shards status` prints the same).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveProgress {
    pub epoch: u64,
    /// Objects found to move in the last scan.
    pub todo: u64,
    pub moved: u64,
    /// Failed object moves (each retried).
    pub errors: u64,
    /// Old copies purged.
    pub purged: u64,
}

/// One shard as a worker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub name: String,
    /// Answered its last health check (and is this fleet's).
    pub up: bool,
    /// What keeps it from serving, when something does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_of_an_older_worker_still_decodes() {
        let old: WorkerStatus = serde_json::from_str(
            r#"{"id":"x","ready":true,"problems":[],"counts":{"appends":{}}}"#,
        )
        .unwrap();
        assert_eq!(old.id, "x");
        assert!(old.ready && old.intake.is_none() && old.ring.is_none());
    }

    #[test]
    fn rings_order_by_epoch_then_state() {
        let ring = |epoch, state| RingStatus {
            epoch,
            state,
            members: vec![],
            previous: None,
            mover: false,
            progress: None,
        };
        assert!(ring(2, RingState::Moving).rank() > ring(1, RingState::Steady).rank());
        assert!(ring(2, RingState::Steady).rank() > ring(2, RingState::Purging).rank());
        assert_eq!(
            serde_json::to_string(&RingState::Purging).unwrap(),
            "\"purging\""
        );
    }
}
