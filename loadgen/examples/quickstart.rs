//! The README's Rust example, compiled with the workspace so it cannot rot:
//! `cargo run --example quickstart` against a running fleet (default JetStream intake).
//! `NATS_URL` picks the server (default nats://127.0.0.1:4222).

use futures::StreamExt; // for Subscriber::next
use logstore_protocol::{AppendReply, QueryResponse};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut events = client.subscribe("appended.42").await?;

    // One append: the PubAck means it is safely in the stream; the event means it is stored.
    js.publish(
        "logs",
        r#"{"id":42,"log":"disk full","key":"evt-981"}"#.into(),
    )
    .await?
    .await?;
    let event = events.next().await.ok_or("subscription closed")?;
    let stored: AppendReply = serde_json::from_slice(&event.payload)?;
    println!("stored seq {} at {}", stored.seq, stored.ts);

    // A batch: one message, many appends (one stream write, one ack, one transaction per shard).
    let batch = serde_json::json!([
        { "id": 42, "log": "retrying", "key": "evt-982" },
        { "id": 42, "log": "recovered", "key": "evt-983" },
    ]);
    js.publish("logs", serde_json::to_vec(&batch)?.into())
        .await?
        .await?;
    for _ in 0..2 {
        let event = events.next().await.ok_or("subscription closed")?;
        let stored: AppendReply = serde_json::from_slice(&event.payload)?;
        println!("stored seq {} at {}", stored.seq, stored.ts);
    }

    // A query: a large answer comes as several messages (chunks) on the reply subject, so
    // subscribe to an inbox and read until `last` (a plain `request` would get chunk 0 only).
    let inbox = client.new_inbox();
    let mut chunks = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply("query", inbox, r#"{"id":42}"#.into())
        .await?;
    while let Some(message) = chunks.next().await {
        let chunk: QueryResponse = serde_json::from_slice(&message.payload)?;
        for entry in &chunk.logs {
            println!("{} {} {}", entry.seq, entry.ts, entry.log);
        }
        if chunk.last {
            break;
        }
    }
    Ok(())
}
