//! One pull request on the intake's consumer, as both pullers (the unordered loop in
//! `durable.rs` and the ordered puller) make it, read here rather than through async-nats's
//! `Batch`, which ends a pull at the first status it sees. On a replicated consumer
//! (JS_REPLICAS > 1) the server sends a message only once a majority has recorded its delivery,
//! while the status that ends the pull (`408 Request Timeout`, `409 Batch Completed`) goes out
//! at once: the status may come before the pull's last messages. Its `Nats-Pending-Messages`
//! header says how many of the requested messages were not delivered, so [`PullRequest`] reads
//! on until the rest has come (or the guard expires: they were lost with their server).
//!
//! Also how long the pullers wait after a pull that was refused or cut short: while a
//! JetStream cluster elects the consumer's leader, every pull is answered "no responders" at
//! once (or never, when the leader's server died with it), so the pullers back off from
//! [`PULL_RETRY_FIRST`] to [`PULL_RETRY_MAX`] instead of asking in a tight loop, and notice the
//! new leader within [`PULL_RETRY_MAX`].

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_nats::StatusCode;
use futures::StreamExt;
use tokio::time::Instant;

use super::route::Router;

/// Messages fetched from JetStream per pull request.
pub(super) const FETCH_BATCH: usize = 500;
/// Bytes fetched per pull request at most (raised to just above max_payload if that is larger:
/// a pull must be able to take the largest message).
pub(super) const FETCH_MAX_BYTES: usize = 256 << 10;
/// How long one pull request waits for messages; also the most a shutdown waits for a fetch.
pub(super) const FETCH_EXPIRES: Duration = Duration::from_millis(500);
/// How long after its expiry a pull's messages may still come; later, the pull was cut short.
const FETCH_GRACE: Duration = Duration::from_secs(5);
/// The first pause after a refused or cut pull; it doubles up to [`PULL_RETRY_MAX`].
pub(super) const PULL_RETRY_FIRST: Duration = Duration::from_millis(100);
pub(super) const PULL_RETRY_MAX: Duration = Duration::from_secs(1);
/// The header of a status ending a pull: how many of the requested messages it did not deliver.
const PENDING_MESSAGES: &str = "Nats-Pending-Messages";

/// How a pull ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PullEnd {
    /// As a pull does (its expiry, its size, a status after its messages), every message it
    /// delivered received.
    Ended,
    /// Not sent, or refused before any message (no responders while the consumer has no
    /// leader, too many waiting pulls): nothing was delivered by it.
    Refused,
    /// Cut short (the consumer's leader changed or its server died): deliveries may have been
    /// lost on the way.
    Cut,
}

/// What a pull request gives next.
pub(super) enum Pulled {
    Message(Box<jetstream::Message>),
    End(PullEnd),
}

/// One pull request: its messages as they arrive, then how it ended.
pub(super) struct PullRequest {
    subscriber: async_nats::Subscriber,
    context: jetstream::Context,
    requested: usize,
    received: usize,
    /// How many messages the server delivered for it, once a status said so.
    delivered: Option<usize>,
    deadline: Instant,
}

/// How long a pull request waits, and for how much.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wait {
    /// Up to [`FETCH_BATCH`] messages, waiting up to [`FETCH_EXPIRES`] for them to come (the
    /// unordered loop: a busy stream fills it at once, an idle one is asked twice a second).
    Full,
    /// What the consumer has now, up to [`FETCH_BATCH`]; ends at once when it has nothing.
    Now,
    /// The next message, waiting up to [`FETCH_EXPIRES`] for it; ends as soon as it came.
    Next,
}

impl Router {
    /// Send one pull request on `consumer`; None when it could not be sent (the caller pauses
    /// before the next).
    pub(super) async fn request_batch(
        &self,
        consumer: &consumer::Consumer<consumer::pull::Config>,
        wait: Wait,
    ) -> Option<PullRequest> {
        // Bounded in bytes too: 500 batch messages could hold 500,000 entries. This matters
        // beyond memory: a pull's messages must always be routed well within the time the
        // server and this reader give it, even into full queues.
        let max_bytes = FETCH_MAX_BYTES.max(self.queries.outbox.max_payload() + (64 << 10));
        let requested = if wait == Wait::Next { 1 } else { FETCH_BATCH };
        let client = self.jetstream.client();
        let inbox = async_nats::Subject::from(client.new_inbox());
        let sent = async {
            let subscriber = client.subscribe(inbox.clone()).await?;
            let request = consumer::pull::BatchConfig {
                batch: requested,
                expires: (wait != Wait::Now).then_some(FETCH_EXPIRES),
                no_wait: wait == Wait::Now,
                max_bytes,
                ..Default::default()
            };
            consumer.request_batch(request, inbox).await?;
            Ok::<_, async_nats::Error>(subscriber)
        };
        match sent.await {
            Ok(subscriber) => Some(PullRequest {
                subscriber,
                context: self.jetstream.clone(),
                requested,
                received: 0,
                delivered: None,
                deadline: Instant::now() + FETCH_EXPIRES + FETCH_GRACE,
            }),
            Err(e) => {
                tracing::warn!(error = %e, "JetStream pull request failed; retrying");
                None
            }
        }
    }
}

