//! With `--verify`: the run's appends the workers refused for good, counted from their
//! `rejected.<id>` events (subscribed to before the run sends anything), so a report that
//! finds acknowledged appends missing also says how many were refused and why.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use futures::StreamExt;
use logstore_protocol::RejectedEvent;
use tokio::task::JoinHandle;

/// This run's refused appends: distinct keys, and how many by error code.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Refusals {
    pub appends: u64,
    pub by_code: BTreeMap<String, u64>,
}

impl Refusals {
    /// Count `event` if it is about one of this run's appends (its key starts with
    /// `prefix`), once per key however often it is announced (a redelivery repeats it).
    pub fn count(&mut self, event: &RejectedEvent, prefix: &str, seen: &mut HashSet<String>) {
        let Some(key) = &event.key else { return };
        if !key.starts_with(prefix) || !seen.insert(key.clone()) {
            return;
        }
        self.appends += 1;
        *self
            .by_code
            .entry(event.error.code.as_str().to_string())
            .or_default() += 1;
    }
}

impl fmt::Display for Refusals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refused by the workers (rejected events): {}",
            self.appends
        )?;
        if !self.by_code.is_empty() {
            let codes: Vec<String> = self
                .by_code
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect();
            write!(f, " ({})", codes.join(", "))?;
        }
        Ok(())
    }
}

/// The subscription to `<rejected_prefix>.>` and the task counting what it hears.
pub struct Watch {
    stop: tokio_util::sync::CancellationToken,
    task: JoinHandle<Refusals>,
}

impl Watch {
    /// Subscribe and start counting; `None` (and a line on stderr) when the subscription
    /// cannot be made. A server that refuses this user the subject says so out of band: then
    /// nothing is counted, and the report says 0.
    pub async fn start(
        client: &async_nats::Client,
        rejected_prefix: &str,
        prefix: String,
    ) -> Option<Watch> {
        let subject = format!("{rejected_prefix}.>");
        let mut events = match client.subscribe(subject.clone()).await {
            Ok(events) => events,
            Err(e) => {
                eprintln!("loadgen: not counting refusals: cannot subscribe to {subject}: {e}");
                return None;
            }
        };
        if let Err(e) = client.flush().await {
            eprintln!("loadgen: not counting refusals: {e}");
            return None;
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut refusals = Refusals::default();
            let mut seen = HashSet::new();
            let mut take = |message: async_nats::Message| {
                if let Ok(event) = serde_json::from_slice::<RejectedEvent>(&message.payload) {
                    refusals.count(&event, &prefix, &mut seen);
                }
            };
            loop {
                tokio::select! {
                    biased;
                    Some(message) = events.next() => take(message),
                    _ = stopped.cancelled() => break,
                    else => break,
                }
            }
            // What already arrived still counts.
            while let Some(Some(message)) = futures::FutureExt::now_or_never(events.next()) {
                take(message);
            }
            refusals
        });
        Some(Watch { stop, task })
    }

    /// Stop counting and return the count; a flush first, so every event the server sent
    /// before is in.
    pub async fn finish(self, client: &async_nats::Client) -> Refusals {
        let _ = client.flush().await;
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use logstore_protocol::{ErrorBody, ErrorCode};

    #[test]
    fn counts_this_runs_keys_once_each() {
        let event = |key: Option<&str>, code| RejectedEvent {
            id: 1,
            key: key.map(str::to_string),
            error: ErrorBody::new(code, "x"),
            stream_seq: None,
        };
        let mut refusals = Refusals::default();
        let mut seen = HashSet::new();
        for e in [
            event(Some("run1-1"), ErrorCode::Conflict),
            event(Some("run1-1"), ErrorCode::Conflict),
            event(Some("run1-2"), ErrorCode::TooLarge),
            event(Some("run2-1"), ErrorCode::TooLarge),
            event(None, ErrorCode::InvalidRequest),
        ] {
            refusals.count(&e, "run1-", &mut seen);
        }
        assert_eq!(refusals.appends, 2);
        assert_eq!(
            refusals.to_string(),
            "refused by the workers (rejected events): 2 (conflict 1, too_large 1)"
        );
    }
}
