//! The schema and the shard's identity: the embedded migrations, applied under an advisory
//! lock ([`Shard::initialise`]), the shard's recorded name, and the fleet it belongs to
//! (migrations/0008_fleet.sql). `migrations/CURRENT.sql` shows the schema they add up to.

use std::sync::atomic::Ordering;

use super::{Shard, StoreError, STATE_READY, STATE_REFUSED};

/// The migrations, embedded so the binary (and its container image) needs no files.
/// Append new ones at the end; never edit one that has shipped.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "schema",
        include_str!("../../../migrations/0001_schema.sql"),
    ),
    (
        2,
        "fast_append",
        include_str!("../../../migrations/0002_fast_append.sql"),
    ),
    (
        3,
        "time_bounds",
        include_str!("../../../migrations/0003_time_bounds.sql"),
    ),
    (
        4,
        "head_stats",
        include_str!("../../../migrations/0004_head_stats.sql"),
    ),
    (
        5,
        "expected_seq",
        include_str!("../../../migrations/0005_expected_seq.sql"),
    ),
    (
        6,
        "delete",
        include_str!("../../../migrations/0006_delete.sql"),
    ),
    (
        7,
        "resharding",
        include_str!("../../../migrations/0007_resharding.sql"),
    ),
    (
        8,
        "fleet",
        include_str!("../../../migrations/0008_fleet.sql"),
    ),
];

/// The advisory-lock key that serialises migrations across every worker that starts at once
/// (an arbitrary constant: "logstore" in ASCII). Taken only here, from Rust.
const MIGRATION_LOCK: i64 = 0x6c6f_6773_746f_7265;

/// The advisory-lock key of the ring fence: `logstore_fence` takes it exclusively to raise the
/// fence and shared to check it (the literal `7464916250018` in
/// migrations/0007_resharding.sql, which cannot change: shipped migrations are never edited).
/// Named here so the two keys are seen side by side; the test below pairs it with the SQL.
const FENCE_LOCK: i64 = 7_464_916_250_018;

// One key per purpose: a migration must never wait on (or block) the fence.
const _: () = assert!(MIGRATION_LOCK != FENCE_LOCK);

/// A shard's fleet as this worker knows it.
#[derive(Debug, Default)]
pub(super) struct Fleet {
    /// The fleet this worker belongs to.
    expected: Option<String>,
    /// The shard's identity names `expected` (claimed, or checked).
    confirmed: bool,
    /// The other fleet the shard's identity names.
    foreign: Option<String>,
}

