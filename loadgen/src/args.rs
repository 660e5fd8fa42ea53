//! Settings: every flag has an environment twin, and [`Args::validate`] turns them once into
//! [`Settings`], drawing the random defaults (seed, id base, run id) that make reruns distinct.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::Parser;
use logstore_protocol::nats::{NatsAccess, NatsSecurityArgs};
use logstore_protocol::redact::redact;
use rand::Rng;

use logstore_protocol::DEFAULT_MAX_BATCH_ENTRIES;

use crate::pace::Schedule;

/// More connections than this would not spread load any better, only cost sockets and tasks.
const MAX_CONNECTIONS: usize = 64;

/// Command line (and environment) of `loadgen`. Parse it with `Args::parse()` or, in tests,
/// `Args::try_parse_from([...])`, then hand it to [`crate::run`]. `Debug` redacts NATS_URL.
#[derive(Clone, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "logstore load generator: appends and queries over NATS at a set rate, latency \
             percentiles, and a verification that nothing acknowledged was lost"
)]
pub struct Args {
    /// NATS server(s) to connect to, comma-separated; credentials as
    /// `nats://user:pass@host` or `nats://token@host`.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true
    )]
    pub nats_url: String,

    /// NATS login and TLS: the workers' settings of the same names.
    #[command(flatten)]
    pub nats_security: NatsSecurityArgs,

    /// Instead of generating load: read object ID's whole log in one query (streamed in chunks),
    /// check it is in order and report entries per second. For benchmarking large reads.
    #[arg(long, value_name = "ID")]
    pub read_whole: Option<u64>,

    /// Subject the workers take appends on.
    #[arg(long, env = "NATS_LOGS_TOPIC", default_value = "logs")]
    pub logs_subject: String,

    /// Subject the workers answer queries on.
    #[arg(long, env = "NATS_QUERY_TOPIC", default_value = "query")]
    pub query_subject: String,

    /// Prefix of the events the workers publish after each refused append (`PREFIX.ID`); with
    /// --verify, the run counts its own appends announced there.
    #[arg(long, env = "NATS_REJECTED_PREFIX", default_value = "rejected")]
    pub rejected_prefix: String,

    /// Operations per MINUTE when neither --rate nor --max-rate is given. Named after the
    /// original Go loadgen, where it meant append requests per minute (all operations are
    /// appends unless --query-share is set). Each append counts, also inside a batch.
    #[arg(
        long,
        env = "QUERIES_MIN",
        value_name = "PER_MIN",
        default_value_t = 60.0
    )]
    pub queries_min: f64,

    /// Operations per SECOND (overrides QUERIES_MIN). Each append counts, also inside a batch:
    /// with --batch N a message goes out every N appends' worth of time.
    #[arg(
        long,
        env = "LOADGEN_RATE",
        value_name = "PER_SEC",
        conflicts_with = "max_rate"
    )]
    pub rate: Option<f64>,

    /// Send as fast as the system answers, with --in-flight operations outstanding.
    #[arg(long, env = "LOADGEN_MAX_RATE", value_parser = BoolishValueParser::new())]
    pub max_rate: bool,

    /// Most messages outstanding at once (also bounds a fixed rate the system cannot keep up
    /// with, so loadgen never piles up unbounded work). With --batch N, one message carries N
    /// appends.
    #[arg(
        long,
        env = "LOADGEN_IN_FLIGHT",
        value_name = "N",
        default_value_t = 64
    )]
    pub in_flight: usize,

    /// Stop after this many appends (queries when --query-share is 1). Default: run until
    /// --duration passes or SIGINT/SIGTERM.
    #[arg(
        long,
        env = "LOADGEN_COUNT",
        value_name = "N",
        conflicts_with = "duration"
    )]
    pub count: Option<u64>,

    /// Stop after this many seconds (fractions allowed).
    #[arg(long, env = "LOADGEN_DURATION", value_name = "SECS")]
    pub duration: Option<f64>,

    /// Number of distinct object ids written and queried: id-base .. id-base + objects - 1.
    #[arg(long, env = "LOADGEN_OBJECTS", value_name = "N", default_value_t = 100)]
    pub objects: u64,

    /// First object id. Default: random per run, so reruns do not write to the same objects.
    #[arg(long, env = "LOADGEN_ID_BASE")]
    pub id_base: Option<u64>,

    /// Bytes per log entry (at least the idempotency key it starts with).
    #[arg(
        long,
        env = "LOADGEN_LOG_SIZE",
        value_name = "BYTES",
        default_value_t = 100
    )]
    pub log_size: usize,

    /// Share of operations that are queries (0.0 ..= 1.0); the rest are appends.
    #[arg(long, env = "LOADGEN_QUERY_SHARE", default_value_t = 0.0)]
    pub query_share: f64,

    /// Seed of the workload (which object each operation targets, which are queries, the log
    /// text). Default: random, printed at start; pass it with --id-base to repeat a run.
    #[arg(long, env = "LOADGEN_SEED")]
    pub seed: Option<u64>,

    /// How long to wait for one append reply, PubAck or query answer.
    #[arg(long, env = "LOADGEN_TIMEOUT_MS", default_value_t = 2000)]
    pub timeout_ms: u64,

    /// Retries of an unacknowledged append (same idempotency key) before giving up on it.
    #[arg(long, env = "LOADGEN_RETRIES", default_value_t = 20)]
    pub retries: u32,

    /// Publish appends through JetStream (acknowledged = PubAck) instead of core request-reply
    /// (acknowledged = the worker's reply after its commit). Not given: loadgen follows the
    /// intake the workers advertise (their NATS service info, `$SRV.INFO.logstore`).
    /// `--jetstream=false` forces core requests. The stream must already exist: the workers
    /// create it; loadgen never creates or changes streams.
    #[arg(
        long,
        env = "LOADGEN_JETSTREAM",
        value_name = "BOOL",
        value_parser = BoolishValueParser::new(),
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub jetstream: Option<bool>,

    /// Where JetStream appends go when the workers' stream has partitions: `auto` (one lane
    /// per object: a single append on `<logs>.<id>`, a batch of one partition's entries on
    /// `<logs>.p.<k>.b`) or `logs` (every append on the shared `<logs>` lane, as before
    /// partitions; for comparisons). Without partitions, and with core intake, `logs` always.
    #[arg(long, env = "LOADGEN_LANE", value_enum, default_value_t = Lane::Auto)]
    pub lane: Lane,

    /// After the run, read back every object it touched and check that every acknowledged
    /// append is there exactly once, in order. Exit 1 on any problem. Keeps one record per
    /// acknowledged append in memory (~100 bytes each).
    #[arg(long, env = "LOADGEN_VERIFY", value_parser = BoolishValueParser::new())]
    pub verify: bool,

    /// JetStream mode: how long verify waits for the workers to store every acknowledged append.
    #[arg(
        long,
        env = "LOADGEN_VERIFY_TIMEOUT",
        value_name = "SECS",
        default_value_t = 60.0
    )]
    pub verify_timeout: f64,

    /// Write the summary (and verdict) as JSON to this file.
    #[arg(long, env = "LOADGEN_REPORT", value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// Appends per message: N > 1 sends each message as a JSON array of N appends (a batch
    /// append; every entry keeps its own key and still counts as one append for --rate, --count
    /// and --verify). 1 sends today's single-object bodies.
    #[arg(long, env = "LOADGEN_BATCH", value_name = "N", default_value_t = 1)]
    pub batch: usize,

    /// NATS connections to spread publishes over (round-robin), so one connection's socket and
    /// its single writer task are not what limits the rate.
    #[arg(
        long,
        env = "LOADGEN_CONNECTIONS",
        value_name = "N",
        default_value_t = 1
    )]
    pub connections: usize,

    /// Seconds between progress lines when stderr is not a terminal (0: none).
    #[arg(
        long,
        env = "LOADGEN_PROGRESS_SECS",
        value_name = "SECS",
        default_value_t = 5.0
    )]
    pub progress_secs: f64,
}

