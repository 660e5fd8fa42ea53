//! Publishers follow the intake they find (issue 21): the workers advertise their intake and
//! the stream's partitions in their NATS service info; loadgen without `--jetstream` and
//! `logstore append` read it and publish accordingly, on a partitioned stream one lane per
//! object (`<logs>.<id>`, batches per partition on `<logs>.p.<k>.b`), never on the shared
//! `<logs>` lane. Workers run as real processes against a real nats-server and PostgreSQL.
//! (Core fleets and loadgen without flags: tests/loadgen_batch.rs and tests/fleet.rs.)

mod support;

use std::time::Duration;

use async_nats::jetstream;
use logstore_protocol::discover::{self, Discovery, Fleet, Intake};
use logstore_protocol::nats::NatsSecurityArgs;
use logstore_protocol::partition::partition;
use support::*;

const PARTITIONS: u32 = 8;

/// Two JetStream workers with `JS_PARTITIONS=8` (ordered, the default), both ready.
async fn partitioned_fleet() -> (Env, Vec<WorkerProcess>) {
    let mut env = Env::shared(&["a", "b"]).await;
    env.intake = "jetstream";
    let settings = [("JS_PARTITIONS", PARTITIONS.to_string())];
    let workers = vec![
        WorkerCommand::new(&env).extra(&settings).spawn(),
        WorkerCommand::new(&env).extra(&settings).spawn(),
    ];
    for worker in &workers {
        worker.wait_ready().await;
    }
    (env, workers)
}

/// Messages `stream` delivered to each consumer so far: the `logs` lane's (`workers`) and
/// partition k's (`workers-p<k>`), by their consumer sequence.
async fn delivered(stream: String, client: &async_nats::Client) -> (u64, Vec<u64>) {
    let js = jetstream::new(client.clone());
    let stream = within(10, "the stream", js.get_stream(stream))
        .await
        .expect("the workers created the stream");
    let of = |name: String| {
        let stream = stream.clone();
        async move {
            let mut consumer = within(
                10,
                "a consumer",
                stream.get_consumer::<jetstream::consumer::pull::Config>(&name),
            )
            .await
            .unwrap_or_else(|e| panic!("consumer {name}: {e}"));
            within(10, "consumer info", consumer.info())
                .await
                .unwrap_or_else(|e| panic!("consumer {name} info: {e}"))
                .delivered
                .consumer_sequence
        }
    };
    let lane = of("workers".to_string()).await;
    let mut partitions = Vec::new();
    for k in 0..PARTITIONS {
        partitions.push(of(format!("workers-p{k}")).await);
    }
    (lane, partitions)
}

/// Every worker says in its service info that it runs JetStream intake with 8 partitions.
/// (Discovery stops shortly after the latest answer, so on a busy machine one round may miss
/// a slow worker: asked until both have answered.)
async fn assert_advertised(env: &Env, client: &async_nats::Client) {
    let found = eventually(20, "both workers answer $SRV.INFO", || async {
        let found = discover::discover(client, &env.subject("logs"), Duration::from_secs(5)).await;
        matches!(&found, Discovery::Found(fleet) if fleet.workers == 2).then_some(found)
    })
    .await;
    assert_eq!(
        found,
        Discovery::Found(Fleet {
            intake: Intake::JetStream {
                stream: Some(env.stream()),
                partitions: PARTITIONS,
            },
            workers: 2,
        })
    );
}

/// loadgen without `--jetstream` against a partitioned JetStream fleet: it finds the intake,
/// publishes each append (or each batch of one partition's entries) on its object's or
/// partition's lane, and `--verify` passes. The stream delivered nothing on the `logs` lane
/// and `messages` in all on the partitions.
async fn loadgen_follows_the_partitions(extra: &[&str], messages: impl Fn(u64) -> bool) {
    let (env, workers) = partitioned_fleet().await;
    let client = env.client().await;
    assert_advertised(&env, &client).await;
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let mut flags = vec![
        "--count",
        "400",
        "--rate",
        "2000",
        "--objects",
        "30",
        "--verify",
        "--verify-timeout",
        "30",
    ];
    flags.extend_from_slice(extra);
    let child = spawn_loadgen(&env, &flags, &report_path);
    let (code, report) = finish_loadgen(child, &report_path).await;
    assert_loadgen_verified(code, &report, 400.0);
    assert_eq!(report["mode"], "jetstream", "followed the workers' intake");
    assert_eq!(report_num(&report, &["partitions"]), f64::from(PARTITIONS));
    let (lane, partitions) = delivered(env.stream(), &client).await;
    assert_eq!(lane, 0, "nothing on the logs lane: {partitions:?}");
    let total: u64 = partitions.iter().sum();
    assert!(
        messages(total),
        "{total} messages over the partitions: {partitions:?}"
    );
    assert!(
        partitions.iter().filter(|&&n| n > 0).count() > 1,
        "30 objects spread over several partitions: {partitions:?}"
    );
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// (a) Single appends: one message per append, each on `<logs>.<id>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_without_flags_publishes_per_object_on_a_partitioned_stream() {
    loadgen_follows_the_partitions(&[], |total| total == 400).await;
}

/// (b) `--batch 20`: each message holds one partition's entries, on `<logs>.p.<k>.b`; at
/// least 400 / 20 of them (each partition's rest goes out at the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_batches_per_partition_on_a_partitioned_stream() {
    loadgen_follows_the_partitions(&["--batch", "20"], |total| {
        (20..=20 + u64::from(PARTITIONS)).contains(&total)
    })
    .await;
}

