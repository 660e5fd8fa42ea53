//! The sequence of operations of a run, drawn from the seed: the same seed and id base give
//! the same objects, the same mix of queries and the same log text (only the run id in the
//! keys differs, on purpose).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::args::Settings;

/// One operation to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Append(Append),
    Query { id: u64 },
}

/// One append, with the idempotency key that identifies it in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// 0-based index of the append within the run (the key's suffix).
    pub n: u64,
    pub id: u64,
    /// `<run id>-<n>`: unique per run, resent unchanged on every retry.
    pub key: String,
    /// Starts with the key and a space, so verify can tell which append an entry is.
    pub log: String,
}

/// Generates the run's operations in order. ChaCha8 (not `StdRng`) because its output is
/// fixed across `rand` versions and platforms, which is what makes `--seed` reproducible.
pub struct Workload {
    rng: ChaCha8Rng,
    query_share: f64,
    id_base: u64,
    objects: u64,
    run_id: String,
    log_size: usize,
    /// Pad text for the logs, drawn once: generating fresh random text per append would cost
    /// more CPU than sending it, and the store does not care.
    filler: String,
    appends: u64,
    queries: u64,
}

impl Workload {
    pub fn new(settings: &Settings) -> Workload {
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
        let filler: String = (0..settings.log_size)
            .map(|_| char::from(rng.sample(rand::distributions::Alphanumeric)))
            .collect();
        Workload {
            rng,
            query_share: settings.query_share,
            id_base: settings.id_base,
            objects: settings.objects,
            run_id: settings.run_id.clone(),
            log_size: settings.log_size,
            filler,
            appends: 0,
            queries: 0,
        }
    }

    /// Appends generated so far.
    pub fn appends(&self) -> u64 {
        self.appends
    }

    /// Queries generated so far.
    pub fn queries(&self) -> u64 {
        self.queries
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        // `gen_bool` needs 0..=1, which `Args::validate` guarantees.
        let query = self.query_share > 0.0 && self.rng.gen_bool(self.query_share);
        // Settings guarantee objects >= 1 and id_base + objects - 1 <= u64::MAX.
        let id = self.id_base + self.rng.gen_range(0..self.objects);
        if query {
            self.queries += 1;
            return Op::Query { id };
        }
        let n = self.appends;
        self.appends += 1;
        let key = key(&self.run_id, n);
        let log = log_text(&key, &self.filler, self.log_size);
        Op::Append(Append { n, id, key, log })
    }
}

/// The idempotency key of append `n` of run `run_id`.
pub fn key(run_id: &str, n: u64) -> String {
    format!("{run_id}-{n}")
}

/// The prefix every key of `run_id` starts with.
pub fn key_prefix(run_id: &str) -> String {
    format!("{run_id}-")
}

/// `size` bytes of log: the key, a space, then filler; never shorter than the key.
fn log_text(key: &str, filler: &str, size: usize) -> String {
    let pad = size.saturating_sub(key.len() + 1).min(filler.len());
    let mut log = String::with_capacity(key.len() + 1 + pad);
    log.push_str(key);
    if pad > 0 {
        log.push(' ');
        // The filler is ASCII, so any byte index is a char boundary.
        log.push_str(&filler[..pad]);
    }
    log
}

/// The key an entry's log starts with (its first space-separated word).
pub fn key_of(log: &str) -> &str {
    log.split(' ').next().unwrap_or(log)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn settings(extra: &[&str]) -> Settings {
        let mut argv = vec!["loadgen", "--id-base", "1000", "--objects", "10"];
        argv.extend_from_slice(extra);
        crate::Args::try_parse_from(argv)
            .unwrap()
            .validate()
            .unwrap()
    }

    fn ops(settings: &Settings, n: usize) -> Vec<Op> {
        let mut w = Workload::new(settings);
        (0..n).map(|_| w.next_op()).collect()
    }

    #[test]
    fn same_seed_same_workload_but_new_keys() {
        let a = settings(&["--seed", "42", "--query-share", "0.3"]);
        let b = settings(&["--seed", "42", "--query-share", "0.3"]);
        let strip = |ops: Vec<Op>| -> Vec<(bool, u64)> {
            ops.into_iter()
                .map(|op| match op {
                    Op::Query { id } => (true, id),
                    Op::Append(a) => (false, a.id),
                })
                .collect()
        };
        assert_eq!(strip(ops(&a, 500)), strip(ops(&b, 500)));
        assert_ne!(a.run_id, b.run_id);
        let c = settings(&["--seed", "43", "--query-share", "0.3"]);
        assert_ne!(strip(ops(&a, 500)), strip(ops(&c, 500)));
    }

    #[test]
    fn ids_stay_in_range_and_query_share_holds() {
        let s = settings(&["--seed", "1", "--query-share", "0.1"]);
        let all = ops(&s, 10_000);
        let queries = all
            .iter()
            .filter(|op| matches!(op, Op::Query { .. }))
            .count();
        assert!((800..1200).contains(&queries), "{queries} queries of 10000");
        for op in &all {
            let id = match op {
                Op::Query { id } => *id,
                Op::Append(a) => a.id,
            };
            assert!((1000..1010).contains(&id));
        }
        assert!(ops(&settings(&["--query-share", "1"]), 100)
            .iter()
            .all(|op| matches!(op, Op::Query { .. })));
    }

    #[test]
    fn logs_start_with_their_unique_key_and_have_the_asked_size() {
        let s = settings(&["--log-size", "100"]);
        let mut keys = std::collections::HashSet::new();
        for op in ops(&s, 1000) {
            let Op::Append(a) = op else { continue };
            assert_eq!(a.log.len(), 100);
            assert_eq!(key_of(&a.log), a.key);
            assert!(a.key.starts_with(&key_prefix(&s.run_id)));
            assert!(keys.insert(a.key));
        }
        let tiny = settings(&["--log-size", "1"]);
        let Op::Append(a) = ops(&tiny, 1).remove(0) else {
            panic!("expected an append")
        };
        assert_eq!(a.log, a.key);
    }
}
