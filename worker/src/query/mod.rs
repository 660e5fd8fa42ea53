//! Queries and the other requests answered from a shard outside the append path (stats,
//! delete):
//! admission (a bounded number per worker, the rest answered `busy`), a deadline per request,
//! a bounded number running per worker and per shard, and the streaming of a query's answer
//! page by page as chunks no larger than the server's max_payload.
//!
//! A request never holds up its shard's appends: the pipeline only starts it (a tracked task),
//! and waiting for a slot happens in that task, bounded by the request's deadline.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use logstore_protocol::{
    DeleteReply, DeleteRequest, ErrorBody, ErrorCode, QueryRequest, StatsReply, StatsRequest,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::follow::{self, Lanes, Stuck, MAX_HOPS};
use crate::metrics::Metrics;
use crate::origin::InFlight;
use crate::outbox::{format_ts, Outbox};
use crate::store::store_error_body;
use crate::store::{Shard, StoreError};

mod stream;

/// Entries a delete request removes per transaction: each step holds the object's head-row
/// lock (and so its appends) only that long.
const DELETE_STEP_ROWS: u32 = 10_000;

/// A request answered by reading (or, for deletion, changing) one object on its shard.
pub enum Request {
    Query(QueryRequest),
    Stats(StatsRequest),
    Delete(DeleteRequest),
}

impl Request {
    pub fn id(&self) -> u64 {
        match self {
            Request::Query(r) => r.id,
            Request::Stats(r) => r.id,
            Request::Delete(r) => r.id,
        }
    }

    /// The `kind` label of its metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Query(_) => "query",
            Request::Stats(_) => "stats",
            Request::Delete(_) => "delete",
        }
    }
}

/// A request on its way to its shard.
pub struct QueryJob {
    pub request: Request,
    pub reply: Option<Subject>,
    pub started: std::time::Instant,
    /// When the answer must be complete (receipt + QUERY_TIMEOUT_MS).
    pub deadline: Instant,
    /// Its place among the worker's admitted requests (MAX_PENDING_QUERIES), held until
    /// answered.
    pub admission: OwnedSemaphorePermit,
    pub in_flight: InFlight,
}

/// The worker's query machinery, shared by intake (admission) and the shard pipelines (start).
#[derive(Clone)]
pub struct Queries {
    pub outbox: Outbox,
    pub metrics: Metrics,
    pub tasks: TaskTracker,
    /// Queries admitted and not yet answered (waiting or running).
    admitted: Arc<Semaphore>,
    /// Queries running at once on this worker (MAX_CONCURRENT_QUERIES).
    running: Arc<Semaphore>,
    pub timeout: Duration,
    /// Most response bytes one request streams before it stops with a `next` cursor.
    pub max_bytes: usize,
}

impl Queries {
    pub fn new(
        outbox: Outbox,
        metrics: Metrics,
        tasks: TaskTracker,
        max_pending: usize,
        max_running: usize,
        timeout: Duration,
        max_bytes: usize,
    ) -> Queries {
        Queries {
            outbox,
            metrics,
            tasks,
            admitted: Arc::new(Semaphore::new(max_pending)),
            running: Arc::new(Semaphore::new(max_running)),
            timeout,
            max_bytes,
        }
    }

