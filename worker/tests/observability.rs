//! What an operator sees of a worker besides its answers: the metrics added for the dashboard
//! (JetStream consumer lag, commit and pool-wait histograms, process memory, errors by code).
//!
//! Run with `cargo build --workspace --bins && cargo test -p logstore-worker --test observability`.

mod support;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use support::*;

/// Every `name{...}` sample on a worker's /metrics, summed (see [`metric_sum`]).
async fn metric(worker: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, body) = within(10, "GET /metrics", http_get(worker, "/metrics"))
        .await
        .expect("worker answers /metrics");
    metric_sum(&body, name, labels)
}

/// Publish appends `range` to object `id` through JetStream, each with its own Nats-Msg-Id,
/// awaiting every PubAck.
async fn publish(env: &Env, client: &async_nats::Client, id: u64, range: std::ops::Range<u64>) {
    let js = jetstream::new(client.clone());
    for i in range {
        let key = format!("obs-{id}-{i}");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", key.as_str());
        let body = serde_json::json!({ "id": id, "log": key }).to_string();
        let ack = within(
            10,
            "JetStream publish",
            js.publish_with_headers(env.subject("logs"), headers, body.into()),
        )
        .await
        .expect("publish");
        within(10, "PubAck", ack.into_future())
            .await
            .expect("PubAck");
    }
}

/// The consumer-lag gauges follow the server's consumer info: with the only shard down and
/// JS_MAX_ACK_PENDING 100, 300 appends show as 200 pending and 100 ack-pending, the nak'ed
/// ones come back as redeliveries, and the refusals count as `unavailable` errors; once the
/// shard is back, everything is stored and the gauges return to 0. Commit and pool-wait
/// histograms and the process's resident memory are exported along the way. Run with
/// JS_ORDERED=false, whose outage path naks (the ordered intake holds instead: tests/order.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_commit_and_pool_metrics_follow_the_fleet() {
    let mut own = PgServer::start();
    let mut env = Env::shared(&[]).await;
    env.intake = "jetstream";
    env.shards
        .push(("own".to_string(), fresh_db(&own, "own").await));
    let worker = WorkerCommand::new(&env)
        .extra(&[("JS_MAX_ACK_PENDING", "100"), ("JS_ORDERED", "false")])
        .start()
        .await;
    let w = worker.metrics;
    let client = env.client().await;
    let labels = [
        ("stream", env.stream()),
        ("consumer", "workers".to_string()),
    ];
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // Healthy: stored, timed, and the lag series exist (at 0) for this stream's consumer.
    publish(&env, &client, 1, 0..20).await;
    eventually(30, "20 appends stored", || async move {
        (metric(w, "logstore_appends_total", &[("result", "stored")]).await == 20.0).then_some(())
    })
    .await;
    let shard = [("shard", "own")];
    assert!(metric(w, "logstore_commit_duration_seconds_count", &shard).await >= 1.0);
    assert!(metric(w, "logstore_pool_wait_seconds_count", &shard).await >= 1.0);
    assert!(metric(w, "process_resident_memory_bytes", &[]).await > 1_000_000.0);
    let (_, body) = within(10, "GET /metrics", http_get(w, "/metrics"))
        .await
        .expect("worker answers /metrics");
    for gauge in [
        "logstore_jetstream_pending_messages",
        "logstore_jetstream_ack_pending_messages",
        "logstore_jetstream_redelivered_messages",
    ] {
        let stream = format!("stream=\"{}\"", env.stream());
        assert!(
            body.lines()
                .any(|l| l.starts_with(gauge) && l.contains(&stream)),
            "{gauge} for {stream} missing:\n{body}"
        );
    }

    // Shard down: the server holds 200 undelivered, 100 delivered and nak'ed over and over.
    own.kill();
    publish(&env, &client, 2, 0..300).await;
    let labels_ref = &labels;
    eventually(
        60,
        "lag gauges show 200 pending, 100 ack-pending, redeliveries",
        || async move {
            let pending = metric(w, "logstore_jetstream_pending_messages", labels_ref).await;
            let ack_pending =
                metric(w, "logstore_jetstream_ack_pending_messages", labels_ref).await;
            let redelivered =
                metric(w, "logstore_jetstream_redelivered_messages", labels_ref).await;
            let redeliveries = metric(w, "logstore_jetstream_redeliveries_total", &[]).await;
            (pending == 200.0 && ack_pending == 100.0 && redelivered > 0.0 && redeliveries > 0.0)
                .then_some(())
        },
    )
    .await;
    assert!(
        metric(
            w,
            "logstore_errors_total",
            &[("kind", "append"), ("code", "unavailable")]
        )
        .await
            > 0.0,
        "refusals while the shard is down count as `unavailable`"
    );

    // Back: everything stored, no lag left.
    own.restart();
    eventually(90, "all 320 stored and the lag gone", || async move {
        let stored = metric(w, "logstore_appends_total", &[("result", "stored")]).await;
        let pending = metric(w, "logstore_jetstream_pending_messages", labels_ref).await;
        let ack_pending = metric(w, "logstore_jetstream_ack_pending_messages", labels_ref).await;
        let redelivered = metric(w, "logstore_jetstream_redelivered_messages", labels_ref).await;
        (stored == 320.0 && pending == 0.0 && ack_pending == 0.0 && redelivered == 0.0)
            .then_some(())
    })
    .await;
    assert_eq!(worker.terminate().await, Some(0));
}

