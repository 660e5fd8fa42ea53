//! The logstore load generator as a library: `main.rs` parses [`Args`] and calls [`run`];
//! tests call [`run`] and [`verify()`] directly.
//!
//! A run sends appends (each with a unique idempotency key, also the start of its log text) and
//! optionally queries at a fixed rate or as fast as possible, retries unacknowledged appends with
//! the same key, measures latency, and with `--verify` reads every touched object back to prove
//! that every acknowledged append is stored exactly once, in order.
//!
//! # Layout
//! - [`args`]: flags and env twins, validated once into [`Settings`].
//! - [`pace`]: when each operation of a fixed-rate run is due (no drift).
//! - [`workload`]: the seeded sequence of operations, keys and log text.
//! - [`client`]: one append message attempt (one append or a batch, core or JetStream) or one
//!   query over NATS.
//! - [`intake`]: which intake the workers run and which lanes to publish on, learnt at start
//!   from their service info (or checked against `--jetstream` when it is given).
//! - [`stats`]: counters, HDR histograms, the [`Summary`] and `--report` JSON.
//! - `progress`: a bar on a terminal, plain lines otherwise.
//! - [`mod@verify`]: reading back and checking ([`verify::check`] is pure).
//! - [`refusals`]: with `--verify`, counting the run's appends the workers refused
//!   (`rejected.<id>` events).

pub mod args;
pub mod client;
pub mod intake;
pub mod pace;
mod progress;
pub mod refusals;
pub mod stats;
pub mod verify;
pub mod workload;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_nats::Subject;
use logstore_protocol::client::{Answer, AnswerError};
use logstore_protocol::nats::{ConnectFailure, NatsAccess};
use logstore_protocol::partition::{batch_subject, object_subject, partition};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use args::{Args, ConfigError, Mode, Pace, Settings, Stop};
pub use stats::Summary;
pub use verify::{Acked, Problem, Verdict};

use workload::{Append, Op, Workload};

/// Entries asked for by each load query (the brief's `{"id":…,"limit":100}`).
const QUERY_LIMIT: u64 = 100;
/// After SIGINT, how much longer than one attempt's timeout in-flight operations may take.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Why a run could not start or finish (problems found by verify are not errors: they are the
/// [`Verdict`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// NATS could not be reached, or refused the login or the TLS handshake.
    #[error(transparent)]
    Connect(#[from] ConnectFailure),
    #[error("cannot create latency histograms: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    #[error("cannot encode the report: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot write the report to {path}: {source}")]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("whole-log read failed: {0}")]
    Read(String),
    /// The workers run the other intake than loadgen's mode expects (found at start, or by a
    /// core request answered with a PubAck during the run). The message names the flag to use.
    #[error("{0}")]
    IntakeMismatch(String),
    #[error("stopped while waiting for the workers' JetStream stream, before the first append")]
    StoppedAtStart,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Counters, latencies and (with `--verify`) the verdict.
    pub summary: Summary,
    /// Every acknowledged append (kept only with `--verify`), for [`verify()`] to check again.
    pub acked: Vec<Acked>,
    /// Every object this run sent an append to (kept only with `--verify`).
    pub touched: BTreeSet<u64>,
    /// The prefix of this run's keys: tells its entries from other writers'.
    pub run_id: String,
    pub mode: Mode,
}

impl Outcome {
    /// The run kept its promise: verify (if run) found nothing wrong and no append was given up.
    pub fn success(&self) -> bool {
        self.summary.verify.as_ref().is_none_or(|v| v.ok) && self.summary.appends.counts.failed == 0
    }
}

/// Shared by every operation task.
struct Ctx {
    /// One per `--connections`; publishes take them in turn.
    clients: Vec<async_nats::Client>,
    /// JetStream mode: one context per client, in the same order.
    jetstreams: Vec<async_nats::jetstream::Context>,
    /// Round-robin position over `clients`.
    turn: AtomicUsize,
    /// Messages are JSON arrays (`--batch` > 1), even a last one of a single entry.
    as_array: bool,
    logs: Subject,
    /// JetStream: the stream's partitions the appends are spread over by object (0: all on
    /// `logs`). Each message then holds one partition's entries ([`Batcher`]).
    partitions: u32,
    query: Subject,
    timeout: Duration,
    retries: u32,
    recorder: Arc<stats::Recorder>,
    /// Cancelled on SIGINT/SIGTERM, or when the intake turns out to be the other one: tasks
    /// finish their current attempt but retry no more, and nothing new is sent.
    stop: CancellationToken,
    /// Set (once) when a core request was answered by a JetStream PubAck: why the run stopped.
    mismatch: OnceLock<String>,
}

