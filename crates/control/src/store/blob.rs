//! Content-addressed blob store for code bundles: one file per SHA-256 under a directory.
//!
//! Writes go to a temporary file in the same directory, are synced, then renamed into place,
//! so a reader never sees a partial bundle and a crash leaves at most a stray temp file.
//! Rows in the database hold only the metadata (version, size, hash).
//!
//! Blobs are shared by content, so one is removed only when no row names it. The store decides
//! that inside a database transaction that holds the blob's lock (see `sql.rs`): the collector
//! moves the blob aside ([`BlobStore::trash`]) before it commits, and either purges it after the
//! commit or restores it if the commit fails; an upload takes the same lock and puts the blob
//! back if it is gone before it commits its row. A blob moved aside by a process that crashed
//! before its commit is restored when the directory is next opened.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{Error, Result};

/// Default limit of one code bundle: 100 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;

/// A directory of blobs named by their SHA-256.
#[derive(Clone, Debug)]
pub struct BlobStore {
    dir: Arc<PathBuf>,
    max_bytes: u64,
    /// Tests: where the next upload stops between writing its blob and committing its row.
    #[cfg(test)]
    pause: Arc<std::sync::Mutex<Option<Pause>>>,
}

/// A blob moved aside by [`BlobStore::trash`]: purged once the removal is committed, restored
/// if it is not.
#[derive(Debug)]
pub struct Trashed {
    sha256: String,
    path: PathBuf,
}

/// Tests: an upload stopped after its blob is written, until `resume` fires.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Pause {
    reached: tokio::sync::oneshot::Sender<()>,
    resume: tokio::sync::oneshot::Receiver<()>,
}

/// The prefix of a blob moved aside (`.trash-<sha256>-<random>`).
const TRASH_PREFIX: &str = ".trash-";

impl BlobStore {
    /// Opens (creating it if needed) a blob directory whose blobs may be at most `max_bytes` long.
    /// Blobs left moved aside by a removal that never committed are put back.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(Error::Blob)?;
        restore_trash(&dir).map_err(Error::Blob)?;
        Ok(Self {
            dir: Arc::new(dir),
            max_bytes,
            #[cfg(test)]
            pause: Arc::default(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The largest blob accepted, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The SHA-256 of `bytes`, lower-case hex.
    pub fn digest(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn path_of(&self, sha256: &str) -> Result<PathBuf> {
        // Only a well-formed digest may become a path: no traversal through a crafted name.
        let well_formed = sha256.len() == 64
            && sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !well_formed {
            return Err(Error::NotFound { kind: "blob", id: sha256.to_owned() });
        }
        Ok(self.dir.join(&sha256[..2]).join(sha256))
    }

    /// Tests: the next upload through this blob store stops after writing its blob, before its
    /// transaction; `reached` fires then, and it goes on when `resume` is sent.
    #[cfg(test)]
    pub(crate) fn pause_next_upload(
        &self,
    ) -> (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Sender<()>) {
        let (reached, reached_rx) = tokio::sync::oneshot::channel();
        let (resume_tx, resume) = tokio::sync::oneshot::channel();
        *self.pause.lock().unwrap() = Some(Pause { reached, resume });
        (reached_rx, resume_tx)
    }

    /// Tests: stops here if [`BlobStore::pause_next_upload`] asked to.
    #[cfg(test)]
    pub(crate) async fn paused(&self) {
        let pause = self.pause.lock().unwrap().take();
        if let Some(Pause { reached, resume }) = pause {
            let _ = reached.send(());
            let _ = resume.await;
        }
    }

    /// Stores `bytes` and returns their SHA-256; `TooLarge` past the limit. Idempotent.
    pub async fn put(&self, bytes: &[u8]) -> Result<String> {
        let size = bytes.len() as u64;
        if size > self.max_bytes {
            return Err(Error::TooLarge { size, limit: self.max_bytes });
        }
        let sha256 = Self::digest(bytes);
        let path = self.path_of(&sha256)?;
        if tokio::fs::try_exists(&path).await.map_err(Error::Blob)? {
            return Ok(sha256);
        }
        let parent = path.parent().expect("blob paths have a fan-out directory");
        tokio::fs::create_dir_all(parent).await.map_err(Error::Blob)?;
        let tmp = parent.join(format!(".tmp-{sha256}-{}", hex::encode(rand::random::<[u8; 8]>())));
        let written = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            file.write_all(bytes).await?;
            file.sync_all().await?;
            drop(file);
            tokio::fs::rename(&tmp, &path).await?;
            // The rename, and the fan-out directory if it is new, are durable too: a row that
            // names this blob is committed only after this returns.
            for dir in [parent, &self.dir] {
                tokio::fs::File::open(dir).await?.sync_all().await?;
            }
            Ok(())
        }
        .await;
        if let Err(err) = written {
            // Best effort: the temp file is garbage either way and never read.
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(Error::Blob(err));
        }
        Ok(sha256)
    }

    /// The bytes of a blob.
    pub async fn get(&self, sha256: &str) -> Result<Vec<u8>> {
        let path = self.path_of(sha256)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(bytes),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::NotFound { kind: "blob", id: sha256.to_owned() })
            }
            Err(err) => Err(Error::Blob(err)),
        }
    }

