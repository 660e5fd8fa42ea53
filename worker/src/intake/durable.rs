//! JetStream intake: the stream, its consumer and the intake lease set up (retrying until
//! NATS has them), the pull loop of the unordered intake, and the consumer-lag sampler. The
//! ordered puller (JS_ORDERED) is [`super::ordered`]; both hand messages to [`Router`].

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use tokio_util::sync::CancellationToken;

use super::partitions::{self, Partition};
use super::pull::{PullEnd, PullRequest, Pulled, Wait, PULL_RETRY_FIRST, PULL_RETRY_MAX};
use super::requests::Requests;
use super::route::Router;
use super::stream::{merged, partition_consumer, partition_filter, partition_max_ack_pending};
use super::{ordered, server};
use crate::cancel::{pause, Backoff};
use crate::config::JetStreamConfig;
use crate::metrics::Metrics;
use crate::nats::stream_missing;
use crate::origin::Held;
use logstore_protocol::partition::PARTITIONS_METADATA;

/// How often the consumer's lag is read from the server: as often as compose's Prometheus
/// scrapes, and one small JetStream API request per worker per period.
pub const LAG_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Pause between attempts to set the JetStream intake up.
const SETUP_RETRY: Duration = Duration::from_secs(1);

type Consumer = consumer::Consumer<consumer::pull::Config>;

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("cannot read JetStream stream {stream}: {source}")]
    ReadStream {
        stream: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("cannot create or update JetStream stream {stream}: {source}")]
    Stream {
        stream: String,
        #[source]
        source: jetstream::context::CreateStreamError,
    },
    #[error(transparent)]
    Lease(#[from] crate::lease::LeaseError),
    #[error("cannot create JetStream consumer {consumer}: {source}")]
    Consumer {
        consumer: String,
        #[source]
        source: jetstream::stream::ConsumerError,
    },
}

/// JetStream intake for appends plus the core request subscriptions.
/// With a `lease` (JS_ORDERED), appends are pulled by one worker at a time, in stream order
/// (see [`super::ordered`]); without, every worker pulls.
pub async fn run_jetstream(
    setup: JetStream,
    mut requests: Requests,
    router: Arc<Router>,
    cancel: CancellationToken,
) {
    let JetStream {
        consumer,
        lease,
        partitions,
        reset,
        ..
    } = setup;
    let appends = {
        let (router, cancel) = (router.clone(), cancel.clone());
        async move {
            match lease {
                Some(lease) => {
                    let lanes = partitions::run(&router, &lease, partitions, reset, &cancel);
                    let legacy = ordered::run(
                        &router,
                        &consumer,
                        lease.with_key(lease.key().to_string()),
                        reset,
                        &cancel,
                    );
                    futures::join!(legacy, lanes);
                }
                None => router.pull_loop(&consumer, &cancel).await,
            }
        }
    };
    let requests = async {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                message = requests.next() => match message {
                    Some((kind, message)) => router.request(kind, message).await,
                    None => return,
                },
            }
        }
        requests.drain().await;
        while let Some((kind, message)) = requests.next().await {
            router.request(kind, message).await;
        }
    };
    futures::join!(appends, requests);
}

/// Keep `logstore_jetstream_{pending,ack_pending,redelivered}_messages` current from the
/// server's consumer info, every [`LAG_SAMPLE_INTERVAL`], until `cancel`. The numbers describe
/// the consumer the whole fleet shares, so every worker exports the same values; sampling on
/// every worker means they are there as long as any worker is. A failed request leaves the last
/// values in place (and is logged when sampling starts and stops failing): the gauges then lag
/// by the outage, while the worker's own readiness reports the NATS problem.
pub async fn sample_consumer_lag(
    consumer: consumer::Consumer<consumer::pull::Config>,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let (stream, name) = {
        let info = consumer.cached_info();
        (info.stream_name.clone(), info.name.clone())
    };
    let labels = [stream.as_str(), name.as_str()];
    let pending = metrics.jetstream_pending.with_label_values(&labels);
    let ack_pending = metrics.jetstream_ack_pending.with_label_values(&labels);
    let redelivered = metrics.jetstream_redelivered.with_label_values(&labels);
    let mut failing = false;
    loop {
        // Bounded, so a request that never gets an answer cannot stop the sampling, and given
        // up on cancellation, so a shutdown never waits for it.
        let sample = tokio::select! {
            _ = cancel.cancelled() => return,
            sample = tokio::time::timeout(LAG_SAMPLE_INTERVAL, consumer.get_info()) => sample,
        };
        match sample {
            Ok(Ok(info)) => {
                pending.set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
                ack_pending.set(i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX));
                redelivered.set(i64::try_from(info.num_redelivered).unwrap_or(i64::MAX));
                if failing {
                    tracing::info!(%stream, consumer = %name, "JetStream consumer info available again");
                    failing = false;
                }
            }
            outcome => {
                if !failing {
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {LAG_SAMPLE_INTERVAL:?}"),
                    };
                    tracing::warn!(%stream, consumer = %name, %error, "cannot read JetStream consumer info; lag metrics are stale");
                    failing = true;
                }
            }
        }
        if !pause(&cancel, LAG_SAMPLE_INTERVAL).await {
            return;
        }
    }
}

