//! A bounded tail of a child's output: the last bytes and lines, reported with the final state,
//! and the numbered lines not yet streamed to the control plane (for `fledgectl logs -f`).
//!
//! The whole output goes to a log file on disk; only this tail and the streamed lines travel to
//! the control plane, both bounded, so a chatty trainer cannot make a status report (or the
//! task row) grow without bound. Lines are numbered from 0 in the order they end; when more
//! lines wait to be streamed than [`MAX_UNSENT_LINES`] / [`MAX_UNSENT_BYTES`], the oldest are
//! dropped and the numbers of the rest stay true, so the reader sees the gap.

use std::collections::VecDeque;

/// Default bound on the tail's size in bytes (64 KiB).
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024;
/// Default bound on the tail's number of lines.
pub const DEFAULT_MAX_LINES: usize = 200;
/// Most lines waiting to be streamed.
pub const MAX_UNSENT_LINES: usize = 20_000;
/// Most bytes waiting to be streamed.
pub const MAX_UNSENT_BYTES: usize = 4 * 1024 * 1024;

/// The last lines of a stream, bounded both in lines and in bytes.
///
/// Bytes are fed in arbitrary chunks; a partial last line is kept until its newline arrives.
/// A single line longer than the byte bound keeps only its last bytes (cut at a char boundary).
#[derive(Debug)]
pub struct LogTail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
    bytes: usize,
    max_bytes: usize,
    max_lines: usize,
    dropped_lines: u64,
    /// Lines not streamed yet; the first has number `unsent_first`.
    unsent: VecDeque<String>,
    unsent_bytes: usize,
    unsent_first: u64,
}

impl Default for LogTail {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BYTES, DEFAULT_MAX_LINES)
    }
}

impl LogTail {
    /// A tail keeping at most `max_bytes` bytes and `max_lines` lines (each at least 1).
    pub fn new(max_bytes: usize, max_lines: usize) -> Self {
        Self {
            lines: VecDeque::new(),
            partial: Vec::new(),
            bytes: 0,
            max_bytes: max_bytes.max(1),
            max_lines: max_lines.max(1),
            dropped_lines: 0,
            unsent: VecDeque::new(),
            unsent_bytes: 0,
            unsent_first: 0,
        }
    }

    /// Up to `max_bytes` of the lines not streamed yet (at least one if any waits) and the
    /// number of the first.
    pub fn unsent(&self, max_bytes: usize) -> (u64, Vec<String>) {
        let mut bytes = 0;
        let mut lines = Vec::new();
        for line in &self.unsent {
            if !lines.is_empty() && bytes + line.len() > max_bytes {
                break;
            }
            bytes += line.len();
            lines.push(line.clone());
        }
        (self.unsent_first, lines)
    }

    /// Forgets the unsent lines numbered below `upto` (they were streamed).
    pub fn mark_sent(&mut self, upto: u64) {
        while self.unsent_first < upto {
            match self.unsent.pop_front() {
                Some(line) => {
                    self.unsent_bytes -= line.len();
                    self.unsent_first += 1;
                }
                None => break,
            }
        }
    }

    /// Whether every line has been streamed.
    pub fn all_sent(&self) -> bool {
        self.unsent.is_empty()
    }

    /// Appends a chunk of output.
    pub fn push(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
            self.partial.extend_from_slice(&rest[..pos]);
            let line = std::mem::take(&mut self.partial);
            self.push_line(String::from_utf8_lossy(&line).into_owned());
            rest = &rest[pos + 1..];
        }
        self.partial.extend_from_slice(rest);
        // A line that never ends must not grow without bound either.
        if self.partial.len() > self.max_bytes {
            let cut = self.partial.len() - self.max_bytes;
            self.partial.drain(..cut);
        }
    }

    /// Appends one whole line (without its newline).
    pub fn push_line(&mut self, line: String) {
        let line = clip_front(line, self.max_bytes);
        self.unsent_bytes += line.len();
        self.unsent.push_back(line.clone());
        while self.unsent.len() > MAX_UNSENT_LINES || self.unsent_bytes > MAX_UNSENT_BYTES {
            match self.unsent.pop_front() {
                Some(old) => {
                    self.unsent_bytes -= old.len();
                    self.unsent_first += 1;
                }
                None => break,
            }
        }
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
        while self.lines.len() > self.max_lines || self.bytes > self.max_bytes {
            match self.lines.pop_front() {
                Some(old) => {
                    self.bytes -= old.len() + 1;
                    self.dropped_lines += 1;
                }
                None => break,
            }
        }
    }

    /// How many lines fell out of the tail so far.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped_lines
    }

    /// The tail as text: complete lines, then any unterminated last line.
    ///
    /// The result is at most `max_bytes` bytes plus the unterminated line (itself bounded).
    pub fn render(&self) -> String {
        let mut res = String::with_capacity(self.bytes + self.partial.len());
        for line in &self.lines {
            res.push_str(line);
            res.push('\n');
        }
        if !self.partial.is_empty() {
            res.push_str(&String::from_utf8_lossy(&self.partial));
        }
        res
    }
}

