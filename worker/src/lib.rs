//! The logstore worker as a library: `main.rs` parses the configuration and calls [`run`];
//! tests call [`run`] directly.
//!
//! # Layout
//! Data flows one way, top to bottom:
//! - [`config`]: settings from env/CLI, validated once into an `Arc<Config>`.
//! - [`intake`]: the NATS queue subscriptions; decodes and validates, rejects bad input.
//! - [`ring`]: which shard owns an object id at which epoch, and the fleet's ring record in
//!   NATS; [`shards`]: the live set of shards (pools, pipelines, health) that record names;
//!   [`mover`]: carries a ring change out; [`admin`]: `worker shards add/remove/status`.
//! - [`pipeline`]: per-shard queue; batches appends into one transaction, starts queries after
//!   the appends received before them; never lets a hung shard stall intake.
//! - [`origin`]: a message's fate once its outcome is known: reply, event, ack / nak / term,
//!   dead letter, in-flight gauge.
//! - [`query`]: query, stats and delete admission, deadlines and slots; streams answers in
//!   chunks.
//! - [`store`]: PostgreSQL: pools, migrations, shard identity, the append function, paged reads,
//!   stats and deletion.
//! - [`retention`]: the RETENTION_MAX_AGE sweeper, a background task per shard.
//! - [`outbox`]: replies, `appended.<id>` events, response chunks, errors and dead letters.
//! - [`metrics`] and [`http`]: Prometheus metrics, `/metrics`, `/healthz`, `/readyz`.
//! - [`service`]: registration with the NATS service API (`nats micro ls/info/stats`).

pub mod admin;
pub mod cancel;
pub mod config;
pub mod http;
pub mod intake;
pub mod lease;
pub mod metrics;
pub mod mover;
pub mod ordered;
pub mod origin;
pub mod outbox;
pub mod pgtls;
pub mod pipeline;
pub mod query;
pub mod replies;
pub mod retention;
pub mod ring;
pub mod service;
pub mod shards;
pub mod store;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Intake};
use crate::metrics::Metrics;
use crate::store::{Shard, StoreError};

pub use logstore_protocol::chain::Chain;

/// How long a starting worker waits for the fleet's ring record before it routes by
/// POSTGRES_SHARDS (and keeps trying in the background).
const RING_LOAD_WAIT: Duration = Duration::from_secs(3);

