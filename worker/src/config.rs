//! Configuration: every setting is an environment variable with a CLI twin, validated once at
//! start into a [`Config`] that the rest of the worker shares as `Arc<Config>`.
//!
//! Raw values are read as text and validated here rather than by clap's typed parsers, so that a
//! missing or malformed setting fails with exactly one line naming the variable.
//!
//! Secrets (`NATS_URL`, `POSTGRES_SHARDS`, `POSTGRES_PASSWORD`, the content of
//! `POSTGRES_PASSWORD_FILE` and of the NATS secret files) are never shown: `--help` hides their
//! environment values, errors and `Debug` pass every connection string through [`redact`], and
//! NATS credentials travel in the connect options rather than in the URLs the client library
//! logs. The NATS login and TLS settings are the ones loadgen and the CLI read too
//! ([`logstore_protocol::nats`]).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use logstore_protocol::nats::{NatsAccess, NatsSecurityArgs};

pub use crate::replies::ReplyPolicy;
use logstore_protocol::redact::{redact, split_list, MASK};
use logstore_protocol::Limits;

/// A configuration problem, always naming the variable at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {var}: {problem}")]
pub struct ConfigError {
    pub var: &'static str,
    pub problem: String,
}

fn bad(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        problem: problem.into(),
    }
}

/// The raw settings as given on the command line or in the environment. `Debug` redacts.
#[derive(Clone, Default, Args)]
pub struct RawConfig {
    /// NATS server URL(s), comma-separated; credentials as `nats://user:pass@host` or
    /// `nats://token@host`.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,
    /// NATS login (NATS_USER + NATS_PASSWORD_FILE, NATS_TOKEN_FILE, NATS_NKEY_SEED_FILE,
    /// NATS_CREDS_FILE) and TLS (NATS_TLS_CA_FILE, NATS_TLS_CERT_FILE, NATS_TLS_KEY_FILE).
    #[command(flatten)]
    pub nats_security: NatsSecurityArgs,
    /// Shards as `name=postgres://user:pass@host:port/db,name2=…` (URLs only, no spaces). The
    /// name is the shard's identity on the ring; the URL may change freely.
    #[arg(long, env = "POSTGRES_SHARDS", hide_env_values = true)]
    pub postgres_shards: Option<String>,
    /// The original service's form: comma list of hosts, each a shard named after its host.
    #[arg(long, env = "POSTGRES_IPS")]
    pub postgres_ips: Option<String>,
    #[arg(long, env = "POSTGRES_PORT", default_value = "5432")]
    pub postgres_port: String,
    #[arg(long, env = "POSTGRES_USER", default_value = "postgres")]
    pub postgres_user: String,
    #[arg(
        long,
        env = "POSTGRES_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub postgres_password: String,
    /// A file holding the PostgreSQL password (read once at start; a trailing newline is
    /// dropped), e.g. a Docker/Kubernetes secret. Like POSTGRES_PASSWORD, it fills every shard
    /// URL that has no password of its own. Set one of the two, not both.
    #[arg(long, env = "POSTGRES_PASSWORD_FILE")]
    pub postgres_password_file: Option<String>,
    #[arg(long, env = "POSTGRES_DB", default_value = "postgres")]
    pub postgres_db: String,
    /// TLS for every shard whose URL names no `sslmode` (and the POSTGRES_IPS form): disable,
    /// prefer (libpq's default), require, verify-ca or verify-full.
    #[arg(long, env = "POSTGRES_SSLMODE")]
    pub postgres_sslmode: Option<String>,
    /// CA certificate(s) (PEM file) for every shard whose URL names no `sslrootcert`.
    #[arg(long, env = "POSTGRES_SSLROOTCERT")]
    pub postgres_sslrootcert: Option<String>,
    /// Client certificate (PEM file) for every shard whose URL names no `sslcert`.
    #[arg(long, env = "POSTGRES_SSLCERT")]
    pub postgres_sslcert: Option<String>,
    /// Client certificate's key (PEM file) for every shard whose URL names no `sslkey`.
    #[arg(long, env = "POSTGRES_SSLKEY")]
    pub postgres_sslkey: Option<String>,
    #[arg(long, env = "NATS_LOGS_TOPIC", default_value = "logs")]
    pub nats_logs_topic: String,
    #[arg(long, env = "NATS_QUERY_TOPIC", default_value = "query")]
    pub nats_query_topic: String,
    #[arg(long, env = "NATS_RESPONSE_TOPIC", default_value = "response")]
    pub nats_response_topic: String,
    /// Subject of stats requests (an object's count, seq and ts range, bytes).
    #[arg(long, env = "NATS_STATS_TOPIC", default_value = "stats")]
    pub nats_stats_topic: String,
    /// Subject of delete requests (remove an object's entries below a seq).
    #[arg(long, env = "NATS_DELETE_TOPIC", default_value = "delete")]
    pub nats_delete_topic: String,
    /// Entries older than this are removed by a background sweeper (e.g. `30d`, `12h`,
    /// `90m`); `off` (the default) keeps everything.
    #[arg(long, env = "RETENTION_MAX_AGE", default_value = "off")]
    pub retention_max_age: String,
    /// How often the retention sweeper looks for expired entries when it found none last
    /// time (e.g. `60s`).
    #[arg(long, env = "RETENTION_INTERVAL", default_value = "60s")]
    pub retention_interval: String,
    #[arg(long, env = "NATS_QUEUE_GROUP", default_value = "workers")]
    pub nats_queue_group: String,
    #[arg(long, env = "NATS_EVENTS_PREFIX", default_value = "appended")]
    pub nats_events_prefix: String,
    #[arg(long, env = "NATS_DEAD_LETTER_TOPIC", default_value = "dead_letter")]
    pub nats_dead_letter_topic: String,
    /// Reply subjects the worker answers, comma-separated prefixes: NATS inboxes (`_INBOX.`,
    /// per-user `_INBOX_<user>.`) and the server's replies through a service import (`_R_.`).
    /// A request whose reply subject starts otherwise is refused and never answered: the
    /// reply subject is the sender's choice, and the worker must not publish where the sender
    /// could not (a ring record, a lease, `appended.<id>`). The worker's own NATS_INBOX_PREFIX
    /// is always refused.
    #[arg(
        long,
        env = "NATS_REPLY_PREFIXES",
        default_value = "_INBOX.,_INBOX_,_R_."
    )]
    pub nats_reply_prefixes: String,
    /// How appends arrive: `jetstream` (durable: a stream captures every publish, workers ack
    /// after commit) or `core` (the original's plain queue subscription, at most once).
    #[arg(long, env = "INTAKE", default_value = "jetstream")]
    pub intake: String,
    /// JetStream stream capturing the logs subject (created or updated at start).
    #[arg(long, env = "NATS_STREAM", default_value = "LOGS")]
    pub nats_stream: String,
    /// Durable pull consumer shared by all workers.
    #[arg(long, env = "NATS_CONSUMER", default_value = "workers")]
    pub nats_consumer: String,
    /// How long a delivered message may stay unacknowledged before JetStream redelivers it.
    #[arg(long, env = "JS_ACK_WAIT_MS", default_value = "30000")]
    pub js_ack_wait_ms: String,
    /// Deliveries of a message that keeps failing (not because its shard is down) before it
    /// goes to the dead-letter subject.
    #[arg(long, env = "JS_MAX_DELIVER", default_value = "5")]
    pub js_max_deliver: String,
    /// Most messages delivered and not yet acknowledged across the fleet (backpressure).
    #[arg(long, env = "JS_MAX_ACK_PENDING", default_value = "20000")]
    pub js_max_ack_pending: String,
    /// Largest stream size in bytes (default 1 GiB); when full, a publish is refused with an
    /// error and nothing stored is dropped (discard new). -1 = unlimited.
    #[arg(long, env = "JS_MAX_BYTES", default_value = "1073741824")]
    pub js_max_bytes: String,
    /// Most messages the stream holds; when full, a publish is refused with an error and
    /// nothing stored is dropped (discard new). -1 = unlimited.
    #[arg(long, env = "JS_MAX_MSGS", default_value = "10000000")]
    pub js_max_msgs: String,
    /// How long the stream itself drops a re-published `Nats-Msg-Id`, across ALL objects, in
    /// milliseconds (JetStream's minimum is 100). The database deduplicates keys per object
    /// forever; a short window keeps the stream from dropping another object's append that
    /// reuses an id.
    #[arg(long, env = "JS_DUPLICATE_WINDOW_MS", default_value = "100")]
    pub js_duplicate_window_ms: String,
    /// `true`: one worker at a time pulls the stream (a lease in NATS KV) and stores each
    /// object's appends in stream order, across crashes and shard outages. `false`: every
    /// worker pulls, faster, and appends to one object may be stored out of publish order.
    #[arg(long, env = "JS_ORDERED", default_value = "true")]
    pub js_ordered: String,
    /// How long the intake lease outlives its holder's last renewal (milliseconds): how soon
    /// another worker takes over the stream after the puller dies.
    #[arg(long, env = "JS_LEASE_MS", default_value = "3000")]
    pub js_lease_ms: String,
    /// Address of the HTTP server for /metrics, /healthz and /readyz (`:PORT` = all interfaces).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:2112")]
    pub metrics_addr: String,
    /// Log output format: `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Virtual nodes per shard on the ring (placement depends on it: keep it equal on every worker).
    #[arg(long, env = "RING_VNODES", default_value = "1000")]
    pub ring_vnodes: String,
    /// Largest accepted log entry in bytes.
    #[arg(long, env = "MAX_LOG_BYTES", default_value = "65536")]
    pub max_log_bytes: String,
    /// Largest accepted idempotency key in bytes.
    #[arg(long, env = "MAX_KEY_BYTES", default_value = "256")]
    pub max_key_bytes: String,
    /// Most entries in one batch append message (a JSON array body).
    #[arg(long, env = "MAX_BATCH_ENTRIES", default_value = "1000")]
    pub max_batch_entries: String,
    /// Most appends written to one shard in one transaction.
    #[arg(long, env = "BATCH_MAX_ROWS", default_value = "1000")]
    pub batch_max_rows: String,
    /// How long a batch that has started waits for more appends before it is written, in
    /// milliseconds (0: write whatever is queued at once).
    #[arg(long, env = "BATCH_LINGER_MS", default_value = "2")]
    pub batch_linger_ms: String,
    /// Connections per shard pool.
    #[arg(long, env = "POOL_SIZE", default_value = "8")]
    pub pool_size: String,
    /// Most queries answered concurrently by one worker.
    #[arg(long, env = "MAX_CONCURRENT_QUERIES", default_value = "32")]
    pub max_concurrent_queries: String,
    /// How long a shard operation may take before it is answered `unavailable`, in milliseconds.
    #[arg(long, env = "SHARD_TIMEOUT_MS", default_value = "5000")]
    pub shard_timeout_ms: String,
    /// How long shutdown may take to finish in-flight work, in milliseconds.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_MS", default_value = "20000")]
    pub shutdown_timeout_ms: String,
    /// How long a query may take from receipt to its last response message, in milliseconds;
    /// later it is answered with the error code `timeout`.
    #[arg(long, env = "QUERY_TIMEOUT_MS", default_value = "10000")]
    pub query_timeout_ms: String,
    /// Most queries one worker holds (waiting plus running); more are answered `busy` at once.
    #[arg(long, env = "MAX_PENDING_QUERIES", default_value = "256")]
    pub max_pending_queries: String,
    /// Most response bytes one query request streams; a larger answer ends with a `next`
    /// cursor to continue from (paging still reads everything).
    #[arg(long, env = "MAX_QUERY_BYTES", default_value = "16777216")]
    pub max_query_bytes: String,
    /// Resharding: most objects per second the mover moves (`worker shards add/remove`), so
    /// appends keep their latency while a move runs.
    #[arg(long, env = "MOVE_RATE", default_value = "200")]
    pub move_rate: String,
    /// Resharding: how long after the last object moved its old copies are purged, in
    /// milliseconds. Keep it above QUERY_TIMEOUT_MS: a query that began reading an old copy
    /// before its object moved finishes reading it.
    #[arg(long, env = "MOVE_GRACE_MS", default_value = "30000")]
    pub move_grace_ms: String,
}

