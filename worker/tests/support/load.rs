//! Load with a ledger, then the proof: publishers keep a ledger of every append the stream (or a
//! worker's reply) acknowledged ([`Acked`]); [`verify_stored`] waits until that many entries are
//! stored and checks each acknowledged append is stored exactly once, on the object it was sent
//! to, each object's seqs gapless from 1, and every shard's invariants;
//! [`assert_in_stream_order`] checks each object's entries keep the ledger's order. For loadgen
//! runs (which keep their own ledger and verify it), [`assert_loadgen_verified`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use futures::StreamExt;

use super::bins::report_num;
use super::db::check_shard_invariants;
use super::env::Env;
use super::{eventually, within};

/// One acknowledged append in a ledger: the object it was sent to, its place in the order it
/// must keep (the stream sequence for JetStream, the publisher's own counter for core), and its
/// log text (unique within a test, so it names the append).
pub type Acked = (u64, u64, String);

/// A stored entry, read from a shard database.
#[derive(Clone, Debug)]
pub struct Row {
    pub shard: String,
    pub id: u64,
    pub seq: u64,
    pub ts: SystemTime,
    pub log: String,
}

/// Publish `range` appends over `objects` ids through JetStream, 256 at a time, the log text
/// `{tag}-{i}` also serving as each one's Nats-Msg-Id; awaits every PubAck. A failed publish is
/// retried with the same id (the stream and the database both deduplicate it). `keyless`
/// publishes carry no id at all (the worker then uses the message's stream identity), so a
/// failure fails the test, as a retry could duplicate it.
pub async fn publish_concurrently(
    env: &Env,
    client: &async_nats::Client,
    tag: &str,
    range: std::ops::Range<u64>,
    objects: u64,
    keyless: bool,
) -> Vec<Acked> {
    let js = jetstream::new(client.clone());
    let subject = env.subject("logs");
    let appends: Vec<(u64, String)> = range
        .map(|i| (i % objects + 1, format!("{tag}-{i}")))
        .collect();
    within(
        300,
        "publishing through JetStream",
        futures::stream::iter(appends)
            .map(|(id, key)| {
                let (js, subject) = (js.clone(), subject.clone());
                async move {
                    let body = serde_json::json!({ "id": id, "log": key }).to_string();
                    let header = (!keyless).then_some(key.as_str());
                    let sequence = publish_until_acked(&js, &subject, header, body).await;
                    (id, sequence, key)
                }
            })
            .buffer_unordered(256)
            .collect(),
    )
    .await
}

