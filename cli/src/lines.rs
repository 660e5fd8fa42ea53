//! stdin, read line by line into batches of entries, for `logstore append ID` without TEXT.
//!
//! A thread reads stdin (a blocking read cannot be cancelled, and the process may end while
//! one waits on a terminal or a `tail -f`) and hands each line over a bounded channel to
//! [`Batcher::next`], which turns lines into entries and groups them: a batch is complete
//! with `size` entries, when the next entry would not fit in one NATS message, when stdin has
//! given nothing for [`IDLE`] (or [`MOST_DELAY`] after the batch's first line, whichever comes
//! first), and at the end of input. Memory holds at most [`QUEUED_LINES`] lines plus one batch,
//! each line at most one NATS message long, whatever the length of the input.
//!
//! Lines are numbered from 1, empty ones included (as `nl -ba` numbers them): an entry made up
//! without its own key is keyed `<prefix>-<line>`, so the same input sent again with the same
//! prefix stores nothing twice. Empty lines are skipped (no entry); a trailing `\r` is not
//! part of the line.

use std::io::BufRead;
use std::time::Duration;

use logstore_protocol::AppendRequest;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::CliError;

/// A partial batch goes out once stdin has given nothing more for this long…
pub const IDLE: Duration = Duration::from_millis(100);
/// …or this long after its first line was read, whichever comes first.
pub const MOST_DELAY: Duration = Duration::from_secs(1);
/// Lines read ahead of the batch being built (the channel between the reading thread and
/// [`Batcher`]).
pub const QUEUED_LINES: usize = 64;

/// What each line of stdin is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The entry's text (UTF-8).
    Text,
    /// A JSON object `{"log":"…","key":"…","expected_seq":N}`, `key` and `expected_seq`
    /// optional (`--jsonl`).
    JsonLines,
}

/// One `--jsonl` line. Any other field is refused (a misspelt `key` must not be dropped
/// silently: the entry would lose its idempotency).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    log: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    expected_seq: Option<u64>,
}

/// One entry of a batch and the line of stdin it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub line: u64,
    pub request: AppendRequest,
}

/// Entries to send in one message, in input order.
#[derive(Debug, Default)]
pub struct Batch {
    pub entries: Vec<Entry>,
    /// The length of the JSON array of the entries.
    bytes: usize,
}

impl Batch {
    /// The first and last line numbers of its entries.
    pub fn lines(&self) -> (u64, u64) {
        let line = |entry: Option<&Entry>| entry.map_or(0, |e| e.line);
        (line(self.entries.first()), line(self.entries.last()))
    }

    fn push(&mut self, entry: Entry, size: usize) {
        self.bytes += if self.entries.is_empty() { 2 } else { 1 } + size;
        self.entries.push(entry);
    }
}

/// How lines become entries and batches.
#[derive(Debug, Clone)]
pub struct Settings {
    pub format: Format,
    /// The object every entry goes to.
    pub id: u64,
    /// Line N without a key of its own is keyed `<prefix>-N`.
    pub prefix: String,
    /// Most entries per batch.
    pub size: usize,
    /// Most bytes per batch message (the NATS server's max_payload).
    pub max_bytes: usize,
}

/// What the reading thread hands over.
enum Read {
    Line { number: u64, bytes: Vec<u8> },
    TooLong { number: u64 },
    Failed(std::io::Error),
}

/// Batches of entries from a reader (stdin), read ahead by a thread of its own.
pub struct Batcher {
    lines: mpsc::Receiver<Read>,
    /// The reading thread. It ends at the end of input, at a read error, or when it finds the
    /// channel closed (this batcher dropped) after its next line; joined when it has ended.
    reader: Option<std::thread::JoinHandle<()>>,
    settings: Settings,
    /// The batch being gathered, and when its first line came: kept here between calls, so
    /// that [`Batcher::next`] can be cancelled without losing a line.
    building: Batch,
    first_at: Instant,
    /// An entry that did not fit in the last batch: the first of the next.
    carry: Option<(Entry, usize)>,
    /// The end of input was read.
    ended: bool,
}

