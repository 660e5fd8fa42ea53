//! `logstore dead-letters [-f]`: the messages the workers refused, with why, for the operator
//! (`admin` in the shipped NATS config: `dead_letter` is a subject clients may not read).
//!
//! The workers copy every refused message to the dead-letter subject (a core NATS message) and
//! keep the copies in a JetStream stream with limits (DEAD_LETTERS_STREAM, `DEAD_LETTERS` by
//! default). The last `-n` of the stream are printed, oldest first, read with an ordered
//! consumer of the stream (nothing is acknowledged or removed); with `-f` the same consumer then
//! prints each new one as it is stored, until interrupted. Where the stream does not exist (a
//! server without JetStream, DEAD_LETTERS_STREAM=off), nothing was kept: `-f` then follows the
//! subject itself, from now on.

use std::io::Write;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use futures::StreamExt;
use logstore_protocol::{
    ErrorBody, ErrorCode, Timestamp, DEAD_LETTER_CODE_HEADER, DEAD_LETTER_REASON_HEADER,
    DEAD_LETTER_SUBJECT_HEADER, DEAD_LETTER_TRUNCATED_HEADER,
};
use serde::Serialize;

use crate::client::{ClientError, Connection};
use crate::CliError;

/// What to print and where the dead letters are (`logstore dead-letters`'s arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Follow: keep printing new dead letters.
    #[arg(short, long)]
    pub follow: bool,
    /// How many of the kept dead letters to print first.
    #[arg(short = 'n', long, default_value_t = 20, value_name = "N")]
    pub lines: u64,
    /// The stream the workers keep dead letters in (their DEAD_LETTERS_STREAM).
    #[arg(long, env = "DEAD_LETTERS_STREAM", default_value = "DEAD_LETTERS")]
    pub stream: String,
    /// The dead-letter subject (the workers' NATS_DEAD_LETTER_TOPIC).
    #[arg(
        long = "dead-letter-subject",
        env = "NATS_DEAD_LETTER_TOPIC",
        default_value = "dead_letter"
    )]
    pub subject: String,
}

/// One dead letter as printed (`--json`: one object a line).
#[derive(Debug, Serialize, PartialEq)]
pub struct DeadLetter {
    /// Its sequence in the stream (none when followed live without a stream).
    pub seq: Option<u64>,
    /// When it was refused (stored in the stream, or received live).
    pub time: String,
    /// `Logstore-Error-Code`.
    pub code: String,
    /// `Logstore-Error`.
    pub error: String,
    /// `Logstore-Subject`: where the refused message was published.
    pub subject: String,
    /// `Logstore-Truncated`: the refused message's size when the copy holds only its start.
    pub truncated: Option<u64>,
    /// Every header of the copy (the ones above, and `Logstore-Stream`,
    /// `Logstore-Stream-Sequence`, `Logstore-Msg-Id` when the refused message had them).
    pub headers: std::collections::BTreeMap<String, String>,
    /// The refused message's body (invalid UTF-8 replaced).
    pub body: String,
}

impl DeadLetter {
    fn new(seq: Option<u64>, time: Timestamp, headers: Option<&HeaderMap>, body: &[u8]) -> Self {
        let mut all = std::collections::BTreeMap::new();
        for (name, values) in headers.into_iter().flat_map(|h| h.iter()) {
            let value: Vec<&str> = values.iter().map(|v| v.as_str()).collect();
            all.insert(name.to_string(), value.join(", "));
        }
        let header = |name: &str| all.get(name).cloned().unwrap_or_default();
        DeadLetter {
            seq,
            time: time.to_string(),
            code: header(DEAD_LETTER_CODE_HEADER),
            error: header(DEAD_LETTER_REASON_HEADER),
            subject: header(DEAD_LETTER_SUBJECT_HEADER),
            truncated: all
                .get(DEAD_LETTER_TRUNCATED_HEADER)
                .and_then(|t| t.parse().ok()),
            body: String::from_utf8_lossy(body).into_owned(),
            headers: all,
        }
    }

