//! `worker shards add|remove|status`: the operator's side of ring membership
//! (docs/resharding.md). The commands take the worker's own settings (NATS_URL and the NATS
//! login, NATS_QUEUE_GROUP, the PostgreSQL password and TLS settings) and change or show the
//! fleet's ring record in NATS; the workers carry the change out.

use std::time::Duration;

use crate::config::{parse_shards, without_password, Config};
use crate::ring::{Member, Membership, MoveState, Record};
use crate::store::Shard;
use crate::Chain;

/// Exit status of `status` while a move runs.
pub const EXIT_MOVING: u8 = 3;

/// What `worker shards` was asked to do.
#[derive(Debug, Clone)]
pub enum Command {
    /// `NAME=URL`, as an entry of POSTGRES_SHARDS.
    Add {
        spec: String,
    },
    Remove {
        name: String,
    },
    Status {
        json: bool,
    },
}

/// A refusal or failure, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Nats(#[from] logstore_protocol::nats::ConnectFailure),
    #[error(transparent)]
    Ring(#[from] crate::ring::MembershipError),
    #[error("{0}")]
    Refused(String),
}

/// Run `command`; the exit status on success (0, or [`EXIT_MOVING`] for `status` while a move
/// runs).
pub async fn shards(config: &Config, command: Command) -> Result<u8, AdminError> {
    let client = config
        .nats
        // The login's own inbox prefix (NATS_INBOX_PREFIX, or `_INBOX_<NATS_USER>`): the
        // shipped NATS config lets each user read only its own inboxes.
        .connect(|o| o.name("logstore-worker-admin"))
        .await?;
    let membership = Membership::open(&client, &config.queue_group).await?;
    let seed = crate::shards::seed_record(config, 1);
    let (record, revision) = membership.read_or_seed(&seed).await?;
    let status = match command {
        Command::Status { json } => {
            let progress = membership
                .progress()
                .await
                .filter(|p| p.epoch == record.epoch);
            if json {
                let value = serde_json::json!({ "ring": record, "progress": progress });
                println!("{value}");
            } else {
                print_status(&record, progress.as_ref());
            }
            match record.state {
                MoveState::Steady => 0,
                MoveState::Moving | MoveState::Purging => EXIT_MOVING,
            }
        }
        Command::Add { spec } => {
            steady(&record)?;
            let shard = parse_shards(&spec)
                .map_err(|e| AdminError::Refused(e.to_string()))?
                .into_iter()
                .next()
                .ok_or_else(|| AdminError::Refused("give the new shard as NAME=URL".into()))?;
            if record.members.iter().any(|m| m.name == shard.name) {
                return Err(AdminError::Refused(format!(
                    "shard {} is already a ring member",
                    shard.name
                )));
            }
            let url = without_password(&shard.url);
            // Prepare it with this login now: reachable, migrated, its name recorded (a worker
            // role without DDL rights could not migrate it later).
            let access = config
                .member_access
                .shard(&shard.name, &shard.url)
                .map_err(AdminError::Refused)?;
            let pool = Shard::new(&access, 1, config.shard_timeout.max(Duration::from_secs(5)))
                .map_err(AdminError::Refused)?;
            pool.initialise().await.map_err(|e| {
                AdminError::Refused(format!(
                    "cannot prepare shard {}: {}; nothing changed",
                    shard.name,
                    Chain(&e)
                ))
            })?;
            pool.close();
            let mut members = record.members.clone();
            members.push(Member {
                name: shard.name.clone(),
                url,
            });
            change(&membership, &record, revision, members).await?;
            println!(
                "epoch {}: adding shard {}; objects are moving (follow with `worker shards status`)",
                record.epoch + 1,
                shard.name
            );
            0
        }
        Command::Remove { name } => {
            steady(&record)?;
            if !record.members.iter().any(|m| m.name == name) {
                return Err(AdminError::Refused(format!(
                    "shard {name} is not a ring member"
                )));
            }
            if record.members.len() == 1 {
                return Err(AdminError::Refused(format!(
                    "shard {name} is the only ring member; its objects would have nowhere to go"
                )));
            }
            let members = record
                .members
                .iter()
                .filter(|m| m.name != name)
                .cloned()
                .collect();
            change(&membership, &record, revision, members).await?;
            println!(
                "epoch {}: removing shard {name}; its objects are moving (follow with `worker shards status`)",
                record.epoch + 1
            );
            0
        }
    };
    if let Err(e) = client.flush().await {
        tracing::debug!(error = %e, "flush before exit failed");
    }
    Ok(status)
}

/// Refuse a change while another is being carried out.
fn steady(record: &Record) -> Result<(), AdminError> {
    match record.state {
        MoveState::Steady => Ok(()),
        state => Err(AdminError::Refused(format!(
            "a ring change is being carried out (epoch {}, {state:?}); wait until `worker shards status` exits 0",
            record.epoch
        ))),
    }
}

/// Write the next epoch with `members`, moving from the current ones (compare-and-set: a
/// concurrent change makes this one fail instead of both starting).
async fn change(
    membership: &Membership,
    record: &Record,
    revision: u64,
    members: Vec<Member>,
) -> Result<(), AdminError> {
    let next = Record {
        epoch: record.epoch + 1,
        state: MoveState::Moving,
        members,
        vnodes: record.vnodes,
        previous: Some(record.members.clone()),
    };
    match membership.write(&next, revision).await {
        Ok(_) => Ok(()),
        Err(crate::ring::MembershipError::Changed { .. }) => Err(AdminError::Refused(
            "the ring changed meanwhile (another operator?); check `worker shards status` and try again"
                .into(),
        )),
        Err(e) => Err(e.into()),
    }
}

fn print_status(record: &Record, progress: Option<&crate::ring::Progress>) {
    let state = match record.state {
        MoveState::Steady => "steady",
        MoveState::Moving => "moving",
        MoveState::Purging => "purging (everything moved; old copies being deleted)",
    };
    println!("epoch {}: {state}", record.epoch);
    println!("members:");
    for member in &record.members {
        println!("  {} {}", member.name, member.url);
    }
    if let Some(previous) = &record.previous {
        let names: Vec<&str> = previous.iter().map(|m| m.name.as_str()).collect();
        println!("moving from: {}", names.join(", "));
    }
    if let Some(p) = progress {
        println!(
            "progress: {} to move in the last scan, {} moved, {} errors (retried), {} old copies purged",
            p.todo, p.moved, p.errors, p.purged
        );
    }
}
