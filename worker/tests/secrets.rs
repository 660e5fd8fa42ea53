//! Secrets are never printed. A marker string stands in for every password and token
//! (NATS_URL, POSTGRES_SHARDS, POSTGRES_PASSWORD, the content of POSTGRES_PASSWORD_FILE), and
//! no output may contain it: not `--help`, not the one-line error of a bad configuration, not
//! a worker's debug log (nor /metrics) while its NATS or PostgreSQL login fails, nor while it
//! succeeds.

mod support;

use support::*;

/// Stands in for every secret. Distinctive enough never to appear by accident.
const MARKER: &str = "S3CRET-MARKER-5d1c";

fn assert_no_marker(what: &str, output: &str) {
    assert!(
        !output.contains(MARKER),
        "{what}: the secret was printed:\n{output}"
    );
}

/// `--help` (and `-h`) show which variables a setting reads, never their values.
#[tokio::test]
async fn help_shows_no_secret_values() {
    let env = [
        ("NATS_URL", format!("nats://user:{MARKER}@127.0.0.1:1")),
        (
            "POSTGRES_SHARDS",
            format!("a=postgres://u:{MARKER}@127.0.0.1:1/db"),
        ),
        ("POSTGRES_PASSWORD", MARKER.to_string()),
    ];
    for (bin, flag) in [
        ("worker", "--help"),
        ("worker", "-h"),
        ("loadgen", "--help"),
        ("loadgen", "-h"),
    ] {
        let (code, stdout, stderr) = run_once(bin, &[flag], &env, 30).await;
        let what = format!("{bin} {flag}");
        assert_eq!(code, Some(0), "{what}: {stderr}");
        // The variable is named (so the help still says where a setting comes from)...
        assert!(stdout.contains("[env: NATS_URL]"), "{what}:\n{stdout}");
        if bin == "worker" {
            assert!(
                stdout.contains("[env: POSTGRES_SHARDS]"),
                "{what}:\n{stdout}"
            );
            assert!(
                stdout.contains("[env: POSTGRES_PASSWORD]"),
                "{what}:\n{stdout}"
            );
        }
        // ...its value is not.
        assert_no_marker(&what, &format!("{stdout}{stderr}"));
    }
}

