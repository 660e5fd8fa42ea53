//! A throw-away PostgreSQL server: its own data dir (a copy of one `initdb` template per test
//! process), port and socket dir, tuned for speed, killed on `Drop` with its backends and its
//! SysV shared memory. Run as the `postgres` user when the tests run as root. A server may be
//! switched to password logins or TLS for good (use a dedicated one).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::dirs::{chown, copy_tree, is_executable, log_tail, new_server_dir};
use super::ports::{free_port, wait_port_free};
use super::process::{
    block_on, descendants_of, lookup_user, pid_alive, spawn_logged, terminate, unregister_pid,
    wait_exit, RunAs,
};
use super::{unique_name, LaunchError, INSTALL_HINT, POLL, START_ATTEMPTS};
use crate::support::db::pg_connect;

/// Upper bound for postgres to accept queries (includes crash recovery after `kill`).
const PG_READY_TIMEOUT: Duration = Duration::from_secs(30);

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
        let template = pg_template();
        PgServer::start_with("pg", |data| {
            copy_tree(template, data).map_err(|e| {
                format!(
                    "copy template cluster {} -> {}: {e}",
                    template.display(),
                    data.display()
                )
            })
        })
    }

    /// Starts a server whose data dir `fill` makes (given its path, which does not exist
    /// yet, in a temp dir the server's user owns), then waits as [`PgServer::start`] does.
    pub(super) fn start_with(
        prefix: &str,
        fill: impl FnOnce(&Path) -> Result<(), String>,
    ) -> PgServer {
        let bins = pg_bins();
        let run_as = pg_run_as();
        let dir = new_server_dir(prefix, run_as.is_some());
        let data = dir.path().join("data");
        fill(&data).unwrap_or_else(|e| panic!("{e}"));
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

    /// The data dir.
    pub(super) fn data(&self) -> &Path {
        &self.data
    }

    /// The server's log file.
    pub(super) fn log(&self) -> &Path {
        &self.log
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

/// The `postgres` binary the servers run.
pub(super) fn postgres_bin() -> &'static Path {
    &pg_bins().postgres
}

/// A command for PostgreSQL's program `name` (`pg_ctl`, `pg_isready`, …) from the directory of
/// the server binaries the tests use, run as the user the tests run PostgreSQL as (`postgres`
/// when we are root): what a person types to manage a server by hand.
pub fn pg_command(name: &str) -> Command {
    let dir = pg_bins()
        .postgres
        .parent()
        .expect("the postgres binary lives in a directory");
    let mut command = Command::new(dir.join(name));
    if let Some(ids) = pg_run_as() {
        use std::os::unix::process::CommandExt;
        // std drops the supplementary groups too when root changes uid.
        command.uid(ids.uid).gid(ids.gid);
    }
    command
}

/// Uid/gid to run PostgreSQL as: `postgres` when we are root (postgres refuses root), else
/// `None` = run as ourselves.
pub(super) fn pg_run_as() -> Option<RunAs> {
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
pub(super) fn release_pg_shmem(data: &Path) {
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
