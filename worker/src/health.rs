//! The shard health watcher: one task per lane, started with it by [`crate::shards`], stopped
//! with it.
//!
//! Every [`HEALTH_INTERVAL`] it brings its shard one step closer to serving (initialise a
//! shard that never answered, confirm its fleet once the fleet is known) or pings it, marks it
//! up or down, and keeps `logstore_shard_up` and the pool gauges current. Which step to take
//! ([`next_check`]) and what to log ([`HealthLog`]) are pure, so the rules are tested without
//! a database; the loop around them only does the I/O and the logging.
//!
//! What an operator reads: one line when a shard goes down, naming the cause (`shard is down
//! shard=pg2 error=shard pg2: cannot connect to 127.0.0.1:5433: Connection refused`), one when
//! it is back (with how long it was down), and while it stays down a reminder at most every
//! [`DOWN_REMINDER`] with the latest cause; every other failed check is logged at debug only.
//! A shard that has not been up since the start says each new cause once instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cancel::pause;
use crate::config::Human;
use crate::metrics::Metrics;
use crate::store::{Shard, StoreError};
use crate::Chain;

/// How often each shard is health-checked (and, while it has never been reachable, retried).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// While a shard stays down, how often the log says so again (rate-limited reminder).
pub const DOWN_REMINDER: Duration = Duration::from_secs(300);

/// What a shard knows about itself at the start of a round.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    /// Its database belongs to another shard name (never cured by retrying).
    pub refused: bool,
    /// Migrated and its name checked.
    pub initialised: bool,
    /// Its fleet id matches the ring record's.
    pub fleet_confirmed: bool,
    /// Its database records another fleet's id.
    pub foreign_fleet: bool,
}

impl Seen {
    fn of(shard: &Shard) -> Seen {
        Seen {
            refused: shard.is_refused(),
            initialised: shard.is_initialised(),
            fleet_confirmed: shard.fleet_confirmed(),
            foreign_fleet: shard.foreign_fleet().is_some(),
        }
    }
}

/// The one step a round takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Down, without asking: the database is another shard's.
    Refused,
    /// Check the fleet id: the fleet became known while the shard did not answer (or it is
    /// another fleet's, which it logged once).
    ConfirmFleet,
    /// Down, without asking: the database is another fleet's.
    ForeignFleet,
    Ping,
    /// Migrate and check the name: the shard has not answered since the start.
    Initialise,
}

/// Which step to take, in order of precedence: a refusal is final, the fleet is checked before
/// a shard counts as up, and only an initialised shard is pinged.
pub fn next_check(seen: Seen) -> Check {
    if seen.refused {
        Check::Refused
    } else if seen.initialised && !seen.fleet_confirmed {
        Check::ConfirmFleet
    } else if seen.foreign_fleet {
        Check::ForeignFleet
    } else if seen.initialised {
        Check::Ping
    } else {
        Check::Initialise
    }
}

/// A line worth logging about a shard's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Say {
    /// Up for the first time since this worker started watching it.
    Up,
    /// Up again after an outage this long.
    UpAgain { down_for: Duration },
    /// It was up and is not: say why.
    Down,
    /// Still down after this long: the rate-limited reminder, with the latest cause.
    StillDown { down_for: Duration },
    /// Not up since the start and this check failed too: each new cause is said once (see
    /// [`Shard::note_init_failure`]), repeats at debug.
    NotYetUp,
}

/// What the log has said about one shard so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Said {
    NotYetUp,
    Up,
    Down { since: Instant, reminded: Instant },
}

/// Decides which health checks are worth a line: each edge once, a reminder at most every
/// [`DOWN_REMINDER`] while down, nothing while nothing changes. Its own record of what was
/// said, not the shard's up flag (which a failed append clears too).
#[derive(Debug)]
pub struct HealthLog {
    said: Said,
}

impl HealthLog {
    /// For a shard that is `up` (initialised and answering) when its watcher starts.
    pub fn new(up: bool) -> HealthLog {
        HealthLog {
            said: if up { Said::Up } else { Said::NotYetUp },
        }
    }

