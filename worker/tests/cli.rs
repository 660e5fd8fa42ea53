//! The `logstore` command-line client against real workers (issue 12, done-when 6 and 7): the
//! README's examples run as written, and `tail -f` prints every entry exactly once, in seq
//! order, while publishers append and workers restart. `logstore append` reading stdin (issue
//! "append from stdin"): `seq 1 100000 | logstore append 42 --batch 100` stores every line once
//! and in order on core and JetStream intake, a second run of the same input with the same
//! keys stores nothing twice, a partial batch goes out when stdin pauses, and a bad line or a
//! refusal names its line and exits as a single append would.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use logstore_protocol::LogEntry;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The environment that points `logstore` at this test's NATS and subjects.
fn cli_env(env: &Env) -> Vec<(&'static str, String)> {
    env.settings(0)
        .into_iter()
        .filter(|(var, _)| var.starts_with("NATS_"))
        .collect()
}

/// `script` run by bash with `logstore` on its PATH and pointed at `env`, within `secs`: exit
/// code, stdout, stderr.
async fn bash(env: &Env, script: &str, secs: u64) -> (Option<i32>, String, String) {
    let bin_dir = bin_path("logstore")
        .parent()
        .expect("target directory")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = within(
        secs,
        script,
        tokio::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .envs(cli_env(env))
            .env("PATH", path)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run bash");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The shell block of the README marked as the CLI examples.
fn readme_examples() -> String {
    let readme = include_str!("../../README.md");
    let marker = "<!-- cli-examples: executed by worker/tests/cli.rs -->";
    let after = readme
        .split_once(marker)
        .map(|(_, rest)| rest)
        .expect("README has the CLI examples marker");
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(block, _)| block)
        .expect("a ```sh block follows the marker");
    block.to_string()
}

/// Done-when 7: the README's CLI examples, run as written by bash (`set -e`: every line must
/// succeed, the conflict example catches its own exit code), print what their comments say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_examples_run_as_written() {
    let env = Env::shared(&["a", "b"]).await;
    let worker = env.start_worker(&[]).await;
    let script = readme_examples();
    let (code, stdout, stderr) = bash(&env, &format!("set -e\n{script}"), 60).await;
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
        logstore(&["get", "42", "--since", "yesterday"], cli_env(&env)).await,
        Some(2)
    );
    let mut nobody = cli_env(&env);
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
        .envs(cli_env(&env))
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

/// JS_MAX_BYTES of the streams these tests create: nats-server reserves a stream's max_bytes
/// out of its JetStream storage (a share of the free disk), so the default 1 GiB per stream
/// would let a few tests sharing a server exhaust it on a small disk.
const SMALL_STREAM: (&str, &str) = ("JS_MAX_BYTES", "67108864");

/// Object `id`'s entries as stored, on whichever shard holds it: (seq, log, key) in seq order.
async fn stored(env: &Env, id: u64) -> Vec<(i64, String, Option<String>)> {
    let mut rows = Vec::new();
    for (_, url) in &env.shards {
        rows.extend(
            db_rows(url, id)
                .await
                .into_iter()
                .map(|(seq, _, log, key)| (seq, log, key)),
        );
    }
    rows.sort();
    rows
}

/// `SEQ TS` lines as `logstore append` prints them: the seqs, checking each TS is one.
fn printed_seqs(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .map(|line| {
            let (seq, ts) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("not `SEQ TS`: {line:?}"));
            assert!(
                ts.len() >= 27 && ts.ends_with('Z') && !ts.contains(' '),
                "{line:?}"
            );
            seq.parse()
                .unwrap_or_else(|e| panic!("not `SEQ TS`: {line:?}: {e}"))
        })
        .collect()
}

