//! `logstore`, the command-line client for people: append, read (by seq or time, newest
//! first), follow a log without gaps, stats and delete. It speaks only NATS, with the worker's
//! settings (`NATS_URL` with its credentials, the subject variables), so it needs nothing but
//! the address of the NATS server.
//!
//! # Layout
//! - this file: the command line ([`Args`]), one function per command, the output formats and
//!   the exit codes ([`CliError::exit_code`]);
//! - [`append`]: `logstore append`, one entry from the command line or many from stdin;
//! - [`client`]: the connection, request-reply and whole-range reads;
//! - [`lines`]: stdin read line by line into batches of entries (`append` without TEXT);
//! - [`batch`]: one batch sent, retried and settled on either intake;
//! - [`tail`]: the gapless follow of `logstore tail -f`;
//! - [`status`]: `logstore status`, the fleet as its workers see it;
//! - [`deadletters`]: `logstore dead-letters`, the messages the workers refused.

pub mod append;
pub mod batch;
pub mod client;
pub mod deadletters;
pub mod lines;
pub mod status;
pub mod tail;

use std::io::Write;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use logstore_protocol::nats::NatsSecurityArgs;
use logstore_protocol::{
    DeleteReply, DeleteRequest, ErrorCode, LogEntry, Order, QueryRequest, StatsReply, StatsRequest,
    Timestamp,
};

use client::{ClientError, Connection, ReadError, Subjects};

const EXAMPLES: &str = "\
Examples:
  logstore append 42 'disk full' --key evt-981     store an entry (the key makes a retry safe)
  logstore append 42 'step 2' --expect-seq 1       only if the log's last seq is still 1
  tail -f app.log | logstore append 42             every line an entry, sent in batches of 100
  logstore append 42 --jsonl --batch 500 < ev.jsonl   lines {\"log\":\"…\",\"key\":\"…\"}
  logstore get 42                                  the whole log, oldest first
  logstore get 42 --last 20                        the last 20 entries (printed oldest first)
  logstore get 42 --since 2026-11-23T14:00:00Z --until 2026-11-23T14:05:00Z
  logstore get 42 --after 100 --json               entries after seq 100, one JSON object a line
  logstore tail 42 -f                              the last 10 entries, then each new one as it comes
  logstore stats 42                                count, seq and time range, bytes
  logstore delete 42 --before-seq 1000             remove seqs 1..999 (seqs are never reused)
  logstore status                                  the workers, partitions, ring and move, lag, shards
  logstore dead-letters -f                         the last refused messages and why, then new ones

Output: one line per entry, `SEQ TS TEXT` (control characters in TEXT escaped); --json prints
JSON lines. With JetStream intake, `append` waits for the workers' outcome (the object's
appended or rejected event) and answers as with core intake. Exit codes: 0 ok; 1 the service
refused or failed the request; 2 bad usage, or NATS refused this user the subject
(permissions; `delete` is the operator's user); 3 conflict (--expect-seq was not the last seq);
4 NATS or the workers could not be reached, or no outcome came in time for an append the stream
queued (sending it again with its key is safe), or NATS refused the login or the TLS handshake
(the line says which).";

/// The command line. Every connection setting has the worker's environment variable.
#[derive(Debug, Parser)]
#[command(
    name = "logstore",
    version,
    about = "Read and write logstore logs over NATS",
    after_help = EXAMPLES
)]
pub struct Args {
    /// NATS server URL(s), comma-separated; credentials as nats://user:pass@host or
    /// nats://token@host.
    #[arg(
        long,
        env = "NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        hide_env_values = true,
        global = true
    )]
    pub nats_url: String,
    /// NATS login and TLS: the workers' settings of the same names.
    #[command(flatten)]
    pub nats_security: NatsSecurityArgs,
    /// Subject of appends (the workers' NATS_LOGS_TOPIC).
    #[arg(long, env = "NATS_LOGS_TOPIC", default_value = "logs", global = true)]
    pub logs_subject: String,
    /// Subject of queries (the workers' NATS_QUERY_TOPIC).
    #[arg(long, env = "NATS_QUERY_TOPIC", default_value = "query", global = true)]
    pub query_subject: String,
    /// Subject of stats requests (the workers' NATS_STATS_TOPIC).
    #[arg(long, env = "NATS_STATS_TOPIC", default_value = "stats", global = true)]
    pub stats_subject: String,
    /// Subject of delete requests (the workers' NATS_DELETE_TOPIC).
    #[arg(
        long,
        env = "NATS_DELETE_TOPIC",
        default_value = "delete",
        global = true
    )]
    pub delete_subject: String,
    /// Prefix of the events the workers publish after each stored append (`PREFIX.ID`).
    #[arg(
        long,
        env = "NATS_EVENTS_PREFIX",
        default_value = "appended",
        global = true
    )]
    pub events_prefix: String,
    /// Prefix of the events the workers publish after each refused append (`PREFIX.ID`).
    #[arg(
        long,
        env = "NATS_REJECTED_PREFIX",
        default_value = "rejected",
        global = true
    )]
    pub rejected_prefix: String,
    /// How long to wait for NATS and for each answer, in milliseconds.
    #[arg(
        long,
        env = "LOGSTORE_TIMEOUT_MS",
        default_value_t = 5_000,
        global = true
    )]
    pub timeout_ms: u64,
    /// Print JSON (one object per line) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// The command line as `logstore` parses it: [`Args`], with every usage line fixed to what the