/// `(variable, value)` pairs given to a process as its whole environment.
type Settings = Vec<(&'static str, String)>;

/// Bad configurations that carry the marker: each stops the worker at start (exit 2) with one
/// line naming the variable at fault, and never shows the secret.
#[tokio::test]
async fn bad_configurations_fail_in_one_line_without_the_secret() {
    let m = MARKER;
    // No listener there: if a case were ever accepted, the worker would wait for NATS rather
    // than touch a server of this machine.
    let nats = format!("nats://logstore:{m}@127.0.0.1:{}", free_port());
    let shards = format!("a=postgres://u:{m}@127.0.0.1:1/db");
    let cases: Vec<(&str, Settings, &str)> = vec![
        (
            "a shard missing its name",
            vec![("POSTGRES_SHARDS", format!("postgres://u:{m}@127.0.0.1/db"))],
            "POSTGRES_SHARDS",
        ),
        (
            "a shard missing its name, URL with a query",
            vec![(
                "POSTGRES_SHARDS",
                format!("postgres://u:{m}@127.0.0.1/db?sslmode=disable"),
            )],
            "POSTGRES_SHARDS",
        ),
        (
            "shards separated by a space instead of a comma",
            vec![(
                "POSTGRES_SHARDS",
                format!("a=postgres://u:{m}@h1/db b=postgres://u:{m}@h2/db"),
            )],
            "POSTGRES_SHARDS",
        ),
        (
            "?password= in a URL with a bad port",
            vec![(
                "POSTGRES_SHARDS",
                format!("a=postgres://h:port/db?password={m}"),
            )],
            "POSTGRES_SHARDS",
        ),
        (
            "?password= in a URL with an unknown option",
            vec![(
                "POSTGRES_SHARDS",
                format!("a=postgres://h/db?password={m}&no_such_option=1"),
            )],
            "POSTGRES_SHARDS",
        ),
        (
            "the key=value form",
            vec![("POSTGRES_SHARDS", format!("a=host=h password={m}"))],
            "POSTGRES_SHARDS",
        ),
        (
            "a quoted key=value password",
            vec![("POSTGRES_SHARDS", format!("a=password='{m}'"))],
            "POSTGRES_SHARDS",
        ),
        (
            "two shards of the same name",
            vec![(
                "POSTGRES_SHARDS",
                format!("a=postgres://u:{m}@h1/db,a=postgres://u:{m}@h2/db"),
            )],
            "POSTGRES_SHARDS",
        ),
        (
            "bad POSTGRES_IPS with a password set",
            vec![
                ("POSTGRES_IPS", format!("db1,user:{m}@db2")),
                ("POSTGRES_PASSWORD", m.to_string()),
            ],
            "POSTGRES_IPS",
        ),
        (
            "bad POSTGRES_PORT with a password set",
            vec![
                ("POSTGRES_IPS", "db1".to_string()),
                ("POSTGRES_PORT", "0".to_string()),
                ("POSTGRES_PASSWORD", m.to_string()),
            ],
            "POSTGRES_PORT",
        ),
        (
            "bad NATS_URL port",
            vec![
                ("POSTGRES_SHARDS", shards.clone()),
                ("NATS_URL", format!("nats://logstore:{m}@127.0.0.1:port")),
            ],
            "NATS_URL",
        ),
        (
            "NATS servers separated by a space",
            vec![
                ("POSTGRES_SHARDS", shards.clone()),
                ("NATS_URL", format!("nats://{m}@h1:4222 nats://{m}@h2:4222")),
            ],
            "NATS_URL",
        ),
        (
            "NATS servers with different credentials",
            vec![
                ("POSTGRES_SHARDS", shards.clone()),
                ("NATS_URL", format!("nats://a:{m}@h1,nats://b:{m}@h2")),
            ],
            "NATS_URL",
        ),
        (
            "a bad setting next to valid secrets",
            vec![
                ("POSTGRES_SHARDS", shards.clone()),
                ("POSTGRES_PASSWORD", m.to_string()),
                ("METRICS_ADDR", "nope".to_string()),
            ],
            "METRICS_ADDR",
        ),
    ];
    for (what, settings, var) in cases {
        let mut env = vec![("NATS_URL", nats.clone())];
        env.extend(settings);
        let (code, stdout, stderr) = run_once("worker", &[], &env, 30).await;
        assert_eq!(code, Some(2), "{what}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
        assert!(
            stderr.starts_with(&format!("worker: invalid configuration: {var}: ")),
            "{what}: {stderr}"
        );
        assert_no_marker(what, &format!("{stdout}{stderr}"));
    }

    // loadgen shares the NATS_URL parsing and its redaction.
    let (code, stdout, stderr) = run_once(
        "loadgen",
        &["--count", "1"],
        &[("NATS_URL", format!("nats://{m}@h1 nats://{m}@h2"))],
        30,
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("NATS_URL"), "{stderr}");
    assert_no_marker("loadgen with a bad NATS_URL", &format!("{stdout}{stderr}"));
}

/// NATS that requires a user and password. A wrong password and the right one, both given in
/// NATS_URL: debug logs (where the client prints each server address it tries) never show the
/// password, and the right one logs in (credentials in the URL work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_logins_never_print_the_password() {
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{\n  user: logstore\n  password: \"{MARKER}\"\n}}\n"
    ));
    let mut env = Env::shared(&["a"]).await;

    env.nats_url = format!("nats://logstore:wrong-{MARKER}@127.0.0.1:{}", nats.port());
    // A refused login stops the worker at start (no retry cures it), saying so.
    let worker = WorkerCommand::new(&env).log("debug").capture().spawn();
    worker
        .wait_for("refused the login for user logstore: authorization violation")
        .await;
    let output = worker.stop().await;
    assert!(output.contains("attempting connection"), "{output}");
    assert_no_marker("worker with a wrong NATS password", &output);

    env.nats_url = format!("nats://logstore:{MARKER}@127.0.0.1:{}", nats.port());
    let worker = WorkerCommand::new(&env).log("debug").capture().spawn();
    worker.wait_ready().await;
    let output = worker.stop().await;
    assert!(output.contains("connected to NATS"), "{output}");
    assert_no_marker("worker with the right NATS password", &output);

    // loadgen does not retry a failed first connection either: it exits 1 with the reason.
    let (code, stdout, stderr) = run_once(
        "loadgen",
        &["--count", "1"],
        &[(
            "NATS_URL",
            format!("nats://logstore:wrong-{MARKER}@127.0.0.1:{}", nats.port()),
        )],
        30,
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("refused the login for user logstore"),
        "{stderr}"
    );
    assert_no_marker(
        "loadgen with a wrong NATS password",
        &format!("{stdout}{stderr}"),
    );
}

