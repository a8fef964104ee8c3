//! The notifier: gRPC server streams that push events to agents and deployers.
//!
//! Two kinds of subscriber exist: an agent (fledgelet) subscribes for one task and authenticates
//! with that task's key; a deployer subscribes for one compute and authenticates with the
//! compute's API key. Both send `authorization: Bearer <secret>` metadata.
//!
//! Delivery is at least once and in order per subscriber:
//! - every subscriber has a **mailbox** that keeps its most recent events (at most
//!   [`Options::mailbox_capacity`]), each with a per-subscriber sequence number starting at 1;
//! - an event published before its subscriber connects waits in the mailbox;
//! - on every connect the whole mailbox is replayed, then new events follow live, so a client
//!   that reconnects drops the sequence numbers it has already seen;
//! - a newer connection for the same subscriber replaces the older one (whose stream ends).
//!
//! Bounded-queue policy: a mailbox that is full drops its **oldest** event (logged at `warn`),
//! because newer events (a stop after a start, a revoke after a deploy) supersede older ones.
//! A connected client that falls a whole mailbox behind is disconnected (its stream ends) rather
//! than buffered without bound; on reconnect it gets the mailbox replayed.
//!
//! Start at [`Options::build`]; publishers use [`Handle`].

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use fledge_proto::v1::notifier_server::NotifierServer;
use fledge_proto::{
    ComputeSubscription, DeployEvent, DeployEventKind, TaskEvent, TaskEventKind, TaskSubscription,
};
use fledge_types::{ComputeId, ErrorCode, JobId, TaskId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::grpc;
use crate::store::{self, Store};

/// Errors of the notifier.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options are invalid.
    #[error("invalid notifier option {field}: {reason}")]
    InvalidOption {
        /// The option's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The gRPC server failed.
    #[error("notifier server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// Result of notifier calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Notifier options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields, default)]
pub struct Options {
    /// Most events kept per subscriber (events, default 256). When full, the oldest is dropped.
    pub mailbox_capacity: usize,
    /// Interval of HTTP/2 keepalive pings on every connection, in seconds (default 20; 0
    /// disables). A subscriber that does not answer within the same time is dropped, so a
    /// vanished deployer stops counting as connected.
    pub keepalive_secs: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self { mailbox_capacity: 256, keepalive_secs: 20 }
    }
}

impl Options {
    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        if self.mailbox_capacity == 0 {
            return Err(Error::InvalidOption {
                field: "mailbox_capacity",
                reason: "must be at least 1".to_owned(),
            });
        }
        Ok(())
    }

    /// Builds the notifier over `store` (used to authenticate subscribers).
    pub fn build(self, store: Arc<dyn Store>) -> Result<Notifier> {
        self.validate()?;
        Ok(Notifier {
            shared: Arc::new(Shared {
                capacity: self.mailbox_capacity,
                inner: Mutex::new(Inner::default()),
                counts: Counts::default(),
            }),
            store,
            keepalive: (self.keepalive_secs > 0)
                .then(|| std::time::Duration::from_secs(self.keepalive_secs)),
            tls: None,
        })
    }
}

/// The SHA-256 of `secret`, hex encoded: how keys and tokens are stored.
pub fn sha256_hex(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// The first sequence number of a new mailbox: the wall clock in microseconds.
///
/// Clients drop events whose number is not above the last one they saw. Mailboxes live in
/// memory, so a restarted notifier (or a mailbox re-created after [`Handle::forget_job`]) must
/// not count from 1 again; starting from the clock keeps numbers increasing across restarts
/// as long as a mailbox publishes fewer than a million events per second of uptime.
fn first_seq() -> u64 {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
        .unwrap_or(0);
    micros.max(1)
}

/// An event with a sequence number field.
trait Sequenced: Clone {
    fn set_seq(&mut self, seq: u64);
}

impl Sequenced for TaskEvent {
    fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }
}

impl Sequenced for DeployEvent {
    fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }
}

/// One subscriber's retained events and its live connection, if any.
struct Mailbox<E> {
    events: VecDeque<E>,
    next_seq: u64,
    /// The current connection: its id and the sender feeding its stream.
    conn: Option<(u64, mpsc::Sender<E>)>,
    /// The job a task mailbox belongs to (for [`Handle::forget_job`]).
    job: Option<JobId>,
}

