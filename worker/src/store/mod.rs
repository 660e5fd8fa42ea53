//! PostgreSQL shards: connection pools, embedded migrations, the shard-identity check, batched
//! idempotent appends and paged reads.
//!
//! Every operation is bounded by the shard timeout, so a shard that is down or hung answers
//! `unavailable` quickly instead of stalling the worker. Errors say whether they are a normal
//! outage ([`StoreError::is_unavailable`]) or a fault.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::GenericClient;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::ShardConfig;

pub mod tls;

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
    (8, "fleet", include_str!("../../../migrations/0008_fleet.sql")),
];

/// SQLSTATE of logstore_fence's refusal of a stale ring epoch.
const STALE_EPOCH: &str = "LS001";

/// How the worker routed an append: the ring epoch it routed by, and the objects of the batch
/// whose owner the running move changes (sent to their old owner, which stores them only if
/// they still live there; see migrations/0007_resharding.sql).
#[derive(Debug, Clone, Copy, Default)]
pub struct Routing<'a> {
    pub epoch: u64,
    pub moving: &'a [u64],
}

/// Serialises migrations across every worker that starts at once (an arbitrary constant:
/// "logstore" in ASCII).
const MIGRATION_LOCK: i64 = 0x6c6f_6773_746f_7265;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("shard {shard} is unavailable: {source}")]
    Unavailable {
        shard: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("shard {shard} timed out after {after:?}")]
    Timeout { shard: String, after: Duration },
    /// The append was sent and no answer came: it may or may not have committed. Never
    /// reported as a plain failure, because a client that retries without its key (or a dead
    /// letter for something that was stored) would then double or misreport it.
    #[error("shard {shard}: outcome unknown ({reason}); it may have been stored")]
    OutcomeUnknown { shard: String, reason: String },
    #[error("shard {shard} has not been initialised yet (unreachable since start)")]
    NotReady { shard: String },
    #[error("shard {shard} is down (its last health check or operation failed)")]
    Down { shard: String },
    #[error(
        "shard {shard}: the database at this URL belongs to shard {found:?}; refusing to use it \
         (fix POSTGRES_SHARDS: a name must always map to the same database)"
    )]
    WrongShard { shard: String, found: String },
    /// The database belongs to another fleet (migrations/0008_fleet.sql): another fleet's
    /// workers raise its fences, so this one must not use it. An outage for its objects until
    /// the configuration is fixed, never a fault per request.
    #[error(
        "shard {shard}: the database belongs to another logstore fleet ({found}; this fleet is \
         {fleet}); refusing to use it (a database of another fleet, or a ring record rebuilt \
         by hand: see `worker shards repair`)"
    )]
    WrongFleet {
        shard: String,
        found: String,
        fleet: String,
    },
    /// The schema lacks migrations and the worker's role may not apply them (a least-privilege
    /// role: see deploy/postgres/roles.sql). Stops the start: retrying cannot fix it.
    #[error(
        "shard {shard}: the schema lacks migration(s) {missing} and role {role:?} may not apply \
         them ({reason}); migrate once as the owner role (a worker started with its URL), then \
         run deploy/postgres/roles.sql"
    )]
    CannotMigrate {
        shard: String,
        role: String,
        missing: String,
        reason: String,
    },
    /// The request named an older ring epoch than the shard has seen (another worker or the
    /// mover already works by a newer ring): the worker re-reads the ring and routes again.
    #[error(
        "shard {shard} is fenced at ring epoch {fence}; this request was routed by epoch {epoch}"
    )]
    StaleEpoch {
        shard: String,
        epoch: u64,
        fence: u64,
    },
    /// The object moved to shard `to` (a tombstone here): ask there.
    #[error("shard {shard}: object {id} moved to shard {to}")]
    Moved { shard: String, id: u64, to: String },
    /// The append function answered something it never answers (a bug, not an outage).
    #[error("shard {shard}: unexpected answer: {what}")]
    Unexpected { shard: String, what: String },
    #[error("shard {shard}: {source}")]
    Database {
        shard: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl StoreError {
    /// True for outages (connection refused or lost, pool exhausted, timeout): the same request
    /// may succeed later. False for faults that retrying will not fix.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable { .. }
            | StoreError::Timeout { .. }
            | StoreError::NotReady { .. }
            | StoreError::Down { .. }
            | StoreError::OutcomeUnknown { .. }
            | StoreError::WrongFleet { .. } => true,
            // Routed by a ring this worker has not caught up with: like an outage until it
            // learns the newer one (see `pipeline::attempt`).
            StoreError::StaleEpoch { .. } => true,
            StoreError::WrongShard { .. }
            | StoreError::CannotMigrate { .. }
            | StoreError::Moved { .. }
            | StoreError::Unexpected { .. } => false,
            // No SQLSTATE: the connection itself failed. 08: connection exception; 53: out of
            // resources (e.g. too many connections); 57P: the server is shutting down or starting.
            StoreError::Database { source, .. } => match source.code() {
                None => true,
                Some(state) => ["08", "53", "57P"]
                    .iter()
                    .any(|class| state.code().starts_with(class)),
            },
        }
    }

    /// True when the operation may have taken effect although it failed (see
    /// [`StoreError::OutcomeUnknown`]).
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, StoreError::OutcomeUnknown { .. })
    }
}

