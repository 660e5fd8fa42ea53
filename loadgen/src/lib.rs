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
//! - [`client`]: one append attempt (core or JetStream) or one query over NATS.
//! - [`stats`]: counters, HDR histograms, the [`Summary`] and `--report` JSON.
//! - `progress`: a bar on a terminal, plain lines otherwise.
//! - [`mod@verify`]: reading back and checking ([`verify::check`] is pure).

pub mod args;
pub mod client;
pub mod pace;
mod progress;
pub mod stats;
pub mod verify;
pub mod workload;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Subject;
use logstore_protocol::redact::{NatsAuth, NatsServers};
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
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
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
    client: async_nats::Client,
    /// Present in JetStream mode.
    jetstream: Option<async_nats::jetstream::Context>,
    logs: Subject,
    query: Subject,
    timeout: Duration,
    retries: u32,
    recorder: Arc<stats::Recorder>,
    /// Cancelled on SIGINT/SIGTERM: tasks finish their current attempt but retry no more.
    stop: CancellationToken,
}

/// Run the load described by `args` until its count or duration is reached or `shutdown`
/// completes, then wait for in-flight operations, verify if asked, write the report if asked,
/// and return what happened. Progress goes to stderr; printing the summary is the caller's.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> Result<Outcome, Error> {
    let settings = args.validate()?;
    let client = connect(&settings.nats).await?;
    eprintln!("loadgen: {}", describe(&settings));

    let recorder = Arc::new(stats::Recorder::new(settings.verify)?);
    let jetstream = (settings.mode == Mode::JetStream).then(|| {
        let mut js = async_nats::jetstream::new(client.clone());
        js.set_timeout(settings.timeout);
        js
    });
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        jetstream,
        logs: Subject::from(settings.logs_subject.as_str()),
        query: Subject::from(settings.query_subject.as_str()),
        timeout: settings.timeout,
        retries: settings.retries,
        recorder: recorder.clone(),
        stop: CancellationToken::new(),
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

    tokio::pin!(shutdown);
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
    if interrupted {
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
    let _ = client.flush().await;
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
    let client = connect(&settings.nats).await?;
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
        let mut chunk_no = 0u32;
        loop {
            let message = match tokio::time::timeout(
                settings.timeout.max(Duration::from_secs(10)),
                futures::StreamExt::next(&mut replies),
            )
            .await
            {
                Ok(Some(message)) => message,
                Ok(None) => return Err(Error::Read("reply subscription closed".into())),
                Err(_) => {
                    return Err(Error::Read(format!(
                        "no chunk for {:?} after chunk {chunks}",
                        settings.timeout
                    )))
                }
            };
            let chunk: logstore_protocol::QueryResponse = serde_json::from_slice(&message.payload)
                .map_err(|_| Error::Read(String::from_utf8_lossy(&message.payload).into_owned()))?;
            if chunk.chunk != chunk_no {
                return Err(Error::Read(format!(
                    "chunk {} arrived where {chunk_no} was expected",
                    chunk.chunk
                )));
            }
            for entry in &chunk.logs {
                if entry.seq != last_seq + 1 {
                    return Err(Error::Read(format!("seq {} after {last_seq}", entry.seq)));
                }
                last_seq = entry.seq;
            }
            entries += chunk.logs.len() as u64;
            bytes += message.payload.len() as u64;
            chunks += 1;
            chunk_no += 1;
            if chunk.last {
                after = chunk.next;
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

/// Read back the objects an earlier [`run`] touched and check them against what it
/// acknowledged (with `--verify`, `outcome.acked` holds them; without, only order is checked).
/// Connection and timing come from `args`; in JetStream mode it waits up to
/// `--verify-timeout` for the workers to store every acknowledged append.
pub async fn verify(args: &Args, outcome: &Outcome) -> Result<Verdict, Error> {
    let mut settings = args.validate()?;
    settings.mode = outcome.mode;
    let client = connect(&settings.nats).await?;
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

/// Connect with NATS_URL's credentials as connect options: the client ignores credentials in
/// URLs and would print them in its debug logs. The error shows the list redacted.
async fn connect(nats: &NatsServers) -> Result<async_nats::Client, Error> {
    let options = match &nats.auth {
        NatsAuth::None => async_nats::ConnectOptions::new(),
        NatsAuth::UserPassword { user, password } => {
            async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        NatsAuth::Token(token) => async_nats::ConnectOptions::with_token(token.clone()),
    };
    options
        .name("loadgen")
        .connect(nats.servers.as_slice())
        .await
        .map_err(|source| Error::Connect {
            url: nats.shown.clone(),
            source,
        })
}

/// The start line: everything needed to understand, and to repeat, the run.
fn describe(settings: &Settings) -> String {
    let pace = match settings.pace {
        Pace::Rate(s) => format!("{:.2} ops/s", s.rate()),
        Pace::Max => format!("max rate ({} in flight)", settings.in_flight),
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
    format!(
        "run {} seed {} id-base {} objects {}: {mode} appends to {}, {:.0}% queries on {}, {pace}, \
         until {until} (repeat with --seed {} --id-base {})",
        settings.run_id,
        settings.seed,
        settings.id_base,
        settings.objects,
        settings.logs_subject,
        settings.query_share * 100.0,
        settings.query_subject,
        settings.seed,
        settings.id_base,
    )
}

/// Send operations until the count or duration is reached (false) or `shutdown` completes
/// (true). Each operation runs as its own task on `tasks`, holding one of `in_flight` permits.
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
    let mut n: u64 = 0;
    loop {
        if let Stop::Count(count) = settings.stop {
            let issued = if queries_only {
                workload.queries()
            } else {
                workload.appends()
            };
            if issued >= count {
                return false;
            }
        }
        let ready = async {
            if let Pace::Rate(schedule) = settings.pace {
                match start.checked_add(schedule.offset(n)) {
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
            _ = over => return false,
            permit = ready => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed; if it were, nothing more could be sent.
                Err(_) => return false,
            },
        };
        n += 1;
        match workload.next_op() {
            Op::Append(append) => {
                ctx.recorder.append_started(append.id);
                tasks.spawn(append_task(ctx.clone(), append, permit));
            }
            Op::Query { id } => {
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

/// Send one append until it is acknowledged, retrying with the same key and body.
async fn append_task(ctx: Arc<Ctx>, append: Append, _permit: OwnedSemaphorePermit) {
    let started = Instant::now();
    let body = match client::append_body(&append) {
        Ok(body) => body,
        Err(e) => return ctx.recorder.append_failed(&append, &e),
    };
    let mut attempt = 0u32;
    loop {
        let result = match &ctx.jetstream {
            Some(js) => {
                client::append_jetstream(js, &ctx.logs, &append, body.clone(), ctx.timeout).await
            }
            None => {
                client::append_core(&ctx.client, &ctx.logs, &append, body.clone(), ctx.timeout)
                    .await
            }
        };
        let error = match result {
            Ok(receipt) => {
                return ctx
                    .recorder
                    .append_acked(&append, receipt, started.elapsed())
            }
            Err(error) => error,
        };
        if !error.is_retryable() || attempt >= ctx.retries {
            return ctx.recorder.append_failed(&append, &error);
        }
        if ctx.stop.is_cancelled() {
            // Left unfinished: it may or may not be stored, and that is allowed.
            return;
        }
        ctx.recorder.append_retry(&error);
        attempt += 1;
        tokio::select! {
            _ = tokio::time::sleep(backoff(attempt)) => {}
            _ = ctx.stop.cancelled() => return,
        }
    }
}

/// Send one query and wait for its whole answer. Not retried: a failed query is counted.
async fn query_task(ctx: Arc<Ctx>, id: u64, _permit: OwnedSemaphorePermit) {
    let body = serde_json::json!({ "id": id, "limit": QUERY_LIMIT }).to_string();
    let started = Instant::now();
    match client::query(&ctx.client, &ctx.query, body.into(), ctx.timeout).await {
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
}
