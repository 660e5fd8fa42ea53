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
//! nats-server restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, context::KeyValueError, kv, stream};
use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cancel::pause;

/// The KV bucket holding the leases: `intake.<stream>.<consumer>` (the ordered puller) and
/// `move.<queue group>` (the mover).
pub const LEASE_BUCKET: &str = "logstore_leases";

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
    /// used if this call creates the bucket.
    pub async fn open_named(
        client: &async_nats::Client,
        key: String,
        lease: Duration,
    ) -> Result<Lease, LeaseError> {
        let context = jetstream::new(client.clone());
        let bucket = bucket(
            LEASE_BUCKET,
            "logstore: which worker pulls each stream (JS_ORDERED) and which moves objects",
            lease,
            1,
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
    /// nats-server's store), so make sure it exists again.
    pub(crate) async fn reopen(&mut self) {
        match ensure_bucket(&self.context, &self.bucket).await {
            Ok(kv) => self.kv = kv,
            Err(e) => tracing::debug!(error = %crate::Chain(&e), "cannot reopen the lease bucket"),
        }
    }

    /// Take the lease if nobody holds it: its revision, or None while another worker does.
    pub(crate) async fn try_acquire(&self) -> Result<Option<u64>, kv::CreateError> {
        match self.kv.create(&self.key, self.holder.clone()).await {
            Ok(revision) => Ok(Some(revision)),
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
    /// Hold the lease taken at `revision` while `work` runs, renewing it every third of its
    /// lifetime. A renewal that fails, or cannot finish while the lease is surely still ours,
    /// counts as losing it: `work`'s token (a child of `cancel`) is cancelled. `work` also gets
    /// the lease's [`Validity`]. Returns what `work` returned and the last revision.
    pub(crate) async fn hold<T, F, Fut>(
        &self,
        revision: u64,
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
            start: Instant::now(),
            until_ms: std::sync::Arc::new(AtomicU64::new(ms(self.ttl * 2 / 3))),
        };
        let renew = async {
            let mut revision = revision;
            loop {
                if !pause(&done, self.ttl / 3).await {
                    return revision;
                }
                let started = Instant::now();
                match tokio::time::timeout(validity.left(), self.renew(revision)).await {
                    Ok(Ok(next)) => {
                        revision = next;
                        let until =
                            started.saturating_duration_since(validity.start) + self.ttl * 2 / 3;
                        validity.until_ms.store(ms(until), Ordering::Release);
                    }
                    outcome => {
                        let why = match outcome {
                            Ok(Err(e)) => e.to_string(),
                            _ => "no answer in time".to_string(),
                        };
                        tracing::warn!(error = %why, "lost the {what} lease; stopping");
                        lost.cancel();
                        return revision;
                    }
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
/// after it was written (zero: never).
pub fn bucket(bucket: &str, description: &str, max_age: Duration, history: i64) -> stream::Config {
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
        num_replicas: 1,
        ..Default::default()
    }
}

/// The bucket `config` describes, created when missing.
pub async fn ensure(
    context: &jetstream::Context,
    config: &stream::Config,
) -> Result<kv::Store, KeyValueError> {
    if context.get_stream(&config.name).await.is_err() {
        // Another worker may create it at the same moment: then this attempt fails and the
        // bucket is there all the same.
        if let Err(e) = context.create_stream(config.clone()).await {
            tracing::debug!(bucket = %config.name, error = %e, "KV bucket creation raced");
        }
    }
    let name = config.name.strip_prefix("KV_").unwrap_or(&config.name);
    context.get_key_value(name).await
}