/// Copies of an object's entries, as `(object_id, seq, ts, key, log)` arrays: `$1` the id,
/// then the columns of [`entry_columns`]. A row already there is the same entry (seqs are
/// never reused), so a conflict is skipped.
const INSERT_ENTRIES: &str = "INSERT INTO logs (object_id, seq, ts, key, log)
     SELECT $1, u.seq, u.ts, u.key, u.log
     FROM unnest($2::bigint[], $3::timestamptz[], $4::text[], $5::text[]) AS u(seq, ts, key, log)
     ON CONFLICT DO NOTHING";

type EntryColumns = (Vec<i64>, Vec<SystemTime>, Vec<Option<String>>, Vec<String>);

/// The columns of `SELECT seq, ts, key, log` rows, for [`INSERT_ENTRIES`].
fn entry_columns(rows: &[tokio_postgres::Row]) -> EntryColumns {
    (
        rows.iter().map(|r| r.get(0)).collect(),
        rows.iter().map(|r| r.get(1)).collect(),
        rows.iter().map(|r| r.get(2)).collect(),
        rows.iter().map(|r| r.get(3)).collect(),
    )
}

/// A u64 cursor as the `bigint` it is compared with. Stored seqs never exceed `i64::MAX`, so a
/// larger cursor means "past the end" and clamping keeps that meaning (a plain cast would wrap
/// to a negative number and restart the log from seq 1).
fn seq_bound(cursor: u64) -> i64 {
    i64::try_from(cursor).unwrap_or(i64::MAX)
}

/// What moving one object copied: entries before its lock (`bulk`) and under it (`locked`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub bulk: u64,
    pub locked: u64,
}

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
                CASE WHEN entries > 0 THEN first_seq END,
                last_seq,
                CASE WHEN entries > 0 THEN first_ts END,
                CASE WHEN entries > 0 THEN last_ts END,
                bytes,
                logstore_ring_fence(),
                moved_to
         FROM objects WHERE id = $1";

    /// The shard's ring fence (migrations/0007_resharding.sql).
    pub const FENCE: &str = "SELECT logstore_ring_fence()";

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

const STATE_PENDING: u8 = 0;
const STATE_READY: u8 = 1;
const STATE_REFUSED: u8 = 2;

/// A handle to one shard. Cheap to share behind an `Arc`.
pub struct Shard {
    pub name: String,
    pool: Pool,
    timeout: Duration,
    /// Pending until migrations ran and the identity matched; Refused forever on a mismatch.
    state: AtomicU8,
    /// What the health checker (or the last failed append) saw: while false, appends and
    /// queries fail fast with `unavailable` instead of each waiting out the timeout on a hung
    /// server. The health checker sets it back once a ping succeeds.
    up: AtomicBool,
    /// `logstore_pool_wait_seconds{shard}`, when the worker's metrics are attached.
    pool_wait: Option<prometheus::Histogram>,
    /// The cause of the last failed initialisation, as logged: a new cause (say, a TLS
    /// handshake refused once the server is up again) is worth a warning, a repeat is not.
    last_init_failure: std::sync::Mutex<Option<String>>,
    /// Whose the shard must be: the fleet id of the ring record this worker routes by (None
    /// until it read one), and what the shard's identity says of it.
    fleet: std::sync::Mutex<Fleet>,
    /// The shard's identity names another fleet ([`Fleet::foreign`]): every operation is
    /// refused with [`StoreError::WrongFleet`].
    foreign: AtomicBool,
    /// The highest ring fence this shard answered with that this worker's ring record does not
    /// know (0: none; see [`Shard::note_unknown_fence`]).
    unknown_fence: AtomicU64,
}