/// One PostgreSQL node on the ring. `Debug` redacts the connection string.
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
}

/// The retention sweeper's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Entries whose ts is older than now minus this are removed.
    pub max_age: Duration,
    /// Pause between sweeps that found nothing to remove.
    pub interval: Duration,
}

/// The validated configuration. `Debug` redacts.
#[derive(Clone)]
pub struct Config {
    pub intake: Intake,
    /// NATS_URL as given (with any credentials): show it only through [`redact`].
    pub nats_url: String,
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
    pub dead_letter_subject: String,
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

/// This worker's own PostgreSQL login (the user and password it logs in to its POSTGRES_SHARDS
/// with) and the POSTGRES_SSL* defaults, kept to fill the URLs of ring members learnt from NATS
/// (stored there without user or password) as POSTGRES_SHARDS URLs are filled. `Debug` redacts.
#[derive(Clone, Default)]
pub struct MemberAccess {
    /// The user of this worker's first configured shard (its POSTGRES_SHARDS URL's, or
    /// POSTGRES_USER with POSTGRES_IPS or a URL naming none).
    user: Option<String>,
    /// POSTGRES_PASSWORD / POSTGRES_PASSWORD_FILE, else the password of the first configured
    /// shard's URL.
    password: Option<String>,
    tls: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for MemberAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberAccess")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl MemberAccess {
    /// The login this worker uses for its own shards: the user (and, without
    /// POSTGRES_PASSWORD, the password) of `first`, its first configured shard, or
    /// `default_user` (POSTGRES_USER) where that names none.
    fn with_login_of(mut self, first: Option<&ShardConfig>, default_user: &str) -> MemberAccess {
        let parsed = first
            .and_then(|shard| crate::pgtls::split(&shard.url).ok())
            .and_then(|(url, _)| url.parse::<tokio_postgres::Config>().ok());
        let user = parsed
            .as_ref()
            .and_then(|c| c.get_user())
            .map(str::to_string);
        if self.password.is_none() {
            self.password = parsed
                .as_ref()
                .and_then(|c| c.get_password())
                .and_then(|p| String::from_utf8(p.to_vec()).ok());
        }
        let default_user = default_user.trim();
        self.user = user.or_else(|| (!default_user.is_empty()).then(|| default_user.to_string()));
        self
    }

