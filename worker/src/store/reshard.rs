//! Resharding on one shard's side (docs/resharding.md): the ring fence, the scans for live
//! objects and tombstones, moving an object to another shard (its bulk copied first, the rest
//! under its lock), purging what a tombstone still holds, and the shard's copy of the ring
//! record (migrations/0007_resharding.sql and 0008_fleet.sql).
//!
//! The move is client-side, across two databases; every other write here is one statement.

use std::time::{Duration, SystemTime};

use tokio_postgres::{GenericClient, Row as PgRow};

use super::{seq_bound, Shard, StoreError};

/// Copies of an object's entries, as `(object_id, seq, ts, key, log)` arrays: `$1` the id,
/// then the columns of [`Entries`]. A row already there is the same entry (seqs are never
/// reused), so a conflict is skipped.
const INSERT_ENTRIES: &str = "INSERT INTO logs (object_id, seq, ts, key, log)
     SELECT $1, u.seq, u.ts, u.key, u.log
     FROM unnest($2::bigint[], $3::timestamptz[], $4::text[], $5::text[]) AS u(seq, ts, key, log)
     ON CONFLICT DO NOTHING";

/// `SELECT seq, ts, key, log` rows as the columns [`INSERT_ENTRIES`] takes.
#[derive(Default)]
struct Entries {
    seqs: Vec<i64>,
    ts: Vec<SystemTime>,
    keys: Vec<Option<String>>,
    logs: Vec<String>,
}

impl Entries {
    fn from_rows(rows: &[PgRow]) -> Result<Entries, tokio_postgres::Error> {
        let mut entries = Entries::default();
        for row in rows {
            entries.seqs.push(row.try_get("seq")?);
            entries.ts.push(row.try_get("ts")?);
            entries.keys.push(row.try_get("key")?);
            entries.logs.push(row.try_get("log")?);
        }
        Ok(entries)
    }
}

/// An object's head row as a move carries it to the new shard. Timestamps are text: a head
/// without entries holds '-infinity', which has no SystemTime (ISO output carries its offset,
/// so the text is unambiguous).
struct Head {
    entries: i64,
    last_seq: i64,
    last_ts: String,
    prev_ts: Option<String>,
    first_seq: Option<i64>,
    first_ts: Option<String>,
    bytes: i64,
    moved_to: Option<String>,
}

impl Head {
    /// The columns of the statement that locks the head row in `move_locked`.
    const SELECT_FOR_UPDATE: &'static str =
        "SELECT entries, last_seq, last_ts::text AS last_ts, prev_ts::text AS prev_ts, first_seq,
                first_ts::text AS first_ts, bytes, moved_to
         FROM objects WHERE id = $1 FOR UPDATE";

    fn from_row(row: &PgRow) -> Result<Head, tokio_postgres::Error> {
        Ok(Head {
            entries: row.try_get("entries")?,
            last_seq: row.try_get("last_seq")?,
            last_ts: row.try_get("last_ts")?,
            prev_ts: row.try_get("prev_ts")?,
            first_seq: row.try_get("first_seq")?,
            first_ts: row.try_get("first_ts")?,
            bytes: row.try_get("bytes")?,
            moved_to: row.try_get("moved_to")?,
        })
    }
}

/// What moving one object copied: entries before its lock (`bulk`) and under it (`locked`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub bulk: u64,
    pub locked: u64,
}

/// What a shard keeps of the ring ([`Shard::ring_copy`]): its identity, its fence and its copy
/// of the ring record (None before migration 0008 or before any was kept; an error when the
/// copy does not decode).
#[derive(Debug, Clone)]
pub struct RingCopy {
    pub name: String,
    pub fleet: Option<String>,
    pub fence: u64,
    pub record: Option<Result<crate::ring::Record, String>>,
}

impl RingCopy {
    fn from_row(row: &PgRow) -> Result<RingCopy, tokio_postgres::Error> {
        Ok(RingCopy {
            name: row.try_get("name")?,
            fleet: row.try_get("fleet")?,
            fence: u64::try_from(row.try_get::<_, i64>("epoch")?).unwrap_or(0),
            record: row
                .try_get::<_, Option<String>>("ring_record")?
                .map(|json| {
                    crate::ring::Record::from_json(json.as_bytes()).map_err(|e| e.to_string())
                }),
        })
    }
}

impl Shard {
    /// The shard's identity, fence and copy of the ring record (migration 0008), read without
    /// changing anything: for `worker shards repair` and for a worker that cannot read the
    /// record in NATS.
    pub async fn ring_copy(&self) -> Result<RingCopy, StoreError> {
        let rows = self
            .rows(
                "SELECT i.name, i.fleet, f.epoch, f.ring_record FROM shard_identity i, ring_fence f",
                &[],
            )
            .await?;
        let row = rows.first().ok_or_else(|| StoreError::Unexpected {
            shard: self.name.clone(),
            what: "no shard_identity or ring_fence row".into(),
        })?;
        RingCopy::from_row(row).map_err(|e| self.bad_row(e))
    }