/// How operations are spaced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// A fixed rate, operations per second.
    Rate(Schedule),
    /// As fast as possible, bounded only by the in-flight limit.
    Max,
}

/// When the run stops sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this many appends (queries when every operation is a query).
    Count(u64),
    /// After this long.
    After(Duration),
    /// Only on SIGINT/SIGTERM (the `shutdown` future).
    Signal,
}

/// `--lane`: which subjects JetStream appends go to when the stream has partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lane {
    /// Per object (`<logs>.<id>`, batches per partition on `<logs>.p.<k>.b`) when the workers
    /// take partitions, else `<logs>`.
    Auto,
    /// Always `<logs>`.
    Logs,
}

/// How appends are sent and what acknowledges them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Core request-reply; acknowledged by the worker's reply (after its commit).
    Core,
    /// JetStream publish; acknowledged by the stream's PubAck (stored later by a worker).
    JetStream,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Core => "core",
            Mode::JetStream => "jetstream",
        })
    }
}

/// Hand-written so that NATS credentials never reach a log line or a panic message. The
/// destructuring lists every field, so a new one cannot be added without deciding how it is
/// shown.
impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Args {
            nats_url,
            nats_security,
            read_whole,
            logs_subject,
            query_subject,
            rejected_prefix,
            queries_min,
            rate,
            max_rate,
            in_flight,
            count,
            duration,
            objects,
            id_base,
            log_size,
            query_share,
            seed,
            timeout_ms,
            retries,
            jetstream,
            lane,
            verify,
            verify_timeout,
            report,
            batch,
            connections,
            progress_secs,
        } = self;
        f.debug_struct("Args")
            .field("nats_url", &redact(nats_url))
            .field("nats_security", nats_security)
            .field("read_whole", read_whole)
            .field("logs_subject", logs_subject)
            .field("query_subject", query_subject)
            .field("rejected_prefix", rejected_prefix)
            .field("queries_min", queries_min)
            .field("rate", rate)
            .field("max_rate", max_rate)
            .field("in_flight", in_flight)
            .field("count", count)
            .field("duration", duration)
            .field("objects", objects)
            .field("id_base", id_base)
            .field("log_size", log_size)
            .field("query_share", query_share)
            .field("seed", seed)
            .field("timeout_ms", timeout_ms)
            .field("retries", retries)
            .field("jetstream", jetstream)
            .field("lane", lane)
            .field("verify", verify)
            .field("verify_timeout", verify_timeout)
            .field("report", report)
            .field("batch", batch)
            .field("connections", connections)
            .field("progress_secs", progress_secs)
            .finish()
    }
}

