//! Leases and the NATS KV buckets the fleet coordinates through.
//!
//! A [`Lease`] is a key in [`LEASE_BUCKET`] whose value expires `ttl` after its last write: one
//! worker at a time pulls an ordered stream (`ordered`) or carries out a ring change (`mover`)
//! by holding one. The holder renews it every third of its lifetime and counts it lost once a
//! renewal cannot land while the lease is surely still its own ([`Lease::hold`]).
//!
//! The buckets (`logstore_leases`, and `logstore_ring` for the ring record) are created as
//! async-nats's `create_key_value` would, without its account-info request, which it cannot
//! parse from nats-server 2.9; with file storage, since a memory stream does not survive a
//! nats-server restart; with JS_REPLICAS copies (a bucket found with fewer is raised to that,
//! never lowered).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, context::KeyValueError, kv, stream};
use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cancel::{pause, Backoff};
use crate::nats::stream_missing;

/// The KV bucket holding the leases: `intake.<stream>.<consumer>` (the ordered puller) and
/// `move.<queue group>` (the mover).
pub const LEASE_BUCKET: &str = "logstore_leases";

/// The first pause before a failed renewal is tried again (it doubles up to a sixth of the
/// lease's lifetime).
const RENEW_RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest [`Lease::reopen`] waits for the bucket (during a JetStream election nobody
/// answers for seconds; the caller retries).
const REOPEN_WAIT: Duration = Duration::from_secs(1);

/// Why a lease could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("cannot open or create the KV bucket {bucket}: {source}")]
    Bucket {
        bucket: &'static str,
        #[source]
        source: KeyValueError,
    },
}

/// A lease: one key of [`LEASE_BUCKET`], held by whoever created it until it expires or is
/// released.
pub struct Lease {
    context: jetstream::Context,
    kv: kv::Store,
    /// The bucket's stream, as this worker would create it.
    bucket: jetstream::stream::Config,
    key: String,
    holder: Bytes,
    /// How long the lease outlives its last renewal (the bucket's max_age).
    pub(crate) ttl: Duration,
}

impl Lease {
    /// Open (or create) the lease bucket and address the lease `key`; `lease` is the lifetime
    /// used if this call creates the bucket, `replicas` its copies (JS_REPLICAS).
    pub async fn open_named(
        client: &async_nats::Client,
        key: String,
        lease: Duration,
        replicas: usize,
    ) -> Result<Lease, LeaseError> {
        let context = jetstream::new(client.clone());
        let bucket = bucket(
            LEASE_BUCKET,
            "logstore: which worker pulls each stream (JS_ORDERED) and which moves objects",
            lease,
            1,
            replicas,
        );
        let kv = ensure_bucket(&context, &bucket).await?;
        let ttl = match kv.status().await {
            Ok(status) if !status.info.config.max_age.is_zero() => status.info.config.max_age,
            _ => lease,
        };
        if ttl != lease {
            tracing::info!(bucket = %LEASE_BUCKET, lease = %crate::config::Human(ttl), "the lease bucket's lifetime differs from JS_LEASE_MS; using the bucket's");
        }
        Ok(Lease {
            context,
            kv,
            bucket,
            key,
            holder: Bytes::from(format!("pid {}", std::process::id())),
            ttl,
        })
    }

    /// The lease `key` in the same bucket, with the same lifetime.
    pub(crate) fn with_key(&self, key: String) -> Lease {
        Lease {
            context: self.context.clone(),
            kv: self.kv.clone(),
            bucket: self.bucket.clone(),
            key,
            holder: self.holder.clone(),
            ttl: self.ttl,
        }
    }

    /// The bucket's store (the partitioned intake keeps its member list there too).
    pub(crate) fn store(&self) -> &kv::Store {
        &self.kv
    }

    /// The key this lease is held under (for logs).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// After a failure: the bucket may be gone (deleted by an operator, or lost with a
    /// nats-server's store), so make sure it exists again. Waits at most [`REOPEN_WAIT`]: while
    /// JetStream elects a leader nobody answers, and the caller tries again anyway.
    pub(crate) async fn reopen(&mut self) {
        match tokio::time::timeout(REOPEN_WAIT, ensure_bucket(&self.context, &self.bucket)).await {
            Ok(Ok(kv)) => self.kv = kv,
            Ok(Err(e)) => {
                tracing::debug!(error = %crate::Chain(&e), "cannot reopen the lease bucket")
            }
            Err(_) => tracing::debug!("no answer about the lease bucket in time"),
        }
    }

