//! Server processes that never outlive the test process: every child is forked by one
//! keeper thread with `PR_SET_PDEATHSIG` (optionally as another user, its output appended to
//! a log file); stopping is a signal with a bounded wait, then SIGKILL for the whole process
//! tree, and the orphans that this process (a child subreaper) inherits are reaped.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use super::INSTALL_HINT;

/// How long a graceful stop may take before we fall back to SIGKILL.
const GRACEFUL_STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to wait for a SIGKILLed process (and its children) to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
pub(super) struct RunAs {
    pub(super) uid: libc::uid_t,
    pub(super) gid: libc::gid_t,
}

pub(super) fn lookup_user(name: &str) -> Option<RunAs> {
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
pub(super) fn spawn_logged(
    mut cmd: Command,
    log: &Path,
    run_as: Option<RunAs>,
    what: &str,
) -> Child {
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
pub(super) fn live_pids() -> &'static Mutex<Vec<u32>> {
    static LIVE: OnceLock<Mutex<Vec<u32>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(Vec::new()))
}

fn register_pid(pid: u32) {
    live_pids()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(pid);
}

pub(super) fn unregister_pid(pid: u32) {
    live_pids()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| *p != pid);
}

/// Stops the child in `slot` (if any) and reaps it: `signal` first with a bounded wait, then
/// SIGKILL for it and all its children (postgres backends), waiting until all are gone.
pub(super) fn terminate(
    slot: &mut Option<Child>,
    signal: Option<libc::c_int>,
) -> Result<(), String> {
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
pub(super) fn reap_orphans(pids: &[u32], timeout: Duration) -> bool {
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
pub(super) fn wait_exit(
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
pub(super) fn kill_tree(pid: u32) -> Vec<u32> {
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
    let descendants = descendants_of(pid);
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    for d in &descendants {
        unsafe { libc::kill(*d as libc::pid_t, libc::SIGKILL) };
    }
    descendants
}

/// All descendants of `root`, from a scan of `/proc/*/stat`.
pub(super) fn descendants_of(root: u32) -> Vec<u32> {
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
pub(super) fn pid_alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Runs a future to completion on a fresh current-thread runtime in a helper thread, so sync
/// code works both from plain threads and from inside a `#[tokio::test]` (where building or
/// blocking on a runtime on the same thread would panic).
pub(super) fn block_on<F>(fut: F) -> F::Output
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

pub(super) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".to_string())
}
