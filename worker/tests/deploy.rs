//! Deployment: `scripts/local-up.sh` (the no-Docker runner, tested in `local_up/`) brings the
//! whole topology up, takes load, restarts what was killed and leaves nothing behind on SIGINT;
//! a real Prometheus scrapes real worker processes and its sum of stored appends equals what was
//! acknowledged; the shipped Prometheus config and alert rules and every query of the shipped
//! Grafana dashboard work on a real fleet under load.
//!
//! Run with `cargo build --workspace --bins && cargo test -p logstore-worker --test deploy`
//! (scripts/test.sh does both, and installs the Debian packages these tests use).

mod local_up;
mod support;
use support::*;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The workspace root, where `scripts/` lives.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("worker/ lives in the workspace root")
        .to_path_buf()
}

/// The `prometheus` server binary; the test fails (not skips) without it, saying how to get it.
fn prometheus_binary() -> PathBuf {
    let from_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("prometheus"))
            .find(|p| p.is_file())
    });
    from_path
        .or_else(|| Some(PathBuf::from("/usr/bin/prometheus")).filter(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!(
                "prometheus is not installed: run scripts/test.sh, which installs the Debian \
                 package `prometheus` (or `apt-get install -y prometheus`)"
            )
        })
}

/// A process started by a test that must not outlive it: dropped while still running (a failed
/// assertion), it gets SIGTERM, so local-up.sh can stop what it started, and SIGKILL after a
/// bound. Its output goes to a file, shown when something goes wrong.
struct Supervised {
    child: Child,
    output: PathBuf,
    status: Option<ExitStatus>,
}