impl<E: Sequenced> Mailbox<E> {
    fn new(job: Option<JobId>, first_seq: u64) -> Self {
        Self { events: VecDeque::new(), next_seq: first_seq, conn: None, job }
    }

    /// Appends `event` (assigning its sequence number, returned) and pushes it to the live
    /// connection.
    fn publish(
        &mut self,
        mut event: E,
        capacity: usize,
        subscriber: &dyn std::fmt::Display,
        counts: &Counts,
        kind: &'static str,
    ) -> u64 {
        let seq = self.next_seq;
        event.set_seq(seq);
        self.next_seq += 1;
        let label = KindLabel { kind };
        counts.published.get_or_create(&label).inc();
        if self.events.len() >= capacity {
            self.events.pop_front();
            counts.dropped.get_or_create(&label).inc();
            tracing::warn!(%subscriber, capacity, "notifier mailbox full; dropped its oldest event");
        }
        self.events.push_back(event.clone());
        if let Some((_, tx)) = &self.conn
            && tx.try_send(event).is_err()
        {
            // Closed (the client left) or full (the client is a whole mailbox behind): end the
            // stream; the client's reconnect replays the mailbox.
            tracing::info!(%subscriber, "notifier subscriber gone or too slow; disconnecting it");
            counts.disconnected.get_or_create(&label).inc();
            self.conn = None;
        }
        seq
    }

    /// Replaces the connection with a new one that first receives every retained event.
    fn connect(&mut self, conn_id: u64, capacity: usize) -> mpsc::Receiver<E> {
        let (tx, rx) = mpsc::channel(capacity);
        for event in &self.events {
            // Cannot fail: the channel is new and holds `capacity` >= `events.len()` items.
            let _ = tx.try_send(event.clone());
        }
        self.conn = Some((conn_id, tx));
        rx
    }

    fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|(_, tx)| !tx.is_closed())
    }
}

#[derive(Default)]
struct Inner {
    next_conn: u64,
    /// The highest sequence number assigned so far, so that a re-created mailbox continues
    /// above it.
    max_seq: u64,
    tasks: HashMap<TaskId, Mailbox<TaskEvent>>,
    computes: HashMap<ComputeId, Mailbox<DeployEvent>>,
}

impl Inner {
    /// The first sequence number of a mailbox created now.
    fn first_seq(&self) -> u64 {
        first_seq().max(self.max_seq + 1)
    }
}

struct Shared {
    capacity: usize,
    // A std mutex: every critical section is a few map operations and non-blocking sends.
    inner: Mutex<Inner>,
    counts: Counts,
}

/// `kind` label: `task` (agents' mailboxes) or `deploy` (deployers').
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// The notifier's counters (operator metrics).
#[derive(Default)]
struct Counts {
    published: Family<KindLabel, Counter>,
    dropped: Family<KindLabel, Counter>,
    disconnected: Family<KindLabel, Counter>,
}

/// A snapshot of the notifier's subscribers and mailboxes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Task mailboxes (one per task of a live job that was sent an event).
    pub task_mailboxes: usize,
    /// Agents connected now.
    pub task_subscribers: usize,
    /// Events retained in task mailboxes.
    pub task_queued: usize,
    /// Compute mailboxes.
    pub compute_mailboxes: usize,
    /// Deployers connected now.
    pub compute_subscribers: usize,
    /// Events retained in compute mailboxes.
    pub compute_queued: usize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the maps consistent (no multi-step updates), so
        // a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A cheap handle to publish events and ask about subscribers.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("notifier::Handle").finish_non_exhaustive()
    }
}

impl Handle {
    /// Queues `kind` for the agent of `task` (delivered now if it is connected, else on connect).
    pub fn publish_task(&self, job: &JobId, task: &TaskId, kind: TaskEventKind) {
        let event = TaskEvent {
            seq: 0,
            job_id: job.to_string(),
            task_id: task.to_string(),
            kind: kind as i32,
        };
        let mut guard = self.shared.lock();
        let inner = &mut *guard;
        let first = inner.first_seq();
        let mailbox = inner
            .tasks
            .entry(task.clone())
            .or_insert_with(|| Mailbox::new(Some(job.clone()), first));
        let seq = mailbox.publish(event, self.shared.capacity, task, &self.shared.counts, "task");
        inner.max_seq = inner.max_seq.max(seq);
    }

