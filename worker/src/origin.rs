//! A message's fate, in one place: where an append came from decides how it is settled once its
//! outcome is known (reply, event, JetStream ack / nak / term, dead letter), and the in-flight
//! gauge is released exactly once, whatever path the message took (an [`InFlight`] guard).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::Subject;
use bytes::Bytes;
use logstore_protocol::{
    AppendReply, AppendRequest, BatchReply, EntryResult, ErrorBody, ErrorCode, RejectedEvent,
    DEAD_LETTER_MSG_ID_HEADER, DEAD_LETTER_STREAM_HEADER, DEAD_LETTER_STREAM_SEQUENCE_HEADER,
    MSG_ID_HEADER,
};
use prometheus::IntGauge;
use tokio::time::Instant;

use crate::metrics::{Metrics, ShardMetrics};
use crate::outbox::{format_ts, Outbox};
use crate::store::{store_error_body, NewEntry, StoreError, Stored};

/// Holds one unit of `logstore_in_flight{kind}` (and, for a JetStream message,
/// `logstore_jetstream_held_messages`) and gives it back when dropped, so no path (answered,
/// failed, shed, dropped at shutdown) can leave a gauge raised.
pub struct InFlight {
    gauge: IntGauge,
    also: Option<IntGauge>,
    /// A JetStream message's stream sequence, listed in `Held` while it is in this worker.
    sequence: Option<(u64, Held)>,
}

/// Stream sequences of the JetStream messages this worker holds (received, not yet settled):
/// a redelivery of one of them is a second copy, dropped by the ordered intake.
#[derive(Clone, Default)]
pub struct Held(Arc<Mutex<std::collections::HashSet<u64>>>);

impl Held {
    pub fn contains(&self, sequence: u64) -> bool {
        self.lock().contains(&sequence)
    }

