//! Intake: where appends and requests (query, stats, delete) enter the worker. Each message is
//! decoded, validated, routed through the ring and queued on its shard's pipeline; bad input is
//! answered, dead-lettered, counted and logged here, and never reaches a shard.
//!
//! Requests always arrive on core queue subscriptions. Appends arrive either the same way
//! ([`run_core`], the original's design) or from a durable JetStream pull consumer shared by the
//! fleet ([`run_jetstream`]), which keeps every publish until a worker has committed it.
//!
//! On shutdown, intake stops taking new messages (core subscriptions are drained; JetStream
//! stops fetching) and every message already delivered is still processed.

use std::sync::Arc;

use async_nats::Subscriber;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

mod durable;
pub mod ordered;
pub mod partitions;
mod pull;
mod requests;
mod route;
pub mod server;
mod stream;

use requests::drain;

pub use durable::{
    keep_stream, run_jetstream, sample_consumer_lag, setup_until, IntakeError, JetStream,
    LAG_SAMPLE_INTERVAL,
};
pub use requests::{RequestKind, Requests};
pub use route::Router;
pub use stream::partition_consumer;

/// Core intake: consume both queue subscriptions until `cancel` fires, then drain them and
/// process what was already delivered. Returns when both are exhausted.
pub async fn run_core(
    mut logs: Subscriber,
    mut requests: Requests,
    router: Arc<Router>,
    cancel: CancellationToken,
) {
    // `biased` keeps a publisher's order: async-nats hands messages to subscriptions in the
    // order they arrived, so an append published before a query is already in `logs` when the
    // query shows up, and polling `logs` first takes it first.
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            Some(message) = logs.next() => router.core_append(message).await,
            Some((kind, message)) = requests.next() => router.request(kind, message).await,
            else => return,
        }
    }
    tracing::info!("draining NATS subscriptions");
    drain(&mut logs).await;
    requests.drain().await;
    loop {
        tokio::select! {
            biased;
            Some(message) = logs.next() => router.core_append(message).await,
            Some((kind, message)) = requests.next() => router.request(kind, message).await,
            else => return,
        }
    }
}