    /// The shard `name` at `url` (as stored in the ring record: no user, no password), with
    /// this worker's own user, password and TLS defaults filled in where the URL names none.
    /// (`worker shards add` uses it with the URL an operator gave: a user named there is
    /// kept for that command's own connection.)
    pub fn shard(&self, name: &str, url: &str) -> Result<ShardConfig, String> {
        let mut shard = ShardConfig {
            name: name.to_string(),
            url: url.to_string(),
        };
        let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if let Some(user) = &self.user {
            fill_user(&mut shard, user, is_url);
        }
        match &self.password {
            Some(password) if is_url => fill_password(&mut shard, password),
            // The key=value form (a ring seeded from POSTGRES_IPS), which never holds one here.
            Some(password) => {
                shard.url = format!("{url} password={}", quote_conninfo(password));
            }
            None => {}
        }
        if !self.tls.is_empty() {
            let defaults: Vec<(&str, &str)> =
                self.tls.iter().map(|(k, v)| (*k, v.as_str())).collect();
            shard.url = crate::pgtls::with_defaults(&shard.url, &defaults)
                .map_err(|problem| format!("shard {name} with POSTGRES_SSL*: {problem}"))?;
        }
        crate::pgtls::split(&shard.url).map_err(|problem| format!("shard {name}: {problem}"))?;
        Ok(shard)
    }
}

/// `url` without user or password (the userinfo of a `postgres://` URL, `user` and `password`
/// parameters of either form): what the ring record stores. Every worker logs in to a member
/// with its own login ([`MemberAccess::shard`]), whoever wrote the record.
pub fn without_login(url: &str) -> String {
    let trimmed = without_password(url);
    if let Some((scheme, rest)) = trimmed.split_once("://") {
        let (authority_end, _) = rest
            .char_indices()
            .find(|(_, c)| matches!(c, '/' | '?'))
            .unwrap_or((rest.len(), ' '));
        let (authority, tail) = rest.split_at(authority_end);
        let host = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|p| !p.to_ascii_lowercase().starts_with("user="))
                    .collect();
                if kept.is_empty() {
                    path.to_string()
                } else {
                    format!("{path}?{}", kept.join("&"))
                }
            }
            None => tail.to_string(),
        };
        return format!("{scheme}://{host}{tail}");
    }
    // key=value form (the password is gone already): drop the user pair.
    let mut out = Vec::new();
    let mut words = trimmed.split(' ').peekable();
    while let Some(word) = words.next() {
        if word.to_ascii_lowercase().starts_with("user=") {
            if word.starts_with("user='") && !(word.len() > 6 && word.ends_with('\'')) {
                for next in words.by_ref() {
                    if next.ends_with('\'') {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(word);
    }
    out.join(" ")
}

/// `url` without any password (in the userinfo of a `postgres://` URL, or as a `password`
/// parameter of either form): what may be shown to an operator.
pub fn without_password(url: &str) -> String {
    let trimmed = url.trim();
    if let Some((scheme, rest)) = trimmed.split_once("://") {
        let (authority_end, _) = rest
            .char_indices()
            .find(|(_, c)| matches!(c, '/' | '?'))
            .unwrap_or((rest.len(), ' '));
        let (authority, tail) = rest.split_at(authority_end);
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                format!("{user}@{host}")
            }
            None => authority.to_string(),
        };
        let tail = match tail.split_once('?') {
            Some((path, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|p| !p.to_ascii_lowercase().starts_with("password="))
                    .collect();
                if kept.is_empty() {
                    path.to_string()
                } else {
                    format!("{path}?{}", kept.join("&"))
                }
            }
            None => tail.to_string(),
        };
        return format!("{scheme}://{authority}{tail}");
    }
    // key=value form: drop the password pair (a quoted value may hold spaces).
    let mut out = Vec::new();
    let mut words = trimmed.split(' ').peekable();
    while let Some(word) = words.next() {
        if word.to_ascii_lowercase().starts_with("password=") {
            if word.starts_with("password='") && !(word.len() > 10 && word.ends_with('\'')) {
                for next in words.by_ref() {
                    if next.ends_with('\'') {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(word);
    }
    out.join(" ")
}

/// Hand-written so that secrets never reach a log line or a panic message. The destructuring
/// lists every field, so a new one cannot be added without deciding how it is shown.
impl std::fmt::Debug for RawConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let RawConfig {
            nats_url,
            nats_security,
            postgres_shards,
            postgres_ips,
            postgres_port,
            postgres_user,
            postgres_password,
            postgres_password_file,
            postgres_db,
            postgres_sslmode,
            postgres_sslrootcert,
            postgres_sslcert,
            postgres_sslkey,
            nats_logs_topic,
            nats_query_topic,
            nats_response_topic,
            nats_stats_topic,
            nats_delete_topic,
            retention_max_age,
            retention_interval,
            nats_queue_group,
            nats_events_prefix,
            nats_dead_letter_topic,
            nats_reply_prefixes,
            intake,
            nats_stream,
            nats_consumer,
            js_ack_wait_ms,
            js_max_deliver,
            js_max_ack_pending,
            js_max_bytes,
            js_max_msgs,
            js_duplicate_window_ms,
            js_ordered,
            js_lease_ms,
            metrics_addr,
            log_format,
            ring_vnodes,
            max_log_bytes,
            max_key_bytes,
            max_batch_entries,
            batch_max_rows,
            batch_linger_ms,
            pool_size,
            max_concurrent_queries,
            shard_timeout_ms,
            shutdown_timeout_ms,
            query_timeout_ms,
            max_pending_queries,
            max_query_bytes,
            move_rate,
            move_grace_ms,
        } = self;
        f.debug_struct("RawConfig")
            .field("nats_url", &redact(nats_url))
            .field("nats_security", nats_security)
            .field("postgres_shards", &postgres_shards.as_deref().map(redact))
            .field("postgres_ips", &postgres_ips.as_deref().map(redact))
            .field("postgres_port", postgres_port)
            .field("postgres_user", postgres_user)
            .field(
                "postgres_password",
                &if postgres_password.is_empty() {
                    ""
                } else {
                    MASK
                },
            )
            // A path, not the secret itself.
            .field("postgres_password_file", postgres_password_file)
            .field("postgres_db", postgres_db)
            // Paths and a mode: no secret.
            .field("postgres_sslmode", postgres_sslmode)
            .field("postgres_sslrootcert", postgres_sslrootcert)
            .field("postgres_sslcert", postgres_sslcert)
            .field("postgres_sslkey", postgres_sslkey)
            .field("nats_logs_topic", nats_logs_topic)
            .field("nats_query_topic", nats_query_topic)
            .field("nats_response_topic", nats_response_topic)
            .field("nats_stats_topic", nats_stats_topic)
            .field("nats_delete_topic", nats_delete_topic)
            .field("retention_max_age", retention_max_age)
            .field("retention_interval", retention_interval)
            .field("nats_queue_group", nats_queue_group)
            .field("nats_events_prefix", nats_events_prefix)
            .field("nats_dead_letter_topic", nats_dead_letter_topic)
            .field("nats_reply_prefixes", nats_reply_prefixes)
            .field("intake", intake)
            .field("nats_stream", nats_stream)
            .field("nats_consumer", nats_consumer)
            .field("js_ack_wait_ms", js_ack_wait_ms)
            .field("js_max_deliver", js_max_deliver)
            .field("js_max_ack_pending", js_max_ack_pending)
            .field("js_max_bytes", js_max_bytes)
            .field("js_max_msgs", js_max_msgs)
            .field("js_duplicate_window_ms", js_duplicate_window_ms)
            .field("js_ordered", js_ordered)
            .field("js_lease_ms", js_lease_ms)
            .field("metrics_addr", metrics_addr)
            .field("log_format", log_format)
            .field("ring_vnodes", ring_vnodes)
            .field("max_log_bytes", max_log_bytes)
            .field("max_key_bytes", max_key_bytes)
            .field("max_batch_entries", max_batch_entries)
            .field("batch_max_rows", batch_max_rows)
            .field("batch_linger_ms", batch_linger_ms)
            .field("pool_size", pool_size)
            .field("max_concurrent_queries", max_concurrent_queries)
            .field("shard_timeout_ms", shard_timeout_ms)
            .field("shutdown_timeout_ms", shutdown_timeout_ms)
            .field("query_timeout_ms", query_timeout_ms)
            .field("max_pending_queries", max_pending_queries)
            .field("max_query_bytes", max_query_bytes)
            .field("move_rate", move_rate)
            .field("move_grace_ms", move_grace_ms)
            .finish()
    }
}

/// Hand-written for the same reason as [`RawConfig`]'s.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Config {
            intake,
            nats_url,
            nats,
            shards,
            logs_subject,
            query_subject,
            response_subject,
            stats_subject,
            delete_subject,
            retention,
            queue_group,
            events_prefix,
            dead_letter_subject,
            replies,
            metrics_addr,
            json_logs,
            ring_vnodes,
            limits,
            max_batch_entries,
            batch_max_rows,
            batch_linger,
            pool_size,
            max_concurrent_queries,
            shard_timeout,
            shutdown_timeout,
            query_timeout,
            max_pending_queries,
            max_query_bytes,
            moves,
            member_access,
        } = self;
        f.debug_struct("Config")
            .field("intake", intake)
            .field("nats_url", &redact(nats_url))
            .field("nats", nats)
            .field("shards", shards)
            .field("logs_subject", logs_subject)
            .field("query_subject", query_subject)
            .field("response_subject", response_subject)
            .field("stats_subject", stats_subject)
            .field("delete_subject", delete_subject)
            .field("retention", retention)
            .field("queue_group", queue_group)
            .field("events_prefix", events_prefix)
            .field("dead_letter_subject", dead_letter_subject)
            .field("replies", replies)
            .field("metrics_addr", metrics_addr)
            .field("json_logs", json_logs)
            .field("ring_vnodes", ring_vnodes)
            .field("limits", limits)
            .field("max_batch_entries", max_batch_entries)
            .field("batch_max_rows", batch_max_rows)
            .field("batch_linger", batch_linger)
            .field("pool_size", pool_size)
            .field("max_concurrent_queries", max_concurrent_queries)
            .field("shard_timeout", shard_timeout)
            .field("shutdown_timeout", shutdown_timeout)
            .field("query_timeout", query_timeout)
            .field("max_pending_queries", max_pending_queries)
            .field("max_query_bytes", max_query_bytes)
            .field("moves", moves)
            .field("member_access", member_access)
            .finish()
    }
}

