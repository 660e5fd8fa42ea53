//! Which intake the workers run, as they say it themselves: every worker registers with the
//! NATS service API under [`SERVICE_NAME`] and its service info (`$SRV.INFO.logstore`, which
//! every worker answers) carries metadata naming its append subject (`logs_subject`), its
//! intake (`core` or `jetstream`) and, with JetStream, the stream's partitions it takes
//! (`partitions`, 0 for none). Publishers (loadgen, the CLI) ask before their first append and
//! follow what they find: core requests or JetStream publishes, and with partitions one lane
//! per object (`logs.<id>`, [`crate::partition`]).
//!
//! The service API works where the JetStream API cannot: a client account without JetStream
//! (deploy/nats/nats-server.conf) cannot ask which stream captures `logs`, but it imports
//! `$SRV.>` from the workers' account.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::StatusCode;
use futures::StreamExt;
use serde::Deserialize;

use crate::chain::Chain;

/// The name every worker registers under with the NATS service API (`nats micro info logstore`).
pub const SERVICE_NAME: &str = "logstore";

/// The service-info metadata key holding the stream's partition count a worker takes.
pub const PARTITIONS_KEY: &str = "partitions";

/// How long a publisher waits for the workers' answers by default: they answer at once, so
/// this bounds only the wait when no answer comes at all (none registered, and the server's
/// no-responders status does not come back either).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(1);

/// After an answer, how much longer answers are collected: every worker answers the same
/// request, each within a round trip, and the last of them is waited for this long at most.
const MORE: Duration = Duration::from_millis(100);

/// The intake a fleet runs, as every answering worker of it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// Core NATS: appends are requests the workers answer after their commit.
    Core,
    /// JetStream: appends are publishes the stream acknowledges.
    JetStream {
        /// The stream the workers named (if they did).
        stream: Option<String>,
        /// The partitions every answering worker takes (0: the `logs` lane only, also when the
        /// workers do not agree or one does not say).
        partitions: u32,
    },
}

/// The workers found on an append subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    pub intake: Intake,
    /// How many workers answered.
    pub workers: usize,
}

/// What asking the workers gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    Found(Fleet),
    /// No worker on the subject answered, or they do not agree on the intake: why, in words.
    Unknown(String),
}

/// One worker's service info (`io.nats.micro.v1.info_response`), the part used here.
#[derive(Debug, Clone, Deserialize)]
pub struct Instance {
    #[serde(default)]
    pub name: String,
    /// The service instance id.
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint of a service instance.
#[derive(Debug, Clone, Deserialize)]
pub struct Endpoint {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub subject: String,
}

impl Instance {
    /// The subject of the endpoint called `name`, if the instance has one.
    pub fn endpoint(&self, name: &str) -> Option<&str> {
        self.endpoints
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.subject.as_str())
    }
}

/// Ask every worker for its service info and tell which intake the ones taking appends on
/// `logs_subject` run. Waits at most `wait` in all: for a first answer (no responders ends it
/// at once), then 100 ms after each answer. Workers of other fleets on the same server (another
/// append subject) are ignored. Never fails: a NATS error is a [`Discovery::Unknown`].
pub async fn discover(
    client: &async_nats::Client,
    logs_subject: &str,
    wait: Duration,
) -> Discovery {
    match instances(client, logs_subject, wait).await {
        Ok(ours) => {
            let metadata: Vec<HashMap<String, String>> =
                ours.into_iter().map(|i| i.metadata).collect();
            agree(logs_subject, &metadata)
        }
        Err(why) => Discovery::Unknown(why),
    }
}

/// The service info of every worker taking appends on `logs_subject` (`$SRV.INFO.logstore`),
/// collected as [`discover`] does (at most `wait`, 100 ms after each answer); why there is none,
/// in words, when none of them answered.
pub async fn instances(
    client: &async_nats::Client,
    logs_subject: &str,
    wait: Duration,
) -> Result<Vec<Instance>, String> {
    let subject = format!("$SRV.INFO.{SERVICE_NAME}");
    let inbox = client.new_inbox();
    let mut answers = match client.subscribe(inbox.clone()).await {
        Ok(answers) => answers,
        Err(e) => return Err(format!("cannot subscribe to answers: {}", Chain(&e))),
    };
    if let Err(e) = client
        .publish_with_reply(subject.clone(), inbox, "".into())
        .await
    {
        return Err(format!("cannot ask {subject}: {}", Chain(&e)));
    }
    let by = tokio::time::Instant::now() + wait;
    let mut ours = Vec::new();
    let mut answered = false;
    let mut no_responders = false;
    loop {
        // Once any worker answered (ours or another fleet's), the rest answer about as fast.
        let until = match answered {
            false => by,
            true => by.min(tokio::time::Instant::now() + MORE),
        };
        let message = match tokio::time::timeout_at(until, answers.next()).await {
            Ok(Some(message)) => message,
            // Time is up, or the connection closed: what came is what there is.
            Ok(None) | Err(_) => break,
        };
        if message.status == Some(StatusCode::NO_RESPONDERS) {
            no_responders = true;
            break;
        }
        answered = true;
        match serde_json::from_slice::<Instance>(&message.payload) {
            Ok(info)
                if info.name == SERVICE_NAME
                    && info.metadata.get("logs_subject").map(String::as_str)
                        == Some(logs_subject) =>
            {
                ours.push(info)
            }
            // Another fleet's worker, or not a service info: not ours.
            _ => {}
        }
    }
    // Best effort: the subscription ends with the connection anyway.
    let _ = answers.unsubscribe().await;
    if !ours.is_empty() {
        return Ok(ours);
    }
    Err(if no_responders {
        format!("no worker is registered ({subject} has no responders)")
    } else if answered {
        format!("no worker taking appends on {logs_subject} answered {subject}")
    } else {
        format!("no answer to {subject} within {:.1}s", wait.as_secs_f64())
    })
}

