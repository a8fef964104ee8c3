//! The metaserver: rendezvous for the peer-to-peer (`p2p`) channel backend.
//!
//! Every end of a `p2p` channel registers where its own gRPC server listens, under its job,
//! channel and group, with its role and announced properties, and renews that registration
//! (a lease) every heartbeat. Ends ask for the live ends of their peer role in their own scope;
//! the metaserver never returns an end of another job, channel or group. An end whose lease ran
//! out is forgotten, which is how a crashed or hung end leaves its peers' `ends()`.
//!
//! The state is a plain [`Registry`] driven with an explicit clock (unit-tested without
//! sockets); [`Metaserver::run`] serves it over gRPC (`fledge.v1.Metaserver`, see
//! `crates/proto/proto/fledge/v1/p2p.proto`) and sweeps expired leases. Registrations are not
//! persisted: after a restart, ends re-register at their next heartbeat.
//!
//! Built with a store ([`Metaserver::authenticated`], what `fledge serve` and `fledge
//! standalone` run), every request must carry the calling task's key (`authorization: Bearer
//! <task key>` and `fledge-task-id: <task id>` metadata, checked as the apiserver checks it, see
//! [`crate::grpc`]); a task may register, renew and deregister only its own end in its own job,
//! and list only ends of its own job. Anything else is `Unauthenticated` (no or a bad key, or
//! the job has ended) or `PermissionDenied` (someone else's end or job). Without a store
//! ([`Options::build`]) the metaserver is open: in-process tests only.
//!
//! The data itself never passes through here: ends stream to each other directly (see
//! `fledge_channel::p2p`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use fledge_proto::MetaserverServer;
use fledge_types::{ErrorCode, Task};

use crate::store::Store;
use fledge_proto::v1::{
    DeregisterResponse, EndKey, Peer, PeersRequest, PeersResponse, RegisterRequest,
    RegisterResponse,
};

/// Longest id (job, channel, group, end, role) accepted, in bytes.
const MAX_ID_BYTES: usize = 256;
/// Longest endpoint URL accepted, in bytes.
const MAX_ENDPOINT_BYTES: usize = 512;
/// Largest announced-properties document accepted, in bytes.
const MAX_PROPS_BYTES: usize = 64 << 10;
/// Largest CA certificate (PEM) an end may register for its TLS endpoint, in bytes.
const MAX_TLS_CA_BYTES: usize = 8 << 10;

/// Errors of the metaserver.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options are invalid.
    #[error("invalid metaserver option {field}: {reason}")]
    InvalidOption {
        /// The option's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A request is malformed; every problem is listed.
    #[error("invalid request: {}", .0.join("; "))]
    InvalidRequest(Vec<String>),
    /// Registering one more end would exceed the configured bound.
    #[error("the metaserver holds its maximum of {max} ends (setting limits.metaserver_ends)")]
    Full {
        /// The bound ([`Options::max_ends`]).
        max: usize,
    },
    /// Registering one more end of a job would exceed the per-job bound.
    #[error(
        "job {job} has its maximum of {max} ends registered (setting limits.metaserver_ends_per_job); \
         deregister ends of channels or groups it no longer uses"
    )]
    JobFull {
        /// The job.
        job: String,
        /// The bound ([`Options::max_ends_per_job`]).
        max: usize,
    },
    /// The caller may not name this end or job.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The gRPC server failed.
    #[error("metaserver server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// Result of metaserver calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The error's class; [`crate::grpc`] turns it into a gRPC status.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidRequest(_) => ErrorCode::BadRequest,
            Error::Full { .. } | Error::JobFull { .. } => ErrorCode::PayloadTooLarge,
            Error::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Error::InvalidOption { .. } | Error::Serve(_) => ErrorCode::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        crate::grpc::status(err.code(), err.to_string())
    }
}

