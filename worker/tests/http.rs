//! The HTTP endpoint under abuse: idle connections must not starve the worker of descriptors
//! or keep `/readyz` from answering (issue 9). The worker runs as the real binary with the
//! common 1,024-descriptor limit.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use worker::http::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS};

const IDLE_CONNECTIONS: usize = 2_000;
const WORKER_NOFILE: u64 = 1_024;

/// 2,000 connections that never send a byte, against a worker limited to 1,024 descriptors:
/// `/readyz` still answers within 1 s, the worker's descriptors stay bounded, appends and
/// queries on both shards keep working, and once the header-read timeout passes every one of
/// those descriptors is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_neither_block_readyz_nor_starve_the_worker() {
    let test_nofile = raise_nofile_limit();
    assert!(
        test_nofile >= IDLE_CONNECTIONS as u64 + 256,
        "this test needs {IDLE_CONNECTIONS} sockets plus headroom; RLIMIT_NOFILE is {test_nofile}"
    );
    let env = Env::shared(&["a", "b"]).await;
    let worker = WorkerCommand::new(&env).nofile(WORKER_NOFILE).spawn();
    worker.wait_ready().await;
    let addr = worker.metrics;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", worker.pid()))
        .expect("read the worker's limits");
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace().filter(|w| *w == "1024").count() == 2),
        "the worker runs with a 1,024-descriptor limit:\n{limits}"
    );

    let ring = worker::ring::Ring::new(&["a", "b"], worker::ring::DEFAULT_VNODES);
    let on = |shard: &str, skip: usize| {
        (0..10_000u64)
            .filter(|&id| ring.shard_name_of(id) == shard)
            .nth(skip)
            .expect("an id on the shard")
    };
    let client = env.client().await;
    // Settle the shard pools before taking the baseline.
    env.append(&client, on("a", 0), "before", Some("before-a"))
        .await;
    env.append(&client, on("b", 0), "before", Some("before-b"))
        .await;
    let baseline = worker.open_fds();
    assert_eq!(http_sockets(&worker), 0, "no HTTP connection open yet");

    // Opened one after another: a concurrent burst would mostly test the listen backlog.
    let opened = Instant::now();
    let mut idle: Vec<TcpStream> = within(30, "open the idle connections", async {
        let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
        for i in 0..IDLE_CONNECTIONS {
            let stream = TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
            idle.push(stream);
        }
        idle
    })
    .await;
    println!(
        "opened {IDLE_CONNECTIONS} idle connections in {:?}",
        opened.elapsed()
    );

    // A fresh request is answered promptly although 2,000 sockets sit idle.
    let asked = Instant::now();
    let readyz = within(
        1,
        "/readyz under idle connections",
        http_get(addr, "/readyz"),
    )
    .await;
    println!("/readyz answered in {:?}", asked.elapsed());
    assert!(
        matches!(readyz, Some((200, _))),
        "/readyz under idle connections: {readyz:?}"
    );
    let (status, metrics) = within(
        1,
        "/metrics under idle connections",
        http_get(addr, "/metrics"),
    )
    .await
    .expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(metrics.contains("logstore_shard_up"), "{metrics}");

    let check_bounded = |when: &str| {
        let (fds, sockets) = (worker.open_fds(), http_sockets(&worker));
        println!("{when}: {fds} descriptors (baseline {baseline}), {sockets} HTTP connections");
        assert!(
            sockets <= MAX_CONNECTIONS,
            "{when}: {sockets} HTTP connections open, cap {MAX_CONNECTIONS}"
        );
        assert!(
            fds <= baseline + MAX_CONNECTIONS + 32 && fds < WORKER_NOFILE as usize / 2,
            "{when}: {fds} descriptors open (baseline {baseline})"
        );
    };
    check_bounded("with the idle connections open");

    // The real job still works: appends (new pool connections may be needed) and a query, on
    // both shards.
    for i in 0..10 {
        for shard in ["a", "b"] {
            let id = on(shard, 1 + i);
            let reply = env
                .append(&client, id, "during", Some(&format!("during-{i}")))
                .await;
            assert_eq!((reply.id, reply.seq, reply.duplicate), (id, 1, false));
        }
    }
    let logs = entries(&env.query_all(&client, on("a", 0)).await);
    assert_eq!(logs.len(), 1);
    check_bounded("after appends and a query");

    // The worker made room by closing the oldest connections: the first one is at EOF.
    let first = idle.first_mut().expect("a first idle connection");
    let mut byte = [0u8; 1];
    let read = within(
        1,
        "the oldest idle connection was closed",
        first.read(&mut byte),
    )
    .await;
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "the oldest idle connection is still open: {read:?}"
    );

    // The header-read timeout closes a connection that never sends a byte, and a kept-alive
    // connection idle after a request, both about HEADER_READ_TIMEOUT after their last request.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let silent_since = Instant::now();
    let mut kept = TcpStream::connect(addr).await.expect("connect");
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("send a keep-alive request");
    let mut answer = Vec::new();
    within(2, "the keep-alive answer", async {
        while !answer.ends_with(b"\r\n\r\nok\n") {
            let mut chunk = [0u8; 512];
            let n = kept.read(&mut chunk).await.expect("read the answer");
            assert!(n > 0, "closed before the answer");
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let kept_since = Instant::now();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    // Sized, not chunked: tracking the request in progress must not change the framing.
    assert!(
        answer.starts_with("http/1.1 200") && answer.contains("content-length: 3\r\n"),
        "{answer}"
    );
    let bound = HEADER_READ_TIMEOUT.as_secs() + 3;
    let silent_closed = within(
        bound,
        "the silent connection is closed",
        closed(&mut silent),
    )
    .await;
    let kept_closed = within(
        bound,
        "the kept-alive connection is closed",
        closed(&mut kept),
    )
    .await;
    let (silent_for, kept_for) = (silent_closed - silent_since, kept_closed - kept_since);
    println!("silent connection closed after {silent_for:?}, kept-alive after {kept_for:?}");
    for (what, after) in [("silent", silent_for), ("kept-alive", kept_for)] {
        assert!(
            after >= HEADER_READ_TIMEOUT - Duration::from_millis(500),
            "{what} connection closed after {after:?}, before the timeout"
        );
    }

    // Every descriptor those connections took is released, while the test still holds its ends
    // open: the worker's timeout closed them, not the clients.
    eventually(5, "the idle connections' descriptors are released", || {
        let (fds, sockets) = (worker.open_fds(), http_sockets(&worker));
        async move { (sockets == 0 && fds <= baseline + 16).then_some((fds, sockets)) }
    })
    .await;
    println!("released: {} descriptors open", worker.open_fds());
    let readyz = within(1, "/readyz after the release", http_get(addr, "/readyz")).await;
    assert!(matches!(readyz, Some((200, _))), "{readyz:?}");
    drop(idle);
    worker.kill().await;
}

/// Wait until the peer closes `stream` (EOF or reset); returns when.
async fn closed(stream: &mut TcpStream) -> Instant {
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) => {}
        }
    }
}

/// The worker's accepted HTTP connections: its socket descriptors whose TCP socket has the
/// metrics port as local port and is not the listener.
fn http_sockets(worker: &WorkerProcess) -> usize {
    let pid = worker.pid();
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read the worker's descriptors")
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.ok()?.path()).ok()?;
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let port = format!("{:04X}", worker.metrics.port());
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).expect("read net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local address, state (0A = LISTEN), inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                return false;
            };
            local.ends_with(&format!(":{port}")) && *state != "0A" && inodes.contains(*inode)
        })
        .count()
}
