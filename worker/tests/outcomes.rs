//! Publishers learn every outcome (issue 21): each append a worker stores yields
//! `appended.<id>` with its key, and each one it refuses for good yields `rejected.<id>` with
//! the key, the reason and (JetStream) the stream sequence, on every intake; `logstore append`
//! on JetStream intake waits for that outcome and exits as it does on core intake; the shipped
//! NATS config lets the `client` user read its refusals.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use logstore_protocol::nats::NatsSecurityArgs;
use logstore_protocol::{AppendReply, ErrorCode, RejectedEvent};
use support::*;

/// The CLI's environment for `env`: its NATS URL and subjects, and a timeout.
fn cli_env(env: &Env, timeout_ms: u64) -> Vec<(&'static str, String)> {
    let mut vars: Vec<(&'static str, String)> = env
        .settings(0)
        .into_iter()
        .filter(|(var, _)| var.starts_with("NATS_"))
        .collect();
    vars.push(("LOGSTORE_TIMEOUT_MS", timeout_ms.to_string()));
    vars
}

/// The next message on `subscriber` within 10 s, decoded as `T`, with its subject.
async fn next_event<T: serde::de::DeserializeOwned>(
    subscriber: &mut async_nats::Subscriber,
    what: &str,
) -> (String, T) {
    let message = within(10, what, subscriber.next())
        .await
        .unwrap_or_else(|| panic!("{what}: the subscription ended"));
    let body = serde_json::from_slice(&message.payload)
        .unwrap_or_else(|e| panic!("{what}: {e}: {}", String::from_utf8_lossy(&message.payload)));
    (message.subject.to_string(), body)
}

/// Publish through JetStream; the stream sequence of its PubAck.
async fn js_publish(
    js: &jetstream::Context,
    subject: &str,
    headers: Option<async_nats::HeaderMap>,
    body: String,
) -> u64 {
    within(10, "PubAck", async {
        let ack = match headers {
            Some(headers) => {
                js.publish_with_headers(subject.to_string(), headers, body.into())
                    .await
            }
            None => js.publish(subject.to_string(), body.into()).await,
        };
        ack.expect("publish").await.expect("PubAck").sequence
    })
    .await
}

/// Test 1: on JetStream intake, a body missing `log`, a batch over MAX_BATCH_ENTRIES, an
/// oversize entry and a conflicting `expected_seq` each yield `rejected.<id>` with its code,
/// key and stream sequence (a batch: one per entry, each with its key; a keyless body with a
/// `Nats-Msg-Id`: that id as the key), and nothing is stored; a body that is not JSON has no
/// event (its dead letter is the only record); a stored append's `appended.<id>` carries its
/// key, and the request-reply answer on core intake does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_refusals_are_announced_with_key_and_stream_seq() {
    let mut env = Env::shared(&["a"]).await;
    env.intake = "jetstream";
    let worker = env
        .start_worker(&[("MAX_BATCH_ENTRIES", "3"), ("MAX_LOG_BYTES", "16")])
        .await;
    let client = env.client().await;
    let mut rejected = client
        .subscribe(format!("{}.>", env.subject("rejected")))
        .await
        .expect("subscribe rejected");
    let mut appended = client
        .subscribe(format!("{}.>", env.subject("appended")))
        .await
        .expect("subscribe appended");
    let mut dead = client
        .subscribe(env.subject("dead_letter"))
        .await
        .expect("subscribe dead_letter");
    within(10, "flush", client.flush()).await.expect("flush");
    let js = jetstream::new(client.clone());
    let logs = env.subject("logs");

    // Not JSON: no object to name. Its dead letter comes from the same worker connection
    // after any event it would have published, so none can be on its way once it is here.
    let seq = js_publish(&js, &logs, None, "not json {".to_string()).await;
    let letter = within(10, "the dead letter", dead.next())
        .await
        .expect("a dead letter");
    assert_eq!(
        header(&letter.headers, "Logstore-Stream-Sequence"),
        Some(seq.to_string())
    );
    within(10, "flush", client.flush()).await.expect("flush");
    assert!(
        futures::FutureExt::now_or_never(rejected.next()).is_none(),
        "a body that is not JSON has no rejected event"
    );

    // (id, key) -> (code, stream seq) of each refusal expected.
    let mut expected: HashMap<(u64, Option<String>), (ErrorCode, u64)> = HashMap::new();
    let seq = js_publish(&js, &logs, None, r#"{"id":101,"key":"k-no-log"}"#.into()).await;
    expected.insert(
        (101, Some("k-no-log".into())),
        (ErrorCode::InvalidRequest, seq),
    );
    let batch = serde_json::json!([
        { "id": 102, "log": "a", "key": "b-0" },
        { "id": 102, "log": "b", "key": "b-1" },
        { "id": 103, "log": "c", "key": "b-2" },
        { "id": 102, "log": "d", "key": "b-3" },
    ]);
    let seq = js_publish(&js, &logs, None, batch.to_string()).await;
    for (id, key) in [(102, "b-0"), (102, "b-1"), (103, "b-2"), (102, "b-3")] {
        expected.insert((id, Some(key.into())), (ErrorCode::TooLarge, seq));
    }
    let oversize = serde_json::json!({ "id": 104, "log": "x".repeat(17), "key": "k-big" });
    let seq = js_publish(&js, &logs, None, oversize.to_string()).await;
    expected.insert((104, Some("k-big".into())), (ErrorCode::TooLarge, seq));
    let conflict = r#"{"id":105,"log":"late","key":"k-conflict","expected_seq":1}"#;
    let seq = js_publish(&js, &logs, None, conflict.into()).await;
    expected.insert((105, Some("k-conflict".into())), (ErrorCode::Conflict, seq));
    let mut by_header = async_nats::HeaderMap::new();
    by_header.insert("Nats-Msg-Id", "hdr-107");
    let seq = js_publish(&js, &logs, Some(by_header), r#"{"id":107}"#.into()).await;
    expected.insert(
        (107, Some("hdr-107".into())),
        (ErrorCode::InvalidRequest, seq),
    );

    let mut conflict_event = None;
    while !expected.is_empty() {
        let (subject, event): (String, RejectedEvent) =
            next_event(&mut rejected, "a rejected event").await;
        assert_eq!(subject, format!("{}.{}", env.subject("rejected"), event.id));
        let Some((code, seq)) = expected.remove(&(event.id, event.key.clone())) else {
            panic!("an unexpected rejected event (or one twice): {event:?}");
        };
        assert_eq!(
            (event.error.code, event.stream_seq),
            (code, Some(seq)),
            "{event:?}"
        );
        if event.id == 105 {
            conflict_event = Some(event);
        }
    }
    let conflict_event = conflict_event.expect("the conflict's event");
    assert_eq!(conflict_event.error.last_seq, Some(0), "{conflict_event:?}");

    // A good append: its event carries its key.
    js_publish(
        &js,
        &logs,
        None,
        r#"{"id":106,"log":"fine","key":"k-good"}"#.into(),
    )
    .await;
    let (subject, reply): (String, AppendReply) =
        next_event(&mut appended, "the appended event").await;
    assert_eq!(subject, format!("{}.106", env.subject("appended")));
    assert_eq!(
        (reply.id, reply.seq, reply.key.as_deref()),
        (106, 1, Some("k-good"))
    );

    // Nothing refused was stored; the good append was, once.
    for id in [101, 102, 103, 104, 105, 107] {
        let chunks = env.query_all(&client, id).await;
        assert_eq!(chunks[0].total, 0, "object {id}: {chunks:?}");
    }
    assert_eq!(env.query_all(&client, 106).await[0].total, 1);
    let rows: usize = {
        let mut n = 0;
        for (_, url) in &env.shards {
            for id in 101..=107 {
                n += db_rows(url, id).await.len();
            }
        }
        n
    };
    assert_eq!(rows, 1);
    worker.stop().await.expect("worker stops cleanly");
}

/// On core intake too: a refused append (conflict, malformed, a batch refused whole) yields
/// `rejected.<id>` without a stream sequence, beside the error reply its sender gets as
/// before; a keyless batch refused whole is one event per object. The reply to a stored
/// append does not echo the key; its event does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_refusals_are_announced_too() {
    let env = Env::shared(&["a"]).await;
    let worker = env.start_worker(&[("MAX_BATCH_ENTRIES", "3")]).await;
    let client = env.client().await;
    let mut rejected = client
        .subscribe(format!("{}.>", env.subject("rejected")))
        .await
        .expect("subscribe rejected");
    let mut appended = client
        .subscribe(format!("{}.>", env.subject("appended")))
        .await
        .expect("subscribe appended");
    within(10, "flush", client.flush()).await.expect("flush");
    let logs = env.subject("logs");

    let answer = request(
        &client,
        &logs,
        r#"{"id":201,"log":"a","key":"c-1","expected_seq":3}"#.into(),
    )
    .await;
    let error = parse_reply(&answer.payload).expect_err("a conflict");
    assert_eq!(error.error.code, ErrorCode::Conflict);
    let (_, event): (String, RejectedEvent) = next_event(&mut rejected, "the conflict").await;
    assert_eq!(
        (
            event.id,
            event.key.as_deref(),
            event.error.code,
            event.stream_seq
        ),
        (201, Some("c-1"), ErrorCode::Conflict, None)
    );

    // Without a reply subject the event is the only word of it.
    client
        .publish(logs.clone(), r#"{"id":202,"log":7}"#.into())
        .await
        .expect("publish");
    let (subject, event): (String, RejectedEvent) =
        next_event(&mut rejected, "the malformed append").await;
    assert_eq!(subject, format!("{}.202", env.subject("rejected")));
    assert_eq!(
        (event.key, event.error.code, event.stream_seq),
        (None, ErrorCode::InvalidRequest, None)
    );

    let batch =
        r#"[{"id":203,"log":"a"},{"id":203,"log":"b"},{"id":204,"log":"c"},{"id":203,"log":"d"}]"#;
    client
        .publish(logs.clone(), batch.into())
        .await
        .expect("publish");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_, event): (String, RejectedEvent) =
            next_event(&mut rejected, "the batch's events").await;
        assert_eq!(event.error.code, ErrorCode::TooLarge, "{event:?}");
        ids.push(event.id);
    }
    ids.sort_unstable();
    assert_eq!(ids, [203, 204]);

    let stored = env.append(&client, 205, "fine", Some("c-5")).await;
    assert_eq!(
        (stored.seq, stored.key),
        (1, None),
        "the reply echoes no key"
    );
    let (_, event): (String, AppendReply) = next_event(&mut appended, "the event").await;
    assert_eq!((event.id, event.key.as_deref()), (205, Some("c-5")));
    // Nothing more: the keyless batch was one event per object.
    within(10, "flush", client.flush()).await.expect("flush");
    assert!(futures::FutureExt::now_or_never(rejected.next()).is_none());
    worker.stop().await.expect("worker stops cleanly");
}

