//! Configuration: every setting is an environment variable with a CLI twin, validated once at
//! start into a [`Config`] that the rest of the worker shares as `Arc<Config>`.
//!
//! Raw values are read as text and validated here rather than by clap's typed parsers, so that a
//! missing or malformed setting fails with exactly one line naming the variable.
//!
//! Secrets (`NATS_URL`, `POSTGRES_SHARDS`, `POSTGRES_PASSWORD`, the content of
//! `POSTGRES_PASSWORD_FILE` and of the NATS secret files) are never shown: `--help` hides their
//! environment values, errors pass every connection string through [`redact`], `Debug` is
//! derived over fields whose [`secret`] types redact or mask them, and NATS credentials travel in
//! the connect options rather than in the URLs the client library logs. The NATS login and TLS
//! settings are the ones loadgen and the CLI read too ([`logstore_protocol::nats`]).
//!
//! Layout: `raw` (the clap settings and `validate`), `parse` (one setting's text to a
//! value), `shards` (shard URLs, the PostgreSQL login, ring-member access), [`conninfo`]
//! (libpq's connection parameters: TLS ones split out, defaults, quoting), [`secret`]
//! (`Redacted`, `Masked`), [`shown`] (settings as a person writes them, for log lines:
//! `retention=7d`, durations like `33s`); the validated types live here.

use std::net::SocketAddr;
use std::time::Duration;

use logstore_protocol::nats::NatsAccess;
use logstore_protocol::redact::redact;
use logstore_protocol::Limits;

use conninfo::quote_conninfo;

pub mod conninfo;
mod parse;
mod raw;
pub mod secret;
mod shards;
pub mod shown;
#[cfg(test)]
mod tests;

pub use crate::replies::ReplyPolicy;
pub use raw::RawConfig;
pub use secret::{Masked, Redacted};
pub use shards::{parse_shards, without_login, without_password, MemberAccess};
pub use shown::Human;

/// A configuration problem, always naming the variable at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {var}: {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

/// A [`ConfigError`] for `var`.
fn bad(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        problem: problem.into(),
    }
}

/// One PostgreSQL node on the ring. `Debug` redacts the connection string. (`url` stays a
/// `String`, and this `Debug` hand-written: callers build and edit it as one.)
#[derive(Clone, PartialEq, Eq)]
pub struct ShardConfig {
    /// Identity on the ring and in the shard's own database. Never derived from the URL alone,
    /// so a changed password or host does not move data.
    pub name: String,
    /// Connection string: a `postgres://` URL from POSTGRES_SHARDS, or the key=value form
    /// built from POSTGRES_IPS (as tokio-postgres accepts).
    pub url: String,
}

impl std::fmt::Debug for ShardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardConfig")
            .field("name", &self.name)
            .field("url", &redact(&self.url))
            .finish()
    }
}

/// How appends reach the workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// Plain queue subscription: replies to the publisher, nothing kept while no worker listens.
    Core,
    /// Durable stream + shared pull consumer: nothing published is lost.
    JetStream(JetStreamConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    pub stream: String,
    pub consumer: String,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub max_ack_pending: i64,
    /// JS_MAX_BYTES and JS_MAX_MSGS (-1: unlimited).
    pub max_bytes: i64,
    pub max_messages: i64,
    pub duplicate_window: Duration,
    /// Single puller under a lease, stream order per object (JS_ORDERED).
    pub ordered: bool,
    pub lease: Duration,
    /// JS_PARTITIONS: the ordered intake's partitions when this worker creates the stream (the
    /// stream's own count wins afterwards); 0: the `logs` lane only.
    pub partitions: u32,
    /// JS_REPLICAS: the stream's copies at least (its consumers have as many as it has).
    pub replicas: usize,
}

/// The JetStream stream that keeps dead letters (DEAD_LETTERS_STREAM, DEAD_LETTERS_MAX_AGE,
/// DEAD_LETTERS_MAX_MSGS, DEAD_LETTERS_MAX_BYTES).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterStream {
    pub name: String,
    pub max_age: Duration,
    /// -1: unlimited.
    pub max_messages: i64,
    /// -1: unlimited.
    pub max_bytes: i64,
}

/// The retention sweeper's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Entries whose ts is older than now minus this are removed.
    pub max_age: Duration,
    /// Pause between sweeps that found nothing to remove.
    pub interval: Duration,
}

/// The validated configuration. `Debug` redacts (see [`secret`]).
#[derive(Clone, Debug)]
pub struct Config {
    pub intake: Intake,
    /// JS_REPLICAS: copies of the stream, its consumers and the KV buckets (leases, ring
    /// record) the worker creates or finds with fewer; with JetStream intake also in
    /// [`JetStreamConfig::replicas`].
    pub js_replicas: usize,
    /// NATS_URL as given (with any credentials).
    pub nats_url: Redacted,
    /// NATS_URL's credential-free server URLs, the login (from NATS_URL or the secret files,
    /// read once at start) and TLS.
    pub nats: NatsAccess,
    pub shards: Vec<ShardConfig>,
    pub logs_subject: String,
    pub query_subject: String,
    pub response_subject: String,
    pub stats_subject: String,
    pub delete_subject: String,
    /// `None`: RETENTION_MAX_AGE is off.
    pub retention: Option<Retention>,
    pub queue_group: String,
    pub events_prefix: String,
    /// NATS_REJECTED_PREFIX: `rejected.<id>` events go to `<rejected_prefix>.<id>`.
    pub rejected_prefix: String,
    pub dead_letter_subject: String,
    /// DEAD_LETTERS_STREAM and its limits; None: `off`.
    pub dead_letters: Option<DeadLetterStream>,
    /// NATS_REPLY_PREFIXES: the reply subjects the worker answers (see [`ReplyPolicy`]).
    pub replies: ReplyPolicy,
    pub metrics_addr: SocketAddr,
    pub json_logs: bool,
    pub ring_vnodes: u32,
    pub limits: Limits,
    pub max_batch_entries: usize,
    pub batch_max_rows: usize,
    pub batch_linger: Duration,
    pub pool_size: usize,
    pub max_concurrent_queries: usize,
    pub shard_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub query_timeout: Duration,
    pub max_pending_queries: usize,
    pub max_query_bytes: usize,
    pub moves: Moves,
    /// How this worker logs in to a ring member it learns of from NATS (whose URL is stored
    /// there without a password).
    pub member_access: MemberAccess,
}

/// The mover's settings (MOVE_RATE, MOVE_GRACE_MS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moves {
    /// Objects per second.
    pub rate: u32,
    pub grace: Duration,
}
