//! Per-shard pipelines: appends that arrive together are written in one transaction, and a query
//! runs only after the appends this worker received before it have committed (so a publisher that
//! appends and then queries through one worker reads its own writes).
//!
//! Each shard has one bounded queue and one task. The task takes whatever is queued (up to
//! `BATCH_MAX_ROWS`), commits it, settles every append (see [`crate::origin`]), and starts any
//! query that was queued behind those appends (see [`crate::query`]).
//!
//! A hung shard must not stall the others: intake offers work with [`ShardQueue::offer`], which
//! waits for room only while the shard is making progress and otherwise hands the work back
//! at once, to be answered `busy` / `unavailable` (core) or nak'ed (JetStream).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use logstore_protocol::{ErrorBody, ErrorCode};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cancel::{pause, Backoff};
use crate::follow::{self, Lanes, Stuck};
use crate::metrics::{Metrics, ShardMetrics};
use crate::origin::{AppendJob, Settler};
use crate::query::{Queries, QueryJob};
use crate::store::{Appended, NewEntry, Routing, Shard, StoreError};
use crate::Chain;

/// How often a wait for room in a full queue checks that its shard is still making progress.
const FULL_WAIT: Duration = Duration::from_millis(100);
/// How long one transaction may run before its shard counts as stuck: then a full queue
/// refuses at once instead of holding up intake (and with it every other shard).
const STUCK_AFTER: Duration = Duration::from_secs(1);
/// First and longest pause between retries of held appends (see [`AppendJob::hold`]).
const HOLD_RETRY_FIRST: Duration = Duration::from_millis(100);
const HOLD_RETRY_MAX: Duration = Duration::from_secs(1);

pub enum Work {
    Append(AppendJob),
    /// One batch message's entries for this shard, in array order: they are written in one
    /// transaction, so one object's entries from one message get consecutive seqs.
    Appends(Vec<AppendJob>),
    Query(QueryJob),
}

impl Work {
    /// Queue places it takes: one per entry, so the bound is on entries, not messages.
    fn weight(&self) -> u32 {
        match self {
            Work::Appends(jobs) => u32::try_from(jobs.len()).unwrap_or(u32::MAX),
            Work::Append(_) | Work::Query(_) => 1,
        }
    }
}

/// Work in the queue, holding its places until the pipeline takes it.
struct Queued {
    work: Work,
    _places: OwnedSemaphorePermit,
}

/// What a shard pipeline needs besides its queue and the shard set (which the lane builder
/// keeps for the lanes it opens).
#[derive(Clone)]
pub struct Settings {
    pub settler: Settler,
    pub queries: Queries,
    pub metrics: Metrics,
    pub batch_max_rows: usize,
    /// How long a started batch waits for more appends before it is written.
    pub batch_linger: Duration,
    /// Queries running at once on one shard (leaves pooled connections for its appends).
    pub queries_per_shard: usize,
    /// Shutdown: held appends stop being retried (they stay unacknowledged, for redelivery).
    pub cancel: CancellationToken,
}

/// What a pipeline task runs with.
struct Context {
    settings: Settings,
    /// The worker's lane set: where appends go when the ring moved their object. No cycle
    /// that outlives the worker: the set keeps only this pipeline's queue sender, so closing
    /// the set ends the task, and the task drops this handle.
    lanes: Arc<dyn Lanes>,
}

/// The sending side of one shard's pipeline. Cloning is cheap.
#[derive(Clone)]
pub struct ShardQueue {
    sender: mpsc::Sender<Queued>,
    /// Free places (entries) in the queue; the channel itself never fills before these run out.
    places: Arc<Semaphore>,
    pub shard: Arc<Shard>,
    pub metrics: ShardMetrics,
    /// When the batch now being written started (ms since the Unix epoch), 0 when idle.
    busy_since: Arc<AtomicU64>,
}

/// Why [`ShardQueue::offer`] handed work back.
pub struct Refused {
    pub work: Work,
    pub error: ErrorBody,
}

