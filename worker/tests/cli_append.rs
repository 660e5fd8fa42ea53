//! `logstore append ID` reading stdin against real workers: `seq 1 100000 | logstore append
//! 42 --batch 100` stores every line once and in order on core and JetStream intake; a second
//! run of the same input with the same keys stores nothing twice (on a partitioned stream,
//! every batch on the object's lane); batches whose outcome does not come in time are sent
//! again and stored once; a partial batch goes out when stdin pauses; a bad line or a refusal
//! names its line and exits as a single append would.

mod support;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

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
    let (code, stdout, stderr) = logstore_bash(&env, &[], &script, 600).await;
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

    let (code, first, stderr) = logstore_bash(
        &env,
        &[],
        "seq 1 600 | logstore append 43 --batch 100 --key import-7",
        120,
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(printed_seqs(&first), (1..=600).collect::<Vec<u64>>());
    assert!(!first.contains("duplicate"), "{first}");

    let (code, second, stderr) = logstore_bash(
        &env,
        &[],
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
        let (code, stdout, stderr) = logstore_bash(&env, &[], &script, 60).await;
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
        let (code, stdout, stderr) = logstore_bash(&env, &[], &script, 60).await;
        assert_eq!(code, Some(3), "{intake}: {stderr}");
        assert_eq!(printed_seqs(&stdout), [3], "{intake}");
        assert!(
            stderr.starts_with("logstore: line 2 of stdin: conflict: ")
                && stderr.contains("last seq 3"),
            "{intake}: {stderr}"
        );

        // MAX_LOG_BYTES is 16: the worker refuses the batch for its second entry, line 3.
        let script = "printf 'ok\\n\\nmuch longer than sixteen bytes\\nok\\n' | logstore append 45";
        let (code, stdout, stderr) = logstore_bash(&env, &[], script, 60).await;
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
        .envs(logstore_env(&env))
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
    let mut vars = logstore_env(&env);
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

/// The README's stdin examples, run as written (`set -e`), print what their comments say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_stdin_examples_run_as_written() {
    let env = Env::shared(&["a"]).await;
    let worker = env.start_worker(&[SMALL_STREAM]).await;
    let script =
        readme_block("<!-- cli-stdin-examples: executed by worker/tests/cli_append.rs -->");
    let (code, stdout, stderr) = logstore_bash(&env, &[], &format!("set -e\n{script}"), 60).await;
    println!("{script}\n--- stdout:\n{stdout}--- stderr:\n{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let duplicate = " (duplicate: stored before)";
    assert_eq!(
        printed_seqs(&stdout.replace(duplicate, "")),
        [1, 2, 3, 1, 2, 3, 4, 5, 6]
    );
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line.ends_with(duplicate), (3..6).contains(&i), "{stdout}");
    }
    let logs: Vec<String> = stored(&env, 7).await.into_iter().map(|r| r.1).collect();
    assert_eq!(logs, ["1", "2", "3", "4", "up", "down"]);
    worker.stop().await.unwrap();
}
