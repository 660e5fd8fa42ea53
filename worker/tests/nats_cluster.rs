//! NATS as a 3-node cluster with JS_REPLICAS=3 (README, "Running NATS as a cluster"): the
//! stream, its consumers and the KV buckets have three copies; the stream's leader's server is
//! SIGKILLed under load and restarted, then another: every acknowledged append is stored once,
//! in publish order per object, and appends are stored again within 10 s of each kill. A
//! worker started while a server is down connects to the others. Real nats-server 2.15.1
//! cluster, real PostgreSQL, real worker processes; the cluster is shared by this binary's
//! tests, which take turns.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use support::*;

/// How soon appends must be stored again after a server of the cluster is killed.
const RESUME_WITHIN: Duration = Duration::from_secs(10);
/// Objects written to, one publisher each.
const OBJECTS: u64 = 12;
/// Each test's stream is small: a replicated stream reserves its JS_MAX_BYTES on every server
/// that holds a copy, and the streams of this binary's tests stay on the shared cluster.
const MAX_BYTES: &str = "67108864";

/// A worker's settings here: `replicas` copies (JS_REPLICAS), a [`MAX_BYTES`] stream.
fn replicated(replicas: &str) -> Vec<(&'static str, String)> {
    vec![
        ("JS_REPLICAS", replicas.to_string()),
        ("JS_MAX_BYTES", MAX_BYTES.to_string()),
    ]
}

/// The KV buckets the workers create: the leases and the ring record.
const BUCKETS: [&str; 2] = [worker::intake::ordered::LEASE_BUCKET, "logstore_ring"];

/// What the publishers had acknowledged, and when each acknowledgement came.
#[derive(Default)]
struct Ledger {
    acked: Mutex<Vec<Acked>>,
    at: Mutex<HashMap<String, Instant>>,
}

impl Ledger {
    fn record(&self, id: u64, sequence: u64, log: String) {
        let now = Instant::now();
        self.at.lock().expect("ledger").insert(log.clone(), now);
        self.acked.lock().expect("ledger").push((id, sequence, log));
    }

    fn acked_after(&self, log: &str, instant: Instant) -> bool {
        self.at
            .lock()
            .expect("ledger")
            .get(log)
            .is_some_and(|at| *at > instant)
    }
}

/// Publishers, one per object, each appending in turn (`pace` apart) and retrying every append
/// until the stream acknowledges it (support/load.rs), until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ledger: Arc<Ledger>,
}

