//! Decode, validate and route: what [`Router`] does with every append and request, whichever
//! intake delivered it. Bad input is answered, dead-lettered, counted and logged here and never
//! reaches a shard.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream;
use async_nats::{HeaderMap, Message};
use logstore_protocol::{
    check_key, refused_appends, AppendBody, DeleteRequest, ErrorBody, ErrorCode, Limits,
    QueryRequest, StatsRequest, MSG_ID_HEADER,
};
use tokio_util::sync::CancellationToken;

use super::requests::RequestKind;
use crate::metrics::Metrics;
use crate::origin::{Addressee, AppendJob, BatchMessage, Held, InFlight, Origin, Settle, Settler};
use crate::pipeline::{Refused, Work};
use crate::query::{Queries, QueryJob, Request};
use crate::shards::Shards;
use crate::store::NewEntry;
use crate::unfinished::Unfinished;
use logstore_protocol::partition::partition;

/// Routes decoded requests to the shard pipelines.
pub struct Router {
    /// The shards and the ring that places objects on them (live: it follows the fleet's
    /// ring record).
    pub shards: Arc<Shards>,
    pub limits: Limits,
    /// MAX_BATCH_ENTRIES: most entries in one batch message.
    pub max_batch_entries: usize,
    pub settler: Settler,
    pub queries: Queries,
    pub metrics: Metrics,
    /// SHARD_TIMEOUT_MS: an append's answer is due this long after receipt.
    pub shard_timeout: Duration,
    /// `js:<stream>:<stream creation time in ns>`: with the stream sequence, the idempotency key
    /// of a JetStream message that carries none. The creation time keeps keys unique when the
    /// stream is deleted and re-created (its sequence restarts at 1).
    pub stream_identity: Option<String>,
    /// JS_ORDERED: JetStream appends are held (see [`AppendJob::hold`]); offering them waits
    /// for room until this token (shutdown) fires.
    pub ordered: Option<CancellationToken>,
    /// Stream sequences of the JetStream messages of the `logs` lane in this worker (each
    /// partition has its own set).
    pub held: Held,
    /// Which shard queue each object's unfinished appends wait in: a later append queues
    /// behind them there even after the ring moved the object (see [`crate::unfinished`]).
    pub unfinished: Arc<Unfinished>,
    /// The stream's partition count (0: none); with the `logs` subject, what a message on a
    /// partition's subject is checked against ([`Router::check_partition`]).
    pub partitions: u32,
    pub logs_subject: String,
    /// NATS_REPLY_PREFIXES: which reply subjects a core message may name.
    pub replies: crate::replies::ReplyPolicy,
    /// The JetStream context pull requests are made in and their messages acknowledged
    /// through (`pull.rs`).
    pub jetstream: async_nats::jetstream::Context,
}