/// NATS unreachable (nothing listens on the port): at the default log level (no RUST_LOG) the
/// worker logs
/// each failed connection attempt once, as a warning naming the server URL (without the
/// password given in NATS_URL) and the cause, and no other line per attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_is_logged_once_per_attempt_with_url_and_cause() {
    let port = free_port(); // nobody listens there
    let mut env = Env::shared(&["a"]).await;
    env.nats_url = format!("nats://logstore:{MARKER}@127.0.0.1:{port}");
    let worker = WorkerCommand::new(&env).default_log().capture().spawn();
    // Attempts 1..=3 come within ~10 ms of each other (async-nats backs off from the 2nd).
    worker.wait_for("attempts=3").await;
    let output = worker.stop().await;
    assert_no_marker("worker with NATS unreachable", &output);
    let attempts: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("cannot connect to NATS"))
        .collect();
    let url = format!("url=nats://127.0.0.1:{port}");
    for n in 1..=3 {
        let lines: Vec<&&str> = attempts
            .iter()
            .filter(|l| l.contains(&format!("attempts={n} ")))
            .collect();
        assert_eq!(lines.len(), 1, "attempt {n} logged once:\n{output}");
        let line = lines[0];
        assert!(line.contains("WARN"), "{line}");
        assert!(line.contains(&url), "names the server: {line}");
        assert!(
            line.contains("Connection refused"),
            "names the cause: {line}"
        );
    }
    // Nothing else repeats per attempt (async-nats's own "client error" event included).
    assert!(!output.contains("NATS event"), "{output}");
    assert!(!output.contains("client error"), "{output}");
}

