//! The core queue subscriptions of the requests (query, stats, delete), read as one stream.

use async_nats::{Message, Subscriber};
use futures::StreamExt;

/// Which subject a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Query,
    Stats,
    Delete,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Query => "query",
            RequestKind::Stats => "stats",
            RequestKind::Delete => "delete",
        }
    }
}

/// The core queue subscriptions of the requests answered from a shard (query, stats,
/// delete), taken together: read as one stream, drained together at shutdown.
pub struct Requests {
    pub query: Subscriber,
    pub stats: Subscriber,
    pub delete: Subscriber,
}

impl Requests {
    /// The next request on any subject; `None` once every subscription has ended.
    pub(super) async fn next(&mut self) -> Option<(RequestKind, Message)> {
        tokio::select! {
            Some(message) = self.query.next() => Some((RequestKind::Query, message)),
            Some(message) = self.stats.next() => Some((RequestKind::Stats, message)),
            Some(message) = self.delete.next() => Some((RequestKind::Delete, message)),
            else => None,
        }
    }

    pub(super) async fn drain(&mut self) {
        drain(&mut self.query).await;
        drain(&mut self.stats).await;
        drain(&mut self.delete).await;
    }
}

/// Drain `subscriber`: NATS stops delivering to it, and what was delivered is still read.
pub(super) async fn drain(subscriber: &mut Subscriber) {
    if let Err(e) = subscriber.drain().await {
        tracing::warn!(error = %e, "cannot drain a subscription");
    }
}
