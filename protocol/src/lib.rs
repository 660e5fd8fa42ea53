//! Wire types of logstore, shared by the worker, loadgen and anyone who talks to the system from Rust.
//!
//! Every body on NATS is UTF-8 JSON. The subjects (defaults, all configurable) are:
//! - `logs`: [`AppendRequest`] in, [`AppendReply`] out (to the reply subject, when there is one);
//! - `logs.<id>` and `logs.p.<k>.b` (JetStream intake with partitions): one object's appends,
//!   and batches of one partition's objects ([`partition`]); which lane to use, the workers say
//!   in their NATS service info ([`discover`], with the `nats` feature);
//! - `appended.<id>`: an [`AppendReply`] event after every stored append (with its `key`);
//! - `rejected.<id>`: a [`RejectedEvent`] after every append a worker refused, when the refused
//!   message names its object;
//! - `query`: [`QueryRequest`] in, one or more [`QueryResponse`] chunks out;
//! - `stats`: [`StatsRequest`] in, [`StatsReply`] out;
//! - `delete`: [`DeleteRequest`] in, [`DeleteReply`] out;
//! - `dead_letter`: a raw copy of every rejected message, with the reason in headers (kept by
//!   the workers in the JetStream stream `DEAD_LETTERS` where the server has JetStream);
//! - `logstore.status.<id>`: one worker's [`status::WorkerStatus`] (the NATS service API).
//!
//! Decoding is strict and never panics: [`AppendRequest::decode`] and [`QueryRequest::decode`]
//! turn any byte string into either a valid request or an [`ErrorBody`] that says what was wrong.

pub mod chain;
#[cfg(feature = "nats")]
pub mod client;
#[cfg(feature = "nats")]
pub mod discover;
#[cfg(feature = "nats")]
pub mod nats;
pub mod partition;
pub mod redact;
pub mod status;
pub mod timestamp;

pub use timestamp::Timestamp;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Header carrying the idempotency key when the body has no `key` (the JetStream convention).
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// NATS micro header with the error message of a failed request.
pub const SERVICE_ERROR_HEADER: &str = "Nats-Service-Error";
/// NATS micro header with the numeric error code of a failed request.
pub const SERVICE_ERROR_CODE_HEADER: &str = "Nats-Service-Error-Code";
/// Dead-letter header: the [`ErrorCode`] of the rejection.
pub const DEAD_LETTER_CODE_HEADER: &str = "Logstore-Error-Code";
/// Dead-letter header: the human-readable reason of the rejection.
pub const DEAD_LETTER_REASON_HEADER: &str = "Logstore-Error";
/// Dead-letter header: the subject the rejected message was published to.
pub const DEAD_LETTER_SUBJECT_HEADER: &str = "Logstore-Subject";
/// Dead-letter header of a rejected JetStream message: the stream it was stored in.
pub const DEAD_LETTER_STREAM_HEADER: &str = "Logstore-Stream";
/// Dead-letter header of a rejected JetStream message: its stream sequence (the `seq` of the
/// PubAck its publisher got).
pub const DEAD_LETTER_STREAM_SEQUENCE_HEADER: &str = "Logstore-Stream-Sequence";
/// Dead-letter header of a rejected message that carried a `Nats-Msg-Id`: that id. (Not copied
/// as `Nats-Msg-Id` itself, which a stream capturing dead letters would deduplicate on.)
pub const DEAD_LETTER_MSG_ID_HEADER: &str = "Logstore-Msg-Id";
/// Dead-letter header, present only when the copy had to be cut to fit the server's
/// max_payload: the rejected message's original size in bytes (the body holds its first bytes).
pub const DEAD_LETTER_TRUNCATED_HEADER: &str = "Logstore-Truncated";

/// Size limits applied while decoding. Both are configurable on the worker; the defaults are the
/// contract's (64 KiB logs, 256-byte keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted `log`, in UTF-8 bytes.
    pub max_log_bytes: usize,
    /// Largest accepted idempotency key, in UTF-8 bytes.
    pub max_key_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_log_bytes: 64 * 1024,
            max_key_bytes: 256,
        }
    }
}

/// What kind of failure an error reply reports. Serialized in snake_case on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message is malformed: fix the sender.
    InvalidRequest,
    /// A field is over its configured size limit.
    TooLarge,
    /// The shard owning the object is down; nothing was stored. Retry later (with the same
    /// idempotency key).
    Unavailable,
    /// The worker is shedding load (a queue is full); nothing was stored. Retry later.
    Busy,
    /// The outcome is unknown: the shard did not answer within the deadline after the append
    /// was sent, so it may or may not have been stored. Retry with the SAME idempotency key
    /// (the retry then answers as a duplicate if the first one was stored). For queries: the
    /// answer did not complete within its deadline.
    Timeout,
    /// A fault of the worker or the database that is not the sender's doing.
    Internal,
    /// An append's `expected_seq` was not the object's last seq when it was to be committed:
    /// nothing was stored. The error carries the object's `last_seq` at that moment.
    Conflict,
}

