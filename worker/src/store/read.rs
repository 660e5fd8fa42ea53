//! Reads: the statements a query and a stats request run ([`sql`], public so that a test can
//! EXPLAIN exactly them), the first page of a read with the object's head in one snapshot, the
//! later pages, and an object's statistics. Each checks the shard's ring fence and the
//! object's tombstone in the same snapshot as its data.

use std::time::SystemTime;

use tokio_postgres::Row as PgRow;

use super::{seq_bound, Shard, StoreError};

/// One stored entry, as read back.
#[derive(Debug, Clone)]
pub struct Row {
    pub seq: u64,
    pub ts: SystemTime,
    pub log: String,
}

/// What a read asks for, besides its object and size: the range of entries and its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRange {
    /// Exclusive lower seq bound.
    pub after: u64,
    /// Exclusive upper seq bound.
    pub before: Option<u64>,
    /// Inclusive lower time bound.
    pub since: Option<SystemTime>,
    /// Exclusive upper time bound.
    pub until: Option<SystemTime>,
    /// Newest first.
    pub desc: bool,
}

/// The first page of a read, with the object's head at the same snapshot.
#[derive(Debug, Default)]
pub struct FirstPage {
    pub total: u64,
    /// The range resolved against the head at that snapshot: every entry of the requested
    /// range has `lo < seq < hi`, and entries exist right after `lo` and right before `hi`
    /// (unless the range is empty). Later pages stay inside it, so a long read does not chase
    /// appends made after it started.
    pub lo: u64,
    pub hi: u64,
    pub rows: Vec<Row>,
    /// Whether the object has a head row here (without one, `total` is 0).
    pub exists: bool,
}

/// An object's statistics as its head row keeps them (migrations/0004_head_stats.sql).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeadStats {
    /// Entries present.
    pub count: u64,
    /// The first present entry's seq and ts: `None` without entries.
    pub first_seq: Option<u64>,
    /// The last seq ever assigned (kept when entries are deleted: seqs are never reused).
    pub last_seq: u64,
    pub first_ts: Option<SystemTime>,
    /// The last entry's ts: `None` without entries.
    pub last_ts: Option<SystemTime>,
    /// sum(octet_length(log)) of the present entries.
    pub bytes: u64,
}

/// The read statements, public so that a test can EXPLAIN exactly what the worker runs.
pub mod sql {
    /// `$1` id. One primary-key lookup of the head row; the CASEs keep "no entries" as NULL
    /// whatever the columns hold (a head row can exist without entries).
    /// Also the shard's ring fence and the object's tombstone marker, in the same snapshot.
    pub const STATS: &str = "SELECT entries,
                CASE WHEN entries > 0 THEN first_seq END AS first_seq,
                last_seq,
                CASE WHEN entries > 0 THEN first_ts END AS first_ts,
                CASE WHEN entries > 0 THEN last_ts END AS last_ts,
                bytes,
                logstore_ring_fence() AS fence,
                moved_to
         FROM objects WHERE id = $1";

    /// The shard's ring fence (migrations/0007_resharding.sql).
    pub const FENCE: &str = "SELECT logstore_ring_fence() AS fence";

    /// `$1` id, `$2` after, `$3` before, `$4` limit, `$5` since, `$6` until (NULL: none).
    /// Every bound becomes a seq bound in the same statement: the time bounds by
    /// `logstore_seq_at` (migrations/0003_time_bounds.sql: a binary search of primary-key
    /// probes), and the range is narrowed to the entries that exist (`lo` from the head's
    /// first present seq, `hi` from its last seq). So the page itself is one range scan of
    /// the primary key with both ends in its index condition, whatever bounds were given.
    /// (`OFFSET 0` keeps the bounds computed once: a flattened subquery would repeat the
    /// binary searches for the select list and for the index condition.) The last two columns
    /// are the shard's ring fence and the object's tombstone marker, in the same snapshot.
    macro_rules! first_page {
        ($order:literal) => {
            concat!(
                "SELECT b.entries, b.lo, b.hi, l.seq, l.ts, l.log, b.fence, b.moved_to
                 FROM (
                     SELECT o.entries, logstore_ring_fence() AS fence, o.moved_to,
                            greatest($2::bigint,
                                     o.first_seq - 1,
                                     logstore_seq_at(o.id, $5::timestamptz) - 1) AS lo,
                            least($3::bigint,
                                  o.last_seq + 1,
                                  logstore_seq_at(o.id, $6::timestamptz)) AS hi
                     FROM objects o
                     WHERE o.id = $1
                     OFFSET 0
                 ) b
                 LEFT JOIN LATERAL (
                     SELECT seq, ts, log FROM logs
                     WHERE object_id = $1 AND seq > b.lo AND seq < b.hi
                     ORDER BY seq ",
                $order,
                " LIMIT $4
                 ) l ON true"
            )
        };
    }
    /// `$1` id, `$2` lo, `$3` hi (both exclusive), `$4` limit.
    macro_rules! page {
        ($order:literal) => {
            concat!(
                "SELECT seq, ts, log FROM logs
                 WHERE object_id = $1 AND seq > $2 AND seq < $3
                 ORDER BY seq ",
                $order,
                " LIMIT $4"
            )
        };
    }
    pub const FIRST_PAGE_ASC: &str = first_page!("ASC");
    pub const FIRST_PAGE_DESC: &str = first_page!("DESC");
    pub const PAGE_ASC: &str = page!("ASC");
    pub const PAGE_DESC: &str = page!("DESC");
}