impl Shard {
    fn fleet_state(&self) -> std::sync::MutexGuard<'_, Fleet> {
        // Plain bookkeeping, never left half-updated: a panic elsewhere does not make it wrong.
        self.fleet
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This worker belongs to fleet `fleet` (the ring record's id) from now on: the shard is
    /// checked against it again ([`Shard::confirm_fleet`]).
    pub fn set_fleet(&self, fleet: Option<&str>) {
        let mut state = self.fleet_state();
        if state.expected.as_deref() == fleet {
            return;
        }
        *state = Fleet {
            expected: fleet.map(str::to_string),
            ..Fleet::default()
        };
        self.foreign.store(false, Ordering::Release);
    }

    /// Whether the shard's identity was checked against the fleet this worker belongs to (true
    /// while that fleet is unknown: nothing to check yet).
    pub fn fleet_confirmed(&self) -> bool {
        let state = self.fleet_state();
        state.expected.is_none() || state.confirmed
    }

    /// The other fleet this shard belongs to, when it does.
    pub fn foreign_fleet(&self) -> Option<String> {
        self.fleet_state().foreign.clone()
    }

    /// Claim the shard for this worker's fleet where its identity names none yet, or check the
    /// one it names (once per fleet; nothing to do while the fleet is unknown). A shard of
    /// another fleet is refused from then on ([`StoreError::WrongFleet`]) until the fleet this
    /// worker belongs to changes.
    pub async fn confirm_fleet(&self) -> Result<(), StoreError> {
        let Some(expected) = self.fleet_to_check() else {
            return self.fleet_refusal().map_or(Ok(()), Err);
        };
        let rows = self
            .rows("SELECT logstore_claim_fleet($1) AS fleet", &[&expected])
            .await?;
        let found: Option<String> = match rows.first() {
            Some(row) => row.try_get("fleet").map_err(|e| self.bad_row(e))?,
            None => None,
        };
        let mut state = self.fleet_state();
        if state.expected.as_deref() != Some(expected.as_str()) {
            // The fleet changed meanwhile: the next call checks the new one.
            return Ok(());
        }
        match found {
            Some(found) if found != expected => {
                // Once per cause: the fleet is checked again only when this worker's changes.
                tracing::error!(
                    shard = %self.name,
                    found = %found,
                    fleet = %expected,
                    "shard {}'s database belongs to another logstore fleet; refusing it (its \
                     objects answer `unavailable`): fix the ring record or POSTGRES_SHARDS",
                    self.name
                );
                state.foreign = Some(found);
                self.foreign.store(true, Ordering::Release);
            }
            _ => state.confirmed = true,
        }
        drop(state);
        self.fleet_refusal().map_or(Ok(()), Err)
    }

    /// The fleet to check the shard against, when it has not been (no lock is held after).
    fn fleet_to_check(&self) -> Option<String> {
        let state = self.fleet_state();
        match &state.expected {
            Some(fleet) if !state.confirmed && state.foreign.is_none() => Some(fleet.clone()),
            _ => None,
        }
    }

    /// [`StoreError::WrongFleet`] while the shard's identity names another fleet.
    pub(super) fn fleet_refusal(&self) -> Option<StoreError> {
        let state = self.fleet_state();
        Some(StoreError::WrongFleet {
            shard: self.name.clone(),
            found: state.foreign.clone()?,
            fleet: state.expected.clone().unwrap_or_default(),
        })
    }

    /// Apply the embedded migrations under an advisory lock and check (or, on a new database,
    /// record) the shard's name, then its fleet once this worker knows it
    /// ([`Shard::confirm_fleet`]). Idempotent; safe with any number of workers at once.
    pub async fn initialise(&self) -> Result<(), StoreError> {
        if self.is_initialised() {
            return self.confirm_fleet().await;
        }
        let result = self.bounded(self.migrate_and_check()).await;
        match &result {
            Ok(()) => {
                self.state.store(STATE_READY, Ordering::Release);
                self.set_up(true);
            }
            Err(StoreError::WrongShard { .. }) => {
                self.state.store(STATE_REFUSED, Ordering::Release)
            }
            Err(_) => {}
        }
        result?;
        self.confirm_fleet().await
    }

    /// The shard's recorded name and fleet, read without changing anything (no migration):
    /// None for a database without logstore's schema. For `worker shards add`, which must
    /// refuse another fleet's database before touching it.
    pub async fn peek_identity(&self) -> Result<Option<(String, Option<String>)>, StoreError> {
        let rows = self
            .rows(
                "SELECT to_regclass('shard_identity') IS NOT NULL AS present",
                &[],
            )
            .await?;
        let present = match rows.first() {
            Some(row) => row.try_get("present").map_err(|e| self.bad_row(e))?,
            None => false,
        };
        if !present {
            return Ok(None);
        }
        // Every column the identity has (a database from before migration 0008 has no fleet).
        let rows = self
            .rows(
                "SELECT row_to_json(i)::text AS identity FROM shard_identity i",
                &[],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let json: String = row.try_get("identity").map_err(|e| self.bad_row(e))?;
        let value: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| StoreError::Unexpected {
                shard: self.name.clone(),
                what: format!("shard_identity as JSON: {e}"),
            })?;
        let name = value["name"].as_str().unwrap_or_default().to_string();
        let fleet = value["fleet"].as_str().map(str::to_string);
        Ok(Some((name, fleet)))
    }

    /// Apply the migrations the schema lacks, in one transaction, then check the identity.
    async fn migrate_and_check(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.db(e))?;
        // A current schema needs no DDL (nor the lock): a least-privilege role, which may not
        // create anything, starts here. Every migration commits in one transaction with its
        // row in logstore_migrations, so seeing all rows means they are all in place.
        let row = tx
            .query_one(
                "SELECT current_user::text AS role,
                        to_regclass('logstore_migrations') IS NOT NULL AS has_table",
                &[],
            )
            .await
            .map_err(|e| self.db(e))?;
        let role: String = row.try_get("role").map_err(|e| self.bad_row(e))?;
        let has_table: bool = row.try_get("has_table").map_err(|e| self.bad_row(e))?;
        let applied = if has_table {
            self.applied(&tx).await?
        } else {
            Vec::new()
        };
        if MIGRATIONS.iter().all(|(v, _, _)| applied.contains(v)) {
            return self.check_identity(tx).await;
        }
        self.migrate(&tx, &role, &applied).await?;
        self.check_identity(tx).await
    }

