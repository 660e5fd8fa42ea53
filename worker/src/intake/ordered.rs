//! The ordered JetStream intake (JS_ORDERED=true, the default): each object's appends are
//! stored in the order the stream holds them, with any number of workers, across worker crashes,
//! NATS reconnects and shard outages.
//!
//! # How
//! - One puller at a time. Workers compete for a lease, a key in the NATS KV bucket
//!   [`LEASE_BUCKET`] whose entries expire `JS_LEASE_MS` after their last write. The holder
//!   renews it every third of that and pulls; the others wait to take it over. A holder that
//!   cannot renew in time stops pulling.
//! - The puller routes every fetched batch in stream-sequence order, and each shard pipeline
//!   commits in queue order, one transaction at a time.
//! - Nothing it routes is refused, expired or nak'ed for an outage or an unknown outcome: the
//!   shard pipeline retries it in place (`AppendJob::hold`), so nothing later for its object
//!   can overtake it. A shard that stays down fills its queue, and then the puller waits
//!   (head-of-line blocking, as in any ordered log; core intake keeps answering
//!   `unavailable` instead).
//! - Takeover: a new holder whose consumer has unacknowledged deliveries (the last holder
//!   died holding them) resets the consumer to its ack floor on nats-server 2.14+
//!   ([`take_over`]): they are delivered again at once, in stream order, instead of after
//!   ack_wait. The same runs per partition (`partitions.rs`, docs/intake.md).
//! - Resync: before pulling as the new holder, after a NATS reconnect (deliveries may have been
//!   lost in flight) and whenever a delivery is skipped (the consumer sequence jumps: another
//!   puller got messages; not the stream sequence, which a partition's consumer sees with gaps
//!   by design), the
//!   puller fetches and holds back messages until every delivered-and-unacknowledged message of
//!   the consumer is in its hands (the consumer's `num_ack_pending` equals what it gathered plus
//!   what it routed earlier and has not settled, up to the consumer's delivered sequence).
//!   Messages a dead or deposed puller held come back at once after a reset, else once their
//!   ack_wait expires; only then is the gathered set routed, sorted. So a takeover after a
//!   SIGKILL pauses intake for about `JS_LEASE_MS` (up to `JS_LEASE_MS` + `JS_ACK_WAIT_MS` on a
//!   server older than 2.14); a clean handover (the holder drains and releases the
//!   lease at shutdown) pauses it only for the drain. Appends parked behind a down shard count
//!   as in hand, so a resync during an outage does not wait for the shard.
//! - A deposed puller that still commits what it had (a paused process, a partition) can only
//!   write entries the new puller routes first anyway: the same keys, stored once.
//!
//! Entries that fail for a reason other than an outage (a fault in the database) are nak'ed
//! and retried up to JS_MAX_DELIVER times as before; later appends to the same object may be
//! stored before such a retry succeeds.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::pull::{PullEnd as Pull, Pulled, Wait, PULL_RETRY_FIRST, PULL_RETRY_MAX};
use super::route::Router;
use crate::cancel::{pause, Backoff};
use crate::config::JetStreamConfig;
/// Where the intake leases live (tests read it; the bucket is [`crate::lease`]'s).
pub use crate::lease::LEASE_BUCKET;
use crate::lease::{Lease, LeaseError};
use crate::origin::{trace_delivery, Held};

/// Pause between failed attempts to read the consumer's state during a resync.
const RESYNC_POLL: Duration = Duration::from_millis(200);
/// How often a resync that is still waiting says so.
const RESYNC_REPORT: Duration = Duration::from_secs(5);
/// Longest wait for one consumer info answer. Short: a server answers in milliseconds, and
/// while a cluster elects the consumer's leader nobody answers, so each unanswered request
/// delays noticing the new leader by up to this much.
const INFO_TIMEOUT: Duration = Duration::from_secs(1);
/// A resync still waiting this long for deliveries to come back resets the consumer (where
/// the server can): they were lost (acknowledgements or deliveries dropped with a server or a
/// connection), or a deposed puller holds them.
const RESYNC_RESET_AFTER: Duration = Duration::from_secs(2);

type Consumer = consumer::Consumer<consumer::pull::Config>;