impl Supervised {
    fn spawn(mut command: Command, output: PathBuf) -> Supervised {
        let log = fs::File::create(&output).expect("create output file");
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone output file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        Supervised {
            child,
            output,
            status: None,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// The exit status once the process has exited (reaped here).
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Panics, showing its output, if it has exited: for waits that only make sense while it runs.
    fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.exited() {
            panic!("{what} exited ({status}); its output:\n{}", self.tail());
        }
    }

    /// The last lines of its output, for failure messages.
    fn tail(&self) -> String {
        let text = fs::read_to_string(&self.output).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a PromQL expression for a query string.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant PromQL query that yields one sample, `None` while it yields none.
async fn prom_scalar(prometheus: SocketAddr, promql: &str) -> Option<f64> {
    let path = format!("/api/v1/query?query={}", url_encode(promql));
    let (status, body) = http_get(prometheus, &path).await?;
    assert_eq!(status, 200, "Prometheus answered {status}: {body}");
    let json: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("Prometheus answer is not JSON ({e}): {body}"));
    let result = json["data"]["result"].as_array()?;
    result.first()?["value"][1].as_str()?.parse().ok()
}

/// Sum of `logstore_appends_total{result="stored"}` over the workers' /metrics.
async fn stored_on(workers: &[SocketAddr]) -> f64 {
    let mut sum = 0.0;
    for &worker in workers {
        let (_, body) = within(10, "GET /metrics", http_get(worker, "/metrics"))
            .await
            .expect("worker answers /metrics");
        sum += metric_sum(&body, "logstore_appends_total", &[("result", "stored")]);
    }
    sum
}

/// Polls `sample` every 200 ms until it returns `Some(expected)`, for at most `secs` seconds;
/// a timeout fails with `what` and the last value seen (which says how far off it was).
async fn settles_at<F, Fut>(secs: u64, what: &str, expected: f64, mut sample: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<f64>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let value = sample().await;
        if value == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: expected {expected}, last seen {value:?} after {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The workers' own counters of stored appends add up to exactly `acknowledged` (a counter
/// may be bumped just after the reply or PubAck that loadgen counted, hence the wait).
async fn wait_stored(workers: &[SocketAddr], acknowledged: u64) {
    settles_at(
        30,
        "the workers stored each acknowledged append exactly once",
        acknowledged as f64,
        || async { Some(stored_on(workers).await) },
    )
    .await;
}

/// A real Prometheus scraping two worker processes every second: its sum of stored appends
/// equals the number of appends loadgen had acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sums_stored_appends_to_what_loadgen_acknowledged() {
    const APPENDS: u64 = 400;
    let prometheus_bin = prometheus_binary();
    let tmp = tempfile::tempdir().expect("temp dir");
    let env = Env::shared(&["a", "b"]).await;

    let processes = vec![
        WorkerCommand::new(&env)
            .extra(&[("INTAKE", "core")])
            .start()
            .await,
        WorkerCommand::new(&env)
            .extra(&[("INTAKE", "core")])
            .start()
            .await,
    ];
    let workers: Vec<SocketAddr> = processes.iter().map(|w| w.metrics).collect();

    let web_port = free_port();
    let targets = workers
        .iter()
        .map(|w| format!("'{w}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = tmp.path().join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: logstore-worker\n    static_configs:\n      \
             - targets: [{targets}]\n"
        ),
    )
    .expect("write prometheus.yml");
    let mut command = Command::new(&prometheus_bin);
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"));
    let mut prometheus = Supervised::spawn(command, tmp.path().join("prometheus.log"));
    let prometheus_addr = SocketAddr::from(([127, 0, 0, 1], web_port));
    eventually(60, "Prometheus ready", || {
        prometheus.assert_running("prometheus");
        async move {
            matches!(http_get(prometheus_addr, "/-/ready").await, Some((200, _))).then_some(())
        }
    })
    .await;

    let acknowledged = run_loadgen(&env, APPENDS, tmp.path()).await;
    assert!(acknowledged > 0, "loadgen acknowledged nothing");
    wait_stored(&workers, acknowledged).await;

    eventually(60, "Prometheus scrapes both workers", || async move {
        (prom_scalar(prometheus_addr, "count(up{job=\"logstore-worker\"} == 1)").await == Some(2.0))
            .then_some(())
    })
    .await;
    settles_at(
        60,
        "Prometheus's sum(logstore_appends_total{result=\"stored\"})",
        acknowledged as f64,
        || {
            prom_scalar(
                prometheus_addr,
                "sum(logstore_appends_total{result=\"stored\"})",
            )
        },
    )
    .await;
    drop(prometheus);
    for worker in processes {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// Runs loadgen against `env`'s workers (core request-reply, so an append counts as
/// acknowledged once a worker has committed and answered it) for `appends` appends, with
/// `--verify`; returns how many appends it acknowledged, from its `--report`.
async fn run_loadgen(env: &Env, appends: u64, dir: &Path) -> u64 {
    let report_path = dir.join("loadgen-report.json");
    let count = appends.to_string();
    let flags = [
        "--count",
        &count,
        "--rate",
        "500",
        "--objects",
        "40",
        "--verify",
    ];
    let (code, report) =
        finish_loadgen(spawn_loadgen(env, &flags, &report_path), &report_path).await;
    assert_eq!(code, 0, "loadgen failed: {report}");
    report_num(&report, &["appends", "ok"]) as u64
}

/// GET `path` from Prometheus's HTTP API and return its `data` (the call must succeed).
async fn prom_data(prometheus: SocketAddr, path: &str) -> serde_json::Value {
    let (status, body) = within(15, "Prometheus API", http_get(prometheus, path))
        .await
        .unwrap_or_else(|| panic!("Prometheus does not answer {path}"));
    assert_eq!(
        status, 200,
        "Prometheus answered {status} to {path}: {body}"
    );
    let mut json: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("Prometheus answer is not JSON ({e}): {body}"));
    json["data"].take()
}

/// Every PromQL expression of every panel of the shipped Grafana dashboards, as
/// (dashboard file, panel title, expression).
fn dashboard_queries() -> Vec<(String, String, String)> {
    let dir = repo_root().join("deploy/grafana/dashboards");
    let mut queries = Vec::new();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    for file in files {
        let name = file.display().to_string();
        let dashboard: serde_json::Value = serde_json::from_str(
            &fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {name}: {e}")),
        )
        .unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
        // Collapsed rows hold their panels inside.
        let mut panels: Vec<&serde_json::Value> = dashboard["panels"]
            .as_array()
            .map(|p| p.iter().collect())
            .unwrap_or_default();
        while let Some(panel) = panels.pop() {
            if let Some(inner) = panel["panels"].as_array() {
                panels.extend(inner);
            }
            let title = panel["title"].as_str().unwrap_or("?").to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    queries.push((name.clone(), title.clone(), expr.to_string()));
                }
            }
        }
    }
    queries
}

/// A dashboard expression as Grafana would send it: `$__rate_interval` is at least four scrape
/// intervals (4 x 5 s with the shipped config), which is what Grafana substitutes at the
/// dashboard's 30-minute range. Any other variable would need the test to learn it.
fn as_grafana_sends_it(expr: &str) -> String {
    let expr = expr.replace("$__rate_interval", "20s");
    assert!(
        !expr.contains('$'),
        "a dashboard query uses a variable this test does not substitute: {expr}"
    );
    expr
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The shipped observability: Prometheus runs deploy/prometheus/prometheus.yml (its global
/// settings and rule files as shipped; only the DNS service discovery, which needs compose's
/// DNS, is replaced by the two workers' static addresses) with deploy/prometheus/alerts.yml,
/// scraping two JetStream workers on two Postgres servers while loadgen appends and queries.
/// Then every query of every panel of deploy/grafana/dashboards/*.json must return at least one
/// finite value over the run (a panel that draws nothing is a defect), every alert rule must
/// evaluate without error on the real metrics (and stay inactive, append latency excepted),
/// and stopping one shard must make
/// LogstoreShardDown go pending for that shard only. The shipped `for: 1m` stays as it is:
/// Prometheus shows an alert as pending from the first evaluation where its condition holds,
/// so the test sees it within a scrape and an evaluation interval (5 s each) of the workers'
/// next health check (1 s), without waiting out the minute to firing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_shows_data_and_a_stopped_shard_alerts() {
    const APPENDS: u64 = 6000;
    let prometheus_bin = prometheus_binary();
    bin_path("loadgen");
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut own = PgServer::start();
    let mut env = Env::shared(&["a"]).await;
    env.intake = "jetstream";
    env.shards
        .push(("b".to_string(), fresh_db(&own, "b").await));
    let processes = vec![
        WorkerCommand::new(&env).start().await,
        WorkerCommand::new(&env).start().await,
    ];
    let workers: Vec<SocketAddr> = processes.iter().map(|w| w.metrics).collect();

    // The shipped configuration, its scrape_configs (the last section) swapped for static
    // targets, next to a copy of the shipped rule file it names.
    let shipped_dir = repo_root().join("deploy/prometheus");
    let shipped =
        fs::read_to_string(shipped_dir.join("prometheus.yml")).expect("read prometheus.yml");
    let (head, scrape) = shipped
        .split_once("\nscrape_configs:")
        .expect("prometheus.yml has a scrape_configs section");
    assert!(
        scrape.contains("job_name: logstore-worker") && !scrape.contains("\n\n#"),
        "scrape_configs must stay the last section and scrape job logstore-worker:\n{scrape}"
    );
    assert!(
        head.contains("rule_files:"),
        "prometheus.yml loads no rule file"
    );
    fs::copy(
        shipped_dir.join("alerts.yml"),
        tmp.path().join("alerts.yml"),
    )
    .expect("copy alerts.yml");
    let targets = workers
        .iter()
        .map(|w| format!("'{w}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let config = tmp.path().join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "{head}\nscrape_configs:\n  - job_name: logstore-worker\n    static_configs:\n      \
             - targets: [{targets}]\n"
        ),
    )
    .expect("write prometheus.yml");
    let web_port = free_port();
    let mut command = Command::new(&prometheus_bin);
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            tmp.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web_port}"));
    let mut prometheus = Supervised::spawn(command, tmp.path().join("prometheus.log"));
    let prom = SocketAddr::from(([127, 0, 0, 1], web_port));
    eventually(60, "Prometheus ready", || {
        prometheus.assert_running("prometheus");
        async move { matches!(http_get(prom, "/-/ready").await, Some((200, _))).then_some(()) }
    })
    .await;
    let start = unix_now();

    // Load: appends through JetStream and 10 % queries, over both shards, for ~20 s.
    let report_path = tmp.path().join("loadgen-report.json");
    let count = APPENDS.to_string();
    let flags = [
        "--jetstream",
        "--count",
        &count,
        "--rate",
        "300",
        "--query-share",
        "0.1",
        "--objects",
        "40",
        "--verify",
        "--verify-timeout",
        "30",
    ];
    let (code, report) =
        finish_loadgen(spawn_loadgen(&env, &flags, &report_path), &report_path).await;
    assert_eq!(code, 0, "loadgen failed: {report}");
    let acknowledged = report_num(&report, &["appends", "ok"]);
    assert_eq!(acknowledged, APPENDS as f64);
    wait_stored(&workers, APPENDS).await;
    // Prometheus has scraped the whole run once it has the final count.
    settles_at(
        60,
        "Prometheus's sum of stored appends",
        acknowledged,
        || prom_scalar(prom, "sum(logstore_appends_total{result=\"stored\"})"),
    )
    .await;

    // Every panel query, over the run, as Grafana's range queries.
    let queries = dashboard_queries();
    assert!(
        queries.len() >= 15,
        "the dashboard has its panels: {queries:?}"
    );
    let end = unix_now();
    let mut empty = Vec::new();
    for (file, title, expr) in &queries {
        let promql = as_grafana_sends_it(expr);
        let path = format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=5",
            url_encode(&promql)
        );
        let data = prom_data(prom, &path).await;
        let finite = data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|series| series["values"].as_array().into_iter().flatten())
            .filter_map(|point| point[1].as_str()?.parse::<f64>().ok())
            .any(f64::is_finite);
        if !finite {
            empty.push(format!("{file}: {title:?}: {promql} -> {data}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );

    // The rules run on the real metric names without errors, and none fires on a healthy fleet.
    let rules = prom_data(prom, "/api/v1/rules?type=alert").await;
    let rules: Vec<&serde_json::Value> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(rules.len(), 11, "the shipped rules are loaded: {rules:?}");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "rule evaluation failed: {rule}");
        // An append p99 above 500 ms can really happen on a loaded 2-core test machine (the
        // rule would then be right to go pending), so only that rule may be active here.
        if rule["name"] != "LogstoreAppendLatencyHigh" {
            assert_eq!(
                rule["state"], "inactive",
                "alert active on a healthy fleet: {rule}"
            );
        }
    }

    // One shard stops: its alert goes pending, for it alone.
    own.stop();
    let shard_down = || async move {
        let alerts = prom_data(prom, "/api/v1/alerts").await;
        alerts["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| {
                a["labels"]["alertname"] == "LogstoreShardDown" && a["labels"]["shard"] == "b"
            })
            .cloned()
    };
    let seen = eventually(60, "LogstoreShardDown pending for shard b", shard_down).await;
    assert_eq!(seen["state"], "pending", "{seen}");
    // Its value counts the workers that see the shard down: both, once both have been scraped
    // after their health checks.
    eventually(30, "LogstoreShardDown counts both workers", || async move {
        shard_down().await.filter(|alert| alert["value"] == "2e+00")
    })
    .await;
    let alerts = prom_data(prom, "/api/v1/alerts").await;
    let others: Vec<&serde_json::Value> = alerts["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["labels"]["alertname"] == "LogstoreShardDown" && a["labels"]["shard"] != "b")
        .collect();
    assert!(others.is_empty(), "only shard b is down: {others:?}");

    drop(prometheus);
    for worker in processes {
        assert_eq!(worker.terminate().await, Some(0));
    }
}
