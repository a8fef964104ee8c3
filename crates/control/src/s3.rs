//! The apiserver's reads of an `s3` job's models (`docs/registry.md`): the job's model files
//! listed under `{prefix}/jobs/{jobId}/` of its bucket and streamed from there, with the
//! credentials of the apiserver's own environment (the same AWS variables the s3 registry of
//! the data plane reads). Without credentials the apiserver does not read buckets at all.

use futures::StreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _};

/// Most objects listed under one job (model files, metric records, resume state).
pub const MAX_LISTED: usize = 200_000;

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty())
}

/// Whether this process's environment holds S3 credentials (or names the instance's role).
pub fn has_credentials() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "FLEDGE_S3_INSTANCE_CREDENTIALS",
    ]
    .iter()
    .any(|name| env_set(name))
}

/// A job's directory in an S3 bucket.
#[derive(Debug)]
pub struct JobObjects {
    store: AmazonS3,
    /// `{prefix}/jobs/{jobId}` (no leading or trailing `/`).
    dir: String,
}

/// What went wrong reading the bucket.
#[derive(Debug)]
pub enum Fault {
    /// The object does not exist.
    NotFound,
    /// The object is larger than the apiserver streams.
    TooLarge(u64),
    /// Anything else, for a message.
    Other(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::NotFound => f.write_str("not found"),
            Fault::TooLarge(n) => {
                write!(f, "the model file is {n} bytes, more than the apiserver streams")
            }
            Fault::Other(s) => f.write_str(s),
        }
    }
}

fn fault(e: object_store::Error) -> Fault {
    match e {
        object_store::Error::NotFound { .. } => Fault::NotFound,
        other => Fault::Other(other.to_string()),
    }
}

impl JobObjects {
    /// The directory of job `job` in the bucket `uri` names (`s3://bucket[/prefix]`), read
    /// with this process's AWS variables (`AWS_ENDPOINT_URL` for a store other than AWS; plain
    /// http only on loopback unless `AWS_ALLOW_HTTP=true`).
    pub fn new(uri: &str, job: &str) -> Result<JobObjects, String> {
        let (bucket, prefix) = fledge_types::parse_s3_uri(uri)?;
        if job.is_empty() || !job.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) {
            return Err(format!("job id {job:?} is not a key part"));
        }
        fledge_tls::install_default_provider();
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&bucket);
        let endpoint = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
            .iter()
            .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
        if let Some(endpoint) = &endpoint
            && endpoint.starts_with("http://")
        {
            let explicit = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true");
            let host = reqwest::Url::parse(endpoint)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            let loopback = host == "localhost"
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !explicit && !loopback {
                return Err(format!(
                    "the S3 endpoint {endpoint} is plain http on a non-loopback host: use \
                     https, or set AWS_ALLOW_HTTP=true"
                ));
            }
            builder = builder.with_allow_http(true);
        }
        let store = builder.build().map_err(|e| format!("cannot configure S3: {e}"))?;
        let dir =
            if prefix.is_empty() { format!("jobs/{job}") } else { format!("{prefix}/jobs/{job}") };
        Ok(JobObjects { store, dir })
    }

    /// Every object under the job's directory: its key relative to it, and its size.
    pub async fn list(&self) -> Result<Vec<(String, u64)>, Fault> {
        let mut out = Vec::new();
        let mut listing = self.store.list(Some(&ObjectPath::from(self.dir.as_str())));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(fault)?;
            if out.len() >= MAX_LISTED {
                return Err(Fault::Other(format!("more than {MAX_LISTED} objects under the job")));
            }
            let key = meta.location.as_ref();
            if let Some(rel) = key.strip_prefix(&self.dir).and_then(|r| r.strip_prefix('/')) {
                out.push((rel.to_owned(), meta.size));
            }
        }
        Ok(out)
    }

    /// The object at `rel` under the job's directory, as its size and a byte stream; refused
    /// beyond `max` bytes.
    pub async fn get(
        &self,
        rel: &str,
        max: u64,
    ) -> Result<(u64, futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>), Fault>
    {
        let key = ObjectPath::from(format!("{}/{rel}", self.dir));
        let got = self.store.get(&key).await.map_err(fault)?;
        let size = got.meta.size;
        if size > max {
            return Err(Fault::TooLarge(size));
        }
        let stream = got.into_stream().map(|chunk| chunk.map_err(std::io::Error::other)).boxed();
        Ok((size, stream))
    }
}
