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
    DeleteReply, DeleteRequest, ErrorBody, ErrorCode, LogEntry, Order, QueryRequest, StatsReply,
    StatsRequest, Timestamp,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::follow::{self, Lanes, Stuck, MAX_HOPS};
use crate::metrics::Metrics;
use crate::origin::{store_error_body, InFlight};
use crate::outbox::{format_ts, Outbox};
use crate::store::{ReadRange, Row, Shard, StoreError};

/// Rows read per database round trip when streaming a whole log.
const PAGE_ROWS: u64 = 1000;
/// Room kept in every chunk for the closing `],"next":…,"last":…}`.
const TRAILER_RESERVE: usize = 64;
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
            match follow::shard(&*lanes.placement(), &next, hop) {
                Ok(next) => shard = next.clone(),
                Err(Stuck::NotOpen) => {
                    return Err(ErrorBody::new(
                        ErrorCode::Unavailable,
                        format!("object {id} lives on shard {next}, which this worker has not opened; retry later"),
                    ))
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

    /// Read the requested range page by page and send it as chunks no larger than the server's
    /// max_payload. Memory holds one page and one chunk at a time, whatever the log's size.
    /// Stops after `max_bytes` with a `next` cursor, so one small request cannot make the worker
    /// send an unbounded answer; a client that follows `next` still reads everything.
    ///
    /// Oldest first, the cursor moves up from `after`; newest first, down from `before`. Either
    /// way `next` is the seq of the last entry sent, which is what the request's own cursor
    /// field (`after`, resp. `before`) takes to continue.
    async fn stream(
        &self,
        lanes: &Arc<dyn Lanes>,
        shard: &Arc<Shard>,
        request: &QueryRequest,
        subject: &Subject,
    ) -> Result<(), ErrorBody> {
        let wanted = request.limit.unwrap_or(u64::MAX);
        let desc = request.order == Order::Desc;
        let range = ReadRange {
            after: request.after,
            before: request.before,
            since: request.since.map(Timestamp::to_system_time),
            until: request.until.map(Timestamp::to_system_time),
            desc,
        };
        // The shard that holds the object at the first page's snapshot: the later pages read
        // there too (an object that moved meanwhile keeps its old copy until every read that
        // began on it has ended: MOVE_GRACE_MS).
        let (first, shard) = self
            .locate(lanes, shard, request.id, |shard, epoch| {
                let range = &range;
                async move {
                    let page = shard
                        .first_page(request.id, range, wanted.min(PAGE_ROWS), epoch)
                        .await?;
                    let exists = page.exists;
                    Ok((page, exists))
                }
            })
            .await?;
        let (lo, hi) = (first.lo, first.hi);
        // Whether entries of the range remain beyond `cursor` in the reading direction.
        let more_after = |cursor: u64| {
            if desc {
                cursor > lo.saturating_add(1)
            } else {
                cursor.saturating_add(1) < hi
            }
        };
        let mut writer = ChunkWriter::new(request, first.total, self.outbox.max_payload())?;
        let mut sent = 0u64;
        let mut cursor = if desc { hi } else { lo };
        let mut rows: Vec<Row> = first.rows;
        let mut capped = false;
        'pages: loop {
            let fetched = rows.len() as u64;
            for row in rows.drain(..) {
                if writer.bytes() >= self.max_bytes && sent > 0 {
                    capped = true;
                    break 'pages;
                }
                let entry = LogEntry {
                    seq: row.seq,
                    ts: format_ts(row.ts),
                    log: row.log,
                };
                if let Some(chunk) = writer.push(&entry)? {
                    self.outbox.response(subject, chunk).await;
                }
                cursor = row.seq;
                sent += 1;
            }
            let asked = (wanted - (sent - fetched)).min(PAGE_ROWS);
            if sent >= wanted || fetched < asked || !more_after(cursor) {
                break;
            }
            let (page_lo, page_hi) = if desc { (lo, cursor) } else { (cursor, hi) };
            rows = shard
                .page(
                    request.id,
                    page_lo,
                    page_hi,
                    desc,
                    (wanted - sent).min(PAGE_ROWS),
                )
                .await
                .map_err(|e| store_error_body(&e))?;
        }
        let next = ((capped || sent >= wanted) && sent > 0 && more_after(cursor)).then_some(cursor);
        self.outbox.response(subject, writer.finish(next)).await;
        Ok(())
    }
}

/// Builds query response chunks as JSON text, each a complete, valid response under the size
/// budget. Written by hand (not by serializing a `QueryResponse`) so a chunk is filled entry by
/// entry without knowing in advance how many fit.
struct ChunkWriter {
    /// Everything before the `"chunk"` number, identical in every chunk.
    head: String,
    buf: Vec<u8>,
    entries: usize,
    chunk: u32,
    last_seq_in_chunk: u64,
    max_payload: usize,
    /// Bytes of the chunks already handed out.
    sent_bytes: usize,
}

