//! The logstore worker as a library: `main.rs` parses the configuration and calls [`run`];
//! tests call [`run`] directly, or [`run_on`] with a metrics listener they bound themselves.
//!
//! # Layout
//! A message travels down this list: NATS → intake → routing → shard pipeline → PostgreSQL →
//! settlement and outbox. No two modules depend on each other, directly or around a loop
//! (`tests/layout.rs` checks it): where a lower module needs an upper one, it names what it
//! needs as a trait ([`follow::Lanes`]) that the upper one implements.
//!
//! Assembly and plumbing:
//! - `app` (private): the composition root behind [`run`] and [`run_on`] (the same on a
//!   listener already bound): build, start the intake, drain.
//! - [`config`]: settings from env/CLI, validated once into an `Arc<Config>`.
//! - `nats` (private): the NATS connection and its logging callbacks.
//! - `cancel` (private): the cancellable pause and the backoff schedule every retry loop uses.
//! - [`migrate`]: `worker migrate` (schema and grants, then exit).
//! - [`admin`]: `worker shards add/remove/status/repair`.
//!
//! The data path:
//! - [`intake`]: where messages enter. `intake/route.rs` decodes and validates, rejects bad
//!   input and routes to a shard's queue; `requests.rs` reads the core request subscriptions;
//!   `durable.rs` sets up the JetStream stream and consumer and runs the unordered pull loop;
//!   `ordered.rs` the ordered puller (JS_ORDERED); `pull.rs` the one pull request both make.
//! - [`ring`]: which shard owns an object id at which epoch (pure placement; golden-tested);
//!   [`membership`]: the fleet's ring record in NATS KV, and the move's progress.
//!   [`shards`]: the live set of lanes (pool, pipelines, health, retention) that the record
//!   names (`shards/record.rs` follows the record, `shards/lane.rs` builds a lane).
//!   [`mover`]: carries a ring change out.
//! - [`pipeline`]: per-shard queue; batches appends into one transaction, starts queries after
//!   the appends received before them; never lets a hung shard stall intake. Follows an object
//!   that moved to another lane (through [`follow::Lanes`], which [`shards`] implements).
//!   [`follow`]: the rules both follow a moved object by (MAX_HOPS, the fence), and the
//!   [`follow::Lanes`] trait through which they reach the lane set without depending on it.
//! - [`query`]: query, stats and delete admission, deadlines and slots; follows a moved
//!   object like [`pipeline`]; `query/stream.rs` streams an answer in chunks.
//! - [`store`]: PostgreSQL: pools and libpq-style TLS (`store::tls`; the URL parameters are
//!   parsed by `config::conninfo`), migrations, shard
//!   identity and fleet, the append function, paged reads, stats, deletion and the resharding
//!   copy; `migrations/CURRENT.sql` shows the schema they make.
//! - [`unfinished`]: which shard queue each object's unfinished appends wait in; the router
//!   queues an object's next append behind them, so a ring change cannot reorder its appends.
//! - [`origin`]: a message's fate once its outcome is known: reply, event, ack / nak / term,
//!   dead letter, in-flight gauge. [`replies`]: which reply subjects a core message may name.
//! - [`outbox`]: replies, `appended.<id>` events, response chunks, errors and dead letters.
//! - [`dead_letters`]: the JetStream stream that keeps the last dead letters (DEAD_LETTERS).
//!
//! Around the data path:
//! - `health` (private): one watcher per lane: initialise, confirm the fleet, ping; up/down.
//! - [`retention`]: the RETENTION_MAX_AGE sweeper, a background task per lane.
//! - `lease` (private): the KV lease the ordered puller and the mover hold, and the KV buckets.
//! - [`metrics`] and [`http`]: Prometheus metrics, `/metrics`, `/healthz`, `/readyz`.
//! - [`service`]: registration with the NATS service API (`nats micro ls/info/stats`), again
//!   whenever the ring changes; `service/answer.rs` answers the `status` endpoint
//!   (`logstore status`) with what the worker knows.

pub mod admin;
mod app;
mod cancel;
pub mod config;
pub mod dead_letters;
pub mod follow;
mod health;
pub mod http;
pub mod intake;
mod lease;
pub mod membership;
pub mod metrics;
pub mod migrate;
pub mod mover;
mod nats;
pub mod origin;
pub mod outbox;
pub mod pipeline;
pub mod query;
pub mod replies;
pub mod retention;
pub mod ring;
pub mod service;
pub mod shards;
pub mod store;
pub mod unfinished;

pub use app::{run, run_on, Error};
pub use logstore_protocol::chain::Chain;
pub use migrate::{migrate, ROLES_SQL};