impl RawConfig {
    /// Validate every setting; the first problem found is returned, naming its variable.
    /// NATS_REPLY_PREFIXES, refusing the worker's own inbox prefix (`own`).
    fn replies(&self, own: &str) -> Result<ReplyPolicy, ConfigError> {
        ReplyPolicy::new(&self.nats_reply_prefixes, own)
            .map_err(|problem| bad("NATS_REPLY_PREFIXES", problem))
    }

    pub fn validate(&self) -> Result<Config, ConfigError> {
        // Read once (the password may come from a file): for POSTGRES_SHARDS now, and for ring
        // members learnt from NATS later.
        let member_access = MemberAccess {
            user: None,
            password: self.password()?,
            tls: self.tls_defaults()?,
        };
        let shards = self.shards(&member_access)?;
        let member_access = member_access.with_login_of(shards.first(), &self.postgres_user);
        let nats_url = non_empty("NATS_URL", &self.nats_url)?;
        let nats = self
            .nats_security
            .resolve(&nats_url)
            .map_err(|e| bad(e.var, e.problem))?;
        Ok(Config {
            intake: self.intake()?,
            replies: self.replies(&nats.inbox_prefix)?,
            nats,
            nats_url,
            shards,
            logs_subject: subject("NATS_LOGS_TOPIC", &self.nats_logs_topic)?,
            query_subject: subject("NATS_QUERY_TOPIC", &self.nats_query_topic)?,
            response_subject: subject("NATS_RESPONSE_TOPIC", &self.nats_response_topic)?,
            stats_subject: subject("NATS_STATS_TOPIC", &self.nats_stats_topic)?,
            delete_subject: subject("NATS_DELETE_TOPIC", &self.nats_delete_topic)?,
            retention: self.retention()?,
            queue_group: subject("NATS_QUEUE_GROUP", &self.nats_queue_group)?,
            events_prefix: subject("NATS_EVENTS_PREFIX", &self.nats_events_prefix)?,
            dead_letter_subject: subject("NATS_DEAD_LETTER_TOPIC", &self.nats_dead_letter_topic)?,
            metrics_addr: metrics_addr(&self.metrics_addr)?,
            json_logs: match self.log_format.trim() {
                "text" => false,
                "json" => true,
                other => return Err(bad("LOG_FORMAT", format!("{other:?} is not text or json"))),
            },
            ring_vnodes: number("RING_VNODES", &self.ring_vnodes, 1, 100_000)?,
            limits: Limits {
                max_log_bytes: number("MAX_LOG_BYTES", &self.max_log_bytes, 1, 64 << 20)?,
                max_key_bytes: number("MAX_KEY_BYTES", &self.max_key_bytes, 1, 1 << 20)?,
            },
            max_batch_entries: number("MAX_BATCH_ENTRIES", &self.max_batch_entries, 1, 100_000)?,
            batch_max_rows: number("BATCH_MAX_ROWS", &self.batch_max_rows, 1, 100_000)?,
            batch_linger: Duration::from_millis(number(
                "BATCH_LINGER_MS",
                &self.batch_linger_ms,
                0,
                10_000,
            )?),
            pool_size: number("POOL_SIZE", &self.pool_size, 1, 1_000)?,
            max_concurrent_queries: number(
                "MAX_CONCURRENT_QUERIES",
                &self.max_concurrent_queries,
                1,
                100_000,
            )?,
            shard_timeout: Duration::from_millis(number(
                "SHARD_TIMEOUT_MS",
                &self.shard_timeout_ms,
                1,
                3_600_000,
            )?),
            shutdown_timeout: Duration::from_millis(number(
                "SHUTDOWN_TIMEOUT_MS",
                &self.shutdown_timeout_ms,
                1,
                3_600_000,
            )?),
            query_timeout: Duration::from_millis(number(
                "QUERY_TIMEOUT_MS",
                &self.query_timeout_ms,
                1,
                3_600_000,
            )?),
            max_pending_queries: number(
                "MAX_PENDING_QUERIES",
                &self.max_pending_queries,
                1,
                1_000_000,
            )?,
            max_query_bytes: number("MAX_QUERY_BYTES", &self.max_query_bytes, 1, usize::MAX)?,
            moves: Moves {
                rate: number("MOVE_RATE", &self.move_rate, 1, 1_000_000)?,
                grace: Duration::from_millis(number(
                    "MOVE_GRACE_MS",
                    &self.move_grace_ms,
                    0,
                    86_400_000,
                )?),
            },
            member_access,
        })
    }

    fn retention(&self) -> Result<Option<Retention>, ConfigError> {
        let max_age = match self.retention_max_age.trim() {
            "" | "off" => return Ok(None),
            text => duration("RETENTION_MAX_AGE", text, Duration::from_secs(1))?,
        };
        let interval = duration(
            "RETENTION_INTERVAL",
            self.retention_interval.trim(),
            Duration::from_millis(10),
        )?;
        Ok(Some(Retention { max_age, interval }))
    }

    fn intake(&self) -> Result<Intake, ConfigError> {
        match self.intake.trim() {
            "core" => Ok(Intake::Core),
            "jetstream" => Ok(Intake::JetStream(JetStreamConfig {
                stream: name_token("NATS_STREAM", &self.nats_stream)?,
                consumer: name_token("NATS_CONSUMER", &self.nats_consumer)?,
                ack_wait: Duration::from_millis(number(
                    "JS_ACK_WAIT_MS",
                    &self.js_ack_wait_ms,
                    100,
                    3_600_000,
                )?),
                max_deliver: number("JS_MAX_DELIVER", &self.js_max_deliver, 1, 1_000_000)?,
                max_ack_pending: number(
                    "JS_MAX_ACK_PENDING",
                    &self.js_max_ack_pending,
                    1,
                    10_000_000,
                )?,
                max_bytes: stream_limit("JS_MAX_BYTES", &self.js_max_bytes)?,
                max_messages: stream_limit("JS_MAX_MSGS", &self.js_max_msgs)?,
                duplicate_window: Duration::from_millis(number(
                    "JS_DUPLICATE_WINDOW_MS",
                    &self.js_duplicate_window_ms,
                    100,
                    86_400_000,
                )?),
                ordered: boolean("JS_ORDERED", &self.js_ordered)?,
                lease: Duration::from_millis(number(
                    "JS_LEASE_MS",
                    &self.js_lease_ms,
                    300,
                    600_000,
                )?),
            })),
            other => Err(bad("INTAKE", format!("{other:?} is not jetstream or core"))),
        }
    }

    fn shards(&self, access: &MemberAccess) -> Result<Vec<ShardConfig>, ConfigError> {
        let password = &access.password;
        let shards =
            match (&self.postgres_shards, &self.postgres_ips) {
                (Some(spec), _) if !spec.trim().is_empty() => {
                    let mut shards = parse_shards(spec)?;
                    if let Some(password) = &password {
                        for shard in &mut shards {
                            fill_password(shard, password);
                        }
                    }
                    shards
                }
                (_, Some(ips)) if !ips.trim().is_empty() => {
                    self.shards_from_ips(ips, password.as_deref())?
                }
                _ => return Err(bad(
                    "POSTGRES_SHARDS",
                    "not set (set POSTGRES_SHARDS=name=postgres://…,… or POSTGRES_IPS=host1,host2)",
                )),
            };
        with_tls_defaults(shards, &access.tls)
    }

