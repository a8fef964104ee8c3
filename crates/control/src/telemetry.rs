//! Operator metrics: one Prometheus registry per process, rendered at `/metrics`.
//!
//! Every service of a process registers its own series into one [`Telemetry`]: the apiserver
//! its HTTP counters, the controller job transitions and deploy latency, the notifier its
//! subscribers and mailboxes, the embedded broker its logins and connections, a deployer its
//! worker starts. Gauges that describe state (jobs and tasks by state, notifier subscribers)
//! are read when scraped, from the store and the services, so they can never drift from it.
//!
//! The apiserver serves [`Telemetry::render`] at `/metrics`; a process without an apiserver
//! (`fledge serve --services notifier,deployer`) serves it on its own listener
//! (`metrics.listen`, [`serve`]).
//!
//! Labels are bounded: states are enums, and names that come from job specs (roles, channels)
//! go through [`BoundedLabel`], which folds every name past the first
//! [`MAX_NAMES_PER_LABEL`] into `other`. No series is labelled with a job, task or user id, so
//! `/metrics` holds nothing an owner would keep from other users but counts and timings.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use fledge_types::{JobState, MetricRecord, TaskState};

use crate::store::Store;

/// Most distinct names a spec-supplied label (role, channel) takes before the rest fold into
/// `other`.
pub const MAX_NAMES_PER_LABEL: usize = 64;

/// The content type of the text exposition.
pub const CONTENT_TYPE_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label whose values come from outside (job specs): the first [`MAX_NAMES_PER_LABEL`]
/// distinct values are kept, the rest are `other`, so no client grows `/metrics` without bound.
#[derive(Debug, Default)]
pub struct BoundedLabel {
    seen: Mutex<HashSet<String>>,
}

impl BoundedLabel {
    /// The label value for `name`.
    pub fn value(&self, name: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(name) {
            return name.to_owned();
        }
        if seen.len() < MAX_NAMES_PER_LABEL && !name.is_empty() && name.len() <= 64 {
            seen.insert(name.to_owned());
            return name.to_owned();
        }
        "other".to_owned()
    }
}

/// `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// A job or task state.
    pub state: String,
}

/// `role` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    /// A role of a job's topology.
    pub role: String,
}

/// `channel` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    /// A channel of a job's topology.
    pub channel: String,
}

/// `result` label (`accepted`, `refused`, `started`, `failed`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// The outcome.
    pub result: &'static str,
}

/// `channel` and `reason` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabel {
    /// A channel of a job's topology.
    pub channel: String,
    /// Why messages were refused: `forged` or `replayed`.
    pub reason: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Buckets of durations from 1 ms to about 9 h (doubling).
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 25))
}

/// What tasks report per round (their metric records), relayed by the apiserver as counters
/// and histograms by role and channel. These are the workers' own figures, summed over jobs.
#[derive(Clone)]
pub struct ReportedMetrics {
    rounds: Family<RoleLabel, Counter>,
    round_seconds: HistogramFamily<RoleLabel>,
    aggregation_seconds: HistogramFamily<RoleLabel>,
    bytes_sent: Family<ChannelLabel, Counter>,
    bytes_received: Family<ChannelLabel, Counter>,
    dropped: Family<ChannelLabel, Counter>,
    rejected: Family<RejectLabel, Counter>,
    roles: Arc<BoundedLabel>,
    channels: Arc<BoundedLabel>,
}

impl Default for ReportedMetrics {
    fn default() -> Self {
        Self {
            rounds: Family::default(),
            round_seconds: Family::new_with_constructor(seconds_histogram),
            aggregation_seconds: Family::new_with_constructor(seconds_histogram),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            dropped: Family::default(),
            rejected: Family::default(),
            roles: Arc::default(),
            channels: Arc::default(),
        }
    }
}

/// The tasklet alias whose time (`seconds.<alias>`) is an aggregator's aggregation.
const AGGREGATION_TASKLETS: [&str; 1] = ["aggregate"];

