//! `logstore tail [-f]`: the last entries of a log, then (with `-f`) every new one, each printed
//! exactly once and in seq order, whatever happens to the workers meanwhile.
//!
//! The `appended.<id>` events say THAT the log grew, not what it holds (they carry no text),
//! and on core NATS one can be lost (a reconnect, a worker killed between its commit and the
//! event). So events only wake the follower up: it subscribes first, then reads the existing
//! entries, and from then on reads by query everything after the last seq it printed, whenever
//! an event names a newer seq and at least every [`POLL`] otherwise. Only seqs above that
//! cursor are printed, and a query returns them in seq order without holes (one object's
//! appends commit in seq order, and a query reads one snapshot), so nothing is shown twice or
//! out of order; a lost event delays an entry by at most [`POLL`] and never drops it. Reads
//! that fail because the workers are restarting or busy are retried until interrupted.

use std::io::Write;
use std::time::Duration;

use futures::StreamExt;
use logstore_protocol::{AppendReply, Order, QueryRequest, StatsReply, StatsRequest};
use tokio::time::Instant;

use crate::client::{ClientError, Connection, ReadError};
use crate::{print_entry, CliError};

/// Longest a new entry waits to be printed when its event was lost.
pub const POLL: Duration = Duration::from_secs(1);
/// Pause before reading again after a failed read.
const RETRY: Duration = Duration::from_millis(250);

/// Print the last `lines` entries of `id`; with `follow`, then every new one until Ctrl-C.
pub async fn tail(
    connection: &Connection,
    out: &mut dyn Write,
    json: bool,
    id: u64,
    lines: u64,
    follow: bool,
) -> Result<(), CliError> {
    // Subscribed before anything is read, so no append after the first read goes unnoticed.
    let mut events = None;
    if follow {
        let subject = format!("{}.{id}", connection.subjects.events_prefix);
        let subscriber = connection
            .client
            .subscribe(subject)
            .await
            .map_err(|e| ClientError::Nats(e.into()))?;
        connection
            .client
            .flush()
            .await
            .map_err(|e| ClientError::Nats(e.into()))?;
        events = Some(subscriber);
    }

    let mut cursor = 0;
    if lines > 0 {
        let newest_first = QueryRequest {
            id,
            after: 0,
            before: None,
            order: Order::Desc,
            since: None,
            until: None,
            limit: None,
            request_id: None,
        };
        let mut newest = Vec::new();
        connection
            .read(newest_first, Some(lines), |entry| {
                newest.push(entry);
                Ok(())
            })
            .await?;
        for entry in newest.iter().rev() {
            print_entry(out, json, entry)?;
            cursor = entry.seq;
        }
    }
    if cursor == 0 {
        // Nothing printed: start after the current end, not at entries that are already old.
        let body = serde_json::to_vec(&StatsRequest { id })
            .map_err(|e| CliError::Output(std::io::Error::other(e)))?;
        let stats: StatsReply = connection.request(&connection.subjects.stats, body).await?;
        if lines == 0 || stats.count == 0 {
            cursor = stats.last_seq;
        }
    }
    out.flush()?;
    let Some(mut events) = events else {
        return Ok(());
    };

    loop {
        match catch_up(connection, out, json, id, &mut cursor).await {
            Ok(()) => {}
            Err(ReadError::Client(e)) if e.is_transient() => {
                eprintln!("logstore: {e}; retrying");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = tokio::time::sleep(RETRY) => continue,
                }
            }
            Err(e) => return Err(e.into()),
        }
        out.flush()?;
        // Wait for an event past the cursor, or the poll.
        let deadline = Instant::now() + POLL;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = tokio::time::sleep_until(deadline) => break,
                message = events.next() => match message {
                    Some(message) => {
                        let newer = serde_json::from_slice::<AppendReply>(&message.payload)
                            .is_ok_and(|event| event.seq > cursor);
                        if newer {
                            break;
                        }
                    }
                    None => {
                        return Err(ClientError::Nats(
                            "the event subscription ended (connection closed)".into(),
                        )
                        .into())
                    }
                },
            }
        }
    }
}

/// Print every entry after `cursor`, moving it along.
async fn catch_up(
    connection: &Connection,
    out: &mut dyn Write,
    json: bool,
    id: u64,
    cursor: &mut u64,
) -> Result<(), ReadError> {
    let request = QueryRequest {
        id,
        after: *cursor,
        before: None,
        order: Order::Asc,
        since: None,
        until: None,
        limit: None,
        request_id: None,
    };
    connection
        .read(request, None, |entry| {
            if entry.seq > *cursor {
                print_entry(out, json, &entry)?;
                *cursor = entry.seq;
            }
            Ok(())
        })
        .await?;
    Ok(())
}
