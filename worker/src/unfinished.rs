//! Which shard queue each object's unfinished appends wait in, so that a ring change cannot let
//! a later append overtake an earlier one.
//!
//! Appends are queued on the shard the ring routes their object to *when they arrive*. When the
//! ring moves on (a move's state goes from `moving`, routed to the old owner, to `purging`,
//! routed to the new one), an append still queued on the old owner's pipeline is sent on from
//! there (`pipeline::forward`), while the next append to the same object would be queued on
//! the new owner's pipeline, which may be idle and commit it first: an order inversion
//! (observed: `worker/tests/partitioned_faults.rs`, `shards add` under load, one object's
//! entries 37 and 38 stored the wrong way round). So a new append goes to the queue of its
//! object's latest unfinished append, whatever the ring says now: that pipeline sends it on in
//! order, behind the earlier one. Each queued append holds a [`Pin`]; dropping it (the append
//! settled, failed or dropped) releases the object.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Locks the table is split over (by object id), so that routing tasks and pipelines settling
/// appends seldom wait for each other.
const STRIPES: usize = 16;

/// Objects with unfinished appends in this worker: the shard queue of the latest one, and how
/// many there are.
#[derive(Default)]
pub struct Unfinished {
    stripes: [Mutex<HashMap<u64, Slot>>; STRIPES],
}

struct Slot {
    shard: Arc<str>,
    count: u32,
}

/// One unfinished append of an object; dropping it releases it.
pub struct Pin {
    table: Arc<Unfinished>,
    id: u64,
}

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pin").field("id", &self.id).finish()
    }
}

impl Unfinished {
    fn stripe(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        // The table holds plain counts: one a panicking holder left behind is still sound.
        self.stripes[(id % STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Where a new append to `id` is queued: the queue of its latest unfinished append if
    /// `open` says that one can still be queued on, else `routed` (where the ring sends it
    /// now). The append holds the returned [`Pin`] until it is finished.
    pub fn place(
        self: &Arc<Self>,
        id: u64,
        routed: &str,
        open: impl Fn(&str) -> bool,
    ) -> (Arc<str>, Pin) {
        let mut stripe = self.stripe(id);
        let slot = stripe.entry(id).or_insert_with(|| Slot {
            shard: Arc::from(routed),
            count: 0,
        });
        // A new slot already names `routed`; an object's slot leaves the table with its last pin.
        if slot.count > 0 && &*slot.shard != routed && !open(&slot.shard) {
            slot.shard = Arc::from(routed);
        }
        slot.count += 1;
        let shard = slot.shard.clone();
        drop(stripe);
        let pin = Pin {
            table: self.clone(),
            id,
        };
        (shard, pin)
    }

    /// Objects with unfinished appends now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|stripe| stripe.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// No object has an unfinished append.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut stripe = self.table.stripe(self.id);
        if let Some(slot) = stripe.get_mut(&self.id) {
            slot.count = slot.count.saturating_sub(1);
            if slot.count == 0 {
                stripe.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_append_follows_the_unfinished_one_until_it_is_done() {
        let table = Arc::new(Unfinished::default());
        let (first, pin) = table.place(4, "a", |_| true);
        assert_eq!(&*first, "a");
        // The ring now routes object 4 to c: the next append still queues behind the first.
        let (second, pin2) = table.place(4, "c", |_| true);
        assert_eq!(&*second, "a");
        // Other objects are routed as the ring says.
        let (other, pin3) = table.place(5, "c", |_| true);
        assert_eq!(&*other, "c");
        drop((pin, pin2, pin3));
        assert!(table.is_empty());
        // Nothing unfinished: the ring decides again.
        let (third, _pin) = table.place(4, "c", |_| true);
        assert_eq!(&*third, "c");
    }

    #[test]
    fn a_queue_that_closed_is_not_followed() {
        let table = Arc::new(Unfinished::default());
        let (_, pin) = table.place(7, "a", |_| true);
        let (next, pin2) = table.place(7, "b", |shard| shard != "a");
        assert_eq!(&*next, "b");
        // The latest unfinished append is on b now: the next one follows it there.
        let (after, _pin3) = table.place(7, "a", |_| true);
        assert_eq!(&*after, "b");
        drop((pin, pin2));
        assert_eq!(table.len(), 1);
    }
}
