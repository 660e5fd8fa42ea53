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
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cancel::{pause, Backoff};
use crate::config::{Config, Intake, ShardConfig};
use crate::follow::{Lanes, Placement};
use crate::membership::{Membership, MembershipError};
use crate::metrics::Metrics;
use crate::pipeline::{self, ShardQueue};
use crate::ring::{Layout, Member, MoveState, Record};
use crate::store::{Shard, StoreError};
use crate::Chain;

/// Most appends the ordered intake parks in one shard's queue while the shard is down.
const MAX_HELD_PER_SHARD: usize = 100_000;
/// How long a request that met a newer epoch waits for this worker to learn it.
const REFRESH_WAIT: Duration = Duration::from_secs(5);
/// Pause between attempts to reach the ring record.
const RETRY: Duration = Duration::from_secs(1);
/// Longest pause between attempts to watch a ring record that keeps failing.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long a shard fenced at an epoch the ring record does not know is not asked about again:
/// requests to it fail at once meanwhile instead of each re-reading the record.
const UNKNOWN_FENCE_RECHECK: Duration = Duration::from_secs(1);

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

impl Placement for View {
    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn shard(&self, name: &str) -> Option<&Arc<Shard>> {
        self.lanes.get(name).map(|lane| &lane.shard)
    }
}

impl Lanes for Shards {
    fn placement(&self) -> Arc<dyn Placement> {
        self.view()
    }

    fn refresh<'a>(
        &'a self,
        shard: &'a Shard,
        fence: u64,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(Shards::refresh(self, shard, fence))
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
    settings: pipeline::Settings,
    tasks: Tasks,
}

/// The worker's live shard set. See the module documentation.
///
/// A cheap handle: every lane's pipelines hold a clone (where they send appends whose object
/// moved). That is no cycle that outlives the worker: the set holds only its lanes' queue
/// senders, so emptying the view ([`Shards::close`]) ends the pipelines, and with them their
/// handles.
#[derive(Clone)]
pub struct Shards {
    inner: Arc<Inner>,
}

struct Inner {
    view: RwLock<Arc<View>>,
    builder: Builder,
    membership: tokio::sync::Mutex<Option<Membership>>,
    /// Ring changes are applied one at a time.
    applying: tokio::sync::Mutex<()>,
    /// Why the ring record cannot be read or used, as last logged (one line per cause).
    ring_trouble: RingTrouble,
    /// When a request last re-read the record for a fence it does not know.
    unknown_fence_checked: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// The last cause logged for a ring record that cannot be read or used: a new cause is logged
/// (once), a repeat is not, and the record becoming usable again is logged once.
#[derive(Default)]
pub struct RingTrouble(std::sync::Mutex<Option<String>>);

impl RingTrouble {
    /// `cause` happened: true when it is news (log it).
    pub fn news(&self, cause: &str) -> bool {
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last.as_deref() == Some(cause) {
            return false;
        }
        *last = Some(cause.to_string());
        true
    }

    /// The record is usable again: true when it was not (log that once).
    pub fn over(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .is_some()
    }
}

impl Shards {
    /// Lanes for the shards of POSTGRES_SHARDS, placed by a ring of epoch 0 until the fleet's
    /// record is read ([`Shards::load`]). `opened`: the pools of POSTGRES_SHARDS's shards
    /// ([`open`]); `settings`: what their pipelines need besides the set itself; `tasks`: where
    /// the lanes' tasks run.
    pub fn new(
        config: Arc<Config>,
        metrics: Metrics,
        opened: Vec<Arc<Shard>>,
        settings: pipeline::Settings,
        tasks: Tasks,
    ) -> Arc<Shards> {
        let seed = seed_record(&config, 0);
        let shards = Shards {
            inner: Arc::new(Inner {
                view: RwLock::new(Arc::new(View {
                    layout: Layout::new(seed.clone()),
                    lanes: HashMap::new(),
                })),
                builder: Builder {
                    config,
                    metrics,
                    settings,
                    tasks,
                },
                membership: tokio::sync::Mutex::new(None),
                applying: tokio::sync::Mutex::new(()),
                ring_trouble: RingTrouble::default(),
                unknown_fence_checked: std::sync::Mutex::new(None),
            }),
        };
        // The lanes' pipelines hold the set, so the lanes are installed once it exists.
        let lanes = opened
            .into_iter()
            .map(|shard| {
                (
                    shard.name.clone(),
                    shards.inner.builder.lane(shard, &shards),
                )
            })
            .collect();
        shards.set_view(View {
            layout: Layout::new(seed),
            lanes,
        });
        Arc::new(shards)
    }

