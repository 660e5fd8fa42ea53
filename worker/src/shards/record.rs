//! Following the fleet's ring record: read it at start (seeding it when the fleet has none),
//! watch it, re-read it when a shard is fenced at a newer epoch, and keep the shards' copies of
//! it for when the record itself is lost or does not decode.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{seed_record, Shards, REFRESH_WAIT, RETRY, RETRY_MAX, UNKNOWN_FENCE_RECHECK};
use crate::cancel::{pause, Backoff};
use crate::membership::{Membership, MembershipError};
use crate::ring::Record;
use crate::store::Shard;
use crate::Chain;

/// The last cause logged for a ring record that cannot be read or used: a new cause is logged
/// (once), a repeat is not, and the record becoming usable again is logged once.
#[derive(Default)]
pub struct RingTrouble(std::sync::Mutex<Option<String>>);

impl RingTrouble {
    /// `cause` happened: true when it is news (log it).
    pub fn news(&self, cause: &str) -> bool {
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.as_deref() == Some(cause) {
            return false;
        }
        *last = Some(cause.to_string());
        true
    }

    /// The record is usable again: true when it was not (log that once).
    pub fn over(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .is_some()
    }
}

impl Shards {
    /// Read the fleet's ring record (seeding it from POSTGRES_SHARDS when the fleet has none)
    /// and route by it. Gives up after `wait` (NATS unreachable, or without JetStream): the
    /// worker then routes by POSTGRES_SHARDS at epoch 0, and [`Shards::follow`] keeps trying.
    /// A record that does not decode is routed around with the shards' own copies of it
    /// ([`Shards::best_copy`]): ring changes stop until it is repaired, requests do not.
    pub async fn load(&self, client: &async_nats::Client, wait: Duration) {
        let attempt = async {
            let membership = self.membership(client).await?;
            let seed = Record {
                fleet: Some(self.seed_fleet().await),
                ..seed_record(&self.inner.builder.config, 1)
            };
            membership.read_or_seed(&seed).await
        };
        match tokio::time::timeout(wait, attempt).await {
            Ok(Ok((record, _, wrote))) => {
                self.apply(record.clone()).await;
                if wrote {
                    self.keep_copies(&record).await;
                }
            }
            Ok(Err(e @ MembershipError::Decode { .. })) => {
                self.inner.ring_trouble.news(&Chain(&e).to_string());
                match self.best_copy().await {
                    Some(copy) => {
                        tracing::error!(error = %Chain(&e), epoch = copy.epoch, "routing by the shards' copy of the ring record");
                        self.apply(copy).await;
                    }
                    None => tracing::error!(error = %Chain(&e), "no shard keeps a copy of the ring record; routing by POSTGRES_SHARDS"),
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %Chain(&e), "cannot read the ring record yet; routing by POSTGRES_SHARDS until it can be read"),
            Err(_) => tracing::warn!("the ring record could not be read in time; routing by POSTGRES_SHARDS until it can be read"),
        }
    }

    /// The fleet id for a record this worker seeds: the one its shards record when every one
    /// that answers records the same (the record was lost, the fleet is the same), else a new
    /// one.
    async fn seed_fleet(&self) -> String {
        let view = self.view();
        let copies =
            futures::future::join_all(view.lanes.values().map(|lane| lane.shard.ring_copy())).await;
        let fleets: Vec<Option<String>> = copies
            .into_iter()
            .filter_map(Result::ok)
            .map(|copy| copy.fleet)
            .collect();
        match fleets.first() {
            Some(Some(fleet)) if fleets.iter().all(|f| f.as_ref() == Some(fleet)) => fleet.clone(),
            _ => crate::ring::new_fleet_id(),
        }
    }

    /// The latest copy of the ring record that this worker's shards keep and that belongs to
    /// the fleet the keeping shard belongs to (migrations/0008_fleet.sql).
    pub async fn best_copy(&self) -> Option<Record> {
        let view = self.view();
        let copies =
            futures::future::join_all(view.lanes.values().map(|lane| lane.shard.ring_copy())).await;
        copies
            .into_iter()
            .filter_map(Result::ok)
            .filter_map(|copy| match copy.record {
                Some(Ok(record)) if record.fleet.is_some() && record.fleet == copy.fleet => {
                    Some(record)
                }
                _ => None,
            })
            .max_by_key(Record::rank)
    }

    /// Keep `record` as the copy of every shard of the view (best effort: seeding).
    async fn keep_copies(&self, record: &Record) {
        let view = self.view();
        for lane in view.lanes.values() {
            if let Err(e) = lane.shard.keep_ring(record, true, false).await {
                tracing::debug!(shard = %lane.shard.name, error = %Chain(&e), "cannot keep a copy of the ring record");
            }
        }
    }

    /// The ring record cannot be read or used because of `e`: logged once per cause.
    pub fn ring_trouble(&self, e: &MembershipError) {
        let cause = Chain(e).to_string();
        if self.inner.ring_trouble.news(&cause) {
            tracing::error!(error = %cause, "the ring record cannot be used; routing by the last one known");
        }
    }

    /// The ring record was read and decoded.
    fn ring_fine(&self) {
        if self.inner.ring_trouble.over() {
            tracing::info!("the ring record is readable again");
        }
    }

    /// Follow the ring record until `cancel`: every change is applied as it is written. A
    /// record that does not decode is ignored (logged once per cause); a watch that keeps
    /// failing is retried with backoff.
    pub async fn follow(self: Arc<Self>, client: async_nats::Client, cancel: CancellationToken) {
        let mut logged = false;
        let mut backoff = Backoff::new(RETRY, RETRY_MAX);
        while !cancel.is_cancelled() {
            let membership = match self.membership(&client).await {
                Ok(membership) => membership,
                Err(e) => {
                    if !logged {
                        tracing::warn!(error = %Chain(&e), "cannot reach the ring record; retrying");
                        logged = true;
                    }
                    pause(&cancel, RETRY).await;
                    continue;
                }
            };
            let mut watch = match membership.watch().await {
                Ok(watch) => watch,
                Err(e) => {
                    if !logged {
                        tracing::warn!(error = %e, "cannot watch the ring record; retrying");
                        logged = true;
                    }
                    pause(&cancel, backoff.next_pause()).await;
                    continue;
                }
            };
            logged = false;
            let mut delivered = false;
            loop {
                let entry = tokio::select! {
                    _ = cancel.cancelled() => return,
                    entry = watch.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) => {
                        delivered = true;
                        match membership.decode(&entry) {
                            Ok(Some(record)) => {
                                self.ring_fine();
                                self.apply(record).await;
                            }
                            Ok(None) => {}
                            Err(e) => self.ring_trouble(&e),
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "ring watch failed; watching again");
                        break;
                    }
                    None => break,
                }
            }
            // A watch that ends before delivering anything is failing: back off (the pause
            // after it is the doubled one, as it always was).
            if delivered {
                backoff.reset();
            } else {
                backoff.next_pause();
            }
            pause(&cancel, backoff.current()).await;
        }
    }

