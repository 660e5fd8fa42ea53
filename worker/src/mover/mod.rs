//! The mover: carries out a ring change written by `worker shards add/remove`
//! (docs/resharding.md). Every worker runs this task; the one holding the mover's lease (a key
//! in the intake lease bucket) does the work, and if it dies another takes over and starts
//! again from what the shards hold: nothing about progress is stored but the tombstones.
//!
//! For ring epoch N in state `moving`:
//! 1. raise every member's fence to N (no worker still routing by N-1 can create an object
//!    where ring N does not place it);
//! 2. scan every previous member's live objects; each whose owner changes is moved on its own
//!    under its head-row lock ([`Shard::move_to`](crate::store::Shard::move_to)), at most
//!    MOVE_RATE per second; a failure (a shard down) is retried with backoff, so the move
//!    pauses and resumes;
//! 3. when a scan finds nothing left to move, the record becomes `purging` (placement by ring
//!    N alone), and after MOVE_GRACE_MS (every read that began on an old copy has ended) the
//!    old copies' entries are deleted; the tombstone head rows stay, so a lagging worker is
//!    still sent on. Then the record becomes `steady`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cancel::{pause, Backoff};
use crate::config::Intake;
use crate::lease::{Lease, Taken};
use crate::membership::{Membership, MembershipError, Progress};
use crate::metrics::Metrics;
use crate::ring::MoveState;
use crate::shards::Shards;
use crate::Chain;

mod carry;
mod objects;

use carry::carry_out;

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
                tracing::warn!(error = %Chain(&e), retry_in = %crate::config::Human(retry_in), "move interrupted; it is taken up again");
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
/// use): the ring's membership and the lease once taken, None to look again.
async fn take_up(
    shards: &Shards,
    client: &async_nats::Client,
    lease: &mut Option<Lease>,
    standing_by: &mut bool,
    cancel: &CancellationToken,
) -> Option<(Membership, Taken)> {
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
            match Lease::open_named(client, key, ttl, shards.config().js_replicas).await {
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
                    tracing::info!(shard = %shard, "{what}: succeeded again; the move resumes");
                }
                return Ok(value);
            }
            Err(e) => {
                metrics.move_errors.inc();
                progress.errors += 1;
                if !logged {
                    tracing::warn!(shard = %shard, error = %Chain(&e), "{what} failed; the move pauses and retries");
                    logged = true;
                }
                pause(lost, backoff.next_pause()).await;
            }
        }
    }
}
