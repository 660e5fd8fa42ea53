//! Everything the worker sends to NATS: append replies, `appended.<id>` and `rejected.<id>`
//! events, query response chunks, error replies and dead-letter copies. The end of the data
//! flow.

use std::time::SystemTime;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use logstore_protocol::{
    AppendReply, ErrorBody, ErrorReply, RejectedEvent, DEAD_LETTER_CODE_HEADER,
    DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SUBJECT_HEADER, DEAD_LETTER_TRUNCATED_HEADER,
    SERVICE_ERROR_CODE_HEADER, SERVICE_ERROR_HEADER,
};

use crate::metrics::Metrics;

/// The NATS side of answering. Cloning is cheap.
#[derive(Clone)]
pub struct Outbox {
    client: async_nats::Client,
    events_prefix: String,
    rejected_prefix: String,
    dead_letter_subject: Subject,
    response_subject: Subject,
    metrics: Metrics,
}

/// Format a timestamp as the contract's RFC 3339 UTC with six fractional digits and `Z`.
pub fn format_ts(ts: SystemTime) -> String {
    humantime::format_rfc3339_micros(ts).to_string()
}

impl Outbox {
    pub fn new(
        client: async_nats::Client,
        events_prefix: &str,
        rejected_prefix: &str,
        dead_letter_subject: &str,
        response_subject: &str,
        metrics: Metrics,
    ) -> Outbox {
        Outbox {
            client,
            events_prefix: events_prefix.to_string(),
            rejected_prefix: rejected_prefix.to_string(),
            dead_letter_subject: Subject::from(dead_letter_subject),
            response_subject: Subject::from(response_subject),
            metrics,
        }
    }

    /// Largest message the server accepts (its `max_payload`), for chunking query answers.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Where a query's answer goes: its reply subject, else the configured response subject.
    pub fn response_subject(&self, reply: Option<Subject>) -> Subject {
        reply.unwrap_or_else(|| self.response_subject.clone())
    }

    /// Answer a stored (or duplicate) append and publish its event. The event carries the
    /// append's key; the reply, to the sender who chose it, does not (it is as before keys
    /// were echoed).
    pub async fn append_done(&self, reply: Option<&Subject>, body: &AppendReply) {
        if let Some(reply) = reply {
            let answer = AppendReply {
                key: None,
                ..body.clone()
            };
            match serde_json::to_vec(&answer) {
                Ok(payload) => {
                    self.publish(reply.clone(), None, payload.into()).await;
                }
                Err(e) => tracing::error!(error = %e, "cannot encode append reply"),
            }
        }
        let payload = match serde_json::to_vec(body) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode append event");
                return;
            }
        };
        let event = format!("{}.{}", self.events_prefix, body.id);
        self.publish(Subject::from(event), None, payload).await;
    }

    /// Publish the `rejected.<id>` event of an append refused for good.
    pub async fn append_rejected(&self, body: &RejectedEvent) {
        let payload = match serde_json::to_vec(body) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode rejected event");
                return;
            }
        };
        let event = format!("{}.{}", self.rejected_prefix, body.id);
        self.publish(Subject::from(event), None, payload).await;
    }

    /// Send a ready-made reply body.
    pub async fn reply(&self, reply: &Subject, body: Bytes) {
        self.publish(reply.clone(), None, body).await;
    }

    /// Send an error reply (with the NATS micro error headers) when the request has a reply subject.
    pub async fn error_reply(&self, reply: Option<&Subject>, error: &ErrorBody) {
        let Some(reply) = reply else { return };
        let body = ErrorReply {
            error: error.clone(),
        };
        let payload = match serde_json::to_vec(&body) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode error reply");
                return;
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(SERVICE_ERROR_HEADER, header_text(&error.message).as_str());
        headers.insert(
            SERVICE_ERROR_CODE_HEADER,
            error.code.status().to_string().as_str(),
        );
        self.publish(reply.clone(), Some(headers), payload).await;
    }

    /// Copy a rejected message, byte for byte, to the dead-letter subject with the reason in
    /// headers. A copy that would not fit in one message (the rejected message was itself near
    /// max_payload) keeps its first bytes and says so in `Logstore-Truncated` (the original
    /// size), so the reason always arrives. Counted once published.
    pub async fn dead_letter(
        &self,
        subject: &Subject,
        raw: Bytes,
        error: &ErrorBody,
        extra: &[(&str, String)],
    ) {
        let mut headers = HeaderMap::new();
        for (name, value) in extra {
            headers.insert(*name, header_text(value).as_str());
        }
        headers.insert(DEAD_LETTER_CODE_HEADER, error.code.as_str());
        headers.insert(
            DEAD_LETTER_REASON_HEADER,
            header_text(&error.message).as_str(),
        );
        headers.insert(DEAD_LETTER_SUBJECT_HEADER, subject.as_str());
        let room = self
            .max_payload()
            .saturating_sub(header_bytes(&headers) + DEAD_LETTER_HEADROOM);
        let raw = if raw.len() > room {
            headers.insert(DEAD_LETTER_TRUNCATED_HEADER, raw.len().to_string().as_str());
            raw.slice(..room)
        } else {
            raw
        };
        if self
            .publish(self.dead_letter_subject.clone(), Some(headers), raw)
            .await
        {
            self.metrics
                .dead_letters
                .with_label_values(&[error.code.as_str()])
                .inc();
        }
    }

    /// Publish one query response chunk.
    pub async fn response(&self, subject: &Subject, payload: Vec<u8>) {
        self.publish(subject.clone(), None, Bytes::from(payload))
            .await;
    }

    /// Make sure everything published so far reached the server; false if that failed.
    pub async fn flush(&self) -> bool {
        match self.client.flush().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "NATS flush failed");
                false
            }
        }
    }

    /// Publish; false (and a log line) when the client refused it.
    async fn publish(&self, subject: Subject, headers: Option<HeaderMap>, payload: Bytes) -> bool {
        let result = match headers {
            Some(headers) => {
                self.client
                    .publish_with_headers(subject.clone(), headers, payload)
                    .await
            }
            None => self.client.publish(subject.clone(), payload).await,
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                // The client buffers across reconnects; this fails only when it is closed or
                // the message is over max_payload.
                tracing::warn!(%subject, error = %e, "NATS publish failed");
                false
            }
        }
    }
}

/// Room left for the `HPUB` framing beyond the header block itself.
const DEAD_LETTER_HEADROOM: usize = 64;

/// Bytes of a header block on the wire: `NATS/1.0\r\n`, `Name: value\r\n` per value, `\r\n`.
fn header_bytes(headers: &HeaderMap) -> usize {
    let mut bytes = "NATS/1.0\r\n\r\n".len();
    for (name, values) in headers.iter() {
        for value in values {
            let name: &str = name.as_ref();
            bytes += name.len() + 2 + value.as_str().len() + 2;
        }
    }
    bytes
}

/// Header values are one line of visible text: fold anything else so a hostile message cannot
/// break the header block.
fn header_text(text: &str) -> String {
    let folded: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    folded.chars().take(512).collect()
}
