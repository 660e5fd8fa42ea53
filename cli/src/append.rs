//! `logstore append`: one entry given on the command line ([`single`]), or, without TEXT (or
//! with `-`), every line of stdin, sent in batches ([`crate::lines`] reads and batches them,
//! [`crate::batch`] sends each and settles its outcome).

use std::io::Write;

use logstore_protocol::{AppendReply, AppendRequest, DEFAULT_MAX_BATCH_ENTRIES};
use serde::Deserialize;

use crate::client::{ClientError, Connection, Outcome};
use crate::lines::Format;
use crate::{to_json, to_string, CliError};

/// Entries per batch message when reading stdin without `--batch`.
pub const DEFAULT_BATCH: u16 = 100;

/// The arguments of `logstore append`.
#[derive(Debug, clap::Args)]
pub struct AppendArgs {
    /// The object whose log the entries join (an unsigned 64-bit integer).
    pub id: u64,
    /// The entry's text. Omitted, or `-`: read the entries from stdin instead, one per line
    /// (empty lines are skipped), sent in batches (--batch) as they come.
    pub text: Option<String>,
    /// Idempotency key: sending the same key again stores nothing new and answers with
    /// the original seq. Without it, one is made up (`cli-…`), so the outcome can be
    /// matched and a retry of a timed-out append cannot store it twice. Reading stdin, it is
    /// a prefix: line N is keyed KEY-N (unless a --jsonl line has its own key), so running
    /// the same input again with the same --key stores nothing twice.
    #[arg(long)]
    pub key: Option<String>,
    /// Store only if the log's last seq is N (0: the log is empty); else exit 3. One entry
    /// only (from stdin: `expected_seq` in --jsonl lines).
    #[arg(long, value_name = "N")]
    pub expect_seq: Option<u64>,
    /// With JetStream intake, return once the stream has queued the append (print its
    /// message number) instead of waiting for the workers to store or refuse it. Sends no
    /// made-up key and subscribes to nothing. One entry only.
    #[arg(long)]
    pub no_wait: bool,
    /// Reading stdin: entries per batch message, 1 to 1000 (MAX_BATCH_ENTRIES) [default: 100].
    /// A batch also goes out when stdin has nothing more for a moment (so `tail -f | logstore
    /// append ID` stores each line at once), when the next entry would not fit in one NATS
    /// message, and at the end of input.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=DEFAULT_MAX_BATCH_ENTRIES as i64))]
    pub batch: Option<u16>,
    /// Reading stdin: each line is a JSON object `{"log":"…","key":"…","expected_seq":N}`
    /// (`key` and `expected_seq` optional) instead of the entry's text. A line that is not
    /// stops the run with exit code 2, naming the line, before anything of its batch is sent.
    #[arg(long)]
    pub jsonl: bool,
}

impl AppendArgs {
    /// Entries come from stdin: TEXT omitted, or `-`.
    pub fn reads_stdin(&self) -> bool {
        matches!(self.text.as_deref(), None | Some("-"))
    }

    /// The options that fit together, checked before connecting.
    pub fn check(&self) -> Result<(), CliError> {
        let usage = |text: &str| Err(CliError::Usage(text.to_string()));
        if self.reads_stdin() {
            if self.expect_seq.is_some() {
                return usage(
                    "--expect-seq is for one entry given as TEXT; reading stdin, give each line's \
                     expected_seq with --jsonl",
                );
            }
            if self.no_wait {
                return usage("--no-wait is for one entry given as TEXT, not for stdin");
            }
        } else if self.batch.is_some() || self.jsonl {
            return usage("--batch and --jsonl read stdin: leave TEXT out (or give -)");
        }
        Ok(())
    }
}

/// Run `logstore append` as `args` say.
pub async fn append(
    connection: &Connection,
    out: &mut dyn Write,
    json: bool,
    args: AppendArgs,
) -> Result<(), CliError> {
    if args.reads_stdin() {
        let format = if args.jsonl {
            Format::JsonLines
        } else {
            Format::Text
        };
        let batch = usize::from(args.batch.unwrap_or(DEFAULT_BATCH));
        return crate::batch::from_stdin(connection, out, json, args.id, args.key, format, batch)
            .await;
    }
    let request = AppendRequest {
        id: args.id,
        log: args.text.unwrap_or_default(),
        key: args.key,
        expected_seq: args.expect_seq,
    };
    single(connection, out, json, request, !args.no_wait).await
}

