//! `logstore status` as text, for a person: the fleet and the ring first, one line per worker,
//! then only what needs attention spelt out (partitions nobody pulls, shards down, problems,
//! workers that did not answer).

use std::io::{self, Write};

use logstore_protocol::status::{ConsumerLag, RingStatus, WorkerStatus};

use super::{Fleet, FleetRing};

pub fn print(out: &mut dyn Write, fleet: &Fleet) -> io::Result<()> {
    headline(out, fleet)?;
    if let Some(ring) = &fleet.ring {
        print_ring(out, ring)?;
    }
    writeln!(out)?;
    workers(out, &fleet.workers)?;
    writeln!(out)?;
    if let Some(partitions) = &fleet.partitions {
        if partitions.unpulled.is_empty() {
            writeln!(out, "partitions: all {} pulled", partitions.count)?;
        } else {
            writeln!(
                out,
                "partitions nobody pulls: {}",
                list(partitions.unpulled.iter())
            )?;
        }
        for (k, by) in partitions.pulled_by.iter().filter(|(_, by)| by.len() > 1) {
            writeln!(
                out,
                "partition {k} pulled by {}: {}",
                by.len(),
                by.join(", ")
            )?;
        }
    }
    consumers(out, &fleet.consumers)?;
    shards(out, fleet)?;
    let problems: Vec<(&str, &String)> = fleet
        .workers
        .iter()
        .flat_map(|w| w.problems.iter().map(move |p| (w.id.as_str(), p)))
        .collect();
    if !problems.is_empty() {
        writeln!(out, "problems:")?;
        for (id, problem) in problems {
            writeln!(out, "  {id}: {problem}")?;
        }
    }
    if !fleet.unanswered.is_empty() {
        writeln!(out, "not answering:")?;
        for u in &fleet.unanswered {
            writeln!(out, "  {} ({}): {}", u.id, u.version, u.why)?;
        }
    }
    Ok(())
}

/// `3 workers on logs (jetstream intake, stream LOGS, ordered, 8 partitions)`.
fn headline(out: &mut dyn Write, fleet: &Fleet) -> io::Result<()> {
    let n = fleet.workers.len();
    let mut intake = Vec::new();
    if let Some(i) = fleet.workers.iter().find_map(|w| w.intake.as_ref()) {
        intake.push(format!("{} intake", i.kind));
        if let Some(stream) = &i.stream {
            intake.push(format!("stream {stream}"));
            intake.push(if i.ordered { "ordered" } else { "unordered" }.to_string());
        }
    }
    if let Some(p) = &fleet.partitions {
        intake.push(format!("{} partitions", p.count));
    }
    writeln!(
        out,
        "{n} worker{} on {} ({})",
        if n == 1 { "" } else { "s" },
        fleet.logs_subject,
        intake.join(", ")
    )
}

fn print_ring(out: &mut dyn Write, fleet: &FleetRing) -> io::Result<()> {
    let ring = &fleet.ring;
    let members = ring.members.join(", ");
    let change = match &ring.previous {
        Some(previous) => format!("{} -> {members}", previous.join(", ")),
        None => members,
    };
    let agreed = if fleet.agreed {
        "every worker routes by it"
    } else {
        "NOT every worker routes by it yet: see RING below"
    };
    writeln!(
        out,
        "ring: epoch {}, {}: {change} ({agreed})",
        ring.epoch,
        ring.state.as_str()
    )?;
    let mover = match fleet.movers.as_slice() {
        [] => "no worker carries it out now".to_string(),
        movers => format!("mover {}", movers.join(", ")),
    };
    match (&ring.progress, ring.previous.is_some()) {
        (Some(p), true) => writeln!(
            out,
            "move: {} moved, {} found to move in the last scan, {} errors (retried), {} old \
             copies purged ({mover})",
            p.moved, p.todo, p.errors, p.purged
        ),
        (Some(p), false) => writeln!(
            out,
            "last move: {} moved by its last mover, {} old copies purged",
            p.moved, p.purged
        ),
        (None, true) => writeln!(out, "move: no progress published yet ({mover})"),
        (None, false) => Ok(()),
    }
}