impl ChunkWriter {
    fn new(
        request: &QueryRequest,
        total: u64,
        max_payload: usize,
    ) -> Result<ChunkWriter, ErrorBody> {
        let mut head = format!("{{\"id\":{}", request.id);
        if let Some(request_id) = &request.request_id {
            let quoted = serde_json::to_string(request_id)
                .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
            head.push_str(",\"request_id\":");
            head.push_str(&quoted);
        }
        head.push_str(&format!(",\"total\":{total},\"chunk\":"));
        let mut writer = ChunkWriter {
            head,
            buf: Vec::new(),
            entries: 0,
            chunk: 0,
            last_seq_in_chunk: 0,
            max_payload,
            sent_bytes: 0,
        };
        writer.open();
        if writer.buf.len() + TRAILER_RESERVE > max_payload {
            return Err(ErrorBody::new(
                ErrorCode::TooLarge,
                "request_id is too large for one response message",
            ));
        }
        Ok(writer)
    }

    /// Bytes of this answer so far (chunks handed out plus the one being filled).
    fn bytes(&self) -> usize {
        self.sent_bytes + self.buf.len()
    }

    fn open(&mut self) {
        self.buf.clear();
        self.buf.extend_from_slice(self.head.as_bytes());
        self.buf
            .extend_from_slice(format!("{},\"logs\":[", self.chunk).as_bytes());
        self.entries = 0;
    }

    /// Add an entry; returns a full chunk to send first when the entry does not fit in this one.
    fn push(&mut self, entry: &LogEntry) -> Result<Option<Vec<u8>>, ErrorBody> {
        let encoded = serde_json::to_vec(entry)
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
        let mut full = None;
        if self.buf.len() + 1 + encoded.len() + TRAILER_RESERVE > self.max_payload {
            if self.entries == 0 {
                return Err(ErrorBody::new(
                    ErrorCode::TooLarge,
                    format!(
                        "entry {} does not fit in one message of {} bytes (server max_payload)",
                        entry.seq, self.max_payload
                    ),
                ));
            }
            full = Some(self.close(Some(self.last_seq_in_chunk), false));
            self.chunk += 1;
            self.open();
        }
        if self.entries > 0 {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(&encoded);
        self.entries += 1;
        self.last_seq_in_chunk = entry.seq;
        Ok(full)
    }

    fn close(&mut self, next: Option<u64>, last: bool) -> Vec<u8> {
        let next = next.map_or_else(|| "null".to_string(), |n| n.to_string());
        self.buf
            .extend_from_slice(format!("],\"next\":{next},\"last\":{last}}}").as_bytes());
        self.sent_bytes += self.buf.len();
        std::mem::take(&mut self.buf)
    }

    /// The final chunk.
    fn finish(mut self, next: Option<u64>) -> Vec<u8> {
        self.close(next, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logstore_protocol::QueryResponse;

    /// Chunks of 50 entries pushed in `seqs` order (ascending or descending).
    fn chunks_of(seqs: &[u64]) -> Vec<Vec<u8>> {
        let request = QueryRequest {
            id: 7,
            after: 0,
            before: None,
            order: Order::Asc,
            since: None,
            until: None,
            limit: None,
            request_id: Some("r\"1".into()),
        };
        let mut writer = ChunkWriter::new(&request, 50, 600).unwrap();
        let mut chunks = Vec::new();
        for &seq in seqs {
            let entry = LogEntry {
                seq,
                ts: "2026-11-22T09:16:27.123456Z".into(),
                log: "x".repeat(20),
            };
            if let Some(chunk) = writer.push(&entry).unwrap() {
                chunks.push(chunk);
            }
        }
        chunks.push(writer.finish(None));
        chunks
    }

    #[test]
    fn chunks_are_valid_responses_under_the_budget() {
        for order in [Order::Asc, Order::Desc] {
            let mut sent: Vec<u64> = (1..=50).collect();
            if order == Order::Desc {
                sent.reverse();
            }
            check_chunks(&chunks_of(&sent), &sent);
        }
    }

    /// Every chunk fits, parses and is numbered; a non-final chunk's `next` is the seq of its
    /// last entry (the cursor for `after`, or for `before` when newest first).
    fn check_chunks(chunks: &[Vec<u8>], sent: &[u64]) {
        assert!(chunks.len() > 3);
        let mut seqs = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(chunk.len() <= 600, "chunk {i} is {} bytes", chunk.len());
            let response: QueryResponse = serde_json::from_slice(chunk).unwrap();
            assert_eq!(response.chunk as usize, i);
            assert_eq!(response.last, i == chunks.len() - 1);
            assert_eq!(response.request_id.as_deref(), Some("r\"1"));
            assert_eq!(response.total, 50);
            if !response.last {
                assert_eq!(response.next, response.logs.last().map(|e| e.seq));
            }
            seqs.extend(response.logs.iter().map(|e| e.seq));
        }
        assert_eq!(seqs, sent);
    }
}
