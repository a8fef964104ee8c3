//! Task keys without storing them: a platform-run task's key is HMAC-SHA256 of its task id under
//! a secret the controller keeps outside the database, so the store holds only the key's hash
//! and a restarted controller derives the same key when it deploys the task again.
//!
//! The secret is 32 random bytes, hex, in a file created on first start with mode 0600
//! (`<data_dir>/secrets/task-keys.secret` for `fledge serve` and `fledge standalone`). Losing
//! it only invalidates the keys of tasks deployed before: their jobs' workers must be redeployed.
//!
//! The same secret derives each task's data-plane keys (nothing more is stored): its Ed25519
//! identity seed, HMAC of ("fledge-data-plane-identity", job, task), and each channel's
//! symmetric key, HMAC of ("fledge-data-plane-channel", job, channel). A task's config carries
//! its own seed, the keys of its channels and the public keys of the other tasks on them.

use std::io::Write as _;
use std::path::Path;

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use fledge_types::{DataPlaneSecurity, JobId, Schema, Task, TaskId};

/// Derives task keys from the controller's secret.
#[derive(Clone)]
pub struct TaskKeys {
    secret: [u8; 32],
}

impl std::fmt::Debug for TaskKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskKeys(<secret>)")
    }
}

impl TaskKeys {
    /// Keys under a fresh random secret (tests, or a controller whose keys need not survive it).
    pub fn random() -> Self {
        Self { secret: rand::random() }
    }

    /// Reads the secret from `path`, creating the file (and its directory) with a fresh secret,
    /// readable by the owner only, if it does not exist.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(text.trim()).map_err(|reason| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {reason}", path.display()),
                )
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let keys = Self::random();
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                match options.open(path) {
                    Ok(mut file) => {
                        file.write_all(hex::encode(keys.secret).as_bytes())?;
                        file.sync_all()?;
                        Ok(keys)
                    }
                    // Another process created it meanwhile: use theirs.
                    Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_create(path)
                    }
                    Err(err) => Err(err),
                }
            }
            Err(err) => Err(err),
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text).map_err(|err| format!("not a hex secret: {err}"))?;
        let secret: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("the secret must be 32 bytes, found {}", b.len()))?;
        Ok(Self { secret })
    }

    /// The key of task `task`: 64 hex digits.
    pub fn key(&self, task: &TaskId) -> String {
        self.derive(b"fledge task key v1\0", &[task.as_str()])
    }

    /// HMAC-SHA256 under the secret of `domain` followed by `parts`, each ended by a NUL byte
    /// (unambiguous for parts without NULs), as 64 hex digits. Different `domain`s give
    /// unrelated values, so one secret can derive several kinds of credential.
    pub fn derive(&self, domain: &[u8], parts: &[&str]) -> String {
        // A 32-byte key is always accepted by HMAC.
        let mut mac = <Hmac<Sha256>>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(domain);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                mac.update(b"\0");
            }
            mac.update(part.as_bytes());
        }
        hex::encode(mac.finalize().into_bytes())
    }

    /// HMAC of `label` and the length-prefixed `parts`, as bytes.
    fn derive_bytes(&self, label: &[u8], parts: &[&str]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256>>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(label);
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }

    /// The data-plane identity seed of `task` in `job`.
    pub fn data_plane_identity(&self, job: &JobId, task: &TaskId) -> [u8; 32] {
        self.derive_bytes(b"fledge-data-plane-identity\0", &[job.as_str(), task.as_str()])
    }

    /// The symmetric key of `channel` in `job`.
    pub fn data_plane_channel_key(&self, job: &JobId, channel: &str) -> [u8; 32] {
        self.derive_bytes(b"fledge-data-plane-channel\0", &[job.as_str(), channel])
    }

    /// The data-plane keys of `task`: its identity, and for every channel of its role the
    /// channel's key and the public keys of the job's other tasks whose role is on it.
    pub fn data_plane(&self, schema: &Schema, task: &Task, tasks: &[Task]) -> DataPlaneSecurity {
        let job = &task.job_id;
        let mut channel_keys = std::collections::BTreeMap::new();
        let mut members = std::collections::BTreeMap::new();
        let mut public_keys = std::collections::HashMap::new();
        for channel in schema.channels.iter().filter(|c| c.pair.contains(&task.role)) {
            channel_keys.insert(
                channel.name.clone(),
                hex::encode(self.data_plane_channel_key(job, &channel.name)),
            );
            let on_channel = tasks
                .iter()
                .filter(|t| t.task_id != task.task_id && channel.pair.contains(&t.role))
                .map(|t| {
                    let public = public_keys.entry(t.task_id.clone()).or_insert_with(|| {
                        let seed = self.data_plane_identity(job, &t.task_id);
                        hex::encode(
                            ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes(),
                        )
                    });
                    (t.task_id.as_str().to_owned(), public.clone())
                })
                .collect();
            members.insert(channel.name.clone(), on_channel);
        }
        DataPlaneSecurity {
            identity: hex::encode(self.data_plane_identity(job, &task.task_id)),
            channel_keys,
            members,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_per_task_per_secret_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets/task-keys.secret");
        let keys = TaskKeys::load_or_create(&path).unwrap();
        let a = keys.key(&TaskId::new("a"));
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, keys.key(&TaskId::new("b")));
        assert_ne!(a, TaskKeys::random().key(&TaskId::new("a")));
        let again = TaskKeys::load_or_create(&path).unwrap();
        assert_eq!(again.key(&TaskId::new("a")), a);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!format!("{keys:?}").contains(&hex::encode(keys.secret)));
    }

    #[test]
    fn a_damaged_secret_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.secret");
        std::fs::write(&path, "abcd").unwrap();
        let err = TaskKeys::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("bad.secret"), "{err}");
        assert!(err.to_string().contains("32 bytes"), "{err}");
    }
}
