//! The batched append: one call of `logstore_append_at` (migrations/0007_resharding.sql) per
//! batch, in one transaction and one round trip, with each entry's outcome read back by its
//! position in the batch.

use std::time::SystemTime;

use tokio::time::Instant;

use super::{seq_bound, Routing, Shard, StoreError};

/// The append statement. Its answer has one row per entry, placed by `ord` (1-based).
const APPEND_AT: &str = "SELECT ord, seq, ts, duplicate, conflict, moved
     FROM logstore_append_at($1, $2, $3, $4, $5, $6, $7)";

/// One entry to append.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub id: u64,
    pub key: Option<String>,
    pub log: String,
    /// When the system received it: the entry's ts unless an earlier entry of the object is later.
    pub received: SystemTime,
}

/// Where an append ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub ts: SystemTime,
    /// The key was already stored: `seq`/`ts` are the original entry's.
    pub duplicate: bool,
}

/// An append's outcome: stored (or already stored), or refused because its `expected_seq`
/// was not the object's last seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored(Stored),
    /// Nothing was stored; `last_seq` is the object's last seq at the check.
    Conflict {
        last_seq: u64,
    },
    /// Nothing was stored: the object does not live on this shard (it moved, or was never
    /// here) and ring moves it; the append goes to its new owner.
    Moved,
}

impl Shard {
    /// Append a batch in one transaction (one round trip). `expected` is empty (no conditions)
    /// or has one element per entry: the seq the object's last entry must have for that entry
    /// to be stored (see migrations/0005_expected_seq.sql). The result has one element per
    /// entry, in order.
    ///
    /// Failures before the statement is sent (no connection by `deadline`, shard not ready)
    /// are definite: nothing was stored. An error the server reports (a SQLSTATE) is definite
    /// too: the statement rolled back. No answer by `deadline` after sending, or a connection
    /// lost while waiting, is [`StoreError::OutcomeUnknown`]; the shard is then marked down so
    /// the appends queued behind fail fast instead of each waiting out the timeout.
    pub async fn append_expecting(
        &self,
        entries: &[&NewEntry],
        expected: &[Option<u64>],
        routing: Routing<'_>,
        deadline: Instant,
    ) -> Result<Vec<Appended>, StoreError> {
        self.ready()?;
        let epoch = seq_bound(routing.epoch);
        let moving: Vec<i64> = routing.moving.iter().map(|&id| id as i64).collect();
        let ids: Vec<i64> = entries.iter().map(|e| e.id as i64).collect();
        let keys: Vec<Option<&str>> = entries.iter().map(|e| e.key.as_deref()).collect();
        let logs: Vec<&str> = entries.iter().map(|e| e.log.as_str()).collect();
        let received: Vec<SystemTime> = entries.iter().map(|e| e.received).collect();
        // NULL when no entry has a condition: the function then takes its usual paths.
        let expected: Option<Vec<Option<i64>>> = expected
            .iter()
            .any(Option::is_some)
            .then(|| expected.iter().map(|e| e.map(seq_bound)).collect());
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
            [&epoch, &moving, &ids, &keys, &logs, &received, &expected];
        let rows = self.send_append(&params, routing.epoch, deadline).await?;
        self.place(rows, entries.len())
    }

    /// Run the append statement with `params` (routed by ring `epoch`) by `deadline`, telling a
    /// definite failure from an unknown outcome (see [`Shard::append_expecting`]).
    async fn send_append(
        &self,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        epoch: u64,
        deadline: Instant,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let not_sent = || StoreError::Timeout {
            shard: self.name.clone(),
            after: self.timeout,
        };
        let client = tokio::time::timeout_at(deadline, self.client())
            .await
            .map_err(|_| not_sent())??;
        let statement = tokio::time::timeout_at(deadline, client.prepare_cached(APPEND_AT))
            .await
            .map_err(|_| not_sent())?
            .map_err(|e| self.db(e))?;
        let sent = client.query(&statement, params);
        match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) if e.code().is_some() => Err(self.db_at(epoch, e)),
            outcome => {
                let reason = match outcome {
                    Ok(Err(e)) => format!("connection lost while waiting for the commit: {e}"),
                    _ => format!("no answer within {:?}", self.timeout),
                };
                // The connection may still carry the unanswered statement: never reuse it.
                drop(deadpool_postgres::Object::take(client));
                self.set_up(false);
                Err(StoreError::OutcomeUnknown {
                    shard: self.name.clone(),
                    reason,
                })
            }
        }
    }

    /// The append statement's `rows` as one outcome per entry of a batch of `entries`, each
    /// placed by its `ord` (moved entries come after the others).
    fn place(
        &self,
        rows: Vec<tokio_postgres::Row>,
        entries: usize,
    ) -> Result<Vec<Appended>, StoreError> {
        let unexpected = |what: String| StoreError::Unexpected {
            shard: self.name.clone(),
            what,
        };
        if rows.len() != entries {
            return Err(unexpected(format!(
                "{} results for {} entries",
                rows.len(),
                entries
            )));
        }
        let mut appended: Vec<Option<Appended>> = vec![None; entries];
        for row in rows {
            let answer = Answer::from_row(&row).map_err(|e| self.bad_row(e))?;
            let slot = usize::try_from(answer.ord - 1)
                .ok()
                .and_then(|i| appended.get_mut(i))
                .ok_or_else(|| unexpected(format!("a result for entry {}", answer.ord)))?;
            *slot = Some(answer.outcome().map_err(unexpected)?);
        }
        appended
            .into_iter()
            .enumerate()
            .map(|(i, a)| a.ok_or_else(|| unexpected(format!("no result for entry {}", i + 1))))
            .collect()
    }
}

/// One row of the append statement's answer ([`APPEND_AT`]).
struct Answer {
    /// The entry's position in the batch, from 1.
    ord: i32,
    seq: Option<i64>,
    /// NULL exactly for conflicts and moved entries.
    ts: Option<SystemTime>,
    /// Read only for a stored entry.
    duplicate: Option<bool>,
    conflict: bool,
    moved: bool,
}

impl Answer {
    fn from_row(row: &tokio_postgres::Row) -> Result<Answer, tokio_postgres::Error> {
        Ok(Answer {
            ord: row.try_get("ord")?,
            seq: row.try_get("seq")?,
            ts: row.try_get("ts")?,
            duplicate: row.try_get("duplicate")?,
            conflict: row.try_get("conflict")?,
            moved: row.try_get("moved")?,
        })
    }

    /// The entry's outcome, or what is wrong with an answer the function never gives.
    fn outcome(&self) -> Result<Appended, String> {
        let seq = self.seq.unwrap_or(0) as u64;
        match (self.moved, self.conflict, self.ts) {
            (true, _, _) => Ok(Appended::Moved),
            (false, true, _) => Ok(Appended::Conflict { last_seq: seq }),
            (false, false, Some(ts)) => match self.duplicate {
                Some(duplicate) => Ok(Appended::Stored(Stored { seq, ts, duplicate })),
                None => Err(format!("a stored entry (seq {seq}) without duplicate")),
            },
            (false, false, None) => Err(format!("a stored entry (seq {seq}) without ts")),
        }
    }
}
