//! The fleet's ring record in NATS KV: one key per queue group in [`BUCKET`], read, seeded,
//! compare-and-set written and watched, plus the move's [`Progress`] next to it. What the
//! record means (placement, epochs, move states) is [`crate::ring`]'s; this module only stores
//! it.

use serde::{Deserialize, Serialize};

use crate::ring::{Record, BUCKET};

/// The move's progress, written by the mover for `worker shards status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub epoch: u64,
    /// Objects found to move in the last scan.
    pub todo: u64,
    pub moved: u64,
    pub errors: u64,
    /// Old copies purged.
    pub purged: u64,
}

/// The latest entry of the ring record's key: its revision, and the record (None: deleted).
pub struct Stored {
    pub revision: u64,
    pub record: Option<Result<Record, MembershipError>>,
}

/// The ring record of one fleet in NATS KV.
#[derive(Clone)]
pub struct Membership {
    kv: async_nats::jetstream::kv::Store,
    key: String,
}

/// Why the ring record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cannot open the NATS KV bucket {BUCKET} (does the NATS server have JetStream enabled?): {0}")]
    Bucket(String),
    #[error("cannot read the ring record {key}: {source}")]
    Read {
        key: String,
        #[source]
        source: async_nats::jetstream::kv::EntryError,
    },
    #[error("cannot write the ring record {key}: {reason}")]
    Write { key: String, reason: String },
    #[error(
        "the ring record {key} does not decode ({source}): ring changes stop until it is \
         rewritten from the shards' copies with `worker shards repair`"
    )]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The record changed since it was read (compare-and-set lost).
    #[error("the ring record {key} changed meanwhile; read it again")]
    Changed { key: String },
}

impl Membership {
    /// Open (creating if missing) the bucket, on `replicas` servers (JS_REPLICAS), and address
    /// the record of `group`.
    pub async fn open(
        client: &async_nats::Client,
        group: &str,
        replicas: usize,
    ) -> Result<Membership, MembershipError> {
        let context = async_nats::jetstream::new(client.clone());
        // The record is the fleet's truth: it never expires (a few revisions kept).
        let config = crate::lease::bucket(
            BUCKET,
            "logstore: ring membership per queue group",
            std::time::Duration::ZERO,
            5,
            replicas,
        );
        let kv = crate::lease::ensure(&context, &config)
            .await
            .map_err(|e| MembershipError::Bucket(crate::Chain(&e).to_string()))?;
        Ok(Membership {
            kv,
            key: group.to_string(),
        })
    }

    /// The key's latest entry: None when the fleet never had a record; otherwise its revision
    /// and the record, None when deleted, an error when it does not decode.
    pub async fn entry(&self) -> Result<Option<Stored>, MembershipError> {
        let entry = self
            .kv
            .entry(&self.key)
            .await
            .map_err(|source| MembershipError::Read {
                key: self.key.clone(),
                source,
            })?;
        Ok(entry.map(|entry| Stored {
            revision: entry.revision,
            record: match entry.operation {
                async_nats::jetstream::kv::Operation::Put => {
                    Some(Record::from_json(&entry.value).map_err(|source| {
                        MembershipError::Decode {
                            key: self.key.clone(),
                            source,
                        }
                    }))
                }
                _ => None,
            },
        }))
    }

    /// The record and its revision, if the fleet has one.
    pub async fn read(&self) -> Result<Option<(Record, u64)>, MembershipError> {
        match self.entry().await? {
            Some(Stored {
                revision,
                record: Some(record),
            }) => Ok(Some((record?, revision))),
            _ => Ok(None),
        }
    }

    /// The record, seeded with `seed` if the fleet has none yet (exactly one seed wins); a
    /// record without a fleet id (written before them) is given `seed`'s. The flag says whether
    /// this call wrote the record.
    pub async fn read_or_seed(
        &self,
        seed: &Record,
    ) -> Result<(Record, u64, bool), MembershipError> {
        loop {
            if let Some((mut record, revision)) = self.read().await? {
                if record.fleet.is_some() || seed.fleet.is_none() {
                    return Ok((record, revision, false));
                }
                record.fleet = seed.fleet.clone();
                match self.write(&record, revision).await {
                    Ok(revision) => {
                        tracing::info!(
                            fleet = record.fleet.as_deref().map(tracing::field::display),
                            "gave the ring record a fleet id"
                        );
                        return Ok((record, revision, true));
                    }
                    Err(MembershipError::Changed { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            match self.create(seed).await {
                Ok(revision) => {
                    tracing::info!(epoch = seed.epoch, members = %Record::names(&seed.members).join(","), fleet = seed.fleet.as_deref().map(tracing::field::display), "seeded the ring record from POSTGRES_SHARDS");
                    return Ok((seed.clone(), revision, true));
                }
                Err(MembershipError::Changed { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Write `record` where the key has no record (never had one, or deleted); `Changed` when
    /// one exists.
    pub async fn create(&self, record: &Record) -> Result<u64, MembershipError> {
        match self.kv.create(&self.key, record.to_json().into()).await {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                Err(MembershipError::Changed {
                    key: self.key.clone(),
                })
            }
            Err(e) => Err(MembershipError::Write {
                key: self.key.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Replace the record read at `revision` (compare-and-set); the new revision.
    pub async fn write(&self, record: &Record, revision: u64) -> Result<u64, MembershipError> {
        let value = record.to_json();
        self.kv
            .update(&self.key, value.into(), revision)
            .await
            .map_err(|e| match e.kind() {
                async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision => {
                    MembershipError::Changed {
                        key: self.key.clone(),
                    }
                }
                _ => MembershipError::Write {
                    key: self.key.clone(),
                    reason: e.to_string(),
                },
            })
    }

    /// Updates of the record, as they happen (the current one first).
    pub async fn watch(
        &self,
    ) -> Result<async_nats::jetstream::kv::Watch, async_nats::jetstream::kv::WatchError> {
        self.kv.watch_with_history(&self.key).await
    }

    /// Decode a watched entry (Ok(None) for a deletion).
    pub fn decode(
        &self,
        entry: &async_nats::jetstream::kv::Entry,
    ) -> Result<Option<Record>, MembershipError> {
        if entry.operation != async_nats::jetstream::kv::Operation::Put {
            return Ok(None);
        }
        Record::from_json(&entry.value)
            .map(Some)
            .map_err(|source| MembershipError::Decode {
                key: self.key.clone(),
                source,
            })
    }

    /// The key the record is stored under (the queue group).
    pub fn key(&self) -> &str {
        &self.key
    }

    fn progress_key(&self) -> String {
        format!("{}.progress", self.key)
    }

    /// Publish the mover's progress (best effort: only `worker shards status` reads it).
    pub async fn put_progress(&self, progress: &Progress) {
        if let Ok(value) = serde_json::to_vec(progress) {
            if let Err(e) = self.kv.put(self.progress_key(), value.into()).await {
                tracing::debug!(error = %e, "cannot publish the move progress");
            }
        }
    }

    pub async fn progress(&self) -> Option<Progress> {
        let entry = self.kv.entry(self.progress_key()).await.ok()??;
        serde_json::from_slice(&entry.value).ok()
    }
}