/// Take `consumer` over as its new puller: count how (`handover` when nothing was left
/// unacknowledged, else `crash`) and, where the server can (`reset`), reset it to its ack
/// floor so the last owner's unacknowledged messages come again at once, in stream order,
/// instead of after ack_wait. The resync that follows gathers them either way.
pub(super) async fn take_over(router: &Router, consumer: &Consumer, reset: bool, what: &str) {
    let kind = match consumer_state(consumer).await {
        Ok(info) if info.num_ack_pending == 0 => "handover",
        _ => "crash",
    };
    router
        .metrics
        .jetstream_takeovers
        .with_label_values(&[kind])
        .inc();
    if !reset || kind == "handover" {
        return;
    }
    if reset_to_ack_floor(consumer).await {
        tracing::info!(
            lane = what,
            "reset the consumer to its ack floor: the last owner's messages come again now"
        );
    }
}

/// Reset `consumer` to its ack floor: every delivered and unacknowledged message comes again at
/// once, in stream order. False (and logged) when the server did not do it.
async fn reset_to_ack_floor(consumer: &Consumer) -> bool {
    let mut consumer = consumer.clone();
    match tokio::time::timeout(INFO_TIMEOUT, consumer.reset(None)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot reset the consumer; waiting for ack_wait instead");
            false
        }
        Err(_) => {
            tracing::warn!("no answer to the consumer reset; waiting for ack_wait instead");
            false
        }
    }
}

/// The intake lease of one stream and consumer. The bucket's max_age is the lease's lifetime:
/// the first worker's JS_LEASE_MS creates it, and every worker renews at the bucket's pace.
pub async fn open_lease(
    client: &async_nats::Client,
    js: &JetStreamConfig,
) -> Result<Lease, LeaseError> {
    let key = format!("intake.{}.{}", js.stream, js.consumer);
    Lease::open_named(client, key, js.lease, js.replicas).await
}

/// Compete for the lease and pull while holding it, until `cancel`.
pub async fn run(
    router: &Router,
    consumer: &Consumer,
    mut lease: Lease,
    reset: bool,
    cancel: &CancellationToken,
) {
    let metrics = &router.metrics;
    let mut waiting_logged = false;
    let mut failing = false;
    // Failures to reach the lease (no JetStream leader for its bucket during an election) are
    // retried soon, so a new leader is noticed soon.
    let mut backoff = Backoff::new(PULL_RETRY_FIRST, lease.ttl / 3);
    while !cancel.is_cancelled() {
        let taken = match lease.try_acquire().await {
            Ok(Some(taken)) => taken,
            Ok(None) => {
                if !waiting_logged {
                    tracing::info!(lease = %lease.key(), "another worker pulls the stream; standing by to take over");
                    waiting_logged = true;
                }
                pause(cancel, lease.ttl / 3).await;
                continue;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot reach the intake lease; retrying");
                    failing = true;
                }
                pause(cancel, backoff.next_pause()).await;
                lease.reopen().await;
                continue;
            }
        };
        backoff.reset();
        failing = false;
        waiting_logged = false;
        tracing::info!(lease = %lease.key(), "took the intake lease; pulling the stream in order");
        metrics.jetstream_pulling.set(1);
        // The takeover runs under the lease's renewals (it may wait for a consumer leader for
        // a while); the puller checks the lease before every pull, so a process paused past
        // its lease pulls nothing when it wakes.
        let ((), revision) = lease
            .hold(taken, cancel, "intake", |lost, validity| async move {
                take_over(router, consumer, reset, "logs").await;
                lead(
                    router,
                    consumer,
                    &router.held,
                    &lost,
                    &|| validity.holds(),
                    reset,
                )
                .await
            })
            .await;
        metrics.jetstream_pulling.set(0);
        if cancel.is_cancelled() {
            lease.release(revision).await;
        }
    }
}

