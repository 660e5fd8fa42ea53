//! Carrying a ring change out, step by step: read the record (waiting while it cannot be
//! read), check every member is open, then one `moving` or `purging` step.

use tokio_util::sync::CancellationToken;

use super::objects::{count, move_all, purge};
use super::{retry, Stopped, RETRY_MAX, RING_RETRY_FIRST, RING_RETRY_MAX};
use crate::cancel::{pause, Backoff};
use crate::membership::{Membership, MembershipError, Progress};
use crate::metrics::Metrics;
use crate::ring::{MoveState, Record};
use crate::shards::{Shards, View};
use crate::Chain;

/// Carry the ring record to `steady`, step by step, re-reading it after each.
pub(super) async fn carry_out(
    shards: &Shards,
    membership: &Membership,
    metrics: &Metrics,
    lost: &CancellationToken,
) -> Result<(), Stopped> {
    let config = shards.config().clone();
    let step = Step {
        membership,
        metrics,
        lost,
    };
    let mut progress = Progress::default();
    let mut grace_done = false;
    let mut ring = RingWait::new();
    let mut waiting_logged: Option<Vec<String>> = None;
    loop {
        if lost.is_cancelled() {
            return Err(Stopped::Lost);
        }
        let Some((record, revision)) = ring.read(shards, membership, metrics, lost).await? else {
            continue;
        };
        if record.state == MoveState::Steady {
            shards.apply(record).await;
            return Ok(());
        }
        shards.apply(record.clone()).await;
        let view = shards.view();
        if !members_open(&view, &record, metrics, &mut progress, &mut waiting_logged) {
            pause(lost, RETRY_MAX).await;
            continue;
        }
        if progress.epoch != record.epoch {
            progress = Progress {
                epoch: record.epoch,
                ..Progress::default()
            };
        }
        match record.state {
            MoveState::Steady => return Ok(()),
            MoveState::Moving => {
                let rate = config.moves.rate;
                step.moving(&view, &mut progress, record, revision, rate)
                    .await?;
            }
            MoveState::Purging if !grace_done => {
                pause(lost, config.moves.grace).await;
                grace_done = true;
            }
            MoveState::Purging => step.purging(&view, &mut progress, record, revision).await?,
        }
    }
}

/// Waiting for a ring record that cannot be read (missing, or not decoding: overwritten by
/// someone who may write the key). That stops the move, never the mover's pace: it waits,
/// holding its lease, and re-reads with backoff, logging once per cause, until `worker shards
/// repair` (or the operator) restores it; then it goes on from what the shards hold.
struct RingWait {
    backoff: Backoff,
    logged: Option<String>,
}

impl RingWait {
    fn new() -> Self {
        RingWait {
            backoff: Backoff::new(RING_RETRY_FIRST, RING_RETRY_MAX),
            logged: None,
        }
    }

    /// The ring record and its revision; None, after a pause, while it cannot be read.
    async fn read(
        &mut self,
        shards: &Shards,
        membership: &Membership,
        metrics: &Metrics,
        lost: &CancellationToken,
    ) -> Result<Option<(Record, u64)>, Stopped> {
        let routed = shards.view().layout.record.clone();
        match read_ring(membership, &routed).await? {
            Ok(found) => {
                if self.logged.take().is_some() {
                    tracing::info!("the ring record is readable again; the move goes on");
                }
                self.backoff.reset();
                Ok(Some(found))
            }
            Err(cause) => {
                if self.logged.as_deref() != Some(cause.as_str()) {
                    tracing::error!(error = %cause, "the move waits: the ring record cannot be read");
                    self.logged = Some(cause);
                }
                metrics.move_errors.inc();
                pause(lost, self.backoff.next_pause()).await;
                Ok(None)
            }
        }
    }
}

/// The ring record and its revision, or why the move cannot go by it (missing, not decoding,
/// or behind `routed`, the ring this worker routes by).
async fn read_ring(
    membership: &Membership,
    routed: &Record,
) -> Result<Result<(Record, u64), String>, Stopped> {
    Ok(match membership.read().await {
        // Behind what this worker routes by (a record deleted and seeded again, or written
        // back by hand): going by it would undo the change.
        Ok(Some((found, _))) if found.rank() < routed.rank() => Err(format!(
            "the ring record {} (epoch {}, {}) is behind the ring this worker routes by \
             (epoch {}, {}, from the shards' copies): the move waits for `worker shards \
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
    })
}

/// Whether this worker has a lane to every member of `record`, each confirmed to be this
/// fleet's; if not, the wait is counted and logged (once per set of missing members).
fn members_open(
    view: &View,
    record: &Record,
    metrics: &Metrics,
    progress: &mut Progress,
    waiting_logged: &mut Option<Vec<String>>,
) -> bool {
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
            tracing::warn!(missing = %missing.join(","), "cannot open every ring member; the move waits");
            *waiting_logged = Some(missing);
        }
        return false;
    }
    *waiting_logged = None;
    true
}

/// What each step of a move works with.
struct Step<'a> {
    membership: &'a Membership,
    metrics: &'a Metrics,
    lost: &'a CancellationToken,
}

impl Step<'_> {
    /// A `moving` step: raise the fences, count what is left to move; with nothing left, the
    /// record becomes `purging`, else one pass moves what it finds.
    async fn moving(
        &self,
        view: &View,
        progress: &mut Progress,
        mut record: Record,
        revision: u64,
        rate: u32,
    ) -> Result<(), Stopped> {
        let (membership, metrics, lost) = (self.membership, self.metrics, self.lost);
        keep_everywhere(view, &record, Fence::Raise, metrics, progress, lost).await?;
        let todo = count(view, lost).await?;
        progress.todo = todo;
        metrics
            .move_objects
            .with_label_values(&["todo"])
            .set(todo as i64);
        membership.put_progress(progress).await;
        if todo == 0 {
            record.state = MoveState::Purging;
            keep_everywhere(view, &record, Fence::Keep, metrics, progress, lost).await?;
            write(membership, &record, revision).await?;
            tracing::info!(
                epoch = record.epoch,
                moved = progress.moved,
                "every object moved; purging the old copies after MOVE_GRACE_MS"
            );
            return Ok(());
        }
        tracing::info!(epoch = record.epoch, todo, "moving objects");
        move_all(view, membership, metrics, progress, rate, lost).await
    }

    /// A `purging` step (after the grace): delete the old copies, then the record becomes
    /// `steady`.
    async fn purging(
        &self,
        view: &View,
        progress: &mut Progress,
        mut record: Record,
        revision: u64,
    ) -> Result<(), Stopped> {
        let (membership, metrics, lost) = (self.membership, self.metrics, self.lost);
        purge(view, metrics, progress, membership, lost).await?;
        record.state = MoveState::Steady;
        record.previous = None;
        keep_everywhere(view, &record, Fence::Keep, metrics, progress, lost).await?;
        write(membership, &record, revision).await?;
        metrics.move_objects.with_label_values(&["todo"]).set(0);
        membership.put_progress(progress).await;
        tracing::info!(epoch = record.epoch, "old copies purged; ring steady");
        Ok(())
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
