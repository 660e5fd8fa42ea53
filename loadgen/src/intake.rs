//! Which intake the workers run, learnt before the first append. The workers advertise it in
//! their NATS service info (`$SRV.INFO.logstore`, [`logstore_protocol::discover`]): loadgen
//! follows it, core requests or JetStream publishes, and on a stream with partitions one lane
//! per object ([`decide`]). `--jetstream` (or `--jetstream=false`) still decides when given.
//!
//! When no worker answers in time (none runs yet, or the service API is not reachable), the
//! JetStream API decides as before partitions: a stream that captures the append subject means
//! JetStream intake (the publisher's acknowledgement is the stream's PubAck); none means core
//! intake (the worker's reply after its commit). Loadgen in the other mode would count the
//! wrong thing: core requests to a captured subject are answered by PubAcks (appends stored,
//! yet counted failed), and JetStream publishes without a stream go nowhere. So with a flag, a
//! mismatch stops the run at start with the flag to use ([`mismatch`]).

use std::time::{Duration, Instant};

use async_nats::jetstream::context::{GetStreamByNameErrorKind, RequestError, RequestErrorKind};

use crate::args::{Lane, Mode, Settings};
use logstore_protocol::chain::Chain;
use logstore_protocol::discover::{self, Discovery, Intake};

/// Pause between probes while waiting for the workers to create the stream.
const POLL: Duration = Duration::from_millis(250);

/// What the server says about the append subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture {
    /// This stream captures it.
    Stream(String),
    /// No stream captures it (or the server has no JetStream at all).
    None,
    /// The server could not be asked (timeout, other error): the reason.
    Unknown(String),
}

/// Ask the JetStream API (`$JS.API.STREAM.NAMES` with a subject filter) which stream captures
/// `subject`. The server matches the filter against every stream's subjects, wildcards included.
pub async fn capture(js: &async_nats::jetstream::Context, subject: &str) -> Capture {
    match js.stream_by_subject(subject).await {
        Ok(name) => Capture::Stream(name),
        Err(e) if matches!(e.kind(), GetStreamByNameErrorKind::NotFound) => Capture::None,
        // Nobody answers the JetStream API: the server runs without JetStream, so no stream
        // can capture anything.
        Err(e) if no_responders(&e) => Capture::None,
        Err(e) => Capture::Unknown(Chain(&e).to_string()),
    }
}