    /// Keep `record` as this shard's copy of the ring (unless a later one is kept; `force`: also
    /// over one of the same epoch and step), raising the fence to its epoch first when `raise`
    /// (see migrations/0008_fleet.sql).
    pub async fn keep_ring(
        &self,
        record: &crate::ring::Record,
        force: bool,
        raise: bool,
    ) -> Result<(), StoreError> {
        self.ready()?;
        let (epoch, step) = record.rank();
        let json = record.to_json();
        self.rows_at(
            epoch,
            "SELECT logstore_keep_ring($1, $2, $3, $4, $5)",
            &[&seq_bound(epoch), &i16::from(step), &json, &force, &raise],
        )
        .await
        .map(drop)
    }

    /// Raise this shard's ring fence to `epoch` (the mover, before it scans for objects to
    /// move: from then on no worker of an older epoch can create an object here).
    pub async fn raise_fence(&self, epoch: u64) -> Result<(), StoreError> {
        self.ready()?;
        self.rows_at(epoch, "SELECT logstore_fence($1)", &[&seq_bound(epoch)])
            .await
            .map(drop)
    }

    /// Up to `limit` ids of the objects living here (head rows without a tombstone marker),
    /// the next ones after `after` in the table's (bigint) id order.
    pub async fn live_ids(&self, after: Option<i64>, limit: i64) -> Result<Vec<i64>, StoreError> {
        self.ready()?;
        let rows = self
            .rows(
                "SELECT id FROM objects WHERE moved_to IS NULL AND id > $1 ORDER BY id LIMIT $2",
                &[&after.unwrap_or(i64::MIN), &limit],
            )
            .await?;
        // `id > i64::MIN` leaves out that one id: ask for it on the first page.
        let mut ids = self.ids(&rows)?;
        if after.is_none() {
            if let (true, None) = self.whereabouts(i64::MIN as u64).await? {
                ids.insert(0, i64::MIN);
            }
        }
        Ok(ids)
    }

    /// Move object `id` from this shard to `to` (see docs/resharding.md, "Moving one object"):
    /// an object of more than one `page` of entries first has its bulk copied without any lock
    /// ([`Shard::precopy`]); then its head row here is locked, `to` keeps the copied entries
    /// that are still here (trimming what was deleted here meanwhile), the rest are copied in
    /// pages of `page` rows with their seq, ts and key, and `to` commits; then the head row here
    /// becomes a tombstone naming `to`. Returns the entries copied, or None when the object was
    /// already moved (or is not here). Idempotent: run again after a failure at
    /// any point, it finishes the move without losing or doubling anything.
    pub async fn move_to(
        &self,
        to: &Shard,
        id: u64,
        epoch: u64,
        page: i64,
    ) -> Result<Option<Copied>, StoreError> {
        self.ready()?;
        to.ready()?;
        // Each round trip is bounded, not the move as a whole: a large object takes as long as
        // its copy keeps making progress, and a shard that stops answering fails the attempt.
        let limit = self.step_limit();
        let bulk = self.precopy(to, id, page).await?;
        let locked = self.move_locked(to, id as i64, epoch, page, limit).await?;
        Ok(locked.map(|locked| Copied { bulk, locked }))
    }

    /// Copy the bulk of object `id` to `to` without locking it here, one page of `page` entries
    /// per transaction, up to its last entry when this starts; resumes after the highest seq
    /// `to` holds for it. Does nothing for an object of at most one page, a tombstone, or an
    /// object not here. Returns the entries copied.
    ///
    /// Sound because entries are never changed and seqs never reused: a deletion (a request or
    /// retention) removes a prefix, and the head keeps `last_seq`. So every entry `to` holds
    /// for `id` equals the one here with the same seq, or was deleted here since, below the
    /// head's `first_seq`; [`Shard::move_to`] trims those under the lock and checks that what
    /// is left runs without a gap from `first_seq`.
    pub async fn precopy(&self, to: &Shard, id: u64, page: i64) -> Result<u64, StoreError> {
        self.ready()?;
        to.ready()?;
        let limit = self.step_limit();
        let id = id as i64;
        let source = self.client_within(limit).await?;
        let head = self
            .step(
                limit,
                source.query_opt(
                    "SELECT entries, last_seq FROM objects WHERE id = $1 AND moved_to IS NULL",
                    &[&id],
                ),
            )
            .await?;
        let Some(head) = head else { return Ok(0) };
        let decode = |row: &PgRow| -> Result<(i64, i64), tokio_postgres::Error> {
            Ok((row.try_get("entries")?, row.try_get("last_seq")?))
        };
        let (entries, until) = decode(&head).map_err(|e| self.bad_row(e))?;
        if entries <= page {
            return Ok(0);
        }
        let target = to.client_within(limit).await?;
        let after: i64 = to
            .step(
                limit,
                target.query_one(
                    "SELECT coalesce(max(seq), 0) AS top FROM logs WHERE object_id = $1",
                    &[&id],
                ),
            )
            .await?
            .try_get("top")
            .map_err(|e| to.bad_row(e))?;
        self.copy_entries(to, (&**source, &**target), id, after, until, page, limit)
            .await
    }

