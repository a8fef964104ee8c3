//! Per-round metrics and the reporter that posts them to the control plane.
//!
//! Each role builds one [`fledge_types::MetricRecord`] per round: user metrics (loss,
//! accuracy, ...) under names that say which model they measure ([`GLOBAL`],
//! [`BEFORE_TRAINING`], [`AFTER_TRAINING`], [`TRAINER_MEAN`]), traffic from the channel counters
//! (`bytesSent`, `bytesReceived` over all channels, and per channel
//! `channel.<name>.bytesSent`, `.bytesReceived`, and, when not zero, `.messagesDropped`,
//! `.rejectedForged`, `.rejectedReplayed`), and the
//! seconds spent in each tasklet (`seconds.<alias>`) plus `roundSeconds`. Records go to the
//! registry's `metrics.jsonl` and, when the task config names a control plane, to
//! `POST {apiserver}/api/v1/tasks/{taskId}/metrics` (body: a JSON array of records, bearer =
//! the task key).
//!
//! The [`Reporter`] never blocks training: records go through a bounded queue to a background
//! task that batches them (up to [`MAX_BATCH`] or every [`BATCH_INTERVAL`]); when the queue is
//! full or the control plane does not answer, records are dropped with a warning.

use std::collections::BTreeMap;
use std::time::Duration;

