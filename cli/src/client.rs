//! The NATS side of the CLI: one connection, request-reply with a bound on every wait, and
//! query answers read whole (every chunk until `last`, every page by following `next`).

use std::time::Duration;

use async_nats::{Client, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use logstore_protocol::client::{read_answer, AnswerError};
use logstore_protocol::discover::{self, Discovery, Fleet, Intake};
use logstore_protocol::nats::{ConnectFailure, NatsAccess};
use logstore_protocol::partition::object_subject;
use logstore_protocol::{
    AppendReply, ErrorBody, ErrorReply, LogEntry, Order, QueryRequest, QueryResponse, RejectedEvent,
};
use serde::de::DeserializeOwned;

/// Entries asked for per query request when reading a long range page by page.
pub const PAGE: u64 = 1_000;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// NATS could not be reached, or refused the login or the TLS handshake.
    #[error(transparent)]
    Connect(ConnectFailure),
    /// Nobody answered: no worker subscribed, or none answered in time. Retrying may help.
    #[error("no answer on {subject}: {why}")]
    NoAnswer { subject: String, why: String },
    /// The service answered with an error.
    #[error("{0}")]
    Service(ErrorBody),
    #[error("NATS: {0}")]
    Nats(#[source] async_nats::Error),
    /// An answer that is not what the protocol promises.
    #[error("unexpected answer on {subject}: {why}")]
    BadReply { subject: String, why: String },
    /// The NATS server refused something this user may not do (its permissions): the
    /// server's own words, naming the subject.
    #[error("NATS refused it: {violation}{hint}")]
    Denied { violation: String, hint: String },
    /// The JetStream stream queued the append, but neither its `appended.<id>` nor its
    /// `rejected.<id>` event came within the timeout: the workers will store or refuse it when
    /// they reach it (they may be down, or behind). Sending it again with the same key is safe.
    #[error(
        "queued in stream {stream} as message {seq}, but no outcome arrived within {waited:?}: \
         the workers store or refuse it when they reach it (`logstore tail {id} -f` shows it \
         once stored); sending it again with --key {key} cannot store it twice"
    )]
    Unconfirmed {
        id: u64,
        stream: String,
        seq: u64,
        key: String,
        waited: Duration,
    },
    /// The JetStream stream refused the append (full, or another JetStream error): nothing
    /// was queued.
    #[error("stream refused the append on {subject}: {description} (JetStream error {code})")]
    Stream {
        subject: String,
        code: u64,
        description: String,
    },
}

impl ClientError {
    /// Worth sending again (the service may be restarting or briefly overloaded).
    pub fn is_transient(&self) -> bool {
        use logstore_protocol::ErrorCode::*;
        match self {
            ClientError::NoAnswer { .. }
            | ClientError::Nats(_)
            | ClientError::Unconfirmed { .. } => true,
            ClientError::Service(body) => matches!(body.code, Unavailable | Busy | Timeout),
            ClientError::Stream { .. } => true,
            ClientError::Connect { .. }
            | ClientError::BadReply { .. }
            | ClientError::Denied { .. } => false,
        }
    }
}

/// The subjects the workers listen on (the same settings as the worker's).
#[derive(Debug, Clone)]
pub struct Subjects {
    pub logs: String,
    pub query: String,
    pub stats: String,
    pub delete: String,
    pub events_prefix: String,
    /// Prefix of the events after each refused append (the workers' NATS_REJECTED_PREFIX).
    pub rejected_prefix: String,
}

/// A connection plus what every request needs.
pub struct Connection {
    pub client: Client,
    pub subjects: Subjects,
    pub timeout: Duration,
    /// The first permissions violation the server reported on this connection. The server
    /// drops what the user may not publish or subscribe to and says so out of band; without
    /// this, such a request would look like one nobody answered.
    denied: tokio::sync::watch::Receiver<Option<String>>,
}

