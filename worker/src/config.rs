//! Configuration: every setting is an environment variable with a CLI twin, validated once at
//! start into a [`Config`] that the rest of the worker shares as `Arc<Config>`.
//!
//! Raw values are read as text and validated here rather than by clap's typed parsers, so that a
//! missing or malformed setting fails with exactly one line naming the variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
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

/// The raw settings as given on the command line or in the environment.
#[derive(Debug, Clone, Default, Args)]
pub struct RawConfig {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Shards as `name=postgres://user:pass@host:port/db,name2=…`. The name is the shard's
    /// identity on the ring; the URL may change freely.
    #[arg(long, env = "POSTGRES_SHARDS")]
    pub postgres_shards: Option<String>,
    /// The original service's form: comma list of hosts, each a shard named after its host.
    #[arg(long, env = "POSTGRES_IPS")]
    pub postgres_ips: Option<String>,
    #[arg(long, env = "POSTGRES_PORT", default_value = "5432")]
    pub postgres_port: String,
    #[arg(long, env = "POSTGRES_USER", default_value = "postgres")]
    pub postgres_user: String,
    #[arg(long, env = "POSTGRES_PASSWORD", default_value = "")]
    pub postgres_password: String,
    #[arg(long, env = "POSTGRES_DB", default_value = "postgres")]
    pub postgres_db: String,
    #[arg(long, env = "NATS_LOGS_TOPIC", default_value = "logs")]
    pub nats_logs_topic: String,
    #[arg(long, env = "NATS_QUERY_TOPIC", default_value = "query")]
    pub nats_query_topic: String,
    #[arg(long, env = "NATS_RESPONSE_TOPIC", default_value = "response")]
    pub nats_response_topic: String,
    #[arg(long, env = "NATS_QUEUE_GROUP", default_value = "workers")]
    pub nats_queue_group: String,
    #[arg(long, env = "NATS_EVENTS_PREFIX", default_value = "appended")]
    pub nats_events_prefix: String,
    #[arg(long, env = "NATS_DEAD_LETTER_TOPIC", default_value = "dead_letter")]
    pub nats_dead_letter_topic: String,
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
    /// Largest stream size in bytes; when full, publishers get an error instead of older
    /// unprocessed appends being dropped. -1 = unlimited.
    #[arg(long, env = "JS_MAX_BYTES", default_value = "-1")]
    pub js_max_bytes: String,
    /// How long the stream itself drops a re-published `Nats-Msg-Id`, across ALL objects, in
    /// milliseconds (JetStream's minimum is 100). The database deduplicates keys per object
    /// forever; a short window keeps the stream from dropping another object's append that
    /// reuses an id.
    #[arg(long, env = "JS_DUPLICATE_WINDOW_MS", default_value = "100")]
    pub js_duplicate_window_ms: String,
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
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
}

/// One PostgreSQL node on the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    /// Identity on the ring and in the shard's own database. Never derived from the URL alone,
    /// so a changed password or host does not move data.
    pub name: String,
    /// Connection string (URL or key=value form, as tokio-postgres accepts).
    pub url: String,
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
    pub max_bytes: i64,
    pub duplicate_window: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub intake: Intake,
    pub nats_url: String,
    pub shards: Vec<ShardConfig>,
    pub logs_subject: String,
    pub query_subject: String,
    pub response_subject: String,
    pub queue_group: String,
    pub events_prefix: String,
    pub dead_letter_subject: String,
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
}

