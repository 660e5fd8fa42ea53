//! What a run measured: counters, HDR latency histograms, the acknowledged appends (kept for
//! verify), and the [`Summary`] printed at the end and written by `--report`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::args::{Mode, Settings};
use crate::client::{AttemptError, Receipt};
use crate::verify::{Acked, Verdict};
use crate::workload::Append;

/// Error messages kept verbatim for the summary; the rest are only counted.
const ERROR_SAMPLES: usize = 5;
/// Histogram range: 1 µs .. 1 hour, 3 significant digits (0.1 % error).
const HIST_MAX_MICROS: u64 = 3_600_000_000;
/// The per-second histogram is coarser (1 %): only its p50/p99 are kept, and it is reset
/// every second.
const SECOND_HIST_DIGITS: u8 = 2;

/// Shared by every operation task. One mutex: operations take it once, for microseconds,
/// and the progress reporter reads a consistent snapshot of everything.
pub struct Recorder {
    inner: Mutex<Inner>,
    /// Whether acknowledged appends and touched objects are kept for verify (memory grows
    /// with the run, so only when verify will use them).
    keep_acked: bool,
}

struct Inner {
    /// Second 0 of the per-second series.
    started: Instant,
    appends: Counts,
    queries: Counts,
    append_latency: Histogram<u64>,
    query_latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    samples: Vec<String>,
    acked: Vec<Acked>,
    touched: BTreeSet<u64>,
    /// The seconds already over, in order (second `n` at index `n`).
    series: Vec<Second>,
    /// The second now being counted: its number, counts and latency histogram. Events come
    /// under the lock with their time read under it too, so they arrive in time order and a
    /// second is final once a later one has begun: only one histogram is ever held.
    current: Current,
}

struct Current {
    second: u64,
    appends: u64,
    queries: u64,
    latency: Histogram<u64>,
}

/// One second of the run, in the `--report`'s `series`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Second {
    /// Seconds since the start: this entry covers `[second, second + 1)`.
    pub second: u64,
    /// Appends acknowledged in this second (entries, like `appends.ok`).
    pub appends: u64,
    /// Queries answered completely in this second (like `queries.ok`).
    pub queries: u64,
    /// Append messages settled in this second: the latency samples below.
    pub messages: u64,
    /// Latency of those messages, in ms (as `appends.latency_ms`); `null` when there were none.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Current {
    fn point(&self) -> Second {
        let (p50_ms, p99_ms) = if self.latency.is_empty() {
            (None, None)
        } else {
            (
                Some(millis(self.latency.value_at_quantile(0.50))),
                Some(millis(self.latency.value_at_quantile(0.99))),
            )
        };
        Second {
            second: self.second,
            appends: self.appends,
            queries: self.queries,
            messages: self.latency.len(),
            p50_ms,
            p99_ms,
        }
    }
}

/// Per operation kind.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    /// Operations started (first attempts).
    pub sent: u64,
    /// Appends: acknowledged (reply or PubAck). Queries: answered completely.
    pub ok: u64,
    /// Appends acknowledged as duplicates: an earlier attempt was stored (or, in JetStream
    /// mode, was in the stream) although we never heard back.
    pub duplicates: u64,
    /// Extra attempts after a timeout or retryable error.
    pub retries: u64,
    /// Given up: retries exhausted, or an error that retrying cannot fix.
    pub failed: u64,
    /// Neither acknowledged nor given up when the run ended (stopped by SIGINT/SIGTERM while
    /// waiting or retrying): may or may not be stored. Filled in by [`Recorder::summary`].
    pub unfinished: u64,
}

