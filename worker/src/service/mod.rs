//! Registration with the NATS service API (ADR-32, "micro"), so `nats micro ls`, `nats micro
//! info logstore` and `nats micro stats logstore` list every running worker, and `logstore
//! status` finds them.
//!
//! The service API's endpoints cannot carry the worker's real work without changing it: an
//! endpoint is a queue subscription the `service` module creates and owns, which the worker
//! could not drain on shutdown (it can only be unsubscribed, dropping what is in flight), and
//! JetStream appends do not arrive on a subscription at all but from a pull consumer. So `logs`
//! and `query` stay the worker's own subscriptions, unchanged, and the service is registered
//! for discovery and statistics:
//! - its metadata names the subjects, queue group, intake, stream and consumer, the ring's
//!   shards and the metrics address, so `nats micro info` shows where each worker takes its
//!   work from;
//! - one endpoint, `status`, on a subject of its own per registration
//!   (`logstore.status.<id>`), answers what the worker knows ([`answer`]): readiness and
//!   counts, the partitions it pulls and the consumers' lag, the ring and the move's progress,
//!   its shards up or down. The counts are also the endpoint's `data` in `nats micro stats`.
//!
//! The crate fixes a service's metadata when it is registered, and has no way to change it.
//! So when the ring's members change (`worker shards add/remove`: the record of the new epoch
//! names them), the worker registers again with the new metadata and then stops the old
//! registration: for a moment both answer (the metadata key `worker`, the same in both, tells
//! they are one worker), never neither. Only the status endpoint goes with it; appends and
//! queries are not the service's. (The epoch and move state are in the status answer, not in
//! the metadata: a move would otherwise register every worker three times.)
//!
//! The service stops answering when shutdown begins, so a draining worker leaves the listing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use async_nats::service::endpoint::Endpoint;
use async_nats::service::{Service, ServiceExt};
use futures::StreamExt;
use logstore_protocol::status::{STATUS_ENDPOINT, WORKER_KEY};
use logstore_protocol::Timestamp;
use prometheus::core::Collector;
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Intake};
use crate::http::ReadinessCheck;
use crate::metrics::Metrics;
use crate::ring::Record;
use crate::shards::Shards;

mod answer;

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

/// What the service says and answers from.
#[derive(Clone)]
pub struct Sources {
    pub client: async_nats::Client,
    pub config: Arc<Config>,
    /// The stream's partitions this worker's intake takes (0 with core intake, with
    /// JS_PARTITIONS=0 on a stream that records none, and for a worker that is not ordered):
    /// publishers send each object's appends on its own lane (`logs.<id>`) only when every
    /// worker says the same P > 0 ([`logstore_protocol::discover`]). The intake is set up
    /// before the service is registered, so it is known here.
    pub partitions: u32,
    pub metrics: Metrics,
    pub readiness: ReadinessCheck,
    pub shards: Arc<Shards>,
    /// When the worker started.
    pub started: SystemTime,
}

/// The service metadata: where this worker takes its work from, and the ring (`record`) it
/// routes by. `worker`: this process's id, the same in every registration.
fn metadata(sources: &Sources, worker: &str, record: &Record) -> HashMap<String, String> {
    let config = &sources.config;
    let mut metadata = HashMap::from([
        ("logs_subject", config.logs_subject.clone()),
        ("query_subject", config.query_subject.clone()),
        ("queue_group", config.queue_group.clone()),
        ("response_subject", config.response_subject.clone()),
        ("events_prefix", config.events_prefix.clone()),
        ("rejected_prefix", config.rejected_prefix.clone()),
        ("dead_letter_subject", config.dead_letter_subject.clone()),
        ("shards", Record::names(&record.members).join(",")),
        ("metrics_addr", config.metrics_addr.to_string()),
        (
            logstore_protocol::discover::PARTITIONS_KEY,
            sources.partitions.to_string(),
        ),
        (WORKER_KEY, worker.to_string()),
        (
            "started",
            Timestamp::from_system_time(sources.started).to_string(),
        ),
    ]);
    match &config.intake {
        Intake::Core => {
            metadata.insert("intake", "core".to_string());
        }
        Intake::JetStream(js) => {
            metadata.insert("intake", "jetstream".to_string());
            metadata.insert("stream", js.stream.clone());
            metadata.insert("consumer", js.consumer.clone());
        }
    }
    metadata
        .into_iter()
        .map(|(key, value)| (key.to_string(), value))
        .collect()
}

