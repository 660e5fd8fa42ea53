//! The composition root behind [`crate::run`] and [`crate::run_on`]: what a worker is made of
//! and in which order it starts and stops.
//!
//! 1. [`Parts::build`]: open the shards (a database of another shard stops the start here),
//!    connect NATS, build the machinery the lanes share and the lanes themselves.
//! 2. Serve `/metrics` and `/readyz`, route by the fleet's ring record and follow it
//!    ([`Parts::follow_ring`]), then subscribe and start the intake ([`Parts::start_intake`]).
//! 3. On `shutdown`: stop taking messages, let the pipelines finish and answer what was
//!    received, flush the outbox, stop the background tasks ([`Parts::until_stopped`],
//!    [`Parts::drain`]), all within SHUTDOWN_TIMEOUT_MS.
//!
//! Background tasks (HTTP, health checks, the ring, the mover, the service registration, the
//! dead-letter stream's set-up) stop on one cancellation token;
//! work tasks (pipelines, queries) stop when their input ends, so nothing received is abandoned.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subscriber;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cancel::until_cancelled;
use crate::config::{Config, Intake};
use crate::metrics::Metrics;
use crate::origin::{self, Settler};
use crate::outbox::Outbox;
use crate::query::Queries;
use crate::shards::{self, Shards};
use crate::store::StoreError;
use crate::{dead_letters, http, intake, mover, pipeline, service};

/// How long a starting worker waits for the fleet's ring record before it routes by
/// POSTGRES_SHARDS (and keeps trying in the background).
const RING_LOAD_WAIT: Duration = Duration::from_secs(3);
/// How long the background tasks get to stop once the work is done.
const BACKGROUND_STOP_WAIT: Duration = Duration::from_secs(2);

/// Why the worker could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on METRICS_ADDR {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// NATS refused the login or the TLS handshake at start (or, with retries, the client
    /// could not be set up at all).
    #[error(transparent)]
    Nats(#[from] logstore_protocol::nats::ConnectFailure),
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Intake(#[from] intake::IntakeError),
    #[error("{0}")]
    Setup(String),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Shutdown ran out of SHUTDOWN_TIMEOUT_MS before everything received was settled.
    #[error(
        "shutdown timed out: {appends} appends and {queries} queries unanswered, outbox {}",
        if *.flushed { "flushed" } else { "not flushed (NATS unreachable?)" }
    )]
    Unsettled {
        appends: i64,
        queries: i64,
        flushed: bool,
    },
}

/// Run a worker until `shutdown` completes, then stop taking messages, finish and answer
/// everything already received, and return. Binds METRICS_ADDR, then [`run_on`].
pub async fn run(config: Arc<Config>, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| Error::Listen {
            addr: config.metrics_addr,
            source,
        })?;
    run_on(config, listener, shutdown).await
}

/// [`run`] on a listener the caller has bound already (`/metrics`, `/healthz` and `/readyz`
/// are served there; `config.metrics_addr` is not bound again), so a caller that needs the
/// address before the worker starts, such as a test, never races another process for it.
pub async fn run_on(
    config: Arc<Config>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let started = std::time::SystemTime::now();
    let metrics = Metrics::new()?;
    // What was bound, not what was asked: METRICS_ADDR may name port 0 or every interface.
    let metrics_addr = listener.local_addr().unwrap_or(config.metrics_addr);
    tracing::info!(addr = %metrics_addr, "serving /metrics, /healthz and /readyz");
    let parts = Parts::build(config, metrics).await?;
    let readiness = parts.readiness();
    parts.background.spawn(http::serve(
        listener,
        parts.metrics.clone(),
        readiness.clone(),
        parts.cancel.clone(),
        parts.background.clone(),
    ));
    parts.follow_ring().await;
    parts.keep_dead_letters();
    tokio::pin!(shutdown);
    let intake = parts.start_intake(&mut shutdown).await?;
    parts
        .announce(
            intake.shutdown_seen,
            intake.partitions,
            readiness,
            metrics_addr,
            started,
        )
        .await;
    let deadline = parts.until_stopped(intake, shutdown).await;
    parts.drain(deadline).await
}

