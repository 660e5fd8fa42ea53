//! Talking to the workers over NATS: one append attempt (core request-reply or JetStream
//! publish) and one query (every chunk of its answer). Retrying is the caller's decision,
//! helped by [`AttemptError::is_retryable`].

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::{Client, HeaderMap, RequestErrorKind, StatusCode, Subject};
use bytes::Bytes;
use futures::StreamExt;
use logstore_protocol::{
    AppendReply, AppendRequest, ErrorBody, ErrorCode, ErrorReply, QueryResponse, MSG_ID_HEADER,
};

use crate::workload::Append;

/// Why one attempt got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("no responders on {0} (no worker subscribed)")]
    NoResponders(String),
    #[error("no JetStream stream captures {0} (the workers create it at start)")]
    NoStream(String),
    /// The worker answered with an error reply.
    #[error("worker error {0}")]
    Rejected(ErrorBody),
    /// A NATS failure that may pass (disconnect, broken pipe, ...).
    #[error("NATS: {0}")]
    Nats(#[source] async_nats::Error),
    /// A NATS failure that will not pass by retrying (payload over max_payload, bad subject).
    #[error("NATS refused the message: {0}")]
    Refused(#[source] async_nats::Error),
    /// An answer that is not what the protocol promises.
    #[error("unexpected answer: {0}")]
    BadReply(String),
}

impl AttemptError {
    /// Whether sending the same message again (same idempotency key) may succeed. Safe to
    /// retry for appends because the key makes a repeat harmless.
    pub fn is_retryable(&self) -> bool {
        match self {
            AttemptError::TimedOut(_)
            | AttemptError::NoResponders(_)
            | AttemptError::NoStream(_)
            | AttemptError::Nats(_) => true,
            AttemptError::Rejected(body) => {
                matches!(
                    body.code,
                    ErrorCode::Unavailable
                        | ErrorCode::Busy
                        | ErrorCode::Timeout
                        | ErrorCode::Internal
                )
            }
            AttemptError::Refused(_) | AttemptError::BadReply(_) => false,
        }
    }

    /// A short label for counting errors by kind in the summary.
    pub fn kind(&self) -> &'static str {
        match self {
            AttemptError::TimedOut(_) => "timeout",
            AttemptError::NoResponders(_) => "no_responders",
            AttemptError::NoStream(_) => "no_stream",
            AttemptError::Rejected(body) => body.code.as_str(),
            AttemptError::Nats(_) => "nats",
            AttemptError::Refused(_) => "refused",
            AttemptError::BadReply(_) => "bad_reply",
        }
    }
}

/// What acknowledged an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The entry's seq (core mode: from the worker's reply; JetStream: unknown until stored).
    pub seq: Option<u64>,
    pub ts: Option<String>,
    /// The key had been seen before: an earlier attempt got through without us hearing back.
    pub duplicate: bool,
}

/// The wire body of an append, built once and resent unchanged on every retry.
pub fn append_body(append: &Append) -> Result<Bytes, AttemptError> {
    let request = AppendRequest {
        id: append.id,
        log: append.log.clone(),
        key: Some(append.key.clone()),
        expected_seq: None,
    };
    serde_json::to_vec(&request)
        .map(Bytes::from)
        .map_err(|e| AttemptError::BadReply(format!("cannot encode the append: {e}")))
}

/// One core request-reply append. Acknowledged = the worker's success reply, which it sends
/// only after the Postgres commit.
pub async fn append_core(
    client: &Client,
    subject: &Subject,
    append: &Append,
    body: Bytes,
    timeout: Duration,
) -> Result<Receipt, AttemptError> {
    let request = async_nats::Request::new()
        .payload(body)
        .timeout(Some(timeout));
    // The outer bound also covers a client whose outgoing buffer is full while disconnected.
    let message = match tokio::time::timeout(
        timeout + Duration::from_millis(500),
        client.send_request(subject.clone(), request),
    )
    .await
    {
        Err(_) => return Err(AttemptError::TimedOut(timeout)),
        Ok(Ok(message)) => message,
        Ok(Err(e)) => {
            return Err(match e.kind() {
                RequestErrorKind::TimedOut => AttemptError::TimedOut(timeout),
                RequestErrorKind::NoResponders => AttemptError::NoResponders(subject.to_string()),
                RequestErrorKind::InvalidSubject | RequestErrorKind::MaxPayloadExceeded => {
                    AttemptError::Refused(Box::new(e))
                }
                _ => AttemptError::Nats(Box::new(e)),
            })
        }
    };
    let reply = decode_append_reply(&message.payload)?;
    if reply.id != append.id {
        return Err(AttemptError::BadReply(format!(
            "append to object {} answered for object {}",
            append.id, reply.id
        )));
    }
    Ok(Receipt {
        seq: Some(reply.seq),
        ts: Some(reply.ts),
        duplicate: reply.duplicate,
    })
}

