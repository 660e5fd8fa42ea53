//! What one stored append costs nats-server on the JetStream intake, for each retention and
//! ack policy the stream could use: `scripts/intake-cost.sh` runs it against a nats-server it
//! starts and prints the table in BENCHMARKS.md.
//!
//! No worker and no PostgreSQL take part: publishers send single appends the way `loadgen`
//! does (one subject per object, PubAck awaited, a window in flight), and one puller per
//! partition fetches and acknowledges them the way the workers' ordered intake does (pull
//! requests of up to 500 messages; either every message acked, or only the highest one of
//! each fetched batch with `AckAll`). The nats-server process's CPU time (utime + stime from
//! /proc) is read before and after, once every message is acknowledged.
//!
//! ```text
//! intake_cost --url nats://127.0.0.1:4222 --nats-pid 1234 --retention workqueue --ack each \
//!     --partitions 8 --subjects object --messages 100000
//! ```

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use clap::{Parser, ValueEnum};
use futures::stream::FuturesUnordered;
use futures::StreamExt;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Retention {
    /// Messages are removed when acknowledged (logstore's stream today).
    Workqueue,
    /// Messages stay until `max_age`; consumers only move their ack floor.
    Limits,
    /// Messages are removed once every consumer acknowledged them.
    Interest,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Ack {
    /// `AckExplicit`, one ack per message (today).
    Each,
    /// `AckAll`, one ack for the highest message of each fetched batch.
    All,
    /// `AckNone`: delivery without acknowledgements (a floor, not a design: a crash loses
    /// whatever was delivered and not yet stored).
    None,
    /// No consumer at all: what publishing and storing alone cost.
    Unread,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Subjects {
    /// Stored as `logs.p.<k>.<id>`: one subject per object (the partitioned intake today).
    Object,
    /// Stored as `logs.p.<k>.s`: one subject per partition, the id only in the body.
    Partition,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// The nats-server process whose CPU time is measured.
    #[arg(long)]
    nats_pid: u32,
    #[arg(long, value_enum, default_value = "workqueue")]
    retention: Retention,
    #[arg(long, value_enum, default_value = "each")]
    ack: Ack,
    /// 0: the single `logs` subject and one consumer (the one-puller lane).
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    #[arg(long, value_enum, default_value = "object")]
    subjects: Subjects,
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Distinct objects the appends go to.
    #[arg(long, default_value_t = 1000)]
    objects: u64,
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// PubAcks awaited at once per publisher.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u32,
}

const STREAM: &str = "COST";

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = async_nats::connect(&args.url)
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let js = jetstream::new(client);
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream_config(&args))
        .await
        .context("creating the stream")?;
    let consumers = create_consumers(&js, &args).await?;
    let cpu_before = cpu_ticks(args.nats_pid)?;
    let started = Instant::now();
    let pullers: Vec<_> = consumers
        .iter()
        .cloned()
        .map(|c| tokio::spawn(pull(c, args.ack)))
        .collect();
    publish(&js, &args).await?;
    let published = started.elapsed();
    let pulled = if consumers.is_empty() {
        0
    } else {
        wait_pulled(&consumers, args.messages).await?
    };
    for puller in pullers {
        puller.abort();
    }
    let elapsed = started.elapsed();
    let ticks = cpu_ticks(args.nats_pid)? - cpu_before;
    let us_per_append = ticks as f64 * 1e6 / f64::from(args.clk_tck) / args.messages as f64;
    let row = serde_json::json!({
        "retention": format!("{:?}", args.retention).to_lowercase(),
        "ack": format!("{:?}", args.ack).to_lowercase(),
        "partitions": args.partitions,
        "subjects": format!("{:?}", args.subjects).to_lowercase(),
        "messages": args.messages,
        "pulled": pulled,
        "publish_s": published.as_secs_f64(),
        "total_s": elapsed.as_secs_f64(),
        "appends_per_s": args.messages as f64 / elapsed.as_secs_f64(),
        "nats_us_per_append": us_per_append,
    });
    println!("{row}");
    js.delete_stream(STREAM)
        .await
        .context("deleting the stream")?;
    Ok(())
}

