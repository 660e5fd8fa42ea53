//! The worker's NATS connection: one attempt that fails the start on a refused login or TLS
//! handshake, else a client that keeps retrying in the background, with callbacks that log
//! each connection event once (server URLs redacted).
//!
//! NATS_URL may name several servers (a cluster): the first attempt tries each of them until
//! one answers, and a lost connection is made again to any server of the pool, which also
//! holds the cluster's other servers as the connected one announces them. Plus what every
//! JetStream caller needs to tell a missing stream from one that cannot answer right now
//! ([`stream_missing`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::{Chain, Error};

/// Connect to NATS. One attempt first: a server that refuses the login or the TLS handshake
/// stops the start with a line saying so (no retry cures that). A server that cannot be
/// reached is retried in the background while the worker runs, not ready, as before.
pub async fn connect(config: &Config, metrics: &Metrics) -> Result<async_nats::Client, Error> {
    let state = ConnectionLog {
        reconnects: metrics.nats_reconnects.clone(),
        connected_once: Arc::new(AtomicBool::new(false)),
        failures_seen: Arc::default(),
    };
    let failure = match config.nats.connect(|o| with_callbacks(o, &state)).await {
        Ok(client) => return Ok(client),
        Err(failure) if failure.rejected => return Err(failure.into()),
        Err(failure) => failure,
    };
    tracing::warn!(
        error = %Chain(&failure),
        "NATS is not reachable at start; the worker starts (not ready) and connects when it is"
    );
    // Start (not ready) while NATS is down, and connect when it comes up.
    let retrying = |o| with_callbacks(o, &state).retry_on_initial_connect();
    Ok(config.nats.connect(retrying).await?)
}

/// What the connection callbacks share across connection attempts (and the two clients
/// [`connect`] may build).
#[derive(Clone)]
struct ConnectionLog {
    reconnects: prometheus::IntCounter,
    connected_once: Arc<AtomicBool>,
    /// Per server URL (redacted), the failed attempts already logged.
    failures_seen: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// `options` (the login and TLS of the NATS_* settings: credentials travel there, never
/// inside logged URLs, and the inbox prefix) with the worker's name and callbacks that log
/// each connection event once.
fn with_callbacks(
    options: async_nats::ConnectOptions,
    state: &ConnectionLog,
) -> async_nats::ConnectOptions {
    let ConnectionLog {
        reconnects,
        connected_once,
        failures_seen,
    } = state.clone();
    options
        .name("logstore-worker")
        // Called before every connection attempt (initial and reconnect) with the server pool,
        // which holds each server's failed-attempt count and last error: a count that grew
        // since the last call is one failed attempt, logged once, with the (redacted) URL and
        // the cause. Returning None keeps async-nats's own server choice and backoff.
        .reconnect_to_server_callback(move |servers, _info| {
            let seen = failures_seen.clone();
            async move {
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                for server in &servers {
                    let url = logstore_protocol::redact::redact(server.addr.as_url_str());
                    let before = seen.insert(url.clone(), server.failed_attempts);
                    if server.failed_attempts > before.unwrap_or(0) {
                        let cause = server.last_error.as_deref().unwrap_or("unknown");
                        tracing::warn!(
                            url = %url,
                            attempts = server.failed_attempts,
                            error = %logstore_protocol::redact::redact(cause),
                            "cannot connect to NATS; retrying"
                        );
                    }
                }
                None
            }
        })
        .event_callback(move |event| {
            let reconnects = reconnects.clone();
            let connected_once = connected_once.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        if connected_once.swap(true, Ordering::AcqRel) {
                            reconnects.inc();
                        }
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    // A failed connection attempt: its only detail is the error kind ("IO
                    // error"); the attempt is logged with URL and cause above.
                    async_nats::Event::ClientError(async_nats::ClientError::Other(kind)) => {
                        tracing::debug!(%kind, "NATS connection attempt failed")
                    }
                    other @ (async_nats::Event::ServerError(_)
                    | async_nats::Event::ClientError(_)
                    | async_nats::Event::SlowConsumer(_)) => {
                        tracing::warn!(event = %other, "NATS error")
                    }
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        })
}

/// Whether `error` says the stream does not exist, as opposed to not answering now (no
/// JetStream leader during an election, a reconnect), which is worth a retry and never a
/// reason to create it over.
pub(crate) fn stream_missing(error: &async_nats::jetstream::context::GetStreamError) -> bool {
    use async_nats::jetstream::{context::GetStreamErrorKind, ErrorCode};
    matches!(error.kind(), GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND)
}