    /// A place for one more query, or `None` when MAX_PENDING_QUERIES are already waiting or
    /// running (the caller answers `busy`).
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.admitted.clone().try_acquire_owned().ok()
    }

    /// Where `request`'s answer goes: a query without a reply subject answers on the
    /// response subject (the original's design); other requests only to their reply subject.
    pub fn answer_to(&self, request: &Request, reply: Option<Subject>) -> Option<Subject> {
        match request {
            Request::Query(_) => Some(self.outbox.response_subject(reply)),
            _ => reply,
        }
    }

    /// Count one answered (or refused) request under its kind.
    pub fn count(&self, kind: &str, outcome: &str) {
        match kind {
            "query" => self.metrics.queries.with_label_values(&[outcome]).inc(),
            _ => self
                .metrics
                .requests
                .with_label_values(&[kind, outcome])
                .inc(),
        }
    }

    /// Answer `job` with an error and count it.
    pub async fn refuse(&self, job: QueryJob, error: ErrorBody) {
        let subject = self.answer_to(&job.request, job.reply.clone());
        self.outbox.error_reply(subject.as_ref(), &error).await;
        self.metrics.error(job.request.kind(), error.code);
        self.count(job.request.kind(), error.code.as_str());
    }

    /// Start answering `job` as a tracked task; never waits. `lanes`: the worker's lane set,
    /// where the request follows its object when it moved. `shard_slots` bounds the requests
    /// running on one shard so that they cannot take every pooled connection from its appends.
    pub fn start(
        &self,
        lanes: &Arc<dyn Lanes>,
        shard: &Arc<Shard>,
        shard_slots: &Arc<Semaphore>,
        job: QueryJob,
    ) {
        let (queries, lanes, shard, shard_slots) = (
            self.clone(),
            lanes.clone(),
            shard.clone(),
            shard_slots.clone(),
        );
        self.tasks.spawn(async move {
            let deadline = job.deadline;
            let subject = queries.answer_to(&job.request, job.reply.clone());
            let answer = async {
                let _running = queries.running.acquire().await;
                let _on_shard = shard_slots.acquire().await;
                match &job.request {
                    Request::Query(request) => match &subject {
                        Some(subject) => queries.stream(&lanes, &shard, request, subject).await,
                        None => Ok(()),
                    },
                    Request::Stats(request) => {
                        queries
                            .stats(&lanes, &shard, request, subject.as_ref())
                            .await
                    }
                    Request::Delete(request) => {
                        queries
                            .delete(&lanes, &shard, request, subject.as_ref())
                            .await
                    }
                }
            };
            let result = match tokio::time::timeout_at(deadline, answer).await {
                Ok(answered) => answered,
                Err(_) => Err(ErrorBody::new(
                    ErrorCode::Timeout,
                    format!(
                        "the {} did not complete within {:?} (QUERY_TIMEOUT_MS)",
                        job.request.kind(),
                        queries.timeout
                    ),
                )),
            };
            let outcome = match result {
                Ok(()) => "ok",
                Err(error) => {
                    queries.outbox.error_reply(subject.as_ref(), &error).await;
                    queries.metrics.error(job.request.kind(), error.code);
                    match error.code {
                        ErrorCode::Timeout => "timeout",
                        _ => "failed",
                    }
                }
            };
            queries.count(job.request.kind(), outcome);
            if let Request::Query(_) = job.request {
                queries
                    .metrics
                    .query_duration
                    .with_label_values(&[&shard.name])
                    .observe(job.started.elapsed().as_secs_f64());
            }
        });
    }

    /// Run `read` (given a shard and the ring epoch to name) where object `id` lives, starting
    /// on `first`, the shard it was routed to: a tombstone sends it to the object's new owner,
    /// an object absent from its old owner while the ring moves it to its new one, and a
    /// shard fenced at a newer epoch makes this worker learn that ring and route again.
    /// `read` answers its result and whether the object exists on that shard. Returns the
    /// result and the shard that gave it.
    async fn locate<T, F, Fut>(
        &self,
        lanes: &Arc<dyn Lanes>,
        first: &Arc<Shard>,
        id: u64,
        mut read: F,
    ) -> Result<(T, Arc<Shard>), ErrorBody>
    where
        F: FnMut(Arc<Shard>, u64) -> Fut,
        Fut: std::future::Future<Output = Result<(T, bool), StoreError>>,
    {
        let mut shard = first.clone();
        // MAX_HOPS reads at most: a hop found after the last read is not taken.
        for hop in 1..=MAX_HOPS {
            let view = lanes.placement();
            let route = view.layout().route(id);
            let next = match read(shard.clone(), view.layout().epoch).await {
                Ok((answer, exists)) => match route.moving_to {
                    Some(to) if !exists && route.shard == shard.name => to.to_string(),
                    _ => return Ok((answer, shard)),
                },
                Err(StoreError::Moved { to, .. }) => to,
                Err(e @ StoreError::StaleEpoch { fence, .. }) => {
                    match follow::past_fence(&**lanes, &shard, fence).await {
                        Some(view) => view.layout().route(id).shard.to_string(),
                        // The newer ring cannot be read: an outage for this request.
                        None => return Err(store_error_body(&e)),
                    }
                }
                Err(e) => return Err(store_error_body(&e)),
            };
            let placement = lanes.placement();
            match follow::shard(&*placement, &next, hop) {
                Ok(next) => shard = next.clone(),
                Err(Stuck::NotOpen) => {
                    // `next` was named by a ring that has moved on meanwhile (a member removed
                    // and its lane closed): where the current ring places the object, if open.
                    let now = placement.layout().route(id).shard;
                    match placement.shard(now) {
                        Some(open) if now != next => shard = open.clone(),
                        _ => {
                            return Err(ErrorBody::new(
                                ErrorCode::Unavailable,
                                format!("object {id} lives on shard {next}, which this worker has not opened; retry later"),
                            ))
                        }
                    }
                }
                Err(Stuck::Restless) => break,
            }
        }
        Err(ErrorBody::new(
            ErrorCode::Unavailable,
            format!("object {id}: the ring kept changing while it was looked up; retry"),
        ))
    }

    /// Delete the entries below `before_seq` (all without it) in steps of at most
    /// [`DELETE_STEP_ROWS`], each its own transaction, and answer how many went. Every step
    /// leaves the object consistent (a shorter prefix gone, head exact), so a request cut
    /// short by its deadline or a crash has deleted part of the range and can simply be sent
    /// again.
    async fn delete(
        &self,
        lanes: &Arc<dyn Lanes>,
        shard: &Arc<Shard>,
        request: &DeleteRequest,
        subject: Option<&Subject>,
    ) -> Result<(), ErrorBody> {
        let mut deleted = 0u64;
        let mut shard = shard.clone();
        loop {
            let (step, on) = self
                .locate(lanes, &shard, request.id, |shard, epoch| async move {
                    let step = shard
                        .delete_step(
                            request.id,
                            request.before_seq,
                            DELETE_STEP_ROWS,
                            false,
                            Some(epoch),
                        )
                        .await?
                        .unwrap_or(0);
                    let exists = step > 0 || shard.whereabouts(request.id).await?.0;
                    Ok((step, exists))
                })
                .await?;
            shard = on;
            deleted += step;
            if step < u64::from(DELETE_STEP_ROWS) {
                break;
            }
        }
        let body = serde_json::to_vec(&DeleteReply {
            id: request.id,
            deleted,
        })
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
        if let Some(subject) = subject {
            self.outbox.response(subject, body).await;
        }
        Ok(())
    }

    /// Answer from the head row alone (see [`Shard::stats`]).
    async fn stats(
        &self,
        lanes: &Arc<dyn Lanes>,
        shard: &Arc<Shard>,
        request: &StatsRequest,
        subject: Option<&Subject>,
    ) -> Result<(), ErrorBody> {
        let (stats, _) = self
            .locate(lanes, shard, request.id, |shard, epoch| async move {
                shard.stats(request.id, epoch).await
            })
            .await?;
        let reply = StatsReply {
            id: request.id,
            count: stats.count,
            first_seq: stats.first_seq,
            last_seq: stats.last_seq,
            first_ts: stats.first_ts.map(format_ts),
            last_ts: stats.last_ts.map(format_ts),
            bytes: stats.bytes,
        };
        let body = serde_json::to_vec(&reply)
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
        if let Some(subject) = subject {
            self.outbox.response(subject, body).await;
        }
        Ok(())
    }
}