    /// Take the lease if nobody holds it, or None while another worker does.
    pub(crate) async fn try_acquire(&self) -> Result<Option<Taken>, kv::CreateError> {
        let since = Instant::now();
        match self.kv.create(&self.key, self.holder.clone()).await {
            Ok(revision) => Ok(Some(Taken { revision, since })),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn renew(&self, revision: u64) -> Result<u64, kv::UpdateError> {
        self.kv
            .update(&self.key, self.holder.clone(), revision)
            .await
    }

    /// Give the lease up at once (clean shutdown), so another worker takes over without
    /// waiting for it to expire.
    pub(crate) async fn release(&self, revision: u64) {
        if let Err(e) = self
            .kv
            .delete_expect_revision(&self.key, Some(revision))
            .await
        {
            tracing::debug!(error = %e, "cannot release the intake lease; it expires by itself");
        }
    }
}

/// A lease just taken: its revision, and when the request that took it was sent (its key
/// expires no sooner than a lifetime after that).
pub(crate) struct Taken {
    pub(crate) revision: u64,
    since: Instant,
}

/// Until when a held lease is surely still this worker's (its last renewal plus two thirds of
/// its lifetime, as ms after a start instant). Cheap to clone.
#[derive(Clone)]
pub(crate) struct Validity {
    start: Instant,
    until_ms: std::sync::Arc<AtomicU64>,
}

impl Validity {
    /// The lease is surely still ours now.
    pub(crate) fn holds(&self) -> bool {
        ms(self.start.elapsed()) < self.until_ms.load(Ordering::Acquire)
    }

    fn left(&self) -> Duration {
        Duration::from_millis(self.until_ms.load(Ordering::Acquire))
            .saturating_sub(self.start.elapsed())
    }
}

impl Lease {
    /// Hold the lease `taken` while `work` runs, renewing it every third of its lifetime
    /// (counted from when it was taken: whatever `work` does first, a takeover that waits for
    /// JetStream say, runs under the renewals). A renewal that fails for a passing reason (a
    /// JetStream leader election, a reconnect: no responders, a timeout) is retried while the
    /// lease is surely still ours ([`Lease::renew_while_valid`]); one that is refused (another
    /// revision) or cannot land in that time counts as losing it: `work`'s token (a child of
    /// `cancel`) is cancelled. `work` also gets the lease's [`Validity`]. Returns what `work`
    /// returned and the last revision.
    pub(crate) async fn hold<T, F, Fut>(
        &self,
        taken: Taken,
        cancel: &CancellationToken,
        what: &str,
        work: F,
    ) -> (T, u64)
    where
        F: FnOnce(CancellationToken, Validity) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let lost = cancel.child_token();
        let done = CancellationToken::new();
        let validity = Validity {
            start: taken.since,
            until_ms: std::sync::Arc::new(AtomicU64::new(ms(self.ttl * 2 / 3))),
        };
        let renew = async {
            let mut revision = taken.revision;
            let mut last = taken.since;
            loop {
                let due = (last + self.ttl / 3).saturating_duration_since(Instant::now());
                if !pause(&done, due).await {
                    return revision;
                }
                let started = Instant::now();
                last = started;
                match self.renew_while_valid(revision, &validity, &done).await {
                    Renewal::Renewed(next) => {
                        revision = next;
                        let until =
                            started.saturating_duration_since(validity.start) + self.ttl * 2 / 3;
                        validity.until_ms.store(ms(until), Ordering::Release);
                    }
                    Renewal::Lost(why) => {
                        tracing::warn!(error = %why, "lost the {what} lease; stopping");
                        lost.cancel();
                        return revision;
                    }
                    Renewal::Stopped => return revision,
                }
            }
        };
        let run = async {
            let out = work(lost.clone(), validity.clone()).await;
            done.cancel();
            out
        };
        let (revision, out) = futures::join!(renew, run);
        (out, revision)
    }

    /// Renew the lease held at `revision`, retrying with backoff while `validity` holds: the
    /// new revision, or why it is lost (refused, or no renewal landed in time), or `Stopped`
    /// when `done` fired meanwhile. A refusal after an attempt whose outcome is unknown (its
    /// answer was lost) may be that attempt's own write: [`Lease::landed`] tells.
    async fn renew_while_valid(
        &self,
        revision: u64,
        validity: &Validity,
        done: &CancellationToken,
    ) -> Renewal {
        let mut backoff = Backoff::new(RENEW_RETRY_FIRST, self.attempt_timeout());
        let mut uncertain = false;
        let mut last = "no answer in time".to_string();
        loop {
            let left = validity.left();
            if left.is_zero() {
                return Renewal::Lost(last);
            }
            match tokio::time::timeout(left.min(self.attempt_timeout()), self.renew(revision)).await
            {
                Ok(Ok(next)) => return Renewal::Renewed(next),
                Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    if uncertain {
                        if let Some(next) = self.landed(revision, validity).await {
                            return Renewal::Renewed(next);
                        }
                    }
                    return Renewal::Lost(e.to_string());
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "no answer in time".to_string(),
            }
            uncertain = true;
            tracing::debug!(error = %last, key = %self.key, "lease renewal failed; retrying while the lease holds");
            if !pause(done, backoff.next_pause().min(validity.left())).await {
                return Renewal::Stopped;
            }
        }
    }

    /// After a renewal of `revision` was refused: the key's newer revision if it is a write of
    /// this holder that landed unseen. While `validity` holds, the key cannot have expired, so
    /// nobody else could create it and only this holder can have written it since `revision`.
    /// A replica that has not seen the write yet is asked again, while the lease holds.
    async fn landed(&self, revision: u64, validity: &Validity) -> Option<u64> {
        while validity.holds() {
            match tokio::time::timeout(validity.left(), self.kv.entry(&self.key)).await {
                Ok(Ok(Some(entry))) if entry.revision > revision => {
                    return (entry.operation == kv::Operation::Put && entry.value == self.holder)
                        .then_some(entry.revision);
                }
                Ok(Ok(Some(_))) | Ok(Err(_)) => {}
                Ok(Ok(None)) | Err(_) => return None,
            }
            tokio::time::sleep(RENEW_RETRY_FIRST).await;
        }
        None
    }

    /// The longest one renewal attempt may take before it is retried (its answer may have been
    /// lost with a server).
    fn attempt_timeout(&self) -> Duration {
        (self.ttl / 6).max(RENEW_RETRY_FIRST * 2)
    }
}

/// How a renewal ended.
enum Renewal {
    Renewed(u64),
    Lost(String),
    /// The holder's work ended meanwhile.
    Stopped,
}

/// The lease bucket, created when missing.
async fn ensure_bucket(
    context: &jetstream::Context,
    bucket: &jetstream::stream::Config,
) -> Result<kv::Store, LeaseError> {
    ensure(context, bucket)
        .await
        .map_err(|source| LeaseError::Bucket {
            bucket: LEASE_BUCKET,
            source,
        })
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The stream behind KV bucket `bucket`: `history` values per key, each expiring `max_age`
/// after it was written (zero: never), on `replicas` servers.
pub fn bucket(
    bucket: &str,
    description: &str,
    max_age: Duration,
    history: i64,
    replicas: usize,
) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_string()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history,
        max_age,
        max_message_size: -1,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The bucket `config` describes: created when missing, raised to `config`'s replicas when it
/// has fewer (never lowered). A bucket that cannot be read for another reason (no JetStream
/// leader yet) is an error: it is not created over.
pub async fn ensure(
    context: &jetstream::Context,
    config: &stream::Config,
) -> Result<kv::Store, KeyValueError> {
    match context.get_stream(&config.name).await {
        Ok(stream) => raise_replicas(context, &stream.cached_info().config, config).await,
        Err(e) if stream_missing(&e) => {
            // Another worker may create it at the same moment: then this attempt fails and the
            // bucket is there all the same.
            if let Err(e) = context.create_stream(config.clone()).await {
                tracing::debug!(bucket = %config.name, error = %e, "KV bucket creation raced");
            }
        }
        Err(e) => {
            return Err(KeyValueError::with_source(
                jetstream::context::KeyValueErrorKind::GetBucket,
                e,
            ))
        }
    }
    let name = config.name.strip_prefix("KV_").unwrap_or(&config.name);
    context.get_key_value(name).await
}

/// Give the bucket whose stream has `existing` config the replicas `wanted` names, when it has
/// fewer. A failure (one server of the cluster down, say) leaves it as it is, with a warning:
/// the bucket still works, and the next worker to open it tries again.
async fn raise_replicas(
    context: &jetstream::Context,
    existing: &stream::Config,
    wanted: &stream::Config,
) {
    if existing.num_replicas >= wanted.num_replicas {
        return;
    }
    let raised = stream::Config {
        num_replicas: wanted.num_replicas,
        ..existing.clone()
    };
    match context.update_stream(raised).await {
        Ok(_) => tracing::info!(
            bucket = %existing.name,
            from = existing.num_replicas,
            to = wanted.num_replicas,
            "raised the KV bucket's replicas to JS_REPLICAS"
        ),
        Err(e) => tracing::warn!(
            bucket = %existing.name,
            replicas = existing.num_replicas,
            wanted = wanted.num_replicas,
            error = %e,
            "cannot raise the KV bucket's replicas to JS_REPLICAS; using it as it is"
        ),
    }
}
