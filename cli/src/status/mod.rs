//! `logstore status`: the fleet at a glance. Every worker registered with the NATS service API
//! (`$SRV.INFO.logstore`, those taking appends on this logs subject) is asked on its status
//! endpoint (`logstore.status.<id>`) what it knows: its readiness, the partitions it pulls,
//! the ring it routes by and the move's progress, the consumers' lag, its shards up or down.
//! The answers are put side by side: which partitions nobody pulls (or two pull), whether the
//! workers agree on the ring, which shard is down for whom.
//!
//! A worker registers again when its ring changes, so for a moment it may be listed twice (the
//! service-info key `worker` names the process): the registration with the later ring is kept.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use logstore_protocol::discover::{self, Instance};
use logstore_protocol::status::{
    ConsumerLag, MoveProgress, RingStatus, WorkerStatus, STATUS_ENDPOINT, WORKER_KEY,
};
use serde::Serialize;

use crate::client::{ClientError, Connection};
use crate::CliError;

mod text;

/// What `logstore status --json` prints: the workers' answers and what they say together.
#[derive(Debug, Serialize)]
pub struct Fleet {
    pub logs_subject: String,
    /// Each answering worker's status, ordered by id.
    pub workers: Vec<WorkerStatus>,
    /// Workers registered with the service API whose status endpoint did not answer.
    pub unanswered: Vec<Unanswered>,
    /// The latest ring any worker routes by.
    pub ring: Option<FleetRing>,
    /// The stream's partitions and who pulls them (JetStream intake).
    pub partitions: Option<Partitions>,
    /// Workers pulling the `logs` lane.
    pub logs_lane: Vec<String>,
    /// The consumers' lag, as the first worker that could ask the server reported it.
    pub consumers: Vec<ConsumerLag>,
    /// Each shard, and which workers see it up or down.
    pub shards: Vec<FleetShard>,
}

#[derive(Debug, Serialize)]
pub struct Unanswered {
    pub id: String,
    pub worker: String,
    pub version: String,
    pub why: String,
}