/// Every answer to a NATS service API request on `subject` that arrives within 2 s (the API is
/// scatter-gather: each service instance answers, and nobody says how many there are), as JSON.
async fn service_answers(client: &async_nats::Client, subject: &str) -> Vec<serde_json::Value> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply(subject.to_string(), inbox, "".into())
        .await
        .expect("publish");
    let mut found = Vec::new();
    let window = tokio::time::sleep(Duration::from_secs(2));
    tokio::pin!(window);
    loop {
        tokio::select! {
            _ = &mut window => return found,
            answer = answers.next() => match answer {
                Some(answer) => found.push(
                    serde_json::from_slice(&answer.payload).unwrap_or_else(|e| {
                        panic!("{subject}: answer is not JSON ({e}): {:?}", answer.payload)
                    }),
                ),
                None => return found,
            },
        }
    }
}

/// The answers from this test's workers only (other tests' workers on the shared NATS server
/// register too): those whose metadata names this env's logs subject.
fn ours<'a>(env: &Env, answers: &'a [serde_json::Value]) -> Vec<&'a serde_json::Value> {
    answers
        .iter()
        .filter(|a| a["metadata"]["logs_subject"] == env.subject("logs").as_str())
        .collect()
}

/// `nats micro ls / info / stats` equivalents: each running worker answers `$SRV.PING` and
/// `$SRV.INFO.logstore` with its own id, the subjects it consumes (unchanged: appends still go
/// through the stream and queries through `query`), and a `status` endpoint whose answer and
/// whose STATS data carry the worker's counts. A stopped worker no longer answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_running_worker_answers_the_nats_service_api() {
    let mut env = Env::shared(&["a", "b"]).await;
    env.intake = "jetstream";
    let workers = vec![
        WorkerCommand::new(&env).start().await,
        WorkerCommand::new(&env).start().await,
    ];
    let client = env.client().await;

    // A worker registers with the service API as a background task once it takes work, so
    // right after /readyz says ready its registration may still be on its way to the server.
    let all_pings = eventually(30, "both workers answer PING", || {
        let (client, env) = (client.clone(), env.clone());
        async move {
            let pings = service_answers(&client, "$SRV.PING").await;
            (ours(&env, &pings).len() == 2).then_some(pings)
        }
    })
    .await;
    let pings = ours(&env, &all_pings);
    assert_eq!(pings.len(), 2, "each worker answers PING: {pings:?}");
    for ping in &pings {
        assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
        assert_eq!(ping["name"], "logstore");
    }
    assert_ne!(pings[0]["id"], pings[1]["id"], "each worker has its own id");

    let infos = service_answers(&client, "$SRV.INFO.logstore").await;
    let infos = ours(&env, &infos);
    assert_eq!(infos.len(), 2, "each worker answers INFO: {infos:?}");
    let mut ids = Vec::new();
    for info in &infos {
        let info: async_nats::service::Info =
            serde_json::from_value((*info).clone()).expect("a service info response");
        assert_eq!(info.metadata["intake"], "jetstream");
        assert_eq!(info.metadata["query_subject"], env.subject("query"));
        assert_eq!(info.metadata["queue_group"], env.subject("workers"));
        assert_eq!(info.metadata["stream"], env.stream());
        assert_eq!(info.metadata["shards"], "a,b");
        assert_eq!(info.endpoints.len(), 1, "{:?}", info.endpoints);
        assert_eq!(info.endpoints[0].name, "status");
        assert_eq!(
            info.endpoints[0].subject,
            format!("logstore.status.{}", info.id)
        );
        ids.push(info.id);
    }

    // Work still flows through the worker's own subjects; the counts show it.
    let js = jetstream::new(client.clone());
    let ack = js
        .publish(env.subject("logs"), r#"{"id":7,"log":"seen"}"#.into())
        .await
        .expect("publish");
    within(10, "PubAck", ack.into_future())
        .await
        .expect("PubAck");
    let page = eventually(30, "the append is stored and queryable", || async {
        let chunks = env.query_all(&client, 7).await;
        (chunks[0].total == 1).then_some(chunks)
    })
    .await;
    assert_eq!(entries(&page)[0].log, "seen");

    let mut stored = 0;
    let mut queries = 0;
    for id in &ids {
        let status = request(&client, &format!("logstore.status.{id}"), "".into()).await;
        let status: serde_json::Value =
            serde_json::from_slice(&status.payload).expect("status is JSON");
        assert_eq!(status["id"], id.as_str());
        assert_eq!(status["ready"], true, "{status}");
        let stats = service_answers(&client, &format!("$SRV.STATS.logstore.{id}")).await;
        assert_eq!(stats.len(), 1, "one answer per instance id: {stats:?}");
        let stats: async_nats::service::Stats =
            serde_json::from_value(stats[0].clone()).expect("a service stats response");
        assert_eq!(stats.endpoints.len(), 1);
        let endpoint = &stats.endpoints[0];
        assert_eq!(endpoint.name, "status");
        assert_eq!(endpoint.requests, 1, "the status request was counted");
        let data = endpoint
            .data
            .as_ref()
            .expect("stats carry the worker's counts");
        stored += data["appends"]["stored"].as_u64().expect("stored count");
        queries += data["queries"]["ok"].as_u64().unwrap_or(0);
    }
    assert_eq!(stored, 1, "the fleet's counts hold the one stored append");
    assert!(queries >= 1, "and the queries that read it");

    // A stopped worker leaves the listing.
    let mut workers = workers;
    assert_eq!(workers.remove(0).terminate().await, Some(0));
    let pings = service_answers(&client, "$SRV.PING.logstore").await;
    assert_eq!(
        ours(&env, &pings).len(),
        1,
        "only the running worker answers"
    );
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// Logs a person can read in a file: a worker whose stderr is not a terminal writes no colour
/// codes, says which address its metrics endpoint is bound to, and a restart on a migrated
/// database logs no Postgres NOTICE (`relation ... already exists, skipping`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_logs_in_a_file_are_plain_text_without_notices() {
    let env = Env::shared(&["a"]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut logs = String::new();
    for run in 0..2 {
        let path = dir.path().join(format!("worker{run}.log"));
        let file = std::fs::File::create(&path).expect("create log file");
        let worker = WorkerCommand::new(&env)
            .log("info")
            .stderr(file)
            .start()
            .await;
        let port = worker.metrics.port();
        assert_eq!(worker.terminate().await, Some(0));
        let log = std::fs::read_to_string(&path).expect("read log");
        assert!(
            log.contains(&format!(
                "serving /metrics, /healthz and /readyz addr=127.0.0.1:{port}"
            )),
            "the bound metrics address is logged:\n{log}"
        );
        logs.push_str(&log);
    }
    assert!(
        !logs.contains('\u{1b}'),
        "colour codes in a log file:\n{logs}"
    );
    assert!(!logs.contains("NOTICE"), "Postgres notices logged:\n{logs}");
}
