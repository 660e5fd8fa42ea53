//! The mover: carries out a ring change written by `worker shards add/remove`
//! (docs/resharding.md). Every worker runs this task; the one holding the mover's lease (a key
//! in the intake lease bucket) does the work, and if it dies another takes over and starts
//! again from what the shards hold: nothing about progress is stored but the tombstones.
//!
//! For ring epoch N in state `moving`:
//! 1. raise every member's fence to N (no worker still routing by N-1 can create an object
//!    where ring N does not place it);
//! 2. scan every previous member's live objects; each whose owner changes is moved on its own
//!    under its head-row lock ([`Shard::move_to`]), at most MOVE_RATE per second; a failure
//!    (a shard down) is retried with backoff, so the move pauses and resumes;
//! 3. when a scan finds nothing left to move, the record becomes `purging` (placement by ring
//!    N alone), and after MOVE_GRACE_MS (every read that began on an old copy has ended) the
//!    old copies' entries are deleted; the tombstone head rows stay, so a lagging worker is
//!    still sent on. Then the record becomes `steady`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cancel::{pause, Backoff};
use crate::config::Intake;
use crate::lease::Lease;
use crate::membership::{Membership, MembershipError, Progress};
use crate::metrics::Metrics;
use crate::ring::{MoveState, Record};
use crate::shards::{Shards, View};
use crate::store::Shard;
use crate::Chain;

/// Ids read per scan page.
const SCAN_PAGE: i64 = 1_000;
/// Entries copied per round trip while moving one object.
const COPY_PAGE: i64 = 1_000;
/// Entries deleted per transaction when purging an old copy.
const PURGE_STEP: i64 = 5_000;
/// How often an idle worker looks for a move to take up.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// First and longest pause before retrying a failed object move.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often progress is published for `worker shards status`.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for releasing the mover's lease once a move stops.
const RELEASE_WAIT: Duration = Duration::from_secs(1);
/// Lease lifetime when this worker creates the lease bucket without JetStream intake settings.
const DEFAULT_LEASE: Duration = Duration::from_secs(3);
/// First and longest pause before reading a ring record again that is missing or does not
/// decode (the move waits for `worker shards repair`, holding its lease), and before taking a
/// move up again after one failed.
const RING_RETRY_FIRST: Duration = Duration::from_millis(500);
const RING_RETRY_MAX: Duration = Duration::from_secs(10);

/// Why a move stopped before it finished (it is taken up again).
#[derive(Debug, thiserror::Error)]
enum Stopped {
    #[error("the mover's lease was lost or the worker is stopping")]
    Lost,
    #[error(transparent)]
    Ring(#[from] MembershipError),
}

/// Take up moves until `cancel`. At shutdown the work in hand is dropped (a move is idempotent
/// from any point) and the lease released, so another worker takes the move up at once.
pub async fn run(
    shards: Arc<Shards>,
    client: async_nats::Client,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let mut lease: Option<Lease> = None;
    let mut standing_by = false;
    // After a move failed (it released its lease), the next attempt waits: a failure that
    // repeats at once (NATS refusing writes) must not turn into a take/fail/release loop.
    let mut backoff = Backoff::new(RING_RETRY_FIRST, RING_RETRY_MAX);
    let mut wait: Option<Duration> = None;
    loop {
        if let Some(wait) = wait.take() {
            if !pause(&cancel, wait).await {
                return;
            }
        }
        let taken = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            taken = take_up(&shards, &client, &mut lease, &mut standing_by, &cancel) => taken,
        };
        let (Some((membership, revision)), Some(held)) = (taken, lease.as_ref()) else {
            continue;
        };
        tracing::info!("took the mover's lease; carrying out the ring change");
        metrics.move_running.set(1);
        let (shards, membership, metrics) = (&shards, &membership, &metrics);
        let (result, revision) = held
            .hold(revision, &cancel, "mover", |lost, _| async move {
                tokio::select! {
                    biased;
                    _ = lost.cancelled() => Err(Stopped::Lost),
                    result = carry_out(shards, membership, metrics, &lost) => result,
                }
            })
            .await;
        metrics.move_running.set(0);
        match result {
            Ok(()) => {
                // Complete: this worker routes by a steady ring now (else take it up again
                // only after a pause).
                wait = match shards.view().layout.state {
                    MoveState::Steady => {
                        backoff.reset();
                        None
                    }
                    _ => Some(backoff.next_pause()),
                };
                tracing::info!("ring change complete");
            }
            Err(Stopped::Lost) => {
                // Another worker holds the lease now, or this one stops.
                backoff.reset();
                wait = Some(backoff.next_pause());
                tracing::info!("move interrupted (lease lost or stopping); it is taken up again");
            }
            Err(e) => {
                let retry_in = backoff.next_pause();
                wait = Some(retry_in);
                tracing::warn!(error = %Chain(&e), ?retry_in, "move interrupted; it is taken up again");
            }
        }
        // Bounded, so a worker stopping while NATS is away does not wait for it: the lease
        // then expires by itself.
        if tokio::time::timeout(RELEASE_WAIT, held.release(revision))
            .await
            .is_err()
        {
            tracing::debug!("could not release the mover's lease in time; it expires by itself");
        }
    }
}