/// Done-when: `seq 1 100000 | logstore append 42 --batch 100` prints one `SEQ TS` line per
/// line and stores 100,000 entries, seqs 1..=100000 without gaps, texts "1".."100000" in
/// order, each under its own key, on `intake`.
async fn seq_is_stored_once_in_order(intake: &'static str) {
    const LINES: usize = 100_000;
    let mut env = Env::shared(&["a", "b"]).await;
    env.intake = intake;
    let worker = env.start_worker(&[SMALL_STREAM]).await;
    let started = Instant::now();
    let script = format!("seq 1 {LINES} | logstore append 42 --batch 100");
    let (code, stdout, stderr) = bash(&env, &script, 600).await;
    println!("{intake}: {LINES} lines in {:?}", started.elapsed());
    assert_eq!(code, Some(0), "{intake}: {stderr}");
    let expected: Vec<u64> = (1..=LINES as u64).collect();
    assert!(
        printed_seqs(&stdout) == expected,
        "{intake}: one line per entry, in order"
    );

    let rows = stored(&env, 42).await;
    assert_eq!(rows.len(), LINES, "{intake}: every line stored once");
    for (i, (seq, log, _)) in rows.iter().enumerate() {
        assert_eq!((*seq, log.as_str()), (i as i64 + 1, &*(i + 1).to_string()));
    }
    let keys: HashSet<&str> = rows.iter().filter_map(|r| r.2.as_deref()).collect();
    assert_eq!(keys.len(), LINES, "{intake}: every entry under its own key");
    for (_, url) in &env.shards {
        check_shard_invariants(url).await;
    }
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_lines_are_stored_once_in_order_on_core_intake() {
    seq_is_stored_once_in_order("core").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_lines_are_stored_once_in_order_on_jetstream_intake() {
    seq_is_stored_once_in_order("jetstream").await;
}

/// A second run of the same input with the same `--key` (after a failure, say) stores no line
/// twice: the lines stored before answer as duplicates with their seqs, the rest follow. On a
/// partitioned stream, every batch goes on the object's lane `<logs>.<id>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_input_with_the_same_key_doubles_nothing() {
    let env = partitioned_env(&["a"]).await;
    let worker = env
        .start_worker(&[("JS_PARTITIONS", "8"), SMALL_STREAM])
        .await;
    let client = env.client().await;
    let mut published = client
        .subscribe(format!("{}.>", env.subject("logs")))
        .await
        .unwrap();
    let mut shared_lane = client.subscribe(env.subject("logs")).await.unwrap();
    client.flush().await.unwrap();

    let (code, first, stderr) = bash(
        &env,
        "seq 1 600 | logstore append 43 --batch 100 --key import-7",
        120,
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(printed_seqs(&first), (1..=600).collect::<Vec<u64>>());
    assert!(!first.contains("duplicate"), "{first}");

    let (code, second, stderr) = bash(
        &env,
        "seq 1 1000 | logstore append 43 --batch 100 --key import-7",
        120,
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = second.lines().collect();
    assert_eq!(
        printed_seqs(&second.replace(" (duplicate: stored before)", "")),
        (1..=1000).collect::<Vec<u64>>()
    );
    for (i, line) in lines.iter().enumerate() {
        if i < 600 {
            // The original seq and ts.
            assert_eq!(
                *line,
                format!(
                    "{} (duplicate: stored before)",
                    first.lines().nth(i).unwrap()
                )
            );
        } else {
            assert!(!line.contains("duplicate"), "{line}");
        }
    }
    let rows = stored(&env, 43).await;
    assert_eq!(rows.len(), 1000, "nothing stored twice");
    for (i, (seq, log, key)) in rows.iter().enumerate() {
        let n = i + 1;
        assert_eq!(
            (*seq, log.as_str(), key.as_deref()),
            (n as i64, &*n.to_string(), Some(&*format!("import-7-{n}")))
        );
    }
    // Every batch on the object's lane (the 1,600 entries of both runs), none on the shared one.
    let lane = format!("{}.43", env.subject("logs"));
    let mut entries = 0;
    while entries < 1600 {
        let message = within(10, "the batches on the lane", published.next())
            .await
            .unwrap();
        assert_eq!(message.subject.as_str(), lane);
        let batch: Vec<serde_json::Value> =
            serde_json::from_slice(&message.payload).expect("a batch is a JSON array");
        entries += batch.len();
    }
    assert_eq!(entries, 1600);
    let quiet = Duration::from_millis(200);
    assert!(tokio::time::timeout(quiet, published.next()).await.is_err());
    assert!(tokio::time::timeout(quiet, shared_lane.next())
        .await
        .is_err());
    worker.stop().await.unwrap();
}

/// A bad `--jsonl` line stops the run with exit 2 naming it, and nothing of its batch is sent
/// (the batches before it are stored); an entry refused for good names its line and exits as
/// a single append would (3 conflict, 1 too large), on either intake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_and_refusals_name_their_line() {
    for intake in ["core", "jetstream"] {
        let mut env = Env::shared(&["a"]).await;
        env.intake = intake;
        let worker = env
            .start_worker(&[("MAX_LOG_BYTES", "16"), SMALL_STREAM])
            .await;

        let input = r#"{"log":"a"}\n{"log":"b","key":"k-b"}\n{"log":"c"}\nnot json\n{"log":"e"}\n"#;
        let script = format!("printf '{input}' | logstore append 44 --jsonl --batch 2");
        let (code, stdout, stderr) = bash(&env, &script, 60).await;
        assert_eq!(code, Some(2), "{intake}: {stderr}");
        assert_eq!(
            printed_seqs(&stdout),
            [1, 2],
            "{intake}: the first batch only"
        );
        assert!(
            stderr.starts_with("logstore: line 4 of stdin: is not an entry"),
            "{intake}: {stderr}"
        );
        let logs: Vec<String> = stored(&env, 44).await.into_iter().map(|r| r.1).collect();
        assert_eq!(
            logs,
            ["a", "b"],
            "{intake}: nothing of line 4's batch is sent"
        );

        // Line 1 is stored as seq 3; line 2 expects 2 too, after line 1 stored 3: a conflict.
        let input = r#"{"log":"d","expected_seq":2}\n{"log":"e","expected_seq":2}\n"#;
        let script = format!("printf '{input}' | logstore append 44 --jsonl");
        let (code, stdout, stderr) = bash(&env, &script, 60).await;
        assert_eq!(code, Some(3), "{intake}: {stderr}");
        assert_eq!(printed_seqs(&stdout), [3], "{intake}");
        assert!(
            stderr.starts_with("logstore: line 2 of stdin: conflict: ")
                && stderr.contains("last seq 3"),
            "{intake}: {stderr}"
        );

        // MAX_LOG_BYTES is 16: the worker refuses the batch for its second entry, line 3.
        let script = "printf 'ok\\n\\nmuch longer than sixteen bytes\\nok\\n' | logstore append 45";
        let (code, stdout, stderr) = bash(&env, script, 60).await;
        assert_eq!(code, Some(1), "{intake}: {stderr}");
        assert_eq!(stdout, "", "{intake}");
        assert!(
            stderr.starts_with("logstore: line 3 of stdin: too_large: entry 1: "),
            "{intake}: {stderr}"
        );
        assert!(stored(&env, 45).await.is_empty(), "{intake}");
        worker.stop().await.unwrap();
    }
}

/// `tail -f app.log | logstore append ID`: each line is stored and printed while stdin stays
/// open, without waiting for a full batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_in_stdin_sends_what_there_is() {
    let mut env = Env::shared(&["a"]).await;
    env.intake = "jetstream";
    let worker = env.start_worker(&[SMALL_STREAM]).await;
    let mut append = tokio::process::Command::new(bin_path("logstore"))
        .args(["append", "46"])
        .envs(cli_env(&env))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start logstore append");
    let mut stdin = append.stdin.take().expect("its stdin");
    let mut lines = BufReader::new(append.stdout.take().expect("its stdout")).lines();
    for (seq, text) in [(1, "first"), (2, "second")] {
        use tokio::io::AsyncWriteExt;
        stdin
            .write_all(format!("{text}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
        let line = within(
            20,
            "the line is stored while stdin stays open",
            lines.next_line(),
        )
        .await
        .unwrap()
        .expect("logstore append printed it");
        assert_eq!(printed_seqs(&line), [seq], "{line}");
    }
    drop(stdin);
    let output = within(
        20,
        "logstore append ends with stdin",
        append.wait_with_output(),
    )
    .await
    .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let logs: Vec<String> = stored(&env, 46).await.into_iter().map(|r| r.1).collect();
    assert_eq!(logs, ["first", "second"]);
    worker.stop().await.unwrap();
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

/// On JetStream intake with no worker running, the batches are queued but their outcome does
/// not come in time: `logstore append` sends them again (same keys) while it waits, and once a
/// worker runs, every line is stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_without_an_outcome_are_sent_again_and_stored_once() {
    let mut env = Env::shared(&["a"]).await;
    env.intake = "jetstream";
    // A worker creates the stream; then none runs.
    env.start_worker(&[SMALL_STREAM])
        .await
        .stop()
        .await
        .unwrap();
    let client = env.client().await;
    let mut published = client.subscribe(env.subject("logs")).await.unwrap();
    client.flush().await.unwrap();
    let mut vars = cli_env(&env);
    // Sent again after 4 s, given up after 5 sends (20 s): time enough to start a worker.
    vars.push(("LOGSTORE_TIMEOUT_MS", "4000".into()));
    let append = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "seq 1 300 | {} append 47",
            bin_path("logstore").display()
        ))
        .envs(vars)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start logstore append");
    // The three batches of 100, then the first sent again: its outcome did not come in time.
    let mut sends = 0;
    while sends < 4 {
        within(20, "batches sent", published.next()).await.unwrap();
        sends += 1;
    }
    let worker = env.start_worker(&[SMALL_STREAM]).await;
    let output = within(60, "logstore append ends", append.wait_with_output())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        printed_seqs(&stdout.replace(" (duplicate: stored before)", "")),
        (1..=300).collect::<Vec<u64>>()
    );
    let rows = stored(&env, 47).await;
    let logs: Vec<String> = rows.into_iter().map(|r| r.1).collect();
    let expected: Vec<String> = (1..=300).map(|n: u32| n.to_string()).collect();
    assert_eq!(logs, expected, "each line once, in order");
    worker.stop().await.unwrap();
}
