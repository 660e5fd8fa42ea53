//! Per-shard pipelines: appends that arrive together are written in one transaction, and a query
//! runs only after the appends this worker received before it have committed (so a publisher that
//! appends and then queries through one worker reads its own writes).
//!
//! Each shard has one bounded queue and one task. The task takes whatever is queued (up to
//! `BATCH_MAX_ROWS`), commits it, answers every append, and starts any query that was queued
//! behind those appends as its own tracked task, bounded by a semaphore.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;

use async_nats::Subject;
use logstore_protocol::{AppendReply, AppendRequest, ErrorBody, ErrorCode, LogEntry, QueryRequest};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::TaskTracker;

use crate::metrics::{Metrics, ShardMetrics};
use crate::outbox::{format_ts, Outbox};
use crate::store::{NewEntry, Row, Shard, StoreError, Stored};

/// Rows read per database round trip when streaming a whole log.
const PAGE_ROWS: u64 = 1000;
/// Room kept in every chunk for the closing `],"next":…,"last":…}`.
const TRAILER_RESERVE: usize = 64;

/// An append on its way to its shard.
pub struct AppendJob {
    pub entry: NewEntry,
    pub origin: Origin,
    pub started: Instant,
}

/// Where an append came from, which decides how it is settled once its fate is known.
pub enum Origin {
    /// A core NATS message: answered on its reply subject, if it has one. Without one, a failed
    /// append is dead-lettered, because nobody else would ever learn it was not stored.
    Core {
        reply: Option<Subject>,
        subject: Subject,
    },
    /// A JetStream delivery: acknowledged after commit, nak'ed for redelivery on failure,
    /// dead-lettered and terminated once it has failed too often.
    JetStream(Box<async_nats::jetstream::Message>),
}

/// A query on its way to its shard.
pub struct QueryJob {
    pub request: QueryRequest,
    pub reply: Option<Subject>,
    pub started: Instant,
}

pub enum Work {
    Append(AppendJob),
    Query(QueryJob),
}

/// What a shard pipeline needs besides its queue.
#[derive(Clone)]
pub struct Context {
    pub outbox: Outbox,
    pub metrics: Metrics,
    pub tasks: TaskTracker,
    pub query_slots: Arc<Semaphore>,
    pub batch_max_rows: usize,
    /// How long a started batch waits for more appends before it is written.
    pub batch_linger: Duration,
    /// JetStream deliveries of a failing message before it is dead-lettered (outages excepted).
    pub max_deliver: i64,
}

