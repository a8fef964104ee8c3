//! Prometheus metrics of the apiserver: request counts by route and status, and latency.

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::Instrument as _;

use super::ApiState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

type LatencyFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// The apiserver's HTTP series (registered into the process's [`crate::telemetry`]).
pub(super) struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: LatencyFamily,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for HttpMetrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: LatencyFamily = Family::new_with_constructor(latency_histogram);
        Self { requests, latency }
    }
}

impl HttpMetrics {
    /// Registers the series (`http_requests`, `http_request_duration_seconds`) into `registry`.
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            self.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by method and route",
            self.latency.clone(),
        );
    }
}

/// Middleware: counts and times every request under its route template (not its raw path, so
/// ids do not explode the label space), inside a `request` tracing span (method, route,
/// status, seconds).
pub(super) async fn track(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method()).to_owned();
    let start = tokio::time::Instant::now();
    let span = tracing::info_span!(
        "request",
        method = %method,
        route = %route,
        status = tracing::field::Empty,
        seconds = tracing::field::Empty,
    );
    let response = next.run(request).instrument(span.clone()).await;
    let elapsed = start.elapsed().as_secs_f64();
    span.record("status", response.status().as_u16());
    span.record("seconds", elapsed);
    span.in_scope(|| tracing::debug!("request served"));
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method.clone(),
            route: route.clone(),
            status: response.status().as_u16(),
        })
        .inc();
    state.metrics.latency.get_or_create(&RouteLabels { method, route }).observe(elapsed);
    response
}

/// The label of a request's method: one of the standard methods, or `other` for any other (a
/// client must not grow the label space, and so `/metrics` and memory, with made-up methods).
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::HEAD, "HEAD"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    KNOWN.iter().find(|(m, _)| m == method).map_or("other", |(_, label)| label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn made_up_methods_fold_into_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::DELETE), "DELETE");
        for made_up in ["FOO", "BREW", "X1234"] {
            assert_eq!(method_label(&Method::from_bytes(made_up.as_bytes()).unwrap()), "other");
        }
    }
}