/// Keeps the last `max` bytes of `line`, cut at a char boundary.
fn clip_front(line: String, max: usize) -> String {
    // Leave room for the newline counted with each line.
    let max = max.saturating_sub(1);
    if line.len() <= max {
        return line;
    }
    let mut start = line.len() - max;
    while !line.is_char_boundary(start) {
        start += 1;
    }
    line[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsent_lines_are_numbered_and_forgotten_once_sent() {
        let mut tail = LogTail::new(1 << 20, 2);
        tail.push(b"a\nbb\nccc\nd");
        assert_eq!(tail.unsent(1 << 20), (0, vec!["a".into(), "bb".into(), "ccc".into()]));
        // A byte budget still sends at least one line.
        assert_eq!(tail.unsent(0), (0, vec!["a".into()]));
        assert_eq!(tail.unsent(3), (0, vec!["a".into(), "bb".into()]));
        tail.mark_sent(2);
        assert_eq!(tail.unsent(1 << 20), (2, vec!["ccc".into()]));
        assert!(!tail.all_sent());
        // Marking what was already marked changes nothing; the partial line waits for its end.
        tail.mark_sent(1);
        tail.push(b"\n");
        assert_eq!(tail.unsent(1 << 20), (2, vec!["ccc".into(), "d".into()]));
        tail.mark_sent(4);
        assert!(tail.all_sent());
        // The tail itself keeps its own bound.
        assert_eq!(tail.render(), "ccc\nd\n");
    }

    #[test]
    fn unsent_lines_drop_the_oldest_beyond_their_bound_and_keep_numbers() {
        let mut tail = LogTail::new(64, 2);
        for i in 0..(MAX_UNSENT_LINES + 5) {
            tail.push_line(format!("{i}"));
        }
        let (first, lines) = tail.unsent(usize::MAX);
        assert_eq!(first, 5);
        assert_eq!(lines.len(), MAX_UNSENT_LINES);
        assert_eq!(lines[0], "5");
    }

    #[test]
    fn keeps_last_lines_within_line_bound() {
        let mut tail = LogTail::new(1 << 20, 3);
        for i in 0..10 {
            tail.push(format!("line {i}\n").as_bytes());
        }
        assert_eq!(tail.render(), "line 7\nline 8\nline 9\n");
        assert_eq!(tail.dropped_lines(), 7);
    }

    #[test]
    fn keeps_within_byte_bound_and_joins_chunks() {
        let mut tail = LogTail::new(20, 1000);
        tail.push(b"aaaa");
        tail.push(b"aaaa\nbbbbbbbb\ncc");
        tail.push(b"cccccc\ndd");
        let text = tail.render();
        // "aaaaaaaa" fell out: 9 + 9 + 9 bytes of whole lines exceed 20.
        assert_eq!(text, "bbbbbbbb\ncccccccc\ndd");
        assert!(tail.bytes <= 20);
    }

    #[test]
    fn huge_line_and_unterminated_output_are_clipped() {
        let mut tail = LogTail::new(16, 10);
        tail.push_line("é".repeat(100));
        let text = tail.render();
        assert!(text.len() <= 16, "{}", text.len());
        assert!(text.ends_with("é\n"));
        let mut tail = LogTail::new(16, 10);
        tail.push(&[b'x'; 1000]);
        assert_eq!(tail.render(), "x".repeat(16));
    }

    #[test]
    fn default_bounds_hold_under_a_flood() {
        let mut tail = LogTail::default();
        for i in 0..100_000 {
            tail.push(format!("{i:>1000}\n").as_bytes());
        }
        let text = tail.render();
        assert!(text.len() <= DEFAULT_MAX_BYTES);
        assert!(text.lines().count() <= DEFAULT_MAX_LINES);
        assert!(text.ends_with("99999\n"));
    }
}
