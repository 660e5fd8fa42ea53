//! JetStream intake under faults: nothing published and acknowledged by the stream is ever lost
//! or duplicated, whatever dies. Workers run as real processes so they can be killed. Every test
//! ends by reading every object back from the shard databases.

mod support;

use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream;
use futures::StreamExt;
use support::*;

async fn js_env(names: &[&str]) -> Env {
    let mut env = Env::shared(names).await;
    env.intake = "jetstream";
    env
}

async fn consumer_info(client: &async_nats::Client, env: &Env) -> jetstream::consumer::Info {
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(env.stream()).await.expect("stream exists");
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer("workers")
        .await
        .expect("consumer exists");
    consumer.info().await.expect("consumer info").clone()
}

/// 3 workers, 20,000 appends (a quarter without any key), one worker SIGKILLed mid-load and
/// restarted: every append stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_load_loses_and_duplicates_nothing() {
    let env = js_env(&["a", "b"]).await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(WorkerCommand::new(&env).start().await);
    }
    let client = env.client().await;
    let publisher = {
        let (env, client) = (env.clone(), client.clone());
        tokio::spawn(async move {
            let mut all = publish_concurrently(&env, &client, "k", 0..15_000, 200, false).await;
            all.extend(publish_concurrently(&env, &client, "nokey", 0..5_000, 200, true).await);
            all
        })
    };
    eventually(60, "load under way", || async {
        (stored_rows(&env).await.len() > 3_000).then_some(())
    })
    .await;
    workers.remove(0).kill().await;
    workers.push(WorkerCommand::new(&env).start().await);
    let published = within(300, "publisher", publisher).await.unwrap();
    verify_stored(&env, &published, 120).await;
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// Published while no worker runs: the stream keeps the backlog, and its entries carry their
/// publish times, not the time a worker got to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_published_while_all_workers_are_down_keeps_publish_times() {
    let env = js_env(&["a", "b"]).await;
    // Create the stream and consumer, then leave no worker running.
    WorkerCommand::new(&env).start().await.terminate().await;
    let client = env.client().await;
    let before = SystemTime::now();
    let published = publish_concurrently(&env, &client, "backlog", 0..3_000, 50, false).await;
    let after = SystemTime::now();
    // The scenario itself: workers come back 10 s later.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(stored_rows(&env).await.is_empty());
    let started = SystemTime::now();
    let workers = vec![
        WorkerCommand::new(&env).start().await,
        WorkerCommand::new(&env).start().await,
    ];
    let stored = verify_stored(&env, &published, 120).await;
    let slack = Duration::from_secs(1);
    for Row { ts, log: key, .. } in stored.values().flatten() {
        assert!(
            *ts + slack >= before && *ts <= after + slack,
            "{key}: ts is not its publish time"
        );
        assert!(*ts < started, "{key}: ts is the processing time");
    }
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// A shard SIGKILLed mid-load and restarted 10 s later: nothing lost, and the other shard kept
/// storing during the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_killed_mid_load_delays_only_its_own_objects() {
    let mut own = PgServer::start();
    let mut env = js_env(&["steady"]).await;
    env.shards
        .push(("flaky".to_string(), fresh_db(&own, "flaky").await));
    let workers = vec![
        WorkerCommand::new(&env).start().await,
        WorkerCommand::new(&env).start().await,
    ];
    let client = env.client().await;
    let steady_rows = |env: Env| async move {
        let db = pg_connect(&env.shards[0].1).await;
        db.query_one("SELECT count(*) FROM logs", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };

    // Load spread over the outage: 12 rounds of 500 appends, 1 per second.
    let publisher = {
        let (env, client) = (env.clone(), client.clone());
        tokio::spawn(async move {
            let mut all = Vec::new();
            for round in 0..12u64 {
                all.extend(
                    publish_concurrently(
                        &env,
                        &client,
                        "load",
                        round * 500..(round + 1) * 500,
                        100,
                        false,
                    )
                    .await,
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            all
        })
    };
    eventually(30, "load under way", || async {
        (steady_rows(env.clone()).await > 300).then_some(())
    })
    .await;
    own.kill();
    let at_kill = steady_rows(env.clone()).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = steady_rows(env.clone()).await;
    assert!(
        during > at_kill + 500,
        "the steady shard kept storing during the outage ({at_kill} -> {during})"
    );
    own.restart();
    let published = within(120, "publisher", publisher).await.unwrap();
    let stored = verify_stored(&env, &published, 120).await;
    assert!(stored.values().flatten().any(|row| row.shard == "flaky"));
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// nats-server restarted mid-load on the same store dir: the workers reconnect and nothing
/// acknowledged by the stream is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_mid_load_loses_nothing() {
    let mut nats = NatsServer::start();
    let mut env = js_env(&["a", "b"]).await;
    env.nats_url = nats.url();
    let workers = vec![
        WorkerCommand::new(&env).start().await,
        WorkerCommand::new(&env).start().await,
    ];
    let client = within(
        10,
        "connect",
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(nats.url()),
    )
    .await
    .unwrap();
    let publisher = {
        let (env, client) = (env.clone(), client.clone());
        tokio::spawn(async move {
            let mut all = Vec::new();
            for round in 0..10u64 {
                all.extend(
                    publish_concurrently(
                        &env,
                        &client,
                        "r",
                        round * 500..(round + 1) * 500,
                        100,
                        false,
                    )
                    .await,
                );
            }
            all
        })
    };
    eventually(60, "load under way", || async {
        (stored_rows(&env).await.len() > 1_000).then_some(())
    })
    .await;
    nats.stop();
    nats.restart();
    let published = within(300, "publisher", publisher).await.unwrap();
    verify_stored(&env, &published, 120).await;
    for worker in &workers {
        let (_, metrics) = within(10, "metrics", http_get(worker.metrics, "/metrics"))
            .await
            .unwrap();
        assert!(metric_sum(&metrics, "logstore_nats_reconnects_total", &[]) >= 1.0);
    }
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// Workers started while their Postgres is unreachable come up not ready, then work once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_started_before_postgres_work_once_it_is_up() {
    let mut own = PgServer::start();
    let mut env = js_env(&[]).await;
    env.shards
        .push(("only".to_string(), fresh_db(&own, "only").await));
    own.stop();
    let worker = WorkerCommand::new(&env).spawn();
    let addr = worker.metrics;
    let body = eventually(30, "worker serves /readyz", || async move {
        match http_get(addr, "/readyz").await {
            Some((503, body)) if body.contains("shard only") => Some(body),
            _ => None,
        }
    })
    .await;
    assert!(body.contains("unreachable"), "{body}");
    let client = env.client().await;
    let published = publish_concurrently(&env, &client, "early", 0..200, 10, false).await;
    own.restart();
    worker.wait_ready().await;
    verify_stored(&env, &published, 60).await;
    assert_eq!(worker.terminate().await, Some(0));
}

/// A message that can never be stored goes to dead_letter after JS_MAX_DELIVER deliveries and
/// is terminated; the messages behind it are stored meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_does_not_block_the_rest() {
    let env = js_env(&["a"]).await;
    let worker = WorkerCommand::new(&env)
        .extra(&[("JS_MAX_DELIVER", "3")])
        .start()
        .await;
    // The poison: this shard refuses one particular log text, as a broken constraint would.
    let db = pg_connect(&env.shards[0].1).await;
    db.batch_execute(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.log = 'poison' THEN RAISE EXCEPTION 'poison refused'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON logs FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .await
    .unwrap();
    let client = env.client().await;
    let mut dead = client.subscribe(env.subject("dead_letter")).await.unwrap();
    client.flush().await.unwrap();
    let js = jetstream::new(client.clone());
    within(10, "publish poison", async {
        js.publish(env.subject("logs"), r#"{"id":9,"log":"poison"}"#.into())
            .await
            .unwrap()
            .await
            .unwrap()
    })
    .await;
    let published = publish_concurrently(&env, &client, "after", 0..300, 5, false).await;
    let stored = verify_stored(&env, &published, 60).await;
    assert_eq!(stored.values().flatten().count(), 300);
    let letter = within(30, "poison dead-lettered", dead.next())
        .await
        .unwrap();
    assert_eq!(letter.payload.as_ref(), br#"{"id":9,"log":"poison"}"#);
    assert_eq!(
        header(&letter.headers, "Logstore-Error-Code").as_deref(),
        Some("internal")
    );
    eventually(10, "poison terminated, nothing pending", || async {
        let info = consumer_info(&client, &env).await;
        (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
    })
    .await;
    let (_, metrics) = within(10, "metrics", http_get(worker.metrics, "/metrics"))
        .await
        .unwrap();
    assert_eq!(
        metric_sum(
            &metrics,
            "logstore_dead_letters_total",
            &[("reason", "internal")]
        ),
        1.0
    );
    assert_eq!(worker.terminate().await, Some(0));
}

/// SIGTERM with a backlog: what the worker took is committed and acknowledged before it exits 0,
/// so nothing is redelivered because of the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_backlog_commits_and_acks_what_it_took() {
    let env = js_env(&["a", "b"]).await;
    WorkerCommand::new(&env).start().await.terminate().await;
    let client = env.client().await;
    let published = publish_concurrently(&env, &client, "b", 0..20_000, 100, false).await;
    let worker = WorkerCommand::new(&env).start().await;
    eventually(60, "backlog being processed", || async {
        (!stored_rows(&env).await.is_empty()).then_some(())
    })
    .await;
    let stopped_at = Instant::now();
    assert_eq!(worker.terminate().await, Some(0));
    let info = consumer_info(&client, &env).await;
    assert_eq!(
        info.num_ack_pending, 0,
        "every delivered message was acked or nak'ed before exit"
    );
    assert_eq!(
        info.num_redelivered, 0,
        "nothing redelivered because of the shutdown"
    );
    assert!(
        info.num_pending > 0,
        "the shutdown left part of the backlog for later (took {:?})",
        stopped_at.elapsed()
    );
    let rest = WorkerCommand::new(&env).start().await;
    verify_stored(&env, &published, 120).await;
    assert_eq!(consumer_info(&client, &env).await.num_redelivered, 0);
    assert_eq!(rest.terminate().await, Some(0));
}

/// Bad input through JetStream: dead-lettered with its reason and terminated (redelivery cannot
/// fix it), while valid appends around it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_through_jetstream_is_dead_lettered_and_terminated() {
    let env = js_env(&["a", "b"]).await;
    let worker = WorkerCommand::new(&env).start().await;
    let client = env.client().await;
    let mut dead = client.subscribe(env.subject("dead_letter")).await.unwrap();
    client.flush().await.unwrap();
    let js = jetstream::new(client.clone());
    for body in [&b"{not json"[..], br#"{"id":-1,"log":"a"}"#, br#"{"id":1}"#] {
        within(10, "publish", async {
            js.publish(env.subject("logs"), body.to_vec().into())
                .await
                .unwrap()
                .await
                .unwrap()
        })
        .await;
        let letter = within(10, "dead letter", dead.next()).await.unwrap();
        assert_eq!(letter.payload.as_ref(), body);
        assert_eq!(
            header(&letter.headers, "Logstore-Error-Code").as_deref(),
            Some("invalid_request")
        );
    }
    let published = publish_concurrently(&env, &client, "ok", 0..50, 5, false).await;
    verify_stored(&env, &published, 30).await;
    eventually(10, "nothing left pending", || async {
        let info = consumer_info(&client, &env).await;
        (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
    })
    .await;
    assert_eq!(worker.terminate().await, Some(0));
}
