//! `worker shards repair`: rewrite the ring record from the copies the shards keep.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use super::{agreed_fleet, exit_status, read_copies, AdminError, Out};
use crate::config::{Config, ShardConfig};
use crate::membership::{Membership, MembershipError, Stored};
use crate::ring::Record;
use crate::store::RingCopy;
use crate::Chain;

/// Most shards `repair` reads (the members the copies name, transitively).
const REPAIR_MAX_SHARDS: usize = 1_000;

/// What each shard read keeps of the ring (or why it could not be read), by name.
type Copies = HashMap<String, Result<RingCopy, String>>;

/// `worker shards repair`: rewrite the ring record from what the shards keep. Every shard this
/// worker can reach is read (those of POSTGRES_SHARDS, those the record names if it decodes,
/// and the members every copy found names, in turn): its identity (name and fleet), its fence
/// and its copy of the ring record (kept by whoever raised its fence for a change, or
/// published one). The copy of the highest epoch and step of the fleet wins (the fleet: the
/// record's if it decodes, else that of the latest copy); no shard of the fleet may be fenced
/// at a later epoch than it (the record of that epoch would be unknown: refused). It is written
/// over whatever the key holds (garbage, a deletion, or an older record); a move that was
/// running goes on from it. Without any copy (shards from before migration 0008 that never
/// moved since), the record is rebuilt from POSTGRES_SHARDS at the highest fence.
pub(super) async fn repair(
    config: &Config,
    membership: &Membership,
    out: &mut Out,
) -> Result<u8, AdminError> {
    let (revision, current) = read_record(membership, out).await?;
    let read = read_reachable(config, current.as_ref()).await;
    report_unread(&read);
    let (record, source) = choose(config, current.as_ref(), &read)?;
    if let Some(current) = &current {
        if current.fleet == record.fleet && current.rank() >= record.rank() {
            out.line(format_args!(
                "the ring record is readable and current (epoch {}, {:?}); nothing to repair",
                current.epoch, current.state
            ));
            return Ok(0);
        }
    }
    let written = match revision {
        Some(revision) => membership.write(&record, revision).await,
        None => membership.create(&record).await,
    };
    match written {
        Ok(_) => {}
        Err(MembershipError::Changed { .. }) => return Err(AdminError::RepairChanged),
        Err(e) => return Err(e.into()),
    }
    let names: Vec<&str> = record.members.iter().map(|m| m.name.as_str()).collect();
    out.line(format_args!(
        "repaired the ring record from {source}: epoch {} ({:?}), members {}",
        record.epoch,
        record.state,
        names.join(", ")
    ));
    Ok(exit_status(record.state))
}

/// The key's revision (None: no entry) and its record when it decodes; says on `out` when it
/// is missing or does not decode.
async fn read_record(
    membership: &Membership,
    out: &mut Out,
) -> Result<(Option<u64>, Option<Record>), AdminError> {
    let stored: Option<Stored> = membership.entry().await?;
    Ok(match stored {
        Some(Stored {
            revision,
            record: Some(Ok(record)),
        }) => (Some(revision), Some(record)),
        Some(Stored {
            revision,
            record: Some(Err(e)),
        }) => {
            out.line(format_args!(
                "the ring record does not decode: {}",
                Chain(&e)
            ));
            (Some(revision), None)
        }
        Some(Stored { record: None, .. }) | None => {
            out.line("the ring record is missing");
            (None, None)
        }
    })
}