    /// A check at `now` found the shard `up` or not: what to say, if anything.
    pub fn observe(&mut self, up: bool, now: Instant) -> Option<Say> {
        let (said, say) = match (self.said, up) {
            (Said::Up, true) => (Said::Up, None),
            (Said::NotYetUp, true) => (Said::Up, Some(Say::Up)),
            (Said::Down { since, .. }, true) => (
                Said::Up,
                Some(Say::UpAgain {
                    down_for: now.saturating_duration_since(since),
                }),
            ),
            (Said::Up, false) => (
                Said::Down {
                    since: now,
                    reminded: now,
                },
                Some(Say::Down),
            ),
            (Said::Down { since, reminded }, false)
                if now.saturating_duration_since(reminded) >= DOWN_REMINDER =>
            {
                let down_for = now.saturating_duration_since(since);
                let said = Said::Down {
                    since,
                    reminded: now,
                };
                (said, Some(Say::StillDown { down_for }))
            }
            (down @ Said::Down { .. }, false) => (down, None),
            (Said::NotYetUp, false) => (Said::NotYetUp, Some(Say::NotYetUp)),
        };
        self.said = said;
        say
    }
}

/// Why a check found the shard not serving.
struct Failure {
    /// One line: the error chain (`shard pg2: cannot connect to 127.0.0.1:5433: Connection
    /// refused (os error 111)`).
    cause: String,
    /// Initialising it failed: a new cause is worth a warning while it was never up.
    initialising: bool,
}

impl Failure {
    fn of(e: StoreError, initialising: bool) -> Failure {
        Failure {
            cause: cause(&e),
            initialising,
        }
    }
}

/// `e` with its causes, on one line: how a shard's failure is logged (and compared, see
/// [`Shard::note_init_failure`]).
pub fn cause(e: &StoreError) -> String {
    Chain(e).to_string().replace('\n', "; ")
}

/// Health-check one shard every [`HEALTH_INTERVAL`] until `cancel` (shutdown, or the shard
/// left the ring), then remove its health series.
pub async fn watch_shard(shard: Arc<Shard>, metrics: Metrics, cancel: CancellationToken) {
    let name = shard.name.clone();
    let mut log = HealthLog::new(shard.is_up());
    let mut refused_logged = false;
    loop {
        let result = check(&shard, &mut refused_logged).await;
        let up = result.is_ok();
        shard.set_up(up);
        tell(&shard, log.observe(up, Instant::now()), result.err());
        export(&metrics, &shard, up);
        if !pause(&cancel, HEALTH_INTERVAL).await {
            break;
        }
    }
    // Stopped: shutdown, or the shard left the ring. Its health series go with it, so a removed
    // shard that is switched off later does not look down forever.
    let _ = metrics.shard_up.remove_label_values(&[&name]);
    for state in ["in_use", "idle", "max"] {
        let _ = metrics
            .pool_connections
            .remove_label_values(&[&name, state]);
    }
}

/// One round's step ([`next_check`]) on `shard`.
async fn check(shard: &Shard, refused_logged: &mut bool) -> Result<(), Failure> {
    match next_check(Seen::of(shard)) {
        Check::Refused => {
            if !*refused_logged {
                tracing::error!(shard = %shard.name, "shard refused: its database belongs to another shard name");
                *refused_logged = true;
            }
            Err(Failure {
                cause: format!(
                    "shard {}: its database belongs to another shard name",
                    shard.name
                ),
                initialising: false,
            })
        }
        // Logged once by `confirm_fleet` when it found out.
        Check::ForeignFleet => Err(Failure {
            cause: format!(
                "shard {}: its database belongs to another logstore fleet",
                shard.name
            ),
            initialising: false,
        }),
        Check::ConfirmFleet => shard
            .confirm_fleet()
            .await
            .map_err(|e| Failure::of(e, false)),
        Check::Ping => shard.ping().await.map_err(|e| Failure::of(e, false)),
        Check::Initialise => shard.initialise().await.map_err(|e| Failure::of(e, true)),
    }
}

/// Log what [`HealthLog::observe`] decided (`say`) about `shard`, whose check failed with
/// `failure` unless it passed.
fn tell(shard: &Shard, say: Option<Say>, failure: Option<Failure>) {
    let name = &shard.name;
    let cause = failure.as_ref().map_or("", |f| f.cause.as_str());
    match say {
        Some(Say::Up) => tracing::info!(shard = %name, "shard is up"),
        Some(Say::UpAgain { down_for }) => {
            let down_for = Duration::from_secs(down_for.as_secs_f64().round() as u64);
            tracing::info!(shard = %name, down_for = %Human(down_for), "shard is up again")
        }
        Some(Say::Down) => tracing::warn!(
            shard = %name,
            error = %cause,
            "shard is down: its objects answer `unavailable` (core) or wait in the stream \
             (JetStream) until it is back"
        ),
        Some(Say::StillDown { down_for }) => {
            let down_for = Duration::from_secs(down_for.as_secs());
            tracing::warn!(shard = %name, down_for = %Human(down_for), error = %cause, "shard is still down")
        }
        // Once per cause at warn (a shard down at start may come back refusing TLS or the
        // login), every retry at debug.
        Some(Say::NotYetUp) => match failure {
            Some(f) if f.initialising && shard.note_init_failure(&f.cause) => {
                tracing::warn!(shard = %name, error = %f.cause, "shard still unreachable; retrying")
            }
            _ => tracing::debug!(shard = %name, error = %cause, "shard still unreachable"),
        },
        None if failure.is_some() => {
            tracing::debug!(shard = %name, error = %cause, "health check failed")
        }
        None => {}
    }
}

