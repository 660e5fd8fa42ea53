//! What an operator sees of a worker besides its answers: the metrics added for the dashboard
//! (JetStream consumer lag, commit and pool-wait histograms, process memory, errors by code).
//!
//! Run with `cargo build --workspace --bins && cargo test -p logstore-worker --test observability`.

mod support;

use std::future::IntoFuture;
use std::net::SocketAddr;

use async_nats::jetstream;
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
/// histograms and the process's resident memory are exported along the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_commit_and_pool_metrics_follow_the_fleet() {
    let mut own = PgServer::start();
    let mut env = Env::shared(&[]).await;
    env.intake = "jetstream";
    env.shards
        .push(("own".to_string(), fresh_db(&own, "own").await));
    let worker = WorkerProcess::start(&env, &[("JS_MAX_ACK_PENDING", "100")]).await;
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
