//! The intake stream's configuration: what this worker wants, merged into what is already
//! there, so that no worker ever takes a subject, a transform or the partition count away from
//! the stream (a worker of an older version may have written a narrower config; the next
//! check of a current one widens it again). The same holds for its copies: a stream with more
//! replicas than JS_REPLICAS keeps them, one with fewer is raised to JS_REPLICAS. See
//! docs/intake.md.

use async_nats::jetstream::stream;
use logstore_protocol::partition::{transform, PARTITIONS_METADATA};

/// The partition count a stream records, if it records one that can be read.
pub fn recorded_partitions(config: &stream::Config) -> Option<u32> {
    config
        .metadata
        .get(PARTITIONS_METADATA)
        .and_then(|value| value.parse().ok())
}

/// The stream config to write and the partition count it has: `wanted` (this worker's limits
/// and policies, subject `logs_subject`, JS_REPLICAS copies), with every subject of `existing`
/// kept and never fewer copies than `existing` has. The partition
/// count is the one the stream records, else `configured` (JS_PARTITIONS) for a stream that
/// records none; with partitions the stream also takes `<logs>.*` (mapped to
/// `<logs>.p.<k>.<id>` by the transform) and `<logs>.p.*.b`.
pub fn merged(
    existing: Option<&stream::Config>,
    mut wanted: stream::Config,
    logs_subject: &str,
    configured: u32,
) -> (stream::Config, u32) {
    let partitions = existing.and_then(recorded_partitions).unwrap_or(configured);
    let mut subjects = vec![logs_subject.to_string()];
    if partitions > 0 {
        subjects.push(format!("{logs_subject}.*"));
        subjects.push(format!("{logs_subject}.p.*.b"));
        let (source, destination) = transform(logs_subject, partitions);
        wanted.subject_transform = Some(stream::SubjectTransform {
            source,
            destination,
        });
        wanted
            .metadata
            .insert(PARTITIONS_METADATA.to_string(), partitions.to_string());
    }
    if let Some(existing) = existing {
        for subject in &existing.subjects {
            if !subjects.contains(subject) {
                subjects.push(subject.clone());
            }
        }
        for (key, value) in &existing.metadata {
            wanted
                .metadata
                .entry(key.clone())
                .or_insert_with(|| value.clone());
        }
        if wanted.subject_transform.is_none() {
            wanted.subject_transform = existing.subject_transform.clone();
        }
        wanted.num_replicas = wanted.num_replicas.max(existing.num_replicas);
    }
    wanted.subjects = subjects;
    (wanted, partitions)
}

/// The durable consumer of partition `k`: `<consumer>-p<k>`.
pub fn partition_consumer(consumer: &str, k: u32) -> String {
    format!("{consumer}-p{k}")
}

/// The subjects partition `k` holds: `<logs>.p.<k>.>`.
pub fn partition_filter(logs_subject: &str, k: u32) -> String {
    format!("{logs_subject}.p.{k}.>")
}

/// What one partition's consumer may have delivered and not yet acknowledged: an even share of
/// JS_MAX_ACK_PENDING, but at least 256 (a partition must be able to fill a batch).
pub fn partition_max_ack_pending(max_ack_pending: i64, partitions: u32) -> i64 {
    let partitions = i64::from(partitions.max(1));
    ((max_ack_pending + partitions - 1) / partitions).max(256)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> stream::Config {
        stream::Config {
            name: "LOGS".to_string(),
            max_bytes: 1 << 30,
            ..Default::default()
        }
    }

    #[test]
    fn a_new_stream_gets_the_partition_subjects_transform_and_count() {
        let (config, partitions) = merged(None, wanted(), "logs", 32);
        assert_eq!(partitions, 32);
        assert_eq!(config.subjects, ["logs", "logs.*", "logs.p.*.b"]);
        let transform = config.subject_transform.expect("a transform");
        assert_eq!(transform.source, "logs.*");
        assert_eq!(
            transform.destination,
            "logs.p.{{partition(32,1)}}.{{wildcard(1)}}"
        );
        assert_eq!(config.metadata[PARTITIONS_METADATA], "32");
    }

    #[test]
    fn the_streams_own_count_wins_and_nothing_is_taken_away() {
        let (old, _) = merged(None, wanted(), "logs", 8);
        // A worker configured for 32, and one configured for none, both keep the stream's 8.
        for configured in [32, 0] {
            let (config, partitions) = merged(Some(&old), wanted(), "logs", configured);
            assert_eq!(partitions, 8);
            assert_eq!(config.subjects, ["logs", "logs.*", "logs.p.*.b"]);
            assert_eq!(
                config.subject_transform.map(|t| t.destination),
                Some("logs.p.{{partition(8,1)}}.{{wildcard(1)}}".to_string())
            );
        }
    }

    #[test]
    fn a_stream_narrowed_by_an_older_worker_is_widened_again() {
        // What the previous version writes: the one subject, no transform, no metadata.
        let narrowed = stream::Config {
            subjects: vec!["logs".to_string()],
            ..wanted()
        };
        let (config, partitions) = merged(Some(&narrowed), wanted(), "logs", 32);
        assert_eq!(partitions, 32);
        assert_eq!(config.subjects, ["logs", "logs.*", "logs.p.*.b"]);
        // Subjects someone else added stay.
        let extra = stream::Config {
            subjects: vec!["logs".to_string(), "audit".to_string()],
            ..wanted()
        };
        assert_eq!(
            merged(Some(&extra), wanted(), "logs", 0).0.subjects,
            ["logs", "audit"]
        );
    }

    #[test]
    fn copies_are_raised_to_js_replicas_and_never_lowered() {
        let with = |replicas| stream::Config {
            num_replicas: replicas,
            ..wanted()
        };
        let (raised, _) = merged(Some(&with(1)), with(3), "logs", 0);
        assert_eq!(raised.num_replicas, 3);
        let (kept, _) = merged(Some(&with(5)), with(3), "logs", 0);
        assert_eq!(kept.num_replicas, 5);
        let (new, _) = merged(None, with(3), "logs", 8);
        assert_eq!(new.num_replicas, 3);
    }

    #[test]
    fn names_filters_and_shares() {
        assert_eq!(partition_consumer("workers", 3), "workers-p3");
        assert_eq!(partition_filter("logs", 3), "logs.p.3.>");
        assert_eq!(partition_max_ack_pending(20_000, 32), 625);
        assert_eq!(partition_max_ack_pending(1_000, 32), 256);
        assert_eq!(partition_max_ack_pending(20_000, 0), 20_000);
    }
}
