//! Trust boundaries on NATS: a user that may only append and read cannot steer the fleet.
//!
//! - The shipped deploy/nats/nats-server.conf, started by deploy/nats/run-nats.sh with the
//!   passwords in files (as docker-compose.yaml runs it), keeps each of its three users
//!   (`worker`, `admin`, `client`) to its job, and each reads only its own answers.
//! - As `client` against that config, the attacks that once worked through reply subjects
//!   (the server's PubAck or a worker's answer written into the ring record, a lease, the
//!   stream API or `appended.<id>`) change nothing, and the intake keeps storing meanwhile.
//! - In a deployment without accounts, the worker itself answers only inboxes
//!   (NATS_REPLY_PREFIXES) and counts what it refused.
//! - A full stream refuses a publish with an error and keeps everything it holds.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use support::*;

/// Runs `bin` with `env`; its exit code, stdout and stderr.
async fn run(bin: &str, args: &[&str], env: &[(&'static str, String)]) -> (i32, String, String) {
    let (code, stdout, stderr) = run_once(bin, args, env, 40).await;
    (code.unwrap_or(-1), stdout, stderr)
}

/// Each user of the shipped config does its job and nothing else; each reads only its own
/// answers; deleting is the operator's (`admin`), and the CLI says so in one line when the
/// `client` tries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_config_keeps_each_user_to_its_job() {
    let shipped = Shipped::start();
    let env = Env::shared(&["a"]).await;
    let worker = shipped.start_worker(&env).await;
    let client_vars = shipped.login("client");
    let admin_vars = shipped.login("admin");

    // The client appends and reads back through the CLI (on its own inbox prefix,
    // _INBOX_client, picked by itself), and loadgen verifies a short run. On JetStream intake
    // the CLI waits for the append's event (`appended.777`, which the client may read) and
    // prints the stored seq as with core intake.
    let id = "777";
    for (seq, text) in [(1, "first for the client"), (2, "second for the client")] {
        let (code, out, err) = run("logstore", &["append", id, text], &client_vars).await;
        assert_eq!(code, 0, "append as client:\n{out}\n{err}");
        assert!(out.starts_with(&format!("{seq} ")), "{out}");
    }
    eventually(20, "the worker stores the client's appends", || {
        let client_vars = client_vars.clone();
        async move {
            let (code, out, _) = run("logstore", &["get", id], &client_vars).await;
            (code == 0 && out.contains("second for the client")).then_some(())
        }
    })
    .await;
    let (code, out, err) = run(
        "loadgen",
        &[
            "--jetstream",
            "--count",
            "5",
            "--rate",
            "100",
            "--verify",
            "--progress-secs",
            "0",
        ],
        &client_vars,
    )
    .await;
    assert_eq!(code, 0, "loadgen as client:\n{out}\n{err}");

    // Deleting: refused to the client in one line naming the violation (exit 2, not
    // "unreachable"); the operator's `admin` may.
    let (code, out, err) = run(
        "logstore",
        &["delete", id, "--before-seq", "2"],
        &client_vars,
    )
    .await;
    assert_eq!(code, 2, "delete as client:\n{out}\n{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line:\n{err}");
    assert!(
        lines[0].contains("Permissions Violation") && lines[0].contains("\"delete\""),
        "{err}"
    );
    let (code, out, err) = run(
        "logstore",
        &["delete", id, "--before-seq", "2"],
        &admin_vars,
    )
    .await;
    assert_eq!(code, 0, "delete as admin:\n{out}\n{err}");
    let (code, out, err) = run("logstore", &["get", id], &client_vars).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("first for the client") && out.contains("second for the client"),
        "{out}"
    );
    // The operator runs `worker shards` as itself, with its own inbox prefix.
    let mut shards_vars = admin_vars.clone();
    shards_vars.push(("POSTGRES_SHARDS", env.shards_spec()));
    let (code, out, err) = run("worker", &["shards", "status"], &shards_vars).await;
    assert_eq!(code, 0, "worker shards status as admin:\n{out}\n{err}");
    assert!(out.contains("epoch 1: steady"), "{out}");
    // The client may not: one line naming the violation, not a silent timeout.
    let mut client_shards = client_vars.clone();
    client_shards.push(("POSTGRES_SHARDS", env.shards_spec()));
    let (code, out, err) = run("worker", &["shards", "status"], &client_shards).await;
    assert_eq!(code, 1, "worker shards status as client:\n{out}\n{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("Permissions Violation"), "{err}");

    // What the client may not do: read the appends before the workers, read what the stream
    // delivers to them, read anyone else's answers, forge an event, reach the stream.
    let (client, mut violations) = shipped.connect("client").await;
    for subject in ["logs", "_INBOX_worker.>", "_INBOX.>", "_INBOX_admin.>"] {
        let _subscription = client.subscribe(subject).await.expect("subscribe sent");
        violations.expect(subject).await;
    }
    let mut events = client.subscribe("appended.>").await.expect("subscribe");
    client
        .publish("appended.777", "{\"id\":777,\"seq\":99}".into())
        .await
        .expect("publish sent");
    violations.expect("appended.777").await;
    let mut refusals = client.subscribe("rejected.>").await.expect("subscribe");
    client
        .publish("rejected.777", "{\"id\":777}".into())
        .await
        .expect("publish sent");
    violations.expect("rejected.777").await;
    within(10, "flush", client.flush()).await.expect("flush");
    assert!(
        futures::FutureExt::now_or_never(events.next()).is_none()
            && futures::FutureExt::now_or_never(refusals.next()).is_none(),
        "a forged event was delivered"
    );
    let js = async_nats::jetstream::new(client.clone());
    assert!(within(10, "stream info", js.get_stream("LOGS"))
        .await
        .is_err());
    violations.expect("$JS.API.STREAM.INFO.LOGS").await;

    // The operator's answers stay the operator's: the client listening on every subject it
    // may read sees none of the admin's stats answer.
    let (admin, _) = shipped.connect("admin").await;
    let mut readable = Vec::new();
    for subject in ["_INBOX_client.>", "appended.>", "rejected.>", "response"] {
        readable.push(client.subscribe(subject).await.expect("subscribe"));
    }
    within(10, "flush", client.flush()).await.expect("flush");
    let answer = within(
        10,
        "stats as admin",
        admin.request("stats", "{\"id\":777}".into()),
    )
    .await
    .expect("stats answered");
    assert!(
        String::from_utf8_lossy(&answer.payload).contains("\"count\""),
        "{answer:?}"
    );
    let mut heard = futures::stream::select_all(readable);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), heard.next())
            .await
            .is_err(),
        "the client read a message meant for the admin"
    );

    // The worker user may not read `logs` outside its queue group either.
    let (worker_client, mut worker_violations) = shipped.connect("worker").await;
    let _plain = worker_client
        .subscribe("logs")
        .await
        .expect("subscribe sent");
    worker_violations.expect("logs").await;
    let output = worker.stop().await;
    assert!(!output.contains(" ERROR "), "{output}");
}

