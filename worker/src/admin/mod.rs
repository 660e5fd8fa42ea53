//! `worker shards add|remove|status|repair`: the operator's side of ring membership
//! (docs/resharding.md). The commands take the worker's own settings (NATS_URL and the NATS
//! login, NATS_QUEUE_GROUP, the PostgreSQL login and TLS settings) and change, show or repair
//! the fleet's ring record in NATS; the workers carry the change out.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{parse_shards, without_login, Config, ShardConfig};
use crate::membership::{Membership, MembershipError};
use crate::ring::{Member, MoveState, Record};
use crate::store::{RingCopy, Shard};
use crate::Chain;

mod repair;

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
    /// Rewrite the ring record from the shards' copies.
    Repair,
}

/// A refusal or failure, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Nats(#[from] logstore_protocol::nats::ConnectFailure),
    #[error(transparent)]
    Ring(#[from] crate::membership::MembershipError),
    #[error("{0}")]
    Refused(String),
    #[error("shard {name} is already a ring member")]
    AlreadyMember { name: String },
    #[error("shard {name} is not a ring member")]
    NotMember { name: String },
    #[error("shard {name} is the only ring member; its objects would have nowhere to go")]
    OnlyMember { name: String },
    /// Another ring change is being carried out.
    #[error("a ring change is being carried out (epoch {epoch}, {state:?}); wait until `worker shards status` exits 0")]
    Busy { epoch: u64, state: MoveState },
    /// The record changed between reading and writing it (`add`, `remove`).
    #[error("the ring changed meanwhile (another operator?); check `worker shards status` and try again")]
    Changed,
    /// The record changed between reading and writing it (`repair`).
    #[error("the ring record changed meanwhile; run `worker shards repair` again")]
    RepairChanged,
    /// The new member could not be prepared (`add`).
    #[error("cannot add shard {shard}: {why}; nothing changed")]
    Prepare { shard: String, why: String },
    /// The NATS server refused this user a subject (its permissions): the server's words.
    #[error("NATS refused it: {0} (`worker shards` needs a user allowed the ring record, e.g. `admin` or `worker` in the shipped NATS config)")]
    Denied(String),
}

/// Standard output for the commands' answers. A reader that goes away (`worker shards status |
/// head -1`) ends the output quietly, where `println!` would panic on the broken pipe; any
/// other write error is said once on stderr.
#[derive(Default)]
pub struct Out {
    closed: bool,
}

impl Out {
    pub fn line(&mut self, text: impl std::fmt::Display) {
        if self.closed {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
            self.closed = true;
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                let _ = writeln!(std::io::stderr(), "worker: cannot write to stdout: {e}");
            }
        }
    }
}

/// Run `command`; the exit status on success (0, or [`EXIT_MOVING`] for `status` while a move
/// runs).
pub async fn shards(config: &Config, command: Command) -> Result<u8, AdminError> {
    // A request the server refuses for lack of permission is dropped and said out of band;
    // without this it would look like a JetStream that does not answer.
    let (denied_tx, mut denied) = tokio::sync::watch::channel(None::<String>);
    let client = config
        .nats
        // The login's own inbox prefix (NATS_INBOX_PREFIX, or `_INBOX_<NATS_USER>`): the
        // shipped NATS config lets each user read only its own inboxes.
        .connect(|o| {
            o.name("logstore-worker-admin")
                .event_callback(move |event| {
                    if let Some(text) = logstore_protocol::nats::permissions_violation(&event) {
                        denied_tx.send_if_modified(|first| {
                            first.get_or_insert(text);
                            true
                        });
                    }
                    async {}
                })
        })
        .await?;
    tokio::select! {
        biased;
        Ok(violation) = denied.wait_for(Option::is_some) => {
            Err(AdminError::Denied(violation.clone().unwrap_or_default()))
        }
        result = run(config, &client, command) => result,
    }
}

async fn run(
    config: &Config,
    client: &async_nats::Client,
    command: Command,
) -> Result<u8, AdminError> {
    let membership = Membership::open(client, &config.queue_group, config.js_replicas).await?;
    let mut out = Out::default();
    let status = match command {
        Command::Repair => repair::repair(config, &membership, &mut out).await?,
        Command::Status { json } => status(config, &membership, json, &mut out).await?,
        Command::Add { spec } => add(config, &membership, &spec, &mut out).await?,
        Command::Remove { name } => remove(config, &membership, &name, &mut out).await?,
    };
    if let Err(e) = client.flush().await {
        tracing::debug!(error = %e, "flush before exit failed");
    }
    Ok(status)
}