impl Ctx {
    /// Where a message of `appends` (one partition's, when there are partitions) is published:
    /// the logs subject; with partitions, a single append on its object's lane `<logs>.<id>`,
    /// a batch on its partition's `<logs>.p.<k>.b`.
    fn subject_of(&self, appends: &[Append]) -> Subject {
        match appends {
            [first, ..] if self.partitions > 0 => Subject::from(match self.as_array {
                false => object_subject(&self.logs, first.id),
                true => batch_subject(&self.logs, partition(first.id, self.partitions)),
            }),
            _ => self.logs.clone(),
        }
    }

    /// The next connection's index, round-robin.
    fn next_connection(&self) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed) % self.clients.len()
    }

    /// Record that the workers' intake is not loadgen's, and stop the run.
    fn intake_mismatch(&self, error: &client::AttemptError) {
        let _ = self.mismatch.set(error.to_string());
        self.stop.cancel();
    }
}

/// Run the load described by `args` until its count or duration is reached or `shutdown`
/// completes, then wait for in-flight operations, verify if asked, write the report if asked,
/// and return what happened. Progress goes to stderr; printing the summary is the caller's.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> Result<Outcome, Error> {
    let settings = args.validate()?;
    let mut clients = Vec::with_capacity(settings.connections);
    for n in 0..settings.connections {
        clients.push(connect(&settings.nats, n).await?);
    }
    let client = clients[0].clone();
    tokio::pin!(shutdown);
    // Before anything is sent: appends acknowledged by the wrong thing would make every count
    // and the verify meaningless.
    let mut settings = settings;
    tokio::select! {
        decision = intake::decide(&settings, &client) => match decision {
            Ok(decision) => {
                settings.mode = decision.mode;
                settings.partitions = decision.partitions;
            }
            Err(line) => return Err(Error::IntakeMismatch(line)),
        },
        _ = shutdown.as_mut() => return Err(Error::StoppedAtStart),
    }
    eprintln!("loadgen: {}", describe(&settings));

    let recorder = Arc::new(stats::Recorder::new(settings.verify)?);
    let jetstreams = match settings.mode {
        Mode::Core => Vec::new(),
        Mode::JetStream => clients
            .iter()
            .map(|c| {
                let mut js = async_nats::jetstream::new(c.clone());
                js.set_timeout(settings.timeout);
                js
            })
            .collect(),
    };
    let ctx = Arc::new(Ctx {
        clients: clients.clone(),
        jetstreams,
        turn: AtomicUsize::new(0),
        as_array: settings.batch > 1,
        logs: Subject::from(settings.logs_subject.as_str()),
        partitions: settings.partitions,
        query: Subject::from(settings.query_subject.as_str()),
        timeout: settings.timeout,
        retries: settings.retries,
        recorder: recorder.clone(),
        stop: CancellationToken::new(),
        mismatch: OnceLock::new(),
    });
    let progress_done = CancellationToken::new();
    let progress = tokio::spawn(progress::show(
        recorder.clone(),
        progress::Plan {
            stop: settings.stop,
            queries_only: settings.query_share >= 1.0,
            every: settings.progress_every,
        },
        progress_done.clone(),
    ));

    // Subscribed before anything is sent, so no refusal of this run goes unseen.
    let refusals = match settings.verify {
        true => {
            let prefix = workload::key_prefix(&settings.run_id);
            refusals::Watch::start(&client, &settings.rejected_prefix, prefix).await
        }
        false => None,
    };
    let started = Instant::now();
    let tasks = TaskTracker::new();
    let mut interrupted = dispatch(&settings, &ctx, &tasks, shutdown.as_mut()).await;

    // Every operation already sent finishes, retries included (each is bounded by
    // retries x timeout), unless a signal says to stop: then only the current attempts.
    tasks.close();
    if !interrupted {
        tokio::select! {
            _ = tasks.wait() => {}
            _ = shutdown.as_mut() => interrupted = true,
        }
    }
    if interrupted || ctx.stop.is_cancelled() {
        ctx.stop.cancel();
        if tokio::time::timeout(settings.timeout + DRAIN_GRACE, tasks.wait())
            .await
            .is_err()
        {
            eprintln!(
                "loadgen: {} operations still unanswered after the stop; not waiting for them",
                tasks.len()
            );
        }
    }
    let elapsed = started.elapsed();
    progress_done.cancel();
    let _ = progress.await;
    if let Some(line) = ctx.mismatch.get() {
        let _ = client.flush().await;
        return Err(Error::IntakeMismatch(line.clone()));
    }

    let (acked, touched) = recorder.take_acked();
    let mut summary = recorder.summary(&settings, elapsed, interrupted);
    if settings.verify {
        eprintln!(
            "loadgen: verifying {} acknowledged appends in {} objects",
            acked.len(),
            touched.len()
        );
        let stop = CancellationToken::new();
        let how = read_back_settings(&settings);
        let prefix = workload::key_prefix(&settings.run_id);
        let verifying = verify::read_back(&client, &how, &touched, &acked, &prefix, &stop);
        tokio::pin!(verifying);
        // A signal during verify ends the JetStream wait early: what is missing by then is
        // reported. (If the signal already came during the run, main quits on the next one.)
        let verdict = if interrupted {
            verifying.await
        } else {
            tokio::select! {
                verdict = &mut verifying => verdict,
                _ = shutdown.as_mut() => {
                    stop.cancel();
                    verifying.await
                }
            }
        };
        summary.verify = Some(verdict);
        // After the read-back, which waited for the workers to settle every acknowledged
        // append: their refusals have been announced by now.
        if let Some(watch) = refusals {
            summary.rejected = Some(watch.finish(&client).await);
        }
    }
    if let Some(path) = &settings.report {
        let json = serde_json::to_vec_pretty(&summary)?;
        // Small and written once at the end: a blocking write is fine here.
        std::fs::write(path, json).map_err(|source| Error::Report {
            path: path.clone(),
            source,
        })?;
    }
    // Everything was awaited; flushing makes sure nothing we published is left in a buffer.
    for client in &clients {
        let _ = client.flush().await;
    }
    Ok(Outcome {
        summary,
        acked,
        touched,
        run_id: settings.run_id,
        mode: settings.mode,
    })
}

