//! Verification: read back every object a run touched (through the query subject, paging) and
//! prove that every acknowledged append is stored exactly once, in order.
//!
//! [`check`] is the pure part (what counts as a problem); [`read_back`] does the reading. In
//! JetStream mode an acknowledgement only means "in the stream", so reading is repeated (only
//! each object's new tail) until every acknowledged key is there or the time is up.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use async_nats::{Client, Subject};
use futures::StreamExt;
use logstore_protocol::LogEntry;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::client::{self, AttemptError};
use crate::workload::key_of;

/// Entries per query page while reading back (the worker's own page size).
const PAGE: u64 = 1000;
/// Objects read at once.
const CONCURRENCY: usize = 16;
/// Pause between read-back rounds while waiting for JetStream appends to be stored.
const POLL: Duration = Duration::from_millis(250);
/// More problems than this are counted but not listed (a lost shard would list thousands).
const MAX_LISTED: usize = 10_000;

/// An acknowledged append: what verify expects to find.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Acked {
    pub id: u64,
    pub key: String,
    /// Core mode: the seq and ts the worker's reply promised. JetStream: unknown (`None`).
    pub seq: Option<u64>,
    pub ts: Option<String>,
    /// JetStream: the stream sequence its PubAck named.
    pub stream_seq: Option<u64>,
    /// Acknowledged as a duplicate (an earlier attempt got through unheard).
    pub duplicate: bool,
}

/// One object as read back: its entries in the order the store returned them, and the entry
/// count (`total`) of its head row, from the last page read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectLog {
    pub entries: Vec<LogEntry>,
    pub total: u64,
}

/// One thing wrong. Each names the object and, where there is one, the seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// Seqs `seq ..= until` are absent: the log jumps from `seq - 1` to `until + 1`.
    Gap { id: u64, seq: u64, until: u64 },
    /// `seq` came after `after` (>= seq): repeated or out of order.
    OutOfOrder { id: u64, seq: u64, after: u64 },
    /// `ts` is earlier than the previous entry's.
    TsDecreased {
        id: u64,
        seq: u64,
        ts: String,
        previous: String,
    },
    /// The head row counts more entries than the log holds: seqs from `seq` on are missing.
    Truncated { id: u64, seq: u64, total: u64 },
    /// The head row counts fewer entries than the highest seq in the log.
    CountMismatch { id: u64, seq: u64, total: u64 },
    /// An acknowledged append is not stored (`seq`: where the reply said it was).
    Missing {
        id: u64,
        key: String,
        seq: Option<u64>,
        /// JetStream: the stream sequence its PubAck named.
        stream_seq: Option<u64>,
        /// Its acknowledgement said duplicate.
        duplicate: bool,
    },
    /// A key of this run stored a second time.
    Duplicate {
        id: u64,
        key: String,
        seq: u64,
        first_id: u64,
        first_seq: u64,
    },
    /// Stored at another seq than the reply said.
    WrongSeq {
        id: u64,
        key: String,
        seq: u64,
        acked_seq: u64,
    },
    /// Stored with another ts than the reply said.
    WrongTs {
        id: u64,
        key: String,
        seq: u64,
        ts: String,
        acked_ts: String,
    },
    /// Stored under another object than it was appended to.
    WrongObject {
        id: u64,
        key: String,
        seq: u64,
        stored_id: u64,
    },
    /// The object could not be read back.
    Unreadable { id: u64, error: String },
}

impl Problem {
    /// The object this problem is about.
    pub fn id(&self) -> u64 {
        match self {
            Problem::Gap { id, .. }
            | Problem::OutOfOrder { id, .. }
            | Problem::TsDecreased { id, .. }
            | Problem::Truncated { id, .. }
            | Problem::CountMismatch { id, .. }
            | Problem::Missing { id, .. }
            | Problem::Duplicate { id, .. }
            | Problem::WrongSeq { id, .. }
            | Problem::WrongTs { id, .. }
            | Problem::WrongObject { id, .. }
            | Problem::Unreadable { id, .. } => *id,
        }
    }