fn stream_config(args: &Args) -> stream::Config {
    let p = args.partitions;
    let (subjects, transform) = if p == 0 {
        (vec!["logs".to_string()], None)
    } else {
        let destination = match args.subjects {
            Subjects::Object => format!("logs.p.{{{{partition({p},1)}}}}.{{{{wildcard(1)}}}}"),
            Subjects::Partition => format!("logs.p.{{{{partition({p},1)}}}}.s"),
        };
        (
            vec!["logs.*".to_string()],
            Some(stream::SubjectTransform {
                source: "logs.*".to_string(),
                destination,
            }),
        )
    };
    stream::Config {
        name: STREAM.to_string(),
        subjects,
        subject_transform: transform,
        retention: match args.retention {
            Retention::Workqueue => stream::RetentionPolicy::WorkQueue,
            Retention::Limits => stream::RetentionPolicy::Limits,
            Retention::Interest => stream::RetentionPolicy::Interest,
        },
        // What a Limits stream would need so that processed appends do not pile up forever.
        max_age: if args.retention == Retention::Limits {
            Duration::from_secs(3600)
        } else {
            Duration::ZERO
        },
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

async fn create_consumers(
    js: &jetstream::Context,
    args: &Args,
) -> Result<Vec<consumer::PullConsumer>> {
    let stream = js.get_stream(STREAM).await.context("reading the stream")?;
    let filters: Vec<String> = if args.partitions == 0 {
        vec!["logs".to_string()]
    } else {
        (0..args.partitions)
            .map(|k| match args.subjects {
                Subjects::Object => format!("logs.p.{k}.>"),
                Subjects::Partition => format!("logs.p.{k}.s"),
            })
            .collect()
    };
    let mut consumers = Vec::new();
    if args.ack == Ack::Unread {
        return Ok(consumers);
    }
    for (k, filter) in filters.into_iter().enumerate() {
        let config = consumer::pull::Config {
            durable_name: Some(format!("p{k}")),
            filter_subject: filter,
            ack_policy: match args.ack {
                Ack::Each => consumer::AckPolicy::Explicit,
                Ack::All => consumer::AckPolicy::All,
                Ack::None | Ack::Unread => consumer::AckPolicy::None,
            },
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(config)
            .await
            .with_context(|| format!("creating consumer p{k} ({:?} ack)", args.ack))?;
        consumers.push(consumer);
    }
    Ok(consumers)
}

/// Fetch and acknowledge until aborted, as the ordered intake does.
async fn pull(consumer: consumer::PullConsumer, ack: Ack) -> Result<()> {
    loop {
        let mut batch = consumer
            .batch()
            .max_messages(500)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .context("pull request")?;
        let mut last = None;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
            match ack {
                Ack::Each => message
                    .ack()
                    .await
                    .map_err(|e| anyhow::anyhow!("ack: {e}"))?,
                Ack::All => last = Some(message),
                Ack::None | Ack::Unread => {}
            }
        }
        if let Some(message) = last {
            message
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        }
    }
}

async fn publish(js: &jetstream::Context, args: &Args) -> Result<()> {
    let per = args.messages / args.publishers;
    let mut tasks = Vec::new();
    for p in 0..args.publishers {
        let js = js.clone();
        let (objects, window, partitions) = (args.objects, args.window, args.partitions);
        let count = if p + 1 == args.publishers {
            args.messages - per * p
        } else {
            per
        };
        tasks.push(tokio::spawn(async move {
            let mut pending = FuturesUnordered::new();
            for i in 0..count {
                let id = (i as u64 * 7919 + p as u64) % objects;
                let subject = if partitions == 0 {
                    "logs".to_string()
                } else {
                    format!("logs.{id}")
                };
                let body = format!(
                    "{{\"id\":{id},\"log\":\"entry {i} of publisher {p}\",\"key\":\"{p}-{i}\"}}"
                );
                let ack = js.publish(subject, body.into()).await?;
                pending.push(ack.into_future());
                if pending.len() >= window {
                    if let Some(done) = pending.next().await {
                        done?;
                    }
                }
            }
            while let Some(done) = pending.next().await {
                done?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("publisher task")??;
    }
    Ok(())
}

/// Wait until every consumer has delivered and seen acknowledged everything it holds.
async fn wait_pulled(consumers: &[consumer::PullConsumer], messages: usize) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut delivered = 0u64;
        let mut settled = true;
        for consumer in consumers {
            let mut consumer = consumer.clone();
            let info = consumer.info().await.context("consumer info")?;
            delivered += info
                .ack_floor
                .consumer_sequence
                .max(info.delivered.consumer_sequence);
            settled &= info.num_pending == 0 && info.num_ack_pending == 0;
        }
        if settled && delivered >= messages as u64 {
            return Ok(delivered);
        }
        if Instant::now() > deadline {
            bail!("only {delivered} of {messages} acknowledged after 300 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let number = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short /proc stat")?
            .parse::<u64>()
            .context("non-numeric /proc stat field")
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after state.
    Ok(number(11)? + number(12)?)
}
