//! Scanning the previous members: counting, moving and purging objects.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{retry, Stopped, COPY_PAGE, PROGRESS_EVERY, PURGE_STEP, SCAN_PAGE};
use crate::membership::{Membership, MembershipError, Progress};
use crate::metrics::Metrics;
use crate::ring::Record;
use crate::shards::View;
use crate::store::Shard;
use crate::Chain;

/// Objects whose owner the change moves: live on a previous member that owned them and
/// placed elsewhere now.
pub(super) async fn count(view: &View, lost: &CancellationToken) -> Result<u64, Stopped> {
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
pub(super) async fn move_all(
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
pub(super) async fn purge(
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
