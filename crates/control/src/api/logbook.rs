//! The log lines tasks stream while they run, held in memory for `fledgectl logs -f`.
//!
//! An agent posts its task's output as numbered lines (`POST /tasks/{taskId}/log`: a stream id
//! chosen per agent run, the offset of the first line in that stream, the lines); the book
//! numbers them across the task's streams (a restarted task's agent starts a new stream,
//! whose lines follow the old ones), drops what it already has (a retried post), and keeps the
//! last [`MAX_LINES_PER_TASK`] lines / [`MAX_BYTES_PER_TASK`] bytes of each task, for at most
//! [`MAX_TASKS`] tasks (the least recently written one goes first). A reader asks for the
//! lines from a number on (`since`) and is told the number of the first line still held, so
//! it knows how many it missed, never silently.
//!
//! The book lives in this apiserver's memory: after a restart (or on another apiserver of the
//! same deployment) it starts empty, and the readers fall back on the log tail the task
//! reports with its final state, which the store keeps.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use fledge_types::{JobId, TaskId};

/// Lines kept per task.
pub const MAX_LINES_PER_TASK: usize = 2_000;
/// Bytes kept per task.
pub const MAX_BYTES_PER_TASK: usize = 256 * 1024;
/// Tasks kept.
pub const MAX_TASKS: usize = 256;
/// Longest line kept, in bytes; a longer one keeps its first bytes (cut at a char boundary).
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Most lines one post may carry.
pub const MAX_LINES_PER_POST: usize = 10_000;
/// Most lines one read returns.
pub const MAX_LINES_PER_READ: usize = 2_000;

/// Lines of one task.
#[derive(Debug, Default)]
struct Entry {
    /// Number of `lines[0]`.
    first: u64,
    /// The number the next line gets.
    next: u64,
    lines: VecDeque<String>,
    bytes: usize,
    /// The agent stream being appended to, and the book number of its offset 0.
    stream: String,
    base: u64,
    /// When it was last written (a counter), for eviction.
    touched: u64,
}

impl Entry {
    fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line);
        self.next += 1;
        while self.lines.len() > MAX_LINES_PER_TASK || self.bytes > MAX_BYTES_PER_TASK {
            match self.lines.pop_front() {
                Some(old) => {
                    self.bytes -= old.len();
                    self.first += 1;
                }
                None => break,
            }
        }
    }
}

/// What a read returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Read {
    /// Number of the oldest line the book still holds (lines before it are gone).
    pub first: u64,
    /// The number after the last line returned: the `since` of the next read.
    pub next: u64,
    /// Lines `max(since, first)..next`.
    pub lines: Vec<String>,
}

/// Every task's streamed lines. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct LogBook {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tasks: HashMap<(JobId, TaskId), Entry>,
    clock: u64,
}

