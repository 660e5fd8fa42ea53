//! Faults and lifecycle: a shard that goes down and comes back, a misconfigured shard map, and
//! SIGTERM with work in flight. Tests that stop a server start their own.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use logstore_protocol::ErrorCode;
use support::*;

/// A shard stopped under a running worker: its appends fail fast with `unavailable`, the other
/// shard keeps working, /readyz names it; after a restart it works again with no worker restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_shard_fails_fast_and_recovers_without_a_worker_restart() {
    let mut own = PgServer::start();
    let mut env = Env::shared(&["up"]).await;
    env.shards
        .push(("flaky".to_string(), fresh_db(&own, "flaky").await));
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;

    let ring = worker::ring::Ring::new(&["up", "flaky"], worker::ring::DEFAULT_VNODES);
    let on = |shard: &str| {
        (0..1000u64)
            .find(|&id| ring.shard_name_of(id) == shard)
            .unwrap()
    };
    let (healthy_id, flaky_id) = (on("up"), on("flaky"));
    env.append(&client, flaky_id, "before", None).await;

    own.kill();

    let started = Instant::now();
    let error = env
        .try_append(&client, flaky_id, "during")
        .await
        .unwrap_err();
    assert_eq!(
        error.error.code,
        ErrorCode::Unavailable,
        "{}",
        error.error.message
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    // Still fast once the pool knows the shard is gone.
    let started = Instant::now();
    let error = env
        .try_append(&client, flaky_id, "during")
        .await
        .unwrap_err();
    assert_eq!(error.error.code, ErrorCode::Unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );

    // Fire-and-forget (no reply subject): nobody would learn of the failure, so it is
    // dead-lettered for replay.
    let mut dead = client.subscribe(env.subject("dead_letter")).await.unwrap();
    client.flush().await.unwrap();
    let body = append_body(flaky_id, "unheard", Some("k-unheard"));
    client.publish(env.subject("logs"), body).await.unwrap();
    let letter = within(10, "dead letter of a failed append", dead.next())
        .await
        .unwrap();
    assert_eq!(
        header(&letter.headers, "Logstore-Error-Code").as_deref(),
        Some("unavailable")
    );
    let copy: logstore_protocol::AppendRequest = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(
        (copy.id, copy.log.as_str(), copy.key.as_deref()),
        (flaky_id, "unheard", Some("k-unheard"))
    );

    let reply = env.append(&client, healthy_id, "meanwhile", None).await;
    assert_eq!(reply.seq, 1);
    let body = eventually(10, "/readyz names the shard", || {
        let worker = &worker;
        async move {
            let (status, body) = worker.get("/readyz").await;
            (status == 503 && body.contains("shard flaky")).then_some(body)
        }
    })
    .await;
    assert!(!body.contains("shard up"), "{body}");

    own.restart();
    let reply = eventually(30, "appends to the restarted shard succeed", || {
        let (env, client) = (&env, &client);
        async move { env.try_append(client, flaky_id, "after").await.ok() }
    })
    .await;
    assert_eq!(reply.seq, 2, "the failed appends stored nothing");
    eventually(10, "ready again", || {
        let worker = &worker;
        async move { (worker.get("/readyz").await.0 == 200).then_some(()) }
    })
    .await;
    let logs = entries(&env.query_all(&client, flaky_id).await);
    assert_eq!(
        logs.iter().map(|e| e.log.as_str()).collect::<Vec<_>>(),
        ["before", "after"]
    );
    worker.stop().await.unwrap();
}

/// A worker whose configuration swaps two shard names refuses to start, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_shard_names_refuse_to_start() {
    let env = Env::shared(&["a", "b"]).await;
    // First start records each database's shard name.
    env.start_worker(&[]).await.stop().await.unwrap();

    let mut swapped = env.clone();
    swapped.shards[0].0 = "b".to_string();
    swapped.shards[1].0 = "a".to_string();
    // What it printed: all on stderr (a worker writes nothing to stdout).
    let (status, stderr) = WorkerCommand::new(&swapped)
        .default_log()
        .capture()
        .spawn()
        .exit(30)
        .await;
    assert!(!status.success());
    assert!(stderr.contains("belongs to shard"), "stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("worker: ") && last.contains("belongs to shard"),
        "{last}"
    );
}

/// A missing setting fails at start with one line naming the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_setting_fails_with_one_line_naming_it() {
    // Nothing set at all (so neither POSTGRES_SHARDS nor POSTGRES_IPS).
    let (code, _, stderr) = run_once("worker", &[], &[], 30).await;
    assert_eq!(code, Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("POSTGRES_SHARDS"), "{stderr}");
}

/// SIGTERM with appends in flight: every append the worker received is answered (stored rows
/// and success replies match one to one), and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_every_received_append_and_exits_zero() {
    let env = Env::shared(&["a", "b"]).await;
    let mut worker = WorkerCommand::new(&env)
        .default_log()
        .stderr(Stdio::null())
        .spawn();
    let metrics = worker.metrics;
    eventually(30, "binary worker ready", || async move {
        matches!(http_get(metrics, "/readyz").await, Some((200, _))).then_some(())
    })
    .await;

    let client = env.client().await;
    let (replied_tx, mut replied_rx) = tokio::sync::mpsc::channel::<()>(10_000);
    let mut senders = tokio::task::JoinSet::new();
    for i in 0..4_000u64 {
        let (client, subject, replied) = (client.clone(), env.subject("logs"), replied_tx.clone());
        senders.spawn(async move {
            let body = append_body(i % 20, &format!("m{i}"), Some(&format!("k{i}")));
            let result =
                tokio::time::timeout(Duration::from_secs(20), client.request(subject, body)).await;
            match result {
                Ok(Ok(reply)) => {
                    let ok = parse_reply(&reply.payload).is_ok();
                    if ok {
                        let _ = replied.send(()).await;
                    }
                    Some(ok)
                }
                // No responders: sent after the worker stopped listening; never received.
                Ok(Err(_)) => None,
                Err(_) => panic!("request {i} timed out: received but never answered?"),
            }
        });
    }
    drop(replied_tx);
    // Signal once work is clearly in flight.
    within(30, "first replies", async {
        for _ in 0..200 {
            replied_rx.recv().await;
        }
    })
    .await;
    worker.signal(libc::SIGTERM);
    let status = within(30, "worker exits after SIGTERM", worker.child.wait())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));

    let mut answered_ok = 0u64;
    let mut answered_error = 0u64;
    while let Some(result) = within(60, "senders finish", senders.join_next()).await {
        match result.unwrap() {
            Some(true) => answered_ok += 1,
            Some(false) => answered_error += 1,
            None => {}
        }
    }
    let mut stored = 0u64;
    for (_, url) in &env.shards {
        let db = pg_connect(url).await;
        stored += db
            .query_one("SELECT count(*) FROM logs", &[])
            .await
            .unwrap()
            .get::<_, i64>(0) as u64;
    }
    eprintln!("SIGTERM test: {answered_ok} answered, {stored} stored, of 4000 sent");
    assert_eq!(answered_error, 0);
    assert!(answered_ok >= 200);
    assert_eq!(
        stored, answered_ok,
        "every stored append was answered, and only those"
    );
}