/// The JetStream intake, set up: what [`run_jetstream`] pulls and the [`Router`] keys by.
pub struct JetStream {
    pub consumer: consumer::Consumer<consumer::pull::Config>,
    /// JS_ORDERED: the intake lease the pullers compete for.
    pub lease: Option<crate::lease::Lease>,
    /// The ordered intake's partitions (none without JS_ORDERED, or with JS_PARTITIONS=0 on a
    /// stream that records none).
    pub partitions: Vec<Partition>,
    /// Takeovers reset the consumer to its ack floor (nats-server 2.14+, one copy: see
    /// [`server::reset_is_safe`]) instead of waiting for ack_wait.
    pub reset: bool,
    /// See [`Router::stream_identity`].
    pub stream_identity: String,
}

/// Set the JetStream intake up, retrying every [`SETUP_RETRY`] while it fails (NATS may not be
/// up yet: the worker starts anyway and connects when it is), until `shutdown`: None then.
pub async fn setup_until<S>(
    client: &async_nats::Client,
    logs_subject: &str,
    js: &JetStreamConfig,
    shutdown: &mut S,
) -> Option<JetStream>
where
    S: std::future::Future<Output = ()> + Unpin,
{
    loop {
        tokio::select! {
            result = setup_once(client, logs_subject, js) => match result {
                Ok(setup) => return Some(setup),
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream not available yet; retrying");
                    tokio::time::sleep(SETUP_RETRY).await;
                }
            },
            _ = &mut *shutdown => return None,
        }
    }
}

/// One attempt at the stream, the consumer and (JS_ORDERED) the intake lease.
async fn setup_once(
    client: &async_nats::Client,
    logs_subject: &str,
    js: &JetStreamConfig,
) -> Result<JetStream, IntakeError> {
    let Setup {
        consumer,
        info: stream,
        partitions,
    } = setup_jetstream(client, logs_subject, js).await?;
    let lease = match js.ordered {
        true => {
            server::check_server(&client.server_info().version);
            Some(ordered::open_lease(client, js).await?)
        }
        false => None,
    };
    Ok(JetStream {
        consumer,
        lease,
        partitions,
        reset: server::reset_is_safe(&client.server_info().version, stream.config.num_replicas),
        stream_identity: format!(
            "js:{}:{}",
            stream.config.name,
            stream.created.unix_timestamp_nanos()
        ),
    })
}