/// `logstore_shard_up` and the pool gauges of `shard`, now.
fn export(metrics: &Metrics, shard: &Shard, up: bool) {
    let name = &shard.name;
    metrics
        .shard_up
        .with_label_values(&[name])
        .set(i64::from(up));
    let status = shard.pool_status();
    let in_use = status.size.saturating_sub(status.available);
    let gauges = [
        ("in_use", in_use as i64),
        ("idle", status.available as i64),
        ("max", status.max_size as i64),
    ];
    for (state, value) in gauges {
        metrics
            .pool_connections
            .with_label_values(&[name, state])
            .set(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(refused: bool, initialised: bool, confirmed: bool, foreign: bool) -> Seen {
        Seen {
            refused,
            initialised,
            fleet_confirmed: confirmed,
            foreign_fleet: foreign,
        }
    }

    #[test]
    fn a_refusal_wins_over_everything() {
        assert_eq!(next_check(seen(true, true, true, true)), Check::Refused);
        assert_eq!(next_check(seen(true, false, false, false)), Check::Refused);
    }

    #[test]
    fn an_initialised_shard_confirms_its_fleet_before_it_is_pinged() {
        assert_eq!(
            next_check(seen(false, true, false, false)),
            Check::ConfirmFleet
        );
        // Another fleet's shard that does not confirm keeps asking (it logged itself once).
        assert_eq!(
            next_check(seen(false, true, false, true)),
            Check::ConfirmFleet
        );
        assert_eq!(next_check(seen(false, true, true, false)), Check::Ping);
    }

    #[test]
    fn a_shard_never_reached_is_initialised_unless_it_is_another_fleets() {
        assert_eq!(
            next_check(seen(false, false, false, false)),
            Check::Initialise
        );
        assert_eq!(
            next_check(seen(false, false, false, true)),
            Check::ForeignFleet
        );
    }

    #[test]
    fn an_outage_is_one_line_down_and_one_line_up() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut log = HealthLog::new(true);
        assert_eq!(log.observe(true, at(0)), None);
        assert_eq!(log.observe(false, at(1)), Some(Say::Down));
        for s in 2..60 {
            assert_eq!(log.observe(false, at(s)), None, "retry at {s}s");
        }
        assert_eq!(
            log.observe(true, at(61)),
            Some(Say::UpAgain {
                down_for: Duration::from_secs(60)
            })
        );
        assert_eq!(log.observe(true, at(62)), None);
    }

    #[test]
    fn a_long_outage_is_recalled_at_most_every_reminder() {
        let t0 = Instant::now();
        let mut log = HealthLog::new(true);
        assert_eq!(log.observe(false, t0), Some(Say::Down));
        let reminder = DOWN_REMINDER.as_secs();
        let mut said = Vec::new();
        for s in 1..=(2 * reminder + 10) {
            if let Some(say) = log.observe(false, t0 + Duration::from_secs(s)) {
                said.push((s, say));
            }
        }
        let still = |n: u64| Say::StillDown {
            down_for: Duration::from_secs(n),
        };
        assert_eq!(
            said,
            [
                (reminder, still(reminder)),
                (2 * reminder, still(2 * reminder))
            ]
        );
    }

    #[test]
    fn a_shard_never_up_says_up_once_it_is() {
        let t0 = Instant::now();
        let mut log = HealthLog::new(false);
        assert_eq!(log.observe(false, t0), Some(Say::NotYetUp));
        assert_eq!(log.observe(false, t0), Some(Say::NotYetUp));
        assert_eq!(log.observe(true, t0), Some(Say::Up));
        assert_eq!(log.observe(true, t0), None);
        assert_eq!(log.observe(false, t0), Some(Say::Down));
    }
}
