//! Fuzz target body (not part of the API): the `fuzz/` crate's `bundle` target calls
//! [`bundle`], and this crate's `fuzz_corpus` test replays every file of its committed corpus
//! through it, so a regression fails the normal test run. It must not panic on any input.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::bundle::{self, Limits};

/// Small bounds, so the fuzzer can reach them with small inputs.
pub const LIMITS: Limits = Limits { max_total_bytes: 1 << 20, max_entries: 64 };

/// Unpacks `data` as a code bundle into a fresh directory under the system's temp dir (removed
/// afterwards) with [`LIMITS`], and checks what an accepted bundle left behind: only regular
/// files and directories inside the target, within the byte bound, as many files as reported.
pub fn bundle(data: &[u8]) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let root = std::env::temp_dir().join(format!(
        "fledge-fuzz-bundle-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let dest = root.join("code");
    let result = bundle::extract(data, &dest, LIMITS);
    if let Ok(files) = result {
        let mut found = Vec::new();
        walk(&dest, &mut found);
        let bytes: u64 = found.iter().map(|(_, len)| len).sum();
        assert!(bytes <= LIMITS.max_total_bytes, "{bytes} bytes unpacked");
        // Two entries may name the same file (the later overwrites), so at most `files`.
        assert!(found.len() <= files, "{} files on disk, {files} reported", found.len());
        for (path, _) in &found {
            assert!(path.starts_with(&dest), "{} outside the target", path.display());
        }
    }
    // Nothing may have been written next to the target either.
    let mut outside = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&root) {
        outside.extend(entries.flatten().map(|e| e.path()).filter(|p| *p != dest));
    }
    let _ = std::fs::remove_dir_all(&root);
    assert!(outside.is_empty(), "written outside the target: {outside:?}");
}

/// Every regular file under `dir` with its length; panics on anything else (a symlink, a
/// device), since extraction may create only files and directories.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).expect("metadata of an unpacked entry");
        if meta.is_dir() {
            walk(&path, out);
        } else {
            assert!(meta.is_file(), "{} is neither a file nor a directory", path.display());
            out.push((path, meta.len()));
        }
    }
}