impl ShardQueue {
    /// Queue `work`. A full queue is waited on for as long as its shard is up and making
    /// progress (backpressure: a healthy but busy shard slows intake down rather than having
    /// work refused and retried); it refuses at once when the shard is down or stuck.
    pub async fn offer(&self, work: Work) -> Result<(), Refused> {
        let weight = work.weight();
        let places = loop {
            if let Ok(places) = self.places.clone().try_acquire_many_owned(weight) {
                break places;
            }
            if !self.shard.is_up() {
                return Err(self.refused(work, "is down"));
            }
            if self.stuck() {
                return Err(self.refused(work, "is not keeping up (its queue is full)"));
            }
            let wait = self.places.clone().acquire_many_owned(weight);
            if let Ok(Ok(places)) = tokio::time::timeout(FULL_WAIT, wait).await {
                break places;
            }
        };
        let queued = Queued {
            work,
            _places: places,
        };
        // Never full while places are held (see `shard_pipeline`); closed only at shutdown.
        self.sender.send(queued).await.map_err(|e| {
            let work = e.0.work;
            self.refused(work, "is shutting down")
        })
    }

    /// Queue held work ([`AppendJob::hold`]): waits for room however long the shard needs,
    /// since refusing would let later appends to the same objects overtake it. Hands the work
    /// back only when `cancel` fires (shutdown) or the pipeline has stopped.
    pub async fn offer_held(&self, work: Work, cancel: &CancellationToken) -> Result<(), Work> {
        let places = tokio::select! {
            // Room wins over a shutdown that began meanwhile: queued work is still processed.
            biased;
            places = self.places.clone().acquire_many_owned(work.weight()) => match places {
                Ok(places) => places,
                Err(_) => return Err(work),
            },
            _ = cancel.cancelled() => return Err(work),
        };
        let queued = Queued {
            work,
            _places: places,
        };
        self.sender.send(queued).await.map_err(|e| e.0.work)
    }

    fn refused(&self, work: Work, why: &str) -> Refused {
        let code = if self.shard.is_up() {
            ErrorCode::Busy
        } else {
            ErrorCode::Unavailable
        };
        let error = ErrorBody::new(
            code,
            format!(
                "shard {} {why}; nothing was stored, retry later",
                self.shard.name
            ),
        );
        Refused { work, error }
    }