    /// Copy object `id`'s entries with seqs in `after+1..=until` from here (`source`) to `to`
    /// (`target`), in pages of `page`, each round trip within `limit`. Returns how many.
    #[allow(clippy::too_many_arguments)]
    async fn copy_entries(
        &self,
        to: &Shard,
        (source, target): (&impl GenericClient, &impl GenericClient),
        id: i64,
        mut after: i64,
        until: i64,
        page: i64,
        limit: Duration,
    ) -> Result<u64, StoreError> {
        let mut copied = 0;
        while after < until {
            let rows = self
                .step(
                    limit,
                    source.query(
                        "SELECT seq, ts, key, log FROM logs
                         WHERE object_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
                        &[&id, &after, &until, &page],
                    ),
                )
                .await?;
            let entries = Entries::from_rows(&rows).map_err(|e| self.bad_row(e))?;
            let Some(&last) = entries.seqs.last() else {
                break;
            };
            after = last;
            to.step(
                limit,
                target.execute(
                    INSERT_ENTRIES,
                    &[
                        &id,
                        &entries.seqs,
                        &entries.ts,
                        &entries.keys,
                        &entries.logs,
                    ],
                ),
            )
            .await?;
            copied += rows.len() as u64;
        }
        Ok(copied)
    }

    /// The move under the object's lock (see [`Shard::move_to`]): a transaction here (`a`)
    /// locks the head row; one on `to` (`b`) keeps what the precopy left that is still right,
    /// writes the head and copies the rest, and commits; then `a` turns the head row into a
    /// tombstone and commits. Both fence at `epoch` first.
    async fn move_locked(
        &self,
        to: &Shard,
        id: i64,
        epoch: u64,
        page: i64,
        limit: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let mut source = self.client_within(limit).await?;
        let mut target = to.client_within(limit).await?;
        let a = self.step(limit, source.transaction()).await?;
        let fence = "SELECT logstore_fence($1)";
        self.step_at(limit, epoch, a.execute(fence, &[&seq_bound(epoch)]))
            .await?;
        let Some(head) = self
            .step(limit, a.query_opt(Head::SELECT_FOR_UPDATE, &[&id]))
            .await?
        else {
            return Ok(None);
        };
        let head = Head::from_row(&head).map_err(|e| self.bad_row(e))?;
        if head.moved_to.is_some() {
            return Ok(None);
        }
        let b = to.step(limit, target.transaction()).await?;
        to.step_at(limit, epoch, b.execute(fence, &[&seq_bound(epoch)]))
            .await?;
        let after = to.keep_precopied(&*b, id, &head, limit).await?;
        to.write_head(&*b, id, &head, limit).await?;
        let copied = self
            .copy_entries(to, (&*a, &*b), id, after, head.last_seq, page, limit)
            .await?;
        to.step(limit, b.commit()).await?;
        self.step(
            limit,
            a.execute(
                "UPDATE objects SET moved_to = $2, moved_epoch = $3 WHERE id = $1",
                &[&id, &to.name, &seq_bound(epoch)],
            ),
        )
        .await?;
        self.step(limit, a.commit()).await?;
        Ok(Some(copied))
    }

