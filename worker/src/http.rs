//! The HTTP endpoint on METRICS_ADDR: `/metrics`, `/healthz` (the process is up) and `/readyz`
//! (NATS connected and every shard reachable; 503 naming what is not). Stops on cancellation.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// Lists what is not ready (empty = ready). Called on every /readyz.
pub type ReadinessCheck = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// Serve until `cancel` fires. Connections are tracked on `tasks` and closed on cancellation.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    readiness: ReadinessCheck,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = respond(&req, &metrics, &readiness);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = cancel.cancelled() => connection.as_mut().graceful_shutdown(),
            }
        });
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