    /// A request met `shard` fenced at `fence`: re-read the record until this worker routes
    /// by at least that epoch (or a few seconds passed while NATS does not answer; the request
    /// is then routed again by what is known, and meets the fence again if it must). A record
    /// that does not decode is stood in for by the shard's own copy. A fence that the record
    /// read does not reach is an epoch this fleet never had (the database is another fleet's,
    /// or the record was lost or rolled back): the shard says so (log, once per fence, and
    /// `/readyz`) and its requests fail at once.
    pub async fn refresh(&self, shard: &Shard, fence: u64) {
        let deadline = tokio::time::Instant::now() + REFRESH_WAIT;
        if shard.unknown_fence() >= fence && self.recently_checked() {
            return;
        }
        loop {
            if self.view().layout.epoch >= fence {
                return;
            }
            // Without the record (NATS or its KV out of reach) there is nothing to learn: the
            // request fails as in an outage instead of waiting.
            let Some(membership) = self.inner.membership.lock().await.clone() else {
                return;
            };
            match membership.read().await {
                Ok(Some((record, _))) => {
                    self.ring_fine();
                    self.apply(record).await;
                    break;
                }
                Ok(None) => break,
                Err(e @ MembershipError::Decode { .. }) => {
                    self.ring_trouble(&e);
                    break;
                }
                Err(e) => tracing::debug!(error = %Chain(&e), "cannot read the ring record"),
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if self.view().layout.epoch >= fence {
            return;
        }
        // The record in NATS does not reach the fence: the shard's own copy may (it keeps the
        // record whenever the mover raises its fence), if it is this fleet's.
        if let Ok(copy) = shard.ring_copy().await {
            let ours = self.view().layout.record.fleet.clone();
            if let Some(Ok(record)) = copy.record {
                if record.fleet.is_some() && record.fleet == ours && copy.fleet == ours {
                    self.apply(record).await;
                }
            }
        }
        let epoch = self.view().layout.epoch;
        if epoch >= fence {
            return;
        }
        self.mark_checked();
        if shard.note_unknown_fence(fence) {
            tracing::error!(
                shard = %shard.name,
                fence,
                epoch,
                "shard {} is fenced at ring epoch {fence}, which this fleet's ring record \
                 (epoch {epoch}) does not know: another fleet uses its database, or the ring \
                 record was lost or rolled back (`worker shards repair`); its objects answer \
                 `unavailable`",
                shard.name
            );
        }
    }

    fn recently_checked(&self) -> bool {
        self.inner
            .unknown_fence_checked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some_and(|at| at.elapsed() < UNKNOWN_FENCE_RECHECK)
    }

    fn mark_checked(&self) {
        *self
            .inner
            .unknown_fence_checked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(tokio::time::Instant::now());
    }

    /// The ring record's handle, opened when first needed.
    pub async fn membership(
        &self,
        client: &async_nats::Client,
    ) -> Result<Membership, MembershipError> {
        let mut slot = self.inner.membership.lock().await;
        if let Some(membership) = slot.as_ref() {
            return Ok(membership.clone());
        }
        let config = &self.inner.builder.config;
        let membership = Membership::open(client, &config.queue_group, config.js_replicas).await?;
        *slot = Some(membership.clone());
        Ok(membership)
    }
}