impl Batcher {
    /// Start reading `input` (stdin, or anything else that reads) on a thread of its own.
    pub fn spawn(
        input: impl std::io::Read + Send + 'static,
        settings: Settings,
    ) -> Result<Batcher, CliError> {
        let (sender, lines) = mpsc::channel(QUEUED_LINES);
        let max_line = settings.max_bytes;
        let reader = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || read_lines(std::io::BufReader::new(input), &sender, max_line))
            .map_err(CliError::Input)?;
        Ok(Batcher {
            lines,
            reader: Some(reader),
            settings,
            building: Batch::default(),
            first_at: Instant::now(),
            carry: None,
            ended: false,
        })
    }

    /// The next batch: `None` at the end of input. A line that cannot be an entry is an
    /// error naming it, and nothing of the batch it would have joined is returned. Cancel
    /// safe: lines read by a call that is dropped go into the next batch.
    pub async fn next(&mut self) -> Result<Option<Batch>, CliError> {
        if let Some((entry, size)) = self.carry.take() {
            self.first_at = Instant::now();
            self.building.push(entry, size);
        }
        while self.building.entries.len() < self.settings.size && !self.ended {
            let read = if self.building.entries.is_empty() {
                self.lines.recv().await
            } else {
                let deadline = (Instant::now() + IDLE).min(self.first_at + MOST_DELAY);
                match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                    Ok(read) => read,
                    // stdin is idle: what there is goes now.
                    Err(_) => break,
                }
            };
            let (number, bytes) = match read {
                None => {
                    self.ended = true;
                    self.join_reader();
                    break;
                }
                Some(Read::Line { number, bytes }) => (number, bytes),
                Some(Read::TooLong { number }) => {
                    return Err(at_line(
                        number,
                        format!(
                            "longer than {} bytes, the NATS server's max_payload: it cannot be \
                             sent",
                            self.settings.max_bytes
                        ),
                    ))
                }
                Some(Read::Failed(e)) => return Err(CliError::Input(e)),
            };
            let Some(entry) = self.entry(number, bytes)? else {
                continue;
            };
            let size = encoded_len(&entry.request)?;
            if size + 2 > self.settings.max_bytes {
                return Err(at_line(
                    number,
                    format!(
                        "the entry is {size} bytes as JSON, more than fit in one NATS message \
                         ({} bytes, the server's max_payload)",
                        self.settings.max_bytes
                    ),
                ));
            }
            let batch = &mut self.building;
            if !batch.entries.is_empty() && batch.bytes + 1 + size > self.settings.max_bytes {
                self.carry = Some((entry, size));
                break;
            }
            if batch.entries.is_empty() {
                self.first_at = Instant::now();
            }
            batch.push(entry, size);
        }
        let batch = std::mem::take(&mut self.building);
        Ok((!batch.entries.is_empty()).then_some(batch))
    }

    /// Line `number` as an entry; `None` for a line to skip (empty).
    fn entry(&self, number: u64, bytes: Vec<u8>) -> Result<Option<Entry>, CliError> {
        let settings = &self.settings;
        let (log, key, expected_seq) = match settings.format {
            Format::Text if bytes.is_empty() => return Ok(None),
            Format::Text => {
                let text = String::from_utf8(bytes).map_err(|e| {
                    let at = e.utf8_error().valid_up_to() + 1;
                    at_line(number, format!("is not UTF-8 (byte {at})"))
                })?;
                (text, None, None)
            }
            Format::JsonLines if bytes.iter().all(u8::is_ascii_whitespace) => return Ok(None),
            Format::JsonLines => {
                let line: JsonLine = serde_json::from_slice(&bytes).map_err(|e| {
                    let text = e.to_string();
                    let why = text.rsplit_once(" at line ").map_or(&*text, |(why, _)| why);
                    at_line(
                        number,
                        format!(
                            "is not an entry {{\"log\":\"…\",\"key\":\"…\",\"expected_seq\":N}}: \
                             {why} at column {}",
                            e.column()
                        ),
                    )
                })?;
                (line.log, line.key, line.expected_seq)
            }
        };
        if log.contains('\0') || key.as_deref().is_some_and(|k| k.contains('\0')) {
            return Err(at_line(
                number,
                "contains a NUL character, which cannot be stored".to_string(),
            ));
        }
        let key = key.unwrap_or_else(|| format!("{}-{number}", settings.prefix));
        Ok(Some(Entry {
            line: number,
            request: AppendRequest {
                id: settings.id,
                log,
                key: Some(key),
                expected_seq,
            },
        }))
    }

    fn join_reader(&mut self) {
        if let Some(reader) = self.reader.take() {
            // It has ended (the channel closed): this only collects it. It does not panic.
            let _ = reader.join();
        }
    }
}

