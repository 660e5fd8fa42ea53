//! Workers under test: [`TestWorker`] runs `worker::run_on` in the test's runtime;
//! [`WorkerCommand`] starts the real binary as a [`WorkerProcess`], for tests that signal,
//! kill or limit it, or read what it prints.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::Child;
use tokio::task::JoinHandle;

use super::bins::bin_path;
use super::env::Env;
use super::http::http_get;
use super::servers::free_port;
use super::{eventually, within};

/// A worker running in the test's runtime.
pub struct TestWorker {
    pub metrics: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), worker::Error>>>,
}

impl TestWorker {
    /// Run a worker with `env`'s settings and `extra` on top in this runtime, without waiting
    /// for it. Its metrics listener is bound here, on `127.0.0.1:0`, and handed to
    /// `worker::run_on`, so no other process can take the port before the worker serves it.
    pub fn spawn(env: &Env, extra: &[(&str, &str)]) -> TestWorker {
        let (listener, metrics) = metrics_listener();
        let config = env.config(metrics.port(), extra);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(worker::run_on(config, listener, async move {
            let _ = stopped.await;
        }));
        TestWorker {
            metrics,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn wait_ready(&self) {
        let addr = self.metrics;
        eventually(30, "worker ready", || async move {
            match http_get(addr, "/readyz").await {
                Some((200, _)) => Some(()),
                _ => None,
            }
        })
        .await
    }

    /// True while the worker's task has not ended (it did not crash or return).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        within(10, "HTTP GET", http_get(self.metrics, path))
            .await
            .unwrap_or_else(|| panic!("GET {path} failed"))
    }

    /// Shut down gracefully and return run()'s result.
    pub async fn stop(mut self) -> Result<(), worker::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("worker task");
        within(30, "worker shutdown", task)
            .await
            .expect("worker task panicked")
    }
}

/// A listener on a free loopback port (`127.0.0.1:0`) for an in-process worker's metrics,
/// and its address; bound as `tokio::net::TcpListener::bind` binds (SO_REUSEADDR, backlog
/// 1024). Needs a Tokio runtime.
pub fn metrics_listener() -> (tokio::net::TcpListener, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket for the worker's metrics");
    socket
        .set_reuseaddr(true)
        .expect("SO_REUSEADDR on the metrics socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0 for the worker's metrics");
    let listener = socket
        .listen(1024)
        .expect("listen for the worker's metrics");
    let addr = listener.local_addr().expect("metrics listener address");
    (listener, addr)
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `RUST_LOG` for a worker process.
enum Log {
    /// `TEST_WORKER_LOG`, else `error`: quiet unless a person asks.
    Quiet,
    Level(String),
    /// Unset: the worker's default level.
    Default,
}

/// How to start the worker binary: `env`'s settings on a free metrics port, `extra`
/// variables on top, and `args` (none: it runs a worker). By default it inherits the test's
/// environment, logs at `error` (or `TEST_WORKER_LOG`) to the test's stderr, and its stdout
/// goes nowhere.
pub struct WorkerCommand<'a> {
    env: &'a Env,
    args: Vec<OsString>,
    extra: Vec<(OsString, OsString)>,
    nofile: Option<u64>,
    log: Log,
    capture: bool,
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
}

impl<'a> WorkerCommand<'a> {
    pub fn new(env: &'a Env) -> Self {
        WorkerCommand {
            env,
            args: Vec::new(),
            extra: Vec::new(),
            nofile: None,
            log: Log::Quiet,
            capture: false,
            stdout: None,
            stderr: None,
        }
    }

