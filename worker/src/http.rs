//! The HTTP endpoint on METRICS_ADDR: `/metrics`, `/healthz` (the process is up) and `/readyz`
//! (NATS connected and every shard reachable; 503 naming what is not). Stops on cancellation.
//!
//! The endpoint must never cost the worker its real job, whoever connects to it: every
//! connection holds a file descriptor, and descriptors are shared with the NATS and PostgreSQL
//! connections (a worker starved of them cannot reconnect a shard). So a connection that sends
//! nothing is closed after [`HEADER_READ_TIMEOUT`], a kept-alive one after the same time idle,
//! and at most [`MAX_CONNECTIONS`] are open at once. At the cap the oldest connection with no
//! request in progress is closed (its socket gone) before the next one is accepted: refusing new
//! connections would make a fresh `/readyz` probe or scrape wait behind whoever holds the idle
//! sockets, while a prompt client is answered within milliseconds of being accepted, so it
//! could only be evicted if [`MAX_CONNECTIONS`] newer connections arrived in that time.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// Most HTTP connections open at once. Prometheus, a health checker and an operator's curl need
/// a handful; 256 leaves most of a common 1,024-descriptor limit to NATS and PostgreSQL.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a client has to send a request's headers: counted from the accept for the first
/// request, and from the end of the previous response on a kept-alive connection, so it is also
/// the idle timeout between requests. hyper closes the connection when it expires. Twice the
/// compose scrape interval (5 s), so Prometheus keeps reusing its connection; a client that
/// waits longer between requests just reconnects.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest buffered request head, in bytes (hyper's minimum is 8 KiB). The endpoints take no
/// body and short headers; hyper's default (~400 KiB) would let the capped connections hold
/// ~100 MiB between them.
const MAX_BUF_SIZE: usize = 16 * 1024;

/// How often the "cap reached" warning may be logged while connections are being evicted.
const EVICTION_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Lists what is not ready (empty = ready). Called on every /readyz.
pub type ReadinessCheck = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Serve until `cancel` fires. Connections are tracked on `tasks` and shut down gracefully on
/// cancellation.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    readiness: ReadinessCheck,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .max_buf_size(MAX_BUF_SIZE);
    let endpoint = Endpoint {
        http,
        metrics,
        readiness,
        cancel,
    };
    let registry = Registry::new(MAX_CONNECTIONS);
    // One permit per open socket, held by its connection task until the socket is dropped, and
    // taken BEFORE accepting: an evicted connection's socket closes only when its task runs, so
    // counting the registry alone let a burst of arrivals hold a few more than the cap.
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Some(slot) = free_slot(&slots, &registry, &endpoint.cancel).await else {
            return;
        };
        let stream = tokio::select! {
            _ = endpoint.cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: the cap keeps this endpoint far from the limit, so
                    // something else holds the descriptors; retry rather than spin.
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let connection = registry.admit();
        tasks.spawn(endpoint.clone().handle(stream, slot, connection));
    }
}

/// A slot for the next socket: at once when one is free, else after evicting a connection
/// (see [`Registry::evict_one`]) and waiting for its task to let go. None when `cancel` fired.
async fn free_slot(
    slots: &Arc<Semaphore>,
    registry: &Registry,
    cancel: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(slot) = slots.clone().try_acquire_owned() {
        return Some(slot);
    }
    registry.evict_one();
    tokio::select! {
        _ = cancel.cancelled() => None,
        // Err only when the semaphore is closed, which it never is.
        slot = slots.clone().acquire_owned() => slot.ok(),
    }
}

/// What every connection task needs, cloned into each.
#[derive(Clone)]
struct Endpoint {
    http: hyper::server::conn::http1::Builder,
    metrics: Metrics,
    readiness: ReadinessCheck,
    cancel: CancellationToken,
}

impl Endpoint {
    /// Serve one accepted connection until the client is done, it is evicted, or `cancel`
    /// fires (then the request in progress is finished first); the slot and the registry
    /// entry are let go when it ends.
    async fn handle(self, stream: TcpStream, slot: OwnedSemaphorePermit, connection: Admitted) {
        let _slot = slot;
        let Endpoint {
            http,
            metrics,
            readiness,
            cancel,
        } = self;
        let state = connection.state.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            // In progress until hyper has taken the whole body and dropped it, so that
            // eviction spares a connection whose answer is still being written.
            let in_flight = InFlight::enter(&state);
            let response = respond(&req, &metrics, &readiness).map(|body| Tracked {
                body,
                _in_flight: in_flight,
            });
            async move { Ok::<_, Infallible>(response) }
        });
        let served = http.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(served);
        tokio::select! {
            result = served.as_mut() => {
                // Timeouts and clients that hang up land here; nothing to act on.
                if let Err(e) = result {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
            }
            // Dropping the connection closes its socket now.
            _ = connection.state.evict.cancelled() => {}
            _ = cancel.cancelled() => {
                // Finish a request in progress, then close; an idle connection closes at
                // once. The worker bounds how long it waits for background tasks.
                served.as_mut().graceful_shutdown();
                // Its error, like above, is the client's doing.
                let _ = served.await;
            }
        }
        drop(connection);
    }
}

/// The open connections, oldest first (ids only grow).
struct Registry {
    inner: Arc<Mutex<Open>>,
    cap: usize,
}

struct Open {
    next_id: u64,
    connections: BTreeMap<u64, Arc<ConnectionState>>,
    evicted_unreported: u64,
    last_warning: Option<Instant>,
}

#[derive(Default)]
struct ConnectionState {
    /// Requests whose response has not been fully handed to hyper yet.
    in_flight: AtomicUsize,
    /// Fired when the connection is evicted to make room for a new one.
    evict: CancellationToken,
}