    /// The seq this problem is about, if it has one (for sorting and for the report line).
    pub fn seq(&self) -> Option<u64> {
        match self {
            Problem::Gap { seq, .. }
            | Problem::OutOfOrder { seq, .. }
            | Problem::TsDecreased { seq, .. }
            | Problem::Truncated { seq, .. }
            | Problem::CountMismatch { seq, .. }
            | Problem::Duplicate { seq, .. }
            | Problem::WrongSeq { seq, .. }
            | Problem::WrongTs { seq, .. }
            | Problem::WrongObject { seq, .. } => Some(*seq),
            Problem::Missing { seq, .. } => *seq,
            Problem::Unreadable { .. } => None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "object {}", self.id())?;
        if let Some(seq) = self.seq() {
            write!(f, " seq {seq}")?;
        }
        match self {
            Problem::Gap { seq, until, .. } if seq == until => write!(f, ": missing (gap)"),
            Problem::Gap { until, .. } => write!(f, "..{until}: missing (gap)"),
            Problem::OutOfOrder { after, .. } => write!(f, ": out of order, after seq {after}"),
            Problem::TsDecreased { ts, previous, .. } => {
                write!(
                    f,
                    ": ts {ts} is earlier than the previous entry's {previous}"
                )
            }
            Problem::Truncated { total, .. } => write!(
                f,
                ": missing: the object counts {total} entries but its log ends before this seq"
            ),
            Problem::CountMismatch { total, .. } => write!(
                f,
                ": the object counts only {total} entries but its log reaches this seq"
            ),
            Problem::Missing {
                key,
                stream_seq,
                duplicate,
                ..
            } => {
                write!(f, ": acknowledged append {key} is missing (lost)")?;
                if let Some(stream_seq) = stream_seq {
                    write!(f, "; its PubAck named stream seq {stream_seq}")?;
                }
                if *duplicate {
                    write!(f, " as a duplicate")?;
                }
                Ok(())
            }
            Problem::Duplicate {
                id,
                key,
                first_id,
                first_seq,
                ..
            } => {
                if first_id == id {
                    write!(f, ": {key} stored again (first at seq {first_seq})")
                } else {
                    write!(
                        f,
                        ": {key} stored again (first in object {first_id} at seq {first_seq})"
                    )
                }
            }
            Problem::WrongSeq { key, acked_seq, .. } => {
                write!(f, ": {key} is here but was acknowledged at seq {acked_seq}")
            }
            Problem::WrongTs {
                key, ts, acked_ts, ..
            } => {
                write!(
                    f,
                    ": {key} stored with ts {ts} but acknowledged with {acked_ts}"
                )
            }
            Problem::WrongObject { key, stored_id, .. } => {
                write!(
                    f,
                    ": {key} was appended here but is stored in object {stored_id}"
                )
            }
            Problem::Unreadable { error, .. } => write!(f, ": cannot be read back: {error}"),
        }
    }
}

/// The result of verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// No problem found.
    pub ok: bool,
    /// Objects read back.
    pub objects: usize,
    /// Entries read back (all writers).
    pub entries: u64,
    /// Acknowledged appends checked.
    pub acked: usize,
    /// Of those, found.
    pub found: usize,
    /// Entries of this run stored without an acknowledgement (a lost reply or PubAck, or a
    /// send cut short by SIGINT): allowed, stored once like any other.
    pub unacknowledged_stored: u64,
    /// Entries written by others (not this run's keys): allowed, but checked for order too.
    pub foreign: u64,
    /// Every problem found (listing capped at 10,000; `problem_count` is exact).
    pub problems: Vec<Problem>,
    pub problem_count: usize,
    /// No append of the run was acknowledged, so nothing was proven stored: a failure, not an
    /// "OK" over zero appends (it is how a run against the wrong intake, or no fleet, looks).
    pub nothing_acknowledged: bool,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nothing_acknowledged {
            writeln!(
                f,
                "verify: FAILED: no append was acknowledged, so nothing was verified ({} objects, \
                 {} entries read back; see the errors above)",
                self.objects, self.entries
            )?;
        }
        if self.ok {
            writeln!(
                f,
                "verify: OK: {} acknowledged appends each stored exactly once; {} objects, {} \
                 entries, seqs gapless, ts never decreasing ({} unacknowledged of this run, {} \
                 from other writers)",
                self.acked, self.objects, self.entries, self.unacknowledged_stored, self.foreign
            )
        } else if self.problem_count > 0 {
            writeln!(
                f,
                "verify: FAILED: {} problems ({} of {} acknowledged appends found; {} objects, {} \
                 entries)",
                self.problem_count, self.found, self.acked, self.objects, self.entries
            )?;
            for problem in &self.problems {
                writeln!(f, "verify: {problem}")?;
            }
            if self.problem_count > self.problems.len() {
                writeln!(
                    f,
                    "verify: ... and {} more",
                    self.problem_count - self.problems.len()
                )?;
            }
            Ok(())
        } else {
            Ok(())
        }
    }
}