/// Run one shard's pipeline until every sender of `queue` is gone and the queue is empty.
pub async fn run_shard(shard: Arc<Shard>, mut queue: mpsc::Receiver<Work>, ctx: Context) {
    let m = ctx.metrics.shard(&shard.name);
    let mut batch: Vec<AppendJob> = Vec::with_capacity(ctx.batch_max_rows);
    while let Some(work) = queue.recv().await {
        let mut query = None;
        match work {
            Work::Append(job) => batch.push(job),
            Work::Query(job) => query = Some(job),
        }
        // Take what is queued; then, if the batch is still small, wait up to the linger for
        // more: under load a few milliseconds fill a batch of hundreds, which Postgres writes
        // far faster per row than a few rows at a time.
        let deadline = tokio::time::Instant::now() + ctx.batch_linger;
        while query.is_none() && batch.len() < ctx.batch_max_rows {
            let next = match queue.try_recv() {
                Ok(work) => Some(work),
                Err(_) if batch.is_empty() || ctx.batch_linger.is_zero() => None,
                Err(_) => tokio::time::timeout_at(deadline, queue.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            match next {
                Some(Work::Append(job)) => batch.push(job),
                Some(Work::Query(job)) => query = Some(job),
                None => break,
            }
        }
        if !batch.is_empty() {
            commit_batch(&shard, &mut batch, &m, &ctx).await;
        }
        if let Some(job) = query {
            start_query(&shard, job, &ctx).await;
        }
    }
}

async fn commit_batch(shard: &Shard, batch: &mut Vec<AppendJob>, m: &ShardMetrics, ctx: &Context) {
    m.batch_size.observe(batch.len() as f64);
    let entries: Vec<&NewEntry> = batch.iter().map(|job| &job.entry).collect();
    let result = shard.append(&entries).await;
    drop(entries);
    match result {
        Ok(stored) => {
            for (job, stored) in batch.drain(..).zip(stored) {
                answer_append(job, Ok(stored), m, ctx).await;
            }
        }
        Err(e) if e.is_unavailable() || batch.len() == 1 => {
            // An outage is logged once by the health checker, not once per batch.
            if e.is_unavailable() {
                tracing::debug!(shard = %shard.name, error = %e, rows = batch.len(), "append batch failed");
            } else {
                tracing::warn!(shard = %shard.name, error = %e, rows = batch.len(), "append batch failed");
            }
            for job in batch.drain(..) {
                answer_append(job, Err(&e), m, ctx).await;
            }
        }
        Err(e) => {
            // One bad entry must not fail its neighbours: the batch rolled back as a whole,
            // so store the entries one by one to isolate it.
            tracing::warn!(shard = %shard.name, error = %e, rows = batch.len(), "append batch failed; retrying entries one by one");
            for job in batch.drain(..) {
                let result = shard.append(&[&job.entry]).await;
                match result {
                    Ok(mut stored) if stored.len() == 1 => {
                        let stored = stored.remove(0);
                        answer_append(job, Ok(stored), m, ctx).await
                    }
                    Ok(_) => {
                        let e = ErrorBody::new(ErrorCode::Internal, "append returned no result");
                        fail_append(job, e, m, ctx).await
                    }
                    Err(e) => answer_append(job, Err(&e), m, ctx).await,
                }
            }
        }
    }
}

async fn answer_append(
    job: AppendJob,
    result: Result<Stored, &StoreError>,
    m: &ShardMetrics,
    ctx: &Context,
) {
    match result {
        Ok(stored) => {
            if stored.duplicate {
                m.duplicate.inc();
            } else {
                m.stored.inc();
            }
            let body = AppendReply {
                id: job.entry.id,
                seq: stored.seq,
                ts: format_ts(stored.ts),
                duplicate: stored.duplicate,
            };
            match &job.origin {
                Origin::Core { reply, .. } => ctx.outbox.append_done(reply.as_ref(), &body).await,
                Origin::JetStream(message) => {
                    // Event first, then ack: a crash in between redelivers the message, which
                    // then answers as a duplicate and publishes the event again.
                    ctx.outbox.append_done(None, &body).await;
                    if let Err(e) = message.ack().await {
                        tracing::warn!(error = %e, "JetStream ack failed; the message will be redelivered");
                    }
                }
            }
            finish_append(&job, m);
        }
        Err(e) => fail_append(job, store_error_body(e), m, ctx).await,
    }
}

async fn fail_append(job: AppendJob, error: ErrorBody, m: &ShardMetrics, ctx: &Context) {
    m.failed.inc();
    match &job.origin {
        Origin::Core {
            reply: Some(reply), ..
        } => ctx.outbox.error_reply(Some(reply), &error).await,
        Origin::Core {
            reply: None,
            subject,
        } => {
            let copy = AppendRequest {
                id: job.entry.id,
                log: job.entry.log.clone(),
                key: job.entry.key.clone(),
            };
            match serde_json::to_vec(&copy) {
                Ok(body) => ctx.outbox.dead_letter(subject, body.into(), &error).await,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a failed append for dead_letter")
                }
            }
        }
        Origin::JetStream(message) => settle_failed_delivery(message, &error, ctx).await,
    }
    finish_append(&job, m);
}

/// A JetStream delivery that could not be stored. Outages never dead-letter: the message waits
/// (nak with backoff) until its shard is back. Anything else is retried `max_deliver` times,
/// then copied to the dead-letter subject and terminated so it stops holding a slot.
async fn settle_failed_delivery(
    message: &async_nats::jetstream::Message,
    error: &ErrorBody,
    ctx: &Context,
) {
    let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
    let result = if error.code != ErrorCode::Unavailable && delivered >= ctx.max_deliver {
        tracing::error!(delivered, reason = %error.message, "giving up on a message: dead-lettered");
        ctx.outbox
            .dead_letter(&message.subject, message.payload.clone(), error)
            .await;
        message.ack_with(AckKind::Term).await
    } else {
        message
            .ack_with(AckKind::Nak(Some(redelivery_delay(delivered))))
            .await
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "JetStream nak/term failed; the message will be redelivered after ack_wait");
    }
}

/// 100 ms, doubling per delivery, at most 5 s: quick recovery from blips, little churn during a
/// long outage.
pub fn redelivery_delay(delivered: i64) -> Duration {
    let exponent = delivered.clamp(1, 7) - 1;
    Duration::from_millis(100 << exponent).min(Duration::from_secs(5))
}

fn finish_append(job: &AppendJob, m: &ShardMetrics) {
    m.append_duration
        .observe(job.started.elapsed().as_secs_f64());
    m.appends_in_flight.dec();
}