    /// Command-line arguments, e.g. `shards status`.
    pub fn args<A: AsRef<OsStr>>(mut self, args: &[A]) -> Self {
        self.args
            .extend(args.iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// Variables set after `env`'s settings (so they win).
    pub fn extra<K: AsRef<OsStr>, V: AsRef<OsStr>>(mut self, vars: &[(K, V)]) -> Self {
        self.extra.extend(
            vars.iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
        );
        self
    }

    /// The worker's open-descriptor limit (soft and hard RLIMIT_NOFILE), as on a host with
    /// the common default of 1,024.
    pub fn nofile(mut self, limit: u64) -> Self {
        self.nofile = Some(limit);
        self
    }

    /// `RUST_LOG=level`.
    pub fn log(mut self, level: &str) -> Self {
        self.log = Log::Level(level.to_string());
        self
    }

    /// `RUST_LOG` unset: the worker's default log level.
    pub fn default_log(mut self) -> Self {
        self.log = Log::Default;
        self
    }

    /// Collect stdout and stderr as it runs ([`WorkerProcess::output`]), and inherit nothing
    /// from the test's environment: what it prints then depends on its settings only. Its stdin
    /// is empty. A stream given to [`Self::stdout`] or [`Self::stderr`] is not collected.
    pub fn capture(mut self) -> Self {
        self.capture = true;
        self
    }

    /// Where its stdout goes (instead of nowhere, or the capture).
    pub fn stdout(mut self, to: impl Into<Stdio>) -> Self {
        self.stdout = Some(to.into());
        self
    }

    /// Where its stderr goes (instead of the test's stderr, or the capture), e.g. a file.
    pub fn stderr(mut self, to: impl Into<Stdio>) -> Self {
        self.stderr = Some(to.into());
        self
    }

    /// Start it; does not wait for readiness.
    pub fn spawn(self) -> WorkerProcess {
        let port = free_port();
        let mut command = tokio::process::Command::new(bin_path("worker"));
        command.args(&self.args);
        if self.capture {
            command.env_clear();
        }
        command.envs(self.env.settings(port));
        match self.log {
            Log::Quiet => {
                command.env(
                    "RUST_LOG",
                    std::env::var("TEST_WORKER_LOG").unwrap_or_else(|_| "error".into()),
                );
            }
            Log::Level(level) => {
                command.env("RUST_LOG", level);
            }
            Log::Default => {
                command.env_remove("RUST_LOG");
            }
        }
        command.envs(self.extra).kill_on_drop(true);
        if self.capture {
            command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        } else {
            command.stdout(Stdio::null());
        }
        if let Some(stdout) = self.stdout {
            command.stdout(stdout);
        }
        if let Some(stderr) = self.stderr {
            command.stderr(stderr);
        }
        if let Some(nofile) = self.nofile {
            limit_nofile(&mut command, nofile);
        }
        let mut child = command.spawn().expect("start the worker binary");
        let output = self.capture.then(|| Captured::start(&mut child));
        WorkerProcess {
            child,
            metrics: SocketAddr::from(([127, 0, 0, 1], port)),
            output,
        }
    }

    /// Start it and wait until it is ready.
    pub async fn start(self) -> WorkerProcess {
        let worker = self.spawn();
        worker.wait_ready().await;
        worker
    }
}

/// Soft and hard RLIMIT_NOFILE of the process `command` starts.
fn limit_nofile(command: &mut tokio::process::Command, nofile: u64) {
    let limit = libc::rlimit {
        rlim_cur: nofile,
        rlim_max: nofile,
    };
    // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and the
    // closure touches nothing but its own copy of `limit`.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A worker running as its own process (the real binary).
pub struct WorkerProcess {
    pub child: Child,
    pub metrics: SocketAddr,
    output: Option<Captured>,
}

/// What a captured worker printed so far, and the tasks reading its pipes.
struct Captured {
    text: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Captured {
    /// Reads whichever of its stdout and stderr are pipes.
    fn start(child: &mut Child) -> Captured {
        let text = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            readers.push(tokio::spawn(collect_output(stdout, text.clone())));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(tokio::spawn(collect_output(stderr, text.clone())));
        }
        Captured { text, readers }
    }
}

impl WorkerProcess {
    /// Waits (at most 60 s) until `/readyz` answers 200; a timeout fails the test with the
    /// last answer and, when captured, the worker's output so far, and so does the worker
    /// exiting meanwhile (at once, with its exit status).
    pub async fn wait_ready(&self) {
        let addr = self.metrics;
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Some(status) = self.exited_with() {
                    return Err(status);
                }
                if matches!(http_get(addr, "/readyz").await, Some((200, _))) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(status)) => panic!(
                "the worker exited ({status}) before it was ready; its output:\n{}",
                self.output_so_far()
            ),
            Err(_) => panic!(
                "timed out after 60s: worker ready; /readyz {:?}; its output:\n{}",
                http_get(addr, "/readyz").await,
                self.output_so_far()
            ),
        }
    }

    /// How the process ended, if it has (without reaping it: `child` still can be waited for).
    fn exited_with(&self) -> Option<String> {
        let pid = self.child.id()?;
        // SAFETY: waitid(2) with WNOWAIT on our own child's pid and a zeroed siginfo_t that it
        // owns; it only reads the child's state.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let found = libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            (found == 0 && info.si_pid() != 0).then(|| match info.si_code {
                libc::CLD_EXITED => format!("exit status: {}", info.si_status()),
                _ => format!("signal: {}", info.si_status()),
            })
        }
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.pid() as i32;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }

    /// SIGKILL and reap.
    pub async fn kill(mut self) {
        self.signal(libc::SIGKILL);
        within(10, "killed worker exits", self.child.wait())
            .await
            .expect("wait");
    }

    /// SIGTERM; returns the exit code.
    pub async fn terminate(mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        within(60, "worker exits after SIGTERM", self.child.wait())
            .await
            .expect("wait")
            .code()
    }

    /// SIGTERM; SIGKILL if it has not exited within 20 s (a worker that never reached NATS
    /// may wait for it at shutdown, which is not what these tests are about). Returns
    /// everything it printed (needs [`WorkerCommand::capture`]).
    pub async fn stop(mut self) -> String {
        let pid = self.pid() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await.expect("SIGKILL the worker");
        }
        self.read_to_end("stop()").await
    }

    /// SIGKILL (for tests that check what it printed, not how it stops); returns everything
    /// it printed (needs [`WorkerCommand::capture`]).
    pub async fn kill_and_read(mut self) -> String {
        let _ = self.child.start_kill();
        within(10, "worker exits", self.child.wait())
            .await
            .expect("wait");
        self.read_to_end("kill_and_read()").await
    }

    /// Waits (at most `secs`) for it to exit by itself, e.g. when it refuses to start; returns
    /// how it ended and everything it printed (needs [`WorkerCommand::capture`]).
    pub async fn exit(mut self, secs: u64) -> (std::process::ExitStatus, String) {
        let status = within(secs, "worker exits", self.child.wait())
            .await
            .expect("wait");
        (status, self.read_to_end("exit()").await)
    }

    /// Once the process has exited: waits for its pipes to be read to their end and returns
    /// everything it printed.
    async fn read_to_end(&mut self, what: &str) -> String {
        let captured = self
            .output
            .as_mut()
            .unwrap_or_else(|| panic!("{what} needs capture()"));
        for reader in captured.readers.drain(..) {
            within(10, "worker output read to its end", reader)
                .await
                .expect("output reader");
        }
        self.output()
    }

    /// Everything it printed so far (needs [`WorkerCommand::capture`]).
    pub fn output(&self) -> String {
        let captured = self.output.as_ref().expect("output() needs capture()");
        String::from_utf8_lossy(&captured.text.lock().expect("output lock")).into_owned()
    }

    fn output_so_far(&self) -> String {
        match &self.output {
            Some(_) => self.output(),
            None => "(not captured; its stderr is the test's)".to_string(),
        }
    }

    /// Waits (at most 30 s) until the output contains `needle`; a timeout fails the test with
    /// the output so far.
    pub async fn wait_for(&self, needle: &str) {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while !self.output().contains(needle) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if found.is_err() {
            panic!(
                "timed out after 30s: worker logs {needle:?}; its output:\n{}",
                self.output()
            );
        }
    }

    /// The process id (panics once the process has been reaped).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("worker still running")
    }

    /// How many file descriptors the process has open (`/proc/<pid>/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read the worker's /proc/<pid>/fd")
            .count()
    }
}

async fn collect_output(mut from: impl tokio::io::AsyncRead + Unpin, into: Arc<Mutex<Vec<u8>>>) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8192];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        into.lock()
            .expect("output lock")
            .extend_from_slice(&buf[..n]);
    }
}

/// CPU time process `pid` has used so far, user and system (`/proc/<pid>/stat`).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces, in parentheses): state is the
    // first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> u64 {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("/proc/{pid}/stat field {i}: {stat}"))
    };
    // SAFETY: sysconf only reads a configuration value.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / per_second)
}

/// Raise this process's soft open-descriptor limit (RLIMIT_NOFILE) to its hard limit, for tests
/// that hold thousands of sockets; returns the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid, owned rlimit struct.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit),
            0,
            "getrlimit"
        );
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "setrlimit");
    }
    limit.rlim_cur
}
