//! Provisioning a Mosquitto broker with the logins and topic ACLs of live tasks, through its
//! dynamic-security plugin.
//!
//! The control plane connects to Mosquitto as the plugin's admin client and sends commands to
//! `$CONTROL/dynamic-security/v1`. Before the apiserver hands a task its config (which carries
//! the task's broker login, see [`crate::broker_auth`]), [`Provisioner::ensure_task`] creates,
//! for that task, a client with that login and a role that lets it:
//! - subscribe only under its own job's prefix `fledge/<job>/#`, and receive nothing else;
//! - publish only data (`fledge/<job>/+/+/data/#`), broadcasts (`fledge/<job>/+/+/bcast/+`:
//!   a broadcast goes to the topic of the role it is for) and its own presence
//!   (`fledge/<job>/+/+/presence/<role>/<task>`), so it can neither claim nor evict another
//!   end's presence nor write into another job.
//!
//! [`Provisioner::run`] sweeps every few seconds: a client of a task whose job has ended (or
//! was deleted) and its role are deleted, which also disconnects it. Every client carries its
//! control plane's owner tag as its `textname` (`fledge <tag>`, derived from
//! `broker.secret`), and a sweep looks only at its own: control planes that share a Mosquitto
//! never remove each other's logins. Mosquitto itself needs
//! `allow_anonymous false` and the plugin loaded (see `docs/mosquitto.md`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use fledge_channel::MqttConfig;
use fledge_channel::mqtt::{job_topic_prefix, topic_segment};
use fledge_types::{JobId, Task, TaskId};

use crate::broker_auth::BrokerCredentials;
use crate::store::{self, Store};

/// Where dynamic-security commands go, and where their answers come back.
const COMMAND_TOPIC: &str = "$CONTROL/dynamic-security/v1";
const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// How long one command (or waiting for the admin connection) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response accepted from the broker, in bytes.
const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Prefix of the roles Fledge creates (one per task).
const ROLE_PREFIX: &str = "fledge-task/";

