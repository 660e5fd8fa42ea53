//! Registration with the NATS service API (ADR-32, "micro"), so `nats micro ls`, `nats micro
//! info logstore` and `nats micro stats logstore` list every running worker.
//!
//! The service API's endpoints cannot carry the worker's real work without changing it: an
//! endpoint is a queue subscription the `service` module creates and owns, which the worker
//! could not drain on shutdown (it can only be unsubscribed, dropping what is in flight), and
//! JetStream appends do not arrive on a subscription at all but from a pull consumer. So `logs`
//! and `query` stay the worker's own subscriptions, unchanged, and the service is registered
//! for discovery and statistics:
//! - its metadata names the subjects, queue group, intake, stream and consumer, shards and
//!   metrics address, so `nats micro info` shows where each worker takes its work from;
//! - one endpoint, `status`, on a subject of its own per worker (`logstore.status.<id>`),
//!   answers the worker's readiness and counts, and the same counts are the endpoint's `data`
//!   in `nats micro stats`, so the statistics show each worker's appends, queries and errors.
//!
//! The service stops answering when shutdown begins, so a draining worker leaves the listing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_nats::service::endpoint::Endpoint;
use async_nats::service::{Request, Service, ServiceExt};
use futures::StreamExt;
use prometheus::core::Collector;
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Intake};
use crate::http::ReadinessCheck;
use crate::metrics::Metrics;

/// The service name every worker registers under (`nats micro info logstore`); publishers
/// look for it ([`logstore_protocol::discover`]).
pub const SERVICE_NAME: &str = logstore_protocol::discover::SERVICE_NAME;

/// Counter values summed by one label (e.g. appends by `result`), for the status answer.
fn sum_by(counters: &IntCounterVec, label: &str) -> BTreeMap<String, u64> {
    let mut sums = BTreeMap::new();
    for family in counters.collect() {
        for metric in family.get_metric() {
            let Some(value) = metric
                .get_label()
                .iter()
                .find(|pair| pair.name() == label)
                .map(|pair| pair.value().to_string())
            else {
                continue;
            };
            // Counters hold whole numbers; the float is how the crate stores them.
            *sums.entry(value).or_insert(0) += metric.get_counter().get_value() as u64;
        }
    }
    sums
}

/// This worker's counts since it started: what `status` answers and `nats micro stats` shows.
pub fn counts(metrics: &Metrics) -> serde_json::Value {
    serde_json::json!({
        "appends": sum_by(&metrics.appends, "result"),
        "queries": sum_by(&metrics.queries, "result"),
        "errors": sum_by(&metrics.errors, "code"),
        "dead_letters": sum_by(&metrics.dead_letters, "reason"),
        "in_flight": {
            "append": metrics.appends_in_flight.get(),
            "query": metrics.queries_in_flight.get(),
        },
    })
}

/// Where this worker takes its work from, as service metadata. `partitions`: the stream's
/// partitions this worker's intake takes (0 with core intake, with JS_PARTITIONS=0 on a stream
/// that records none, and for a worker that is not ordered): publishers send each object's
/// appends on its own lane (`logs.<id>`) only when every worker says the same P > 0
/// ([`logstore_protocol::discover`]).
fn metadata(config: &Config, partitions: u32) -> HashMap<String, String> {
    let mut metadata = HashMap::from([
        ("logs_subject".to_string(), config.logs_subject.clone()),
        ("query_subject".to_string(), config.query_subject.clone()),
        ("queue_group".to_string(), config.queue_group.clone()),
        (
            "response_subject".to_string(),
            config.response_subject.clone(),
        ),
        ("events_prefix".to_string(), config.events_prefix.clone()),
        (
            "rejected_prefix".to_string(),
            config.rejected_prefix.clone(),
        ),
        (
            "dead_letter_subject".to_string(),
            config.dead_letter_subject.clone(),
        ),
        (
            "shards".to_string(),
            config
                .shards
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("metrics_addr".to_string(), config.metrics_addr.to_string()),
        (
            logstore_protocol::discover::PARTITIONS_KEY.to_string(),
            partitions.to_string(),
        ),
    ]);
    match &config.intake {
        Intake::Core => {
            metadata.insert("intake".to_string(), "core".to_string());
        }
        Intake::JetStream(js) => {
            metadata.insert("intake".to_string(), "jetstream".to_string());
            metadata.insert("stream".to_string(), js.stream.clone());
            metadata.insert("consumer".to_string(), js.consumer.clone());
        }
    }
    metadata
}

/// Register the service and answer its `status` endpoint until `cancel`, then deregister.
/// A registration that fails is logged and given up: discovery is a convenience, never a
/// reason to stop storing appends. `partitions`: as [`metadata`] says; the intake is set up
/// before the service is registered, so it is known here.
pub async fn serve(
    client: async_nats::Client,
    config: Arc<Config>,
    partitions: u32,
    metrics: Metrics,
    readiness: ReadinessCheck,
    cancel: CancellationToken,
) {
    let Some(service) = register(&client, &config, partitions, &metrics, &cancel).await else {
        return;
    };
    let id = service.info().await.id;
    let add = service
        .endpoint_builder()
        .name("status")
        .add(format!("{SERVICE_NAME}.status.{id}"));
    let endpoint = tokio::select! {
        _ = cancel.cancelled() => None,
        endpoint = add => Some(endpoint),
    };
    match endpoint {
        None => {}
        Some(Ok(requests)) => {
            let status = Status {
                id: &id,
                config: &config,
                metrics: &metrics,
                readiness: &readiness,
            };
            status.answer_until(requests, &cancel).await;
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "cannot add the service status endpoint");
            cancel.cancelled().await;
        }
    }
    // Stops the crate's own verb-handling task (PING/INFO/STATS) and the endpoint.
    if let Err(e) = service.stop().await {
        tracing::debug!(error = %e, "stopping the NATS service registration");
    }
}