/// Create or update the stream and the shared durable consumer. Every worker does this at start;
/// the operations are idempotent, so the first one creates and the rest confirm.
async fn setup_jetstream(
    client: &async_nats::Client,
    logs_subject: &str,
    config: &JetStreamConfig,
) -> Result<Setup, IntakeError> {
    let context = jetstream::new(client.clone());
    let wanted = wanted_stream(config);
    // Merged into what is there (never narrowing it); partitions only with the ordered intake.
    let configured = if config.ordered { config.partitions } else { 0 };
    // Only a stream that is not there is made from scratch: one that cannot be read now (no
    // leader during an election) is waited for, never overwritten with a narrower config.
    let existing = match context.get_stream(&config.stream).await {
        Ok(stream) => Some(stream.cached_info().config.clone()),
        Err(e) if stream_missing(&e) => None,
        Err(source) => {
            return Err(IntakeError::ReadStream {
                stream: config.stream.clone(),
                source,
            })
        }
    };
    let (stream_config, partitions) = merged(existing.as_ref(), wanted, logs_subject, configured);
    // Two workers starting together may race to create; the loser's update then succeeds.
    let info = retry_race("stream", || {
        context.create_or_update_stream(stream_config.clone())
    })
    .await
    .map_err(|source| IntakeError::Stream {
        stream: config.stream.clone(),
        source,
    })?;
    let consumer_config = consumer::pull::Config {
        durable_name: Some(config.consumer.clone()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        // The worker enforces JS_MAX_DELIVER itself (dead-lettering poison messages); the server
        // must keep redelivering messages whose shard is down, however long the outage.
        max_deliver: -1,
        max_ack_pending: config.max_ack_pending,
        filter_subject: logs_subject.to_string(),
        // As many copies as the stream has (a work-queue stream's consumers must match it):
        // JS_REPLICAS, or more where the stream already had more.
        num_replicas: info.config.num_replicas,
        ..Default::default()
    };
    let stream = context
        .get_stream(&config.stream)
        .await
        .map_err(|e| IntakeError::Consumer {
            consumer: config.consumer.clone(),
            source: jetstream::stream::ConsumerError::with_source(
                jetstream::stream::ConsumerErrorKind::Other,
                e,
            ),
        })?;
    let consumer = create_consumer(&stream, consumer_config.clone()).await?;
    let lanes = match config.ordered {
        true => {
            partition_consumers(&stream, &consumer_config, logs_subject, config, partitions).await?
        }
        false => {
            if partitions > 0 {
                tracing::warn!(partitions, "the stream has partitions, which only ordered workers (JS_ORDERED=true) pull; this worker pulls the `logs` lane only");
            }
            Vec::new()
        }
    };
    Ok(Setup {
        consumer,
        info,
        partitions: lanes,
    })
}

/// The stream as this worker's settings describe it, before merging with what is there.
fn wanted_stream(config: &JetStreamConfig) -> stream::Config {
    stream::Config {
        name: config.stream.clone(),
        // The stream is an intake buffer, not the store: each append is consumed once and
        // deleted when a worker acknowledges it (after its Postgres commit).
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        // When full, refuse new publishes (the publisher sees an error and can retry) rather
        // than silently dropping older appends that were never stored.
        discard: stream::DiscardPolicy::New,
        max_bytes: config.max_bytes,
        max_messages: config.max_messages,
        // Keys are per object (the database deduplicates them, forever); the stream's own
        // dedupe of `Nats-Msg-Id` is per stream and drops an append to object 9 that reuses
        // object 8's id within the window, so the window is short (JS_DUPLICATE_WINDOW_MS).
        duplicate_window: config.duplicate_window,
        // On a cluster: each publish is acknowledged once a majority of these servers has it.
        num_replicas: config.replicas,
        ..Default::default()
    }
}

/// How often a worker checks that the stream still takes the partitions' subjects and has its
/// copies.
const STREAM_CHECK: Duration = Duration::from_secs(10);

/// Until `cancel`: every [`STREAM_CHECK`], put back what a worker of an older version took
/// away from the stream by rewriting its config (the partition subjects, the transform, the
/// recorded count, the replicas it had). Meanwhile publishers to `logs.<id>` get no
/// acknowledgement and retry; nothing stored is lost.
pub async fn keep_stream(
    client: async_nats::Client,
    logs_subject: String,
    config: JetStreamConfig,
    partitions: u32,
    cancel: CancellationToken,
) {
    let context = jetstream::new(client);
    while pause(&cancel, STREAM_CHECK).await {
        let existing = match context.get_stream(&config.stream).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => info.config.clone(),
                Err(_) => continue,
            },
            Err(_) => continue,
        };
        let (merged, _) = merged(
            Some(&existing),
            wanted_stream(&config),
            &logs_subject,
            partitions,
        );
        let narrowed = merged.subjects != existing.subjects
            || merged.subject_transform != existing.subject_transform
            || merged.metadata.get(PARTITIONS_METADATA)
                != existing.metadata.get(PARTITIONS_METADATA)
            || merged.num_replicas != existing.num_replicas;
        if !narrowed {
            continue;
        }
        let replicas = (existing.num_replicas, merged.num_replicas);
        match context.update_stream(merged).await {
            Ok(_) => {
                tracing::warn!(stream = %config.stream, ?replicas, "the stream had lost subjects or copies (rewritten by an older worker?); put them back")
            }
            Err(e) => {
                tracing::warn!(stream = %config.stream, ?replicas, error = %e, "cannot put the stream's subjects or copies back; retrying")
            }
        }
    }
}