/// Read every shard reachable: POSTGRES_SHARDS, `current`'s members, and the members each copy
/// names, in turn (at most [`REPAIR_MAX_SHARDS`]).
async fn read_reachable(config: &Config, current: Option<&Record>) -> Copies {
    let mut queue: Vec<ShardConfig> = config.shards.clone();
    for member in current.into_iter().flat_map(Record::all_members) {
        queue.push(ShardConfig {
            name: member.name.clone(),
            url: member.url.clone(),
        });
    }
    let mut read: Copies = HashMap::new();
    while !queue.is_empty() && read.len() < REPAIR_MAX_SHARDS {
        let mut seen: HashSet<String> = read.keys().cloned().collect();
        let batch: Vec<ShardConfig> = std::mem::take(&mut queue)
            .into_iter()
            .filter(|shard| seen.insert(shard.name.clone()))
            .collect();
        for (name, copy) in read_copies(config, batch.into_iter()).await {
            let copy = copy.and_then(|copy| {
                if copy.name == name {
                    Ok(copy)
                } else {
                    Err(format!("its database belongs to shard {:?}", copy.name))
                }
            });
            if let Ok(RingCopy {
                record: Some(Ok(record)),
                ..
            }) = &copy
            {
                for member in record.all_members() {
                    if !read.contains_key(&member.name) && member.name != name {
                        queue.push(ShardConfig {
                            name: member.name.clone(),
                            url: member.url.clone(),
                        });
                    }
                }
            }
            read.insert(name, copy);
        }
    }
    read
}

/// Say on stderr, by name, each shard that could not be read and why.
fn report_unread(read: &Copies) {
    let mut unread: Vec<(&String, &String)> = read
        .iter()
        .filter_map(|(name, copy)| Some((name, copy.as_ref().err()?)))
        .collect();
    unread.sort();
    for (name, why) in unread {
        let _ = writeln!(
            std::io::stderr(),
            "worker shards repair: shard {name} not read: {why}"
        );
    }
}

/// The record to write and where it came from: the fleet's latest copy (refused if a shard of
/// the fleet is fenced later), else one rebuilt from POSTGRES_SHARDS at the highest fence.
fn choose(
    config: &Config,
    current: Option<&Record>,
    read: &Copies,
) -> Result<(Record, String), AdminError> {
    // The fleet: the record's, if it decodes and has one; else the latest copy's.
    let copies = || {
        read.iter().filter_map(|(name, copy)| {
            let copy = copy.as_ref().ok()?;
            match &copy.record {
                Some(Ok(record)) if record.fleet.is_some() && record.fleet == copy.fleet => {
                    Some((name, record))
                }
                _ => None,
            }
        })
    };
    let fleet = current.and_then(|record| record.fleet.clone()).or_else(|| {
        copies()
            .max_by_key(|(_, r)| r.rank())
            .and_then(|(_, r)| r.fleet.clone())
    });
    let best = copies()
        .filter(|(_, record)| record.fleet == fleet)
        .max_by_key(|(_, record)| record.rank())
        .map(|(name, record)| (name.clone(), record.clone()));
    let fences = read.iter().filter_map(|(name, copy)| {
        let copy = copy.as_ref().ok()?;
        (copy.fleet == fleet).then_some((name, copy.fence))
    });
    let (highest_fence, fenced_at) = fences
        .max_by_key(|(_, fence)| *fence)
        .map_or((0, None), |(name, fence)| (fence, Some(name.clone())));
    match best {
        Some((name, record)) => {
            if highest_fence > record.epoch {
                return Err(AdminError::Refused(format!(
                    "shard {} is fenced at ring epoch {highest_fence}, and the latest copy of the \
                     ring record the shards keep is of epoch {} (shard {name}): the record of \
                     epoch {highest_fence} is unknown, nothing was written",
                    fenced_at.unwrap_or_default(),
                    record.epoch
                )));
            }
            Ok((record, format!("shard {name}'s copy")))
        }
        None => {
            let configured: Vec<(String, Result<RingCopy, String>)> = config
                .shards
                .iter()
                .filter_map(|s| Some((s.name.clone(), read.get(&s.name)?.clone())))
                .collect();
            let fleet = fleet
                .or_else(|| agreed_fleet(&configured))
                .unwrap_or_else(crate::ring::new_fleet_id);
            let record = Record {
                fleet: Some(fleet),
                ..crate::shards::seed_record(config, highest_fence.max(1))
            };
            Ok((
                record,
                "POSTGRES_SHARDS (no shard keeps a copy of the ring record)".to_string(),
            ))
        }
    }
}
