//! Where the servers keep their files: one temp dir per test process under
//! `$TMPDIR/logstore-test-servers-<uid>/<pid>`, removed by an `atexit` hook (which also kills
//! the servers still alive), and swept with the shared memory of dead test processes by the
//! next run; plus the file helpers the servers need (copy a cluster, chown, log tails, PATH).

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use super::postgres::{pg_run_as, release_pg_shmem};
use super::process::{kill_tree, live_pids, pid_alive, reap_orphans, RunAs};

/// The last ~40 lines of a log file, for panic messages.
pub(super) fn log_tail(path: &Path) -> String {
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
pub(super) fn new_server_dir(prefix: &str, for_pg_user: bool) -> TempDir {
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

pub(super) fn chown(path: &Path, ids: RunAs) {
    std::os::unix::fs::chown(path, Some(ids.uid), Some(ids.gid))
        .unwrap_or_else(|e| panic!("chown {} to {}:{}: {e}", path.display(), ids.uid, ids.gid));
}

/// Recursive copy preserving permissions and (when we may) ownership: postgres insists that
/// its data dir belongs to it and has mode 0700/0750.
pub(super) fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
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

pub(super) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

pub(super) fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