/// `--lane logs` keeps every append on the shared `<logs>` lane, for comparisons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_lane_logs_keeps_the_shared_lane() {
    let (env, workers) = partitioned_fleet().await;
    let client = env.client().await;
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let flags = [
        "--lane",
        "logs",
        "--count",
        "100",
        "--rate",
        "1000",
        "--objects",
        "10",
        "--verify",
    ];
    let child = spawn_loadgen(&env, &flags, &report_path);
    let (code, report) = finish_loadgen(child, &report_path).await;
    assert_loadgen_verified(code, &report, 100.0);
    assert_eq!(report["mode"], "jetstream");
    assert_eq!(report_num(&report, &["partitions"]), 0.0);
    let (lane, partitions) = delivered(env.stream(), &client).await;
    assert_eq!(lane, 100);
    assert!(partitions.iter().all(|&n| n == 0), "{partitions:?}");
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// (d) `logstore append` on a partitioned fleet publishes on the object's lane, waits for the
/// outcome as before and exits 0; the entry is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_appends_on_the_objects_lane() {
    let (env, workers) = partitioned_fleet().await;
    let client = env.client().await;
    let vars: Vec<(&'static str, String)> = env
        .settings(0)
        .into_iter()
        .filter(|(var, _)| var.starts_with("NATS_"))
        .collect();
    let (code, out, err) = run_once("logstore", &["append", "42", "hello"], &vars, 30).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.starts_with("1 "), "stored as seq 1: {out}");
    let (code, out, err) = run_once("logstore", &["get", "42"], &vars, 30).await;
    assert_eq!(code, Some(0), "stderr: {err}");
    assert!(
        out.starts_with("1 ") && out.trim_end().ends_with(" hello"),
        "{out}"
    );
    let (lane, partitions) = delivered(env.stream(), &client).await;
    assert_eq!(lane, 0, "not on the logs lane: {partitions:?}");
    let k = partition(42, PARTITIONS) as usize;
    assert_eq!(
        partitions[k], 1,
        "on object 42's partition {k}: {partitions:?}"
    );
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// A core fleet advertises core intake and no partitions; loadgen and the CLI then send core
/// requests, as before (the runs themselves: tests/loadgen_batch.rs, tests/cli.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_fleet_advertises_core_intake() {
    let env = Env::shared(&["a"]).await;
    let worker = WorkerCommand::new(&env).start().await;
    let client = env.client().await;
    let found = discover::discover(&client, &env.subject("logs"), Duration::from_secs(5)).await;
    assert_eq!(
        found,
        Discovery::Found(Fleet {
            intake: Intake::Core,
            workers: 1,
        })
    );
    // Another fleet's subject: its workers are not ours.
    let found = discover::discover(&client, "elsewhere.logs", Duration::from_secs(1)).await;
    assert!(matches!(found, Discovery::Unknown(_)), "{found:?}");
    assert_eq!(worker.terminate().await, Some(0));
}

/// With the shipped NATS config (deploy/nats/run-nats.sh), the `client` user, whose account
/// has no JetStream, learns the intake through the service import of `$SRV.>`: loadgen without
/// `--jetstream` publishes per object and verifies, `logstore append` exits 0, and the stream
/// (read as `admin`) delivered nothing on the `logs` lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_user_follows_the_partitions_with_the_shipped_config() {
    let shipped = Shipped::start();
    let env = Env::shared(&["a", "b"]).await;
    let mut worker_vars = shipped.worker_settings();
    worker_vars.push(("JS_PARTITIONS", "8".to_string()));
    let worker = WorkerCommand::new(&env)
        .extra(&worker_vars)
        .log("warn")
        .capture()
        .spawn();
    worker.wait_ready().await;

    let dir = tempfile::tempdir().expect("temp dir");
    let report = dir.path().join("report.json");
    let output = within(
        90,
        "loadgen as client finishes",
        tokio::process::Command::new(bin_path("loadgen"))
            .args(["--count", "100", "--rate", "1000", "--objects", "10"])
            .args(["--verify", "--verify-timeout", "30", "--progress-secs", "0"])
            .arg("--report")
            .arg(&report)
            .env_clear()
            .envs(shipped.login("client"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run loadgen");
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("loadgen stderr:\n{stderr}");
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("the report")).expect("JSON");
    assert_loadgen_verified(0, &report, 100.0);
    assert_eq!(report["mode"], "jetstream", "followed the workers' intake");
    assert_eq!(report_num(&report, &["partitions"]), 8.0);

    let mut cli = shipped.login("client");
    cli.push(("LOGSTORE_TIMEOUT_MS", "5000".to_string()));
    let (code, out, err) = run_once("logstore", &["append", "778", "x"], &cli, 30).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.starts_with("1 "), "{out}");

    let admin = NatsSecurityArgs {
        nats_user: Some("admin".to_string()),
        nats_password_file: Some(shipped.password_file("admin")),
        ..Default::default()
    }
    .resolve(&shipped.nats.url())
    .expect("admin settings");
    let admin = within(10, "connect as admin", admin.connect(|options| options))
        .await
        .expect("connect as admin");
    let (lane, partitions) = delivered("LOGS".to_string(), &admin).await;
    assert_eq!(lane, 0, "nothing on the logs lane: {partitions:?}");
    assert_eq!(partitions.iter().sum::<u64>(), 101, "{partitions:?}");
    let output = worker.stop().await;
    assert!(!output.contains(" ERROR "), "{output}");
}