impl Recorder {
    pub fn new(keep_acked: bool) -> Result<Recorder, hdrhistogram::CreationError> {
        let histogram = || Histogram::<u64>::new_with_bounds(1, HIST_MAX_MICROS, 3);
        Ok(Recorder {
            inner: Mutex::new(Inner {
                started: Instant::now(),
                appends: Counts::default(),
                queries: Counts::default(),
                append_latency: histogram()?,
                query_latency: histogram()?,
                errors: BTreeMap::new(),
                samples: Vec::new(),
                acked: Vec::new(),
                touched: BTreeSet::new(),
                series: Vec::new(),
                current: Current {
                    second: 0,
                    appends: 0,
                    queries: 0,
                    latency: Histogram::new_with_bounds(1, HIST_MAX_MICROS, SECOND_HIST_DIGITS)?,
                },
            }),
            keep_acked,
        })
    }

    /// A panicking task cannot leave the counters half-updated in a way that matters here, so
    /// a poisoned lock is simply taken over.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message carrying `appends` is about to be sent for the first time.
    pub fn appends_started(&self, appends: &[Append]) {
        let mut inner = self.lock();
        inner.appends.sent += appends.len() as u64;
        if self.keep_acked {
            inner.touched.extend(appends.iter().map(|a| a.id));
        }
    }

    pub fn query_started(&self) {
        self.lock().queries.sent += 1;
    }

    /// Entries acknowledged, each with its receipt (one lock for a whole batch).
    pub fn appends_acked<'a>(&self, acked: impl IntoIterator<Item = (&'a Append, Receipt)>) {
        let mut inner = self.lock();
        let now = inner.started.elapsed();
        for (append, receipt) in acked {
            inner.appends.ok += 1;
            inner.at(now).appends += 1;
            if receipt.duplicate {
                inner.appends.duplicates += 1;
            }
            if self.keep_acked {
                inner.acked.push(Acked {
                    id: append.id,
                    key: append.key.clone(),
                    seq: receipt.seq,
                    ts: receipt.ts,
                    stream_seq: receipt.stream_seq,
                    duplicate: receipt.duplicate,
                });
            }
        }
    }

    /// A message is settled: every entry acknowledged or given up. `latency` runs from its first
    /// attempt, retries of some of its entries included. One sample per message, whatever the
    /// entry count: a batch's entries share one round trip.
    pub fn message_done(&self, latency: Duration) {
        let mut inner = self.lock();
        let now = inner.started.elapsed();
        inner.append_latency.saturating_record(micros(latency));
        inner.at(now).latency.saturating_record(micros(latency));
    }

    /// `entries` appends are sent again after `error` (counted per append, like `sent`).
    pub fn appends_retry(&self, error: &AttemptError, entries: usize) {
        let mut inner = self.lock();
        inner.appends.retries += entries as u64;
        inner.note(error, entries);
    }

    pub fn append_failed(&self, append: &Append, error: &AttemptError) {
        let mut inner = self.lock();
        inner.appends.failed += 1;
        inner.note(error, 1);
        if inner.samples.len() < ERROR_SAMPLES {
            inner.samples.push(format!(
                "append {} to object {} gave up: {error}",
                append.key, append.id
            ));
        }
    }

    pub fn query_done(&self, latency: Duration) {
        let mut inner = self.lock();
        let now = inner.started.elapsed();
        inner.queries.ok += 1;
        inner.at(now).queries += 1;
        inner.query_latency.saturating_record(micros(latency));
    }

    pub fn query_failed(&self, id: u64, error: &AttemptError) {
        let mut inner = self.lock();
        inner.queries.failed += 1;
        inner.note(error, 1);
        if inner.samples.len() < ERROR_SAMPLES {
            inner
                .samples
                .push(format!("query of object {id} failed: {error}"));
        }
    }

    /// Counters and p99s right now, for progress output.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            appends: inner.appends,
            queries: inner.queries,
            append_p99_ms: millis(inner.append_latency.value_at_quantile(0.99)),
        }
    }

    /// Take what verify needs (acknowledged appends, objects appended to) out of the recorder.
    pub fn take_acked(&self) -> (Vec<Acked>, BTreeSet<u64>) {
        let mut inner = self.lock();
        (
            std::mem::take(&mut inner.acked),
            std::mem::take(&mut inner.touched),
        )
    }

    /// The summary of the run (verify result added by the caller).
    pub fn summary(&self, settings: &Settings, elapsed: Duration, interrupted: bool) -> Summary {
        let inner = self.lock();
        let secs = elapsed.as_secs_f64();
        let rate = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let concluded = |mut c: Counts| {
            c.unfinished = c.sent.saturating_sub(c.ok + c.failed);
            c
        };
        Summary {
            run_id: settings.run_id.clone(),
            seed: settings.seed,
            id_base: settings.id_base,
            objects: settings.objects,
            mode: settings.mode,
            target_rate: match settings.pace {
                crate::args::Pace::Rate(schedule) => Some(schedule.rate()),
                crate::args::Pace::Max => None,
            },
            elapsed_secs: secs,
            interrupted,
            batch: settings.batch,
            connections: settings.connections,
            partitions: settings.partitions,
            appends: OpSummary {
                counts: concluded(inner.appends),
                per_sec: rate(inner.appends.ok),
                latency_ms: Percentiles::of(&inner.append_latency),
            },
            queries: OpSummary {
                counts: concluded(inner.queries),
                per_sec: rate(inner.queries.ok),
                latency_ms: Percentiles::of(&inner.query_latency),
            },
            errors: inner.errors.clone(),
            error_samples: inner.samples.clone(),
            verify: None,
            rejected: None,
            series: inner.series_until(elapsed),
        }
    }
}

