//! Who pulls which partition of the ordered intake (docs/intake.md, "Who pulls which
//! partition").
//!
//! Safety is the lease alone: one KV key per partition (`<legacy lease key>-p<k>`), held with
//! the same [`Lease`] as the `logs` lane, so a partition has at most one puller whatever the
//! workers believe about each other. Balance comes from a member list in the same bucket
//! (`<legacy lease key>.member.<worker>`, written every third of the lease's lifetime and expiring with it): every
//! worker computes the same targets from the same list ([`targets`]), takes its own targets'
//! free leases, gives up what is no longer its own once the list has been stable for a lease's
//! lifetime, and takes any partition nobody has held for that long. Each held partition is one
//! task running the ordered puller on its consumer.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{consumer, kv};
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ordered::{lead, take_over};
use super::route::Router;
use crate::cancel::pause;
use crate::lease::{Lease, Taken};
use crate::origin::Held;

/// How long a partition given up waits for its messages in this worker to settle before its
/// lease is released anyway (the next owner's reset makes them come again; keys keep them
/// stored once).
const SETTLE_WAIT: Duration = Duration::from_secs(5);

/// One partition of the stream: its durable consumer and the messages of it in this worker.
pub struct Partition {
    pub k: u32,
    pub consumer: consumer::Consumer<consumer::pull::Config>,
    pub held: Held,
}

/// A partition this worker pulls now.
struct Tenure {
    /// Fired to give the partition up (or at shutdown, through its parent).
    stop: CancellationToken,
    /// Set by the task when it has ended (lease released or lost).
    ended: Arc<std::sync::atomic::AtomicBool>,
}

/// Keep this worker's share of `partitions` pulled until `cancel`, then hand them over.
/// `legacy`: the `logs` lane's lease, whose bucket and key the partitions' leases share.
pub async fn run(
    router: &Arc<Router>,
    legacy: &Lease,
    partitions: Vec<Partition>,
    reset: bool,
    cancel: &CancellationToken,
) {
    if partitions.is_empty() {
        return;
    }
    router
        .metrics
        .jetstream_partitions
        .set(partitions.len() as i64);
    let mut owner = Owner::new(router.clone(), legacy, partitions, reset);
    tracing::info!(partitions = owner.partitions.len(), worker = %owner.me, "pulling the stream's partitions with the fleet");
    while !cancel.is_cancelled() {
        owner.tick(cancel).await;
        pause(cancel, owner.lease.ttl / 3).await;
    }
    // Shutdown: every tenure's token is a child of `cancel`; each drains and releases.
    owner.tasks.close();
    owner.tasks.wait().await;
    router.metrics.jetstream_partitions_held.set(0);
    if let Err(e) = owner.lease.store().delete(&owner.member_key).await {
        tracing::debug!(error = %e, "cannot remove this worker from the member list; it expires");
    }
}

/// This worker's side of sharing the partitions: what it holds and what it knows of the fleet.
struct Owner {
    router: Arc<Router>,
    /// The `logs` lane's lease: the bucket, the key prefix and the lifetime.
    lease: Lease,
    partitions: Vec<Arc<Partition>>,
    /// Partition k's lease at index k.
    leases: Vec<Arc<Lease>>,
    reset: bool,
    me: String,
    /// This fleet's members: `<legacy lease key>.member.<worker>` (one bucket serves every
    /// stream and consumer on the server).
    member_prefix: String,
    member_key: String,
    tasks: TaskTracker,
    held: HashMap<u32, Tenure>,
    members: Vec<String>,
    members_since: Instant,
    free_since: HashMap<u32, Instant>,
    failing: bool,
}

impl Owner {
    fn new(router: Arc<Router>, legacy: &Lease, partitions: Vec<Partition>, reset: bool) -> Owner {
        let partitions: Vec<Arc<Partition>> = partitions.into_iter().map(Arc::new).collect();
        let leases = partitions
            .iter()
            .map(|p| Arc::new(legacy.with_key(format!("{}-p{}", legacy.key(), p.k))))
            .collect();
        let me = format!("{:016x}", rand::random::<u64>());
        let member_prefix = format!("{}.member.", legacy.key());
        Owner {
            router,
            lease: legacy.with_key(legacy.key().to_string()),
            partitions,
            leases,
            reset,
            member_key: format!("{member_prefix}{me}"),
            member_prefix,
            me,
            tasks: TaskTracker::new(),
            held: HashMap::new(),
            members: Vec::new(),
            members_since: Instant::now(),
            free_since: HashMap::new(),
            failing: false,
        }
    }

