//! Talking to the workers over NATS: one append attempt (core request-reply or JetStream
//! publish) and one query (every chunk of its answer). Retrying is the caller's decision,
//! helped by [`AttemptError::is_retryable`].

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::{Client, HeaderMap, RequestErrorKind, Subject};
use bytes::Bytes;
use logstore_protocol::client::{read_answer, AnswerError};
use logstore_protocol::{
    AppendReply, BatchReply, EntryResult, ErrorBody, ErrorCode, ErrorReply, QueryResponse,
    MSG_ID_HEADER,
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
    /// A core request answered by a JetStream stream's PubAck: the stream captures the append
    /// subject, so the workers run JetStream intake and nothing here says "stored".
    #[error(
        "a JetStream PubAck (stream {0}): the logs subject is captured by a stream, so the \
         workers use JetStream intake; run loadgen with --jetstream"
    )]
    JetStreamAck(String),
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
            AttemptError::Refused(_)
            | AttemptError::BadReply(_)
            | AttemptError::JetStreamAck(_) => false,
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
            AttemptError::JetStreamAck(_) => "jetstream_ack",
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
    /// JetStream: the stream sequence the PubAck named (for a duplicate, the first copy's), so
    /// that a lost append can be looked for in the stream and in the workers' trace logs.
    pub stream_seq: Option<u64>,
}

/// One entry as it goes on the wire: [`logstore_protocol::AppendRequest`]'s form, borrowed so a
/// batch body is encoded without copying every log.
#[derive(serde::Serialize)]
struct WireEntry<'a> {
    id: u64,
    log: &'a str,
    key: &'a str,
}

impl<'a> From<&'a Append> for WireEntry<'a> {
    fn from(append: &'a Append) -> Self {
        WireEntry {
            id: append.id,
            log: &append.log,
            key: &append.key,
        }
    }
}

/// The wire body of a message, built once and resent unchanged on every retry of the same
/// entries: with `as_array` a JSON array of `appends` (a batch append, even of one entry, so
/// every reply of a batch run has the same form), otherwise the single object of `appends[0]`
/// (the original's form).
pub fn message_body(appends: &[Append], as_array: bool) -> Result<Bytes, AttemptError> {
    let encoded = match appends {
        [single] if !as_array => serde_json::to_vec(&WireEntry::from(single)),
        _ => serde_json::to_vec(&appends.iter().map(WireEntry::from).collect::<Vec<_>>()),
    };
    encoded
        .map(Bytes::from)
        .map_err(|e| AttemptError::BadReply(format!("cannot encode the append: {e}")))
}

/// The `Nats-Msg-Id` of a message: a single append's key, or for a batch its first key and
/// entry count. Unique per run (batches never overlap) and unchanged on a retry, so the stream
/// drops a re-published batch within its duplicate window.
pub fn message_id(appends: &[Append], as_array: bool) -> String {
    match appends {
        [single] if !as_array => single.key.clone(),
        [first, ..] => format!("{}+{}", first.key, appends.len()),
        [] => String::new(),
    }
}

/// Each entry's outcome in a core reply, in the order the message carried them.
pub type EntryOutcomes = Vec<Result<Receipt, AttemptError>>;

/// One core request-reply message. Acknowledged = the worker's success reply, which it sends
/// only after the Postgres commit. `Ok` holds each entry's outcome (a batch reply answers every
/// entry on its own); `Err` is an outcome of the whole message (no answer, or an error reply
/// for all of it).
pub async fn append_core(
    client: &Client,
    subject: &Subject,
    appends: &[Append],
    as_array: bool,
    body: Bytes,
    timeout: Duration,
) -> Result<EntryOutcomes, AttemptError> {
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
    decode_core_reply(&message.payload, appends, as_array)
}