/// The exit status for a record in `state`: 0 when steady, else [`EXIT_MOVING`].
fn exit_status(state: MoveState) -> u8 {
    match state {
        MoveState::Steady => 0,
        MoveState::Moving | MoveState::Purging => EXIT_MOVING,
    }
}

/// `worker shards status`: the ring record (and the move's progress), as text or JSON.
async fn status(
    config: &Config,
    membership: &Membership,
    json: bool,
    out: &mut Out,
) -> Result<u8, AdminError> {
    let (record, _) = current(config, membership).await?;
    let progress = membership
        .progress()
        .await
        .filter(|p| p.epoch == record.epoch);
    if json {
        let value = serde_json::json!({ "ring": record, "progress": progress });
        out.line(value);
    } else {
        print_status(out, &record, progress.as_ref());
    }
    Ok(exit_status(record.state))
}

/// `worker shards add NAME=URL`: prepare the new shard and publish the next epoch with it.
async fn add(
    config: &Config,
    membership: &Membership,
    spec: &str,
    out: &mut Out,
) -> Result<u8, AdminError> {
    let (record, revision) = current(config, membership).await?;
    steady(&record)?;
    let shard = parse_shards(spec)
        .map_err(|e| AdminError::Refused(e.to_string()))?
        .into_iter()
        .next()
        .ok_or_else(|| AdminError::Refused("give the new shard as NAME=URL".into()))?;
    if record.members.iter().any(|m| m.name == shard.name) {
        return Err(AdminError::AlreadyMember { name: shard.name });
    }
    let fleet = record
        .fleet
        .clone()
        .unwrap_or_else(crate::ring::new_fleet_id);
    let pool = prepare(config, &shard, &fleet).await?;
    let mut members = record.members.clone();
    members.push(Member {
        name: shard.name.clone(),
        // Never the login the command was given: every worker logs in as itself.
        url: without_login(&shard.url),
    });
    let next = next_epoch(&record, members, fleet);
    publish(config, membership, &next, revision, Some(pool)).await?;
    out.line(format_args!(
        "epoch {}: adding shard {}; objects are moving (follow with `worker shards status`)",
        next.epoch, shard.name
    ));
    Ok(0)
}

/// `worker shards remove NAME`: publish the next epoch without that member.
async fn remove(
    config: &Config,
    membership: &Membership,
    name: &str,
    out: &mut Out,
) -> Result<u8, AdminError> {
    let (record, revision) = current(config, membership).await?;
    steady(&record)?;
    if !record.members.iter().any(|m| m.name == name) {
        return Err(AdminError::NotMember { name: name.into() });
    }
    if record.members.len() == 1 {
        return Err(AdminError::OnlyMember { name: name.into() });
    }
    let members = record
        .members
        .iter()
        .filter(|m| m.name != name)
        .cloned()
        .collect();
    let fleet = record
        .fleet
        .clone()
        .unwrap_or_else(crate::ring::new_fleet_id);
    let next = next_epoch(&record, members, fleet);
    publish(config, membership, &next, revision, None).await?;
    out.line(format_args!(
        "epoch {}: removing shard {name}; its objects are moving (follow with `worker shards status`)",
        next.epoch
    ));
    Ok(0)
}

/// The fleet's ring record and its revision, seeded from POSTGRES_SHARDS if it has none (with
/// the fleet id its shards record, as a worker seeds it), given a fleet id if it has none. A
/// record that does not decode is an error that names `worker shards repair`.
async fn current(config: &Config, membership: &Membership) -> Result<(Record, u64), AdminError> {
    if let Some((record, revision)) = membership.read().await? {
        if record.fleet.is_some() {
            return Ok((record, revision));
        }
    }
    let copies = read_copies(config, config.shards.iter().cloned()).await;
    let seed = Record {
        fleet: Some(agreed_fleet(&copies).unwrap_or_else(crate::ring::new_fleet_id)),
        ..crate::shards::seed_record(config, 1)
    };
    let (record, revision, _) = membership.read_or_seed(&seed).await?;
    Ok((record, revision))
}