impl RawConfig {
    /// Validate every setting; the first problem found is returned, naming its variable.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let shards = self.shards()?;
        Ok(Config {
            intake: self.intake()?,
            nats_url: non_empty("NATS_URL", &self.nats_url)?,
            shards,
            logs_subject: subject("NATS_LOGS_TOPIC", &self.nats_logs_topic)?,
            query_subject: subject("NATS_QUERY_TOPIC", &self.nats_query_topic)?,
            response_subject: subject("NATS_RESPONSE_TOPIC", &self.nats_response_topic)?,
            queue_group: subject("NATS_QUEUE_GROUP", &self.nats_queue_group)?,
            events_prefix: subject("NATS_EVENTS_PREFIX", &self.nats_events_prefix)?,
            dead_letter_subject: subject("NATS_DEAD_LETTER_TOPIC", &self.nats_dead_letter_topic)?,
            metrics_addr: self.metrics_addr.trim().parse().map_err(|e| {
                bad(
                    "METRICS_ADDR",
                    format!("{:?} is not host:port ({e})", self.metrics_addr),
                )
            })?,
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
        })
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
                max_bytes: number("JS_MAX_BYTES", &self.js_max_bytes, -1, i64::MAX)?,
                duplicate_window: Duration::from_millis(number(
                    "JS_DUPLICATE_WINDOW_MS",
                    &self.js_duplicate_window_ms,
                    100,
                    86_400_000,
                )?),
            })),
            other => Err(bad("INTAKE", format!("{other:?} is not jetstream or core"))),
        }
    }

    fn shards(&self) -> Result<Vec<ShardConfig>, ConfigError> {
        let shards =
            match (&self.postgres_shards, &self.postgres_ips) {
                (Some(spec), _) if !spec.trim().is_empty() => parse_shards(spec)?,
                (_, Some(ips)) if !ips.trim().is_empty() => self.shards_from_ips(ips)?,
                _ => return Err(bad(
                    "POSTGRES_SHARDS",
                    "not set (set POSTGRES_SHARDS=name=postgres://…,… or POSTGRES_IPS=host1,host2)",
                )),
            };
        Ok(shards)
    }

    fn shards_from_ips(&self, ips: &str) -> Result<Vec<ShardConfig>, ConfigError> {
        let port: u16 = number("POSTGRES_PORT", &self.postgres_port, 1, 65_535)?;
        non_empty("POSTGRES_USER", &self.postgres_user)?;
        non_empty("POSTGRES_DB", &self.postgres_db)?;
        let mut shards = Vec::new();
        for host in ips.split(',').map(str::trim) {
            if host.is_empty() || host.contains(['/', '@', ' ']) {
                return Err(bad(
                    "POSTGRES_IPS",
                    format!("{host:?} is not a host name or IP"),
                ));
            }
            // key=value form: no URL-escaping of the password needed.
            let mut url = format!(
                "host={host} port={port} user={} dbname={}",
                quote_conninfo(&self.postgres_user),
                quote_conninfo(&self.postgres_db)
            );
            if !self.postgres_password.is_empty() {
                url.push_str(&format!(
                    " password={}",
                    quote_conninfo(&self.postgres_password)
                ));
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

/// Parse `name=url,name2=url2`. URLs may not contain commas (percent-encode them).
pub fn parse_shards(spec: &str) -> Result<Vec<ShardConfig>, ConfigError> {
    let mut shards = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, url)) = part.split_once('=') else {
            return Err(bad(
                "POSTGRES_SHARDS",
                format!("{:?} is not name=postgres://…", redact(part)),
            ));
        };
        let (name, url) = (name.trim(), url.trim());
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(
                "POSTGRES_SHARDS",
                format!("shard name {name:?} must be non-empty [A-Za-z0-9._-]"),
            ));
        }
        if let Err(e) = url.parse::<tokio_postgres::Config>() {
            return Err(bad(
                "POSTGRES_SHARDS",
                format!(
                    "shard {name}: {:?} is not a PostgreSQL URL ({e})",
                    redact(url)
                ),
            ));
        }
        shards.push(ShardConfig {
            name: name.to_string(),
            url: url.to_string(),
        });
    }
    if shards.is_empty() {
        return Err(bad("POSTGRES_SHARDS", "no shard given"));
    }
    check_unique("POSTGRES_SHARDS", &shards)?;
    Ok(shards)
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

/// Hide a password in a URL before it reaches an error message or a log line.
pub fn redact(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.rsplit_once('@') {
            if let Some((user, _password)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
    }
    url.to_string()
}

fn quote_conninfo(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn non_empty(var: &'static str, value: &str) -> Result<String, ConfigError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(bad(var, "must not be empty"));
    }
    Ok(value.to_string())
}

/// NATS subject tokens: no whitespace, no empty tokens. Wildcards are refused because a worker
/// publishing to a wildcard subject is always a mistake.
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

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        raw: RawConfig,
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
        let cases: [(&[&str], &str); 9] = [
            (&["--postgres-ips", "h", "--intake", "kafka"], "INTAKE"),
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
        ];
        for (args, var) in cases {
            let err = raw(args).validate().unwrap_err();
            assert_eq!(err.var, var, "{args:?}: {err}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    }
}