    /// The sequences held now that are at most `max`.
    pub fn up_to(&self, max: u64) -> std::collections::HashSet<u64> {
        self.lock().iter().copied().filter(|&s| s <= max).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        // A panic while holding the lock cannot leave the set half-updated.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl InFlight {
    pub fn new(gauge: &IntGauge) -> InFlight {
        gauge.inc();
        InFlight {
            gauge: gauge.clone(),
            also: None,
            sequence: None,
        }
    }

    /// A JetStream message: one unit of each gauge, and its stream sequence in `held`.
    pub fn jetstream(
        gauge: &IntGauge,
        also: &IntGauge,
        held: &Held,
        sequence: Option<u64>,
    ) -> InFlight {
        gauge.inc();
        also.inc();
        if let Some(sequence) = sequence {
            held.lock().insert(sequence);
        }
        InFlight {
            gauge: gauge.clone(),
            also: Some(also.clone()),
            sequence: sequence.map(|sequence| (sequence, held.clone())),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
        if let Some(also) = &self.also {
            also.dec();
        }
        if let Some((sequence, held)) = &self.sequence {
            held.lock().remove(sequence);
        }
    }
}

/// Acknowledge a JetStream delivery whose processing is complete (`outcome`, for the trace
/// line that lets one follow a stream sequence through the worker).
async fn ack(message: &async_nats::jetstream::Message, outcome: &'static str) {
    trace_delivery(message, outcome);
    if let Err(e) = message.ack().await {
        tracing::warn!(error = %e, "JetStream ack failed; the message will be redelivered");
    }
}

/// One trace line about a JetStream delivery (`RUST_LOG=worker::origin=trace`): its
/// stream and consumer sequences and delivery count, and what happens to it. Called several
/// times per message, so nothing is parsed unless the line is wanted.
pub fn trace_delivery(message: &async_nats::jetstream::Message, what: &'static str) {
    if !tracing::enabled!(tracing::Level::TRACE) {
        return;
    }
    if let Ok(info) = message.info() {
        tracing::trace!(
            stream_seq = info.stream_sequence,
            consumer_seq = info.consumer_sequence,
            delivered = info.delivered,
            consumer = info.consumer,
            what,
        );
    }
}

/// Where an append came from.
pub enum Origin {
    /// A core NATS message: answered on its reply subject, if it has one. Without one, a
    /// failed append is dead-lettered, because nobody else would ever learn it was not stored.
    Core {
        reply: Option<Subject>,
        subject: Subject,
    },
    /// A JetStream delivery: acknowledged after commit, nak'ed for redelivery on failure,
    /// dead-lettered and terminated once it has failed too often.
    JetStream(Box<async_nats::jetstream::Message>),
}

/// How an append's outcome reaches its sender.
pub enum Settle {
    /// The message is this one append (the original's body): settled on its own.
    Single { origin: Origin, in_flight: InFlight },
    /// Entry `index` of a batch message, settled with its siblings once all are known.
    Entry {
        batch: Arc<BatchMessage>,
        index: usize,
    },
}

/// An append as its `rejected.<id>` event names it: the object and the idempotency key it
/// would have been stored under.
pub type Addressee = (u64, Option<String>);

/// A batch entry's outcome, with its key (for its `rejected.<id>` event).
type EntryOutcome = (EntryResult, Option<String>);

/// A batch message whose entries are being stored, possibly on several shards.
pub struct BatchMessage {
    origin: Origin,
    /// One slot per entry, filled as each entry's outcome is known, with the entry's key (for
    /// its `rejected.<id>` event).
    results: Mutex<Vec<Option<EntryOutcome>>>,
    /// Entries still without an outcome; whoever brings it to zero settles the message.
    remaining: AtomicUsize,
    _in_flight: InFlight,
}

impl BatchMessage {
    pub fn new(origin: Origin, entries: usize, in_flight: InFlight) -> Arc<BatchMessage> {
        Arc::new(BatchMessage {
            origin,
            results: Mutex::new(vec![None; entries]),
            remaining: AtomicUsize::new(entries),
            _in_flight: in_flight,
        })
    }

    /// Record one entry's outcome (and its key); returns every result, in array order, once it
    /// was the last.
    fn record(
        &self,
        index: usize,
        result: EntryResult,
        key: Option<String>,
    ) -> Option<Vec<EntryOutcome>> {
        let mut results = match self.results.lock() {
            Ok(results) => results,
            // A panic elsewhere while holding the lock cannot leave a slot half-written.
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(slot) = results.get_mut(index) {
            *slot = Some((result, key));
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        Some(results.iter_mut().filter_map(Option::take).collect())
    }
}

/// An append on its way to its shard.
pub struct AppendJob {
    pub entry: NewEntry,
    /// Store only if the object's last seq is this at commit (optimistic concurrency).
    pub expected_seq: Option<u64>,
    pub settle: Settle,
    pub started: std::time::Instant,
    /// When its answer is due (receipt + SHARD_TIMEOUT_MS): the batch it rides in is given up
    /// by then, and a job still queued by then is answered `unavailable` without being sent.
    /// Not for a held job, which waits as long as its shard needs.
    pub deadline: Instant,
    /// An ordered JetStream append (JS_ORDERED): never refused, expired or nak'ed for an outage
    /// or an unknown outcome; its shard pipeline retries it in place until it commits, so no
    /// later append to its object can overtake it.
    pub hold: bool,
    /// The ring epoch at which the object's old owner answered that it moved (or never lived
    /// there): at that epoch the append goes to the new owner (see
    /// [`crate::ring::Layout::place`]).
    pub moved_at: Option<u64>,
    /// Holds its object's later appends behind it in this worker, whatever the ring says
    /// meanwhile (see [`crate::unfinished`]); released when the job is dropped.
    pub pin: crate::unfinished::Pin,
}

impl AppendJob {
    /// When its answer is due; a held job has no deadline.
    pub fn due(&self) -> Option<Instant> {
        (!self.hold).then_some(self.deadline)
    }

    /// Past its deadline at `now` (never, for a held job).
    pub fn late(&self, now: Instant) -> bool {
        self.due().is_some_and(|due| due <= now)
    }
}

/// What settling needs besides the job.
#[derive(Clone)]
pub struct Settler {
    pub outbox: Outbox,
    /// JetStream deliveries of a failing message before it is dead-lettered (outages excepted).
    pub max_deliver: i64,
    pub metrics: Metrics,
}

impl Settler {
    /// The append is stored (or was already): answer, publish the event, ack.
    pub async fn stored(&self, job: AppendJob, stored: Stored, m: &ShardMetrics) {
        if stored.duplicate {
            m.duplicate.inc();
        } else {
            m.stored.inc();
        }
        observe(&job, m);
        let body = AppendReply {
            id: job.entry.id,
            seq: stored.seq,
            ts: format_ts(stored.ts),
            duplicate: stored.duplicate,
            key: job.entry.key.clone(),
        };
        match job.settle {
            Settle::Single { origin, .. } => match &origin {
                Origin::Core { reply, .. } => self.outbox.append_done(reply.as_ref(), &body).await,
                Origin::JetStream(message) => {
                    // Event first, then ack: a crash in between redelivers the message, which
                    // then answers as a duplicate and publishes the event again.
                    self.outbox.append_done(None, &body).await;
                    ack(message, "stored").await;
                }
            },
            Settle::Entry { batch, index } => {
                self.outbox.append_done(None, &body).await;
                // The batch reply, to the sender who chose the keys, does not echo them.
                let mut body = body;
                let key = body.key.take();
                if let Some(results) = batch.record(index, EntryResult::Stored(body), key) {
                    self.batch_done(&batch, results).await;
                }
            }
        }
    }

    /// The append's `expected_seq` was not the object's last seq: nothing was stored. A
    /// definite outcome, final for this append (seqs only grow, so a retry as it is cannot
    /// succeed unless it expected a seq the object has not reached yet), so it is never
    /// dead-lettered nor redelivered: the sender learns it from its reply (core) or batch
    /// reply, and anyone from the `rejected.<id>` event; a JetStream message is acked, its
    /// processing being complete. With core intake and no reply subject the event is the only
    /// word of it (and a debug line).
    pub async fn conflict(&self, job: AppendJob, last_seq: u64, m: &ShardMetrics) {
        m.conflict.inc();
        observe(&job, m);
        let error = ErrorBody::conflict(job.expected_seq.unwrap_or_default(), last_seq);
        let AppendJob {
            entry,
            settle,
            expected_seq,
            ..
        } = job;
        match settle {
            Settle::Single { origin, .. } => {
                self.tell_rejected(&origin, &[(entry.id, entry.key)], &error)
                    .await;
                match &origin {
                    Origin::Core {
                        reply: Some(reply), ..
                    } => self.outbox.error_reply(Some(reply), &error).await,
                    Origin::Core { reply: None, .. } => {
                        tracing::debug!(
                            id = entry.id,
                            expected_seq,
                            last_seq,
                            "conditional append refused (no reply subject to tell)"
                        );
                    }
                    Origin::JetStream(message) => {
                        ack(message, "conflict").await;
                    }
                }
            }
            Settle::Entry { batch, index } => {
                let result = EntryResult::Failed {
                    id: entry.id,
                    error,
                };
                if let Some(results) = batch.record(index, result, entry.key) {
                    self.batch_done(&batch, results).await;
                }
            }
        }
    }

    /// The append failed with a store error.
    pub async fn store_failed(&self, job: AppendJob, e: &StoreError, m: &ShardMetrics) {
        self.failed(job, store_error_body(e), m).await
    }

    /// The append was not stored (or, for [`ErrorCode::Timeout`], may have been): tell whoever
    /// can act on it. Once the refusal is final (core intake: at once, but for an unknown
    /// outcome; JetStream: when the message is given up) it is also the `rejected.<id>` event.
    pub async fn failed(&self, job: AppendJob, error: ErrorBody, m: &ShardMetrics) {
        self.metrics.error("append", error.code);
        if error.code == ErrorCode::Timeout {
            m.timeout.inc();
        } else {
            m.failed.inc();
        }
        observe(&job, m);
        let origin = match &job.settle {
            Settle::Single { origin, .. } => origin,
            Settle::Entry { batch, .. } => &batch.origin,
        };
        if let Origin::Core {
            reply: None,
            subject,
        } = origin
        {
            if error.code == ErrorCode::Timeout {
                // No reply subject and an unknown outcome: a dead letter would claim it failed,
                // and it may be stored. The worker log and the `timeout` counter say it instead.
                tracing::warn!(
                    id = job.entry.id,
                    key = job.entry.key.as_deref().map(tracing::field::display),
                    "append outcome unknown (no reply subject to tell)"
                );
            } else {
                // Nobody else would ever learn that it was not stored.
                let copy = AppendRequest {
                    id: job.entry.id,
                    log: job.entry.log.clone(),
                    key: job.entry.key.clone(),
                    expected_seq: job.expected_seq,
                };
                match serde_json::to_vec(&copy) {
                    Ok(body) => {
                        self.outbox
                            .dead_letter(subject, body.into(), &error, &[])
                            .await
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode a failed append for dead_letter")
                    }
                }
            }
        }
        let AppendJob { entry, settle, .. } = job;
        match settle {
            Settle::Single { origin, .. } => {
                let addressee = [(entry.id, entry.key)];
                match &origin {
                    Origin::Core { reply, .. } => {
                        if error.code != ErrorCode::Timeout {
                            self.tell_rejected(&origin, &addressee, &error).await;
                        }
                        self.outbox.error_reply(reply.as_ref(), &error).await;
                    }
                    Origin::JetStream(message) => {
                        if self.gives_up(message, &error) {
                            self.tell_rejected(&origin, &addressee, &error).await;
                        }
                        self.failed_delivery(message, &error).await
                    }
                }
            }
            Settle::Entry { batch, index } => {
                let result = EntryResult::Failed {
                    id: entry.id,
                    error,
                };
                if let Some(results) = batch.record(index, result, entry.key) {
                    self.batch_done(&batch, results).await;
                }
            }
        }
    }

    /// Every entry of a batch message has its outcome: answer the sender once (core), or ack
    /// the message when all entries are stored (or refused by their `expected_seq`) and nak it
    /// otherwise (JetStream: the stored ones answer as duplicates when it comes back). The
    /// entries refused for good get their `rejected.<id>` events first: once per distinct
    /// object and key.
    async fn batch_done(&self, batch: &BatchMessage, results: Vec<EntryOutcome>) {
        // JetStream: the message fails as its most hopeful failure: if any entry may succeed
        // on redelivery (an outage), it is redelivered rather than dead-lettered. A conflict is
        // a final outcome like a stored entry: it neither needs nor benefits from redelivery.
        let failure = results
            .iter()
            .filter_map(|(r, _)| match r {
                EntryResult::Failed { error, .. } if error.code != ErrorCode::Conflict => {
                    Some(error)
                }
                EntryResult::Failed { .. } | EntryResult::Stored(_) => None,
            })
            .min_by_key(|e| !is_transient(e.code))
            .cloned();
        let given_up = match (&batch.origin, &failure) {
            (Origin::JetStream(message), Some(error)) => self.gives_up(message, error),
            _ => false,
        };
        let mut told = std::collections::HashSet::new();
        for (result, key) in &results {
            let EntryResult::Failed { id, error } = result else {
                continue;
            };
            let is_final = match &batch.origin {
                Origin::Core { .. } => error.code != ErrorCode::Timeout,
                Origin::JetStream(_) => error.code == ErrorCode::Conflict || given_up,
            };
            if is_final && told.insert((*id, key.clone())) {
                self.tell_rejected(&batch.origin, &[(*id, key.clone())], error)
                    .await;
            }
        }
        match &batch.origin {
            Origin::Core { reply, .. } => {
                if let Some(reply) = reply {
                    let results = results.into_iter().map(|(r, _)| r).collect();
                    match serde_json::to_vec(&BatchReply { results }) {
                        Ok(body) => self.outbox.reply(reply, body.into()).await,
                        Err(e) => tracing::error!(error = %e, "cannot encode a batch reply"),
                    }
                }
            }
            Origin::JetStream(message) => match failure {
                None => {
                    ack(message, "batch settled").await;
                }
                Some(error) => self.failed_delivery(message, &error).await,
            },
        }
    }

    /// Whether a JetStream delivery that failed with `error` is given up now (dead-lettered and
    /// terminated) rather than redelivered: see [`Settler::failed_delivery`].
    fn gives_up(&self, message: &async_nats::jetstream::Message, error: &ErrorBody) -> bool {
        let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
        !is_transient(error.code) && delivered >= self.max_deliver
    }

    /// A JetStream delivery that could not be stored. Outages, load shedding and unknown
    /// outcomes never dead-letter: the message waits (nak with backoff) and its redelivery is
    /// deduplicated by its key. Anything else is retried `max_deliver` times, then copied to
    /// the dead-letter subject and terminated so it stops holding a slot.
    async fn failed_delivery(&self, message: &async_nats::jetstream::Message, error: &ErrorBody) {
        let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
        let result = if self.gives_up(message, error) {
            tracing::error!(delivered, reason = %error.message, "giving up on a message: dead-lettered");
            self.outbox
                .dead_letter(
                    &message.subject,
                    message.payload.clone(),
                    error,
                    &jetstream_identity(message),
                )
                .await;
            trace_delivery(message, "terminated");
            message.ack_with(AckKind::Term).await
        } else {
            trace_delivery(message, "nak'ed");
            message
                .ack_with(AckKind::Nak(Some(redelivery_delay(delivered))))
                .await
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "JetStream nak/term failed; the message will be redelivered after ack_wait");
        }
    }

    /// Bad input: answer it (core, with a reply subject), publish the `rejected.<id>` event of
    /// each append it names (`appends`: none for a request, or a body naming no object), copy
    /// it to the dead-letter subject, log it. A JetStream message that can never be valid is
    /// terminated: redelivery cannot help. Its publisher got a PubAck, so the event and the
    /// dead letter carry what it can match: the stream sequence (and the dead letter the
    /// message id).
    pub async fn rejected(
        &self,
        subject: &Subject,
        payload: Bytes,
        origin: &Origin,
        error: ErrorBody,
        appends: &[Addressee],
    ) {
        tracing::warn!(
            %subject,
            code = %error.code.as_str(),
            reason = %error.message,
            bytes = payload.len(),
            "rejected message"
        );
        self.tell_rejected(origin, appends, &error).await;
        match origin {
            Origin::Core { reply, .. } => {
                self.outbox.error_reply(reply.as_ref(), &error).await;
                self.outbox.dead_letter(subject, payload, &error, &[]).await;
            }
            Origin::JetStream(message) => {
                let identity = jetstream_identity(message);
                self.outbox
                    .dead_letter(subject, payload, &error, &identity)
                    .await;
                trace_delivery(message, "rejected, terminated");
                if let Err(e) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(error = %e, "cannot terminate a rejected JetStream message");
                }
            }
        }
    }

    /// Publish the `rejected.<id>` event of each of `appends`, refused for good with `error`;
    /// from a JetStream message, with its stream sequence.
    async fn tell_rejected(&self, origin: &Origin, appends: &[Addressee], error: &ErrorBody) {
        let stream_seq = match origin {
            Origin::JetStream(message) => message.info().ok().map(|info| info.stream_sequence),
            Origin::Core { .. } => None,
        };
        for (id, key) in appends {
            let event = RejectedEvent {
                id: *id,
                key: key.clone(),
                error: error.clone(),
                stream_seq,
            };
            self.outbox.append_rejected(&event).await;
        }
    }
}

/// Outages, load shedding and unknown outcomes pass; a redelivery may succeed.
fn is_transient(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Unavailable | ErrorCode::Busy | ErrorCode::Timeout
    )
}

/// Dead-letter headers that identify a JetStream message to its publisher.
fn jetstream_identity(message: &async_nats::jetstream::Message) -> Vec<(&'static str, String)> {
    let mut identity = Vec::new();
    if let Ok(info) = message.info() {
        identity.push((DEAD_LETTER_STREAM_HEADER, info.stream.to_string()));
        identity.push((
            DEAD_LETTER_STREAM_SEQUENCE_HEADER,
            info.stream_sequence.to_string(),
        ));
    }
    if let Some(id) = message.headers.as_ref().and_then(|h| h.get(MSG_ID_HEADER)) {
        identity.push((DEAD_LETTER_MSG_ID_HEADER, id.as_str().to_string()));
    }
    identity
}

fn observe(job: &AppendJob, m: &ShardMetrics) {
    m.append_duration
        .observe(job.started.elapsed().as_secs_f64());
}

/// 100 ms, doubling per delivery, at most 5 s: quick recovery from blips, little churn during a
/// long outage.
pub fn redelivery_delay(delivered: i64) -> Duration {
    let exponent = delivered.clamp(1, 7) - 1;
    Duration::from_millis(100 << exponent).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivery_backs_off_to_five_seconds() {
        assert_eq!(redelivery_delay(1), Duration::from_millis(100));
        assert_eq!(redelivery_delay(2), Duration::from_millis(200));
        assert_eq!(redelivery_delay(6), Duration::from_millis(3200));
        assert_eq!(redelivery_delay(7), Duration::from_secs(5));
        assert_eq!(redelivery_delay(1000), Duration::from_secs(5));
    }
}
