//! Shards on HA PostgreSQL: a shard named by a multi-host URL (a primary and its synchronous
//! standby) fails over under load when the primary is SIGKILLed and the standby promoted, and
//! a server that answers read-only is an outage, never a refusal.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logstore_protocol::ErrorCode;
use support::*;

/// Longest a shard that is not failing over may go without storing anything (the brief's
/// "~1 s"; measured as a lower bound, see [`longest_stall`]).
const MAX_STALL: Duration = Duration::from_secs(1);
/// Appends to the failed-over shard are stored again within this of the promotion.
const RESUME_WITHIN: Duration = Duration::from_secs(10);
/// How often the progress sampler counts the shards' rows.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

async fn count(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM logs", &[])
        .await
        .expect("count the shard's rows")
        .get(0)
}

/// Counts the rows of each database in `urls` every [`SAMPLE_EVERY`] until `stop`; the
/// samples, each with when it was taken.
fn sample_progress(
    urls: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Instant, Vec<i64>)>> {
    tokio::spawn(async move {
        let mut dbs = Vec::new();
        for url in &urls {
            dbs.push(pg_connect(url).await);
        }
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        while !stop.load(Ordering::Acquire) {
            tick.tick().await;
            let mut counts = Vec::with_capacity(dbs.len());
            for db in &dbs {
                counts.push(count(db).await);
            }
            samples.push((Instant::now(), counts));
        }
        samples
    })
}

/// The longest time shard `k` of `samples` provably stored nothing: the longest span between
/// two samples with the same count. A lower bound of the real stall (by at most two sampling
/// intervals), never raised by a sampler that was itself late.
fn longest_stall(samples: &[(Instant, Vec<i64>)], k: usize) -> Duration {
    let mut longest = Duration::ZERO;
    let mut run_start = 0;
    for i in 1..samples.len() {
        if samples[i].1[k] != samples[run_start].1[k] {
            run_start = i;
        }
        longest = longest.max(samples[i].0 - samples[run_start].0);
    }
    longest
}

/// The sum of metric `name` with `labels` over every worker.
async fn fleet_metric(workers: &[WorkerProcess], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for worker in workers {
        let (_, metrics) = within(10, "metrics", http_get(worker.metrics, "/metrics"))
            .await
            .expect("metrics");
        sum += metric_sum(&metrics, name, labels);
    }
    sum
}

