//! The NATS KV buckets the fleet coordinates through: `logstore_leases` (who pulls the stream,
//! who moves objects) and `logstore_ring` (the ring record). Each is created as async-nats's
//! `create_key_value` would, without its account-info request, which it cannot parse from
//! nats-server 2.9; with file storage, since a memory stream does not survive a nats-server
//! restart.

use std::time::Duration;

use async_nats::jetstream::{self, context::KeyValueError, kv, stream};

/// The stream behind KV bucket `bucket`: `history` values per key, each expiring `max_age`
/// after it was written (zero: never).
pub fn bucket(bucket: &str, description: &str, max_age: Duration, history: i64) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_string()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history,
        max_age,
        max_message_size: -1,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    }
}

/// The bucket `config` describes, created when missing.
pub async fn ensure(
    context: &jetstream::Context,
    config: &stream::Config,
) -> Result<kv::Store, KeyValueError> {
    if context.get_stream(&config.name).await.is_err() {
        // Another worker may create it at the same moment: then this attempt fails and the
        // bucket is there all the same.
        if let Err(e) = context.create_stream(config.clone()).await {
            tracing::debug!(bucket = %config.name, error = %e, "KV bucket creation raced");
        }
    }
    let name = config.name.strip_prefix("KV_").unwrap_or(&config.name);
    context.get_key_value(name).await
}
