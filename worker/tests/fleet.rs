//! The fleet under load: `loadgen` against worker PROCESSES (so one can be SIGKILLed) on the
//! shared NATS and two Postgres servers, proving with `--verify` that every acknowledged append
//! is stored exactly once, in order, and that `--verify` really catches a loss.

mod support;

use std::time::Duration;

use futures::StreamExt;
use support::*;

/// Two worker processes with core intake, both ready.
async fn two_workers(env: &Env) -> Vec<WorkerProcess> {
    let workers = vec![
        WorkerCommand::new(env)
            .extra(&[("INTAKE", env.intake)])
            .spawn(),
        WorkerCommand::new(env)
            .extra(&[("INTAKE", env.intake)])
            .spawn(),
    ];
    for worker in &workers {
        worker.wait_ready().await;
    }
    workers
}

/// Issue 3's done-when 1 load: 5,000 appends at a fixed rate with 10 % queries, verified.
const DONE_WHEN_1_LOAD: &[&str] = &[
    "--count",
    "5000",
    "--rate",
    "1000",
    "--query-share",
    "0.1",
    "--verify",
];

/// Done-when 1a: 2 worker processes, 2 shards, 5,000 appends at 1,000/s with 10 % queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_verifies_5000_appends_through_two_worker_processes() {
    let env = Env::shared(&["a", "b"]).await;
    let workers = two_workers(&env).await;
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let child = spawn_loadgen(&env, DONE_WHEN_1_LOAD, &report_path);
    let (code, report) = finish_loadgen(child, &report_path).await;

    assert_loadgen_verified(code, &report, 5000.0);
    assert_eq!(report_num(&report, &["appends", "failed"]), 0.0);
    assert!(
        report_num(&report, &["queries", "ok"]) > 300.0,
        "about 10 % queries"
    );
    assert_eq!(report_num(&report, &["queries", "failed"]), 0.0);
    // Paced, not flooded: 5,000 appends + ~555 queries at 1,000/s take ~5.5 s.
    let elapsed = report_num(&report, &["elapsed_secs"]);
    assert!((5.0..30.0).contains(&elapsed), "elapsed {elapsed}s");
    for percentile in ["p50", "p90", "p99", "max"] {
        assert!(report_num(&report, &["appends", "latency_ms", percentile]) > 0.0);
        assert!(report_num(&report, &["queries", "latency_ms", percentile]) > 0.0);
    }
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// Done-when 1b: the same with one worker SIGKILLed after ~1/3 of the appends. Core NATS does
/// not redeliver what the dead worker held: those requests time out and loadgen retries them
/// with the same keys to the survivor; verify proves each acknowledged append is there once
/// (and any the dead worker had committed without replying is answered as a duplicate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_verifies_5000_appends_when_a_worker_is_killed_mid_run() {
    let env = Env::shared(&["a", "b"]).await;
    let mut workers = two_workers(&env).await;
    let client = env.client().await;
    let mut events = client
        .subscribe(format!("{}.>", env.subject("appended")))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let child = spawn_loadgen(&env, DONE_WHEN_1_LOAD, &report_path);

    // Every stored append publishes an event: kill a worker once a third are stored.
    within(30, "a third of the appends stored", async {
        let mut stored = 0;
        while stored < 1667 {
            events.next().await.expect("event subscription ended");
            stored += 1;
        }
    })
    .await;
    // Freeze it first so it surely holds requests it took but never answers (a bare SIGKILL
    // often catches a worker with nothing in flight), then kill it.
    workers[0].signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    workers.remove(0).kill().await;

    let (code, report) = finish_loadgen(child, &report_path).await;
    assert_loadgen_verified(code, &report, 5000.0);
    assert_eq!(report_num(&report, &["appends", "failed"]), 0.0);
    println!(
        "retries {}, acknowledged as duplicates {}, errors {}",
        report["appends"]["retries"], report["appends"]["duplicates"], report["errors"]
    );
    assert!(
        report_num(&report, &["errors", "timeout"]) >= 1.0,
        "the killed worker's requests timed out and were retried"
    );
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// Done-when 2: a row deleted behind loadgen's back makes `verify` fail, naming its object and
/// seq. The same data verified clean just before, so the failure is the deletion's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_the_object_and_seq_of_a_deleted_row() {
    let env = Env::shared(&["a", "b"]).await;
    let workers = two_workers(&env).await;
    let mut argv = vec!["loadgen".to_string()];
    argv.extend(loadgen_flags(&env));
    argv.extend(
        [
            "--count",
            "600",
            "--rate",
            "3000",
            "--objects",
            "10",
            "--verify",
        ]
        .map(String::from),
    );
    let args = <loadgen::Args as clap::Parser>::try_parse_from(argv).unwrap();
    let outcome = within(
        60,
        "loadgen run",
        loadgen::run(args.clone(), std::future::pending()),
    )
    .await
    .expect("loadgen runs");
    println!("{}", outcome.summary);
    assert!(outcome.success(), "the untouched data verifies");
    assert_eq!(outcome.acked.len(), 600);

    // An acknowledged append in the middle of its object's log (not its last entry).
    let victim = outcome
        .acked
        .iter()
        .find(|a| {
            let later = outcome.acked.iter().any(|b| b.id == a.id && b.seq > a.seq);
            a.seq.is_some_and(|s| s > 1) && later
        })
        .expect("some object has several appends")
        .clone();
    let seq = victim.seq.unwrap();
    let mut deleted = 0;
    for (_, url) in &env.shards {
        let db = pg_connect(url).await;
        deleted += db
            .execute(
                "DELETE FROM logs WHERE object_id = $1 AND seq = $2",
                &[&(victim.id as i64), &(seq as i64)],
            )
            .await
            .unwrap();
    }
    assert_eq!(deleted, 1, "the row was on exactly one shard");

    let verdict = within(60, "verify", loadgen::verify(&args, &outcome))
        .await
        .expect("verify runs");
    println!("{verdict}");
    assert!(!verdict.ok);
    let lines: Vec<String> = verdict.problems.iter().map(|p| p.to_string()).collect();
    let named = format!("object {} seq {seq}:", victim.id);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&named) && l.contains("gap")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&named) && l.contains(&victim.key) && l.contains("missing")),
        "{lines:?}"
    );
    assert!(
        verdict.problems.iter().all(|p| p.id() == victim.id),
        "only the damaged object is reported: {lines:?}"
    );
    assert_eq!(verdict.found, 599);
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// Issue 4: loadgen publishes through JetStream (PubAck = acknowledged, Nats-Msg-Id = key)
/// and its verify waits until the workers have stored every acknowledged append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_through_jetstream_verifies() {
    let mut env = Env::shared(&["a", "b"]).await;
    env.intake = "jetstream";
    let workers = two_workers(&env).await;
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let child = spawn_loadgen(
        &env,
        &[
            "--jetstream",
            "--count",
            "3000",
            "--rate",
            "2000",
            "--query-share",
            "0.05",
            "--verify",
            "--verify-timeout",
            "30",
        ],
        &report_path,
    );
    let (code, report) = finish_loadgen(child, &report_path).await;
    assert_loadgen_verified(code, &report, 3000.0);
    assert_eq!(report["mode"], "jetstream");
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// A stopped run still reports: SIGINT mid-run makes loadgen stop sending, wait for what is in
/// flight, verify what was acknowledged, and exit 0 with the summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_loadgen_cleanly_with_a_verified_summary() {
    let env = Env::shared(&["a", "b"]).await;
    let workers = two_workers(&env).await;
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let child = spawn_loadgen(&env, &["--rate", "500", "--verify"], &report_path);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = child.id().expect("loadgen running") as i32;
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let (code, report) = finish_loadgen(child, &report_path).await;
    let acked = report_num(&report, &["appends", "ok"]);
    assert_loadgen_verified(code, &report, acked);
    assert_eq!(report["interrupted"], true);
    assert!(acked > 300.0, "{acked} appends in ~2 s at 500/s");
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// Loadgen started before any worker is up waits for the fleet: core requests get "no
/// responders" and are retried with their keys until a worker subscribes; in JetStream mode
/// loadgen waits at start until the workers have created the stream (it never creates it), so
/// nothing needs a retry. Nothing is lost or doubled either way.
async fn loadgen_waits_for_the_fleet(intake: &'static str, extra: &[&str]) {
    let mut env = Env::shared(&["a", "b"]).await;
    env.intake = intake;
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let mut flags = vec!["--count", "300", "--rate", "300", "--verify"];
    flags.extend_from_slice(extra);
    let child = spawn_loadgen(&env, &flags, &report_path);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let workers = two_workers(&env).await;
    let (code, report) = finish_loadgen(child, &report_path).await;
    assert_loadgen_verified(code, &report, 300.0);
    if intake == "core" {
        assert!(report_num(&report, &["appends", "retries"]) > 0.0);
    }
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_appends_are_retried_until_a_worker_subscribes() {
    loadgen_waits_for_the_fleet("core", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_appends_are_retried_until_a_worker_creates_the_stream() {
    loadgen_waits_for_the_fleet("jetstream", &["--jetstream"]).await;
}