/// Check what was read against what was acknowledged. `run_prefix` tells this run's keys from
/// other writers' entries; `unreadable` are objects that could not be read (their acknowledged
/// appends are not reported missing: we do not know).
pub fn check(
    logs: &BTreeMap<u64, ObjectLog>,
    acked: &[Acked],
    run_prefix: &str,
    unreadable: &BTreeMap<u64, String>,
) -> Verdict {
    let expected: HashMap<&str, &Acked> = acked.iter().map(|a| (a.key.as_str(), a)).collect();
    let mut problems = Vec::new();
    // key -> (object, seq) of its first occurrence.
    let mut seen: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut verdict = Verdict {
        objects: logs.len(),
        acked: expected.len(),
        ..Verdict::default()
    };
    for (&id, log) in logs {
        let mut previous_seq = 0u64;
        let mut previous_ts: Option<&str> = None;
        for entry in &log.entries {
            verdict.entries += 1;
            if entry.seq <= previous_seq {
                problems.push(Problem::OutOfOrder {
                    id,
                    seq: entry.seq,
                    after: previous_seq,
                });
            } else {
                if entry.seq != previous_seq + 1 {
                    problems.push(Problem::Gap {
                        id,
                        seq: previous_seq + 1,
                        until: entry.seq - 1,
                    });
                }
                previous_seq = entry.seq;
            }
            if let Some(previous) = previous_ts {
                if entry.ts.as_str() < previous {
                    problems.push(Problem::TsDecreased {
                        id,
                        seq: entry.seq,
                        ts: entry.ts.clone(),
                        previous: previous.to_string(),
                    });
                }
            }
            previous_ts = Some(&entry.ts);

            let key = key_of(&entry.log);
            if !key.starts_with(run_prefix) {
                verdict.foreign += 1;
                continue;
            }
            if let Some(&(first_id, first_seq)) = seen.get(key) {
                problems.push(Problem::Duplicate {
                    id,
                    key: key.to_string(),
                    seq: entry.seq,
                    first_id,
                    first_seq,
                });
                continue;
            }
            seen.insert(key, (id, entry.seq));
            let Some(acked) = expected.get(key) else {
                verdict.unacknowledged_stored += 1;
                continue;
            };
            if acked.id != id {
                problems.push(Problem::WrongObject {
                    id: acked.id,
                    key: key.to_string(),
                    seq: entry.seq,
                    stored_id: id,
                });
                continue;
            }
            verdict.found += 1;
            if let Some(acked_seq) = acked.seq {
                if acked_seq != entry.seq {
                    problems.push(Problem::WrongSeq {
                        id,
                        key: key.to_string(),
                        seq: entry.seq,
                        acked_seq,
                    });
                }
            }
            if let Some(acked_ts) = &acked.ts {
                if *acked_ts != entry.ts {
                    problems.push(Problem::WrongTs {
                        id,
                        key: key.to_string(),
                        seq: entry.seq,
                        ts: entry.ts.clone(),
                        acked_ts: acked_ts.clone(),
                    });
                }
            }
        }
        if log.total > previous_seq {
            problems.push(Problem::Truncated {
                id,
                seq: previous_seq + 1,
                total: log.total,
            });
        } else if log.total < previous_seq {
            problems.push(Problem::CountMismatch {
                id,
                seq: previous_seq,
                total: log.total,
            });
        }
    }
    for acked in expected.values() {
        if !seen.contains_key(acked.key.as_str()) && !unreadable.contains_key(&acked.id) {
            problems.push(Problem::Missing {
                id: acked.id,
                key: acked.key.clone(),
                seq: acked.seq,
                stream_seq: acked.stream_seq,
                duplicate: acked.duplicate,
            });
        }
    }
    for (&id, error) in unreadable {
        problems.push(Problem::Unreadable {
            id,
            error: error.clone(),
        });
    }
    problems.sort_by(|a, b| {
        (a.id(), a.seq().unwrap_or(u64::MAX)).cmp(&(b.id(), b.seq().unwrap_or(u64::MAX)))
    });
    verdict.problem_count = problems.len();
    problems.truncate(MAX_LISTED);
    verdict.problems = problems;
    verdict.nothing_acknowledged = acked.is_empty();
    verdict.ok = verdict.problem_count == 0 && !verdict.nothing_acknowledged;
    verdict
}

