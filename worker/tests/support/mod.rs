//! Test support: real servers (see `servers`), workers run in-process or as the real binary,
//! and client helpers. Every wait is bounded by a timeout.

#![allow(dead_code, unused_imports)] // each test binary uses a different part of this module

pub mod servers;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use logstore_protocol::{AppendReply, ErrorReply, LogEntry, QueryResponse};
use tokio::task::JoinHandle;
use worker::config::{Config, RawConfig};

pub use servers::{fresh_db, pg_connect, shared, unique_name, NatsServer, PgServer};

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

/// The latest entry of lease `key` in the workers' lease bucket: a put names its holder
/// ("pid N"), a delete marker says it was released; None once it expired (or never existed).
pub async fn lease_entry(
    client: &async_nats::Client,
    key: &str,
) -> Option<async_nats::jetstream::kv::Entry> {
    async_nats::jetstream::new(client.clone())
        .get_key_value(worker::ordered::LEASE_BUCKET)
        .await
        .expect("the lease bucket")
        .entry(key)
        .await
        .expect("read the lease")
}

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    raw: RawConfig,
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
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
            ("NATS_DEAD_LETTER_TOPIC", self.subject("dead_letter")),
            ("METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
            ("SHARD_TIMEOUT_MS", "3000".to_string()),
            ("INTAKE", self.intake.to_string()),
            ("NATS_STREAM", self.stream()),
        ]
    }

    pub fn config(&self, metrics_port: u16) -> Arc<Config> {
        let mut args = vec!["worker".to_string()];
        for (var, value) in self.settings(metrics_port) {
            args.push(format!("--{}", var.to_lowercase().replace('_', "-")));
            args.push(value);
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

    /// Start a worker in this process and wait until it is ready.
    pub async fn start_worker(&self) -> TestWorker {
        let worker = self.spawn_worker();
        worker.wait_ready().await;
        worker
    }

    /// [`Env::config`] with `extra` settings (variable, value) on top, e.g.
    /// `POSTGRES_PASSWORD_FILE`.
    pub fn config_with(&self, metrics_port: u16, extra: &[(&str, &str)]) -> Arc<Config> {
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

    /// [`Env::start_worker`] with `extra` settings.
    pub async fn start_worker_with(&self, extra: &[(&str, &str)]) -> TestWorker {
        let worker = self.spawn_worker_with(extra);
        worker.wait_ready().await;
        worker
    }

    /// [`Env::spawn_worker`] with `extra` settings.
    pub fn spawn_worker_with(&self, extra: &[(&str, &str)]) -> TestWorker {
        let port = free_port();
        let config = self.config_with(port, extra);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(worker::run(config, async move {
            let _ = stopped.await;
        }));
        TestWorker {
            metrics: SocketAddr::from(([127, 0, 0, 1], port)),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Start a worker in this process without waiting for it.
    pub fn spawn_worker(&self) -> TestWorker {
        let port = free_port();
        let config = self.config(port);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(worker::run(config, async move {
            let _ = stopped.await;
        }));
        TestWorker {
            metrics: SocketAddr::from(([127, 0, 0, 1], port)),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Append through NATS request-reply; panics on an error reply.
    pub async fn append(
        &self,
        client: &async_nats::Client,
        id: u64,
        log: &str,
        key: Option<&str>,
    ) -> AppendReply {
        let body = append_body(id, log, key);
        let reply = request(client, &self.subject("logs"), body).await;
        match serde_json::from_slice::<AppendReply>(&reply.payload) {
            Ok(reply) => reply,
            Err(_) => panic!(
                "append {id} failed: {}",
                String::from_utf8_lossy(&reply.payload)
            ),
        }
    }

    /// Append through NATS request-reply; returns the error reply if there is one.
    pub async fn try_append(
        &self,
        client: &async_nats::Client,
        id: u64,
        log: &str,
    ) -> Result<AppendReply, ErrorReply> {
        let reply = request(client, &self.subject("logs"), append_body(id, log, None)).await;
        parse_reply(&reply.payload)
    }

    /// Read an object's whole log (all chunks) via a reply subject.
    pub async fn query_all(&self, client: &async_nats::Client, id: u64) -> Vec<QueryResponse> {
        self.query(client, serde_json::json!({ "id": id })).await
    }

    /// Send a query with a reply subject and collect its chunks until `last`.
    pub async fn query(
        &self,
        client: &async_nats::Client,
        body: serde_json::Value,
    ) -> Vec<QueryResponse> {
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .expect("subscribe inbox");
        client
            .publish_with_reply(self.subject("query"), inbox, body.to_string().into())
            .await
            .expect("publish query");
        collect_chunks(&mut replies).await
    }
}

pub fn append_body(id: u64, log: &str, key: Option<&str>) -> Bytes {
    let mut body = serde_json::json!({ "id": id, "log": log });
    if let Some(key) = key {
        body["key"] = key.into();
    }
    body.to_string().into()
}

pub fn parse_reply(payload: &[u8]) -> Result<AppendReply, ErrorReply> {
    serde_json::from_slice::<AppendReply>(payload).map_err(|_| {
        serde_json::from_slice::<ErrorReply>(payload).unwrap_or_else(|e| {
            panic!(
                "reply is neither success nor error ({e}): {}",
                String::from_utf8_lossy(payload)
            )
        })
    })
}

/// Request-reply with a 10 s bound.
pub async fn request(
    client: &async_nats::Client,
    subject: &str,
    body: Bytes,
) -> async_nats::Message {
    within(10, "request", client.request(subject.to_string(), body))
        .await
        .unwrap_or_else(|e| panic!("request on {subject} failed: {e}"))
}

/// Collect query response chunks until the one marked `last`, checking chunk numbering.
pub async fn collect_chunks(subscriber: &mut async_nats::Subscriber) -> Vec<QueryResponse> {
    let mut chunks: Vec<QueryResponse> = Vec::new();
    within(60, "query response chunks", async {
        while let Some(message) = subscriber.next().await {
            let chunk: QueryResponse =
                serde_json::from_slice(&message.payload).unwrap_or_else(|e| {
                    panic!(
                        "bad response chunk ({e}): {}",
                        String::from_utf8_lossy(&message.payload)
                    )
                });
            assert_eq!(
                chunk.chunk as usize,
                chunks.len(),
                "chunks arrive numbered in order"
            );
            let last = chunk.last;
            chunks.push(chunk);
            if last {
                return;
            }
        }
        panic!("subscription ended before the last chunk");
    })
    .await;
    chunks
}

pub fn entries(chunks: &[QueryResponse]) -> Vec<LogEntry> {
    chunks.iter().flat_map(|c| c.logs.iter().cloned()).collect()
}

/// Headers of a message as (name, value) strings, for assertions.
pub fn header(headers: &Option<HeaderMap>, name: &str) -> Option<String> {
    headers.as_ref()?.get(name).map(|v| v.as_str().to_string())
}

pub fn subject(s: &str) -> Subject {
    Subject::from(s)
}

/// A worker running in the test's runtime.
pub struct TestWorker {
    pub metrics: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), worker::Error>>>,
}

impl TestWorker {
    pub async fn wait_ready(&self) {
        let addr = self.metrics;
        eventually(30, "worker ready", || async move {
            match http_get(addr, "/readyz").await {
                Some((200, _)) => Some(()),
                _ => None,
            }
        })
        .await
    }

    /// True while the worker's task has not ended (it did not crash or return).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        within(10, "HTTP GET", http_get(self.metrics, path))
            .await
            .unwrap_or_else(|| panic!("GET {path} failed"))
    }

    /// Shut down gracefully and return run()'s result.
    pub async fn stop(mut self) -> Result<(), worker::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("worker task");
        within(30, "worker shutdown", task)
            .await
            .expect("worker task panicked")
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A worker running as its own process (the real binary), for tests that kill or signal it.
pub struct WorkerProcess {
    pub child: tokio::process::Child,
    pub metrics: SocketAddr,
}

impl WorkerProcess {
    /// Start `worker` with `env`'s settings plus `extra` variables; does not wait for readiness.
    pub fn spawn(env: &Env, extra: &[(&str, &str)]) -> WorkerProcess {
        let port = free_port();
        let child = tokio::process::Command::new(bin_path("worker"))
            .envs(env.settings(port))
            .envs(extra.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("TEST_WORKER_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the worker binary");
        WorkerProcess {
            child,
            metrics: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    pub async fn start(env: &Env, extra: &[(&str, &str)]) -> WorkerProcess {
        let worker = Self::spawn(env, extra);
        worker.wait_ready().await;
        worker
    }

    pub async fn wait_ready(&self) {
        let addr = self.metrics;
        eventually(60, "worker process ready", || async move {
            matches!(http_get(addr, "/readyz").await, Some((200, _))).then_some(())
        })
        .await
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("worker still running") as i32;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }

    /// SIGKILL and reap.
    pub async fn kill(mut self) {
        self.signal(libc::SIGKILL);
        within(10, "killed worker exits", self.child.wait())
            .await
            .expect("wait");
    }

    /// SIGTERM; returns the exit code.
    pub async fn terminate(mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        within(60, "worker exits after SIGTERM", self.child.wait())
            .await
            .expect("wait")
            .code()
    }
}

/// CPU time process `pid` has used so far, user and system (`/proc/<pid>/stat`).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces, in parentheses): state is the
    // first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> u64 {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("/proc/{pid}/stat field {i}: {stat}"))
    };
    // SAFETY: sysconf only reads a configuration value.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / per_second)
}

/// A worker whose metrics endpoint (METRICS_ADDR) a test reads.
pub trait Metered {
    fn metrics_addr(&self) -> SocketAddr;
}

impl Metered for WorkerProcess {
    fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }
}

impl Metered for LoggedWorker {
    fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }
}

/// Minimal HTTP/1.0 GET (the worker speaks HTTP/1.1; 1.0 makes it close the connection).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .ok()?
        .ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Sum of a metric's samples whose labels include every `label="value"` in `labels`.
pub fn metric_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(name)
                && matches!(line.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Rows of one object as stored on a shard: (seq, ts, log, key).
pub async fn db_rows(
    url: &str,
    id: u64,
) -> Vec<(i64, std::time::SystemTime, String, Option<String>)> {
    let client = pg_connect(url).await;
    client
        .query(
            "SELECT seq, ts, log, key FROM logs WHERE object_id = $1 ORDER BY seq",
            &[&(id as i64)],
        )
        .await
        .expect("read rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Path of a workspace binary (`worker`, `loadgen`), built by `cargo build --workspace --bins`
/// (scripts/test.sh does that first). Test executables live in target/<profile>/deps/, the
/// binaries one directory up.
pub fn bin_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Flags pointing loadgen at this test's subjects.
pub fn loadgen_flags(env: &Env) -> Vec<String> {
    [
        ("--nats-url", env.nats_url.clone()),
        ("--logs-subject", env.subject("logs")),
        ("--query-subject", env.subject("query")),
        ("--progress-secs", "1".to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect()
}

/// Start the loadgen binary with `extra` flags and a JSON report in `report`.
pub fn spawn_loadgen(env: &Env, extra: &[&str], report: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(bin_path("loadgen"))
        .args(loadgen_flags(env))
        .args(extra)
        .arg("--report")
        .arg(report)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the loadgen binary")
}

/// Wait for loadgen to exit; print its output (shown on failure or with --nocapture) and
/// return its exit code and JSON report.
pub async fn finish_loadgen(
    child: tokio::process::Child,
    report: &std::path::Path,
) -> (i32, serde_json::Value) {
    let output = within(90, "loadgen finishes", child.wait_with_output())
        .await
        .expect("wait for loadgen");
    println!(
        "loadgen stdout:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    println!(
        "loadgen stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = std::fs::read(report).unwrap_or_else(|e| panic!("read the report: {e}"));
    let report: serde_json::Value = serde_json::from_slice(&report).expect("the report is JSON");
    (output.status.code().unwrap_or(-1), report)
}

/// The number at `path` in a loadgen report.
pub fn report_num(report: &serde_json::Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(report, |v, k| &v[*k])
        .as_f64()
        .unwrap_or_else(|| panic!("report has no number at {path:?}: {report}"))
}

/// Every storage invariant of one shard database, for every object on it: seq 1..=n without
/// gaps, ts never decreasing along seq, each key once, and the head row equal to what the log
/// holds (count, last seq/ts, and the statistics: first seq/ts, bytes). Returns the number of
/// entries per object. (For shards where nothing was deleted: it expects seqs from 1.)
pub async fn check_shard_invariants(url: &str) -> HashMap<i64, i64> {
    let db = pg_connect(url).await;
    let rows = db
        .query(
            "SELECT object_id, seq, ts, key, octet_length(log) FROM logs ORDER BY object_id, seq",
            &[],
        )
        .await
        .unwrap();
    // Per object: (last seq, last ts, first ts, bytes).
    let mut per_object: HashMap<i64, (i64, SystemTime, SystemTime, i64)> = HashMap::new();
    let mut keys = HashSet::new();
    for row in &rows {
        let (id, seq, ts, key, bytes): (i64, i64, SystemTime, Option<String>, i32) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let (last_seq, last_ts, _, total) =
            per_object
                .entry(id)
                .or_insert((0, SystemTime::UNIX_EPOCH, ts, 0));
        assert_eq!(
            seq,
            *last_seq + 1,
            "object {id}: seq {seq} after {last_seq}"
        );
        assert!(ts >= *last_ts, "object {id}: ts decreases at seq {seq}");
        (*last_seq, *last_ts) = (seq, ts);
        *total += i64::from(bytes);
        if let Some(key) = key {
            assert!(
                keys.insert((id, key.clone())),
                "object {id}: key {key} stored twice"
            );
        }
    }
    let heads = db
        .query(
            "SELECT id, entries, last_seq, last_ts, first_seq, first_ts, bytes FROM objects",
            &[],
        )
        .await
        .unwrap();
    let mut counts = HashMap::new();
    for row in &heads {
        let (id, entries, last_seq, last_ts): (i64, i64, i64, SystemTime) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let (first_seq, first_ts, bytes): (Option<i64>, Option<SystemTime>, i64) =
            (row.get(4), row.get(5), row.get(6));
        let (seq, ts, first, total) = per_object.get(&id).copied().unwrap_or((
            0,
            SystemTime::UNIX_EPOCH,
            SystemTime::UNIX_EPOCH,
            0,
        ));
        assert_eq!((entries, last_seq), (seq, seq), "object {id}: head row");
        assert_eq!(bytes, total, "object {id}: head bytes");
        if seq > 0 {
            assert_eq!(last_ts, ts, "object {id}: head last_ts");
            assert_eq!(
                (first_seq, first_ts),
                (Some(1), Some(first)),
                "object {id}: head first_seq/first_ts"
            );
        } else {
            assert_eq!(
                (first_seq, first_ts),
                (None, None),
                "object {id}: empty head"
            );
        }
        counts.insert(id, entries);
    }
    assert_eq!(counts.len(), per_object.len(), "a head row per object");
    counts
}

/// Raise this process's soft open-descriptor limit (RLIMIT_NOFILE) to its hard limit, for tests
/// that hold thousands of sockets; returns the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid, owned rlimit struct.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit),
            0,
            "getrlimit"
        );
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "setrlimit");
    }
    limit.rlim_cur
}

impl WorkerProcess {
    /// Like [`WorkerProcess::spawn`], with the worker's open-descriptor limit (soft and hard
    /// RLIMIT_NOFILE) set to `nofile`, as on a host with the common default of 1,024.
    pub fn spawn_with_nofile(env: &Env, extra: &[(&str, &str)], nofile: u64) -> WorkerProcess {
        let port = free_port();
        let limit = libc::rlimit {
            rlim_cur: nofile,
            rlim_max: nofile,
        };
        let mut command = tokio::process::Command::new(bin_path("worker"));
        command
            .envs(env.settings(port))
            .envs(extra.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("TEST_WORKER_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and the
        // closure touches nothing but its own copy of `limit`.
        unsafe {
            command.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command.spawn().expect("start the worker binary");
        WorkerProcess {
            child,
            metrics: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// The process id (panics once the process has been reaped).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("worker still running")
    }

    /// How many file descriptors the process has open (`/proc/<pid>/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read the worker's /proc/<pid>/fd")
            .count()
    }
}

/// A worker process at `RUST_LOG=debug` (or another level) whose stdout and stderr are
/// collected as it runs, for tests that read its log lines.
pub struct LoggedWorker {
    child: tokio::process::Child,
    output: Arc<std::sync::Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    pub metrics: SocketAddr,
}

impl LoggedWorker {
    /// `env`'s settings plus `extra`, nothing inherited, `RUST_LOG=debug`.
    pub fn spawn(env: &Env, extra: &[(&str, String)]) -> LoggedWorker {
        LoggedWorker::spawn_logging(env, extra, Some("debug"))
    }

    /// The same with `RUST_LOG` as given, or unset: the worker's default log level.
    pub fn spawn_logging(
        env: &Env,
        extra: &[(&str, String)],
        rust_log: Option<&str>,
    ) -> LoggedWorker {
        let port = free_port();
        let mut command = tokio::process::Command::new(bin_path("worker"));
        command.env_clear().envs(env.settings(port));
        if let Some(level) = rust_log {
            command.env("RUST_LOG", level);
        }
        let mut child = command
            .envs(extra.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the worker binary");
        let output = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let readers = vec![
            tokio::spawn(collect_output(stdout, output.clone())),
            tokio::spawn(collect_output(stderr, output.clone())),
        ];
        LoggedWorker {
            child,
            output,
            readers,
            metrics: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("output lock")).into_owned()
    }

    /// The process id (panics once the process has been reaped).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("worker still running")
    }

    /// Waits (at most 30 s) until the output contains `needle`; a timeout fails the test with
    /// the output so far.
    pub async fn wait_for(&self, needle: &str) {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while !self.output().contains(needle) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if found.is_err() {
            panic!(
                "timed out after 30s: worker logs {needle:?}; its output:\n{}",
                self.output()
            );
        }
    }

    /// Waits (at most 60 s) until `/readyz` answers 200; a timeout fails the test with the
    /// worker's output so far.
    pub async fn wait_ready(&self) {
        let addr = self.metrics;
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while !matches!(http_get(addr, "/readyz").await, Some((200, _))) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if ready.is_err() {
            panic!(
                "timed out after 60s: worker ready; /readyz {:?}; its output:\n{}",
                http_get(addr, "/readyz").await,
                self.output()
            );
        }
    }

    /// SIGTERM; SIGKILL if it has not exited within 20 s (a worker that never reached NATS
    /// may wait for it at shutdown, which is not what these tests are about). Returns
    /// everything it printed.
    pub async fn stop(mut self) -> String {
        let pid = self.child.id().expect("worker still running") as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await.expect("SIGKILL the worker");
        }
        for reader in self.readers.drain(..) {
            within(10, "worker output read to its end", reader)
                .await
                .expect("output reader");
        }
        self.output()
    }
}

async fn collect_output(
    mut from: impl tokio::io::AsyncRead + Unpin,
    into: Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8192];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        into.lock()
            .expect("output lock")
            .extend_from_slice(&buf[..n]);
    }
}

/// The worker's core behaviour through NATS, for any setup that should not change it (the
/// shared superuser servers in core.rs, a least-privileged role in privilege.rs, TLS in
/// tls.rs): the original's format (appends and a query without reply subjects, the answer on
/// the response subject, in order); keyed appends, each key stored once however often and
/// however concurrently it is sent (also as a `Nats-Msg-Id` header), duplicates answered with
/// the original seq and ts; queries sorted by seq with ts never decreasing, paged with
/// `after`/`next` and newest first with `order: desc`; the extreme ids. Uses ids from `base`
/// to `base + 4` and `0`/`u64::MAX`, so give each call its own databases.
pub async fn core_scenarios(env: &Env, base: u64) {
    let client = env.client().await;

    // 1. The original's format: no reply subjects, the answer on the response subject.
    let mut responses = client
        .subscribe(env.subject("response"))
        .await
        .expect("subscribe to the response subject");
    let mut events = client
        .subscribe(format!("{}.{base}", env.subject("appended")))
        .await
        .expect("subscribe to the append events");
    client.flush().await.expect("flush");
    // One at a time (each stored, as its event says, before the next is sent): with several
    // workers in the queue group two plain publishes may be stored in either order.
    for log in ["a", "b"] {
        let body = serde_json::json!({ "id": base, "log": log }).to_string();
        client
            .publish(env.subject("logs"), body.into())
            .await
            .expect("publish an append");
        within(10, "the append's event", events.next())
            .await
            .expect("an append event");
    }
    let query = serde_json::json!({ "id": base }).to_string();
    client
        .publish(env.subject("query"), query.into())
        .await
        .expect("publish a query");
    let chunks = collect_chunks(&mut responses).await;
    let logs = entries(&chunks);
    assert_eq!(chunks[0].total, 2, "{chunks:?}");
    assert_eq!(
        logs.iter()
            .map(|e| (e.seq, e.log.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, "a"), (2, "b")]
    );
    assert!(logs[0].ts <= logs[1].ts);
    assert!(logs[0].ts.ends_with('Z'), "{}", logs[0].ts);

    // 2. Keys: racing copies store once; later copies are duplicates with the original's
    //    seq and ts; the Nats-Msg-Id header works as a key.
    let id = base + 1;
    for round in 0..3 {
        let (key, log) = (format!("race-{round}"), format!("once {round}"));
        let replies =
            futures::future::join_all((0..5).map(|_| env.append(&client, id, &log, Some(&key))))
                .await;
        let originals: Vec<&AppendReply> = replies.iter().filter(|r| !r.duplicate).collect();
        assert_eq!(originals.len(), 1, "round {round}: {replies:?}");
        assert_eq!(originals[0].seq, round + 1, "round {round}: {replies:?}");
        for reply in &replies {
            assert_eq!((reply.seq, &reply.ts), (originals[0].seq, &originals[0].ts));
        }
    }
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "header-key");
    let mut seen = Vec::new();
    for _ in 0..2 {
        let reply = within(
            10,
            "append with a Nats-Msg-Id header",
            client.request_with_headers(
                env.subject("logs"),
                headers.clone(),
                append_body(id, "by header", None),
            ),
        )
        .await
        .expect("append with a Nats-Msg-Id header");
        seen.push(parse_reply(&reply.payload).expect("stored"));
    }
    assert_eq!(
        (
            seen[0].seq,
            seen[0].duplicate,
            seen[1].seq,
            seen[1].duplicate
        ),
        (4, false, 4, true)
    );

    // 3. Queries: sorted by seq, ts never decreasing, paged, and newest first.
    let id = base + 2;
    let n = 250u64;
    futures::future::join_all((0..n).map(|i| {
        let client = &client;
        async move {
            let key = format!("bulk-{i}");
            env.append(client, id, &format!("entry {i}"), Some(&key))
                .await
        }
    }))
    .await;
    let mut after = 0;
    let mut paged = Vec::new();
    loop {
        let chunks = env
            .query(
                &client,
                serde_json::json!({ "id": id, "after": after, "limit": 100 }),
            )
            .await;
        assert_eq!(chunks[0].total, n);
        paged.extend(entries(&chunks));
        match chunks.last().and_then(|c| c.next) {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(
        paged.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    assert!(paged.windows(2).all(|w| w[0].ts <= w[1].ts), "ts decreases");
    let logs: HashSet<String> = paged.iter().map(|e| e.log.clone()).collect();
    assert_eq!(logs.len() as u64, n, "every entry once");
    let newest = env
        .query(
            &client,
            serde_json::json!({ "id": id, "order": "desc", "limit": 3 }),
        )
        .await;
    assert_eq!(
        entries(&newest).iter().map(|e| e.seq).collect::<Vec<_>>(),
        [n, n - 1, n - 2]
    );

    // 4. The extreme ids.
    for id in [0, u64::MAX] {
        let reply = env.append(&client, id, &format!("log of {id}"), None).await;
        assert_eq!(reply.id, id);
        let logs = entries(&env.query_all(&client, id).await);
        assert_eq!(
            logs.last().map(|e| e.log.clone()),
            Some(format!("log of {id}"))
        );
    }
}

/// Runs binary `bin` with exactly `env` (nothing inherited) to its end, within `secs`: exit code,
/// stdout, stderr.
pub async fn run_once(
    bin: &str,
    args: &[&str],
    env: &[(&str, String)],
    secs: u64,
) -> (Option<i32>, String, String) {
    let output = within(
        secs,
        &format!("{bin} {args:?} exits"),
        tokio::process::Command::new(bin_path(bin))
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run the binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
