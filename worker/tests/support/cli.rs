//! `logstore`, the CLI binary, pointed at a test's world: its environment, shell lines
//! (`seq 1 10 | logstore append 42`) run with it on the PATH, and the README's examples.

use std::process::Stdio;

use super::bins::bin_path;
use super::env::Env;
use super::within;

/// The environment that points `logstore` at `env`'s NATS and subjects.
pub fn logstore_env(env: &Env) -> Vec<(&'static str, String)> {
    env.settings(0)
        .into_iter()
        .filter(|(var, _)| var.starts_with("NATS_"))
        .collect()
}

/// `script` run by bash with `logstore` on its PATH and pointed at `env` (and `vars` on top),
/// its stdin empty, within `secs`: exit code, stdout, stderr.
pub async fn logstore_bash(
    env: &Env,
    vars: &[(&str, &str)],
    script: &str,
    secs: u64,
) -> (Option<i32>, String, String) {
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
            .envs(logstore_env(env))
            .envs(vars.iter().copied())
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

/// The ```sh block that follows `marker` in the README (examples a test runs as written).
pub fn readme_block(marker: &str) -> String {
    let readme = include_str!("../../../README.md");
    let after = readme
        .split_once(marker)
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("README has the marker {marker}"));
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .map(|(block, _)| block)
        .expect("a ```sh block follows the marker");
    block.to_string()
}
