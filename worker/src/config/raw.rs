//! [`RawConfig`]: every setting as clap reads it (a flag with its environment twin), as text,
//! and [`RawConfig::validate`], which turns it into the typed [`Config`] once at start. The
//! shard and login settings are validated in [`super::shards`].

use std::time::Duration;

use clap::Args;
use logstore_protocol::nats::NatsSecurityArgs;
use logstore_protocol::Limits;

use super::parse::{
    boolean, duration, metrics_addr, millis, name_token, non_empty, number, stream_limit, subject,
};
use super::secret::{Masked, Redacted};
use super::shards::MemberAccess;
use super::{
    bad, Config, ConfigError, DeadLetterStream, Intake, JetStreamConfig, Moves, ReplyPolicy,
    Retention,
};

/// The raw settings as given on the command line or in the environment. The secret-bearing
/// fields have [`secret`](super::secret) types, so the derived `Debug` never shows a secret.
#[derive(Clone, Debug, Default, Args)]
pub struct RawConfig {
    /// NATS server URL(s), comma-separated; credentials as `nats://user:pass@host` or
    /// `nats://token@host`.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: Redacted,
    /// NATS login (NATS_USER + NATS_PASSWORD_FILE, NATS_TOKEN_FILE, NATS_NKEY_SEED_FILE,
    /// NATS_CREDS_FILE) and TLS (NATS_TLS_CA_FILE, NATS_TLS_CERT_FILE, NATS_TLS_KEY_FILE).
    #[command(flatten)]
    pub nats_security: NatsSecurityArgs,
    /// Shards as `name=postgres://user:pass@host:port/db,name2=…` (URLs only, no spaces). The
    /// name is the shard's identity on the ring; the URL may change freely.
    #[arg(long, env = "POSTGRES_SHARDS", hide_env_values = true)]
    pub postgres_shards: Option<Redacted>,
    /// The original service's form: comma list of hosts, each a shard named after its host.
    #[arg(long, env = "POSTGRES_IPS")]
    pub postgres_ips: Option<Redacted>,
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
    pub postgres_password: Masked,
    // A path, not the secret itself: a plain String.
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
    /// Prefix of the events after each refused append (`PREFIX.ID`, a `RejectedEvent`).
    #[arg(long, env = "NATS_REJECTED_PREFIX", default_value = "rejected")]
    pub nats_rejected_prefix: String,
    #[arg(long, env = "NATS_DEAD_LETTER_TOPIC", default_value = "dead_letter")]
    pub nats_dead_letter_topic: String,
    /// JetStream stream the workers keep dead letters in (created or updated at start; it
    /// captures NATS_DEAD_LETTER_TOPIC), so `logstore dead-letters` can list the last ones;
    /// `off`: dead letters are core messages only, seen by whoever listens at the time.
    #[arg(long, env = "DEAD_LETTERS_STREAM", default_value = "DEAD_LETTERS")]
    pub dead_letters_stream: String,
    /// How long the dead-letter stream keeps a dead letter (e.g. `7d`, `12h`).
    #[arg(long, env = "DEAD_LETTERS_MAX_AGE", default_value = "7d")]
    pub dead_letters_max_age: String,
    /// Most dead letters the stream keeps (the oldest go first). -1 = unlimited.
    #[arg(long, env = "DEAD_LETTERS_MAX_MSGS", default_value = "100000")]
    pub dead_letters_max_msgs: String,
    /// Most bytes of dead letters the stream keeps (default 64 MiB; the oldest go first).
    /// -1 = unlimited.
    #[arg(long, env = "DEAD_LETTERS_MAX_BYTES", default_value = "67108864")]
    pub dead_letters_max_bytes: String,
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
    /// How long a delivered message may stay unacknowledged before JetStream redelivers it
    /// [default: 30000; 5000 with JS_REPLICAS above 1, where a takeover waits for it].
    #[arg(long, env = "JS_ACK_WAIT_MS")]
    pub js_ack_wait_ms: Option<String>,
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
    /// Partitions of the ordered intake (`logs.<id>` subjects), set when a worker creates the
    /// stream (or first adds them to it); afterwards every worker follows the stream's own
    /// count. 0: the `logs` lane only.
    #[arg(long, env = "JS_PARTITIONS", default_value = "0")]
    pub js_partitions: String,
    /// Copies of the JetStream stream, its consumers and the KV buckets the worker creates,
    /// each on another server of a NATS cluster (1 to 5; 3 rides through the loss of one
    /// server). An existing stream or bucket with fewer copies is raised to this, never
    /// lowered. A single nats-server takes 1 only.
    #[arg(long, env = "JS_REPLICAS", default_value = "1")]
    pub js_replicas: String,
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

impl RawConfig {
    /// Validate every setting; the first problem found is returned, naming its variable. The
    /// settings are checked in a fixed order (shards and logins first), so a configuration
    /// with several problems always reports the same one.
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
        let nats_url = non_empty("NATS_URL", self.nats_url.expose())?;
        let js_replicas = number("JS_REPLICAS", &self.js_replicas, 1, 5)?;
        let nats = self
            .nats_security
            .resolve(&nats_url)
            .map_err(|e| bad(e.var, e.problem))?;
        Ok(Config {
            intake: self.intake(js_replicas)?,
            js_replicas,
            replies: self.replies(&nats.inbox_prefix)?,
            nats,
            nats_url: Redacted::from(nats_url),
            shards,
            logs_subject: subject("NATS_LOGS_TOPIC", &self.nats_logs_topic)?,
            query_subject: subject("NATS_QUERY_TOPIC", &self.nats_query_topic)?,
            response_subject: subject("NATS_RESPONSE_TOPIC", &self.nats_response_topic)?,
            stats_subject: subject("NATS_STATS_TOPIC", &self.nats_stats_topic)?,
            delete_subject: subject("NATS_DELETE_TOPIC", &self.nats_delete_topic)?,
            retention: self.retention()?,
            queue_group: subject("NATS_QUEUE_GROUP", &self.nats_queue_group)?,
            events_prefix: subject("NATS_EVENTS_PREFIX", &self.nats_events_prefix)?,
            rejected_prefix: subject("NATS_REJECTED_PREFIX", &self.nats_rejected_prefix)?,
            dead_letter_subject: subject("NATS_DEAD_LETTER_TOPIC", &self.nats_dead_letter_topic)?,
            dead_letters: self.dead_letters()?,
            metrics_addr: metrics_addr(&self.metrics_addr)?,
            json_logs: self.json_logs()?,
            ring_vnodes: number("RING_VNODES", &self.ring_vnodes, 1, 100_000)?,
            limits: Limits {
                max_log_bytes: number("MAX_LOG_BYTES", &self.max_log_bytes, 1, 64 << 20)?,
                max_key_bytes: number("MAX_KEY_BYTES", &self.max_key_bytes, 1, 1 << 20)?,
            },
            max_batch_entries: number("MAX_BATCH_ENTRIES", &self.max_batch_entries, 1, 100_000)?,
            batch_max_rows: number("BATCH_MAX_ROWS", &self.batch_max_rows, 1, 100_000)?,
            batch_linger: millis("BATCH_LINGER_MS", &self.batch_linger_ms, 0, 10_000)?,
            pool_size: number("POOL_SIZE", &self.pool_size, 1, 1_000)?,
            max_concurrent_queries: number(
                "MAX_CONCURRENT_QUERIES",
                &self.max_concurrent_queries,
                1,
                100_000,
            )?,
            shard_timeout: millis("SHARD_TIMEOUT_MS", &self.shard_timeout_ms, 1, 3_600_000)?,
            shutdown_timeout: millis(
                "SHUTDOWN_TIMEOUT_MS",
                &self.shutdown_timeout_ms,
                1,
                3_600_000,
            )?,
            query_timeout: millis("QUERY_TIMEOUT_MS", &self.query_timeout_ms, 1, 3_600_000)?,
            max_pending_queries: number(
                "MAX_PENDING_QUERIES",
                &self.max_pending_queries,
                1,
                1_000_000,
            )?,
            max_query_bytes: number("MAX_QUERY_BYTES", &self.max_query_bytes, 1, usize::MAX)?,
            moves: Moves {
                rate: number("MOVE_RATE", &self.move_rate, 1, 1_000_000)?,
                grace: millis("MOVE_GRACE_MS", &self.move_grace_ms, 0, 86_400_000)?,
            },
            member_access,
        })
    }