impl Connection {
    /// Connect with the login and TLS of the NATS_* settings (credentials passed as connect
    /// options, never inside a URL the client could log); errors show the URL redacted and
    /// say whether the server refused the login or the TLS handshake.
    pub async fn open(
        nats: &NatsAccess,
        subjects: Subjects,
        timeout: Duration,
    ) -> Result<Connection, ClientError> {
        let (denied_tx, denied) = tokio::sync::watch::channel(None);
        let client = nats
            .connect(|options| {
                options
                    .name("logstore-cli")
                    .connection_timeout(timeout)
                    .request_timeout(Some(timeout))
                    .event_callback(move |event| {
                        let violation = logstore_protocol::nats::permissions_violation(&event)
                            // Asking the workers which lane to append on is a convenience
                            // (`append_subject`): a user who may not is no error of the command.
                            .filter(|text| !text.contains("\"$SRV."));
                        if let Some(text) = violation {
                            // The first one is the cause; later ones follow from it.
                            denied_tx.send_if_modified(|first| {
                                first.get_or_insert(text);
                                true
                            });
                        }
                        async {}
                    })
            })
            .await
            .map_err(ClientError::Connect)?;
        Ok(Connection {
            client,
            subjects,
            timeout,
            denied,
        })
    }

    /// `work`, unless the server reports a permissions violation first: then that, as
    /// [`ClientError::Denied`] with a hint where the fix is on this side.
    pub async fn guarded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        let mut denied = self.denied.clone();
        let refused = async {
            match denied.wait_for(Option::is_some).await {
                Ok(violation) => violation.clone().unwrap_or_default(),
                // The connection is gone: `work` ends on its own.
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            violation = refused => Err(self.denied_error(violation)),
            result = work => result,
        }
    }

    fn denied_error(&self, violation: String) -> ClientError {
        let lower = violation.to_ascii_lowercase();
        let hint = if lower.contains("subscription") && lower.contains("_inbox") {
            " (answers come on this user's inbox prefix: set NATS_INBOX_PREFIX to one the user \
             may subscribe to)"
        } else if lower.contains("subscription")
            && [&self.subjects.events_prefix, &self.subjects.rejected_prefix]
                .iter()
                .any(|prefix| lower.contains(&format!("\"{}.", prefix.to_ascii_lowercase())))
        {
            " (`logstore append` waits for its outcome on the object's appended and rejected \
             events: let this user subscribe to them, as deploy/nats/nats-server.conf does, or \
             pass --no-wait)"
        } else if lower.contains(&format!(
            "\"{}\"",
            self.subjects.delete.to_ascii_lowercase()
        )) {
            " (deleting is for the operator's user, `admin` in the shipped NATS config)"
        } else {
            " (this NATS user is not allowed to; see the server's permissions for it)"
        };
        ClientError::Denied {
            violation,
            hint: hint.to_string(),
        }
    }

    /// Request-reply: the answer decoded as `T`, or the service's error.
    pub async fn request<T: DeserializeOwned>(
        &self,
        subject: &str,
        body: Vec<u8>,
    ) -> Result<T, ClientError> {
        let answer = self.guarded(self.raw_request(subject, body)).await?;
        decode(subject, &answer.payload)
    }

