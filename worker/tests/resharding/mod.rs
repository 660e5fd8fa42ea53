//! The online resharding harness shared by reshard.rs and fleet_identity.rs: a world of two
//! shards every worker knows and a third (pg3) on a server of its own, publishers whose every
//! acknowledged append is recorded in a ledger, a reader that checks every answer while objects
//! move, `worker shards …` and the checks of what the databases hold once a move is over (see
//! reshard.rs's module documentation).

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use futures::StreamExt;
use logstore_protocol::client::{read_answer, AnswerError};
use logstore_protocol::{AppendReply, ErrorCode, LogEntry, Timestamp};
use serde_json::Value;
use tokio::task::JoinHandle;
use worker::ring::{Ring, DEFAULT_VNODES};

use crate::support::*;

/// Objects 1..=OBJECTS get appends.
pub const OBJECTS: u64 = 2_000;
/// The shards every worker is configured with.
pub const OLD: [&str; 2] = ["pg1", "pg2"];
/// The ring once pg3 is added.
pub const NEW: [&str; 3] = ["pg1", "pg2", "pg3"];
/// Concurrent publishers, each one append at a time, one every `PACE` at most.
pub const PUBLISHERS: usize = 4;
pub const PACE: Duration = Duration::from_millis(8);
/// Old copies are purged this soon after the last object moved.
pub const MOVE_GRACE_MS: &str = "1000";
/// Old keys re-sent after each move.
pub const RESENT: usize = 500;

// ---------------------------------------------------------------------------------------------
// The world: two shards every worker knows, and pg3 on a server of its own
// ---------------------------------------------------------------------------------------------

pub struct World {
    /// pg1 and pg2: the configuration every worker (and the CLI) is given.
    pub env: Env,
    /// The server of the new shard, pg3.
    pub pg3: PgServer,
    pub pg3_url: String,
    pub move_rate: String,
}

impl World {
    pub async fn new(intake: &'static str, move_rate: u32) -> World {
        let pg3 = PgServer::start();
        let mut env = Env::shared(&OLD).await;
        env.intake = intake;
        let pg3_url = fresh_db(&pg3, "pg3").await;
        World {
            env,
            pg3,
            pg3_url,
            move_rate: move_rate.to_string(),
        }
    }

    /// The move settings, on every worker (any of them may become the mover).
    pub fn extra(&self) -> [(&str, &str); 2] {
        [
            ("MOVE_RATE", self.move_rate.as_str()),
            ("MOVE_GRACE_MS", MOVE_GRACE_MS),
        ]
    }

    pub fn spawn_worker(&self) -> WorkerProcess {
        WorkerCommand::new(&self.env).extra(&self.extra()).spawn()
    }

    pub async fn start_worker(&self) -> WorkerProcess {
        WorkerCommand::new(&self.env)
            .extra(&self.extra())
            .start()
            .await
    }

    pub async fn start_workers(&self, n: usize) -> Vec<WorkerProcess> {
        let mut workers = Vec::new();
        for _ in 0..n {
            workers.push(self.start_worker().await);
        }
        workers
    }

    /// All three databases, for reading back (pg3 is never in a worker's configuration).
    pub fn all_shards(&self) -> Vec<(String, String)> {
        let mut shards = self.env.shards.clone();
        shards.push(("pg3".to_string(), self.pg3_url.clone()));
        shards
    }
}

/// The objects whose owner differs between the rings `a` and `b`.
pub fn changed_owner(a: &[&str], b: &[&str]) -> HashSet<u64> {
    let (a, b) = (Ring::new(a, DEFAULT_VNODES), Ring::new(b, DEFAULT_VNODES));
    (1..=OBJECTS)
        .filter(|id| a.shard_name_of(*id) != b.shard_name_of(*id))
        .collect()
}

/// The first `n` objects that move and the first `n` that stay, interleaved.
pub fn mixed(moving: &HashSet<u64>, n: usize) -> Vec<u64> {
    let (moves, stays): (Vec<u64>, Vec<u64>) = (1..=OBJECTS).partition(|id| moving.contains(id));
    assert!(moves.len() >= n && stays.len() >= n, "{n} of each");
    moves
        .iter()
        .zip(&stays)
        .take(n)
        .flat_map(|(a, b)| [*a, *b])
        .collect()
}

// ---------------------------------------------------------------------------------------------
// What was acknowledged
// ---------------------------------------------------------------------------------------------

/// Per object, every entry known to be stored: seq -> (ts in µs, key when known).
pub type Confirmed = BTreeMap<u64, (i64, Option<String>)>;

