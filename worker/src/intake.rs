//! Core-NATS intake: the `logs` and `query` queue subscriptions. Each message is decoded,
//! validated, routed through the ring and queued on its shard's pipeline; bad input is answered,
//! dead-lettered, counted and logged here, and never reaches a shard.
//!
//! On shutdown the subscriptions are drained: the server stops delivering to this worker (the
//! rest of the queue group takes over) and every message already delivered is still processed.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_nats::{Message, Subject, Subscriber};
use futures::StreamExt;
use logstore_protocol::{check_key, AppendRequest, ErrorBody, Limits, QueryRequest, MSG_ID_HEADER};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::pipeline::{AppendJob, QueryJob, Work};
use crate::ring::Ring;
use crate::store::NewEntry;

/// Routes decoded requests to the shard pipelines.
pub struct Router {
    pub ring: Ring,
    pub queues: Vec<mpsc::Sender<Work>>,
    pub limits: Limits,
    pub outbox: Outbox,
    pub metrics: Metrics,
}

/// Consume both subscriptions until `cancel` fires, then drain them and process what was
/// already delivered. Returns when both are exhausted.
pub async fn run(
    mut logs: Subscriber,
    mut queries: Subscriber,
    router: Arc<Router>,
    cancel: CancellationToken,
) {
    // `biased` keeps a publisher's order: async-nats hands messages to subscriptions in the
    // order they arrived, so an append published before a query is already in `logs` when the
    // query shows up, and polling `logs` first takes it first.
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(message) = logs.next() => router.append(message).await,
            Some(message) = queries.next() => router.query(message).await,
            else => return,
        }
    }
    tracing::info!("draining NATS subscriptions");
    if let Err(e) = logs.drain().await {
        tracing::warn!(error = %e, "cannot drain the logs subscription");
    }
    if let Err(e) = queries.drain().await {
        tracing::warn!(error = %e, "cannot drain the query subscription");
    }
    loop {
        tokio::select! {
            biased;
            Some(message) = logs.next() => router.append(message).await,
            Some(message) = queries.next() => router.query(message).await,
            else => return,
        }
    }
}

impl Router {
    async fn append(&self, message: Message) {
        let received = SystemTime::now();
        let started = Instant::now();
        self.metrics.in_flight.with_label_values(&["append"]).inc();
        let request = match self.decode_append(&message) {
            Ok(request) => request,
            Err(error) => {
                self.metrics
                    .appends
                    .with_label_values(&["none", "rejected"])
                    .inc();
                self.reject(message, error).await;
                self.metrics.in_flight.with_label_values(&["append"]).dec();
                return;
            }
        };
        let shard = self.ring.shard_of(request.id);
        let job = AppendJob {
            entry: NewEntry {
                id: request.id,
                key: request.key,
                log: request.log,
                received,
            },
            reply: message.reply,
            started,
        };
        if self.queues[shard].send(Work::Append(job)).await.is_err() {
            // Pipelines outlive intake by construction; reaching this is a bug worth shouting about.
            tracing::error!(shard, "shard pipeline is gone; append dropped");
        }
    }

    async fn query(&self, message: Message) {
        let started = Instant::now();
        self.metrics.in_flight.with_label_values(&["query"]).inc();
        let request = match QueryRequest::decode(&message.payload) {
            Ok(request) => request,
            Err(error) => {
                self.metrics.queries.with_label_values(&["rejected"]).inc();
                self.reject(message, error).await;
                self.metrics.in_flight.with_label_values(&["query"]).dec();
                return;
            }
        };
        let shard = self.ring.shard_of(request.id);
        let job = QueryJob {
            request,
            reply: message.reply,
            started,
        };
        if self.queues[shard].send(Work::Query(job)).await.is_err() {
            tracing::error!(shard, "shard pipeline is gone; query dropped");
        }
    }

    fn decode_append(&self, message: &Message) -> Result<AppendRequest, ErrorBody> {
        let mut request = AppendRequest::decode(&message.payload, &self.limits)?;
        if request.key.is_none() {
            let header_key = message
                .headers
                .as_ref()
                .and_then(|h| h.get(MSG_ID_HEADER))
                .map(|v| v.as_str().to_string());
            if let Some(key) = header_key {
                check_key(&key, &self.limits)?;
                request.key = Some(key);
            }
        }
        Ok(request)
    }

    async fn reject(&self, message: Message, error: ErrorBody) {
        tracing::warn!(
            subject = %message.subject,
            code = error.code.as_str(),
            reason = %error.message,
            bytes = message.payload.len(),
            "rejected message"
        );
        let reply: Option<&Subject> = message.reply.as_ref();
        self.outbox.error_reply(reply, &error).await;
        self.outbox
            .dead_letter(&message.subject, message.payload, &error)
            .await;
    }
}
