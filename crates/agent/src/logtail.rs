//! A bounded tail of a child's output: the last bytes and lines, reported with the final state.
//!
//! The whole output goes to a log file on disk; only this tail travels to the control plane, so
//! a chatty trainer cannot make a status report (or the task row) grow without bound.

use std::collections::VecDeque;

/// Default bound on the tail's size in bytes (64 KiB).
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024;
/// Default bound on the tail's number of lines.
pub const DEFAULT_MAX_LINES: usize = 200;

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
        }
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