/// A worker's answer to a core message: each entry's outcome, or the whole message's error.
/// Checks the reply is about the entries sent (count and object ids), so a wrong answer is
/// never taken for an acknowledgement.
pub fn decode_core_reply(
    payload: &[u8],
    appends: &[Append],
    as_array: bool,
) -> Result<EntryOutcomes, AttemptError> {
    if !as_array {
        let [append] = appends else {
            return Err(AttemptError::BadReply(format!(
                "a single-object body carries one append, not {}",
                appends.len()
            )));
        };
        return Ok(vec![Ok(stored_receipt(
            append,
            decode_append_reply(payload)?,
        )?)]);
    }
    let batch = match serde_json::from_slice::<BatchReply>(payload) {
        Ok(batch) => batch,
        // Not a batch reply: a whole-message error (or PubAck) says so; anything else is wrong.
        Err(_) => {
            return Err(decode_append_reply(payload).map_or_else(
                |e| e,
                |single| {
                    AttemptError::BadReply(format!(
                        "a batch of {} entries answered with a single reply for object {}",
                        appends.len(),
                        single.id
                    ))
                },
            ))
        }
    };
    if batch.results.len() != appends.len() {
        return Err(AttemptError::BadReply(format!(
            "a batch of {} entries answered with {} results",
            appends.len(),
            batch.results.len()
        )));
    }
    let mut outcomes = Vec::with_capacity(appends.len());
    for (append, result) in appends.iter().zip(batch.results) {
        outcomes.push(match result {
            // A result for another object makes the whole reply untrustworthy: fail the message.
            EntryResult::Stored(reply) => Ok(stored_receipt(append, reply)?),
            EntryResult::Failed { id, .. } if id != append.id => {
                return Err(wrong_object(append.id, id))
            }
            EntryResult::Failed { error, .. } => Err(AttemptError::Rejected(error)),
        });
    }
    Ok(outcomes)
}

/// The receipt of a stored entry, after checking the reply is for the entry's object.
fn stored_receipt(append: &Append, reply: AppendReply) -> Result<Receipt, AttemptError> {
    if append.id != reply.id {
        return Err(wrong_object(append.id, reply.id));
    }
    Ok(Receipt {
        seq: Some(reply.seq),
        ts: Some(reply.ts),
        duplicate: reply.duplicate,
        stream_seq: None,
    })
}

fn wrong_object(sent: u64, answered: u64) -> AttemptError {
    AttemptError::BadReply(format!(
        "append to object {sent} answered for object {answered}"
    ))
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
        return Err(AttemptError::JetStreamAck(ack.stream));
    }
    Err(AttemptError::BadReply(
        String::from_utf8_lossy(payload).into_owned(),
    ))
}

