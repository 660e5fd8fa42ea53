//! What the worker binary prints, as a person reads it (its default log format and level, no
//! RUST_LOG): across a start, a shard outage and back, a refused NATS login and a busy
//! METRICS_ADDR, every line names its cause once, settings read as they were written
//! (`retention=7d`), and no line shows Rust's debug syntax (`Some(…)`, `None`, `["…"]`, `\"`,
//! `Name { field: … }`). A shard outage is one line when the shard goes down (naming it and the
//! cause) and one when it is back, not one per pooled connection or retry.

mod support;
use support::*;

/// The first piece of Rust debug syntax in `line`, if any.
fn debug_syntax(line: &str) -> Option<&'static str> {
    const PIECES: [&str; 7] = ["Some(", "None", "Ok(", "Err(", "\\\"", "=\"", "=["];
    if let Some(piece) = PIECES.into_iter().find(|piece| line.contains(piece)) {
        return Some(piece);
    }
    // A struct dump: `Name { field: value, … }`.
    let dump = line.match_indices(" { ").any(|(at, _)| {
        let before = line[..at].rsplit([' ', '=']).next().unwrap_or("");
        let after = &line[at + 3..];
        before.starts_with(|c: char| c.is_ascii_uppercase())
            && after
                .split_once(": ")
                .is_some_and(|(field, _)| field.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
    });
    dump.then_some("Name { field: … }")
}

/// Fails naming every line of `output` that shows Rust debug syntax.
fn assert_readable(what: &str, output: &str) {
    let bad: Vec<String> = output
        .lines()
        .filter_map(|line| debug_syntax(line).map(|piece| format!("{piece}: {line}")))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: debug syntax in\n{}",
        bad.join("\n")
    );
}

/// The lines of `output` that contain every one of `needles`.
fn lines_with<'a>(output: &'a str, needles: &[&str]) -> Vec<&'a str> {
    output
        .lines()
        .filter(|line| needles.iter().all(|needle| line.contains(needle)))
        .collect()
}

#[test]
fn debug_syntax_is_recognised() {
    for line in [
        "retention=Some(604800s)",
        "retention=None",
        "members=[\"pg1\", \"pg2\"]",
        "intake=\"core\"",
        "error=ShardConfig { name: a, url: b }",
        "reason=Err(Timeout)",
    ] {
        assert!(debug_syntax(line).is_some(), "{line}");
    }
    for line in [
        "worker started intake=core retention=7d members=pg1,pg2",
        "shard is down shard=b error=shard b: cannot connect to 127.0.0.1:5433: Connection refused (os error 111)",
        "a batch `{ \"entries\": [...] }` is refused",
    ] {
        assert_eq!(debug_syntax(line), None, "{line}");
    }
}

/// A start (settings as written), an outage of one of two shards and its end: one line down,
/// naming the shard and the cause, one line back; nothing else in between, in particular none
/// of deadpool's per-connection warnings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_and_a_shard_outage_read_as_one_line_each() {
    let servers = shared();
    let mut own = PgServer::start(); // stopped and restarted below
    let env = Env {
        nats_url: servers.nats.url(),
        prefix: unique_name("logs"),
        shards: vec![
            ("a".to_string(), fresh_db(&servers.pg[0], "a").await),
            ("b".to_string(), fresh_db(&own, "b").await),
        ],
        intake: "core",
    };
    let worker = WorkerCommand::new(&env)
        .extra(&[("RETENTION_MAX_AGE", "7d"), ("SHUTDOWN_TIMEOUT_MS", "5000")])
        .default_log()
        .capture()
        .start()
        .await;
    // Ready comes just before the start line: the intake subscribed, then it says so. The
    // dead-letter stream is set up in the background and says so when done, before or after
    // the start line (after it on a loaded machine): both belong to the start.
    worker.wait_for("worker started").await;
    worker.wait_for("dead letters are kept").await;
    let started = worker.output();
    let start_line = lines_with(&started, &["worker started"]);
    assert_eq!(start_line.len(), 1, "one start line:\n{started}");
    for setting in ["intake=core", "retention=7d", "shards=2"] {
        assert!(
            start_line[0].contains(setting),
            "{setting}: {}",
            start_line[0]
        );
    }
    assert!(
        !lines_with(&started, &["routing by ring epoch 1", "members=a,b"]).is_empty(),
        "the ring's members as a list a person writes:\n{started}"
    );

    own.stop();
    worker.wait_for("shard is down").await;
    own.restart();
    worker.wait_for("shard is up again").await;
    let output = worker.stop().await;
    let outage = output
        .strip_prefix(started.as_str())
        .expect("the output only grows");
    let outage: Vec<&str> = outage
        .lines()
        .take_while(|line| !line.contains("SIGTERM received"))
        .collect();
    let down: Vec<&&str> = outage
        .iter()
        .filter(|l| l.contains("shard is down"))
        .collect();
    let up: Vec<&&str> = outage
        .iter()
        .filter(|l| l.contains("shard is up again"))
        .collect();
    assert!(
        down.len() == 1 && up.len() == 1 && outage.len() == 2,
        "the outage is one line down and one line up, nothing else:\n{}",
        outage.join("\n")
    );
    assert!(
        down[0].contains("WARN")
            && down[0].contains("shard=b")
            && down[0].contains("error=shard b: "),
        "the down line names the shard and the cause: {}",
        down[0]
    );
    assert!(
        up[0].contains("shard=b") && up[0].contains("down_for="),
        "the up line names the shard and how long it was down: {}",
        up[0]
    );
    assert!(!output.contains("deadpool"), "{output}");
    assert_readable("start and outage", &output);
}

/// A NATS login refusal stops the worker with one line, the cause said once; so does a
/// METRICS_ADDR that another process holds. The password never shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_and_a_busy_metrics_address_are_said_once() {
    const PASSWORD: &str = "right-Pa55-logs";
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{\n  user: logstore\n  password: \"{PASSWORD}\"\n}}\n"
    ));
    let mut env = Env::shared(&["a"]).await;
    env.nats_url = format!("nats://logstore:wrong-{PASSWORD}@127.0.0.1:{}", nats.port());
    let worker = WorkerCommand::new(&env).default_log().capture().spawn();
    let (status, output) = worker.exit(60).await;
    assert_eq!(status.code(), Some(1), "{output}");
    assert_eq!(
        lines_with(&output, &["refused the login for user logstore"]).len(),
        1,
        "the refusal, once:\n{output}"
    );
    assert_eq!(
        output.matches("authorization violation").count(),
        1,
        "its cause, once:\n{output}"
    );
    assert!(
        !output.contains(PASSWORD),
        "the password was printed:\n{output}"
    );
    assert_readable("refused login", &output);

    env.nats_url = shared().nats.url();
    let (busy, metrics) = metrics_listener();
    let worker = WorkerCommand::new(&env)
        .extra(&[("METRICS_ADDR", metrics.to_string())])
        .default_log()
        .capture()
        .spawn();
    let (status, output) = worker.exit(60).await;
    drop(busy);
    assert_eq!(status.code(), Some(1), "{output}");
    let said = lines_with(
        &output,
        &["cannot listen on METRICS_ADDR", &metrics.to_string()],
    );
    assert_eq!(said.len(), 1, "the busy address, once:\n{output}");
    assert_eq!(
        output.matches("Address already in use").count(),
        1,
        "its cause, once:\n{output}"
    );
    assert_readable("busy METRICS_ADDR", &output);
}
