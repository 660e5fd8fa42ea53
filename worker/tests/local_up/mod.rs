//! `scripts/local-up.sh` (the no-Docker runner), part of the `deploy` test binary: it brings
//! the whole topology up, takes load, restarts a killed worker and a running shard on request
//! (`local-up.sh restart worker N | shard pgN`), and on SIGINT stops what it started and
//! removes its temp dir, except while a server it did not start (a Postgres started by hand on
//! one of its data dirs) still runs there.

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use super::support::*;
use super::{repo_root, report_num, wait_stored, Supervised};

/// The directory holding the workspace binaries (`worker`, `loadgen`), e.g. target/debug.
fn bin_dir() -> PathBuf {
    bin_path("worker")
        .parent()
        .expect("binary has a parent dir")
        .to_path_buf()
}

/// `KEY=value` lines of local-up.sh's state file (a later line wins).
fn read_state(path: &Path) -> HashMap<String, String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Alive = exists and is not a zombie.
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .unwrap_or("X");
    state != "Z" && state != "X"
}

/// PIDs of every process, with its /proc directory.
fn all_pids() -> impl Iterator<Item = (u32, PathBuf)> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((pid, entry.path()))
        })
}

/// Direct children of `parent` (e.g. a postmaster's backends).
fn children_of(parent: u32) -> Vec<u32> {
    all_pids()
        .filter(|(_, dir)| {
            let Ok(stat) = fs::read_to_string(dir.join("stat")) else {
                return false;
            };
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            ppid == Some(parent)
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// PIDs of live processes whose command line mentions `needle` (e.g. a temp dir).
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    all_pids()
        .filter_map(|(pid, dir)| {
            let cmdline = fs::read(dir.join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains(needle) && pid_alive(pid)).then_some((pid, cmdline))
        })
        .collect()
}

fn addr(host_port: &str) -> SocketAddr {
    host_port
        .parse()
        .unwrap_or_else(|e| panic!("bad address {host_port:?}: {e}"))
}

/// `scripts/local-up.sh` with 2 workers and loadgen: comes up (every worker ready, logged in as
/// the least-privileged `logstore_worker`), takes loadgen's appends (verified, and counted by
/// the workers), restarts a SIGKILLed worker and a running shard on request, and on SIGINT
/// stops every process it started and removes its temp dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_up_runs_the_topology_takes_load_and_leaves_nothing_behind() {
    const APPENDS: u64 = 300;
    // Fail clearly (not skip) when loadgen has not been built.
    bin_path("loadgen");
    let tmp = tempfile::tempdir().expect("temp dir");
    let state_file = tmp.path().join("state");
    let report = tmp.path().join("loadgen-report.json");

    let mut command = local_up(&state_file, &[("WORKERS", "2"), ("RUST_LOG", "warn")]);
    command
        .args(["--loadgen", "--", "--verify", "--count"])
        .arg(APPENDS.to_string())
        .arg("--report")
        .arg(&report)
        // 200 appends/s: the run takes seconds, not minutes.
        .env("QUERIES_MIN", "12000");
    let mut script = Supervised::spawn(command, tmp.path().join("local-up.log"));
    let state = ready(&mut script, &state_file).await;
    let workers: Vec<SocketAddr> = (1..=2)
        .map(|i| addr(&state[&format!("worker{i}_metrics")]))
        .collect();
    for &worker in &workers {
        let (status, body) = within(10, "GET /readyz", http_get(worker, "/readyz"))
            .await
            .expect("worker answers /readyz");
        assert_eq!(status, 200, "worker {worker} not ready: {body}");
    }

    let state = eventually(120, "loadgen finishes", || {
        script.assert_running("local-up.sh");
        let state = read_state(&state_file);
        async move { state.contains_key("loadgen_exit").then_some(state) }
    })
    .await;
    assert_eq!(
        state["loadgen_exit"],
        "0",
        "loadgen --verify failed; output:\n{}",
        script.tail()
    );
    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&report).expect("read loadgen report"))
            .expect("loadgen report is JSON");
    let acknowledged = report_num(&report, &["appends", "ok"]) as u64;
    assert!(acknowledged > 0, "loadgen acknowledged nothing");
    // Exactly: every acknowledged append stored once (loadgen's retries reuse their keys).
    wait_stored(&workers, acknowledged).await;

    // Deleting is the operator's: as `admin` it works end to end; as `client` the CLI names
    // the permissions violation in one line and exits 2.
    let login = |user: &str, file: &str| -> Vec<(&'static str, String)> {
        vec![
            ("NATS_URL", state["nats_url"].clone()),
            ("NATS_USER", user.to_string()),
            ("NATS_PASSWORD_FILE", state[file].clone()),
            ("LOGSTORE_TIMEOUT_MS", "5000".to_string()),
        ]
    };
    let client = login("client", "nats_client_password_file");
    let admin = login("admin", "nats_admin_password_file");
    for text in ["to delete", "to keep"] {
        let (code, out, err) = run_once("logstore", &["append", "9001", text], &client, 30).await;
        assert_eq!(code, Some(0), "append as client:\n{out}\n{err}");
    }
    eventually(30, "both entries of 9001 stored", || {
        let client = client.clone();
        async move {
            let (code, out, _) = run_once("logstore", &["get", "9001"], &client, 30).await;
            (code == Some(0) && out.contains("to keep")).then_some(())
        }
    })
    .await;
    let (code, out, err) = run_once(
        "logstore",
        &["delete", "9001", "--before-seq", "2"],
        &client,
        30,
    )
    .await;
    assert_eq!(code, Some(2), "delete as client:\n{out}\n{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("Permissions Violation"), "{err}");
    let (code, out, err) = run_once(
        "logstore",
        &["delete", "9001", "--before-seq", "2"],
        &admin,
        30,
    )
    .await;
    assert_eq!(code, Some(0), "delete as admin:\n{out}\n{err}");
    let (code, out, err) = run_once("logstore", &["get", "9001"], &client, 30).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !out.contains("to delete") && out.contains("to keep"),
        "{out}"
    );

    // A killed worker and a running shard come back on request, on the same metrics port and
    // data dir.
    restart_a_killed_worker(&state_file, workers[0]).await;
    restart_a_running_shard(&state_file, &workers).await;
    let state = read_state(&state_file);

    // The workers log in as the least-privileged login, with the password from their file.
    for n in 1..=2 {
        let url = format!(
            "postgres://postgres@127.0.0.1:{}/logstore",
            state[&format!("pg{n}_port")]
        );
        let logins = worker_logins(&url).await;
        assert_eq!(logins, ["logstore_worker"], "pg{n}: the workers' logins");
    }
    assert!(
        state["postgres_shards"].contains("logstore_worker@")
            && Path::new(&state["postgres_password_file"]).is_file(),
        "{state:?}"
    );

    // Every server the script reported is up, with its children (Postgres backends).
    let servers: Vec<u32> = state
        .iter()
        .filter(|(k, _)| k.ends_with("_pid") && k.as_str() != "loadgen_pid")
        .map(|(k, v)| v.parse().unwrap_or_else(|_| panic!("{k}={v} is not a PID")))
        .collect();
    assert!(
        servers.len() >= 5,
        "nats, 2 postgres and 2 workers at least: {state:?}"
    );
    let down: Vec<u32> = servers.iter().copied().filter(|&p| !pid_alive(p)).collect();
    assert!(down.is_empty(), "not running before SIGINT: {down:?}");
    let mut pids = servers.clone();
    for &server in &servers {
        pids.extend(children_of(server));
    }
    let dir = state["dir"].clone();
    assert!(Path::new(&dir).is_dir(), "{dir} exists while running");

    let status = stop(&mut script).await;
    assert!(
        matches!(status.code(), Some(0) | Some(130)),
        "local-up.sh exit status {status}; output:\n{}",
        script.tail()
    );
    let alive: Vec<u32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
    assert!(alive.is_empty(), "still running after SIGINT: {alive:?}");
    let leftovers = processes_mentioning(&dir);
    assert!(leftovers.is_empty(), "processes left behind: {leftovers:?}");
    assert!(!Path::new(&dir).exists(), "{dir} was not removed");
    assert_eq!(
        read_state(&state_file).get("stopped").map(String::as_str),
        Some("1")
    );
    for worker in workers {
        assert!(
            http_get(worker, "/healthz").await.is_none(),
            "something still serves {worker}"
        );
    }
}

