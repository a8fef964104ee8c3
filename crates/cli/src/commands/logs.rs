//! `logs JOB TASK` and `logs -f JOB TASK`: a task's log from the apiserver's numbered lines
//! (`GET .../tasks/{taskId}/log?since=N`).
//!
//! Following asks for the lines from the number after the last one printed, so no line is
//! printed twice or skipped; lines the server no longer holds (it keeps a bounded window per
//! task) are announced on stderr with their count, never dropped silently. It stops once the
//! task is in a final state and every line is printed: the agent streams its last lines before
//! it reports that state.

use std::time::Duration;

use fledge_client::TaskLog;
use fledge_types::{JobId, TaskId};

use super::Ctx;
use crate::output;

/// Consecutive failed polls tolerated before following gives up.
const MAX_POLL_FAILURES: u32 = 5;

/// What to print for one read, and where the next one starts.
#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    /// A note for stderr (lines that are gone), if any.
    pub note: Option<String>,
    /// Lines for stdout.
    pub lines: Vec<String>,
    /// The `since` of the next read.
    pub since: u64,
    /// Whether following is over (the task ended and every line is printed).
    pub done: bool,
}

/// Decides what one read means for a follower that has printed every line before `since`.
pub fn step(since: u64, log: TaskLog) -> Step {
    let ended = log.state.is_final();
    if !log.streamed {
        // The tail the task reported with its state: there is one only once it has ended.
        if !ended {
            return Step { note: None, lines: Vec::new(), since, done: false };
        }
        let note = (since > 0).then(|| {
            "[fledgectl] the server no longer holds the streamed log; the tail the task \
             reported when it ended follows (lines may repeat)"
                .to_owned()
        });
        return Step { note, lines: log.lines, since: log.next, done: true };
    }
    let note = (log.first > since).then(|| {
        let missed = log.first - since;
        format!(
            "[fledgectl] {missed} line(s) no longer held by the server were skipped (lines {since}..{})",
            log.first
        )
    });
    let done = ended && log.lines.is_empty();
    Step { note, lines: log.lines, since: log.next, done }
}

async fn read(ctx: &Ctx, job: &JobId, task: &TaskId, since: u64) -> anyhow::Result<TaskLog> {
    let mut failures = 0;
    loop {
        match ctx.client.task_log(job, task, since).await {
            Ok(log) => return Ok(log),
            Err(err @ fledge_client::Error::Connect { .. }) if failures < MAX_POLL_FAILURES => {
                failures += 1;
                eprintln!("warning: {err}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// `logs JOB TASK`: every line the server holds, then stop.
pub async fn print(ctx: &Ctx, job: &str, task: &str) -> anyhow::Result<()> {
    let (job, task) = (JobId::new(job), TaskId::new(task));
    let mut since = 0;
    let mut printed = 0usize;
    loop {
        let log = read(ctx, &job, &task, since).await?;
        if since == 0 && log.first > 0 {
            eprintln!(
                "[fledgectl] the first {} line(s) are no longer held by the server",
                log.first
            );
        }
        if log.lines.is_empty() {
            if printed == 0 {
                eprintln!("task {task} ({}) has no log yet", log.state);
            }
            return Ok(());
        }
        printed += log.lines.len();
        output::emit_lines(&log.lines)?;
        if !log.streamed {
            // The reported tail comes whole.
            return Ok(());
        }
        since = log.next;
    }
}

/// `logs -f JOB TASK`: prints each line once, in order, as the task writes it, until the task
/// has ended and its last line is printed.
pub async fn follow(ctx: &Ctx, job: &str, task: &str, interval_ms: u64) -> anyhow::Result<()> {
    let (job, task) = (JobId::new(job), TaskId::new(task));
    let mut since = 0;
    loop {
        let log = read(ctx, &job, &task, since).await?;
        let state = log.state;
        let step = step(since, log);
        if let Some(note) = &step.note {
            eprintln!("{note}");
        }
        let more = !step.lines.is_empty();
        output::emit_lines(&step.lines)?;
        since = step.since;
        if step.done {
            eprintln!("task {task} ended {state}");
            return Ok(());
        }
        if !more {
            tokio::time::sleep(Duration::from_millis(interval_ms)).await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use fledge_types::TaskState;

    use super::*;

    fn log(first: u64, next: u64, lines: &[&str], state: TaskState, streamed: bool) -> TaskLog {
        TaskLog {
            first,
            next,
            lines: lines.iter().map(|l| (*l).to_owned()).collect(),
            state,
            streamed,
        }
    }

    #[test]
    fn following_resumes_after_the_last_line_and_ends_once_drained() {
        let s = step(0, log(0, 2, &["a", "b"], TaskState::Running, true));
        assert_eq!((s.lines.len(), s.since, s.done, s.note), (2, 2, false, None));
        // Ended, but lines came: read again before stopping.
        let s = step(2, log(0, 3, &["c"], TaskState::Completed, true));
        assert_eq!((s.lines, s.since, s.done), (vec!["c".to_owned()], 3, false));
        let s = step(3, log(0, 3, &[], TaskState::Completed, true));
        assert!(s.done && s.lines.is_empty());
    }

    #[test]
    fn lines_the_server_dropped_are_announced_with_their_count() {
        let s = step(10, log(25, 27, &["y", "z"], TaskState::Running, true));
        let note = s.note.unwrap();
        assert!(note.contains("15 line(s)") && note.contains("lines 10..25"), "{note}");
        assert_eq!(s.since, 27);
    }

    #[test]
    fn a_reported_tail_is_printed_once_the_task_has_ended() {
        // Not streamed yet (the agent is starting): nothing, and the cursor stays.
        let s = step(0, log(0, 0, &[], TaskState::Running, false));
        assert_eq!((s.since, s.done), (0, false));
        let s = step(0, log(0, 2, &["x", "y"], TaskState::Failed, false));
        assert_eq!((s.lines.len(), s.done, s.note), (2, true, None));
        // The stream vanished mid-follow (apiserver restarted): say lines may repeat.
        let s = step(40, log(0, 2, &["x", "y"], TaskState::Failed, false));
        assert!(s.note.unwrap().contains("may repeat"));
    }
}
