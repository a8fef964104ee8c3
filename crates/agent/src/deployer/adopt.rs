//! Workers that outlive their deployer, and a restarted deployer taking them back.
//!
//! A worker is not tied to the deployer's life: if `fledge standalone` (or `fledge serve`
//! with its deployer) is killed, its fledgelets keep running, the roles keep training and
//! reconnect to the broker and the control plane when they come back. For that, the deployer
//! writes a [`WorkerRecord`] into each worker's work dir when it starts it, and a deployer
//! starting on the same work root re-adopts every worker whose record names a live process
//! ([`scan`]): same pid *and* the same start time, so a recycled pid is never taken for the
//! worker. An adopted worker is not the deployer's child, so [`watch`] polls for its end
//! instead of waiting on it; revoking it signals its process group as for any worker.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fledge_types::{JobId, TaskId};
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use super::{Ended, Exit, WORKER_LOG_FILE, read_tail};
use crate::process;
use crate::supervisor::REPORTED_MARKER;

/// Name of the record, in a worker's work dir, of the process running it.
pub const WORKER_RECORD: &str = "worker.json";

/// The largest record file read back (it is a few dozen bytes).
const MAX_RECORD_BYTES: u64 = 4096;

/// How often an adopted worker is checked for having exited.
const POLL: Duration = Duration::from_millis(500);

/// Which process runs a task's worker.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct WorkerRecord {
    /// The fledgelet's pid (it leads its process group).
    pub(crate) pid: u32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub(crate) start_ticks: u64,
    /// The task's job.
    pub(crate) job: String,
    /// The task.
    pub(crate) task: String,
    /// The worker's attempt (the task's restarts when it was deployed).
    pub(crate) attempt: u32,
}

/// The start time of process `pid` in clock ticks since boot, if it exists.
pub(crate) fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: fields after it are
    // counted from the last ')'. Field 22 is the 20th after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

impl WorkerRecord {
    /// Whether the recorded process still runs (not a new process under a recycled pid).
    pub(crate) fn is_alive(&self) -> bool {
        start_ticks(self.pid) == Some(self.start_ticks)
    }
}

/// Writes `record` into `work_dir` durably (a restarted deployer finds the whole record or
/// none, see `fledge_durable`).
pub(crate) fn write(work_dir: &Path, record: &WorkerRecord) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    fledge_durable::write(&work_dir.join(WORKER_RECORD), &bytes)
}

/// Reads the record in `work_dir`; `None` if there is none or it is not one.
fn read(work_dir: &Path) -> Option<WorkerRecord> {
    let path = work_dir.join(WORKER_RECORD);
    let meta = std::fs::metadata(&path).ok()?;
    if meta.len() > MAX_RECORD_BYTES {
        tracing::warn!(path = %path.display(), "worker record too large; ignored");
        return None;
    }
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(record) => Some(record),
        Err(err) => {
            tracing::warn!(path = %path.display(), %err, "unreadable worker record ignored");
            None
        }
    }
}

/// The live workers recorded under `work_root` (`<work_root>/<job>/<task>/worker.json`), with
/// their work dirs. A record whose job or task does not match its directory is ignored.
pub(crate) fn scan(work_root: &Path) -> Vec<(WorkerRecord, PathBuf)> {
    let mut found = Vec::new();
    let Ok(jobs) = std::fs::read_dir(work_root) else {
        return found;
    };
    for job in jobs.flatten() {
        let Ok(tasks) = std::fs::read_dir(job.path()) else {
            continue;
        };
        for task in tasks.flatten() {
            let dir = task.path();
            let Some(record) = read(&dir) else {
                continue;
            };
            let matches = job.file_name().to_str() == Some(record.job.as_str())
                && task.file_name().to_str() == Some(record.task.as_str());
            if matches && record.is_alive() {
                found.push((record, dir));
            }
        }
    }
    found
}

/// Watches an adopted worker until it exits, or stops its process group when `kill` fires
/// (SIGTERM, then SIGKILL after `grace`). Its exit status is not ours to know.
pub(crate) async fn watch(
    record: WorkerRecord,
    kill: CancellationToken,
    grace: Duration,
    work_dir: PathBuf,
) -> Exit {
    let killed = tokio::select! {
        () = exited(&record) => false,
        () = kill.cancelled() => {
            let _ = process::signal_group_id(record.pid, Signal::SIGTERM);
            if tokio::time::timeout(grace, exited(&record)).await.is_err() {
                tracing::warn!(pid = record.pid, ?grace, "adopted worker ignored SIGTERM, sending SIGKILL");
            }
            true
        }
    };
    // The fledgelet is gone; so must be anything left in its group.
    let _ = process::signal_group_id(record.pid, Signal::SIGKILL);
    let reported = tokio::fs::try_exists(work_dir.join(REPORTED_MARKER)).await.unwrap_or(false);
    let log_tail = if reported || killed {
        String::new()
    } else {
        read_tail(&work_dir.join(WORKER_LOG_FILE)).await
    };
    Exit {
        job: JobId::new(record.job),
        task: TaskId::new(record.task),
        ended: Ended {
            status: "an unknown status (a worker adopted after a restart)".to_owned(),
            reported,
            killed,
            log_tail,
        },
    }
}

/// Resolves once the recorded process has exited.
async fn exited(record: &WorkerRecord) {
    while record.is_alive() {
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_name_live_processes_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let me = std::process::id();
        let ticks = start_ticks(me).expect("our own start time");
        assert_eq!(start_ticks(me), Some(ticks), "stable");
        let work = dir.path().join("job-1").join("task-1");
        std::fs::create_dir_all(&work).expect("dirs");
        let record = WorkerRecord {
            pid: me,
            start_ticks: ticks,
            job: "job-1".into(),
            task: "task-1".into(),
            attempt: 2,
        };
        write(&work, &record).expect("write");
        assert_eq!(scan(dir.path()), vec![(record.clone(), work.clone())]);

        // A recycled pid (another start time), a record in the wrong directory, junk and an
        // oversized file are all ignored.
        write(&work, &WorkerRecord { start_ticks: ticks + 1, ..record.clone() }).expect("write");
        assert!(scan(dir.path()).is_empty());
        write(&work, &WorkerRecord { task: "other".into(), ..record.clone() }).expect("write");
        assert!(scan(dir.path()).is_empty());
        std::fs::write(work.join(WORKER_RECORD), b"{not json").expect("write");
        assert!(scan(dir.path()).is_empty());
        std::fs::write(work.join(WORKER_RECORD), vec![b' '; 5000]).expect("write");
        assert!(scan(dir.path()).is_empty());
        assert!(scan(&dir.path().join("missing")).is_empty());
    }
}