/// Wait for a ring change and try to take the mover's lease (opened into `lease` on first
/// use): the ring's membership and the lease's revision once taken, None to look again.
async fn take_up(
    shards: &Shards,
    client: &async_nats::Client,
    lease: &mut Option<Lease>,
    standing_by: &mut bool,
    cancel: &CancellationToken,
) -> Option<(Membership, u64)> {
    if shards.view().layout.state == MoveState::Steady {
        *standing_by = false;
        pause(cancel, IDLE_POLL).await;
        return None;
    }
    let Ok(membership) = shards.membership(client).await else {
        pause(cancel, IDLE_POLL).await;
        return None;
    };
    let held = match lease {
        Some(lease) => lease,
        None => {
            let ttl = match &shards.config().intake {
                Intake::JetStream(js) => js.lease,
                Intake::Core => DEFAULT_LEASE,
            };
            let key = format!("move.{}", shards.config().queue_group);
            match Lease::open_named(client, key, ttl).await {
                Ok(opened) => lease.insert(opened),
                Err(e) => {
                    tracing::debug!(error = %Chain(&e), "cannot open the mover's lease");
                    pause(cancel, IDLE_POLL).await;
                    return None;
                }
            }
        }
    };
    match held.try_acquire().await {
        Ok(Some(revision)) => {
            *standing_by = false;
            Some((membership, revision))
        }
        Ok(None) => {
            if !*standing_by {
                tracing::info!("another worker performs the move; standing by");
                *standing_by = true;
            }
            pause(cancel, held.ttl / 3).await;
            None
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot reach the mover's lease");
            held.reopen().await;
            pause(cancel, IDLE_POLL).await;
            None
        }
    }
}