/// How to read back.
#[derive(Debug, Clone)]
pub struct ReadBack {
    pub query_subject: Subject,
    /// Per query message.
    pub timeout: Duration,
    /// Attempts per page beyond the first (timeouts, no responders, unavailable).
    pub retries: u32,
    /// Keep re-reading until every acknowledged key is found or this passes (JetStream mode);
    /// zero reads once (core mode: acknowledged means already committed).
    pub wait: Duration,
}

/// Read back `objects` until every key in `acked` is found (or `wait` passes, or `stop` is
/// cancelled), then [`check`] everything.
pub async fn read_back(
    client: &Client,
    how: &ReadBack,
    objects: &BTreeSet<u64>,
    acked: &[Acked],
    run_prefix: &str,
    stop: &CancellationToken,
) -> Verdict {
    let deadline = Instant::now() + how.wait;
    let mut logs: BTreeMap<u64, ObjectLog> = objects
        .iter()
        .map(|&id| (id, ObjectLog::default()))
        .collect();
    // Keys still to be seen, per object; an object leaves the map when it has them all.
    let mut waiting: HashMap<u64, HashSet<&str>> = HashMap::new();
    for a in acked {
        waiting.entry(a.id).or_default().insert(a.key.as_str());
    }
    let mut unreadable: BTreeMap<u64, String> = BTreeMap::new();
    // The first round reads every object; later rounds only those still waiting for keys,
    // from where the previous read ended (stored entries never change, so the tail suffices).
    let mut pending: Vec<u64> = objects.iter().copied().collect();
    loop {
        let reads = futures::stream::iter(pending.iter().map(|&id| {
            let after = logs
                .get(&id)
                .and_then(|log| log.entries.last())
                .map_or(0, |e| e.seq);
            async move { (id, read_tail(client, how, id, after).await) }
        }))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
        for (id, result) in reads {
            match result {
                Ok(mut tail) => {
                    unreadable.remove(&id);
                    // Only the key of each log matters from here on: drop the padding, so a
                    // large run's read-back fits in memory.
                    for entry in &mut tail.entries {
                        let key_len = key_of(&entry.log).len();
                        entry.log.truncate(key_len);
                        entry.log.shrink_to_fit();
                    }
                    let log = logs.entry(id).or_default();
                    log.total = tail.total;
                    if let Some(keys) = waiting.get_mut(&id) {
                        for entry in &tail.entries {
                            keys.remove(key_of(&entry.log));
                        }
                        if keys.is_empty() {
                            waiting.remove(&id);
                        }
                    }
                    log.entries.extend(tail.entries);
                }
                Err(e) => {
                    unreadable.insert(id, e.to_string());
                }
            }
        }
        pending = objects
            .iter()
            .copied()
            .filter(|id| waiting.contains_key(id) || unreadable.contains_key(id))
            .collect();
        if pending.is_empty() || Instant::now() >= deadline || stop.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.cancelled() => break,
        }
    }
    check(&logs, acked, run_prefix, &unreadable)
}