/// `bash scripts/local-up.sh` with `vars` (and the workspace's binaries, its state in
/// `state_file`, no Prometheus unless asked), started as a terminal starts it: with SIGINT
/// handled. A test run started as a background job of a non-interactive shell (`scripts/test.sh
/// &`) ignores SIGINT, the script would inherit that, and bash cannot trap a signal ignored at
/// its start: the test's Ctrl-C would do nothing.
fn local_up(state_file: &Path, vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new("bash");
    command
        .arg(repo_root().join("scripts/local-up.sh"))
        .env("BIN_DIR", bin_dir())
        .env("STATE_FILE", state_file)
        .envs(vars.iter().copied());
    // SAFETY: signal(2) with SIG_DFL in the forked child before exec; async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    command
}

/// Waits (at most 180 s) until the script says `ready=1`; its state then.
async fn ready(script: &mut Supervised, state_file: &Path) -> HashMap<String, String> {
    eventually(180, "local-up.sh reports ready", || {
        script.assert_running("local-up.sh");
        let state = read_state(state_file);
        async move { state.contains_key("ready").then_some(state) }
    })
    .await
}

/// SIGINT, as Ctrl-C in its terminal; how it exited (at most 90 s later).
async fn stop(script: &mut Supervised) -> ExitStatus {
    script.signal(libc::SIGINT);
    let stopped = tokio::time::timeout(Duration::from_secs(90), async {
        loop {
            if let Some(status) = script.exited() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    stopped.unwrap_or_else(|_| {
        panic!(
            "local-up.sh did not stop within 90 s of SIGINT; its output:\n{}",
            script.tail()
        )
    })
}

/// `scripts/local-up.sh restart <what>` for the run whose state file is `state_file`, as a
/// person types it in another terminal: its exit code and what it said.
async fn restart(state_file: &Path, what: &[&str]) -> (Option<i32>, String) {
    let output = within(
        180,
        "local-up.sh restart",
        tokio::process::Command::new("bash")
            .arg(repo_root().join("scripts/local-up.sh"))
            .arg("restart")
            .args(what)
            .env("STATE_FILE", state_file)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run local-up.sh restart");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), said)
}

/// The PID `key` names in the state file (its latest line).
fn state_pid(state_file: &Path, key: &str) -> u32 {
    let state = read_state(state_file);
    state
        .get(key)
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no PID {key} in the state file: {state:?}"))
}

/// SIGKILL worker 1, then `restart worker 1`: it runs again under a new PID and is ready on
/// the same metrics address when the command returns.
async fn restart_a_killed_worker(state_file: &Path, metrics: SocketAddr) {
    let old = state_pid(state_file, "worker1_pid");
    // SAFETY: kill(2) on a PID the script reported as its worker.
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    eventually(10, "worker 1 gone", || async move {
        (!pid_alive(old)).then_some(())
    })
    .await;
    let (code, said) = restart(state_file, &["worker", "1"]).await;
    assert_eq!(code, Some(0), "restart worker 1: {said}");
    assert!(said.contains("worker 1 restarted"), "{said}");
    let new = state_pid(state_file, "worker1_pid");
    assert!(new != old && pid_alive(new), "worker 1: {old} -> {new}");
    let (status, body) = within(10, "GET /readyz", http_get(metrics, "/readyz"))
        .await
        .expect("the restarted worker answers /readyz");
    assert_eq!(status, 200, "restarted worker 1 not ready: {body}");
}

/// `restart shard pg2` while it runs: a new postmaster on the same port and data dir (every
/// entry it held is still there), and the workers are ready again.
async fn restart_a_running_shard(state_file: &Path, workers: &[SocketAddr]) {
    let old = state_pid(state_file, "pg2_pid");
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/logstore",
        read_state(state_file)["pg2_port"]
    );
    let entries = |url: String| async move {
        let count: i64 = pg_connect(&url)
            .await
            .query_one("SELECT count(*) FROM logs", &[])
            .await
            .expect("count pg2's entries")
            .get(0);
        count
    };
    let before = entries(url.clone()).await;
    assert!(before > 0, "loadgen stored nothing on pg2");
    let (code, said) = restart(state_file, &["shard", "pg2"]).await;
    assert_eq!(code, Some(0), "restart shard pg2: {said}");
    assert!(said.contains("postgres pg2 restarted"), "{said}");
    let new = state_pid(state_file, "pg2_pid");
    assert!(
        new != old && pid_alive(new) && !pid_alive(old),
        "pg2: {old} -> {new}"
    );
    assert_eq!(
        entries(url.clone()).await,
        before,
        "pg2's entries after its restart"
    );
    // The workers find it again: their sessions are back, and they are ready.
    eventually(30, "the workers reconnect to the restarted pg2", || {
        let url = url.clone();
        async move { (!worker_logins(&url).await.is_empty()).then_some(()) }
    })
    .await;
    for &worker in workers {
        eventually(30, "the workers ready again with pg2 back", || async move {
            matches!(http_get(worker, "/readyz").await, Some((200, _))).then_some(())
        })
        .await;
    }
}

/// The logins of the workers' sessions on the shard at `url` (one each, sorted).
async fn worker_logins(url: &str) -> Vec<String> {
    pg_connect(url)
        .await
        .query(
            "SELECT DISTINCT usename::text FROM pg_stat_activity
             WHERE application_name = 'logstore-worker' ORDER BY 1",
            &[],
        )
        .await
        .expect("read pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// A Postgres started by hand (`pg_ctl start`, as the user the tests run Postgres as) on a
/// data dir of local-up's; stopped (`pg_ctl stop -m immediate`) when dropped, so a failing
/// test leaves none behind.
struct HandStarted {
    data: PathBuf,
    pid: u32,
}

impl HandStarted {
    async fn start(data: &Path) -> HandStarted {
        let log = data.with_extension("hand.log");
        let mut pg_ctl = tokio::process::Command::from(pg_command("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let status = within(90, "pg_ctl start", pg_ctl.status())
            .await
            .expect("run pg_ctl");
        assert!(
            status.success(),
            "pg_ctl start on {}: {status}\n{}",
            data.display(),
            fs::read_to_string(&log).unwrap_or_default()
        );
        let pid = fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no PID in {}/postmaster.pid", data.display()));
        HandStarted {
            data: data.to_path_buf(),
            pid,
        }
    }
}

impl Drop for HandStarted {
    fn drop(&mut self) {
        if pid_alive(self.pid) {
            let _ = pg_command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// Stop local-up's pg2 as a person would (SIGINT: fast shutdown) and wait until it is gone.
async fn stop_pg2(state_file: &Path) {
    let pid = state_pid(state_file, "pg2_pid");
    // SAFETY: kill(2) on a PID the script reported as its Postgres.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    eventually(30, "pg2 stopped", || async move {
        (!pid_alive(pid)).then_some(())
    })
    .await;
}

/// A Postgres started by hand on pg2's data dir (its postgresql.conf holds local-up's settings,
/// so it listens where pg2 did): `restart shard pg2` stops it and starts local-up's own. One
/// started by hand again, then SIGINT: local-up stops everything it started, keeps its temp dir
/// (the data dir is in use) and names the process that holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_up_never_removes_its_dir_under_a_postgres_started_by_hand() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let state_file = tmp.path().join("state");
    let command = local_up(&state_file, &[("WORKERS", "1"), ("PROMETHEUS", "0")]);
    let mut script = Supervised::spawn(command, tmp.path().join("local-up.log"));
    let state = ready(&mut script, &state_file).await;
    let dir = PathBuf::from(&state["dir"]);
    let data = dir.join("pg").join("pg2");

    stop_pg2(&state_file).await;
    let hand = HandStarted::start(&data).await;
    let (code, said) = restart(&state_file, &["shard", "pg2"]).await;
    assert_eq!(code, Some(0), "restart shard pg2: {said}");
    assert!(
        said.contains(&format!("stopped pid {}", hand.pid)),
        "says it stopped the one started by hand: {said}"
    );
    assert!(
        !pid_alive(hand.pid),
        "the Postgres started by hand still runs"
    );
    assert!(pid_alive(state_pid(&state_file, "pg2_pid")));
    drop(hand);

    stop_pg2(&state_file).await;
    let hand = HandStarted::start(&data).await;
    let status = stop(&mut script).await;
    assert!(
        matches!(status.code(), Some(0) | Some(130)),
        "local-up.sh exit status {status}; output:\n{}",
        script.tail()
    );
    let output = script.tail();
    assert!(
        dir.is_dir(),
        "{} was removed under a running Postgres",
        dir.display()
    );
    assert!(
        output.contains(&format!("kept {}", dir.display()))
            && output.contains(&format!("pid {}", hand.pid)),
        "says what it kept and why:\n{output}"
    );
    assert!(
        pid_alive(hand.pid),
        "local-up stopped a Postgres it did not start"
    );
    let state = read_state(&state_file);
    assert_eq!(
        state.get("kept").map(String::as_str),
        Some("1"),
        "{state:?}"
    );
    assert_eq!(
        state.get("stopped").map(String::as_str),
        Some("1"),
        "{state:?}"
    );
    for key in ["nats_pid", "pg1_pid", "pg2_pid", "worker1_pid"] {
        let pid = state_pid(&state_file, key);
        assert!(!pid_alive(pid), "{key} {pid} still runs after SIGINT");
    }
    drop(hand);
    fs::remove_dir_all(&dir).expect("remove local-up's temp dir");
}