/// Carry the ring record to `steady`, step by step, re-reading it after each.
async fn carry_out(
    shards: &Shards,
    membership: &Membership,
    metrics: &Metrics,
    lost: &CancellationToken,
) -> Result<(), Stopped> {
    let config = shards.config().clone();
    let mut progress = Progress::default();
    let mut grace_done = false;
    // A record that cannot be read (missing, or not decoding: overwritten by someone who may
    // write the key) stops the move, never the mover's pace: it waits, holding its lease, and
    // re-reads with backoff, logging once per cause, until `worker shards repair` (or the
    // operator) restores it; then it goes on from what the shards hold.
    let mut ring_wait = Backoff::new(RING_RETRY_FIRST, RING_RETRY_MAX);
    let mut ring_logged: Option<String> = None;
    let mut waiting_logged: Option<Vec<String>> = None;
    loop {
        if lost.is_cancelled() {
            return Err(Stopped::Lost);
        }
        let routed = shards.view().layout.record.clone();
        let read = match membership.read().await {
            // Behind what this worker routes by (a record deleted and seeded again, or written
            // back by hand): going by it would undo the change.
            Ok(Some((found, _))) if found.rank() < routed.rank() => Err(format!(
                "the ring record {} (epoch {}, {:?}) is behind the ring this worker routes by \
                 (epoch {}, {:?}, from the shards' copies): the move waits for `worker shards \
                 repair`",
                membership.key(),
                found.epoch,
                found.state,
                routed.epoch,
                routed.state
            )),
            Ok(Some(found)) => Ok(found),
            Ok(None) => Err(format!(
                "the ring record {} is missing: the move waits for `worker shards repair`",
                membership.key()
            )),
            Err(e @ MembershipError::Decode { .. }) => Err(Chain(&e).to_string()),
            Err(e) => return Err(e.into()),
        };
        let (mut record, revision) = match read {
            Ok(found) => {
                if ring_logged.take().is_some() {
                    tracing::info!("the ring record is readable again; the move goes on");
                }
                ring_wait.reset();
                found
            }
            Err(cause) => {
                if ring_logged.as_deref() != Some(cause.as_str()) {
                    tracing::error!(error = %cause, "the move waits: the ring record cannot be read");
                    ring_logged = Some(cause);
                }
                metrics.move_errors.inc();
                pause(lost, ring_wait.next_pause()).await;
                continue;
            }
        };
        if record.state == MoveState::Steady {
            shards.apply(record).await;
            return Ok(());
        }
        shards.apply(record.clone()).await;
        let view = shards.view();
        let missing: Vec<String> = record
            .all_members()
            .into_iter()
            .filter(|m| {
                view.lane(&m.name)
                    .is_none_or(|lane| !lane.shard.fleet_confirmed())
            })
            .map(|m| m.name.clone())
            .collect();
        if view.layout.epoch != record.epoch || !missing.is_empty() {
            // This worker could not open a member's lane, or has not confirmed it is this
            // fleet's (its log says why): nothing can move to or from it until it can.
            metrics.move_errors.inc();
            progress.errors += 1;
            if waiting_logged.as_ref() != Some(&missing) {
                tracing::warn!(missing = ?missing, "cannot open every ring member; the move waits");
                waiting_logged = Some(missing);
            }
            pause(lost, RETRY_MAX).await;
            continue;
        }
        waiting_logged = None;
        if progress.epoch != record.epoch {
            progress = Progress {
                epoch: record.epoch,
                ..Progress::default()
            };
        }
        match record.state {
            MoveState::Steady => return Ok(()),
            MoveState::Moving => {
                keep_everywhere(&view, &record, Fence::Raise, metrics, &mut progress, lost).await?;
                let todo = count(&view, lost).await?;
                progress.todo = todo;
                metrics
                    .move_objects
                    .with_label_values(&["todo"])
                    .set(todo as i64);
                membership.put_progress(&progress).await;
                if todo == 0 {
                    record.state = MoveState::Purging;
                    keep_everywhere(&view, &record, Fence::Keep, metrics, &mut progress, lost)
                        .await?;
                    write(membership, &record, revision).await?;
                    tracing::info!(
                        epoch = record.epoch,
                        moved = progress.moved,
                        "every object moved; purging the old copies after MOVE_GRACE_MS"
                    );
                    continue;
                }
                tracing::info!(epoch = record.epoch, todo, "moving objects");
                move_all(
                    &view,
                    membership,
                    metrics,
                    &mut progress,
                    config.moves.rate,
                    lost,
                )
                .await?;
            }
            MoveState::Purging => {
                if !grace_done {
                    pause(lost, config.moves.grace).await;
                    grace_done = true;
                    continue;
                }
                purge(&view, metrics, &mut progress, membership, lost).await?;
                record.state = MoveState::Steady;
                record.previous = None;
                keep_everywhere(&view, &record, Fence::Keep, metrics, &mut progress, lost).await?;
                write(membership, &record, revision).await?;
                metrics.move_objects.with_label_values(&["todo"]).set(0);
                membership.put_progress(&progress).await;
                tracing::info!(epoch = record.epoch, "old copies purged; ring steady");
            }
        }
    }
}