    /// On the move's target (`b`, this shard): keep the copied entries of `id` that the source's
    /// `head` still holds, and return the seq after which copying goes on (`i64::MIN`: all).
    ///
    /// `b` is not authoritative for this object until the source's tombstone commits: its head
    /// row is a copy from an interrupted attempt or a tombstone of an earlier move away, and its
    /// entries are copies (see [`Shard::precopy`]). Those below the first entry at the source
    /// were deleted there since; the rest are kept if they run without a gap from it (always,
    /// by the reasoning in `precopy`; else everything is copied again).
    async fn keep_precopied(
        &self,
        b: &impl GenericClient,
        id: i64,
        head: &Head,
        limit: Duration,
    ) -> Result<i64, StoreError> {
        let (first, last) = (head.first_seq, head.last_seq);
        self.step(
            limit,
            b.execute(
                "DELETE FROM logs WHERE object_id = $1
                 AND ($2::bigint IS NULL OR seq < $2 OR seq > $3)",
                &[&id, &first, &last],
            ),
        )
        .await?;
        let held = self
            .step(
                limit,
                b.query_one(
                    "SELECT count(*) AS count, max(seq) AS top FROM logs WHERE object_id = $1",
                    &[&id],
                ),
            )
            .await?;
        let decode = |row: &PgRow| -> Result<(i64, Option<i64>), tokio_postgres::Error> {
            Ok((row.try_get("count")?, row.try_get("top")?))
        };
        let (count, top) = decode(&held).map_err(|e| self.bad_row(e))?;
        Ok(match (first, top) {
            (Some(first), Some(top)) if top - first + 1 == count => top,
            (_, None) => i64::MIN,
            _ => {
                tracing::warn!(shard = %self.name, id, "copied entries do not match; copying the object again");
                self.step(
                    limit,
                    b.execute("DELETE FROM logs WHERE object_id = $1", &[&id]),
                )
                .await?;
                i64::MIN
            }
        })
    }

    /// On the move's target (`b`, this shard): replace the head row of `id` with the source's.
    async fn write_head(
        &self,
        b: &impl GenericClient,
        id: i64,
        head: &Head,
        limit: Duration,
    ) -> Result<(), StoreError> {
        self.step(
            limit,
            b.execute("DELETE FROM objects WHERE id = $1", &[&id]),
        )
        .await?;
        self.step(
            limit,
            b.execute(
                "INSERT INTO objects (id, entries, last_seq, last_ts, prev_ts, first_seq, first_ts, bytes)
                 VALUES ($1, $2, $3, $4::text::timestamptz, $5::text::timestamptz, $6,
                         $7::text::timestamptz, $8)",
                &[
                    &id,
                    &head.entries,
                    &head.last_seq,
                    &head.last_ts,
                    &head.prev_ts,
                    &head.first_seq,
                    &head.first_ts,
                    &head.bytes,
                ],
            ),
        )
        .await
        .map(drop)
    }

    /// Up to `limit` tombstones here that still hold their old entries.
    pub async fn tombstones(&self, limit: i64) -> Result<Vec<i64>, StoreError> {
        self.ready()?;
        let rows = self
            .rows(
                "SELECT id FROM objects
                 WHERE moved_to IS NOT NULL AND (entries > 0 OR first_seq IS NOT NULL)
                 ORDER BY id LIMIT $1",
                &[&limit],
            )
            .await?;
        self.ids(&rows)
    }

    /// Delete a tombstone's old entries, `step` rows per transaction, and empty its head row.
    /// Only ever touches an object whose head row here is a tombstone.
    pub async fn purge(&self, id: i64, step: i64) -> Result<u64, StoreError> {
        self.ready()?;
        let mut purged = 0;
        loop {
            let rows = self
                .rows(
                    "WITH gone AS (
                         DELETE FROM logs l
                         WHERE l.object_id = $1
                           AND l.seq IN (SELECT seq FROM logs
                                         WHERE object_id = $1 ORDER BY seq LIMIT $2)
                           AND EXISTS (SELECT 1 FROM objects o
                                       WHERE o.id = $1 AND o.moved_to IS NOT NULL)
                         RETURNING 1
                     )
                     SELECT count(*) AS purged FROM gone",
                    &[&id, &step],
                )
                .await?;
            let n: i64 = match rows.first() {
                Some(row) => row.try_get("purged").map_err(|e| self.bad_row(e))?,
                None => 0,
            };
            purged += n as u64;
            if n < step {
                break;
            }
        }
        self.rows(
            "UPDATE objects SET entries = 0, bytes = 0, first_seq = NULL, first_ts = NULL
             WHERE id = $1 AND moved_to IS NOT NULL",
            &[&id],
        )
        .await?;
        Ok(purged)
    }

    /// Whether `id` has a head row here, and where it moved if it is a tombstone.
    pub async fn whereabouts(&self, id: u64) -> Result<(bool, Option<String>), StoreError> {
        let rows = self
            .rows(
                "SELECT moved_to FROM objects WHERE id = $1",
                &[&(id as i64)],
            )
            .await?;
        Ok(match rows.first() {
            None => (false, None),
            Some(row) => (true, row.try_get("moved_to").map_err(|e| self.bad_row(e))?),
        })
    }

    /// The `id` column of `rows`.
    fn ids(&self, rows: &[PgRow]) -> Result<Vec<i64>, StoreError> {
        rows.iter()
            .map(|row| row.try_get("id").map_err(|e| self.bad_row(e)))
            .collect()
    }
}
