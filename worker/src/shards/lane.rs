//! Building a lane: the shard's pool, its append and query pipelines, its health watcher and
//! retention sweeper.

use std::sync::Arc;

use super::{Lane, Shards, Tasks, MAX_HELD_PER_SHARD};
use crate::config::{Config, Intake, ShardConfig};
use crate::follow::Lanes;
use crate::metrics::Metrics;
use crate::pipeline;
use crate::ring::Member;
use crate::store::{Shard, StoreError};

/// What building a lane needs: the worker's settings, metrics and task trackers.
pub(super) struct Builder {
    pub(super) config: Arc<Config>,
    pub(super) metrics: Metrics,
    pub(super) settings: pipeline::Settings,
    pub(super) tasks: Tasks,
}

impl Builder {
    /// A lane for a member of the ring record: POSTGRES_SHARDS's URL when it names the member
    /// (this worker's own way to reach it), else the record's with this worker's password.
    pub(super) fn member_lane(&self, member: &Member, fleet: &Shards) -> Result<Arc<Lane>, String> {
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
    pub(super) fn lane(&self, shard: Arc<Shard>, fleet: &Shards) -> Arc<Lane> {
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
                let cause = crate::health::cause(&e);
                shard.note_init_failure(&cause);
                tracing::warn!(shard = %shard.name, error = %cause, "{unreachable}");
            }
        }
    }
    refused.map_or(Ok(()), Err)
}
