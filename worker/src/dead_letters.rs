//! The dead-letter stream (DEAD_LETTERS_STREAM, `DEAD_LETTERS` by default): a small JetStream
//! stream with limits (DEAD_LETTERS_MAX_AGE, DEAD_LETTERS_MAX_MSGS, DEAD_LETTERS_MAX_BYTES;
//! the oldest go first) that captures the dead-letter subject, so that what the workers refused
//! is kept for a while and an operator can list the last dead letters (`logstore
//! dead-letters`), not only follow them as they come. The copies are still core messages:
//! whoever subscribes to the subject sees them as before, and a worker never waits for the
//! stream.
//!
//! Every worker creates the stream, or updates it to its limits, once at start (in the
//! background, retrying while JetStream cannot be reached); subjects another fleet added to it
//! are kept. Without JetStream (core intake on a server without it) dead letters are core
//! messages only, as before, and the worker says so once.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio_util::sync::CancellationToken;

use crate::cancel::{pause, Backoff};
use crate::config::DeadLetterStream;
use crate::Chain;

/// First and longest pause between attempts to set the stream up.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The stream as `settings` describe it, capturing `subject` (and whatever `existing` already
/// captures).
pub fn wanted(
    settings: &DeadLetterStream,
    subject: &str,
    existing: Option<&stream::Config>,
) -> stream::Config {
    let mut subjects: Vec<String> = existing.map(|c| c.subjects.clone()).unwrap_or_default();
    if !subjects.iter().any(|s| s == subject) {
        subjects.push(subject.to_string());
    }
    stream::Config {
        name: settings.name.clone(),
        description: Some("logstore: the last dead letters (refused messages)".to_string()),
        subjects,
        retention: stream::RetentionPolicy::Limits,
        // Full: the oldest dead letters go, the newest are kept.
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        max_age: settings.max_age,
        max_messages: settings.max_messages,
        max_bytes: settings.max_bytes,
        ..Default::default()
    }
}

/// Create or update the stream of `settings` capturing `subject`, retrying with backoff while
/// that fails, until it is done or `cancel` fires.
pub async fn keep(
    client: async_nats::Client,
    subject: String,
    settings: DeadLetterStream,
    cancel: CancellationToken,
) {
    let context = jetstream::new(client);
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    let mut logged = false;
    loop {
        let attempt = async {
            let existing = match context.get_stream(&settings.name).await {
                Ok(mut found) => found.info().await.ok().map(|info| info.config.clone()),
                Err(_) => None,
            };
            context
                .create_or_update_stream(wanted(&settings, &subject, existing.as_ref()))
                .await
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = attempt => result,
        };
        match result {
            Ok(_) => {
                tracing::info!(stream = %settings.name, %subject, "dead letters are kept in a JetStream stream");
                return;
            }
            Err(e) => {
                if !logged {
                    tracing::warn!(stream = %settings.name, %subject, error = %Chain(&e), "cannot keep dead letters in a JetStream stream (they are still published); retrying");
                    logged = true;
                }
                if !pause(&cancel, backoff.next_pause()).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_keeps_the_last_dead_letters_within_its_limits() {
        let settings = DeadLetterStream {
            name: "DEAD_LETTERS".into(),
            max_age: Duration::from_secs(3600),
            max_messages: 10,
            max_bytes: -1,
        };
        let config = wanted(&settings, "dead_letter", None);
        assert_eq!(config.subjects, ["dead_letter"]);
        assert_eq!(config.discard, stream::DiscardPolicy::Old);
        assert_eq!(config.retention, stream::RetentionPolicy::Limits);
        assert_eq!(config.max_messages, 10);
        // Another fleet's subject stays; ours is not added twice.
        let other = wanted(&settings, "t.dead_letter", Some(&config));
        assert_eq!(other.subjects, ["dead_letter", "t.dead_letter"]);
        let again = wanted(&settings, "dead_letter", Some(&config));
        assert_eq!(again.subjects, ["dead_letter"]);
    }
}