/// Register with the service API, its `nats micro stats` data being [`counts`]. None when
/// `cancel` fired first or registering failed (logged).
async fn register(
    client: &async_nats::Client,
    config: &Config,
    partitions: u32,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> Option<Service> {
    let stats_metrics = metrics.clone();
    let register = client
        .service_builder()
        .description(format!(
            "logstore worker: appends on {} ({}), queries on {}",
            config.logs_subject,
            match config.intake {
                Intake::Core => "core NATS",
                Intake::JetStream(_) => "JetStream",
            },
            config.query_subject
        ))
        .metadata(metadata(config, partitions))
        .stats_handler(move |_endpoint, _stats| counts(&stats_metrics))
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"));
    // Registering subscribes, which waits on the connection: a shutdown must not wait for it.
    let started = tokio::select! {
        _ = cancel.cancelled() => return None,
        started = register => started,
    };
    match started {
        Ok(service) => Some(service),
        Err(e) => {
            tracing::warn!(error = %e, "cannot register with the NATS service API; `nats micro` will not list this worker");
            None
        }
    }
}

/// What the `status` endpoint answers from.
struct Status<'a> {
    /// The service instance's id (the endpoint's subject ends with it).
    id: &'a str,
    config: &'a Config,
    metrics: &'a Metrics,
    readiness: &'a ReadinessCheck,
}

impl Status<'_> {
    /// Answer the endpoint's requests until `cancel` fires or the endpoint ends.
    async fn answer_until(&self, mut requests: Endpoint, cancel: &CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                request = requests.next() => {
                    let Some(request) = request else { break };
                    self.answer(request).await;
                }
            }
        }
    }

    /// Answer one status request with the worker's readiness and [`counts`].
    async fn answer(&self, request: Request) {
        // The reply subject is the asker's choice (NATS_REPLY_PREFIXES). The crate's own
        // PING/INFO/STATS verbs answer any reply subject: deployments that let untrusted users
        // publish `$SRV.>` put them in an account of their own (deploy/nats/nats-server.conf),
        // where every reply is the server's.
        let reply = request.message.reply.as_deref().unwrap_or_default();
        if !self.config.replies.admits(reply) {
            self.metrics
                .replies_refused
                .with_label_values(&["status"])
                .inc();
            return;
        }
        let problems = (self.readiness)();
        let body = serde_json::json!({
            "id": self.id,
            "ready": problems.is_empty(),
            "problems": problems,
            "counts": counts(self.metrics),
        });
        if let Err(e) = request.respond(Ok(body.to_string().into())).await {
            tracing::debug!(error = %e, "cannot answer a service status request");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_each_label_over_shards() {
        let metrics = Metrics::new().expect("metrics register");
        metrics.shard("a").stored.inc_by(3);
        metrics.shard("b").stored.inc_by(2);
        metrics.shard("b").failed.inc();
        metrics.error("append", logstore_protocol::ErrorCode::Unavailable);
        let counts = counts(&metrics);
        assert_eq!(counts["appends"]["stored"], 5);
        assert_eq!(counts["appends"]["failed"], 1);
        assert_eq!(counts["errors"]["unavailable"], 1);
        assert_eq!(counts["errors"]["busy"], 0);
        assert_eq!(counts["in_flight"]["append"], 0);
    }
}