/// A worker's answer to an append: the reply, or its error reply as an error.
fn decode_append_reply(payload: &[u8]) -> Result<AppendReply, AttemptError> {
    if let Ok(reply) = serde_json::from_slice::<AppendReply>(payload) {
        return Ok(reply);
    }
    if let Ok(error) = serde_json::from_slice::<ErrorReply>(payload) {
        return Err(AttemptError::Rejected(error.error));
    }
    // Workers with JetStream intake: the stream captures the core request and the server
    // answers with a PubAck, which says "queued", not "stored at seq N".
    if let Ok(ack) = serde_json::from_slice::<async_nats::jetstream::publish::PublishAck>(payload) {
        return Err(AttemptError::BadReply(format!(
            "a JetStream PubAck (stream {}): the logs subject is captured by a stream, so the \
             workers use JetStream intake; run loadgen with --jetstream",
            ack.stream
        )));
    }
    Err(AttemptError::BadReply(
        String::from_utf8_lossy(payload).into_owned(),
    ))
}

/// One JetStream publish with `Nats-Msg-Id` = the key. Acknowledged = the stream's PubAck
/// (the append is in the stream; a worker stores it later). A retry with the same id is
/// dropped by the stream's duplicate window, and by the key in the database after that.
pub async fn append_jetstream(
    js: &async_nats::jetstream::Context,
    subject: &Subject,
    append: &Append,
    body: Bytes,
    timeout: Duration,
) -> Result<Receipt, AttemptError> {
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID_HEADER, append.key.as_str());
    let publish = async {
        js.publish_with_headers(subject.clone(), headers, body)
            .await?
            .await
    };
    match tokio::time::timeout(timeout + Duration::from_millis(500), publish).await {
        Err(_) => Err(AttemptError::TimedOut(timeout)),
        Ok(Ok(ack)) => Ok(Receipt {
            seq: None,
            ts: None,
            duplicate: ack.duplicate,
        }),
        Ok(Err(e)) => Err(match e.kind() {
            PublishErrorKind::TimedOut => AttemptError::TimedOut(timeout),
            PublishErrorKind::StreamNotFound => AttemptError::NoStream(subject.to_string()),
            PublishErrorKind::MaxPayloadExceeded => AttemptError::Refused(Box::new(e)),
            _ => AttemptError::Nats(Box::new(e)),
        }),
    }
}

/// Send one query and collect every chunk of its answer (until `last`). `timeout` bounds the
/// wait for each message, so a long answer streamed in many chunks is not cut short.
pub async fn query(
    client: &Client,
    subject: &Subject,
    body: Bytes,
    timeout: Duration,
) -> Result<Vec<QueryResponse>, AttemptError> {
    let inbox = client.new_inbox();
    // Subscribing before publishing on the same connection guarantees the server knows the
    // inbox before any worker answers to it.
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| AttemptError::Nats(Box::new(e)))?;
    client
        .publish_with_reply(subject.clone(), inbox, body)
        .await
        .map_err(|e| AttemptError::Nats(Box::new(e)))?;
    let mut chunks: Vec<QueryResponse> = Vec::new();
    loop {
        let message = match tokio::time::timeout(timeout, replies.next()).await {
            Err(_) => return Err(AttemptError::TimedOut(timeout)),
            Ok(None) => {
                return Err(AttemptError::Nats(
                    "the reply subscription closed (disconnected?)".into(),
                ))
            }
            Ok(Some(message)) => message,
        };
        if message.status == Some(StatusCode::NO_RESPONDERS) {
            return Err(AttemptError::NoResponders(subject.to_string()));
        }
        let chunk = match serde_json::from_slice::<QueryResponse>(&message.payload) {
            Ok(chunk) => chunk,
            Err(_) => {
                return Err(
                    match serde_json::from_slice::<ErrorReply>(&message.payload) {
                        Ok(error) => AttemptError::Rejected(error.error),
                        Err(_) => AttemptError::BadReply(
                            String::from_utf8_lossy(&message.payload).into_owned(),
                        ),
                    },
                )
            }
        };
        if chunk.chunk as usize != chunks.len() {
            return Err(AttemptError::BadReply(format!(
                "query answer chunk {} arrived where chunk {} was expected",
                chunk.chunk,
                chunks.len()
            )));
        }
        let last = chunk.last;
        chunks.push(chunk);
        if last {
            return Ok(chunks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_error_replies_decode() {
        let ok = decode_append_reply(
            br#"{"id":1,"seq":7,"ts":"2026-11-22T09:16:27.123456Z","duplicate":true}"#,
        )
        .unwrap();
        assert_eq!((ok.seq, ok.duplicate), (7, true));
        let err = decode_append_reply(br#"{"error":{"code":"unavailable","message":"down"}}"#)
            .unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.kind(), "unavailable");
        let err =
            decode_append_reply(br#"{"error":{"code":"too_large","message":"big"}}"#).unwrap_err();
        assert!(!err.is_retryable());
        let err = decode_append_reply(br#"{"stream":"LOGS","seq":2}"#).unwrap_err();
        assert!(err.to_string().contains("--jetstream"), "{err}");
        let err = decode_append_reply(b"nonsense").unwrap_err();
        assert_eq!(err.kind(), "bad_reply");
        assert!(!err.is_retryable());
    }
}