/// One admitted connection; dropping it (when the connection task ends) frees its slot.
struct Admitted {
    id: u64,
    state: Arc<ConnectionState>,
    registry: Arc<Mutex<Open>>,
}

impl Registry {
    fn new(cap: usize) -> Registry {
        Registry {
            inner: Arc::new(Mutex::new(Open {
                next_id: 0,
                connections: BTreeMap::new(),
                evicted_unreported: 0,
                last_warning: None,
            })),
            cap,
        }
    }

    /// Close one connection to make room: the oldest idle one, or, when every connection has
    /// a request in progress, the oldest.
    fn evict_one(&self) {
        // The lock guards plain bookkeeping that is never left half-updated, so a panic
        // elsewhere while it was held does not make its contents wrong.
        let mut open = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        Self::evict(&mut open);
    }

    fn evict(open: &mut Open) -> bool {
        let victim = open
            .connections
            .iter()
            .find(|(_, c)| c.in_flight.load(Ordering::Acquire) == 0)
            .or_else(|| open.connections.iter().next())
            .map(|(id, _)| *id);
        let Some(victim) = victim else { return false };
        if let Some(state) = open.connections.remove(&victim) {
            state.evict.cancel();
            open.evicted_unreported += 1;
        }
        true
    }

    /// Register a newly accepted connection, evicting (see [`Registry::evict_one`]) while the
    /// cap is reached.
    fn admit(&self) -> Admitted {
        let mut open = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        while open.connections.len() >= self.cap {
            if !Self::evict(&mut open) {
                break;
            }
        }
        if open.evicted_unreported > 0
            && open
                .last_warning
                .is_none_or(|at| at.elapsed() >= EVICTION_WARN_INTERVAL)
        {
            tracing::warn!(
                evicted = open.evicted_unreported,
                cap = self.cap,
                "metrics endpoint at its connection cap: closed the oldest idle connections"
            );
            open.evicted_unreported = 0;
            open.last_warning = Some(Instant::now());
        }
        let id = open.next_id;
        open.next_id += 1;
        let state = Arc::new(ConnectionState::default());
        open.connections.insert(id, state.clone());
        Admitted {
            id,
            state,
            registry: self.inner.clone(),
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        // Already gone if it was evicted.
        open.connections.remove(&self.id);
    }
}

/// Marks a request in progress on its connection for as long as it lives.
struct InFlight(Arc<ConnectionState>);

impl InFlight {
    fn enter(state: &Arc<ConnectionState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(state.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in progress until hyper drops it. It
/// forwards the size, so responses keep their `content-length` framing.
struct Tracked {
    body: Full<Bytes>,
    _in_flight: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn respond(
    req: &Request<Incoming>,
    metrics: &Metrics,
    readiness: &ReadinessCheck,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        "/readyz" => {
            let problems = readiness();
            if problems.is_empty() {
                reply(StatusCode::OK, "text/plain", b"ready\n".to_vec())
            } else {
                let body = format!("not ready:\n{}\n", problems.join("\n"));
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    body.into_bytes(),
                )
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found: try /metrics, /healthz or /readyz\n".to_vec(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let registry = Registry::new(3);
        let first = registry.admit();
        let second = registry.admit();
        let busy = InFlight::enter(&first.state);
        let third = registry.admit();
        let fourth = registry.admit();
        // `first` is older but has a request in progress.
        assert!(!first.state.evict.is_cancelled());
        assert!(second.state.evict.is_cancelled());
        assert!(!third.state.evict.is_cancelled() && !fourth.state.evict.is_cancelled());
        drop(busy);
        let _fifth = registry.admit();
        assert!(first.state.evict.is_cancelled());
    }

    #[test]
    fn when_every_connection_is_busy_the_oldest_goes() {
        let registry = Registry::new(2);
        let first = registry.admit();
        let second = registry.admit();
        let _busy = (
            InFlight::enter(&first.state),
            InFlight::enter(&second.state),
        );
        let _third = registry.admit();
        assert!(first.state.evict.is_cancelled());
        assert!(!second.state.evict.is_cancelled());
    }

    /// Oversized request heads are refused, normal ones served, and cancellation ends every
    /// task, an idle kept-alive connection's included.
    #[tokio::test]
    async fn refuses_oversized_heads_and_stops_on_cancel() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
        tasks.spawn(serve(
            listener,
            Metrics::new().unwrap(),
            Arc::new(Vec::new),
            cancel.clone(),
            tasks.clone(),
        ));
        let ask = |extra: usize| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "GET /readyz HTTP/1.0\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(extra)
            );
            // The server may answer and close before it has read everything.
            let _ = stream.write_all(head.as_bytes()).await;
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer).await;
            answer
        };
        let timeout = Duration::from_secs(5);
        let small = tokio::time::timeout(timeout, ask(4 * 1024)).await.unwrap();
        assert!(small.starts_with("HTTP/1.0 200"), "{small}");
        let large = tokio::time::timeout(timeout, ask(2 * MAX_BUF_SIZE))
            .await
            .unwrap();
        assert!(large.starts_with("HTTP/1.1 431"), "{large}");

        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 512];
        let n = tokio::time::timeout(timeout, kept.read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
        cancel.cancel();
        tasks.close();
        tokio::time::timeout(timeout, tasks.wait()).await.unwrap();
        let closed = tokio::time::timeout(timeout, kept.read(&mut answer)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }

    #[test]
    fn a_closed_connection_frees_its_slot() {
        let registry = Registry::new(2);
        let first = registry.admit();
        let second = registry.admit();
        drop(first);
        let _third = registry.admit();
        assert!(!second.state.evict.is_cancelled());
        assert_eq!(registry.inner.lock().unwrap().connections.len(), 2);
    }
}
