//! Real, throw-away NATS and PostgreSQL servers for the worker's integration tests.
//!
//! The worker's interesting behaviour (redelivery, shard failover, reconnects) only shows up
//! against real servers, so the tests start their own `nats-server` and `postgres` children on
//! free loopback ports, each with its own data in a temp dir. The system services that may be
//! running on 4222/5432 are never used: a test must not depend on, or damage, machine state.
//!
//! Design notes (the "why" behind the plumbing below):
//!
//! * Every child is spawned by one process-wide "keeper" thread that never exits, and gets
//!   `PR_SET_PDEATHSIG = SIGKILL`. PDEATHSIG fires when the *thread* that forked the child
//!   exits, so forking from short-lived test or tokio threads would kill servers at random;
//!   forking from the keeper ties every server's life to the test process itself. That is what
//!   keeps the never-dropped servers of [`shared()`] from outliving a crashed or finished run.
//! * PostgreSQL refuses to run as root, so when we are root `initdb`/`postgres` run as the
//!   `postgres` system user (credentials dropped in `pre_exec`, before PDEATHSIG is set,
//!   because a credential change clears PDEATHSIG).
//! * `initdb` is slow, so it runs once per test process into a template data dir that every
//!   [`PgServer`] copies.
//! * Temp dirs live under `$TMPDIR/logstore-test-servers-<uid>/<pid>/`. An `atexit` hook kills
//!   the remaining children and removes that dir; dirs of dead test processes (killed with
//!   SIGKILL, so no `atexit`) are swept by the next run, which also frees the SysV shared
//!   memory segment a SIGKILLed postmaster leaves behind (those are a finite system resource).
//! * Ports are picked below the kernel's ephemeral range when possible: after a server is
//!   stopped, its port must stay free for `restart()`, and outgoing connections (which take
//!   ephemeral ports) would otherwise occasionally steal it.
//!
//! Layout: `nats` ([`NatsServer`], [`Launcher`]), `nats_cluster` ([`NatsCluster`]: three
//! of them with routes), `postgres` ([`PgServer`]), `replica` ([`PgPair`]: a primary with a
//! synchronous standby, for failover), `process` (the
//! keeper thread, PDEATHSIG, stopping and reaping), `ports` (the one [`free_port`]), `dirs`
//! (temp dirs, the `atexit` cleanup, file helpers); here, the [`shared()`] servers,
//! [`fresh_db`] and [`unique_name`].

#![allow(dead_code)]

mod dirs;
mod nats;
mod nats_cluster;
mod ports;
mod postgres;
mod process;
mod replica;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

pub use nats::{Launcher, NatsServer};
pub use nats_cluster::{shared_cluster, NatsCluster, CLUSTER_SIZE};
pub use ports::free_port;
pub use postgres::{pg_command, PgServer};
pub use replica::PgPair;

use crate::support::db::pg_connect;
use process::panic_message;

/// How often readiness/exit loops poll: short, so tests do not wait longer than needed.
const POLL: Duration = Duration::from_millis(50);
/// `start()` retries with a new port this many times if the port was taken meanwhile.
const START_ATTEMPTS: usize = 4;

const INSTALL_HINT: &str = "install them with `apt-get install -y nats-server postgresql`";

struct LaunchError {
    msg: String,
    /// The server exited early because its port was taken: worth retrying on another port.
    port_clash: bool,
}

/// Servers shared by all tests of one test binary: one NATS and two PostgreSQL shards, started
/// once, lazily. Tests that only need working servers use these (isolated by [`fresh_db`] and
/// [`unique_name`]) instead of paying a startup per test; tests that kill servers start their
/// own. Only `&` access is possible, so nobody can kill them; they live until the process
/// exits (statics are never dropped: PDEATHSIG and the `atexit` hook clean them up).
pub struct Shared {
    pub nats: NatsServer,
    pub pg: Vec<PgServer>,
}

/// The lazily started [`Shared`] servers. The three servers start in parallel. If startup
/// fails, every later call panics with the same message instead of retrying (and waiting for
/// the timeouts) in every test.
pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
    let res = SHARED.get_or_init(|| {
        // Children are forked by the never-exiting keeper thread (see `spawn_child`), so it
        // does not matter that these helper threads end.
        thread::scope(|s| {
            let nats = s.spawn(NatsServer::start);
            let pg0 = s.spawn(PgServer::start);
            let pg1 = s.spawn(PgServer::start);
            let nats = nats.join().map_err(panic_message);
            let pg0 = pg0.join().map_err(panic_message);
            let pg1 = pg1.join().map_err(panic_message);
            Ok(Shared {
                nats: nats?,
                pg: vec![pg0?, pg1?],
            })
        })
    });
    match res {
        Ok(s) => s,
        Err(e) => panic!("shared test servers failed to start: {e}"),
    }
}

/// Creates a brand-new empty database on `pg` (unique name from `prefix`) and returns its URL,
/// so each test gets isolated tables even on the shared servers. Cloned from `template0` so a
/// stray session on `template1` cannot make `CREATE DATABASE` fail.
pub async fn fresh_db(pg: &PgServer, prefix: &str) -> String {
    let name = unique_name(prefix);
    let client = pg_connect(&pg.url("postgres")).await;
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\" TEMPLATE template0"))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on port {}: {e}", pg.port()));
    pg.url(&name)
}

/// A name unique within this process and across concurrently running test processes:
/// `prefix` (lowercased, other chars -> `_`) + `_<pid>_<counter>`, only `[a-z0-9_]`, at most
/// 63 bytes (PostgreSQL's identifier limit), so it is valid as a database name, NATS subject
/// token or stream name without quoting surprises.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!("_{}_{n}", std::process::id());
    let mut p: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    p.truncate(63 - suffix.len());
    if p.is_empty() {
        p.push('t');
    }
    format!("{p}{suffix}")
}