impl Load {
    /// `per_object`: publish object X's appends on `<logs>.X` (the partitioned intake) rather
    /// than on `<logs>`.
    fn start(env: &Env, client: &async_nats::Client, per_object: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ledger = Arc::new(Ledger::default());
        let logs = env.subject("logs");
        let tasks = (1..=OBJECTS)
            .map(|id| {
                let subject = match per_object {
                    true => format!("{logs}.{id}"),
                    false => logs.clone(),
                };
                let js = jetstream::new(client.clone());
                let (stop, ledger) = (stop.clone(), ledger.clone());
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Acquire) {
                        let log = format!("o{id}-{i}");
                        let body = serde_json::json!({ "id": id, "log": log }).to_string();
                        let sequence = publish_until_acked(&js, &subject, Some(&log), body).await;
                        ledger.record(id, sequence, log);
                        i += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            tasks,
            ledger,
        }
    }

    /// Stop publishing; everything acknowledged.
    async fn finish(self) -> Vec<Acked> {
        self.stop.store(true, Ordering::Release);
        for task in self.tasks {
            within(120, "a publisher finishes", task)
                .await
                .expect("publisher");
        }
        let acked = self.ledger.acked.lock().expect("ledger").clone();
        acked
    }
}

/// How long after `killed` (the kill began) the first append acknowledged after `dead` (the
/// server was gone) was stored, polled every 100 ms: the time the cluster and the workers took
/// to take appends in again.
async fn resumed_after(env: &Env, ledger: &Ledger, killed: Instant, dead: Instant) -> Duration {
    eventually(
        60,
        "an append acknowledged after the kill stored",
        || async {
            let stored = stored_rows(env).await;
            let found = stored.iter().any(|row| ledger.acked_after(&row.log, dead));
            found.then(|| killed.elapsed())
        },
    )
    .await
}

/// An env on the cluster: shards `a` and `b`, JetStream intake, NATS_URL naming every node.
async fn cluster_env(cluster: &NatsCluster) -> Env {
    let mut env = Env::shared(&["a", "b"]).await;
    env.intake = "jetstream";
    env.nats_url = cluster.nats_url();
    env
}

/// The stream's and each consumer's copies, as the servers report them.
async fn replicas(client: &async_nats::Client, stream: &str, consumers: &[String]) -> Vec<usize> {
    let js = jetstream::new(client.clone());
    let mut stream = js.get_stream(stream).await.expect("the stream");
    let mut found = vec![
        stream
            .info()
            .await
            .expect("stream info")
            .config
            .num_replicas,
    ];
    for name in consumers {
        let mut consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer(name).await.expect("the consumer");
        found.push(
            consumer
                .info()
                .await
                .expect("consumer info")
                .config
                .num_replicas,
        );
    }
    found
}

/// A KV bucket's copies.
async fn bucket_replicas(client: &async_nats::Client, bucket: &str) -> usize {
    let js = jetstream::new(client.clone());
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .expect("the bucket");
    stream
        .info()
        .await
        .expect("bucket info")
        .config
        .num_replicas
}

/// The stream, every consumer and the KV buckets have [`CLUSTER_SIZE`] copies.
async fn assert_replicated(client: &async_nats::Client, stream: &str, consumers: &[String]) {
    let found = replicas(client, stream, consumers).await;
    assert!(
        found.iter().all(|r| *r == CLUSTER_SIZE),
        "the stream and every consumer have {CLUSTER_SIZE} copies: {found:?}"
    );
    for bucket in BUCKETS {
        let found = bucket_replicas(client, bucket).await;
        assert_eq!(found, CLUSTER_SIZE, "{bucket}");
    }
}

/// Wait until the stream, its `consumers` and the KV buckets (leases) have caught up on every
/// server (before the next kill).
async fn all_current(
    cluster: &NatsCluster,
    client: &async_nats::Client,
    stream: &str,
    consumers: &[&str],
) {
    cluster.wait_current(client, stream, consumers).await;
    for bucket in BUCKETS {
        let name = format!("KV_{bucket}");
        cluster.wait_current(client, &name, &[]).await;
    }
}

/// The leader-kill scenario: workers with `settings`, load on every object, the stream leader's
/// server SIGKILLed and restarted, then another's; each kill followed by stored appends within
/// [`RESUME_WITHIN`]; every acknowledged append stored once, in publish order per object.
async fn leaders_killed_under_load(settings: &[(&str, String)], per_object: bool) {
    let mut cluster = shared_cluster().lock().await;
    cluster.restore();
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let env = cluster_env(&cluster).await;
    let workers = [
        WorkerCommand::new(&env).extra(settings).start().await,
        WorkerCommand::new(&env).extra(settings).start().await,
    ];
    let stream = env.stream();
    let partitions = settings
        .iter()
        .find(|(var, _)| *var == "JS_PARTITIONS")
        .map_or(0, |(_, n)| n.parse::<u32>().expect("JS_PARTITIONS"));
    let mut consumers = vec!["workers".to_string()];
    consumers.extend((0..partitions).map(|k| format!("workers-p{k}")));
    let names: Vec<&str> = consumers.iter().map(String::as_str).collect();
    cluster.wait_current(&client, &stream, &names).await;
    assert_replicated(&client, &stream, &consumers).await;
    let load = Load::start(&env, &client, per_object);
    eventually(60, "load under way", || async {
        (stored_rows(&env).await.len() > 200).then_some(())
    })
    .await;
    let mut killed = Vec::new();
    for round in 0..2 {
        // First the stream's leader; then another server (the new leader, unless leadership
        // went back to the first victim).
        let leader = cluster.stream_leader(&client, &stream).await;
        let victim = match killed.contains(&leader) {
            true => (leader + 1) % CLUSTER_SIZE,
            false => leader,
        };
        let at = Instant::now();
        cluster.kill(victim);
        // Appends acknowledged from here on were taken by a live leader.
        let dead = Instant::now();
        let resumed = resumed_after(&env, &load.ledger, at, dead).await;
        eprintln!(
            "round {round}: killed {} (the stream's leader: {}); appends stored again after {resumed:?}",
            cluster.name(victim),
            victim == leader
        );
        assert!(
            resumed < RESUME_WITHIN,
            "round {round}: appends stored again only {resumed:?} after {} was killed",
            cluster.name(victim)
        );
        killed.push(victim);
        cluster.restart(victim);
        all_current(&cluster, &client, &stream, &names).await;
    }
    let acked = load.finish().await;
    let stored = verify_stored(&env, &acked, 120).await;
    assert_in_stream_order(&stored, &acked);
    eprintln!(
        "{} appends acknowledged, each stored once, in order",
        acked.len()
    );
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0), "the worker ran through");
    }
}

/// Default intake (ordered, one puller under a lease): two leaders' servers killed under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leaders_server_loses_doubles_and_reorders_nothing() {
    leaders_killed_under_load(&replicated("3"), false).await;
}

/// The partitioned intake (JS_PARTITIONS): the same, each partition's consumer replicated too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partitioned_intake_rides_through_leader_kills() {
    let mut settings = replicated("3");
    settings.extend(partition_settings());
    leaders_killed_under_load(&settings, true).await;
}

