//! The `logstore` command-line client against real workers (issue 12, done-when 6 and 7): the
//! README's examples run as written, and `tail -f` prints every entry exactly once, in seq
//! order, while publishers append and workers restart. Usage mistakes are explained (a missing
//! argument, a NATS_URL without a scheme). `logstore append` reading stdin: `cli_append.rs`.

mod support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use logstore_protocol::LogEntry;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Done-when 7: the README's CLI examples, run as written by bash (`set -e`: every line must
/// succeed, the conflict example catches its own exit code), print what their comments say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_examples_run_as_written() {
    let env = Env::shared(&["a", "b"]).await;
    let worker = env.start_worker(&[]).await;
    let script = readme_block("<!-- cli-examples: executed by worker/tests/cli.rs -->");
    let (code, stdout, stderr) = logstore_bash(&env, &[], &format!("set -e\n{script}"), 60).await;
    println!("{script}\n--- stdout:\n{stdout}--- stderr:\n{stderr}");
    assert_eq!(code, Some(0), "the examples failed: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    for (i, expected) in [
        (0, "1 "),
        (1, "1 "),
        (2, "2 "),
        (3, "exit code 3"),
        (4, "1 "),
        (5, "2 "),
    ] {
        assert!(
            lines[i].starts_with(expected),
            "line {i} {:?} should start with {expected:?}",
            lines[i]
        );
    }
    assert!(lines[1].ends_with("(duplicate: stored before)"), "{stdout}");
    assert!(lines[4].ends_with(" disk full") && lines[5].ends_with(" cleaned up"));
    let last: LogEntry = serde_json::from_str(lines[6]).expect("--json prints an entry");
    assert_eq!((last.seq, last.log.as_str()), (2, "cleaned up"));
    assert!(
        stderr.contains("conflict") && stderr.contains("last seq 2"),
        "{stderr}"
    );
    assert!(stdout.contains("count     2\n") && stdout.contains("bytes     19\n"));
    assert!(stdout.contains("deleted 1\n"), "{stdout}");
    assert!(
        lines.last().is_some_and(|l| l.starts_with("3 ")),
        "seqs are never reused: {stdout}"
    );

    // Exit codes: bad usage is 2, unreachable workers 4.
    let logstore = |args: &[&str], env_vars: Vec<(&'static str, String)>| {
        let mut command = tokio::process::Command::new(bin_path("logstore"));
        command
            .args(args)
            .envs(env_vars)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        async move {
            within(30, "logstore", command.status())
                .await
                .expect("run logstore")
                .code()
        }
    };
    assert_eq!(
        logstore(&["get", "42", "--since", "yesterday"], logstore_env(&env)).await,
        Some(2)
    );
    let mut nobody = logstore_env(&env);
    nobody.push(("NATS_QUERY_TOPIC", format!("{}.nobody", env.prefix)));
    nobody.push(("LOGSTORE_TIMEOUT_MS", "1000".into()));
    assert_eq!(logstore(&["get", "42"], nobody).await, Some(4));
    worker.stop().await.unwrap();
}