impl Shard {
    /// The object's head and the first page of the requested range, in one snapshot. An
    /// unknown object gives an empty page with total 0.
    ///
    /// Fails with [`StoreError::StaleEpoch`] when the shard has seen a newer ring than `epoch`
    /// and with [`StoreError::Moved`] when the object moved away.
    pub async fn first_page(
        &self,
        id: u64,
        range: &ReadRange,
        limit: u64,
        epoch: u64,
    ) -> Result<FirstPage, StoreError> {
        self.ready()?;
        let sql = if range.desc {
            sql::FIRST_PAGE_DESC
        } else {
            sql::FIRST_PAGE_ASC
        };
        let rows = self
            .rows(
                sql,
                &[
                    &(id as i64),
                    &seq_bound(range.after),
                    &seq_bound(range.before.unwrap_or(u64::MAX)),
                    &seq_bound(limit),
                    &range.since,
                    &range.until,
                ],
            )
            .await?;
        let mut page = FirstPage::default();
        match rows.first() {
            None => self.check_fence(epoch).await?,
            Some(row) => {
                self.here(id, epoch, row)?;
                page.exists = true;
            }
        }
        for row in rows {
            page.add(&row).map_err(|e| self.bad_row(e))?;
        }
        Ok(page)
    }

    /// Entries with `lo < seq < hi`, at most `limit`, in seq order (descending when `desc`).
    pub async fn page(
        &self,
        id: u64,
        lo: u64,
        hi: u64,
        desc: bool,
        limit: u64,
    ) -> Result<Vec<Row>, StoreError> {
        self.ready()?;
        let sql = if desc { sql::PAGE_DESC } else { sql::PAGE_ASC };
        let rows = self
            .rows(
                sql,
                &[
                    &(id as i64),
                    &seq_bound(lo),
                    &seq_bound(hi),
                    &seq_bound(limit),
                ],
            )
            .await?;
        rows.iter()
            .map(|row| Row::from_row(row).map_err(|e| self.bad_row(e)))
            .collect()
    }

    /// The object's statistics from its head row alone, and whether it has one here. An
    /// unknown object has count 0. Fails as [`Shard::first_page`] does for a stale epoch or a
    /// moved object.
    pub async fn stats(&self, id: u64, epoch: u64) -> Result<(HeadStats, bool), StoreError> {
        self.ready()?;
        let rows = self.rows(sql::STATS, &[&(id as i64)]).await?;
        let Some(row) = rows.first() else {
            self.check_fence(epoch).await?;
            return Ok((HeadStats::default(), false));
        };
        self.here(id, epoch, row)?;
        let stats = HeadStats::from_row(row).map_err(|e| self.bad_row(e))?;
        Ok((stats, true))
    }

    /// Whether a read of `id` routed by `epoch` may answer from `row` (which carries the
    /// shard's `fence` and the object's `moved_to`, read in the same snapshot as the data).
    fn here(&self, id: u64, epoch: u64, row: &PgRow) -> Result<(), StoreError> {
        let fence: i64 = row.try_get("fence").map_err(|e| self.bad_row(e))?;
        self.fenced(epoch, fence)?;
        let moved_to: Option<String> = row.try_get("moved_to").map_err(|e| self.bad_row(e))?;
        match moved_to {
            Some(to) => Err(self.moved(id, to)),
            None => Ok(()),
        }
    }

    /// `fence` (the shard's, read with the data) against the request's `epoch`.
    fn fenced(&self, epoch: u64, fence: i64) -> Result<(), StoreError> {
        let fence = u64::try_from(fence).unwrap_or(0);
        if fence > epoch {
            return Err(StoreError::StaleEpoch {
                shard: self.name.clone(),
                epoch,
                fence,
            });
        }
        Ok(())
    }

    /// The fence, read on its own: for a read that found no head row. The fence only grows, so
    /// reading it after the data is as strict as reading it with them.
    async fn check_fence(&self, epoch: u64) -> Result<(), StoreError> {
        let rows = self.rows(sql::FENCE, &[]).await?;
        let fence = match rows.first() {
            Some(row) => row.try_get("fence").map_err(|e| self.bad_row(e))?,
            None => 0,
        };
        self.fenced(epoch, fence)
    }
}

impl Row {
    /// A `seq, ts, log` row.
    fn from_row(row: &PgRow) -> Result<Row, tokio_postgres::Error> {
        Ok(Row {
            seq: row.try_get::<_, i64>("seq")? as u64,
            ts: row.try_get("ts")?,
            log: row.try_get("log")?,
        })
    }
}

impl FirstPage {
    /// One row of `FIRST_PAGE_*`: the head's columns (the same on every row) and, unless the
    /// page is empty (a LEFT JOIN's NULLs), one entry.
    fn add(&mut self, row: &PgRow) -> Result<(), tokio_postgres::Error> {
        self.total = row.try_get::<_, i64>("entries")? as u64;
        // Both are clamped to 0 in SQL; a negative value cannot occur.
        self.lo = row.try_get::<_, i64>("lo")?.max(0) as u64;
        self.hi = row.try_get::<_, i64>("hi")?.max(0) as u64;
        if let Some(seq) = row.try_get::<_, Option<i64>>("seq")? {
            self.rows.push(Row {
                seq: seq as u64,
                ts: row.try_get("ts")?,
                log: row.try_get("log")?,
            });
        }
        Ok(())
    }
}

impl HeadStats {
    /// A [`sql::STATS`] row.
    fn from_row(row: &PgRow) -> Result<HeadStats, tokio_postgres::Error> {
        Ok(HeadStats {
            count: row.try_get::<_, i64>("entries")? as u64,
            first_seq: row
                .try_get::<_, Option<i64>>("first_seq")?
                .map(|s| s as u64),
            last_seq: row.try_get::<_, i64>("last_seq")? as u64,
            first_ts: row.try_get("first_ts")?,
            last_ts: row.try_get("last_ts")?,
            bytes: row.try_get::<_, i64>("bytes")? as u64,
        })
    }
}