impl PullRequest {
    /// The pull's next message, or how it ended.
    pub(super) async fn next(&mut self) -> Pulled {
        loop {
            let all = self.delivered.unwrap_or(self.requested);
            if self.received >= all {
                return Pulled::End(PullEnd::Ended);
            }
            let message = match tokio::time::timeout_at(self.deadline, self.subscriber.next()).await
            {
                Ok(Some(message)) => message,
                Ok(None) | Err(_) => return Pulled::End(PullEnd::Cut),
            };
            let status = match message.status {
                None | Some(StatusCode::OK) => {
                    self.received += 1;
                    return Pulled::Message(Box::new(jetstream::Message {
                        message,
                        context: self.context.clone(),
                    }));
                }
                Some(StatusCode::IDLE_HEARTBEAT) => continue,
                Some(status) => status,
            };
            let description = message.description.as_deref().unwrap_or("");
            match end_of_pull(status, description, pending_messages(&message)) {
                Some(end) => {
                    tracing::debug!(%status, description, ?end, "JetStream pull ended");
                    return Pulled::End(match (end, self.received) {
                        (PullEnd::Ended, 0) if status == StatusCode::REQUEST_TERMINATED => {
                            PullEnd::Refused
                        }
                        (end, _) => end,
                    });
                }
                None => {
                    let left = pending_messages(&message).unwrap_or(0);
                    self.delivered = Some(self.requested.saturating_sub(left));
                }
            }
        }
    }
}

/// What a status means for its pull: None when it says how many messages were delivered
/// (`Nats-Pending-Messages`), which may still be on their way; else how the pull ended.
fn end_of_pull(status: StatusCode, description: &str, pending: Option<usize>) -> Option<PullEnd> {
    match status {
        StatusCode::NO_RESPONDERS => Some(PullEnd::Refused),
        StatusCode::REQUEST_TERMINATED
            if description.contains("Leadership Change")
                || description.contains("Consumer Deleted") =>
        {
            Some(PullEnd::Cut)
        }
        StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED if pending.is_some() => None,
        // No messages (a no-wait pull), or an expiry or a limit without the count (an older
        // server): what came is all there is.
        StatusCode::NOT_FOUND | StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED => {
            Some(PullEnd::Ended)
        }
        _ => Some(PullEnd::Refused),
    }
}

/// The `Nats-Pending-Messages` header of a status message.
fn pending_messages(message: &async_nats::Message) -> Option<usize> {
    message
        .headers
        .as_ref()?
        .get(PENDING_MESSAGES)?
        .as_str()
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_with_a_count_waits_for_the_rest() {
        // 409 Batch Completed and 408 Request Timeout may overtake a replicated consumer's
        // last messages: the count says how many are still to come.
        assert_eq!(
            end_of_pull(StatusCode::REQUEST_TERMINATED, "Batch Completed", Some(0)),
            None
        );
        assert_eq!(
            end_of_pull(StatusCode::TIMEOUT, "Request Timeout", Some(120)),
            None
        );
        assert_eq!(
            end_of_pull(StatusCode::TIMEOUT, "Request Timeout", None),
            Some(PullEnd::Ended)
        );
    }

    #[test]
    fn a_lost_leader_cuts_and_no_leader_refuses() {
        assert_eq!(
            end_of_pull(StatusCode::REQUEST_TERMINATED, "Leadership Change", Some(3)),
            Some(PullEnd::Cut)
        );
        assert_eq!(
            end_of_pull(StatusCode::REQUEST_TERMINATED, "Consumer Deleted", None),
            Some(PullEnd::Cut)
        );
        assert_eq!(
            end_of_pull(StatusCode::NO_RESPONDERS, "", None),
            Some(PullEnd::Refused)
        );
        let bad_request = StatusCode::from_u16(400).expect("a status code");
        assert_eq!(
            end_of_pull(bad_request, "Bad Request", None),
            Some(PullEnd::Refused)
        );
    }
}