/// The error a client sees for a store failure. Outages say `unavailable` (retry with the same
/// key); anything else is `internal`, with the detail in the worker's log rather than the reply.
pub fn store_error_body(e: &StoreError) -> ErrorBody {
    if e.is_unavailable() {
        ErrorBody::new(ErrorCode::Unavailable, e.to_string())
    } else {
        tracing::error!(error = %e, "store fault");
        ErrorBody::new(
            ErrorCode::Internal,
            format!("shard error (see worker log): {}", short(e)),
        )
    }
}

fn short(e: &StoreError) -> String {
    match e {
        StoreError::Database { source, .. } => source
            .as_db_error()
            .map(|db| db.message().to_string())
            .unwrap_or_else(|| source.to_string()),
        other => other.to_string(),
    }
}

async fn start_query(shard: &Arc<Shard>, job: QueryJob, ctx: &Context) {
    // Waiting here (rather than in the spawned task) is the backpressure: a flood of whole-log
    // reads slows this shard's intake instead of growing without bound.
    let permit = match ctx.query_slots.clone().acquire_owned().await {
        Ok(permit) => permit,
        Err(_) => return, // closed only at the very end of shutdown
    };
    let shard = shard.clone();
    let ctx2 = ctx.clone();
    ctx.tasks.spawn(async move {
        let _permit = permit;
        answer_query(&shard, job, &ctx2).await;
    });
}

async fn answer_query(shard: &Shard, job: QueryJob, ctx: &Context) {
    let subject = ctx.outbox.response_subject(job.reply.clone());
    let result = stream_query(shard, &job.request, &subject, ctx).await;
    let outcome = match result {
        Ok(()) => "ok",
        Err(error) => {
            ctx.outbox.error_reply(Some(&subject), &error).await;
            "failed"
        }
    };
    ctx.metrics.queries.with_label_values(&[outcome]).inc();
    ctx.metrics
        .query_duration
        .with_label_values(&[&shard.name])
        .observe(job.started.elapsed().as_secs_f64());
    ctx.metrics.queries_in_flight.dec();
}

/// Read the requested range page by page and send it as chunks no larger than the server's
/// max_payload. Memory holds one page and one chunk at a time, whatever the log's size.
async fn stream_query(
    shard: &Shard,
    request: &QueryRequest,
    subject: &Subject,
    ctx: &Context,
) -> Result<(), ErrorBody> {
    let wanted = request.limit.unwrap_or(u64::MAX);
    let first = shard
        .first_page(request.id, request.after, wanted.min(PAGE_ROWS))
        .await
        .map_err(|e| store_error_body(&e))?;
    let mut writer = ChunkWriter::new(request, first.total, ctx.outbox.max_payload())?;
    let mut sent = 0u64;
    let mut cursor = request.after;
    let mut rows: Vec<Row> = first.rows;
    loop {
        let fetched = rows.len() as u64;
        for row in rows.drain(..) {
            let entry = LogEntry {
                seq: row.seq,
                ts: format_ts(row.ts),
                log: row.log,
            };
            if let Some(chunk) = writer.push(&entry)? {
                ctx.outbox.response(subject, chunk).await;
            }
            cursor = row.seq;
            sent += 1;
        }
        let asked = (wanted - (sent - fetched)).min(PAGE_ROWS);
        if sent >= wanted || fetched < asked || cursor >= first.last_seq {
            break;
        }
        rows = shard
            .page(
                request.id,
                cursor,
                first.last_seq,
                (wanted - sent).min(PAGE_ROWS),
            )
            .await
            .map_err(|e| store_error_body(&e))?;
    }
    let next = (sent >= wanted && cursor < first.last_seq).then_some(cursor);
    ctx.outbox.response(subject, writer.finish(next)).await;
    Ok(())
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

    #[test]
    fn redelivery_backs_off_to_five_seconds() {
        assert_eq!(redelivery_delay(1), Duration::from_millis(100));
        assert_eq!(redelivery_delay(2), Duration::from_millis(200));
        assert_eq!(redelivery_delay(6), Duration::from_millis(3200));
        assert_eq!(redelivery_delay(7), Duration::from_secs(5));
        assert_eq!(redelivery_delay(1000), Duration::from_secs(5));
    }

    #[test]
    fn chunks_are_valid_responses_under_the_budget() {
        let request = QueryRequest {
            id: 7,
            after: 0,
            limit: None,
            request_id: Some("r\"1".into()),
        };
        let mut writer = ChunkWriter::new(&request, 50, 600).unwrap();
        let mut chunks = Vec::new();
        for seq in 1..=50 {
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
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    }
}
