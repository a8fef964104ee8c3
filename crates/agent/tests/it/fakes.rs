//! Fakes of the control plane and helpers shared by the tests.

use std::io::{Cursor, Write as _};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Notify;

use fledge_agent::api::{self, DeploymentApi, DeploymentState, TaskApi};
use fledge_types::{JobId, TaskConfig, TaskId, TaskState};

/// A generous deadline for anything a test waits on.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A task's side of the control plane, in memory.
pub struct FakeTaskApi {
    pub config: TaskConfig,
    pub zip: Vec<u8>,
    pub statuses: Mutex<Vec<(TaskState, String)>>,
    pub heartbeats: AtomicU32,
    /// Final-state reports to fail as "unavailable" before accepting one.
    pub unavailable_final_reports: AtomicU32,
    /// Streamed log lines by number, and the state reported before each post (if any).
    pub streamed: Mutex<Vec<(u64, String)>>,
    pub changed: Notify,
}

impl FakeTaskApi {
    pub fn new(zip: Vec<u8>) -> Self {
        let config: TaskConfig = serde_json::from_value(serde_json::json!({
            "taskId": "t1",
            "role": "trainer",
            "job": {"id": "j1", "name": "job"},
            "hyperparameters": {"rounds": 2}
        }))
        .expect("valid config");
        Self {
            config,
            zip,
            statuses: Mutex::new(Vec::new()),
            heartbeats: AtomicU32::new(0),
            unavailable_final_reports: AtomicU32::new(0),
            streamed: Mutex::new(Vec::new()),
            changed: Notify::new(),
        }
    }

    pub fn states(&self) -> Vec<TaskState> {
        self.statuses.lock().expect("lock").iter().map(|(s, _)| *s).collect()
    }

    /// Waits until `check` holds for the recorded statuses.
    pub async fn wait_until(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let notified = self.changed.notified();
            if check(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() && !check(self) {
                panic!("timed out waiting for {what}; statuses: {:?}", self.states());
            }
        }
    }
}

impl TaskApi for FakeTaskApi {
    fn config(&self) -> BoxFuture<'_, api::Result<TaskConfig>> {
        Box::pin(async move { Ok(self.config.clone()) })
    }

    fn code(&self) -> BoxFuture<'_, api::Result<Vec<u8>>> {
        Box::pin(async move { Ok(self.zip.clone()) })
    }

    fn set_status<'a>(&'a self, state: TaskState, log: &'a str) -> BoxFuture<'a, api::Result<()>> {
        Box::pin(async move {
            if state.is_final()
                && self
                    .unavailable_final_reports
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                return Err(api::Error::Unavailable(anyhow::anyhow!("restarting")));
            }
            self.statuses.lock().expect("lock").push((state, log.to_owned()));
            self.changed.notify_waiters();
            Ok(())
        })
    }

    fn heartbeat(&self) -> BoxFuture<'_, api::Result<()>> {
        Box::pin(async move {
            self.heartbeats.fetch_add(1, Ordering::SeqCst);
            self.changed.notify_waiters();
            Ok(())
        })
    }

    fn append_log<'a>(
        &'a self,
        _stream: &'a str,
        offset: u64,
        lines: &'a [String],
    ) -> BoxFuture<'a, api::Result<()>> {
        Box::pin(async move {
            // A post after the final state would be a line the reader never sees.
            assert!(
                !self.states().iter().any(|s| s.is_final()),
                "log lines streamed after the final state"
            );
            let mut streamed = self.streamed.lock().expect("lock");
            for (i, line) in lines.iter().enumerate() {
                streamed.push((offset + i as u64, line.clone()));
            }
            drop(streamed);
            self.changed.notify_waiters();
            Ok(())
        })
    }
}

/// One deployment report as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub job: String,
    pub task: String,
    pub state: DeploymentState,
    pub message: String,
}

/// A compute's side of the control plane, in memory.
#[derive(Default)]
pub struct FakeDeploymentApi {
    pub reports: Mutex<Vec<Received>>,
    pub changed: Notify,
    /// Claimed (job, task, attempt)s.
    pub claims: Mutex<std::collections::HashSet<(String, String, u32)>>,
}

impl FakeDeploymentApi {
    pub fn reports(&self) -> Vec<Received> {
        self.reports.lock().expect("lock").clone()
    }

    pub fn of(&self, task: &str) -> Vec<(DeploymentState, String)> {
        self.reports()
            .into_iter()
            .filter(|r| r.task == task)
            .map(|r| (r.state, r.message))
            .collect()
    }

    /// Waits until `task` got a report in `state`, and returns its message.
    pub async fn wait_for(&self, task: &str, state: DeploymentState) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let notified = self.changed.notified();
            if let Some((_, message)) = self.of(task).into_iter().find(|(s, _)| *s == state) {
                return message;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out waiting for {task} {state:?}; reports: {:?}", self.reports());
            }
        }
    }
}

impl DeploymentApi for FakeDeploymentApi {
    fn report<'a>(
        &'a self,
        job: &'a JobId,
        task: &'a TaskId,
        _attempt: u32,
        state: DeploymentState,
        message: &'a str,
    ) -> BoxFuture<'a, api::Result<()>> {
        Box::pin(async move {
            self.reports.lock().expect("lock").push(Received {
                job: job.to_string(),
                task: task.to_string(),
                state,
                message: message.to_owned(),
            });
            self.changed.notify_waiters();
            Ok(())
        })
    }

    /// Hands out `key-of-<task>` once per task and attempt, like the control plane.
    fn claim_key<'a>(
        &'a self,
        job: &'a JobId,
        task: &'a TaskId,
        attempt: u32,
    ) -> BoxFuture<'a, api::Result<String>> {
        Box::pin(async move {
            let first = self.claims.lock().expect("lock").insert((
                job.to_string(),
                task.to_string(),
                attempt,
            ));
            if first {
                Ok(format!("key-of-{task}"))
            } else {
                Err(api::Error::Rejected(anyhow::anyhow!(
                    "409: the key of attempt {attempt} was claimed already"
                )))
            }
        })
    }
}

/// A zip of `(name, content)` files.
pub fn zip_of(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, content) in entries {
        writer.start_file(*name, zip::write::SimpleFileOptions::default()).expect("start file");
        writer.write_all(content.as_bytes()).expect("write");
    }
    writer.finish().expect("finish").into_inner()
}

/// Waits until `path` exists and returns its contents.
pub async fn wait_for_file(path: &Path) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(text) = tokio::fs::read_to_string(path).await
            && !text.is_empty()
        {
            return text;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {}", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    !stat.contains(") Z ")
}

/// Waits until process `pid` is gone.
pub async fn wait_dead(pid: i32) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while alive(pid) {
        assert!(tokio::time::Instant::now() < deadline, "process {pid} still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGKILL to `pid`.
pub fn kill9(pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9");
}

/// Waits until `path` exists.
pub async fn wait_for_path(path: &Path) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !path.exists() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {}", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