/// command takes. Left to itself, clap writes into an error's usage line every option that was
/// set, also through its environment variable (`Usage: logstore append --nats-url <NATS_URL>
/// <ID>` when NATS_URL is set), which reads as if that option were required.
pub fn command() -> clap::Command {
    let mut command = Args::command();
    command.build();
    let usage = |command: &mut clap::Command| {
        let usage = command.render_usage().to_string();
        let usage = usage.strip_prefix("Usage: ").unwrap_or(&usage).to_string();
        usage
    };
    let top = usage(&mut command);
    let names: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_string())
        .collect();
    for name in names {
        command = command.mut_subcommand(name, |mut sub| {
            let line = usage(&mut sub);
            sub.override_usage(line)
        });
    }
    command.override_usage(top)
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Append TEXT to the log of object ID, or without TEXT every line of stdin, in batches.
    Append(append::AppendArgs),
    /// Print entries of the log of object ID, oldest first.
    Get {
        /// The object whose log to read.
        id: u64,
        /// Entries at or after this time (RFC 3339).
        #[arg(long, value_name = "T")]
        since: Option<String>,
        /// Entries before this time (RFC 3339).
        #[arg(long, value_name = "T")]
        until: Option<String>,
        /// Only the last N entries (of the range).
        #[arg(long, value_name = "N")]
        last: Option<u64>,
        /// Entries after seq S.
        #[arg(long, value_name = "S")]
        after: Option<u64>,
    },
    /// Print the last entries of the log of object ID; with -f, then every new one, each
    /// exactly once and in seq order, until interrupted.
    Tail {
        /// The object whose log to follow.
        id: u64,
        /// Follow: keep printing new entries.
        #[arg(short, long)]
        follow: bool,
        /// How many of the existing entries to print first.
        #[arg(short = 'n', long, default_value_t = 10, value_name = "N")]
        lines: u64,
    },
    /// Print the statistics of object ID: entry count, seq and time range, bytes.
    Stats {
        /// The object.
        id: u64,
    },
    /// Delete the entries of object ID (all, or those below --before-seq).
    Delete {
        /// The object whose entries to delete.
        id: u64,
        /// Delete only entries with seq < N.
        #[arg(long, value_name = "N")]
        before_seq: Option<u64>,
    },
    /// Show the fleet: each worker (id, pid, version, uptime, readiness), the partitions it
    /// pulls and those nobody pulls, the ring epoch and move progress, the consumers' lag, the
    /// shards up or down. Exit 4 when no worker answers.
    Status,
    /// Print the last dead letters (messages the workers refused, with why), oldest first;
    /// with -f, then each new one until interrupted. For the operator's NATS user.
    DeadLetters(deadletters::Options),
}

/// Why a command failed; [`CliError::exit_code`] says what the process returns.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot read stdin: {0}")]
    Input(#[source] std::io::Error),
    /// A failure at one point of a longer run (a line of stdin for `append`): where, then why.
    #[error("{at}")]
    At {
        at: String,
        #[source]
        source: Box<CliError>,
    },
}

impl From<ReadError> for CliError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Client(e) => CliError::Client(e),
            ReadError::Output(e) => CliError::Output(e),
        }
    }
}

impl CliError {
    /// 1: the service refused or failed the request; 2: bad usage, or NATS refused this user a
    /// subject (its permissions); 3: conflict; 4: NATS or the workers could not be reached, or
    /// did not settle a queued append in time (nothing was done, or for an append: retry with
    /// its key).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Client(ClientError::Denied { .. }) => 2,
            CliError::Client(ClientError::Service(body)) if body.code == ErrorCode::Conflict => 3,
            CliError::Client(
                ClientError::Connect { .. }
                | ClientError::NoAnswer { .. }
                | ClientError::Unconfirmed { .. },
            ) => 4,
            CliError::Client(_) | CliError::Output(_) | CliError::Input(_) => 1,
            CliError::At { source, .. } => source.exit_code(),
        }
    }
}