    /// The POSTGRES_SSL* settings given, as (connection parameter, value).
    fn tls_defaults(&self) -> Result<Vec<(&'static str, String)>, ConfigError> {
        let mut defaults: Vec<(&'static str, String)> = Vec::new();
        for (var, param, value) in [
            ("POSTGRES_SSLMODE", "sslmode", &self.postgres_sslmode),
            (
                "POSTGRES_SSLROOTCERT",
                "sslrootcert",
                &self.postgres_sslrootcert,
            ),
            ("POSTGRES_SSLCERT", "sslcert", &self.postgres_sslcert),
            ("POSTGRES_SSLKEY", "sslkey", &self.postgres_sslkey),
        ] {
            match value.as_deref().map(str::trim) {
                None | Some("") => {}
                Some(value) => {
                    if param == "sslmode" {
                        crate::pgtls::SslMode::parse(value).map_err(|e| bad(var, e))?;
                    }
                    defaults.push((param, value.to_string()));
                }
            }
        }
        Ok(defaults)
    }

    /// POSTGRES_PASSWORD, or the content of POSTGRES_PASSWORD_FILE (read here, once; one
    /// trailing newline dropped). Errors name the file, never show its content.
    fn password(&self) -> Result<Option<String>, ConfigError> {
        const VAR: &str = "POSTGRES_PASSWORD_FILE";
        let path = match self.postgres_password_file.as_deref().map(str::trim) {
            None | Some("") => {
                return Ok(
                    (!self.postgres_password.is_empty()).then(|| self.postgres_password.clone())
                )
            }
            Some(path) => path,
        };
        if !self.postgres_password.is_empty() {
            return Err(bad(
                VAR,
                "POSTGRES_PASSWORD is set too; set only one of them",
            ));
        }
        let content =
            std::fs::read(path).map_err(|e| bad(VAR, format!("cannot read {path:?}: {e}")))?;
        let content = String::from_utf8(content)
            .map_err(|_| bad(VAR, format!("{path:?} is not UTF-8 text")))?;
        let password = content
            .strip_suffix('\n')
            .map(|p| p.strip_suffix('\r').unwrap_or(p))
            .unwrap_or(&content);
        if password.is_empty() {
            return Err(bad(VAR, format!("{path:?} is empty")));
        }
        if password.contains(['\n', '\r', '\0']) {
            return Err(bad(
                VAR,
                format!("{path:?} holds more than one line (or a NUL); a password is one line"),
            ));
        }
        Ok(Some(password.to_string()))
    }

    fn shards_from_ips(
        &self,
        ips: &str,
        password: Option<&str>,
    ) -> Result<Vec<ShardConfig>, ConfigError> {
        let port: u16 = number("POSTGRES_PORT", &self.postgres_port, 1, 65_535)?;
        non_empty("POSTGRES_USER", &self.postgres_user)?;
        non_empty("POSTGRES_DB", &self.postgres_db)?;
        let mut shards = Vec::new();
        for (host, shown) in split_list(ips) {
            if host.is_empty() || host.contains(|c: char| "/@='\\".contains(c) || c.is_whitespace())
            {
                return Err(bad(
                    "POSTGRES_IPS",
                    format!(
                        "{shown:?} is not a host name or IP (credentials go in \
                         POSTGRES_USER/POSTGRES_PASSWORD)"
                    ),
                ));
            }
            // key=value form: no URL-escaping of the password needed.
            let mut url = format!(
                "host={host} port={port} user={} dbname={}",
                quote_conninfo(&self.postgres_user),
                quote_conninfo(&self.postgres_db)
            );
            if let Some(password) = password {
                url.push_str(&format!(" password={}", quote_conninfo(password)));
            }
            shards.push(ShardConfig {
                name: host.to_string(),
                url,
            });
        }
        check_unique("POSTGRES_IPS", &shards)?;
        Ok(shards)
    }
}

/// Parse `name=postgres://…,name2=postgresql://…`. Only URLs are taken (the key=value form is
/// built internally from POSTGRES_IPS): a key=value string or two URLs in one entry, which
/// is what a space instead of a comma produces, would otherwise be read as one shard. URLs may
/// not contain commas or whitespace (percent-encode them). Errors show the entry redacted.
pub fn parse_shards(spec: &str) -> Result<Vec<ShardConfig>, ConfigError> {
    const VAR: &str = "POSTGRES_SHARDS";
    let mut shards = Vec::new();
    for (part, entry) in split_list(spec) {
        if part.is_empty() {
            continue;
        }
        if part.contains(char::is_whitespace) {
            return Err(bad(
                VAR,
                format!("entry {entry:?} contains whitespace (separate shards with commas)"),
            ));
        }
        let Some((name, url)) = part.split_once('=') else {
            return Err(bad(
                VAR,
                format!("entry {entry:?} is not name=postgres://…"),
            ));
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(
                VAR,
                format!(
                    "entry {entry:?} does not start with a shard name (name=postgres://…, \
                     names are [A-Za-z0-9._-])"
                ),
            ));
        }
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err(bad(
                VAR,
                format!("shard {name}: {entry:?} is not a postgres:// or postgresql:// URL"),
            ));
        }
        if url.matches("://").count() > 1 {
            return Err(bad(
                VAR,
                format!(
                    "shard {name}: entry {entry:?} holds more than one URL (separate shards \
                     with commas)"
                ),
            ));
        }
        // libpq's TLS parameters are handled by the worker (crate::pgtls), not tokio-postgres.
        let url_for_driver = match crate::pgtls::split(url) {
            Ok((rest, _)) => rest,
            Err(problem) => return Err(bad(VAR, format!("shard {name}: {entry:?}: {problem}"))),
        };
        if let Err(e) = url_for_driver.parse::<tokio_postgres::Config>() {
            // Its Display is only the kind; the cause names the option (never its value).
            let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
            return Err(bad(
                VAR,
                format!("shard {name}: {entry:?} is not a PostgreSQL URL ({e}{cause})"),
            ));
        }
        shards.push(ShardConfig {
            name: name.to_string(),
            url: url.to_string(),
        });
    }
    if shards.is_empty() {
        return Err(bad(VAR, "no shard given"));
    }
    check_unique(VAR, &shards)?;
    Ok(shards)
}

/// Give a shard URL without a password of its own the configured one, as a `password` query
/// parameter (tokio-postgres reads it there; redaction hides it like one in the user info).
/// POSTGRES_SSLMODE, POSTGRES_SSLROOTCERT, POSTGRES_SSLCERT and POSTGRES_SSLKEY (`defaults`)
/// fill each shard's connection string where it names no such parameter itself; the result must
/// make sense (a verify-* mode with a CA, a certificate with its key).
fn with_tls_defaults(
    mut shards: Vec<ShardConfig>,
    defaults: &[(&'static str, String)],
) -> Result<Vec<ShardConfig>, ConfigError> {
    if defaults.is_empty() {
        return Ok(shards);
    }
    let defaults: Vec<(&str, &str)> = defaults.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for shard in &mut shards {
        let name = &shard.name;
        shard.url = crate::pgtls::with_defaults(&shard.url, &defaults)
            .and_then(|url| crate::pgtls::split(&url).map(|_| url))
            .map_err(|problem| {
                bad(
                    "POSTGRES_SSLMODE",
                    format!("shard {name} with POSTGRES_SSL*: {problem}"),
                )
            })?;
    }
    Ok(shards)
}

/// Give a connection string naming no user `user`: in a URL's userinfo, or as a `user` pair.
fn fill_user(shard: &mut ShardConfig, user: &str, is_url: bool) {
    let has_user = crate::pgtls::split(&shard.url)
        .ok()
        .and_then(|(url, _)| url.parse::<tokio_postgres::Config>().ok())
        .is_some_and(|config| config.get_user().is_some());
    if has_user {
        return;
    }
    if !is_url {
        shard.url = format!("{} user={}", shard.url, quote_conninfo(user));
        return;
    }
    if let Some((scheme, rest)) = shard.url.split_once("://") {
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        // A userinfo without a user (`:pw@host`, `@host`) gets the user in front; none, a new one.
        let at = if authority.contains('@') { "" } else { "@" };
        shard.url = format!(
            "{scheme}://{}{at}{rest}",
            crate::pgtls::percent_encode(user)
        );
    }
}

fn fill_password(shard: &mut ShardConfig, password: &str) {
    let has_password = crate::pgtls::split(&shard.url)
        .ok()
        .and_then(|(url, _)| url.parse::<tokio_postgres::Config>().ok())
        .is_some_and(|config| config.get_password().is_some());
    if !has_password {
        let separator = if shard.url.contains('?') { '&' } else { '?' };
        shard.url = format!(
            "{}{separator}password={}",
            shard.url,
            crate::pgtls::percent_encode(password)
        );
    }
}

fn check_unique(var: &'static str, shards: &[ShardConfig]) -> Result<(), ConfigError> {
    for (i, shard) in shards.iter().enumerate() {
        if shards[..i].iter().any(|s| s.name == shard.name) {
            return Err(bad(
                var,
                format!("shard name {:?} appears twice", shard.name),
            ));
        }
    }
    Ok(())
}

/// `host:port`, or `:port` for every interface (the Go service's form).
fn metrics_addr(value: &str) -> Result<SocketAddr, ConfigError> {
    let trimmed = value.trim();
    let full = match trimmed.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => trimmed.to_string(),
    };
    full.parse().map_err(|e| {
        bad(
            "METRICS_ADDR",
            format!("{value:?} is not host:port or :port ({e})"),
        )
    })
}

use crate::store::tls::quote_conninfo;

fn non_empty(var: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(bad(var, "must not be empty"));
    }
    Ok(value.to_string())
}

