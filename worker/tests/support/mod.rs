//! Test support: real servers (see `servers`), workers run in-process or as the real binary,
//! and client helpers. Every wait is bounded by a timeout.
//!
//! - `env`: one test's world ([`Env`]) and the worker settings for it;
//! - `worker`: [`TestWorker`] (in-process) and [`WorkerCommand`] / [`WorkerProcess`] (the binary);
//! - `client`: appends, queries and requests over NATS;
//! - `db`: shard databases read directly; `http`: the metrics/health endpoint;
//! - `load`: publishing with a ledger of what was acknowledged, and verifying the shards hold
//!   every acknowledged append once, in order (also a loadgen run's own verify);
//! - `bins`: the workspace's binaries, loadgen runs; `cli`: `logstore` pointed at a test's
//!   world; `scenarios`: shared test logic;
//! - `servers`: NATS (one server or a cluster) and PostgreSQL; `tls`: certificates.

#![allow(dead_code, unused_imports)] // each test binary uses a different part of this module

mod bins;
mod cli;
mod client;
mod db;
mod env;
mod http;
mod load;
mod partitions;
mod scenarios;
pub mod servers;
mod shipped;
pub mod tls;
mod worker;

use std::future::Future;
use std::time::Duration;

pub use bins::*;
pub use cli::*;
pub use client::*;
pub use db::*;
pub use env::*;
pub use http::*;
pub use load::*;
pub use partitions::*;
pub use scenarios::*;
pub use servers::{
    free_port, fresh_db, pg_command, shared, shared_cluster, unique_name, NatsCluster, NatsServer,
    PgPair, PgServer, CLUSTER_SIZE,
};
pub use shipped::*;
pub use worker::*;

/// Await `future` for at most `secs` seconds; a timeout fails the test with `what`.
pub async fn within<T>(secs: u64, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {secs}s: {what}"),
    }
}

/// Poll `check` every 50 ms until it returns `Some`, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(secs, what, async {
        loop {
            if let Some(value) = check().await {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}