/// PostgreSQL that requires a password (scram-sha-256). A wrong password in POSTGRES_SHARDS and
/// in POSTGRES_PASSWORD (the key=value form built from POSTGRES_IPS), then the right one:
/// nothing the worker prints at debug level shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_logins_never_print_the_password() {
    let pg = PgServer::start(); // its own: require_password changes pg_hba.conf for good
    let role = "logstore_login";
    let db = pg.require_password(role, MARKER).await;
    let url = |password: &str| format!("postgres://{role}:{password}@127.0.0.1:{}/{db}", pg.port());
    let mut env = Env {
        nats_url: shared().nats.url(),
        prefix: unique_name("t"),
        shards: vec![("a".to_string(), url(&format!("wrong-{MARKER}")))],
        intake: "core",
    };

    let worker = WorkerCommand::new(&env).log("debug").capture().spawn();
    worker.wait_for("shard unreachable at start").await;
    // At least one retry by the health checker, which logs its error at debug level.
    worker.wait_for("shard still unreachable").await;
    let output = worker.stop().await;
    // The server refused the login (a refused connection reads otherwise); require_password
    // has checked that what it refuses is the password.
    assert!(
        output.contains("shard a: cannot connect to 127.0.0.1:")
            && output.contains("password authentication failed"),
        "{output}"
    );
    assert_no_marker("worker with a wrong password in POSTGRES_SHARDS", &output);

    let ips = vec![
        ("POSTGRES_IPS", "127.0.0.1".to_string()),
        ("POSTGRES_PORT", pg.port().to_string()),
        ("POSTGRES_USER", role.to_string()),
        ("POSTGRES_PASSWORD", format!("wrong-{MARKER}")),
        ("POSTGRES_DB", db.clone()),
    ];
    let mut by_ips = env.clone();
    by_ips.shards.clear(); // POSTGRES_SHARDS="" gives way to POSTGRES_IPS
    let worker = WorkerCommand::new(&by_ips)
        .extra(&ips)
        .log("debug")
        .capture()
        .spawn();
    worker.wait_for("shard unreachable at start").await;
    let output = worker.stop().await;
    assert!(
        output.contains("shard 127.0.0.1: cannot connect to 127.0.0.1:")
            && output.contains("password authentication failed"),
        "{output}"
    );
    assert_no_marker("worker with a wrong POSTGRES_PASSWORD", &output);

    env.shards[0].1 = url(MARKER);
    let worker = WorkerCommand::new(&env).log("debug").capture().spawn();
    worker.wait_ready().await;
    let output = worker.stop().await;
    assert_no_marker("worker with the right password", &output);
}

/// POSTGRES_PASSWORD_FILE: a wrong password in the file, then the right one (with the newline
/// an editor leaves), for a POSTGRES_SHARDS URL without a password. Neither shows up in what
/// the worker prints at debug level, nor in /metrics or /readyz.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_password_file_is_never_printed() {
    let pg = PgServer::start(); // its own: require_password changes pg_hba.conf for good
    let role = "logstore_file";
    let db = pg.require_password(role, MARKER).await;
    let env = Env {
        nats_url: shared().nats.url(),
        prefix: unique_name("t"),
        shards: vec![(
            "a".to_string(),
            format!("postgres://{role}@127.0.0.1:{}/{db}", pg.port()),
        )],
        intake: "core",
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("postgres-password");
    let setting = [("POSTGRES_PASSWORD_FILE", file.display().to_string())];

    std::fs::write(&file, format!("wrong-{MARKER}\n")).expect("write the password file");
    let worker = WorkerCommand::new(&env)
        .extra(&setting)
        .log("debug")
        .capture()
        .spawn();
    worker.wait_for("shard unreachable at start").await;
    worker.wait_for("shard still unreachable").await;
    for path in ["/metrics", "/readyz"] {
        let (_, body) = within(10, "GET", http_get(worker.metrics, path))
            .await
            .unwrap_or_else(|| panic!("GET {path}"));
        assert_no_marker(&format!("{path} with a wrong password file"), &body);
    }
    let output = worker.stop().await;
    assert!(
        output.contains("password authentication failed"),
        "{output}"
    );
    assert_no_marker("worker with a wrong password file", &output);

    std::fs::write(&file, format!("{MARKER}\n")).expect("write the password file");
    let worker = WorkerCommand::new(&env)
        .extra(&setting)
        .log("debug")
        .capture()
        .spawn();
    worker.wait_ready().await;
    let client = env.client().await;
    env.append(&client, 1, "logged in from a file", None).await;
    for path in ["/metrics", "/readyz"] {
        let (status, body) = within(10, "GET", http_get(worker.metrics, path))
            .await
            .unwrap_or_else(|| panic!("GET {path}"));
        assert_eq!(status, 200, "{path}: {body}");
        assert_no_marker(&format!("{path} with the password file"), &body);
    }
    let output = worker.stop().await;
    assert_no_marker("worker with the right password file", &output);
}