/// What a whole-log read measured (`--read-whole`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct WholeRead {
    pub id: u64,
    pub entries: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub entries_per_second: f64,
}

impl std::fmt::Display for WholeRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "object {}: {} entries in {} chunks ({:.1} MB) in {:.3}s = {:.0} entries/s",
            self.id,
            self.entries,
            self.chunks,
            self.bytes as f64 / 1e6,
            self.seconds,
            self.entries_per_second
        )
    }
}

/// Read one object's whole log, chunk by chunk without keeping them, and check the entries
/// arrive gapless and in order. One query answers up to the worker's MAX_QUERY_BYTES; when its
/// last chunk still carries a `next` cursor, the read continues from there with another query,
/// as any client of a large log does. Writes `{"whole_read": …}` to `--report`.
pub async fn read_whole(args: &Args, id: u64) -> Result<WholeRead, Error> {
    let settings = args.validate()?;
    let client = connect(&settings.nats, 0).await?;
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| Error::Read(e.to_string()))?;
    let started = std::time::Instant::now();
    let (mut entries, mut chunks, mut bytes, mut last_seq) = (0u64, 0u64, 0u64, 0u64);
    let mut after = Some(0u64);
    while let Some(cursor) = after.take() {
        let body = serde_json::json!({ "id": id, "after": cursor }).to_string();
        client
            .publish_with_reply(settings.query_subject.clone(), inbox.clone(), body.into())
            .await
            .map_err(|e| Error::Read(e.to_string()))?;
        let mut answer = Answer::new(&mut replies, settings.timeout.max(Duration::from_secs(10)));
        loop {
            let chunk = match answer.next().await {
                Ok(Some(chunk)) => chunk,
                // `next` ends at the `last` chunk, below.
                Ok(None) => break,
                Err(e) => return Err(whole_read_error(e, settings.timeout, chunks)),
            };
            for entry in &chunk.response.logs {
                if entry.seq != last_seq + 1 {
                    return Err(Error::Read(format!("seq {} after {last_seq}", entry.seq)));
                }
                last_seq = entry.seq;
            }
            entries += chunk.response.logs.len() as u64;
            bytes += chunk.bytes as u64;
            chunks += 1;
            if chunk.response.last {
                after = chunk.response.next;
                break;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let result = WholeRead {
        id,
        entries,
        chunks,
        bytes,
        seconds,
        entries_per_second: entries as f64 / seconds.max(1e-9),
    };
    if let Some(path) = &settings.report {
        let json = serde_json::to_vec_pretty(&serde_json::json!({ "whole_read": result }))?;
        std::fs::write(path, json).map_err(|source| Error::Report {
            path: path.clone(),
            source,
        })?;
    }
    Ok(result)
}

/// [`read_whole`]'s words for a failed answer; `chunks` is the count over all its queries.
fn whole_read_error(e: AnswerError, timeout: Duration, chunks: u64) -> Error {
    Error::Read(match e {
        AnswerError::TimedOut { .. } => format!("no chunk for {timeout:?} after chunk {chunks}"),
        AnswerError::Closed => "reply subscription closed".into(),
        // A no-responders status has an empty body, which is what was shown for it.
        AnswerError::NoResponders => String::new(),
        AnswerError::Refused { payload, .. } | AnswerError::Undecodable { payload, .. } => {
            String::from_utf8_lossy(&payload).into_owned()
        }
        AnswerError::OutOfOrder { got, expected } => {
            format!("chunk {got} arrived where {expected} was expected")
        }
    })
}

/// Read back the objects an earlier [`run`] touched and check them against what it
/// acknowledged (with `--verify`, `outcome.acked` holds them; without, only order is checked).
/// Connection and timing come from `args`; in JetStream mode it waits up to
/// `--verify-timeout` for the workers to store every acknowledged append.
pub async fn verify(args: &Args, outcome: &Outcome) -> Result<Verdict, Error> {
    let mut settings = args.validate()?;
    settings.mode = outcome.mode;
    let client = connect(&settings.nats, 0).await?;
    Ok(verify::read_back(
        &client,
        &read_back_settings(&settings),
        &outcome.touched,
        &outcome.acked,
        &workload::key_prefix(&outcome.run_id),
        &CancellationToken::new(),
    )
    .await)
}

fn read_back_settings(settings: &Settings) -> verify::ReadBack {
    verify::ReadBack {
        query_subject: Subject::from(settings.query_subject.as_str()),
        timeout: settings.timeout,
        retries: settings.retries,
        wait: match settings.mode {
            // Acknowledged = committed: a missing entry will not appear later.
            Mode::Core => Duration::ZERO,
            Mode::JetStream => settings.verify_timeout,
        },
    }
}

/// Connection number `n` (0-based) of this process, named so the server's monitoring tells
/// them apart, with the login and TLS of the NATS_* settings (credentials go in as connect
/// options: the client ignores credentials in URLs and would print them in its debug logs).
/// The error shows the list redacted and says whether the server refused the login or TLS.
async fn connect(nats: &NatsAccess, n: usize) -> Result<async_nats::Client, Error> {
    let name = match n {
        0 => "loadgen".to_string(),
        n => format!("loadgen-{}", n + 1),
    };
    Ok(nats.connect(|options| options.name(name)).await?)
}

/// The start line: everything needed to understand, and to repeat, the run.
fn describe(settings: &Settings) -> String {
    let pace = match settings.pace {
        Pace::Rate(s) => format!("{:.2} ops/s", s.rate()),
        Pace::Max => format!("max rate ({} messages in flight)", settings.in_flight),
    };
    let until = match settings.stop {
        Stop::Count(n) if settings.query_share >= 1.0 => format!("{n} queries"),
        Stop::Count(n) => format!("{n} appends"),
        Stop::After(d) => format!("{:.1}s", d.as_secs_f64()),
        Stop::Signal => "SIGINT".to_string(),
    };
    let mode = match settings.mode {
        Mode::Core => "core request-reply",
        Mode::JetStream => "JetStream",
    };
    let logs = &settings.logs_subject;
    let lane = match (settings.partitions, settings.batch) {
        (0, _) => logs.clone(),
        (p, 1) => format!("{logs}.<id> (one lane per object, {p} partitions)"),
        (p, _) => format!("{logs}.p.<k>.b (one partition's entries a batch, {p} partitions)"),
    };
    let batch = match settings.batch {
        1 => String::new(),
        n => format!(" in batches of {n}"),
    };
    let connections = match settings.connections {
        1 => String::new(),
        n => format!(" over {n} connections"),
    };
    format!(
        "run {} seed {} id-base {} objects {}: {mode} appends{batch} to {lane}{connections}, \
         {:.0}% queries on {}, {pace}, until {until} (repeat with --seed {} --id-base {})",
        settings.run_id,
        settings.seed,
        settings.id_base,
        settings.objects,
        settings.query_share * 100.0,
        settings.query_subject,
        settings.seed,
        settings.id_base,
    )
}

/// One message to send.
enum Work {
    /// `--batch` appends (fewer for the last one of a counted run), or one without batching.
    Appends(Vec<Append>),
    Query {
        id: u64,
    },
}

impl Work {
    /// Operations it counts for pacing: each append, and each query, is one.
    fn ops(&self) -> u64 {
        match self {
            Work::Appends(appends) => appends.len() as u64,
            Work::Query { .. } => 1,
        }
    }
}

/// Appends drawn but not sent yet: one buffer, or with partitions one per partition, so that a
/// message holds the entries of one partition only (the stream takes a batch on
/// `<logs>.p.<k>.b` only if every entry belongs to partition k). Each object's appends stay in
/// drawing order: an object belongs to one partition, and a buffer is first in, first out.
struct Batcher {
    batch: usize,
    partitions: u32,
    buffers: Vec<Vec<Append>>,
}

impl Batcher {
    fn new(batch: usize, partitions: u32) -> Batcher {
        Batcher {
            batch,
            partitions,
            buffers: (0..partitions.max(1)).map(|_| Vec::new()).collect(),
        }
    }

    /// Add `append`; its buffer's appends when that makes `batch` of them.
    fn push(&mut self, append: Append) -> Option<Vec<Append>> {
        let k = match self.partitions {
            0 => 0,
            p => partition(append.id, p) as usize,
        };
        let buffer = &mut self.buffers[k];
        buffer.push(append);
        (buffer.len() >= self.batch).then(|| std::mem::take(buffer))
    }

    /// The appends of some buffer that holds any (at the end of a counted run).
    fn take_any(&mut self) -> Option<Vec<Append>> {
        self.buffers
            .iter_mut()
            .find(|b| !b.is_empty())
            .map(std::mem::take)
    }
}

/// Draw operations from `workload` until they make one message: a query, or `batch` appends
/// (of one partition, with partitions; fewer when the count stops the run first, each
/// partition's rest in turn; the queries drawn meanwhile go first). `None`: the count is
/// reached and nothing is left to send.
fn next_work(
    workload: &mut Workload,
    pending: &mut Batcher,
    stop: Stop,
    queries_only: bool,
) -> Option<Work> {
    loop {
        if let Stop::Count(count) = stop {
            let issued = if queries_only {
                workload.queries()
            } else {
                workload.appends()
            };
            if issued >= count {
                return pending.take_any().map(Work::Appends);
            }
        }
        match workload.next_op() {
            Op::Query { id } => return Some(Work::Query { id }),
            Op::Append(append) => {
                if let Some(full) = pending.push(append) {
                    return Some(Work::Appends(full));
                }
            }
        }
    }
}

/// Send operations until the count or duration is reached or the run is stopped for a
/// mismatch (false), or `shutdown` completes (true). Each message runs as its own task on
/// `tasks`, holding one of `in_flight` permits.
async fn dispatch(
    settings: &Settings,
    ctx: &Arc<Ctx>,
    tasks: &TaskTracker,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let permits = Arc::new(Semaphore::new(settings.in_flight));
    let mut workload = Workload::new(settings);
    let start = tokio::time::Instant::now();
    let end = match settings.stop {
        Stop::After(d) => start.checked_add(d),
        _ => None,
    };
    let queries_only = settings.query_share >= 1.0;
    let mut pending = Batcher::new(settings.batch, settings.partitions);
    // Operations sent so far: the pace counts appends (and queries), not messages, so a batch
    // of N is due N operations' worth of time after the message before it.
    let mut ops: u64 = 0;
    loop {
        let Some(work) = next_work(&mut workload, &mut pending, settings.stop, queries_only) else {
            return false;
        };
        // Due when its last operation is: a batch carries that many operations' worth of time.
        let due_op = ops + work.ops() - 1;
        ops += work.ops();
        let ready = async {
            if let Pace::Rate(schedule) = settings.pace {
                match start.checked_add(schedule.offset(due_op)) {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            }
            permits.clone().acquire_owned().await
        };
        let over = async {
            match end {
                Some(end) => tokio::time::sleep_until(end).await,
                None => std::future::pending().await,
            }
        };
        let permit = tokio::select! {
            biased;
            _ = shutdown.as_mut() => return true,
            _ = ctx.stop.cancelled() => return false,
            _ = over => return false,
            permit = ready => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed; if it were, nothing more could be sent.
                Err(_) => return false,
            },
        };
        match work {
            Work::Appends(appends) => {
                ctx.recorder.appends_started(&appends);
                tasks.spawn(append_task(ctx.clone(), appends, permit));
            }
            Work::Query { id } => {
                ctx.recorder.query_started();
                tasks.spawn(query_task(ctx.clone(), id, permit));
            }
        }
    }
}

/// Delay before retry number `attempt` (1-based): 50 ms doubling to 1 s. Short, because most
/// retries follow a timeout that already waited.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(25u64 << attempt.min(6)).min(Duration::from_secs(1))
}

/// Send one message of appends until each is acknowledged or given up, retrying with the
/// same keys.
async fn append_task(ctx: Arc<Ctx>, appends: Vec<Append>, _permit: OwnedSemaphorePermit) {
    let started = Instant::now();
    let all_acked = if ctx.jetstreams.is_empty() {
        core_appends(&ctx, appends).await
    } else {
        jetstream_appends(&ctx, appends).await
    };
    // Latency is that of acknowledgements: a message with an entry given up (or left
    // unfinished by a stop) has none.
    if all_acked {
        ctx.recorder.message_done(started.elapsed());
    }
}

/// JetStream: the stream's PubAck acknowledges the whole message, so a retry resends it whole
/// (same body, same `Nats-Msg-Id`: the stream drops it if the first one got in). True when
/// every entry was acknowledged.
async fn jetstream_appends(ctx: &Ctx, appends: Vec<Append>) -> bool {
    let body = match client::message_body(&appends, ctx.as_array) {
        Ok(body) => body,
        Err(e) => return fail_all(&ctx.recorder, &appends, &e),
    };
    let msg_id = client::message_id(&appends, ctx.as_array);
    let subject = ctx.subject_of(&appends);
    let mut attempt = 0u32;
    loop {
        let js = &ctx.jetstreams[ctx.next_connection() % ctx.jetstreams.len()];
        let error = match client::append_jetstream(js, &subject, &msg_id, body.clone(), ctx.timeout)
            .await
        {
            Ok(receipt) => {
                ctx.recorder
                    .appends_acked(appends.iter().map(|a| (a, receipt.clone())));
                return true;
            }
            Err(error) => error,
        };
        if !error.is_retryable() || attempt >= ctx.retries {
            return fail_all(&ctx.recorder, &appends, &error);
        }
        if ctx.stop.is_cancelled() {
            // Left unfinished: it may or may not be stored, and that is allowed.
            return false;
        }
        ctx.recorder.appends_retry(&error, appends.len());
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(backoff(attempt)) => {}
            _ = ctx.stop.cancelled() => return false,
        }
    }
}