    fn set_view(&self, view: View) {
        *self
            .inner
            .view
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(view);
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.inner
            .view
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Read the fleet's ring record (seeding it from POSTGRES_SHARDS when the fleet has none)
    /// and route by it. Gives up after `wait` (NATS unreachable, or without JetStream): the
    /// worker then routes by POSTGRES_SHARDS at epoch 0, and [`Shards::follow`] keeps trying.
    /// A record that does not decode is routed around with the shards' own copies of it
    /// ([`Shards::best_copy`]): ring changes stop until it is repaired, requests do not.
    pub async fn load(&self, client: &async_nats::Client, wait: Duration) {
        let attempt = async {
            let membership = self.membership(client).await?;
            let seed = Record {
                fleet: Some(self.seed_fleet().await),
                ..seed_record(&self.inner.builder.config, 1)
            };
            membership.read_or_seed(&seed).await
        };
        match tokio::time::timeout(wait, attempt).await {
            Ok(Ok((record, _, wrote))) => {
                self.apply(record.clone()).await;
                if wrote {
                    self.keep_copies(&record).await;
                }
            }
            Ok(Err(e @ MembershipError::Decode { .. })) => {
                self.inner.ring_trouble.news(&Chain(&e).to_string());
                match self.best_copy().await {
                    Some(copy) => {
                        tracing::error!(error = %Chain(&e), epoch = copy.epoch, "routing by the shards' copy of the ring record");
                        self.apply(copy).await;
                    }
                    None => tracing::error!(error = %Chain(&e), "no shard keeps a copy of the ring record; routing by POSTGRES_SHARDS"),
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %Chain(&e), "cannot read the ring record yet; routing by POSTGRES_SHARDS until it can be read"),
            Err(_) => tracing::warn!("the ring record could not be read in time; routing by POSTGRES_SHARDS until it can be read"),
        }
    }

    /// The fleet id for a record this worker seeds: the one its shards record when every one
    /// that answers records the same (the record was lost, the fleet is the same), else a new
    /// one.
    async fn seed_fleet(&self) -> String {
        let view = self.view();
        let copies =
            futures::future::join_all(view.lanes.values().map(|lane| lane.shard.ring_copy())).await;
        let fleets: Vec<Option<String>> = copies
            .into_iter()
            .filter_map(Result::ok)
            .map(|copy| copy.fleet)
            .collect();
        match fleets.first() {
            Some(Some(fleet)) if fleets.iter().all(|f| f.as_ref() == Some(fleet)) => fleet.clone(),
            _ => crate::ring::new_fleet_id(),
        }
    }

    /// The latest copy of the ring record that this worker's shards keep and that belongs to
    /// the fleet the keeping shard belongs to (migrations/0008_fleet.sql).
    pub async fn best_copy(&self) -> Option<Record> {
        let view = self.view();
        let copies =
            futures::future::join_all(view.lanes.values().map(|lane| lane.shard.ring_copy())).await;
        copies
            .into_iter()
            .filter_map(Result::ok)
            .filter_map(|copy| match copy.record {
                Some(Ok(record)) if record.fleet.is_some() && record.fleet == copy.fleet => {
                    Some(record)
                }
                _ => None,
            })
            .max_by_key(Record::rank)
    }

    /// Keep `record` as the copy of every shard of the view (best effort: seeding).
    async fn keep_copies(&self, record: &Record) {
        let view = self.view();
        for lane in view.lanes.values() {
            if let Err(e) = lane.shard.keep_ring(record, true, false).await {
                tracing::debug!(shard = %lane.shard.name, error = %Chain(&e), "cannot keep a copy of the ring record");
            }
        }
    }

    /// The ring record cannot be read or used because of `e`: logged once per cause.
    pub fn ring_trouble(&self, e: &MembershipError) {
        let cause = Chain(e).to_string();
        if self.inner.ring_trouble.news(&cause) {
            tracing::error!(error = %cause, "the ring record cannot be used; routing by the last one known");
        }
    }

    /// The ring record was read and decoded.
    fn ring_fine(&self) {
        if self.inner.ring_trouble.over() {
            tracing::info!("the ring record is readable again");
        }
    }

    /// Follow the ring record until `cancel`: every change is applied as it is written. A
    /// record that does not decode is ignored (logged once per cause); a watch that keeps
    /// failing is retried with backoff.
    pub async fn follow(self: Arc<Self>, client: async_nats::Client, cancel: CancellationToken) {
        let mut logged = false;
        let mut backoff = Backoff::new(RETRY, RETRY_MAX);
        while !cancel.is_cancelled() {
            let membership = match self.membership(&client).await {
                Ok(membership) => membership,
                Err(e) => {
                    if !logged {
                        tracing::warn!(error = %Chain(&e), "cannot reach the ring record; retrying");
                        logged = true;
                    }
                    pause(&cancel, RETRY).await;
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
                    pause(&cancel, backoff.next_pause()).await;
                    continue;
                }
            };
            logged = false;
            let mut delivered = false;
            loop {
                let entry = tokio::select! {
                    _ = cancel.cancelled() => return,
                    entry = watch.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) => {
                        delivered = true;
                        match membership.decode(&entry) {
                            Ok(Some(record)) => {
                                self.ring_fine();
                                self.apply(record).await;
                            }
                            Ok(None) => {}
                            Err(e) => self.ring_trouble(&e),
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "ring watch failed; watching again");
                        break;
                    }
                    None => break,
                }
            }
            // A watch that ends before delivering anything is failing: back off (the pause
            // after it is the doubled one, as it always was).
            if delivered {
                backoff.reset();
            } else {
                backoff.next_pause();
            }
            pause(&cancel, backoff.current()).await;
        }
    }

    /// A request met `shard` fenced at `fence`: re-read the record until this worker routes
    /// by at least that epoch (or a few seconds passed while NATS does not answer; the request
    /// is then routed again by what is known, and meets the fence again if it must). A record
    /// that does not decode is stood in for by the shard's own copy. A fence that the record
    /// read does not reach is an epoch this fleet never had (the database is another fleet's,
    /// or the record was lost or rolled back): the shard says so (log, once per fence, and
    /// `/readyz`) and its requests fail at once.
    pub async fn refresh(&self, shard: &Shard, fence: u64) {
        let deadline = tokio::time::Instant::now() + REFRESH_WAIT;
        if shard.unknown_fence() >= fence && self.recently_checked() {
            return;
        }
        loop {
            if self.view().layout.epoch >= fence {
                return;
            }
            // Without the record (NATS or its KV out of reach) there is nothing to learn: the
            // request fails as in an outage instead of waiting.
            let Some(membership) = self.inner.membership.lock().await.clone() else {
                return;
            };
            match membership.read().await {
                Ok(Some((record, _))) => {
                    self.ring_fine();
                    self.apply(record).await;
                    break;
                }
                Ok(None) => break,
                Err(e @ MembershipError::Decode { .. }) => {
                    self.ring_trouble(&e);
                    break;
                }
                Err(e) => tracing::debug!(error = %Chain(&e), "cannot read the ring record"),
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if self.view().layout.epoch >= fence {
            return;
        }
        // The record in NATS does not reach the fence: the shard's own copy may (it keeps the
        // record whenever the mover raises its fence), if it is this fleet's.
        if let Ok(copy) = shard.ring_copy().await {
            let ours = self.view().layout.record.fleet.clone();
            if let Some(Ok(record)) = copy.record {
                if record.fleet.is_some() && record.fleet == ours && copy.fleet == ours {
                    self.apply(record).await;
                }
            }
        }
        let epoch = self.view().layout.epoch;
        if epoch >= fence {
            return;
        }
        self.mark_checked();
        if shard.note_unknown_fence(fence) {
            tracing::error!(
                shard = %shard.name,
                fence,
                epoch,
                "shard {} is fenced at ring epoch {fence}, which this fleet's ring record \
                 (epoch {epoch}) does not know: another fleet uses its database, or the ring \
                 record was lost or rolled back (`worker shards repair`); its objects answer \
                 `unavailable`",
                shard.name
            );
        }
    }

    fn recently_checked(&self) -> bool {
        self.inner
            .unknown_fence_checked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some_and(|at| at.elapsed() < UNKNOWN_FENCE_RECHECK)
    }

    fn mark_checked(&self) {
        *self
            .inner
            .unknown_fence_checked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(tokio::time::Instant::now());
    }

    /// What keeps the shards of the current view from serving, for `/readyz`: one line per
    /// shard that is refused (another shard's or another fleet's database), fenced at an epoch
    /// the ring does not know, or unreachable.
    pub fn problems(&self) -> Vec<String> {
        let view = self.view();
        let mut names: Vec<&String> = view.lanes.keys().collect();
        names.sort();
        let mut problems = Vec::new();
        for name in names {
            let shard = &view.lanes[name].shard;
            if shard.is_refused() {
                problems.push(format!("shard {name}: database belongs to another shard"));
            } else if let Some(fleet) = shard.foreign_fleet() {
                problems.push(format!(
                    "shard {name}: database belongs to another fleet ({fleet})"
                ));
            } else if shard.unknown_fence() > view.layout.epoch {
                problems.push(format!(
                    "shard {name}: fenced at ring epoch {}, which this fleet's ring (epoch {}) does not know",
                    shard.unknown_fence(),
                    view.layout.epoch
                ));
            } else if !shard.is_up() {
                problems.push(format!("shard {name}: unreachable"));
            }
        }
        problems
    }

    /// The ring record's handle, opened when first needed.
    pub async fn membership(
        &self,
        client: &async_nats::Client,
    ) -> Result<Membership, MembershipError> {
        let mut slot = self.inner.membership.lock().await;
        if let Some(membership) = slot.as_ref() {
            return Ok(membership.clone());
        }
        let membership = Membership::open(client, &self.inner.builder.config.queue_group).await?;
        *slot = Some(membership.clone());
        Ok(membership)
    }

    /// Route by `record` from now on (ignored unless it comes after the current one, or is the
    /// same one given a fleet id): open lanes for members this worker lacks, close those of
    /// members gone.
    pub async fn apply(&self, record: Record) {
        let _one_at_a_time = self.inner.applying.lock().await;
        let current = self.view();
        let fleet_given = record.rank() == current.layout.record.rank()
            && current.layout.record.fleet.is_none()
            && record.fleet.is_some();
        if !record.comes_after(current.layout.epoch, current.layout.state) && !fleet_given {
            return;
        }
        if current.layout.epoch == 0 {
            let configured: Vec<&str> = self
                .inner
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
            match self.inner.builder.member_lane(member, self) {
                Ok(lane) => {
                    opened.push(lane.shard.clone());
                    lanes.insert(member.name.clone(), lane);
                }
                Err(e) => {
                    tracing::error!(shard = %member.name, error = %e, "cannot open a lane for a ring member; its objects answer `unavailable`")
                }
            }
        }
        // Every shard must be this fleet's: its identity is checked (or claimed) against the
        // record's fleet id, once per fleet (a shard of another fleet is refused and says so).
        for lane in lanes.values() {
            lane.shard.set_fleet(record.fleet.as_deref());
        }
        // New members answer before the switch where they can (a member being added is up).
        let unreachable = "new ring member not reachable yet; retrying in the background";
        if let Err(e) = initialise(&opened, &self.inner.builder.metrics, unreachable).await {
            tracing::error!(error = %Chain(&e), "a new ring member refuses this worker");
        }
        let unchecked: Vec<&Arc<Lane>> = lanes
            .values()
            .filter(|lane| lane.shard.is_initialised() && !lane.shard.fleet_confirmed())
            .collect();
        let checks = unchecked.iter().map(|lane| lane.shard.confirm_fleet());
        for (lane, result) in unchecked
            .iter()
            .zip(futures::future::join_all(checks).await)
        {
            // Another fleet's shard logged itself; one that does not answer is checked by its
            // health watcher when it does.
            if let Err(e) = result {
                tracing::debug!(shard = %lane.shard.name, error = %Chain(&e), "shard's fleet not confirmed yet");
            }
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
            .inner
            .view
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(View {
            layout: Layout::new(record),
            lanes,
        });
        self.inner.builder.metrics.ring_epoch.set(epoch as i64);
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
            .inner
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
        &self.inner.builder.config
    }
}

fn same_names(a: &[&str], b: &[&str]) -> bool {
    a.len() == b.len() && a.iter().all(|n| b.contains(n))
}

/// The ring record POSTGRES_SHARDS describes, at `epoch` (without a fleet id).
pub fn seed_record(config: &Config, epoch: u64) -> Record {
    Record {
        epoch,
        state: MoveState::Steady,
        members: config
            .shards
            .iter()
            .map(|s| Member {
                name: s.name.clone(),
                url: crate::config::without_login(&s.url),
            })
            .collect(),
        vnodes: config.ring_vnodes,
        previous: None,
        fleet: None,
    }
}

impl Builder {
    /// A lane for a member of the ring record: POSTGRES_SHARDS's URL when it names the member
    /// (this worker's own way to reach it), else the record's with this worker's password.
    fn member_lane(&self, member: &Member, fleet: &Shards) -> Result<Arc<Lane>, String> {
        let shard = match self.config.shards.iter().find(|s| s.name == member.name) {
            Some(shard) => shard.clone(),
            // Whatever login the record names (none, since issue 19): this worker's own.
            None => self
                .config
                .member_access
                .shard(&member.name, &crate::config::without_login(&member.url))?,
        };
        Ok(self.lane(open(&self.config, &self.metrics, &shard)?, fleet))
    }

    /// A lane for `shard`, its pipelines sending appends whose object moved on through `fleet`.
    fn lane(&self, shard: Arc<Shard>, fleet: &Shards) -> Arc<Lane> {
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
        let lanes: Arc<dyn Lanes> = Arc::new(fleet.clone());
        let (appends, task) = pipeline::shard_pipeline(
            shard.clone(),
            capacity,
            self.settings.clone(),
            lanes.clone(),
        );
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
                    self.settings.clone(),
                    lanes,
                );
                self.tasks.work.spawn(task);
                queue
            }
        };
        let stop = self.tasks.cancel.child_token();
        self.tasks.background.spawn(crate::health::watch_shard(
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