/// NATS subject tokens: no whitespace, no empty tokens. Wildcards are refused because a worker
/// publishing to a wildcard subject is always a mistake.
/// A stream limit: -1 (unlimited) or a positive count (0 would refuse every publish).
fn stream_limit(var: &'static str, value: &str) -> Result<i64, ConfigError> {
    let limit = number(var, value, -1, i64::MAX)?;
    if limit == 0 {
        return Err(bad(var, "0 would refuse every publish; -1 is unlimited"));
    }
    Ok(limit)
}

fn subject(var: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = non_empty(var, value)?;
    if value.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        || value.split('.').any(str::is_empty)
    {
        return Err(bad(var, format!("{value:?} is not a valid NATS subject")));
    }
    Ok(value)
}

/// Stream and consumer names: one NATS token, no dots, spaces or wildcards.
fn name_token(var: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = non_empty(var, value)?;
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(bad(var, format!("{value:?} may only hold [A-Za-z0-9_-]")));
    }
    Ok(value)
}

/// `true` or `false` (also `1`/`0`, `yes`/`no`, any case).
fn boolean(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(bad(var, format!("{value:?} is not true or false"))),
    }
}

/// A duration as humantime writes it (`30d`, `12h 30m`, `500ms`), at least `min`.
fn duration(var: &'static str, value: &str, min: Duration) -> Result<Duration, ConfigError> {
    let parsed = humantime::parse_duration(value).map_err(|e| {
        bad(
            var,
            format!("{value:?} is not a duration like 30d, 12h or 90s ({e})"),
        )
    })?;
    if parsed < min {
        return Err(bad(
            var,
            format!(
                "{value:?} is shorter than {}",
                humantime::format_duration(min)
            ),
        ));
    }
    Ok(parsed)
}