/// What an append request is answered with: the worker's reply (core intake), or the stream's
/// acknowledgement (JetStream intake: queued safely, stored shortly after).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AppendAnswer {
    Stored(AppendReply),
    Queued {
        stream: String,
        seq: u64,
        #[serde(default)]
        duplicate: bool,
    },
}

/// Append, and print what became of it: the stored seq and ts, or the refusal as an error.
/// It goes to the logs subject, or on JetStream intake with partitions to the object's own
/// lane `<logs>.<id>` ([`Connection::append_subject`]).
/// With core intake the worker answers the request. With JetStream intake the stream answers
/// (queued), and unless `wait` is off the outcome comes from the object's events, subscribed
/// before publishing: `appended.<id>` carrying this append's key, or `rejected.<id>` carrying
/// its key or stream sequence; a made-up key is sent when none was given, so there always is
/// one to match (and to retry with). Without `wait`, the old answer: queued as message N.
async fn single(
    connection: &Connection,
    out: &mut dyn Write,
    json: bool,
    mut request: AppendRequest,
    wait: bool,
) -> Result<(), CliError> {
    let id = request.id;
    // The lane before the outcome subscriptions: both are set before the append goes out.
    let subject = connection.append_subject(id).await;
    let outcomes = if wait {
        if request.key.is_none() {
            request.key = Some(made_up_key(connection));
        }
        Some(connection.guarded(connection.watch_outcomes(id)).await?)
    } else {
        None
    };
    let expected_seq = request.expected_seq;
    let key = request.key.clone();
    let answer: AppendAnswer = connection.request(&subject, to_json(&request)?).await?;
    let (stream, seq, duplicate) = match answer {
        AppendAnswer::Stored(reply) => return print_stored(out, json, &reply),
        AppendAnswer::Queued {
            stream,
            seq,
            duplicate,
        } => (stream, seq, duplicate),
    };
    if let (Some(mut outcomes), Some(key)) = (outcomes, key) {
        let waited = connection.timeout;
        let outcome = connection
            .guarded(async { Ok(outcomes.wait(&key, seq, waited).await) })
            .await?;
        return match outcome {
            Outcome::Stored(reply) => print_stored(out, json, &AppendReply { key: None, ..reply }),
            Outcome::Rejected(event) => Err(ClientError::Service(event.error).into()),
            Outcome::Unknown => Err(ClientError::Unconfirmed {
                id,
                stream,
                seq,
                key,
                waited,
            }
            .into()),
        };
    }
    if json {
        let ack = serde_json::json!({ "stream": stream, "seq": seq, "duplicate": duplicate });
        writeln!(out, "{ack}")?;
    } else {
        writeln!(
            out,
            "queued in stream {stream} as message {seq}; the workers store it shortly \
             (follow it with `logstore tail {id} -f`)"
        )?;
    }
    if expected_seq.is_some() {
        eprintln!(
            "logstore: with --no-wait the outcome of --expect-seq is not reported back; check \
             with `logstore stats {id}`"
        );
    }
    Ok(())
}

/// A stored append as core intake answers it: `SEQ TS`, or its JSON.
pub(crate) fn print_stored(
    out: &mut dyn Write,
    json: bool,
    reply: &AppendReply,
) -> Result<(), CliError> {
    if json {
        writeln!(out, "{}", to_string(reply)?)?;
    } else {
        let duplicate = if reply.duplicate {
            " (duplicate: stored before)"
        } else {
            ""
        };
        writeln!(out, "{} {}{duplicate}", reply.seq, reply.ts)?;
    }
    Ok(())
}

/// A key no other append has: `cli-` and the unique part of a fresh inbox name (a NUID, 22
/// random characters).
pub(crate) fn made_up_key(connection: &Connection) -> String {
    let inbox = connection.client.new_inbox();
    let unique = inbox.rsplit('.').next().unwrap_or(&inbox);
    format!("cli-{unique}")
}