/// With one server of the cluster down (the first NATS_URL names), a worker starting connects
/// to the others and serves appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_a_server_is_down_serves_appends() {
    let mut cluster = shared_cluster().lock().await;
    cluster.restore();
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let mut env = cluster_env(&cluster).await;
    let settings = replicated("3");
    // The stream exists: a worker made it while the whole cluster was up.
    let first = WorkerCommand::new(&env).extra(&settings).start().await;
    assert_eq!(first.terminate().await, Some(0));
    cluster
        .wait_current(&client, &env.stream(), &["workers"])
        .await;
    let down = 0;
    cluster.kill(down);
    env.nats_url = cluster.nats_url_from(down);
    let worker = WorkerCommand::new(&env).extra(&settings).start().await;
    let js = jetstream::new(client.clone());
    let mut acked = Vec::new();
    for i in 0..50u64 {
        let id = i % 5 + 1;
        let log = format!("down-{i}");
        let body = serde_json::json!({ "id": id, "log": log }).to_string();
        let sequence = publish_until_acked(&js, &env.subject("logs"), Some(&log), body).await;
        acked.push((id, sequence, log));
    }
    let stored = verify_stored(&env, &acked, 60).await;
    assert_in_stream_order(&stored, &acked);
    assert_eq!(worker.terminate().await, Some(0));
    cluster.restart(down);
}

/// JS_REPLICAS raises what it finds with fewer copies (the stream, its consumer, the KV
/// buckets) and never lowers what has more: a worker with JS_REPLICAS=1 leaves them at 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_raised_to_js_replicas_and_never_lowered() {
    let mut cluster = shared_cluster().lock().await;
    cluster.restore();
    let client = cluster.client().await;
    cluster.wait_ready(&client).await;
    let env = cluster_env(&cluster).await;
    let stream = env.stream();
    let consumers = ["workers".to_string()];
    // As an earlier version left them: one copy of everything.
    let single = WorkerCommand::new(&env)
        .extra(&replicated("1"))
        .start()
        .await;
    assert_eq!(single.terminate().await, Some(0));
    let js = jetstream::new(client.clone());
    for bucket in BUCKETS {
        let mut config = js
            .get_stream(format!("KV_{bucket}"))
            .await
            .expect("the bucket")
            .cached_info()
            .config
            .clone();
        config.num_replicas = 1;
        js.update_stream(config)
            .await
            .expect("lower the bucket to R1");
    }
    assert_eq!(replicas(&client, &stream, &consumers).await, [1, 1]);
    let raised = WorkerCommand::new(&env)
        .extra(&replicated("3"))
        .start()
        .await;
    cluster.wait_current(&client, &stream, &["workers"]).await;
    assert_eq!(replicas(&client, &stream, &consumers).await, [3, 3]);
    for bucket in BUCKETS {
        assert_eq!(bucket_replicas(&client, bucket).await, 3, "{bucket}");
    }
    assert_eq!(raised.terminate().await, Some(0));
    let lower = WorkerCommand::new(&env)
        .extra(&replicated("1"))
        .start()
        .await;
    assert_eq!(replicas(&client, &stream, &consumers).await, [3, 3]);
    for bucket in BUCKETS {
        assert_eq!(bucket_replicas(&client, bucket).await, 3, "{bucket}");
    }
    assert_eq!(lower.terminate().await, Some(0));
}

/// The shipped cluster configuration (deploy/nats/cluster.conf through run-nats.sh, as
/// docker-compose.ha.yaml runs it): the `worker` user raises what a single-copy worker made (the
/// stream, its consumer, both KV buckets) to three copies, and the `client` user's appends are
/// stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_cluster_config_lets_the_workers_keep_three_copies() {
    let shipped = ShippedCluster::start();
    let (admin, _) = shipped.connect("admin").await;
    shipped.cluster.wait_ready(&admin).await;
    let env = Env::shared(&["a"]).await;
    let mut settings = shipped.worker_settings();
    settings.extend(replicated("1"));
    let single = WorkerCommand::new(&env).extra(&settings).start().await;
    assert_eq!(single.terminate().await, Some(0));
    let consumers = ["workers".to_string()];
    assert_eq!(replicas(&admin, "LOGS", &consumers).await, [1, 1]);
    // Later settings win: JS_REPLICAS=3.
    settings.extend(replicated("3"));
    let worker = WorkerCommand::new(&env).extra(&settings).start().await;
    assert_eq!(replicas(&admin, "LOGS", &consumers).await, [3, 3]);
    for bucket in BUCKETS {
        assert_eq!(bucket_replicas(&admin, bucket).await, 3, "{bucket}");
    }
    let (client, _) = shipped.connect("client").await;
    let js = jetstream::new(client);
    let mut acked = Vec::new();
    for i in 0..20u64 {
        let (id, log) = (i % 4 + 1, format!("shipped-{i}"));
        let body = serde_json::json!({ "id": id, "log": log }).to_string();
        acked.push((
            id,
            publish_until_acked(&js, "logs", Some(&log), body).await,
            log,
        ));
    }
    let stored = verify_stored(&env, &acked, 60).await;
    assert_in_stream_order(&stored, &acked);
    assert_eq!(worker.terminate().await, Some(0));
}