    /// `SEQ TIME CODE SUBJECT: ERROR`, then the body on a line of its own, indented, with
    /// control characters escaped; or the JSON object.
    fn print(&self, out: &mut dyn Write, json: bool) -> std::io::Result<()> {
        if json {
            let line = serde_json::to_string(self).map_err(std::io::Error::other)?;
            return writeln!(out, "{line}");
        }
        let seq = self.seq.map_or("-".to_string(), |s| s.to_string());
        write!(
            out,
            "{seq} {} {} {}: {}",
            self.time,
            escaped(&self.code),
            escaped(&self.subject),
            escaped(&self.error)
        )?;
        if let Some(size) = self.truncated {
            write!(out, " (truncated: {size} bytes originally)")?;
        }
        writeln!(out)?;
        writeln!(out, "    {}", escaped(&self.body))
    }
}

fn escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Print the last `options.lines` dead letters, and with `follow` every new one until Ctrl-C.
pub async fn dead_letters(
    connection: &Connection,
    out: &mut dyn Write,
    json: bool,
    options: &Options,
) -> Result<(), CliError> {
    let context = jetstream::new(connection.client.clone());
    let found = connection.guarded(kept(&context, &options.stream)).await?;
    match found {
        Some(stream) => connection
            .guarded(from_stream(stream, out, json, options))
            .await
            .map_err(CliError::from),
        None if options.follow => {
            eprintln!(
                "logstore: no stream {} keeps dead letters; following {} from now on",
                options.stream, options.subject
            );
            connection
                .guarded(live(connection, out, json, &options.subject))
                .await
                .map_err(CliError::from)
        }
        None => Err(ClientError::Service(ErrorBody::new(
            ErrorCode::Unavailable,
            format!(
                "no stream {} keeps dead letters (the workers' DEAD_LETTERS_STREAM is off, or \
                 their NATS server has no JetStream); `logstore dead-letters -f` follows {} \
                 from now on",
                options.stream, options.subject
            ),
        ))
        .into()),
    }
}

/// The dead-letter stream, None when there is none (or no JetStream on the server).
async fn kept(
    context: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Stream>, ClientError> {
    use jetstream::context::GetStreamErrorKind;
    use jetstream::ErrorCode as Code;
    match context.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js) if js.error_code() == Code::STREAM_NOT_FOUND => {
                Ok(None)
            }
            GetStreamErrorKind::JetStream(js)
                if js.error_code() == Code::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT =>
            {
                Err(ClientError::Denied {
                    violation: "this user's NATS account has no JetStream".to_string(),
                    hint: " (dead letters are the operator's: `admin` in the shipped NATS config)"
                        .to_string(),
                })
            }
            GetStreamErrorKind::JetStream(js) if js.error_code() == Code::JETSTREAM_NOT_ENABLED => {
                Ok(None)
            }
            // No JetStream on the server at all: nobody answers its API.
            GetStreamErrorKind::Request if no_responders(&e) => Ok(None),
            _ => Err(ClientError::Nats(e.into())),
        },
    }
}

/// Whether `e` is the JetStream API's "no responders": the server has no JetStream.
fn no_responders(e: &jetstream::context::GetStreamError) -> bool {
    use jetstream::context::{RequestError, RequestErrorKind};
    std::error::Error::source(e)
        .and_then(|source| source.downcast_ref::<RequestError>())
        .is_some_and(|request| request.kind() == RequestErrorKind::NoResponders)
}

