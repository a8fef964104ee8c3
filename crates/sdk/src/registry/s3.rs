//! The `s3` registry: the local registry's layout in an S3 bucket or any S3-compatible object
//! store (MinIO, Ceph RGW, SeaweedFS, ...), through the `object_store` crate.
//!
//! `modelSpec.registry {"sort": "s3", "uri": "s3://bucket/optional/prefix"}`. Under the prefix:
//!
//! ```text
//! models/{name}/{version}.safetensors                 base models
//! jobs/{jobId}[/{scope}]/rounds/round-00001.safetensors   the global model after each round
//! jobs/{jobId}[/{scope}]/final.safetensors            the final global model
//! jobs/{jobId}[/{scope}]/resume/{taskId}.safetensors  what an aggregating task needs to resume
//! jobs/{jobId}/metrics/{taskId}/{round}-{millis}.json one metric record per object
//! ```
//!
//! An object store cannot append, so each metric record is an object of its own, named by its
//! round and timestamp: a record sent again (a resumed task re-sends its last ones) lands on
//! the same name, so it is kept once. Every PUT replaces an object whole, so a reader never
//! sees half a checkpoint.
//!
//! Where and as whom: the standard AWS variables of the task's process (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`/`AWS_DEFAULT_REGION`, and
//! `AWS_ENDPOINT_URL` for a store other than AWS); a task without `AWS_ACCESS_KEY_ID` (or web
//! identity or container credentials) is refused at its first read or write (a trainer, which
//! never touches the registry, runs without) unless
//! `FLEDGE_S3_INSTANCE_CREDENTIALS=1` says the instance's role is meant. Platform-run workers
//! do not inherit the deployer's AWS variables (their environment is cleared), so the s3
//! registry is for tasks run with the operator's environment: `fledge run-task`,
//! participant-run aggregators, Python's `fledge.run`/`simulate`. Plain `http://` endpoints are accepted on
//! loopback only, unless the operator sets `AWS_ALLOW_HTTP=true`. Transient failures are
//! retried with backoff by `object_store` (up to 10 times within 3 minutes); a write that
//! still fails fails the task, which the controller restarts from its last saved round.

use std::path::PathBuf;

use fledge_algorithms::Weights;
use fledge_types::{JobId, MetricRecord, RegistrySpec, TaskId};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload};

use super::{Registry, ResumeState, component, from_safetensors, read_resume, write_resume};
use crate::{Error, Result};

/// The registry sort of an S3-compatible object store.
pub const S3: &str = fledge_types::S3_REGISTRY;

/// Most metric records [`Registry::recent_metrics`] returns.
const RECENT: usize = 16;

/// Largest object read back (a model or resume file), in bytes.
pub const MAX_OBJECT_BYTES: u64 = 4 << 30;

/// A registry in an S3 bucket (see the module docs).
pub struct S3Registry {
    store: AmazonS3,
    /// Why it cannot be used, when the task's environment holds no credentials.
    missing_credentials: Option<String>,
    /// `s3://bucket/prefix` as the job named it, for messages.
    uri: String,
    /// The key prefix inside the bucket (empty, or ending without `/`).
    prefix: String,
    /// Sub-directory of the job directory for model files (a task's non-default groups).
    scope: Option<String>,
    runtime: tokio::runtime::Runtime,
}