/// The durable consumers of the stream's `partitions`, made like `base` (the `logs` lane's).
async fn partition_consumers(
    stream: &stream::Stream,
    base: &consumer::pull::Config,
    logs_subject: &str,
    config: &JetStreamConfig,
    partitions: u32,
) -> Result<Vec<Partition>, IntakeError> {
    let mut lanes = Vec::new();
    for k in 0..partitions {
        let config = consumer::pull::Config {
            durable_name: Some(partition_consumer(&config.consumer, k)),
            filter_subject: partition_filter(logs_subject, k),
            max_ack_pending: partition_max_ack_pending(config.max_ack_pending, partitions),
            ..base.clone()
        };
        lanes.push(Partition {
            k,
            consumer: create_consumer(stream, config).await?,
            held: Held::default(),
        });
    }
    Ok(lanes)
}

/// Create (or confirm) one durable consumer, retrying a race with another worker.
async fn create_consumer(
    stream: &stream::Stream,
    config: consumer::pull::Config,
) -> Result<Consumer, IntakeError> {
    let name = config.durable_name.clone().unwrap_or_default();
    retry_race("consumer", || stream.create_consumer(config.clone()))
        .await
        .map_err(|source| IntakeError::Consumer {
            consumer: name,
            source,
        })
}

/// What [`setup_jetstream`] made.
struct Setup {
    /// The `logs` lane's consumer.
    consumer: Consumer,
    info: stream::Info,
    partitions: Vec<Partition>,
}

/// Retry an idempotent setup call a few times with growing pauses: workers starting together
/// race on creating the same stream or consumer, and the loser's second try succeeds.
async fn retry_race<T, E: std::fmt::Display, F>(
    what: &str,
    mut call: impl FnMut() -> F,
) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Err(e) if attempt < 5 => {
                attempt += 1;
                tracing::debug!(error = %e, attempt, "{what} setup raced; retrying");
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            result => return result,
        }
    }
}

impl Router {
    /// Pull and route until `cancel`, one pull request at a time, routing each batch whole (in
    /// stream order) before asking for the next. Not pipelined on purpose: async-nats gives up
    /// on a pull's buffered messages `expires` + 5 s after the request, so a request made ahead
    /// of time, while another batch is routed into full queues, could have its messages
    /// abandoned to wait out ack_wait; and keeping one outstanding measured no faster on 16
    /// cores (BENCHMARKS.md). After `cancel`, the batch in hand is still routed: nothing
    /// delivered here waits for ack_wait.
    async fn pull_loop(
        &self,
        consumer: &consumer::Consumer<consumer::pull::Config>,
        cancel: &CancellationToken,
    ) {
        self.metrics.jetstream_pulling.set(1);
        let mut backoff = Backoff::new(PULL_RETRY_FIRST, PULL_RETRY_MAX);
        while !cancel.is_cancelled() {
            let served = match self.request_batch(consumer, Wait::Full).await {
                Some(batch) => self.route_batch(batch).await,
                None => false,
            };
            if served {
                backoff.reset();
            } else {
                pause(cancel, backoff.next_pause()).await;
            }
        }
        self.metrics.jetstream_pulling.set(0);
    }

    /// Route the messages of one pull. False when the pull was refused or cut short (no
    /// consumer leader during an election, say).
    async fn route_batch(&self, mut pull: PullRequest) -> bool {
        let mut routed = 0usize;
        loop {
            match pull.next().await {
                Pulled::Message(message) => {
                    routed += 1;
                    self.jetstream_append(*message).await;
                }
                Pulled::End(PullEnd::Ended) => return true,
                // A refusal after messages (a limit reached) still delivered them all.
                Pulled::End(PullEnd::Refused) => return routed > 0,
                Pulled::End(PullEnd::Cut) => {
                    tracing::debug!(routed, "JetStream pull cut short; retrying");
                    return false;
                }
            }
        }
    }
}