/// Refuse a change while another is being carried out.
fn steady(record: &Record) -> Result<(), AdminError> {
    match record.state {
        MoveState::Steady => Ok(()),
        state => Err(AdminError::Busy {
            epoch: record.epoch,
            state,
        }),
    }
}

/// The record of the next epoch, moving from `record`'s members to `members`.
fn next_epoch(record: &Record, members: Vec<Member>, fleet: String) -> Record {
    Record {
        epoch: record.epoch + 1,
        state: MoveState::Moving,
        members,
        vnodes: record.vnodes,
        previous: Some(record.members.clone()),
        fleet: Some(fleet),
    }
}

/// Prepare the new member `shard` with the login the operator gave (a password in the URL is
/// used for this and never stored): another fleet's database (or another shard's) is refused
/// before anything is written to it; otherwise it is migrated, its name recorded and claimed
/// for `fleet` (a worker role without DDL rights could not migrate it later).
async fn prepare(
    config: &Config,
    shard: &ShardConfig,
    fleet: &str,
) -> Result<Arc<Shard>, AdminError> {
    let access = config
        .member_access
        .shard(&shard.name, &shard.url)
        .map_err(AdminError::Refused)?;
    let pool = Arc::new(
        Shard::new(&access, 1, config.shard_timeout.max(Duration::from_secs(5)))
            .map_err(AdminError::Refused)?,
    );
    let refused = |why: String| {
        pool.close();
        AdminError::Prepare {
            shard: shard.name.clone(),
            why,
        }
    };
    match pool.peek_identity().await {
        Ok(Some((_, Some(other)))) if other != fleet => {
            return Err(refused(format!(
                "the database belongs to another logstore fleet ({other}; this fleet is {fleet})"
            )))
        }
        Ok(Some((name, _))) if name != shard.name => {
            return Err(refused(format!(
            "the database belongs to shard {name:?} (a name must always map to the same database)"
        )))
        }
        Ok(_) => {}
        Err(e) => return Err(refused(Chain(&e).to_string())),
    }
    pool.set_fleet(Some(fleet));
    if let Err(e) = pool.initialise().await {
        return Err(refused(Chain(&e).to_string()));
    }
    Ok(pool)
}

/// Publish the change `next` (read at `revision`): every member it names (now and before) is
/// reached first with this worker's own login, checked to be this fleet's and made to keep
/// `next` as its copy of the ring (`added`, the new member, with the login the operator gave);
/// then the record is written by compare-and-set (a concurrent change makes this one fail
/// instead of both starting), and the copies are made to hold exactly what was written. So no
/// shard can be fenced at the new epoch (by a worker that learnt it) without the shards
/// keeping its record for `worker shards repair`.
async fn publish(
    config: &Config,
    membership: &Membership,
    next: &Record,
    revision: u64,
    added: Option<Arc<Shard>>,
) -> Result<(), AdminError> {
    let mut pools: Vec<Arc<Shard>> = added.iter().cloned().collect();
    let close = |pools: &[Arc<Shard>]| pools.iter().for_each(|pool| pool.close());
    for member in next.all_members() {
        if pools.iter().any(|pool| pool.name == member.name) {
            continue;
        }
        let pool = match open_member(config, &member.name, &member.url) {
            Ok(pool) => pool,
            Err(why) => {
                close(&pools);
                return Err(AdminError::Refused(format!(
                    "cannot reach ring member {}: {why}; nothing changed",
                    member.name
                )));
            }
        };
        pool.set_fleet(next.fleet.as_deref());
        let ready = pool.initialise().await;
        pools.push(pool);
        if let Err(e) = ready {
            close(&pools);
            return Err(AdminError::Refused(format!(
                "cannot reach ring member {}: {}; nothing changed (every member must answer \
                 to change the ring)",
                member.name,
                Chain(&e)
            )));
        }
    }
    for pool in &pools {
        if let Err(e) = pool.keep_ring(next, false, false).await {
            close(&pools);
            return Err(AdminError::Refused(format!(
                "cannot record the change on shard {}: {}; the ring did not change",
                pool.name,
                Chain(&e)
            )));
        }
    }
    let written = match membership.write(next, revision).await {
        Ok(_) => Ok(()),
        Err(MembershipError::Changed { .. }) => Err(AdminError::Changed),
        Err(e) => Err(e.into()),
    };
    if written.is_ok() {
        for pool in &pools {
            if let Err(e) = pool.keep_ring(next, true, false).await {
                tracing::warn!(shard = %pool.name, error = %Chain(&e), "cannot record the change on a shard (the mover does when it raises the fences)");
            }
        }
    }
    close(&pools);
    written
}

