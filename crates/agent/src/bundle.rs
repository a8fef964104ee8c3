//! Unpacking a role's code bundle (a zip) into the worker's private work dir, safely.
//!
//! The zip comes from the control plane but was uploaded by a user, so it is untrusted input:
//! an entry that would land outside the target directory (`..`, an absolute path, a drive
//! prefix), a symlink (which could point anywhere and be written through later), too many
//! entries or too many bytes once inflated all reject the whole bundle before anything is
//! written. Sizes are checked against what is actually inflated, not against what the zip's
//! headers claim.

use std::fs;
use std::io::{self, Cursor, Read, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

/// Errors while unpacking a bundle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not a readable zip archive.
    #[error("code bundle is not a valid zip archive")]
    NotAZip(#[source] zip::result::ZipError),
    /// An entry could not be read.
    #[error("failed to read entry {index} of the code bundle")]
    Entry {
        /// Entry index.
        index: usize,
        /// Cause.
        #[source]
        source: zip::result::ZipError,
    },
    /// An entry's path escapes the target directory or is not a plain relative path.
    #[error("unsafe path in code bundle: {name:?} ({why})")]
    UnsafePath {
        /// The entry's name as stored.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An entry is a symbolic link.
    #[error("code bundle entry {name:?} is a symbolic link; links are not allowed")]
    Symlink {
        /// The entry's name as stored.
        name: String,
    },
    /// The archive has more entries than allowed.
    #[error("code bundle has {count} entries, more than the limit of {limit}")]
    TooManyEntries {
        /// Entries in the archive.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// The inflated content is larger than allowed.
    #[error("code bundle inflates to more than the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// Writing the unpacked files failed.
    #[error("failed to write {path}")]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Bounds applied while unpacking.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Maximum total inflated size in bytes (default 256 MiB).
    pub max_total_bytes: u64,
    /// Maximum number of entries (default 10 000).
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_total_bytes: 256 * 1024 * 1024, max_entries: 10_000 }
    }
}

/// Unpacks `zip_bytes` into `dest` (created if missing), returning the number of files written.
///
/// Every entry is validated before any file is written, so a rejected bundle leaves `dest`
/// without partial content from it (only the inflated-size bound is enforced while writing;
/// on that error the caller should discard `dest`).
pub fn extract(zip_bytes: &[u8], dest: &Path, limits: Limits) -> Result<usize> {
    let mut archive = zip::ZipArchive::new(Cursor::new(zip_bytes)).map_err(Error::NotAZip)?;
    if archive.len() > limits.max_entries {
        return Err(Error::TooManyEntries { count: archive.len(), limit: limits.max_entries });
    }

    // Pass 1: validate every entry's name and kind, and the declared sizes.
    let mut plan = Vec::with_capacity(archive.len());
    let mut declared: u64 = 0;
    for index in 0..archive.len() {
        let entry = archive.by_index_raw(index).map_err(|source| Error::Entry { index, source })?;
        let name = entry.name().to_owned();
        if entry.is_symlink() {
            return Err(Error::Symlink { name });
        }
        let rel = safe_relative_path(&name)?;
        declared = declared.saturating_add(entry.size());
        if declared > limits.max_total_bytes {
            return Err(Error::TooLarge { limit: limits.max_total_bytes });
        }
        plan.push((index, rel, entry.is_dir()));
    }

    // Pass 2: write, counting the bytes actually inflated (headers can lie).
    create_dir(dest)?;
    let mut written: u64 = 0;
    let mut files = 0;
    for (index, rel, is_dir) in plan {
        let path = dest.join(&rel);
        if is_dir {
            create_dir(&path)?;
            continue;
        }
        if let Some(parent) = path.parent() {
            create_dir(parent)?;
        }
        let entry = archive.by_index(index).map_err(|source| Error::Entry { index, source })?;
        let budget = limits.max_total_bytes - written;
        let mut reader = entry.take(budget + 1);
        let mut file = fs::File::create(&path)
            .map_err(|source| Error::Write { path: path.clone(), source })?;
        let n = copy(&mut reader, &mut file)
            .map_err(|source| Error::Write { path: path.clone(), source })?;
        if let Some(mode) = reader.get_ref().unix_mode() {
            // Keep the executable bits (scripts named by `command`), never setuid/setgid/sticky.
            let perms = fs::Permissions::from_mode((mode & 0o755) | 0o600);
            fs::set_permissions(&path, perms)
                .map_err(|source| Error::Write { path: path.clone(), source })?;
        }
        if n > budget {
            return Err(Error::TooLarge { limit: limits.max_total_bytes });
        }
        written += n;
        files += 1;
    }
    Ok(files)
}

/// The entry name as a relative path with only normal components.
fn safe_relative_path(name: &str) -> Result<PathBuf> {
    let unsafe_path = |why| Error::UnsafePath { name: name.to_owned(), why };
    if name.is_empty() {
        return Err(unsafe_path("empty name"));
    }
    if name.contains('\0') {
        return Err(unsafe_path("contains a NUL byte"));
    }
    if name.contains('\\') {
        return Err(unsafe_path("contains a backslash"));
    }
    if name.starts_with('/') {
        return Err(unsafe_path("absolute path"));
    }
    let mut res = PathBuf::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => {
                if part.to_string_lossy().contains(':') {
                    return Err(unsafe_path("contains a drive or stream separator ':'"));
                }
                res.push(part);
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_path("contains '..'")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_path("absolute path"));
            }
        }
    }
    if res.as_os_str().is_empty() {
        return Err(unsafe_path("names no file"));
    }
    Ok(res)
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|source| Error::Write { path: path.to_owned(), source })
}