    /// One round: say this worker is alive, read the fleet and the leases, and take, keep or
    /// give up each partition.
    async fn tick(&mut self, cancel: &CancellationToken) {
        self.held
            .retain(|_, tenure| !tenure.ended.load(std::sync::atomic::Ordering::Acquire));
        self.router
            .metrics
            .jetstream_partitions_held
            .set(self.held.len() as i64);
        let listing = list(
            &self.lease,
            &self.member_key,
            &self.member_prefix,
            &self.leases,
        );
        // Bounded: a round that waits long for a server delays taking partitions over.
        let listed = match tokio::time::timeout(self.lease.ttl, listing).await {
            Ok(listed) => listed,
            Err(_) => Err(format!("no answer within {:?}", self.lease.ttl)),
        };
        let (members, taken) = match listed {
            Ok(listed) => {
                if self.failing {
                    tracing::info!("the partition leases can be read again");
                    self.failing = false;
                }
                listed
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %e, "cannot read the partition leases; keeping what this worker pulls");
                    self.failing = true;
                } else {
                    tracing::debug!(error = %e, "still cannot read the partition leases");
                }
                return;
            }
        };
        if members != self.members {
            self.members = members;
            self.members_since = Instant::now();
        }
        let mine = targets(&self.members, self.partitions.len() as u32, &self.me);
        let stable = self.members_since.elapsed() >= self.lease.ttl;
        tracing::debug!(
            members = self.members.len(),
            ?mine,
            stable,
            taken = taken.iter().filter(|t| **t).count(),
            held = self.held.len(),
            "partition round"
        );
        for index in 0..self.partitions.len() {
            let k = self.partitions[index].k;
            let taken = taken[index];
            self.step(index, mine.contains(&k), stable, taken, cancel)
                .await;
        }
    }

    /// Decide about partition `index`: give it up when it is no longer this worker's (and the
    /// fleet is `stable`), take it when it is this worker's or nobody has held it for a lease's
    /// lifetime, and its lease is not `taken`.
    async fn step(
        &mut self,
        index: usize,
        mine: bool,
        stable: bool,
        taken: bool,
        cancel: &CancellationToken,
    ) {
        let partition = &self.partitions[index];
        let k = partition.k;
        let now = Instant::now();
        if taken {
            self.free_since.remove(&k);
        } else {
            self.free_since.entry(k).or_insert(now);
        }
        if let Some(tenure) = self.held.get(&k) {
            if !mine && stable && !tenure.stop.is_cancelled() {
                tracing::info!(partition = k, "handing partition over (the fleet changed)");
                tenure.stop.cancel();
            }
            return;
        }
        let long_free = self
            .free_since
            .get(&k)
            .is_some_and(|since| now.duration_since(*since) >= self.lease.ttl);
        if taken || !(mine || long_free) {
            return;
        }
        let lease = &self.leases[index];
        if let Ok(Some(taken)) = lease.try_acquire().await {
            let stop = cancel.child_token();
            let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
            self.tasks.spawn(tenure(
                self.router.clone(),
                partition.clone(),
                lease.clone(),
                taken,
                self.reset,
                stop.clone(),
                ended.clone(),
            ));
            self.held.insert(k, Tenure { stop, ended });
        }
    }
}

/// Write this worker's member key, then read the bucket: the members (live keys under
/// `member_prefix`), and whether each of the partition `leases` is held now (in their order).
///
/// Read without a KV watch (async-nats's `keys()`): a watch creates a consumer, and creating a
/// consumer goes through the JetStream cluster's meta leader, which after a server's loss can
/// take ten seconds and more to answer, while the bucket's own stream answers again within the
/// election of its leader. So: the member subjects from the stream's info (answered by its
/// leader), and each key's last entry by direct get (answered by any copy), a delete marker
/// counting as absent.
async fn list(
    legacy: &Lease,
    member_key: &str,
    member_prefix: &str,
    leases: &[Arc<Lease>],
) -> Result<(Vec<String>, Vec<bool>), String> {
    let store = legacy.store();
    store
        .put(member_key, "".into())
        .await
        .map_err(|e| format!("cannot write the member key: {e}"))?;
    let subjects = format!("{}{member_prefix}>", store.prefix);
    let mut listed = store
        .stream
        .info_with_subjects(&subjects)
        .await
        .map_err(|e| format!("cannot list the members: {e}"))?;
    let mut candidates = Vec::new();
    while let Some(subject) = listed.next().await {
        let (subject, _) = subject.map_err(|e| format!("cannot list the members: {e}"))?;
        if let Some(member) = subject.strip_prefix(store.prefix.as_str()) {
            candidates.push(member.to_string());
        }
    }
    let mut members = Vec::new();
    for key in candidates {
        if live(store, &key).await? {
            if let Some(member) = key.strip_prefix(member_prefix) {
                members.push(member.to_string());
            }
        }
    }
    members.sort();
    let mut taken = Vec::with_capacity(leases.len());
    for lease in leases {
        taken.push(live(store, lease.key()).await?);
    }
    Ok((members, taken))
}