/// Pull `consumer` and route in stream order until `stop`; `held`: the messages of this
/// consumer that this worker has routed and not settled; `reset`: the server can reset a
/// consumer to its ack floor.
///
/// A pull cut short or a reconnect (a server of the cluster died, and the consumer's leader
/// with it) may have lost deliveries or acknowledgements on the way: the resync that follows
/// resets the consumer first, once it answers again, so it waits for nothing that would only
/// come back after ack_wait. A refused pull (no leader yet) lost nothing: it is asked again
/// after a pause.
pub(super) async fn lead(
    router: &Router,
    consumer: &Consumer,
    held: &Held,
    stop: &CancellationToken,
    valid: &(dyn Fn() -> bool + Sync),
    reset: bool,
) {
    // The consumer sequence of the last delivery to this puller; None until a resync set it.
    let mut last: Option<u64> = None;
    let mut in_hand: Vec<jetstream::Message> = Vec::new();
    // The next pull, made while the previous one was being routed (read to its end at once, so
    // none of its messages can be abandoned by the client however long the routing waits).
    let mut prefetched: Option<(Vec<jetstream::Message>, Pull)> = None;
    let reconnects = &router.metrics.nats_reconnects;
    let mut seen_reconnects = reconnects.get();
    // Something may have been lost on the way since the last resync (see above).
    let mut disrupted = false;
    let mut backoff = Backoff::new(PULL_RETRY_FIRST, PULL_RETRY_MAX);
    while !stop.is_cancelled() {
        if !valid() {
            tracing::warn!("the intake lease was not renewed in time; stopping the pull");
            return;
        }
        if reconnects.get() != seen_reconnects {
            seen_reconnects = reconnects.get();
            tracing::info!("reconnected to NATS; resyncing the ordered intake");
            (last, disrupted) = (None, true);
        }
        let Some(delivery) = last else {
            if let Some((messages, _)) = prefetched.take() {
                in_hand.extend(messages);
            }
            let (already, resets) = (std::mem::take(&mut in_hand), Resets::new(reset, disrupted));
            let Some(delivery) = resync(router, consumer, held, stop, already, resets).await else {
                return;
            };
            (last, disrupted) = (Some(delivery), false);
            continue;
        };
        let (batch, pulled) = match prefetched.take() {
            Some(pulled) => pulled,
            None => fetch(router, consumer).await,
        };
        if pulled == Pull::Refused {
            pause(stop, backoff.next_pause()).await;
            continue;
        }
        let Some(next) = contiguous(delivery, &batch).filter(|_| pulled == Pull::Ended) else {
            tracing::info!(
                after = delivery,
                "a delivery was skipped or a pull was cut short; resyncing the ordered intake"
            );
            if pulled == Pull::Cut {
                disrupted = true;
                pause(stop, backoff.next_pause()).await;
            }
            in_hand = batch;
            last = None;
            continue;
        };
        backoff.reset();
        let route = route_sorted(router, held, sorted(batch));
        // Pulls stay one at a time (the next is asked for once this one has ended), so
        // deliveries still arrive in stream order.
        let pull = async {
            match !stop.is_cancelled() && valid() {
                true => Some(fetch(router, consumer).await),
                false => None,
            }
        };
        let ((), pulled) = futures::join!(route, pull);
        prefetched = pulled;
        last = Some(next);
    }
    // Stopping: a pull made meanwhile is routed too (shutdown finishes what was taken in).
    if let (Some(delivery), Some((batch, Pull::Ended))) = (last, prefetched) {
        route_if_contiguous(router, held, delivery, batch).await;
    }
}

/// Route `batch` in stream order if its deliveries follow `delivery` without a gap.
async fn route_if_contiguous(
    router: &Router,
    held: &Held,
    delivery: u64,
    batch: Vec<jetstream::Message>,
) {
    if contiguous(delivery, &batch).is_some() {
        route_sorted(router, held, sorted(batch)).await;
    }
}

/// The consumer sequence of the last of `batch` (in the order it arrived) when its deliveries
/// follow `delivery` without a gap; None when one was skipped: it went elsewhere (a deposed
/// puller) or was lost, so nothing from here is routed until everything outstanding is in hand.
/// The consumer sequence, not the stream sequence: a consumer of one partition sees gaps in
/// stream sequences by design (the other partitions' messages), never in its own deliveries.
fn contiguous(delivery: u64, batch: &[jetstream::Message]) -> Option<u64> {
    let mut last = delivery;
    for message in batch {
        let info = message.info().ok()?;
        if info.consumer_sequence != last + 1 {
            return None;
        }
        last = info.consumer_sequence;
    }
    Some(last)
}

