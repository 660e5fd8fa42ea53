//! Reading a query's answer, the one implementation of the protocol's rule for it: the
//! answer is a run of [`QueryResponse`] chunks on the reply subject, chunk *n* follows chunk
//! *n − 1* (the first is 0), and the one marked `last` ends it. An [`ErrorReply`] instead of
//! a chunk is the service refusing the query; a no-responders status means nobody listens on
//! the query subject.
//!
//! The CLI, loadgen, and the worker's tests all read answers through here, each turning an
//! [`AnswerError`] into its own words.
//!
//! Behind the `nats` feature.

use std::time::Duration;

use async_nats::{StatusCode, Subscriber};
use futures::StreamExt;

use crate::{ErrorBody, ErrorReply, QueryResponse};

/// Why no complete answer was read.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// Nothing arrived within `timeout` of the previous message (or of the start);
    /// `chunks` had arrived before.
    #[error("no answer within {timeout:?} after {chunks} chunks")]
    TimedOut { timeout: Duration, chunks: u32 },
    /// The reply subscription ended (the connection was lost or closed).
    #[error("the reply subscription closed")]
    Closed,
    /// The server's no-responders status: no worker listens on the query subject.
    #[error("no responders")]
    NoResponders,
    /// The service answered with an error reply; `payload` is the message as it came.
    #[error("{error}")]
    Refused { error: ErrorBody, payload: Vec<u8> },
    /// A message that is neither a chunk nor an error reply; `reason` is why it is not a
    /// chunk (serde's words), `payload` the message as it came.
    #[error("not a query answer ({reason}): {}", String::from_utf8_lossy(payload))]
    Undecodable { reason: String, payload: Vec<u8> },
    /// Chunk `got` arrived where chunk `expected` was due.
    #[error("chunk {got} arrived where chunk {expected} was expected")]
    OutOfOrder { got: u32, expected: u32 },
}

/// One chunk of an answer, with the size of the message that carried it.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub response: QueryResponse,
    /// Bytes of the message body.
    pub bytes: usize,
}

/// An answer being read chunk by chunk, for a reader that does not keep the chunks (a long
/// answer then costs one chunk of memory). One [`Answer`] per query; a subscription that
/// serves several queries one after another gets a new one for each.
pub struct Answer<'a> {
    replies: &'a mut Subscriber,
    timeout: Duration,
    expected: u32,
    done: bool,
}

impl<'a> Answer<'a> {
    /// Read the answer arriving on `replies`; `timeout` bounds the wait for each message, so
    /// a long answer streamed in many chunks is not cut short.
    pub fn new(replies: &'a mut Subscriber, timeout: Duration) -> Self {
        Answer {
            replies,
            timeout,
            expected: 0,
            done: false,
        }
    }

    /// The next chunk in order, or `None` once the `last` one was returned.
    pub async fn next(&mut self) -> Result<Option<Chunk>, AnswerError> {
        if self.done {
            return Ok(None);
        }
        let message = match tokio::time::timeout(self.timeout, self.replies.next()).await {
            Err(_) => {
                return Err(AnswerError::TimedOut {
                    timeout: self.timeout,
                    chunks: self.expected,
                })
            }
            Ok(None) => return Err(AnswerError::Closed),
            Ok(Some(message)) => message,
        };
        if message.status == Some(StatusCode::NO_RESPONDERS) {
            return Err(AnswerError::NoResponders);
        }
        let response = decode(&message.payload)?;
        if response.chunk != self.expected {
            return Err(AnswerError::OutOfOrder {
                got: response.chunk,
                expected: self.expected,
            });
        }
        self.expected += 1;
        self.done = response.last;
        Ok(Some(Chunk {
            response,
            bytes: message.payload.len(),
        }))
    }
}

/// Read a whole answer from `replies`: every chunk, in order, up to the one marked `last`.
/// `timeout` bounds the wait for each message.
pub async fn read_answer(
    replies: &mut Subscriber,
    timeout: Duration,
) -> Result<Vec<QueryResponse>, AnswerError> {
    let mut answer = Answer::new(replies, timeout);
    let mut chunks = Vec::new();
    while let Some(chunk) = answer.next().await? {
        chunks.push(chunk.response);
    }
    Ok(chunks)
}

/// An error reply first (no chunk has an `error` field), else a chunk.
fn decode(payload: &[u8]) -> Result<QueryResponse, AnswerError> {
    if let Ok(reply) = serde_json::from_slice::<ErrorReply>(payload) {
        return Err(AnswerError::Refused {
            error: reply.error,
            payload: payload.to_vec(),
        });
    }
    serde_json::from_slice::<QueryResponse>(payload).map_err(|e| AnswerError::Undecodable {
        reason: e.to_string(),
        payload: payload.to_vec(),
    })
}