fn workers(out: &mut dyn Write, workers: &[WorkerStatus]) -> io::Result<()> {
    let id_width = workers.iter().map(|w| w.id.len()).max().unwrap_or(2).max(6);
    writeln!(
        out,
        "{:<id_width$}  {:>8}  {:<8}  {:>7}  {:<5}  {:<12}  PULLS",
        "WORKER", "PID", "VERSION", "UP", "READY", "RING"
    )?;
    for w in workers {
        let ring = w.ring.as_ref().map_or("-".to_string(), |r: &RingStatus| {
            format!("{} {}", r.epoch, r.state.as_str())
        });
        let mut pulls = Vec::new();
        if let Some(intake) = &w.intake {
            if intake.pulls_logs {
                pulls.push("logs".to_string());
            }
            if !intake.held.is_empty() {
                pulls.push(format!("partitions {}", list(intake.held.iter())));
            }
            if intake.kind == "core" {
                pulls.push("core subscription".to_string());
            }
        }
        if w.ring.as_ref().is_some_and(|r| r.mover) {
            pulls.push("(the mover)".to_string());
        }
        writeln!(
            out,
            "{:<id_width$}  {:>8}  {:<8}  {:>7}  {:<5}  {:<12}  {}",
            w.id,
            w.pid,
            w.version,
            w.uptime_secs.map_or("-".to_string(), uptime),
            if w.ready { "yes" } else { "no" },
            ring,
            if pulls.is_empty() {
                "-".to_string()
            } else {
                pulls.join(", ")
            }
        )?;
    }
    Ok(())
}

fn consumers(out: &mut dyn Write, consumers: &[ConsumerLag]) -> io::Result<()> {
    if consumers.is_empty() {
        return Ok(());
    }
    let width = consumers
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(8)
        .max(8);
    writeln!(
        out,
        "{:<width$}  {:>8}  {:>11}  {:>11}",
        "CONSUMER", "PENDING", "ACK PENDING", "REDELIVERED"
    )?;
    let number = |n: Option<u64>| n.map_or("?".to_string(), |n| n.to_string());
    for c in consumers {
        write!(
            out,
            "{:<width$}  {:>8}  {:>11}  {:>11}",
            c.name,
            number(c.num_pending),
            number(c.num_ack_pending),
            number(c.num_redelivered)
        )?;
        match &c.error {
            Some(error) => writeln!(out, "  ({error})")?,
            None => writeln!(out)?,
        }
    }
    Ok(())
}

/// `shards: pg1 up, pg2 up, pg3 down on a, b (up on c)`.
fn shards(out: &mut dyn Write, fleet: &Fleet) -> io::Result<()> {
    if fleet.shards.is_empty() {
        return Ok(());
    }
    let each: Vec<String> = fleet
        .shards
        .iter()
        .map(|s| match (s.up.is_empty(), s.down.is_empty()) {
            (_, true) => format!("{} up", s.name),
            (true, false) => format!("{} down", s.name),
            (false, false) => format!(
                "{} down on {} (up on {})",
                s.name,
                s.down.join(", "),
                s.up.join(", ")
            ),
        })
        .collect();
    writeln!(out, "shards: {}", each.join(", "))
}

fn list<T: ToString>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(" ")
}

/// `42s`, `3m12s`, `5h07m`, `2d03h`.
fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_read_at_a_glance() {
        assert_eq!(uptime(42), "42s");
        assert_eq!(uptime(192), "3m12s");
        assert_eq!(uptime(5 * 3600 + 7 * 60), "5h07m");
        assert_eq!(uptime(2 * 86_400 + 3 * 3600), "2d03h");
    }
}
