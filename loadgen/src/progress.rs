//! Progress while the run sends: a live bar when stderr is a terminal, otherwise a plain line
//! every few seconds (CI logs and `docker compose logs` stay readable, with no control codes).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::args::Stop;
use crate::stats::{Recorder, Snapshot};

/// How often the terminal bar is redrawn.
const BAR_TICK: Duration = Duration::from_millis(200);

/// What the progress display needs to know about the run.
pub struct Plan {
    pub stop: Stop,
    /// Every operation is a query (then `--count` counts queries).
    pub queries_only: bool,
    pub every: Option<Duration>,
}

/// Show progress until `done` is cancelled.
pub async fn show(recorder: Arc<Recorder>, plan: Plan, done: CancellationToken) {
    let started = Instant::now();
    if std::io::stderr().is_terminal() {
        bar(&recorder, &plan, started, &done).await;
    } else if let Some(every) = plan.every {
        lines(&recorder, every, started, &done).await;
    }
}

async fn bar(recorder: &Recorder, plan: &Plan, started: Instant, done: &CancellationToken) {
    let bar = match plan.stop {
        Stop::Count(n) => ProgressBar::new(n),
        Stop::After(d) => ProgressBar::new(d.as_secs().max(1)),
        Stop::Signal => ProgressBar::new_spinner(),
    };
    let template = match plan.stop {
        Stop::Signal => "{spinner} {elapsed_precise} {msg}",
        Stop::Count(_) => "{elapsed_precise} [{bar:30}] {pos}/{len} {msg}",
        Stop::After(_) => "{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}",
    };
    // A bad template is our bug, not the user's: fall back to the default look.
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut ticker = tokio::time::interval(BAR_TICK);
    let mut last = (Instant::now(), recorder.snapshot());
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = done.cancelled() => break,
        }
        let now = recorder.snapshot();
        let position = match plan.stop {
            Stop::Count(_) if plan.queries_only => now.queries.ok + now.queries.failed,
            Stop::Count(_) => now.appends.ok + now.appends.failed,
            Stop::After(_) => started.elapsed().as_secs(),
            Stop::Signal => 0,
        };
        bar.set_position(position);
        // Rates over the last second or so: steadier than per tick, fresher than the average.
        if last.0.elapsed() >= Duration::from_secs(1) {
            bar.set_message(describe(&last.1, &now, last.0.elapsed()));
            last = (Instant::now(), now);
        }
    }
    bar.finish_and_clear();
}

async fn lines(recorder: &Recorder, every: Duration, started: Instant, done: &CancellationToken) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut last = (Instant::now(), recorder.snapshot());
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = done.cancelled() => return,
        }
        let now = recorder.snapshot();
        eprintln!(
            "loadgen: {:.0}s: {}",
            started.elapsed().as_secs_f64(),
            describe(&last.1, &now, last.0.elapsed())
        );
        last = (Instant::now(), now);
    }
}

/// One progress line: totals, the rate since `before`, and what is outstanding.
fn describe(before: &Snapshot, now: &Snapshot, over: Duration) -> String {
    let secs = over.as_secs_f64().max(1e-3);
    let a = &now.appends;
    let in_flight = a.sent.saturating_sub(a.ok + a.failed);
    let mut line = format!(
        "appends {} acked ({:.0}/s), {} retries, {} failed, {} in flight, p99 {:.2} ms",
        a.ok,
        (a.ok - before.appends.ok.min(a.ok)) as f64 / secs,
        a.retries,
        a.failed,
        in_flight,
        now.append_p99_ms
    );
    let q = &now.queries;
    if q.sent > 0 {
        line.push_str(&format!(
            "; queries {} answered ({:.0}/s), {} failed",
            q.ok,
            (q.ok - before.queries.ok.min(q.ok)) as f64 / secs,
            q.failed
        ));
    }
    line
}