/// Errors of Mosquitto provisioning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The admin settings are unusable.
    #[error("invalid mosquitto admin settings: {0}")]
    Config(String),
    /// No answer in time (the broker is down, or the admin login was refused).
    #[error(
        "mosquitto at {url} did not answer {what} within {CALL_TIMEOUT:?} (is it up, with the \
         dynamic-security plugin loaded and the admin login right?)"
    )]
    Timeout {
        /// The broker.
        url: String,
        /// What was asked.
        what: String,
    },
    /// The plugin refused a command.
    #[error("mosquitto refused {command}: {error}")]
    Refused {
        /// The command.
        command: String,
        /// The plugin's reason.
        error: String,
    },
    /// The plugin answered something unexpected.
    #[error("mosquitto answered {what} unexpectedly: {detail}")]
    Malformed {
        /// What was asked.
        what: String,
        /// What is wrong with the answer.
        detail: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Result of provisioning calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach Mosquitto as its dynamic-security admin.
#[derive(Clone)]
pub struct Admin {
    /// `mqtt://host:port`, or `mqtts://host:port` (TLS, verified against `ca`).
    pub url: String,
    /// The CA an `mqtts` broker's certificate must chain to.
    pub ca: Option<fledge_tls::Ca>,
    /// The admin client's username.
    pub username: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("url", &self.url)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Drives one Mosquitto's dynamic-security plugin. Cheap to clone.
#[derive(Clone)]
pub struct Provisioner {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    client: AsyncClient,
    creds: BrokerCredentials,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Vec<Value>>>>,
    subscribed: watch::Receiver<bool>,
    /// Tasks provisioned by this process, so that fetching a config twice changes nothing.
    provisioned: Mutex<HashSet<(JobId, TaskId)>>,
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner").field("url", &self.inner.url).finish_non_exhaustive()
    }
}

/// The role of task `task` of job `job`.
fn role_name(job: &JobId, task: &TaskId) -> String {
    format!("{ROLE_PREFIX}{job}/{task}")
}

fn acl(acltype: &str, topic: String, allow: bool, priority: i64) -> Value {
    json!({"acltype": acltype, "topic": topic, "allow": allow, "priority": priority})
}

/// The ACLs of `task`: see the module documentation.
fn task_acls(task: &Task) -> Vec<Value> {
    let prefix = job_topic_prefix(task.job_id.as_str());
    let role = topic_segment(&task.role);
    let me = topic_segment(task.task_id.as_str());
    vec![
        acl("subscribePattern", format!("{prefix}/#"), true, 0),
        acl("publishClientReceive", format!("{prefix}/#"), true, 1),
        acl("publishClientReceive", "#".to_owned(), false, 0),
        acl("publishClientSend", format!("{prefix}/+/+/data/#"), true, 0),
        // A broadcast goes to the topic of the role it is for (the peers' role on that
        // channel), so a task may broadcast to any role of its job.
        acl("publishClientSend", format!("{prefix}/+/+/bcast/+"), true, 0),
        acl("publishClientSend", format!("{prefix}/+/+/presence/{role}/{me}"), true, 0),
    ]
}

impl Provisioner {
    /// What marks this control plane's logins (their `textname`): `fledge <owner tag>`.
    fn owner(&self) -> String {
        format!("fledge {}", self.inner.creds.owner_tag())
    }

    /// Connects to Mosquitto as `admin` (in the background, reconnecting as needed); logins
    /// are derived with `creds`.
    pub fn connect(admin: &Admin, creds: BrokerCredentials) -> Result<Provisioner> {
        let mut parsed = MqttConfig::parse(&admin.url).map_err(|e| Error::Config(e.to_string()))?;
        if let Some(tls) = &mut parsed.tls {
            tls.ca = admin.ca.clone();
        }
        if admin.username.is_empty() || admin.password.is_empty() {
            return Err(Error::Config("the admin username and password must be set".to_owned()));
        }
        let client_id = format!("fledge-control-{:016x}", rand::random::<u64>());
        let mut options = MqttOptions::new(client_id, parsed.host.clone(), parsed.port);
        options
            .set_credentials(admin.username.clone(), admin.password.clone())
            .set_keep_alive(Duration::from_secs(10))
            .set_clean_session(true)
            .set_max_packet_size(MAX_RESPONSE_BYTES, MAX_RESPONSE_BYTES);
        parsed.apply_transport(&mut options).map_err(|e| Error::Config(e.to_string()))?;
        let (client, eventloop) = AsyncClient::new(options, 64);
        let (subscribed_tx, subscribed) = watch::channel(false);
        let inner = Arc::new(Inner {
            url: admin.url.clone(),
            client,
            creds,
            next: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            subscribed,
            provisioned: Mutex::new(HashSet::new()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(event_loop(
            Arc::downgrade(&inner),
            eventloop,
            subscribed_tx,
            inner.stop.clone(),
        ));
        Ok(Provisioner { inner })
    }

    /// Sends `commands` in one request and returns the plugin's responses, in order. Errors
    /// whose text contains one of `tolerated` are kept in the responses, others fail the call.
    async fn call(
        &self,
        what: &str,
        commands: Vec<Value>,
        tolerated: &[&str],
    ) -> Result<Vec<Value>> {
        let inner = &self.inner;
        let timeout = || Error::Timeout { url: inner.url.clone(), what: what.to_owned() };
        let mut subscribed = inner.subscribed.clone();
        tokio::time::timeout(CALL_TIMEOUT, subscribed.wait_for(|s| *s))
            .await
            .map_err(|_| timeout())?
            .map_err(|_| timeout())?;
        let id = inner.next.fetch_add(1, Ordering::Relaxed);
        let count = commands.len();
        let commands: Vec<Value> = commands
            .into_iter()
            .map(|mut c| {
                c["correlationData"] = Value::String(id.to_string());
                c
            })
            .collect();
        let (tx, rx) = oneshot::channel();
        inner.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let payload = json!({ "commands": commands }).to_string();
        let sent = inner.client.publish(COMMAND_TOPIC, QoS::AtLeastOnce, false, payload).await;
        let answer = match sent {
            Ok(()) => tokio::time::timeout(CALL_TIMEOUT, rx).await.ok().and_then(|r| r.ok()),
            Err(_) => None,
        };
        inner.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        let responses = answer.ok_or_else(timeout)?;
        if responses.len() != count {
            return Err(Error::Malformed {
                what: what.to_owned(),
                detail: format!("{} responses to {count} commands", responses.len()),
            });
        }
        for response in &responses {
            if let Some(error) = response.get("error").and_then(Value::as_str)
                && !tolerated.iter().any(|t| error.contains(t))
            {
                let command = response.get("command").and_then(Value::as_str).unwrap_or("?");
                return Err(Error::Refused {
                    command: format!("{command} ({what})"),
                    error: error.to_owned(),
                });
            }
        }
        Ok(responses)
    }

    /// Creates `task`'s login and role unless this process already did; a client left by an
    /// earlier run is replaced, so its password is the current one.
    pub async fn ensure_task(&self, task: &Task) -> Result<()> {
        let key = (task.job_id.clone(), task.task_id.clone());
        if self.inner.provisioned.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
            return Ok(());
        }
        let username = BrokerCredentials::username(&task.job_id, &task.task_id);
        let password = self.inner.creds.password(&task.job_id, &task.task_id);
        let rolename = role_name(&task.job_id, &task.task_id);
        let what = format!("provisioning task {}", task.task_id);
        // Delete first (tolerating absence): create-only would keep a stale password or ACLs.
        self.call(
            &what,
            vec![
                json!({"command": "deleteClient", "username": username}),
                json!({"command": "deleteRole", "rolename": rolename}),
                json!({"command": "createRole", "rolename": rolename, "acls": task_acls(task)}),
                json!({
                    "command": "createClient",
                    "username": username,
                    "password": password,
                    "textname": self.owner(),
                    "roles": [{"rolename": rolename, "priority": 0}],
                }),
            ],
            &["not found"],
        )
        .await?;
        self.inner.provisioned.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        Ok(())
    }

    /// Deletes the login and role of task `task` of job `job` (absent ones are fine); the
    /// broker disconnects the client if it is connected.
    pub async fn remove_task(&self, job: &JobId, task: &TaskId) -> Result<()> {
        self.call(
            &format!("removing task {task}"),
            vec![
                json!({"command": "deleteClient", "username": BrokerCredentials::username(job, task)}),
                json!({"command": "deleteRole", "rolename": role_name(job, task)}),
            ],
            &["not found"],
        )
        .await?;
        let key = (job.clone(), task.clone());
        self.inner.provisioned.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        Ok(())
    }

    /// The tasks that have a login on the broker (clients named `<job>/<task>`).
    pub async fn task_clients(&self) -> Result<Vec<(JobId, TaskId)>> {
        let what = "listing clients";
        let responses = self
            .call(
                what,
                vec![json!({"command": "listClients", "verbose": true, "count": -1, "offset": 0})],
                &[],
            )
            .await?;
        let owner = self.owner();
        let clients =
            responses[0].pointer("/data/clients").and_then(Value::as_array).ok_or_else(|| {
                Error::Malformed {
                    what: what.to_owned(),
                    detail: "no data.clients list".to_owned(),
                }
            })?;
        Ok(clients
            .iter()
            // Only the logins this control plane made: another one may share the broker.
            .filter(|client| client.get("textname").and_then(Value::as_str) == Some(&owner))
            .filter_map(|client| client.get("username").and_then(Value::as_str))
            .filter_map(|name| name.split_once('/'))
            .filter(|(job, task)| !job.is_empty() && !task.is_empty() && !task.contains('/'))
            .map(|(job, task)| (JobId::new(job), TaskId::new(task)))
            .collect())
    }

    /// Removes the logins of tasks whose job is final or gone; returns how many.
    pub async fn sweep(&self, store: &dyn Store) -> Result<usize> {
        let mut removed = 0;
        let mut live: HashMap<JobId, bool> = HashMap::new();
        for (job, task) in self.task_clients().await? {
            let is_live = match live.get(&job) {
                Some(known) => *known,
                None => {
                    let known = match store.get_job(None, &job).await {
                        Ok(found) => !found.state.is_final(),
                        Err(store::Error::NotFound { .. }) => false,
                        Err(err) => return Err(err.into()),
                    };
                    live.insert(job.clone(), known);
                    known
                }
            };
            if !is_live {
                self.remove_task(&job, &task).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Sweeps every `interval` until `shutdown`; failures are logged and retried.
    pub async fn run(self, store: Arc<dyn Store>, interval: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            match self.sweep(store.as_ref()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "mosquitto logins of ended jobs removed"),
                Err(err) => tracing::warn!(%err, "mosquitto sweep failed; retrying"),
            }
        }
    }
}

/// Polls the admin connection: (re)subscribes to the responses, hands answers to callers.
async fn event_loop(
    inner: std::sync::Weak<Inner>,
    mut eventloop: rumqttc::EventLoop,
    subscribed: watch::Sender<bool>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = eventloop.poll() => event,
        };
        let Some(inner) = inner.upgrade() else { break };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                subscribed.send_replace(false);
                if let Err(err) = inner.client.try_subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce) {
                    tracing::warn!(%err, "cannot subscribe to mosquitto's dynamic-security responses");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let ok = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
                if !ok {
                    tracing::error!(
                        url = %inner.url,
                        "mosquitto refused the admin's subscription to {RESPONSE_TOPIC}: is this \
                         login the dynamic-security admin?"
                    );
                }
                subscribed.send_replace(ok);
            }
            Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == RESPONSE_TOPIC => {
                dispatch(&inner, &publish.payload);
            }
            Ok(_) => {}
            Err(err) => {
                subscribed.send_replace(false);
                tracing::warn!(url = %inner.url, %err, "mosquitto admin connection failed; retrying");
                drop(inner);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Hands a response message to the caller waiting for it (by correlation data).
fn dispatch(inner: &Inner, payload: &[u8]) {
    let Ok(message) = serde_json::from_slice::<Value>(payload) else {
        tracing::warn!("mosquitto sent a dynamic-security response that is not JSON");
        return;
    };
    let Some(responses) = message.get("responses").and_then(Value::as_array) else {
        return;
    };
    let id = responses
        .first()
        .and_then(|r| r.get("correlationData"))
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<u64>().ok());
    let Some(id) = id else { return };
    let waiter = inner.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    if let Some(waiter) = waiter {
        let _ = waiter.send(responses.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acls_keep_a_task_inside_its_job_and_its_own_presence() {
        let task: Task = serde_json::from_value(json!({
            "jobId": "j1", "taskId": "t1", "role": "trainer", "index": 0,
            "groupAssociation": {}, "computeId": "default", "managed": true, "state": "ready",
            "log": "",
        }))
        .expect("a task");
        let acls = task_acls(&task);
        let topics: Vec<(&str, &str, bool)> = acls
            .iter()
            .map(|a| {
                (
                    a["acltype"].as_str().expect("type"),
                    a["topic"].as_str().expect("topic"),
                    a["allow"].as_bool().expect("allow"),
                )
            })
            .collect();
        assert!(topics.contains(&("subscribePattern", "fledge/j1/#", true)));
        assert!(topics.contains(&("publishClientSend", "fledge/j1/+/+/presence/trainer/t1", true)));
        // An aggregator broadcasts to `bcast/trainer`: a broadcast to another role is allowed.
        assert!(topics.contains(&("publishClientSend", "fledge/j1/+/+/bcast/+", true)));
        assert!(topics.contains(&("publishClientReceive", "#", false)));
        assert!(
            topics.iter().all(|(_, topic, allow)| !allow || topic.starts_with("fledge/j1/")),
            "every allowed topic is under the job: {topics:?}"
        );
        assert_eq!(role_name(&task.job_id, &task.task_id), "fledge-task/j1/t1");
    }
}
