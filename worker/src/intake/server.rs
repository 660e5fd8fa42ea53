//! What the connected nats-server can do for the ordered intake: whether it is new enough to
//! keep track of redeliveries ([`MIN_SERVER`]), and whether a takeover may reset a consumer to
//! its ack floor ([`reset_is_safe`]).

/// The oldest nats-server the ordered intake is safe with. Older servers lose track of a
/// redelivery that finds no pull request waiting: the consumer's delivered sequence goes back
/// by one each time and the message is not redelivered (nats-server pull requests #5305 and
/// #5995, fixed in 2.10.15 and 2.10.22). A resync waits for every unacknowledged delivery to
/// come back, so on such a server a takeover after a crash can wait forever.
pub const MIN_SERVER: (u64, u64, u64) = (2, 10, 22);

/// Whether a nats-server `version` ("2.10.22", "v2.11.0-RC.1") is at least [`MIN_SERVER`];
/// None when it cannot be read.
pub fn server_is_safe(version: &str) -> Option<bool> {
    version_at_least(version, MIN_SERVER)
}

/// The oldest nats-server that resets a consumer to its ack floor (`$JS.API.CONSUMER.RESET`,
/// ADR-60): a takeover then redelivers the last owner's unacknowledged messages at once.
pub const RESET_SERVER: (u64, u64, u64) = (2, 14, 0);

/// Whether a nats-server `version` can reset a consumer ([`RESET_SERVER`]).
pub fn server_can_reset(version: &str) -> bool {
    version_at_least(version, RESET_SERVER) == Some(true)
}

/// Whether takeovers and resyncs may reset a consumer with `replicas` copies on a nats-server
/// `version`: only where the server can and the consumer has one copy. On a replicated
/// consumer (nats-server 2.15.1, R3) resets lost acknowledged appends: in a nemesis run that
/// SIGKILLed one NATS server every 10 s, 6 of 1,350,000 PubAck'd messages in 73 kills were
/// never delivered to any worker and were gone from the stream (the consumer's ack floor passed
/// them); the same run without resets lost none in 72 kills (docs/intake.md, "Why a
/// replicated consumer is never reset").
/// There a takeover waits for ack_wait instead (JS_ACK_WAIT_MS, 5 s by default with
/// JS_REPLICAS above 1).
pub fn reset_is_safe(version: &str, replicas: usize) -> bool {
    server_can_reset(version) && replicas <= 1
}

fn version_at_least(version: &str, least: (u64, u64, u64)) -> Option<bool> {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u64>);
    let mut next = || parts.next().and_then(Result::ok);
    let found = (next()?, next()?, next()?);
    Some(found >= least)
}

/// Say loudly when the connected nats-server is too old for the ordered intake.
pub fn check_server(version: &str) {
    let (major, minor, patch) = MIN_SERVER;
    match server_is_safe(version) {
        Some(true) => {}
        Some(false) => tracing::warn!(
            server = version,
            "this nats-server is older than {major}.{minor}.{patch}: it can lose track of \
             JetStream redeliveries, and a takeover of the ordered intake (JS_ORDERED) after a \
             worker crash can then wait forever; upgrade nats-server"
        ),
        None => tracing::debug!(server = version, "cannot read the nats-server version"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_2_10_22_are_unsafe_for_the_ordered_intake() {
        assert_eq!(server_is_safe("2.9.10"), Some(false));
        assert_eq!(server_is_safe("2.10.21"), Some(false));
        assert_eq!(server_is_safe("2.10.22"), Some(true));
        assert_eq!(server_is_safe("v2.11.0-RC.1"), Some(true));
        assert_eq!(server_is_safe("2.15.1"), Some(true));
        assert_eq!(server_is_safe(""), None);
        assert_eq!(server_is_safe("2.x"), None);
    }

    #[test]
    fn only_a_consumer_with_one_copy_is_reset() {
        assert!(reset_is_safe("2.15.1", 1));
        assert!(!reset_is_safe("2.15.1", 3));
        assert!(!reset_is_safe("2.13.0", 1));
    }
}
