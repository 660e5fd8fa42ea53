//! One pull request on the intake's consumer, as both pullers (the unordered loop in
//! `durable.rs` and the ordered puller) make it.

use std::time::Duration;

use async_nats::jetstream::consumer;
use tokio_util::sync::CancellationToken;

use super::route::Router;
use crate::cancel::pause;

/// Messages fetched from JetStream per pull request.
pub(super) const FETCH_BATCH: usize = 500;
/// Bytes fetched per pull request at most (raised to just above max_payload if that is larger:
/// a pull must be able to take the largest message).
pub(super) const FETCH_MAX_BYTES: usize = 256 << 10;
/// How long one pull request waits for messages; also the most a shutdown waits for a fetch.
pub(super) const FETCH_EXPIRES: Duration = Duration::from_millis(500);

/// How long a pull request waits, and for how much.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Pull {
    /// Up to [`FETCH_BATCH`] messages, waiting up to [`FETCH_EXPIRES`] for them to come (the
    /// unordered loop: a busy stream fills it at once, an idle one is asked twice a second).
    Full,
    /// What the consumer has now, up to [`FETCH_BATCH`]; ends at once when it has nothing.
    Now,
    /// The next message, waiting up to [`FETCH_EXPIRES`] for it; ends as soon as it came.
    Next,
}

impl Router {
    /// Send one pull request; its messages arrive into the returned batch.
    pub(crate) async fn request_batch(
        &self,
        consumer: &consumer::Consumer<consumer::pull::Config>,
        cancel: &CancellationToken,
        pull: Pull,
    ) -> Option<consumer::pull::Batch> {
        // Bounded in bytes too: 500 batch messages could hold 500,000 entries. This matters
        // beyond memory: async-nats abandons a pull's undelivered-to-us messages once
        // `expires` + 5 s have passed since the request, and those then wait out ack_wait; so
        // one pull must always be routed well within that, even into full queues.
        let max_bytes = FETCH_MAX_BYTES.max(self.queries.outbox.max_payload() + (64 << 10));
        let batch = match pull {
            Pull::Full | Pull::Next => {
                consumer
                    .batch()
                    .max_messages(if pull == Pull::Next { 1 } else { FETCH_BATCH })
                    .max_bytes(max_bytes)
                    .expires(FETCH_EXPIRES)
                    .messages()
                    .await
            }
            Pull::Now => {
                consumer
                    .fetch()
                    .max_messages(FETCH_BATCH)
                    .max_bytes(max_bytes)
                    .messages()
                    .await
            }
        };
        match batch {
            Ok(batch) => Some(batch),
            Err(e) => {
                tracing::warn!(error = %e, "JetStream fetch failed; retrying");
                pause(cancel, Duration::from_millis(500)).await;
                None
            }
        }
    }
}
