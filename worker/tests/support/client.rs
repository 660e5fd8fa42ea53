//! Talking to the workers over NATS as a test does: appends by request-reply, queries whose
//! chunked answer is read by `logstore_protocol::client::read_answer` (the one reader of
//! that rule), bounded requests, and small helpers for replies, headers and the lease bucket.

use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use logstore_protocol::client::{read_answer, AnswerError};
use logstore_protocol::{AppendReply, ErrorReply, LogEntry, QueryResponse};

use super::env::Env;
use super::within;

impl Env {
    /// Append through NATS request-reply; panics on an error reply.
    pub async fn append(
        &self,
        client: &async_nats::Client,
        id: u64,
        log: &str,
        key: Option<&str>,
    ) -> AppendReply {
        let body = append_body(id, log, key);
        let reply = request(client, &self.subject("logs"), body).await;
        match serde_json::from_slice::<AppendReply>(&reply.payload) {
            Ok(reply) => reply,
            Err(_) => panic!(
                "append {id} failed: {}",
                String::from_utf8_lossy(&reply.payload)
            ),
        }
    }

    /// Append through NATS request-reply; returns the error reply if there is one.
    pub async fn try_append(
        &self,
        client: &async_nats::Client,
        id: u64,
        log: &str,
    ) -> Result<AppendReply, ErrorReply> {
        let reply = request(client, &self.subject("logs"), append_body(id, log, None)).await;
        parse_reply(&reply.payload)
    }

    /// Read an object's whole log (all chunks) via a reply subject.
    pub async fn query_all(&self, client: &async_nats::Client, id: u64) -> Vec<QueryResponse> {
        self.query(client, serde_json::json!({ "id": id })).await
    }

    /// Send a query with a reply subject and collect its chunks until `last`.
    pub async fn query(
        &self,
        client: &async_nats::Client,
        body: serde_json::Value,
    ) -> Vec<QueryResponse> {
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .expect("subscribe inbox");
        client
            .publish_with_reply(self.subject("query"), inbox, body.to_string().into())
            .await
            .expect("publish query");
        collect_chunks(&mut replies).await
    }
}

pub fn append_body(id: u64, log: &str, key: Option<&str>) -> Bytes {
    let mut body = serde_json::json!({ "id": id, "log": log });
    if let Some(key) = key {
        body["key"] = key.into();
    }
    body.to_string().into()
}

pub fn parse_reply(payload: &[u8]) -> Result<AppendReply, ErrorReply> {
    serde_json::from_slice::<AppendReply>(payload).map_err(|_| {
        serde_json::from_slice::<ErrorReply>(payload).unwrap_or_else(|e| {
            panic!(
                "reply is neither success nor error ({e}): {}",
                String::from_utf8_lossy(payload)
            )
        })
    })
}

/// Request-reply with a 10 s bound.
pub async fn request(
    client: &async_nats::Client,
    subject: &str,
    body: Bytes,
) -> async_nats::Message {
    within(10, "request", client.request(subject.to_string(), body))
        .await
        .unwrap_or_else(|e| panic!("request on {subject} failed: {e}"))
}

/// Collect query response chunks until the one marked `last`, checking chunk numbering;
/// at most 60 s in all.
pub async fn collect_chunks(subscriber: &mut async_nats::Subscriber) -> Vec<QueryResponse> {
    let limit = Duration::from_secs(60);
    match within(60, "query response chunks", read_answer(subscriber, limit)).await {
        Ok(chunks) => chunks,
        Err(AnswerError::OutOfOrder { got, expected }) => {
            panic!("chunks arrive numbered in order: chunk {got} where {expected} was due")
        }
        Err(AnswerError::TimedOut { .. }) => panic!("timed out after 60s: query response chunks"),
        Err(AnswerError::Closed) => panic!("subscription ended before the last chunk"),
        Err(e) => panic!("bad response chunk: {e}"),
    }
}

pub fn entries(chunks: &[QueryResponse]) -> Vec<LogEntry> {
    chunks.iter().flat_map(|c| c.logs.iter().cloned()).collect()
}

/// Headers of a message as (name, value) strings, for assertions.
pub fn header(headers: &Option<HeaderMap>, name: &str) -> Option<String> {
    headers.as_ref()?.get(name).map(|v| v.as_str().to_string())
}

pub fn subject(s: &str) -> Subject {
    Subject::from(s)
}

/// The latest entry of lease `key` in the workers' lease bucket: a put names its holder
/// ("pid N"), a delete marker says it was released; None once it expired (or never existed).
pub async fn lease_entry(
    client: &async_nats::Client,
    key: &str,
) -> Option<async_nats::jetstream::kv::Entry> {
    async_nats::jetstream::new(client.clone())
        .get_key_value(worker::intake::ordered::LEASE_BUCKET)
        .await
        .expect("the lease bucket")
        .entry(key)
        .await
        .expect("read the lease")
}