/// Whether `key` has a value now (not deleted, not expired).
async fn live(store: &kv::Store, key: &str) -> Result<bool, String> {
    match store.entry(key).await {
        Ok(entry) => Ok(entry.is_some_and(|entry| entry.operation == kv::Operation::Put)),
        Err(e) => Err(format!("cannot read {key}: {e}")),
    }
}

/// Pull partition `partition` while holding its lease (just `taken`), until `stop` or
/// the lease is lost; on `stop`, wait (at most [`SETTLE_WAIT`]) for its messages in this worker
/// to settle, then release the lease for the next owner.
async fn tenure(
    router: Arc<Router>,
    partition: Arc<Partition>,
    lease: Arc<Lease>,
    taken: Taken,
    reset: bool,
    stop: CancellationToken,
    ended: Arc<std::sync::atomic::AtomicBool>,
) {
    let k = partition.k;
    let label = k.to_string();
    tracing::info!(
        partition = k,
        "took the partition's lease; pulling it in order"
    );
    let pulling = router
        .metrics
        .jetstream_partition_pulling
        .with_label_values(&[&label]);
    pulling.set(1);
    let ((), revision) = lease
        .hold(taken, &stop, "partition", |lost, validity| {
            let (router, partition, stop, label) = (&router, &partition, &stop, &label);
            async move {
                // Under the lease's renewals: it may wait for a consumer leader a while.
                take_over(router, &partition.consumer, reset, label).await;
                lead(
                    router,
                    &partition.consumer,
                    &partition.held,
                    &lost,
                    &|| validity.holds(),
                    reset,
                )
                .await;
                if stop.is_cancelled() {
                    settle(&partition.held).await;
                }
            }
        })
        .await;
    pulling.set(0);
    if stop.is_cancelled() {
        lease.release(revision).await;
    }
    ended.store(true, std::sync::atomic::Ordering::Release);
}

/// Wait until nothing of `held` is left in this worker, at most [`SETTLE_WAIT`].
async fn settle(held: &Held) {
    let deadline = Instant::now() + SETTLE_WAIT;
    while !held.up_to(u64::MAX).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The partitions `me` should pull among `members` (sorted, `me` among them): balanced
/// rendezvous hashing. Partitions in order, each to its highest-scoring member that holds fewer
/// than ⌈P/W⌉, so every worker computes the same answer from the same list and a join or leave
/// moves few partitions.
pub fn targets(members: &[String], partitions: u32, me: &str) -> BTreeSet<u32> {
    let mut mine = BTreeSet::new();
    if members.is_empty() {
        return mine;
    }
    let cap = (partitions as usize).div_ceil(members.len());
    let mut load = vec![0usize; members.len()];
    for k in 0..partitions {
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by_key(|&m| std::cmp::Reverse(score(&members[m], k)));
        if let Some(&m) = order.iter().find(|&&m| load[m] < cap) {
            load[m] += 1;
            if members[m] == me {
                mine.insert(k);
            }
        }
    }
    mine
}

/// FNV-1a (64 bits) of the member and the partition: the same on every worker and version.
fn score(member: &str, k: u32) -> u64 {
    member
        .bytes()
        .chain(k.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{:016x}", i * 7919 + 13)).collect()
    }

    #[test]
    fn every_partition_has_one_owner_and_none_more_than_its_share() {
        for w in 1..=7 {
            let members = members(w);
            let mut owners = vec![0; 32];
            for me in &members {
                let mine = targets(&members, 32, me);
                assert!(mine.len() <= 32usize.div_ceil(w), "{w} workers: {mine:?}");
                for k in mine {
                    owners[k as usize] += 1;
                }
            }
            assert!(owners.iter().all(|&n| n == 1), "{w} workers: {owners:?}");
        }
    }

    #[test]
    fn a_worker_joining_moves_few_partitions() {
        let three = members(3);
        let four = members(4);
        let moved: usize = three
            .iter()
            .map(|me| {
                let before = targets(&three, 32, me);
                let after = targets(&four, 32, me);
                before.difference(&after).count()
            })
            .sum();
        // The newcomer gets its 8; a few more may shift for balance, never most of them.
        assert!(moved <= 14, "moved {moved}");
    }
}