impl ErrorCode {
    /// The snake_case name used on the wire and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Busy => "busy",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::Conflict => "conflict",
        }
    }

    /// The numeric code for the `Nats-Service-Error-Code` header (HTTP-like, as NATS micro
    /// services conventionally use).
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest => 400,
            ErrorCode::TooLarge => 413,
            ErrorCode::Unavailable | ErrorCode::Busy => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::Internal => 500,
            ErrorCode::Conflict => 409,
        }
    }
}

/// The `error` object of an error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// With [`ErrorCode::Conflict`]: the object's last seq when the append was refused (what
    /// `expected_seq` must be for the next try). Absent from every other error, which
    /// therefore encodes exactly as before this field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            last_seq: None,
        }
    }

    /// The refusal of an append whose `expected_seq` was not the object's `last_seq`.
    pub fn conflict(expected_seq: u64, last_seq: u64) -> Self {
        ErrorBody {
            code: ErrorCode::Conflict,
            message: format!(
                "expected_seq {expected_seq} is not the object's last seq {last_seq}; nothing was stored"
            ),
            last_seq: Some(last_seq),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }
}

/// The whole body of an error reply: `{"error":{"code":"…","message":"…"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: ErrorBody,
}

/// A validated append. Built by [`AppendRequest::decode`]; serializes to the wire form, so
/// publishers in Rust can use it too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendRequest {
    pub id: u64,
    pub log: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Optimistic concurrency: store only if the object's last seq is this when the append
    /// commits (0: the object has no entries yet), else answer [`ErrorCode::Conflict`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_seq: Option<u64>,
}

impl AppendRequest {
    /// Decode and validate an append body. Unknown fields are ignored (forward compatibility);
    /// everything the contract names is checked, with a message a sender can act on.
    pub fn decode(body: &[u8], limits: &Limits) -> Result<AppendRequest, ErrorBody> {
        // Fast path: a well-formed body decodes straight into the struct, with one allocation
        // for the log. Anything it refuses goes through the slow path, which explains why.
        if let Ok(request) = serde_json::from_slice::<AppendRequest>(body) {
            check_text("log", &request.log, limits.max_log_bytes)?;
            if let Some(key) = &request.key {
                check_text("key", key, limits.max_key_bytes)?;
            }
            return Ok(request);
        }
        Self::from_object(decode_object(body)?, limits)
    }

    /// Validate one append given as a JSON object (a single body, or one entry of a batch).
    fn from_object(
        mut object: serde_json::Map<String, Value>,
        limits: &Limits,
    ) -> Result<AppendRequest, ErrorBody> {
        let id = decode_id(object.get("id"))?;
        let log = match object.remove("log") {
            Some(Value::String(log)) => log,
            Some(other) => {
                return Err(ErrorBody::invalid(format!(
                    "`log` must be a string, got {}",
                    json_type(&other)
                )))
            }
            None => return Err(ErrorBody::invalid("missing field `log`")),
        };
        check_text("log", &log, limits.max_log_bytes)?;
        let key = match object.remove("key") {
            None | Some(Value::Null) => None,
            Some(Value::String(key)) => {
                check_text("key", &key, limits.max_key_bytes)?;
                Some(key)
            }
            Some(other) => {
                return Err(ErrorBody::invalid(format!(
                    "`key` must be a string, got {}",
                    json_type(&other)
                )))
            }
        };
        let expected_seq = match object.get("expected_seq") {
            None | Some(Value::Null) => None,
            Some(value) => Some(decode_u64("expected_seq", value)?),
        };
        Ok(AppendRequest {
            id,
            log,
            key,
            expected_seq,
        })
    }
}

/// Validates a key that came from a header rather than the body (same rules as the `key` field).
pub fn check_key(key: &str, limits: &Limits) -> Result<(), ErrorBody> {
    check_text("key", key, limits.max_key_bytes)
}

/// Most entries in one batch message unless the worker is configured otherwise
/// (`MAX_BATCH_ENTRIES`).
pub const DEFAULT_MAX_BATCH_ENTRIES: usize = 1000;

/// The body of a message on the append subject: one append (the original's form, answered with
/// an [`AppendReply`]) or a JSON array of them (answered with a [`BatchReply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendBody {
    Single(AppendRequest),
    Batch(Vec<AppendRequest>),
}