/// Compare-and-set the record; a record changed meanwhile is re-read by the caller's loop.
async fn write(membership: &Membership, record: &Record, revision: u64) -> Result<(), Stopped> {
    match membership.write(record, revision).await {
        Ok(_) | Err(MembershipError::Changed { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Keep `record` as every shard's copy of the ring (what `worker shards repair` rebuilds the
/// record from), retrying a shard that is down. With `Fence::Raise`, the shard's fence goes
/// to `record`'s epoch in the same transaction; `Fence::Keep` stores the next step of the
/// change before it is written to NATS, so the shards never hold less than the fleet reached.
async fn keep_everywhere(
    view: &View,
    record: &Record,
    fence: Fence,
    metrics: &Metrics,
    progress: &mut Progress,
    lost: &CancellationToken,
) -> Result<(), Stopped> {
    let (what, raise) = match fence {
        Fence::Raise => ("raise the fence", true),
        Fence::Keep => ("keep the ring record", false),
    };
    for lane in view.lanes.values() {
        retry(metrics, progress, lost, what, &lane.shard.name, || {
            lane.shard.keep_ring(record, true, raise)
        })
        .await?;
    }
    Ok(())
}

/// Whether [`keep_everywhere`] raises the shards' fences too.
#[derive(Debug, Clone, Copy)]
enum Fence {
    Raise,
    Keep,
}

/// Objects whose owner the change moves: live on a previous member that owned them and
/// placed elsewhere now.
async fn count(view: &View, lost: &CancellationToken) -> Result<u64, Stopped> {
    let mut todo = 0;
    for (source, ids) in sources(view) {
        let mut after = None;
        loop {
            if lost.is_cancelled() {
                return Err(Stopped::Lost);
            }
            let page = match source.live_ids(after, SCAN_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    // Counted as unknown for now: the move itself waits for the shard.
                    tracing::debug!(shard = %source.name, error = %Chain(&e), "cannot count the objects to move");
                    todo += 1;
                    break;
                }
            };
            todo += page.iter().filter(|&&id| ids(id as u64).is_some()).count() as u64;
            match page.last() {
                Some(&last) if page.len() as i64 == SCAN_PAGE => after = Some(last),
                _ => break,
            }
        }
    }
    Ok(todo)
}

/// Each previous member's shard, with the test "does `id`, living there, move, and where to".
#[allow(clippy::type_complexity)]
fn sources(
    view: &View,
) -> Vec<(
    Arc<Shard>,
    Box<dyn Fn(u64) -> Option<String> + Send + Sync + '_>,
)> {
    let layout = &view.layout;
    let mut sources = Vec::new();
    for member in layout.record.previous.iter().flatten() {
        let Some(lane) = view.lane(&member.name) else {
            continue;
        };
        let name = member.name.clone();
        let test = move |id: u64| {
            let owner = layout.owner(id);
            (layout.previous_owner(id) == Some(name.as_str()) && owner != name)
                .then(|| owner.to_string())
        };
        sources.push((
            lane.shard.clone(),
            Box::new(test) as Box<dyn Fn(u64) -> Option<String> + Send + Sync>,
        ));
    }
    sources
}

/// One pass over every previous member, moving each object whose owner changes.
async fn move_all(
    view: &View,
    membership: &Membership,
    metrics: &Metrics,
    progress: &mut Progress,
    rate: u32,
    lost: &CancellationToken,
) -> Result<(), Stopped> {
    let mut pace = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = Instant::now();
    for (source, moves) in sources(view) {
        let mut after = None;
        loop {
            let page = retry(metrics, progress, lost, "scan", &source.name, || {
                source.live_ids(after, SCAN_PAGE)
            })
            .await?;
            for &id in &page {
                let Some(target) = moves(id as u64) else {
                    continue;
                };
                // Every member has a lane (checked in `carry_out`).
                let Some(lane) = view.lane(&target) else {
                    continue;
                };
                pace.tick().await;
                let moved = retry(
                    metrics,
                    progress,
                    lost,
                    "move an object",
                    &source.name,
                    || source.move_to(&lane.shard, id as u64, view.layout.epoch, COPY_PAGE),
                )
                .await?;
                if let Some(copied) = moved {
                    for (phase, entries) in [("bulk", copied.bulk), ("locked", copied.locked)] {
                        metrics
                            .move_entries
                            .with_label_values(&[phase])
                            .inc_by(entries);
                    }
                    progress.moved += 1;
                    metrics
                        .move_objects
                        .with_label_values(&["moved"])
                        .set(progress.moved as i64);
                }
                if published.elapsed() >= PROGRESS_EVERY {
                    membership.put_progress(progress).await;
                    published = Instant::now();
                    // The pass follows the record: one that changed, went missing or no longer
                    // decodes ends it (the caller reads the record again, and waits for a
                    // readable one).
                    if !still_current(membership, &view.layout.record).await {
                        return Ok(());
                    }
                }
            }
            match page.last() {
                Some(&last) if page.len() as i64 == SCAN_PAGE => after = Some(last),
                _ => break,
            }
        }
    }
    membership.put_progress(progress).await;
    Ok(())
}

/// Whether the ring record still is `record` (epoch and step). A record that cannot be read
/// for now (NATS) counts as unchanged: the move goes on by what it read.
async fn still_current(membership: &Membership, record: &Record) -> bool {
    match membership.read().await {
        Ok(Some((now, _))) => now.rank() == record.rank(),
        Ok(None) | Err(MembershipError::Decode { .. }) => false,
        Err(_) => true,
    }
}

/// Delete the old copies' entries on every shard of the view (tombstones keep their head row).
async fn purge(
    view: &View,
    metrics: &Metrics,
    progress: &mut Progress,
    membership: &Membership,
    lost: &CancellationToken,
) -> Result<(), Stopped> {
    for lane in view.lanes.values() {
        let shard = &lane.shard;
        loop {
            let ids = retry(
                metrics,
                progress,
                lost,
                "find old copies",
                &shard.name,
                || shard.tombstones(100),
            )
            .await?;
            if ids.is_empty() {
                break;
            }
            for id in ids {
                retry(
                    metrics,
                    progress,
                    lost,
                    "purge an old copy",
                    &shard.name,
                    || shard.purge(id, PURGE_STEP),
                )
                .await?;
                progress.purged += 1;
            }
            membership.put_progress(progress).await;
        }
    }
    Ok(())
}

/// Run `op` until it succeeds, pausing with backoff after each failure (a shard down or slow:
/// the move pauses and resumes), until the lease is lost.
async fn retry<T, F, Fut>(
    metrics: &Metrics,
    progress: &mut Progress,
    lost: &CancellationToken,
    what: &str,
    shard: &str,
    mut op: F,
) -> Result<T, Stopped>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::store::StoreError>>,
{
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    let mut logged = false;
    loop {
        if lost.is_cancelled() {
            return Err(Stopped::Lost);
        }
        match op().await {
            Ok(value) => {
                if logged {
                    tracing::info!(shard, "{what}: succeeded again; the move resumes");
                }
                return Ok(value);
            }
            Err(e) => {
                metrics.move_errors.inc();
                progress.errors += 1;
                if !logged {
                    tracing::warn!(shard, error = %Chain(&e), "{what} failed; the move pauses and retries");
                    logged = true;
                }
                pause(lost, backoff.next_pause()).await;
            }
        }
    }
}
