//! `logstore dead-letters`, the real binary: the workers keep what they refuse in the
//! dead-letter stream (DEAD_LETTERS_STREAM), the CLI lists it with why, and `-f` shows a new
//! refusal within a second.
//!
//! - A core fleet without accounts: a refused append is listed (text and JSON), `-f` shows
//!   the next one within a second, and a listing without the stream says nothing was kept.
//! - The shipped NATS config: the worker keeps them with its own permissions, `admin` lists
//!   and follows them, `client` is refused.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// `logstore ARGS` with `vars` only: exit code, stdout, stderr.
async fn logstore(args: &[&str], vars: &[(&str, String)]) -> (Option<i32>, String, String) {
    run_once("logstore", args, vars, 30).await
}

/// Starts `logstore dead-letters -f -n 0` with `vars`, waits until it says it follows, then
/// runs `refuse`, which makes a worker refuse a message whose body holds `marker`: within one
/// second of `refuse` starting, the CLI prints it (its header line, then its body). Returns
/// the header line.
async fn follow_shows_within_a_second(
    vars: &[(&str, String)],
    marker: &str,
    refuse: impl std::future::Future<Output = ()>,
) -> String {
    let mut child = tokio::process::Command::new(bin_path("logstore"))
        .args(["dead-letters", "-f", "-n", "0"])
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start logstore dead-letters -f");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    within(20, "`logstore dead-letters -f` says it follows", async {
        while let Some(line) = stderr.next_line().await.expect("read stderr") {
            if line.contains("following the dead letters") {
                return;
            }
            println!("dead-letters -f: {line}");
        }
        panic!("`logstore dead-letters -f` ended before following");
    })
    .await;
    let sent = Instant::now();
    let seen = async {
        refuse.await;
        let mut header = String::new();
        while let Some(line) = stdout.next_line().await.expect("read stdout") {
            if line.contains(marker) {
                return header;
            }
            header = line;
        }
        panic!("`logstore dead-letters -f` ended");
    };
    let header = match tokio::time::timeout(Duration::from_secs(1), seen).await {
        Ok(header) => header,
        Err(_) => panic!("`logstore dead-letters -f` did not show the refused message within 1 s"),
    };
    println!("shown {:?} after the refusal began", sent.elapsed());
    child.kill().await.expect("stop the follower");
    header
}

/// The dead-letter stream of a core fleet (no accounts): a refused append is listed with
/// why (text and JSON), `-f` shows the next one within a second (and not the old one), and
/// without the stream the listing says nothing was kept (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_lists_what_was_refused_and_follows_within_a_second() {
    let env = Env::shared(&["a"]).await;
    let worker = env.start_worker(&[]).await;
    let client = env.client().await;
    let vars = env.settings(free_port());
    let js = jetstream::new(client.clone());
    let stream = env.dead_letters_stream();
    eventually(30, "the worker keeps a dead-letter stream", || async {
        js.get_stream(&stream).await.ok().map(|_| ())
    })
    .await;
    let logs = env.subject("logs");
    let reply = request(&client, &logs, "not json: first refusal".into()).await;
    assert!(parse_reply(&reply.payload).is_err(), "refused");
    eventually(20, "the dead letter is kept", || async {
        let mut kept = js.get_stream(&stream).await.ok()?;
        (kept.info().await.ok()?.state.messages == 1).then_some(())
    })
    .await;

    let (code, out, err) = logstore(&["dead-letters"], &vars).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("1 "), "{out}");
    assert!(
        lines[0].contains(&format!(" invalid_request {logs}: ")),
        "{out}"
    );
    assert_eq!(lines[1], "    not json: first refusal", "{out}");
    let (code, out, err) = logstore(&["dead-letters", "--json"], &vars).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let letter: Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(letter["seq"], 1);
    assert_eq!(letter["code"], "invalid_request");
    assert_eq!(letter["subject"], logs.as_str());
    assert_eq!(letter["body"], "not json: first refusal");
    assert!(
        letter["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{letter}"
    );
    assert_eq!(letter["headers"]["Logstore-Error-Code"], "invalid_request");
    assert!(letter["truncated"].is_null());

    let header = follow_shows_within_a_second(&vars, "second refusal", async {
        let reply = request(&client, &logs, "not json: second refusal".into()).await;
        assert!(parse_reply(&reply.payload).is_err(), "refused");
    })
    .await;
    assert!(
        header.starts_with("2 ") && header.contains("invalid_request"),
        "{header}"
    );

    let mut elsewhere = vars.clone();
    elsewhere.push(("DEAD_LETTERS_STREAM", format!("{stream}_none")));
    let (code, out, err) = logstore(&["dead-letters"], &elsewhere).await;
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("keeps dead letters"), "{err}");
    worker.stop().await.expect("clean stop");
}

/// The shipped NATS config (deploy/nats/run-nats.sh): the worker keeps the dead letters in
/// DEAD_LETTERS with its own permissions (nothing refused, nothing logged about it); `admin`
/// lists and follows them (`-f` within a second; with JetStream intake the worker refuses a
/// message once its puller routes the batch it came in); `client` is refused (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_config_shows_the_dead_letters_to_the_operator_only() {
    let shipped = Shipped::start();
    let env = Env::shared(&["a"]).await;
    let worker = shipped.start_worker(&env).await;
    let client_vars = shipped.login("client");
    let admin_vars = shipped.login("admin");

    let (publisher, _) = shipped.connect("client").await;
    let refuse = |text: &'static str| {
        let publisher = publisher.clone();
        async move {
            // On JetStream intake the stream takes it; the worker refuses it.
            let ack = publisher
                .request("logs", text.into())
                .await
                .expect("PubAck");
            assert!(String::from_utf8_lossy(&ack.payload).contains("\"seq\""));
        }
    };
    refuse("not json: shipped refusal").await;
    let listed = eventually(30, "`logstore dead-letters` as admin lists it", || async {
        let (code, out, err) = logstore(&["dead-letters", "--json"], &admin_vars).await;
        assert_eq!(code, Some(0), "{out}\n{err}");
        out.contains("shipped refusal").then_some(out)
    })
    .await;
    let letter: Value = serde_json::from_str(listed.trim()).expect("one JSON line");
    assert_eq!(letter["subject"], "logs", "{letter}");
    assert_eq!(letter["code"], "invalid_request", "{letter}");
    let header = follow_shows_within_a_second(
        &admin_vars,
        "shipped follow",
        refuse("not json: shipped follow"),
    )
    .await;
    assert!(header.contains("invalid_request logs: "), "{header}");

    let (code, out, err) = logstore(&["dead-letters"], &client_vars).await;
    assert_eq!(code, Some(2), "refused to the client:\n{out}\n{err}");
    let output = worker.stop().await;
    assert!(!output.contains(" ERROR "), "{output}");
    assert!(!output.contains("cannot keep dead letters"), "{output}");
}