impl AppendBody {
    /// Decode and validate a body. A batch is all-or-nothing: the first invalid entry rejects
    /// the whole message, and the error names its index (`entry 3: …`).
    pub fn decode(
        body: &[u8],
        limits: &Limits,
        max_entries: usize,
    ) -> Result<AppendBody, ErrorBody> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'[') {
            return AppendRequest::decode(body, limits).map(AppendBody::Single);
        }
        // Fast path: a well-formed batch decodes straight into the structs.
        let entries = match serde_json::from_slice::<Vec<AppendRequest>>(body) {
            Ok(entries) => entries,
            Err(_) => {
                let values: Vec<Value> = serde_json::from_slice(body)
                    .map_err(|e| ErrorBody::invalid(format!("invalid JSON: {e}")))?;
                if values.len() > max_entries {
                    return Err(too_many(values.len(), max_entries));
                }
                let mut entries = Vec::with_capacity(values.len());
                for (i, value) in values.into_iter().enumerate() {
                    let entry = match value {
                        Value::Object(object) => AppendRequest::from_object(object, limits),
                        other => Err(ErrorBody::invalid(format!(
                            "expected a JSON object, got {}",
                            json_type(&other)
                        ))),
                    };
                    entries.push(entry.map_err(|e| at_entry(i, e))?);
                }
                entries
            }
        };
        if entries.is_empty() {
            return Err(ErrorBody::invalid("empty batch: send at least one entry"));
        }
        if entries.len() > max_entries {
            return Err(too_many(entries.len(), max_entries));
        }
        for (i, entry) in entries.iter().enumerate() {
            check_text("log", &entry.log, limits.max_log_bytes).map_err(|e| at_entry(i, e))?;
            if let Some(key) = &entry.key {
                check_text("key", key, limits.max_key_bytes).map_err(|e| at_entry(i, e))?;
            }
        }
        Ok(AppendBody::Batch(entries))
    }
}

fn too_many(entries: usize, max_entries: usize) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::TooLarge,
        format!("batch of {entries} entries, the limit is {max_entries} (MAX_BATCH_ENTRIES)"),
    )
}

fn at_entry(index: usize, error: ErrorBody) -> ErrorBody {
    ErrorBody::new(error.code, format!("entry {index}: {}", error.message))
}

/// The answer to a batch append: one result per entry, in array order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReply {
    pub results: Vec<EntryResult>,
}

/// One entry's outcome in a [`BatchReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EntryResult {
    /// `{"id","seq","ts","duplicate"}`, as a single append's reply.
    Stored(AppendReply),
    /// `{"id","error":{"code","message"}}`: this entry was not stored (or, for `timeout`, its
    /// outcome is unknown).
    Failed { id: u64, error: ErrorBody },
}

/// The answer to an append, and the body of the `appended.<id>` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendReply {
    pub id: u64,
    pub seq: u64,
    /// RFC 3339 UTC with six fractional digits and `Z`: sorts as text.
    pub ts: String,
    /// True when the idempotency key was seen before; `seq` and `ts` are then the original's.
    pub duplicate: bool,
    /// The idempotency key the entry is stored under, in the `appended.<id>` event only (a
    /// reply to the request goes to its sender, who knows it). Absent when the append had none,
    /// so such a body encodes exactly as before this field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// The body of the `rejected.<id>` event: a worker refused an append to object `id` and stored
/// nothing, for good (a refusal that a retry may cure, such as a shard outage on JetStream
/// intake, is not one: the message is redelivered). `{"id":…,"key":…,"error":{"code":…,
/// "message":…},"stream_seq":…}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedEvent {
    pub id: u64,
    /// The idempotency key the append would have been stored under (as in `appended.<id>`);
    /// absent when it had none, or when the key itself was unusable (over the size limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub error: ErrorBody,
    /// JetStream intake: the message's stream sequence (the `seq` of its publisher's PubAck).
    /// Absent on core intake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_seq: Option<u64>,
}

/// One append that a refused message was meant to make, as far as its body can be read: the
/// object it names and its `key` field, for the `rejected.<id>` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedAppend {
    pub id: u64,
    /// The body's `key`, when it is a string within the limits (else `None`).
    pub key: Option<String>,
    /// Its index when the body is a batch (a JSON array); `None` for a single append.
    pub index: Option<usize>,
}

