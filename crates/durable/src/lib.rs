//! Durable file writes, in one place for every crate that keeps files a crash must not lose or
//! tear: model files and checkpoints (`fledge-sdk`'s registry and MLflow spool), the CLI's
//! config, the control plane's TLS keys, a deployer's worker records.
//!
//! [`write_with`] fills a temporary file beside the target (created exclusively, with the mode
//! asked for on Unix), flushes and fsyncs it, renames it over the target, then fsyncs the
//! directory, so the rename itself is on disk; directories it had to create are fsynced into
//! their parents too. After a crash the target holds the old bytes or the new ones, never a mix
//! or nothing, and once the call returned the new ones stay. A failed write removes its
//! temporary file. (The control plane's code blobs are written the same way by its async blob
//! store, `fledge_control::store::BlobStore`.)

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Buffer of a streamed write, in bytes.
const BUFFER: usize = 1 << 16;

/// Tells apart the temporary files of concurrent writes in one process.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` durably (see the crate docs), mode 0644 on Unix for a new file.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with(path, None, |out| out.write_all(bytes))
}

/// Writes `path` durably with what `fill` writes into a buffered temporary file; `mode` (Unix)
/// is the file's permission bits, default 0644 less the umask.
pub fn write_with(
    path: &Path,
    mode: Option<u32>,
    fill: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.to_owned(),
        None => PathBuf::from("."),
    };
    create_dir_all(&dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        NEXT_TMP.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        // A leftover of a crashed write of a process with this pid; `create_new` then never
        // follows a link put in its place.
        match fs::remove_file(&tmp) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        if let Some(mode) = mode {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut out = BufWriter::with_capacity(BUFFER, options.open(&tmp)?);
        fill(&mut out)?;
        out.flush()?;
        let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
        // The bytes reach the disk before the name does.
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        sync_dir(&dir)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Fsyncs directory `dir`, so that entries created, renamed or removed in it are on disk
/// (Unix; elsewhere nothing to do).
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Creates `dir` and its missing parents, each fsynced into its parent.
fn create_dir_all(dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> =
        dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_replace_whole_files_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/model.safetensors");
        write(&path, b"first").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        write(&path, b"second, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        assert_eq!(names(path.parent().unwrap()), ["model.safetensors"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_removes_its_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint");
        write(&path, b"old").unwrap();
        let err = write_with(&path, None, |out| {
            out.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["checkpoint"]);
    }

    #[cfg(unix)]
    #[test]
    fn the_mode_is_set_on_the_new_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_with(&path, Some(0o600), |out| out.write_all(b"secret")).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