    /// NATS_REPLY_PREFIXES, refusing the worker's own inbox prefix (`own`).
    fn replies(&self, own: &str) -> Result<ReplyPolicy, ConfigError> {
        ReplyPolicy::new(&self.nats_reply_prefixes, own)
            .map_err(|problem| bad("NATS_REPLY_PREFIXES", problem))
    }

    /// LOG_FORMAT: `true` for JSON lines.
    fn json_logs(&self) -> Result<bool, ConfigError> {
        match self.log_format.trim() {
            "text" => Ok(false),
            "json" => Ok(true),
            other => Err(bad("LOG_FORMAT", format!("{other:?} is not text or json"))),
        }
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

    /// DEAD_LETTERS_STREAM and its limits (None: `off`).
    fn dead_letters(&self) -> Result<Option<DeadLetterStream>, ConfigError> {
        let name = match self.dead_letters_stream.trim() {
            "off" => return Ok(None),
            name => name_token("DEAD_LETTERS_STREAM", name)?,
        };
        Ok(Some(DeadLetterStream {
            name,
            max_age: duration(
                "DEAD_LETTERS_MAX_AGE",
                self.dead_letters_max_age.trim(),
                Duration::from_secs(1),
            )?,
            max_messages: stream_limit("DEAD_LETTERS_MAX_MSGS", &self.dead_letters_max_msgs)?,
            max_bytes: stream_limit("DEAD_LETTERS_MAX_BYTES", &self.dead_letters_max_bytes)?,
        }))
    }

    /// INTAKE and, for JetStream, its settings; `replicas`: JS_REPLICAS, validated.
    fn intake(&self, replicas: usize) -> Result<Intake, ConfigError> {
        match self.intake.trim() {
            "core" => Ok(Intake::Core),
            "jetstream" => Ok(Intake::JetStream(JetStreamConfig {
                stream: name_token("NATS_STREAM", &self.nats_stream)?,
                consumer: name_token("NATS_CONSUMER", &self.nats_consumer)?,
                ack_wait: match &self.js_ack_wait_ms {
                    Some(ms) => millis("JS_ACK_WAIT_MS", ms, 100, 3_600_000)?,
                    None => default_ack_wait(replicas),
                },
                max_deliver: number("JS_MAX_DELIVER", &self.js_max_deliver, 1, 1_000_000)?,
                max_ack_pending: number(
                    "JS_MAX_ACK_PENDING",
                    &self.js_max_ack_pending,
                    1,
                    10_000_000,
                )?,
                max_bytes: stream_limit("JS_MAX_BYTES", &self.js_max_bytes)?,
                max_messages: stream_limit("JS_MAX_MSGS", &self.js_max_msgs)?,
                duplicate_window: millis(
                    "JS_DUPLICATE_WINDOW_MS",
                    &self.js_duplicate_window_ms,
                    100,
                    86_400_000,
                )?,
                ordered: boolean("JS_ORDERED", &self.js_ordered)?,
                lease: millis("JS_LEASE_MS", &self.js_lease_ms, 300, 600_000)?,
                partitions: number("JS_PARTITIONS", &self.js_partitions, 0, 1024)?,
                replicas,
            })),
            other => Err(bad("INTAKE", format!("{other:?} is not jetstream or core"))),
        }
    }
}

/// JS_ACK_WAIT_MS when unset. A replicated consumer (`replicas` > 1) is never reset to its ack
/// floor (docs/intake.md, "Why a replicated consumer is never reset"), so after a NATS
/// server's loss or a worker's crash the deliveries that were lost on the way come back only
/// once ack_wait expires: short there, so appends resume within seconds. With one copy a
/// takeover resets the consumer instead, and the longer wait spares redeliveries of messages
/// held behind a slow or down shard.
pub fn default_ack_wait(replicas: usize) -> Duration {
    match replicas {
        0 | 1 => Duration::from_secs(30),
        _ => Duration::from_secs(5),
    }
}
