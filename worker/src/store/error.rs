//! [`StoreError`]: what a shard operation can fail with, and the classification callers decide
//! by ([`StoreError::is_unavailable`]: an outage worth retrying, or a fault). Shown through
//! [`crate::Chain`], each reads as one line a person can act on: `shard pg2: cannot connect to
//! 127.0.0.1:5433: Connection refused (os error 111)`.

use std::time::Duration;

use crate::config::Human;

use logstore_protocol::{ErrorBody, ErrorCode};

/// SQLSTATE of logstore_fence's refusal of a stale ring epoch (migrations/0007_resharding.sql).
const STALE_EPOCH: &str = "LS001";
/// SQLSTATE read_only_sql_transaction: a write on a standby (or on a server set read-only).
const READ_ONLY: &str = "25006";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("shard {shard} is unavailable: {source}")]
    Unavailable {
        shard: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("shard {shard} timed out after {}", Human(*after))]
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
    /// The server answers read-only: a standby (in recovery), a primary not promoted yet, or
    /// one set `default_transaction_read_only`. An outage, like a server that is down: the
    /// pool drops its connections, so the next one finds the primary of the shard's URL (see
    /// `Shard::discard_connections`). `source`: the refused statement's error, where one was
    /// refused (a health check that reads `transaction_read_only = on` refuses none).
    #[error(
        "shard {shard} is read-only (a standby, or a server in recovery): waiting for a \
         writable primary"
    )]
    ReadOnly {
        shard: String,
        #[source]
        source: Option<tokio_postgres::Error>,
    },
    #[error(
        "shard {shard}: the database at this URL belongs to shard {found}; refusing to use it \
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
        "shard {shard}: the schema lacks migration(s) {missing} and role {role} may not apply \
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
    /// A connection to the shard could not be made (refused, timed out, the login or TLS
    /// refused, the server starting or shutting down): the shard's address and the cause.
    #[error("shard {shard}: cannot connect to {address}: {source}")]
    Connect {
        shard: String,
        /// host:port (no user or password).
        address: String,
        #[source]
        source: PgError,
    },
    #[error("shard {shard}: {source}")]
    Database {
        shard: String,
        #[source]
        source: PgError,
    },
}

/// A driver error as a person reads it: where the driver's own text is only generic (`db
/// error`, `error connecting to server`), its cause's instead: the server's message (`FATAL:
/// password authentication failed for user "logstore_worker"`, DETAIL and HINT joined into the
/// same line) or the operating system's (`Connection refused (os error 111)`). Other texts
/// (`error performing TLS handshake`) stay, with their cause after them in the chain.
#[derive(Debug)]
pub struct PgError(pub tokio_postgres::Error);

impl PgError {
    /// The driver's error.
    pub fn driver(&self) -> &tokio_postgres::Error {
        &self.0
    }

    /// The cause that stands in for the driver's generic text, if it has one.
    fn instead(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let generic = matches!(
            self.0.to_string().as_str(),
            "db error" | "error connecting to server"
        );
        generic
            .then(|| std::error::Error::source(&self.0))
            .flatten()
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.instead() {
            Some(cause) => f.write_str(&cause.to_string().replace('\n', "; ")),
            None => self.0.fmt(f),
        }
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.instead() {
            // What the cause says is shown already: its own causes follow.
            Some(cause) => cause.source(),
            None => std::error::Error::source(&self.0),
        }
    }
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
            | StoreError::ReadOnly { .. }
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
            StoreError::Connect { source, .. } | StoreError::Database { source, .. } => {
                match source.driver().code() {
                    None => true,
                    Some(state) => ["08", "53", "57P"]
                        .iter()
                        .any(|class| state.code().starts_with(class)),
                }
            }
        }
    }

    /// True when the operation may have taken effect although it failed (see
    /// [`StoreError::OutcomeUnknown`]).
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, StoreError::OutcomeUnknown { .. })
    }

    /// `source`, an error of a statement on shard `shard` that was routed by ring epoch `epoch`
    /// (0 for a statement that names no epoch). logstore_fence's refusal (SQLSTATE LS001)
    /// becomes [`StoreError::StaleEpoch`]: the fence comes from the error's detail, the epoch
    /// from the caller, who sent it. A write refused as read-only (25006) becomes
    /// [`StoreError::ReadOnly`].
    pub(crate) fn from_db(shard: &str, source: tokio_postgres::Error, epoch: u64) -> StoreError {
        if let Some(db) = source.as_db_error() {
            if db.code().code() == READ_ONLY {
                return StoreError::ReadOnly {
                    shard: shard.to_string(),
                    source: Some(source),
                };
            }
            if db.code().code() == STALE_EPOCH {
                let fence = db.detail().and_then(|d| d.parse().ok()).unwrap_or(u64::MAX);
                return StoreError::StaleEpoch {
                    shard: shard.to_string(),
                    epoch,
                    fence,
                };
            }
        }
        StoreError::Database {
            shard: shard.to_string(),
            source: PgError(source),
        }
    }

    /// `source`, the error of a new connection to shard `shard` at `address`.
    pub(crate) fn connect(shard: &str, address: &str, source: tokio_postgres::Error) -> StoreError {
        StoreError::Connect {
            shard: shard.to_string(),
            address: address.to_string(),
            source: PgError(source),
        }
    }

    /// A row without the columns its statement names, or of other types (a bug, not an outage:
    /// never a [`StoreError::Database`], whose missing SQLSTATE would read as a lost connection).
    pub(crate) fn bad_row(shard: &str, source: tokio_postgres::Error) -> StoreError {
        StoreError::Unexpected {
            shard: shard.to_string(),
            what: format!("a row that does not decode: {source}"),
        }
    }
}

/// The error a client sees for a store failure. Outages say `unavailable` (nothing stored;
/// retry with the same key), an unknown outcome says `timeout` (retry with the same key, which
/// answers as a duplicate if it was stored); anything else is `internal`, with the detail in
/// the worker's log rather than the reply. A shard's network address is the log's, never the
/// client's.
pub fn store_error_body(e: &StoreError) -> ErrorBody {
    if e.is_outcome_unknown() {
        ErrorBody::new(ErrorCode::Timeout, told(e))
    } else if e.is_unavailable() {
        ErrorBody::new(ErrorCode::Unavailable, told(e))
    } else {
        tracing::error!(error = %crate::Chain(e), "store fault");
        ErrorBody::new(
            ErrorCode::Internal,
            format!("shard error (see worker log): {}", short(e)),
        )
    }
}

fn short(e: &StoreError) -> String {
    match e {
        StoreError::Database { source, .. } => source
            .driver()
            .as_db_error()
            .map(|db| db.message().to_string())
            .unwrap_or_else(|| source.to_string()),
        other => told(other),
    }
}

/// `e` as a client is told it: without the shard's network address.
fn told(e: &StoreError) -> String {
    match e {
        StoreError::Connect { shard, source, .. } => {
            format!("shard {shard}: cannot connect: {source}")
        }
        other => other.to_string(),
    }
}
