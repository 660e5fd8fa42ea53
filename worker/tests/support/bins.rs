//! The workspace's binaries (built by `cargo build --workspace --bins`): where they are, a
//! run of one to its end, and loadgen runs pointed at a test's subjects with a JSON report.

use super::env::Env;
use super::within;

/// Path of a workspace binary (`worker`, `loadgen`), built by `cargo build --workspace --bins`
/// (scripts/test.sh does that first). Test executables live in target/<profile>/deps/, the
/// binaries one directory up.
pub fn bin_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Flags pointing loadgen at this test's subjects.
pub fn loadgen_flags(env: &Env) -> Vec<String> {
    [
        ("--nats-url", env.nats_url.clone()),
        ("--logs-subject", env.subject("logs")),
        ("--query-subject", env.subject("query")),
        ("--progress-secs", "1".to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect()
}

/// Start the loadgen binary with `extra` flags and a JSON report in `report`.
pub fn spawn_loadgen(env: &Env, extra: &[&str], report: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(bin_path("loadgen"))
        .args(loadgen_flags(env))
        .args(extra)
        .arg("--report")
        .arg(report)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the loadgen binary")
}

/// Wait for loadgen to exit; print its output (shown on failure or with --nocapture) and
/// return its exit code and JSON report.
pub async fn finish_loadgen(
    child: tokio::process::Child,
    report: &std::path::Path,
) -> (i32, serde_json::Value) {
    let output = within(90, "loadgen finishes", child.wait_with_output())
        .await
        .expect("wait for loadgen");
    println!(
        "loadgen stdout:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    println!(
        "loadgen stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report = std::fs::read(report).unwrap_or_else(|e| panic!("read the report: {e}"));
    let report: serde_json::Value = serde_json::from_slice(&report).expect("the report is JSON");
    (output.status.code().unwrap_or(-1), report)
}

/// The number at `path` in a loadgen report.
pub fn report_num(report: &serde_json::Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(report, |v, k| &v[*k])
        .as_f64()
        .unwrap_or_else(|| panic!("report has no number at {path:?}: {report}"))
}

/// Runs binary `bin` with exactly `env` (nothing inherited) to its end, within `secs`: exit code,
/// stdout, stderr.
pub async fn run_once(
    bin: &str,
    args: &[&str],
    env: &[(&str, String)],
    secs: u64,
) -> (Option<i32>, String, String) {
    let output = within(
        secs,
        &format!("{bin} {args:?} exits"),
        tokio::process::Command::new(bin_path(bin))
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run the binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