use fledge_channel::MetricsSnapshot;
use fledge_types::{MetricRecord, TaskId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Prefix of an aggregator's evaluation of the aggregated (global) model on its evaluation set:
/// `global.accuracy`, `global.loss`.
pub const GLOBAL: &str = "global.";
/// Prefix of a trainer's evaluation, on its own test data, of the model it received for the
/// round, before local training: `beforeTraining.accuracy`.
pub const BEFORE_TRAINING: &str = "beforeTraining.";
/// Prefix of a trainer's evaluation of its locally trained model: `afterTraining.accuracy`.
pub const AFTER_TRAINING: &str = "afterTraining.";
/// Prefix of an aggregator's sample-weighted mean of a figure its trainers reported:
/// `trainer.afterTraining.accuracy`.
pub const TRAINER_MEAN: &str = "trainer.";

/// Largest batch per POST.
pub const MAX_BATCH: usize = 64;
/// Longest a record waits for its batch to fill.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(500);
/// Queue bound: records beyond it are dropped.
pub const QUEUE_DEPTH: usize = 1024;
/// Timeout of one POST.
pub const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel counters of a task at one moment: per channel, by name.
#[derive(Clone, Debug, Default)]
pub struct Traffic {
    /// Counters by channel name.
    pub channels: BTreeMap<String, MetricsSnapshot>,
}

impl Traffic {
    /// The sum over every channel.
    pub fn total(&self) -> MetricsSnapshot {
        total_traffic(self.channels.values().copied())
    }
}

/// Metrics of one round being gathered.
#[derive(Clone, Debug, Default)]
pub struct RoundMetrics {
    /// Name → value.
    pub values: BTreeMap<String, f64>,
    traffic_start: Traffic,
    /// When the round started (`None` for a default, never-started round).
    started: Option<std::time::Instant>,
}

impl RoundMetrics {
    /// Starts a round with the channel counters as they are now.
    pub fn start(traffic: Traffic) -> RoundMetrics {
        RoundMetrics {
            values: BTreeMap::new(),
            traffic_start: traffic,
            started: Some(std::time::Instant::now()),
        }
    }

    /// Sets a value.
    pub fn set(&mut self, name: impl Into<String>, value: f64) {
        self.values.insert(name.into(), value);
    }

    /// Adds to a value (tasklet seconds sum when a tasklet runs twice in a round).
    pub fn add(&mut self, name: impl Into<String>, value: f64) {
        *self.values.entry(name.into()).or_default() += value;
    }

    /// Sets `prefix` + each user metric.
    pub fn extend(&mut self, prefix: &str, metrics: &BTreeMap<String, f64>) {
        for (k, v) in metrics {
            self.values.insert(format!("{prefix}{k}"), *v);
        }
    }

    /// Finishes the round: traffic since `start`, into a record.
    pub fn finish(
        mut self,
        task_id: &TaskId,
        role: &str,
        round: u64,
        traffic: Traffic,
    ) -> MetricRecord {
        if let Some(started) = self.started {
            self.set("roundSeconds", started.elapsed().as_secs_f64());
        }
        let (end, start) = (traffic.total(), self.traffic_start.total());
        self.set("bytesSent", end.bytes_sent.saturating_sub(start.bytes_sent) as f64);
        self.set("bytesReceived", end.bytes_received.saturating_sub(start.bytes_received) as f64);
        for (name, now) in &traffic.channels {
            let before = self.traffic_start.channels.get(name).copied().unwrap_or_default();
            let delta = |now: u64, before: u64| now.saturating_sub(before) as f64;
            self.set(format!("channel.{name}.bytesSent"), delta(now.bytes_sent, before.bytes_sent));
            self.set(
                format!("channel.{name}.bytesReceived"),
                delta(now.bytes_received, before.bytes_received),
            );
            for (figure, now, before) in [
                ("messagesDropped", now.messages_dropped, before.messages_dropped),
                ("rejectedForged", now.rejected_forged, before.rejected_forged),
                ("rejectedReplayed", now.rejected_replayed, before.rejected_replayed),
            ] {
                if now > before {
                    self.set(format!("channel.{name}.{figure}"), delta(now, before));
                }
            }
        }
        MetricRecord {
            task_id: task_id.clone(),
            role: role.to_owned(),
            round,
            metrics: self.values,
            timestamp: Some(chrono::Utc::now()),
        }
    }
}

impl RoundMetrics {
    /// Records what a differential-privacy step spent and did (`dp.*`).
    pub fn set_privacy(&mut self, report: &fledge_algorithms::privacy::DpRoundReport) {
        self.set("dp.epsilon", report.epsilon);
        self.set("dp.delta", report.delta);
        self.set("dp.noiseStddev", report.noise_stddev);
        self.set("dp.clippingNorm", report.clipping_norm);
        self.set("dp.clippedFraction", report.clipped_fraction);
    }
}

/// Sums the counters of several channels.
pub fn total_traffic(snapshots: impl IntoIterator<Item = MetricsSnapshot>) -> MetricsSnapshot {
    snapshots.into_iter().fold(MetricsSnapshot::default(), |mut acc, s| {
        acc.bytes_sent += s.bytes_sent;
        acc.bytes_received += s.bytes_received;
        acc.messages_sent += s.messages_sent;
        acc.messages_received += s.messages_received;
        acc.messages_dropped += s.messages_dropped;
        acc
    })
}

/// Sends metric records to the control plane in the background.
#[derive(Debug)]
pub struct Reporter {
    tx: Option<mpsc::Sender<MetricRecord>>,
    task: Option<JoinHandle<()>>,
}

impl Reporter {
    /// A reporter that reports nowhere (local runs).
    pub fn disabled() -> Reporter {
        Reporter { tx: None, task: None }
    }

    /// Starts posting to `{apiserver}/api/v1/tasks/{task_id}/metrics` with bearer `key`.
    /// An `https://` apiserver's certificate is checked against `ca` (PEM, the task config's
    /// `controlPlaneCa`) and nothing else; without one, against the system's roots.
    pub fn start(
        apiserver: &str,
        task_id: &TaskId,
        key: Option<String>,
        ca: Option<&str>,
    ) -> Reporter {
        let url = format!("{}/api/v1/tasks/{}/metrics", apiserver.trim_end_matches('/'), task_id);
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let task = tokio::spawn(post_loop(url, key, ca.map(str::to_owned), rx));
        Reporter { tx: Some(tx), task: Some(task) }
    }

    /// Takes over this reporter's flushing: the returned reporter is the one whose
    /// [`Reporter::shutdown`] waits for the queue to drain; this one keeps queueing records
    /// (and the queue closes once both are gone).
    pub fn take_flusher(&mut self) -> Reporter {
        Reporter { tx: self.tx.clone(), task: self.task.take() }
    }

    /// Queues a record; drops it with a warning when the queue is full. Never waits.
    pub fn report(&self, record: MetricRecord) {
        if let Some(tx) = &self.tx
            && let Err(e) = tx.try_send(record)
        {
            tracing::warn!(error = %e, "metrics queue full or closed; record dropped");
        }
    }

    /// Flushes what is queued (waiting at most `timeout`) and stops.
    pub async fn shutdown(mut self, timeout: Duration) {
        self.tx.take();
        if let Some(task) = self.task.take()
            && tokio::time::timeout(timeout, task).await.is_err()
        {
            tracing::warn!("metrics reporter did not flush in time; remaining records dropped");
        }
    }
}

/// A client for the metrics posts: trusts exactly `ca` when given.
fn http_client(ca: Option<&str>) -> Result<reqwest::Client, String> {
    fledge_tls::install_default_provider();
    let mut builder = reqwest::Client::builder().timeout(POST_TIMEOUT);
    if let Some(pem) = ca {
        let ca = fledge_tls::Ca::from_pem(pem, "controlPlaneCa").map_err(|e| e.to_string())?;
        builder = builder.tls_backend_preconfigured(ca.client_config().map_err(|e| e.to_string())?);
    }
    builder.build().map_err(|e| e.to_string())
}

async fn post_loop(
    url: String,
    key: Option<String>,
    ca: Option<String>,
    mut rx: mpsc::Receiver<MetricRecord>,
) {
    let client = match http_client(ca.as_deref()) {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build an http client; metrics will not be posted");
            while rx.recv().await.is_some() {}
            return;
        }
    };
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + BATCH_INTERVAL;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(record)) => batch.push(record),
                Ok(None) | Err(_) => break,
            }
        }
        post_batch(&client, &url, key.as_deref(), &batch).await;
    }
}

