//! One test's world ([`Env`]): a NATS URL, its own subjects and JetStream stream (so tests
//! sharing a server never see each other's messages) and its own shard databases; the worker
//! settings for it, as a `Config` for an in-process worker or as variables for the binary.

use std::sync::Arc;

use clap::Parser;
use worker::config::{Config, RawConfig};

use super::servers::{fresh_db, shared, unique_name};
use super::within;
use super::worker::TestWorker;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    raw: RawConfig,
}

/// One test's world: a NATS URL, its own subjects (so tests sharing a server never see each
/// other's messages) and its own shard databases.
#[derive(Clone)]
pub struct Env {
    pub nats_url: String,
    pub prefix: String,
    /// (shard name, database URL)
    pub shards: Vec<(String, String)>,
    /// `core` or `jetstream` (INTAKE).
    pub intake: &'static str,
}

impl Env {
    /// Shards named `names`, placed round-robin on the two shared Postgres servers, each in a
    /// fresh database.
    pub async fn shared(names: &[&str]) -> Env {
        let servers = shared();
        let mut shards = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let pg = &servers.pg[i % servers.pg.len()];
            shards.push((name.to_string(), fresh_db(pg, name).await));
        }
        Env {
            nats_url: servers.nats.url(),
            prefix: unique_name("t"),
            shards,
            intake: "core",
        }
    }

    pub fn subject(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// This test's JetStream stream (streams may not share subjects, so each test has its own).
    pub fn stream(&self) -> String {
        format!("{}_logs", self.prefix)
    }

    /// This test's dead-letter stream (DEAD_LETTERS_STREAM).
    pub fn dead_letters_stream(&self) -> String {
        format!("{}_dead", self.prefix)
    }

    pub fn shards_spec(&self) -> String {
        self.shards
            .iter()
            .map(|(name, url)| format!("{name}={url}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The worker settings for this env as `(variable, value)` pairs, usable as CLI flags or env.
    pub fn settings(&self, metrics_port: u16) -> Vec<(&'static str, String)> {
        vec![
            ("NATS_URL", self.nats_url.clone()),
            ("POSTGRES_SHARDS", self.shards_spec()),
            ("NATS_LOGS_TOPIC", self.subject("logs")),
            ("NATS_QUERY_TOPIC", self.subject("query")),
            ("NATS_RESPONSE_TOPIC", self.subject("response")),
            ("NATS_STATS_TOPIC", self.subject("stats")),
            ("NATS_DELETE_TOPIC", self.subject("delete")),
            ("NATS_QUEUE_GROUP", self.subject("workers")),
            ("NATS_EVENTS_PREFIX", self.subject("appended")),
            ("NATS_REJECTED_PREFIX", self.subject("rejected")),
            ("NATS_DEAD_LETTER_TOPIC", self.subject("dead_letter")),
            ("DEAD_LETTERS_STREAM", self.dead_letters_stream()),
            // Every test has a stream of its own, reserving its max bytes on the shared server.
            ("DEAD_LETTERS_MAX_BYTES", (8 << 20).to_string()),
            ("METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
            ("SHARD_TIMEOUT_MS", "3000".to_string()),
            ("INTAKE", self.intake.to_string()),
            ("NATS_STREAM", self.stream()),
        ]
    }

    /// The validated worker config for this env, with `extra` settings (variable, value) on
    /// top, e.g. `POSTGRES_PASSWORD_FILE`: parsed from flags as the binary parses them.
    pub fn config(&self, metrics_port: u16, extra: &[(&str, &str)]) -> Arc<Config> {
        let mut args = vec!["worker".to_string()];
        let settings = self.settings(metrics_port);
        let all = settings
            .iter()
            .map(|(var, value)| (*var, value.as_str()))
            .chain(extra.iter().copied());
        for (var, value) in all {
            args.push(format!("--{}", var.to_lowercase().replace('_', "-")));
            args.push(value.to_string());
        }
        let raw = Args::try_parse_from(args).expect("test config parses").raw;
        Arc::new(raw.validate().expect("test config is valid"))
    }

    pub async fn client(&self) -> async_nats::Client {
        within(
            10,
            "connect to NATS",
            async_nats::connect(self.nats_url.as_str()),
        )
        .await
        .expect("connect to NATS")
    }

    /// Start a worker in this process, with `extra` settings on top of this env's, and wait
    /// until it is ready.
    pub async fn start_worker(&self, extra: &[(&str, &str)]) -> TestWorker {
        let worker = self.spawn_worker(extra);
        worker.wait_ready().await;
        worker
    }

    /// Start a worker in this process, with `extra` settings, without waiting for it.
    pub fn spawn_worker(&self, extra: &[(&str, &str)]) -> TestWorker {
        TestWorker::spawn(self, extra)
    }
}