/// Core: the worker answers each entry of a batch on its own, so only the entries that failed
/// with a retryable error are sent again (same keys; a batch of them if batching). True when
/// every entry was acknowledged.
async fn core_appends(ctx: &Ctx, appends: Vec<Append>) -> bool {
    let mut pending = appends;
    let mut attempt = 0u32;
    // Whether an entry was given up: the message then has no acknowledgement latency.
    let mut gave_up = false;
    loop {
        let body = match client::message_body(&pending, ctx.as_array) {
            Ok(body) => body,
            Err(e) => return fail_all(&ctx.recorder, &pending, &e),
        };
        let client = &ctx.clients[ctx.next_connection()];
        let result =
            client::append_core(client, &ctx.logs, &pending, ctx.as_array, body, ctx.timeout).await;
        let (retry, error) = match result {
            Ok(outcomes) => {
                let settled = settle(&ctx.recorder, pending, outcomes);
                gave_up |= settled.gave_up;
                match settled.error {
                    Some(error) => (settled.retry, error),
                    None => return !gave_up,
                }
            }
            Err(error @ client::AttemptError::JetStreamAck(_)) => {
                ctx.intake_mismatch(&error);
                return false;
            }
            Err(error) if !error.is_retryable() => {
                return fail_all(&ctx.recorder, &pending, &error)
            }
            Err(error) => (pending, error),
        };
        pending = retry;
        if attempt >= ctx.retries {
            return fail_all(&ctx.recorder, &pending, &error);
        }
        if ctx.stop.is_cancelled() {
            // Left unfinished: they may or may not be stored, and that is allowed.
            return false;
        }
        ctx.recorder.appends_retry(&error, pending.len());
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(backoff(attempt)) => {}
            _ = ctx.stop.cancelled() => return false,
        }
    }
}

