//! Loopback ports: the one `free_port` of the test support (below the kernel's ephemeral
//! range when possible, so a stopped server's port stays free for its restart), and the wait
//! for a stopped server's port to be bindable again.

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::dirs::log_tail;
use super::POLL;

/// How long to wait for a stopped server's port to become bindable again.
const PORT_FREE_TIMEOUT: Duration = Duration::from_secs(10);

/// A loopback port that is bindable right now. Prefers a random port below the kernel's
/// ephemeral range (outgoing connections never take those, so a stopped server's port stays
/// free for `restart`); falls back to binding port 0.
pub fn free_port() -> u16 {
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
pub(super) fn wait_port_free(port: u16, log: &Path) {
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