/// Route a batch in stream order. A redelivery of a message still in this worker (parked past
/// ack_wait behind a down shard, or made redeliverable by a consumer reset) is dropped: the copy
/// in hand settles it.
async fn route_sorted(router: &Router, held: &Held, batch: BTreeMap<u64, jetstream::Message>) {
    for (sequence, message) in batch {
        if held.contains(sequence) {
            router.metrics.jetstream_redeliveries.inc();
            trace_delivery(&message, "dropped: a copy is in hand");
            continue;
        }
        router.jetstream_append_to(message, held).await;
    }
}

/// When a resync resets the consumer to its ack floor (where the server can): as soon as the
/// consumer answers after a disruption, and once the resync has waited [`RESYNC_RESET_AFTER`].
struct Resets {
    due: bool,
    on_stall: bool,
    started: Instant,
}

impl Resets {
    /// `can`: the server can reset a consumer; `disrupted`: reset as soon as it answers.
    fn new(can: bool, disrupted: bool) -> Resets {
        Resets {
            due: can && disrupted,
            on_stall: can,
            started: Instant::now(),
        }
    }

    /// Whether to reset now (once the reset is done, [`Resets::done`]).
    fn due(&mut self) -> bool {
        if self.on_stall && self.started.elapsed() >= RESYNC_RESET_AFTER {
            self.on_stall = false;
            self.due = true;
        }
        self.due
    }

    fn done(&mut self) {
        self.due = false;
    }
}

/// Gather messages until every unacknowledged delivery of the consumer is in this worker's
/// hands (gathered now, or routed before and not settled yet), and route the gathered ones in
/// stream order, resetting the consumer when `resets` says.
/// Returns the consumer sequence of the last delivery, or None when `stop` fired first.
async fn resync(
    router: &Router,
    consumer: &Consumer,
    held: &Held,
    stop: &CancellationToken,
    already: Vec<jetstream::Message>,
    mut resets: Resets,
) -> Option<u64> {
    router.metrics.jetstream_resyncs.inc();
    let started = Instant::now();
    let mut gathered = sorted(already);
    let mut failing = false;
    let mut reported = Instant::now();
    let mut backoff = Backoff::new(PULL_RETRY_FIRST, PULL_RETRY_MAX);
    let delivered = loop {
        if stop.is_cancelled() {
            return None;
        }
        let info = match consumer_state(consumer).await {
            Ok(info) => info,
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "cannot read the consumer's state to resync; retrying");
                    failing = true;
                }
                pause(stop, RESYNC_POLL).await;
                continue;
            }
        };
        failing = false;
        let delivered = info.delivered.stream_sequence;
        // Counted after reading the consumer's state (see `count_in_hand`).
        let (in_hand, parked) = count_in_hand(held, &gathered, delivered);
        if in_hand >= info.num_ack_pending {
            break info.delivered.consumer_sequence;
        }
        if resets.due() && reset_to_ack_floor(consumer).await {
            resets.done();
            tracing::info!(
                pending = info.num_ack_pending,
                in_hand,
                "reset the consumer to its ack floor: its unacknowledged messages come again now"
            );
            // Every unacknowledged message comes again from the ack floor, in stream order,
            // and the server counts none of them pending until then: the copies gathered so far
            // are dropped (routing them now could put them before an earlier one that was lost
            // and comes back only with the others).
            for message in std::mem::take(&mut gathered).values() {
                trace_delivery(message, "dropped: comes again after the reset");
            }
            continue;
        }
        if reported.elapsed() >= RESYNC_REPORT {
            reported = Instant::now();
            let counts = (in_hand, gathered.len(), parked);
            report_waiting(&info, counts, started);
        }
        let (batch, pulled) = fetch(router, consumer).await;
        if pulled == Pull::Ended {
            backoff.reset();
        } else {
            pause(stop, backoff.next_pause()).await;
        }
        for (sequence, message) in sorted(batch) {
            // A second delivery of a message already gathered (after a reset): keep the latest,
            // whose acknowledgement the server expects.
            gathered.insert(sequence, message);
        }
    };
    tracing::info!(
        messages = gathered.len(),
        waited_ms = started.elapsed().as_millis() as u64,
        "ordered intake in sync; routing in stream order"
    );
    route_sorted(router, held, gathered).await;
    Some(delivered)
}