    async fn raw_request(
        &self,
        subject: &str,
        body: Vec<u8>,
    ) -> Result<async_nats::Message, ClientError> {
        self.client
            .request(subject.to_string(), Bytes::from(body))
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => ClientError::NoAnswer {
                    subject: subject.to_string(),
                    why: "no worker is listening (no responders)".into(),
                },
                async_nats::RequestErrorKind::TimedOut => ClientError::NoAnswer {
                    subject: subject.to_string(),
                    why: format!("no answer within {:?}", self.timeout),
                },
                _ => ClientError::Nats(e.into()),
            })
    }

    /// Where an append to object `id` goes: its own lane `<logs>.<id>` when the workers run
    /// JetStream intake on a stream with partitions (as their NATS service info says, asked
    /// each time, nothing cached: [`discover`]), else the logs subject, also when no worker
    /// answers in time (as before partitions). One object, one lane: the order of an object's
    /// appends holds within a lane only.
    pub async fn append_subject(&self, id: u64) -> String {
        let wait = discover::DEFAULT_WAIT.min(self.timeout);
        match discover::discover(&self.client, &self.subjects.logs, wait).await {
            Discovery::Found(Fleet {
                intake: Intake::JetStream { partitions, .. },
                ..
            }) if partitions > 0 => object_subject(&self.subjects.logs, id),
            _ => self.subjects.logs.clone(),
        }
    }

    /// Subscribe to object `id`'s outcome events (`appended.<id>`, `rejected.<id>`) and make
    /// sure the server has the subscriptions, so an append published after this cannot be
    /// settled unseen.
    pub async fn watch_outcomes(&self, id: u64) -> Result<Outcomes, ClientError> {
        let nats = |e: async_nats::SubscribeError| ClientError::Nats(e.into());
        let appended = self
            .client
            .subscribe(format!("{}.{id}", self.subjects.events_prefix))
            .await
            .map_err(nats)?;
        let rejected = self
            .client
            .subscribe(format!("{}.{id}", self.subjects.rejected_prefix))
            .await
            .map_err(nats)?;
        self.client
            .flush()
            .await
            .map_err(|e| ClientError::Nats(e.into()))?;
        Ok(Outcomes { appended, rejected })
    }

    /// One query request, read whole: every chunk until the one marked `last`.
    pub async fn query(&self, request: &QueryRequest) -> Result<Vec<QueryResponse>, ClientError> {
        self.guarded(self.query_chunks(request)).await
    }

    async fn query_chunks(
        &self,
        request: &QueryRequest,
    ) -> Result<Vec<QueryResponse>, ClientError> {
        let subject = &self.subjects.query;
        let body = serde_json::to_vec(request).map_err(|e| ClientError::BadReply {
            subject: subject.clone(),
            why: format!("cannot encode the query: {e}"),
        })?;
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| ClientError::Nats(e.into()))?;
        self.client
            .publish_with_reply(subject.clone(), inbox, body.into())
            .await
            .map_err(|e| ClientError::Nats(e.into()))?;
        let chunks = self.chunks(subject, &mut replies).await;
        // Best effort: the subscription ends with the inbox anyway.
        let _ = replies.unsubscribe().await;
        chunks
    }

    async fn chunks(
        &self,
        subject: &str,
        replies: &mut Subscriber,
    ) -> Result<Vec<QueryResponse>, ClientError> {
        let no_answer = |why: String| ClientError::NoAnswer {
            subject: subject.to_string(),
            why,
        };
        read_answer(replies, self.timeout)
            .await
            .map_err(|e| match e {
                AnswerError::TimedOut { timeout, .. } => {
                    no_answer(format!("no answer within {timeout:?}"))
                }
                AnswerError::Closed => {
                    ClientError::Nats("the reply subscription closed (connection lost)".into())
                }
                AnswerError::NoResponders => {
                    no_answer("no worker is listening (no responders)".into())
                }
                AnswerError::Refused { error, .. } => ClientError::Service(error),
                // What `decode` says of it: a stream's error reply, or not an answer.
                AnswerError::Undecodable { reason, payload } => {
                    decode::<QueryResponse>(subject, &payload)
                        .err()
                        .unwrap_or_else(|| ClientError::BadReply {
                            subject: subject.to_string(),
                            why: reason,
                        })
                }
                AnswerError::OutOfOrder { got, expected } => ClientError::BadReply {
                    subject: subject.to_string(),
                    why: format!("chunk {got} arrived after {expected} chunks"),
                },
            })
    }

    /// Read the range `request` describes to its end, following `next` (`after` oldest
    /// first, `before` newest first), handing each entry to `each` in order; stops after
    /// `limit` entries in all when given. Returns the object's total at the last request.
    pub async fn read(
        &self,
        mut request: QueryRequest,
        limit: Option<u64>,
        mut each: impl FnMut(LogEntry) -> std::io::Result<()>,
    ) -> Result<u64, ReadError> {
        let mut left = limit.unwrap_or(u64::MAX);
        let mut total = 0;
        while left > 0 {
            request.limit = Some(left.min(PAGE));
            let chunks = self.query(&request).await?;
            let next = chunks.last().and_then(|c| c.next);
            for chunk in chunks {
                total = chunk.total;
                for entry in chunk.logs {
                    left = left.saturating_sub(1);
                    each(entry)?;
                }
            }
            match (next, request.order) {
                (None, _) => break,
                (Some(next), Order::Asc) => request.after = next,
                (Some(next), Order::Desc) => request.before = Some(next),
            }
        }
        Ok(total)
    }
}