/// The appends a refused body names: one for an object with a readable `id`, one per array
/// element that is an object with a readable `id` for a batch, and none for a body that is not
/// JSON (or names no object). Never fails: it reads what a refusal can still tell its sender.
pub fn refused_appends(body: &[u8], limits: &Limits) -> Vec<RefusedAppend> {
    let read = |object: &serde_json::Map<String, Value>, index| {
        let id = decode_id(object.get("id")).ok()?;
        let key = match object.get("key") {
            Some(Value::String(key)) if check_text("key", key, limits.max_key_bytes).is_ok() => {
                Some(key.clone())
            }
            _ => None,
        };
        Some(RefusedAppend { id, key, index })
    };
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => read(&object, None).into_iter().collect(),
        Ok(Value::Array(values)) => values
            .iter()
            .enumerate()
            .filter_map(|(i, value)| match value {
                Value::Object(object) => read(object, Some(i)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Which end of the range a query reads from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Oldest first (the original's order); `next` is a cursor for `after`.
    #[default]
    Asc,
    /// Newest first; `next` is a cursor for `before`.
    Desc,
}

impl Order {
    fn is_asc(&self) -> bool {
        *self == Order::Asc
    }
}

/// A validated query. Every field but `id` is optional; a request with none of the newer ones
/// (`before`, `order`, `since`, `until`) answers exactly as the original's did. The bounds
/// combine: the answer is the entries inside all of them, in `order`, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryRequest {
    pub id: u64,
    /// Exclusive seq cursor: entries with `seq > after` are returned.
    #[serde(default)]
    pub after: u64,
    /// Exclusive upper seq cursor: entries with `seq < before` are returned. With
    /// `order: desc` it is what `next` feeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
    #[serde(default, skip_serializing_if = "Order::is_asc")]
    pub order: Order,
    /// Inclusive time bound: entries with `ts >= since`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// Exclusive time bound: entries with `ts < until`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
    /// Most entries to return; `None` means the whole log (streamed in chunks when large).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl QueryRequest {
    /// Decode and validate a query body.
    pub fn decode(body: &[u8]) -> Result<QueryRequest, ErrorBody> {
        let mut object = decode_object(body)?;
        let id = decode_id(object.get("id"))?;
        let after = match object.get("after") {
            None | Some(Value::Null) => 0,
            Some(value) => decode_u64("after", value)?,
        };
        let before = match object.get("before") {
            None | Some(Value::Null) => None,
            Some(value) => Some(decode_u64("before", value)?),
        };
        let order = match object.get("order") {
            None | Some(Value::Null) => Order::Asc,
            Some(Value::String(s)) if s == "asc" => Order::Asc,
            Some(Value::String(s)) if s == "desc" => Order::Desc,
            Some(other) => {
                return Err(ErrorBody::invalid(format!(
                    "`order` must be \"asc\" or \"desc\", got {other}"
                )))
            }
        };
        let since = decode_timestamp("since", object.get("since"))?;
        let until = decode_timestamp("until", object.get("until"))?;
        let limit = match object.get("limit") {
            None | Some(Value::Null) => None,
            Some(value) => match decode_u64("limit", value)? {
                0 => return Err(ErrorBody::invalid("`limit` must be at least 1")),
                n => Some(n),
            },
        };
        let request_id = match object.remove("request_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            // Numbers are accepted and echoed as text: a sender correlating by counter should
            // not be refused over a type it never thought about.
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                return Err(ErrorBody::invalid(format!(
                    "`request_id` must be a string, got {}",
                    json_type(&other)
                )))
            }
        };
        Ok(QueryRequest {
            id,
            after,
            before,
            order,
            since,
            until,
            limit,
            request_id,
        })
    }
}

/// A request for an object's statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRequest {
    pub id: u64,
}

impl StatsRequest {
    /// Decode and validate a stats body (unknown fields are ignored).
    pub fn decode(body: &[u8]) -> Result<StatsRequest, ErrorBody> {
        let object = decode_object(body)?;
        Ok(StatsRequest {
            id: decode_id(object.get("id"))?,
        })
    }
}

/// An object's statistics, kept exactly in its head row (no scan). `first_seq`, `first_ts` and
/// `last_ts` are null while the object has no entries (unknown, or everything deleted);
/// `last_seq` is the last seq ever assigned (0 for an object never appended to), even after
/// its entries are deleted: seqs are never reused, the next append gets `last_seq + 1`, and
/// it is what `expected_seq` is compared with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReply {
    pub id: u64,
    /// Entries present.
    pub count: u64,
    pub first_seq: Option<u64>,
    pub last_seq: u64,
    pub first_ts: Option<String>,
    pub last_ts: Option<String>,
    /// Total UTF-8 bytes of the present entries' `log` texts.
    pub bytes: u64,
}

/// A request to delete an object's entries with `seq < before_seq` (all of them without it).
/// Seqs are never reused: the next append continues after the last seq ever assigned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRequest {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_seq: Option<u64>,
}

impl DeleteRequest {
    /// Decode and validate a delete body (unknown fields are ignored).
    pub fn decode(body: &[u8]) -> Result<DeleteRequest, ErrorBody> {
        let object = decode_object(body)?;
        let id = decode_id(object.get("id"))?;
        let before_seq = match object.get("before_seq") {
            None | Some(Value::Null) => None,
            Some(value) => Some(decode_u64("before_seq", value)?),
        };
        Ok(DeleteRequest { id, before_seq })
    }
}

