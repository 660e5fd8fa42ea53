//! Prometheus metrics of one worker, in its own registry (so tests running several workers in
//! one process do not share counters). Every series is defined and registered in the same call
//! ([`Define`]), so none can be defined and forgotten; the `process_*` series are in
//! [`process`].

mod process;

use logstore_protocol::ErrorCode;
use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use process::ProcessCollector;

/// Every error code, so that each `errors_total` / `dead_letters_total` series exists (at 0)
/// from the start: a dashboard then shows a flat zero instead of "no data", and `rate()` over
/// the first error works.
/// Not [`ErrorCode::Conflict`]: a refused `expected_seq` is counted as
/// `appends_total{result="conflict"}` and is never an error answer nor a dead-letter reason.
const ERROR_CODES: [ErrorCode; 6] = [
    ErrorCode::InvalidRequest,
    ErrorCode::TooLarge,
    ErrorCode::Unavailable,
    ErrorCode::Busy,
    ErrorCode::Timeout,
    ErrorCode::Internal,
];

/// Request latencies, in seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
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
    /// The stream's partition count as this worker found it (0: none, or not an ordered worker).
    pub jetstream_partitions: IntGauge,
    /// Partitions of the ordered intake this worker pulls now.
    pub jetstream_partitions_held: IntGauge,
    /// 1 for each partition this worker pulls (the fleet's sum per partition is at most 1).
    pub jetstream_partition_pulling: IntGaugeVec,
    /// Partitions this worker took over: released by their last owner (`handover`) or with
    /// deliveries still unacknowledged (`crash`).
    pub jetstream_takeovers: IntCounterVec,
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
    /// Every series, defined and registered; the labelled ones that dashboards expect at 0
    /// are created too.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let d = Define(&registry);
        let requests = RequestSeries::define(&d)?;
        let errors = ErrorSeries::define(&d)?;
        let store = StoreSeries::define(&d)?;
        let intake = IntakeSeries::define(&d)?;
        let ring = RingSeries::define(&d)?;
        d.register(ProcessCollector::new()?)?;
        let metrics = Metrics {
            registry: registry.clone(),
            appends: requests.appends,
            queries: requests.queries,
            requests: requests.requests,
            append_duration: requests.append_duration,
            query_duration: requests.query_duration,
            in_flight: requests.in_flight,
            appends_in_flight: requests.appends_in_flight,
            queries_in_flight: requests.queries_in_flight,
            rejected_appends: requests.rejected_appends,
            errors: errors.errors,
            dead_letters: errors.dead_letters,
            replies_refused: errors.replies_refused,
            batch_size: store.batch_size,
            shard_up: store.shard_up,
            pool_connections: store.pool_connections,
            retention_deleted: store.retention_deleted,
            commit_duration: store.commit_duration,
            pool_wait: store.pool_wait,
            nats_reconnects: intake.nats_reconnects,
            jetstream_pending: intake.jetstream_pending,
            jetstream_ack_pending: intake.jetstream_ack_pending,
            jetstream_redelivered: intake.jetstream_redelivered,
            jetstream_redeliveries: intake.jetstream_redeliveries,
            jetstream_pulling: intake.jetstream_pulling,
            jetstream_resyncs: intake.jetstream_resyncs,
            jetstream_held: intake.jetstream_held,
            jetstream_partitions: intake.jetstream_partitions,
            jetstream_partitions_held: intake.jetstream_partitions_held,
            jetstream_partition_pulling: intake.jetstream_partition_pulling,
            jetstream_takeovers: intake.jetstream_takeovers,
            ring_epoch: ring.ring_epoch,
            move_running: ring.move_running,
            move_objects: ring.move_objects,
            move_errors: ring.move_errors,
            move_entries: ring.move_entries,
            appends_redirected: ring.appends_redirected,
        };
        metrics.create_zero_series();
        Ok(metrics)
    }

    /// Create the labelled series whose label values are known in advance, so that each is
    /// exported at 0 before its first event (see [`ERROR_CODES`]).
    fn create_zero_series(&self) {
        for kind in ["append", "query", "stats", "delete", "status"] {
            self.replies_refused.with_label_values(&[kind]);
        }
        for state in ["todo", "moved"] {
            self.move_objects.with_label_values(&[state]);
        }
        for phase in ["bulk", "locked"] {
            self.move_entries.with_label_values(&[phase]);
        }
        for kind in ["handover", "crash"] {
            self.jetstream_takeovers.with_label_values(&[kind]);
        }
        for code in ERROR_CODES {
            self.dead_letters.with_label_values(&[code.as_str()]);
            for kind in ["append", "query"] {
                self.errors.with_label_values(&[kind, code.as_str()]);
            }
        }
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

/// The series of [`Metrics`] that count and time the requests this worker answers (the fields
/// of the same names there).
struct RequestSeries {
    appends: IntCounterVec,
    queries: IntCounterVec,
    requests: IntCounterVec,
    append_duration: HistogramVec,
    query_duration: HistogramVec,
    in_flight: IntGaugeVec,
    appends_in_flight: IntGauge,
    queries_in_flight: IntGauge,
    rejected_appends: IntCounter,
}

impl RequestSeries {
    /// Appends, queries and other requests: results, latencies and those in flight.
    fn define(d: &Define) -> Result<RequestSeries, prometheus::Error> {
        let appends = d.counter_vec(
            "logstore_appends_total",
            "Appends by shard and result.",
            &["shard", "result"],
        )?;
        let in_flight = d.gauge_vec(
            "logstore_in_flight",
            "Requests received and not yet answered.",
            &["kind"],
        )?;
        Ok(RequestSeries {
            appends_in_flight: in_flight.with_label_values(&["append"]),
            queries_in_flight: in_flight.with_label_values(&["query"]),
            rejected_appends: appends.with_label_values(&["none", "rejected"]),
            appends,
            in_flight,
            queries: d.counter_vec("logstore_queries_total", "Queries by result.", &["result"])?,
            requests: d.counter_vec(
                "logstore_requests_total",
                "Stats and delete requests by kind and result.",
                &["kind", "result"],
            )?,
            append_duration: d.histogram_vec(
                "logstore_append_duration_seconds",
                "Time from receiving an append to answering it.",
                &LATENCY_BUCKETS,
                &["shard"],
            )?,
            query_duration: d.histogram_vec(
                "logstore_query_duration_seconds",
                "Time from receiving a query to sending its last response.",
                &LATENCY_BUCKETS,
                &["shard"],
            )?,
        })
    }
}

/// The series of [`Metrics`] that count error answers, dead letters and refused replies.
struct ErrorSeries {
    errors: IntCounterVec,
    dead_letters: IntCounterVec,
    replies_refused: IntCounterVec,
}

impl ErrorSeries {
    /// Requests that were answered with an error, dead-lettered or refused unanswered.
    fn define(d: &Define) -> Result<ErrorSeries, prometheus::Error> {
        Ok(ErrorSeries {
            dead_letters: d.counter_vec(
                "logstore_dead_letters_total",
                "Messages copied to the dead-letter subject, by reason.",
                &["reason"],
            )?,
            replies_refused: d.counter_vec(
                "logstore_replies_refused_total",
                "Requests refused unanswered: their reply subject is not an inbox \
                 (NATS_REPLY_PREFIXES), so answering could write where the sender may not.",
                &["kind"],
            )?,
            errors: d.counter_vec(
                "logstore_errors_total",
                "Error answers by kind (append, query) and error code.",
                &["kind", "code"],
            )?,
        })
    }
}

/// The series of [`Metrics`] about the shards' databases: health, pools, batches and commits.
struct StoreSeries {
    batch_size: HistogramVec,
    shard_up: IntGaugeVec,
    pool_connections: IntGaugeVec,
    retention_deleted: IntCounterVec,
    commit_duration: HistogramVec,
    pool_wait: HistogramVec,
}

impl StoreSeries {
    /// Per-shard database series: health, pool, batches, commits and retention.
    fn define(d: &Define) -> Result<StoreSeries, prometheus::Error> {
        Ok(StoreSeries {
            batch_size: d.histogram_vec(
                "logstore_batch_size",
                "Appends per database transaction.",
                &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
                &["shard"],
            )?,
            shard_up: d.gauge_vec(
                "logstore_shard_up",
                "1 when the shard answered its last health check.",
                &["shard"],
            )?,
            pool_connections: d.gauge_vec(
                "logstore_pool_connections",
                "Database pool connections by shard and state (in_use, idle, max).",
                &["shard", "state"],
            )?,
            retention_deleted: d.counter_vec(
                "logstore_retention_deleted_total",
                "Entries removed by the retention sweeper (older than RETENTION_MAX_AGE).",
                &["shard"],
            )?,
            commit_duration: d.histogram_vec(
                "logstore_commit_duration_seconds",
                "One batch's append call to its shard: connection, statement and commit.",
                &LATENCY_BUCKETS,
                &["shard"],
            )?,
            pool_wait: d.histogram_vec(
                "logstore_pool_wait_seconds",
                "Waiting for a pooled database connection (including opening one).",
                &[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0,
                ],
                &["shard"],
            )?,
        })
    }
}

/// The series of [`Metrics`] about the NATS connection and the JetStream intake.
struct IntakeSeries {
    nats_reconnects: IntCounter,
    jetstream_pending: IntGaugeVec,
    jetstream_ack_pending: IntGaugeVec,
    jetstream_redelivered: IntGaugeVec,
    jetstream_redeliveries: IntCounter,
    jetstream_pulling: IntGauge,
    jetstream_resyncs: IntCounter,
    jetstream_held: IntGauge,
    jetstream_partitions: IntGauge,
    jetstream_partitions_held: IntGauge,
    jetstream_partition_pulling: IntGaugeVec,
    jetstream_takeovers: IntCounterVec,
}

impl IntakeSeries {
    /// NATS reconnects, the shared consumer's lag and this worker's pulling and resyncs.
    fn define(d: &Define) -> Result<IntakeSeries, prometheus::Error> {
        Ok(IntakeSeries {
            nats_reconnects: d.counter(
                "logstore_nats_reconnects_total",
                "Times the NATS connection was re-established.",
            )?,
            jetstream_pending: d.gauge_vec(
                "logstore_jetstream_pending_messages",
                "Messages of the JetStream consumer not yet delivered (consumer info num_pending).",
                &["stream", "consumer"],
            )?,
            jetstream_ack_pending: d.gauge_vec(
                "logstore_jetstream_ack_pending_messages",
                "Messages delivered and not yet acknowledged (consumer info num_ack_pending).",
                &["stream", "consumer"],
            )?,
            jetstream_redelivered: d.gauge_vec(
                "logstore_jetstream_redelivered_messages",
                "Unacknowledged messages delivered more than once (consumer info num_redelivered).",
                &["stream", "consumer"],
            )?,
            jetstream_redeliveries: d.counter(
                "logstore_jetstream_redeliveries_total",
                "JetStream messages received by this worker that had been delivered before.",
            )?,
            jetstream_pulling: d.gauge(
                "logstore_jetstream_pulling",
                "1 while this worker pulls the JetStream stream (with JS_ORDERED: holds the intake lease).",
            )?,
            jetstream_resyncs: d.counter(
                "logstore_jetstream_resyncs_total",
                "Pauses of the ordered intake until every unacknowledged message was in this worker's hands.",
            )?,
            jetstream_held: d.gauge(
                "logstore_jetstream_held_messages",
                "JetStream messages received by this worker and not yet acked, nak'ed or terminated.",
            )?,
            jetstream_partitions: d.gauge(
                "logstore_jetstream_partitions",
                "Partitions of the ordered JetStream intake's stream, as this ordered worker found it (0: none).",
            )?,
            jetstream_partitions_held: d.gauge(
                "logstore_jetstream_partitions_held",
                "Partitions of the ordered JetStream intake this worker pulls.",
            )?,
            jetstream_partition_pulling: d.gauge_vec(
                "logstore_jetstream_partition_pulling",
                "1 while this worker pulls the partition (holds its lease).",
                &["partition"],
            )?,
            jetstream_takeovers: d.counter_vec(
                "logstore_jetstream_takeovers_total",
                "Partitions this worker took over: handover (released by the last owner) or crash (deliveries left unacknowledged).",
                &["kind"],
            )?,
        })
    }
}

/// The series of [`Metrics`] about the ring and the moves of objects between shards.
struct RingSeries {
    ring_epoch: IntGauge,
    move_running: IntGauge,
    move_objects: IntGaugeVec,
    move_errors: IntCounter,
    move_entries: IntCounterVec,
    appends_redirected: IntCounter,
}

impl RingSeries {
    /// The ring epoch, the mover's progress and the appends redirected after a move.
    fn define(d: &Define) -> Result<RingSeries, prometheus::Error> {
        Ok(RingSeries {
            ring_epoch: d.gauge(
                "logstore_ring_epoch",
                "The ring membership epoch this worker routes by.",
            )?,
            move_running: d.gauge(
                "logstore_move_running",
                "1 while this worker performs a shard move (holds the mover's lease).",
            )?,
            move_objects: d.gauge_vec(
                "logstore_move_objects",
                "The move this worker performs: objects to move (todo) and moved so far (moved).",
                &["state"],
            )?,
            move_errors: d.counter(
                "logstore_move_errors_total",
                "Object moves that failed and are retried (a shard down, a timeout).",
            )?,
            move_entries: d.counter_vec(
                "logstore_move_entries_total",
                "Entries copied by completed object moves: before the object's lock (bulk) and under it (locked).",
                &["phase"],
            )?,
            appends_redirected: d.counter(
                "logstore_appends_redirected_total",
                "Appends sent on to an object's new owner because its old owner said it moved.",
            )?,
        })
    }
}

/// Defines a series and registers it in the worker's registry in one step, so that a series
/// cannot be defined without being exported.
struct Define<'r>(&'r Registry);

impl Define<'_> {
    fn register<C: Collector + Clone + 'static>(&self, c: C) -> Result<C, prometheus::Error> {
        self.0.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.register(IntCounter::new(name, help)?)
    }

    fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, prometheus::Error> {
        self.register(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.register(IntGauge::new(name, help)?)
    }

    fn gauge_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, prometheus::Error> {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> Result<HistogramVec, prometheus::Error> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(HistogramVec::new(opts, labels)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
