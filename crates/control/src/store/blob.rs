//! Content-addressed blob store for code bundles: one file per SHA-256 under a directory.
//!
//! Writes go to a temporary file in the same directory, are synced, then renamed into place,
//! so a reader never sees a partial bundle and a crash leaves at most a stray temp file.
//! Rows in the database hold only the metadata (version, size, hash).

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
    /// Orders adding references against collecting unreferenced blobs: a writer holds it shared
    /// from `put` until the row that names the blob is committed, a collector holds it
    /// exclusively from counting references until the removal, so a blob is never removed
    /// between an upload finding it present and committing its row. (One process owns a blob
    /// directory.)
    refs: Arc<tokio::sync::RwLock<()>>,
}

impl BlobStore {
    /// Opens (creating it if needed) a blob directory whose blobs may be at most `max_bytes` long.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(Error::Blob)?;
        Ok(Self { dir: Arc::new(dir), max_bytes, refs: Arc::default() })
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

    /// Held while adding a reference to a blob (from [`BlobStore::put`] to the commit of the row
    /// that names it); collection waits for it.
    pub async fn referencing(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.refs.read().await
    }

    /// Held while collecting unreferenced blobs (from counting references to removing);
    /// new references wait for it.
    pub async fn collecting(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.refs.write().await
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

    /// Removes a blob; removing a missing blob is not an error.
    pub async fn remove(&self, sha256: &str) -> Result<()> {
        let path = self.path_of(sha256)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(Error::Blob(err)),
        }
    }
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
        blobs.remove(&sha).await.unwrap();
        blobs.remove(&sha).await.unwrap();
        assert!(matches!(blobs.get(&sha).await, Err(Error::NotFound { .. })));
        // No temp files are left behind.
        let leftovers: Vec<_> =
            std::fs::read_dir(dir.path().join("blobs").join(&sha[..2])).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
