//! loadgen's batch appends (`--batch`, `--connections`) against real worker processes, core and
//! JetStream, proven by `--verify`; and loadgen forced into the other intake by its flag
//! (`--jetstream`, `--jetstream=false`) refusing to run (exit 2 with the flag to use) instead
//! of miscounting, and refusing to call a verify of nothing "OK". (Without a flag loadgen
//! follows the workers' intake: tests/publishers.rs.)

mod support;

use support::*;

/// Two worker processes with `env`'s intake, both ready.
async fn two_workers(env: &Env) -> Vec<WorkerProcess> {
    let workers = vec![
        WorkerCommand::new(env).spawn(),
        WorkerCommand::new(env).spawn(),
    ];
    for worker in &workers {
        worker.wait_ready().await;
    }
    workers
}

/// Run loadgen to its end (no report needed); returns exit code, stdout and stderr.
async fn run_loadgen(env: &Env, extra: &[&str]) -> (i32, String, String) {
    let output = within(
        90,
        "loadgen finishes",
        tokio::process::Command::new(bin_path("loadgen"))
            .args(loadgen_flags(env))
            .args(extra)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run the loadgen binary");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    println!("loadgen stdout:\n{stdout}\nloadgen stderr:\n{stderr}");
    (output.status.code().unwrap_or(-1), stdout, stderr)
}

/// Stored entries of objects `ids` (through the query subject).
async fn stored_entries(env: &Env, ids: std::ops::Range<u64>) -> usize {
    let client = env.client().await;
    let mut total = 0;
    for id in ids {
        total += entries(&env.query_all(&client, id).await).len();
    }
    total
}

/// 2,000 appends in messages of 10 over 2 connections, verified: every entry counts as one
/// append (rate, count, verify), latency is one sample per message.
async fn batches_verify(intake: &'static str, extra: &[&str]) {
    let mut env = Env::shared(&["a", "b"]).await;
    env.intake = intake;
    let workers = two_workers(&env).await;
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let mut flags = vec![
        "--batch",
        "10",
        "--connections",
        "2",
        "--count",
        "2000",
        "--rate",
        "4000",
        "--objects",
        "50",
        "--verify",
        "--verify-timeout",
        "30",
    ];
    flags.extend_from_slice(extra);
    let child = spawn_loadgen(&env, &flags, &report_path);
    let (code, report) = finish_loadgen(child, &report_path).await;
    assert_eq!(code, 0, "loadgen exits 0 when verify passes");
    assert_eq!(report["mode"], intake);
    assert_eq!(report_num(&report, &["batch"]), 10.0);
    assert_eq!(report_num(&report, &["connections"]), 2.0);
    assert_eq!(report_num(&report, &["appends", "sent"]), 2000.0);
    assert_eq!(report_num(&report, &["appends", "ok"]), 2000.0);
    assert_eq!(report_num(&report, &["appends", "failed"]), 0.0);
    assert_eq!(
        report_num(&report, &["appends", "latency_ms", "count"]),
        200.0,
        "one latency sample per message of 10"
    );
    assert_eq!(report["verify"]["ok"], true, "{}", report["verify"]);
    assert_eq!(report_num(&report, &["verify", "found"]), 2000.0);
    // Paced by appends, not messages: 2,000 appends at 4,000/s take about half a second.
    let elapsed = report_num(&report, &["elapsed_secs"]);
    assert!((0.4..20.0).contains(&elapsed), "elapsed {elapsed}s");
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_through_core_workers_verify() {
    batches_verify("core", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_through_jetstream_verify() {
    batches_verify("jetstream", &["--jetstream"]).await;
}

/// The reported case: core loadgen against JetStream workers had every request answered by a
/// PubAck, counted them failed although all were stored, and verified "OK" over nothing. Now,
/// forced into core mode (`--jetstream=false`; without the flag it follows the workers), it
/// finds the stream before sending anything and stops with the flag to use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_loadgen_against_jetstream_workers_stops_at_start_with_the_flag_to_use() {
    let mut env = Env::shared(&["a", "b"]).await;
    env.intake = "jetstream";
    let workers = two_workers(&env).await;
    let (code, stdout, stderr) = run_loadgen(
        &env,
        &[
            "--jetstream=false",
            "--count",
            "50",
            "--rate",
            "500",
            "--id-base",
            "7000",
            "--objects",
            "5",
            "--verify",
        ],
    )
    .await;
    assert_eq!(code, 2, "a mismatch of intakes is a setting error");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains(&env.stream()) && lines[0].ends_with("run loadgen with --jetstream"),
        "{stderr}"
    );
    assert!(!stdout.contains("verify: OK"), "{stdout}");
    assert_eq!(
        stored_entries(&env, 7000..7005).await,
        0,
        "nothing was sent"
    );
    // Queries are core requests under either intake: a queries-only run is no mismatch.
    let (code, stdout, _) = run_loadgen(
        &env,
        &["--query-share", "1", "--count", "5", "--rate", "100"],
    )
    .await;
    assert_eq!(code, 0);
    assert!(stdout.contains("queries: 5 sent, 5 answered"), "{stdout}");
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// The other way round: `--jetstream` against core workers finds no stream (after waiting as
/// long as an append's retries would, here 2 retries = 150 ms) and says to drop the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_loadgen_against_core_workers_stops_with_the_flag_to_use() {
    let env = Env::shared(&["a", "b"]).await;
    let workers = two_workers(&env).await;
    let (code, _, stderr) = run_loadgen(
        &env,
        &[
            "--jetstream",
            "--retries",
            "2",
            "--count",
            "50",
            "--id-base",
            "7000",
            "--objects",
            "5",
        ],
    )
    .await;
    assert_eq!(code, 2);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(&format!(
            "no JetStream stream captures subject {}",
            env.subject("logs")
        )) && last.ends_with("run loadgen without --jetstream"),
        "{stderr}"
    );
    assert_eq!(stored_entries(&env, 7000..7005).await, 0);
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// Core loadgen started before the fleet: no stream yet, so the start check passes and the
/// appends wait for responders. When JetStream workers then create their stream, the first
/// PubAck answering a core request stops the run with the same hint (exit 2), instead of
/// counting stored appends as failed. (Core by its flag here: without it, the start is a race
/// between loadgen asking and the workers coming up, and either outcome is right.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_loadgen_stops_when_a_stream_takes_its_subject_mid_run() {
    let mut env = Env::shared(&["a", "b"]).await;
    env.intake = "jetstream";
    let child = tokio::process::Command::new(bin_path("loadgen"))
        .args(loadgen_flags(&env))
        .args(["--jetstream=false", "--count", "200", "--rate", "100"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the loadgen binary");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let workers = two_workers(&env).await;
    let output = within(60, "loadgen stops", child.wait_with_output())
        .await
        .expect("wait for loadgen");
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("loadgen stderr:\n{stderr}");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr
            .lines()
            .last()
            .is_some_and(|l| l.contains("PubAck") && l.ends_with("run loadgen with --jetstream")),
        "{stderr}"
    );
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// A verify over zero acknowledged appends proves nothing: it fails (exit 1) and says so,
/// never "verify: OK". Here no worker runs, so every append is given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_with_nothing_acknowledged_fails() {
    let env = Env::shared(&["a"]).await;
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let child = spawn_loadgen(
        &env,
        &[
            "--count",
            "3",
            "--rate",
            "100",
            "--retries",
            "0",
            "--verify",
        ],
        &report_path,
    );
    let (code, report) = finish_loadgen(child, &report_path).await;
    assert_eq!(code, 1);
    assert_eq!(report_num(&report, &["appends", "ok"]), 0.0);
    assert_eq!(report["verify"]["ok"], false, "{}", report["verify"]);
    assert_eq!(report["verify"]["nothing_acknowledged"], true);
}