/// The answer to a [`DeleteRequest`]: how many entries it removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteReply {
    pub id: u64,
    pub deleted: u64,
}

/// One stored entry as a query returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub seq: u64,
    pub ts: String,
    pub log: String,
}

/// One response message to a query. Small answers are one message with `chunk` 0 and `last`
/// true; large ones are a run of messages with increasing `chunk`, the final one `last`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryResponse {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The object's entry count at the time the query started.
    pub total: u64,
    pub logs: Vec<LogEntry>,
    /// Cursor for the next page (`after`, or `before` with `order: desc`), or null when this
    /// response reached the end of the requested range.
    pub next: Option<u64>,
    pub chunk: u32,
    pub last: bool,
}

fn decode_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ErrorBody> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ErrorBody::invalid("empty body: expected a JSON object"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ErrorBody::invalid(format!(
            "expected a JSON object, got {}",
            json_type(&other)
        ))),
        Err(e) => Err(ErrorBody::invalid(format!("invalid JSON: {e}"))),
    }
}

fn decode_timestamp(field: &str, value: Option<&Value>) -> Result<Option<Timestamp>, ErrorBody> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Timestamp::parse(text).map(Some).map_err(|e| {
            ErrorBody::invalid(format!(
                "`{field}` is not an RFC 3339 timestamp ({text:?}): {e}"
            ))
        }),
        Some(other) => Err(ErrorBody::invalid(format!(
            "`{field}` must be an RFC 3339 timestamp string, got {}",
            json_type(other)
        ))),
    }
}

fn decode_id(value: Option<&Value>) -> Result<u64, ErrorBody> {
    match value {
        None | Some(Value::Null) => Err(ErrorBody::invalid("missing field `id`")),
        Some(value) => decode_u64("id", value),
    }
}

fn decode_u64(field: &str, value: &Value) -> Result<u64, ErrorBody> {
    match value {
        Value::Number(n) => n.as_u64().ok_or_else(|| {
            // An integer beyond u64 arrives as a float (1.8446744073709552e19): say what it
            // is rather than echo a number the sender never wrote.
            let got = match n.as_f64() {
                Some(f) if n.is_f64() && f.fract() == 0.0 && f >= 0.0 => {
                    "a larger integer".to_string()
                }
                _ => n.to_string(),
            };
            ErrorBody::invalid(format!(
                "`{field}` must be an integer in 0..=18446744073709551615, got {got}"
            ))
        }),
        other => Err(ErrorBody::invalid(format!(
            "`{field}` must be an unsigned integer, got {}",
            json_type(other)
        ))),
    }
}