#[derive(Default)]
pub struct Ledger {
    /// Every acknowledged append (core: its reply; JetStream: its PubAck): key -> object. The
    /// key is also the entry's log text.
    pub acked: HashMap<String, u64>,
    /// Per object, the entries known to be stored (core: the replies; JetStream: the workers'
    /// `appended.<id>` events, published after commit).
    pub stored: HashMap<u64, Confirmed>,
    /// How many entries `stored` holds.
    pub confirmed: usize,
}

pub type LedgerRef = Arc<Mutex<Ledger>>;

pub fn lock(ledger: &LedgerRef) -> MutexGuard<'_, Ledger> {
    ledger.lock().expect("the ledger lock")
}

impl Ledger {
    pub fn ack(&mut self, key: &str, id: u64) {
        if let Some(other) = self.acked.insert(key.to_string(), id) {
            assert_eq!(other, id, "{key} acknowledged for two objects");
        }
    }

    /// Entry `seq` of object `id` is stored with `ts` (and is the append with `key`).
    pub fn confirm(&mut self, id: u64, seq: u64, ts: &str, key: Option<&str>) {
        let ts = micros(ts);
        let entries = self.stored.entry(id).or_default();
        match entries.get_mut(&seq) {
            None => {
                entries.insert(seq, (ts, key.map(str::to_string)));
                self.confirmed += 1;
            }
            Some((known_ts, known_key)) => {
                assert_eq!(
                    *known_ts, ts,
                    "object {id}: seq {seq} acknowledged with two timestamps"
                );
                match (known_key.as_deref(), key) {
                    (Some(a), Some(b)) => {
                        assert_eq!(a, b, "object {id}: seq {seq} acknowledged for two appends")
                    }
                    (None, Some(b)) => *known_key = Some(b.to_string()),
                    _ => {}
                }
            }
        }
    }
}

pub fn micros(ts: &str) -> i64 {
    Timestamp::parse(ts)
        .unwrap_or_else(|e| panic!("bad timestamp {ts:?}: {e}"))
        .micros()
}

pub fn system_micros(ts: SystemTime) -> i64 {
    Timestamp::from_system_time(ts).micros()
}

/// JetStream intake: record the workers' append events (each sent after its entry committed)
/// as confirmations, until the returned task is aborted.
pub async fn listen_for_events(
    env: &Env,
    client: &async_nats::Client,
    ledger: &LedgerRef,
) -> JoinHandle<()> {
    let mut events = client
        .subscribe(format!("{}.>", env.subject("appended")))
        .await
        .expect("subscribe to the append events");
    client.flush().await.expect("flush");
    let ledger = ledger.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let Ok(reply) = serde_json::from_slice::<AppendReply>(&event.payload) {
                lock(&ledger).confirm(reply.id, reply.seq, &reply.ts, None);
            }
        }
    })
}