    /// Moves a blob aside (it is no longer found) ahead of a removal that is yet to commit;
    /// `None` if it is not there. Call it holding the blob's lock in the removing transaction.
    pub async fn trash(&self, sha256: &str) -> Result<Option<Trashed>> {
        let path = self.path_of(sha256)?;
        let aside = path.with_file_name(format!(
            "{TRASH_PREFIX}{sha256}-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        match tokio::fs::rename(&path, &aside).await {
            Ok(()) => Ok(Some(Trashed { sha256: sha256.to_owned(), path: aside })),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(Error::Blob(err)),
        }
    }

    /// Deletes a blob moved aside, once its removal committed.
    pub async fn purge(&self, trashed: Trashed) {
        if let Err(err) = tokio::fs::remove_file(&trashed.path).await {
            tracing::warn!(%err, sha256 = %trashed.sha256, "cannot delete an unused code blob");
        }
    }

    /// Puts a blob moved aside back, when its removal did not commit. An upload that wrote the
    /// blob again meanwhile wins (the bytes are the same).
    pub async fn restore(&self, trashed: Trashed) {
        let put_back = async {
            let path = self.path_of(&trashed.sha256)?;
            if tokio::fs::try_exists(&path).await.map_err(Error::Blob)? {
                tokio::fs::remove_file(&trashed.path).await.map_err(Error::Blob)
            } else {
                tokio::fs::rename(&trashed.path, &path).await.map_err(Error::Blob)
            }
        };
        if let Err(err) = put_back.await {
            tracing::error!(%err, sha256 = %trashed.sha256, "cannot restore a code blob whose removal failed");
        }
    }
}

/// Puts back every blob of `dir` moved aside by a removal that never committed (a crash between
/// [`BlobStore::trash`] and the commit): with its row still there, it is still needed; without,
/// it is an unused blob, which costs only disk.
fn restore_trash(dir: &Path) -> std::io::Result<()> {
    for fan_out in std::fs::read_dir(dir)? {
        let fan_out = fan_out?.path();
        if !fan_out.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&fan_out)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(sha256) = name
                .to_str()
                .and_then(|n| n.strip_prefix(TRASH_PREFIX))
                .and_then(|rest| rest.split_once('-'))
                .map(|(sha, _)| sha.to_owned())
            else {
                continue;
            };
            let path = fan_out.join(&sha256);
            if path.exists() {
                std::fs::remove_file(entry.path())?;
            } else {
                std::fs::rename(entry.path(), &path)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_remove_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path().join("blobs"), 10).unwrap();
        let sha = blobs.put(b"hello").await.unwrap();
        assert_eq!(sha, BlobStore::digest(b"hello"));
        assert_eq!(blobs.put(b"hello").await.unwrap(), sha, "idempotent");
        assert_eq!(blobs.get(&sha).await.unwrap(), b"hello");
        let err = blobs.put(b"01234567890").await.unwrap_err();
        assert!(matches!(err, Error::TooLarge { size: 11, limit: 10 }), "{err:?}");
        assert!(matches!(blobs.get("../../etc/passwd").await, Err(Error::NotFound { .. })));
        let trashed = blobs.trash(&sha).await.unwrap().expect("present");
        assert!(blobs.trash(&sha).await.unwrap().is_none(), "already moved aside");
        assert!(matches!(blobs.get(&sha).await, Err(Error::NotFound { .. })));
        blobs.restore(trashed).await;
        assert_eq!(blobs.get(&sha).await.unwrap(), b"hello", "a failed removal restores it");
        // Moved aside by a process that crashed before committing: back when reopened.
        let _crashed = blobs.trash(&sha).await.unwrap().expect("present");
        let blobs = BlobStore::new(dir.path().join("blobs"), 10).unwrap();
        assert_eq!(blobs.get(&sha).await.unwrap(), b"hello");
        let trashed = blobs.trash(&sha).await.unwrap().expect("present");
        blobs.purge(trashed).await;
        assert!(matches!(blobs.get(&sha).await, Err(Error::NotFound { .. })));
        // No temp files are left behind.
        let leftovers: Vec<_> =
            std::fs::read_dir(dir.path().join("blobs").join(&sha[..2])).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