/// A shard's fleet as this worker knows it.
#[derive(Debug, Default)]
struct Fleet {
    /// The fleet this worker belongs to.
    expected: Option<String>,
    /// The shard's identity names `expected` (claimed, or checked).
    confirmed: bool,
    /// The other fleet the shard's identity names.
    foreign: Option<String>,
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

impl Shard {
    /// Build the shard's pool. Connects lazily: a shard that is down does not fail this.
    pub fn new(config: &ShardConfig, pool_size: usize, timeout: Duration) -> Result<Shard, String> {
        // libpq's TLS parameters (sslmode verify-ca/verify-full, sslrootcert, sslcert, sslkey)
        // are ours to handle: tokio-postgres knows only disable/prefer/require.
        let (url, tls) =
            tls::split(&config.url).map_err(|e| format!("shard {}: {e}", config.name))?;
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("shard {}: bad URL: {e}", config.name))?;
        // The sslmode split took out (or libpq's default, prefer).
        pg.ssl_mode(tls.mode.for_tokio_postgres());
        let connector = tls::client_config(&tls)
            .map(MakeRustlsConnect::new)
            .map_err(|e| format!("shard {}: {e}", config.name))?;
        pg.connect_timeout(timeout.min(Duration::from_secs(5)));
        pg.keepalives_idle(Duration::from_secs(30));
        pg.application_name("logstore-worker");
        let manager = Manager::from_config(
            pg,
            connector,
            ManagerConfig {
                // Fast: a connection whose socket died is dropped on return anyway; a broken one
                // that still looks open fails its next statement, which answers `unavailable`.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| format!("shard {}: cannot build pool: {e}", config.name))?;
        Ok(Shard {
            name: config.name.clone(),
            pool,
            timeout,
            state: AtomicU8::new(STATE_PENDING),
            up: AtomicBool::new(false),
            pool_wait: None,
            last_init_failure: std::sync::Mutex::new(None),
            fleet: std::sync::Mutex::new(Fleet::default()),
            foreign: AtomicBool::new(false),
            unknown_fence: AtomicU64::new(0),
        })
    }

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
            .rows("SELECT logstore_claim_fleet($1)", &[&expected])
            .await?;
        let found: Option<String> = rows.first().and_then(|row| row.get(0));
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

    fn fleet_refusal(&self) -> Option<StoreError> {
        let state = self.fleet_state();
        Some(StoreError::WrongFleet {
            shard: self.name.clone(),
            found: state.foreign.clone()?,
            fleet: state.expected.clone().unwrap_or_default(),
        })
    }

    /// A request met this shard's fence at `fence`, an epoch the fleet's ring record does not
    /// know: true when that is news (a higher fence than the last noted), i.e. worth a log line.
    pub fn note_unknown_fence(&self, fence: u64) -> bool {
        self.unknown_fence.fetch_max(fence, Ordering::AcqRel) < fence
    }

    /// The highest fence noted by [`Shard::note_unknown_fence`] (0: none).
    pub fn unknown_fence(&self) -> u64 {
        self.unknown_fence.load(Ordering::Acquire)
    }

    /// Record why initialising failed (`cause`, already made printable); true when the cause
    /// differs from the last one recorded, i.e. when it is news to whoever reads the log.
    pub fn note_init_failure(&self, cause: &str) -> bool {
        let mut last = self
            .last_init_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.as_deref() == Some(cause) {
            return false;
        }
        *last = Some(cause.to_string());
        true
    }

    /// Time every wait for a pooled connection into `histogram`.
    pub fn with_pool_wait(mut self, histogram: prometheus::Histogram) -> Shard {
        self.pool_wait = Some(histogram);
        self
    }

    /// Migrations applied and identity confirmed.
    pub fn is_initialised(&self) -> bool {
        self.state.load(Ordering::Acquire) == STATE_READY
    }

    /// The database holds another shard's data: this worker must never write to it.
    pub fn is_refused(&self) -> bool {
        self.state.load(Ordering::Acquire) == STATE_REFUSED
    }

    /// Initialised and answering, as far as this worker knows (and not another fleet's).
    pub fn is_up(&self) -> bool {
        self.is_initialised()
            && self.up.load(Ordering::Acquire)
            && !self.foreign.load(Ordering::Acquire)
    }

    /// Record a health observation; returns the previous value.
    pub fn set_up(&self, up: bool) -> bool {
        self.up.swap(up, Ordering::AcqRel)
    }

    /// The per-operation timeout (SHARD_TIMEOUT_MS).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Pool status for the metrics.
    pub fn pool_status(&self) -> deadpool_postgres::Status {
        self.pool.status()
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
            .rows("SELECT to_regclass('shard_identity') IS NOT NULL", &[])
            .await?;
        if !rows.first().is_some_and(|row| row.get::<_, bool>(0)) {
            return Ok(None);
        }
        // Every column the identity has (a database from before migration 0008 has no fleet).
        let rows = self
            .rows("SELECT row_to_json(i)::text FROM shard_identity i", &[])
            .await?;
        let Some(json) = rows.first().map(|row| row.get::<_, String>(0)) else {
            return Ok(None);
        };
        let value: serde_json::Value =
            serde_json::from_str(&json).map_err(|e| StoreError::Unexpected {
                shard: self.name.clone(),
                what: format!("shard_identity as JSON: {e}"),
            })?;
        let name = value["name"].as_str().unwrap_or_default().to_string();
        let fleet = value["fleet"].as_str().map(str::to_string);
        Ok(Some((name, fleet)))
    }

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
        Ok(RingCopy {
            name: row.get(0),
            fleet: row.get(1),
            fence: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
            record: row.get::<_, Option<String>>(3).map(|json| {
                crate::ring::Record::from_json(json.as_bytes()).map_err(|e| e.to_string())
            }),
        })
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
        self.rows(
            "SELECT logstore_keep_ring($1, $2, $3, $4, $5)",
            &[&seq_bound(epoch), &i16::from(step), &json, &force, &raise],
        )
        .await
        .map(drop)
    }

