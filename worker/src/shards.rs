//! The live set of shards this worker talks to, following the fleet's ring record.
//!
//! A [`Lane`] is one shard with everything the worker runs for it: its pool ([`Shard`]), its
//! append and query pipelines, its health watcher and retention sweeper. [`Shards`] holds the
//! lanes of every member the ring record names (now, and before the change while objects
//! move) together with the [`Layout`] that places objects on them, as one [`View`] swapped
//! whole: a request is routed and committed by one consistent view. When the record changes
//! (`worker shards add/remove`, seen through a KV watch), lanes for new members are opened on
//! the fly with this worker's own password, and lanes of members that left are closed.
//!
//! Placement itself is [`crate::ring`]'s: this module only keeps the lanes it names.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Intake, ShardConfig};
use crate::metrics::Metrics;
use crate::pipeline::{self, ShardQueue};
use crate::ring::{Layout, Member, Membership, MoveState, Record};
use crate::store::{Shard, StoreError};
use crate::Chain;

/// Most appends the ordered intake parks in one shard's queue while the shard is down.
const MAX_HELD_PER_SHARD: usize = 100_000;
/// How long a request that met a newer epoch waits for this worker to learn it.
const REFRESH_WAIT: Duration = Duration::from_secs(5);
/// Pause between attempts to reach the ring record.
const RETRY: Duration = Duration::from_secs(1);

/// One shard and what runs for it.
pub struct Lane {
    pub shard: Arc<Shard>,
    /// Appends (and, with core intake, queries behind them).
    pub appends: ShardQueue,
    /// Queries, stats and deletes.
    pub queries: ShardQueue,
    /// Stops the lane's health watcher and retention sweeper when it leaves the ring.
    stop: CancellationToken,
}

/// Placement and the lanes it names, at one epoch.
pub struct View {
    pub layout: Layout,
    pub lanes: HashMap<String, Arc<Lane>>,
}

impl View {
    pub fn lane(&self, name: &str) -> Option<&Arc<Lane>> {
        self.lanes.get(name)
    }
}

/// Where a lane's tasks run.
pub struct Tasks {
    /// Pipelines: they end when their queues close and are empty.
    pub work: TaskTracker,
    /// Health watchers and sweepers: they end on the lane's stop token, a child of `cancel`.
    pub background: TaskTracker,
    pub cancel: CancellationToken,
}

/// What building a lane needs: the worker's settings, metrics and task trackers.
struct Builder {
    config: Arc<Config>,
    metrics: Metrics,
    context: pipeline::Context,
    tasks: Tasks,
}

/// The worker's live shard set. See the module documentation.
pub struct Shards {
    view: RwLock<Arc<View>>,
    builder: Builder,
    membership: tokio::sync::Mutex<Option<Membership>>,
    /// Ring changes are applied one at a time.
    applying: tokio::sync::Mutex<()>,
}

impl Shards {
    /// Lanes for the shards of POSTGRES_SHARDS, placed by a ring of epoch 0 until the fleet's
    /// record is read ([`Shards::load`]). `context` is completed with a handle to the set.
    /// `opened`: the pools of POSTGRES_SHARDS's shards ([`open`]); `tasks`: where the lanes'
    /// tasks run.
    pub fn new(
        config: Arc<Config>,
        metrics: Metrics,
        opened: Vec<Arc<Shard>>,
        context: impl FnOnce(Weak<Shards>) -> pipeline::Context,
        tasks: Tasks,
    ) -> Arc<Shards> {
        let seed = seed_record(&config, 0);
        Arc::new_cyclic(|weak| {
            let builder = Builder {
                config,
                metrics,
                context: context(weak.clone()),
                tasks,
            };
            let lanes = opened
                .into_iter()
                .map(|shard| (shard.name.clone(), builder.lane(shard)))
                .collect();
            Shards {
                view: RwLock::new(Arc::new(View {
                    layout: Layout::new(seed),
                    lanes,
                })),
                builder,
                membership: tokio::sync::Mutex::new(None),
                applying: tokio::sync::Mutex::new(()),
            }
        })
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.view
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Read the fleet's ring record (seeding it from POSTGRES_SHARDS when the fleet has none)
    /// and route by it. Gives up after `wait` (NATS unreachable, or without JetStream): the
    /// worker then routes by POSTGRES_SHARDS at epoch 0, and [`Shards::follow`] keeps trying.
    pub async fn load(&self, client: &async_nats::Client, wait: Duration) {
        let attempt = async {
            let seed = seed_record(&self.builder.config, 1);
            let (record, _) = self.membership(client).await?.read_or_seed(&seed).await?;
            Ok::<_, crate::ring::MembershipError>(record)
        };
        match tokio::time::timeout(wait, attempt).await {
            Ok(Ok(record)) => self.apply(record).await,
            Ok(Err(e)) => tracing::warn!(error = %Chain(&e), "cannot read the ring record yet; routing by POSTGRES_SHARDS until it can be read"),
            Err(_) => tracing::warn!("the ring record could not be read in time; routing by POSTGRES_SHARDS until it can be read"),
        }
    }

    /// Follow the ring record until `cancel`: every change is applied as it is written.
    pub async fn follow(self: Arc<Self>, client: async_nats::Client, cancel: CancellationToken) {
        let mut logged = false;
        while !cancel.is_cancelled() {
            let membership = match self.membership(&client).await {
                Ok(membership) => membership,
                Err(e) => {
                    if !logged {
                        tracing::warn!(error = %Chain(&e), "cannot reach the ring record; retrying");
                        logged = true;
                    }
                    pause(RETRY, &cancel).await;
                    continue;
                }
            };
            let mut watch = match membership.watch().await {
                Ok(watch) => watch,
                Err(e) => {
                    if !logged {
                        tracing::warn!(error = %e, "cannot watch the ring record; retrying");
                        logged = true;
                    }
                    pause(RETRY, &cancel).await;
                    continue;
                }
            };
            logged = false;
            loop {
                let entry = tokio::select! {
                    _ = cancel.cancelled() => return,
                    entry = watch.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) => {
                        if let Some(record) = membership.decode(&entry) {
                            self.apply(record).await;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "ring watch failed; watching again");
                        break;
                    }
                    None => break,
                }
            }
            pause(RETRY, &cancel).await;
        }
    }