/// Say what a resync is still waiting for: the consumer's `info`, and `(in hand, gathered,
/// held)` counts.
fn report_waiting(
    info: &consumer::Info,
    (in_hand, gathered, held): (usize, usize, usize),
    started: Instant,
) {
    tracing::info!(
        pending = info.num_ack_pending,
        in_hand,
        delivered = info.delivered.stream_sequence,
        gathered,
        held,
        waited_ms = started.elapsed().as_millis() as u64,
        "resyncing: waiting for the consumer's unacknowledged deliveries to come back"
    );
}

/// The consumer's state as the server reports it now; the error says why it could not be read
/// (no answer within [`INFO_TIMEOUT`] included).
async fn consumer_state(consumer: &Consumer) -> Result<consumer::Info, String> {
    match tokio::time::timeout(INFO_TIMEOUT, consumer.get_info()).await {
        Ok(Ok(info)) => Ok(info),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {INFO_TIMEOUT:?}")),
    }
}

/// How many of the consumer's deliveries up to `delivered` are in this worker's hands: those
/// this resync gathered, and those it routed before and has not settled yet (parked behind a
/// down shard, say), each counted once. Also returns how many of them are of the second kind.
///
/// Call it after reading the consumer's state, so that a message settled meanwhile is missing
/// from both sides or only from this one: never counted without being pending.
fn count_in_hand(
    held: &Held,
    gathered: &BTreeMap<u64, jetstream::Message>,
    delivered: u64,
) -> (usize, usize) {
    let held = held.up_to(delivered);
    let in_hand = held.len()
        + gathered
            .range(..=delivered)
            .filter(|(sequence, _)| !held.contains(sequence))
            .count();
    (in_hand, held.len())
}

/// The next messages: what the consumer has now, at once; when it has nothing, a pull that
/// waits for the next message and ends with it. So a trickle of appends is routed as each one
/// comes, not when a waiting pull expires (a `logstore append` would otherwise wait up to half
/// a second for its outcome), and a busy stream still comes in pulls of up to 500. Returns the
/// messages and how the pull ended (a message dropped on the way shows as a skipped sequence
/// instead).
async fn fetch(router: &Router, consumer: &Consumer) -> (Vec<jetstream::Message>, Pull) {
    let (messages, end) = read_pull(router, consumer, Wait::Now).await;
    if messages.is_empty() && end == Pull::Ended {
        return read_pull(router, consumer, Wait::Next).await;
    }
    (messages, end)
}

/// One pull request, read to its end before anything is routed (a pull whose messages sit
/// unread would be abandoned, and they would come back out of order).
async fn read_pull(
    router: &Router,
    consumer: &Consumer,
    wait: Wait,
) -> (Vec<jetstream::Message>, Pull) {
    let mut messages = Vec::new();
    let Some(mut pull) = router.request_batch(consumer, wait).await else {
        return (messages, Pull::Refused);
    };
    loop {
        match pull.next().await {
            Pulled::Message(message) => {
                trace_delivery(&message, "received");
                messages.push(*message)
            }
            // A refusal after some messages (a limit reached) still delivered them all.
            Pulled::End(Pull::Refused) if !messages.is_empty() => return (messages, Pull::Ended),
            Pulled::End(end) => {
                if end == Pull::Cut {
                    tracing::warn!("a JetStream pull was cut short");
                }
                return (messages, end);
            }
        }
    }
}

/// Messages by stream sequence (the first copy of each); those without metadata are dropped
/// unacknowledged, to be redelivered.
fn sorted(messages: Vec<jetstream::Message>) -> BTreeMap<u64, jetstream::Message> {
    let mut by_sequence = BTreeMap::new();
    for message in messages {
        match message.info() {
            Ok(info) => {
                by_sequence.entry(info.stream_sequence).or_insert(message);
            }
            Err(e) => {
                tracing::warn!(error = %e, "JetStream message without metadata; left for redelivery")
            }
        }
    }
    by_sequence
}
