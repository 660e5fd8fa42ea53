//! A message's fate, in one place: where an append came from decides how it is settled once its
//! outcome is known (reply, event, JetStream ack / nak / term, dead letter), and the in-flight
//! gauge is released exactly once, whatever path the message took (an [`InFlight`] guard).

use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::Subject;
use bytes::Bytes;
use logstore_protocol::{AppendReply, AppendRequest, ErrorBody, ErrorCode};
use prometheus::IntGauge;
use tokio::time::Instant;

use crate::metrics::ShardMetrics;
use crate::outbox::{format_ts, Outbox};
use crate::store::{NewEntry, StoreError, Stored};

/// Holds one unit of `logstore_in_flight{kind}` and gives it back when dropped, so no path
/// (answered, failed, shed, dropped at shutdown) can leave the gauge raised.
pub struct InFlight(IntGauge);

impl InFlight {
    pub fn new(gauge: &IntGauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
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

/// An append on its way to its shard.
pub struct AppendJob {
    pub entry: NewEntry,
    pub origin: Origin,
    pub started: std::time::Instant,
    /// When its answer is due (receipt + SHARD_TIMEOUT_MS): the batch it rides in is given up
    /// by then, and a job still queued by then is answered `unavailable` without being sent.
    pub deadline: Instant,
    pub in_flight: InFlight,
}

/// What settling needs besides the job.
#[derive(Clone)]
pub struct Settler {
    pub outbox: Outbox,
    /// JetStream deliveries of a failing message before it is dead-lettered (outages excepted).
    pub max_deliver: i64,
}

impl Settler {
    /// The append is stored (or was already): answer, publish the event, ack.
    pub async fn stored(&self, job: AppendJob, stored: Stored, m: &ShardMetrics) {
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
            Origin::Core { reply, .. } => self.outbox.append_done(reply.as_ref(), &body).await,
            Origin::JetStream(message) => {
                // Event first, then ack: a crash in between redelivers the message, which then
                // answers as a duplicate and publishes the event again.
                self.outbox.append_done(None, &body).await;
                if let Err(e) = message.ack().await {
                    tracing::warn!(error = %e, "JetStream ack failed; the message will be redelivered");
                }
            }
        }
        observe(&job, m);
    }

    /// The append failed with a store error.
    pub async fn store_failed(&self, job: AppendJob, e: &StoreError, m: &ShardMetrics) {
        self.failed(job, store_error_body(e), m).await
    }

    /// The append was not stored (or, for [`ErrorCode::Timeout`], may have been): tell whoever
    /// can act on it.
    pub async fn failed(&self, job: AppendJob, error: ErrorBody, m: &ShardMetrics) {
        if error.code == ErrorCode::Timeout {
            m.timeout.inc();
        } else {
            m.failed.inc();
        }
        match &job.origin {
            Origin::Core {
                reply: Some(reply), ..
            } => self.outbox.error_reply(Some(reply), &error).await,
            // No reply subject and an unknown outcome: a dead letter would claim it failed,
            // and it may be stored. The worker log and the `timeout` counter say it instead.
            Origin::Core { reply: None, .. } if error.code == ErrorCode::Timeout => {
                tracing::warn!(id = job.entry.id, key = ?job.entry.key, "append outcome unknown (no reply subject to tell)");
            }
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
                    Ok(body) => self.outbox.dead_letter(subject, body.into(), &error).await,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode a failed append for dead_letter")
                    }
                }
            }
            Origin::JetStream(message) => self.failed_delivery(message, &error).await,
        }
        observe(&job, m);
    }

    /// A JetStream delivery that could not be stored. Outages, load shedding and unknown
    /// outcomes never dead-letter: the message waits (nak with backoff) and its redelivery is
    /// deduplicated by its key. Anything else is retried `max_deliver` times, then copied to
    /// the dead-letter subject and terminated so it stops holding a slot.
    async fn failed_delivery(&self, message: &async_nats::jetstream::Message, error: &ErrorBody) {
        let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
        let transient = matches!(
            error.code,
            ErrorCode::Unavailable | ErrorCode::Busy | ErrorCode::Timeout
        );
        let result = if !transient && delivered >= self.max_deliver {
            tracing::error!(delivered, reason = %error.message, "giving up on a message: dead-lettered");
            self.outbox
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

    /// Bad input: answer it (core, with a reply subject), copy it to the dead-letter subject,
    /// log it. A JetStream message that can never be valid is terminated: redelivery cannot help.
    pub async fn rejected(
        &self,
        subject: &Subject,
        payload: Bytes,
        origin: &Origin,
        error: ErrorBody,
    ) {
        tracing::warn!(
            %subject,
            code = error.code.as_str(),
            reason = %error.message,
            bytes = payload.len(),
            "rejected message"
        );
        if let Origin::Core { reply, .. } = origin {
            self.outbox.error_reply(reply.as_ref(), &error).await;
        }
        self.outbox.dead_letter(subject, payload, &error).await;
        if let Origin::JetStream(message) = origin {
            if let Err(e) = message.ack_with(AckKind::Term).await {
                tracing::warn!(error = %e, "cannot terminate a rejected JetStream message");
            }
        }
    }
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

/// The error a client sees for a store failure. Outages say `unavailable` (nothing stored;
/// retry with the same key), an unknown outcome says `timeout` (retry with the same key, which
/// answers as a duplicate if it was stored); anything else is `internal`, with the detail in
/// the worker's log rather than the reply.
pub fn store_error_body(e: &StoreError) -> ErrorBody {
    if e.is_outcome_unknown() {
        ErrorBody::new(ErrorCode::Timeout, e.to_string())
    } else if e.is_unavailable() {
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