/// The intake `answers` (each worker's service metadata) agree on.
fn agree(logs_subject: &str, answers: &[HashMap<String, String>]) -> Discovery {
    let intake_of = |m: &HashMap<String, String>| m.get("intake").cloned().unwrap_or_default();
    let first = intake_of(&answers[0]);
    if let Some(other) = answers.iter().map(intake_of).find(|i| *i != first) {
        return Discovery::Unknown(format!(
            "the workers on {logs_subject} do not agree on their intake ({first:?} and {other:?})"
        ));
    }
    let intake = match first.as_str() {
        "core" => Intake::Core,
        "jetstream" => {
            // A worker that does not say (older than the key) takes none as far as is known.
            let partitions = |m: &HashMap<String, String>| {
                m.get(PARTITIONS_KEY)
                    .and_then(|p| p.parse::<u32>().ok())
                    .unwrap_or(0)
            };
            let p = partitions(&answers[0]);
            Intake::JetStream {
                stream: answers[0].get("stream").cloned(),
                partitions: if answers.iter().all(|m| partitions(m) == p) {
                    p
                } else {
                    0
                },
            }
        }
        other => {
            return Discovery::Unknown(format!(
                "the workers on {logs_subject} name an unknown intake {other:?}"
            ))
        }
    };
    Discovery::Found(Fleet {
        intake,
        workers: answers.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(intake: &str, partitions: Option<&str>) -> HashMap<String, String> {
        let mut m = HashMap::from([
            ("logs_subject".to_string(), "logs".to_string()),
            ("intake".to_string(), intake.to_string()),
        ]);
        if intake == "jetstream" {
            m.insert("stream".into(), "LOGS".into());
        }
        if let Some(p) = partitions {
            m.insert(PARTITIONS_KEY.into(), p.into());
        }
        m
    }

    fn jetstream(partitions: u32, workers: usize) -> Discovery {
        Discovery::Found(Fleet {
            intake: Intake::JetStream {
                stream: Some("LOGS".into()),
                partitions,
            },
            workers,
        })
    }

    #[test]
    fn workers_that_agree_give_their_intake_and_partitions() {
        let core = worker("core", Some("0"));
        assert_eq!(
            agree("logs", &[core.clone(), core]),
            Discovery::Found(Fleet {
                intake: Intake::Core,
                workers: 2
            })
        );
        let js8 = worker("jetstream", Some("8"));
        assert_eq!(agree("logs", &[js8.clone(), js8.clone()]), jetstream(8, 2));
        // One that takes none (not ordered), or does not say, or says nonsense: the logs lane.
        for odd in [Some("0"), None, Some("x")] {
            let other = worker("jetstream", odd);
            assert_eq!(agree("logs", &[js8.clone(), other]), jetstream(0, 2));
        }
    }

    #[test]
    fn workers_that_disagree_on_the_intake_decide_nothing() {
        let found = agree(
            "logs",
            &[worker("core", None), worker("jetstream", Some("8"))],
        );
        assert!(
            matches!(&found, Discovery::Unknown(why) if why.contains("do not agree")),
            "{found:?}"
        );
        let found = agree("logs", &[worker("kafka", None)]);
        assert!(matches!(found, Discovery::Unknown(_)), "{found:?}");
    }

    #[test]
    fn a_service_info_decodes() {
        let info: Instance = serde_json::from_str(
            r#"{"type":"io.nats.micro.v1.info_response","name":"logstore","id":"x",
                "version":"0.1.0","description":"d",
                "endpoints":[{"name":"status","subject":"logstore.status.x","queue_group":"q"}],
                "metadata":{"logs_subject":"logs","intake":"jetstream","partitions":"8"}}"#,
        )
        .unwrap();
        assert_eq!(info.name, "logstore");
        assert_eq!(info.metadata["partitions"], "8");
        assert_eq!(info.endpoint("status"), Some("logstore.status.x"));
        assert_eq!(info.endpoint("other"), None);
    }
}
