//! `logstore append ID` reading stdin: every batch from [`crate::lines`] sent as one message
//! (the protocol's JSON array), its entries stored in input order on either intake, and
//! printed in input order as they settle.
//!
//! - Core intake answers the request with one result per entry. A batch goes out once the one
//!   before it is answered: that is what keeps a core publisher's order.
//! - JetStream intake answers with the stream's PubAck, and the outcome of each entry is its
//!   `appended.<id>` or `rejected.<id>` event carrying its key, subscribed to before the first
//!   batch goes out (as for a single append; dropped at the first core answer, so that events
//!   do not pile up unread). A batch goes out once the one before it is queued (its PubAck),
//!   so the stream holds them in input order, and up to [`WINDOW`] batches wait for their
//!   events at a time, so a long input is not paced by one round trip (publish, pull, commit,
//!   event) per batch.
//!
//! Every entry has a key, so sending again is safe: an entry whose outcome is unknown (no
//! answer; queued, but no event within the timeout) or that failed for a while (`unavailable`,
//! `busy`, `timeout`, a full stream) is sent again, at most [`ATTEMPTS`] sends per batch
//! (pauses doubling from [`FIRST_PAUSE`] after a failure), and a stored one then answers as
//! the duplicate it is. A refusal for good (`conflict`, an entry the workers cannot take), a
//! bad line or a batch that stays unsettled ends the run: nothing more is read, the batches
//! already sent are settled and printed, then the error names the line(s).

use std::collections::{HashMap, VecDeque};
use std::io::{BufWriter, IsTerminal, Write};
use std::time::Duration;

use logstore_protocol::{AppendReply, AppendRequest, BatchReply, EntryResult, ErrorBody};
use serde::Deserialize;
use tokio::time::Instant;

use crate::append::{made_up_key, print_stored};
use crate::client::{ClientError, Connection, EntryOutcome, Event, Outcomes};
use crate::lines::{Batch, Batcher, Format, Settings};
use crate::CliError;

/// Sends of one batch at most (the first, and the re-sends of what is not settled).
pub const ATTEMPTS: u32 = 5;
/// Pause before re-sending after a failure; each next one waits twice as long.
pub const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// Batches queued in the stream and waiting for their events at most (JetStream intake).
pub const WINDOW: usize = 32;

/// What a batch message is answered with: the workers' results (core intake), or the stream's
/// acknowledgement (JetStream intake).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BatchAnswer {
    Stored(BatchReply),
    Queued { stream: String, seq: u64 },
}

/// Append every line of stdin to object `id` as `format` reads it, `size` entries per batch,
/// printing `SEQ TS` (or, with `json`, the reply) per stored entry in input order.
pub async fn from_stdin(
    connection: &Connection,
    out: &mut dyn Write,
    json: bool,
    id: u64,
    key: Option<String>,
    format: Format,
    size: usize,
) -> Result<(), CliError> {
    let prefix = key.unwrap_or_else(|| made_up_key(connection));
    let max_bytes = connection.client.server_info().max_payload;
    // The lane and the subscriptions before anything goes out.
    let subject = connection.append_subject(id).await;
    let outcomes = connection.guarded(connection.watch_outcomes(id)).await?;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("logstore: appending each line typed to {id}; Ctrl-D ends");
    }
    let settings = Settings {
        format,
        id,
        prefix: prefix.clone(),
        size,
        max_bytes,
    };
    let mut run = Run {
        connection,
        id,
        subject,
        prefix,
        outcomes: Some(outcomes),
        window: Window::default(),
        stop: None,
    };
    let batches = Batcher::spawn(stdin, settings)?;
    run.drive(batches, &mut BufWriter::new(out), json).await
}

/// One run over stdin.
struct Run<'a> {
    connection: &'a Connection,
    id: u64,
    subject: String,
    /// Keys of lines without their own: `<prefix>-<line>`.
    prefix: String,
    /// The object's outcome events, until the first core answer.
    outcomes: Option<Outcomes>,
    window: Window,
    /// What ended the run early: nothing more is read, what was sent is settled.
    stop: Option<CliError>,
}

/// What the run waits for next.
enum Step {
    Read(Result<Option<Batch>, CliError>),
    Event(Event),
    /// The first batch in the window had no events in time.
    Expired,
}