    /// Queues `event` for the deployer of `compute`. Its `seq` is assigned here.
    pub fn publish_deploy(&self, compute: &ComputeId, event: DeployEvent) {
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let first = inner.first_seq();
        let mailbox =
            inner.computes.entry(compute.clone()).or_insert_with(|| Mailbox::new(None, first));
        let seq =
            mailbox.publish(event, self.shared.capacity, compute, &self.shared.counts, "deploy");
        inner.max_seq = inner.max_seq.max(seq);
    }

    /// How many subscribers and retained events there are now.
    pub fn stats(&self) -> Stats {
        let inner = self.shared.lock();
        Stats {
            task_mailboxes: inner.tasks.len(),
            task_subscribers: inner.tasks.values().filter(|m| m.is_connected()).count(),
            task_queued: inner.tasks.values().map(|m| m.events.len()).sum(),
            compute_mailboxes: inner.computes.len(),
            compute_subscribers: inner.computes.values().filter(|m| m.is_connected()).count(),
            compute_queued: inner.computes.values().map(|m| m.events.len()).sum(),
        }
    }

    /// Registers the notifier's series into `telemetry`: events published, dropped from full
    /// mailboxes and slow subscribers disconnected (counters), subscribers, mailboxes and
    /// retained events (gauges read when scraped), each by `kind` (`task` or `deploy`).
    pub fn register_metrics(&self, telemetry: &crate::telemetry::Telemetry) {
        let subscribers = Family::<KindLabel, Gauge>::default();
        let mailboxes = Family::<KindLabel, Gauge>::default();
        let queued = Family::<KindLabel, Gauge>::default();
        let counts = &self.shared.counts;
        telemetry.register(|registry| {
            let r = registry.sub_registry_with_prefix("notifier");
            r.register("events_published", "Events published", counts.published.clone());
            r.register(
                "events_dropped",
                "Oldest events dropped from full mailboxes",
                counts.dropped.clone(),
            );
            r.register(
                "slow_disconnects",
                "Subscribers disconnected for falling a whole mailbox behind (or gone)",
                counts.disconnected.clone(),
            );
            r.register("subscribers", "Subscribers connected now", subscribers.clone());
            r.register("mailboxes", "Mailboxes held", mailboxes.clone());
            r.register("queued_events", "Events retained in mailboxes", queued.clone());
        });
        let handle = self.clone();
        telemetry.on_scrape(move || {
            let stats = handle.stats();
            let set = |family: &Family<KindLabel, Gauge>, kind, n: usize| {
                family.get_or_create(&KindLabel { kind }).set(i64::try_from(n).unwrap_or(i64::MAX));
            };
            set(&subscribers, "task", stats.task_subscribers);
            set(&subscribers, "deploy", stats.compute_subscribers);
            set(&mailboxes, "task", stats.task_mailboxes);
            set(&mailboxes, "deploy", stats.compute_mailboxes);
            set(&queued, "task", stats.task_queued);
            set(&queued, "deploy", stats.compute_queued);
        });
    }

    /// Whether a deployer for `compute` is connected now.
    pub fn is_compute_connected(&self, compute: &ComputeId) -> bool {
        self.shared.lock().computes.get(compute).is_some_and(Mailbox::is_connected)
    }

    /// Whether the agent of `task` is connected now.
    pub fn is_task_connected(&self, task: &TaskId) -> bool {
        self.shared.lock().tasks.get(task).is_some_and(Mailbox::is_connected)
    }

    /// Drops the events retained for `task`, so that the worker of its next attempt (a
    /// restart) is not replayed the stop or start events of the one before.
    pub fn reset_task(&self, task: &TaskId) {
        if let Some(mailbox) = self.shared.lock().tasks.get_mut(task) {
            mailbox.events.clear();
            mailbox.conn = None;
        }
    }

    /// Drops the mailboxes of `job`'s tasks (called once the job has ended and its tasks are
    /// final, so the notifier's memory does not grow with the number of jobs ever run).
    pub fn forget_job(&self, job: &JobId) {
        self.shared.lock().tasks.retain(|_, mailbox| mailbox.job.as_ref() != Some(job));
    }
}

