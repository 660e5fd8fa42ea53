//! The shard health watcher: one task per lane, started with it by [`crate::shards`], stopped
//! with it.
//!
//! Every [`HEALTH_INTERVAL`] it brings its shard one step closer to serving (initialise a
//! shard that never answered, confirm its fleet once the fleet is known) or pings it, marks it
//! up or down, and keeps `logstore_shard_up` and the pool gauges current. Which step to take
//! ([`next_check`]) and which edge to log ([`transition`]) are pure, so the rules are tested
//! without a database; the loop around them only does the I/O and the logging.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cancel::pause;
use crate::metrics::Metrics;
use crate::store::Shard;
use crate::Chain;

/// How often each shard is health-checked (and, while it has never been reachable, retried).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

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

/// An edge worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

/// The edge from `was_up` to `up`, none while the health stays the same.
pub fn transition(was_up: bool, up: bool) -> Option<Transition> {
    match (was_up, up) {
        (false, true) => Some(Transition::Up),
        (true, false) => Some(Transition::Down),
        _ => None,
    }
}

/// Health-check one shard every [`HEALTH_INTERVAL`] until `cancel` (shutdown, or the shard
/// left the ring), then remove its health series.
pub async fn watch_shard(shard: Arc<Shard>, metrics: Metrics, cancel: CancellationToken) {
    let name = shard.name.clone();
    let mut refused_logged = false;
    loop {
        let up = match next_check(Seen::of(&shard)) {
            Check::Refused => {
                if !refused_logged {
                    tracing::error!(shard = %name, "shard refused: its database belongs to another shard name");
                    refused_logged = true;
                }
                false
            }
            Check::ForeignFleet => false,
            Check::ConfirmFleet => shard.confirm_fleet().await.map_err(|e| {
                tracing::debug!(shard = %name, error = %Chain(&e), "fleet check failed");
            }).is_ok(),
            Check::Ping => shard.ping().await.map_err(|e| {
                tracing::debug!(shard = %name, error = %Chain(&e), "health check failed");
            }).is_ok(),
            Check::Initialise => shard.initialise().await.map_err(|e| {
                // Once per cause at warn (a shard down at start may come back refusing TLS or
                // the login), every retry at debug.
                let cause = Chain(&e).to_string();
                if shard.note_init_failure(&cause) {
                    tracing::warn!(shard = %name, error = %cause, "shard still unreachable; retrying");
                } else {
                    tracing::debug!(shard = %name, error = %cause, "shard still unreachable");
                }
            }).is_ok(),
        };
        match transition(shard.set_up(up), up) {
            Some(Transition::Up) => tracing::info!(shard = %name, "shard is up"),
            Some(Transition::Down) => tracing::warn!(shard = %name, "shard is down"),
            None => {}
        }
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
    fn only_edges_are_logged() {
        assert_eq!(transition(false, true), Some(Transition::Up));
        assert_eq!(transition(true, false), Some(Transition::Down));
        assert_eq!(transition(true, true), None);
        assert_eq!(transition(false, false), None);
    }
}