/// Run one command, writing its output to `out`.
pub async fn run(args: Args, out: &mut dyn Write) -> Result<(), CliError> {
    let nats = args
        .nats_security
        .resolve(&args.nats_url)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let subjects = Subjects {
        logs: args.logs_subject.clone(),
        query: args.query_subject.clone(),
        stats: args.stats_subject.clone(),
        delete: args.delete_subject.clone(),
        events_prefix: args.events_prefix.clone(),
        rejected_prefix: args.rejected_prefix.clone(),
    };
    // Checked before connecting: a typo should not wait for NATS.
    if let Command::Get { since, until, .. } = &args.command {
        time_bound("--since", since.as_deref())?;
        time_bound("--until", until.as_deref())?;
    }
    if let Command::Append(append) = &args.command {
        append.check()?;
    }
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let connection = Connection::open(&nats, subjects, timeout).await?;
    let json = args.json;
    match args.command {
        Command::Append(append) => append::append(&connection, out, json, append).await,
        Command::Get {
            id,
            since,
            until,
            last,
            after,
        } => {
            let request = QueryRequest {
                id,
                after: after.unwrap_or(0),
                before: None,
                order: Order::Asc,
                since: time_bound("--since", since.as_deref())?,
                until: time_bound("--until", until.as_deref())?,
                limit: None,
                request_id: None,
            };
            get(&connection, out, json, request, last).await
        }
        Command::Tail { id, follow, lines } => {
            tail::tail(&connection, out, json, id, lines, follow).await
        }
        Command::Stats { id } => stats(&connection, out, json, id).await,
        Command::Delete { id, before_seq } => {
            let body = to_json(&DeleteRequest { id, before_seq })?;
            let deleted: DeleteReply = connection
                .request(&connection.subjects.delete, body)
                .await?;
            if json {
                writeln!(out, "{}", to_string(&deleted)?)?;
            } else {
                writeln!(out, "deleted {}", deleted.deleted)?;
            }
            Ok(())
        }
        Command::Status => status::status(&connection, out, json).await,
        Command::DeadLetters(options) => {
            deadletters::dead_letters(&connection, out, json, &options).await
        }
    }
}

/// The statistics of object `id`, one per line (or their JSON).
async fn stats(
    connection: &Connection,
    out: &mut dyn Write,
    json: bool,
    id: u64,
) -> Result<(), CliError> {
    let body = to_json(&StatsRequest { id })?;
    let stats: StatsReply = connection.request(&connection.subjects.stats, body).await?;
    if json {
        writeln!(out, "{}", to_string(&stats)?)?;
        return Ok(());
    }
    let none = || "-".to_string();
    writeln!(out, "id        {}", stats.id)?;
    writeln!(out, "count     {}", stats.count)?;
    writeln!(
        out,
        "first     {} {}",
        stats.first_seq.map_or_else(none, |s| s.to_string()),
        stats.first_ts.unwrap_or_else(none)
    )?;
    writeln!(
        out,
        "last      {} {}",
        stats.last_seq,
        stats.last_ts.unwrap_or_else(none)
    )?;
    writeln!(out, "bytes     {}", stats.bytes)?;
    Ok(())
}

async fn get(
    connection: &Connection,
    out: &mut dyn Write,
    json: bool,
    request: QueryRequest,
    last: Option<u64>,
) -> Result<(), CliError> {
    match last {
        // Oldest first, printed as read: any length, one page in memory.
        None => {
            connection
                .read(request, None, |entry| print_entry(out, json, &entry))
                .await?;
        }
        // The newest N, read newest first and printed oldest first, as a log reads.
        Some(n) => {
            let request = QueryRequest {
                order: Order::Desc,
                ..request
            };
            let mut newest = Vec::new();
            connection
                .read(request, Some(n), |entry| {
                    newest.push(entry);
                    Ok(())
                })
                .await?;
            for entry in newest.iter().rev() {
                print_entry(out, json, entry)?;
            }
        }
    }
    Ok(())
}

/// One entry: `SEQ TS TEXT` with control characters escaped (so one entry is one line), or
/// its JSON.
pub fn print_entry(out: &mut dyn Write, json: bool, entry: &LogEntry) -> std::io::Result<()> {
    if json {
        let line = serde_json::to_string(entry).map_err(std::io::Error::other)?;
        return writeln!(out, "{line}");
    }
    let mut text = String::with_capacity(entry.log.len());
    for c in entry.log.chars() {
        if c.is_control() {
            text.extend(c.escape_default());
        } else {
            text.push(c);
        }
    }
    writeln!(out, "{} {} {text}", entry.seq, entry.ts)
}