impl Inner {
    /// The second `elapsed` falls in, closing the seconds before it.
    fn at(&mut self, elapsed: Duration) -> &mut Current {
        let second = elapsed.as_secs();
        while self.current.second < second {
            self.series.push(self.current.point());
            self.current.second += 1;
            self.current.appends = 0;
            self.current.queries = 0;
            self.current.latency.reset();
        }
        &mut self.current
    }

    /// Every second from 0 through the one `elapsed` falls in (and any later one something
    /// happened in: operations still finishing after an interrupt), empty seconds included.
    fn series_until(&self, elapsed: Duration) -> Vec<Second> {
        let mut series = self.series.clone();
        series.push(self.current.point());
        // The second that `elapsed` ends in (a run of exactly 3 s has seconds 0, 1, 2).
        let last = elapsed
            .saturating_sub(Duration::from_nanos(1))
            .as_secs()
            .max(self.current.second);
        series.extend((self.current.second + 1..=last).map(|second| Second {
            second,
            ..Second::default()
        }));
        series
    }

    fn note(&mut self, error: &AttemptError, times: usize) {
        *self.errors.entry(error.kind().to_string()).or_default() += times as u64;
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn millis(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// A point-in-time view for progress output.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub appends: Counts,
    pub queries: Counts,
    pub append_p99_ms: f64,
}

/// Latency percentiles in milliseconds (from an HDR histogram: within 0.1 %).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: millis(h.value_at_quantile(0.50)),
            p90: millis(h.value_at_quantile(0.90)),
            p99: millis(h.value_at_quantile(0.99)),
            max: millis(h.max()),
        }
    }
}

/// One operation kind's results.
#[derive(Debug, Clone, Serialize)]
pub struct OpSummary {
    #[serde(flatten)]
    pub counts: Counts,
    /// Successful operations per second over the whole run.
    pub per_sec: f64,
    /// Appends: per message (one append, or a batch of `--batch`), from its first attempt to
    /// the acknowledgement of its last entry (retries included).
    /// Queries: from the request to the last chunk of the answer.
    pub latency_ms: Percentiles,
}

