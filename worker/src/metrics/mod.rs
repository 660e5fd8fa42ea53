//! Prometheus metrics of one worker, in its own registry (so tests running several workers in
//! one process do not share counters).

use logstore_protocol::ErrorCode;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every error code, so that each `errors_total` / `dead_letters_total` series exists (at 0)
/// from the start: a dashboard then shows a flat zero instead of "no data", and `rate()` over
/// the first error works.
const ERROR_CODES: [ErrorCode; 6] = [
    ErrorCode::InvalidRequest,
    ErrorCode::TooLarge,
    ErrorCode::Unavailable,
    ErrorCode::Busy,
    ErrorCode::Timeout,
    ErrorCode::Internal,
];

/// Every metric the worker exports. Cloning is cheap (the prometheus types are `Arc`s inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Appends by shard and result: stored, duplicate, rejected (bad input, shard "none"),
    /// failed (not stored: shard down, load shed, fault), timeout (outcome unknown), conflict
    /// (`expected_seq` was not the object's last seq).
    pub appends: IntCounterVec,
    /// Queries by result: ok, rejected, failed, busy (shed at admission), timeout (deadline).
    pub queries: IntCounterVec,
    /// Other requests answered from a shard (stats, delete) by kind and result, with the
    /// results of `queries`.
    pub requests: IntCounterVec,
    /// From receipt of an append to its reply, by shard.
    pub append_duration: HistogramVec,
    /// From receipt of a query to its last response chunk.
    pub query_duration: HistogramVec,
    /// Appends per database transaction, by shard.
    pub batch_size: HistogramVec,
    /// 1 when the shard answered its last health check.
    pub shard_up: IntGaugeVec,
    /// Pool connections by shard and state (in_use, idle, max).
    pub pool_connections: IntGaugeVec,
    /// Requests received and not yet answered, by kind (append, query).
    pub in_flight: IntGaugeVec,
    /// `in_flight{kind="append"}` and `{kind="query"}`, resolved once for the hot path.
    pub appends_in_flight: IntGauge,
    pub queries_in_flight: IntGauge,
    /// `appends_total{shard="none",result="rejected"}`: bad input never reaches a shard.
    pub rejected_appends: IntCounter,
    pub nats_reconnects: IntCounter,
    /// Entries removed by the retention sweeper (RETENTION_MAX_AGE), by shard.
    pub retention_deleted: IntCounterVec,
    /// Messages copied to the dead-letter subject, by reason (error code).
    pub dead_letters: IntCounterVec,
    /// Requests refused unanswered because their reply subject is not an inbox
    /// (NATS_REPLY_PREFIXES), by the kind of request (append, query, stats, delete, status).
    pub replies_refused: IntCounterVec,
    /// Error answers by kind (append, query) and code, whatever the intake: a core reply, a
    /// JetStream nak/term, a dead letter or a batch entry's result.
    pub errors: IntCounterVec,
    /// One `logstore_append` call (pool wait, statement and commit), by shard.
    pub commit_duration: HistogramVec,
    /// Waiting for a pooled connection (including connecting a new one), by shard.
    pub pool_wait: HistogramVec,
    /// The shared JetStream consumer as the server last reported it (sampled by every worker,
    /// so aggregate with `max`, not `sum`): messages not yet delivered to any worker...
    pub jetstream_pending: IntGaugeVec,
    /// ...delivered and not yet acknowledged...
    pub jetstream_ack_pending: IntGaugeVec,
    /// ...and of those, delivered more than once.
    pub jetstream_redelivered: IntGaugeVec,
    /// JetStream messages this worker received that had been delivered before (nak'ed,
    /// ack_wait expired, or a worker died holding them).
    pub jetstream_redeliveries: IntCounter,
    /// 1 while this worker pulls the stream: the lease holder with JS_ORDERED, every
    /// JetStream worker without.
    pub jetstream_pulling: IntGauge,
    /// Times this worker paused pulling until every unacknowledged message was in its hands
    /// (taking over the stream, after a reconnect, or on a gap in stream sequences).
    pub jetstream_resyncs: IntCounter,
    /// JetStream messages this worker has received and not yet settled (acked, nak'ed or
    /// terminated); the ordered intake waits for 0 before it resyncs.
    pub jetstream_held: IntGauge,
    /// The ring epoch this worker routes by (docs/resharding.md).
    pub ring_epoch: IntGauge,
    /// 1 while this worker performs a move (holds the mover's lease).
    pub move_running: IntGauge,
    /// The move this worker performs: objects found to move in its last scan (`todo`) and
    /// moved so far (`moved`).
    pub move_objects: IntGaugeVec,
    /// Objects whose move failed (a shard down, a timeout); each is retried.
    pub move_errors: IntCounter,
    /// Entries copied by this worker's completed object moves: before the object's lock
    /// (`bulk`) and under it (`locked`).
    pub move_entries: IntCounterVec,
    /// Appends sent on to an object's new owner because the old owner said it moved.
    pub appends_redirected: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let appends = IntCounterVec::new(
            Opts::new("logstore_appends_total", "Appends by shard and result."),
            &["shard", "result"],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "logstore_in_flight",
                "Requests received and not yet answered.",
            ),
            &["kind"],
        )?;
        let metrics = Metrics {
            appends_in_flight: in_flight.with_label_values(&["append"]),
            queries_in_flight: in_flight.with_label_values(&["query"]),
            rejected_appends: appends.with_label_values(&["none", "rejected"]),
            appends,
            in_flight,
            queries: IntCounterVec::new(
                Opts::new("logstore_queries_total", "Queries by result."),
                &["result"],
            )?,
            requests: IntCounterVec::new(
                Opts::new(
                    "logstore_requests_total",
                    "Stats and delete requests by kind and result.",
                ),
                &["kind", "result"],
            )?,
            append_duration: HistogramVec::new(
                HistogramOpts::new(
                    "logstore_append_duration_seconds",
                    "Time from receiving an append to answering it.",
                )
                .buckets(latency_buckets.clone()),
                &["shard"],
            )?,
            query_duration: HistogramVec::new(
                HistogramOpts::new(
                    "logstore_query_duration_seconds",
                    "Time from receiving a query to sending its last response.",
                )
                .buckets(latency_buckets.clone()),
                &["shard"],
            )?,
            batch_size: HistogramVec::new(
                HistogramOpts::new("logstore_batch_size", "Appends per database transaction.")
                    .buckets(vec![
                        1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
                    ]),
                &["shard"],
            )?,
            shard_up: IntGaugeVec::new(
                Opts::new(
                    "logstore_shard_up",
                    "1 when the shard answered its last health check.",
                ),
                &["shard"],
            )?,
            pool_connections: IntGaugeVec::new(
                Opts::new(
                    "logstore_pool_connections",
                    "Database pool connections by shard and state (in_use, idle, max).",
                ),
                &["shard", "state"],
            )?,
            nats_reconnects: IntCounter::new(
                "logstore_nats_reconnects_total",
                "Times the NATS connection was re-established.",
            )?,
            retention_deleted: IntCounterVec::new(
                Opts::new(
                    "logstore_retention_deleted_total",
                    "Entries removed by the retention sweeper (older than RETENTION_MAX_AGE).",
                ),
                &["shard"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "logstore_dead_letters_total",
                    "Messages copied to the dead-letter subject, by reason.",
                ),
                &["reason"],
            )?,
            replies_refused: IntCounterVec::new(
                Opts::new(
                    "logstore_replies_refused_total",
                    "Requests refused unanswered: their reply subject is not an inbox \
                     (NATS_REPLY_PREFIXES), so answering could write where the sender may not.",
                ),
                &["kind"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "logstore_errors_total",
                    "Error answers by kind (append, query) and error code.",
                ),
                &["kind", "code"],
            )?,
            commit_duration: HistogramVec::new(
                HistogramOpts::new(
                    "logstore_commit_duration_seconds",
                    "One batch's append call to its shard: connection, statement and commit.",
                )
                .buckets(latency_buckets),
                &["shard"],
            )?,
            pool_wait: HistogramVec::new(
                HistogramOpts::new(
                    "logstore_pool_wait_seconds",
                    "Waiting for a pooled database connection (including opening one).",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0,
                ]),
                &["shard"],
            )?,
            jetstream_pending: IntGaugeVec::new(
                Opts::new(
                    "logstore_jetstream_pending_messages",
                    "Messages of the JetStream consumer not yet delivered (consumer info num_pending).",
                ),
                &["stream", "consumer"],
            )?,
            jetstream_ack_pending: IntGaugeVec::new(
                Opts::new(
                    "logstore_jetstream_ack_pending_messages",
                    "Messages delivered and not yet acknowledged (consumer info num_ack_pending).",
                ),
                &["stream", "consumer"],
            )?,
            jetstream_redelivered: IntGaugeVec::new(
                Opts::new(
                    "logstore_jetstream_redelivered_messages",
                    "Unacknowledged messages delivered more than once (consumer info num_redelivered).",
                ),
                &["stream", "consumer"],
            )?,
            jetstream_redeliveries: IntCounter::new(
                "logstore_jetstream_redeliveries_total",
                "JetStream messages received by this worker that had been delivered before.",
            )?,
            jetstream_pulling: IntGauge::new(
                "logstore_jetstream_pulling",
                "1 while this worker pulls the JetStream stream (with JS_ORDERED: holds the intake lease).",
            )?,
            jetstream_resyncs: IntCounter::new(
                "logstore_jetstream_resyncs_total",
                "Pauses of the ordered intake until every unacknowledged message was in this worker's hands.",
            )?,
            jetstream_held: IntGauge::new(
                "logstore_jetstream_held_messages",
                "JetStream messages received by this worker and not yet acked, nak'ed or terminated.",
            )?,
            ring_epoch: IntGauge::new(
                "logstore_ring_epoch",
                "The ring membership epoch this worker routes by.",
            )?,
            move_running: IntGauge::new(
                "logstore_move_running",
                "1 while this worker performs a shard move (holds the mover's lease).",
            )?,
            move_objects: IntGaugeVec::new(
                Opts::new(
                    "logstore_move_objects",
                    "The move this worker performs: objects to move (todo) and moved so far (moved).",
                ),
                &["state"],
            )?,
            move_errors: IntCounter::new(
                "logstore_move_errors_total",
                "Object moves that failed and are retried (a shard down, a timeout).",
            )?,
            move_entries: IntCounterVec::new(
                Opts::new(
                    "logstore_move_entries_total",
                    "Entries copied by completed object moves: before the object's lock (bulk) and under it (locked).",
                ),
                &["phase"],
            )?,
            appends_redirected: IntCounter::new(
                "logstore_appends_redirected_total",
                "Appends sent on to an object's new owner because its old owner said it moved.",
            )?,
            registry,
        };
        let r = &metrics.registry;
        r.register(Box::new(metrics.appends.clone()))?;
        r.register(Box::new(metrics.queries.clone()))?;
        r.register(Box::new(metrics.requests.clone()))?;
        r.register(Box::new(metrics.append_duration.clone()))?;
        r.register(Box::new(metrics.query_duration.clone()))?;
        r.register(Box::new(metrics.batch_size.clone()))?;
        r.register(Box::new(metrics.shard_up.clone()))?;
        r.register(Box::new(metrics.pool_connections.clone()))?;
        r.register(Box::new(metrics.in_flight.clone()))?;
        r.register(Box::new(metrics.nats_reconnects.clone()))?;
        r.register(Box::new(metrics.dead_letters.clone()))?;
        r.register(Box::new(metrics.errors.clone()))?;
        r.register(Box::new(metrics.replies_refused.clone()))?;
        for kind in ["append", "query", "stats", "delete", "status"] {
            metrics.replies_refused.with_label_values(&[kind]);
        }
        r.register(Box::new(metrics.commit_duration.clone()))?;
        r.register(Box::new(metrics.pool_wait.clone()))?;
        r.register(Box::new(metrics.jetstream_pending.clone()))?;
        r.register(Box::new(metrics.jetstream_ack_pending.clone()))?;
        r.register(Box::new(metrics.jetstream_redelivered.clone()))?;
        r.register(Box::new(metrics.jetstream_redeliveries.clone()))?;
        r.register(Box::new(metrics.jetstream_pulling.clone()))?;
        r.register(Box::new(metrics.jetstream_resyncs.clone()))?;
        r.register(Box::new(metrics.jetstream_held.clone()))?;
        r.register(Box::new(metrics.ring_epoch.clone()))?;
        r.register(Box::new(metrics.move_running.clone()))?;
        r.register(Box::new(metrics.move_objects.clone()))?;
        r.register(Box::new(metrics.move_errors.clone()))?;
        r.register(Box::new(metrics.move_entries.clone()))?;
        r.register(Box::new(metrics.appends_redirected.clone()))?;
        for state in ["todo", "moved"] {
            metrics.move_objects.with_label_values(&[state]);
        }
        for phase in ["bulk", "locked"] {
            metrics.move_entries.with_label_values(&[phase]);
        }
        // The prometheus crate's own process collector needs its `process` feature (and the
        // procfs crate); what the dashboard needs is a few lines of /proc.
        r.register(Box::new(ProcessCollector::new()?))?;
        for code in ERROR_CODES {
            metrics.dead_letters.with_label_values(&[code.as_str()]);
            for kind in ["append", "query"] {
                metrics.errors.with_label_values(&[kind, code.as_str()]);
            }
        }
        r.register(Box::new(metrics.retention_deleted.clone()))?;
        Ok(metrics)
    }

    /// Count an error answer (see [`Metrics::errors`]).
    pub fn error(&self, kind: &str, code: ErrorCode) {
        self.errors.with_label_values(&[kind, code.as_str()]).inc();
    }

    /// Pre-create the per-shard series so dashboards show zeros rather than gaps.
    pub fn init_shard(&self, shard: &str) {
        self.shard(shard);
        self.pool_wait.with_label_values(&[shard]);
        self.query_duration.with_label_values(&[shard]);
        self.shard_up.with_label_values(&[shard]).set(0);
        self.retention_deleted.with_label_values(&[shard]);
    }

    /// One shard's append series, resolved once so that the hot path does not hash label
    /// values for every append.
    pub fn shard(&self, shard: &str) -> ShardMetrics {
        ShardMetrics {
            stored: self.appends.with_label_values(&[shard, "stored"]),
            duplicate: self.appends.with_label_values(&[shard, "duplicate"]),
            failed: self.appends.with_label_values(&[shard, "failed"]),
            timeout: self.appends.with_label_values(&[shard, "timeout"]),
            conflict: self.appends.with_label_values(&[shard, "conflict"]),
            append_duration: self.append_duration.with_label_values(&[shard]),
            batch_size: self.batch_size.with_label_values(&[shard]),
            commit_duration: self.commit_duration.with_label_values(&[shard]),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics, which ours are by construction.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// The series one shard pipeline updates per append and per batch (see [`Metrics::shard`]).
#[derive(Clone)]
pub struct ShardMetrics {
    pub stored: IntCounter,
    pub duplicate: IntCounter,
    pub failed: IntCounter,
    pub timeout: IntCounter,
    /// Refused because `expected_seq` was not the object's last seq.
    pub conflict: IntCounter,
    pub append_duration: Histogram,
    pub batch_size: Histogram,
    pub commit_duration: Histogram,
}

/// `process_*` metrics of the standard names (as the prometheus crate's process collector and
/// every official client export them), read from /proc/self on each scrape. Elsewhere than on
/// Linux it exports nothing.
struct ProcessCollector {
    resident_memory: IntGauge,
    virtual_memory: IntGauge,
    threads: IntGauge,
    open_fds: IntGauge,
    descs: Vec<Desc>,
}

impl ProcessCollector {
    fn new() -> Result<ProcessCollector, prometheus::Error> {
        let resident_memory = IntGauge::new(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        )?;
        let virtual_memory = IntGauge::new(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
        )?;
        let threads = IntGauge::new("process_threads", "Number of OS threads in the process.")?;
        let open_fds = IntGauge::new("process_open_fds", "Number of open file descriptors.")?;
        let descs = [&resident_memory, &virtual_memory, &threads, &open_fds]
            .iter()
            .flat_map(|g| g.desc().into_iter().cloned())
            .collect();
        Ok(ProcessCollector {
            resident_memory,
            virtual_memory,
            threads,
            open_fds,
            descs,
        })
    }
}

/// A `Name:   value` line of /proc/self/status, e.g. `VmRSS:  12345 kB` -> 12345.
fn status_field(status: &str, name: &str) -> Option<i64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
            return Vec::new();
        };
        let mut families = Vec::new();
        // /proc/self/status gives memory in kB (KiB, whatever the page size).
        for (gauge, field, scale) in [
            (&self.resident_memory, "VmRSS", 1024),
            (&self.virtual_memory, "VmSize", 1024),
            (&self.threads, "Threads", 1),
        ] {
            if let Some(value) = status_field(&status, field) {
                gauge.set(value.saturating_mul(scale));
                families.extend(gauge.collect());
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            // The count includes the descriptor read_dir itself holds open: subtract it.
            self.open_fds.set(fds.count().saturating_sub(1) as i64);
            families.extend(self.open_fds.collect());
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_parse() {
        let status = "Name:\tworker\nVmSize:\t  123456 kB\nVmRSS:\t    2048 kB\nThreads:\t7\n";
        assert_eq!(status_field(status, "VmRSS"), Some(2048));
        assert_eq!(status_field(status, "VmSize"), Some(123456));
        assert_eq!(status_field(status, "Threads"), Some(7));
        assert_eq!(status_field(status, "VmSwap"), None);
    }

    #[test]
    fn process_metrics_and_zero_series_are_exported() {
        let metrics = Metrics::new().expect("metrics register");
        let text = String::from_utf8(metrics.render()).expect("exposition is UTF-8");
        let value = |name: &str| {
            text.lines().find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
        };
        if cfg!(target_os = "linux") {
            assert!(
                value("process_resident_memory_bytes").is_some_and(|v| v > 0.0),
                "{text}"
            );
            assert!(value("process_open_fds").is_some_and(|v| v > 0.0), "{text}");
        }
        assert!(
            text.contains("logstore_errors_total{code=\"busy\",kind=\"query\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("logstore_dead_letters_total{reason=\"internal\"} 0"),
            "{text}"
        );
    }
}
