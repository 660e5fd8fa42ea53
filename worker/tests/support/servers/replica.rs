//! A PostgreSQL primary with a streaming, synchronous, hot standby ([`PgPair`]): the shape of
//! a shard on HA PostgreSQL (Patroni, CloudNativePG, pg_auto_failover), for failover tests.
//! The standby is a `pg_basebackup -R` of the primary; the primary waits for it on every
//! commit (`synchronous_standby_names = '*'` with `synchronous_commit = on`, which every
//! [`PgServer`] runs with); [`PgPair::promote`] is `pg_ctl promote`. Two servers and a base
//! backup: start one pair per test binary.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::dirs::log_tail;
use super::postgres::{pg_run_as, postgres_bin};
use super::process::{block_on, spawn_logged, terminate, unregister_pid, wait_exit};
use super::{unique_name, PgServer, POLL};
use crate::support::db::pg_connect;

/// Bound on a base backup, on a promotion, and on the standby becoming synchronous.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A primary and its synchronous standby, both on 127.0.0.1. Kill the primary
/// ([`PgServer::kill`]) and [`PgPair::promote`] the standby to fail over.
pub struct PgPair {
    pub primary: PgServer,
    pub standby: PgServer,
}

impl PgPair {
    /// Starts a primary, clones it into a hot standby that streams from it, and returns once
    /// the primary's commits wait for that standby (`pg_stat_replication` says `sync`).
    pub fn start() -> PgPair {
        let primary = PgServer::start();
        let standby = PgServer::start_with("pg-standby", |data| base_backup(&primary, data));
        block_on(make_synchronous(&primary));
        PgPair { primary, standby }
    }

    /// A brand-new database (made on the primary, streamed to the standby); its name.
    pub async fn fresh_db(&self, prefix: &str) -> String {
        let name = unique_name(prefix);
        pg_connect(&self.primary.url("postgres"))
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\" TEMPLATE template0"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on the primary: {e}"));
        name
    }

    /// The URL of database `db` as a client of an HA shard gives it: both hosts, the primary
    /// first, and `target_session_attrs=read-write` (connect to whichever takes writes).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write",
            self.primary.port(),
            self.standby.port()
        )
    }

    /// Promotes the standby (`pg_ctl promote -w`) and returns once it takes writes.
    pub fn promote(&self) {
        let mut cmd = Command::new(pg_tool("pg_ctl"));
        cmd.arg("promote").arg("-D").arg(self.standby.data()).args([
            "-w",
            "-t",
            &STEP_TIMEOUT.as_secs().to_string(),
        ]);
        let log = self.standby.log().with_extension("promote.log");
        run_tool(cmd, &log, self.standby.data(), "pg_ctl promote");
        let port = self.standby.port();
        block_on(async move {
            let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
            let db = pg_connect(&url).await;
            let deadline = Instant::now() + STEP_TIMEOUT;
            loop {
                let in_recovery: bool = db
                    .query_one("SELECT pg_is_in_recovery()", &[])
                    .await
                    .expect("pg_is_in_recovery() on the promoted standby")
                    .get(0);
                if !in_recovery {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "the standby on port {port} is still in recovery after pg_ctl promote"
                );
                tokio::time::sleep(POLL).await;
            }
        });
    }
}

/// `pg_basebackup -R` of `primary` into `data`: a copy that starts as its streaming standby.
fn base_backup(primary: &PgServer, data: &Path) -> Result<(), String> {
    let mut cmd = Command::new(pg_tool("pg_basebackup"));
    cmd.args(["-h", "127.0.0.1", "-p", &primary.port().to_string()])
        .args(["-U", "postgres", "-D"])
        .arg(data)
        .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
    let dir = data
        .parent()
        .ok_or_else(|| format!("{} has no parent", data.display()))?;
    run_tool(cmd, &dir.join("basebackup.log"), dir, "pg_basebackup");
    Ok(())
}

/// Makes every commit on `primary` wait for its standby, and waits until it does.
async fn make_synchronous(primary: &PgServer) {
    let db = pg_connect(&primary.url("postgres")).await;
    // Two calls: ALTER SYSTEM cannot run in the implicit transaction of a batch.
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql} on the primary: {e}"));
    }
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let states: Vec<String> = db
            .query("SELECT sync_state FROM pg_stat_replication", &[])
            .await
            .expect("read pg_stat_replication")
            .iter()
            .map(|row| row.get(0))
            .collect();
        if states.iter().any(|state| state == "sync") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the standby is not synchronous after {STEP_TIMEOUT:?} (pg_stat_replication: \
             {states:?}); primary log {}:\n{}",
            primary.log().display(),
            log_tail(primary.log())
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Runs a PostgreSQL program (as the servers' user) in `cwd` to its end, within
/// [`STEP_TIMEOUT`]; panics with its log unless it exits 0.
fn run_tool(mut cmd: Command, log: &Path, cwd: &Path, what: &str) {
    cmd.current_dir(cwd);
    let mut child = Some(spawn_logged(cmd, log, pg_run_as(), what));
    let pid = child.as_ref().map_or(0, |c| c.id());
    match wait_exit(&mut child, STEP_TIMEOUT) {
        Ok(Some(status)) => {
            unregister_pid(pid);
            assert!(
                status.success(),
                "{what} failed ({status}); log {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        other => {
            let _ = terminate(&mut child, None);
            panic!(
                "{what} did not finish within {STEP_TIMEOUT:?} ({other:?}); log {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
    }
}

/// A PostgreSQL program of the servers' own installation (`pg_ctl`, `pg_basebackup`): next to
/// the `postgres` binary they run, or next to what it links to (PATH may hold links to only
/// some of them).
fn pg_tool(name: &str) -> std::path::PathBuf {
    let postgres = postgres_bin();
    let candidates = [
        postgres.parent().map(|dir| dir.join(name)),
        std::fs::canonicalize(postgres)
            .ok()
            .and_then(|real| real.parent().map(|dir| dir.join(name))),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|path| super::dirs::is_executable(path))
        .unwrap_or_else(|| {
            panic!(
                "{name} not found next to {} (or what it links to); {}",
                postgres.display(),
                super::INSTALL_HINT
            )
        })
}