/// Test 2: `logstore append` on JetStream intake waits for the outcome: a conflicting
/// `--expect-seq` exits 3 with one line, a good append prints `SEQ TS` and exits 0 (as on core
/// intake, which behaves as before), and with no worker to settle it the CLI says it was
/// queued but no outcome came, and exits 4; `--no-wait` prints the old "queued" line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reports_the_outcome_on_either_intake() {
    for intake in ["jetstream", "core"] {
        let mut env = Env::shared(&["a"]).await;
        env.intake = intake;
        let worker = env.start_worker(&[]).await;
        let vars = cli_env(&env, 5_000);
        let (code, out, err) = run_once(
            "logstore",
            &["append", "42", "x", "--expect-seq", "1"],
            &vars,
            30,
        )
        .await;
        assert_eq!(code, Some(3), "{intake}: {out}\n{err}");
        assert_eq!(out, "", "{intake}");
        assert_eq!(err.lines().count(), 1, "{intake}: {err}");
        assert!(
            err.contains("conflict") && err.contains("last seq 0"),
            "{intake}: {err}"
        );
        let (code, out, err) = run_once("logstore", &["append", "42", "x"], &vars, 30).await;
        assert_eq!(code, Some(0), "{intake}: {out}\n{err}");
        assert!(
            out.starts_with("1 ") && out.ends_with("Z\n"),
            "{intake}: {out}"
        );
        assert_eq!(out.lines().count(), 1, "{intake}: {out}");
        let (code, out, err) = run_once(
            "logstore",
            &["append", "42", "y", "--key", "k-42", "--json"],
            &vars,
            30,
        )
        .await;
        assert_eq!(code, Some(0), "{intake}: {out}\n{err}");
        let reply: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(
            (&reply["seq"], &reply["duplicate"], reply.get("key")),
            (&serde_json::json!(2), &serde_json::json!(false), None),
            "{intake}: {out}"
        );
        let (code, out, err) = run_once(
            "logstore",
            &["append", "42", "y", "--key", "k-42"],
            &vars,
            30,
        )
        .await;
        assert_eq!(code, Some(0), "{intake}: {out}\n{err}");
        assert!(
            out.starts_with("2 ") && out.ends_with("(duplicate: stored before)\n"),
            "{intake}: {out}"
        );
        // A refusal other than a conflict: exit 1, as core intake answers it.
        let long = "z".repeat(70_000);
        let (code, out, err) = run_once("logstore", &["append", "42", &long], &vars, 30).await;
        assert_eq!(code, Some(1), "{intake}: {out}\n{err}");
        assert!(err.contains("too_large"), "{intake}: {err}");
        worker.stop().await.expect("worker stops cleanly");

        if intake == "jetstream" {
            // The stream stays; no worker takes from it now.
            let vars = cli_env(&env, 1_000);
            let (code, out, err) =
                run_once("logstore", &["append", "42", "later"], &vars, 30).await;
            assert_eq!(code, Some(4), "{out}\n{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                err.contains("queued in stream")
                    && err.contains("no outcome arrived")
                    && err.contains("--key cli-"),
                "{err}"
            );
            let (code, out, err) = run_once(
                "logstore",
                &["append", "42", "later still", "--no-wait"],
                &vars,
                30,
            )
            .await;
            assert_eq!(code, Some(0), "{out}\n{err}");
            assert!(out.starts_with("queued in stream"), "{out}");
            // Both are stored once a worker is back.
            let worker = env.start_worker(&[]).await;
            let client = env.client().await;
            eventually(20, "the queued appends stored", || {
                let (env, client) = (env.clone(), client.clone());
                async move {
                    let logs: Vec<String> = entries(&env.query_all(&client, 42).await)
                        .into_iter()
                        .map(|e| e.log)
                        .collect();
                    (logs.len() >= 4).then_some(logs)
                }
            })
            .await;
            worker.stop().await.expect("worker stops cleanly");
        }
    }
}

