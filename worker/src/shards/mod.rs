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
//!
//! Layout: this file holds the set and swaps views (`apply`); `record.rs` follows the ring
//! record (load, watch, refresh past a fence, the shards' copies of it); `lane.rs` builds a
//! lane (pool, pipelines, health watcher, sweeper).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::follow::{Lanes, Placement};
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::pipeline::{self, ShardQueue};
use crate::ring::{Layout, Member, MoveState, Record};
use crate::store::Shard;
use crate::Chain;

mod lane;
mod record;

use lane::Builder;
pub use lane::{initialise, open};
pub use record::RingTrouble;

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
    /// The epoch and move state routed by, for those who follow the ring ([`Shards::ring`]).
    ring: tokio::sync::watch::Sender<(u64, MoveState)>,
}

/// One lane's shard as this worker sees it ([`Shards::states`]).
pub struct LaneState {
    pub name: String,
    /// Answered its last health check (and is this fleet's).
    pub up: bool,
    /// What keeps it from serving, as `/readyz` says it.
    pub problem: Option<String>,
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
                ring: tokio::sync::watch::Sender::new((seed.epoch, seed.state)),
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

    /// What keeps the shards of the current view from serving, for `/readyz`: one line per
    /// shard that is refused (another shard's or another fleet's database), fenced at an epoch
    /// the ring does not know, or unreachable.
    pub fn problems(&self) -> Vec<String> {
        self.states()
            .into_iter()
            .filter_map(|state| state.problem)
            .collect()
    }

    /// Every shard of the current view, by name: up or down, and what keeps it from serving.
    pub fn states(&self) -> Vec<LaneState> {
        let view = self.view();
        let mut names: Vec<&String> = view.lanes.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let shard = &view.lanes[name].shard;
                LaneState {
                    name: name.clone(),
                    up: shard.is_up(),
                    problem: problem(name, shard, view.layout.epoch),
                }
            })
            .collect()
    }

    /// The epoch and move state this worker routes by, as they change (a new value on every
    /// change of either).
    pub fn ring(&self) -> tokio::sync::watch::Receiver<(u64, MoveState)> {
        self.inner.ring.subscribe()
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
                tracing::warn!(configured = %configured.join(","), ring = %recorded.join(","), epoch = record.epoch, "POSTGRES_SHARDS differs from the fleet's ring record; following the record");
            }
        }
        let (lanes, opened) = self.lanes_for(&record, &current);
        self.check_members(&lanes, &opened, record.fleet.as_deref())
            .await;
        let gone: Vec<Arc<Lane>> = current
            .lanes
            .iter()
            .filter(|(name, _)| !lanes.contains_key(*name))
            .map(|(_, lane)| lane.clone())
            .collect();
        let (epoch, state) = (record.epoch, record.state);
        let names: Vec<String> = record.members.iter().map(|m| m.name.clone()).collect();
        self.set_view(View {
            layout: Layout::new(record),
            lanes,
        });
        self.inner.builder.metrics.ring_epoch.set(epoch as i64);
        self.inner.ring.send_replace((epoch, state));
        for lane in gone {
            tracing::info!(shard = %lane.shard.name, "shard left the ring; closing its lane");
            lane.stop.cancel();
        }
        tracing::info!(epoch, %state, members = %names.join(","), "routing by ring epoch {epoch}");
    }

    /// The lanes `record` names: the current view's where it has them, new ones (also
    /// returned as `opened`) for the others. A member whose lane cannot be opened is left out
    /// (logged): its objects answer `unavailable`.
    fn lanes_for(
        &self,
        record: &Record,
        current: &View,
    ) -> (HashMap<String, Arc<Lane>>, Vec<Arc<Shard>>) {
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
        (lanes, opened)
    }

    /// Before routing to `lanes`: every shard must be fleet `fleet`'s, and the `opened` ones
    /// (new members) answer before the switch where they can.
    async fn check_members(
        &self,
        lanes: &HashMap<String, Arc<Lane>>,
        opened: &[Arc<Shard>],
        fleet: Option<&str>,
    ) {
        // Every shard must be this fleet's: its identity is checked (or claimed) against the
        // record's fleet id, once per fleet (a shard of another fleet is refused and says so).
        for lane in lanes.values() {
            lane.shard.set_fleet(fleet);
        }
        // New members answer before the switch where they can (a member being added is up).
        let unreachable = "new ring member not reachable yet; retrying in the background";
        if let Err(e) = initialise(opened, &self.inner.builder.metrics, unreachable).await {
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

/// What keeps `shard` (named `name`) from serving while the ring is at `epoch`, in words.
fn problem(name: &str, shard: &Shard, epoch: u64) -> Option<String> {
    if shard.is_refused() {
        Some(format!("shard {name}: database belongs to another shard"))
    } else if let Some(fleet) = shard.foreign_fleet() {
        Some(format!(
            "shard {name}: database belongs to another fleet ({fleet})"
        ))
    } else if shard.unknown_fence() > epoch {
        Some(format!(
            "shard {name}: fenced at ring epoch {}, which this fleet's ring (epoch {epoch}) does not know",
            shard.unknown_fence(),
        ))
    } else if !shard.is_up() {
        Some(format!("shard {name}: unreachable"))
    } else {
        None
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