/// The last `options.lines` of `stream`, then (`follow`) every new one.
async fn from_stream(
    stream: stream::Stream,
    out: &mut dyn Write,
    json: bool,
    options: &Options,
) -> Result<(), ClientError> {
    let nats = |e: &dyn std::fmt::Display| ClientError::Nats(e.to_string().into());
    let state = stream.cached_info().state.clone();
    let start = match options.lines {
        0 => state.last_sequence + 1,
        n => state
            .first_sequence
            .max(state.last_sequence.saturating_sub(n - 1)),
    };
    let ordered = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: options.subject.clone(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start.max(1),
            },
            ..Default::default()
        })
        .await
        .map_err(|e| nats(&e))?;
    let mut waiting = ordered.cached_info().num_pending;
    if waiting == 0 && !options.follow {
        return Ok(());
    }
    let mut messages = ordered.messages().await.map_err(|e| nats(&e))?;
    if options.follow {
        eprintln!(
            "logstore: following the dead letters in stream {} (Ctrl-C to stop)",
            options.stream
        );
    }
    loop {
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            message = messages.next() => message,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(e)) => return Err(nats(&e)),
            None => return Err(ClientError::Nats("the dead-letter consumer ended".into())),
        };
        let (seq, time, pending) = match message.info() {
            Ok(info) => (
                Some(info.stream_sequence),
                published(info.published.unix_timestamp_nanos()),
                info.pending,
            ),
            Err(_) => (
                None,
                Timestamp::from_system_time(std::time::SystemTime::now()),
                0,
            ),
        };
        DeadLetter::new(seq, time, message.headers.as_ref(), &message.payload)
            .print(out, json)
            .and_then(|()| out.flush())
            .map_err(|e| ClientError::Nats(e.into()))?;
        waiting = pending;
        if waiting == 0 && !options.follow {
            return Ok(());
        }
    }
}

/// When the stream stored a message (`nanos` since the Unix epoch).
fn published(nanos: i128) -> Timestamp {
    let micros = nanos / 1_000;
    Timestamp::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}

/// Every dead letter published on `subject` from now on (no stream keeps them).
async fn live(
    connection: &Connection,
    out: &mut dyn Write,
    json: bool,
    subject: &str,
) -> Result<(), ClientError> {
    let nats = |e: &dyn std::fmt::Display| ClientError::Nats(e.to_string().into());
    let mut letters = connection
        .client
        .subscribe(subject.to_string())
        .await
        .map_err(|e| nats(&e))?;
    connection.client.flush().await.map_err(|e| nats(&e))?;
    loop {
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            message = letters.next() => message,
        };
        let Some(message) = message else {
            return Err(ClientError::Nats(
                "the subscription ended (connection closed)".into(),
            ));
        };
        let now = Timestamp::from_system_time(std::time::SystemTime::now());
        DeadLetter::new(None, now, message.headers.as_ref(), &message.payload)
            .print(out, json)
            .and_then(|()| out.flush())
            .map_err(|e| ClientError::Nats(e.into()))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commands_parse() {
        use clap::Parser;
        let args = crate::Args::try_parse_from([
            "logstore",
            "dead-letters",
            "-f",
            "-n",
            "0",
            "--stream",
            "DL",
        ])
        .unwrap();
        match args.command {
            crate::Command::DeadLetters(options) => {
                assert!(options.follow);
                assert_eq!((options.lines, options.stream.as_str()), (0, "DL"));
            }
            other => panic!("{other:?}"),
        }
        let args = crate::Args::try_parse_from(["logstore", "status", "--json"]).unwrap();
        assert!(args.json && matches!(args.command, crate::Command::Status));
    }

    #[test]
    fn a_dead_letter_prints_its_reason_and_body() {
        let mut headers = HeaderMap::new();
        headers.insert(DEAD_LETTER_CODE_HEADER, "invalid_request");
        headers.insert(DEAD_LETTER_REASON_HEADER, "missing field `id`");
        headers.insert(DEAD_LETTER_SUBJECT_HEADER, "logs");
        headers.insert(DEAD_LETTER_TRUNCATED_HEADER, "2000000");
        let letter = DeadLetter::new(
            Some(7),
            Timestamp::from_micros(0),
            Some(&headers),
            b"{\"log\":\"a\nb\"}",
        );
        assert_eq!(letter.truncated, Some(2_000_000));
        let mut out = Vec::new();
        letter.print(&mut out, false).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "7 1970-01-01T00:00:00.000000Z invalid_request logs: missing field `id` \
             (truncated: 2000000 bytes originally)\n    {\"log\":\"a\\nb\"}\n"
        );
        let mut out = Vec::new();
        letter.print(&mut out, true).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["code"], "invalid_request");
        assert_eq!(json["headers"]["Logstore-Subject"], "logs");
        assert_eq!(json["seq"], 7);
    }
}