/// A pool of one connection to ring member `name` at `url` (as a record stores it): this
/// worker's own URL for it when POSTGRES_SHARDS names it, else `url` with its own login.
fn open_member(config: &Config, name: &str, url: &str) -> Result<Arc<Shard>, String> {
    let shard = match config.shards.iter().find(|s| s.name == name) {
        Some(shard) => shard.clone(),
        None => config.member_access.shard(name, &without_login(url))?,
    };
    Shard::new(&shard, 1, config.shard_timeout.max(Duration::from_secs(5))).map(Arc::new)
}

/// What each shard in `shards` keeps of the ring (or why it could not be read), by name.
async fn read_copies(
    config: &Config,
    shards: impl Iterator<Item = ShardConfig>,
) -> Vec<(String, Result<RingCopy, String>)> {
    let reads = shards.map(|shard| async move {
        let copy = match open_member(config, &shard.name, &shard.url) {
            Ok(pool) => {
                let copy = pool.ring_copy().await.map_err(|e| Chain(&e).to_string());
                pool.close();
                copy
            }
            Err(why) => Err(why),
        };
        (shard.name, copy)
    });
    futures::future::join_all(reads).await
}

/// The fleet every shard read records, when they all answer and record the same one.
fn agreed_fleet(copies: &[(String, Result<RingCopy, String>)]) -> Option<String> {
    let mut fleets = copies
        .iter()
        .map(|(_, copy)| copy.as_ref().ok()?.fleet.clone());
    let first = fleets.next()??;
    fleets.all(|f| f.as_ref() == Some(&first)).then_some(first)
}

fn print_status(out: &mut Out, record: &Record, progress: Option<&crate::membership::Progress>) {
    let state = match record.state {
        MoveState::Steady => "steady",
        MoveState::Moving => "moving",
        MoveState::Purging => "purging (everything moved; old copies being deleted)",
    };
    out.line(format_args!("epoch {}: {state}", record.epoch));
    if let Some(fleet) = &record.fleet {
        out.line(format_args!("fleet: {fleet}"));
    }
    out.line("members:");
    for member in &record.members {
        out.line(format_args!("  {} {}", member.name, member.url));
    }
    if let Some(previous) = &record.previous {
        let names: Vec<&str> = previous.iter().map(|m| m.name.as_str()).collect();
        out.line(format_args!("moving from: {}", names.join(", ")));
    }
    if let Some(p) = progress {
        out.line(format_args!(
            "progress: {} to move in the last scan, {} moved, {} errors (retried), {} old copies purged",
            p.todo, p.moved, p.errors, p.purged
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed refusals print the lines the `Refused(String)` of before printed.
    #[test]
    fn refusals_keep_their_text() {
        let name = || "s2".to_string();
        let cases = [
            (
                AdminError::AlreadyMember { name: name() },
                "shard s2 is already a ring member",
            ),
            (
                AdminError::NotMember { name: name() },
                "shard s2 is not a ring member",
            ),
            (
                AdminError::OnlyMember { name: name() },
                "shard s2 is the only ring member; its objects would have nowhere to go",
            ),
            (
                AdminError::Busy {
                    epoch: 7,
                    state: MoveState::Purging,
                },
                "a ring change is being carried out (epoch 7, Purging); wait until `worker shards status` exits 0",
            ),
            (
                AdminError::Changed,
                "the ring changed meanwhile (another operator?); check `worker shards status` and try again",
            ),
            (
                AdminError::RepairChanged,
                "the ring record changed meanwhile; run `worker shards repair` again",
            ),
            (
                AdminError::Prepare {
                    shard: name(),
                    why: "down".into(),
                },
                "cannot add shard s2: down; nothing changed",
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
            assert!(std::error::Error::source(&error).is_none());
        }
    }
}
