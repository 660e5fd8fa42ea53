//! Partitioned JetStream intake: which partition an object's appends belong to, and the
//! subjects a publisher sends them on.
//!
//! An append (or a batch) for one object goes to `logs.<id>` (the id in canonical decimal).
//! The stream maps that subject to `logs.p.<k>.<id>` with nats-server's own `partition()`
//! subject-mapping function; [`partition`] computes the same `k`, so a publisher that splits
//! a batch over many objects by partition sends each part to `logs.p.<k>.b`
//! ([`batch_subject`]) and it lands where the stream would have put each entry.

/// Partitions of a stream created without saying otherwise (`JS_PARTITIONS`).
pub const DEFAULT_PARTITIONS: u32 = 32;

/// The stream metadata key that records the stream's partition count.
pub const PARTITIONS_METADATA: &str = "logstore.partitions";

/// The partition of object `id` among `partitions` (at least 1): FNV-1a (32 bits) of the id's
/// decimal text, modulo `partitions`, exactly as nats-server's `{{partition(P,1)}}` hashes the
/// subject token `<id>` of `logs.<id>`.
pub fn partition(id: u64, partitions: u32) -> u32 {
    fnv1a32(id.to_string().as_bytes()) % partitions.max(1)
}

/// FNV-1a, 32 bits.
fn fnv1a32(bytes: &[u8]) -> u32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    bytes.iter().fold(OFFSET, |hash, &byte| {
        (hash ^ u32::from(byte)).wrapping_mul(PRIME)
    })
}

/// Where an append (or a batch) for object `id` alone is published: `<base>.<id>`.
pub fn object_subject(base: &str, id: u64) -> String {
    format!("{base}.{id}")
}

/// Where a batch whose entries all belong to partition `k` is published: `<base>.p.<k>.b`.
pub fn batch_subject(base: &str, k: u32) -> String {
    format!("{base}.p.{k}.b")
}

/// The stream's subject transform for `<base>.<id>`: source and destination.
pub fn transform(base: &str, partitions: u32) -> (String, String) {
    (
        format!("{base}.*"),
        format!("{base}.p.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a32_matches_the_reference_vectors() {
        // From the FNV reference (draft-eastlake-fnv): "" and "a" and "foobar".
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn partitions_stay_in_range_and_spread() {
        let mut counts = [0u32; 32];
        for id in 0..32_000u64 {
            let k = partition(id, 32);
            assert!(k < 32);
            counts[k as usize] += 1;
        }
        assert!(
            counts.iter().all(|&n| (700..1300).contains(&n)),
            "{counts:?}"
        );
        assert_eq!(partition(42, 1), 0);
        assert_eq!(partition(42, 0), 0, "0 partitions is read as 1");
    }

    #[test]
    fn subjects() {
        assert_eq!(object_subject("logs", 42), "logs.42");
        assert_eq!(batch_subject("logs", 7), "logs.p.7.b");
        assert_eq!(
            transform("logs", 32),
            (
                "logs.*".to_string(),
                "logs.p.{{partition(32,1)}}.{{wildcard(1)}}".to_string()
            )
        );
    }
}