#[derive(Debug, Serialize)]
pub struct FleetRing {
    #[serde(flatten)]
    pub ring: RingStatus,
    /// Every answering worker routes by this ring.
    pub agreed: bool,
    /// Workers carrying the change out (one at most, but two answers may straddle a takeover).
    pub movers: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Partitions {
    pub count: u32,
    /// Partition -> the workers pulling it.
    pub pulled_by: BTreeMap<u32, Vec<String>>,
    /// Partitions no answering worker pulls.
    pub unpulled: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub struct FleetShard {
    pub name: String,
    pub up: Vec<String>,
    pub down: Vec<String>,
}

/// Ask the fleet and print what it says; an error (exit 4) when no worker answers.
pub async fn status(
    connection: &Connection,
    out: &mut dyn Write,
    json: bool,
) -> Result<(), CliError> {
    let fleet = connection.guarded(gather(connection)).await?;
    if json {
        let line = serde_json::to_string(&fleet).map_err(std::io::Error::other)?;
        writeln!(out, "{line}")?;
    } else {
        text::print(out, &fleet)?;
    }
    Ok(())
}

/// Find the workers, ask each, and put the answers together.
async fn gather(connection: &Connection) -> Result<Fleet, ClientError> {
    let logs = &connection.subjects.logs;
    let instances = discover::instances(&connection.client, logs, connection.timeout)
        .await
        .map_err(|why| ClientError::NoAnswer {
            subject: format!("$SRV.INFO.{}", discover::SERVICE_NAME),
            why,
        })?;
    let asked = futures::future::join_all(instances.iter().map(|i| ask(connection, i))).await;
    let (workers, unanswered) = newest_per_worker(instances.into_iter().zip(asked).collect());
    if workers.is_empty() {
        let why = unanswered
            .iter()
            .map(|u| format!("{}: {}", u.id, u.why))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ClientError::NoAnswer {
            subject: format!("{}.status.*", discover::SERVICE_NAME),
            why,
        });
    }
    Ok(summarise(logs, workers, unanswered))
}

/// One instance's status answer.
async fn ask(connection: &Connection, instance: &Instance) -> Result<WorkerStatus, String> {
    let Some(subject) = instance.endpoint(STATUS_ENDPOINT) else {
        return Err("it has no status endpoint".to_string());
    };
    match connection
        .request::<WorkerStatus>(subject, Vec::new())
        .await
    {
        Ok(status) => Ok(status),
        // A refusal by the server is the whole command's problem, not this worker's.
        Err(ClientError::Denied { violation, hint }) => Err(format!("{violation}{hint}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A registration and its status answer, or why there is none.
type Asked = (Instance, Result<WorkerStatus, String>);

/// One entry per worker process: its answering registration with the latest ring (a worker
/// that registered again lists both for a moment), else why it did not answer.
fn newest_per_worker(asked: Vec<Asked>) -> (Vec<WorkerStatus>, Vec<Unanswered>) {
    let mut by_worker: BTreeMap<String, Vec<Asked>> = BTreeMap::new();
    for (instance, answer) in asked {
        let worker = instance
            .metadata
            .get(WORKER_KEY)
            .cloned()
            .unwrap_or_else(|| instance.id.clone());
        by_worker
            .entry(worker)
            .or_default()
            .push((instance, answer));
    }
    let mut workers = Vec::new();
    let mut unanswered = Vec::new();
    for (worker, mut answers) in by_worker {
        let newest = answers
            .iter()
            .filter_map(|(_, answer)| answer.as_ref().ok())
            .max_by_key(|status| status.ring.as_ref().map(RingStatus::rank));
        if let Some(status) = newest {
            workers.push(status.clone());
            continue;
        }
        // None answered: the first registration says why.
        let (instance, answer) = answers.remove(0);
        unanswered.push(Unanswered {
            id: instance.id,
            worker,
            version: instance.version,
            why: answer.err().unwrap_or_default(),
        });
    }
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    (workers, unanswered)
}

/// What the answers say together.
pub fn summarise(logs: &str, workers: Vec<WorkerStatus>, unanswered: Vec<Unanswered>) -> Fleet {
    Fleet {
        logs_subject: logs.to_string(),
        ring: ring(&workers),
        partitions: partitions(&workers),
        logs_lane: workers
            .iter()
            .filter(|w| w.intake.as_ref().is_some_and(|i| i.pulls_logs))
            .map(|w| w.id.clone())
            .collect(),
        consumers: consumers(&workers),
        shards: shards(&workers),
        workers,
        unanswered,
    }
}

fn ring(workers: &[WorkerStatus]) -> Option<FleetRing> {
    let rings: Vec<&RingStatus> = workers.iter().filter_map(|w| w.ring.as_ref()).collect();
    let latest = rings.iter().max_by_key(|r| r.rank())?;
    let agreed = workers
        .iter()
        .all(|w| w.ring.as_ref().map(RingStatus::rank) == Some(latest.rank()));
    // The mover's own progress is the freshest; else any worker's of this epoch.
    let progress: Option<MoveProgress> = rings
        .iter()
        .filter(|r| r.epoch == latest.epoch)
        .filter_map(|r| r.progress.clone().map(|p| (r.mover, p)))
        .max_by_key(|(mover, p)| (*mover, p.moved + p.purged))
        .map(|(_, p)| p);
    Some(FleetRing {
        ring: RingStatus {
            progress,
            mover: false,
            ..(*latest).clone()
        },
        agreed,
        movers: workers
            .iter()
            .filter(|w| w.ring.as_ref().is_some_and(|r| r.mover))
            .map(|w| w.id.clone())
            .collect(),
    })
}

fn partitions(workers: &[WorkerStatus]) -> Option<Partitions> {
    let count = workers
        .iter()
        .filter_map(|w| w.intake.as_ref())
        .map(|i| i.partitions)
        .max()
        .filter(|count| *count > 0)?;
    let mut pulled_by: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for worker in workers {
        for k in worker.intake.iter().flat_map(|i| &i.held) {
            pulled_by.entry(*k).or_default().push(worker.id.clone());
        }
    }
    let unpulled = (0..count).filter(|k| !pulled_by.contains_key(k)).collect();
    Some(Partitions {
        count,
        pulled_by,
        unpulled,
    })
}

/// Each consumer once: the first report with numbers, else the first with an error.
fn consumers(workers: &[WorkerStatus]) -> Vec<ConsumerLag> {
    let mut chosen: Vec<ConsumerLag> = Vec::new();
    for lag in workers
        .iter()
        .filter_map(|w| w.intake.as_ref())
        .flat_map(|i| &i.consumers)
    {
        match chosen.iter_mut().find(|c| c.name == lag.name) {
            Some(known) if known.error.is_some() && lag.error.is_none() => *known = lag.clone(),
            Some(_) => {}
            None => chosen.push(lag.clone()),
        }
    }
    chosen.sort_by_key(|c| (c.partition.is_some(), c.partition, c.name.clone()));
    chosen
}

fn shards(workers: &[WorkerStatus]) -> Vec<FleetShard> {
    let names: BTreeSet<&str> = workers
        .iter()
        .flat_map(|w| w.shards.iter().map(|s| s.name.as_str()))
        .collect();
    names
        .into_iter()
        .map(|name| {
            let mut shard = FleetShard {
                name: name.to_string(),
                up: Vec::new(),
                down: Vec::new(),
            };
            for worker in workers {
                match worker.shards.iter().find(|s| s.name == name) {
                    Some(s) if s.up => shard.up.push(worker.id.clone()),
                    Some(_) => shard.down.push(worker.id.clone()),
                    None => {}
                }
            }
            shard
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use logstore_protocol::status::{IntakeStatus, RingState, ShardStatus};

    fn worker(id: &str, epoch: u64, held: &[u32], up: bool) -> WorkerStatus {
        WorkerStatus {
            id: id.into(),
            worker: format!("w-{id}"),
            version: "0.1.0".into(),
            pid: 1,
            started: None,
            uptime_secs: Some(5),
            ready: up,
            problems: vec![],
            counts: serde_json::Value::Null,
            intake: Some(IntakeStatus {
                kind: "jetstream".into(),
                partitions: 4,
                held: held.to_vec(),
                consumers: vec![ConsumerLag {
                    name: "workers-p1".into(),
                    partition: Some(1),
                    num_pending: Some(3),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ring: Some(RingStatus {
                epoch,
                state: RingState::Moving,
                members: vec!["a".into()],
                previous: None,
                mover: epoch == 2,
                progress: None,
            }),
            shards: vec![ShardStatus {
                name: "a".into(),
                up,
                problem: None,
            }],
        }
    }

    #[test]
    fn the_answers_add_up_to_the_fleet() {
        let fleet = summarise(
            "logs",
            vec![worker("x", 2, &[0, 2], true), worker("y", 1, &[2], false)],
            vec![],
        );
        let partitions = fleet.partitions.unwrap();
        assert_eq!(partitions.unpulled, [1, 3]);
        assert_eq!(partitions.pulled_by[&2], ["x", "y"]);
        let ring = fleet.ring.unwrap();
        assert_eq!((ring.ring.epoch, ring.agreed), (2, false));
        assert_eq!(ring.movers, ["x"]);
        assert_eq!(fleet.shards[0].up, ["x"]);
        assert_eq!(fleet.shards[0].down, ["y"]);
        assert_eq!(fleet.consumers.len(), 1);
    }

    #[test]
    fn a_worker_registered_twice_counts_once_with_its_later_ring() {
        let instance = |id: &str| Instance {
            name: "logstore".into(),
            id: id.into(),
            version: "0.1.0".into(),
            metadata: [(WORKER_KEY.to_string(), "p1".to_string())].into(),
            endpoints: vec![],
        };
        let (workers, unanswered) = newest_per_worker(vec![
            (instance("old"), Ok(worker("old", 1, &[], true))),
            (instance("new"), Ok(worker("new", 2, &[], true))),
            (
                Instance {
                    metadata: Default::default(),
                    ..instance("gone")
                },
                Err("no answer".into()),
            ),
        ]);
        assert_eq!(workers.len(), 1);
        assert_eq!(workers[0].id, "new");
        assert_eq!(unanswered.len(), 1);
        assert_eq!(unanswered[0].why, "no answer");
    }
}