/// The notifier service: build with [`Options::build`], then [`Notifier::run`].
pub struct Notifier {
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    keepalive: Option<std::time::Duration>,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl Notifier {
    /// Serves TLS with `tls` (see `crate::tls::ControlTls::tonic`) instead of plain text.
    pub fn with_tls(mut self, tls: tonic::transport::ServerTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// A handle to publish events.
    pub fn handle(&self) -> Handle {
        Handle { shared: self.shared.clone() }
    }

    /// Serves gRPC on `listener` until `shutdown` is cancelled; open streams end then too.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
        let addr = listener.local_addr().ok();
        tracing::info!(?addr, "notifier listening");
        let service =
            Service { shared: self.shared, store: self.store, shutdown: shutdown.clone() };
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls).map_err(Error::Serve)?;
        }
        builder
            .http2_keepalive_interval(self.keepalive)
            .http2_keepalive_timeout(self.keepalive)
            .add_service(NotifierServer::new(service))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await
            .map_err(Error::Serve)
    }
}

struct Service {
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
}

/// The one mapping of store errors to gRPC status for this service.
fn auth_status(err: store::Error, what: &str) -> Status {
    match err {
        store::Error::NotFound { .. } => {
            grpc::status(ErrorCode::Unauthenticated, format!("unknown {what} or wrong key"))
        }
        other => {
            tracing::error!(error = %other, "store failed while authenticating a subscriber");
            grpc::status(ErrorCode::Unavailable, "store unavailable")
        }
    }
}

type EventStream<E> = Pin<Box<dyn Stream<Item = std::result::Result<E, Status>> + Send>>;

impl Service {
    fn stream<E: Send + 'static>(&self, rx: mpsc::Receiver<E>) -> EventStream<E> {
        Box::pin(
            ReceiverStream::new(rx).map(Ok).take_until(self.shutdown.clone().cancelled_owned()),
        )
    }
}

#[tonic::async_trait]
impl fledge_proto::Notifier for Service {
    type SubscribeTaskStream = EventStream<TaskEvent>;
    type SubscribeComputeStream = EventStream<DeployEvent>;

    async fn subscribe_task(
        &self,
        request: Request<TaskSubscription>,
    ) -> std::result::Result<Response<Self::SubscribeTaskStream>, Status> {
        let key = grpc::bearer(&request)?;
        let sub = request.into_inner();
        if sub.task_id.is_empty() {
            return Err(grpc::status(ErrorCode::BadRequest, "task_id is empty"));
        }
        let task_id = TaskId::new(sub.task_id);
        let task = self
            .store
            .task_by_key(&task_id, &sha256_hex(&key))
            .await
            .map_err(|err| auth_status(err, "task"))?;
        if !sub.job_id.is_empty() && task.job_id.as_str() != sub.job_id {
            return Err(grpc::status(
                ErrorCode::BadRequest,
                format!("task {task_id} does not belong to job {}", sub.job_id),
            ));
        }
        let rx = {
            let mut inner = self.shared.lock();
            inner.next_conn += 1;
            let conn_id = inner.next_conn;
            let first = inner.first_seq();
            inner
                .tasks
                .entry(task_id.clone())
                .or_insert_with(|| Mailbox::new(Some(task.job_id.clone()), first))
                .connect(conn_id, self.shared.capacity)
        };
        tracing::info!(%task_id, job_id = %task.job_id, "agent subscribed");
        Ok(Response::new(self.stream(rx)))
    }

    async fn subscribe_compute(
        &self,
        request: Request<ComputeSubscription>,
    ) -> std::result::Result<Response<Self::SubscribeComputeStream>, Status> {
        let key = grpc::bearer(&request)?;
        let sub = request.into_inner();
        if sub.compute_id.is_empty() {
            return Err(grpc::status(ErrorCode::BadRequest, "compute_id is empty"));
        }
        let compute_id = ComputeId::new(sub.compute_id);
        self.store
            .verify_compute_key(&compute_id, &sha256_hex(&key))
            .await
            .map_err(|err| auth_status(err, "compute"))?;
        let rx = {
            let mut inner = self.shared.lock();
            inner.next_conn += 1;
            let conn_id = inner.next_conn;
            let first = inner.first_seq();
            inner
                .computes
                .entry(compute_id.clone())
                .or_insert_with(|| Mailbox::new(None, first))
                .connect(conn_id, self.shared.capacity)
        };
        tracing::info!(%compute_id, "deployer subscribed");
        Ok(Response::new(self.stream(rx)))
    }
}