impl Router {
    /// A message on a partition's subject must hold only what belongs there: on
    /// `<logs>.p.<k>.<id>` every entry is object `<id>`, on `<logs>.p.<k>.b` every entry's object
    /// is in partition k. Anything else is refused whole, so that a publisher with a wrong hash
    /// or a non-canonical id (`logs.042`) can never break another object's order.
    fn check_partition(&self, subject: &str, body: &AppendBody) -> Result<(), ErrorBody> {
        let Some(rest) = subject
            .strip_prefix(self.logs_subject.as_str())
            .and_then(|rest| rest.strip_prefix(".p."))
        else {
            return Ok(());
        };
        let (k, object) = rest.split_once('.').unwrap_or((rest, ""));
        let k: Option<u32> = k.parse().ok().filter(|k| *k < self.partitions);
        let ids: Vec<u64> = match body {
            AppendBody::Single(request) => vec![request.id],
            AppendBody::Batch(batch) => batch.iter().map(|entry| entry.id).collect(),
        };
        let misplaced = ids.iter().find(|&&id| match (k, object) {
            (None, _) => true,
            (Some(k), "b") => partition(id, self.partitions) != k,
            (Some(_), object) => object != id.to_string(),
        });
        match misplaced {
            None => Ok(()),
            Some(id) => Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!(
                    "object {id} does not belong on {subject} (publish an object's appends to \
                     {logs}.<id>, or a batch to {logs}.p.<k>.b with every entry in partition k \
                     of {partitions}); nothing was stored",
                    logs = self.logs_subject,
                    partitions = self.partitions,
                ),
            )),
        }
    }

    /// Whether `message`'s reply subject, if any, may be answered (NATS_REPLY_PREFIXES). One
    /// that may not is refused whole, before it is decoded: nothing is stored or answered, a
    /// dead letter says why, and `logstore_replies_refused_total{kind}` counts it.
    async fn reply_admitted(&self, kind: &str, message: &Message) -> bool {
        let Some(reply) = &message.reply else {
            return true;
        };
        if self.replies.admits(reply) {
            return true;
        }
        self.metrics
            .replies_refused
            .with_label_values(&[kind])
            .inc();
        self.metrics.error(kind, ErrorCode::InvalidRequest);
        let error = ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!(
                "reply subject {reply} is not an inbox (NATS_REPLY_PREFIXES); the request was \
                 not carried out and nothing is answered"
            ),
        );
        let origin = Origin::Core {
            reply: None,
            subject: message.subject.clone(),
        };
        let appends = match kind {
            "append" => self.addressees(&message.payload, message.headers.as_ref(), None),
            _ => Vec::new(),
        };
        self.settler
            .rejected(
                &message.subject,
                message.payload.clone(),
                &origin,
                error,
                &appends,
            )
            .await;
        false
    }

    pub(super) async fn core_append(&self, message: Message) {
        if !self.reply_admitted("append", &message).await {
            return;
        }
        let received = SystemTime::now();
        let started = Instant::now();
        let in_flight = InFlight::new(&self.metrics.appends_in_flight);
        let body = self.decode(&message.payload, message.headers.as_ref());
        let origin = Origin::Core {
            reply: message.reply,
            subject: message.subject.clone(),
        };
        match body {
            Ok((body, msg_id)) => {
                let keys = KeySource {
                    msg_id: msg_id.as_deref(),
                    identity: None,
                };
                self.route(body, keys, received, origin, started, in_flight, None)
                    .await
            }
            Err(error) => {
                self.metrics.rejected_appends.inc();
                self.metrics.error("append", error.code);
                let appends = self.addressees(&message.payload, message.headers.as_ref(), None);
                self.settler
                    .rejected(&message.subject, message.payload, &origin, error, &appends)
                    .await
            }
        }
    }

    pub(crate) async fn jetstream_append(&self, message: jetstream::Message) {
        self.jetstream_append_to(message, &self.held).await
    }

    /// A JetStream append, listed in `held` (its lane's: the `logs` lane's or a partition's)
    /// until it settles.
    pub(crate) async fn jetstream_append_to(&self, message: jetstream::Message, held: &Held) {
        let started = Instant::now();
        // Decoded from borrowed bytes before the message moves into its origin: no copy of the
        // payload per append.
        let body = self
            .decode(&message.payload, message.headers.as_ref())
            .and_then(|(body, msg_id)| {
                self.check_partition(&message.subject, &body)?;
                Ok((body, msg_id))
            });
        let (received, stream_sequence) = match message.info() {
            // ts is when the stream stored the message, so a backlog keeps its publish times.
            Ok(info) => {
                if info.delivered > 1 {
                    self.metrics.jetstream_redeliveries.inc();
                }
                (SystemTime::from(info.published), Some(info.stream_sequence))
            }
            Err(e) => {
                tracing::warn!(error = %e, "JetStream message without metadata");
                (SystemTime::now(), None)
            }
        };
        crate::origin::trace_delivery(&message, "routed");
        let in_flight = InFlight::jetstream(
            &self.metrics.appends_in_flight,
            &self.metrics.jetstream_held,
            held,
            stream_sequence,
        );
        let identity = match (&self.stream_identity, stream_sequence) {
            (Some(prefix), Some(sequence)) => Some((prefix.as_str(), sequence)),
            _ => None,
        };
        match body {
            Ok((body, msg_id)) => {
                let keys = KeySource {
                    msg_id: msg_id.as_deref(),
                    identity,
                };
                let origin = Origin::JetStream(Box::new(message));
                let hold = self.ordered.as_ref();
                self.route(body, keys, received, origin, started, in_flight, hold)
                    .await
            }
            Err(error) => {
                self.metrics.rejected_appends.inc();
                self.metrics.error("append", error.code);
                let (subject, payload) = (message.subject.clone(), message.payload.clone());
                let appends = self.addressees(&payload, message.headers.as_ref(), identity);
                let origin = Origin::JetStream(Box::new(message));
                self.settler
                    .rejected(&subject, payload, &origin, error, &appends)
                    .await
            }
        }
    }

    /// Decode a body and validate the `Nats-Msg-Id` header it may carry as its key source.
    fn decode(
        &self,
        payload: &[u8],
        headers: Option<&HeaderMap>,
    ) -> Result<(AppendBody, Option<String>), ErrorBody> {
        let body = AppendBody::decode(payload, &self.limits, self.max_batch_entries)?;
        let keyless = match &body {
            AppendBody::Single(request) => request.key.is_none(),
            AppendBody::Batch(entries) => entries.iter().any(|e| e.key.is_none()),
        };
        let msg_id = match headers.and_then(|h| h.get(MSG_ID_HEADER)) {
            // Checked only where it becomes a key, as before batches existed.
            Some(id) if keyless => {
                let id = id.as_str();
                check_key(id, &self.limits)?;
                Some(id.to_string())
            }
            _ => None,
        };
        Ok((body, msg_id))
    }

    /// Who a refused append message was for: each append its body still names (see
    /// [`refused_appends`]), with the key it would have been stored under (its `key`, else the
    /// `Nats-Msg-Id` header, else on JetStream the stream identity; `#<index>` in a batch),
    /// once per distinct object and key.
    fn addressees(
        &self,
        payload: &[u8],
        headers: Option<&HeaderMap>,
        identity: Option<(&str, u64)>,
    ) -> Vec<Addressee> {
        let keys = match headers.and_then(|h| h.get(MSG_ID_HEADER)) {
            Some(id) if check_key(id.as_str(), &self.limits).is_ok() => KeySource {
                msg_id: Some(id.as_str()),
                identity,
            },
            // A header that cannot be a key: the appends would have had none usable.
            Some(_) => KeySource {
                msg_id: None,
                identity: None,
            },
            None => KeySource {
                msg_id: None,
                identity,
            },
        };
        let mut seen = std::collections::HashSet::new();
        refused_appends(payload, &self.limits)
            .into_iter()
            .map(|append| {
                let key = append.key.or_else(|| match append.index {
                    None => keys.single(),
                    Some(index) => keys.entry(index),
                });
                (append.id, key)
            })
            .filter(|addressee| seen.insert(addressee.clone()))
            .collect()
    }

    /// Queue a valid message's appends on their shards' pipelines. With `hold` (the ordered
    /// intake's shutdown token) they are held: offered until there is room, however long that
    /// takes, and dropped unacknowledged only if shutdown comes first.
    #[allow(clippy::too_many_arguments)]
    async fn route(
        &self,
        body: AppendBody,
        keys: KeySource<'_>,
        received: SystemTime,
        origin: Origin,
        started: Instant,
        in_flight: InFlight,
        hold: Option<&CancellationToken>,
    ) {
        let deadline = tokio::time::Instant::from_std(started) + self.shard_timeout;
        let view = self.shards.view();
        // Where an append to `id` is queued: behind its object's unfinished appends, else
        // where the ring routes it now.
        let place = |id: u64| {
            let routed = view.layout.route(id).shard;
            self.unfinished
                .place(id, routed, |shard| view.lane(shard).is_some())
        };
        let entries = match body {
            AppendBody::Single(request) => {
                let key = request.key.or_else(|| keys.single());
                let (shard, pin) = place(request.id);
                let job = AppendJob {
                    entry: NewEntry {
                        id: request.id,
                        key,
                        log: request.log,
                        received,
                    },
                    expected_seq: request.expected_seq,
                    settle: Settle::Single { origin, in_flight },
                    started,
                    deadline,
                    hold: hold.is_some(),
                    moved_at: None,
                    pin,
                };
                self.enqueue(&view, &shard, Work::Append(job), hold).await;
                return;
            }
            AppendBody::Batch(entries) => entries,
        };
        let batch = BatchMessage::new(origin, entries.len(), in_flight);
        // One group per shard queue, each in array order.
        let mut groups: Vec<(Arc<str>, Vec<AppendJob>)> = Vec::new();
        for (index, request) in entries.into_iter().enumerate() {
            let key = request.key.or_else(|| keys.entry(index));
            let (shard, pin) = place(request.id);
            let group = match groups.iter().position(|(name, _)| *name == shard) {
                Some(i) => i,
                None => {
                    groups.push((shard, Vec::new()));
                    groups.len() - 1
                }
            };
            groups[group].1.push(AppendJob {
                entry: NewEntry {
                    id: request.id,
                    key,
                    log: request.log,
                    received,
                },
                expected_seq: request.expected_seq,
                settle: Settle::Entry {
                    batch: batch.clone(),
                    index,
                },
                started,
                deadline,
                hold: hold.is_some(),
                moved_at: None,
                pin,
            });
        }
        drop(batch);
        for (shard, jobs) in groups {
            self.enqueue(&view, &shard, Work::Appends(jobs), hold).await;
        }
    }

    /// Queue appends on `shard`'s pipeline: held (see [`Router::route`]) when `hold` is given,
    /// else offered, and settled as failed when the queue refuses them.
    async fn enqueue(
        &self,
        view: &crate::shards::View,
        shard: &str,
        work: Work,
        hold: Option<&CancellationToken>,
    ) {
        let Some(lane) = view.lane(shard) else {
            return self.no_lane(shard, work).await;
        };
        let queue = &lane.appends;
        if let Some(cancel) = hold {
            if queue.offer_held(work, cancel).await.is_err() {
                tracing::debug!("shutting down: held appends are left for redelivery");
            }
            return;
        }
        let Err(Refused { work, error }) = queue.offer(work).await else {
            return;
        };
        let jobs = match work {
            Work::Append(job) => vec![job],
            Work::Appends(jobs) => jobs,
            // Only appends are enqueued here.
            Work::Query(_) => return,
        };
        for job in jobs {
            self.settler
                .failed(job, error.clone(), &queue.metrics)
                .await;
        }
    }

    /// Appends for a shard this worker has no lane for (it could not open one): answered
    /// `unavailable` (nak'ed with JetStream), as for a shard that is down.
    async fn no_lane(&self, shard: &str, work: Work) {
        let jobs = match work {
            Work::Append(job) => vec![job],
            Work::Appends(jobs) => jobs,
            Work::Query(_) => return,
        };
        let metrics = self.metrics.shard(shard);
        for job in jobs {
            self.settler
                .failed(job, no_lane_error(shard), &metrics)
                .await;
        }
    }

    /// A query, stats or delete request: decoded, admitted (or answered `busy`), and queued on
    /// its object's shard behind the appends received before it.
    pub(super) async fn request(&self, kind: RequestKind, message: Message) {
        if !self.reply_admitted(kind.as_str(), &message).await {
            return;
        }
        let started = Instant::now();
        let in_flight = InFlight::new(&self.metrics.queries_in_flight);
        let decoded = match kind {
            RequestKind::Query => QueryRequest::decode(&message.payload).map(Request::Query),
            RequestKind::Stats => StatsRequest::decode(&message.payload).map(Request::Stats),
            RequestKind::Delete => DeleteRequest::decode(&message.payload).map(Request::Delete),
        };
        let request = match decoded {
            Ok(request) => request,
            Err(error) => {
                self.queries.count(kind.as_str(), "rejected");
                self.metrics.error(kind.as_str(), error.code);
                let origin = Origin::Core {
                    reply: message.reply.clone(),
                    subject: message.subject.clone(),
                };
                self.settler
                    .rejected(&message.subject, message.payload, &origin, error, &[])
                    .await;
                return;
            }
        };
        let Some(admission) = self.queries.admit() else {
            let subject = self.queries.answer_to(&request, message.reply);
            let error = ErrorBody::new(
                ErrorCode::Busy,
                "too many requests waiting on this worker (MAX_PENDING_QUERIES); retry later",
            );
            self.queries
                .outbox
                .error_reply(subject.as_ref(), &error)
                .await;
            self.queries.count(kind.as_str(), "busy");
            self.metrics.error(kind.as_str(), ErrorCode::Busy);
            return;
        };
        let view = self.shards.view();
        let shard = view.layout.route(request.id()).shard;
        let job = QueryJob {
            request,
            reply: message.reply,
            started,
            deadline: tokio::time::Instant::from_std(started) + self.queries.timeout,
            admission,
            in_flight,
        };
        let Some(lane) = view.lane(shard) else {
            let error = no_lane_error(shard);
            return self.queries.refuse(job, error).await;
        };
        let queue = &lane.queries;
        if let Err(Refused {
            work: Work::Query(job),
            error,
        }) = queue.offer(Work::Query(job)).await
        {
            self.queries.refuse(job, error).await;
        }
    }
}

/// Where the keys of a message's appends come from when an entry carries none.
struct KeySource<'a> {
    /// The `Nats-Msg-Id` header.
    msg_id: Option<&'a str>,
    /// JetStream: `js:<stream>:<created>` and the message's stream sequence.
    identity: Option<(&'a str, u64)>,
}

impl KeySource<'_> {
    /// A single append's key: the header itself, else the stream identity.
    fn single(&self) -> Option<String> {
        match (self.msg_id, self.identity) {
            (Some(id), _) => Some(id.to_string()),
            (None, Some((prefix, sequence))) => Some(format!("{prefix}:{sequence}")),
            (None, None) => None,
        }
    }

    /// Batch entry `index`'s key: the single key with `#<index>`, so a redelivered or
    /// re-published batch never doubles an entry.
    fn entry(&self, index: usize) -> Option<String> {
        self.single().map(|key| format!("{key}#{index}"))
    }
}

/// The answer for work whose shard this worker cannot reach at all.
fn no_lane_error(shard: &str) -> logstore_protocol::ErrorBody {
    logstore_protocol::ErrorBody::new(
        logstore_protocol::ErrorCode::Unavailable,
        format!("shard {shard} is not open on this worker; nothing was stored, retry later"),
    )
}