fn clip(mut line: String) -> String {
    if line.len() > MAX_LINE_BYTES {
        let mut end = MAX_LINE_BYTES;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line
}

impl LogBook {
    /// Appends `lines`, which stream `stream` numbers from `offset` on. Lines it already
    /// has (a retry) are skipped; a gap (lines the agent could not send) is skipped over.
    pub fn append(
        &self,
        job: &JobId,
        task: &TaskId,
        stream: &str,
        offset: u64,
        lines: Vec<String>,
    ) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.clock += 1;
        let clock = inner.clock;
        let key = (job.clone(), task.clone());
        if !inner.tasks.contains_key(&key) && inner.tasks.len() >= MAX_TASKS {
            let oldest = inner.tasks.iter().min_by_key(|(_, e)| e.touched).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                inner.tasks.remove(&oldest);
            }
        }
        let entry = inner.tasks.entry(key).or_default();
        entry.touched = clock;
        if entry.stream != stream {
            // A new agent run: its lines follow everything before.
            entry.stream = stream.to_owned();
            entry.base = entry.next;
        }
        let Some(start) = entry.base.checked_add(offset) else {
            return;
        };
        if start > entry.next {
            // Lines start..next were lost on the way: numbers stay true, the gap shows.
            entry.lines.clear();
            entry.bytes = 0;
            entry.first = start;
            entry.next = start;
        }
        let skip = usize::try_from(entry.next - start).unwrap_or(usize::MAX);
        for line in lines.into_iter().skip(skip) {
            entry.push(clip(line));
        }
    }

    /// The lines of a task from number `since` on (at most [`MAX_LINES_PER_READ`]), or
    /// `None` when the book has none of that task.
    pub fn read(&self, job: &JobId, task: &TaskId, since: u64) -> Option<Read> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = inner.tasks.get(&(job.clone(), task.clone()))?;
        let from = since.clamp(entry.first, entry.next);
        let skip = usize::try_from(from - entry.first).unwrap_or(usize::MAX);
        let lines: Vec<String> =
            entry.lines.iter().skip(skip).take(MAX_LINES_PER_READ).cloned().collect();
        Some(Read { first: entry.first, next: from + lines.len() as u64, lines })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    fn ids() -> (JobId, TaskId) {
        (JobId::new("j"), TaskId::new("t"))
    }

    fn lines(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|i| format!("line {i}")).collect()
    }

    #[test]
    fn retried_posts_are_not_doubled_and_reads_resume_where_they_stopped() {
        let book = LogBook::default();
        let (job, task) = ids();
        assert_eq!(book.read(&job, &task, 0), None);
        book.append(&job, &task, "s1", 0, lines(0..3));
        // The same post again, and one overlapping it.
        book.append(&job, &task, "s1", 0, lines(0..3));
        book.append(&job, &task, "s1", 2, lines(2..5));
        let read = book.read(&job, &task, 0).unwrap();
        assert_eq!(read, Read { first: 0, next: 5, lines: lines(0..5) });
        let read = book.read(&job, &task, 3).unwrap();
        assert_eq!((read.next, read.lines), (5, lines(3..5)));
        // Asking past the end returns nothing and the same cursor.
        assert_eq!(book.read(&job, &task, 9).unwrap().lines, Vec::<String>::new());
    }

    #[test]
    fn a_new_stream_follows_the_old_one_and_gaps_show() {
        let book = LogBook::default();
        let (job, task) = ids();
        book.append(&job, &task, "first-run", 0, lines(0..2));
        // The restarted task's agent numbers from 0 again.
        book.append(&job, &task, "second-run", 0, vec!["again".into()]);
        let read = book.read(&job, &task, 0).unwrap();
        assert_eq!(read.lines, ["line 0", "line 1", "again"]);
        // Lines 1..4 of the second run never arrived.
        book.append(&job, &task, "second-run", 4, vec!["late".into()]);
        let read = book.read(&job, &task, 3).unwrap();
        assert_eq!(read, Read { first: 6, next: 7, lines: vec!["late".into()] });
    }

    #[test]
    fn bounds_hold_per_task_and_in_tasks() {
        let book = LogBook::default();
        let (job, task) = ids();
        let many = lines(0..(MAX_LINES_PER_TASK as u32 + 10));
        book.append(&job, &task, "s", 0, many);
        let read = book.read(&job, &task, 0).unwrap();
        assert_eq!(read.first, 10);
        assert_eq!(read.lines.len(), MAX_LINES_PER_READ);
        assert_eq!(read.lines[0], "line 10");
        for i in 0..MAX_TASKS {
            book.append(&job, &TaskId::new(format!("other-{i}")), "s", 0, lines(0..1));
        }
        assert_eq!(book.read(&job, &task, 0), None, "the least recently written task went");
        assert!(book.read(&job, &TaskId::new("other-0"), 0).is_some());
    }

    #[test]
    fn long_lines_are_cut_at_a_char_boundary() {
        let line = format!("{}é", "a".repeat(MAX_LINE_BYTES - 1));
        let cut = clip(line);
        assert_eq!(cut.len(), MAX_LINE_BYTES - 1);
    }
}
