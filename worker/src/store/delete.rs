//! Deleting entries: a request's bounded deletion steps ([`Shard::delete_step`], through
//! `logstore_delete_at`, migrations/0006_delete.sql and 0007_resharding.sql) and the retention
//! sweeper's scan for objects with expired entries ([`Shard::expired`]).

use std::time::SystemTime;

use super::{seq_bound, Shard, StoreError};

impl Shard {
    /// One bounded deletion step, in its own short transaction: up to `limit` of the oldest
    /// entries of `id` with `seq < before` (`None`: all), head kept exact. Returns how many
    /// were deleted (fewer than `limit`: nothing below `before` is left), or `None` when
    /// `skip_locked` is set and the head row was locked by a writer (or is gone), in which
    /// case nothing was done and nothing was waited for.
    /// Fails with [`StoreError::Moved`] when the object moved away, and with
    /// [`StoreError::StaleEpoch`] when the shard has seen a newer ring than `epoch` (None: no
    /// fence, for the retention sweeper).
    pub async fn delete_step(
        &self,
        id: u64,
        before: Option<u64>,
        limit: u32,
        skip_locked: bool,
        epoch: Option<u64>,
    ) -> Result<Option<u64>, StoreError> {
        self.ready()?;
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let row = self
            .bounded(async {
                let client = self.client().await?;
                let statement = client
                    .prepare_cached("SELECT logstore_delete_at($1, $2, $3, $4, $5) AS deleted")
                    .await
                    .map_err(|e| self.db(e))?;
                client
                    .query_one(
                        &statement,
                        &[
                            &epoch.map(seq_bound),
                            &(id as i64),
                            &before.map(seq_bound),
                            &limit,
                            &skip_locked,
                        ],
                    )
                    .await
                    .map_err(|e| self.db_at(epoch.unwrap_or(0), e))
            })
            .await?;
        let deleted: Option<i64> = row.try_get("deleted").map_err(|e| self.bad_row(e))?;
        match deleted {
            // A tombstone: the marker names where it went; read it to say so.
            Some(-1) => {
                let (_, to) = self.whereabouts(id).await?;
                Err(self.moved(id, to.unwrap_or_default()))
            }
            n => Ok(n.map(|n| n.max(0) as u64)),
        }
    }

    /// Up to `limit` objects holding entries older than `cutoff`, those with the oldest first
    /// entry first, each with the seq below which its entries are older (see
    /// `logstore_seq_at`). An index on the heads' first ts finds them without a scan.
    pub async fn expired(
        &self,
        cutoff: SystemTime,
        limit: u32,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        self.ready()?;
        let rows = self
            .bounded(async {
                let client = self.client().await?;
                let statement = client
                    .prepare_cached(
                        "SELECT o.id, logstore_seq_at(o.id, $1) AS below FROM objects o
                         WHERE o.first_ts < $1 AND o.moved_to IS NULL
                         ORDER BY o.first_ts
                         LIMIT $2",
                    )
                    .await
                    .map_err(|e| self.db(e))?;
                client
                    .query(&statement, &[&cutoff, &i64::from(limit)])
                    .await
                    .map_err(|e| self.db(e))
            })
            .await?;
        let expired = |row: &tokio_postgres::Row| -> Result<(u64, u64), tokio_postgres::Error> {
            let id: i64 = row.try_get("id")?;
            let below: i64 = row.try_get("below")?;
            Ok((id as u64, below.max(0) as u64))
        };
        rows.iter()
            .map(|row| expired(row).map_err(|e| self.bad_row(e)))
            .collect()
    }
}