/// An object's outcome events, subscribed before an append is published
/// ([`Connection::watch_outcomes`]).
pub struct Outcomes {
    appended: Subscriber,
    rejected: Subscriber,
}

/// What [`Outcomes::wait`] learnt of one append.
#[derive(Debug)]
pub enum Outcome {
    /// Its `appended.<id>` event: stored (or a duplicate of a stored one).
    Stored(AppendReply),
    /// Its `rejected.<id>` event: refused, nothing stored.
    Rejected(RejectedEvent),
    /// Neither within the wait (or the subscriptions ended).
    Unknown,
}

impl Outcomes {
    /// Wait at most `timeout` for the event of the append with `key` (queued in the stream as
    /// message `stream_seq`): the `appended.<id>` event carrying that key, or the
    /// `rejected.<id>` event carrying that key or that stream sequence. Other appends' events,
    /// and anything that does not decode, are skipped.
    pub async fn wait(&mut self, key: &str, stream_seq: u64, timeout: Duration) -> Outcome {
        let ours = async {
            loop {
                tokio::select! {
                    Some(message) = self.appended.next() => {
                        if let Ok(reply) = serde_json::from_slice::<AppendReply>(&message.payload) {
                            if reply.key.as_deref() == Some(key) {
                                return Outcome::Stored(reply);
                            }
                        }
                    }
                    Some(message) = self.rejected.next() => {
                        if let Ok(event) = serde_json::from_slice::<RejectedEvent>(&message.payload) {
                            if event.key.as_deref() == Some(key) || event.stream_seq == Some(stream_seq) {
                                return Outcome::Rejected(event);
                            }
                        }
                    }
                    else => return Outcome::Unknown,
                }
            }
        };
        tokio::time::timeout(timeout, ours)
            .await
            .unwrap_or(Outcome::Unknown)
    }
}

/// What became of one entry of a batch: stored (or a duplicate of a stored one), or refused.
pub type EntryOutcome = Result<AppendReply, ErrorBody>;

/// One outcome event of the object ([`Outcomes::next_event`]).
#[derive(Debug)]
pub enum Event {
    Appended(AppendReply),
    Rejected(RejectedEvent),
}

impl Outcomes {
    /// The next event on either subject that decodes (anything else is skipped); `None` once
    /// the subscriptions have ended. Cancel safe: an event is returned or left unread.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            tokio::select! {
                Some(message) = self.appended.next() => {
                    if let Ok(reply) = serde_json::from_slice(&message.payload) {
                        return Some(Event::Appended(reply));
                    }
                }
                Some(message) = self.rejected.next() => {
                    if let Ok(event) = serde_json::from_slice(&message.payload) {
                        return Some(Event::Rejected(event));
                    }
                }
                else => return None,
            }
        }
    }
}

/// A read that failed on the wire or while writing its output.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// A JetStream API error answer (`{"error":{"code":503,"err_code":10077,"description":…}}`),
/// as the stream answers a publish it refuses.
#[derive(serde::Deserialize)]
struct JetStreamErrorReply {
    error: JetStreamError,
}

#[derive(serde::Deserialize)]
struct JetStreamError {
    #[serde(default)]
    err_code: u64,
    description: String,
}

/// Decode an answer: an error reply (the service's, or the stream's refusing a publish: its
/// PubAck then carries `"error"` beside `"stream"` and `"seq": 0`), else the expected body,
/// else a description of what came. No successful answer has an `error` field.
fn decode<T: DeserializeOwned>(subject: &str, payload: &[u8]) -> Result<T, ClientError> {
    if let Ok(reply) = serde_json::from_slice::<ErrorReply>(payload) {
        return Err(ClientError::Service(reply.error));
    }
    if let Ok(reply) = serde_json::from_slice::<JetStreamErrorReply>(payload) {
        return Err(ClientError::Stream {
            subject: subject.to_string(),
            code: reply.error.err_code,
            description: reply.error.description,
        });
    }
    serde_json::from_slice::<T>(payload).map_err(|e| ClientError::BadReply {
        subject: subject.to_string(),
        why: format!("{e}: {}", String::from_utf8_lossy(payload)),
    })
}