/// Read an object's entries after `after` to the end, page by page, retrying a page on
/// retryable errors. `total` is the head's count from the last page.
async fn read_tail(
    client: &Client,
    how: &ReadBack,
    id: u64,
    after: u64,
) -> Result<ObjectLog, AttemptError> {
    let mut out = ObjectLog::default();
    let mut cursor = after;
    loop {
        let body = serde_json::json!({ "id": id, "after": cursor, "limit": PAGE }).to_string();
        let mut attempt = 0u32;
        let chunks = loop {
            match client::query(client, &how.query_subject, body.clone().into(), how.timeout).await
            {
                Ok(chunks) => break chunks,
                Err(e) if e.is_retryable() && attempt < how.retries => {
                    attempt += 1;
                    tokio::time::sleep(crate::backoff(attempt)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let mut next = None;
        for chunk in chunks {
            if chunk.id != id {
                return Err(AttemptError::BadReply(format!(
                    "query for object {id} answered for object {}",
                    chunk.id
                )));
            }
            out.total = chunk.total;
            next = chunk.next;
            out.entries.extend(chunk.logs);
        }
        match next {
            None => return Ok(out),
            Some(n) if n > cursor => cursor = n,
            Some(n) => {
                return Err(AttemptError::BadReply(format!(
                    "paging object {id}: cursor {n} does not advance past {cursor}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "lgtest-";

    fn entry(seq: u64, ts_micros: u64, key: &str) -> LogEntry {
        LogEntry {
            seq,
            ts: format!("2026-11-22T09:16:27.{ts_micros:06}Z"),
            log: format!("{key} padding"),
        }
    }

    fn acked(id: u64, key: &str, seq: Option<u64>, ts_micros: Option<u64>) -> Acked {
        Acked {
            id,
            key: key.to_string(),
            seq,
            ts: ts_micros.map(|t| format!("2026-11-22T09:16:27.{t:06}Z")),
            stream_seq: None,
            duplicate: false,
        }
    }

    /// Object 7 holds n entries keyed lgtest-1..n at seq 1..n, all acknowledged (core style).
    fn world(n: u64) -> (BTreeMap<u64, ObjectLog>, Vec<Acked>) {
        let entries: Vec<LogEntry> = (1..=n)
            .map(|s| entry(s, s * 10, &format!("{RUN}{s}")))
            .collect();
        let acks = (1..=n)
            .map(|s| acked(7, &format!("{RUN}{s}"), Some(s), Some(s * 10)))
            .collect();
        let log = ObjectLog { entries, total: n };
        (BTreeMap::from([(7, log)]), acks)
    }

    fn run(logs: &BTreeMap<u64, ObjectLog>, acks: &[Acked]) -> Verdict {
        check(logs, acks, RUN, &BTreeMap::new())
    }

    fn lines(v: &Verdict) -> Vec<String> {
        v.problems.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn an_intact_log_passes_and_counts_foreign_and_unacknowledged_entries() {
        let (mut logs, acks) = world(5);
        let log = logs.get_mut(&7).unwrap();
        log.entries.push(entry(6, 60, "someone-else"));
        log.entries.push(entry(7, 60, &format!("{RUN}99")));
        log.total = 7;
        let v = run(&logs, &acks);
        assert!(v.ok, "{v}");
        assert_eq!((v.acked, v.found, v.entries), (5, 5, 7));
        assert_eq!((v.foreign, v.unacknowledged_stored), (1, 1));
        assert!(v.to_string().starts_with("verify: OK"));
    }

    #[test]
    fn a_deleted_row_is_named_by_object_and_seq() {
        let (mut logs, acks) = world(5);
        logs.get_mut(&7).unwrap().entries.remove(2); // seq 3
        let v = run(&logs, &acks);
        assert!(!v.ok);
        assert_eq!(
            lines(&v),
            vec![
                "object 7 seq 3: missing (gap)",
                "object 7 seq 3: acknowledged append lgtest-3 is missing (lost)",
            ]
        );
        assert!(v.to_string().starts_with("verify: FAILED: 2 problems"));
    }

    #[test]
    fn a_lost_last_entry_shows_through_the_head_count() {
        let (mut logs, acks) = world(5);
        logs.get_mut(&7).unwrap().entries.pop();
        let v = run(&logs, &acks);
        assert_eq!(v.problems.len(), 2, "{v}");
        assert!(matches!(
            v.problems[0],
            Problem::Truncated {
                id: 7,
                seq: 5,
                total: 5
            }
        ));
        assert!(lines(&v)[1].contains("object 7 seq 5: acknowledged append lgtest-5"));
    }

    #[test]
    fn a_missing_key_without_a_known_seq_still_names_the_object() {
        // JetStream style: acknowledgements carry no seq; the entry never arrived at all.
        let (logs, mut acks) = world(3);
        acks.push(acked(7, "lgtest-4", None, None));
        let v = run(&logs, &acks);
        assert_eq!(
            lines(&v),
            vec!["object 7: acknowledged append lgtest-4 is missing (lost)"]
        );
    }

    #[test]
    fn a_duplicate_is_named_with_both_seqs() {
        let (mut logs, acks) = world(3);
        let log = logs.get_mut(&7).unwrap();
        log.entries.push(entry(4, 40, "lgtest-2"));
        log.total = 4;
        let v = run(&logs, &acks);
        assert_eq!(
            lines(&v),
            vec!["object 7 seq 4: lgtest-2 stored again (first at seq 2)"]
        );
    }

    #[test]
    fn disorder_and_decreasing_ts_are_named() {
        let (mut logs, acks) = world(4);
        let log = logs.get_mut(&7).unwrap();
        log.entries.swap(1, 2); // seq order 1, 3, 2, 4
        let v = run(&logs, &acks);
        let l = lines(&v);
        assert!(
            l.contains(&"object 7 seq 2: missing (gap)".to_string()),
            "{v}"
        );
        assert!(
            l.contains(&"object 7 seq 2: out of order, after seq 3".to_string()),
            "{v}"
        );
        assert!(l.iter().any(|p| p.starts_with("object 7 seq 2: ts")), "{v}");

        let (mut logs, acks) = world(3);
        logs.get_mut(&7).unwrap().entries[2].ts = "2026-11-22T09:16:27.000001Z".into();
        let v = run(&logs, &acks);
        let l = lines(&v);
        assert!(
            l.iter()
                .any(|p| p.starts_with("object 7 seq 3: ts 2026-11-22T09:16:27.000001Z is earlier")),
            "{v}"
        );
        assert!(l.iter().any(|p| p.contains("acknowledged with")), "{v}");
    }

    #[test]
    fn stored_elsewhere_than_acknowledged_is_a_problem() {
        let (logs, mut acks) = world(3);
        acks[1].seq = Some(9);
        acks[2].id = 8;
        let v = run(&logs, &acks);
        let l = lines(&v);
        assert!(
            l.contains(&"object 7 seq 2: lgtest-2 is here but was acknowledged at seq 9".into()),
            "{v}"
        );
        assert!(
            l.contains(
                &"object 8 seq 3: lgtest-3 was appended here but is stored in object 7".into()
            ),
            "{v}"
        );
    }

    #[test]
    fn nothing_acknowledged_fails_instead_of_passing_vacuously() {
        // A core run against JetStream workers: every append "failed", yet all were stored.
        let (logs, _) = world(3);
        let v = run(&logs, &[]);
        assert!(!v.ok, "{v}");
        assert!(v.nothing_acknowledged);
        assert_eq!((v.problem_count, v.unacknowledged_stored), (0, 3));
        let text = v.to_string();
        assert!(
            text.starts_with("verify: FAILED: no append was acknowledged"),
            "{text}"
        );
        assert!(!text.contains("OK"), "{text}");
        let v = run(&BTreeMap::new(), &[]);
        assert!(!v.ok && v.nothing_acknowledged, "{v}");
    }

    #[test]
    fn an_unreadable_object_is_a_problem_but_not_a_loss() {
        let (logs, mut acks) = world(2);
        acks.push(acked(9, "lgtest-x", Some(1), None));
        let unreadable = BTreeMap::from([(9, "no answer".to_string())]);
        let v = check(&logs, &acks, RUN, &unreadable);
        assert_eq!(lines(&v), vec!["object 9: cannot be read back: no answer"]);
    }
}
