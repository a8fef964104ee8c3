//! Broker credentials: the MQTT login the control plane issues to each task.
//!
//! A task's login is username `<job id>/<task id>` and a password derived as HMAC-SHA256 of
//! both ids under a secret the control plane keeps outside the database
//! (`<data_dir>/secrets/broker.secret`, created on first start, mode 0600), so nothing is
//! stored and any process of the control plane that reads the secret derives the same
//! password. The apiserver writes the login into the `brokers` entries of the task's config
//! (`GET /tasks/{taskId}/config`, which itself needs the task's key), and the embedded broker
//! admits a client only when its password is the derived one AND the task exists in the store
//! with its job not in a final state ([`BrokerCredentials::broker_auth`]). The check runs at
//! CONNECT: a client connected before its job ended keeps its connection until it leaves,
//! which its worker does when the job stops.

use std::path::Path;
use std::sync::Arc;

use fledge_channel::broker::BrokerAuth;
use fledge_types::{JobId, TaskConfig, TaskId};

use crate::controller::TaskKeys;
use crate::store::Store;

/// Domain of task passwords in the HMAC (see [`TaskKeys::derive`]).
const TASK_DOMAIN: &[u8] = b"fledge broker password v1\0";
const OWNER_DOMAIN: &[u8] = b"fledge broker owner v1\0";
/// Longest job or task id accepted in a username, in bytes.
const MAX_ID_BYTES: usize = 256;

/// Derives and checks broker logins.
#[derive(Clone, Debug)]
pub struct BrokerCredentials {
    keys: TaskKeys,
}

impl BrokerCredentials {
    /// Credentials under a fresh random secret (tests; logins do not survive the process).
    pub fn random() -> Self {
        Self { keys: TaskKeys::random() }
    }

    /// Reads the secret from `path`, creating it (owner-only) if absent.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        Ok(Self { keys: TaskKeys::load_or_create(path)? })
    }

    /// The username of task `task` of job `job`.
    pub fn username(job: &JobId, task: &TaskId) -> String {
        format!("{job}/{task}")
    }

    /// A tag naming this control plane (its secret) without revealing it: 16 hex digits, the
    /// same on every start. Marks the logins it provisions on a shared broker as its own.
    pub fn owner_tag(&self) -> String {
        let mut tag = self.keys.derive(OWNER_DOMAIN, &[]);
        tag.truncate(16);
        tag
    }

    /// The password of task `task` of job `job`: 64 hex digits.
    pub fn password(&self, job: &JobId, task: &TaskId) -> String {
        self.keys.derive(TASK_DOMAIN, &[job.as_str(), task.as_str()])
    }

    /// Writes the task's login into every broker entry of `config`.
    pub fn fill(&self, config: &mut TaskConfig) {
        let username = Self::username(&config.job.id, &config.task_id);
        let password = self.password(&config.job.id, &config.task_id);
        for broker in &mut config.brokers {
            broker.username = Some(username.clone());
            broker.password = Some(password.clone());
        }
    }

    /// The job and task a login names, if its password is the one derived for them (the
    /// store is not consulted).
    pub fn verify(&self, username: &str, password: &str) -> Option<(JobId, TaskId)> {
        let (job, task) = username.split_once('/')?;
        let valid_id = |id: &str| !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.contains('/');
        if !valid_id(job) || !valid_id(task) {
            return None;
        }
        let (job, task) = (JobId::new(job), TaskId::new(task));
        fledge_channel::secure::same_secret(password, &self.password(&job, &task))
            .then_some((job, task))
    }

    /// Whether `username`/`password` is the login of a task whose job is live in `store`.
    pub async fn admits(&self, store: &dyn Store, username: &str, password: &str) -> bool {
        let Some((job, task)) = self.verify(username, password) else {
            return false;
        };
        if let Err(err) = store.get_task(&job, &task).await {
            tracing::debug!(%job, %task, %err, "broker login of an unknown task");
            return false;
        }
        match store.get_job(None, &job).await {
            Ok(found) => !found.state.is_final(),
            Err(err) => {
                tracing::debug!(%job, %err, "broker login of an unknown job");
                false
            }
        }
    }

    /// The embedded broker's admission check: [`BrokerCredentials::admits`] against `store`.
    /// Every connection's login is counted in `telemetry` as
    /// `fledge_broker_logins_total{result="accepted"|"refused"}`.
    pub fn broker_auth(
        self,
        store: Arc<dyn Store>,
        telemetry: &crate::telemetry::Telemetry,
    ) -> BrokerAuth {
        let logins = prometheus_client::metrics::family::Family::<
            crate::telemetry::ResultLabel,
            prometheus_client::metrics::counter::Counter,
        >::default();
        telemetry.register(|registry| {
            registry.sub_registry_with_prefix("broker").register(
                "logins",
                "Connections to the embedded broker, by whether their login was accepted",
                logins.clone(),
            );
        });
        let creds = Arc::new(self);
        BrokerAuth::new(move |username, password| {
            let creds = creds.clone();
            let store = store.clone();
            let logins = logins.clone();
            async move {
                let admitted = creds.admits(store.as_ref(), &username, &password).await;
                let result = if admitted { "accepted" } else { "refused" };
                logins.get_or_create(&crate::telemetry::ResultLabel { result }).inc();
                admitted
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_are_per_job_and_task_and_checked_exactly() {
        let creds = BrokerCredentials::random();
        let (job, task) = (JobId::new("j1"), TaskId::new("t1"));
        let user = BrokerCredentials::username(&job, &task);
        let pass = creds.password(&job, &task);
        assert_eq!(user, "j1/t1");
        assert_eq!(pass.len(), 64);
        assert_eq!(creds.verify(&user, &pass), Some((job.clone(), task.clone())));
        // Another task's password, another secret's, a truncated one: all refused.
        assert_eq!(creds.verify(&user, &creds.password(&job, &TaskId::new("t2"))), None);
        assert_eq!(creds.verify(&user, &BrokerCredentials::random().password(&job, &task)), None);
        assert_eq!(creds.verify(&user, &pass[..63]), None);
        assert_eq!(creds.verify("j1/t2", &pass), None);
        for bad_user in ["j1", "/t1", "j1/", "j1/t1/x", ""] {
            assert_eq!(creds.verify(bad_user, &pass), None, "{bad_user}");
        }
        // The task-key domain and the broker domain never collide.
        assert_ne!(pass, creds.keys.key(&task));
    }
}