/// One registration with the service API and its status endpoint.
struct Registration {
    service: Service,
    requests: Endpoint,
    id: String,
}

impl Registration {
    /// Stop answering: the crate's own verb-handling task (PING/INFO/STATS) and the endpoint.
    async fn stop(self) {
        drop(self.requests);
        if let Err(e) = self.service.stop().await {
            tracing::debug!(error = %e, "stopping the NATS service registration");
        }
    }
}

/// Register the service and answer its `status` endpoint until `cancel`, registering again
/// whenever the metadata changes (the ring's members); then deregister. A registration that
/// fails is logged and tried again at the next ring change: discovery is a convenience, never
/// a reason to stop storing appends.
pub async fn serve(sources: Sources, cancel: CancellationToken) {
    let worker = format!("{:016x}", rand::random::<u64>());
    let mut ring = sources.shards.ring();
    let mut current: Option<Registration> = None;
    // The metadata last tried: a registration that failed is not tried again until it changes.
    let mut tried: Option<HashMap<String, String>> = None;
    loop {
        ring.borrow_and_update();
        let wanted = metadata(&sources, &worker, &sources.shards.view().layout.record);
        if tried.as_ref() != Some(&wanted) {
            tried = Some(wanted.clone());
            match register(&sources, wanted, &cancel).await {
                // The new one answers before the old one stops: never neither.
                Some(next) => {
                    if let Some(old) = current.replace(next) {
                        old.stop().await;
                    }
                }
                None if cancel.is_cancelled() => break,
                None => {}
            }
        }
        let request = async {
            match current.as_mut() {
                Some(registration) => registration.requests.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = ring.changed() => {
                if changed.is_err() {
                    // The shards are gone: nothing changes any more.
                    cancel.cancelled().await;
                    break;
                }
            }
            request = request => match (request, current.as_ref()) {
                (Some(request), Some(registration)) => {
                    answer::answer(&sources, &registration.id, &worker, request).await;
                }
                // The endpoint ended (the connection closed for good): register again once.
                _ => {
                    if let Some(old) = current.take() {
                        old.stop().await;
                    }
                    tried = None;
                }
            },
        }
    }
    if let Some(current) = current {
        current.stop().await;
    }
}

/// Register with the service API (its `nats micro stats` data being [`counts`]) and add the
/// status endpoint. None when `cancel` fired first or registering failed (logged).
async fn register(
    sources: &Sources,
    metadata: HashMap<String, String>,
    cancel: &CancellationToken,
) -> Option<Registration> {
    let config = &sources.config;
    let stats_metrics = sources.metrics.clone();
    let register = async {
        let service = sources
            .client
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
            .metadata(metadata)
            .stats_handler(move |_endpoint, _stats| counts(&stats_metrics))
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await?;
        let id = service.info().await.id;
        let added = service
            .endpoint_builder()
            .name(STATUS_ENDPOINT)
            .add(format!("{SERVICE_NAME}.status.{id}"))
            .await;
        match added {
            Ok(requests) => Ok(Registration {
                service,
                requests,
                id,
            }),
            Err(e) => {
                let _ = service.stop().await;
                Err(e)
            }
        }
    };
    // Registering subscribes, which waits on the connection: a shutdown must not wait for it.
    let started = tokio::select! {
        _ = cancel.cancelled() => return None,
        started = register => started,
    };
    match started {
        Ok(registration) => Some(registration),
        Err(e) => {
            tracing::warn!(error = %e, "cannot register with the NATS service API; `nats micro` and `logstore status` will not list this worker");
            None
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