fn time_bound(flag: &str, text: Option<&str>) -> Result<Option<Timestamp>, CliError> {
    text.map(|t| {
        Timestamp::parse(t)
            .map_err(|e| CliError::Usage(format!("{flag} {t:?} is not an RFC 3339 time: {e}")))
    })
    .transpose()
}

pub(crate) fn to_json<T: serde::Serialize>(body: &T) -> Result<Vec<u8>, CliError> {
    serde_json::to_vec(body).map_err(|e| CliError::Output(std::io::Error::other(e)))
}

pub(crate) fn to_string<T: serde::Serialize>(body: &T) -> Result<String, CliError> {
    serde_json::to_string(body).map_err(|e| CliError::Output(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_print_one_per_line() {
        let mut out = Vec::new();
        let entry = LogEntry {
            seq: 7,
            ts: "2026-11-23T14:00:00.000000Z".into(),
            log: "two\nlines\tand é".into(),
        };
        print_entry(&mut out, false, &entry).unwrap();
        print_entry(&mut out, true, &entry).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "7 2026-11-23T14:00:00.000000Z two\\nlines\\tand é\n\
             {\"seq\":7,\"ts\":\"2026-11-23T14:00:00.000000Z\",\"log\":\"two\\nlines\\tand é\"}\n"
        );
    }

    #[test]
    fn exit_codes_say_what_happened() {
        let service = |code| {
            CliError::Client(ClientError::Service(logstore_protocol::ErrorBody::new(
                code, "x",
            )))
        };
        assert_eq!(service(ErrorCode::Conflict).exit_code(), 3);
        assert_eq!(service(ErrorCode::Unavailable).exit_code(), 1);
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        let unreachable = CliError::Client(ClientError::NoAnswer {
            subject: "logs".into(),
            why: "none".into(),
        });
        assert_eq!(unreachable.exit_code(), 4);
        let unconfirmed = CliError::Client(ClientError::Unconfirmed {
            id: 42,
            stream: "LOGS".into(),
            seq: 7,
            key: "cli-x".into(),
            waited: Duration::from_secs(5),
        });
        assert_eq!(unconfirmed.exit_code(), 4);
        let line = unconfirmed.to_string();
        assert!(
            line.starts_with(
                "queued in stream LOGS as message 7, but no outcome arrived within 5s"
            ) && line.contains("--key cli-x"),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
    }

    #[test]
    fn the_command_line_parses() {
        let args = Args::try_parse_from([
            "logstore",
            "get",
            "42",
            "--since",
            "2026-11-23T14:00:00Z",
            "--last",
            "5",
            "--json",
        ])
        .unwrap();
        assert!(args.json);
        assert!(matches!(
            args.command,
            Command::Get {
                id: 42,
                last: Some(5),
                ..
            }
        ));
        let args = Args::try_parse_from(["logstore", "tail", "42", "-f", "-n", "0"]).unwrap();
        assert!(matches!(
            args.command,
            Command::Tail {
                id: 42,
                follow: true,
                lines: 0
            }
        ));
        assert!(Args::try_parse_from(["logstore", "append", "x", "text"]).is_err());
        let args = Args::try_parse_from(["logstore", "append", "42", "t", "--no-wait"]).unwrap();
        assert!(matches!(
            args.command,
            Command::Append(append::AppendArgs {
                id: 42,
                no_wait: true,
                ..
            })
        ));
    }

    /// An error's usage line shows what the command takes, not the options that happen to be
    /// set (through their environment variables, say).
    #[test]
    fn usage_lines_are_honest() {
        let error = |argv: &[&str]| {
            command()
                .try_get_matches_from(argv)
                .unwrap_err()
                .render()
                .to_string()
        };
        let text = error(&["logstore", "--nats-url", "nats://h:4222", "append"]);
        assert!(
            text.contains("Usage: logstore append [OPTIONS] <ID> [TEXT]\n"),
            "{text}"
        );
        assert!(!text.contains("--nats-url"), "{text}");
        let text = error(&["logstore", "--json"]);
        assert!(
            text.contains("Usage: logstore [OPTIONS] <COMMAND>\n"),
            "{text}"
        );
        let help = command()
            .try_get_matches_from(["logstore", "append", "--help"])
            .unwrap_err()
            .render()
            .to_string();
        for positional in ["<ID>", "[TEXT]"] {
            let line = help
                .lines()
                .find(|line| line.trim_start().starts_with(positional))
                .unwrap_or_else(|| panic!("{positional} in {help}"));
            assert!(
                line.trim().len() > positional.len() + 10,
                "{positional} is described: {line:?}"
            );
        }
    }
}