    fn stuck(&self) -> bool {
        let since = self.busy_since.load(Ordering::Acquire);
        since != 0 && now_ms().saturating_sub(since) > STUCK_AFTER.as_millis() as u64
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
}

/// Create a shard's queue (`capacity` entries) and its pipeline task's future, which runs
/// until every sender is gone and the queue is empty. `lanes`: the lane set this lane belongs
/// to.
pub fn shard_pipeline(
    shard: Arc<Shard>,
    capacity: usize,
    settings: Settings,
    lanes: Arc<dyn Lanes>,
) -> (ShardQueue, impl std::future::Future<Output = ()>) {
    let ctx = Context { settings, lanes };
    // Every queued item holds at least one place, so the channel never fills first.
    let (sender, receiver) = mpsc::channel(capacity);
    let metrics = ctx.settings.metrics.shard(&shard.name);
    let queue = ShardQueue {
        sender,
        places: Arc::new(Semaphore::new(capacity)),
        shard: shard.clone(),
        metrics: metrics.clone(),
        busy_since: Arc::new(AtomicU64::new(0)),
    };
    let busy_since = queue.busy_since.clone();
    (queue, run_shard(shard, receiver, metrics, busy_since, ctx))
}

async fn run_shard(
    shard: Arc<Shard>,
    mut queue: mpsc::Receiver<Queued>,
    m: ShardMetrics,
    busy_since: Arc<AtomicU64>,
    ctx: Context,
) {
    let query_slots = Arc::new(Semaphore::new(ctx.settings.queries_per_shard));
    let mut batch: Vec<AppendJob> = Vec::with_capacity(ctx.settings.batch_max_rows);
    // A message's entries that did not fit in the batch being built: they open the next one.
    let mut carried: Option<Vec<AppendJob>> = None;
    loop {
        let mut query = None;
        match carried.take() {
            Some(jobs) => batch.extend(jobs),
            None => match queue.recv().await {
                Some(queued) => match queued.work {
                    Work::Append(job) => batch.push(job),
                    Work::Appends(jobs) => batch.extend(jobs),
                    Work::Query(job) => query = Some(job),
                },
                None => break,
            },
        }
        // Take what is queued; then, if the batch is still small, wait up to the linger for
        // more: under load a few milliseconds fill a batch of hundreds, which Postgres writes
        // far faster per row than a few rows at a time.
        let linger_until = Instant::now() + ctx.settings.batch_linger;
        while query.is_none() && batch.len() < ctx.settings.batch_max_rows {
            let next = match queue.try_recv() {
                Ok(queued) => Some(queued.work),
                Err(_) if batch.is_empty() || ctx.settings.batch_linger.is_zero() => None,
                Err(_) => tokio::time::timeout_at(linger_until, queue.recv())
                    .await
                    .ok()
                    .flatten()
                    .map(|queued| queued.work),
            };
            match next {
                Some(Work::Append(job)) => batch.push(job),
                Some(Work::Appends(jobs))
                    if batch.len() + jobs.len() > ctx.settings.batch_max_rows =>
                {
                    carried = Some(jobs);
                    break;
                }
                Some(Work::Appends(jobs)) => batch.extend(jobs),
                Some(Work::Query(job)) => query = Some(job),
                None => break,
            }
        }
        if !batch.is_empty() {
            busy_since.store(now_ms(), Ordering::Release);
            commit_batch(&shard, &mut batch, &m, &ctx, 0).await;
            busy_since.store(0, Ordering::Release);
        }
        if let Some(job) = query {
            if Instant::now() >= job.deadline {
                let error = ErrorBody::new(
                    ErrorCode::Timeout,
                    "the query waited in its shard's queue past its deadline (QUERY_TIMEOUT_MS)",
                );
                ctx.settings.queries.refuse(job, error).await;
            } else {
                ctx.settings
                    .queries
                    .start(&ctx.lanes, &shard, &query_slots, job);
            }
        }
    }
}

/// An append still queued at its deadline was never sent: answering `unavailable` is the truth.
fn expired(shard: &Shard) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::Unavailable,
        format!(
            "shard {} did not take the append within {:?} (SHARD_TIMEOUT_MS); nothing was stored",
            shard.name,
            shard.timeout()
        ),
    )
}

/// Commit `batch` on `shard` and settle it (see [`attempt`]); an outage holds or fails it, a
/// fault isolates the bad entry. `hops`: how often these appends were sent on already.
async fn commit_batch(
    shard: &Shard,
    batch: &mut Vec<AppendJob>,
    m: &ShardMetrics,
    ctx: &Context,
    hops: u8,
) {
    let settler = &ctx.settings.settler;
    let now = Instant::now();
    if batch.iter().any(|job| job.late(now)) {
        let (late, current): (Vec<AppendJob>, Vec<AppendJob>) =
            batch.drain(..).partition(|job| job.late(now));
        for job in late {
            settler.failed(job, expired(shard), m).await;
        }
        *batch = current;
        if batch.is_empty() {
            return;
        }
    }
    m.batch_size.observe(batch.len() as f64);
    match attempt(shard, batch, m, ctx, hops).await {
        Ok(()) => {}
        Err(e) if e.is_unavailable() => {
            // An outage is logged once by the health checker, not once per batch.
            if e.is_outcome_unknown() {
                tracing::warn!(shard = %shard.name, error = %Chain(&e), rows = batch.len(), "append batch outcome unknown; answered `timeout`");
            } else {
                tracing::debug!(shard = %shard.name, error = %Chain(&e), rows = batch.len(), "append batch failed");
            }
            let (held, rest): (Vec<AppendJob>, Vec<AppendJob>) =
                batch.drain(..).partition(|job| job.hold);
            for job in rest {
                settler.store_failed(job, &e, m).await;
            }
            if !held.is_empty() {
                retry_held(shard, held, m, ctx, hops).await;
            }
        }
        Err(e) => isolate(shard, batch, e, m, ctx, hops).await,
    }
}