/// Test 3: with the shipped NATS config (deploy/nats/run-nats.sh), the `client` user reads
/// the `rejected.<id>` event of its own refused append, and its CLI reports a conflict on
/// JetStream intake (exit 3) instead of "queued".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_user_hears_its_refusals_with_the_shipped_config() {
    let shipped = Shipped::start();
    let env = Env::shared(&["a"]).await;
    let worker_vars = shipped.worker_settings();
    let worker = WorkerCommand::new(&env)
        .extra(&worker_vars)
        .log("warn")
        .capture()
        .spawn();
    worker.wait_ready().await;

    let access = NatsSecurityArgs {
        nats_user: Some("client".to_string()),
        nats_password_file: Some(shipped.password_file("client")),
        ..Default::default()
    }
    .resolve(&shipped.nats.url())
    .expect("client settings");
    let client = within(
        10,
        "connect as client",
        access.connect(|options| options.request_timeout(Some(Duration::from_secs(5)))),
    )
    .await
    .expect("connect as client");
    let mut rejected = client.subscribe("rejected.778").await.expect("subscribe");
    within(10, "flush", client.flush()).await.expect("flush");
    // The stream answers the publish (the client's `logs` reaches it through the import).
    let ack = request(&client, "logs", r#"{"id":778,"key":"mine"}"#.into()).await;
    let ack: serde_json::Value = serde_json::from_slice(&ack.payload).expect("a PubAck");
    assert_eq!(ack["stream"], "LOGS", "{ack}");
    let (subject, event): (String, RejectedEvent) =
        next_event(&mut rejected, "the client's rejected event").await;
    assert_eq!(subject, "rejected.778");
    assert_eq!(
        (event.key.as_deref(), event.error.code, event.stream_seq),
        (Some("mine"), ErrorCode::InvalidRequest, ack["seq"].as_u64()),
        "{event:?}"
    );

    let mut cli = shipped.login("client");
    cli.push(("LOGSTORE_TIMEOUT_MS", "5000".to_string()));
    let (code, out, err) = run_once(
        "logstore",
        &["append", "778", "x", "--expect-seq", "4"],
        &cli,
        30,
    )
    .await;
    assert_eq!(code, Some(3), "{out}\n{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("conflict"), "{err}");
    let (code, out, err) = run_once("logstore", &["append", "778", "x"], &cli, 30).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.starts_with("1 "), "{out}");
    let output = worker.stop().await;
    assert!(!output.contains(" ERROR "), "{output}");
}