fn number<T>(var: &'static str, value: &str, min: T, max: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let parsed: T = value
        .trim()
        .parse()
        .map_err(|_| bad(var, format!("{value:?} is not a number")))?;
    if parsed < min || parsed > max {
        return Err(bad(var, format!("{parsed} is outside {min}..={max}")));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use logstore_protocol::nats::Login;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        raw: RawConfig,
    }

    /// Ring members are stored in NATS without any password, in both connection-string forms.
    #[test]
    fn without_password_keeps_everything_but_the_password() {
        for (given, kept) in [
            ("postgres://u:s3cret@h:5432/db", "postgres://u@h:5432/db"),
            (
                "postgres://u@h/db?password=s3cret&sslmode=require",
                "postgres://u@h/db?sslmode=require",
            ),
            ("postgresql://h/db?password=s3cret", "postgresql://h/db"),
            ("postgres://h/db", "postgres://h/db"),
            (
                "host=h port=5432 user=u password=s3cret dbname=db",
                "host=h port=5432 user=u dbname=db",
            ),
            ("host=h password='s3 cr et' dbname=db", "host=h dbname=db"),
        ] {
            let stripped = without_password(given);
            assert_eq!(stripped, kept, "{given}");
            assert!(!stripped.contains("s3"), "{stripped}");
        }
    }

    /// A member learnt from the ring record gets this worker's password and TLS defaults.
    #[test]
    fn members_get_this_workers_password_and_tls_defaults() {
        let access = MemberAccess {
            user: None,
            password: Some("pw".into()),
            tls: vec![("sslmode", "require".to_string())],
        };
        let shard = access.shard("pg3", "postgres://u@h3/db").unwrap();
        assert_eq!(shard.name, "pg3");
        assert!(shard.url.contains("password=pw"), "{}", shard.url);
        assert!(shard.url.contains("sslmode=require"), "{}", shard.url);
        let own = access
            .shard("pg4", "postgres://u:mine@h4/db?sslmode=disable")
            .unwrap();
        assert!(!own.url.contains("password=pw"), "{}", own.url);
        assert!(
            own.url.contains("sslmode=disable") && !own.url.contains("require"),
            "{}",
            own.url
        );
        assert!(!format!("{access:?}").contains("pw"));
        let ips = access
            .shard("h5", "host=h5 port=5432 user=u dbname=db")
            .unwrap();
        assert!(ips.url.contains(" password='pw'"), "{}", ips.url);
    }

    /// The ring record stores neither user nor password (issue 19): every worker logs in to a
    /// member as itself.
    #[test]
    fn without_login_keeps_neither_user_nor_password() {
        for (given, kept) in [
            (
                "postgres://postgres:s3cret@h:5432/db",
                "postgres://h:5432/db",
            ),
            ("postgres://postgres@h/db", "postgres://h/db"),
            (
                "postgres://h/db?user=postgres&password=s3cret&sslmode=require",
                "postgres://h/db?sslmode=require",
            ),
            ("postgresql://h/db?user=postgres", "postgresql://h/db"),
            ("postgres://h/db", "postgres://h/db"),
            (
                "host=h port=5432 user=postgres password=s3cret dbname=db",
                "host=h port=5432 dbname=db",
            ),
            ("host=h user='post gres' dbname=db", "host=h dbname=db"),
        ] {
            let stripped = without_login(given);
            assert_eq!(stripped, kept, "{given}");
            assert!(
                !stripped.contains("s3") && !stripped.contains('@') && !stripped.contains("user"),
                "{stripped}"
            );
        }
    }

    /// A member learnt from the ring record is reached with this worker's own login: the
    /// user (and password) of its own first shard, whatever user the record once named.
    #[test]
    fn members_get_this_workers_own_login() {
        let c = raw(&[
            "--postgres-shards",
            "a=postgres://logstore_worker:pw@h1:5432/db,b=postgres://logstore_worker@h2/db",
        ])
        .validate()
        .unwrap();
        let access = &c.member_access;
        let member = access
            .shard("pg3", &without_login("postgres://postgres@h3:5432/db"))
            .unwrap();
        let parsed: tokio_postgres::Config =
            crate::pgtls::split(&member.url).unwrap().0.parse().unwrap();
        assert_eq!(parsed.get_user(), Some("logstore_worker"), "{}", member.url);
        assert_eq!(parsed.get_password(), Some(&b"pw"[..]));
        assert!(!format!("{access:?}").contains("pw"));
        // The URL an operator gives `worker shards add` keeps its own user for that command.
        let given = access.shard("pg3", "postgres://postgres@h3/db").unwrap();
        let parsed: tokio_postgres::Config =
            crate::pgtls::split(&given.url).unwrap().0.parse().unwrap();
        assert_eq!(parsed.get_user(), Some("postgres"));
        // POSTGRES_IPS: POSTGRES_USER, in the key=value form too.
        let c = raw(&["--postgres-ips", "h1", "--postgres-user", "w'x"])
            .validate()
            .unwrap();
        let member = c
            .member_access
            .shard(
                "h2",
                &without_login("host=h2 port=5432 user=postgres dbname=d"),
            )
            .unwrap();
        let parsed: tokio_postgres::Config = member.url.parse().unwrap();
        assert_eq!(parsed.get_user(), Some("w'x"), "{}", member.url);
    }

    fn raw(args: &[&str]) -> RawConfig {
        Cli::parse_from(std::iter::once("worker").chain(args.iter().copied())).raw
    }

    #[test]
    fn shards_from_url_list() {
        let c = raw(&[
            "--postgres-shards",
            "a=postgres://u:p@h1:5432/db, b=postgres://h2/db",
        ])
        .validate()
        .unwrap();
        assert_eq!(c.shards.len(), 2);
        assert_eq!(c.shards[1].name, "b");
        assert_eq!(c.shards[1].url, "postgres://h2/db");
    }

    #[test]
    fn shards_from_the_originals_ips() {
        let c = raw(&[
            "--postgres-ips",
            "10.0.0.1,db2",
            "--postgres-password",
            "s'x",
        ])
        .validate()
        .unwrap();
        assert_eq!(c.shards[0].name, "10.0.0.1");
        assert_eq!(
            c.shards[1].url,
            "host=db2 port=5432 user='postgres' dbname='postgres' password='s\\'x'"
        );
        assert!(c.shards[1].url.parse::<tokio_postgres::Config>().is_ok());
    }

    #[test]
    fn every_error_names_its_variable() {
        let cases: [(&[&str], &str); 14] = [
            (&["--postgres-ips", "h", "--intake", "kafka"], "INTAKE"),
            (
                &["--postgres-ips", "h", "--js-ordered", "maybe"],
                "JS_ORDERED",
            ),
            (
                &["--postgres-ips", "h", "--js-lease-ms", "10"],
                "JS_LEASE_MS",
            ),
            (
                &["--postgres-ips", "h", "--nats-stream", "a.b"],
                "NATS_STREAM",
            ),
            (&[], "POSTGRES_SHARDS"),
            (&["--postgres-shards", "nourl"], "POSTGRES_SHARDS"),
            (
                &["--postgres-shards", "a=x://?,a=postgres://h/d"],
                "POSTGRES_SHARDS",
            ),
            (
                &["--postgres-ips", "h", "--postgres-port", "99999"],
                "POSTGRES_PORT",
            ),
            (
                &["--postgres-ips", "h", "--metrics-addr", "nope"],
                "METRICS_ADDR",
            ),
            (
                &["--postgres-ips", "h", "--log-format", "xml"],
                "LOG_FORMAT",
            ),
            (
                &["--postgres-ips", "h", "--nats-logs-topic", "a..b"],
                "NATS_LOGS_TOPIC",
            ),
            (
                &["--postgres-shards", "a=postgres://h/db b=postgres://h/db"],
                "POSTGRES_SHARDS",
            ),
            (
                &["--postgres-ips", "h", "--metrics-addr", ":x"],
                "METRICS_ADDR",
            ),
            (
                &["--postgres-ips", "h", "--nats-url", "nats://"],
                "NATS_URL",
            ),
        ];
        for (args, var) in cases {
            let err = raw(args).validate().unwrap_err();
            assert_eq!(err.var, var, "{args:?}: {err}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    const MARKER: &str = "S3CRET-MARKER";

    /// The error for `args`: it names `var`, is one line, and never shows the marker.
    fn refused(args: &[&str], var: &str) -> String {
        let err = raw(args).validate().unwrap_err();
        let text = err.to_string();
        assert_eq!(err.var, var, "{args:?}: {text}");
        assert!(!text.contains('\n'), "{args:?}: {text}");
        assert!(!text.contains(MARKER), "{args:?} leaks: {text}");
        text
    }

    #[test]
    fn shard_list_entries_must_be_single_named_urls() {
        let m = MARKER;
        for (spec, says) in [
            // A space instead of a comma: once accepted as one shard.
            (
                format!("a=postgres://u:{m}@h/db b=postgres://u:{m}@h2/db"),
                "whitespace",
            ),
            (
                format!("a=postgres://u:{m}@h/db\tb=postgres://h2/db"),
                "whitespace",
            ),
            // Two URLs glued together.
            (
                format!("a=postgres://u:{m}@h/dbpostgres://u:{m}@h2/db"),
                "more than one URL",
            ),
            // A shard missing its name, with and without an `=` in the URL.
            (format!("postgres://u:{m}@h/db"), "not name=postgres"),
            (
                format!("postgres://u:{m}@h/db?sslmode=disable"),
                "does not start with a shard name",
            ),
            (
                format!("postgres://h/db?password={m}"),
                "does not start with a shard name",
            ),
            // The key=value form is not taken from POSTGRES_SHARDS.
            (format!("a=host=h password={m}"), "whitespace"),
            (
                format!("a=password={m}"),
                "not a postgres:// or postgresql:// URL",
            ),
            (
                format!("a=mysql://u:{m}@h/db"),
                "not a postgres:// or postgresql:// URL",
            ),
            // URLs tokio-postgres refuses.
            (
                format!("a=postgres://u:{m}@h:port/db"),
                "not a PostgreSQL URL",
            ),
            (
                format!("a=postgres://h/db?password={m}&no_such_option=1"),
                "not a PostgreSQL URL",
            ),
            (
                format!("a=postgres://u:{m}@h/db,a=postgres://u:{m}@h2/db"),
                "appears twice",
            ),
            // An unescaped comma cuts the password: the first half is then refused alone.
            (
                format!("a=postgres://u:{m},{m}@h/db"),
                "not a PostgreSQL URL",
            ),
        ] {
            let text = refused(&["--postgres-shards", &spec], "POSTGRES_SHARDS");
            assert!(text.contains(says), "{spec}: {text}");
        }
    }

    #[test]
    fn shard_errors_name_the_offending_entry_redacted() {
        let text = refused(
            &[
                "--postgres-shards",
                &format!("ok=postgres://h/db, b=postgres://u:{MARKER}@h2/db c=postgres://h3/db"),
            ],
            "POSTGRES_SHARDS",
        );
        assert!(
            text.contains(r#""b=postgres://u:***@h2/db c=postgres://h3/db""#),
            "{text}"
        );
    }

    #[test]
    fn postgres_ips_errors_hide_credentials() {
        for ips in [
            format!("u:{MARKER}@h"),
            format!("h password={MARKER}"),
            "a/b".to_string(),
        ] {
            refused(
                &["--postgres-ips", &ips, "--postgres-password", MARKER],
                "POSTGRES_IPS",
            );
        }
    }

    #[test]
    fn nats_url_errors_hide_credentials() {
        let m = MARKER;
        for url in [
            format!("nats://u:{m}@h:port"),
            format!("nats://u:{m}@h1 nats://u:{m}@h2"),
            format!("nats://a:{m}@h1,nats://b:{m}@h2"),
            format!("http://u:{m}@h"),
            format!("nats://{m}@h,,nats://h2"),
        ] {
            refused(&["--postgres-ips", "h", "--nats-url", &url], "NATS_URL");
        }
    }

    #[test]
    fn nats_credentials_leave_the_urls() {
        let c = raw(&[
            "--postgres-ips",
            "h",
            "--nats-url",
            &format!("nats://u:{MARKER}@h1:4222, nats://h2:4222"),
        ])
        .validate()
        .unwrap();
        assert_eq!(c.nats.servers, ["nats://h1:4222", "nats://h2:4222"]);
        assert_eq!(
            c.nats.login,
            Login::UserPassword {
                user: "u".into(),
                password: MARKER.into(),
                from: "NATS_URL".into(),
            }
        );
        let c = raw(&["--postgres-ips", "h"]).validate().unwrap();
        assert_eq!(c.nats.servers, ["nats://127.0.0.1:4222"]);
        assert_eq!(c.nats.login, Login::None);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let from_urls = raw(&[
            "--postgres-shards",
            &format!("a=postgres://u:{MARKER}@h/db,b=postgres://h2/db?password={MARKER}"),
            "--nats-url",
            &format!("nats://{MARKER}@h:4222"),
            "--postgres-password",
            MARKER,
        ]);
        let from_ips = raw(&["--postgres-ips", "h1,h2", "--postgres-password", MARKER]);
        for raw in [from_urls, from_ips] {
            let debug = format!("{raw:?} {:?}", raw.validate().unwrap());
            assert!(!debug.contains(MARKER), "{debug}");
            assert!(debug.contains("***"), "{debug}");
        }
    }

    #[test]
    fn nats_secret_files_are_read_once_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, format!("{MARKER}\n")).unwrap();
        let path = file.display().to_string();
        let raw = raw(&[
            "--postgres-ips",
            "h",
            "--nats-user",
            "worker",
            "--nats-password-file",
            &path,
        ]);
        let config = raw.validate().unwrap();
        assert_eq!(
            config.nats.login,
            Login::UserPassword {
                user: "worker".into(),
                password: MARKER.into(),
                from: format!("NATS_PASSWORD_FILE {path}"),
            }
        );
        let debug = format!("{raw:?} {config:?}");
        assert!(!debug.contains(MARKER), "{debug}");
        assert!(debug.contains(&path), "{debug}");
        // Two logins at once, or a file that is not there: one line naming the variable.
        let err = self::raw(&[
            "--postgres-ips",
            "h",
            "--nats-url",
            &format!("nats://u:{MARKER}@h"),
            "--nats-token-file",
            &path,
        ])
        .validate()
        .unwrap_err();
        assert_eq!(err.var, "NATS_TOKEN_FILE", "{err}");
        assert!(!err.to_string().contains(MARKER), "{err}");
        refused(
            &[
                "--postgres-ips",
                "h",
                "--nats-nkey-seed-file",
                "/nonexistent/seed",
            ],
            "NATS_NKEY_SEED_FILE",
        );
    }

    #[test]
    fn tls_parameters_are_accepted_and_checked() {
        let c = raw(&[
            "--postgres-shards",
            "a=postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem,\
             b=postgres://u@h2/db?sslmode=require&sslcert=/c.pem&sslkey=/k.pem",
        ])
        .validate()
        .unwrap();
        assert_eq!(c.shards.len(), 2);
        for (spec, says) in [
            (
                "a=postgres://u@h/db?sslmode=verify-full",
                "needs sslrootcert",
            ),
            ("a=postgres://u@h/db?sslmode=allow", "is not disable"),
            ("a=postgres://u@h/db?sslcert=/c.pem", "without sslkey"),
        ] {
            let text = refused(&["--postgres-shards", spec], "POSTGRES_SHARDS");
            assert!(text.contains(says) && text.contains("shard a"), "{text}");
        }
    }

    #[test]
    fn tls_settings_fill_every_shard_that_names_none() {
        let c = raw(&[
            "--postgres-shards",
            "a=postgres://u@h/db,b=postgres://u@h2/db?sslmode=disable",
            "--postgres-sslmode",
            "verify-full",
            "--postgres-sslrootcert",
            "/etc/ca.pem",
        ])
        .validate()
        .unwrap();
        let tls = |i: usize| crate::pgtls::split(&c.shards[i].url).unwrap().1;
        assert_eq!(tls(0).mode, crate::pgtls::SslMode::VerifyFull);
        assert_eq!(
            tls(0).root_cert.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(tls(1).mode, crate::pgtls::SslMode::Disable);
        let c = raw(&["--postgres-ips", "h", "--postgres-sslmode", "require"])
            .validate()
            .unwrap();
        let (rest, tls) = crate::pgtls::split(&c.shards[0].url).unwrap();
        assert_eq!(tls.mode, crate::pgtls::SslMode::Require);
        assert!(rest.parse::<tokio_postgres::Config>().is_ok(), "{rest}");
        refused(
            &["--postgres-ips", "h", "--postgres-sslmode", "allow"],
            "POSTGRES_SSLMODE",
        );
        let text = refused(
            &["--postgres-ips", "h", "--postgres-sslmode", "verify-ca"],
            "POSTGRES_SSLMODE",
        );
        assert!(text.contains("needs sslrootcert"), "{text}");
    }

    #[test]
    fn the_password_file_fills_every_url_without_a_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, format!("{MARKER} &x\n")).unwrap();
        let file = file.to_str().unwrap();
        let c = raw(&[
            "--postgres-shards",
            "a=postgres://u@h/db,b=postgres://u:own@h2/db?sslmode=disable",
            "--postgres-password-file",
            file,
        ])
        .validate()
        .unwrap();
        let a: tokio_postgres::Config = c.shards[0].url.parse().unwrap();
        assert_eq!(a.get_password(), Some(format!("{MARKER} &x").as_bytes()));
        assert!(c.shards[1].url.contains("u:own@"), "{:?}", c.shards[1]);
        assert!(!c.shards[1].url.contains(MARKER));
        let debug = format!("{c:?}");
        assert!(
            !debug.contains(MARKER) && !debug.contains("MARKER"),
            "{debug}"
        );
        // The original's form too.
        let c = raw(&["--postgres-ips", "h", "--postgres-password-file", file])
            .validate()
            .unwrap();
        let h: tokio_postgres::Config = c.shards[0].url.parse().unwrap();
        assert_eq!(h.get_password(), Some(format!("{MARKER} &x").as_bytes()));
        // Both, a missing file, an empty one: one line naming the variable, no content.
        let text = refused(
            &[
                "--postgres-ips",
                "h",
                "--postgres-password-file",
                file,
                "--postgres-password",
                "p",
            ],
            "POSTGRES_PASSWORD_FILE",
        );
        assert!(text.contains("only one"), "{text}");
        let text = refused(
            &[
                "--postgres-ips",
                "h",
                "--postgres-password-file",
                "/nonexistent/pw",
            ],
            "POSTGRES_PASSWORD_FILE",
        );
        assert!(text.contains("/nonexistent/pw"), "{text}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        refused(
            &[
                "--postgres-ips",
                "h",
                "--postgres-password-file",
                empty.to_str().unwrap(),
            ],
            "POSTGRES_PASSWORD_FILE",
        );
    }

    #[test]
    fn retention_is_off_unless_given_a_duration() {
        let retention = |args: &[&str]| {
            let mut all = vec!["--postgres-ips", "h"];
            all.extend_from_slice(args);
            raw(&all).validate().map(|c| c.retention)
        };
        assert_eq!(retention(&[]).unwrap(), None);
        assert_eq!(retention(&["--retention-max-age", "off"]).unwrap(), None);
        assert_eq!(
            retention(&["--retention-max-age", "30d"]).unwrap(),
            Some(Retention {
                max_age: Duration::from_secs(30 * 86_400),
                interval: Duration::from_secs(60)
            })
        );
        assert_eq!(
            retention(&[
                "--retention-max-age",
                "2h 30m",
                "--retention-interval",
                "500ms"
            ])
            .unwrap()
            .map(|r| (r.max_age, r.interval)),
            Some((Duration::from_secs(9_000), Duration::from_millis(500)))
        );
        for (args, var) in [
            (&["--retention-max-age", "30"][..], "RETENTION_MAX_AGE"),
            (&["--retention-max-age", "forever"][..], "RETENTION_MAX_AGE"),
            (&["--retention-max-age", "0s"][..], "RETENTION_MAX_AGE"),
            (
                &["--retention-max-age", "1d", "--retention-interval", "1ms"][..],
                "RETENTION_INTERVAL",
            ),
        ] {
            assert_eq!(retention(args).unwrap_err().var, var, "{args:?}");
        }
    }

    #[test]
    fn metrics_addr_accepts_a_bare_port() {
        let addr = |value: &str| {
            raw(&["--postgres-ips", "h", "--metrics-addr", value])
                .validate()
                .map(|c| c.metrics_addr.to_string())
        };
        assert_eq!(addr(":2112").unwrap(), "0.0.0.0:2112");
        assert_eq!(addr(" 127.0.0.1:9 ").unwrap(), "127.0.0.1:9");
        assert_eq!(addr("[::1]:9").unwrap(), "[::1]:9");
        for bad in [":", ":x", ":99999", "2112", ""] {
            assert_eq!(addr(bad).unwrap_err().var, "METRICS_ADDR", "{bad:?}");
        }
    }
}