/// Whether `caller` may register, renew or deregister `end`: only its own, in its own job.
pub fn authorize_end(caller: &Task, end: Option<&EndKey>) -> Result<()> {
    // A missing end is the registry's to report (InvalidArgument).
    let Some(end) = end else { return Ok(()) };
    if end.end_id != caller.task_id.as_str() {
        return Err(Error::PermissionDenied(format!(
            "task {} may only register or deregister its own end, not end {:?}",
            caller.task_id, end.end_id
        )));
    }
    authorize_job(caller, &end.job_id)
}

/// Whether `caller` may name job `job`: only its own.
pub fn authorize_job(caller: &Task, job: &str) -> Result<()> {
    if job != caller.job_id.as_str() {
        return Err(Error::PermissionDenied(format!(
            "task {} belongs to job {}, not job {job:?}: ends register and look up only within \
             their own job",
            caller.task_id, caller.job_id
        )));
    }
    Ok(())
}

/// Metaserver options.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields, default)]
pub struct Options {
    /// Shortest lease granted, in milliseconds (default 200); shorter requests are raised.
    pub min_lease_ms: u32,
    /// Longest lease granted, in milliseconds (default 60000); longer requests are cut.
    pub max_lease_ms: u32,
    /// Most ends registered at once across all jobs (default 100000).
    pub max_ends: usize,
    /// Most ends one job may have registered at once, over all its channels and groups
    /// (default 10000): a task registers only its own end, but may do so under any channel and
    /// group name, so without it one job could take the whole `max_ends`.
    pub max_ends_per_job: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            min_lease_ms: 200,
            max_lease_ms: 60_000,
            max_ends: 100_000,
            max_ends_per_job: 10_000,
        }
    }
}