/// Publish `body` on `subject` until the stream acknowledges it (at most 100 tries, 100 ms
/// apart: NATS may be restarting); its stream sequence. With a `key` (its Nats-Msg-Id) a retry
/// of a publish whose acknowledgement was lost is stored once all the same; without one, a
/// failure fails the test, as a retry could store it twice.
pub async fn publish_until_acked(
    js: &jetstream::Context,
    subject: &str,
    key: Option<&str>,
    body: String,
) -> u64 {
    let mut attempt = 0;
    loop {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(key) = key {
            headers.insert("Nats-Msg-Id", key);
        }
        let ack = match js
            .publish_with_headers(subject.to_string(), headers, body.clone().into())
            .await
        {
            Ok(ack) => tokio::time::timeout(Duration::from_secs(5), ack).await,
            Err(e) => Ok(Err(e)),
        };
        match ack {
            Ok(Ok(ack)) => return ack.sequence,
            other => {
                assert!(
                    key.is_some(),
                    "keyless publish failed ({other:?}); a retry could duplicate it"
                );
                attempt += 1;
                assert!(attempt < 100, "publish {key:?} keeps failing: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Objects every [`publish_in_turn`] publisher writes to, interleaved.
pub const OBJECTS: u64 = 8;

/// The object publisher `publisher`'s `i`th append goes to.
pub fn object_of(publisher: usize, i: usize) -> u64 {
    ((i * 7 + publisher * 3) as u64) % OBJECTS + 1
}

/// `n` appends, log text `p{publisher}-{i}` (also the Nats-Msg-Id), one at a time, each
/// waiting (at most 10 s) for its PubAck (`pace` apart, so the load spans the faults the tests
/// inject); counts each acknowledgement in `acked`. Returns what the stream acknowledged.
pub async fn publish_in_turn(
    client: async_nats::Client,
    subject: String,
    publisher: usize,
    n: usize,
    pace: Option<Duration>,
    acked: Arc<AtomicUsize>,
) -> Vec<Acked> {
    let js = jetstream::new(client);
    let mut sent = Vec::with_capacity(n);
    let mut ticker = pace.map(tokio::time::interval);
    for i in 0..n {
        if let Some(ticker) = ticker.as_mut() {
            ticker.tick().await;
        }
        let id = object_of(publisher, i);
        let log = format!("p{publisher}-{i}");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", log.as_str());
        let body = serde_json::json!({ "id": id, "log": log }).to_string();
        let ack = within(10, "PubAck", async {
            js.publish_with_headers(subject.clone(), headers, body.into())
                .await
                .expect("publish")
                .await
                .expect("PubAck")
        })
        .await;
        assert!(!ack.duplicate, "{log}: the stream took it for a duplicate");
        sent.push((id, ack.sequence, log));
        acked.fetch_add(1, Ordering::Relaxed);
    }
    sent
}

/// `ids.len()` publishers ([`publish_in_turn`], numbered by `ids`), each sending `n` appends.
pub fn spawn_publishers(
    env: &Env,
    client: &async_nats::Client,
    ids: std::ops::Range<usize>,
    n: usize,
    pace: Option<Duration>,
    acked: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Vec<Acked>>> {
    ids.map(|p| {
        tokio::spawn(publish_in_turn(
            client.clone(),
            env.subject("logs"),
            p,
            n,
            pace,
            acked.clone(),
        ))
    })
    .collect()
}

/// Everything the publishers acknowledged, each given at most `secs` to finish.
pub async fn join_publishers(
    publishers: Vec<tokio::task::JoinHandle<Vec<Acked>>>,
    secs: u64,
) -> Vec<Acked> {
    let mut sent = Vec::new();
    for publisher in publishers {
        sent.extend(
            within(secs, "publisher", publisher)
                .await
                .expect("publisher"),
        );
    }
    sent
}

/// Every entry on every shard. A shard that is down right now is skipped, and so is one that
/// has no table yet (before the first worker ran its migrations).
pub async fn stored_rows(env: &Env) -> Vec<Row> {
    let mut rows = Vec::new();
    for (name, url) in &env.shards {
        let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
        else {
            continue;
        };
        tokio::spawn(connection);
        let Ok(found) = client
            .query("SELECT object_id, seq, ts, log FROM logs", &[])
            .await
        else {
            continue;
        };
        for row in found {
            let (id, seq): (i64, i64) = (row.get(0), row.get(1));
            rows.push(Row {
                shard: name.clone(),
                id: id as u64,
                seq: seq as u64,
                ts: row.get(2),
                log: row.get(3),
            });
        }
    }
    rows
}

/// Wait (at most `secs`) until as many entries are stored as `acked` holds; then check each
/// acknowledged append is stored exactly once (none lost, none twice, nothing stored that was
/// never acknowledged), on the object it was sent to; each object's seqs run 1..=n without gaps;
/// and every shard's invariants ([`check_shard_invariants`]). Returns the rows by object, in
/// seq order.
pub async fn verify_stored(env: &Env, acked: &[Acked], secs: u64) -> HashMap<u64, Vec<Row>> {
    let all = eventually(secs, "every acknowledged append stored", || async {
        let all = stored_rows(env).await;
        (all.len() >= acked.len()).then_some(all)
    })
    .await;
    let mut seen: HashMap<&str, &Row> = HashMap::new();
    for row in &all {
        assert!(
            seen.insert(row.log.as_str(), row).is_none(),
            "{} stored twice",
            row.log
        );
    }
    assert_eq!(
        all.len(),
        acked.len(),
        "entries stored vs appends acknowledged"
    );
    for (id, _, log) in acked {
        let row = seen
            .get(log.as_str())
            .unwrap_or_else(|| panic!("object {id}: {log} lost"));
        assert_eq!(row.id, *id, "{log} stored on the wrong object");
    }
    let mut by_object: HashMap<u64, Vec<Row>> = HashMap::new();
    for row in all {
        by_object.entry(row.id).or_default().push(row);
    }
    for entries in by_object.values_mut() {
        entries.sort_by_key(|row| row.seq);
        for (i, row) in entries.iter().enumerate() {
            assert_eq!(row.seq, i as u64 + 1, "object {}: seq gap", row.id);
        }
    }
    for (_, url) in &env.shards {
        check_shard_invariants(url).await;
    }
    by_object
}

/// Per object: entries in seq order must be in the ledger's order (stream sequence). Returns
/// every inversion found.
pub fn inversions(by_object: &HashMap<u64, Vec<Row>>, acked: &[Acked]) -> Vec<String> {
    let position: HashMap<&str, u64> = acked
        .iter()
        .map(|(_, at, log)| (log.as_str(), *at))
        .collect();
    let mut found = Vec::new();
    for (id, entries) in by_object {
        for pair in entries.windows(2) {
            let (a, b) = (
                position[pair[0].log.as_str()],
                position[pair[1].log.as_str()],
            );
            if a >= b {
                found.push(format!(
                    "object {id}: seq {} = {} (stream seq {a}) before seq {} = {} (stream seq {b})",
                    pair[0].seq, pair[0].log, pair[1].seq, pair[1].log
                ));
            }
        }
    }
    found
}

/// No object's entries out of the ledger's order (see [`inversions`]).
pub fn assert_in_stream_order(by_object: &HashMap<u64, Vec<Row>>, acked: &[Acked]) {
    let found = inversions(by_object, acked);
    assert!(
        found.is_empty(),
        "{} inversions, first: {:#?}",
        found.len(),
        &found[..found.len().min(5)]
    );
}

/// A loadgen run with `--verify` (see `finish_loadgen`) that exited 0 with `appends`
/// appends acknowledged, and its own verify found every one of them stored once, in order.
pub fn assert_loadgen_verified(code: i32, report: &serde_json::Value, appends: f64) {
    assert_eq!(code, 0, "loadgen exits 0 when verify passes");
    assert_eq!(report_num(report, &["appends", "ok"]), appends);
    assert_eq!(report["verify"]["ok"], true, "{}", report["verify"]);
    assert_eq!(report_num(report, &["verify", "found"]), appends);
}