    /// The versions logstore_migrations lists.
    async fn applied(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
    ) -> Result<Vec<i32>, StoreError> {
        tx.query("SELECT version FROM logstore_migrations", &[])
            .await
            .map_err(|e| self.db(e))?
            .iter()
            .map(|row| row.try_get("version").map_err(|e| self.bad_row(e)))
            .collect()
    }

    /// Apply the migrations not `applied` under [`MIGRATION_LOCK`], as `role`: a role without
    /// the privilege to is told which are missing ([`StoreError::CannotMigrate`]).
    async fn migrate(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        role: &str,
        applied: &[i32],
    ) -> Result<(), StoreError> {
        let missing = MIGRATIONS
            .iter()
            .filter(|(v, _, _)| !applied.contains(v))
            .map(|(v, name, _)| format!("{v:04}_{name}"))
            .collect::<Vec<_>>()
            .join(", ");
        let refused = |e: tokio_postgres::Error| match e.code() {
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                StoreError::CannotMigrate {
                    shard: self.name.clone(),
                    role: role.to_string(),
                    missing: missing.clone(),
                    reason: e
                        .as_db_error()
                        .map_or_else(|| e.to_string(), |d| d.message().to_string()),
                }
            }
            _ => self.db(e),
        };
        // Every start after the first would otherwise log Postgres's NOTICE "relation
        // logstore_migrations already exists, skipping" at INFO; warnings still come through.
        tx.batch_execute("SET LOCAL client_min_messages = warning")
            .await
            .map_err(|e| self.db(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| self.db(e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS logstore_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(refused)?;
        // Read again under the lock: another worker may have applied some meanwhile.
        let applied = self.applied(tx).await?;
        for (version, name, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            tracing::info!(shard = %self.name, version, name = %name, "applying migration");
            tx.batch_execute(sql).await.map_err(refused)?;
            tx.execute(
                "INSERT INTO logstore_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await
            .map_err(|e| self.db(e))?;
        }
        Ok(())
    }

    /// Record the shard's name on a new database, or check that it is this shard's.
    async fn check_identity(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
    ) -> Result<(), StoreError> {
        tx.execute(
            "INSERT INTO shard_identity (name) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&self.name],
        )
        .await
        .map_err(|e| self.db(e))?;
        let found: String = tx
            .query_one("SELECT name FROM shard_identity", &[])
            .await
            .map_err(|e| self.db(e))?
            .try_get("name")
            .map_err(|e| self.bad_row(e))?;
        if found != self.name {
            return Err(StoreError::WrongShard {
                shard: self.name.clone(),
                found,
            });
        }
        tx.commit().await.map_err(|e| self.db(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fence's key in Rust is the one migration 0007 locks (both its uses), and no
    /// migration locks the migrations' key: the pairing the constants' comments claim.
    #[test]
    fn the_lock_keys_match_the_migrations() {
        let fence = include_str!("../../../migrations/0007_resharding.sql");
        assert_eq!(
            fence
                .matches(&format!("pg_advisory_xact_lock({FENCE_LOCK})"))
                .count(),
            1
        );
        assert_eq!(
            fence
                .matches(&format!("pg_advisory_xact_lock_shared({FENCE_LOCK})"))
                .count(),
            1
        );
        for (_, _, sql) in MIGRATIONS {
            assert!(!sql.contains(&MIGRATION_LOCK.to_string()));
        }
    }
}