/// One round of the attacks `client` could once make: replies that would have had the server
/// (its JetStream acknowledgement) or a worker (its answer) write into the ring record, the
/// intake and mover leases, the stream API, or an object's events.
async fn attack(client: &async_nats::Client) {
    let append = append_body(43, "attack", None);
    let attacks: [(&str, &str, bytes::Bytes); 9] = [
        ("stats", "$KV.logstore_ring.workers", "{\"id\":42}".into()),
        ("query", "$KV.logstore_ring.workers", "{\"id\":42}".into()),
        ("logs", "$KV.logstore_ring.workers", append.clone()),
        (
            "logs",
            "$KV.logstore_leases.intake.LOGS.workers",
            append.clone(),
        ),
        ("logs", "$KV.logstore_leases.move.workers", append.clone()),
        (
            "stats",
            "$KV.logstore_leases.intake.LOGS.workers",
            "{\"id\":42}".into(),
        ),
        ("logs", "$JS.API.STREAM.DELETE.LOGS", append.clone()),
        ("query", "appended.42", "{\"id\":42}".into()),
        ("stats", "appended.42", "{\"id\":42}".into()),
    ];
    for (subject, reply, body) in attacks {
        client
            .publish_with_reply(subject, reply, body)
            .await
            .expect("publish sent");
    }
}