impl Run<'_> {
    /// Read, send, settle and print until the input ends (or the run stops) and every batch
    /// sent is settled.
    async fn drive(
        &mut self,
        mut batches: Batcher,
        out: &mut impl Write,
        json: bool,
    ) -> Result<(), CliError> {
        let mut ended = false;
        loop {
            while let Some(mut flight) = self.window.pop_settled() {
                for reply in flight.settled.iter().flatten().flatten() {
                    print_stored(
                        out,
                        json,
                        &AppendReply {
                            key: None,
                            ..reply.clone()
                        },
                    )?;
                }
                if self.stop.is_none() {
                    self.stop = flight.failure.take().or_else(|| flight.first_refusal());
                }
            }
            out.flush()?;
            let reading = !ended && self.stop.is_none() && self.window.len() < WINDOW;
            if !reading && self.window.is_empty() {
                return self.stop.take().map_or(Ok(()), Err);
            }
            let deadline = self.window.deadline();
            let outcomes = &mut self.outcomes;
            // Events are read also while nothing waits for them: others' appends to the object
            // must not pile up unread.
            let step = self
                .connection
                .guarded(async {
                    Ok(tokio::select! {
                        read = batches.next(), if reading => Step::Read(read),
                        Some(event) = next_event(outcomes) => Step::Event(event),
                        () = sleep_until(deadline) => Step::Expired,
                    })
                })
                .await?;
            match step {
                Step::Read(Ok(Some(batch))) => {
                    let mut flight = self.window.push(batch);
                    self.send(&mut flight).await;
                    self.window.put_back(flight);
                }
                Step::Read(Ok(None)) => ended = true,
                Step::Read(Err(e)) => self.stop = Some(e),
                Step::Event(event) => self.window.settle(event),
                Step::Expired => self.expired().await,
            }
        }
    }

    /// The first batch in the window got no events in time: its open entries are sent again,
    /// unless its sends are used up or the run is stopping.
    async fn expired(&mut self) {
        let Some(mut flight) = self.window.take_front() else {
            return;
        };
        if let Some(queued) = flight.queued.take() {
            if flight.attempts >= ATTEMPTS || self.stop.is_some() {
                let unconfirmed = ClientError::Unconfirmed {
                    id: self.id,
                    stream: queued.stream,
                    seq: queued.seq,
                    key: self.prefix.clone(),
                    waited: self.connection.timeout,
                };
                flight.failure = Some(self.at_lines(&flight.batch, unconfirmed));
            } else {
                self.send(&mut flight).await;
            }
        }
        self.window.put_front(flight);
    }

    /// Send the open entries of `flight` until core intake has answered each of them or the
    /// stream has queued them, sending again after passing failures; what cannot be sent is
    /// its `failure`.
    async fn send(&mut self, flight: &mut Flight) {
        let mut pause = FIRST_PAUSE;
        loop {
            flight.attempts += 1;
            flight.sent = flight.open();
            let retry = match self.send_once(flight).await {
                Err(e) if !e.is_transient() => {
                    flight.failure = Some(self.at_lines(&flight.batch, e));
                    return;
                }
                Err(e) => e,
                Ok(()) => match flight.passing_failure() {
                    Some(error) if flight.first_refusal().is_none() => ClientError::Service(error),
                    _ => return,
                },
            };
            if flight.attempts >= ATTEMPTS {
                flight.failure = Some(self.at_lines(&flight.batch, retry));
                return;
            }
            flight.forget_passing_failures();
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }

    /// One message of the entries `flight.sent`: core intake's answer settles them, the
    /// stream's PubAck queues them (their events settle them later).
    async fn send_once(&mut self, flight: &mut Flight) -> Result<(), ClientError> {
        let entries: Vec<&AppendRequest> = flight
            .sent
            .iter()
            .map(|&i| &flight.batch.entries[i].request)
            .collect();
        let body = serde_json::to_vec(&entries).map_err(|e| ClientError::BadReply {
            subject: self.subject.clone(),
            why: format!("cannot encode the batch: {e}"),
        })?;
        let answer = match self.connection.request(&self.subject, body).await {
            Ok(answer) => answer,
            // The message refused as a whole (core intake): so is each entry of it.
            Err(ClientError::Service(error)) => {
                for &i in &flight.sent {
                    flight.settled[i] = Some(Err(error.clone()));
                }
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match answer {
            BatchAnswer::Stored(reply) => {
                // Core intake: the answer says it all, the events are not needed.
                self.outcomes = None;
                self.answered(flight, reply)
            }
            BatchAnswer::Queued { .. } if self.outcomes.is_none() => Err(ClientError::BadReply {
                subject: self.subject.clone(),
                why: "the stream queued a batch after a worker had answered one (two intakes?)"
                    .into(),
            }),
            BatchAnswer::Queued { stream, seq } => {
                let deadline = Instant::now() + self.connection.timeout;
                flight.queued = Some(Queued {
                    stream,
                    seq,
                    deadline,
                });
                Ok(())
            }
        }
    }

    /// Core intake's answer: one result per entry sent, in order.
    fn answered(&self, flight: &mut Flight, reply: BatchReply) -> Result<(), ClientError> {
        if reply.results.len() != flight.sent.len() {
            return Err(ClientError::BadReply {
                subject: self.subject.clone(),
                why: format!(
                    "{} results for a batch of {} entries",
                    reply.results.len(),
                    flight.sent.len()
                ),
            });
        }
        for (&i, result) in flight.sent.iter().zip(reply.results) {
            flight.settled[i] = Some(match result {
                EntryResult::Stored(reply) => Ok(reply),
                EntryResult::Failed { error, .. } => Err(error),
            });
        }
        Ok(())
    }

    /// `error` for a batch as a whole: `lines A-B of stdin (…): error`.
    fn at_lines(&self, batch: &Batch, error: ClientError) -> CliError {
        let (first, last) = batch.lines();
        let at = if error.is_transient() {
            format!(
                "lines {first}-{last} of stdin (sent {ATTEMPTS} times; the same input again \
                 with --key {} stores no line twice)",
                self.prefix
            )
        } else {
            format!("lines {first}-{last} of stdin")
        };
        CliError::At {
            at,
            source: Box::new(CliError::Client(error)),
        }
    }
}

/// The next event, or never when there are no subscriptions (core intake).
async fn next_event(outcomes: &mut Option<Outcomes>) -> Option<Event> {
    match outcomes {
        Some(outcomes) => outcomes.next_event().await,
        None => std::future::pending().await,
    }
}

/// Sleep until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The stream message a batch was last queued as, and when to stop waiting for its events.
struct Queued {
    stream: String,
    seq: u64,
    deadline: Instant,
}

/// A batch on its way: what is known of each entry.
struct Flight {
    batch: Batch,
    /// Each entry's outcome, `None` while unknown.
    settled: Vec<Option<EntryOutcome>>,
    /// The entries of the last message sent (places in `batch`), in its order.
    sent: Vec<usize>,
    /// JetStream intake: queued, its events awaited.
    queued: Option<Queued>,
    attempts: u32,
    /// It cannot be settled: why.
    failure: Option<CliError>,
}

impl Flight {
    fn open(&self) -> Vec<usize> {
        (0..self.settled.len())
            .filter(|&i| self.settled[i].is_none())
            .collect()
    }

    fn is_settled(&self) -> bool {
        self.failure.is_some() || self.settled.iter().all(Option::is_some)
    }

    /// The first failure that sending again may cure.
    fn passing_failure(&self) -> Option<ErrorBody> {
        self.settled
            .iter()
            .flatten()
            .find_map(|outcome| outcome.clone().err().filter(is_passing))
    }

    fn forget_passing_failures(&mut self) {
        for place in &mut self.settled {
            if place
                .as_ref()
                .is_some_and(|o| o.as_ref().is_err_and(is_passing))
            {
                *place = None;
            }
        }
    }

    /// The first entry (in input order) refused for good, as `line N of stdin: refusal`. A
    /// refusal of the whole message that names an entry of it (`entry 3: …`, a place in the
    /// message sent) is that entry's line.
    fn first_refusal(&self) -> Option<CliError> {
        let (i, error) = self.settled.iter().enumerate().find_map(|(i, o)| match o {
            Some(Err(error)) if !is_passing(error) => Some((i, error)),
            _ => None,
        })?;
        let named = error
            .message
            .strip_prefix("entry ")
            .and_then(|rest| rest.split_once(':'))
            .and_then(|(index, _)| index.parse::<usize>().ok())
            .and_then(|index| self.sent.get(index));
        let line = self.batch.entries[named.copied().unwrap_or(i)].line;
        Some(CliError::At {
            at: format!("line {line} of stdin"),
            source: Box::new(CliError::Client(ClientError::Service(error.clone()))),
        })
    }
}

/// A refusal that sending again may cure (`unavailable`, `busy`, `timeout`).
fn is_passing(error: &ErrorBody) -> bool {
    ClientError::Service(error.clone()).is_transient()
}

/// The batches sent and not yet printed, in input order, and where each key's entries are.
#[derive(Default)]
struct Window {
    flights: VecDeque<Flight>,
    /// The number of the first flight (flights are numbered in input order from 0).
    first: u64,
    /// Key → (flight number, place) of the entries sent with it.
    keys: HashMap<String, Vec<(u64, usize)>>,
}

impl Window {
    fn len(&self) -> usize {
        self.flights.len()
    }

    fn is_empty(&self) -> bool {
        self.flights.is_empty()
    }

    /// A new flight for `batch`, its keys known from now on; [`Window::put_back`] adds it.
    fn push(&mut self, batch: Batch) -> Flight {
        let number = self.first + self.flights.len() as u64;
        for (i, entry) in batch.entries.iter().enumerate() {
            let key = entry.request.key.clone().unwrap_or_default();
            self.keys.entry(key).or_default().push((number, i));
        }
        Flight {
            settled: vec![None; batch.entries.len()],
            batch,
            sent: Vec::new(),
            queued: None,
            attempts: 0,
            failure: None,
        }
    }

    fn put_back(&mut self, flight: Flight) {
        self.flights.push_back(flight);
    }

    fn take_front(&mut self) -> Option<Flight> {
        self.flights.pop_front()
    }

    fn put_front(&mut self, flight: Flight) {
        self.flights.push_front(flight);
    }

    /// The first flight, once settled (its keys forgotten).
    fn pop_settled(&mut self) -> Option<Flight> {
        if !self.flights.front()?.is_settled() {
            return None;
        }
        let flight = self.flights.pop_front()?;
        let number = self.first;
        self.first += 1;
        for entry in &flight.batch.entries {
            let key = entry.request.key.as_deref().unwrap_or_default();
            if let Some(places) = self.keys.get_mut(key) {
                places.retain(|&(n, _)| n != number);
                if places.is_empty() {
                    self.keys.remove(key);
                }
            }
        }
        Some(flight)
    }

    /// When the first flight stops waiting for its events.
    fn deadline(&self) -> Option<Instant> {
        let front = self.flights.front()?;
        front.queued.as_ref().map(|queued| queued.deadline)
    }

    /// An event settles the open entries sent with its key; a `rejected` event without a key
    /// (the message's keys could not be read) those of the message it names.
    fn settle(&mut self, event: Event) {
        let (key, outcome, stream_seq) = match event {
            Event::Appended(reply) => (reply.key.clone(), Ok(reply), None),
            Event::Rejected(event) => (event.key, Err(event.error), event.stream_seq),
        };
        let places: Vec<(u64, usize)> = match (&key, stream_seq) {
            (Some(key), _) => self.keys.get(key).cloned().unwrap_or_default(),
            (None, Some(seq)) => self
                .flights
                .iter()
                .zip(self.first..)
                .filter(|(flight, _)| flight.queued.as_ref().is_some_and(|q| q.seq == seq))
                .flat_map(|(flight, n)| flight.sent.iter().map(move |&i| (n, i)))
                .collect(),
            (None, None) => Vec::new(),
        };
        for (number, i) in places {
            let flight = usize::try_from(number - self.first)
                .ok()
                .and_then(|at| self.flights.get_mut(at));
            if let Some(place @ None) = flight.and_then(|f| f.settled.get_mut(i)) {
                *place = Some(outcome.clone());
            }
        }
    }
}
