//! PostgreSQL shards: connection pools, embedded migrations, the shard-identity check, batched
//! idempotent appends and paged reads.
//!
//! Every operation is bounded by the shard timeout, so a shard that is down or hung answers
//! `unavailable` quickly instead of stalling the worker. Errors say whether they are a normal
//! outage ([`StoreError::is_unavailable`]) or a fault.
//!
//! # Layout
//! This file holds the [`Shard`] handle (pool, health and init state) and the helpers every
//! operation goes through (`client`, `rows`, `bounded`, `step`, `db`). Each concern has its
//! own file, each adding an `impl Shard` block:
//! - `error`: [`StoreError`] and its classification.
//! - `migrate`: the embedded migrations, the shard's name and fleet ([`Shard::initialise`]).
//! - `append`: the batched append ([`Shard::append_expecting`]).
//! - `read`: the read statements ([`sql`]), [`Shard::first_page`], [`Shard::page`],
//!   [`Shard::stats`].
//! - `delete`: [`Shard::delete_step`] and the retention scan ([`Shard::expired`]).
//! - `reshard`: fences, moving objects between shards, tombstones, the ring record's copies.
//! - [`tls`]: libpq's TLS parameters over rustls.
//!
//! Rows are read by column name (each result type's `from_row`), never by position, so a
//! column added to a statement cannot shift the others.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::{conninfo, ShardConfig};

mod append;
mod delete;
mod error;
mod migrate;
mod read;
mod reshard;
pub mod tls;

pub use append::{Appended, NewEntry, Stored};
pub use error::{store_error_body, StoreError};
pub use read::{sql, FirstPage, HeadStats, ReadRange, Row};
pub use reshard::{Copied, RingCopy};

use migrate::Fleet;

/// How the worker routed an append: the ring epoch it routed by, and the objects of the batch
/// whose owner the running move changes (sent to their old owner, which stores them only if
/// they still live there; see migrations/0007_resharding.sql).
#[derive(Debug, Clone, Copy, Default)]
pub struct Routing<'a> {
    pub epoch: u64,
    pub moving: &'a [u64],
}

/// A u64 cursor as the `bigint` it is compared with. Stored seqs never exceed `i64::MAX`, so a
/// larger cursor means "past the end" and clamping keeps that meaning (a plain cast would wrap
/// to a negative number and restart the log from seq 1).
fn seq_bound(cursor: u64) -> i64 {
    i64::try_from(cursor).unwrap_or(i64::MAX)
}

/// `host:port` of every host `pg` names, comma-separated (a socket directory for a Unix
/// socket), as libpq would try them.
fn address_of(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = pg.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts: Vec<String> = if pg.get_hosts().is_empty() {
        let addrs = pg.get_hostaddrs().iter().enumerate();
        addrs
            .map(|(i, ip)| std::net::SocketAddr::new(*ip, port(i)).to_string())
            .collect()
    } else {
        let hosts = pg.get_hosts().iter().enumerate();
        hosts
            .map(|(i, host)| match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{}", port(i)),
                Host::Tcp(name) => format!("{name}:{}", port(i)),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{}", dir.display(), port(i)),
            })
            .collect()
    };
    hosts.join(",")
}

const STATE_PENDING: u8 = 0;
const STATE_READY: u8 = 1;
const STATE_REFUSED: u8 = 2;

/// A handle to one shard. Cheap to share behind an `Arc`.
pub struct Shard {
    pub name: String,
    /// Where the pool connects, `host:port` (no user or password), for the errors people read.
    address: String,
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
    /// Pooled connections made before the server answered read-only are never used again.
    stale: Arc<Stale>,
}

/// When the shard last answered read-only: the pool's connections made before then lead to
/// that server (a standby, or the old primary), so none of them is handed out again; the
/// next connection is made afresh, to whichever host of the URL is the primary now.
struct Stale {
    /// When the pool was built; `before` counts from here.
    since: std::time::Instant,
    /// Microseconds from `since` to the last read-only answer (0: none yet).
    before: AtomicU64,
}

impl Stale {
    fn new() -> Stale {
        Stale {
            since: std::time::Instant::now(),
            before: AtomicU64::new(0),
        }
    }

    /// From now, every connection made until now is stale.
    fn mark(&self) {
        let now = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.before.fetch_max(now.max(1), Ordering::AcqRel);
    }

    /// Whether a connection made at `created` is stale.
    fn covers(&self, created: std::time::Instant) -> bool {
        let made = created.saturating_duration_since(self.since).as_micros();
        made < u128::from(self.before.load(Ordering::Acquire))
    }
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
        // Several hosts (an HA pair): the writable one, each tried within its share of the
        // connect timeout.
        conninfo::for_writing(&url, &mut pg).map_err(|e| format!("shard {}: {e}", config.name))?;
        let address = address_of(&pg);
        let manager = Manager::from_config(
            pg,
            connector,
            ManagerConfig {
                // Fast: a connection whose socket died is dropped on return anyway; a broken one
                // that still looks open fails its next statement, which answers `unavailable`.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let stale = Arc::new(Stale::new());
        let seen = stale.clone();
        let pool = Pool::builder(manager)
            .pre_recycle(Hook::sync_fn(move |_, metrics| {
                if seen.covers(metrics.created) {
                    return Err(HookError::message(
                        "made before the server answered read-only",
                    ));
                }
                Ok(())
            }))
            .max_size(pool_size)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| format!("shard {}: cannot build pool: {e}", config.name))?;
        Ok(Shard {
            name: config.name.clone(),
            address,
            pool,
            timeout,
            state: AtomicU8::new(STATE_PENDING),
            up: AtomicBool::new(false),
            pool_wait: None,
            last_init_failure: std::sync::Mutex::new(None),
            fleet: std::sync::Mutex::new(Fleet::default()),
            foreign: AtomicBool::new(false),
            unknown_fence: AtomicU64::new(0),
            stale,
        })
    }