/// loadgen `--verify` counts the run's appends the workers refused (their `rejected.<id>`
/// events), by code: here every one, each over the workers' MAX_LOG_BYTES.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_counts_the_refusals_it_caused() {
    let mut env = Env::shared(&["a"]).await;
    env.intake = "jetstream";
    let worker = env.start_worker(&[("MAX_LOG_BYTES", "40")]).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let report_path = dir.path().join("report.json");
    let rejected_prefix = env.subject("rejected");
    let flags = [
        "--jetstream",
        "--rejected-prefix",
        rejected_prefix.as_str(),
        "--count",
        "20",
        "--rate",
        "200",
        "--objects",
        "3",
        "--log-size",
        "64",
        "--verify",
        "--verify-timeout",
        "3",
    ];
    let child = spawn_loadgen(&env, &flags, &report_path);
    let (code, report) = finish_loadgen(child, &report_path).await;
    assert_eq!(code, 1, "nothing acknowledged was stored: verify fails");
    assert_eq!(report_num(&report, &["appends", "ok"]), 20.0, "{report}");
    assert_eq!(
        report_num(&report, &["rejected", "appends"]),
        20.0,
        "{}",
        report["rejected"]
    );
    assert_eq!(
        report_num(&report, &["rejected", "by_code", "too_large"]),
        20.0
    );
    worker.stop().await.expect("worker stops cleanly");
}
