//! Waiting that stops on shutdown: one cancellable [`pause`] and one [`Backoff`] schedule.
//!
//! Every retry loop in the worker waits between attempts, and every such wait must end at once
//! when the worker stops (or the lane, lease or move it serves ends), or shutdown would wait
//! out the longest pause. The loops differ in what they log and when they reset; what they
//! share is here, so a new loop cannot forget the cancellation or spell the doubling again.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Sleep for `period`, or less if `cancel` fires first. True when the whole period passed
/// (false: cancelled, stop).
pub async fn pause(cancel: &CancellationToken, period: Duration) -> bool {
    cancel
        .run_until_cancelled(tokio::time::sleep(period))
        .await
        .is_some()
}

/// Run `task` until it ends or `cancel` fires, whichever comes first.
pub async fn until_cancelled(cancel: CancellationToken, task: impl Future<Output = ()>) {
    cancel.run_until_cancelled(task).await;
}

/// Pauses that double after each failure: `first`, `2 × first`, ... up to `max`, then `max`
/// for ever. Local rather than a crate (`backon`) because each loop keeps its own "log once
/// per cause" rule around it; this only says how long to wait.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// Start over at `first` (the call succeeded).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// The pause to make now; the one after is twice as long, at most `max`.
    pub fn next_pause(&mut self) -> Duration {
        let now = self.next;
        self.next = (now * 2).clamp(self.first, self.max);
        now
    }

    /// The pause [`Backoff::next_pause`] would give, without moving on.
    pub fn current(&self) -> Duration {
        self.next
    }
}

/// Never ends: `for pause in Backoff::new(..)` retries until the loop returns.
impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.next_pause())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_max_and_resets() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(250), ms(1_000));
        let first: Vec<Duration> = backoff.by_ref().take(5).collect();
        assert_eq!(first, [ms(250), ms(500), ms(1_000), ms(1_000), ms(1_000)]);
        assert_eq!(backoff.current(), ms(1_000));
        backoff.reset();
        assert_eq!(backoff.next_pause(), ms(250));
        assert_eq!(backoff.current(), ms(500));
    }

    #[tokio::test]
    async fn pause_ends_early_on_cancel() {
        let cancel = CancellationToken::new();
        assert!(pause(&cancel, Duration::from_millis(10)).await);
        cancel.cancel();
        let long = pause(&cancel, Duration::from_secs(3600));
        let ended = tokio::time::timeout(Duration::from_secs(5), long).await;
        assert_eq!(ended, Ok(false), "a cancelled pause returns at once");
    }
}