/// How long a batch is retried while the control plane is unreachable or failing (it may be
/// restarting: its workers outlive it). Records sent twice are stored once (the store keeps a
/// record with the same task, round and timestamp once), so a retry is always safe.
const RETRY_FOR: Duration = Duration::from_secs(600);
/// The longest pause between two attempts.
const RETRY_MAX_DELAY: Duration = Duration::from_secs(5);

/// Posts one batch, retrying transport errors and server errors (5xx, 429) with capped
/// exponential backoff for [`RETRY_FOR`]; a refusal (other 4xx) drops the batch.
async fn post_batch(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    batch: &[MetricRecord],
) {
    let give_up = tokio::time::Instant::now() + RETRY_FOR;
    let mut delay = Duration::from_millis(200);
    loop {
        let mut request = client.post(url).json(batch);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let retry = match request.send().await {
            Ok(resp) if resp.status().is_success() => {
                tracing::debug!(records = batch.len(), "metrics posted");
                return;
            }
            Ok(resp) if resp.status().is_server_error() || resp.status().as_u16() == 429 => {
                format!("status {}", resp.status())
            }
            Ok(resp) => {
                tracing::warn!(status = %resp.status(), records = batch.len(), %url,
                    "control plane refused metrics; dropped");
                return;
            }
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() + delay > give_up {
            tracing::warn!(error = %retry, records = batch.len(), %url,
                "control plane unreachable for {}s; metrics dropped", RETRY_FOR.as_secs());
            return;
        }
        tracing::debug!(error = %retry, ?delay, "metrics post failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_MAX_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn record(round: u64) -> MetricRecord {
        let traffic = |snapshot| Traffic { channels: BTreeMap::from([("c".to_owned(), snapshot)]) };
        let mut m =
            RoundMetrics::start(traffic(MetricsSnapshot { bytes_sent: 10, ..Default::default() }));
        m.set("accuracy", 0.9);
        m.add("seconds.train", 1.0);
        m.add("seconds.train", 0.5);
        m.finish(
            &TaskId::from("t1"),
            "trainer",
            round,
            traffic(MetricsSnapshot {
                bytes_sent: 110,
                bytes_received: 7,
                rejected_forged: 3,
                ..Default::default()
            }),
        )
    }

    #[test]
    fn round_metrics_carry_traffic_deltas_and_tasklet_times() {
        let r = record(2);
        assert_eq!(r.metrics["bytesSent"], 100.0);
        assert_eq!(r.metrics["bytesReceived"], 7.0);
        assert_eq!(r.metrics["channel.c.bytesSent"], 100.0);
        assert_eq!(r.metrics["channel.c.bytesReceived"], 7.0);
        assert_eq!(r.metrics["channel.c.rejectedForged"], 3.0);
        assert!(!r.metrics.contains_key("channel.c.messagesDropped"), "zero deltas are left out");
        assert_eq!(r.metrics["seconds.train"], 1.5);
        assert!(r.metrics["roundSeconds"] >= 0.0);
        assert_eq!(r.round, 2);
    }

    #[tokio::test]
    async fn posts_batches_with_the_task_key() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read until the JSON body's closing bracket arrives.
            while !buf.ends_with(b"]") {
                let n = sock.read(&mut chunk).await.expect("read");
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            sock.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                .await
                .expect("write");
            String::from_utf8(buf).expect("utf8")
        });
        let reporter = Reporter::start(
            &format!("http://{addr}"),
            &TaskId::from("t1"),
            Some("k3y".into()),
            None,
        );
        reporter.report(record(1));
        reporter.report(record(2));
        reporter.shutdown(Duration::from_secs(10)).await;
        let request = server.await.expect("server");
        assert!(request.starts_with("POST /api/v1/tasks/t1/metrics"), "{request}");
        assert!(request.to_lowercase().contains("authorization: bearer k3y"));
        let body = &request[request.find("\r\n\r\n").expect("body") + 4..];
        let records: Vec<MetricRecord> = serde_json::from_str(body).expect("json array");
        assert_eq!(records.iter().map(|r| r.round).collect::<Vec<_>>(), [1, 2]);
    }

    #[tokio::test]
    async fn unreachable_control_plane_only_drops() {
        // Port 9 (discard) on loopback is closed here: the POST fails fast.
        let reporter = Reporter::start("http://127.0.0.1:9", &TaskId::from("t1"), None, None);
        reporter.report(record(1));
        reporter.shutdown(Duration::from_secs(10)).await;
        Reporter::disabled().report(record(1));
    }
}