/// PostgreSQL `text` cannot hold NUL, so a NUL would fail the whole batch it lands in: refuse it here.
fn check_text(field: &str, text: &str, max_bytes: usize) -> Result<(), ErrorBody> {
    if text.len() > max_bytes {
        return Err(ErrorBody::new(
            ErrorCode::TooLarge,
            format!(
                "`{field}` is {} bytes, the limit is {max_bytes}",
                text.len()
            ),
        ));
    }
    if text.contains('\0') {
        return Err(ErrorBody::invalid(format!(
            "`{field}` contains a NUL character, which cannot be stored"
        )));
    }
    Ok(())
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(body: &str) -> Result<AppendBody, ErrorBody> {
        AppendBody::decode(body.as_bytes(), &Limits::default(), 3)
    }

    #[test]
    fn batches_decode_all_or_nothing_naming_the_bad_entry() {
        assert_eq!(
            batch(
                r#"[{"id":1,"log":"a","key":"k"},{"id":18446744073709551615,"log":"b","expected_seq":0}]"#
            ),
            Ok(AppendBody::Batch(vec![
                AppendRequest {
                    id: 1,
                    log: "a".into(),
                    key: Some("k".into()),
                    expected_seq: None,
                },
                AppendRequest {
                    id: u64::MAX,
                    log: "b".into(),
                    key: None,
                    expected_seq: Some(0),
                },
            ]))
        );
        assert!(matches!(
            batch(r#" {"id":1,"log":"a"}"#),
            Ok(AppendBody::Single(_))
        ));
        let cases = [
            (r#"[]"#, ErrorCode::InvalidRequest, "empty batch"),
            (
                r#"[{"id":1,"log":"a"},{"id":2}]"#,
                ErrorCode::InvalidRequest,
                "entry 1: missing field `log`",
            ),
            (
                r#"[{"id":1,"log":"a"},7]"#,
                ErrorCode::InvalidRequest,
                "entry 1: expected a JSON object, got a number",
            ),
            (
                r#"[{"id":-1,"log":"a"}]"#,
                ErrorCode::InvalidRequest,
                "entry 0: ",
            ),
            (
                r#"[{"id":1,"log":"a"},{"id":2,"log":"b"},{"id":3,"log":"c"},{"id":4,"log":"d"}]"#,
                ErrorCode::TooLarge,
                "limit is 3",
            ),
            (
                r#"[{"id":1,"log":"a\u0000"}]"#,
                ErrorCode::InvalidRequest,
                "entry 0: `log` contains a NUL",
            ),
            (
                r#"[{"id":1,"log":"a"}"#,
                ErrorCode::InvalidRequest,
                "invalid JSON",
            ),
        ];
        for (body, code, message) in cases {
            let e = batch(body).expect_err(body);
            assert_eq!(e.code, code, "{body}: {e}");
            assert!(e.message.contains(message), "{body}: {e}");
        }
        let long = format!(
            r#"[{{"id":1,"log":"a"}},{{"id":1,"log":"{}"}}]"#,
            "x".repeat(70_000)
        );
        let e = batch(&long).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        assert!(e.message.starts_with("entry 1: "), "{e}");
    }

    #[test]
    fn expected_seq_decodes_and_conflicts_carry_the_last_seq() {
        let r = append(r#"{"id":5,"log":"a","expected_seq":3}"#).unwrap();
        assert_eq!(r.expected_seq, Some(3));
        assert_eq!(append(r#"{"id":5,"log":"a"}"#).unwrap().expected_seq, None);
        // The slow path (a field the fast path refuses) keeps it too.
        let r = append(r#"{"id":5,"log":"a","key":null,"expected_seq":0}"#).unwrap();
        assert_eq!(r.expected_seq, Some(0));
        for bad in [
            r#"{"id":5,"log":"a","expected_seq":-1}"#,
            r#"{"id":5,"log":"a","expected_seq":"3"}"#,
        ] {
            let e = append(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
            assert!(e.message.contains("expected_seq"), "{bad}: {e}");
        }
        let e = batch(r#"[{"id":1,"log":"a"},{"id":1,"log":"b","expected_seq":1.5}]"#).unwrap_err();
        assert!(e.message.starts_with("entry 1: "), "{e}");

        let conflict = ErrorReply {
            error: ErrorBody::conflict(3, 7),
        };
        let json = serde_json::to_string(&conflict).unwrap();
        assert!(
            json.starts_with(r#"{"error":{"code":"conflict","message":"#)
                && json.ends_with(r#","last_seq":7}}"#),
            "{json}"
        );
        assert_eq!(ErrorCode::Conflict.status(), 409);
        assert_eq!(serde_json::from_str::<ErrorReply>(&json).unwrap(), conflict);
        // Other errors encode exactly as before `last_seq` existed.
        let busy = ErrorReply {
            error: ErrorBody::new(ErrorCode::Busy, "later"),
        };
        assert_eq!(
            serde_json::to_string(&busy).unwrap(),
            r#"{"error":{"code":"busy","message":"later"}}"#
        );
    }

    #[test]
    fn an_id_beyond_u64_is_not_echoed_as_a_float() {
        let e = AppendRequest::decode(
            br#"{"id":18446744073709551616,"log":"a"}"#,
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "`id` must be an integer in 0..=18446744073709551615, got a larger integer"
        );
        let e = AppendRequest::decode(br#"{"id":1.5,"log":"a"}"#, &Limits::default()).unwrap_err();
        assert!(e.message.ends_with("got 1.5"), "{e}");
    }

    #[test]
    fn batch_replies_encode_per_entry() {
        let reply = BatchReply {
            results: vec![
                EntryResult::Stored(AppendReply {
                    id: 1,
                    seq: 2,
                    ts: "t".into(),
                    duplicate: false,
                    key: None,
                }),
                EntryResult::Failed {
                    id: 9,
                    error: ErrorBody::new(ErrorCode::Unavailable, "down"),
                },
            ],
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            json,
            r#"{"results":[{"id":1,"seq":2,"ts":"t","duplicate":false},{"id":9,"error":{"code":"unavailable","message":"down"}}]}"#
        );
        assert_eq!(serde_json::from_str::<BatchReply>(&json).unwrap(), reply);
    }

    #[test]
    fn outcome_events_round_trip_and_omit_what_is_absent() {
        let appended = AppendReply {
            id: 42,
            seq: 7,
            ts: "2026-11-23T14:00:00.000000Z".into(),
            duplicate: false,
            key: Some("k-1".into()),
        };
        let json = serde_json::to_string(&appended).unwrap();
        assert_eq!(
            json,
            r#"{"id":42,"seq":7,"ts":"2026-11-23T14:00:00.000000Z","duplicate":false,"key":"k-1"}"#
        );
        assert_eq!(
            serde_json::from_str::<AppendReply>(&json).unwrap(),
            appended
        );
        // Without a key, exactly the body old readers know; and old bodies still decode.
        let keyless = AppendReply {
            key: None,
            ..appended
        };
        let json = serde_json::to_string(&keyless).unwrap();
        assert_eq!(
            json,
            r#"{"id":42,"seq":7,"ts":"2026-11-23T14:00:00.000000Z","duplicate":false}"#
        );
        assert_eq!(serde_json::from_str::<AppendReply>(&json).unwrap(), keyless);

        let rejected = RejectedEvent {
            id: 42,
            key: Some("k-2".into()),
            error: ErrorBody::conflict(1, 0),
            stream_seq: Some(9),
        };
        let json = serde_json::to_string(&rejected).unwrap();
        assert!(
            json.starts_with(r#"{"id":42,"key":"k-2","error":{"code":"conflict","message":"#)
                && json.ends_with(r#","last_seq":0},"stream_seq":9}"#),
            "{json}"
        );
        assert_eq!(
            serde_json::from_str::<RejectedEvent>(&json).unwrap(),
            rejected
        );
        let core = RejectedEvent {
            id: u64::MAX,
            key: None,
            error: ErrorBody::new(ErrorCode::InvalidRequest, "missing field `log`"),
            stream_seq: None,
        };
        let json = serde_json::to_string(&core).unwrap();
        assert_eq!(
            json,
            r#"{"id":18446744073709551615,"error":{"code":"invalid_request","message":"missing field `log`"}}"#
        );
        assert_eq!(serde_json::from_str::<RejectedEvent>(&json).unwrap(), core);
    }

    #[test]
    fn refused_bodies_name_what_they_can() {
        let limits = Limits {
            max_log_bytes: 8,
            max_key_bytes: 4,
        };
        let read = |body: &str| refused_appends(body.as_bytes(), &limits);
        let one = |id, key: Option<&str>, index| RefusedAppend {
            id,
            key: key.map(str::to_string),
            index,
        };
        assert_eq!(read(r#"{"id":5,"key":"k"}"#), [one(5, Some("k"), None)]);
        // A key over the limit (or not a string) is not echoed; the id still is.
        assert_eq!(read(r#"{"id":5,"key":"kkkkk"}"#), [one(5, None, None)]);
        assert_eq!(read(r#"{"id":5,"key":7,"log":1}"#), [one(5, None, None)]);
        assert_eq!(
            read(r#"[{"id":1,"key":"a"},7,{"log":"x"},{"id":2},{"id":"3"}]"#),
            [one(1, Some("a"), Some(0)), one(2, None, Some(3))]
        );
        for nothing in [
            "",
            "{",
            "not json",
            r#"{"log":"x"}"#,
            r#"{"id":-1}"#,
            "[1]",
            "7",
        ] {
            assert_eq!(read(nothing), [], "{nothing}");
        }
    }

    fn append(body: &str) -> Result<AppendRequest, ErrorBody> {
        AppendRequest::decode(body.as_bytes(), &Limits::default())
    }

    #[test]
    fn accepts_the_originals_format_and_the_full_u64_range() {
        let r = append(r#"{"id":5,"log":"a"}"#).unwrap();
        assert_eq!((r.id, r.log.as_str(), r.key), (5, "a", None));
        let r = append(r#"{"id":18446744073709551615,"log":"x","key":"k"}"#).unwrap();
        assert_eq!((r.id, r.key.as_deref()), (u64::MAX, Some("k")));
    }

    #[test]
    fn rejects_each_bad_input_with_its_code() {
        let cases = [
            ("", ErrorCode::InvalidRequest, "empty"),
            ("{", ErrorCode::InvalidRequest, "invalid JSON"),
            ("[1]", ErrorCode::InvalidRequest, "an array"),
            (
                r#"{"log":"a"}"#,
                ErrorCode::InvalidRequest,
                "missing field `id`",
            ),
            (r#"{"id":-1,"log":"a"}"#, ErrorCode::InvalidRequest, "-1"),
            (
                r#"{"id":"1","log":"a"}"#,
                ErrorCode::InvalidRequest,
                "a string",
            ),
            (
                r#"{"id":18446744073709551616,"log":"a"}"#,
                ErrorCode::InvalidRequest,
                "integer",
            ),
            (r#"{"id":1.5,"log":"a"}"#, ErrorCode::InvalidRequest, "1.5"),
            (
                r#"{"id":1,"log":7}"#,
                ErrorCode::InvalidRequest,
                "`log` must be a string",
            ),
            (
                r#"{"id":1}"#,
                ErrorCode::InvalidRequest,
                "missing field `log`",
            ),
            (
                r#"{"id":1,"log":"a\u0000b"}"#,
                ErrorCode::InvalidRequest,
                "NUL",
            ),
        ];
        for (body, code, needle) in cases {
            let err = append(body).unwrap_err();
            assert_eq!(err.code, code, "{body}");
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
        let big = format!(r#"{{"id":1,"log":"{}"}}"#, "x".repeat(64 * 1024 + 1));
        assert_eq!(append(&big).unwrap_err().code, ErrorCode::TooLarge);
        let big_key = format!(r#"{{"id":1,"log":"a","key":"{}"}}"#, "k".repeat(257));
        assert_eq!(append(&big_key).unwrap_err().code, ErrorCode::TooLarge);
        let invalid_utf8 = b"{\"id\":1,\"log\":\"\xff\"}";
        let err = AppendRequest::decode(invalid_utf8, &Limits::default()).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn query_defaults_and_validation() {
        let q = QueryRequest::decode(br#"{"id":42}"#).unwrap();
        assert_eq!((q.id, q.after, q.limit, q.request_id), (42, 0, None, None));
        let q = QueryRequest::decode(br#"{"id":1,"after":10,"limit":5,"request_id":"r"}"#).unwrap();
        assert_eq!(
            (q.after, q.limit, q.request_id.as_deref()),
            (10, Some(5), Some("r"))
        );
        assert_eq!((q.before, q.order), (None, Order::Asc));
        let q = QueryRequest::decode(br#"{"id":1,"order":"desc","before":7}"#).unwrap();
        assert_eq!((q.before, q.order), (Some(7), Order::Desc));
        // The defaults are left out, so an old request re-encodes as it was.
        assert_eq!(
            serde_json::to_string(&QueryRequest::decode(br#"{"id":1}"#).unwrap()).unwrap(),
            r#"{"id":1,"after":0}"#
        );
        let q = QueryRequest::decode(
            br#"{"id":1,"since":"2026-11-23T15:00:00+01:00","until":"2026-11-23T14:05:00.5Z"}"#,
        )
        .unwrap();
        assert_eq!(
            (q.since.unwrap().to_string(), q.until.unwrap().to_string()),
            (
                "2026-11-23T14:00:00.000000Z".to_string(),
                "2026-11-23T14:05:00.500000Z".to_string()
            )
        );
        for bad in [
            r#"{"id":1,"since":"yesterday"}"#,
            r#"{"id":1,"until":1700000000}"#,
            r#"{"id":1,"order":"DESC"}"#,
            r#"{"id":1,"order":1}"#,
            r#"{"id":1,"before":-1}"#,
        ] {
            let e = QueryRequest::decode(bad.as_bytes()).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
        }
        assert!(QueryRequest::decode(br#"{"id":1,"limit":0}"#).is_err());
        assert!(QueryRequest::decode(br#"{"id":1,"after":-3}"#).is_err());
    }

    #[test]
    fn delete_requests() {
        assert_eq!(
            DeleteRequest::decode(br#"{"id":42,"before_seq":7}"#),
            Ok(DeleteRequest {
                id: 42,
                before_seq: Some(7)
            })
        );
        assert_eq!(
            DeleteRequest::decode(br#"{"id":42,"before_seq":null}"#),
            Ok(DeleteRequest {
                id: 42,
                before_seq: None
            })
        );
        for bad in [
            r#"{"before_seq":1}"#,
            r#"{"id":1,"before_seq":-1}"#,
            r#"{"id":1,"before_seq":"2"}"#,
        ] {
            let e = DeleteRequest::decode(bad.as_bytes()).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
        }
        assert_eq!(
            serde_json::to_string(&DeleteReply { id: 1, deleted: 3 }).unwrap(),
            r#"{"id":1,"deleted":3}"#
        );
    }

    #[test]
    fn stats_requests_and_replies() {
        assert_eq!(
            StatsRequest::decode(br#"{"id":42,"extra":true}"#),
            Ok(StatsRequest { id: 42 })
        );
        assert!(StatsRequest::decode(br#"{"id":"42"}"#).is_err());
        assert!(StatsRequest::decode(b"[]").is_err());
        let empty = StatsReply {
            id: 9,
            count: 0,
            first_seq: None,
            last_seq: 0,
            first_ts: None,
            last_ts: None,
            bytes: 0,
        };
        assert_eq!(
            serde_json::to_string(&empty).unwrap(),
            r#"{"id":9,"count":0,"first_seq":null,"last_seq":0,"first_ts":null,"last_ts":null,"bytes":0}"#
        );
    }
}