/// An input line at fault: `line N of stdin: …`, exit code 2.
pub fn at_line(number: u64, problem: String) -> CliError {
    CliError::At {
        at: format!("line {number} of stdin"),
        source: Box::new(CliError::Usage(problem)),
    }
}

fn encoded_len(request: &AppendRequest) -> Result<usize, CliError> {
    serde_json::to_vec(request)
        .map(|body| body.len())
        .map_err(|e| CliError::Output(std::io::Error::other(e)))
}

/// The reading thread: each line of `input` (without `\n` or `\r\n`) to `lines`, numbered from
/// 1, until the end of input, a read error, a line over `max_line` bytes, or `lines` closed.
fn read_lines(mut input: impl BufRead, lines: &mpsc::Sender<Read>, max_line: usize) {
    let mut number = 0;
    loop {
        let mut bytes = Vec::new();
        let limit = u64::try_from(max_line)
            .unwrap_or(u64::MAX)
            .saturating_add(2);
        let read = std::io::Read::take(input.by_ref(), limit).read_until(b'\n', &mut bytes);
        let read = match read {
            Ok(0) => return,
            Ok(_) => {
                number += 1;
                let ended = bytes.last() == Some(&b'\n');
                if ended {
                    bytes.pop();
                }
                if bytes.last() == Some(&b'\r') {
                    bytes.pop();
                }
                if bytes.len() > max_line {
                    Read::TooLong { number }
                } else {
                    Read::Line { number, bytes }
                }
            }
            Err(e) => Read::Failed(e),
        };
        let last = !matches!(read, Read::Line { .. });
        if lines.blocking_send(read).is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(format: Format, size: usize, max_bytes: usize) -> Settings {
        Settings {
            format,
            id: 42,
            prefix: "run".into(),
            size,
            max_bytes,
        }
    }

    async fn batches(input: &str, settings: Settings) -> Result<Vec<Vec<Entry>>, CliError> {
        let mut batcher = Batcher::spawn(std::io::Cursor::new(input.to_string()), settings)?;
        let mut all = Vec::new();
        while let Some(batch) = batcher.next().await? {
            all.push(batch.entries);
        }
        Ok(all)
    }

    fn texts(batches: &[Vec<Entry>]) -> Vec<Vec<(u64, &str, &str)>> {
        batches
            .iter()
            .map(|batch| {
                batch
                    .iter()
                    .map(|e| {
                        let key = e.request.key.as_deref().unwrap_or("");
                        (e.line, e.request.log.as_str(), key)
                    })
                    .collect()
            })
            .collect()
    }

    #[tokio::test]
    async fn lines_become_keyed_entries_in_batches() {
        let input = "a\r\nb\n\nc\nd\ne";
        let all = batches(input, settings(Format::Text, 2, 1 << 20))
            .await
            .unwrap();
        assert_eq!(
            texts(&all),
            [
                vec![(1, "a", "run-1"), (2, "b", "run-2")],
                vec![(4, "c", "run-4"), (5, "d", "run-5")],
                vec![(6, "e", "run-6")],
            ],
            "empty line 3 skipped, \\r stripped, the last line needs no newline"
        );
        assert!(all.iter().flatten().all(|e| e.request.id == 42));
    }

    #[tokio::test]
    async fn json_lines_carry_their_own_key_and_expected_seq() {
        let input = "{\"log\":\"x\",\"key\":\"k1\",\"expected_seq\":0}\n  \n{\"log\":\"y\"}\n";
        let all = batches(input, settings(Format::JsonLines, 100, 1 << 20))
            .await
            .unwrap();
        assert_eq!(texts(&all), [vec![(1, "x", "k1"), (3, "y", "run-3")]]);
        assert_eq!(all[0][0].request.expected_seq, Some(0));
    }

    #[tokio::test]
    async fn a_bad_line_is_named_and_its_batch_not_returned() {
        for (format, input, line, says) in [
            (
                Format::JsonLines,
                &b"{\"log\":\"a\"}\n{\"log\":\"b\"}\n{\"log\":1}\n"[..],
                3,
                "invalid type",
            ),
            (
                Format::JsonLines,
                b"{\"log\":\"a\"}\nnot json\n",
                2,
                "expected",
            ),
            (
                Format::JsonLines,
                b"{\"log\":\"a\",\"kye\":\"k\"}\n",
                1,
                "unknown field `kye`",
            ),
            (Format::Text, b"a\nb\xffc\n", 2, "is not UTF-8 (byte 2)"),
            (Format::Text, b"a\nb\0\n", 2, "NUL"),
        ] {
            let mut batcher = Batcher::spawn(
                std::io::Cursor::new(input.to_vec()),
                settings(format, 2, 1 << 20),
            )
            .unwrap();
            let mut good = Vec::new();
            let error = loop {
                match batcher.next().await {
                    Ok(Some(batch)) => good.push(batch.entries.len()),
                    Ok(None) => panic!("{input:?} passed"),
                    Err(e) => break e,
                }
            };
            let text = logstore_protocol::chain::Chain(&error).to_string();
            assert_eq!(error.exit_code(), 2, "{text}");
            assert!(
                text.starts_with(&format!("line {line} of stdin: ")),
                "{text}"
            );
            assert!(text.contains(says), "{input:?}: {text}");
            // Batches of 2: only a batch complete before the bad line came out.
            assert_eq!(good.len(), (line as usize - 1) / 2, "{input:?}");
        }
    }

    #[tokio::test]
    async fn batches_fit_in_one_message() {
        // Each entry {"id":42,"log":"xxxxxxxxxx","key":"run-N"} is 44 bytes: two fit in 100.
        let input = "xxxxxxxxxx\n".repeat(5);
        let all = batches(&input, settings(Format::Text, 100, 100))
            .await
            .unwrap();
        let sizes: Vec<usize> = all.iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 2, 1]);
        for batch in &all {
            let requests: Vec<&AppendRequest> = batch.iter().map(|e| &e.request).collect();
            assert!(serde_json::to_vec(&requests).unwrap().len() <= 100);
        }
        let error = batches(&"x".repeat(101), settings(Format::Text, 100, 100))
            .await
            .unwrap_err();
        assert!(error.to_string().starts_with("line 1 of stdin"), "{error}");
    }

    /// A call cancelled while it waits for more lines loses none: they are in the next batch.
    #[tokio::test]
    async fn a_cancelled_call_loses_no_line() {
        use std::io::Write;
        let (reader, mut writer) = std::io::pipe().unwrap();
        let mut batcher = Batcher::spawn(reader, settings(Format::Text, 100, 1 << 20)).unwrap();
        writer.write_all(b"one\n").unwrap();
        // Long enough to read "one", shorter than IDLE: cancelled while waiting for more.
        let cancelled = tokio::time::timeout(IDLE / 4, batcher.next()).await;
        assert!(cancelled.is_err(), "{cancelled:?}");
        writer.write_all(b"two\n").unwrap();
        drop(writer);
        let batch = batcher.next().await.unwrap().unwrap();
        let logs: Vec<&str> = batch
            .entries
            .iter()
            .map(|e| e.request.log.as_str())
            .collect();
        assert_eq!(logs, ["one", "two"]);
        assert!(batcher.next().await.unwrap().is_none());
    }

    /// A partial batch goes out when stdin pauses, without waiting for more (`tail -f`).
    #[tokio::test]
    async fn an_idle_stdin_sends_what_there_is() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let mut batcher = Batcher::spawn(reader, settings(Format::Text, 100, 1 << 20)).unwrap();
        use std::io::Write;
        writer.write_all(b"one\ntwo\n").unwrap();
        let started = std::time::Instant::now();
        let batch = tokio::time::timeout(Duration::from_secs(5), batcher.next())
            .await
            .expect("a partial batch within the idle time")
            .unwrap()
            .unwrap();
        assert_eq!(batch.entries.len(), 2);
        assert!(started.elapsed() < MOST_DELAY + Duration::from_millis(500));
        drop(writer);
        assert!(batcher.next().await.unwrap().is_none());
    }
}