/// What the worker runs on, built before it takes a message. Dropped at the end of [`run_on`].
struct Parts {
    config: Arc<Config>,
    metrics: Metrics,
    client: async_nats::Client,
    outbox: Outbox,
    settler: Settler,
    queries: Queries,
    shards: Arc<Shards>,
    /// Background tasks (HTTP, health checks, the ring, the mover) stop on it.
    cancel: CancellationToken,
    background: TaskTracker,
    /// Work tasks (pipelines, queries) stop when their input ends, so nothing received is
    /// abandoned.
    work: TaskTracker,
    /// Ready only while subscribed: before the subscriptions exist and once draining starts,
    /// a load balancer or test must not count on this worker taking messages.
    subscribed: Arc<AtomicBool>,
}

/// The running intake: appends and requests until its input ends.
struct Started {
    /// Boxed so it can be dropped early: dropping it drops the router, which closes the queues.
    task: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Shutdown came before the intake ever started (JetStream never reachable).
    shutdown_seen: bool,
    /// The stream's partitions this intake takes (0: none, or core intake), for the service
    /// metadata publishers read.
    partitions: u32,
}

impl Parts {
    /// Open the shards (a database of another shard name stops the start before anything else
    /// happens), connect NATS and build the machinery the lanes share.
    async fn build(config: Arc<Config>, metrics: Metrics) -> Result<Parts, Error> {
        let cancel = CancellationToken::new();
        let background = TaskTracker::new();
        let work = TaskTracker::new();
        let opened = config
            .shards
            .iter()
            .map(|shard| shards::open(&config, &metrics, shard))
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Setup)?;
        shards::initialise(
            &opened,
            &metrics,
            "shard unreachable at start; its objects answer `unavailable` until it is back",
        )
        .await?;
        let client = crate::nats::connect(&config, &metrics).await?;
        let outbox = Outbox::new(
            client.clone(),
            &config.events_prefix,
            &config.rejected_prefix,
            &config.dead_letter_subject,
            &config.response_subject,
            metrics.clone(),
        );
        let settler = Settler {
            outbox: outbox.clone(),
            max_deliver: match &config.intake {
                Intake::JetStream(js) => js.max_deliver,
                Intake::Core => 1,
            },
            metrics: metrics.clone(),
        };
        let queries = Queries::new(
            outbox.clone(),
            metrics.clone(),
            work.clone(),
            config.max_pending_queries,
            config.max_concurrent_queries,
            config.query_timeout,
            config.max_query_bytes,
        );
        let settings = pipeline::Settings {
            settler: settler.clone(),
            queries: queries.clone(),
            metrics: metrics.clone(),
            batch_max_rows: config.batch_max_rows,
            batch_linger: config.batch_linger,
            // Leave at least half of each pool to the shard's appends.
            queries_per_shard: (config.pool_size / 2).max(1),
            cancel: cancel.clone(),
        };
        let tasks = shards::Tasks {
            work: work.clone(),
            background: background.clone(),
            cancel: cancel.clone(),
        };
        let shards = Shards::new(config.clone(), metrics.clone(), opened, settings, tasks);
        Ok(Parts {
            config,
            metrics,
            client,
            outbox,
            settler,
            queries,
            shards,
            cancel,
            background,
            work,
            subscribed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// What `/readyz` and the service API report.
    fn readiness(&self) -> http::ReadinessCheck {
        let client = self.client.clone();
        let shards = self.shards.clone();
        let subscribed = self.subscribed.clone();
        Arc::new(move || readiness_problems(&client, &shards, &subscribed))
    }

    /// Route by the fleet's ring record before taking work (when NATS is up, and a few seconds
    /// at most: without it, by POSTGRES_SHARDS at epoch 0, which the shards' fences refuse if
    /// the fleet moved on), then follow it, and take a move up when one is written.
    async fn follow_ring(&self) {
        if self.client.connection_state() == async_nats::connection::State::Connected {
            self.shards.load(&self.client, RING_LOAD_WAIT).await;
        }
        // Both stop at once on `cancel`, whatever NATS or a shard is doing (a move cut short is
        // rolled back and taken up again; its lease expires by itself).
        self.background.spawn(until_cancelled(
            self.cancel.clone(),
            self.shards
                .clone()
                .follow(self.client.clone(), self.cancel.clone()),
        ));
        // Stops at once on `cancel` by itself, releasing the mover's lease on the way out.
        self.background.spawn(mover::run(
            self.shards.clone(),
            self.client.clone(),
            self.metrics.clone(),
            self.cancel.clone(),
        ));
    }

    /// Keep the last dead letters in their JetStream stream (DEAD_LETTERS_STREAM), unless off.
    fn keep_dead_letters(&self) {
        if let Some(settings) = &self.config.dead_letters {
            self.background.spawn(dead_letters::keep(
                self.client.clone(),
                self.config.dead_letter_subject.clone(),
                settings.clone(),
                self.cancel.clone(),
            ));
        }
    }

    async fn subscribe(&self, subject: &str) -> Result<Subscriber, Error> {
        self.client
            .queue_subscribe(subject.to_string(), self.config.queue_group.clone())
            .await
            .map_err(|source| Error::Subscribe {
                subject: subject.to_string(),
                source,
            })
    }

    /// Subscribe and start taking messages. With JetStream, waits for it (NATS may not be up
    /// yet) unless `shutdown` comes first.
    async fn start_intake<S>(&self, shutdown: &mut S) -> Result<Started, Error>
    where
        S: Future<Output = ()> + Unpin,
    {
        let config = &self.config;
        let requests = intake::Requests {
            query: self.subscribe(&config.query_subject).await?,
            stats: self.subscribe(&config.stats_subject).await?,
            delete: self.subscribe(&config.delete_subject).await?,
        };
        let mut partitions = 0;
        let task: Pin<Box<dyn Future<Output = ()> + Send>> = match &config.intake {
            Intake::Core => {
                let logs = self.subscribe(&config.logs_subject).await?;
                let router = Arc::new(self.router(None, 0));
                Box::pin(intake::run_core(
                    logs,
                    requests,
                    router,
                    self.cancel.clone(),
                ))
            }
            Intake::JetStream(js) => {
                let setup =
                    intake::setup_until(&self.client, &config.logs_subject, js, shutdown).await;
                let Some(setup) = setup else {
                    // Shut down before JetStream was ever reachable: nothing was taken in.
                    self.cancel.cancel();
                    return Ok(Started {
                        task: Box::pin(async {}),
                        shutdown_seen: true,
                        partitions: 0,
                    });
                };
                // Puts back the partitions' subjects and the stream's copies (JS_REPLICAS)
                // should a worker of an older version narrow them.
                self.background.spawn(intake::keep_stream(
                    self.client.clone(),
                    config.logs_subject.clone(),
                    js.clone(),
                    setup.partitions.len() as u32,
                    self.cancel.clone(),
                ));
                self.background.spawn(intake::sample_consumer_lag(
                    setup.consumer.clone(),
                    self.metrics.clone(),
                    self.cancel.clone(),
                ));
                partitions = setup.partitions.len() as u32;
                let router = Arc::new(self.router(Some(setup.stream_identity.clone()), partitions));
                Box::pin(intake::run_jetstream(
                    setup,
                    requests,
                    router,
                    self.cancel.clone(),
                ))
            }
        };
        Ok(Started {
            task,
            shutdown_seen: false,
            partitions,
        })
    }

    /// The router of this worker's intake; `stream_identity` with JetStream.
    /// The router of this worker's intake; `partitions`: the stream's partition count.
    fn router(&self, stream_identity: Option<String>, partitions: u32) -> intake::Router {
        let config = &self.config;
        intake::Router {
            shards: self.shards.clone(),
            limits: config.limits,
            max_batch_entries: config.max_batch_entries,
            settler: self.settler.clone(),
            queries: self.queries.clone(),
            metrics: self.metrics.clone(),
            shard_timeout: config.shard_timeout,
            stream_identity,
            ordered: match &config.intake {
                Intake::JetStream(js) if js.ordered => Some(self.cancel.clone()),
                _ => None,
            },
            held: origin::Held::default(),
            unfinished: Arc::default(),
            partitions,
            logs_subject: config.logs_subject.clone(),
            replies: config.replies.clone(),
            jetstream: async_nats::jetstream::new(self.client.clone()),
        }
    }

    /// Call this worker ready (once the server has its subscriptions), make it discoverable
    /// (after the intake's set-up, so the service metadata names the partitions it takes) and
    /// say it started.
    async fn announce(
        &self,
        shutdown_seen: bool,
        partitions: u32,
        readiness: http::ReadinessCheck,
        metrics_addr: SocketAddr,
        started: std::time::SystemTime,
    ) {
        let (config, client) = (&self.config, &self.client);
        if client.connection_state() == async_nats::connection::State::Connected {
            // Make sure the server has the subscriptions before this worker calls itself ready.
            if let Err(e) = client.flush().await {
                tracing::warn!(error = %e, "NATS flush after subscribing failed");
            }
        }
        self.subscribed.store(true, Ordering::Release);
        if !shutdown_seen {
            // Discoverable only once it takes work; it deregisters when shutdown begins.
            let sources = service::Sources {
                client: client.clone(),
                config: config.clone(),
                partitions,
                metrics: self.metrics.clone(),
                readiness,
                shards: self.shards.clone(),
                started,
            };
            self.background
                .spawn(service::serve(sources, self.cancel.clone()));
        }
        // Every value as a person writes it in the settings (`retention=off`, `retention=7d`).
        tracing::info!(
            intake = %match config.intake { Intake::Core => "core", Intake::JetStream(_) => "jetstream" },
            logs = %config.logs_subject,
            query = %config.query_subject,
            stats = %config.stats_subject,
            delete = %config.delete_subject,
            retention = %crate::config::shown::retention(config.retention),
            group = %config.queue_group,
            shards = self.shards.all().len(),
            metrics = %metrics_addr,
            "worker started"
        );
    }

    /// Take messages until `shutdown` (or the intake ends by itself), then stop taking them:
    /// the deadline that bounds the rest of the shutdown, whatever NATS and Postgres do.
    async fn until_stopped<S>(&self, mut intake: Started, shutdown: S) -> Instant
    where
        S: Future<Output = ()>,
    {
        let timeout = self.config.shutdown_timeout;
        let deadline = tokio::select! {
            _ = &mut intake.task => {
                self.cancel.cancel();
                Instant::now() + timeout
            }
            _ = shutdown, if !intake.shutdown_seen => {
                tracing::info!("shutting down: no new messages; finishing in-flight work");
                let now = Instant::now();
                self.subscribed.store(false, Ordering::Release);
                self.cancel.cancel();
                // Draining gets three quarters, so a hung drain (NATS unreachable) still leaves
                // time to finish and answer what was already received.
                let drain_deadline = now + timeout * 3 / 4;
                if tokio::time::timeout_at(drain_deadline, &mut intake.task).await.is_err() {
                    tracing::warn!("draining NATS subscriptions did not finish in time");
                }
                now + timeout
            }
        };
        // Dropping the intake drops the router: the queues it fed can close.
        drop(intake);
        deadline
    }

    /// Finish and answer what was received, by `deadline`: the pipelines end once their queues
    /// are empty, then the outbox is flushed and the background tasks stop.
    async fn drain(self, deadline: Instant) -> Result<(), Error> {
        let Parts {
            client,
            outbox,
            shards,
            metrics,
            background,
            work,
            ..
        } = self;
        let pools = shards.all();
        shards.close();
        work.close();
        if tokio::time::timeout_at(deadline, work.wait())
            .await
            .is_err()
        {
            tracing::error!(
                unfinished = work.len(),
                "shutdown timed out with work in flight"
            );
        }
        // Replies, events and acks reach the server only with a connection; a worker that never
        // received anything (NATS unreachable all along) has nothing to flush.
        let received_any = client.statistics().in_messages.load(Ordering::Relaxed) > 0;
        let flushed =
            !received_any || tokio::time::timeout_at(deadline, outbox.flush()).await == Ok(true);
        background.close();
        if tokio::time::timeout(BACKGROUND_STOP_WAIT, background.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                unfinished = background.len(),
                "background tasks did not stop in time"
            );
        }
        for shard in pools {
            shard.close();
        }
        let (appends, queries) = (
            metrics.appends_in_flight.get(),
            metrics.queries_in_flight.get(),
        );
        if appends > 0 || queries > 0 || !flushed {
            return Err(Error::Unsettled {
                appends,
                queries,
                flushed,
            });
        }
        tracing::info!("worker stopped");
        Ok(())
    }
}

fn readiness_problems(
    client: &async_nats::Client,
    shards: &shards::Shards,
    subscribed: &AtomicBool,
) -> Vec<String> {
    let mut problems = Vec::new();
    if !subscribed.load(Ordering::Acquire) {
        problems.push("intake: not subscribed (starting or draining)".to_string());
    }
    let state = client.connection_state();
    if state != async_nats::connection::State::Connected {
        problems.push(format!("nats: {state}"));
    }
    problems.extend(shards.problems());
    problems
}
