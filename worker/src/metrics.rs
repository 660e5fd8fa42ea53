//! Prometheus metrics of one worker, in its own registry (so tests running several workers in
//! one process do not share counters).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

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
                .buckets(latency_buckets),
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
        r.register(Box::new(metrics.retention_deleted.clone()))?;
        Ok(metrics)
    }

    /// Pre-create the per-shard series so dashboards show zeros rather than gaps.
    pub fn init_shard(&self, shard: &str) {
        self.shard(shard);
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
}