    /// A request met a shard fenced at `fence`: re-read the record until this worker routes
    /// by at least that epoch (or a few seconds passed; the request is then routed again by
    /// what is known, and meets the fence again if it must).
    pub async fn refresh(&self, fence: u64) {
        let deadline = tokio::time::Instant::now() + REFRESH_WAIT;
        loop {
            if self.view().layout.epoch >= fence {
                return;
            }
            // Without the record (NATS or its KV out of reach) there is nothing to learn: the
            // request fails as in an outage instead of waiting.
            let Some(membership) = self.membership.lock().await.clone() else {
                return;
            };
            if let Ok(Some((record, _))) = membership.read().await {
                self.apply(record).await;
                if self.view().layout.epoch >= fence {
                    return;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The ring record's handle, opened when first needed.
    pub async fn membership(
        &self,
        client: &async_nats::Client,
    ) -> Result<Membership, crate::ring::MembershipError> {
        let mut slot = self.membership.lock().await;
        if let Some(membership) = slot.as_ref() {
            return Ok(membership.clone());
        }
        let membership = Membership::open(client, &self.builder.config.queue_group).await?;
        *slot = Some(membership.clone());
        Ok(membership)
    }

    /// Route by `record` from now on (ignored unless it comes after the current one): open lanes for members this worker lacks, close those of members gone.
    pub async fn apply(&self, record: Record) {
        let _one_at_a_time = self.applying.lock().await;
        let current = self.view();
        if !record.comes_after(current.layout.epoch, current.layout.state) {
            return;
        }
        if current.layout.epoch == 0 {
            let configured: Vec<&str> = self
                .builder
                .config
                .shards
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            let recorded: Vec<&str> = record.members.iter().map(|m| m.name.as_str()).collect();
            if !same_names(&configured, &recorded) {
                tracing::warn!(configured = ?configured, ring = ?recorded, epoch = record.epoch, "POSTGRES_SHARDS differs from the fleet's ring record; following the record");
            }
        }
        let mut lanes = HashMap::new();
        let mut opened = Vec::new();
        for member in record.all_members() {
            if let Some(lane) = current.lanes.get(&member.name) {
                lanes.insert(member.name.clone(), lane.clone());
                continue;
            }
            match self.builder.member_lane(member) {
                Ok(lane) => {
                    opened.push(lane.shard.clone());
                    lanes.insert(member.name.clone(), lane);
                }
                Err(e) => {
                    tracing::error!(shard = %member.name, error = %e, "cannot open a lane for a ring member; its objects answer `unavailable`")
                }
            }
        }
        // New members answer before the switch where they can (a member being added is up).
        let unreachable = "new ring member not reachable yet; retrying in the background";
        if let Err(e) = initialise(&opened, &self.builder.metrics, unreachable).await {
            tracing::error!(error = %Chain(&e), "a new ring member refuses this worker");
        }
        let gone: Vec<Arc<Lane>> = current
            .lanes
            .iter()
            .filter(|(name, _)| !lanes.contains_key(*name))
            .map(|(_, lane)| lane.clone())
            .collect();
        let (epoch, state) = (record.epoch, record.state);
        let names: Vec<String> = record.members.iter().map(|m| m.name.clone()).collect();
        *self
            .view
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(View {
            layout: Layout::new(record),
            lanes,
        });
        self.builder.metrics.ring_epoch.set(epoch as i64);
        for lane in gone {
            tracing::info!(shard = %lane.shard.name, "shard left the ring; closing its lane");
            lane.stop.cancel();
        }
        tracing::info!(epoch, state = ?state, members = ?names, "routing by ring epoch {epoch}");
    }

    /// Close every lane (shutdown, once intake stopped): the pipelines end when their queues
    /// are empty.
    pub fn close(&self) {
        let mut view = self
            .view
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let layout = Layout::new(view.layout.record.clone());
        *view = Arc::new(View {
            layout,
            lanes: HashMap::new(),
        });
    }

    /// The shards of the current view (for readiness and shutdown).
    pub fn all(&self) -> Vec<Arc<Shard>> {
        self.view()
            .lanes
            .values()
            .map(|lane| lane.shard.clone())
            .collect()
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.builder.config
    }
}

fn same_names(a: &[&str], b: &[&str]) -> bool {
    a.len() == b.len() && a.iter().all(|n| b.contains(n))
}

async fn pause(period: Duration, cancel: &CancellationToken) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(period) => {}
    }
}

/// The ring record POSTGRES_SHARDS describes, at `epoch`.
pub fn seed_record(config: &Config, epoch: u64) -> Record {
    Record {
        epoch,
        state: MoveState::Steady,
        members: config
            .shards
            .iter()
            .map(|s| Member {
                name: s.name.clone(),
                url: crate::config::without_password(&s.url),
            })
            .collect(),
        vnodes: config.ring_vnodes,
        previous: None,
    }
}

impl Builder {
    /// A lane for a member of the ring record: POSTGRES_SHARDS's URL when it names the member
    /// (this worker's own way to reach it), else the record's with this worker's password.
    fn member_lane(&self, member: &Member) -> Result<Arc<Lane>, String> {
        let shard = match self.config.shards.iter().find(|s| s.name == member.name) {
            Some(shard) => shard.clone(),
            None => self.config.member_access.shard(&member.name, &member.url)?,
        };
        Ok(self.lane(open(&self.config, &self.metrics, &shard)?))
    }

    fn lane(&self, shard: Arc<Shard>) -> Arc<Lane> {
        let config = &self.config;
        // Room for two full transactions, and always for one whole batch message. The ordered
        // intake parks a down shard's appends here rather than nak'ing them (which would let
        // later ones overtake them): room for as many as the stream lets be unacknowledged,
        // so the other shards keep going as long as they would have with nak'ing.
        let capacity = match &config.intake {
            Intake::JetStream(js) if js.ordered => usize::try_from(js.max_ack_pending)
                .unwrap_or(usize::MAX)
                .min(MAX_HELD_PER_SHARD),
            _ => 0,
        }
        .max(config.batch_max_rows * 2)
        .max(config.max_batch_entries);
        let (appends, task) =
            pipeline::shard_pipeline(shard.clone(), capacity, self.context.clone());
        self.tasks.work.spawn(task);
        let queries = match config.intake {
            // Core: a query queues behind the appends received before it (read your writes).
            Intake::Core => appends.clone(),
            // JetStream: appends arrive on another path anyway, so queries get their own lane
            // rather than waiting behind fetched batches.
            Intake::JetStream(_) => {
                let (queue, task) = pipeline::shard_pipeline(
                    shard.clone(),
                    config.max_pending_queries,
                    self.context.clone(),
                );
                self.tasks.work.spawn(task);
                queue
            }
        };
        let stop = self.tasks.cancel.child_token();
        self.tasks.background.spawn(crate::watch_shard(
            shard.clone(),
            self.metrics.clone(),
            stop.clone(),
        ));
        if let Some(retention) = config.retention {
            self.tasks.background.spawn(crate::retention::sweep(
                shard.clone(),
                retention,
                self.metrics.clone(),
                stop.clone(),
            ));
        }
        Arc::new(Lane {
            shard,
            appends,
            queries,
            stop,
        })
    }
}

/// The pool of one shard, its metrics series created (connects lazily).
pub fn open(config: &Config, metrics: &Metrics, shard: &ShardConfig) -> Result<Arc<Shard>, String> {
    let opened = Shard::new(shard, config.pool_size, config.shard_timeout)?
        .with_pool_wait(metrics.pool_wait.with_label_values(&[&shard.name]));
    metrics.init_shard(&opened.name);
    Ok(Arc::new(opened))
}

/// Initialise `shards` at once. One that answers is marked up; one that does not is left to its
/// health watcher, with `unreachable` as the warning. Returns the first refusal that retrying
/// cannot cure (a database of another shard, a schema this role may not migrate).
pub async fn initialise(
    shards: &[Arc<Shard>],
    metrics: &Metrics,
    unreachable: &str,
) -> Result<(), StoreError> {
    let attempts = shards.iter().map(|shard| shard.initialise());
    let mut refused = None;
    for (shard, result) in shards.iter().zip(futures::future::join_all(attempts).await) {
        match result {
            Ok(()) => metrics.shard_up.with_label_values(&[&shard.name]).set(1),
            Err(e @ (StoreError::WrongShard { .. } | StoreError::CannotMigrate { .. })) => {
                refused.get_or_insert(e);
            }
            Err(e) => {
                let cause = Chain(&e).to_string();
                shard.note_init_failure(&cause);
                tracing::warn!(shard = %shard.name, error = %cause, "{unreachable}");
            }
        }
    }
    refused.map_or(Ok(()), Err)
}