fn copy(reader: &mut impl Read, writer: &mut impl Write) -> io::Result<u64> {
    io::copy(reader, writer)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write as _;

    use zip::write::SimpleFileOptions;

    use super::*;

    /// Builds a zip from `(name, content)` pairs; a name ending in `/` is a directory.
    pub(crate) fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, content) in entries {
            if name.ends_with('/') {
                writer.add_directory(*name, SimpleFileOptions::default()).expect("add dir");
            } else {
                writer.start_file(*name, SimpleFileOptions::default()).expect("start file");
                writer.write_all(content).expect("write");
            }
        }
        writer.finish().expect("finish").into_inner()
    }

    #[test]
    fn extracts_nested_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let zip = zip_of(&[
            ("main.py", b"print(1)\n"),
            ("lib/", b""),
            ("lib/util.py", b"X = 1\n"),
            ("./data/a.txt", b"a"),
        ]);
        let n = extract(&zip, dir.path(), Limits::default()).expect("extract");
        assert_eq!(n, 3);
        assert_eq!(fs::read_to_string(dir.path().join("lib/util.py")).expect("read"), "X = 1\n");
        assert_eq!(fs::read_to_string(dir.path().join("data/a.txt")).expect("read"), "a");
    }

    #[test]
    fn rejects_zip_slip_and_absolute_paths_before_writing() {
        for (bad, why) in [
            ("../evil.sh", "'..'"),
            ("ok/../../evil.sh", "'..'"),
            ("/etc/evil", "absolute"),
            ("C:/evil", "':'"),
            ("dir\\..\\evil", "backslash"),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let dest = dir.path().join("code");
            let zip = zip_of(&[("main.py", b"x"), (bad, b"pwned")]);
            let err = extract(&zip, &dest, Limits::default()).expect_err(bad);
            let msg = err.to_string();
            assert!(matches!(err, Error::UnsafePath { .. }), "{bad}: {msg}");
            assert!(msg.contains(why), "{bad}: {msg}");
            assert!(!dest.exists(), "{bad}: nothing may be written");
        }
    }

    #[test]
    fn rejects_symlinks() {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        writer.add_symlink("link", "/etc/passwd", SimpleFileOptions::default()).expect("symlink");
        let zip = writer.finish().expect("finish").into_inner();
        let dir = tempfile::tempdir().expect("tempdir");
        let err = extract(&zip, dir.path(), Limits::default()).expect_err("symlink");
        assert!(matches!(err, Error::Symlink { ref name } if name == "link"), "{err}");
        assert!(!dir.path().join("link").exists());
    }

    #[test]
    fn rejects_oversize_and_too_many_entries() {
        let big = vec![0u8; 10_000];
        let zip = zip_of(&[("a.bin", &big), ("b.bin", &big)]);
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits { max_total_bytes: 15_000, max_entries: 100 };
        let err = extract(&zip, dir.path(), limits).expect_err("too large");
        assert!(matches!(err, Error::TooLarge { limit: 15_000 }), "{err}");

        let limits = Limits { max_total_bytes: 1 << 20, max_entries: 1 };
        let err = extract(&zip, dir.path(), limits).expect_err("too many");
        assert!(matches!(err, Error::TooManyEntries { count: 2, limit: 1 }), "{err}");
        // Within both bounds it succeeds.
        let limits = Limits { max_total_bytes: 20_000, max_entries: 2 };
        assert_eq!(extract(&zip, dir.path(), limits).expect("fits"), 2);
    }

    #[test]
    fn rejects_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = extract(b"not a zip", dir.path(), Limits::default()).expect_err("garbage");
        assert!(err.to_string().contains("not a valid zip"), "{err}");
    }
}