    async fn migrate_and_check(&self) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.db(e))?;
        // A current schema needs no DDL (nor the lock): a least-privilege role, which may not
        // create anything, starts here. Every migration commits in one transaction with its
        // row in logstore_migrations, so seeing all rows means they are all in place.
        let row = tx
            .query_one(
                "SELECT current_user::text, to_regclass('logstore_migrations') IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| self.db(e))?;
        let (role, has_table): (String, bool) = (row.get(0), row.get(1));
        let applied: Vec<i32> = if has_table {
            tx.query("SELECT version FROM logstore_migrations", &[])
                .await
                .map_err(|e| self.db(e))?
                .iter()
                .map(|row| row.get(0))
                .collect()
        } else {
            Vec::new()
        };
        if MIGRATIONS.iter().all(|(v, _, _)| applied.contains(v)) {
            return self.check_identity(tx).await;
        }
        let missing: Vec<String> = MIGRATIONS
            .iter()
            .filter(|(v, _, _)| !applied.contains(v))
            .map(|(v, name, _)| format!("{v:04}_{name}"))
            .collect();
        let refused = |e: tokio_postgres::Error| match e.code() {
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                StoreError::CannotMigrate {
                    shard: self.name.clone(),
                    role: role.clone(),
                    missing: missing.join(", "),
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
        let applied: Vec<i32> = tx
            .query("SELECT version FROM logstore_migrations", &[])
            .await
            .map_err(|e| self.db(e))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for (version, name, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            tracing::info!(shard = %self.name, version, name, "applying migration");
            tx.batch_execute(sql).await.map_err(refused)?;
            tx.execute(
                "INSERT INTO logstore_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await
            .map_err(|e| self.db(e))?;
        }
        self.check_identity(tx).await
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
            .get(0);
        if found != self.name {
            return Err(StoreError::WrongShard {
                shard: self.name.clone(),
                found,
            });
        }
        tx.commit().await.map_err(|e| self.db(e))
    }

    /// A cheap round trip, for health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| self.db(e))?;
            Ok(())
        })
        .await
    }