impl ReportedMetrics {
    /// Registers the series under `registry` (prefix `fledge_task_` and `fledge_channel_`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "task_rounds",
            "Rounds finished, as reported by tasks (one metric record per task and round)",
            self.rounds.clone(),
        );
        registry.register(
            "task_round_duration_seconds",
            "Wall time of a round as measured by each task (roundSeconds)",
            self.round_seconds.clone(),
        );
        registry.register(
            "task_aggregation_duration_seconds",
            "Time an aggregator spent in its aggregate tasklet per round (seconds.aggregate)",
            self.aggregation_seconds.clone(),
        );
        registry.register(
            "channel_sent_bytes",
            "Encoded bytes sent on a channel, as reported by its tasks",
            self.bytes_sent.clone(),
        );
        registry.register(
            "channel_received_bytes",
            "Encoded bytes received on a channel, as reported by its tasks",
            self.bytes_received.clone(),
        );
        registry.register(
            "channel_dropped_messages",
            "Inbound messages dropped as malformed, oversized or not authentic, by channel",
            self.dropped.clone(),
        );
        registry.register(
            "channel_rejected_messages",
            "Inbound messages refused as forged or replayed, by channel",
            self.rejected.clone(),
        );
    }

    /// Counts `records`, newly stored (re-sent duplicates must not be passed twice).
    pub fn observe(&self, records: &[MetricRecord]) {
        for record in records {
            let role = RoleLabel { role: self.roles.value(&record.role) };
            self.rounds.get_or_create(&role).inc();
            for (name, &value) in &record.metrics {
                if !value.is_finite() || value < 0.0 {
                    continue;
                }
                if name == "roundSeconds" {
                    self.round_seconds.get_or_create(&role).observe(value);
                } else if let Some(alias) = name.strip_prefix("seconds.")
                    && AGGREGATION_TASKLETS.contains(&alias)
                {
                    self.aggregation_seconds.get_or_create(&role).observe(value);
                } else if let Some(rest) = name.strip_prefix("channel.")
                    && let Some((channel, figure)) = rest.rsplit_once('.')
                {
                    self.observe_channel(channel, figure, value);
                }
            }
        }
    }

    fn observe_channel(&self, channel: &str, figure: &str, value: f64) {
        // Counts are integers in f64; anything past 2^53 is nonsense from a buggy or hostile
        // task and is clamped rather than trusted.
        let count = value.min(9_007_199_254_740_992.0) as u64;
        let label = || ChannelLabel { channel: self.channels.value(channel) };
        match figure {
            "bytesSent" => {
                self.bytes_sent.get_or_create(&label()).inc_by(count);
            }
            "bytesReceived" => {
                self.bytes_received.get_or_create(&label()).inc_by(count);
            }
            "messagesDropped" => {
                self.dropped.get_or_create(&label()).inc_by(count);
            }
            "rejectedForged" | "rejectedReplayed" => {
                let reason = if figure == "rejectedForged" { "forged" } else { "replayed" };
                let label = RejectLabel {
                    channel: self.channels.value(channel),
                    reason: reason.to_owned(),
                };
                self.rejected.get_or_create(&label).inc_by(count);
            }
            _ => {}
        }
    }
}

/// A gauge refreshed when scraped.
type Refresh = Box<dyn Fn() + Send + Sync>;

struct Inner {
    registry: Mutex<Registry>,
    refreshers: Mutex<Vec<Refresh>>,
    store: Mutex<Option<Arc<dyn Store>>>,
    jobs: Family<StateLabel, Gauge>,
    tasks: Family<StateLabel, Gauge>,
    store_errors: Counter,
}