/// One JetStream publish with `Nats-Msg-Id` = `msg_id`. Acknowledged = the stream's PubAck,
/// for every entry of the message at once (they are in the stream; a worker stores them
/// later). A retry with the same id is dropped by the stream's duplicate window, and by the
/// entries' keys in the database after that.
pub async fn append_jetstream(
    js: &async_nats::jetstream::Context,
    subject: &Subject,
    msg_id: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<Receipt, AttemptError> {
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID_HEADER, msg_id);
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
            stream_seq: Some(ack.sequence),
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
    read_answer(&mut replies, timeout)
        .await
        .map_err(|e| match e {
            AnswerError::TimedOut { .. } => AttemptError::TimedOut(timeout),
            AnswerError::Closed => {
                AttemptError::Nats("the reply subscription closed (disconnected?)".into())
            }
            AnswerError::NoResponders => AttemptError::NoResponders(subject.to_string()),
            AnswerError::Refused { error, .. } => AttemptError::Rejected(error),
            AnswerError::Undecodable { payload, .. } => {
                AttemptError::BadReply(String::from_utf8_lossy(&payload).into_owned())
            }
            AnswerError::OutOfOrder { got, expected } => AttemptError::BadReply(format!(
                "query answer chunk {got} arrived where chunk {expected} was expected"
            )),
        })
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
        assert!(matches!(err, AttemptError::JetStreamAck(ref s) if s == "LOGS"));
        assert!(!err.is_retryable());
        let err = decode_append_reply(b"nonsense").unwrap_err();
        assert_eq!(err.kind(), "bad_reply");
        assert!(!err.is_retryable());
    }

    fn appends(ids: &[u64]) -> Vec<Append> {
        ids.iter()
            .enumerate()
            .map(|(n, &id)| Append {
                n: n as u64,
                id,
                key: format!("lgrun-{n}"),
                log: format!("lgrun-{n} pad"),
            })
            .collect()
    }

    #[test]
    fn a_single_append_keeps_the_originals_body_and_a_batch_is_an_array() {
        let one = appends(&[7]);
        assert_eq!(
            message_body(&one, false).unwrap(),
            Bytes::from_static(br#"{"id":7,"log":"lgrun-0 pad","key":"lgrun-0"}"#)
        );
        assert_eq!(message_id(&one, false), "lgrun-0");
        // In a batch run even a one-entry remainder is an array, answered like every batch.
        assert_eq!(
            message_body(&one, true).unwrap(),
            Bytes::from_static(br#"[{"id":7,"log":"lgrun-0 pad","key":"lgrun-0"}]"#)
        );
        let three = appends(&[7, 8, 7]);
        let body = message_body(&three, true).unwrap();
        // The workers' own decoder takes it as a batch, in order, each entry with its key.
        let decoded = logstore_protocol::AppendBody::decode(
            &body,
            &logstore_protocol::Limits::default(),
            logstore_protocol::DEFAULT_MAX_BATCH_ENTRIES,
        )
        .unwrap();
        let logstore_protocol::AppendBody::Batch(entries) = decoded else {
            panic!("expected a batch: {decoded:?}")
        };
        let got: Vec<(u64, Option<&str>, &str)> = entries
            .iter()
            .map(|e| (e.id, e.key.as_deref(), e.log.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (7, Some("lgrun-0"), "lgrun-0 pad"),
                (8, Some("lgrun-1"), "lgrun-1 pad"),
                (7, Some("lgrun-2"), "lgrun-2 pad"),
            ]
        );
        // The batch's stream-dedupe id: its first key and size, distinct from any single key.
        assert_eq!(message_id(&three, true), "lgrun-0+3");
        assert_eq!(message_id(&three[1..], true), "lgrun-1+2");
    }

    #[test]
    fn a_batch_reply_answers_each_entry_in_order() {
        let sent = appends(&[7, 8, 9]);
        let reply = br#"{"results":[
            {"id":7,"seq":1,"ts":"2026-11-22T09:16:27.000001Z","duplicate":false},
            {"id":8,"error":{"code":"unavailable","message":"shard down"}},
            {"id":9,"seq":4,"ts":"2026-11-22T09:16:27.000002Z","duplicate":true}]}"#;
        let outcomes = decode_core_reply(reply, &sent, true).unwrap();
        assert_eq!(outcomes.len(), 3);
        assert_eq!(
            outcomes[0].as_ref().unwrap(),
            &Receipt {
                seq: Some(1),
                ts: Some("2026-11-22T09:16:27.000001Z".into()),
                duplicate: false,
                stream_seq: None,
            }
        );
        let err = outcomes[1].as_ref().unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert_eq!(err.kind(), "unavailable");
        assert!(outcomes[2].as_ref().unwrap().duplicate);

        // Per-entry codes a client retries, and one it must not.
        for (code, retry) in [
            ("busy", true),
            ("timeout", true),
            ("internal", true),
            ("too_large", false),
        ] {
            let reply =
                format!(r#"{{"results":[{{"id":7,"error":{{"code":"{code}","message":"m"}}}}]}}"#);
            let outcomes = decode_core_reply(reply.as_bytes(), &sent[..1], true).unwrap();
            assert_eq!(
                outcomes[0].as_ref().unwrap_err().is_retryable(),
                retry,
                "{code}"
            );
        }
    }

    #[test]
    fn a_batch_reply_that_is_not_about_the_sent_entries_acknowledges_nothing() {
        let sent = appends(&[7, 8]);
        let ok = |id: u64, seq: u64| {
            format!(
                r#"{{"id":{id},"seq":{seq},"ts":"2026-11-22T09:16:27.000001Z","duplicate":false}}"#
            )
        };
        let cases = [
            // Too few results.
            format!(r#"{{"results":[{}]}}"#, ok(7, 1)),
            // A result for another object, stored or failed.
            format!(r#"{{"results":[{},{}]}}"#, ok(7, 1), ok(9, 1)),
            format!(
                r#"{{"results":[{},{{"id":9,"error":{{"code":"busy","message":"m"}}}}]}}"#,
                ok(7, 1)
            ),
            // A single reply to a batch.
            ok(7, 1),
        ];
        for reply in cases {
            let err = decode_core_reply(reply.as_bytes(), &sent, true).unwrap_err();
            assert_eq!(err.kind(), "bad_reply", "{reply}: {err}");
            assert!(!err.is_retryable());
        }
        // A whole-message error reply fails every entry alike; a PubAck is the intake mismatch.
        let err = decode_core_reply(
            br#"{"error":{"code":"invalid_request","message":"expected a JSON object, got an array"}}"#,
            &sent,
            true,
        )
        .unwrap_err();
        assert_eq!(err.kind(), "invalid_request");
        let err = decode_core_reply(br#"{"stream":"LOGS","seq":3}"#, &sent, true).unwrap_err();
        assert!(matches!(err, AttemptError::JetStreamAck(_)), "{err}");
        // A single append answered for the wrong object.
        let err = decode_core_reply(ok(8, 1).as_bytes(), &sent[..1], false).unwrap_err();
        assert!(err.to_string().contains("answered for object 8"), "{err}");
    }
}
