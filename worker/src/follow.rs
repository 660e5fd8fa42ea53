//! Following an object the ring moved. An append or request that meets its object's tombstone
//! (`moved`), a shard fenced at a newer ring epoch, or a lane that the current view no longer
//! places it on goes on to the object's owner: [`crate::pipeline`] sends appends on,
//! [`crate::query`] looks requests up again. Both stop after [`MAX_HOPS`] and answer
//! `unavailable` in their own words.

use std::sync::Arc;

use crate::shards::{Lane, Shards, View};
use crate::store::Shard;

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

/// The lane of shard `name` in `view` for hop number `hop` (the first hop is 1).
pub fn lane<'v>(view: &'v View, name: &str, hop: u8) -> Result<&'v Arc<Lane>, Stuck> {
    if hop > MAX_HOPS {
        return Err(Stuck::Restless);
    }
    view.lane(name).ok_or(Stuck::NotOpen)
}

/// `shard` answered that it is fenced at ring epoch `fence`: learn the ring (see
/// [`Shards::refresh`]) and return the view that reaches it, to route again by; `None` when the
/// newer ring cannot be read (an outage for what met the fence).
pub async fn past_fence(fleet: &Shards, shard: &Shard, fence: u64) -> Option<Arc<View>> {
    fleet.refresh(shard, fence).await;
    let view = fleet.view();
    (view.layout.epoch >= fence).then_some(view)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::ring::{Layout, Member, MoveState, Record};

    fn view() -> View {
        let record = Record {
            epoch: 3,
            state: MoveState::Steady,
            members: vec![Member {
                name: "a".to_string(),
                url: "postgres://a/db".to_string(),
            }],
            vnodes: 16,
            previous: None,
            fleet: None,
        };
        View {
            layout: Layout::new(record),
            lanes: HashMap::new(),
        }
    }

    #[test]
    fn a_hop_past_the_limit_is_restless_before_a_missing_lane() {
        let view = view();
        assert_eq!(lane(&view, "a", MAX_HOPS).err(), Some(Stuck::NotOpen));
        assert_eq!(lane(&view, "a", MAX_HOPS + 1).err(), Some(Stuck::Restless));
    }
}