/// One try: the appends the current ring view places on `shard` are committed there in one
/// transaction and settled; the others (routed by an older view) are sent on, and so are
/// those the shard answered `moved` (their object moved away: to its new owner) and, after
/// this worker learnt the newer ring, those of a batch the shard refused for a stale epoch.
/// On a failed commit, `batch` holds the appends that were tried, and the error is returned.
async fn attempt(
    shard: &Shard,
    batch: &mut Vec<AppendJob>,
    m: &ShardMetrics,
    ctx: &Context,
    hops: u8,
) -> Result<(), StoreError> {
    let lanes = &*ctx.lanes;
    let view = lanes.placement();
    let epoch = view.layout().epoch;
    let mut here = Vec::with_capacity(batch.len());
    let mut elsewhere = Vec::new();
    let mut moving = Vec::new();
    for job in batch.drain(..) {
        let (target, hint) = view.layout().place(job.entry.id, job.moved_at);
        if target != shard.name {
            elsewhere.push(job);
            continue;
        }
        if hint {
            moving.push(job.entry.id);
        }
        here.push(job);
    }
    if !elsewhere.is_empty() {
        forward(elsewhere, ctx, hops + 1).await;
    }
    if here.is_empty() {
        return Ok(());
    }
    let routing = Routing {
        epoch,
        moving: &moving,
    };
    match try_commit(shard, &here, m, routing).await {
        Ok(appended) => {
            let mut moved = Vec::new();
            for (mut job, appended) in here.into_iter().zip(appended) {
                match appended {
                    Appended::Moved => {
                        job.moved_at = Some(epoch);
                        moved.push(job);
                    }
                    appended => settle(&ctx.settings.settler, job, appended, m).await,
                }
            }
            if !moved.is_empty() {
                ctx.settings
                    .metrics
                    .appends_redirected
                    .inc_by(moved.len() as u64);
                forward(moved, ctx, hops + 1).await;
            }
            Ok(())
        }
        Err(StoreError::StaleEpoch { fence, .. }) => {
            tracing::debug!(shard = %shard.name, epoch, fence, "shard fenced at a newer ring epoch; reading the ring again");
            if follow::past_fence(lanes, shard, fence).await.is_some() {
                forward(here, ctx, hops + 1).await;
                return Ok(());
            }
            // The newer ring cannot be read: an outage for these appends (held ones wait).
            *batch = here;
            Err(StoreError::StaleEpoch {
                shard: shard.name.clone(),
                epoch,
                fence,
            })
        }
        Err(e) => {
            *batch = here;
            Err(e)
        }
    }
}

/// Appends the current view places on other shards than the one they were queued for: each
/// group is committed on its shard from this task, in order, not through that shard's queue
/// (which could be full of work waiting for this one).
async fn forward(jobs: Vec<AppendJob>, ctx: &Context, hops: u8) {
    let view = ctx.lanes.placement();
    let mut groups: Vec<(String, Vec<AppendJob>)> = Vec::new();
    for job in jobs {
        let (target, _) = view.layout().place(job.entry.id, job.moved_at);
        match groups.iter_mut().find(|(name, _)| name == target) {
            Some((_, group)) => group.push(job),
            None => groups.push((target.to_string(), vec![job])),
        }
    }
    for (name, mut group) in groups {
        let m = ctx.settings.metrics.shard(&name);
        let shard = match follow::shard(&*view, &name, hops) {
            Ok(shard) => shard,
            Err(stuck) => {
                let why = match stuck {
                    Stuck::Restless => "the ring kept changing while the append was routed",
                    Stuck::NotOpen => "its shard is not open on this worker",
                };
                let error = ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!("shard {name}: {why}; nothing was stored, retry later"),
                );
                for job in group {
                    ctx.settings.settler.failed(job, error.clone(), &m).await;
                }
                continue;
            }
        };
        Box::pin(commit_batch(shard, &mut group, &m, ctx, hops)).await;
    }
}

