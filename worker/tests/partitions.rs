//! The partition a publisher computes (`logstore_protocol::partition`) is the one nats-server
//! puts the message in: checked against a real server, through a core subject mapping for
//! 100,000 ids and through a stream's subject transform (the intake's path) for 2,000.

mod support;

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use logstore_protocol::partition::{object_subject, partition, transform};
use support::*;

const PARTITIONS: u32 = 32;

/// Random-looking ids over the whole u64 range, and the small ones people use.
fn ids(n: u64) -> Vec<u64> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                i / 2
            } else {
                i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i << 7)
            }
        })
        .collect()
}

/// `logs.p.<k>.<id>` → (k, id).
fn parse(subject: &str) -> (u32, u64) {
    let tokens: Vec<&str> = subject.split('.').collect();
    assert_eq!(tokens.len(), 4, "{subject}");
    assert_eq!((tokens[0], tokens[1]), ("logs", "p"), "{subject}");
    let k = tokens[2]
        .parse()
        .unwrap_or_else(|e| panic!("{subject}: {e}"));
    let id = tokens[3]
        .parse()
        .unwrap_or_else(|e| panic!("{subject}: {e}"));
    (k, id)
}

#[tokio::test]
async fn the_servers_core_mapping_agrees_for_100_000_ids() {
    let (source, destination) = transform("logs", PARTITIONS);
    let nats =
        NatsServer::start_with_config(&format!("mappings = {{ \"{source}\": \"{destination}\" }}"));
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut mapped = client.subscribe("logs.p.*.*").await.unwrap();
    client.flush().await.unwrap();
    let ids = ids(100_000);
    let mut checked = 0;
    // In steps, so the subscription's buffer never overflows.
    for step in ids.chunks(5_000) {
        for &id in step {
            client
                .publish(object_subject("logs", id), "".into())
                .await
                .unwrap();
        }
        client.flush().await.unwrap();
        for &id in step {
            let message = tokio::time::timeout(Duration::from_secs(10), mapped.next())
                .await
                .unwrap_or_else(|_| panic!("no mapped message for id {id} within 10 s"))
                .expect("subscription open");
            assert_eq!(
                parse(&message.subject),
                (partition(id, PARTITIONS), id),
                "id {id}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 100_000);
}

#[tokio::test]
async fn the_streams_subject_transform_agrees() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let (source, destination) = transform("logs", PARTITIONS);
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "PARTITIONED".to_string(),
            subjects: vec![source.clone()],
            subject_transform: Some(jetstream::stream::SubjectTransform {
                source,
                destination,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let ids = ids(2_000);
    let mut acks = Vec::with_capacity(ids.len());
    for &id in &ids {
        acks.push(
            js.publish(object_subject("logs", id), "".into())
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .expect("PubAck within 10 s")
            .unwrap();
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    for &id in &ids {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .unwrap_or_else(|_| panic!("stored message for id {id} not read within 10 s"))
            .expect("consumer open")
            .unwrap();
        assert_eq!(
            parse(&message.subject),
            (partition(id, PARTITIONS), id),
            "id {id}"
        );
    }
}