impl Options {
    /// Checks the options, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.min_lease_ms == 0 {
            return Err(Error::InvalidOption {
                field: "min_lease_ms",
                reason: "must be at least 1".to_owned(),
            });
        }
        if self.max_lease_ms < self.min_lease_ms {
            return Err(Error::InvalidOption {
                field: "max_lease_ms",
                reason: format!(
                    "{} is below min_lease_ms {}",
                    self.max_lease_ms, self.min_lease_ms
                ),
            });
        }
        for (field, value) in
            [("max_ends", self.max_ends), ("max_ends_per_job", self.max_ends_per_job)]
        {
            if value == 0 {
                return Err(Error::InvalidOption {
                    field,
                    reason: "must be at least 1".to_owned(),
                });
            }
        }
        Ok(())
    }

    /// Builds the metaserver.
    pub fn build(self) -> Result<Metaserver> {
        self.validate()?;
        Ok(Metaserver {
            registry: Arc::new(Mutex::new(Registry::new(self))),
            tls: None,
            store: None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Scope {
    job: String,
    channel: String,
    group: String,
}

#[derive(Clone, Debug)]
struct Entry {
    role: String,
    endpoint: String,
    props_json: String,
    tls_ca: String,
    expires: Instant,
}

/// Who listens where, per job, channel and group: the metaserver's state, with an explicit clock.
#[derive(Debug)]
pub struct Registry {
    options: Options,
    scopes: HashMap<Scope, BTreeMap<String, Entry>>,
    ends: usize,
    /// Ends registered per job (expired ones count until swept); jobs with none are absent.
    per_job: HashMap<String, usize>,
}

fn check_id(problems: &mut Vec<String>, field: &str, value: &str) {
    if value.trim().is_empty() {
        problems.push(format!("{field} is empty"));
    } else if value.len() > MAX_ID_BYTES {
        problems.push(format!("{field} is longer than {MAX_ID_BYTES} bytes"));
    }
}

fn check_scope(problems: &mut Vec<String>, prefix: &str, job: &str, channel: &str, group: &str) {
    check_id(problems, &format!("{prefix}job_id"), job);
    check_id(problems, &format!("{prefix}channel"), channel);
    check_id(problems, &format!("{prefix}group"), group);
}

fn check_end(problems: &mut Vec<String>, end: Option<&EndKey>) -> Option<(Scope, String)> {
    let Some(end) = end else {
        problems.push("end is missing".to_owned());
        return None;
    };
    check_scope(problems, "end.", &end.job_id, &end.channel, &end.group);
    check_id(problems, "end.end_id", &end.end_id);
    let scope =
        Scope { job: end.job_id.clone(), channel: end.channel.clone(), group: end.group.clone() };
    Some((scope, end.end_id.clone()))
}

/// Why `endpoint` is not an `http://host:port` URL, if it is not.
fn endpoint_problem(endpoint: &str) -> Option<String> {
    if endpoint.len() > MAX_ENDPOINT_BYTES {
        return Some(format!("endpoint is longer than {MAX_ENDPOINT_BYTES} bytes"));
    }
    let Some(rest) = endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://"))
    else {
        return Some(format!("endpoint {endpoint:?} is not an http:// or https:// URL"));
    };
    let authority = rest.trim_end_matches('/');
    let port_ok = authority
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && !host.contains(['/', '@', ' ']))
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .is_some_and(|port| port != 0);
    (!port_ok).then(|| format!("endpoint {endpoint:?} does not end in host:port"))
}

/// Why `tls_ca` does not fit `endpoint`, if it does not: an `https://` endpoint comes with the
/// PEM certificate of the CA its peers are to trust (bounded), a plain one with none.
fn tls_ca_problem(endpoint: &str, tls_ca: &str) -> Option<String> {
    let https = endpoint.starts_with("https://");
    if tls_ca.len() > MAX_TLS_CA_BYTES {
        Some(format!("tls_ca is longer than {MAX_TLS_CA_BYTES} bytes"))
    } else if https && !tls_ca.trim_start().starts_with("-----BEGIN CERTIFICATE-----") {
        Some("an https endpoint needs tls_ca, the PEM certificate of the CA that signed it".into())
    } else if !https && !tls_ca.is_empty() {
        Some("tls_ca is only for an https endpoint".into())
    } else {
        None
    }
}

impl Registry {
    /// An empty registry bounded by `options`.
    pub fn new(options: Options) -> Registry {
        Registry { options, scopes: HashMap::new(), ends: 0, per_job: HashMap::new() }
    }

    /// Ends registered (expired ones count until swept).
    pub fn len(&self) -> usize {
        self.ends
    }

    /// Whether no end is registered.
    pub fn is_empty(&self) -> bool {
        self.ends == 0
    }

    /// Registers or renews an end; returns the lease granted.
    pub fn register(&mut self, request: RegisterRequest, now: Instant) -> Result<Duration> {
        let mut problems = Vec::new();
        let key = check_end(&mut problems, request.end.as_ref());
        check_id(&mut problems, "role", &request.role);
        if let Some(problem) = endpoint_problem(&request.endpoint) {
            problems.push(problem);
        }
        if request.props_json.len() > MAX_PROPS_BYTES {
            problems.push(format!("props_json is longer than {MAX_PROPS_BYTES} bytes"));
        } else if !matches!(
            serde_json::from_str::<serde_json::Value>(&request.props_json),
            Ok(serde_json::Value::Object(_))
        ) {
            problems.push("props_json is not a JSON object".to_owned());
        }
        if request.lease_ms == 0 {
            problems.push("lease_ms is 0".to_owned());
        }
        if let Some(problem) = tls_ca_problem(&request.endpoint, &request.tls_ca) {
            problems.push(problem);
        }
        let Some((scope, end)) = key.filter(|_| problems.is_empty()) else {
            return Err(Error::InvalidRequest(problems));
        };
        self.sweep_scope(&scope, now);
        let lease_ms = request.lease_ms.clamp(self.options.min_lease_ms, self.options.max_lease_ms);
        let lease = Duration::from_millis(u64::from(lease_ms));
        let new = !self.scopes.get(&scope).is_some_and(|entries| entries.contains_key(&end));
        if new {
            if self.ends >= self.options.max_ends {
                // Expired ends of other scopes still count until swept: sweep, then decide.
                self.sweep(now);
            }
            if self.ends >= self.options.max_ends {
                return Err(Error::Full { max: self.options.max_ends });
            }
            if self.job_ends(&scope.job) >= self.options.max_ends_per_job {
                self.sweep_job(&scope.job, now);
            }
            if self.job_ends(&scope.job) >= self.options.max_ends_per_job {
                return Err(Error::JobFull {
                    job: scope.job.clone(),
                    max: self.options.max_ends_per_job,
                });
            }
            self.ends += 1;
            *self.per_job.entry(scope.job.clone()).or_default() += 1;
        }
        self.scopes.entry(scope).or_default().insert(
            end,
            Entry {
                role: request.role,
                endpoint: request.endpoint,
                props_json: request.props_json,
                tls_ca: request.tls_ca,
                expires: now + lease,
            },
        );
        Ok(lease)
    }

    /// Removes an end; returns whether it was registered.
    pub fn deregister(&mut self, end: &EndKey, now: Instant) -> Result<bool> {
        let mut problems = Vec::new();
        let key = check_end(&mut problems, Some(end));
        let Some((scope, end)) = key.filter(|_| problems.is_empty()) else {
            return Err(Error::InvalidRequest(problems));
        };
        self.sweep_scope(&scope, now);
        let Some(entries) = self.scopes.get_mut(&scope) else {
            return Ok(false);
        };
        let removed = entries.remove(&end).is_some();
        if entries.is_empty() {
            self.scopes.remove(&scope);
        }
        if removed {
            self.forget(&scope.job, 1);
        }
        Ok(removed)
    }

    /// The live ends of `request.role` in the request's job, channel and group, by end id.
    pub fn peers(&mut self, request: &PeersRequest, now: Instant) -> Result<Vec<Peer>> {
        let mut problems = Vec::new();
        check_scope(&mut problems, "", &request.job_id, &request.channel, &request.group);
        check_id(&mut problems, "role", &request.role);
        if !problems.is_empty() {
            return Err(Error::InvalidRequest(problems));
        }
        let scope = Scope {
            job: request.job_id.clone(),
            channel: request.channel.clone(),
            group: request.group.clone(),
        };
        self.sweep_scope(&scope, now);
        let Some(entries) = self.scopes.get(&scope) else {
            return Ok(Vec::new());
        };
        Ok(entries
            .iter()
            .filter(|(_, entry)| entry.role == request.role)
            .map(|(end, entry)| Peer {
                end_id: end.clone(),
                role: entry.role.clone(),
                endpoint: entry.endpoint.clone(),
                props_json: entry.props_json.clone(),
                tls_ca: entry.tls_ca.clone(),
            })
            .collect())
    }

    /// Ends of `job` registered (expired ones count until swept).
    fn job_ends(&self, job: &str) -> usize {
        self.per_job.get(job).copied().unwrap_or(0)
    }

    /// Takes `count` ends of `job` off the counts.
    fn forget(&mut self, job: &str, count: usize) {
        if count == 0 {
            return;
        }
        self.ends -= count;
        if let Some(n) = self.per_job.get_mut(job) {
            *n -= count;
            if *n == 0 {
                self.per_job.remove(job);
            }
        }
    }

    fn sweep_scope(&mut self, scope: &Scope, now: Instant) {
        if let Some(entries) = self.scopes.get_mut(scope) {
            let before = entries.len();
            entries.retain(|_, entry| entry.expires > now);
            let expired = before - entries.len();
            if entries.is_empty() {
                self.scopes.remove(scope);
            }
            self.forget(&scope.job, expired);
        }
    }

    /// Forgets every end of `job` whose lease ran out.
    fn sweep_job(&mut self, job: &str, now: Instant) {
        let scopes: Vec<Scope> = self.scopes.keys().filter(|s| s.job == job).cloned().collect();
        for scope in scopes {
            self.sweep_scope(&scope, now);
        }
    }

    /// Forgets every end whose lease ran out.
    pub fn sweep(&mut self, now: Instant) {
        let scopes: Vec<Scope> = self.scopes.keys().cloned().collect();
        for scope in scopes {
            self.sweep_scope(&scope, now);
        }
    }
}

/// The metaserver service: a [`Registry`] behind gRPC.
pub struct Metaserver {
    registry: Arc<Mutex<Registry>>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    store: Option<Arc<dyn Store>>,
}

struct Service {
    registry: Arc<Mutex<Registry>>,
    store: Option<Arc<dyn Store>>,
}

impl Service {
    /// The calling task, authenticated against the store; `None` when the metaserver is open.
    async fn caller<T>(&self, request: &Request<T>) -> std::result::Result<Option<Task>, Status> {
        match &self.store {
            Some(store) => crate::grpc::authenticate_task(store.as_ref(), request).await.map(Some),
            None => Ok(None),
        }
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves only plain maps behind; keep serving.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl fledge_proto::Metaserver for Service {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> std::result::Result<Response<RegisterResponse>, Status> {
        let caller = self.caller(&request).await?;
        let request = request.into_inner();
        if let Some(caller) = &caller {
            authorize_end(caller, request.end.as_ref())?;
        }
        let lease = self.registry().register(request, Instant::now())?;
        let lease_ms = u32::try_from(lease.as_millis()).unwrap_or(u32::MAX);
        Ok(Response::new(RegisterResponse { lease_ms }))
    }

    async fn deregister(
        &self,
        request: Request<EndKey>,
    ) -> std::result::Result<Response<DeregisterResponse>, Status> {
        let caller = self.caller(&request).await?;
        let end = request.into_inner();
        if let Some(caller) = &caller {
            authorize_end(caller, Some(&end))?;
        }
        let removed = self.registry().deregister(&end, Instant::now())?;
        Ok(Response::new(DeregisterResponse { removed }))
    }

    async fn peers(
        &self,
        request: Request<PeersRequest>,
    ) -> std::result::Result<Response<PeersResponse>, Status> {
        let caller = self.caller(&request).await?;
        let request = request.into_inner();
        if let Some(caller) = &caller {
            authorize_job(caller, &request.job_id)?;
        }
        let peers = self.registry().peers(&request, Instant::now())?;
        Ok(Response::new(PeersResponse { peers }))
    }
}

impl Metaserver {
    /// Serves TLS with `tls` (see `crate::tls::ControlTls::tonic`) instead of plain text.
    pub fn with_tls(mut self, tls: tonic::transport::ServerTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Requires every request to carry a task key valid in `store`, and limits each task to
    /// its own end and job.
    pub fn authenticated(mut self, store: Arc<dyn Store>) -> Metaserver {
        self.store = Some(store);
        self
    }

    /// Serves on `listener` until `shutdown`, sweeping expired leases every second.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
        let addr = listener.local_addr().ok();
        tracing::info!(?addr, "metaserver listening");
        let registry = self.registry.clone();
        let sweeper_stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = sweeper_stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                registry.lock().unwrap_or_else(|p| p.into_inner()).sweep(Instant::now());
            }
        });
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls).map_err(Error::Serve)?;
        }
        builder
            .add_service(MetaserverServer::new(Service {
                registry: self.registry,
                store: self.store,
            }))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await
            .map_err(Error::Serve)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(job: &str, channel: &str, group: &str, end: &str) -> EndKey {
        EndKey {
            job_id: job.to_owned(),
            channel: channel.to_owned(),
            group: group.to_owned(),
            end_id: end.to_owned(),
        }
    }

    fn register(job: &str, group: &str, end: &str, role: &str, lease_ms: u32) -> RegisterRequest {
        RegisterRequest {
            end: Some(key(job, "ring", group, end)),
            role: role.to_owned(),
            endpoint: format!("http://127.0.0.1:{}", 1000 + end.len()),
            props_json: r#"{"num_samples": 10}"#.to_owned(),
            lease_ms,
            tls_ca: String::new(),
        }
    }

    fn peers(job: &str, group: &str, role: &str) -> PeersRequest {
        PeersRequest {
            job_id: job.to_owned(),
            channel: "ring".to_owned(),
            group: group.to_owned(),
            role: role.to_owned(),
        }
    }

    fn ids(peers: &[Peer]) -> Vec<&str> {
        peers.iter().map(|p| p.end_id.as_str()).collect()
    }

    #[test]
    fn scoped_by_job_channel_group_and_role() {
        let mut registry = Registry::new(Options::default());
        let now = Instant::now();
        for (job, group, end, role) in [
            ("j1", "eu", "a", "trainer"),
            ("j1", "eu", "b", "trainer"),
            ("j1", "us", "c", "trainer"),
            ("j2", "eu", "x", "trainer"),
            ("j1", "eu", "agg", "aggregator"),
        ] {
            registry.register(register(job, group, end, role, 5_000), now).expect("valid");
        }
        let mut other_channel = register("j1", "eu", "z", "trainer", 5_000);
        other_channel.end.as_mut().expect("set").channel = "param".to_owned();
        registry.register(other_channel, now).expect("valid");
        assert_eq!(registry.len(), 6);
        let found = registry.peers(&peers("j1", "eu", "trainer"), now).expect("valid");
        assert_eq!(ids(&found), ["a", "b"], "no end of another job, group, channel or role");
        assert_eq!(found[0].props_json, r#"{"num_samples": 10}"#);
        assert_eq!(found[0].endpoint, "http://127.0.0.1:1001");
        assert_eq!(ids(&registry.peers(&peers("j2", "eu", "trainer"), now).expect("ok")), ["x"]);
        assert!(registry.peers(&peers("j3", "eu", "trainer"), now).expect("ok").is_empty());
        // Re-registering replaces (a restarted end on a new port) without counting twice.
        let mut moved = register("j1", "eu", "a", "trainer", 5_000);
        moved.endpoint = "https://10.0.0.7:9".to_owned();
        moved.tls_ca = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".to_owned();
        registry.register(moved.clone(), now).expect("valid");
        assert_eq!(registry.len(), 6);
        let found = registry.peers(&peers("j1", "eu", "trainer"), now).expect("ok");
        assert_eq!(found[0].endpoint, "https://10.0.0.7:9");
        assert_eq!(found[0].tls_ca, moved.tls_ca, "peers learn the CA the end registered");
        // Deregistering one job's end leaves the same id elsewhere alone.
        assert!(registry.deregister(&key("j1", "ring", "eu", "b"), now).expect("valid"));
        assert!(!registry.deregister(&key("j1", "ring", "eu", "b"), now).expect("valid"));
        assert!(!registry.deregister(&key("j2", "ring", "eu", "a"), now).expect("valid"));
        assert_eq!(ids(&registry.peers(&peers("j1", "eu", "trainer"), now).expect("ok")), ["a"]);
    }

    #[test]
    fn leases_expire_and_renewals_extend_them() {
        let options = Options { min_lease_ms: 100, max_lease_ms: 2_000, ..Options::default() };
        let mut registry = Registry::new(options);
        let t0 = Instant::now();
        let granted = registry.register(register("j", "g", "a", "p", 1_000), t0).expect("ok");
        assert_eq!(granted, Duration::from_millis(1_000));
        let clamped = registry.register(register("j", "g", "b", "p", 60_000), t0).expect("ok");
        assert_eq!(clamped, Duration::from_millis(2_000));
        let raised = registry.register(register("j", "g", "c", "p", 1), t0).expect("ok");
        assert_eq!(raised, Duration::from_millis(100));
        let at = |ms| t0 + Duration::from_millis(ms);
        registry.register(register("j", "g", "a", "p", 1_000), at(800)).expect("renewal");
        let live = registry.peers(&peers("j", "g", "p"), at(1_500)).expect("ok");
        assert_eq!(ids(&live), ["a", "b"], "c expired, a was renewed");
        registry.sweep(at(2_500));
        assert_eq!(registry.len(), 0);
        assert!(registry.is_empty());
    }

    #[test]
    fn bad_requests_name_every_problem() {
        let mut registry = Registry::new(Options::default());
        let now = Instant::now();
        let bad = RegisterRequest {
            end: Some(key("", "ring", " ", "a")),
            role: String::new(),
            endpoint: "ftp://host".to_owned(),
            props_json: "[1]".to_owned(),
            lease_ms: 0,
            tls_ca: "x".repeat(MAX_TLS_CA_BYTES + 1),
        };
        let err = registry.register(bad, now).expect_err("invalid").to_string();
        for part in [
            "end.job_id is empty",
            "end.group is empty",
            "role is empty",
            "endpoint \"ftp://host\" is not an http",
            "props_json is not a JSON object",
            "lease_ms is 0",
            "tls_ca is longer than 8192 bytes",
        ] {
            assert!(err.contains(part), "{part} missing from {err}");
        }
        let mut no_end = register("j", "g", "a", "p", 1_000);
        no_end.end = None;
        no_end.endpoint = "http://host".to_owned();
        let err = registry.register(no_end, now).expect_err("invalid").to_string();
        assert!(
            err.contains("end is missing") && err.contains("does not end in host:port"),
            "{err}"
        );
        // A TLS endpoint names the CA its peers are to trust; a plain one names none.
        let mut no_ca = register("j", "g", "a", "p", 1_000);
        no_ca.endpoint = "https://127.0.0.1:9".to_owned();
        let err = registry.register(no_ca.clone(), now).expect_err("invalid").to_string();
        assert!(err.contains("an https endpoint needs tls_ca"), "{err}");
        no_ca.tls_ca = "garbage".to_owned();
        let err = registry.register(no_ca, now).expect_err("invalid").to_string();
        assert!(err.contains("an https endpoint needs tls_ca"), "{err}");
        let mut stray_ca = register("j", "g", "a", "p", 1_000);
        stray_ca.tls_ca = "-----BEGIN CERTIFICATE-----".to_owned();
        let err = registry.register(stray_ca, now).expect_err("invalid").to_string();
        assert!(err.contains("tls_ca is only for an https endpoint"), "{err}");
        let err = registry.peers(&peers("j", "", "p"), now).expect_err("invalid");
        assert_eq!(err.to_string(), "invalid request: group is empty");
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let err = registry.deregister(&key("j", "ring", "g", &long), now).expect_err("invalid");
        assert!(err.to_string().contains("end.end_id is longer than 256 bytes"), "{err}");
        assert!(registry.is_empty(), "nothing was stored");
        assert_eq!(Status::from(err).code(), tonic::Code::InvalidArgument);
    }

    /// Over gRPC: bad requests fail with `InvalidArgument` naming the fields, and a peer of
    /// another job is never returned.
    #[tokio::test]
    async fn grpc_requests_are_checked_and_scoped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let stop = CancellationToken::new();
        let server = Options::default().build().expect("valid").run(listener, stop.clone());
        let server = tokio::spawn(server);
        let mut client = fledge_proto::MetaserverClient::connect(format!("http://{addr}"))
            .await
            .expect("connects");
        let mut bad = register("j1", "eu", "a", "trainer", 1_000);
        bad.endpoint = "127.0.0.1:9".to_owned();
        bad.props_json = "not json".to_owned();
        let status = client.register(bad).await.expect_err("invalid");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("endpoint \"127.0.0.1:9\""), "{status:?}");
        assert!(status.message().contains("props_json is not a JSON object"), "{status:?}");
        let status = client.peers(peers("", "eu", "trainer")).await.expect_err("invalid");
        assert_eq!(status.message(), "invalid request: job_id is empty");

        for (job, end) in [("j1", "a"), ("j1", "b"), ("j2", "a"), ("j2", "z")] {
            let granted = client.register(register(job, "eu", end, "trainer", 5_000)).await;
            assert_eq!(granted.expect("valid").into_inner().lease_ms, 5_000);
        }
        let found = client.peers(peers("j1", "eu", "trainer")).await.expect("valid").into_inner();
        assert_eq!(ids(&found.peers), ["a", "b"]);
        let gone = client.deregister(key("j2", "ring", "eu", "a")).await.expect("valid");
        assert!(gone.into_inner().removed);
        let found = client.peers(peers("j1", "eu", "trainer")).await.expect("valid").into_inner();
        assert_eq!(ids(&found.peers), ["a", "b"], "j2's a leaving does not touch j1's a");
        let found = client.peers(peers("j2", "eu", "trainer")).await.expect("valid").into_inner();
        assert_eq!(ids(&found.peers), ["z"]);
        stop.cancel();
        server.await.expect("joins").expect("serves until stopped");
    }

    #[test]
    fn bounded_number_of_ends() {
        let mut registry = Registry::new(Options { max_ends: 2, ..Options::default() });
        let now = Instant::now();
        registry.register(register("j", "g", "a", "p", 1_000), now).expect("ok");
        registry.register(register("j", "g", "b", "p", 1_000), now).expect("ok");
        let err = registry.register(register("j", "g", "c", "p", 1_000), now).expect_err("full");
        assert!(matches!(err, Error::Full { max: 2 }), "{err}");
        assert_eq!(Status::from(err).code(), tonic::Code::ResourceExhausted);
        registry.register(register("j", "g", "a", "p", 1_000), now).expect("renewal still fits");
        let later = now + Duration::from_secs(5);
        registry.register(register("j", "g", "c", "p", 1_000), later).expect("room after expiry");
        assert_eq!(registry.len(), 1);
        let err = Options { max_lease_ms: 10, min_lease_ms: 20, ..Options::default() }
            .validate()
            .expect_err("inverted bounds");
        assert!(err.to_string().contains("max_lease_ms"), "{err}");
        let err = Options { max_ends_per_job: 0, ..Options::default() }.validate().expect_err("0");
        assert!(err.to_string().contains("max_ends_per_job"), "{err}");
    }

    /// One job's task may register its end under any channel and group name: the job's ends
    /// are bounded apart from the global bound, and other jobs still register.
    #[test]
    fn bounded_number_of_ends_per_job() {
        let options = Options { max_ends_per_job: 3, ..Options::default() };
        let mut registry = Registry::new(options);
        let now = Instant::now();
        for group in ["g1", "g2", "g3"] {
            registry.register(register("greedy", group, "t1", "p", 1_000), now).expect("fits");
        }
        let err = registry
            .register(register("greedy", "g4", "t1", "p", 1_000), now)
            .expect_err("a fourth end of the job");
        assert!(matches!(&err, Error::JobFull { job, max: 3 } if job == "greedy"), "{err}");
        assert!(err.to_string().contains("limits.metaserver_ends_per_job"), "{err}");
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("job greedy has its maximum of 3 ends"), "{status:?}");
        registry.register(register("greedy", "g2", "t1", "p", 1_000), now).expect("a renewal");
        registry.register(register("other", "g1", "t1", "p", 1_000), now).expect("another job");
        assert_eq!(registry.len(), 4);
        // Room again once an end leaves or its lease runs out.
        assert!(registry.deregister(&key("greedy", "ring", "g1", "t1"), now).expect("valid"));
        registry.register(register("greedy", "g4", "t1", "p", 1_000), now).expect("room");
        let later = now + Duration::from_secs(5);
        for group in ["g5", "g6", "g7"] {
            registry.register(register("greedy", group, "t1", "p", 1_000), later).expect("room");
        }
        assert_eq!(registry.job_ends("greedy"), 3, "its expired ends were swept");
        assert_eq!(registry.len(), 4, "other's expired end counts until swept");
        registry.sweep(later);
        assert_eq!((registry.len(), registry.job_ends("other")), (3, 0));
    }
}