impl S3Registry {
    /// The registry `spec` names (sort `s3`), configured from the process's AWS variables,
    /// its model files under `scope` when the task is in named groups.
    pub fn new(spec: &RegistrySpec, scope: Option<&str>) -> Result<S3Registry> {
        let (bucket, prefix) = fledge_types::parse_s3_uri(&spec.uri)
            .map_err(|e| Error::Config(format!("modelSpec.registry.uri: {e}")))?;
        let env_set = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty());
        let credentials = ["AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE"]
            .iter()
            .chain(&[
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            ])
            .any(|name| env_set(name));
        // Only a task that reads or writes needs them (a trainer of the job never does), so
        // their absence is reported at the first use, at once rather than after retries.
        let missing_credentials = (!credentials && !env_set("FLEDGE_S3_INSTANCE_CREDENTIALS"))
            .then(|| {
                format!(
                    "the s3 registry {} needs credentials in the task's environment: \
                     AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (platform-run workers do not \
                     inherit them), or FLEDGE_S3_INSTANCE_CREDENTIALS=1 for the instance's role",
                    spec.uri
                )
            });
        fledge_tls::install_default_provider();
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&bucket);
        let endpoint = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
        if let Some(endpoint) = &endpoint
            && endpoint.starts_with("http://")
        {
            let explicit = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true");
            if !explicit && !is_loopback_url(endpoint) {
                return Err(Error::Config(format!(
                    "the s3 registry's endpoint {endpoint} is plain http on a non-loopback host: \
                     use https, or set AWS_ALLOW_HTTP=true to accept it"
                )));
            }
            builder = builder.with_allow_http(true);
        }
        let store = builder.build().map_err(|e| {
            Error::Config(format!("cannot configure the s3 registry {}: {e}", spec.uri))
        })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("fledge-s3")
            .build()
            .map_err(|e| Error::Config(format!("cannot start the s3 registry's runtime: {e}")))?;
        Ok(S3Registry {
            store,
            missing_credentials,
            uri: spec.uri.clone(),
            prefix,
            scope: scope.map(str::to_owned),
            runtime,
        })
    }

    /// Runs `fut` on the registry's runtime from any thread (a scoped thread blocks on it, so
    /// a caller on an async thread does not panic).
    fn block_on<T: Send, F: std::future::Future<Output = T>>(
        &self,
        make: impl FnOnce() -> F + Send,
    ) -> T {
        std::thread::scope(|s| {
            s.spawn(|| self.runtime.block_on(make()))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    fn key(&self, parts: &[&str]) -> ObjectPath {
        let mut key = self.prefix.clone();
        for part in parts {
            if !key.is_empty() {
                key.push('/');
            }
            key.push_str(part);
        }
        ObjectPath::from(key)
    }

    fn models_parts(&self, job: &JobId) -> Result<Vec<String>> {
        component("job id", job.as_str())?;
        let mut parts = vec!["jobs".to_owned(), job.as_str().to_owned()];
        if let Some(scope) = &self.scope {
            component("model scope (the task's group names)", scope)?;
            parts.push(scope.clone());
        }
        Ok(parts)
    }

    fn error(&self, key: &ObjectPath, e: impl std::fmt::Display) -> Error {
        Error::Config(format!("s3 registry {}: {key}: {e}", self.uri))
    }

    /// Whether it can be used: refused at once without credentials.
    fn usable(&self) -> Result<()> {
        match &self.missing_credentials {
            Some(why) => Err(Error::Config(why.clone())),
            None => Ok(()),
        }
    }

    fn put(&self, key: ObjectPath, bytes: Vec<u8>) -> Result<PathBuf> {
        self.usable()?;
        self.block_on(|| self.store.put(&key, PutPayload::from(bytes)))
            .map_err(|e| self.error(&key, e))?;
        Ok(PathBuf::from(format!(
            "{}/{key}",
            self.uri.split('/').take(3).collect::<Vec<_>>().join("/")
        )))
    }

    /// The object at `key`, `None` when there is none.
    fn get(&self, key: &ObjectPath) -> Result<Option<Vec<u8>>> {
        self.usable()?;
        let res = self.block_on(|| async {
            let got = self.store.get(key).await?;
            if got.meta.size > MAX_OBJECT_BYTES {
                return Err(object_store::Error::Generic {
                    store: "S3",
                    source: format!("{} bytes, more than {MAX_OBJECT_BYTES}", got.meta.size).into(),
                });
            }
            got.bytes().await
        });
        match res {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    fn put_model(&self, key: ObjectPath, weights: &Weights) -> Result<PathBuf> {
        let bytes = super::to_safetensors(weights)?;
        self.put(key, bytes)
    }
}

fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Registry for S3Registry {
    fn load_model(&self, name: &str, version: i64) -> Result<Option<Weights>> {
        component("model name", name)?;
        let key = self.key(&["models", name, &format!("{version}.safetensors")]);
        match self.get(&key)? {
            Some(bytes) => from_safetensors(key.as_ref(), &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn save_model(&self, name: &str, version: i64, weights: &Weights) -> Result<PathBuf> {
        component("model name", name)?;
        self.put_model(self.key(&["models", name, &format!("{version}.safetensors")]), weights)
    }

    fn save_round(&self, job: &JobId, round: u64, weights: &Weights) -> Result<PathBuf> {
        let mut parts = self.models_parts(job)?;
        parts.extend(["rounds".to_owned(), format!("round-{round:05}.safetensors")]);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.put_model(self.key(&parts), weights)
    }

    fn save_final(&self, job: &JobId, weights: &Weights) -> Result<PathBuf> {
        let mut parts = self.models_parts(job)?;
        parts.push("final.safetensors".to_owned());
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.put_model(self.key(&parts), weights)
    }

    fn append_metrics(&self, job: &JobId, records: &[MetricRecord]) -> Result<()> {
        component("job id", job.as_str())?;
        for record in records {
            component("task id", record.task_id.as_str())?;
            let millis = record.timestamp.unwrap_or_else(chrono::Utc::now).timestamp_millis();
            let name = format!("{:09}-{millis:014}.json", record.round);
            let key = self.key(&["jobs", job.as_str(), "metrics", record.task_id.as_str(), &name]);
            let json = serde_json::to_vec(record).expect("metric records serialise");
            self.put(key, json)?;
        }
        Ok(())
    }

    fn save_resume(&self, job: &JobId, task: &TaskId, state: &ResumeState) -> Result<()> {
        component("task id", task.as_str())?;
        let mut parts = self.models_parts(job)?;
        parts.extend(["resume".to_owned(), format!("{task}.safetensors")]);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let mut bytes = Vec::new();
        write_resume(&mut bytes, state).map_err(|e| Error::Tensors(e.to_string()))?;
        self.put(self.key(&parts), bytes).map(|_| ())
    }

    fn load_resume(&self, job: &JobId, task: &TaskId) -> Result<Option<ResumeState>> {
        component("task id", task.as_str())?;
        let mut parts = self.models_parts(job)?;
        parts.extend(["resume".to_owned(), format!("{task}.safetensors")]);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let key = self.key(&parts);
        match self.get(&key)? {
            Some(bytes) => read_resume(key.as_ref(), &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn recent_metrics(&self, job: &JobId, task: &TaskId) -> Result<Vec<MetricRecord>> {
        component("job id", job.as_str())?;
        component("task id", task.as_str())?;
        self.usable()?;
        let dir = self.key(&["jobs", job.as_str(), "metrics", task.as_str()]);
        let listed = self.block_on(|| async {
            use futures::TryStreamExt as _;
            self.store.list(Some(&dir)).try_collect::<Vec<_>>().await
        });
        let mut keys: Vec<ObjectPath> =
            listed.map_err(|e| self.error(&dir, e))?.into_iter().map(|m| m.location).collect();
        keys.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        let start = keys.len().saturating_sub(RECENT);
        let mut records = Vec::new();
        for key in &keys[start..] {
            if let Some(bytes) = self.get(key)?
                && let Ok(record) = serde_json::from_slice::<MetricRecord>(&bytes)
            {
                records.push(record);
            }
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_credentials_the_first_use_is_refused_naming_them() {
        // SAFETY: nextest runs each test in a process of its own; nothing else runs yet.
        unsafe {
            for name in [
                "AWS_ACCESS_KEY_ID",
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "FLEDGE_S3_INSTANCE_CREDENTIALS",
            ] {
                std::env::remove_var(name);
            }
        }
        let spec = RegistrySpec { sort: S3.into(), uri: "s3://models/x".into() };
        // A task that never touches the registry (a trainer) is not stopped by it.
        let reg = S3Registry::new(&spec, None).expect("constructible without credentials");
        let weights = Weights::from_tensors(vec![
            fledge_algorithms::Tensor::new("w", vec![1], vec![1.0]).expect("tensor"),
        ])
        .expect("weights");
        let err = reg.save_round(&"job".into(), 1, &weights).expect_err("no credentials");
        assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"), "{err}");
        let err = reg.load_model("base", 1).expect_err("no credentials");
        assert!(err.to_string().contains("needs credentials"), "{err}");
    }

    #[test]
    fn uris_name_a_valid_bucket_and_a_safe_prefix() {
        use fledge_types::parse_s3_uri as parse_uri;
        assert_eq!(parse_uri("s3://models").unwrap(), ("models".into(), String::new()));
        assert_eq!(
            parse_uri("s3://my.models-1/a/b/").unwrap(),
            ("my.models-1".into(), "a/b".into())
        );
        for bad in [
            "http://x/y",
            "s3://",
            "s3://ab",
            "s3://Upper",
            "s3://-x-",
            "s3://ok/../up",
            "s3://ok/a b",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
        assert!(is_loopback_url("http://127.0.0.1:9000"));
        assert!(is_loopback_url("http://localhost:9000/"));
        assert!(is_loopback_url("http://[::1]:9000"));
        assert!(!is_loopback_url("http://minio.example:9000"));
    }
}
