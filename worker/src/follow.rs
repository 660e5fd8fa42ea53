//! Following an object the ring moved. An append or request that meets its object's tombstone
//! (`moved`), a shard fenced at a newer ring epoch, or a lane that the current view no longer
//! places it on goes on to the object's owner: [`crate::pipeline`] sends appends on,
//! [`crate::query`] looks requests up again. Both stop after [`MAX_HOPS`] and answer
//! `unavailable` in their own words.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::ring::Layout;
use crate::store::Shard;

/// One snapshot of placement: the ring layout, and the shards this worker has open that it
/// names ([`crate::shards::View`] is the one).
pub trait Placement: Send + Sync {
    fn layout(&self) -> &Layout;
    /// Shard `name`'s pool, when this worker has it open.
    fn shard(&self, name: &str) -> Option<&Arc<Shard>>;
}

/// What following a moved object needs of the worker's lane set ([`crate::shards::Shards`] is
/// the one): the placement now, and learning a newer ring. The lane set builds the pipelines
/// that follow objects; through this trait they reach it without depending back on it.
pub trait Lanes: Send + Sync {
    /// The current placement.
    fn placement(&self) -> Arc<dyn Placement>;
    /// `shard` is fenced at ring epoch `fence`: learn the ring that reaches it, if it can be
    /// read (see [`crate::shards::Shards::refresh`]).
    fn refresh<'a>(
        &'a self,
        shard: &'a Shard,
        fence: u64,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// Most times one append or request is sent on to another shard (moved, stale epoch, routed by
/// an older view) before it is answered `unavailable`: the ring changed under it again and
/// again.
pub const MAX_HOPS: u8 = 8;

/// Why a hop cannot be taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Stuck {
    /// Past [`MAX_HOPS`]: the ring kept changing while it was routed.
    Restless,
    /// The shard it should go to is not open on this worker.
    NotOpen,
}

/// Shard `name` in `placement` for hop number `hop` (the first hop is 1).
pub fn shard<'p>(
    placement: &'p dyn Placement,
    name: &str,
    hop: u8,
) -> Result<&'p Arc<Shard>, Stuck> {
    if hop > MAX_HOPS {
        return Err(Stuck::Restless);
    }
    placement.shard(name).ok_or(Stuck::NotOpen)
}

/// `shard` answered that it is fenced at ring epoch `fence`: learn the ring (see
/// [`Lanes::refresh`]) and return the placement that reaches it, to route again by; `None` when
/// the newer ring cannot be read (an outage for what met the fence).
pub async fn past_fence(
    lanes: &dyn Lanes,
    shard: &Shard,
    fence: u64,
) -> Option<Arc<dyn Placement>> {
    lanes.refresh(shard, fence).await;
    let placement = lanes.placement();
    (placement.layout().epoch >= fence).then_some(placement)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{Member, MoveState, Record};

    /// A placement with shard "a" in its ring and no shard open.
    struct NoneOpen(Layout);

    impl Placement for NoneOpen {
        fn layout(&self) -> &Layout {
            &self.0
        }

        fn shard(&self, _: &str) -> Option<&Arc<Shard>> {
            None
        }
    }

    fn placement() -> NoneOpen {
        NoneOpen(Layout::new(Record {
            epoch: 3,
            state: MoveState::Steady,
            members: vec![Member {
                name: "a".to_string(),
                url: "postgres://a/db".to_string(),
            }],
            vnodes: 16,
            previous: None,
            fleet: None,
        }))
    }

    #[test]
    fn a_hop_past_the_limit_is_restless_before_a_missing_lane() {
        let placement = placement();
        assert_eq!(shard(&placement, "a", MAX_HOPS).err(), Some(Stuck::NotOpen));
        assert_eq!(
            shard(&placement, "a", MAX_HOPS + 1).err(),
            Some(Stuck::Restless)
        );
    }
}