/// Three shards, one of them a primary with a synchronous standby named by a multi-host URL;
/// JetStream (the default intake) with publishers on objects spread over all three. The
/// primary is SIGKILLed and the standby promoted mid-load: its appends are held (never
/// refused, never dead-lettered), the other shards never stall, appends to it resume within
/// 10 s of the promotion without a restart, a new worker accepts the promoted standby as the
/// same shard, and every acknowledged append is stored once, gapless, in stream order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_takes_over_its_shard_under_load() {
    let mut pair = PgPair::start();
    let mut env = Env::shared(&["steady1", "steady2"]).await;
    env.intake = "jetstream";
    let db = pair.fresh_db("ha").await;
    env.shards.push(("ha".to_string(), pair.url(&db)));
    let steady: Vec<String> = env.shards[..2].iter().map(|(_, url)| url.clone()).collect();
    let mut workers = vec![
        WorkerCommand::new(&env).start().await,
        WorkerCommand::new(&env).start().await,
    ];
    let client = env.client().await;
    let acked = Arc::new(AtomicUsize::new(0));
    let publishers = spawn_publishers(
        &env,
        &client,
        0..4,
        2_500,
        Some(Duration::from_millis(5)),
        &acked,
    );
    let ha = pg_connect(&pair.url(&db)).await;
    let steady_dbs = [pg_connect(&steady[0]).await, pg_connect(&steady[1]).await];
    eventually(60, "every shard storing", || async {
        let mut counts = vec![count(&ha).await];
        for db in &steady_dbs {
            counts.push(count(db).await);
        }
        counts.iter().all(|&n| n > 100).then_some(())
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_progress(steady.clone(), stop.clone());

    tokio::task::block_in_place(|| pair.primary.kill());
    let killed = Instant::now();
    // The synchronous standby holds every commit the primary acknowledged.
    let standby = pg_connect(&pair.standby.url(&db)).await;
    let at_kill = count(&standby).await;
    let steady_at_kill = count(&steady_dbs[0]).await + count(&steady_dbs[1]).await;
    // Promoted once every worker has seen the shard down (its health check found no writable
    // host), the puller holds its appends, and the other shards went on meanwhile.
    eventually(30, "the HA shard down, its appends held", || async {
        let steady_now = count(&steady_dbs[0]).await + count(&steady_dbs[1]).await;
        let held = fleet_metric(&workers, "logstore_jetstream_held_messages", &[]).await;
        let up = fleet_metric(&workers, "logstore_shard_up", &[("shard", "ha")]).await;
        (steady_now > steady_at_kill + 200 && held > 0.0 && up == 0.0).then_some(())
    })
    .await;

    let promoting = Instant::now();
    tokio::task::block_in_place(|| pair.promote());
    eventually(
        RESUME_WITHIN.as_secs(),
        "appends to the promoted standby",
        || async { (count(&standby).await > at_kill).then_some(()) },
    )
    .await;
    let resumed = promoting.elapsed();
    assert!(
        resumed <= RESUME_WITHIN,
        "appends resumed {resumed:?} after the promotion"
    );
    stop.store(true, Ordering::Release);
    let samples = within(10, "progress sampler", sampler)
        .await
        .expect("sampler");
    assert!(
        publishers.iter().all(|p| !p.is_finished()),
        "the load ended before the failover did: the stall measure would be void"
    );
    let window: Vec<(Instant, Vec<i64>)> = samples
        .into_iter()
        .filter(|(at, _)| *at >= killed)
        .collect();
    let stalls: Vec<Duration> = (0..2).map(|k| longest_stall(&window, k)).collect();
    eprintln!(
        "failover: outage {:?} (kill to promotion), appends resumed {resumed:?} after it; \
         longest stall of the other shards {stalls:?} ({} samples)",
        promoting - killed,
        window.len()
    );
    for (stall, name) in stalls.iter().zip(["steady1", "steady2"]) {
        assert!(
            *stall < MAX_STALL,
            "shard {name} stored nothing for {stall:?} during the failover"
        );
    }

    // The promoted standby is the same shard to a worker that starts now: its identity, fleet
    // and fence are the replicated ones.
    workers.push(WorkerCommand::new(&env).start().await);
    let sent = join_publishers(publishers, 180).await;
    assert_eq!(sent.len(), acked.load(Ordering::Relaxed));
    let by_object = verify_stored(&env, &sent, 120).await;
    assert_in_stream_order(&by_object, &sent);
    for shard in ["steady1", "steady2", "ha"] {
        assert!(
            by_object.values().flatten().any(|row| row.shard == shard),
            "no object on shard {shard}: the load must reach every shard"
        );
    }
    let refused = fleet_metric(&workers, "logstore_errors_total", &[("kind", "append")]).await;
    let dead = fleet_metric(&workers, "logstore_dead_letters_total", &[]).await;
    assert_eq!(
        (refused, dead),
        (0.0, 0.0),
        "appends refused / dead-lettered"
    );
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// Append `log` with `key` to object 1 through core request-reply: the reply, stored or error.
async fn append_keyed(
    env: &Env,
    client: &async_nats::Client,
    log: &str,
    key: &str,
) -> Result<logstore_protocol::AppendReply, logstore_protocol::ErrorReply> {
    let reply = request(client, &env.subject("logs"), append_body(1, log, Some(key))).await;
    parse_reply(&reply.payload)
}

/// A shard whose server answers read-only (its database set `default_transaction_read_only`,
/// as a standby or a demoted primary answers) is down, not broken: core appends are answered
/// `unavailable` (retry with the same key), never `internal`, nothing is dead-lettered. Once
/// it takes writes again, the worker drops the read-only sessions it pooled (they stay
/// read-only) and the retried append is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_shard_is_down_until_it_takes_writes_again() {
    let env = Env::shared(&["ro"]).await;
    let url = env.shards[0].1.clone();
    let db = url.rsplit('/').next().expect("database name").to_string();
    let admin = pg_connect(&shared().pg[0].url("postgres")).await;
    let worker = WorkerCommand::new(&env).start().await;
    let client = env.client().await;
    append_keyed(&env, &client, "before", "k0")
        .await
        .expect("stored while writable");

    // Sessions that start from now on are read-only; those already open (the worker's pooled
    // ones) are ended, and gone before the next append.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET default_transaction_read_only = on"
        ))
        .await
        .expect("make the shard's database read-only");
    let switched: std::time::SystemTime = admin
        .query_one("SELECT now()", &[])
        .await
        .expect("now()")
        .get(0);
    let older = "FROM pg_stat_activity WHERE datname = $1 AND backend_start < $2";
    admin
        .execute(
            &format!("SELECT pg_terminate_backend(pid) {older}"),
            &[&db, &switched],
        )
        .await
        .expect("end the sessions opened while writable");
    eventually(10, "the writable sessions gone", || async {
        let left: i64 = admin
            .query_one(&format!("SELECT count(*) {older}"), &[&db, &switched])
            .await
            .expect("count the writable sessions")
            .get(0);
        (left == 0).then_some(())
    })
    .await;
    let refusal = append_keyed(&env, &client, "during", "k1")
        .await
        .expect_err("no append stored while read-only");
    assert_eq!(refusal.error.code, ErrorCode::Unavailable, "{refusal:?}");
    let down = eventually(10, "the shard reported down", || async {
        let (_, metrics) = http_get(worker.metrics, "/metrics").await?;
        (metric_sum(&metrics, "logstore_shard_up", &[("shard", "ro")]) == 0.0).then_some(())
    });
    down.await;
    for _ in 0..3 {
        let answer = append_keyed(&env, &client, "during", "k1").await;
        let error = answer.expect_err("no append stored while read-only");
        assert_eq!(error.error.code, ErrorCode::Unavailable, "{error:?}");
    }

    // Writable again for new sessions only: the worker's pooled ones stay read-only.
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" SET default_transaction_read_only = off"
        ))
        .await
        .expect("make the shard's database writable");
    let stored = eventually(15, "the retried append stored", || async {
        append_keyed(&env, &client, "during", "k1").await.ok()
    })
    .await;
    assert_eq!(stored.seq, 2, "{stored:?}");
    let rows: Vec<(i64, String)> = db_rows(&url, 1)
        .await
        .into_iter()
        .map(|(seq, _, log, _)| (seq, log))
        .collect();
    assert_eq!(rows, [(1, "before".into()), (2, "during".into())]);
    check_shard_invariants(&url).await;
    let workers = [worker];
    let dead = fleet_metric(&workers, "logstore_dead_letters_total", &[]).await;
    let internal = fleet_metric(&workers, "logstore_errors_total", &[("code", "internal")]).await;
    assert_eq!(
        (dead, internal),
        (0.0, 0.0),
        "dead letters / internal errors"
    );
    let [worker] = workers;
    assert_eq!(worker.terminate().await, Some(0));
}