/// Waits until `more` entries beyond those confirmed now are confirmed stored.
pub async fn wait_stored(ledger: &LedgerRef, more: usize, what: &str) {
    let target = lock(ledger).confirmed + more;
    eventually(60, what, || async {
        (lock(ledger).confirmed >= target).then_some(())
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Appending
// ---------------------------------------------------------------------------------------------

/// Core request-reply append of `key` (also its log text) to `id`, retried with the same key
/// after an error reply that says "try again" or no reply at all, until a reply says stored or
/// duplicate. Returns the reply and the number of attempts.
pub async fn append_core(
    client: &async_nats::Client,
    subject: &str,
    id: u64,
    key: &str,
) -> (AppendReply, u32) {
    let body = append_body(id, key, Some(key));
    within(
        90,
        &format!("append {key} to object {id} answered"),
        async {
            let mut attempts = 0;
            loop {
                attempts += 1;
                let answer = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.request(subject.to_string(), body.clone()),
                )
                .await;
                if let Ok(Ok(message)) = answer {
                    match parse_reply(&message.payload) {
                        Ok(reply) => {
                            assert_eq!(reply.id, id, "{key}: a reply for another object");
                            return (reply, attempts);
                        }
                        Err(refused) => assert!(
                            matches!(
                                refused.error.code,
                                ErrorCode::Unavailable
                                    | ErrorCode::Busy
                                    | ErrorCode::Timeout
                                    | ErrorCode::Internal
                            ),
                            "{key} to object {id} refused: {}",
                            refused.error
                        ),
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
    .await
}

/// JetStream append of `key` to `id` (the key in the body, and as `Nats-Msg-Id` when
/// `msg_id`), retried with the same body until the stream acknowledges it.
pub async fn append_js(js: &jetstream::Context, subject: &str, id: u64, key: &str, msg_id: bool) {
    let body = append_body(id, key, Some(key));
    within(90, &format!("PubAck of {key}"), async {
        loop {
            let mut headers = async_nats::HeaderMap::new();
            if msg_id {
                headers.insert("Nats-Msg-Id", key);
            }
            if let Ok(ack) = js
                .publish_with_headers(subject.to_string(), headers, body.clone())
                .await
            {
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), ack).await {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

/// One append through this env's intake, recorded in the ledger once acknowledged.
pub async fn append_acked(
    env: &Env,
    client: &async_nats::Client,
    js: &jetstream::Context,
    ledger: &LedgerRef,
    id: u64,
    key: &str,
) {
    if env.intake == "jetstream" {
        append_js(js, &env.subject("logs"), id, key, true).await;
        lock(ledger).ack(key, id);
    } else {
        let (reply, attempts) = append_core(client, &env.subject("logs"), id, key).await;
        assert!(
            !reply.duplicate || attempts > 1,
            "{key}: a key never sent before answered as a duplicate: {reply:?}"
        );
        let mut ledger = lock(ledger);
        ledger.ack(key, id);
        ledger.confirm(id, reply.seq, &reply.ts, Some(key));
    }
}

/// One entry in every object, before anything moves.
pub async fn seed(env: &Env, client: &async_nats::Client, ledger: &LedgerRef) {
    let js = jetstream::new(client.clone());
    within(
        120,
        "a first append to every object acknowledged",
        futures::stream::iter(1..=OBJECTS).for_each_concurrent(64, |id| {
            let js = &js;
            async move { append_acked(env, client, js, ledger, id, &format!("seed-{id}")).await }
        }),
    )
    .await;
    let dbs = connect_all(&env.shards).await;
    eventually(60, "every object's first entry stored", || async {
        (count(&dbs, "SELECT count(DISTINCT object_id) FROM logs").await >= OBJECTS as i64)
            .then_some(())
    })
    .await;
}

/// Publishers appending until stopped: every other append goes round all objects, the others
/// to `hot` objects (some that move, some that stay), so that objects are appended to while
/// they move.
pub struct Load {
    pub stop: Arc<AtomicBool>,
    pub publishers: Vec<JoinHandle<usize>>,
}

pub fn start_load(
    env: &Env,
    client: &async_nats::Client,
    ledger: &LedgerRef,
    tag: &str,
    hot: &[u64],
) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let publishers = (0..PUBLISHERS)
        .map(|p| {
            let (env, client, ledger, stop) =
                (env.clone(), client.clone(), ledger.clone(), stop.clone());
            let (tag, hot) = (tag.to_string(), hot.to_vec());
            tokio::spawn(async move {
                let js = jetstream::new(client.clone());
                let mut pace = tokio::time::interval(PACE);
                pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut sent = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    pace.tick().await;
                    let round = sent / 2 * PUBLISHERS + p;
                    let id = if sent.is_multiple_of(2) {
                        round as u64 % OBJECTS + 1
                    } else {
                        hot[round % hot.len()]
                    };
                    let key = format!("{tag}-p{p}-{sent}");
                    append_acked(&env, &client, &js, &ledger, id, &key).await;
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    Load { stop, publishers }
}

impl Load {
    /// Stops the publishers (each finishes the append it is on) and returns how many appends
    /// they had acknowledged.
    pub async fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let mut sent = 0;
        for publisher in self.publishers {
            sent += within(120, "a publisher stops", publisher)
                .await
                .expect("publisher");
        }
        sent
    }
}

// ---------------------------------------------------------------------------------------------
// Reading while objects move
// ---------------------------------------------------------------------------------------------

/// Whether every query must be answered (nothing is broken), or may fail (a worker killed, a
/// shard down). An answer must be complete either way.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Answers {
    Always,
    MayFail,
}

#[derive(Debug, Default)]
pub struct ReadStats {
    /// Queries answered and checked.
    pub answered: usize,
    /// Of those, sent while a move ran.
    pub answered_while_moving: usize,
    /// Queries not answered (only with `Answers::MayFail`).
    pub unanswered: usize,
}

pub struct Reader {
    pub stop: Arc<AtomicBool>,
    pub task: JoinHandle<ReadStats>,
}

/// Queries `ids` round and round; before each query takes what the ledger says is stored for
/// that object, and checks the answer holds all of it (same seq, same ts, same entry).
pub fn start_reader(
    env: &Env,
    client: &async_nats::Client,
    ledger: &LedgerRef,
    ids: Vec<u64>,
    answers: Answers,
    moving: &Arc<AtomicBool>,
) -> Reader {
    let stop = Arc::new(AtomicBool::new(false));
    let (env, client, ledger, moving, stopped) = (
        env.clone(),
        client.clone(),
        ledger.clone(),
        moving.clone(),
        stop.clone(),
    );
    let task = tokio::spawn(async move {
        let secs = match answers {
            Answers::Always => 10,
            Answers::MayFail => 5,
        };
        let mut pace = tokio::time::interval(Duration::from_millis(5));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stats = ReadStats::default();
        for id in ids.iter().cycle() {
            if stopped.load(Ordering::Relaxed) {
                break;
            }
            pace.tick().await;
            let during_move = moving.load(Ordering::Relaxed);
            let known = lock(&ledger).stored.get(id).cloned().unwrap_or_default();
            match read_object(&client, &env, *id, secs).await {
                Ok(got) => {
                    check_read(*id, &known, &got);
                    stats.answered += 1;
                    stats.answered_while_moving += usize::from(during_move);
                }
                Err(why) => {
                    assert_eq!(
                        answers,
                        Answers::MayFail,
                        "query of object {id} not answered: {why}"
                    );
                    stats.unanswered += 1;
                }
            }
        }
        stats
    });
    Reader { stop, task }
}

impl Reader {
    pub async fn stop(self) -> ReadStats {
        self.stop.store(true, Ordering::Relaxed);
        within(60, "the reader stops", self.task)
            .await
            .expect("reader")
    }
}

/// An object's whole log by a query with a reply subject, or why there was no complete answer
/// (an error reply, or none within `secs`).
pub async fn read_object(
    client: &async_nats::Client,
    env: &Env,
    id: u64,
    secs: u64,
) -> Result<Vec<LogEntry>, String> {
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    client
        .publish_with_reply(
            env.subject("query"),
            inbox,
            serde_json::json!({ "id": id }).to_string().into(),
        )
        .await
        .map_err(|e| format!("publish: {e}"))?;
    let limit = Duration::from_secs(secs);
    match tokio::time::timeout(limit, read_answer(&mut replies, limit)).await {
        Ok(Ok(chunks)) => {
            for chunk in &chunks {
                assert_eq!(chunk.id, id, "an answer about another object");
            }
            Ok(entries(&chunks))
        }
        Ok(Err(AnswerError::OutOfOrder { got, expected })) => {
            panic!("object {id}: chunks out of order: chunk {got} where {expected} was due")
        }
        Ok(Err(AnswerError::Refused { payload, .. }))
        | Ok(Err(AnswerError::Undecodable { payload, .. })) => {
            Err(String::from_utf8_lossy(&payload).into_owned())
        }
        Ok(Err(AnswerError::Closed)) => Err("the reply subscription ended".to_string()),
        // A no-responders status has an empty body, which is what was returned for it.
        Ok(Err(AnswerError::NoResponders)) => Err(String::new()),
        Ok(Err(AnswerError::TimedOut { .. })) | Err(_) => {
            Err(format!("no complete answer within {secs} s"))
        }
    }
}

/// An answer is one whole copy of the object (seqs 1..=n, no gap), holding every entry known
/// to be stored before the query was sent.
pub fn check_read(id: u64, known: &Confirmed, got: &[LogEntry]) {
    for (i, entry) in got.iter().enumerate() {
        assert_eq!(
            entry.seq,
            i as u64 + 1,
            "object {id}: a query answered seqs {:?} (half an object, or a gap)",
            got.iter().map(|e| e.seq).collect::<Vec<_>>()
        );
    }
    for (seq, (ts, key)) in known {
        let entry = got.get(*seq as usize - 1).unwrap_or_else(|| {
            panic!(
                "object {id}: a query sent after seq {seq} ({key:?}) was acknowledged answered \
                 only {} entries",
                got.len()
            )
        });
        assert_eq!(
            micros(&entry.ts),
            *ts,
            "object {id}: seq {seq} read back with another ts"
        );
        if let Some(key) = key {
            assert_eq!(
                &entry.log, key,
                "object {id}: seq {seq} read back as another entry"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `worker shards …`
// ---------------------------------------------------------------------------------------------

/// `worker shards ARGS` with the workers' own (old, two-shard) settings.
pub async fn shards_cli(env: &Env, args: &[&str]) -> (Option<i32>, String, String) {
    let mut full = vec!["shards"];
    full.extend_from_slice(args);
    run_once("worker", &full, &env.settings(free_port()), 30).await
}

/// `worker shards status --json`: its exit code (0 steady, 3 moving or purging, checked
/// against the state it prints) and its JSON line; None when it failed (exit 1).
pub async fn status(env: &Env) -> Option<(i32, Value)> {
    let (code, stdout, stderr) = shards_cli(env, &["status", "--json"]).await;
    let code = code?;
    if code == 1 {
        return None;
    }
    let line = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_else(|| panic!("status --json printed nothing (exit {code}): {stderr}"));
    let json: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("status --json printed no JSON ({e}): {stdout}"));
    let state = json["ring"]["state"].as_str().unwrap_or_default();
    match code {
        0 => assert_eq!(state, "steady", "exit 0 with {json}"),
        3 => assert!(matches!(state, "moving" | "purging"), "exit 3 with {json}"),
        other => panic!("status exits {other}: {stdout}\n{stderr}"),
    }
    Some((code, json))
}

/// Waits (at most `secs`) until `worker shards status` exits 0, and returns its JSON.
pub async fn wait_steady(env: &Env, secs: u64) -> Value {
    eventually(
        secs,
        "the move finishes: `worker shards status` exits 0",
        || async {
            match status(env).await {
                Some((0, json)) => Some(json),
                _ => {
                    // Each poll is a process: not more often than this.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    None
                }
            }
        },
    )
    .await
}

/// The sorted names of a `members` (or `previous`) array.
pub fn member_names(members: &Value) -> Vec<String> {
    let mut names: Vec<String> = members
        .as_array()
        .unwrap_or_else(|| panic!("not a member list: {members}"))
        .iter()
        .map(|member| {
            assert!(
                member["url"].as_str().is_some_and(|url| !url.is_empty()),
                "a member without a url: {member}"
            );
            member["name"]
                .as_str()
                .unwrap_or_else(|| panic!("a member without a name: {member}"))
                .to_string()
        })
        .collect();
    names.sort();
    names
}

pub fn sorted(names: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    names.sort();
    names
}

/// A steady ring record at `epoch` with `members` (and no progress of another move).
pub fn assert_steady(json: &Value, epoch: u64, members: &[&str]) {
    let ring = &json["ring"];
    assert_eq!(ring["state"], "steady", "{json}");
    assert_eq!(ring["epoch"].as_u64(), Some(epoch), "{json}");
    assert_eq!(member_names(&ring["members"]), sorted(members), "{json}");
    assert_eq!(
        ring["vnodes"].as_u64(),
        Some(u64::from(DEFAULT_VNODES)),
        "{json}"
    );
    let progress = &json["progress"];
    assert!(
        progress.is_null() || progress["epoch"].as_u64() == Some(epoch),
        "steady, with the progress of another move: {json}"
    );
}

/// Right after `add`/`remove`: status says a move to `epoch` runs, from `previous` to `members`.
pub async fn assert_moving(env: &Env, epoch: u64, members: &[&str], previous: &[&str]) {
    let (code, json) = status(env)
        .await
        .expect("`worker shards status --json` answers");
    assert_eq!(code, 3, "a move just started: {json}");
    let ring = &json["ring"];
    assert_eq!(ring["epoch"].as_u64(), Some(epoch), "{json}");
    assert_eq!(member_names(&ring["members"]), sorted(members), "{json}");
    assert_eq!(member_names(&ring["previous"]), sorted(previous), "{json}");
    let progress = &json["progress"];
    assert!(
        progress.is_null() || progress["epoch"].as_u64() == Some(epoch),
        "progress of another move: {json}"
    );
    // The human form says the same with its exit code.
    let (code, stdout, stderr) = shards_cli(env, &["status"]).await;
    assert_eq!(
        code,
        Some(3),
        "`worker shards status` while moving:\n{stdout}\n{stderr}"
    );
    assert!(
        !stdout.trim().is_empty(),
        "`worker shards status` printed nothing"
    );
}

/// `worker shards add NAME=URL` starts a move to `epoch` and says so.
/// Appends on every object (a share of them on objects the move changes) and a reader checking
/// its answers; once `stored` more appends are in, the reader counts its answers as during the
/// move, and pg3 is added (epoch 2, moving from the 2-shard ring).
pub async fn add_pg3_under_load(
    world: &World,
    client: &async_nats::Client,
    ledger: &LedgerRef,
    moving_ids: &HashSet<u64>,
    answers: Answers,
    stored: usize,
) -> (Load, Reader, Arc<AtomicBool>) {
    let env = &world.env;
    let load = start_load(env, client, ledger, "load", &mixed(moving_ids, 16));
    let moving = Arc::new(AtomicBool::new(false));
    let reader = start_reader(
        env,
        client,
        ledger,
        mixed(moving_ids, 100),
        answers,
        &moving,
    );
    wait_stored(ledger, stored, "appends being stored before the add").await;
    moving.store(true, Ordering::Relaxed);
    add_shard(env, "pg3", &world.pg3_url, 2).await;
    assert_moving(env, 2, &NEW, &OLD).await;
    (load, reader, moving)
}

/// Wait for the change to epoch `epoch` (members `members`) to finish, stop the reader (it must
/// have checked answers during the move) and then, once every worker routes by that epoch and
/// none moves anything, the load.
pub async fn finish_move(
    env: &Env,
    workers: &[WorkerProcess],
    epoch: u64,
    members: &[&str],
    (load, reader, moving): (Load, Reader, Arc<AtomicBool>),
) {
    let done = wait_steady(env, 60).await;
    moving.store(false, Ordering::Relaxed);
    assert_steady(&done, epoch, members);
    let read = reader.stop().await;
    assert!(
        read.answered_while_moving >= 20,
        "the reader checked queries during the move to epoch {epoch}: {read:?}"
    );
    wait_epoch(workers, epoch).await;
    wait_no_mover(workers).await;
    load.stop().await;
}

pub async fn add_shard(env: &Env, name: &str, url: &str, epoch: u64) {
    let (code, stdout, stderr) = shards_cli(env, &["add", &format!("{name}={url}")]).await;
    assert_eq!(
        code,
        Some(0),
        "`worker shards add {name}`:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&epoch.to_string()),
        "`worker shards add` prints the new epoch {epoch}: {stdout}"
    );
}

/// `worker shards ARGS` is refused (a non-zero exit).
pub async fn assert_refused(env: &Env, args: &[&str], why: &str) {
    let (code, stdout, stderr) = shards_cli(env, args).await;
    assert!(
        matches!(code, Some(c) if c != 0),
        "`worker shards {args:?}` must be refused ({why}), exit {code:?}:\n{stdout}\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// `name{labels}` on each worker, in order; None when one of them does not answer.
pub async fn each_worker(
    workers: &[WorkerProcess],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<Vec<f64>> {
    let mut values = Vec::new();
    for worker in workers {
        match http_get(worker.metrics, "/metrics").await? {
            (200, body) => values.push(metric_sum(&body, name, labels)),
            _ => return None,
        }
    }
    Some(values)
}

pub async fn fleet_sum(
    workers: &[WorkerProcess],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    Some(each_worker(workers, name, labels).await?.iter().sum())
}

/// Waits until every worker routes by `epoch`.
pub async fn wait_epoch(workers: &[WorkerProcess], epoch: u64) {
    eventually(
        30,
        &format!("every worker routes by epoch {epoch}"),
        || async {
            let epochs = each_worker(workers, "logstore_ring_epoch", &[]).await?;
            epochs.iter().all(|e| *e == epoch as f64).then_some(())
        },
    )
    .await
}

/// Waits until no worker performs a move.
pub async fn wait_no_mover(workers: &[WorkerProcess]) {
    eventually(30, "no worker moves objects any more", || async {
        (fleet_sum(workers, "logstore_move_running", &[]).await? == 0.0).then_some(())
    })
    .await
}

pub const MOVED: (&str, &str) = ("state", "moved");

// ---------------------------------------------------------------------------------------------
// The databases
// ---------------------------------------------------------------------------------------------

pub type Dbs = Vec<(String, tokio_postgres::Client)>;

pub async fn connect_all(shards: &[(String, String)]) -> Dbs {
    let mut dbs = Vec::new();
    for (name, url) in shards {
        dbs.push((name.clone(), pg_connect(url).await));
    }
    dbs
}

/// The sum of a `SELECT count(…)` over the databases.
pub async fn count(dbs: &Dbs, sql: &str) -> i64 {
    let mut total = 0;
    for (name, db) in dbs {
        let n: i64 = db
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{name}: {sql}: {e}"))
            .get(0);
        total += n;
    }
    total
}

/// What the databases hold once a move is over.
pub struct Placement {
    /// The shard each object lives on (its live head row and all its entries).
    pub shard_of: HashMap<u64, String>,
    /// Every stored entry by key: (object, seq).
    pub keys: HashMap<String, (u64, u64)>,
}

/// Waits until every acknowledged append is stored, then checks the databases against the
/// ring of `members` (see the module documentation) and against what the ledger says was
/// acknowledged as stored (same seq, same ts).
pub async fn verify(
    shards: &[(String, String)],
    members: &[&str],
    ledger: &LedgerRef,
) -> Placement {
    let ring = Ring::new(members, DEFAULT_VNODES);
    let dbs = connect_all(shards).await;
    let (acked, stored) = {
        let ledger = lock(ledger);
        (ledger.acked.clone(), ledger.stored.clone())
    };
    eventually(60, "every acknowledged append stored", || async {
        (count(&dbs, "SELECT count(*) FROM logs").await >= acked.len() as i64).then_some(())
    })
    .await;

    // Entries: each acknowledged key once, on its object, each object on one shard.
    let mut keys: HashMap<String, (u64, u64)> = HashMap::new();
    let mut logs: HashMap<u64, Vec<(u64, SystemTime, String)>> = HashMap::new();
    let mut entries_on: HashMap<u64, String> = HashMap::new();
    for (shard, db) in &dbs {
        let rows = db
            .query("SELECT object_id, seq, ts, key, log FROM logs", &[])
            .await
            .unwrap_or_else(|e| panic!("{shard}: read logs: {e}"));
        for row in rows {
            let (id, seq, ts, key, log): (i64, i64, SystemTime, Option<String>, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            let (id, seq) = (id as u64, seq as u64);
            let key = key.unwrap_or_else(|| {
                panic!("{shard}: object {id} seq {seq} ({log}) stored without its key")
            });
            assert_eq!(log, key, "{shard}: object {id} seq {seq}");
            assert_eq!(
                acked.get(&key),
                Some(&id),
                "{shard}: {key} stored in object {id}, never acknowledged for it"
            );
            if let Some((other, other_seq)) = keys.insert(key.clone(), (id, seq)) {
                panic!("{key} stored twice: object {other} seq {other_seq}, and {shard} seq {seq}");
            }
            match entries_on.get(&id) {
                Some(other) if other != shard => {
                    panic!("object {id} has entries on both {other} and {shard}")
                }
                Some(_) => {}
                None => {
                    entries_on.insert(id, shard.clone());
                }
            }
            logs.entry(id).or_default().push((seq, ts, key));
        }
    }
    for (key, id) in &acked {
        assert!(
            keys.contains_key(key),
            "object {id}: acknowledged {key} lost"
        );
    }
    assert_eq!(
        keys.len(),
        acked.len(),
        "entries stored vs appends acknowledged"
    );

    // Per object: seq gapless from 1, ts never decreasing, on the shard the ring names, and
    // every entry acknowledged as stored still at its seq with its ts.
    for (id, entries) in logs.iter_mut() {
        entries.sort_by_key(|(seq, _, _)| *seq);
        for (i, (seq, _, _)) in entries.iter().enumerate() {
            assert_eq!(*seq, i as u64 + 1, "object {id}: seq gap");
        }
        for pair in entries.windows(2) {
            assert!(
                pair[0].1 <= pair[1].1,
                "object {id}: ts decreases at seq {}",
                pair[1].0
            );
        }
        let shard = &entries_on[id];
        assert_eq!(
            shard,
            ring.shard_name_of(*id),
            "object {id} lives on {shard}, the ring {members:?} names {}",
            ring.shard_name_of(*id)
        );
        for (seq, (ts, key)) in stored.get(id).into_iter().flatten() {
            let (_, stored_ts, stored_key) = entries
                .get(*seq as usize - 1)
                .unwrap_or_else(|| panic!("object {id}: acknowledged seq {seq} lost"));
            assert_eq!(system_micros(*stored_ts), *ts, "object {id}: seq {seq} ts");
            if let Some(key) = key {
                assert_eq!(stored_key, key, "object {id}: seq {seq} is another entry");
            }
        }
    }

    // Head rows: one live head per object, where its entries are, matching them; tombstones
    // (moved_to set) hold no entries.
    let mut shard_of: HashMap<u64, String> = HashMap::new();
    for (shard, db) in &dbs {
        let heads = db
            .query(
                "SELECT id, entries, last_seq, last_ts, moved_to FROM objects",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{shard}: read head rows: {e}"));
        for row in heads {
            let (id, n_entries, last_seq, last_ts, moved_to): (
                i64,
                i64,
                i64,
                SystemTime,
                Option<String>,
            ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            let id = id as u64;
            if let Some(to) = moved_to {
                assert_ne!(
                    entries_on.get(&id),
                    Some(shard),
                    "{shard}: object {id} moved to {to}, its entries are still here"
                );
                continue;
            }
            if let Some(other) = shard_of.insert(id, shard.clone()) {
                panic!("object {id} is live on both {other} and {shard}");
            }
            assert_eq!(
                entries_on.get(&id),
                Some(shard),
                "{shard}: live head row of object {id}, its entries elsewhere"
            );
            let entries = &logs[&id];
            let (last, last_time, _) = entries.last().expect("entries");
            assert_eq!(
                (n_entries, last_seq),
                (entries.len() as i64, *last as i64),
                "{shard}: head row of object {id} (entries, last_seq)"
            );
            assert_eq!(
                last_ts, *last_time,
                "{shard}: head row of object {id} last_ts"
            );
        }
    }
    for id in entries_on.keys() {
        assert!(
            shard_of.contains_key(id),
            "object {id}: entries without a live head row"
        );
    }
    for id in 1..=OBJECTS {
        assert!(shard_of.contains_key(&id), "object {id} lost");
    }
    assert_eq!(
        shard_of.len() as u64,
        OBJECTS,
        "objects never appended to exist"
    );
    Placement { shard_of, keys }
}

/// Adding pg3 moved the objects whose owner changed, about a third, all to pg3.
pub fn assert_a_third_moved(placement: &Placement) {
    let moved = changed_owner(&OLD, &NEW);
    let third = OBJECTS as f64 / 3.0;
    assert!(
        (moved.len() as f64 - third).abs() <= 0.2 * third,
        "{} of {OBJECTS} objects changed owner, not about a third",
        moved.len()
    );
    for id in &moved {
        assert_eq!(placement.shard_of[id], "pg3", "object {id} changed owner");
    }
    let on_pg3 = placement.shard_of.values().filter(|s| *s == "pg3").count();
    assert_eq!(
        on_pg3,
        moved.len(),
        "objects on pg3 vs objects whose owner changed"
    );
}

/// `k` items spread over `list`.
pub fn spread<T: Clone>(list: &[T], k: usize) -> Vec<T> {
    assert!(list.len() >= k, "{k} of {}", list.len());
    (0..k).map(|i| list[i * list.len() / k].clone()).collect()
}

/// Re-sends `RESENT` stored appends (same object, same key; half of them of objects in
/// `moved`): each is answered as a duplicate of the stored entry (core: the reply; JetStream,
/// which answers publishers itself: the worker's event), and no row is added.
pub async fn resend_old_keys(
    env: &Env,
    client: &async_nats::Client,
    shards: &[(String, String)],
    placement: &Placement,
    moved: &HashSet<u64>,
) {
    let mut all: Vec<(String, (u64, u64))> = placement
        .keys
        .iter()
        .map(|(key, at)| (key.clone(), *at))
        .collect();
    all.sort();
    let (of_moved, of_others): (Vec<_>, Vec<_>) =
        all.into_iter().partition(|(_, (id, _))| moved.contains(id));
    let mut chosen = spread(&of_moved, RESENT / 2);
    chosen.extend(spread(&of_others, RESENT - RESENT / 2));
    let dbs = connect_all(shards).await;
    let rows = count(&dbs, "SELECT count(*) FROM logs").await;
    let subject = env.subject("logs");
    if env.intake == "jetstream" {
        let expected: HashSet<(u64, u64)> = chosen.iter().map(|(_, at)| *at).collect();
        let mut events = client
            .subscribe(format!("{}.>", env.subject("appended")))
            .await
            .expect("subscribe to the append events");
        client.flush().await.expect("flush");
        let js = jetstream::new(client.clone());
        within(
            120,
            "old keys re-published",
            futures::stream::iter(&chosen).for_each_concurrent(32, |(key, (id, _))| {
                let (js, subject) = (&js, &subject);
                // Without Nats-Msg-Id: the stream takes it, the worker must recognise the key.
                async move { append_js(js, subject, *id, key, false).await }
            }),
        )
        .await;
        let mut remaining = expected.clone();
        within(60, "an event for every re-sent key", async {
            while !remaining.is_empty() {
                let event = events.next().await.expect("the event subscription");
                let reply: AppendReply =
                    serde_json::from_slice(&event.payload).expect("an append event");
                assert!(
                    reply.duplicate && expected.contains(&(reply.id, reply.seq)),
                    "a re-sent key stored anew: {reply:?}"
                );
                remaining.remove(&(reply.id, reply.seq));
            }
        })
        .await;
    } else {
        let duplicates = AtomicUsize::new(0);
        within(
            120,
            "old keys re-sent",
            futures::stream::iter(&chosen).for_each_concurrent(32, |(key, (id, seq))| {
                let (duplicates, subject) = (&duplicates, &subject);
                async move {
                    let (reply, _) = append_core(client, subject, *id, key).await;
                    assert!(reply.duplicate, "{key} re-sent, stored anew: {reply:?}");
                    assert_eq!(reply.seq, *seq, "{key}: a duplicate answers the stored seq");
                    duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }),
        )
        .await;
        assert_eq!(duplicates.load(Ordering::Relaxed), RESENT);
    }
    assert_eq!(
        count(&dbs, "SELECT count(*) FROM logs").await,
        rows,
        "re-sent keys added rows"
    );
}