/// How often each shard is health-checked (and, while it has never been reachable, retried).
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

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
/// everything already received, and return.
pub async fn run(config: Arc<Config>, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let metrics = Metrics::new()?;
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(|source| Error::Listen {
            addr: config.metrics_addr,
            source,
        })?;
    // What was bound, not what was asked: METRICS_ADDR may name port 0 or every interface.
    let metrics_addr = listener.local_addr().unwrap_or(config.metrics_addr);
    tracing::info!(addr = %metrics_addr, "serving /metrics, /healthz and /readyz");

    let cancel = CancellationToken::new();
    // Background tasks (HTTP, health checks) stop on `cancel`; work tasks (pipelines, queries)
    // stop when their input ends, so nothing received is abandoned.
    let background = TaskTracker::new();
    let work = TaskTracker::new();

    // The shards first: a database that belongs to another shard name stops the start before
    // anything else happens.
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
    let client = connect_nats(&config, &metrics).await?;
    let outbox = outbox::Outbox::new(
        client.clone(),
        &config.events_prefix,
        &config.dead_letter_subject,
        &config.response_subject,
        metrics.clone(),
    );
    let settler = origin::Settler {
        outbox: outbox.clone(),
        max_deliver: match &config.intake {
            Intake::JetStream(js) => js.max_deliver,
            Intake::Core => 1,
        },
        metrics: metrics.clone(),
    };
    let query_machinery = query::Queries::new(
        outbox.clone(),
        metrics.clone(),
        work.clone(),
        config.max_pending_queries,
        config.max_concurrent_queries,
        config.query_timeout,
        config.max_query_bytes,
    );
    let shards = shards::Shards::new(
        config.clone(),
        metrics.clone(),
        opened,
        |fleet| {
            query_machinery.attach(fleet.clone());
            pipeline::Context {
                settler: settler.clone(),
                queries: query_machinery.clone(),
                metrics: metrics.clone(),
                batch_max_rows: config.batch_max_rows,
                batch_linger: config.batch_linger,
                // Leave at least half of each pool to the shard's appends.
                queries_per_shard: (config.pool_size / 2).max(1),
                cancel: cancel.clone(),
                fleet,
            }
        },
        shards::Tasks {
            work: work.clone(),
            background: background.clone(),
            cancel: cancel.clone(),
        },
    );

    // Ready only while subscribed: before the subscriptions exist and once draining starts,
    // a load balancer or test must not count on this worker taking messages.
    let subscribed = Arc::new(AtomicBool::new(false));
    let readiness: http::ReadinessCheck = {
        let client = client.clone();
        let shards = shards.clone();
        let subscribed = subscribed.clone();
        Arc::new(move || readiness_problems(&client, &shards, &subscribed))
    };
    background.spawn(http::serve(
        listener,
        metrics.clone(),
        readiness.clone(),
        cancel.clone(),
        background.clone(),
    ));
    // Route by the fleet's ring record before taking work (when NATS is up, and a few seconds
    // at most: without it, by POSTGRES_SHARDS at epoch 0, which the shards' fences refuse if
    // the fleet moved on), then follow it, and take a move up when one is written.
    if client.connection_state() == async_nats::connection::State::Connected {
        shards.load(&client, RING_LOAD_WAIT).await;
    }
    // Both stop at once on `cancel`, whatever NATS or a shard is doing (a move cut short is
    // rolled back and taken up again; its lease expires by itself).
    background.spawn(cancel::until_cancelled(
        cancel.clone(),
        shards.clone().follow(client.clone(), cancel.clone()),
    ));
    // Stops at once on `cancel` by itself, releasing the mover's lease on the way out.
    background.spawn(mover::run(
        shards.clone(),
        client.clone(),
        metrics.clone(),
        cancel.clone(),
    ));
    let subscribe = |subject: String| {
        let client = client.clone();
        let group = config.queue_group.clone();
        async move {
            client
                .queue_subscribe(subject.clone(), group)
                .await
                .map_err(|source| Error::Subscribe { subject, source })
        }
    };
    let queries = intake::Requests {
        query: subscribe(config.query_subject.clone()).await?,
        stats: subscribe(config.stats_subject.clone()).await?,
        delete: subscribe(config.delete_subject.clone()).await?,
    };
    let mut router = intake::Router {
        shards: shards.clone(),
        limits: config.limits,
        max_batch_entries: config.max_batch_entries,
        settler,
        queries: query_machinery,
        metrics: metrics.clone(),
        shard_timeout: config.shard_timeout,
        stream_identity: None,
        ordered: match &config.intake {
            Intake::JetStream(js) if js.ordered => Some(cancel.clone()),
            _ => None,
        },
        held: origin::Held::default(),
        replies: config.replies.clone(),
    };
    tokio::pin!(shutdown);
    let mut shutdown_seen = false;
    // Boxed so it can be dropped early: dropping it drops the router, which closes the queues.
    let mut intake: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match &config.intake {
        Intake::Core => {
            let logs = subscribe(config.logs_subject.clone()).await?;
            Box::pin(intake::run_core(
                logs,
                queries,
                Arc::new(router),
                cancel.clone(),
            ))
        }
        Intake::JetStream(js) => {
            // NATS may not be up yet (the worker starts anyway and connects when it is).
            let setup = loop {
                tokio::select! {
                    result = async {
                        let (consumer, stream) = intake::setup_jetstream(&client, &config.logs_subject, js).await?;
                        let lease = match js.ordered {
                            true => {
                                ordered::check_server(&client.server_info().version);
                                Some(ordered::open_lease(&client, js).await?)
                            }
                            false => None,
                        };
                        Ok::<_, intake::IntakeError>((consumer, stream, lease))
                    } => match result {
                        Ok(setup) => break Some(setup),
                        Err(e) => {
                            tracing::warn!(error = %e, "JetStream not available yet; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    },
                    _ = &mut shutdown => break None,
                }
            };
            match setup {
                Some((consumer, stream, lease)) => {
                    router.stream_identity = Some(format!(
                        "js:{}:{}",
                        stream.config.name,
                        stream.created.unix_timestamp_nanos()
                    ));
                    background.spawn(intake::sample_consumer_lag(
                        consumer.clone(),
                        metrics.clone(),
                        cancel.clone(),
                    ));
                    Box::pin(intake::run_jetstream(
                        consumer,
                        lease,
                        queries,
                        Arc::new(router),
                        cancel.clone(),
                    ))
                }
                None => {
                    // Shut down before JetStream was ever reachable: nothing was taken in.
                    shutdown_seen = true;
                    cancel.cancel();
                    drop((queries, router));
                    Box::pin(async {})
                }
            }
        }
    };
    if client.connection_state() == async_nats::connection::State::Connected {
        // Make sure the server has the subscriptions before this worker calls itself ready.
        if let Err(e) = client.flush().await {
            tracing::warn!(error = %e, "NATS flush after subscribing failed");
        }
    }
    subscribed.store(true, Ordering::Release);
    if !shutdown_seen {
        // Discoverable only once it takes work; it deregisters when shutdown begins.
        background.spawn(service::serve(
            client.clone(),
            config.clone(),
            metrics.clone(),
            readiness,
            cancel.clone(),
        ));
    }
    tracing::info!(
        intake = match config.intake { Intake::Core => "core", Intake::JetStream(_) => "jetstream" },
        logs = %config.logs_subject,
        query = %config.query_subject,
        stats = %config.stats_subject,
        delete = %config.delete_subject,
        retention = ?config.retention.map(|r| r.max_age),
        group = %config.queue_group,
        shards = shards.all().len(),
        metrics = %metrics_addr,
        "worker started"
    );

    // From here on, one deadline bounds the whole shutdown, whatever NATS and Postgres do.
    let deadline = tokio::select! {
        _ = &mut intake => {
            cancel.cancel();
            Instant::now() + config.shutdown_timeout
        }
        _ = &mut shutdown, if !shutdown_seen => {
            tracing::info!("shutting down: no new messages; finishing in-flight work");
            let now = Instant::now();
            let deadline = now + config.shutdown_timeout;
            subscribed.store(false, Ordering::Release);
            cancel.cancel();
            // Draining gets three quarters, so a hung drain (NATS unreachable) still leaves
            // time to finish and answer what was already received.
            let drain_deadline = now + config.shutdown_timeout * 3 / 4;
            if tokio::time::timeout_at(drain_deadline, &mut intake).await.is_err() {
                tracing::warn!("draining NATS subscriptions did not finish in time");
            }
            deadline
        }
    };
    drop(intake);
    // The shard pipelines end once their queues are empty.
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
    if tokio::time::timeout(Duration::from_secs(2), background.wait())
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

/// deploy/postgres/roles.sql: the least-privileged group role's grants (`worker migrate
/// --grant` runs it in every shard).
pub const ROLES_SQL: &str = include_str!("../../deploy/postgres/roles.sql");

/// `worker migrate`: apply the embedded migrations to every shard and record its name (what a
/// worker does at start), then, with `grant`, run [`ROLES_SQL`] there too, and return. Run it
/// once per upgrade with the owner role's login (a superuser or a role with CREATEROLE for
/// `grant`); the workers can then log in as members of `logstore_app`. A shard that does not
/// answer yet is retried every second for up to `wait` (a database that is still starting).
pub async fn migrate(config: &Config, grant: bool, wait: Duration) -> Result<(), Error> {
    for shard_config in &config.shards {
        let shard = Shard::new(shard_config, 1, config.shard_timeout).map_err(Error::Setup)?;
        let deadline = Instant::now() + wait;
        let mut logged: Option<String> = None;
        loop {
            match shard.initialise().await {
                Ok(()) => break,
                Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                    let cause = Chain(&e).to_string();
                    if logged.as_deref() != Some(cause.as_str()) {
                        tracing::warn!(shard = %shard.name, error = %cause, "shard not reachable yet; retrying");
                        logged = Some(cause);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        tracing::info!(shard = %shard.name, "schema current, shard name recorded");
        if grant {
            shard.batch_execute(ROLES_SQL).await?;
            tracing::info!(shard = %shard.name, "deploy/postgres/roles.sql applied");
        }
        shard.close();
    }
    Ok(())
}

/// Connect to NATS. One attempt first: a server that refuses the login or the TLS handshake
/// stops the start with a line saying so (no retry cures that). A server that cannot be
/// reached is retried in the background while the worker runs, not ready, as before.
async fn connect_nats(config: &Config, metrics: &Metrics) -> Result<async_nats::Client, Error> {
    let state = ConnectionLog {
        reconnects: metrics.nats_reconnects.clone(),
        connected_once: Arc::new(AtomicBool::new(false)),
        failures_seen: Arc::default(),
    };
    let failure = match config.nats.connect(|o| with_callbacks(o, &state)).await {
        Ok(client) => return Ok(client),
        Err(failure) if failure.rejected => return Err(failure.into()),
        Err(failure) => failure,
    };
    tracing::warn!(
        error = %Chain(&failure),
        "NATS is not reachable at start; the worker starts (not ready) and connects when it is"
    );
    // Start (not ready) while NATS is down, and connect when it comes up.
    let retrying = |o| with_callbacks(o, &state).retry_on_initial_connect();
    Ok(config.nats.connect(retrying).await?)
}

/// What the connection callbacks share across connection attempts (and the two clients
/// [`connect_nats`] may build).
#[derive(Clone)]
struct ConnectionLog {
    reconnects: prometheus::IntCounter,
    connected_once: Arc<AtomicBool>,
    /// Per server URL (redacted), the failed attempts already logged.
    failures_seen: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// `options` (the login and TLS of the NATS_* settings: credentials travel there, never
/// inside logged URLs, and the inbox prefix) with the worker's name and callbacks that log
/// each connection event once.
fn with_callbacks(
    options: async_nats::ConnectOptions,
    state: &ConnectionLog,
) -> async_nats::ConnectOptions {
    let ConnectionLog {
        reconnects,
        connected_once,
        failures_seen,
    } = state.clone();
    options
        .name("logstore-worker")
        // Called before every connection attempt (initial and reconnect) with the server pool,
        // which holds each server's failed-attempt count and last error: a count that grew
        // since the last call is one failed attempt, logged once, with the (redacted) URL and
        // the cause. Returning None keeps async-nats's own server choice and backoff.
        .reconnect_to_server_callback(move |servers, _info| {
            let seen = failures_seen.clone();
            async move {
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                for server in &servers {
                    let url = logstore_protocol::redact::redact(server.addr.as_url_str());
                    let before = seen.insert(url.clone(), server.failed_attempts);
                    if server.failed_attempts > before.unwrap_or(0) {
                        let cause = server.last_error.as_deref().unwrap_or("unknown");
                        tracing::warn!(
                            url = %url,
                            attempts = server.failed_attempts,
                            error = %logstore_protocol::redact::redact(cause),
                            "cannot connect to NATS; retrying"
                        );
                    }
                }
                None
            }
        })
        .event_callback(move |event| {
            let reconnects = reconnects.clone();
            let connected_once = connected_once.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        if connected_once.swap(true, Ordering::AcqRel) {
                            reconnects.inc();
                        }
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    // A failed connection attempt: its only detail is the error kind ("IO
                    // error"); the attempt is logged with URL and cause above.
                    async_nats::Event::ClientError(async_nats::ClientError::Other(kind)) => {
                        tracing::debug!(%kind, "NATS connection attempt failed")
                    }
                    other @ (async_nats::Event::ServerError(_)
                    | async_nats::Event::ClientError(_)
                    | async_nats::Event::SlowConsumer(_)) => {
                        tracing::warn!(event = %other, "NATS error")
                    }
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        })
}

/// Health-check one shard every second: initialise it if it never was, else ping it. Keeps
/// `logstore_shard_up` and the pool gauges current.
pub(crate) async fn watch_shard(shard: Arc<Shard>, metrics: Metrics, cancel: CancellationToken) {
    let name = shard.name.clone();
    let mut refused_logged = false;
    loop {
        let result = if shard.is_refused() {
            if !refused_logged {
                tracing::error!(shard = %name, "shard refused: its database belongs to another shard name");
                refused_logged = true;
            }
            Err(())
        } else if shard.is_initialised() && !shard.fleet_confirmed() {
            // The fleet became known while the shard did not answer (or it is another fleet's,
            // which it logged once): check it now.
            shard.confirm_fleet().await.map_err(|e| {
                tracing::debug!(shard = %name, error = %Chain(&e), "fleet check failed");
            })
        } else if shard.foreign_fleet().is_some() {
            Err(())
        } else if shard.is_initialised() {
            shard.ping().await.map_err(|e| {
                tracing::debug!(shard = %name, error = %Chain(&e), "health check failed");
            })
        } else {
            shard.initialise().await.map_err(|e| {
                // Once per cause at warn (a shard down at start may come back refusing TLS or
                // the login), every retry at debug.
                let cause = Chain(&e).to_string();
                if shard.note_init_failure(&cause) {
                    tracing::warn!(shard = %name, error = %cause, "shard still unreachable; retrying");
                } else {
                    tracing::debug!(shard = %name, error = %cause, "shard still unreachable");
                }
            })
        };
        let up = result.is_ok();
        if shard.set_up(up) != up {
            if up {
                tracing::info!(shard = %name, "shard is up");
            } else {
                tracing::warn!(shard = %name, "shard is down");
            }
        }
        metrics
            .shard_up
            .with_label_values(&[&name])
            .set(i64::from(up));
        let status = shard.pool_status();
        let in_use = status.size.saturating_sub(status.available);
        metrics
            .pool_connections
            .with_label_values(&[&name, "in_use"])
            .set(in_use as i64);
        metrics
            .pool_connections
            .with_label_values(&[&name, "idle"])
            .set(status.available as i64);
        metrics
            .pool_connections
            .with_label_values(&[&name, "max"])
            .set(status.max_size as i64);
        if !cancel::pause(&cancel, HEALTH_INTERVAL).await {
            break;
        }
    }
    // Stopped: shutdown, or the shard left the ring. Its health series go with it, so a removed
    // shard that is switched off later does not look down forever.
    let _ = metrics.shard_up.remove_label_values(&[&name]);
    for state in ["in_use", "idle", "max"] {
        let _ = metrics
            .pool_connections
            .remove_label_values(&[&name, state]);
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