/// A process's metric registry. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// An empty registry with the `fledge` prefix.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(Registry::with_prefix("fledge")),
                refreshers: Mutex::new(Vec::new()),
                store: Mutex::new(None),
                jobs: Family::default(),
                tasks: Family::default(),
                store_errors: Counter::default(),
            }),
        }
    }

    /// Lets a component register its series (`registry` has the `fledge_` prefix).
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.inner.registry.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Runs `refresh` before every render (gauges read from a service's state).
    pub fn on_scrape(&self, refresh: impl Fn() + Send + Sync + 'static) {
        self.inner.refreshers.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(refresh));
    }

    /// Reports `fledge_jobs{state}` and `fledge_tasks{state}` from `store` when scraped.
    /// Registers them once, the first time.
    pub fn watch_store(&self, store: Arc<dyn Store>) {
        let first = self.inner.store.lock().unwrap_or_else(|p| p.into_inner()).replace(store);
        if first.is_none() {
            let (jobs, tasks, errors) = (
                self.inner.jobs.clone(),
                self.inner.tasks.clone(),
                self.inner.store_errors.clone(),
            );
            self.register(|r| {
                r.register("jobs", "Jobs by state, read from the store when scraped", jobs);
                r.register("tasks", "Tasks of all jobs by state, read from the store", tasks);
                r.register(
                    "metrics_store_errors",
                    "Scrapes whose job and task counts could not be read from the store",
                    errors,
                );
            });
        }
    }

    /// Refreshes the scraped gauges and encodes every series (Prometheus/OpenMetrics text).
    pub async fn render(&self) -> Result<String, std::fmt::Error> {
        let store = self.inner.store.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(store) = store {
            match store.state_counts().await {
                Ok(counts) => {
                    for state in JobState::ALL {
                        let n = counts.jobs.get(&state).copied().unwrap_or(0);
                        self.gauge(&self.inner.jobs, state.as_str()).set(clamp(n));
                    }
                    for state in TaskState::ALL {
                        let n = counts.tasks.get(&state).copied().unwrap_or(0);
                        self.gauge(&self.inner.tasks, state.as_str()).set(clamp(n));
                    }
                }
                Err(err) => {
                    // The series keep their last values; the counter says they are stale.
                    tracing::warn!(%err, "cannot count jobs and tasks for /metrics");
                    self.inner.store_errors.inc();
                }
            }
        }
        for refresh in self.inner.refreshers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            refresh();
        }
        let mut text = String::new();
        let registry = self.inner.registry.lock().unwrap_or_else(|p| p.into_inner());
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        Ok(text)
    }

    fn gauge(&self, family: &Family<StateLabel, Gauge>, state: &str) -> Gauge {
        family.get_or_create(&StateLabel { state: state.to_owned() }).clone()
    }

    /// The `/metrics` response.
    pub async fn response(&self) -> Response {
        match self.render().await {
            Ok(text) => ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], text).into_response(),
            Err(err) => crate::api::Error::new(
                fledge_types::ErrorCode::Internal,
                format!("cannot encode metrics: {err}"),
            )
            .into_response(),
        }
    }

    /// A router with `GET /metrics` and `GET /healthz` alone (the metrics listener of a
    /// process without an apiserver).
    pub fn router(&self) -> Router {
        let telemetry = self.clone();
        Router::new()
            .route(
                "/metrics",
                get(move || {
                    let telemetry = telemetry.clone();
                    async move { telemetry.response().await }
                }),
            )
            .route("/healthz", get(|| async { "ok" }))
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Serves [`Telemetry::router`] on `listener` (plain TCP, or a TLS listener) until `shutdown`.
pub async fn serve<L>(
    listener: L,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) -> anyhow::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "metrics listening");
    axum::serve(listener, telemetry.router())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

/// Binds the metrics listener.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the metrics listener {addr}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use fledge_types::TaskId;

    fn record(role: &str, metrics: &[(&str, f64)]) -> MetricRecord {
        MetricRecord {
            task_id: TaskId::new("t"),
            role: role.to_owned(),
            round: 1,
            metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect::<BTreeMap<_, _>>(),
            timestamp: None,
        }
    }

    #[tokio::test]
    async fn records_become_series_by_role_and_channel() {
        let telemetry = Telemetry::new();
        let reported = ReportedMetrics::default();
        telemetry.register(|r| reported.register(r));
        reported.observe(&[
            record(
                "aggregator",
                &[
                    ("roundSeconds", 0.5),
                    ("seconds.aggregate", 0.1),
                    ("channel.param-channel.bytesSent", 1000.0),
                    ("channel.param-channel.bytesReceived", 3000.0),
                    ("channel.param-channel.rejectedForged", 2.0),
                    ("global.accuracy", 0.9),
                ],
            ),
            record("trainer", &[("roundSeconds", 0.4), ("channel.param-channel.bytesSent", 5.0)]),
            record("trainer", &[("roundSeconds", f64::NAN), ("channel.x.bytesSent", -4.0)]),
        ]);
        let text = telemetry.render().await.unwrap();
        for line in [
            "fledge_task_rounds_total{role=\"trainer\"} 2",
            "fledge_task_rounds_total{role=\"aggregator\"} 1",
            "fledge_channel_sent_bytes_total{channel=\"param-channel\"} 1005",
            "fledge_channel_received_bytes_total{channel=\"param-channel\"} 3000",
            "fledge_channel_rejected_messages_total{channel=\"param-channel\",reason=\"forged\"} 2",
            "fledge_task_round_duration_seconds_count{role=\"trainer\"} 1",
            "fledge_task_aggregation_duration_seconds_count{role=\"aggregator\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("channel=\"x\""), "a negative count is not trusted: {text}");
    }

    #[test]
    fn spec_supplied_names_cannot_grow_the_label_space() {
        let label = BoundedLabel::default();
        for i in 0..1000 {
            label.value(&format!("role-{i}"));
        }
        assert_eq!(label.value("role-3"), "role-3");
        assert_eq!(label.value("role-999"), "other");
        assert_eq!(label.value(&"x".repeat(65)), "other");
        assert_eq!(label.seen.lock().unwrap().len(), MAX_NAMES_PER_LABEL);
    }
}