    /// Append a batch without conditions in one transaction (one round trip); see
    /// [`Shard::append_expecting`].
    pub async fn append(
        &self,
        entries: &[&NewEntry],
        deadline: Instant,
    ) -> Result<Vec<Stored>, StoreError> {
        self.append_expecting(entries, &[], Routing::default(), deadline)
            .await?
            .into_iter()
            .map(|appended| match appended {
                Appended::Stored(stored) => Ok(stored),
                Appended::Conflict { last_seq } => Err(StoreError::Unexpected {
                    shard: self.name.clone(),
                    what: format!(
                        "a conflict (last seq {last_seq}) for an append without expected_seq"
                    ),
                }),
                Appended::Moved => Err(StoreError::Unexpected {
                    shard: self.name.clone(),
                    what: "`moved` for an append that named no moving object".into(),
                }),
            })
            .collect()
    }

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
        let not_sent = || StoreError::Timeout {
            shard: self.name.clone(),
            after: self.timeout,
        };
        let client = tokio::time::timeout_at(deadline, self.client())
            .await
            .map_err(|_| not_sent())??;
        let statement = tokio::time::timeout_at(
            deadline,
            client.prepare_cached(
                "SELECT ord, seq, ts, duplicate, conflict, moved
                 FROM logstore_append_at($1, $2, $3, $4, $5, $6, $7)",
            ),
        )
        .await
        .map_err(|_| not_sent())?
        .map_err(|e| self.db(e))?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
            [&epoch, &moving, &ids, &keys, &logs, &received, &expected];
        let sent = client.query(&statement, &params);
        let rows = match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) if e.code().is_some() => return Err(self.db(e)),
            outcome => {
                let reason = match outcome {
                    Ok(Err(e)) => format!("connection lost while waiting for the commit: {e}"),
                    _ => format!("no answer within {:?}", self.timeout),
                };
                // The connection may still carry the unanswered statement: never reuse it.
                drop(deadpool_postgres::Object::take(client));
                self.set_up(false);
                return Err(StoreError::OutcomeUnknown {
                    shard: self.name.clone(),
                    reason,
                });
            }
        };
        let unexpected = |what: String| StoreError::Unexpected {
            shard: self.name.clone(),
            what,
        };
        if rows.len() != entries.len() {
            return Err(unexpected(format!(
                "{} results for {} entries",
                rows.len(),
                entries.len()
            )));
        }
        // One result per entry, placed by its `ord` (moved entries come after the others).
        let mut appended: Vec<Option<Appended>> = vec![None; entries.len()];
        for row in rows {
            let ord = row.get::<_, i32>(0);
            let slot = usize::try_from(ord - 1)
                .ok()
                .and_then(|i| appended.get_mut(i))
                .ok_or_else(|| unexpected(format!("a result for entry {ord}")))?;
            let seq = row.get::<_, Option<i64>>(1).unwrap_or(0) as u64;
            // `ts` is NULL exactly for conflicts and moved entries.
            *slot = Some(
                match (row.get::<_, bool>(5), row.get::<_, bool>(4), row.get(2)) {
                    (true, _, _) => Appended::Moved,
                    (false, true, _) => Appended::Conflict { last_seq: seq },
                    (false, false, Some(ts)) => Appended::Stored(Stored {
                        seq,
                        ts,
                        duplicate: row.get(3),
                    }),
                    (false, false, None) => {
                        return Err(unexpected(format!("a stored entry (seq {seq}) without ts")))
                    }
                },
            );
        }
        appended
            .into_iter()
            .enumerate()
            .map(|(i, a)| a.ok_or_else(|| unexpected(format!("no result for entry {}", i + 1))))
            .collect()
    }

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
            .bounded(async {
                let client = self.client().await?;
                let statement = client.prepare_cached(sql).await.map_err(|e| self.db(e))?;
                client
                    .query(
                        &statement,
                        &[
                            &(id as i64),
                            &seq_bound(range.after),
                            &seq_bound(range.before.unwrap_or(u64::MAX)),
                            &seq_bound(limit),
                            &range.since,
                            &range.until,
                        ],
                    )
                    .await
                    .map_err(|e| self.db(e))
            })
            .await?;
        let mut page = FirstPage::default();
        match rows.first() {
            None => self.check_fence(epoch).await?,
            Some(row) => {
                self.fenced(epoch, row.get(6))?;
                if let Some(to) = row.get::<_, Option<String>>(7) {
                    return Err(self.moved(id, to));
                }
                page.exists = true;
            }
        }
        for row in rows {
            page.total = row.get::<_, i64>(0) as u64;
            // Both are clamped to 0 in SQL; a negative value cannot occur.
            page.lo = row.get::<_, i64>(1).max(0) as u64;
            page.hi = row.get::<_, i64>(2).max(0) as u64;
            if let Some(seq) = row.get::<_, Option<i64>>(3) {
                page.rows.push(Row {
                    seq: seq as u64,
                    ts: row.get(4),
                    log: row.get(5),
                });
            }
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
            .bounded(async {
                let client = self.client().await?;
                let statement = client.prepare_cached(sql).await.map_err(|e| self.db(e))?;
                client
                    .query(
                        &statement,
                        &[
                            &(id as i64),
                            &seq_bound(lo),
                            &seq_bound(hi),
                            &seq_bound(limit),
                        ],
                    )
                    .await
                    .map_err(|e| self.db(e))
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| Row {
                seq: row.get::<_, i64>(0) as u64,
                ts: row.get(1),
                log: row.get(2),
            })
            .collect())
    }

    /// The object's statistics from its head row alone, and whether it has one here. An
    /// unknown object has count 0. Fails as [`Shard::first_page`] does for a stale epoch or a
    /// moved object.
    pub async fn stats(&self, id: u64, epoch: u64) -> Result<(HeadStats, bool), StoreError> {
        self.ready()?;
        let row = self
            .bounded(async {
                let client = self.client().await?;
                let statement = client
                    .prepare_cached(sql::STATS)
                    .await
                    .map_err(|e| self.db(e))?;
                client
                    .query_opt(&statement, &[&(id as i64)])
                    .await
                    .map_err(|e| self.db(e))
            })
            .await?;
        let Some(row) = row else {
            self.check_fence(epoch).await?;
            return Ok((HeadStats::default(), false));
        };
        self.fenced(epoch, row.get(6))?;
        if let Some(to) = row.get::<_, Option<String>>(7) {
            return Err(self.moved(id, to));
        }
        let stats = HeadStats {
            count: row.get::<_, i64>(0) as u64,
            first_seq: row.get::<_, Option<i64>>(1).map(|s| s as u64),
            last_seq: row.get::<_, i64>(2) as u64,
            first_ts: row.get(3),
            last_ts: row.get(4),
            bytes: row.get::<_, i64>(5) as u64,
        };
        Ok((stats, true))
    }

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
                    .prepare_cached("SELECT logstore_delete_at($1, $2, $3, $4, $5)")
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
                    .map_err(|e| self.db(e))
            })
            .await?;
        match row.get::<_, Option<i64>>(0) {
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
                        "SELECT o.id, logstore_seq_at(o.id, $1) FROM objects o
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
        Ok(rows
            .iter()
            .map(|row| {
                (
                    row.get::<_, i64>(0) as u64,
                    row.get::<_, i64>(1).max(0) as u64,
                )
            })
            .collect())
    }

    /// Raise this shard's ring fence to `epoch` (the mover, before it scans for objects to
    /// move: from then on no worker of an older epoch can create an object here).
    pub async fn raise_fence(&self, epoch: u64) -> Result<(), StoreError> {
        self.ready()?;
        self.rows("SELECT logstore_fence($1)", &[&seq_bound(epoch)])
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
        let mut ids: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
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
        let locked = self
            .move_inner(to, id as i64, seq_bound(epoch), page, limit)
            .await?;
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
        let Some(head) = head.filter(|head| head.get::<_, i64>(0) > page) else {
            return Ok(0);
        };
        let until: i64 = head.get(1);
        let target = to.client_within(limit).await?;
        let after: i64 = to
            .step(
                limit,
                target.query_one(
                    "SELECT coalesce(max(seq), 0) FROM logs WHERE object_id = $1",
                    &[&id],
                ),
            )
            .await?
            .get(0);
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
            let Some(last) = rows.last() else { break };
            after = last.get(0);
            let (seqs, ts, keys, logs) = entry_columns(&rows);
            to.step(
                limit,
                target.execute(INSERT_ENTRIES, &[&id, &seqs, &ts, &keys, &logs]),
            )
            .await?;
            copied += rows.len() as u64;
        }
        Ok(copied)
    }

    /// The bound on one round trip of a long job (moving or copying an object).
    fn step_limit(&self) -> Duration {
        (self.timeout * 10).max(Duration::from_secs(30))
    }

    async fn move_inner(
        &self,
        to: &Shard,
        id: i64,
        epoch: i64,
        page: i64,
        limit: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let mut source = self.client_within(limit).await?;
        let mut target = to.client_within(limit).await?;
        let a = self.step(limit, source.transaction()).await?;
        self.step(limit, a.execute("SELECT logstore_fence($1)", &[&epoch]))
            .await?;
        let Some(head) = self
            .step(
                limit,
                a.query_opt(
                    // Timestamps as text: a head without entries holds '-infinity', which has
                    // no SystemTime (ISO output carries its offset, so the text is unambiguous).
                    "SELECT entries, last_seq, last_ts::text, prev_ts::text, first_seq,
                            first_ts::text, bytes, moved_to
                     FROM objects WHERE id = $1 FOR UPDATE",
                    &[&id],
                ),
            )
            .await?
        else {
            return Ok(None);
        };
        if head.get::<_, Option<String>>(7).is_some() {
            return Ok(None);
        }
        let b = to.step(limit, target.transaction()).await?;
        to.step(limit, b.execute("SELECT logstore_fence($1)", &[&epoch]))
            .await?;
        // `b` is not authoritative for this object until the marker below commits: its head
        // row is a copy from an interrupted attempt or a tombstone of an earlier move away, and
        // its entries are copies (see `precopy`). Those below the first entry here were
        // deleted here since; the rest are kept if they run without a gap from it (always, by
        // the reasoning in `precopy`; else everything is copied again).
        let (first, last): (Option<i64>, i64) = (head.get(4), head.get(1));
        to.step(
            limit,
            b.execute(
                "DELETE FROM logs WHERE object_id = $1
                 AND ($2::bigint IS NULL OR seq < $2 OR seq > $3)",
                &[&id, &first, &last],
            ),
        )
        .await?;
        let held = to
            .step(
                limit,
                b.query_one(
                    "SELECT count(*), max(seq) FROM logs WHERE object_id = $1",
                    &[&id],
                ),
            )
            .await?;
        let (count, top): (i64, Option<i64>) = (held.get(0), held.get(1));
        let after = match (first, top) {
            (Some(first), Some(top)) if top - first + 1 == count => top,
            (_, None) => i64::MIN,
            _ => {
                tracing::warn!(shard = %to.name, id, "copied entries do not match; copying the object again");
                to.step(
                    limit,
                    b.execute("DELETE FROM logs WHERE object_id = $1", &[&id]),
                )
                .await?;
                i64::MIN
            }
        };
        to.step(
            limit,
            b.execute("DELETE FROM objects WHERE id = $1", &[&id]),
        )
        .await?;
        to.step(
            limit,
            b.execute(
                "INSERT INTO objects (id, entries, last_seq, last_ts, prev_ts, first_seq, first_ts, bytes)
                 VALUES ($1, $2, $3, $4::text::timestamptz, $5::text::timestamptz, $6,
                         $7::text::timestamptz, $8)",
                &[
                    &id,
                    &head.get::<_, i64>(0),
                    &head.get::<_, i64>(1),
                    &head.get::<_, String>(2),
                    &head.get::<_, Option<String>>(3),
                    &head.get::<_, Option<i64>>(4),
                    &head.get::<_, Option<String>>(5),
                    &head.get::<_, i64>(6),
                ],
            ),
        )
        .await?;
        let copied = self
            .copy_entries(to, (&*a, &*b), id, after, last, page, limit)
            .await?;
        to.step(limit, b.commit()).await?;
        self.step(
            limit,
            a.execute(
                "UPDATE objects SET moved_to = $2, moved_epoch = $3 WHERE id = $1",
                &[&id, &to.name, &epoch],
            ),
        )
        .await?;
        self.step(limit, a.commit()).await?;
        Ok(Some(copied))
    }

    async fn client_within(
        &self,
        limit: Duration,
    ) -> Result<deadpool_postgres::Client, StoreError> {
        tokio::time::timeout(limit, self.client())
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Timeout {
                    shard: self.name.clone(),
                    after: limit,
                })
            })
    }

    /// `operation` on this shard, failed as a timeout after `limit`: one step of a long job,
    /// which as a whole may take as long as its steps keep answering.
    async fn step<T>(
        &self,
        limit: Duration,
        operation: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, operation).await {
            Ok(result) => result.map_err(|e| self.db(e)),
            Err(_) => Err(StoreError::Timeout {
                shard: self.name.clone(),
                after: limit,
            }),
        }
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
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Delete a tombstone's old entries, `step` rows per transaction, and empty its head row.
    /// Only ever touches an object whose head row here is a tombstone.
    pub async fn purge(&self, id: i64, step: i64) -> Result<u64, StoreError> {
        self.ready()?;
        let mut purged = 0;
        loop {
            let n: i64 = self
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
                     SELECT count(*) FROM gone",
                    &[&id, &step],
                )
                .await?
                .first()
                .map_or(0, |row| row.get(0));
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

    /// Run `sql` (statements without parameters) on the shard within the shard timeout: for
    /// operator tasks such as `worker migrate --grant`, not for the data path.
    pub async fn batch_execute(&self, sql: &str) -> Result<(), StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            client.batch_execute(sql).await.map_err(|e| self.db(e))
        })
        .await
    }

    /// Close the pool: idle connections are dropped, later gets fail.
    pub fn close(&self) {
        self.pool.close();
    }

    fn ready(&self) -> Result<(), StoreError> {
        if self.foreign.load(Ordering::Acquire) {
            if let Some(refusal) = self.fleet_refusal() {
                return Err(refusal);
            }
        }
        match self.state.load(Ordering::Acquire) {
            STATE_READY if self.up.load(Ordering::Acquire) => Ok(()),
            STATE_READY => Err(StoreError::Down {
                shard: self.name.clone(),
            }),
            _ => Err(StoreError::NotReady {
                shard: self.name.clone(),
            }),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        // A guard, so a wait cut short by a caller's deadline is recorded too.
        let _wait = self.pool_wait.as_ref().map(|h| h.start_timer());
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(source) => self.db(source),
            other => StoreError::Unavailable {
                shard: self.name.clone(),
                source: Box::new(other),
            },
        })
    }

    /// `sql` (prepared once per connection) with `params`, within the shard timeout.
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let statement = client.prepare_cached(sql).await.map_err(|e| self.db(e))?;
            client
                .query(&statement, params)
                .await
                .map_err(|e| self.db(e))
        })
        .await
    }

    async fn bounded<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout {
                shard: self.name.clone(),
                after: self.timeout,
            }),
        }
    }

    fn db(&self, source: tokio_postgres::Error) -> StoreError {
        // logstore_fence's refusal (SQLSTATE LS001) carries the fence in its detail.
        if let Some(db) = source.as_db_error() {
            if db.code().code() == STALE_EPOCH {
                let fence = db.detail().and_then(|d| d.parse().ok()).unwrap_or(u64::MAX);
                let epoch = db
                    .message()
                    .split_whitespace()
                    .nth(3)
                    .and_then(|e| e.trim_end_matches(':').parse().ok())
                    .unwrap_or(0);
                return StoreError::StaleEpoch {
                    shard: self.name.clone(),
                    epoch,
                    fence,
                };
            }
        }
        StoreError::Database {
            shard: self.name.clone(),
            source,
        }
    }

    fn moved(&self, id: u64, to: String) -> StoreError {
        StoreError::Moved {
            shard: self.name.clone(),
            id,
            to,
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
        let fence = rows.first().map_or(0, |row| row.get(0));
        self.fenced(epoch, fence)
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
            Some(row) => (true, row.get(0)),
        })
    }
}