/// Done-when 1: every attack, as `client` against the shipped config, while a publisher
/// appends at a steady rate: the ring record, both leases and the stream never change, every
/// acknowledged append is stored with no stall, and no forged answer reaches `appended.*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_user_cannot_steer_the_fleet() {
    const APPENDS: usize = 300;
    let shipped = Shipped::start();
    let env = Env::shared(&["a"]).await;
    let worker = shipped.start_worker(&env).await;

    // What must not change, read as the worker user.
    let (observer, _) = shipped.connect("worker").await;
    let js = async_nats::jetstream::new(observer.clone());
    let ring = js
        .get_key_value("logstore_ring")
        .await
        .expect("ring bucket");
    let ring_before = ring
        .entry("workers")
        .await
        .expect("read the ring record")
        .expect("the worker seeded the ring record");
    let leases = js
        .get_key_value("logstore_leases")
        .await
        .expect("lease bucket");
    let lease_before = eventually(20, "the intake lease is held", || async {
        leases
            .get("intake.LOGS.workers")
            .await
            .expect("read the lease")
    })
    .await;
    let mut stream = js.get_stream("LOGS").await.expect("the stream");
    let stream_before = stream.info().await.expect("stream info").config.clone();

    let (client, _) = shipped.connect("client").await;
    // Whoever reads object 42's events outside the attacker's own account (an account is a
    // trust domain: README, "Trust boundaries").
    let (admin, _) = shipped.connect("admin").await;
    let mut forged = admin.subscribe("appended.42").await.expect("subscribe");
    within(10, "flush", admin.flush()).await.expect("flush");
    let mut events = client.subscribe("appended.>").await.expect("subscribe");
    within(10, "flush", client.flush()).await.expect("flush");

    // Watch the coordination state every 20 ms while the attacks run.
    let watching = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn({
        let (ring, leases, watching) = (ring.clone(), leases.clone(), watching.clone());
        let (ring_value, lease_value) = (ring_before.value.clone(), lease_before.clone());
        async move {
            let mut problems = Vec::new();
            while !watching.is_cancelled() {
                match ring.get("workers").await {
                    Ok(Some(value)) if value == ring_value => {}
                    other => problems.push(format!("ring record: {other:?}")),
                }
                match leases.get("intake.LOGS.workers").await {
                    Ok(Some(value)) if value == lease_value => {}
                    other => problems.push(format!("intake lease: {other:?}")),
                }
                match leases.get("move.workers").await {
                    Ok(None) => {}
                    other => problems.push(format!("mover lease: {other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            problems
        }
    });
    let attacker = tokio::spawn({
        let (client, watching) = (client.clone(), watching.clone());
        async move {
            while !watching.is_cancelled() {
                attack(&client).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    });

    // Stored appends of objects 1000-1009, each with the time its event arrived.
    let collector = tokio::spawn(async move {
        let mut arrivals = Vec::new();
        while arrivals.len() < APPENDS {
            let Some(event) = events.next().await else {
                break;
            };
            let reply: serde_json::Value =
                serde_json::from_slice(&event.payload).expect("event JSON");
            if (1000..1010).contains(&reply["id"].as_u64().unwrap_or(0)) {
                arrivals.push(Instant::now());
            }
        }
        arrivals
    });
    // A steady publisher, 50 appends/s, each acknowledged by the stream.
    let publisher = async_nats::jetstream::new(client.clone());
    let started = Instant::now();
    for n in 0..APPENDS {
        let key = format!("steady-{n}");
        let body = append_body(1000 + (n % 10) as u64, &format!("entry {n}"), Some(&key));
        within(10, "PubAck", async {
            publisher
                .publish("logs", body)
                .await
                .expect("publish")
                .await
                .expect("PubAck")
        })
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every acknowledged append is stored (one event each), and the intake never stalled
    // while the attacks ran.
    let arrivals = within(30, "every acknowledged append stored", collector)
        .await
        .expect("collector task");
    assert_eq!(arrivals.len(), APPENDS, "stored events");
    let longest = std::iter::once(started)
        .chain(arrivals)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|pair| pair[1].duration_since(pair[0]))
        .max()
        .unwrap_or_default();
    watching.cancel();
    attacker.await.expect("attacker task");
    let problems = within(10, "watcher ends", watcher)
        .await
        .expect("watcher task");
    assert!(
        problems.is_empty(),
        "coordination state changed: {problems:?}"
    );
    assert!(
        longest < Duration::from_millis(1500),
        "the intake stalled for {longest:?}"
    );
    let ring_after = ring.entry("workers").await.expect("read").expect("ring");
    assert_eq!(ring_after.revision, ring_before.revision);
    let stream_after = stream.info().await.expect("stream info").config.clone();
    assert_eq!(stream_after.subjects, stream_before.subjects);
    assert_eq!(stream_after.max_bytes, stream_before.max_bytes);
    assert_eq!(stream_after.max_messages, stream_before.max_messages);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), forged.next())
            .await
            .is_err(),
        "a forged answer reached appended.42"
    );
    let output = worker.stop().await;
    assert!(!output.contains(" ERROR "), "{output}");
}

/// Without accounts (one account for everybody, as on a bare nats-server), the worker itself
/// refuses a request whose reply subject is not an inbox: nothing is answered there, nothing
/// is stored or carried out, a dead letter says why and `logstore_replies_refused_total`
/// counts it; requests with inbox replies are answered as always.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_outside_the_inboxes_is_never_answered() {
    let env = Env::shared(&["a"]).await;
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    // Stand-ins for coordination state a worker may write: the ring record's subject, an
    // object's events.
    let victims = [
        "$KV.logstore_ring.workers".to_string(),
        env.subject("appended.42"),
    ];
    let mut heard = Vec::new();
    for victim in &victims {
        heard.push(client.subscribe(victim.clone()).await.expect("subscribe"));
    }
    let mut dead_letters = client
        .subscribe(env.subject("dead_letter"))
        .await
        .expect("subscribe");
    within(10, "flush", client.flush()).await.expect("flush");
    let requests: [(&str, bytes::Bytes); 4] = [
        ("stats", "{\"id\":42}".into()),
        ("query", "{\"id\":42}".into()),
        ("delete", "{\"id\":42,\"before_seq\":2}".into()),
        ("logs", append_body(42, "through a forged reply", None)),
    ];
    for (kind, body) in &requests {
        for victim in &victims {
            client
                .publish_with_reply(env.subject(kind), victim.clone(), body.clone())
                .await
                .expect("publish");
        }
    }
    // Each refusal leaves a dead letter naming the reply subject.
    for _ in 0..requests.len() * victims.len() {
        let letter = within(10, "a dead letter", dead_letters.next())
            .await
            .expect("dead letters");
        let reason = header(
            &letter.headers,
            logstore_protocol::DEAD_LETTER_REASON_HEADER,
        )
        .unwrap_or_default();
        assert!(
            reason.contains("is not an inbox (NATS_REPLY_PREFIXES)"),
            "{reason}"
        );
    }
    let mut heard = futures::stream::select_all(heard);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), heard.next())
            .await
            .is_err(),
        "the worker answered a reply subject that is not an inbox"
    );
    // Nothing was stored; an inbox reply is answered as always.
    let stats = request(&client, &env.subject("stats"), "{\"id\":42}".into()).await;
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).expect("stats JSON");
    assert_eq!(stats["count"], 0, "{stats}");
    let (_, metrics) = worker.get("/metrics").await;
    for (kind, expected) in [
        ("stats", 2.0),
        ("query", 2.0),
        ("delete", 2.0),
        ("append", 2.0),
    ] {
        assert_eq!(
            metric_sum(
                &metrics,
                "logstore_replies_refused_total",
                &[("kind", kind)]
            ),
            expected,
            "{kind}"
        );
    }
    worker.stop().await.expect("worker stops");
}