/// What became of a core reply's entries.
struct Settled {
    /// To be sent again (a retryable error).
    retry: Vec<Append>,
    /// The last of their errors; `None` when nothing is left to retry.
    error: Option<client::AttemptError>,
    /// Some entry was given up (an error retrying cannot fix).
    gave_up: bool,
}

/// Record each entry's outcome of a core reply: acknowledged, given up, or to be sent again.
fn settle(
    recorder: &stats::Recorder,
    appends: Vec<Append>,
    outcomes: client::EntryOutcomes,
) -> Settled {
    let mut acked = Vec::with_capacity(appends.len());
    let mut settled = Settled {
        retry: Vec::new(),
        error: None,
        gave_up: false,
    };
    for (append, outcome) in appends.into_iter().zip(outcomes) {
        match outcome {
            Ok(receipt) => acked.push((append, receipt)),
            Err(error) if error.is_retryable() => {
                settled.retry.push(append);
                settled.error = Some(error);
            }
            Err(error) => {
                recorder.append_failed(&append, &error);
                settled.gave_up = true;
            }
        }
    }
    recorder.appends_acked(acked.iter().map(|(a, r)| (a, r.clone())));
    settled
}

/// Give up every entry of `appends` after `error`. False (not acknowledged), for returning.
fn fail_all(recorder: &stats::Recorder, appends: &[Append], error: &client::AttemptError) -> bool {
    for append in appends {
        recorder.append_failed(append, error);
    }
    false
}