/// Whether the API request behind `error` found no responders.
fn no_responders(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(request) = e.downcast_ref::<RequestError>() {
            if matches!(request.kind(), RequestErrorKind::NoResponders) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// How long loadgen waits for the workers to create the stream in JetStream mode: as long as
/// one append's retries would have waited for it (they see "no stream" at once, so only the
/// backoffs count). A fleet that starts a little after loadgen is not a mismatch.
pub fn stream_wait(retries: u32) -> Duration {
    (1..=retries).map(crate::backoff).sum()
}

/// How appends go out, decided at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub mode: Mode,
    /// The partitions JetStream appends are spread over by object (0: all on the logs subject).
    pub partitions: u32,
}

/// Decide how to send appends: the workers' advertised intake, unless `--jetstream` says (then
/// only the partitions are taken from them, and [`mismatch`] checks the flag as before); when
/// no worker answers in time, the JetStream API decides, as one line on stderr says. `Err`:
/// the line that says the flag given does not match the workers (exit 2).
pub async fn decide(settings: &Settings, client: &async_nats::Client) -> Result<Decision, String> {
    if settings.query_share >= 1.0 {
        // A queries-only run sends no append, and queries are core requests whatever the intake.
        return Ok(Decision {
            mode: settings.mode,
            partitions: 0,
        });
    }
    let subject = settings.logs_subject.as_str();
    let wait = discover::DEFAULT_WAIT.min(settings.timeout);
    let (mode, advertised) = match settings.mode_given {
        Some(mode) => {
            // First the flag's check, which waits for a fleet that starts after loadgen to
            // create its stream: the workers register once it is there.
            if let Some(line) = mismatch(mode, settings, client).await {
                return Err(line);
            }
            let found = match mode {
                // Core requests have one lane: nothing to learn.
                Mode::Core => Discovery::Found(discover::Fleet {
                    intake: Intake::Core,
                    workers: 0,
                }),
                Mode::JetStream => discover::discover(client, subject, wait).await,
            };
            let advertised = match found {
                Discovery::Found(fleet) => partitions_of(&fleet.intake),
                Discovery::Unknown(why) => {
                    if mode == Mode::JetStream && settings.lane == Lane::Auto {
                        eprintln!("loadgen: {why}; appends go to {subject} (no partitions known)");
                    }
                    0
                }
            };
            (mode, advertised)
        }
        None => {
            follow(
                settings,
                client,
                discover::discover(client, subject, wait).await,
            )
            .await
        }
    };
    let partitions = match (mode, settings.lane) {
        (Mode::JetStream, Lane::Auto) => advertised,
        _ => 0,
    };
    Ok(Decision { mode, partitions })
}

/// Without a flag: the mode and partitions of the intake `found`, or when it is unknown, the
/// mode the JetStream API suggests (saying so in one line) and no partitions.
async fn follow(settings: &Settings, client: &async_nats::Client, found: Discovery) -> (Mode, u32) {
    let subject = settings.logs_subject.as_str();
    match found {
        Discovery::Found(fleet) => match fleet.intake {
            Intake::Core => (Mode::Core, 0),
            Intake::JetStream { partitions, .. } => (Mode::JetStream, partitions),
        },
        Discovery::Unknown(why) => {
            let mut js = async_nats::jetstream::new(client.clone());
            js.set_timeout(settings.timeout);
            let (mode, said) = match capture(&js, subject).await {
                Capture::Stream(stream) => (
                    Mode::JetStream,
                    format!("stream {stream} captures {subject}: JetStream appends to {subject}"),
                ),
                Capture::None => (
                    Mode::Core,
                    format!("no JetStream stream captures {subject}: core requests"),
                ),
                Capture::Unknown(reason) => (
                    Mode::Core,
                    format!(
                        "cannot tell whether a stream captures {subject} ({reason}): core requests"
                    ),
                ),
            };
            eprintln!("loadgen: {why}; deciding by the JetStream API as before: {said}");
            (mode, 0)
        }
    }
}

/// The partitions a fleet with this intake takes.
fn partitions_of(intake: &Intake) -> u32 {
    match intake {
        Intake::Core => 0,
        Intake::JetStream { partitions, .. } => *partitions,
    }
}

/// The line that says the workers' intake is not the one `mode` (given by a flag) needs, or
/// `None` when they agree (or the server cannot tell: then the check during the run still
/// applies).
pub async fn mismatch(
    mode: Mode,
    settings: &Settings,
    client: &async_nats::Client,
) -> Option<String> {
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(settings.timeout);
    let subject = settings.logs_subject.as_str();
    match mode {
        Mode::Core => match capture(&js, subject).await {
            Capture::Stream(stream) => Some(format!(
                "JetStream stream {stream} captures subject {subject}, so the workers run \
                 INTAKE=jetstream and a core request would be answered by the stream's PubAck, \
                 not by a worker after its commit: run loadgen with --jetstream"
            )),
            Capture::None => None,
            Capture::Unknown(reason) => {
                eprintln!(
                    "loadgen: cannot tell whether a JetStream stream captures {subject} \
                     ({reason}); going on"
                );
                None
            }
        },
        Mode::JetStream => {
            let wait = stream_wait(settings.retries);
            let deadline = Instant::now() + wait;
            let mut said = false;
            loop {
                match capture(&js, subject).await {
                    Capture::Stream(_) => return None,
                    Capture::Unknown(reason) => {
                        eprintln!(
                            "loadgen: cannot tell whether a JetStream stream captures \
                             {subject} ({reason}); going on"
                        );
                        return None;
                    }
                    Capture::None if Instant::now() >= deadline => break,
                    Capture::None => {}
                }
                if !said {
                    eprintln!(
                        "loadgen: no JetStream stream captures {subject} yet; waiting up to \
                         {:.1}s for the workers to create it",
                        wait.as_secs_f64()
                    );
                    said = true;
                }
                tokio::time::sleep(POLL).await;
            }
            Some(format!(
                "no JetStream stream captures subject {subject} (waited {:.1}s; workers with \
                 INTAKE=jetstream create it at start), so the workers run INTAKE=core: run \
                 loadgen without --jetstream",
                wait.as_secs_f64()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_wait_is_an_appends_retry_budget() {
        assert_eq!(stream_wait(0), Duration::ZERO);
        assert_eq!(stream_wait(2), Duration::from_millis(150));
        // The default 20 retries: 50 + 100 + 200 + 400 + 800 ms, then 15 x 1 s.
        assert_eq!(stream_wait(20), Duration::from_millis(16_550));
    }
}