/// Validated settings with every random default drawn. Everything a run needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    /// NATS_URL's credential-free server URLs, the login (from NATS_URL or the secret files,
    /// read once here) and TLS (`Debug` hides the secrets).
    pub nats: NatsAccess,
    pub logs_subject: String,
    pub query_subject: String,
    pub rejected_prefix: String,
    pub pace: Pace,
    pub in_flight: usize,
    pub stop: Stop,
    pub objects: u64,
    pub id_base: u64,
    pub log_size: usize,
    pub query_share: f64,
    pub seed: u64,
    pub timeout: Duration,
    pub retries: u32,
    /// How appends are sent: `--jetstream` when given, else core until [`crate::run`] learns
    /// the workers' intake ([`crate::intake::decide`]) and sets it.
    pub mode: Mode,
    /// `--jetstream` as given (`None`: follow the workers).
    pub mode_given: Option<Mode>,
    pub lane: Lane,
    /// The partitions JetStream appends are spread over by object (0: all on `logs_subject`);
    /// set by [`crate::run`] from what the workers advertise and `--lane`.
    pub partitions: u32,
    pub verify: bool,
    pub verify_timeout: Duration,
    pub report: Option<PathBuf>,
    pub progress_every: Option<Duration>,
    /// Appends per message (1: single-object bodies; more: JSON arrays).
    pub batch: usize,
    /// NATS connections publishes are spread over.
    pub connections: usize,
    /// Prefix of every idempotency key of this run (`<run_id>-<n>`). Random per run even with
    /// a fixed seed: a repeated run must store its appends, not be answered as duplicates.
    pub run_id: String,
}

/// A setting that cannot work, named by its flag and environment variable.
#[derive(Debug, thiserror::Error)]
#[error("--{flag} ({env}): {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub env: &'static str,
    pub reason: String,
}

fn invalid(flag: &'static str, env: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        env,
        reason: reason.into(),
    }
}

/// Seconds as a finite, non-negative [`Duration`] (zero only if `allow_zero`); errors name the
/// flag and variable.
fn seconds(
    value: f64,
    flag: &'static str,
    env: &'static str,
    allow_zero: bool,
) -> Result<Duration, ConfigError> {
    if !value.is_finite() || value < 0.0 || (!allow_zero && value == 0.0) {
        return Err(invalid(
            flag,
            env,
            format!("must be a positive number of seconds, got {value}"),
        ));
    }
    Duration::try_from_secs_f64(value)
        .map_err(|e| invalid(flag, env, format!("{value} seconds: {e}")))
}