/// Everything a run found out; `Display` is the human summary, `Serialize` the `--report`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_id: String,
    pub seed: u64,
    pub id_base: u64,
    pub objects: u64,
    pub mode: Mode,
    /// Operations per second asked for; `None` with `--max-rate`.
    pub target_rate: Option<f64>,
    pub elapsed_secs: f64,
    /// Stopped by SIGINT/SIGTERM rather than by --count/--duration.
    pub interrupted: bool,
    /// Appends per message (`--batch`); append counts are per append, latency per message.
    pub batch: usize,
    /// NATS connections publishes were spread over.
    pub connections: usize,
    /// JetStream: the stream's partitions appends were spread over, one lane per object
    /// (`<logs>.<id>`, batches on `<logs>.p.<k>.b`); 0: every append on the logs subject.
    pub partitions: u32,
    pub appends: OpSummary,
    pub queries: OpSummary,
    /// Failed attempts by kind (timeouts, no_responders, unavailable, ...), retried or not;
    /// counted per append, so a batch's timeout counts once for each of its entries.
    pub errors: BTreeMap<String, u64>,
    /// The first few errors that made an operation fail, verbatim.
    pub error_samples: Vec<String>,
    pub verify: Option<Verdict>,
    /// With --verify: how many of this run's appends the workers refused for good, as their
    /// `rejected.<id>` events said (distinct keys), with the reasons by error code. Absent when
    /// not counted (no --verify, or the events could not be subscribed to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<crate::refusals::Refusals>,
    /// The run second by second from its start (the last one partial): what was
    /// acknowledged and answered in each, and the latency of the append messages settled in
    /// it. Its counts add up to `appends.ok`, `queries.ok` and `appends.latency_ms.count`.
    pub series: Vec<Second>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = match self.target_rate {
            Some(rate) => format!("target {rate:.1} ops/s"),
            None => "max rate".to_string(),
        };
        writeln!(
            f,
            "run {} ({}{}, seed {}, ids {}..={}): {:.2}s, {target}{}",
            self.run_id,
            self.mode,
            match (self.batch, self.connections) {
                (1, 1) => String::new(),
                (batch, 1) => format!(", batches of {batch}"),
                (1, n) => format!(", {n} connections"),
                (batch, n) => format!(", batches of {batch}, {n} connections"),
            },
            self.seed,
            self.id_base,
            self.id_base.saturating_add(self.objects.saturating_sub(1)),
            self.elapsed_secs,
            if self.interrupted {
                ", interrupted"
            } else {
                ""
            },
        )?;
        let a = &self.appends;
        let acked = match self.mode {
            Mode::Core => "acked (stored)",
            Mode::JetStream => "acked (in stream)",
        };
        match (self.partitions, self.batch) {
            (0, _) => {}
            (p, 1) => writeln!(f, "lanes: one per object (<logs>.<id>), {p} partitions")?,
            (p, _) => writeln!(
                f,
                "lanes: each batch one partition's entries (<logs>.p.<k>.b), {p} partitions"
            )?,
        }
        writeln!(
            f,
            "appends: {} sent, {} {acked}, {} of them as duplicates, {} retries, {} failed, {} unfinished; {:.1}/s",
            a.counts.sent, a.counts.ok, a.counts.duplicates, a.counts.retries, a.counts.failed,
            a.counts.unfinished, a.per_sec
        )?;
        if self.batch > 1 {
            writeln!(
                f,
                "  latency ms per message of up to {} appends: {}",
                self.batch, a.latency_ms
            )?;
        } else {
            writeln!(f, "  latency ms: {}", a.latency_ms)?;
        }
        let q = &self.queries;
        if q.counts.sent > 0 {
            writeln!(
                f,
                "queries: {} sent, {} answered, {} failed; {:.1}/s",
                q.counts.sent, q.counts.ok, q.counts.failed, q.per_sec
            )?;
            writeln!(f, "  latency ms: {}", q.latency_ms)?;
        }
        if !self.errors.is_empty() {
            let kinds: Vec<String> = self
                .errors
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            writeln!(f, "errors (attempts): {}", kinds.join(", "))?;
        }
        for sample in &self.error_samples {
            writeln!(f, "  {sample}")?;
        }
        if let Some(verdict) = &self.verify {
            write!(f, "{verdict}")?;
        }
        if let Some(rejected) = &self.rejected {
            writeln!(f, "{rejected}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Percentiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.2}, p90 {:.2}, p99 {:.2}, max {:.2} (n={})",
            self.p50, self.p90, self.p99, self.max, self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn settings() -> Settings {
        let argv = [
            "loadgen",
            "--id-base",
            "1000",
            "--objects",
            "10",
            "--seed",
            "3",
        ];
        crate::Args::try_parse_from(argv)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn append(n: u64) -> Append {
        Append {
            n,
            id: 1000 + n % 10,
            key: format!("k-{n}"),
            log: String::new(),
        }
    }

    fn receipt() -> Receipt {
        Receipt {
            seq: None,
            ts: None,
            duplicate: false,
            stream_seq: None,
        }
    }

    /// Make the recorder's clock read `secs` from now: what is recorded next lands there.
    fn jump_to(recorder: &Recorder, secs: f64) {
        recorder.lock().started = Instant::now() - Duration::from_secs_f64(secs);
    }

    #[test]
    fn the_series_has_every_second_and_its_counts_add_up_to_the_totals() {
        let recorder = Recorder::new(false).unwrap();
        let appends: Vec<Append> = (0..40).map(append).collect();
        recorder.appends_started(&appends);
        // Second 0: a batch of 10 entries (one message, 4 ms) and 2 single appends (1 and
        // 100 ms), one query.
        recorder.appends_acked(appends[..10].iter().map(|a| (a, receipt())));
        recorder.message_done(Duration::from_millis(4));
        for (a, ms) in appends[10..12].iter().zip([1, 100]) {
            recorder.appends_acked([(a, receipt())]);
            recorder.message_done(Duration::from_millis(ms));
        }
        recorder.query_done(Duration::from_millis(2));
        // Nothing in second 1; second 2: 25 single appends of 10 ms; 3 queries.
        jump_to(&recorder, 2.5);
        for a in &appends[12..37] {
            recorder.appends_acked([(a, receipt())]);
            recorder.message_done(Duration::from_millis(10));
        }
        for _ in 0..3 {
            recorder.query_done(Duration::from_millis(1));
        }
        // Second 4: 3 entries acknowledged, their message not yet settled (a batch retrying).
        jump_to(&recorder, 4.2);
        recorder.appends_acked(appends[37..].iter().map(|a| (a, receipt())));

        let summary = recorder.summary(&settings(), Duration::from_secs_f64(5.5), false);
        let seconds: Vec<u64> = summary.series.iter().map(|s| s.second).collect();
        assert_eq!(
            seconds,
            vec![0, 1, 2, 3, 4, 5],
            "every second, empty ones too"
        );
        let total = |f: fn(&Second) -> u64| summary.series.iter().map(f).sum::<u64>();
        assert_eq!(total(|s| s.appends), summary.appends.counts.ok);
        assert_eq!(total(|s| s.appends), 40);
        assert_eq!(total(|s| s.queries), summary.queries.counts.ok);
        assert_eq!(total(|s| s.messages), summary.appends.latency_ms.count);

        let s = &summary.series;
        assert_eq!((s[0].appends, s[0].queries, s[0].messages), (12, 1, 3));
        assert_eq!(s[0].p50_ms.map(|p| p.round()), Some(4.0));
        assert_eq!(s[0].p99_ms.map(|p| p.round()), Some(100.0));
        assert_eq!(
            s[1],
            Second {
                second: 1,
                ..Second::default()
            }
        );
        assert_eq!((s[2].appends, s[2].queries, s[2].messages), (25, 3, 25));
        assert_eq!(s[2].p50_ms.map(|p| p.round()), Some(10.0));
        assert_eq!((s[4].appends, s[4].messages, s[4].p99_ms), (3, 0, None));
        assert_eq!(
            s[5],
            Second {
                second: 5,
                ..Second::default()
            }
        );

        // A run of exactly 3 s has seconds 0..=2 (and the later seconds something happened in).
        let exact = Recorder::new(false).unwrap();
        let summary = exact.summary(&settings(), Duration::from_secs(3), false);
        assert_eq!(summary.series.len(), 3);
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            json["series"][0],
            serde_json::json!({"second": 0, "appends": 0, "queries": 0, "messages": 0, "p50_ms": null, "p99_ms": null})
        );
    }
}