/// One append through request-reply with a short timeout, retried with the same key until it
/// is answered (a worker restarting answers nothing, or `unavailable`).
async fn append_until_stored(env: &Env, client: &async_nats::Client, id: u64, key: &str) {
    let body = append_body(id, key, Some(key));
    for _ in 0..200 {
        let answer = tokio::time::timeout(
            Duration::from_secs(3),
            client.request(env.subject("logs"), body.clone()),
        )
        .await;
        if let Ok(Ok(message)) = answer {
            if parse_reply(&message.payload).is_ok() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("append {key} never stored");
}

/// Done-when 6: `logstore tail ID -f` while 4 publishers append 5,000 entries to ID and both
/// workers restart (one killed, one stopped) prints each entry exactly once, in seq order,
/// exactly as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_every_entry_once_across_worker_restarts() {
    const PUBLISHERS: u64 = 4;
    const TOTAL: u64 = 5_000;
    let env = Env::shared(&["a", "b"]).await;
    let mut workers = vec![
        WorkerCommand::new(&env).start().await,
        WorkerCommand::new(&env).start().await,
    ];
    let id = 4_242u64;

    let mut tail = tokio::process::Command::new(bin_path("logstore"))
        .args(["tail", &id.to_string(), "-f", "--json"])
        .envs(logstore_env(&env))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start logstore tail -f");
    let mut lines = BufReader::new(tail.stdout.take().expect("tail's stdout")).lines();
    // The tail is subscribed once it has read the (empty) log; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let (env, progress) = (env.clone(), progress.clone());
        publishers.push(tokio::spawn(async move {
            let client = env.client().await;
            for i in 0..TOTAL / PUBLISHERS {
                append_until_stored(&env, &client, id, &format!("p{p}-{i}")).await;
                progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    // Restart both workers while the publishers run: one killed, one stopped gracefully.
    for (n, at) in [(0usize, TOTAL / 4), (1, TOTAL / 2)] {
        let progress = progress.clone();
        eventually(120, "publishing progresses", || {
            let progress = progress.clone();
            async move { (progress.load(std::sync::atomic::Ordering::Relaxed) >= at).then_some(()) }
        })
        .await;
        let old = workers.remove(n);
        if n == 0 {
            old.kill().await;
        } else {
            assert_eq!(old.terminate().await, Some(0));
        }
        workers.insert(n, WorkerCommand::new(&env).start().await);
    }
    for publisher in publishers {
        within(300, "publishers", publisher).await.unwrap();
    }

    let mut printed: Vec<LogEntry> = Vec::new();
    let all_printed = tokio::time::timeout(Duration::from_secs(120), async {
        while (printed.len() as u64) < TOTAL {
            let line = lines
                .next_line()
                .await
                .expect("read tail's output")
                .expect("tail exited early");
            let entry: LogEntry = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("tail printed {line:?}: {e}"));
            printed.push(entry);
        }
    })
    .await;
    if all_printed.is_err() {
        // Say what is missing: not printed, or not stored?
        let client = env.client().await;
        let stored = entries(&env.query_all(&client, id).await);
        let seqs: Vec<u64> = printed.iter().map(|e| e.seq).collect();
        let gaps: Vec<u64> = seqs
            .windows(2)
            .filter(|w| w[1] != w[0] + 1)
            .map(|w| w[0])
            .collect();
        panic!(
            "tail printed {} of {TOTAL} entries within 120 s (last seq {:?}, jumps after seqs {:?}); \
             the log holds {} (last seq {:?})",
            printed.len(),
            seqs.last(),
            &gaps[..gaps.len().min(10)],
            stored.len(),
            stored.last().map(|e| e.seq)
        );
    }
    // Nothing more comes: no entry is printed twice, even late.
    let extra = tokio::time::timeout(Duration::from_millis(1_500), lines.next_line()).await;
    assert!(
        extra.is_err(),
        "tail printed more than was stored: {extra:?}"
    );

    let seqs: Vec<u64> = printed.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=TOTAL).collect::<Vec<_>>(),
        "each entry once, in seq order"
    );
    // Exactly what is stored (the object lives on one of the two shards).
    let mut stored = BTreeMap::new();
    for (_, url) in &env.shards {
        for (seq, ts, log, _) in db_rows(url, id).await {
            stored.insert(
                seq as u64,
                (humantime::format_rfc3339_micros(ts).to_string(), log),
            );
        }
    }
    assert_eq!(stored.len() as u64, TOTAL, "every key stored once");
    for entry in &printed {
        assert_eq!(
            stored.get(&entry.seq),
            Some(&(entry.ts.clone(), entry.log.clone())),
            "seq {}",
            entry.seq
        );
    }
    tail.kill().await.expect("stop tail");
    for worker in workers {
        assert_eq!(worker.terminate().await, Some(0));
    }
}

/// The usage line of a missing argument shows what the command takes (not `--nats-url` because
/// NATS_URL is set); every positional is described; a NATS_URL without a scheme is refused
/// with the fix.
#[tokio::test]
async fn usage_and_nats_url_mistakes_are_explained() {
    let url = [("NATS_URL", "nats://127.0.0.1:1".to_string())];
    let (code, _, stderr) = run_once("logstore", &["append"], &url, 30).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("Usage: logstore append [OPTIONS] <ID> [TEXT]\n"),
        "{stderr}"
    );
    assert!(!stderr.contains("--nats-url"), "{stderr}");
    let (code, help, _) = run_once("logstore", &["append", "--help"], &url, 30).await;
    assert_eq!(code, Some(0));
    assert!(
        help.contains("  <ID>    The object") && help.contains("  [TEXT]  The entry's text"),
        "{help}"
    );

    let no_scheme = [("NATS_URL", "127.0.0.1:4222".to_string())];
    let (code, _, stderr) = run_once("logstore", &["stats", "1"], &no_scheme, 30).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr,
        "logstore: NATS_URL: server 1 of \"127.0.0.1:4222\" has no scheme: write \
         nats://127.0.0.1:4222 (or tls://, ws://, wss://)\n"
    );
}
