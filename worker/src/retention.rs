//! The retention sweeper (RETENTION_MAX_AGE): one background task per shard removes entries
//! older than the maximum age, in small steps that never hold up appends.
//!
//! Each round asks the shard for the objects whose oldest entry has expired (an index on the
//! heads' first ts, no scan), each with the seq below which its entries are older than the
//! cutoff (a binary search: ts never decreases along seq, so "older than" is a seq prefix).
//! Then every object gets one deletion step of at most [`STEP_ROWS`] entries in its own short
//! transaction, which skips an object whose head row a writer holds right now (SKIP LOCKED)
//! instead of waiting for it: an append never waits for the sweeper longer than one step, and
//! the sweeper never queues behind appends. Rounds follow each other at once while there is
//! work, and every RETENTION_INTERVAL otherwise.
//!
//! Several workers sweep the same shard without harm: steps on one object serialise on its
//! head row, and each recomputes its range from the head it locked.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::config::Retention;
use crate::metrics::Metrics;
use crate::store::Shard;

/// Objects taken per round.
const ROUND_OBJECTS: u32 = 100;
/// Entries one deletion step removes at most (one transaction, one head-row lock).
const STEP_ROWS: u32 = 1_000;
/// Pause before retrying objects that were all held by writers.
const SKIPPED_PAUSE: Duration = Duration::from_millis(100);

/// Sweep `shard` until `cancel`.
pub async fn sweep(
    shard: Arc<Shard>,
    retention: Retention,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let removed = metrics.retention_deleted.with_label_values(&[&shard.name]);
    loop {
        let (deleted, more) = if shard.is_up() {
            // Dropping a round mid-step is safe: each step is one transaction.
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = round(&shard, &retention) => outcome,
            };
            match outcome {
                Ok((deleted, more)) => {
                    removed.inc_by(deleted);
                    if deleted > 0 {
                        tracing::debug!(shard = %shard.name, deleted, "retention removed expired entries");
                    }
                    (deleted, more)
                }
                Err(e) => {
                    // An outage is reported by the health checker; the next round retries.
                    tracing::debug!(shard = %shard.name, error = %e, "retention round failed");
                    (0, false)
                }
            }
        } else {
            (0, false)
        };
        let pause = match (deleted, more) {
            // More is waiting: go on at once.
            (1.., true) => Duration::ZERO,
            // Only objects that writers held: come back soon, without spinning on them.
            (0, true) => SKIPPED_PAUSE,
            _ => retention.interval,
        };
        if !crate::cancel::pause(&cancel, pause).await {
            return;
        }
    }
}

/// One round: a deletion step for each of up to [`ROUND_OBJECTS`] objects with expired
/// entries. Returns the entries removed and whether more work is likely waiting.
async fn round(
    shard: &Shard,
    retention: &Retention,
) -> Result<(u64, bool), crate::store::StoreError> {
    let cutoff = SystemTime::now()
        .checked_sub(retention.max_age)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let expired = shard.expired(cutoff, ROUND_OBJECTS).await?;
    let mut more = expired.len() as u32 == ROUND_OBJECTS;
    let mut deleted = 0;
    for (id, below) in expired {
        match shard
            .delete_step(id, Some(below), STEP_ROWS, true, None)
            .await
        {
            // It moved to another shard meanwhile: that shard's sweeper has it.
            Err(crate::store::StoreError::Moved { .. }) => {}
            Err(e) => return Err(e),
            Ok(Some(n)) => {
                deleted += n;
                more |= n == u64::from(STEP_ROWS);
            }
            // A writer holds the object right now: leave it to a later round.
            Ok(None) => more = true,
        }
    }
    Ok((deleted, more))
}