/// A deploy event for `job` (its `seq` is set when published).
pub fn deploy_event(
    kind: DeployEventKind,
    job: &JobId,
    tasks: Vec<fledge_proto::TaskDeployment>,
    apiserver: &str,
    notifier: &str,
) -> DeployEvent {
    DeployEvent {
        seq: 0,
        kind: kind as i32,
        job_id: job.to_string(),
        tasks,
        apiserver: apiserver.to_owned(),
        notifier: notifier.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(capacity: usize) -> Handle {
        Handle {
            shared: Arc::new(Shared {
                capacity,
                inner: Mutex::new(Inner::default()),
                counts: Counts::default(),
            }),
        }
    }

    fn connect_task(handle: &Handle, task: &TaskId) -> mpsc::Receiver<TaskEvent> {
        let mut inner = handle.shared.lock();
        inner.next_conn += 1;
        let conn_id = inner.next_conn;
        let first = inner.first_seq();
        let capacity = handle.shared.capacity;
        inner
            .tasks
            .entry(task.clone())
            .or_insert_with(|| Mailbox::new(None, first))
            .connect(conn_id, capacity)
    }

    /// Drained events as (sequence number relative to `base`, kind).
    fn drain(rx: &mut mpsc::Receiver<TaskEvent>, base: u64) -> Vec<(u64, i32)> {
        let mut res = Vec::new();
        while let Ok(event) = rx.try_recv() {
            res.push((event.seq - base + 1, event.kind));
        }
        res
    }

    #[test]
    fn mailbox_queues_before_connect_replays_on_reconnect_and_drops_oldest_when_full() {
        let handle = handle(3);
        let (job, task) = (JobId::new("j"), TaskId::new("t"));
        let start = TaskEventKind::Start as i32;
        let stop = TaskEventKind::Stop as i32;
        handle.publish_task(&job, &task, TaskEventKind::Start);
        assert!(!handle.is_task_connected(&task));

        let before = first_seq();
        let base = handle.shared.lock().tasks[&task].events[0].seq;
        assert!(base > 1_000_000 && base <= before, "sequence numbers start at the clock");
        let mut first = connect_task(&handle, &task);
        assert!(handle.is_task_connected(&task));
        assert_eq!(drain(&mut first, base), vec![(1, start)]);
        handle.publish_task(&job, &task, TaskEventKind::Stop);
        assert_eq!(drain(&mut first, base), vec![(2, stop)]);

        // A newer connection replaces the old one (whose stream ends) and gets a replay.
        let mut second = connect_task(&handle, &task);
        assert_eq!(drain(&mut second, base), vec![(1, start), (2, stop)]);
        assert!(first.try_recv().is_err());
        assert!(first.is_closed() || first.try_recv().is_err());

        // Over capacity: the oldest event goes, sequence numbers keep counting.
        handle.publish_task(&job, &task, TaskEventKind::Stop);
        handle.publish_task(&job, &task, TaskEventKind::Stop);
        drop(second);
        assert!(!handle.is_task_connected(&task));
        let mut third = connect_task(&handle, &task);
        assert_eq!(drain(&mut third, base), vec![(2, stop), (3, stop), (4, stop)]);

        handle.forget_job(&job);
        assert!(!handle.is_task_connected(&task));
        // A re-created mailbox continues above every number handed out before.
        handle.publish_task(&job, &task, TaskEventKind::Start);
        let again = handle.shared.lock().tasks[&task].events[0].seq;
        assert!(again > base + 3, "{again} after {base}+3");
    }

    #[test]
    fn a_client_a_whole_mailbox_behind_is_disconnected() {
        let handle = handle(2);
        let (job, task) = (JobId::new("j"), TaskId::new("t"));
        let _rx = connect_task(&handle, &task);
        for _ in 0..3 {
            handle.publish_task(&job, &task, TaskEventKind::Start);
        }
        assert!(!handle.is_task_connected(&task));
    }

    #[test]
    fn zero_capacity_is_rejected_and_hash_is_sha256() {
        let err = Options { mailbox_capacity: 0, ..Options::default() }
            .validate()
            .expect_err("zero capacity must be rejected");
        assert!(err.to_string().contains("mailbox_capacity"), "{err}");
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