impl Args {
    /// Check every setting and draw the random defaults. Errors name the flag and variable.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let nats = self
            .nats_security
            .resolve(&self.nats_url)
            .map_err(|e| invalid(e.flag(), e.var, e.problem))?;
        let rate = match (self.max_rate, self.rate) {
            (true, _) => None,
            (false, Some(rate)) => Some(("rate", "LOADGEN_RATE", rate)),
            (false, None) => Some(("queries-min", "QUERIES_MIN", self.queries_min / 60.0)),
        };
        let pace = match rate {
            None => Pace::Max,
            Some((flag, env, rate)) => Pace::Rate(
                Schedule::new(rate)
                    .ok_or_else(|| invalid(flag, env, "must be a positive, finite rate"))?,
            ),
        };
        if self.in_flight == 0 {
            return Err(invalid(
                "in-flight",
                "LOADGEN_IN_FLIGHT",
                "must be at least 1",
            ));
        }
        let stop = match (self.count, self.duration) {
            (Some(0), _) => return Err(invalid("count", "LOADGEN_COUNT", "must be at least 1")),
            (Some(n), _) => Stop::Count(n),
            (None, Some(secs)) => {
                Stop::After(seconds(secs, "duration", "LOADGEN_DURATION", false)?)
            }
            (None, None) => Stop::Signal,
        };
        if self.objects == 0 {
            return Err(invalid("objects", "LOADGEN_OBJECTS", "must be at least 1"));
        }
        let highest_offset = self.objects - 1;
        let id_base = match self.id_base {
            Some(base) => {
                if base.checked_add(highest_offset).is_none() {
                    return Err(invalid(
                        "id-base",
                        "LOADGEN_ID_BASE",
                        format!(
                            "{base} + {} objects passes the largest id (u64::MAX)",
                            self.objects
                        ),
                    ));
                }
                base
            }
            None => rand::thread_rng().gen_range(0..=u64::MAX - highest_offset),
        };
        if !(0.0..=1.0).contains(&self.query_share) {
            return Err(invalid(
                "query-share",
                "LOADGEN_QUERY_SHARE",
                format!("must be within 0.0 ..= 1.0, got {}", self.query_share),
            ));
        }
        if self.timeout_ms == 0 {
            return Err(invalid(
                "timeout-ms",
                "LOADGEN_TIMEOUT_MS",
                "must be at least 1",
            ));
        }
        if !(1..=DEFAULT_MAX_BATCH_ENTRIES).contains(&self.batch) {
            return Err(invalid(
                "batch",
                "LOADGEN_BATCH",
                format!(
                    "must be within 1 ..= {DEFAULT_MAX_BATCH_ENTRIES} (the workers' default \
                     MAX_BATCH_ENTRIES), got {}",
                    self.batch
                ),
            ));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(invalid(
                "connections",
                "LOADGEN_CONNECTIONS",
                format!(
                    "must be within 1 ..= {MAX_CONNECTIONS}, got {}",
                    self.connections
                ),
            ));
        }
        let mode_given = self.jetstream.map(|js| match js {
            true => Mode::JetStream,
            false => Mode::Core,
        });
        let verify_timeout = seconds(
            self.verify_timeout,
            "verify-timeout",
            "LOADGEN_VERIFY_TIMEOUT",
            true,
        )?;
        let progress = seconds(
            self.progress_secs,
            "progress-secs",
            "LOADGEN_PROGRESS_SECS",
            true,
        )?;
        Ok(Settings {
            nats,
            logs_subject: self.logs_subject.clone(),
            query_subject: self.query_subject.clone(),
            rejected_prefix: self.rejected_prefix.clone(),
            pace,
            in_flight: self.in_flight,
            stop,
            objects: self.objects,
            id_base,
            log_size: self.log_size,
            query_share: self.query_share,
            seed: self.seed.unwrap_or_else(rand::random),
            timeout: Duration::from_millis(self.timeout_ms),
            retries: self.retries,
            mode: mode_given.unwrap_or(Mode::Core),
            mode_given,
            lane: self.lane,
            partitions: 0,
            verify: self.verify,
            verify_timeout,
            report: self.report.clone(),
            progress_every: (!progress.is_zero()).then_some(progress),
            batch: self.batch,
            connections: self.connections,
            // 40 random bits: unique enough across runs, short enough to keep keys small.
            run_id: format!("lg{:010x}", rand::random::<u64>() >> 24),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Settings, String> {
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(extra);
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        args.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn queries_min_paces_by_default_and_rate_overrides_it() {
        let s = parse(&["--queries-min", "120"]).unwrap();
        assert_eq!(s.pace, Pace::Rate(Schedule::new(2.0).unwrap()));
        let s = parse(&["--queries-min", "120", "--rate", "500"]).unwrap();
        assert_eq!(s.pace, Pace::Rate(Schedule::new(500.0).unwrap()));
        assert_eq!(parse(&["--max-rate"]).unwrap().pace, Pace::Max);
        assert!(parse(&["--max-rate", "--rate", "5"]).is_err());
    }

    #[test]
    fn bad_settings_name_their_flag_and_variable() {
        for (argv, needle) in [
            (vec!["--rate", "0"], "--rate (LOADGEN_RATE)"),
            (vec!["--queries-min=-1"], "QUERIES_MIN"),
            (vec!["--query-share", "1.5"], "LOADGEN_QUERY_SHARE"),
            (vec!["--objects", "0"], "LOADGEN_OBJECTS"),
            (vec!["--count", "0"], "LOADGEN_COUNT"),
            (vec!["--duration", "0"], "LOADGEN_DURATION"),
            (vec!["--in-flight", "0"], "LOADGEN_IN_FLIGHT"),
            (vec!["--batch", "0"], "--batch (LOADGEN_BATCH)"),
            (vec!["--batch", "1001"], "MAX_BATCH_ENTRIES"),
            (
                vec!["--connections", "0"],
                "--connections (LOADGEN_CONNECTIONS)",
            ),
            (vec!["--connections", "65"], "LOADGEN_CONNECTIONS"),
            (
                vec!["--id-base", "18446744073709551615", "--objects", "2"],
                "LOADGEN_ID_BASE",
            ),
        ] {
            let err = parse(&argv).unwrap_err();
            assert!(err.contains(needle), "{argv:?}: {err}");
        }
        assert!(parse(&["--count", "5", "--duration", "5"]).is_err());
    }

    #[test]
    fn nats_credentials_are_split_off_and_never_shown() {
        for url in [
            "nats://u:S3CRET@h1 nats://u:S3CRET@h2",
            "nats://a:S3CRET@h1,nats://b:S3CRET@h2",
            "nats://:S3CRET@h",
        ] {
            let err = parse(&["--nats-url", url]).unwrap_err();
            assert!(err.contains("--nats-url (NATS_URL)"), "{url}: {err}");
            assert!(!err.contains("S3CRET"), "{url}: {err}");
        }
        let argv = [
            "loadgen",
            "--nats-url",
            "nats://u:S3CRET@h1,nats://u:S3CRET@h2",
        ];
        let args = Args::try_parse_from(argv).unwrap();
        let settings = args.validate().unwrap();
        assert_eq!(settings.nats.servers, ["nats://h1", "nats://h2"]);
        let debug = format!("{args:?} {settings:?}");
        assert!(!debug.contains("S3CRET"), "{debug}");
    }

    #[test]
    fn random_defaults_differ_per_run_and_fixed_ones_are_kept() {
        let a = parse(&[]).unwrap();
        let b = parse(&[]).unwrap();
        assert_ne!(a.run_id, b.run_id);
        assert_ne!((a.id_base, a.seed), (b.id_base, b.seed));
        let s = parse(&["--id-base", "18446744073709551515", "--seed", "7"]).unwrap();
        assert_eq!((s.id_base, s.seed, s.objects), (u64::MAX - 100, 7, 100));
        assert_eq!(s.stop, Stop::Signal);
        assert_eq!(s.mode, Mode::Core);
        assert_eq!(
            (s.batch, s.connections),
            (1, 1),
            "single bodies, one connection"
        );
        let s = parse(&["--batch", "1000", "--connections", "4"]).unwrap();
        assert_eq!((s.batch, s.connections), (1000, 4));
    }

    #[test]
    fn the_intake_is_followed_unless_a_flag_says_which() {
        let s = parse(&[]).unwrap();
        assert_eq!((s.mode_given, s.lane), (None, Lane::Auto));
        let s = parse(&["--jetstream", "--verify"]).unwrap();
        assert_eq!(
            (s.mode_given, s.mode),
            (Some(Mode::JetStream), Mode::JetStream)
        );
        assert!(s.verify, "--jetstream takes no value unless given with =");
        let s = parse(&["--jetstream=false"]).unwrap();
        assert_eq!(s.mode_given, Some(Mode::Core));
        let s = parse(&["--lane", "logs"]).unwrap();
        assert_eq!(s.lane, Lane::Logs);
        assert!(parse(&["--lane", "p"]).is_err());
    }
}