/// A full stream (JS_MAX_MSGS) refuses the next publish with an error, which the CLI prints
/// in one line; everything it held is stored once the workers pull again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_refuses_publishes_and_keeps_what_it_holds() {
    const LIMIT: u64 = 20;
    let mut env = Env::shared(&["a"]).await;
    env.intake = "jetstream";
    let limit = LIMIT.to_string();
    let settings = [("JS_MAX_MSGS", limit.as_str())];
    // The worker creates the stream with the limit, then stops: nobody pulls.
    let worker = WorkerCommand::new(&env).extra(&settings).start().await;
    assert_eq!(worker.terminate().await, Some(0));

    let client = env.client().await;
    let js = async_nats::jetstream::new(client.clone());
    for n in 0..LIMIT {
        let body = append_body(
            500 + n % 4,
            &format!("held {n}"),
            Some(&format!("held-{n}")),
        );
        within(10, "PubAck", async {
            js.publish(env.subject("logs"), body)
                .await
                .expect("publish")
                .await
                .expect("PubAck while the stream has room")
        })
        .await;
    }
    let refused = within(10, "PubAck or error", async {
        js.publish(env.subject("logs"), append_body(500, "one too many", None))
            .await
            .expect("publish")
            .await
    })
    .await;
    let error = refused.expect_err("a publish to a full stream is refused");
    assert!(error.to_string().contains("maximum messages"), "{error}");
    // The CLI says so in one line (exit 1: the service refused it).
    let mut cli_env: Vec<(&str, String)> = env
        .settings(0)
        .into_iter()
        .filter(|(var, _)| var.starts_with("NATS_"))
        .collect();
    cli_env.push(("LOGSTORE_TIMEOUT_MS", "5000".to_string()));
    let (code, out, err) = run_once(
        "logstore",
        &["append", "500", "cli one too many"],
        &cli_env,
        40,
    )
    .await;
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("stream refused the append") && err.contains("maximum messages"),
        "{err}"
    );

    // A worker pulls again: every acknowledged append stored, once, in order.
    let worker = WorkerCommand::new(&env).extra(&settings).start().await;
    for id in 500..504 {
        let expected: Vec<String> = (0..LIMIT)
            .filter(|n| 500 + n % 4 == id)
            .map(|n| format!("held {n}"))
            .collect();
        let stored = eventually(20, "the held appends stored", || {
            let (env, client, expected) = (env.clone(), client.clone(), expected.clone());
            async move {
                let logs: Vec<String> = entries(&env.query_all(&client, id).await)
                    .into_iter()
                    .map(|e| e.log)
                    .collect();
                (logs.len() >= expected.len()).then_some(logs)
            }
        })
        .await;
        assert_eq!(stored, expected, "object {id}");
    }
    assert_eq!(worker.terminate().await, Some(0));
}