    /// The server answered read-only: the shard is down until a health check finds a writable
    /// primary, and no connection made until now is used again (idle ones are closed now,
    /// those in use when they come back), so the next one is made to the URL's primary.
    fn discard_connections(&self) {
        self.stale.mark();
        self.set_up(false);
        let stale = &self.stale;
        self.pool
            .retain(|_, metrics| !stale.covers(metrics.created));
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

    /// A cheap round trip, for health checks, that also asks whether the server takes writes:
    /// a standby (or any read-only server) is [`StoreError::ReadOnly`], i.e. down.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let answer = client
                .simple_query("SHOW transaction_read_only")
                .await
                .map_err(|e| self.db(e))?;
            let read_only = answer.iter().any(|message| match message {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0) == Some("on"),
                _ => false,
            });
            if read_only {
                self.discard_connections();
                return Err(StoreError::ReadOnly {
                    shard: self.name.clone(),
                    source: None,
                });
            }
            Ok(())
        })
        .await
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

    /// Refuse an operation up front while the shard is another fleet's, not initialised, or
    /// down: the caller answers `unavailable` without waiting on a pooled connection.
    pub(super) fn ready(&self) -> Result<(), StoreError> {
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

    pub(super) async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        // A guard, so a wait cut short by a caller's deadline is recorded too.
        let _wait = self.pool_wait.as_ref().map(|h| h.start_timer());
        self.pool.get().await.map_err(|e| match e {
            // Only making a new connection fails with the driver's error.
            PoolError::Backend(source) => StoreError::connect(&self.name, &self.address, source),
            other => StoreError::Unavailable {
                shard: self.name.clone(),
                source: Box::new(other),
            },
        })
    }

    /// `sql` (prepared once per connection) with `params`, within the shard timeout.
    pub(super) async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.rows_at(0, sql, params).await
    }

    /// [`Shard::rows`] for a statement that checks the ring fence for a request routed by
    /// `epoch` (see [`Shard::db_at`]).
    pub(super) async fn rows_at(
        &self,
        epoch: u64,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.bounded(async {
            let client = self.client().await?;
            let statement = client.prepare_cached(sql).await.map_err(|e| self.db(e))?;
            client
                .query(&statement, params)
                .await
                .map_err(|e| self.db_at(epoch, e))
        })
        .await
    }

    /// `work` within the shard timeout, failed as [`StoreError::Timeout`] after it.
    pub(super) async fn bounded<T>(
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

    /// A database error of a statement that names no ring epoch.
    pub(super) fn db(&self, source: tokio_postgres::Error) -> StoreError {
        self.db_at(0, source)
    }

    /// A database error of a statement routed by ring `epoch` (one that calls logstore_fence):
    /// a stale epoch is reported with the epoch the caller sent ([`StoreError::from_db`]).
    /// A read-only answer discards the pool's connections ([`Shard::discard_connections`]).
    pub(super) fn db_at(&self, epoch: u64, source: tokio_postgres::Error) -> StoreError {
        let error = StoreError::from_db(&self.name, source, epoch);
        if matches!(error, StoreError::ReadOnly { .. }) {
            self.discard_connections();
        }
        error
    }

    /// A row that does not decode into its result type ([`StoreError::bad_row`]).
    pub(super) fn bad_row(&self, source: tokio_postgres::Error) -> StoreError {
        StoreError::bad_row(&self.name, source)
    }

    pub(super) fn moved(&self, id: u64, to: String) -> StoreError {
        StoreError::Moved {
            shard: self.name.clone(),
            id,
            to,
        }
    }

    /// The bound on one round trip of a long job (moving or copying an object).
    pub(super) fn step_limit(&self) -> Duration {
        (self.timeout * 10).max(Duration::from_secs(30))
    }

    /// A pooled connection within `limit` (a step of a long job, see [`Shard::step`]).
    pub(super) async fn client_within(
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
    pub(super) async fn step<T>(
        &self,
        limit: Duration,
        operation: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        self.step_at(limit, 0, operation).await
    }

    /// [`Shard::step`] for a statement that checks the ring fence for a request routed by
    /// `epoch` (see [`Shard::db_at`]).
    pub(super) async fn step_at<T>(
        &self,
        limit: Duration,
        epoch: u64,
        operation: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, operation).await {
            Ok(result) => result.map_err(|e| self.db_at(epoch, e)),
            Err(_) => Err(StoreError::Timeout {
                shard: self.name.clone(),
                after: limit,
            }),
        }
    }
}