/// One `logstore_append_at` call for the whole batch, due by its earliest deadline and at most
/// the shard's timeout from now.
async fn try_commit(
    shard: &Shard,
    batch: &[AppendJob],
    m: &ShardMetrics,
    routing: Routing<'_>,
) -> Result<Vec<Appended>, StoreError> {
    let latest = Instant::now() + shard.timeout();
    let deadline = batch
        .iter()
        .filter_map(AppendJob::due)
        .min()
        .map_or(latest, |d| d.min(latest));
    let entries: Vec<&NewEntry> = batch.iter().map(|job| &job.entry).collect();
    let expected: Vec<Option<u64>> = batch.iter().map(|job| job.expected_seq).collect();
    let commit = m.commit_duration.start_timer();
    let result = shard
        .append_expecting(&entries, &expected, routing, deadline)
        .await;
    commit.observe_duration();
    result
}

/// Held appends whose commit failed with an outage or an unknown outcome: retried in place,
/// in order, until they commit (keys make a retry of a commit that did land a duplicate), so
/// nothing queued behind them on this shard can overtake them. The shard's queue fills
/// meanwhile and the ordered intake waits for it. At shutdown they are dropped unacknowledged:
/// JetStream redelivers them to the next puller, which stores them before anything later.
async fn retry_held(
    shard: &Shard,
    mut held: Vec<AppendJob>,
    m: &ShardMetrics,
    ctx: &Context,
    hops: u8,
) {
    for wait in Backoff::new(HOLD_RETRY_FIRST, HOLD_RETRY_MAX) {
        if !pause(&ctx.settings.cancel, wait).await {
            tracing::warn!(shard = %shard.name, appends = held.len(), "shutting down with held appends uncommitted; JetStream redelivers them");
            return;
        }
        if !shard.is_up() {
            continue;
        }
        match attempt(shard, &mut held, m, ctx, hops).await {
            Ok(()) => return,
            Err(e) if e.is_unavailable() => {
                tracing::debug!(shard = %shard.name, error = %Chain(&e), rows = held.len(), "held appends not committed yet; retrying");
            }
            Err(e) => return Box::pin(isolate(shard, &mut held, e, m, ctx, hops)).await,
        }
    }
}

/// A batch that failed for a reason other than an outage. One bad entry must not fail its
/// neighbours: the batch rolled back as a whole, so store the entries one by one to isolate
/// it.
async fn isolate(
    shard: &Shard,
    batch: &mut Vec<AppendJob>,
    e: StoreError,
    m: &ShardMetrics,
    ctx: &Context,
    hops: u8,
) {
    let settler = &ctx.settings.settler;
    if batch.len() == 1 {
        tracing::warn!(shard = %shard.name, error = %Chain(&e), "append failed");
        for job in batch.drain(..) {
            settler.store_failed(job, &e, m).await;
        }
        return;
    }
    tracing::warn!(shard = %shard.name, error = %Chain(&e), rows = batch.len(), "append batch failed; retrying entries one by one");
    for job in batch.drain(..) {
        if job.late(Instant::now()) {
            settler.failed(job, expired(shard), m).await;
            continue;
        }
        let mut one = vec![job];
        match attempt(shard, &mut one, m, ctx, hops).await {
            Ok(()) => {}
            Err(e) if e.is_unavailable() && one.iter().all(|job| job.hold) => {
                Box::pin(retry_held(shard, one, m, ctx, hops)).await
            }
            Err(e) => {
                for job in one {
                    settler.store_failed(job, &e, m).await;
                }
            }
        }
    }
}

/// Hand one committed append's outcome to its settlement.
async fn settle(settler: &Settler, job: AppendJob, appended: Appended, m: &ShardMetrics) {
    match appended {
        Appended::Stored(stored) => settler.stored(job, stored, m).await,
        Appended::Conflict { last_seq } => settler.conflict(job, last_seq, m).await,
        // Sent on by `attempt` before settling; never reaches here.
        Appended::Moved => {
            let error = ErrorBody::new(ErrorCode::Internal, "an append answered `moved` twice");
            settler.failed(job, error, m).await
        }
    }
}