/// Send one query and wait for its whole answer. Not retried: a failed query is counted.
async fn query_task(ctx: Arc<Ctx>, id: u64, _permit: OwnedSemaphorePermit) {
    let body = serde_json::json!({ "id": id, "limit": QUERY_LIMIT }).to_string();
    let started = Instant::now();
    let client = &ctx.clients[ctx.next_connection()];
    match client::query(client, &ctx.query, body.into(), ctx.timeout).await {
        Ok(chunks) => match chunks.iter().find(|c| c.id != id) {
            None => ctx.recorder.query_done(started.elapsed()),
            Some(wrong) => ctx.recorder.query_failed(
                id,
                &client::AttemptError::BadReply(format!("answered for object {}", wrong.id)),
            ),
        },
        Err(e) => ctx.recorder.query_failed(id, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(50));
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(6), Duration::from_secs(1));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(1));
    }

    fn settings(extra: &[&str]) -> Settings {
        let mut argv = vec![
            "loadgen",
            "--id-base",
            "1000",
            "--objects",
            "10",
            "--seed",
            "3",
        ];
        argv.extend_from_slice(extra);
        <Args as clap::Parser>::try_parse_from(argv)
            .unwrap()
            .validate()
            .unwrap()
    }

    /// Every message a run would send, as (appends in it, or 0 for a query).
    fn messages(settings: &Settings) -> Vec<usize> {
        let mut workload = Workload::new(settings);
        let mut pending = Batcher::new(settings.batch, settings.partitions);
        let mut out = Vec::new();
        let queries_only = settings.query_share >= 1.0;
        while let Some(work) = next_work(&mut workload, &mut pending, settings.stop, queries_only) {
            out.push(match work {
                Work::Appends(appends) => appends.len(),
                Work::Query { .. } => 0,
            });
            assert!(out.len() < 100_000, "the count must end the run");
        }
        out
    }

    #[test]
    fn batches_carry_n_appends_and_the_count_is_of_appends() {
        let s = settings(&["--batch", "10", "--count", "95"]);
        let sent = messages(&s);
        assert_eq!(
            sent,
            [vec![10; 9], vec![5]].concat(),
            "the remainder goes last"
        );
        let s = settings(&["--count", "4"]);
        assert_eq!(
            messages(&s),
            vec![1, 1, 1, 1],
            "--batch 1: one append a message"
        );

        // Queries go out as they are drawn, in between batches; the appends still add up.
        let s = settings(&["--batch", "10", "--count", "200", "--query-share", "0.2"]);
        let sent = messages(&s);
        assert_eq!(sent.iter().sum::<usize>(), 200);
        let queries = sent.iter().filter(|&&n| n == 0).count();
        assert!(
            (25..=80).contains(&queries),
            "{queries} queries for 200 appends"
        );
        assert!(sent.iter().all(|&n| n == 0 || n == 10));
    }

    #[test]
    fn batch_keys_stay_unique_and_in_order() {
        let s = settings(&["--batch", "7", "--count", "20"]);
        let mut workload = Workload::new(&s);
        let mut pending = Batcher::new(7, 0);
        let mut keys = Vec::new();
        while let Some(work) = next_work(&mut workload, &mut pending, s.stop, false) {
            let Work::Appends(appends) = work else {
                panic!("no queries were asked for")
            };
            keys.extend(appends.into_iter().map(|a| a.key));
        }
        let expected: Vec<String> = (0..20).map(|n| workload::key(&s.run_id, n)).collect();
        assert_eq!(keys, expected);
    }

    #[test]
    fn with_partitions_each_message_holds_one_partitions_entries_in_order() {
        let s = settings(&["--batch", "5", "--count", "203"]);
        let mut workload = Workload::new(&s);
        let mut pending = Batcher::new(5, 4);
        let mut sent = Vec::new();
        while let Some(work) = next_work(&mut workload, &mut pending, s.stop, false) {
            let Work::Appends(appends) = work else {
                panic!("no queries were asked for")
            };
            let k = partition(appends[0].id, 4);
            assert!(appends.iter().all(|a| partition(a.id, 4) == k));
            assert!((1..=5).contains(&appends.len()));
            sent.extend(appends);
        }
        assert_eq!(
            sent.len(),
            203,
            "every append, the rest of each partition at the end"
        );
        // Each object's appends go out in the order they were drawn (their keys' order).
        let n_of = |key: &str| -> u64 { key.rsplit('-').next().unwrap().parse().unwrap() };
        for id in 1000..1010 {
            let ns: Vec<u64> = sent
                .iter()
                .filter(|a| a.id == id)
                .map(|a| n_of(&a.key))
                .collect();
            assert!(ns.windows(2).all(|w| w[0] < w[1]), "object {id}: {ns:?}");
        }
    }

    #[test]
    fn a_single_append_goes_to_its_objects_lane_and_a_batch_to_its_partitions() {
        let ctx = |partitions, as_array| Ctx {
            clients: Vec::new(),
            jetstreams: Vec::new(),
            turn: AtomicUsize::new(0),
            as_array,
            logs: Subject::from("logs"),
            partitions,
            query: Subject::from("query"),
            timeout: Duration::from_secs(1),
            retries: 0,
            recorder: Arc::new(stats::Recorder::new(false).unwrap()),
            stop: CancellationToken::new(),
            mismatch: OnceLock::new(),
        };
        let mut workload = Workload::new(&settings(&[]));
        let Op::Append(append) = workload.next_op() else {
            panic!("no queries were asked for")
        };
        let id = append.id;
        let one = [append];
        assert_eq!(ctx(0, false).subject_of(&one).as_str(), "logs");
        assert_eq!(ctx(0, true).subject_of(&one).as_str(), "logs");
        assert_eq!(
            ctx(8, false).subject_of(&one).as_str(),
            format!("logs.{id}")
        );
        assert_eq!(
            ctx(8, true).subject_of(&one).as_str(),
            format!("logs.p.{}.b", partition(id, 8))
        );
    }

    #[test]
    fn a_core_reply_acks_stored_entries_and_returns_only_retryable_failures() {
        use client::{AttemptError, Receipt};
        use logstore_protocol::{ErrorBody, ErrorCode};
        let recorder = stats::Recorder::new(true).unwrap();
        let mut workload = Workload::new(&settings(&[]));
        let appends: Vec<Append> = (0..4)
            .map(|_| match workload.next_op() {
                Op::Append(a) => a,
                Op::Query { .. } => panic!("no queries were asked for"),
            })
            .collect();
        recorder.appends_started(&appends);
        let stored = |seq| {
            Ok(Receipt {
                seq: Some(seq),
                ts: Some("2026-11-22T09:16:27.000001Z".into()),
                duplicate: false,
                stream_seq: None,
            })
        };
        let rejected = |code| Err(AttemptError::Rejected(ErrorBody::new(code, "m")));
        let settled = settle(
            &recorder,
            appends.clone(),
            vec![
                stored(1),
                rejected(ErrorCode::Unavailable),
                rejected(ErrorCode::TooLarge),
                rejected(ErrorCode::Timeout),
            ],
        );
        // Sent again: the unavailable and the outcome-unknown entry, with their own keys.
        let retry_keys: Vec<&str> = settled.retry.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            retry_keys,
            vec![appends[1].key.as_str(), appends[3].key.as_str()]
        );
        assert_eq!(settled.error.map(|e| e.kind()), Some("timeout"));
        assert!(settled.gave_up, "the too_large entry");
        let snapshot = recorder.snapshot();
        assert_eq!((snapshot.appends.ok, snapshot.appends.failed), (1, 1));
        let (acked, _) = recorder.take_acked();
        assert_eq!(acked.len(), 1);
        assert_eq!(
            (acked[0].key.as_str(), acked[0].seq),
            (appends[0].key.as_str(), Some(1))
        );

        // The retry of those two: both stored, nothing left.
        let settled = settle(&recorder, settled.retry, vec![stored(2), stored(3)]);
        assert!(settled.retry.is_empty() && settled.error.is_none() && !settled.gave_up);
        assert_eq!(recorder.snapshot().appends.ok, 3);
    }
}
